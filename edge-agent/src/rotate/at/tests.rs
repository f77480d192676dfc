//! The backend against an in-memory modem (state machine behind
//! `tokio::io::duplex`, with a device node that can vanish and come back),
//! and the serial open path against a real pty.

use std::io;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use shared::wire::Registration;
use tokio::io::{AsyncReadExt, AsyncWriteExt, DuplexStream, duplex};
use tokio::sync::watch;

use super::*;
use crate::rotate::RotationConfig;

/// The fake modem's state, shared by its port and every open link.
struct Modem {
    /// The device node exists.
    present: bool,
    /// Bumped by a module reset; links opened before it go dead.
    generation: watch::Sender<u64>,
    /// Answers nothing at all.
    silent: bool,
    /// `+CEREG`/`+CREG` stat.
    stat: u8,
    address: Option<String>,
    next_host: u8,
    /// Answer to `AT+CGACT=1,…` instead of `OK`.
    activate_fails: Option<&'static str>,
    /// After the radio comes back, keep searching forever.
    never_registers: bool,
    /// Where the modem's network interface appears; removed during a reset.
    interface_dir: Option<PathBuf>,
    /// The interface does not come back after a reset.
    interface_stays_gone: bool,
    /// Every command received, in order.
    log: Vec<String>,
    resets: u32,
}

type Shared = Arc<Mutex<Modem>>;

fn modem() -> Shared {
    Arc::new(Mutex::new(Modem {
        present: true,
        generation: watch::channel(0).0,
        silent: false,
        stat: 1,
        address: Some("100.64.0.1".into()),
        next_host: 2,
        activate_fails: None,
        never_registers: false,
        interface_dir: None,
        interface_stays_gone: false,
        log: Vec::new(),
        resets: 0,
    }))
}

fn new_address(m: &mut Modem) -> String {
    let a = format!("100.64.0.{}", m.next_host);
    m.next_host += 1;
    a
}

/// The answer to one command (`None`: say nothing), with side effects.
fn answer(shared: &Shared, command: &str) -> Option<String> {
    let mut m = shared.lock().unwrap();
    m.log.push(command.to_string());
    if m.silent {
        return None;
    }
    let ok = |lines: &[&str]| {
        let mut s = String::new();
        for l in lines {
            s.push_str("\r\n");
            s.push_str(l);
            s.push_str("\r\n");
        }
        s.push_str("\r\nOK\r\n");
        Some(s)
    };
    match command {
        "AT" | "ATE0" | "AT+CMEE=1" | "AT+COPS=3,0" | "AT+CGACT=0,1" => {
            if command == "AT+CGACT=0,1" {
                m.address = None;
            }
            ok(&[])
        }
        "ATI" => ok(&["Quectel", "EC25", "Revision: EC25EFAR06A06M4G"]),
        "AT+CGACT=1,1" => {
            if let Some(e) = m.activate_fails {
                return Some(format!("\r\n{e}\r\n"));
            }
            m.address = Some(new_address(&mut m));
            ok(&[])
        }
        "AT+CFUN=0" => {
            m.stat = 0;
            m.address = None;
            ok(&[])
        }
        "AT+CFUN=1" => {
            m.stat = 2;
            let shared = shared.clone();
            tokio::spawn(async move {
                sleep(ms(200)).await;
                let mut m = shared.lock().unwrap();
                if !m.never_registers {
                    m.stat = 1;
                    m.address = Some(new_address(&mut m));
                }
            });
            ok(&[])
        }
        "AT+CFUN=1,1" => {
            let shared = shared.clone();
            tokio::spawn(async move {
                sleep(ms(100)).await;
                {
                    let mut m = shared.lock().unwrap();
                    m.present = false;
                    m.stat = 0;
                    m.address = None;
                    m.resets += 1;
                    m.generation.send_modify(|g| *g += 1);
                    if let Some(d) = &m.interface_dir {
                        let _ = std::fs::remove_dir(d);
                    }
                }
                sleep(ms(400)).await;
                {
                    let mut m = shared.lock().unwrap();
                    m.present = true;
                    m.stat = 2;
                    if let Some(d) = &m.interface_dir
                        && !m.interface_stays_gone
                    {
                        std::fs::create_dir_all(d).unwrap();
                    }
                }
                sleep(ms(300)).await;
                let mut m = shared.lock().unwrap();
                m.stat = 1;
                m.address = Some(new_address(&mut m));
            });
            ok(&[])
        }
        "AT+CEREG?" => ok(&[&format!("+CEREG: 0,{}", m.stat)]),
        "AT+CREG?" => ok(&[&format!("+CREG: 0,{}", m.stat)]),
        "AT+CGPADDR=1" => {
            // A URC in the middle, as real modems do.
            let addr = match &m.address {
                Some(a) => format!("+CGPADDR: 1,\"{a}\""),
                None => "+CGPADDR: 1".into(),
            };
            Some(format!(
                "\r\n+CEREG: {}\r\n\r\n{addr}\r\n\r\nOK\r\n",
                m.stat
            ))
        }
        "AT+CGACT?" => ok(&[&format!("+CGACT: 1,{}", u8::from(m.address.is_some()))]),
        "AT+CSQ" => ok(&["+CSQ: 20,99"]),
        "AT+COPS?" => ok(&["+COPS: 0,0,\"Telekom.de\",7"]),
        "AT+QNWINFO" => ok(&["+QNWINFO: \"FDD LTE\",\"26201\",\"LTE BAND 3\",1300"]),
        "AT+QENG=\"servingcell\"" => ok(&[
            "+QENG: \"servingcell\",\"NOCONN\",\"LTE\",\"FDD\",262,01,2A1B3C4,188,1300,3,5,5,6A3,-97,-11,-68,14,10,-,-",
        ]),
        _ => Some("\r\nERROR\r\n".into()),
    }
}

