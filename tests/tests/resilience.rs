//! Processes dying and administrators intervening: agents killed mid-flow
//! and restarted, the control plane restarted under its agents, devices
//! disabled, enabled and deleted, enrollment tokens reused and expired.

use std::time::{Duration, Instant};

use serde_json::json;
use tests::{Cluster, ClusterOpts, Curl, CurlRun, FileServer, assert_eventually, eventually};

/// One short request through the HTTP proxy; `true` on 200 with the body.
fn hello_ok(c: &Cluster, origin: &FileServer) -> bool {
    let r = Curl::new()
        .proxy(&c.http_proxy())
        .arg(origin.url("/hello"))
        .max_time(Duration::from_secs(5))
        .run();
    r.code == 0 && r.stdout == "hello from origin\n"
}

/// The same through SOCKS5.
fn hello_ok_socks(c: &Cluster, origin: &FileServer) -> bool {
    let r = Curl::new()
        .proxy(&c.socks_proxy())
        .arg(origin.url_as("http", "localhost", "/hello"))
        .max_time(Duration::from_secs(5))
        .run();
    r.code == 0 && r.stdout == "hello from origin\n"
}

/// Background downloads of the never-ending `/trickle` through the HTTP
/// proxy (absolute form), a CONNECT tunnel and SOCKS5.
fn start_trickles(c: &Cluster, origin: &FileServer) -> Vec<(&'static str, CurlRun)> {
    let before = origin.connections();
    let url = origin.url("/trickle");
    let runs = vec![
        (
            "http-get",
            Curl::new()
                .proxy(&c.http_proxy())
                .arg("-o")
                .arg("/dev/null")
                .arg(&url)
                .max_time(Duration::from_secs(60))
                .spawn(c.dir(), "trickle-get"),
        ),
        (
            "http-connect",
            Curl::new()
                .proxy(&c.http_proxy())
                .arg("-p")
                .arg("-o")
                .arg("/dev/null")
                .arg(&url)
                .max_time(Duration::from_secs(60))
                .spawn(c.dir(), "trickle-connect"),
        ),
        (
            "socks5",
            Curl::new()
                .proxy(&c.socks_proxy())
                .arg("-o")
                .arg("/dev/null")
                .arg(origin.url_as("http", "localhost", "/trickle"))
                .max_time(Duration::from_secs(60))
                .spawn(c.dir(), "trickle-socks"),
        ),
    ];
    // All three are connected and bytes are flowing.
    let flowing = eventually(Duration::from_secs(15), Duration::from_millis(20), || {
        (origin.connections() >= before + 3
            && origin
                .stats
                .trickled
                .load(std::sync::atomic::Ordering::Relaxed)
                > 1 << 20)
            .then_some(())
    });
    if flowing.is_none() {
        c.dump_logs();
        panic!(
            "trickle downloads did not start: {} origin connections",
            origin.connections() - before
        );
    }
    runs
}

#[test]
fn agent_killed_mid_transfer_ends_customer_flows_and_a_restart_serves_again() {
    let mut c = Cluster::start(ClusterOpts::named("agent-kill"));
    let origin = FileServer::start("origin", None);
    let device = c.agents[0].device_id.clone();
    let mut runs = start_trickles(&c, &origin);
    assert!(runs.iter_mut().all(|(_, r)| r.is_running()));

    let killed = Instant::now();
    c.kill_agent(0);
    for (what, run) in &mut runs {
        let left = Duration::from_secs(10).saturating_sub(killed.elapsed());
        let Some(r) = run.wait(left) else {
            c.dump_logs();
            panic!(
                "{what}: the customer's download was still running 10 s after the agent was killed"
            );
        };
        let after = killed.elapsed();
        eprintln!(
            "{what}: customer flow ended {after:?} after the agent was SIGKILLed (curl exit {}: {})",
            r.code,
            r.stderr.trim()
        );
        assert_ne!(
            r.code, 0,
            "{what}: a never-ending download reported success"
        );
    }
    // The control plane has noticed by now: no exit is online.
    c.wait_online(0, Duration::from_secs(5));

    let restarted = Instant::now();
    c.start_agent(0);
    let served = eventually(Duration::from_secs(5), Duration::from_millis(50), || {
        hello_ok(&c, &origin).then(|| restarted.elapsed())
    });
    let Some(t) = served else {
        c.dump_logs();
        panic!("no request served within 5 s of restarting the agent");
    };
    eprintln!("restarted agent served a request {t:?} after it was started");
    assert!(hello_ok_socks(&c, &origin));
    let devices = c.api().devices();
    assert_eq!(
        devices.len(),
        1,
        "restart created another device: {devices:?}"
    );
    assert_eq!(devices[0]["id"], device.as_str());
    assert_eq!(devices[0]["status"], "online");
}

