//! Rotation end to end on the network-namespace testbed: a real agent in a
//! device namespace with modem uplinks, each NATed by its own carrier to
//! the root namespace ("the internet") where the control plane and the
//! targets run, and modems simulated on pseudo-terminals. Customers are
//! real curl processes; what a target sees is the truth.
//!
//! Needs root (namespaces, veths, nftables); CI runs as root.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use tests::testbed::modem_sim::{Delays, Fault, ModemSim, SameIp, SimOptions};
use tests::testbed::netns::{Bed, BedOptions};
use tests::{AgentLaunch, Blob, Cluster, ClusterOpts, Curl, FileServer, assert_eventually};

const CP_CONFIG: &str = r#"
[rotation]
drain_grace_secs = 2
attempts = 3
retry_delay_secs = 1
attempt_timeout_secs = 30
"#;

fn root() -> bool {
    nix::unistd::geteuid().is_root()
}

struct Farm {
    bed: Bed,
    c: Cluster,
    site: FileServer,
    sims: Vec<ModemSim>,
}

impl Farm {
    /// A bed with `uplinks` modems (one simulator each), a control plane on
    /// the bed's internet address, and one agent serving every uplink as
    /// an exit `m{i}` rotated by AT commands.
    fn start(
        name: &str,
        uplinks: usize,
        cp_config: &str,
        sim: impl Fn(usize) -> SimOptions,
    ) -> Self {
        Self::start_with(name, uplinks, cp_config, sim, "")
    }

    fn start_with(
        name: &str,
        uplinks: usize,
        cp_config: &str,
        sim: impl Fn(usize) -> SimOptions,
        agent_extra: &str,
    ) -> Self {
        let mut f = Self::new(
            name,
            BedOptions {
                uplinks,
                ..BedOptions::default()
            },
            cp_config,
        );
        let inet = f.bed.internet_ip();
        let mut toml = format!("{agent_extra}\n");
        for i in 0..uplinks {
            let s = ModemSim::start(sim(i), f.bed.uplink(i)).expect("modem simulator");
            toml.push_str(&format!(
                r#"
[[exit]]
name = "m{i}"
interface = "{iface}"
dns = ["{inet}"]
[exit.rotation]
backend = "at"
port = "{port}"
profile = "quectel-ec25"
"#,
                iface = f.bed.host_if(i),
                port = s.port_path().display(),
            ));
            f.sims.push(s);
        }
        f.run_agent(&toml, vec![]);
        f
    }

    /// The bed, the control plane on the bed's internet address and the
    /// target; no agent yet.
    fn new(name: &str, bed: BedOptions, cp_config: &str) -> Self {
        let bed = Bed::new(bed).expect("testbed");
        let inet = IpAddr::V4(bed.internet_ip());
        let c = Cluster::start(ClusterOpts {
            agents: 0,
            bind_ip: inet,
            config_toml: Some(cp_config.to_string()),
            ..ClusterOpts::named(name)
        });
        let site = FileServer::start_on(
            "origin",
            Some(Blob::random(20 << 20, 7)),
            SocketAddr::new(inet, 0),
        );
        Farm {
            bed,
            c,
            site,
            sims: Vec::new(),
        }
    }

    /// Enroll and start the agent in the device namespace; wait until every
    /// exit's address is known.
    fn run_agent(&mut self, toml: &str, env: Vec<(String, String)>) {
        let idx = self.c.enroll_agent("pi");
        self.c.start_agent_with(
            idx,
            &AgentLaunch {
                prefix: vec![
                    "ip".into(),
                    "netns".into(),
                    "exec".into(),
                    self.bed.host_ns().to_string(),
                ],
                config_toml: Some(toml.to_string()),
                env,
                ..AgentLaunch::default()
            },
        );
        self.c.wait_online(1, Duration::from_secs(20));
        for i in 0..self.bed.uplink_count() {
            let want = self.bed.public_ip(i).to_string();
            assert_eventually!(
                Duration::from_secs(20),
                self.exit(i)["external_ip"] == want.as_str(),
                "exit m{i} address not checked: {}",
                self.exit(i)
            );
        }
    }