/// One open link: read command lines, answer them, die with the device.
async fn serve(shared: Shared, mut far: DuplexStream) {
    let mut generation = shared.lock().unwrap().generation.subscribe();
    let mut pending = Vec::new();
    let mut buf = [0u8; 256];
    loop {
        let n = tokio::select! {
            r = far.read(&mut buf) => match r {
                Ok(0) | Err(_) => return,
                Ok(n) => n,
            },
            _ = generation.changed() => return,
        };
        pending.extend_from_slice(&buf[..n]);
        while let Some(i) = pending.iter().position(|&b| b == b'\r') {
            let line: Vec<u8> = pending.drain(..=i).collect();
            let command = String::from_utf8_lossy(&line[..i]).trim().to_string();
            if let Some(reply) = answer(&shared, &command)
                && far.write_all(reply.as_bytes()).await.is_err()
            {
                return;
            }
        }
    }
}

struct FakePort(Shared);

impl PortSource for FakePort {
    fn describe(&self) -> String {
        "/dev/fake-modem".into()
    }
    fn present(&self) -> bool {
        self.0.lock().unwrap().present
    }
    fn open(&self) -> io::Result<Box<dyn Transport>> {
        if !self.present() {
            return Err(io::Error::from(io::ErrorKind::NotFound));
        }
        let (near, far) = duplex(4096);
        tokio::spawn(serve(self.0.clone(), far));
        Ok(Box::new(near))
    }
}

fn config(profile: &str) -> AtConfig {
    AtConfig {
        port: "/dev/fake-modem".into(),
        profile: profile.into(),
        ..AtConfig::default()
    }
}

/// The shipped ladder with short pauses, so tests run in real time.
const FAST_PROFILE: &str = r#"
name = "fast"
init = ["ATE0", "AT+CMEE=1"]
[[rung]]
name = "pdp"
[[rung.step]]
send = "AT+CGACT=0,{cid}"
[[rung.step]]
pause_ms = 100
[[rung.step]]
send = "AT+CGACT=1,{cid}"
[[rung]]
name = "radio"
[[rung.step]]
send = "AT+CFUN=0"
[[rung.step]]
pause_ms = 100
[[rung.step]]
send = "AT+CFUN=1"
[[rung]]
name = "reset"
reenumerates = true
[[rung.step]]
send = "AT+CFUN=1,1"
disconnects = true
"#;

const FAST_TIMING: Timing = Timing {
    poll_interval: Duration::from_millis(50),
    probe_timeout: Duration::from_millis(300),
    init_timeout: Duration::from_millis(300),
    poll_command_timeout: Duration::from_millis(300),
    telemetry_budget: DEVICE_TIMING.telemetry_budget,
    telemetry_command_timeout: DEVICE_TIMING.telemetry_command_timeout,
    gone_wait: Duration::from_secs(2),
    gone_poll: Duration::from_millis(20),
};

/// A backend on the fake modem: `profile` is a shipped name, or `fast`
/// for [`FAST_PROFILE`] with [`FAST_TIMING`].
fn backend(
    shared: &Shared,
    profile: &str,
    interface: Option<&str>,
    net_root: PathBuf,
) -> AtBackend {
    backend_with(shared, profile, interface, net_root, |_| {})
}