fn control_plane_restart(graceful: bool) {
    let label = if graceful { "cp-sigterm" } else { "cp-sigkill" };
    let mut c = Cluster::start(ClusterOpts::named(label));
    let origin = FileServer::start("origin", None);
    let device = c.agents[0].device_id.clone();
    assert!(hello_ok(&c, &origin));
    let old_addrs = c.addrs;

    // Customers are mid-download when the control plane goes gracefully;
    // the crash variant keeps the tunnel idle, so the agent only learns of
    // it through its QUIC idle timeout (the slow path).
    let mut runs = if graceful {
        start_trickles(&c, &origin)
    } else {
        Vec::new()
    };
    let stopped = Instant::now();
    if graceful {
        // Drains flows for at most 5 s, then exits.
        assert!(
            c.terminate_cp(Duration::from_secs(15)),
            "control plane did not exit within 15 s of SIGTERM"
        );
        eprintln!(
            "{label}: control plane exited {:?} after SIGTERM",
            stopped.elapsed()
        );
    } else {
        c.kill_cp();
    }
    for (what, run) in &mut runs {
        let Some(r) = run.wait(Duration::from_secs(5)) else {
            panic!("{what}: customer download still running 5 s after the control plane stopped");
        };
        eprintln!(
            "{label}: {what} ended {:?} after the stop (curl exit {})",
            stopped.elapsed(),
            r.code
        );
        assert_ne!(r.code, 0);
    }
    assert!(
        !hello_ok(&c, &origin),
        "proxy still answering after the stop"
    );
    c.restart_cp();
    assert_eq!(c.addrs, old_addrs);
    let up = stopped.elapsed();
    // The agent redials by itself: after a graceful close at once (with
    // backoff), after a crash once its QUIC idle timeout (30 s) expires.
    let took = c.wait_online(1, Duration::from_secs(45));
    eprintln!(
        "{label}: control plane back {up:?} after the stop; agent online again {took:?} later"
    );
    let devices = c.api().devices();
    assert_eq!(devices.len(), 1, "a new device appeared: {devices:?}");
    assert_eq!(devices[0]["id"], device.as_str(), "the device id changed");
    assert!(hello_ok(&c, &origin), "HTTP proxy after restart");
    assert!(hello_ok_socks(&c, &origin), "SOCKS proxy after restart");
    assert!(c.agents[0].is_running(), "agent exited");
}

#[test]
fn control_plane_sigterm_and_restart_agent_reconnects_as_the_same_device() {
    control_plane_restart(true);
}

#[test]
fn control_plane_sigkill_and_restart_agent_reconnects_as_the_same_device() {
    control_plane_restart(false);
}

