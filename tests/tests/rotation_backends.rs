//! The `hilink`, `android` and `command` rotation backends against the
//! testbed's stand-ins: the HiLink API emulator on 127.0.0.1 and the fake
//! phone's scripts. Each test asserts what an operator would notice: the
//! link went down and came back (with a new address), the phone is not left
//! in airplane mode, errors name the device-side cause.

use std::sync::Arc;
use std::time::Duration;

use edge_agent::rotate::android::{AndroidBackend, AndroidConfig};
use edge_agent::rotate::hilink::{HilinkBackend, HilinkConfig};
use edge_agent::rotate::{Backend, RotateError, RotationConfig};
use tests::TempDir;
use tests::testbed::android_fake::{FakePhone, FakePhoneOptions};
use tests::testbed::hilink_emu::{HilinkEmu, HilinkOptions, IpPolicy};
use tests::testbed::{ModemLink, RecordingLink};
use tokio::time::Instant;

fn events(link: &RecordingLink) -> Vec<String> {
    link.events.lock().unwrap().clone()
}

fn within(secs: u64) -> Instant {
    Instant::now() + Duration::from_secs(secs)
}

// ---------------------------------------------------------------- hilink

fn emu(opts: HilinkOptions) -> (HilinkEmu, Arc<RecordingLink>) {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let link = Arc::new(RecordingLink::default());
    (HilinkEmu::start(listener, link.clone(), opts), link)
}

fn quick_stick() -> HilinkOptions {
    HilinkOptions {
        reconnect_delay: Duration::from_millis(300),
        reboot_offline: Duration::from_secs(1),
        ..Default::default()
    }
}

fn hilink(emu: &HilinkEmu, password: Option<&str>) -> HilinkBackend {
    let cfg = HilinkConfig {
        url: emu.url(),
        password: password.map(str::to_string),
        dataswitch_pause_secs: 0,
        request_timeout_secs: 3,
        ..Default::default()
    };
    HilinkBackend::new(&cfg, None).unwrap()
}

#[tokio::test]
async fn hilink_dataswitch_gets_a_new_address() {
    let (stick, link) = emu(quick_stick());
    let mut b = hilink(&stick, None);
    let before = link.public_ip();
    b.step(0, within(20)).await.unwrap();
    assert_eq!(stick.connection_status(), 901);
    assert_eq!(stick.dataswitch_cycles(), 1);
    assert_eq!(events(&link), ["down", "up new_ip=true"]);
    assert_ne!(link.public_ip(), before);

    // Tokens are single use: a second rotation needs fresh ones, and gets them.
    b.step(0, within(20)).await.unwrap();
    assert_eq!(stick.dataswitch_cycles(), 2);
    assert_eq!(stick.rejected_posts(), 0);
}

#[tokio::test]
async fn hilink_same_address_is_still_a_completed_rung() {
    // The backend only brings the link back; noticing the unchanged
    // address (and escalating) is the caller's job.
    let (stick, link) = emu(HilinkOptions {
        ip_policy: IpPolicy::SameEachTime,
        ..quick_stick()
    });
    let mut b = hilink(&stick, None);
    b.step(0, within(20)).await.unwrap();
    assert_eq!(events(&link), ["down", "up new_ip=false"]);
}

#[tokio::test]
async fn hilink_refreshes_a_rejected_token_once() {
    let (stick, link) = emu(quick_stick());
    let mut b = hilink(&stick, None);
    stick.fail_next_posts(125002, 1);
    b.step(0, within(20)).await.unwrap();
    assert_eq!(events(&link), ["down", "up new_ip=true"]);

    stick.fail_next_posts(125002, 2);
    let e = b.step(0, within(20)).await.unwrap_err();
    let text = e.to_string();
    assert!(matches!(e, RotateError::Failed(_)), "{text}");
    assert!(text.contains("switching mobile data off"), "{text}");
    assert!(text.contains("error 125002"), "{text}");
    assert!(text.contains("token"), "{text}");
    // Nothing was switched off, so nothing was left off.
    assert_eq!(stick.connection_status(), 901);
}

