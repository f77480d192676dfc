//! A fake Android phone made of shell scripts: `adb`, `su`, `cmd`, `svc`,
//! `settings`, `am` and `dumpsys` that keep the phone's state in a
//! directory and act on the simulated network like a real phone would.
//!
//! - Airplane mode on or mobile data off drops the data link at once.
//! - Switching back brings the link up `reconnect_delay` later, in the
//!   background (the command itself returns promptly), with a new public
//!   address unless the phone is told to keep the same one.
//! - `adb -s SERIAL shell …` checks the serial and runs the command as the
//!   shell user; `su -c …` runs it as root. Like on a real phone, the
//!   `AIRPLANE_MODE` broadcast needs root and radio toggles need at least
//!   the shell user.
//!
//! The scripts live in `tests/testbed/fake-android/` (documented in
//! `fake-phone-lib.sh`). [`FakePhone::install`] writes them into a `bin/`
//! directory with the state directory baked in as the default, so a backend
//! that runs `…/bin/adb` needs no environment at all; the environment
//! variables ([`FakePhone::env`]) override the defaults for child processes
//! (an agent started with `PATH` pointing at `bin/` and runs `cmd` locally).
//!
//! With a network state file the scripts run `testbed-net --state FILE
//! data-down|data-up [--same-ip]`; without one they only record each change
//! in `net.log` ([`FakePhone::net_events`], same wording as
//! [`super::RecordingLink`]).

use std::ffi::OsString;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

const SCRIPTS: &[(&str, &str, bool)] = &[
    (
        "fake-phone-lib.sh",
        include_str!("../../testbed/fake-android/fake-phone-lib.sh"),
        false,
    ),
    ("adb", include_str!("../../testbed/fake-android/adb"), true),
    ("su", include_str!("../../testbed/fake-android/su"), true),
    ("cmd", include_str!("../../testbed/fake-android/cmd"), true),
    ("svc", include_str!("../../testbed/fake-android/svc"), true),
    (
        "settings",
        include_str!("../../testbed/fake-android/settings"),
        true,
    ),
    ("am", include_str!("../../testbed/fake-android/am"), true),
    (
        "dumpsys",
        include_str!("../../testbed/fake-android/dumpsys"),
        true,
    ),
];

/// How the fake phone starts out and behaves.
#[derive(Clone, Debug)]
pub struct FakePhoneOptions {
    /// What `adb devices` lists and `adb -s` must name.
    pub serial: String,
    /// From "radio back on" to "data connected".
    pub reconnect_delay: Duration,
    /// The carrier hands back the previous address on reconnect.
    pub same_ip: bool,
    /// Whether `cmd connectivity airplane-mode` exists (Android 11+).
    pub airplane_cmd: bool,
    /// Whether `su` works (a rooted phone).
    pub rooted: bool,
    pub battery_pct: u8,
    pub charging: bool,
    /// Tenths of a degree Celsius.
    pub temperature_dc: i16,
    pub operator: String,
    pub rssi_dbm: i16,
    pub rsrp_dbm: i16,
    pub rsrq_db: i16,
    /// In dB, as Android 12+ reports it.
    pub rssnr_db: i16,
    /// The `testbed-net` binary; by default `CELLGATE_TESTBED_NET_BIN` or
    /// the one next to the test executable. Only used with a network state
    /// file.
    pub testbed_net_bin: Option<PathBuf>,
}

impl Default for FakePhoneOptions {
    fn default() -> Self {
        Self {
            serial: "FAKE0001".into(),
            reconnect_delay: Duration::from_secs(2),
            same_ip: false,
            airplane_cmd: true,
            rooted: true,
            battery_pct: 80,
            charging: true,
            temperature_dc: 287,
            operator: "Fake Mobile".into(),
            rssi_dbm: -67,
            rsrp_dbm: -97,
            rsrq_db: -11,
            rssnr_db: 9,
            testbed_net_bin: None,
        }
    }
}

/// An installed fake phone: its executables and its state.
#[derive(Debug)]
pub struct FakePhone {
    bin: PathBuf,
    state: PathBuf,
    net_state: Option<PathBuf>,
    net_bin: Option<PathBuf>,
}