    fn id(&self) -> String {
        self.c.agents[0].device_id.clone()
    }

    fn device(&self) -> Value {
        self.c.api().device(&self.id()).expect("device")
    }

    fn exit(&self, i: usize) -> Value {
        let d = self.device();
        d["exits"]
            .as_array()
            .and_then(|a| {
                a.iter()
                    .find(|e| e["name"] == format!("m{i}").as_str())
                    .cloned()
            })
            .unwrap_or(Value::Null)
    }

    /// The address the target sees for one request through the proxy.
    fn seen_ip(&self) -> String {
        let r = Curl::new()
            .proxy(&self.c.http_proxy())
            .arg(self.site.url("/ip"))
            .run();
        r.expect_ok("request through the proxy");
        r.stdout.trim().to_string()
    }

    fn rotate(&self, exit: usize) -> (u16, Value) {
        let r = self.c.api().post(
            &format!("/api/v1/devices/{}/rotate", self.id()),
            Some(&json!({ "exit": format!("m{exit}") })),
        );
        (r.status, r.json())
    }

    fn dump(&self) {
        self.c.dump_logs();
    }
}

fn fast_sim(same_ip: SameIp) -> SimOptions {
    SimOptions {
        delays: Delays::default().scaled(0.5),
        same_ip,
        ..SimOptions::default()
    }
}

#[test]
fn at_rotation_changes_the_address_a_target_sees() {
    if !root() {
        eprintln!("skipped: needs root");
        return;
    }
    let f = Farm::start("rot-at", 1, CP_CONFIG, |_| fast_sim(SameIp::Never));
    let before = f.seen_ip();
    assert_eq!(before, f.bed.public_ip(0).to_string());

    let (status, v) = f.rotate(0);
    if status != 200 {
        f.dump();
    }
    assert_eq!(status, 200, "{v}");
    let rot = &v["rotation"];
    assert_eq!(rot["old_ip"], before.as_str());
    let new = f.bed.public_ip(0).to_string();
    assert_ne!(new, before);
    assert_eq!(rot["new_ip"], new.as_str());
    assert_eq!(rot["rungs"], json!(["pdp"]));
    assert_eq!(rot["attempts"], 1);
    assert_eq!(rot["method"], "at");
    assert_eq!(f.seen_ip(), new, "the target sees the new address");
    assert_eq!(f.sims[0].stats().pdp_cycles, 1);

    // The tunnel migrated over the device's address change: same device,
    // no reconnect.
    let d = f.device();
    assert_eq!(d["reconnects"], 0, "{d}");
    assert_eq!(f.c.api().devices().len(), 1);
    // IP history has both addresses.
    let ips =
        f.c.api()
            .get(&format!("/api/v1/devices/{}/ips", f.id()))
            .json();
    let seen: Vec<&str> = ips
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|r| r["ip"].as_str())
        .collect();
    assert!(
        seen.contains(&before.as_str()) && seen.contains(&new.as_str()),
        "{ips}"
    );
    // Modem telemetry reaches the API.
    assert_eventually!(
        Duration::from_secs(45),
        f.exit(0)["telemetry"]["operator"].is_string(),
        "no modem telemetry: {}",
        f.exit(0)
    );
    let t = &f.exit(0)["telemetry"];
    assert!(
        t["rssi_dbm"].is_number() && t["access_tech"].is_string(),
        "{t}"
    );
    assert_eventually!(
        Duration::from_secs(10),
        f.device()["operator"] == "Vodafone.de",
        "{}",
        f.device()
    );
    assert_eq!(f.device()["kind"], "usb_modem");
}