#[test]
fn disabling_a_device_closes_its_tunnel_and_refuses_it_until_enabled() {
    let mut c = Cluster::start(ClusterOpts::named("disable"));
    let origin = FileServer::start("origin", None);
    let id = c.agents[0].device_id.clone();
    let api = c.api();
    let mut runs = start_trickles(&c, &origin);

    let t0 = Instant::now();
    let r = api.post(&format!("/api/v1/devices/{id}/disable"), None);
    let answered = t0.elapsed();
    assert_eq!(r.status, 200, "disable: {}", r.text());
    assert_eq!(r.json()["status"], "disabled");
    assert!(
        r.json()["live"].is_null(),
        "still live after disable: {}",
        r.text()
    );
    // Every flow through the device ends within a second.
    for (what, run) in &mut runs {
        let left = Duration::from_secs(1)
            .saturating_add(answered)
            .saturating_sub(t0.elapsed());
        let Some(res) = run.wait(left) else {
            c.dump_logs();
            panic!("{what}: still flowing 1 s after the device was disabled");
        };
        eprintln!(
            "{what}: ended {:?} after the disable request (answered in {answered:?}), curl exit {}",
            t0.elapsed(),
            res.code
        );
        assert_ne!(res.code, 0);
    }
    // The agent is told why, keeps running, and is refused when it redials.
    assert_eventually!(
        Duration::from_secs(10),
        c.agents[0].log_text().contains("disabled"),
        "agent log does not mention the disable:\n{}",
        c.agents[0].log_text()
    );
    let watch = Instant::now();
    while watch.elapsed() < Duration::from_secs(4) {
        let d = api.device(&id).expect("device listed");
        assert_eq!(d["status"], "disabled", "{d}");
        assert!(
            d["live"].is_null(),
            "disabled device got a live session: {d}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    assert!(c.agents[0].is_running(), "agent exited instead of retrying");
    let r = Curl::new()
        .proxy(&c.http_proxy())
        .write_out("%{http_code}")
        .arg("-o")
        .arg("/dev/null")
        .arg(origin.url("/hello"))
        .run();
    assert_eq!(r.stdout, "503", "a disabled device carried traffic");
    let refusals = c.agents[0].log_text().matches("refused the tunnel").count();
    eprintln!("agent was refused {refusals} time(s) while disabled");
    assert!(
        refusals >= 1,
        "agent never tried to reconnect while disabled"
    );

    let r = api.post(&format!("/api/v1/devices/{id}/enable"), None);
    assert_eq!(r.status, 200, "enable: {}", r.text());
    let took = c.wait_status(&id, "online", Duration::from_secs(40));
    eprintln!("enabled device back online after {took:?}");
    assert!(hello_ok(&c, &origin));
}

#[test]
fn enrollment_tokens_work_once_and_expire() {
    let c = Cluster::start(ClusterOpts {
        agents: 0,
        ..ClusterOpts::named("enroll-tokens")
    });
    let api = c.api();
    let msg = |o: &std::process::Output| {
        format!(
            "{}{}",
            String::from_utf8_lossy(&o.stdout),
            String::from_utf8_lossy(&o.stderr)
        )
        .to_ascii_lowercase()
    };

    // CLI token: first use enrolls, second is refused by the control plane.
    let token = c.create_enroll_token("phone-1", None);
    let first = c.run_enroll(&token, &c.dir().join("phone-1"));
    assert!(first.status.success(), "first use: {}", msg(&first));
    let again = c.run_enroll(&token, &c.dir().join("phone-1-again"));
    assert!(
        !again.status.success(),
        "a used token enrolled a second device"
    );
    let m = msg(&again);
    assert!(
        m.contains("invalid") || m.contains("expired") || m.contains("used"),
        "refusal does not say why: {m}"
    );

    // API token: same rules.
    let r = api.post(
        "/api/v1/enroll-tokens",
        Some(&json!({"name": "phone-2", "ttl_secs": 600})),
    );
    assert_eq!(r.status, 201, "create token: {}", r.text());
    let token = r.json()["token"].as_str().expect("token").to_string();
    let first = c.run_enroll(&token, &c.dir().join("phone-2"));
    assert!(
        first.status.success(),
        "API token first use: {}",
        msg(&first)
    );
    let again = c.run_enroll(&token, &c.dir().join("phone-2-again"));
    assert!(!again.status.success(), "a used API token enrolled again");

    // Expired: a 1-second token, two seconds later.
    let token = c.create_enroll_token("phone-3", Some(1));
    std::thread::sleep(Duration::from_millis(2100));
    let late = c.run_enroll(&token, &c.dir().join("phone-3"));
    assert!(!late.status.success(), "an expired token enrolled a device");
    let m = msg(&late);
    assert!(m.contains("expired"), "refusal does not say expired: {m}");

    // Garbage is refused without reaching anything.
    let bad = c.run_enroll("cgt1_not-a-token", &c.dir().join("phone-4"));
    assert!(!bad.status.success());

    // Bad API requests get JSON errors.
    let r = api.post("/api/v1/enroll-tokens", Some(&json!({"name": "phone 5"})));
    assert_eq!(r.status, 400, "{}", r.text());
    let r = api.post(
        "/api/v1/enroll-tokens",
        Some(&json!({"name": "p", "ttl_secs": 0})),
    );
    assert_eq!(r.status, 400, "{}", r.text());
    assert_eq!(r.json()["error"]["code"], "bad_request");

    // Exactly the two granted enrollments exist.
    let devices = api.devices();
    let mut names: Vec<&str> = devices.iter().filter_map(|d| d["name"].as_str()).collect();
    names.sort();
    assert_eq!(names, ["phone-1", "phone-2"], "devices: {devices:?}");
}

#[test]
fn a_deleted_device_cannot_reconnect() {
    let mut c = Cluster::start(ClusterOpts::named("delete-device"));
    let origin = FileServer::start("origin", None);
    let id = c.agents[0].device_id.clone();
    let api = c.api();
    assert!(hello_ok(&c, &origin));

    let r = api.delete(&format!("/api/v1/devices/{id}"));
    assert_eq!(r.status, 204, "delete: {}", r.text());
    assert!(api.devices().is_empty(), "device still listed");
    assert_eventually!(
        Duration::from_secs(10),
        {
            let log = c.agents[0].log_text();
            log.contains("unknown device") || log.contains("no longer knows")
        },
        "agent log does not say it is unknown:\n{}",
        c.agents[0].log_text()
    );
    // It keeps trying and keeps being refused; nothing comes back.
    let watch = Instant::now();
    while watch.elapsed() < Duration::from_secs(4) {
        assert!(api.devices().is_empty(), "deleted device re-registered");
        assert_eq!(c.online_count(), 0);
        std::thread::sleep(Duration::from_millis(200));
    }
    assert!(c.agents[0].is_running());
    let r = Curl::new()
        .proxy(&c.http_proxy())
        .write_out("%{http_code}")
        .arg("-o")
        .arg("/dev/null")
        .arg(origin.url("/hello"))
        .run();
    assert_eq!(r.stdout, "503");
    let r = api.delete(&format!("/api/v1/devices/{id}"));
    assert_eq!(r.status, 404);
    assert_eq!(r.json()["error"]["code"], "not_found");
}

#[test]
fn an_agent_restarted_before_the_control_plane_noticed_replaces_its_old_session() {
    let mut c = Cluster::start(ClusterOpts::named("agent-replace"));
    let origin = FileServer::start("origin", None);
    assert!(hello_ok(&c, &origin));
    // Killed while idle, the old tunnel looks alive to the control plane
    // for up to its idle timeout; the restarted agent takes over at once.
    c.kill_agent(0);
    let restarted = Instant::now();
    c.start_agent(0);
    let served = eventually(Duration::from_secs(5), Duration::from_millis(50), || {
        hello_ok(&c, &origin).then(|| restarted.elapsed())
    });
    let Some(t) = served else {
        c.dump_logs();
        panic!("the restarted agent served nothing within 5 s");
    };
    eprintln!("restarted agent served {t:?} after it was started");
    for _ in 0..4 {
        assert!(hello_ok(&c, &origin), "a request went to the dead session");
    }
    let devices = c.api().devices();
    assert_eq!(devices.len(), 1, "{devices:?}");
    assert_eq!(devices[0]["status"], "online");
}

#[test]
fn with_two_agents_an_idle_agent_killed_costs_at_most_a_few_seconds() {
    let mut c = Cluster::start(ClusterOpts {
        agents: 2,
        ..ClusterOpts::named("two-agents-kill")
    });
    let origin = FileServer::start("origin", None);
    let dead = c.agents[0].device_id.clone();
    c.kill_agent(0);
    let start = Instant::now();
    let mut slowest = Duration::ZERO;
    for i in 0..6 {
        let t = Instant::now();
        let r = Curl::new()
            .proxy(&c.http_proxy())
            .arg(origin.url("/hello"))
            .max_time(Duration::from_secs(20))
            .run();
        r.expect_ok(&format!("request {i} with one of two agents dead"));
        assert_eq!(r.stdout, "hello from origin\n");
        slowest = slowest.max(t.elapsed());
        eprintln!("request {i}: {:?}", t.elapsed());
    }
    eprintln!("6 requests in {:?}, slowest {slowest:?}", start.elapsed());
    // A flow stuck on the dead tunnel is noticed within ~5 s and retried on
    // the other exit.
    assert!(
        slowest < Duration::from_secs(10),
        "slowest request took {slowest:?}"
    );
    c.wait_status(&dead, "offline", Duration::from_secs(10));
}

#[test]
fn agents_stop_promptly_on_sigterm_connected_or_not() {
    let mut c = Cluster::start(ClusterOpts {
        agents: 2,
        ..ClusterOpts::named("agent-sigterm")
    });
    // Connected: closes its tunnel and exits.
    let t = Instant::now();
    assert!(
        c.terminate_agent(0, Duration::from_secs(5)),
        "a connected agent ignored SIGTERM for 5 s"
    );
    eprintln!("connected agent exited {:?} after SIGTERM", t.elapsed());
    c.wait_online(1, Duration::from_secs(5));
    // Reconnecting to a control plane that is gone: the agent is inside a
    // QUIC handshake that cannot complete. A service manager stopping it
    // expects it to exit promptly, not after the handshake times out.
    assert!(c.terminate_cp(Duration::from_secs(10)));
    std::thread::sleep(Duration::from_millis(1500));
    let t = Instant::now();
    let exited = c.terminate_agent(1, Duration::from_secs(15));
    let took = t.elapsed();
    eprintln!("reconnecting agent exited {took:?} after SIGTERM (exited by itself: {exited})");
    assert!(
        exited,
        "the agent ignored SIGTERM for 15 s while reconnecting"
    );
    assert!(
        took < Duration::from_secs(3),
        "the agent took {took:?} to honour SIGTERM while reconnecting \
         (its connect/handshake is not raced against shutdown)"
    );
}

/// A frozen agent (alive, silent, no flows) is marked offline after three
/// missed heartbeats, and comes back as the same device when it thaws.
#[test]
fn a_silent_agent_goes_offline_after_three_missed_heartbeats() {
    let mut c = Cluster::start(ClusterOpts {
        config_toml: Some("heartbeat_interval_secs = 1\n".into()),
        ..ClusterOpts::named("heartbeats")
    });
    // `hello_ok` expects the origin labelled "origin".
    let origin = FileServer::start("origin", None);
    assert!(hello_ok(&c, &origin));
    let id = c.agents[0].device_id.clone();
    let connects = |c: &Cluster| {
        c.api()
            .device(&id)
            .and_then(|d| d["connects"].as_i64())
            .unwrap_or(-1)
    };
    assert_eq!(connects(&c), 1);
    let pid = c.agents[0].pid().expect("agent running").to_string();
    let signal = |sig: &str| {
        let ok = std::process::Command::new("kill")
            .args([sig, &pid])
            .status()
            .is_ok_and(|s| s.success());
        assert!(ok, "kill {sig} {pid}");
    };
    signal("-STOP");
    let stopped = Instant::now();
    let took = assert_eventually!(
        Duration::from_secs(10),
        c.api().device_status(&id).as_deref() == Some("offline"),
        "device still online with its agent frozen"
    );
    eprintln!(
        "offline {:?} after the agent froze (3 × 1 s heartbeats)",
        stopped.elapsed()
    );
    assert!(
        took >= Duration::from_secs(2),
        "offline too early ({took:?}): heartbeats were not missed yet"
    );
    signal("-CONT");
    c.wait_online(1, Duration::from_secs(20));
    assert!(hello_ok(&c, &origin));
    assert_eq!(c.api().devices().len(), 1, "no duplicate device");
    assert_eq!(connects(&c), 2, "one reconnect recorded");
    c.kill_agent(0);
}