impl FakePhone {
    /// Write the fake executables into `dir/bin` and a fresh phone state
    /// (airplane mode off, mobile data on and connected) into `dir/state`.
    /// `net_state_file` is the `testbed-net` state of the uplink the phone
    /// drives; `None` only records link changes.
    pub fn install(dir: &Path, net_state_file: Option<&Path>, opts: FakePhoneOptions) -> FakePhone {
        let bin = dir.join("bin");
        let state = dir.join("state");
        for d in [&bin, &state] {
            std::fs::create_dir_all(d)
                .unwrap_or_else(|e| panic!("cannot create {}: {e}", d.display()));
        }
        let net_bin = net_state_file.map(|_| {
            opts.testbed_net_bin
                .clone()
                .unwrap_or_else(locate_testbed_net)
        });
        let phone = FakePhone {
            bin,
            state,
            net_state: net_state_file.map(Path::to_path_buf),
            net_bin,
        };
        let text = |p: &Option<PathBuf>| {
            p.as_ref()
                .map(|p| p.to_string_lossy().into_owned())
                .unwrap_or_default()
        };
        for (name, body, executable) in SCRIPTS {
            let body = body
                .replace("@CG_DEFAULT_PHONE_DIR@", &phone.state.to_string_lossy())
                .replace("@CG_DEFAULT_PHONE_NET@", &text(&phone.net_state))
                .replace("@CG_DEFAULT_NET_BIN@", &text(&phone.net_bin));
            let path = phone.bin.join(name);
            std::fs::write(&path, body)
                .unwrap_or_else(|e| panic!("cannot write {}: {e}", path.display()));
            let mode = if *executable { 0o755 } else { 0o644 };
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode)).unwrap();
        }

        phone.set("serial", &opts.serial);
        phone.set("airplane", "0");
        phone.set("airplane_mode_on", "0");
        phone.set("data", "1");
        phone.set("connected", "1");
        phone.set_reconnect_delay(opts.reconnect_delay);
        phone.set_flag("same_ip", opts.same_ip);
        phone.set_flag("no_airplane_cmd", !opts.airplane_cmd);
        phone.set_flag("su_denied", !opts.rooted);
        phone.set("battery_level", &opts.battery_pct.to_string());
        phone.set("battery_ac", "false");
        phone.set("battery_usb", if opts.charging { "true" } else { "false" });
        phone.set("battery_temp", &opts.temperature_dc.to_string());
        phone.set("operator", &opts.operator);
        phone.set("rssi", &opts.rssi_dbm.to_string());
        phone.set("rsrp", &opts.rsrp_dbm.to_string());
        phone.set("rsrq", &opts.rsrq_db.to_string());
        phone.set("rssnr", &opts.rssnr_db.to_string());
        phone
    }

    /// The directory to put first on `PATH`.
    pub fn bin_dir(&self) -> &Path {
        &self.bin
    }

    pub fn state_dir(&self) -> &Path {
        &self.state
    }

    /// The fake `adb`.
    pub fn adb(&self) -> PathBuf {
        self.bin.join("adb")
    }

    /// `PATH` with the fake executables first.
    pub fn path_env(&self) -> OsString {
        let mut p = OsString::from(self.bin.as_os_str());
        if let Some(old) = std::env::var_os("PATH") {
            p.push(":");
            p.push(old);
        }
        p
    }

    /// Environment for a process that should see this phone: `PATH` and the
    /// `CG_*` variables the scripts read.
    pub fn env(&self) -> Vec<(String, OsString)> {
        let os = |p: &Option<PathBuf>| {
            p.as_ref()
                .map(|p| p.as_os_str().to_owned())
                .unwrap_or_default()
        };
        vec![
            ("PATH".into(), self.path_env()),
            (
                "CG_FAKE_PHONE_DIR".into(),
                self.state.as_os_str().to_owned(),
            ),
            ("CG_FAKE_PHONE_NET".into(), os(&self.net_state)),
            ("CG_TESTBED_NET_BIN".into(), os(&self.net_bin)),
        ]
    }

    /// Apply [`Self::env`] to a command.
    pub fn apply_env(&self, cmd: &mut std::process::Command) {
        for (k, v) in self.env() {
            cmd.env(k, v);
        }
    }

    /// One state fact (see `fake-phone-lib.sh`), trimmed.
    pub fn get(&self, key: &str) -> Option<String> {
        std::fs::read_to_string(self.state.join(key))
            .ok()
            .map(|s| s.trim().to_string())
    }

    pub fn set(&self, key: &str, value: &str) {
        let path = self.state.join(key);
        std::fs::write(&path, format!("{value}\n"))
            .unwrap_or_else(|e| panic!("cannot write {}: {e}", path.display()));
    }

    /// Create (`on`) or remove a flag file.
    pub fn set_flag(&self, key: &str, on: bool) {
        let path = self.state.join(key);
        if on {
            std::fs::write(&path, "").unwrap();
        } else {
            let _ = std::fs::remove_file(&path);
        }
    }

    pub fn set_reconnect_delay(&self, d: Duration) {
        self.set("delay", &format!("{:.3}", d.as_secs_f64()));
    }

    pub fn set_same_ip(&self, same: bool) {
        self.set_flag("same_ip", same);
    }

    pub fn airplane(&self) -> bool {
        self.get("airplane").as_deref() == Some("1")
    }

    pub fn mobile_data(&self) -> bool {
        self.get("data").as_deref() == Some("1")
    }

    /// The data connection is up.
    pub fn connected(&self) -> bool {
        self.get("connected").as_deref() == Some("1")
    }

    /// Link changes so far: `down`, `up new_ip=true|false`.
    pub fn net_events(&self) -> Vec<String> {
        self.lines("net.log")
    }

    /// Every invocation of a fake executable, e.g. `svc data disable`.
    pub fn commands(&self) -> Vec<String> {
        self.lines("commands.log")
    }

    fn lines(&self, file: &str) -> Vec<String> {
        std::fs::read_to_string(self.state.join(file))
            .map(|s| s.lines().map(str::to_string).collect())
            .unwrap_or_default()
    }
}