#[test]
fn same_address_is_retried_on_a_harder_rung() {
    if !root() {
        eprintln!("skipped: needs root");
        return;
    }
    let f = Farm::start("rot-same", 1, CP_CONFIG, |_| {
        fast_sim(SameIp::FirstN { pdp: 1, radio: 0 })
    });
    let before = f.seen_ip();
    let (status, v) = f.rotate(0);
    if status != 200 {
        f.dump();
    }
    assert_eq!(status, 200, "{v}");
    let rot = &v["rotation"];
    assert_eq!(rot["attempts"], 2, "{rot}");
    assert_eq!(rot["rungs"], json!(["pdp", "radio"]));
    assert_ne!(rot["new_ip"], before.as_str());
    assert_eq!(f.sims[0].stats().radio_cycles, 1);
    assert_eq!(f.seen_ip(), f.bed.public_ip(0).to_string());
}

#[test]
fn a_download_started_before_a_rotation_completes_byte_exact() {
    if !root() {
        eprintln!("skipped: needs root");
        return;
    }
    let cfg = CP_CONFIG.replace("drain_grace_secs = 2", "drain_grace_secs = 15");
    let f = Farm::start("rot-drain", 1, &cfg, |_| fast_sim(SameIp::Never));
    let out = f.c.dir().join("blob.bin");
    // 20 MB at 2 MB/s, paced by the target itself (about 10 s, inside the
    // 15 s grace): the transfer is well in flight when the rotation starts,
    // even when the poll below runs late on a loaded machine.
    let mut dl = Curl::new()
        .proxy(&f.c.http_proxy())
        .output(&out)
        .arg(f.site.url("/blob?rate=2000000"))
        .spawn(f.c.dir(), "download");
    assert_eventually!(
        Duration::from_secs(20),
        std::fs::metadata(&out).map(|m| m.len()).unwrap_or(0) >= 1 << 20,
        "the download never started"
    );
    let (status, v) = f.rotate(0);
    assert_eq!(status, 200, "{v}");
    let rot = &v["rotation"];
    assert!(
        rot["drain_ms"].as_i64().unwrap() >= 1000,
        "the rotation waited for the download: {rot}"
    );
    let r = dl.wait(Duration::from_secs(60)).expect("download finished");
    r.expect_ok("download across a rotation");
    let (sha, len) = tests::sha256_file(&out);
    assert_eq!(len, 20 << 20);
    assert_eq!(sha, Blob::random(20 << 20, 7).sha256());
}

#[test]
fn three_modems_each_flow_leaves_through_its_own_uplink() {
    if !root() {
        eprintln!("skipped: needs root");
        return;
    }
    let f = Farm::start("rot-multi", 3, CP_CONFIG, |_| fast_sim(SameIp::Never));
    let publics: Vec<String> = (0..3).map(|i| f.bed.public_ip(i).to_string()).collect();
    let mut seen = Vec::new();
    for _ in 0..9 {
        seen.push(f.seen_ip());
    }
    for p in &publics {
        assert_eq!(
            seen.iter().filter(|s| *s == p).count(),
            3,
            "{seen:?} vs {publics:?}"
        );
    }
    // Names resolve on the device, through the exit's own uplink: the
    // nameserver sees each query from the public address of the exit that
    // carried the flow.
    let inet = f.bed.internet_ip();
    let dns = tests::testbed::dns_server::DnsServer::start(
        std::net::UdpSocket::bind((inet, 53)).expect("bind the test nameserver"),
        [("origin.test".to_string(), vec![IpAddr::V4(inet)])].into(),
    );
    let mut by_name = Vec::new();
    for _ in 0..3 {
        let r = Curl::new()
            .proxy(&f.c.http_proxy())
            .arg(format!("http://origin.test:{}/ip", f.site.port()))
            .run();
        r.expect_ok("request by name");
        by_name.push(r.stdout.trim().to_string());
    }
    let query_sources: Vec<String> = dns
        .queries()
        .iter()
        .map(|(_, from)| from.ip().to_string())
        .collect();
    for ip in &by_name {
        assert!(
            query_sources.contains(ip),
            "the exit {ip} resolved elsewhere: {query_sources:?}"
        );
    }
    assert!(
        query_sources.iter().all(|q| publics.contains(q)),
        "{query_sources:?}"
    );
    // The control plane's per-exit counters agree with what the target saw.
    assert_eventually!(
        Duration::from_secs(10),
        (0..3).all(|i| f.exit(i)["counters"]["successes"] == 4),
        "{}",
        f.device()
    );
    // Rotating one modem changes only that exit's address.
    let (status, v) = f.rotate(1);
    assert_eq!(status, 200, "{v}");
    assert_eq!(f.bed.public_ip(0).to_string(), publics[0]);
    assert_eq!(f.bed.public_ip(2).to_string(), publics[2]);
    assert_ne!(f.bed.public_ip(1).to_string(), publics[1]);
    let mut after = Vec::new();
    for _ in 0..6 {
        after.push(f.seen_ip());
    }
    assert!(after.contains(&f.bed.public_ip(1).to_string()), "{after:?}");
    assert!(!after.contains(&publics[1]), "{after:?}");
}