fn backend_with(
    shared: &Shared,
    profile: &str,
    interface: Option<&str>,
    net_root: PathBuf,
    tweak: impl FnOnce(&mut AtConfig),
) -> AtBackend {
    let fast = profile == "fast";
    let mut cfg = config(if fast { "generic-3gpp" } else { profile });
    tweak(&mut cfg);
    let mut b = AtBackend::with_source(
        &cfg,
        interface,
        Box::new(FakePort(shared.clone())),
        net_root,
    )
    .unwrap();
    if fast {
        b.profile = Profile::from_toml(FAST_PROFILE).unwrap();
        b.timing = FAST_TIMING;
    }
    b
}

fn ms(n: u64) -> Duration {
    Duration::from_millis(n)
}

fn secs(n: u64) -> Duration {
    Duration::from_secs(n)
}

fn scratch_dir(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("cellgate-at-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

#[tokio::test]
async fn pdp_rung_gets_a_new_address() {
    let m = modem();
    let mut b = backend(&m, "fast", None, PathBuf::new());
    assert_eq!(b.ladder(), ["pdp", "radio", "reset"]);
    let started = Instant::now();
    b.step(0, Instant::now() + secs(10)).await.unwrap();
    assert!(started.elapsed() >= ms(100), "the profile's pause was kept");
    let m = m.lock().unwrap();
    assert_eq!(m.address.as_deref(), Some("100.64.0.2"));
    let sent: Vec<&str> = m.log.iter().map(String::as_str).collect();
    let at = |c: &str| sent.iter().position(|s| *s == c).unwrap();
    assert!(at("ATE0") < at("AT+CGACT=0,1"), "init ran first");
    assert!(at("AT+CGACT=0,1") < at("AT+CGACT=1,1"));
    assert!(at("AT+CGACT=1,1") < at("AT+CGPADDR=1"));
}

#[tokio::test]
async fn cme_error_fails_the_rung_naming_command_and_error() {
    let m = modem();
    m.lock().unwrap().activate_fails = Some("+CME ERROR: 30");
    let mut b = backend(&m, "fast", None, PathBuf::new());
    let err = b.step(0, Instant::now() + secs(10)).await.unwrap_err();
    assert!(matches!(err, RotateError::Failed(_)), "{err}");
    assert_eq!(
        err.to_string(),
        "modem answered +CME ERROR: 30 (no network service) to AT+CGACT=1,1"
    );
}

#[tokio::test]
async fn radio_rung_waits_for_registration_and_address() {
    let m = modem();
    let mut b = backend(&m, "fast", None, PathBuf::new());
    let started = Instant::now();
    b.step(1, Instant::now() + secs(10)).await.unwrap();
    // 100 ms hold, then 200 ms until the modem is back.
    assert!(started.elapsed() >= ms(300), "{:?}", started.elapsed());
    let m = m.lock().unwrap();
    assert_eq!(m.stat, 1);
    assert_eq!(m.address.as_deref(), Some("100.64.0.2"));
}

#[tokio::test]
async fn no_registration_times_out_saying_what_was_seen() {
    let m = modem();
    m.lock().unwrap().never_registers = true;
    let mut b = backend_with(&m, "fast", None, PathBuf::new(), |c| {
        c.attach_timeout_secs = 1
    });
    let started = Instant::now();
    let err = b.step(1, Instant::now() + secs(30)).await.unwrap_err();
    let RotateError::Timeout(msg) = &err else {
        panic!("{err}")
    };
    assert!(msg.contains("within 1 s"), "{msg}");
    assert!(msg.contains("registration searching"), "{msg}");
    assert!(msg.contains("stat 2"), "{msg}");
    // The attach timeout, not the caller's 30 s.
    assert!(started.elapsed() < secs(3), "{:?}", started.elapsed());
}

#[tokio::test]
async fn caller_deadline_bounds_the_attach_wait() {
    let m = modem();
    m.lock().unwrap().never_registers = true;
    let mut b = backend(&m, "fast", None, PathBuf::new());
    let started = Instant::now();
    let err = b.step(1, Instant::now() + ms(800)).await.unwrap_err();
    assert!(err.to_string().contains("before the deadline"), "{err}");
    assert!(started.elapsed() <= ms(1300), "{:?}", started.elapsed());
}

#[tokio::test]
async fn silent_modem_times_out_within_the_deadline() {
    let m = modem();
    m.lock().unwrap().silent = true;
    let mut b = backend(&m, "fast", None, PathBuf::new());
    let started = Instant::now();
    let err = b.step(0, Instant::now() + secs(1)).await.unwrap_err();
    let RotateError::Timeout(msg) = &err else {
        panic!("{err}")
    };
    assert!(msg.contains("modem not reachable"), "{msg}");
    assert!(msg.contains("no answer to AT within"), "{msg}");
    assert!(started.elapsed() <= ms(1500), "{:?}", started.elapsed());
}

#[tokio::test]
async fn reset_rung_survives_re_enumeration() {
    let net = scratch_dir("reset-ok");
    let iface = net.join("wwan0");
    std::fs::create_dir_all(&iface).unwrap();
    let m = modem();
    m.lock().unwrap().interface_dir = Some(iface.clone());
    let mut b = backend(&m, "fast", Some("wwan0"), net.clone());
    let started = Instant::now();
    b.step(2, Instant::now() + secs(10)).await.unwrap();
    // Gone after 0.1 s, back after 0.5 s, attached after 0.8 s.
    assert!(started.elapsed() >= ms(800), "{:?}", started.elapsed());
    {
        let m = m.lock().unwrap();
        assert_eq!(m.resets, 1);
        assert!(m.present);
        assert!(m.address.is_some());
        let reset_at = m.log.iter().position(|c| c == "AT+CFUN=1,1").unwrap();
        // The port was opened again and probed after the reset.
        assert_eq!(m.log[reset_at + 1], "AT");
    }
    assert!(iface.exists());
    std::fs::remove_dir_all(&net).unwrap();
}

#[tokio::test]
async fn reset_rung_times_out_when_the_interface_stays_gone() {
    let net = scratch_dir("reset-noif");
    let iface = net.join("wwan0");
    std::fs::create_dir_all(&iface).unwrap();
    let m = modem();
    {
        let mut m = m.lock().unwrap();
        m.interface_dir = Some(iface.clone());
        m.interface_stays_gone = true;
    }
    let mut b = backend(&m, "fast", Some("wwan0"), net.clone());
    let err = b.step(2, Instant::now() + secs(2)).await.unwrap_err();
    assert_eq!(
        err.to_string(),
        "timed out: network interface wwan0 did not come back after the module reset"
    );
    std::fs::remove_dir_all(&net).unwrap();
}

#[tokio::test]
async fn rung_past_the_ladder_is_unsupported() {
    let m = modem();
    let mut b = backend(&m, "generic-3gpp", None, PathBuf::new());
    let err = b.step(3, Instant::now() + secs(10)).await.unwrap_err();
    assert!(matches!(err, RotateError::Unsupported(_)));
    assert!(err.to_string().contains("pdp, radio, reset"), "{err}");
    assert!(m.lock().unwrap().log.is_empty(), "nothing was sent");
}

#[tokio::test]
async fn telemetry_fills_what_the_profile_reads() {
    let m = modem();
    let mut b = backend(&m, "quectel-ec25", None, PathBuf::new());
    let t = b.telemetry().await;
    assert_eq!(t.rssi_dbm, Some(-73));
    assert_eq!(t.operator.as_deref(), Some("Telekom.de"));
    assert_eq!(t.access_tech.as_deref(), Some("LTE"));
    assert_eq!(t.registration, Some(Registration::Home));
    assert_eq!(t.band.as_deref(), Some("LTE BAND 3"));
    assert_eq!(t.rsrp_dbm, Some(-97));
    assert_eq!(t.rsrq_db, Some(-11.0));
    assert_eq!(t.sinr_db, Some(14.0));
    assert_eq!(t.cell_id.as_deref(), Some("2A1B3C4"));
    assert_eq!(t.battery_pct, None);
}

#[tokio::test]
async fn telemetry_of_a_silent_or_absent_modem_is_empty_and_bounded() {
    let m = modem();
    m.lock().unwrap().silent = true;
    let mut b = backend(&m, "quectel-ec25", None, PathBuf::new());
    let started = Instant::now();
    assert_eq!(b.telemetry().await, Telemetry::default());
    assert!(started.elapsed() <= DEVICE_TIMING.telemetry_budget);

    let m = modem();
    m.lock().unwrap().present = false;
    let mut b = backend(&m, "quectel-ec25", None, PathBuf::new());
    assert_eq!(b.telemetry().await, Telemetry::default());
}

#[derive(serde::Deserialize)]
struct Exit {
    rotation: RotationConfig,
}

#[test]
fn config_parses_under_exit_rotation() {
    let exit: Exit = toml::from_str(
        "[rotation]\nbackend = \"at\"\nport = \"/dev/serial/by-id/usb-Quectel_EG25-G-if02-port0\"\n",
    )
    .unwrap();
    let RotationConfig::At(cfg) = exit.rotation else {
        panic!("not the at backend")
    };
    assert_eq!(cfg.profile, "generic-3gpp");
    assert_eq!(
        (
            cfg.baud,
            cfg.cid,
            cfg.command_timeout_ms,
            cfg.attach_timeout_secs
        ),
        (115_200, 1, 5_000, 45)
    );
    assert!(AtBackend::new(&cfg, Some("wwan0")).is_ok());

    let e = toml::from_str::<Exit>(
        "[rotation]\nbackend = \"at\"\nport = \"/dev/x\"\nbaudrate = 9600\n",
    )
    .err()
    .unwrap();
    assert!(e.to_string().contains("unknown field"), "{e}");
    let e = toml::from_str::<Exit>("[rotation]\nbackend = \"at\"\n")
        .err()
        .unwrap();
    assert!(e.to_string().contains("port"), "{e}");
}

#[test]
fn config_validation_errors_are_clear() {
    let check = |cfg: AtConfig, needle: &str| {
        let e = AtBackend::new(&cfg, None).err().unwrap();
        assert!(e.contains(needle), "{e:?} should mention {needle:?}");
    };
    check(AtConfig::default(), "port is required");
    check(
        AtConfig {
            port: "ttyUSB2".into(),
            ..config("generic-3gpp")
        },
        "absolute device path",
    );
    check(
        AtConfig {
            cid: 0,
            ..config("generic-3gpp")
        },
        "cid 0",
    );
    check(
        AtConfig {
            command_timeout_ms: 10,
            ..config("generic-3gpp")
        },
        "command_timeout_ms",
    );
    check(
        AtConfig {
            attach_timeout_secs: 0,
            ..config("generic-3gpp")
        },
        "attach_timeout_secs",
    );
    check(
        AtConfig {
            baud: 0,
            ..config("generic-3gpp")
        },
        "baud",
    );
    check(config("quectel-ec99"), "unknown profile \"quectel-ec99\"");
    check(
        config("/etc/cellgate/missing.toml"),
        "cannot read profile file",
    );
    let e = AtBackend::new(&config("generic-3gpp"), Some("a/b"))
        .err()
        .unwrap();
    assert!(e.contains("not a network interface name"), "{e}");
}

/// Tests that create ptys run one at a time.
static PTY_LOCK: std::sync::Mutex<()> = std::sync::Mutex::new(());

/// A blocking fake modem on a pty master: answers until the slave closes.
fn serve_pty(mut master: std::fs::File) {
    use std::io::{Read, Write};
    let mut pending = Vec::new();
    let mut buf = [0u8; 256];
    while let Ok(n) = master.read(&mut buf) {
        if n == 0 {
            break;
        }
        pending.extend_from_slice(&buf[..n]);
        while let Some(i) = pending.iter().position(|&b| b == b'\r' || b == b'\n') {
            let line: Vec<u8> = pending.drain(..=i).collect();
            let command = String::from_utf8_lossy(&line[..i]).trim().to_string();
            let reply = match command.as_str() {
                "" => continue,
                "AT" | "ATE0" | "AT+CMEE=1" | "AT+COPS=3,0" => "\r\nOK\r\n".to_string(),
                "ATI" => "\r\nQuectel\r\nEC25\r\n\r\nOK\r\n".into(),
                "AT+CSQ" => "\r\n+CREG: 1\r\n+CSQ: 20,99\r\n\r\nOK\r\n".into(),
                "AT+COPS?" => "\r\n+COPS: 0,0,\"PtyNet\",7\r\n\r\nOK\r\n".into(),
                _ => "\r\nERROR\r\n".into(),
            };
            if master.write_all(reply.as_bytes()).is_err() {
                return;
            }
        }
    }
}

#[test]
fn serial_open_path_works_on_a_pty() {
    let _one_at_a_time = PTY_LOCK.lock().unwrap_or_else(|e| e.into_inner());
    let pty = nix::pty::openpty(None, None).expect("openpty");
    let slave_path = nix::unistd::ttyname(&pty.slave).expect("ttyname");
    let modem = std::thread::spawn({
        let master = std::fs::File::from(pty.master);
        move || serve_pty(master)
    });
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let t = rt.block_on(async {
        let cfg = AtConfig {
            port: slave_path.clone(),
            profile: "quectel-ec25".into(),
            ..AtConfig::default()
        };
        let mut b = AtBackend::new(&cfg, None).unwrap();
        tokio::time::timeout(secs(10), b.telemetry()).await.unwrap()
    });
    assert_eq!(t.rssi_dbm, Some(-73));
    assert_eq!(t.operator.as_deref(), Some("PtyNet"));
    assert_eq!(t.access_tech.as_deref(), Some("LTE"));
    // Closing the last slave descriptor ends the fake modem (EIO).
    drop(rt);
    drop(pty.slave);
    modem.join().unwrap();
}