#[tokio::test]
async fn hilink_busy_stick_is_reported_with_its_meaning() {
    let (stick, _link) = emu(quick_stick());
    let mut b = hilink(&stick, None);
    stick.fail_next_posts(100004, 1);
    let text = b.step(1, within(20)).await.unwrap_err().to_string();
    assert!(text.contains("asking the stick to reboot"), "{text}");
    assert!(text.contains("100004 (system busy)"), "{text}");
    assert_eq!(stick.reboots(), 0);
}

#[tokio::test]
async fn hilink_reboot_waits_for_the_stick_to_come_back() {
    let (stick, link) = emu(quick_stick());
    let mut b = hilink(&stick, None);
    let started = Instant::now();
    b.step(1, within(30)).await.unwrap();
    assert!(
        started.elapsed() >= Duration::from_secs(1),
        "returned before the stick was back"
    );
    assert_eq!(stick.reboots(), 1);
    assert_eq!(stick.connection_status(), 901);
    assert_eq!(events(&link), ["down", "up new_ip=true"]);

    // The reboot forgot the session; the next rung starts a new one.
    b.step(0, within(20)).await.unwrap();
    assert_eq!(stick.dataswitch_cycles(), 1);
}

#[tokio::test]
async fn hilink_reconnect_timeout_names_the_last_status() {
    let (stick, _link) = emu(HilinkOptions {
        reconnect_delay: Duration::from_secs(30),
        ..quick_stick()
    });
    let mut b = hilink(&stick, None);
    let started = Instant::now();
    let e = b.step(0, within(3)).await.unwrap_err();
    assert!(started.elapsed() < Duration::from_secs(6));
    let text = e.to_string();
    assert!(matches!(e, RotateError::Timeout(_)), "{text}");
    assert!(text.contains("ConnectionStatus 900 (connecting)"), "{text}");
}

#[tokio::test]
async fn hilink_locked_stick_needs_the_password() {
    let opts = HilinkOptions {
        password: Some("s3cret".into()),
        ..quick_stick()
    };
    let (stick, link) = emu(opts.clone());
    let mut without = hilink(&stick, None);
    let text = without.step(0, within(10)).await.unwrap_err().to_string();
    assert!(text.contains("100003"), "{text}");
    assert!(text.contains("set `password`"), "{text}");
    assert!(events(&link).is_empty());

    let mut wrong = hilink(&stick, Some("guess"));
    let text = wrong.step(0, within(10)).await.unwrap_err().to_string();
    assert!(text.contains("108006"), "{text}");

    let mut b = hilink(&stick, Some("s3cret"));
    b.step(0, within(20)).await.unwrap();
    assert_eq!(events(&link), ["down", "up new_ip=true"]);
    assert_eq!(stick.logins(), 1);
    let t = b.telemetry().await;
    assert_eq!(t.rsrp_dbm, Some(-95), "signal needs the login too");
}

#[tokio::test]
async fn hilink_telemetry() {
    let (stick, _link) = emu(quick_stick());
    let mut b = hilink(&stick, None);
    let t = b.telemetry().await;
    assert_eq!(t.signal_bars, Some(4));
    assert_eq!(t.access_tech.as_deref(), Some("LTE"));
    assert_eq!(t.rssi_dbm, Some(-67));
    assert_eq!(t.rsrp_dbm, Some(-95));
    assert_eq!(t.rsrq_db, Some(-9.0));
    assert_eq!(t.sinr_db, Some(12.0));
    assert_eq!(t.band.as_deref(), Some("LTE BAND 3"));
    assert_eq!(t.cell_id.as_deref(), Some("26617601"));
    assert_eq!(t.operator.as_deref(), Some("Cellgate Test"));
    assert_eq!(t.battery_pct, None);
}