#[test]
fn the_tunnel_survives_address_changes_and_outages() {
    if !root() {
        eprintln!("skipped: needs root");
        return;
    }
    // Top-level keys go before the tables.
    let cfg = format!(
        "tunnel_keep_alive_secs = 2\ntunnel_idle_timeout_secs = 6\nheartbeat_interval_secs = 2\n{CP_CONFIG}"
    );
    let f = Farm::start_with(
        "rot-migrate",
        1,
        &cfg,
        |_| fast_sim(SameIp::Never),
        "keep_alive_secs = 2\nidle_timeout_secs = 6\n",
    );
    let remote = |f: &Farm| {
        f.device()["live"]["remote_addr"]
            .as_str()
            .unwrap_or("")
            .to_string()
    };
    let first = remote(&f);
    // Hot swap of the device's own address: the connection migrates.
    f.bed.hot_swap_host_addr(0).unwrap();
    assert_eq!(f.seen_ip(), f.bed.public_ip(0).to_string());
    // A short outage with a new address (below the idle timeout).
    f.bed.link_flap(0, Duration::from_secs(2), true).unwrap();
    assert_eq!(f.seen_ip(), f.bed.public_ip(0).to_string());
    let d = f.device();
    assert_eq!(d["reconnects"], 0, "migrations are not reconnects: {d}");
    assert_eq!(d["live"]["session_id"], 1, "{d}");
    eprintln!("remote address before {first}, after {}", remote(&f));

    // An outage longer than the idle timeout: one reconnect, same device.
    f.bed.link_flap(0, Duration::from_secs(9), true).unwrap();
    assert_eventually!(
        Duration::from_secs(40),
        f.device()["status"] == "online" && f.device()["reconnects"] == 1,
        "{}",
        f.device()
    );
    assert_eq!(f.c.api().devices().len(), 1);
    assert_eq!(f.seen_ip(), f.bed.public_ip(0).to_string());
}

#[test]
fn modem_faults_end_in_a_clean_failure_with_a_reason() {
    if !root() {
        eprintln!("skipped: needs root");
        return;
    }
    let cfg = CP_CONFIG
        .replace("attempts = 3", "attempts = 2")
        .replace("attempt_timeout_secs = 30", "attempt_timeout_secs = 20");
    let mut f = Farm::start("rot-faults", 1, &cfg, |_| fast_sim(SameIp::Never));
    let before = f.bed.public_ip(0).to_string();

    // The modem refuses: +CME ERROR on every rung.
    f.sims[0].set_faults(vec![
        Fault::CmeError("+CGACT".into(), 30),
        Fault::CmeError("+CFUN".into(), 30),
    ]);
    let started = Instant::now();
    let (status, v) = f.rotate(0);
    assert_eq!(status, 502, "{v}");
    let err = v["rotation"]["error"].as_str().unwrap_or("").to_string();
    assert!(
        err.contains("CME ERROR") || err.contains("no network service"),
        "{err}"
    );
    eprintln!("CME failure after {:?}: {err}", started.elapsed());
    // The uplink still works: back in the pool, customers still served.
    assert_eq!(f.exit(0)["status"], "ready", "{}", f.exit(0));
    assert_eq!(f.seen_ip(), before);

    // The modem goes silent: every command times out, bounded.
    f.sims[0].set_faults(vec![Fault::NoReply(String::new())]);
    let started = Instant::now();
    let (status, v) = f.rotate(0);
    let took = started.elapsed();
    assert_eq!(status, 502, "{v}");
    let err = v["rotation"]["error"].as_str().unwrap_or("");
    assert!(err.contains("timed out"), "{err}");
    assert!(took < Duration::from_secs(60), "bounded: {took:?}");
    // The data path never blocked on the modem.
    assert_eq!(f.seen_ip(), before);
    assert!(
        f.c.agents[0].is_running(),
        "the agent survived a silent modem"
    );

    // Slow bytes and URCs in the middle of answers are survived.
    f.sims[0].set_faults(vec![
        Fault::UrcInResponse(String::new(), "+CEREG: 5".into()),
        Fault::SlowBytes(Duration::from_millis(5)),
    ]);
    let (status, v) = f.rotate(0);
    assert_eq!(status, 200, "{v}");
    assert_ne!(f.seen_ip(), before);
}