/// `testbed-net` from `CELLGATE_TESTBED_NET_BIN` or next to the test
/// executable (target/<profile>/deps/… → target/<profile>/testbed-net).
fn locate_testbed_net() -> PathBuf {
    if let Some(p) = std::env::var_os("CELLGATE_TESTBED_NET_BIN") {
        return PathBuf::from(p);
    }
    let exe = std::env::current_exe().expect("current_exe");
    let deps = exe.parent().expect("test executable has a directory");
    // Cargo names a src/bin/testbed_net.rs binary `testbed_net` unless told
    // otherwise; accept both spellings.
    [deps.parent(), Some(deps)]
        .into_iter()
        .flatten()
        .flat_map(|d| [d.join("testbed-net"), d.join("testbed_net")])
        .find(|c| c.is_file())
        .unwrap_or_else(|| {
            panic!(
                "the testbed-net binary was not found next to {}: run cargo build -p tests, \
                 or set CELLGATE_TESTBED_NET_BIN",
                exe.display()
            )
        })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::TempDir;
    use std::process::{Command, Output};
    use std::time::Instant;

    fn phone(label: &str, opts: FakePhoneOptions) -> (TempDir, FakePhone) {
        let dir = TempDir::new(label);
        let phone = FakePhone::install(dir.path(), None, opts);
        (dir, phone)
    }

    fn quick() -> FakePhoneOptions {
        FakePhoneOptions {
            reconnect_delay: Duration::from_millis(200),
            ..Default::default()
        }
    }

    /// Run a fake executable the way adbd would (as the shell user).
    fn run(phone: &FakePhone, argv: &[&str]) -> Output {
        let mut cmd = Command::new(phone.bin_dir().join(argv[0]));
        cmd.args(&argv[1..]);
        phone.apply_env(&mut cmd);
        cmd.env("CG_FAKE_ADB_SHELL", "1");
        cmd.output().unwrap()
    }

    fn stdout(o: &Output) -> String {
        String::from_utf8_lossy(&o.stdout).into_owned()
    }

    fn stderr(o: &Output) -> String {
        String::from_utf8_lossy(&o.stderr).into_owned()
    }

    fn wait_for(what: &str, timeout: Duration, mut cond: impl FnMut() -> bool) {
        let start = Instant::now();
        while !cond() {
            assert!(
                start.elapsed() < timeout,
                "{what} did not happen within {timeout:?}"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    #[test]
    fn airplane_mode_drops_and_restores_the_link() {
        let (_dir, phone) = phone(
            "fake-airplane",
            FakePhoneOptions {
                reconnect_delay: Duration::from_millis(1500),
                ..Default::default()
            },
        );
        assert!(phone.connected());

        let on = run(&phone, &["cmd", "connectivity", "airplane-mode", "enable"]);
        assert!(on.status.success(), "{}", stderr(&on));
        assert!(phone.airplane());
        assert!(!phone.connected());
        assert_eq!(phone.net_events(), ["down"]);
        let shown = run(&phone, &["cmd", "connectivity", "airplane-mode"]);
        assert_eq!(stdout(&shown).trim(), "enabled");

        let started = Instant::now();
        let off = run(&phone, &["cmd", "connectivity", "airplane-mode", "disable"]);
        assert!(off.status.success());
        assert!(
            started.elapsed() < Duration::from_millis(1000),
            "the command must return before the reconnect"
        );
        assert!(!phone.connected(), "reconnecting takes a while");
        wait_for("reconnect", Duration::from_secs(5), || phone.connected());
        assert_eq!(phone.net_events(), ["down", "up new_ip=true"]);
    }

    #[test]
    fn mobile_data_toggle_with_same_ip() {
        let (_dir, phone) = phone(
            "fake-data",
            FakePhoneOptions {
                same_ip: true,
                ..quick()
            },
        );
        assert!(run(&phone, &["svc", "data", "disable"]).status.success());
        assert!(!phone.mobile_data());
        assert!(run(&phone, &["svc", "data", "enable"]).status.success());
        wait_for("reconnect", Duration::from_secs(5), || phone.connected());
        assert_eq!(phone.net_events(), ["down", "up new_ip=false"]);
        assert!(phone.commands().contains(&"svc data disable".to_string()));
    }

    #[test]
    fn a_quick_toggle_back_cancels_the_pending_reconnect() {
        let (_dir, phone) = phone("fake-cancel", quick());
        run(&phone, &["svc", "data", "disable"]);
        run(&phone, &["svc", "data", "enable"]);
        run(&phone, &["svc", "data", "disable"]);
        std::thread::sleep(Duration::from_millis(500));
        assert!(!phone.connected());
        assert_eq!(phone.net_events(), ["down"]);
    }

    #[test]
    fn adb_checks_the_serial() {
        let (_dir, phone) = phone("fake-adb", quick());
        let bad = run(
            &phone,
            &["adb", "-s", "NOPE", "shell", "dumpsys", "battery"],
        );
        assert_eq!(bad.status.code(), Some(1));
        assert!(
            stderr(&bad).contains("adb: device 'NOPE' not found"),
            "{}",
            stderr(&bad)
        );
        let devices = run(&phone, &["adb", "devices"]);
        assert!(stdout(&devices).contains("FAKE0001\tdevice"));

        // No environment at all: the baked-in state directory is used.
        let out = Command::new(phone.adb())
            .args(["-s", "FAKE0001", "shell", "dumpsys battery"])
            .env_remove("CG_FAKE_PHONE_DIR")
            .output()
            .unwrap();
        assert!(out.status.success(), "{}", stderr(&out));
        let b = edge_agent::rotate::android::parse_battery(&stdout(&out));
        assert_eq!(b.level_pct, Some(80));
        assert_eq!(b.charging, Some(true));
        assert_eq!(b.temperature_dc, Some(287));
    }

    #[test]
    fn telephony_registry_follows_the_phone() {
        let (_dir, phone) = phone("fake-registry", quick());
        let parse = |phone: &FakePhone| {
            let out = run(phone, &["dumpsys", "telephony.registry"]);
            edge_agent::rotate::android::parse_telephony_registry(&stdout(&out))
        };
        let r = parse(&phone);
        assert!(r.data_connected);
        assert_eq!(r.operator.as_deref(), Some("Fake Mobile"));
        assert_eq!(r.rsrp_dbm, Some(-97));
        assert_eq!(r.sinr_db, Some(9.0));
        assert_eq!(r.access_tech.as_deref(), Some("LTE"));

        run(&phone, &["cmd", "connectivity", "airplane-mode", "enable"]);
        let r = parse(&phone);
        assert!(!r.data_connected);
        assert_eq!(r.operator, None);
        assert_eq!(r.rsrp_dbm, None);

        run(&phone, &["cmd", "connectivity", "airplane-mode", "disable"]);
        assert_eq!(parse(&phone).data_state, Some(1), "connecting");
    }

    #[test]
    fn broadcast_needs_root() {
        let (_dir, phone) = phone("fake-root", quick());
        let as_shell = run(
            &phone,
            &[
                "am",
                "broadcast",
                "-a",
                "android.intent.action.AIRPLANE_MODE",
                "--ez",
                "state",
                "true",
            ],
        );
        assert!(!as_shell.status.success());
        assert!(stdout(&as_shell).contains("Permission Denial"));
        assert!(!phone.airplane());

        let as_root = run(
            &phone,
            &[
                "su",
                "-c",
                "settings put global airplane_mode_on 1; am broadcast -a android.intent.action.AIRPLANE_MODE --ez state true",
            ],
        );
        assert!(as_root.status.success(), "{}", stderr(&as_root));
        assert!(stdout(&as_root).contains("Broadcast completed: result=0"));
        assert!(phone.airplane());
        assert_eq!(phone.get("airplane_mode_on").as_deref(), Some("1"));
    }

    #[test]
    fn old_android_has_no_airplane_command() {
        let (_dir, phone) = phone(
            "fake-old",
            FakePhoneOptions {
                airplane_cmd: false,
                ..quick()
            },
        );
        let out = run(&phone, &["cmd", "connectivity", "airplane-mode", "enable"]);
        assert!(out.status.success(), "old cmd exits 0");
        assert!(stderr(&out).contains("No shell command implementation."));
        assert!(!phone.airplane());
    }

    #[test]
    fn app_uid_cannot_toggle_radios() {
        let (_dir, phone) = phone("fake-uid", quick());
        let mut cmd = Command::new(phone.bin_dir().join("svc"));
        cmd.args(["data", "disable"]);
        phone.apply_env(&mut cmd);
        cmd.env_remove("CG_FAKE_ADB_SHELL")
            .env_remove("CG_FAKE_ROOT");
        let out = cmd.output().unwrap();
        assert_eq!(out.status.code(), Some(255));
        assert!(stderr(&out).contains("SecurityException"));
        assert!(phone.mobile_data());
    }

    #[test]
    fn link_changes_run_testbed_net() {
        let dir = TempDir::new("fake-net");
        // A stand-in for testbed-net that records its arguments.
        let stub = dir.join("testbed-net-stub");
        let calls = dir.join("calls.txt");
        std::fs::write(
            &stub,
            format!("#!/bin/sh\necho \"$*\" >> {}\n", calls.display()),
        )
        .unwrap();
        std::fs::set_permissions(&stub, std::fs::Permissions::from_mode(0o755)).unwrap();
        let net_state = dir.join("uplink-0.json");
        let phone = FakePhone::install(
            &dir.join("phone"),
            Some(&net_state),
            FakePhoneOptions {
                testbed_net_bin: Some(stub),
                same_ip: true,
                ..quick()
            },
        );
        // The adb path works without any environment.
        let adb = |cmd: &str| {
            let out = Command::new(phone.adb())
                .args(["-s", "FAKE0001", "shell", cmd])
                .env_remove("CG_FAKE_PHONE_DIR")
                .env_remove("CG_FAKE_PHONE_NET")
                .env_remove("CG_TESTBED_NET_BIN")
                .output()
                .unwrap();
            assert!(out.status.success(), "{}", stderr(&out));
        };
        adb("svc data disable");
        adb("svc data enable");
        wait_for("reconnect", Duration::from_secs(5), || phone.connected());
        let state = net_state.display();
        assert_eq!(
            std::fs::read_to_string(&calls)
                .unwrap()
                .lines()
                .collect::<Vec<_>>(),
            [
                format!("--state {state} data-down"),
                format!("--state {state} data-up --same-ip"),
            ]
        );
        assert_eq!(phone.net_events(), ["down", "up new_ip=false"]);
    }

    #[test]
    fn unrooted_phone_refuses_su() {
        let (_dir, phone) = phone(
            "fake-unrooted",
            FakePhoneOptions {
                rooted: false,
                ..quick()
            },
        );
        let out = run(&phone, &["su", "-c", "svc data disable"]);
        assert!(!out.status.success());
        assert!(phone.mobile_data());
    }
}