#[tokio::test]
async fn hilink_unreachable_stick() {
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let cfg = HilinkConfig {
        url: format!("http://127.0.0.1:{port}"),
        request_timeout_secs: 2,
        ..Default::default()
    };
    let mut b = HilinkBackend::new(&cfg, None).unwrap();
    let started = Instant::now();
    let text = b.step(0, within(10)).await.unwrap_err().to_string();
    assert!(started.elapsed() < Duration::from_secs(5));
    assert!(text.contains("no answer from the stick"), "{text}");
    // Telemetry of a dead stick is empty, not an error, and quick.
    let started = Instant::now();
    assert_eq!(b.telemetry().await, Default::default());
    assert!(started.elapsed() < Duration::from_secs(9));
}

// ---------------------------------------------------------------- android

fn fake_phone(label: &str, opts: FakePhoneOptions) -> (TempDir, FakePhone) {
    let dir = TempDir::new(label);
    let phone = FakePhone::install(dir.path(), None, opts);
    (dir, phone)
}

fn quick_phone() -> FakePhoneOptions {
    FakePhoneOptions {
        reconnect_delay: Duration::from_millis(300),
        ..Default::default()
    }
}

fn over_adb(phone: &FakePhone, tweak: impl FnOnce(&mut AndroidConfig)) -> AndroidBackend {
    let mut cfg = AndroidConfig {
        adb_serial: Some("FAKE0001".into()),
        adb: phone.adb().to_string_lossy().into_owned(),
        airplane_hold_secs: 3,
        data_pause_secs: 0,
        reconnect_timeout_secs: 15,
        ..Default::default()
    };
    tweak(&mut cfg);
    AndroidBackend::new(&cfg, None).unwrap()
}

fn has(commands: &[String], wanted: &str) -> bool {
    commands.iter().any(|c| c == wanted)
}

#[tokio::test]
async fn android_data_rung_over_adb() {
    let (_dir, phone) = fake_phone("android-data", quick_phone());
    let mut b = over_adb(&phone, |_| {});
    b.step(0, within(20)).await.unwrap();
    assert!(phone.connected());
    assert!(phone.mobile_data());
    assert_eq!(phone.net_events(), ["down", "up new_ip=true"]);
    let cmds = phone.commands();
    assert!(has(&cmds, "svc data disable"), "{cmds:?}");
    assert!(has(&cmds, "svc data enable"), "{cmds:?}");
}

#[tokio::test]
async fn android_airplane_rung_over_adb() {
    let (_dir, phone) = fake_phone("android-airplane", quick_phone());
    let mut b = over_adb(&phone, |_| {});
    let started = Instant::now();
    b.step(1, within(30)).await.unwrap();
    assert!(
        started.elapsed() >= Duration::from_secs(3),
        "airplane mode is held"
    );
    assert!(!phone.airplane());
    assert!(phone.connected());
    assert_eq!(phone.net_events(), ["down", "up new_ip=true"]);
    let cmds = phone.commands();
    assert!(
        has(&cmds, "cmd connectivity airplane-mode enable"),
        "{cmds:?}"
    );
    assert!(
        has(&cmds, "cmd connectivity airplane-mode disable"),
        "{cmds:?}"
    );
}

#[tokio::test]
async fn android_old_phone_falls_back_to_settings_and_broadcast() {
    let (_dir, phone) = fake_phone(
        "android-old",
        FakePhoneOptions {
            airplane_cmd: false,
            ..quick_phone()
        },
    );
    let mut b = over_adb(&phone, |c| c.su = Some(true));
    b.step(1, within(30)).await.unwrap();
    assert!(!phone.airplane());
    assert!(phone.connected());
    assert_eq!(phone.net_events(), ["down", "up new_ip=true"]);
    let cmds = phone.commands();
    assert!(
        has(&cmds, "settings put global airplane_mode_on 1"),
        "{cmds:?}"
    );
    assert!(
        has(
            &cmds,
            "am broadcast -a android.intent.action.AIRPLANE_MODE --ez state true"
        ),
        "{cmds:?}"
    );
    assert!(
        has(
            &cmds,
            "am broadcast -a android.intent.action.AIRPLANE_MODE --ez state false"
        ),
        "{cmds:?}"
    );
}