#[test]
fn schedules_and_request_counts_trigger_rotations() {
    if !root() {
        eprintln!("skipped: needs root");
        return;
    }
    let f = Farm::start("rot-auto", 1, CP_CONFIG, |_| fast_sim(SameIp::Never));
    let id = f.id();
    let api = f.c.api();
    // After 3 requests.
    let r = api.request(
        "PUT",
        &format!("/api/v1/devices/{id}/rotation"),
        Some(&json!({"after_requests": 3})),
    );
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.json()["effective"]["after_requests"], 3);
    std::thread::sleep(Duration::from_secs(6)); // policies reload every 5 s
    for _ in 0..3 {
        f.seen_ip();
    }
    let causes = |f: &Farm| -> Vec<String> {
        f.c.api()
            .get(&format!("/api/v1/devices/{}/rotations", f.id()))
            .json()
            .as_array()
            .map(|a| {
                a.iter()
                    .filter_map(|r| r["cause"].as_str().map(String::from))
                    .collect()
            })
            .unwrap_or_default()
    };
    assert_eventually!(
        Duration::from_secs(30),
        causes(&f).contains(&"requests".to_string()),
        "no rotation after 3 requests: {:?}",
        causes(&f)
    );
    // On a schedule, per label.
    api.request(
        "PUT",
        &format!("/api/v1/devices/{id}/rotation"),
        Some(&json!({})),
    );
    api.request(
        "PATCH",
        &format!("/api/v1/devices/{id}"),
        Some(&json!({"labels": ["fast"]})),
    );
    let r = api.request(
        "PUT",
        "/api/v1/label-rotation/fast",
        Some(&json!({"every_secs": 10, "jitter_secs": 2})),
    );
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eventually!(
        Duration::from_secs(40),
        causes(&f).contains(&"schedule".to_string()),
        "no scheduled rotation: {:?}",
        causes(&f)
    );
}

/// Figures for the record (printed, not asserted on timing): how often the
/// verify-retry loop ends with a really new address when the modem keeps
/// its address on half of the soft steps, and what cellgate adds on top of
/// the backend's own time. Run with `--nocapture` to see them.
#[test]
fn verify_retry_loop_figures() {
    if !root() {
        eprintln!("skipped: needs root");
        return;
    }
    const N: usize = 8;
    let f = Farm::start("rot-figures", 1, CP_CONFIG, |_| {
        fast_sim(SameIp::Probability { p: 0.5, seed: 42 })
    });
    let mut ok = 0;
    let mut first_try = 0;
    let mut overheads = Vec::new();
    let mut lines = Vec::new();
    for _ in 0..N {
        let before = f.bed.public_ip(0).to_string();
        let (status, v) = f.rotate(0);
        let rot = &v["rotation"];
        let after = f.bed.public_ip(0).to_string();
        if status == 200 {
            ok += 1;
            assert_ne!(after, before, "success means a new address");
            assert_eq!(rot["new_ip"], after.as_str());
        }
        let attempts = rot["attempts"].as_i64().unwrap_or(0);
        if status == 200 && attempts == 1 {
            first_try += 1;
        }
        let total = rot["duration_ms"].as_i64().unwrap_or(0);
        let drain = rot["drain_ms"].as_i64().unwrap_or(0);
        let backend = rot["backend_ms"].as_i64().unwrap_or(0);
        // Retry pauses are policy (retry_delay_secs = 1), not overhead.
        let pauses = (attempts - 1).max(0) * 1000;
        let overhead = total - drain - backend - pauses;
        overheads.push(overhead);
        lines.push(format!(
            "  {status} attempts={attempts} rungs={} total={total} ms drain={drain} ms backend={backend} ms overhead={overhead} ms",
            rot["rungs"]
        ));
    }
    overheads.sort();
    eprintln!("verify-retry figures over {N} rotations (same-IP probability 0.5 per soft step):");
    for l in &lines {
        eprintln!("{l}");
    }
    eprintln!(
        "  verified new address: {ok}/{N}; on the first attempt (what a rotation without verification would have claimed every time): {first_try}/{N}"
    );
    eprintln!(
        "  cellgate overhead per rotation (total - drain - backend - retry pauses): median {} ms, max {} ms",
        overheads[N / 2],
        overheads[N - 1]
    );
    assert_eq!(ok, N, "every rotation ends with a verified new address");
}