#[tokio::test]
async fn android_fallback_without_root_fails_clearly() {
    let (_dir, phone) = fake_phone(
        "android-noroot",
        FakePhoneOptions {
            airplane_cmd: false,
            ..quick_phone()
        },
    );
    let mut b = over_adb(&phone, |_| {});
    let e = b.step(1, within(30)).await.unwrap_err();
    let text = e.to_string();
    assert!(matches!(e, RotateError::Failed(_)), "{text}");
    assert!(text.contains("No shell command implementation"), "{text}");
    assert!(text.contains("Permission Denial"), "{text}");
    assert!(
        !phone.airplane(),
        "the phone must not be left in airplane mode"
    );
    assert!(phone.connected());
}

#[tokio::test]
async fn android_wrong_serial() {
    let (_dir, phone) = fake_phone("android-serial", quick_phone());
    let mut b = over_adb(&phone, |c| c.adb_serial = Some("R58M000".into()));
    let e = b.step(0, within(10)).await.unwrap_err();
    let text = e.to_string();
    assert!(matches!(e, RotateError::Failed(_)), "{text}");
    assert!(text.contains("adb: device 'R58M000' not found"), "{text}");
    assert!(text.contains("svc data disable"), "{text}");
    assert!(phone.net_events().is_empty());
}

#[tokio::test]
async fn android_missing_adb() {
    let cfg = AndroidConfig {
        adb_serial: Some("FAKE0001".into()),
        adb: "/nonexistent/adb".into(),
        ..Default::default()
    };
    let mut b = AndroidBackend::new(&cfg, None).unwrap();
    let text = b.step(0, within(10)).await.unwrap_err().to_string();
    assert!(text.contains("cannot run"), "{text}");
    assert!(text.contains("is adb installed"), "{text}");
}

#[tokio::test]
async fn android_reconnect_timeout_names_the_state() {
    let (_dir, phone) = fake_phone(
        "android-slow",
        FakePhoneOptions {
            reconnect_delay: Duration::from_secs(30),
            ..Default::default()
        },
    );
    let mut b = over_adb(&phone, |c| c.reconnect_timeout_secs = 2);
    let started = Instant::now();
    let e = b.step(0, within(20)).await.unwrap_err();
    assert!(started.elapsed() < Duration::from_secs(6));
    let text = e.to_string();
    assert!(matches!(e, RotateError::Timeout(_)), "{text}");
    assert!(
        text.contains("mDataConnectionState=1 (connecting)"),
        "{text}"
    );
    // Data is enabled again even though the link is slow to come back.
    assert!(phone.mobile_data());
}

#[tokio::test]
async fn android_telemetry() {
    let (_dir, phone) = fake_phone(
        "android-telemetry",
        FakePhoneOptions {
            battery_pct: 42,
            charging: false,
            temperature_dc: 315,
            operator: "Orange F".into(),
            rsrp_dbm: -108,
            ..quick_phone()
        },
    );
    let mut b = over_adb(&phone, |_| {});
    let t = b.telemetry().await;
    assert_eq!(t.battery_pct, Some(42));
    assert_eq!(t.charging, Some(false));
    assert_eq!(t.temperature_dc, Some(315));
    assert_eq!(t.operator.as_deref(), Some("Orange F"));
    assert_eq!(t.rsrp_dbm, Some(-108));
    assert_eq!(t.rssi_dbm, Some(-67));
    assert_eq!(t.sinr_db, Some(9.0));
    assert_eq!(t.access_tech.as_deref(), Some("LTE"));
}