/// A HiLink stick keeps its LAN up while its WAN reconnects: only the public
/// address changes, the device's link stays.
struct StickLink(Arc<tests::testbed::netns::Uplink>);

impl tests::testbed::ModemLink for StickLink {
    fn data_down(&self) {}
    fn data_up(&self, new_ip: bool) {
        self.0.data_up(new_ip);
    }
    fn public_ip(&self) -> std::net::Ipv4Addr {
        self.0.public_ip()
    }
}

#[test]
fn hilink_stick_rotates_through_its_web_api() {
    if !root() {
        eprintln!("skipped: needs root");
        return;
    }
    use tests::testbed::hilink_emu::{HilinkEmu, HilinkOptions, IpPolicy};
    let mut f = Farm::new(
        "rot-hilink",
        BedOptions {
            uplinks: 1,
            new_host_addr_on_rotation: false,
        },
        CP_CONFIG,
    );
    // The stick's web API answers on the modem side of the device's link.
    let listener = tests::testbed::netns::bind_tcp_in(
        f.bed.carrier_ns(0),
        SocketAddr::new(IpAddr::V4(f.bed.modem_ip(0)), 0),
    )
    .expect("bind in the carrier namespace");
    let emu = HilinkEmu::start(
        listener,
        Arc::new(StickLink(f.bed.uplink(0))),
        HilinkOptions {
            reconnect_delay: Duration::from_millis(500),
            ip_policy: IpPolicy::SameFirst(1),
            ..HilinkOptions::default()
        },
    );
    let toml = format!(
        r#"
[[exit]]
name = "m0"
interface = "{iface}"
dns = ["{inet}"]
[exit.rotation]
backend = "hilink"
url = "{url}"
dataswitch_pause_secs = 1
"#,
        iface = f.bed.host_if(0),
        inet = f.bed.internet_ip(),
        url = emu.url(),
    );
    f.run_agent(&toml, vec![]);
    let before = f.seen_ip();
    let (status, v) = f.rotate(0);
    if status != 200 {
        f.dump();
    }
    assert_eq!(status, 200, "{v}");
    let rot = &v["rotation"];
    // The first reconnect hands back the same address: the loop retries,
    // this time with a reboot.
    assert_eq!(rot["rungs"], json!(["dataswitch", "reboot"]), "{rot}");
    assert_eq!(emu.dataswitch_cycles(), 1);
    assert_eq!(emu.reboots(), 1);
    let after = f.seen_ip();
    assert_ne!(after, before);
    assert_eq!(rot["new_ip"], after.as_str());
    assert_eventually!(
        Duration::from_secs(45),
        f.exit(0)["telemetry"]["signal_bars"].is_number(),
        "no HiLink telemetry: {}",
        f.exit(0)
    );
}