/// Local mode runs `su -c '…'` (and `cmd`, `svc` …) from `PATH`. The test
/// process's own `PATH` cannot be changed safely, so the backend runs in a
/// child test process started with the fake phone first on `PATH`.
#[test]
fn android_local_mode_through_su() {
    let dir = TempDir::new("android-local");
    let phone = FakePhone::install(dir.path(), None, quick_phone());
    let mut cmd = std::process::Command::new(std::env::current_exe().unwrap());
    cmd.args([
        "--ignored",
        "--exact",
        "android_local_mode_child",
        "--nocapture",
    ]);
    phone.apply_env(&mut cmd);
    cmd.env("CG_LOCAL_MODE_CHILD", "1");
    let out = cmd.output().unwrap();
    assert!(
        out.status.success(),
        "child failed:\n{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("1 passed"),
        "the child test did not run"
    );
    let cmds = phone.commands();
    assert!(has(&cmds, "su -c svc data disable"), "{cmds:?}");
    assert!(has(&cmds, "su -c svc data enable"), "{cmds:?}");
    assert_eq!(phone.net_events(), ["down", "up new_ip=true"]);
}

#[tokio::test]
#[ignore = "run by android_local_mode_through_su with the fake phone on PATH"]
async fn android_local_mode_child() {
    assert!(
        std::env::var_os("CG_LOCAL_MODE_CHILD").is_some(),
        "only meaningful when started by android_local_mode_through_su"
    );
    let cfg = AndroidConfig {
        data_pause_secs: 0,
        reconnect_timeout_secs: 15,
        ..Default::default()
    };
    let mut b = AndroidBackend::new(&cfg, None).unwrap();
    b.step(0, within(20)).await.unwrap();
    let t = b.telemetry().await;
    assert_eq!(t.battery_pct, Some(80));
}

// ---------------------------------------------------------------- through Backend

#[tokio::test]
async fn command_backend_through_the_backend_enum() {
    let dir = TempDir::new("command-enum");
    let script = dir.join("rotate.sh");
    std::fs::write(
        &script,
        "#!/bin/sh\n[ \"$CELLGATE_RUNG\" = soft ] && exit 0\necho \"$CELLGATE_RUNG failed on $CELLGATE_EXIT_INTERFACE\" >&2\nexit 4\n",
    )
    .unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o755)).unwrap();
    let script = script.to_string_lossy().into_owned();
    let cfg: RotationConfig = serde_json::from_value(serde_json::json!({
        "backend": "command",
        "timeout_secs": 10,
        "rungs": [
            { "name": "soft", "command": [script.clone(), "--soft"] },
            { "name": "hard", "command": [script, "--hard"] },
        ],
    }))
    .unwrap();
    let mut b = Backend::new(&cfg, Some("usb0")).unwrap();
    assert_eq!(b.method(), "command");
    assert_eq!(b.ladder(), ["soft", "hard"]);
    b.step(0, within(10)).await.unwrap();
    let text = b.step(1, within(10)).await.unwrap_err().to_string();
    assert!(text.contains("exited with code 4"), "{text}");
    assert!(text.contains("hard failed on usb0"), "{text}");
}

#[test]
fn configs_parse_under_their_backend_names() {
    let android: RotationConfig = serde_json::from_value(serde_json::json!({
        "backend": "android", "adb_serial": "R58M123", "airplane_hold_secs": 6
    }))
    .unwrap();
    let b = Backend::new(&android, None).unwrap();
    assert_eq!(b.ladder(), ["data", "airplane"]);

    let short: RotationConfig = serde_json::from_value(serde_json::json!({
        "backend": "android", "airplane_hold_secs": 1
    }))
    .unwrap();
    let e = Backend::new(&short, None).err().unwrap();
    assert!(e.contains("airplane_hold_secs"), "{e}");

    let hilink: RotationConfig = serde_json::from_value(serde_json::json!({
        "backend": "hilink", "url": "http://192.168.8.1", "password": "pw"
    }))
    .unwrap();
    assert!(!format!("{hilink:?}").contains("\"pw\""));
    let b = Backend::new(&hilink, Some("eth1")).unwrap();
    assert_eq!(b.ladder(), ["dataswitch", "reboot"]);

    assert!(
        serde_json::from_value::<RotationConfig>(serde_json::json!({
            "backend": "hilink", "pasword": "typo"
        }))
        .is_err()
    );
}