#[test]
fn android_phone_rotates_with_airplane_mode_over_adb() {
    if !root() {
        eprintln!("skipped: needs root");
        return;
    }
    use tests::testbed::android_fake::{FakePhone, FakePhoneOptions};
    let mut f = Farm::new("rot-android", BedOptions::default(), CP_CONFIG);
    let phone = FakePhone::install(
        &f.c.dir().join("phone"),
        Some(&f.bed.uplink_state_file(0)),
        FakePhoneOptions {
            reconnect_delay: Duration::from_secs(1),
            // The carrier hands the same address back after a data toggle:
            // the loop escalates to airplane mode.
            same_ip: false,
            ..FakePhoneOptions::default()
        },
    );
    let serial = phone.get("serial").unwrap();
    let toml = format!(
        r#"
[[exit]]
name = "m0"
interface = "{iface}"
dns = ["{inet}"]
[exit.rotation]
backend = "android"
adb = "{adb}"
adb_serial = "{serial}"
airplane_hold_secs = 3
data_pause_secs = 1
"#,
        iface = f.bed.host_if(0),
        inet = f.bed.internet_ip(),
        adb = phone.adb().display(),
    );
    f.run_agent(&toml, vec![]);
    let before = f.seen_ip();
    phone.set_same_ip(true);
    let (status, v) = f.rotate(0);
    assert_eq!(status, 502, "same address every time fails: {v}");
    assert_eq!(
        v["rotation"]["rungs"],
        json!(["data", "airplane", "airplane"])
    );
    assert_eq!(f.seen_ip(), before, "the exit still serves");
    phone.set_same_ip(false);
    let (status, v) = f.rotate(0);
    if status != 200 {
        f.dump();
    }
    assert_eq!(status, 200, "{v}");
    let after = f.seen_ip();
    assert_ne!(after, before);
    assert_eq!(v["rotation"]["new_ip"], after.as_str());
    assert!(
        phone
            .commands()
            .iter()
            .any(|c| c.contains("svc data disable")),
        "{:?}",
        phone.commands()
    );
    // Battery and signal from the phone reach the API.
    assert_eventually!(
        Duration::from_secs(45),
        f.exit(0)["telemetry"]["battery_pct"].is_number(),
        "no phone telemetry: {}",
        f.exit(0)
    );
    assert_eq!(f.device()["reconnects"], 0, "{}", f.device());
}

#[test]
fn a_dead_uplink_stays_out_of_the_pool_until_verified() {
    if !root() {
        eprintln!("skipped: needs root");
        return;
    }
    let cfg = CP_CONFIG
        .replace("attempts = 3", "attempts = 2")
        .replace("attempt_timeout_secs = 30", "attempt_timeout_secs = 15");
    // Two modems; the tunnel rides the first, the second one dies.
    let f = Farm::start("rot-dead", 2, &cfg, |_| fast_sim(SameIp::Never));
    // The modem takes the data session down but never brings it back.
    f.sims[1].set_faults(vec![
        Fault::NoReply("+CGACT=1".into()),
        Fault::NoReply("+CFUN=1".into()),
    ]);
    let (status, v) = f.rotate(1);
    assert_eq!(status, 502, "{v}");
    let e = f.exit(1);
    assert_eq!(e["status"], "failed", "{e}");
    assert!(
        e["reason"]
            .as_str()
            .unwrap_or("")
            .contains("address check afterwards failed"),
        "{e}"
    );
    assert_eq!(f.exit(0)["status"], "ready");
    // Customers are only sent to the working exit.
    let good = f.bed.public_ip(0).to_string();
    for _ in 0..4 {
        assert_eq!(f.seen_ip(), good);
    }
    // The modem recovers; an administrator rotates again, the new address
    // is verified and the exit is back.
    f.sims[1].clear_faults();
    let (status, v) = f.rotate(1);
    assert_eq!(status, 200, "{v}");
    assert_eq!(f.exit(1)["status"], "ready");
    let mut seen = Vec::new();
    for _ in 0..4 {
        seen.push(f.seen_ip());
    }
    assert!(seen.contains(&f.bed.public_ip(1).to_string()), "{seen:?}");
}
