//! `android` rotation backend: an Android phone's mobile data or airplane
//! mode, toggled through its shell.
//!
//! Two ways to reach the shell:
//! - **local** (`adb_serial` unset): the agent runs on the phone itself
//!   (Termux and the like). Toggling radios needs root there, so commands go
//!   through `su -c '…'` unless `su = false`.
//! - **adb** (`adb_serial = "R58M…"`): the agent runs on a host the phone is
//!   plugged into and uses `adb -s SERIAL shell …`. The `shell` user may
//!   toggle airplane mode and mobile data without root on recent Android.
//!
//! Ladder, softest first:
//! - `data`: `svc data disable`, a pause, `svc data enable`.
//! - `airplane`: `cmd connectivity airplane-mode enable`, hold, `disable`.
//!   Android before 11 has no such command; then the backend falls back to
//!   `settings put global airplane_mode_on 1` plus the `AIRPLANE_MODE`
//!   broadcast (which needs root: set `su = true`).
//!
//! After the toggle the backend polls `dumpsys telephony.registry` until a
//! SIM reports `mDataConnectionState=2` (connected). If a rung fails half way
//! (airplane mode on, data off), it still tries to switch the radio back on:
//! a phone left in airplane mode is an exit lost until someone walks over.
//!
//! Telemetry comes from `dumpsys battery` and `dumpsys telephony.registry`;
//! the parsers below are pure and tested on real-shaped dumps.

use std::time::Duration;

use serde::Deserialize;
use shared::wire::{Registration, Telemetry};
use tokio::time::Instant;

use super::RotateError;
use super::command::{Caps, Keep, RunError, exit_text, last_lines, run_bounded};

/// How often the data connection state is polled after a toggle.
const POLL_EVERY: Duration = Duration::from_secs(1);
/// How long `svc data disable` may take to drop the data connection.
const DROP_WITHIN: Duration = Duration::from_secs(10);
const DROP_POLL: Duration = Duration::from_millis(250);
/// Bound on each telemetry command.
const TELEMETRY_TIMEOUT: Duration = Duration::from_secs(5);
/// `dumpsys telephony.registry` ends with long local logs; the per-SIM state
/// we read is at the top.
const STDOUT_CAP: usize = 512 * 1024;
const STDERR_CAP: usize = 4 * 1024;
/// Shortest airplane hold that reliably yields a new address (shorter holds
/// often get the previous address back from the carrier).
const MIN_AIRPLANE_HOLD_SECS: u64 = 3;
/// Android's "unavailable" for every signal field.
const UNAVAILABLE: i64 = i32::MAX as i64;

fn default_adb() -> String {
    "adb".to_string()
}
fn default_airplane_hold_secs() -> u64 {
    5
}
fn default_data_pause_secs() -> u64 {
    2
}
fn default_reconnect_timeout_secs() -> u64 {
    60
}
fn default_command_timeout_secs() -> u64 {
    20
}

/// `[exit.rotation]` with `backend = "android"`.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AndroidConfig {
    /// Serial of the phone as `adb devices` lists it; unset when the agent
    /// runs on the phone itself.
    #[serde(default)]
    pub adb_serial: Option<String>,
    /// Path of the `adb` program (adb mode only).
    #[serde(default = "default_adb")]
    pub adb: String,
    /// Wrap commands in `su -c`. Default: true locally, false through adb.
    #[serde(default)]
    pub su: Option<bool>,
    /// How long airplane mode stays on (at least 3 s).
    #[serde(default = "default_airplane_hold_secs")]
    pub airplane_hold_secs: u64,
    /// How long mobile data stays off in the `data` rung.
    #[serde(default = "default_data_pause_secs")]
    pub data_pause_secs: u64,
    /// How long to wait for mobile data to reconnect after a toggle (the
    /// rotation deadline caps it too).
    #[serde(default = "default_reconnect_timeout_secs")]
    pub reconnect_timeout_secs: u64,
    /// Bound on every single shell command.
    #[serde(default = "default_command_timeout_secs")]
    pub command_timeout_secs: u64,
}

impl Default for AndroidConfig {
    fn default() -> Self {
        Self {
            adb_serial: None,
            adb: default_adb(),
            su: None,
            airplane_hold_secs: default_airplane_hold_secs(),
            data_pause_secs: default_data_pause_secs(),
            reconnect_timeout_secs: default_reconnect_timeout_secs(),
            command_timeout_secs: default_command_timeout_secs(),
        }
    }
}

impl AndroidConfig {
    pub fn validate(&self) -> Result<(), String> {
        if self.airplane_hold_secs < MIN_AIRPLANE_HOLD_SECS {
            return Err(format!(
                "android backend: airplane_hold_secs = {} is too short: with less than \
                 {MIN_AIRPLANE_HOLD_SECS} s in airplane mode carriers often hand back the same \
                 address (minimum {MIN_AIRPLANE_HOLD_SECS}, default {})",
                self.airplane_hold_secs,
                default_airplane_hold_secs()
            ));
        }
        if let Some(s) = &self.adb_serial
            && s.trim().is_empty()
        {
            return Err(
                "android backend: adb_serial is empty (leave it out for a local phone)".to_string(),
            );
        }
        if self.adb_serial.is_some() && self.adb.trim().is_empty() {
            return Err("android backend: adb is empty".to_string());
        }
        if self.reconnect_timeout_secs == 0 {
            return Err("android backend: reconnect_timeout_secs must be at least 1".to_string());
        }
        if self.command_timeout_secs == 0 {
            return Err("android backend: command_timeout_secs must be at least 1".to_string());
        }
        Ok(())
    }
}

/// Where commands run.
#[derive(Clone, Debug)]
enum Transport {
    Local,
    Adb { adb: String, serial: String },
}

/// The phone's shell, as reached from the agent.
#[derive(Clone, Debug)]
struct PhoneShell {
    transport: Transport,
    su: bool,
    timeout: Duration,
}

/// What a shell command printed.
#[derive(Debug)]
struct ShellOutput {
    status: std::process::ExitStatus,
    stdout: String,
    stderr: String,
}

impl ShellOutput {
    /// Both streams, on one line, for error messages.
    fn brief(&self) -> String {
        let mut all = self.stdout.clone();
        if !self.stderr.is_empty() {
            all.push('\n');
            all.push_str(&self.stderr);
        }
        let text = last_lines(all.as_bytes(), 6);
        if text.is_empty() {
            "no output".to_string()
        } else {
            text
        }
    }

    /// Whether the text shows a failure even though the exit status may be
    /// 0 (old adb does not forward exit statuses; some tools print usage
    /// and return 0).
    fn looks_failed(&self) -> bool {
        let t = format!("{}\n{}", self.stdout, self.stderr).to_ascii_lowercase();
        [
            "exception",
            "permission denial",
            "permission denied",
            "not found",
            "inaccessible",
            "unknown command",
            "error:",
            "usage:",
        ]
        .iter()
        .any(|needle| t.contains(needle))
    }
}

/// Quote `s` for a POSIX shell when it needs it.
fn sh_quote(s: &str) -> String {
    let plain = !s.is_empty()
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || "_-./=:,@%+".contains(c));
    if plain {
        s.to_string()
    } else {
        format!("'{}'", s.replace('\'', r"'\''"))
    }
}

fn sh_join(args: &[&str]) -> String {
    args.iter()
        .map(|a| sh_quote(a))
        .collect::<Vec<_>>()
        .join(" ")
}

impl PhoneShell {
    /// The program and arguments that run `args` on the phone.
    fn argv(&self, args: &[&str]) -> Vec<String> {
        let joined = sh_join(args);
        match (&self.transport, self.su) {
            (Transport::Local, false) => args.iter().map(|s| s.to_string()).collect(),
            (Transport::Local, true) => vec!["su".into(), "-c".into(), joined],
            (Transport::Adb { adb, serial }, su) => {
                let remote = if su {
                    format!("su -c {}", sh_quote(&joined))
                } else {
                    joined
                };
                vec![
                    adb.clone(),
                    "-s".into(),
                    serial.clone(),
                    "shell".into(),
                    remote,
                ]
            }
        }
    }

    fn describe(&self, args: &[&str]) -> String {
        let argv = self.argv(args);
        match self.transport {
            Transport::Local if !self.su => argv.join(" "),
            _ => {
                let (prog, rest) = argv.split_first().expect("argv has a program");
                let mut s = prog.clone();
                for a in rest {
                    s.push(' ');
                    s.push_str(&sh_quote(a));
                }
                s
            }
        }
    }

    /// Run `args` on the phone within the command timeout and `deadline`.
    /// Only a failure to run at all is an error here; see [`Self::run_ok`].
    async fn run(&self, args: &[&str], deadline: Instant) -> Result<ShellOutput, RotateError> {
        let shown = self.describe(args);
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(RotateError::Timeout(format!(
                "no time left to run `{shown}`"
            )));
        }
        let budget = left.min(self.timeout);
        let argv = self.argv(args);
        let mut cmd = tokio::process::Command::new(&argv[0]);
        cmd.args(&argv[1..]);
        let caps = Caps {
            stdout: (Keep::Head, STDOUT_CAP),
            stderr: (Keep::Tail, STDERR_CAP),
        };
        tracing::debug!(command = %shown, "phone shell");
        match run_bounded(cmd, budget, caps).await {
            Ok(done) => Ok(ShellOutput {
                status: done.status,
                stdout: String::from_utf8_lossy(&done.stdout.bytes).into_owned(),
                stderr: String::from_utf8_lossy(&done.stderr.bytes).into_owned(),
            }),
            Err(RunError::Spawn(e)) => Err(RotateError::Failed(format!(
                "cannot run `{shown}`: {e}{}",
                match (&self.transport, e.kind()) {
                    (Transport::Adb { .. }, std::io::ErrorKind::NotFound) =>
                        " (is adb installed? set `adb` to its path)",
                    (Transport::Local, std::io::ErrorKind::NotFound) if self.su =>
                        " (no su: is the phone rooted? set su = false to try without)",
                    _ => "",
                }
            ))),
            Err(RunError::TimedOut { stdout, stderr }) => {
                let mut all = stdout.bytes;
                all.extend_from_slice(&stderr.bytes);
                let tail = last_lines(&all, 4);
                Err(RotateError::Timeout(format!(
                    "`{shown}` gave no answer within {budget:?}{}",
                    if tail.is_empty() {
                        String::new()
                    } else {
                        format!(" (output so far: {tail})")
                    }
                )))
            }
        }
    }

    /// [`Self::run`], and a non-zero exit or an error printed by the phone
    /// becomes [`RotateError::Failed`] naming the command and its output.
    async fn run_ok(&self, args: &[&str], deadline: Instant) -> Result<ShellOutput, RotateError> {
        let out = self.run(args, deadline).await?;
        if !out.status.success() || out.looks_failed() {
            return Err(self.failure(args, &out));
        }
        Ok(out)
    }

    fn failure(&self, args: &[&str], out: &ShellOutput) -> RotateError {
        let status = if out.status.success() {
            "failed".to_string()
        } else {
            exit_text(out.status)
        };
        let mut text = format!("`{}` {status}: {}", self.describe(args), out.brief());
        let lower = text.to_ascii_lowercase();
        if matches!(self.transport, Transport::Local)
            && !self.su
            && (lower.contains("permission") || lower.contains("security"))
        {
            text.push_str(" (this needs root locally: set su = true)");
        }
        RotateError::Failed(text)
    }
}

/// How this phone switches airplane mode, learned on first use.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum AirplaneMethod {
    /// `cmd connectivity airplane-mode enable|disable` (Android 11+).
    Cmd,
    /// `settings put global airplane_mode_on` + the `AIRPLANE_MODE` broadcast.
    SettingsBroadcast,
}

pub struct AndroidBackend {
    shell: PhoneShell,
    airplane_hold: Duration,
    data_pause: Duration,
    reconnect_timeout: Duration,
    airplane_method: Option<AirplaneMethod>,
}

impl AndroidBackend {
    /// `interface` is the exit's uplink as the agent sees it; the phone's
    /// own state is read from its telephony registry instead, so it is not
    /// needed here.
    pub fn new(cfg: &AndroidConfig, _interface: Option<&str>) -> Result<Self, String> {
        cfg.validate()?;
        let transport = match &cfg.adb_serial {
            Some(serial) => Transport::Adb {
                adb: cfg.adb.clone(),
                serial: serial.trim().to_string(),
            },
            None => Transport::Local,
        };
        let su = cfg.su.unwrap_or(matches!(transport, Transport::Local));
        Ok(Self {
            shell: PhoneShell {
                transport,
                su,
                timeout: Duration::from_secs(cfg.command_timeout_secs),
            },
            airplane_hold: Duration::from_secs(cfg.airplane_hold_secs),
            data_pause: Duration::from_secs(cfg.data_pause_secs),
            reconnect_timeout: Duration::from_secs(cfg.reconnect_timeout_secs),
            airplane_method: None,
        })
    }

    pub fn ladder(&self) -> &'static [&'static str] {
        &["data", "airplane"]
    }

    pub async fn step(&mut self, rung: usize, deadline: Instant) -> Result<(), RotateError> {
        match super::rung_name(self.ladder(), rung)? {
            "data" => self.data_cycle(deadline).await,
            _ => self.airplane_cycle(deadline).await,
        }
    }

    pub async fn telemetry(&mut self) -> Telemetry {
        let deadline = Instant::now() + TELEMETRY_TIMEOUT;
        let mut t = Telemetry::default();
        match self.shell.run_ok(&["dumpsys", "battery"], deadline).await {
            Ok(out) => {
                let b = parse_battery(&out.stdout);
                t.battery_pct = b.level_pct;
                t.charging = b.charging;
                t.temperature_dc = b.temperature_dc;
            }
            Err(e) => tracing::debug!(error = %e, "no battery telemetry"),
        }
        let deadline = Instant::now() + TELEMETRY_TIMEOUT;
        match self
            .shell
            .run_ok(&["dumpsys", "telephony.registry"], deadline)
            .await
        {
            Ok(out) => {
                let r = parse_telephony_registry(&out.stdout);
                t.rssi_dbm = r.rssi_dbm;
                t.rsrp_dbm = r.rsrp_dbm;
                t.rsrq_db = r.rsrq_db;
                t.sinr_db = r.sinr_db;
                t.operator = r.operator;
                t.access_tech = r.access_tech;
                t.registration = r.registration;
            }
            Err(e) => tracing::debug!(error = %e, "no radio telemetry"),
        }
        t
    }

    /// A deadline for putting the radio back on after a failure: never
    /// shorter than one command, whatever the rotation deadline says.
    fn restore_deadline(&self, deadline: Instant) -> Instant {
        deadline.max(Instant::now() + self.shell.timeout)
    }

    async fn data_cycle(&mut self, deadline: Instant) -> Result<(), RotateError> {
        self.shell
            .run_ok(&["svc", "data", "disable"], deadline)
            .await?;
        // A data switch that did nothing would otherwise pass for a
        // rotation that kept its address.
        let dropped = self.wait_data_dropped(deadline).await;
        sleep_until_or(self.data_pause, deadline).await;
        let enabled = self
            .shell
            .run_ok(&["svc", "data", "enable"], self.restore_deadline(deadline))
            .await;
        if let Err(e) = enabled {
            // One more try: mobile data left off means a dead exit.
            tokio::time::sleep(Duration::from_millis(500)).await;
            if self
                .shell
                .run_ok(&["svc", "data", "enable"], self.restore_deadline(deadline))
                .await
                .is_err()
            {
                return Err(e);
            }
        }
        dropped?;
        self.wait_data_connected("mobile data was re-enabled", deadline)
            .await
    }

    /// Wait (briefly) until no SIM reports a data connection.
    async fn wait_data_dropped(&self, deadline: Instant) -> Result<(), RotateError> {
        let until = deadline.min(Instant::now() + DROP_WITHIN);
        loop {
            let connected = match self
                .shell
                .run_ok(&["dumpsys", "telephony.registry"], until)
                .await
            {
                Ok(out) => parse_telephony_registry(&out.stdout).data_connected,
                // Cannot tell; the reconnect wait will judge.
                Err(_) => return Ok(()),
            };
            if !connected {
                return Ok(());
            }
            if Instant::now() + DROP_POLL >= until {
                return Err(RotateError::Failed(format!(
                    "mobile data stayed connected for {DROP_WITHIN:?} after `{}`",
                    self.shell.describe(&["svc", "data", "disable"])
                )));
            }
            tokio::time::sleep(DROP_POLL).await;
        }
    }

    async fn airplane_cycle(&mut self, deadline: Instant) -> Result<(), RotateError> {
        if let Err(e) = self.set_airplane(true, deadline).await {
            // It may have switched on before failing; make sure it is off.
            let _ = self
                .set_airplane(false, self.restore_deadline(deadline))
                .await;
            return Err(e);
        }
        sleep_until_or(self.airplane_hold, deadline).await;
        let off = self
            .set_airplane(false, self.restore_deadline(deadline))
            .await;
        if let Err(e) = off {
            tokio::time::sleep(Duration::from_millis(500)).await;
            if self
                .set_airplane(false, self.restore_deadline(deadline))
                .await
                .is_err()
            {
                return Err(RotateError::Failed(format!(
                    "the phone may still be in airplane mode: {e}"
                )));
            }
        }
        self.wait_data_connected("airplane mode was switched off", deadline)
            .await
    }

    async fn set_airplane(&mut self, on: bool, deadline: Instant) -> Result<(), RotateError> {
        let mut cmd_failure = None;
        if self.airplane_method != Some(AirplaneMethod::SettingsBroadcast) {
            let args = [
                "cmd",
                "connectivity",
                "airplane-mode",
                if on { "enable" } else { "disable" },
            ];
            let out = self.shell.run(&args, deadline).await?;
            let unsupported = airplane_cmd_unsupported(&out);
            let failure = if out.status.success() && !out.looks_failed() && !unsupported {
                // Old adb drops exit statuses and some ROMs accept the
                // command without acting on it: check the setting it writes.
                match self.airplane_setting(deadline).await {
                    Some(now) if now != on => RotateError::Failed(format!(
                        "`{}` returned, but settings global airplane_mode_on is still {}",
                        self.shell.describe(&args),
                        u8::from(now)
                    )),
                    _ => {
                        self.airplane_method = Some(AirplaneMethod::Cmd);
                        return Ok(());
                    }
                }
            } else {
                self.shell.failure(&args, &out)
            };
            let known_to_work = self.airplane_method == Some(AirplaneMethod::Cmd);
            if known_to_work || !(unsupported || out.status.success()) {
                return Err(failure);
            }
            tracing::info!(
                output = %out.brief(),
                "`cmd connectivity airplane-mode` is not available; using settings and the AIRPLANE_MODE broadcast"
            );
            cmd_failure = Some(failure);
        }
        let (value, state) = if on { ("1", "true") } else { ("0", "false") };
        let fallback = async {
            self.shell
                .run_ok(
                    &["settings", "put", "global", "airplane_mode_on", value],
                    deadline,
                )
                .await?;
            self.shell
                .run_ok(
                    &[
                        "am",
                        "broadcast",
                        "-a",
                        "android.intent.action.AIRPLANE_MODE",
                        "--ez",
                        "state",
                        state,
                    ],
                    deadline,
                )
                .await
        }
        .await;
        match fallback {
            Ok(_) => {
                self.airplane_method = Some(AirplaneMethod::SettingsBroadcast);
                Ok(())
            }
            Err(e) => Err(match cmd_failure {
                Some(first) => RotateError::Failed(format!(
                    "{first}; fallback through settings and broadcast: {e}"
                )),
                None => e,
            }),
        }
    }

    /// `settings get global airplane_mode_on` as a bool; `None` when the
    /// phone does not say.
    async fn airplane_setting(&self, deadline: Instant) -> Option<bool> {
        let out = self
            .shell
            .run_ok(&["settings", "get", "global", "airplane_mode_on"], deadline)
            .await
            .ok()?;
        match out.stdout.trim() {
            "1" => Some(true),
            "0" => Some(false),
            _ => None,
        }
    }

    async fn wait_data_connected(&self, after: &str, deadline: Instant) -> Result<(), RotateError> {
        let until = deadline.min(Instant::now() + self.reconnect_timeout);
        let started = Instant::now();
        loop {
            let last = match self
                .shell
                .run_ok(&["dumpsys", "telephony.registry"], until)
                .await
            {
                Ok(out) => {
                    let r = parse_telephony_registry(&out.stdout);
                    if r.data_connected {
                        tracing::info!(after = ?started.elapsed(), "mobile data connected again");
                        return Ok(());
                    }
                    match r.data_state {
                        Some(s) => format!("mDataConnectionState={s} ({})", data_state_name(s)),
                        None => {
                            "dumpsys telephony.registry shows no mDataConnectionState".to_string()
                        }
                    }
                }
                Err(e) => e.to_string(),
            };
            if Instant::now() + POLL_EVERY >= until {
                return Err(RotateError::Timeout(format!(
                    "mobile data did not reconnect within {:?} after {after} (last: {last})",
                    started.elapsed()
                )));
            }
            tokio::time::sleep(POLL_EVERY).await;
        }
    }
}

/// Sleep `d`, or until `deadline` if that comes first.
async fn sleep_until_or(d: Duration, deadline: Instant) {
    tokio::time::sleep_until((Instant::now() + d).min(deadline)).await;
}

/// `cmd connectivity airplane-mode` does not exist on this Android (before
/// 11): the service has no such shell command, or `cmd` itself is missing.
fn airplane_cmd_unsupported(out: &ShellOutput) -> bool {
    let t = format!("{}\n{}", out.stdout, out.stderr).to_ascii_lowercase();
    [
        "unknown command",
        "can't find service",
        "no shell command implementation",
        "not found",
        "unknown option",
        "usage:",
    ]
    .iter()
    .any(|n| t.contains(n))
        || out.status.code() == Some(127)
        || (!out.status.success() && t.trim().is_empty())
}

fn data_state_name(s: i32) -> &'static str {
    match s {
        0 => "disconnected",
        1 => "connecting",
        2 => "connected",
        3 => "suspended",
        4 => "disconnecting",
        5 => "handover",
        _ => "unknown",
    }
}

/// What `dumpsys battery` tells.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct BatteryReading {
    pub level_pct: Option<u8>,
    /// Some charger (AC, USB, wireless, dock) is online.
    pub charging: Option<bool>,
    /// Tenths of a degree Celsius, as Android reports it.
    pub temperature_dc: Option<i16>,
}

/// Parse `dumpsys battery` (`  key: value` lines; vendors add keys of their
/// own, the first occurrence of each standard key wins).
pub fn parse_battery(text: &str) -> BatteryReading {
    let mut level: Option<u32> = None;
    let mut scale: Option<u32> = None;
    let mut powered: Option<bool> = None;
    let mut temperature: Option<i16> = None;
    for line in text.lines() {
        let Some((key, value)) = line.trim().split_once(':') else {
            continue;
        };
        let value = value.trim();
        match key.trim() {
            "level" if level.is_none() => level = value.parse().ok(),
            "scale" if scale.is_none() => scale = value.parse().ok(),
            "temperature" if temperature.is_none() => temperature = value.parse().ok(),
            "AC powered" | "USB powered" | "Wireless powered" | "Dock powered" => match value {
                "true" => powered = Some(true),
                "false" => powered = Some(powered.unwrap_or(false)),
                _ => {}
            },
            _ => {}
        }
    }
    let level_pct = level.and_then(|l| {
        let scale = scale.filter(|s| *s > 0).unwrap_or(100);
        u8::try_from((l * 100 / scale).min(100)).ok()
    });
    BatteryReading {
        level_pct,
        charging: powered,
        temperature_dc: temperature,
    }
}

/// What `dumpsys telephony.registry` tells about the SIM that carries data
/// (or the first SIM when none does).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct RegistryReading {
    /// Some SIM reports its data connection as connected.
    pub data_connected: bool,
    /// `mDataConnectionState` of the chosen SIM: 0 disconnected,
    /// 1 connecting, 2 connected, 3 suspended.
    pub data_state: Option<i32>,
    pub rssi_dbm: Option<i16>,
    pub rsrp_dbm: Option<i16>,
    pub rsrq_db: Option<f32>,
    pub sinr_db: Option<f32>,
    pub operator: Option<String>,
    pub access_tech: Option<String>,
    pub registration: Option<Registration>,
}

/// Parse `dumpsys telephony.registry`. Multi-SIM phones print one block per
/// `Phone Id=N`; older single-SIM ones print the same keys without it.
/// Keys are only taken at the start of a line, so the local logs that
/// follow the blocks cannot be mistaken for state.
pub fn parse_telephony_registry(text: &str) -> RegistryReading {
    let blocks = phone_blocks(text);
    let readings: Vec<RegistryReading> = blocks.iter().map(|b| parse_phone_block(b)).collect();
    let data_connected = readings.iter().any(|r| r.data_state == Some(2));
    let chosen = readings
        .iter()
        .position(|r| r.data_state == Some(2))
        .or_else(|| {
            readings
                .iter()
                .position(|r| r.rsrp_dbm.is_some() || r.rssi_dbm.is_some())
        })
        .unwrap_or(0);
    let mut r = readings.into_iter().nth(chosen).unwrap_or_default();
    r.data_connected = data_connected;
    r
}

/// The per-SIM blocks: the lines between `Phone Id=` headers (the whole
/// text when there are none).
fn phone_blocks(text: &str) -> Vec<Vec<&str>> {
    let mut blocks: Vec<Vec<&str>> = Vec::new();
    let mut preamble: Vec<&str> = Vec::new();
    for line in text.lines() {
        let t = line.trim();
        if t.starts_with("Phone Id=") {
            blocks.push(Vec::new());
        } else if let Some(b) = blocks.last_mut() {
            b.push(t);
        } else {
            preamble.push(t);
        }
    }
    if blocks.is_empty() {
        blocks.push(preamble);
    }
    blocks
}

fn parse_phone_block(lines: &[&str]) -> RegistryReading {
    let first = |key: &str| -> Option<&str> { lines.iter().find_map(|l| l.strip_prefix(key)) };
    let mut r = RegistryReading {
        data_state: first("mDataConnectionState=").and_then(|v| v.trim().parse().ok()),
        ..Default::default()
    };
    if let Some(sig) = first("mSignalStrength=") {
        let s = parse_signal_strength(sig);
        r.rssi_dbm = s.rssi_dbm;
        r.rsrp_dbm = s.rsrp_dbm;
        r.rsrq_db = s.rsrq_db;
        r.sinr_db = s.sinr_db;
    }
    if let Some(ss) = first("mServiceState=") {
        // Android 10+ names, then the Android 8/9 data-specific ones.
        r.operator = [
            "mOperatorAlphaLong=",
            "mOperatorAlphaShort=",
            "mDataOperatorAlphaLong=",
        ]
        .iter()
        .find_map(|k| service_state_field(ss, k));
        r.access_tech = ["getRilDataRadioTechnology=", "mRilDataRadioTechnology="]
            .iter()
            .find_map(|k| service_state_field(ss, k))
            .and_then(|v| ril_tech(&v));
        r.registration = service_state_field(ss, "mDataRegState=").and_then(|v| {
            let code: i32 = v.split('(').next()?.trim().parse().ok()?;
            let roaming = service_state_field(ss, "mIsDataRoamingFromRegistration=")
                .is_some_and(|v| v == "true");
            Some(match code {
                0 if roaming => Registration::Roaming,
                0 => Registration::Home,
                1..=3 => Registration::NotRegistered,
                _ => Registration::Unknown,
            })
        });
    }
    r
}

/// `key=value` inside a `ServiceState` `{…, key=value, …}` dump; `null` and
/// empty values are absent.
fn service_state_field(ss: &str, key: &str) -> Option<String> {
    let at = ss.find(key)? + key.len();
    let rest = &ss[at..];
    let end = rest
        .find(", ")
        .into_iter()
        .chain(rest.find('}'))
        .min()
        .unwrap_or(rest.len());
    let v = rest[..end].trim();
    (!v.is_empty() && v != "null").then(|| v.to_string())
}

/// `14(LTE)` (RIL radio technology with its name) → our access tech names.
fn ril_tech(v: &str) -> Option<String> {
    let name = v.split_once('(')?.1.trim_end_matches(')');
    let tech = match name {
        "LTE" | "LTE_CA" => "LTE",
        "NR" => "NR5G",
        "UMTS" | "HSDPA" | "HSUPA" | "HSPA" | "HSPAP" => "WCDMA",
        "TD-SCDMA" | "TD_SCDMA" => "TD-SCDMA",
        "GPRS" | "EDGE" | "GSM" => "GSM",
        "IWLAN" => "IWLAN",
        "Unknown" | "" => return None,
        other if other.starts_with("CDMA") || other.starts_with("EvDo") => "CDMA",
        "1xRTT" | "eHRPD" => "CDMA",
        other => other,
    };
    Some(tech.to_string())
}

/// Signal values from one `SignalStrength` dump.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct SignalReading {
    pub rssi_dbm: Option<i16>,
    pub rsrp_dbm: Option<i16>,
    pub rsrq_db: Option<f32>,
    pub sinr_db: Option<f32>,
}

/// Parse the value of `mSignalStrength=`.
///
/// Android 10+ prints `SignalStrength:{mCdma=…,mGsm=CellSignalStrengthGsm:
/// rssi=…,mWcdma=…,mLte=CellSignalStrengthLte: rssi=-63 rsrp=-93 rsrq=-9
/// rssnr=12 …,mNr=CellSignalStrengthNr:{ ssRsrp = … },primary=…}`. The LTE
/// `rssnr` is in dB from Android 12 (whose dump also has `cqiTableIndex`)
/// and in tenths of a dB before. Android 9 and older print space-separated
/// numbers: `SignalStrength: gsmAsu gsmBer cdmaDbm cdmaEcio evdoDbm evdoEcio
/// evdoSnr lteSs lteRsrp lteRsrq lteRssnr …` (rssnr in tenths).
pub fn parse_signal_strength(s: &str) -> SignalReading {
    let s = s.trim();
    let Some(body) = s.strip_prefix("SignalStrength:") else {
        return SignalReading::default();
    };
    let body = body.trim_start();
    if !body.starts_with('{') {
        return parse_legacy_signal(body);
    }

    let lte = section(body, "CellSignalStrengthLte:");
    let nr = section(body, "CellSignalStrengthNr:");
    let gsm = section(body, "CellSignalStrengthGsm:");
    let wcdma = section(body, "CellSignalStrengthWcdma:");

    let lte_rsrp = lte
        .and_then(|l| field(l, "rsrp"))
        .filter(|v| (-140..=-43).contains(v));
    let lte_rsrq = lte
        .and_then(|l| field(l, "rsrq"))
        .filter(|v| (-34..=3).contains(v));
    let lte_sinr = lte.and_then(|l| {
        let raw = field(l, "rssnr")?;
        if l.contains("cqiTableIndex") {
            Some(raw as f32).filter(|v| (-20.0..=30.0).contains(v))
        } else {
            Some(raw as f32 / 10.0).filter(|v| (-20.0..=30.0).contains(v))
        }
    });
    let nr_rsrp = nr
        .and_then(|n| field(n, "ssRsrp"))
        .filter(|v| (-156..=-31).contains(v));
    let nr_rsrq = nr
        .and_then(|n| field(n, "ssRsrq"))
        .filter(|v| (-43..=20).contains(v));
    let nr_sinr = nr
        .and_then(|n| field(n, "ssSinr"))
        .filter(|v| (-23..=40).contains(v))
        .map(|v| v as f32);

    let nr_primary = body.contains("primary=CellSignalStrengthNr") && nr_rsrp.is_some();
    let (rsrp, rsrq, sinr) = if nr_primary || lte_rsrp.is_none() && nr_rsrp.is_some() {
        (nr_rsrp, nr_rsrq.map(|v| v as f32), nr_sinr)
    } else {
        (lte_rsrp, lte_rsrq.map(|v| v as f32), lte_sinr)
    };

    let rssi = lte
        .and_then(|l| field(l, "rssi"))
        .filter(|v| (-113..=-51).contains(v))
        .or_else(|| {
            gsm.and_then(|g| field(g, "rssi"))
                .filter(|v| (-113..=-51).contains(v))
        })
        .or_else(|| {
            wcdma
                .and_then(|w| field(w, "ss"))
                .filter(|v| (-113..=-51).contains(v))
        });

    SignalReading {
        rssi_dbm: rssi.map(|v| v as i16),
        rsrp_dbm: rsrp.map(|v| v as i16),
        rsrq_db: rsrq,
        sinr_db: sinr,
    }
}

fn parse_legacy_signal(body: &str) -> SignalReading {
    let nums: Vec<i64> = body
        .split_whitespace()
        .map_while(|t| t.parse::<i64>().ok())
        .collect();
    let get = |i: usize| nums.get(i).copied().filter(|v| *v != UNAVAILABLE);
    let rsrp = get(8).filter(|v| (-140..=-43).contains(v));
    SignalReading {
        rssi_dbm: get(0)
            .filter(|asu| (0..=31).contains(asu))
            .map(|asu| (-113 + 2 * asu) as i16),
        rsrp_dbm: rsrp.map(|v| v as i16),
        rsrq_db: rsrp
            .and(get(9))
            .filter(|v| (-34..=3).contains(v))
            .map(|v| v as f32),
        sinr_db: rsrp
            .and(get(10))
            .filter(|v| (-200..=300).contains(v))
            .map(|v| v as f32 / 10.0),
    }
}

/// The text of one `CellSignalStrength…:` part of a `SignalStrength` dump,
/// up to the next `,m` that starts a sibling.
fn section<'a>(body: &'a str, marker: &str) -> Option<&'a str> {
    let at = body.find(marker)? + marker.len();
    let rest = &body[at..];
    let end = rest
        .find(",m")
        .or_else(|| rest.find(",primary"))
        .unwrap_or(rest.len());
    Some(&rest[..end])
}

/// `name=value` or `name = value` inside a section; Android's "unavailable"
/// (2147483647) is absent.
fn field(section: &str, name: &str) -> Option<i64> {
    let normalized = section.replace(" = ", "=");
    normalized.split_whitespace().find_map(|tok| {
        let tok = tok.trim_matches(|c| c == '{' || c == '}' || c == ',');
        let v: i64 = tok.strip_prefix(name)?.strip_prefix('=')?.parse().ok()?;
        (v != UNAVAILABLE && v != -(UNAVAILABLE)).then_some(v)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// AOSP-style `dumpsys battery` (Android 13), charging over USB.
    const BATTERY_AOSP: &str = "Current Battery Service state:
  AC powered: false
  USB powered: true
  Wireless powered: false
  Dock powered: false
  Max charging current: 500000
  Max charging voltage: 5000000
  Charge counter: 3164000
  status: 2
  health: 2
  present: true
  level: 87
  scale: 100
  voltage: 4312
  temperature: 291
  technology: Li-ion
";

    /// Samsung adds keys of its own (and lowercase duplicates).
    const BATTERY_SAMSUNG: &str = "Current Battery Service state:
  mBootCompleted: true
  AC powered: false
  USB powered: false
  Wireless powered: false
  Max charging current: 0
  Max charging voltage: 0
  Charge counter: 0
  status: 3
  health: 2
  present: true
  level: 14
  scale: 100
  voltage: 3663
  temperature: 326
  technology: Li-ion
  batterySWSelfDischarging: false
  LED Charging: true
  current now: -321
  charge counter: 0
BatteryInfoBackUp
  mSavedBatteryMaxTemp: 490
";

    /// Android 13 dual-SIM phone; SIM 2 carries data on LTE, SIM 1 is idle.
    const REGISTRY_DUAL_SIM: &str = "last known state:
  Phone Id=0
    mCallState=0
    mRingingCallState=0
    mForegroundCallState=0
    mBackgroundCallState=0
    mPreciseCallState=Ringing call state: 0, Foreground call state: 0, Background call state: 0
    mCallDisconnectCause=-1
    mCallIncomingNumber=
    mServiceState={mVoiceRegState=0(IN_SERVICE), mDataRegState=0(IN_SERVICE), mChannelNumber=1300, duplexMode()=1, mCellBandwidths=[20000], mOperatorAlphaLong=Vodafone.de, mOperatorAlphaShort=Vodafone, isManualNetworkSelection=false(automatic), getRilVoiceRadioTechnology=14(LTE), getRilDataRadioTechnology=14(LTE), mCssIndicator=unsupported, mNetworkId=-1, mSystemId=-1, mCdmaRoamingIndicator=-1, mCdmaDefaultRoamingIndicator=-1, mIsEmergencyOnly=false, isUsingCarrierAggregation=false, mArfcnRsrpBoost=0, mNetworkRegistrationInfos=[NetworkRegistrationInfo{ domain=CS transportType=WWAN registrationState=HOME}], mNrFrequencyRange=0, mOperatorAlphaLongRaw=Vodafone.de, mOperatorAlphaShortRaw=Vodafone, mIsDataRoamingFromRegistration=false, mIsIwlanPreferred=false}
    mVoiceActivationState=0
    mDataActivationState=0
    mUserMobileDataState=false
    mSignalStrength=SignalStrength:{mCdma=CellSignalStrengthCdma: cdmaDbm=2147483647 cdmaEcio=2147483647 evdoDbm=2147483647 evdoEcio=2147483647 evdoSnr=2147483647 level=0 oplevel=0,mGsm=CellSignalStrengthGsm: rssi=2147483647 ber=2147483647 mTa=2147483647 mLevel=0,mWcdma=CellSignalStrengthWcdma: ss=2147483647 ber=2147483647 rscp=2147483647 ecno=2147483647 mLevel=0,mTdscdma=CellSignalStrengthTdscdma: rssi=2147483647 ber=2147483647 rscp=2147483647 mLevel=0,mLte=CellSignalStrengthLte: rssi=-71 rsrp=-104 rsrq=-12 rssnr=4 cqiTableIndex=2147483647 cqi=2147483647 ta=2147483647 level=2 parametersUseForLevel=0,mNr=CellSignalStrengthNr:{ csiRsrp = 2147483647 csiRsrq = 2147483647 csiCqiTableIndex = 2147483647 csiCqiReport = [] ssRsrp = 2147483647 ssRsrq = 2147483647 ssSinr = 2147483647 level = 0 parametersUseForLevel = 0 timingAdvance = 2147483647 },primary=CellSignalStrengthLte}
    mMessageWaiting=false
    mCallForwarding=false
    mDataActivity=0
    mDataConnectionState=0
    mCellIdentity=null
  Phone Id=1
    mCallState=0
    mCallIncomingNumber=
    mServiceState={mVoiceRegState=0(IN_SERVICE), mDataRegState=0(IN_SERVICE), mChannelNumber=6300, duplexMode()=1, mCellBandwidths=[10000], mOperatorAlphaLong=Telekom.de, mOperatorAlphaShort=Telekom, isManualNetworkSelection=false(automatic), getRilVoiceRadioTechnology=14(LTE), getRilDataRadioTechnology=19(LTE_CA), mCssIndicator=unsupported, mNetworkId=-1, mSystemId=-1, mIsEmergencyOnly=false, isUsingCarrierAggregation=true, mArfcnRsrpBoost=0, mNrFrequencyRange=0, mIsDataRoamingFromRegistration=false, mIsIwlanPreferred=false}
    mUserMobileDataState=true
    mSignalStrength=SignalStrength:{mCdma=CellSignalStrengthCdma: cdmaDbm=2147483647 cdmaEcio=2147483647 evdoDbm=2147483647 evdoEcio=2147483647 evdoSnr=2147483647 level=0 oplevel=0,mGsm=CellSignalStrengthGsm: rssi=2147483647 ber=2147483647 mTa=2147483647 mLevel=0,mWcdma=CellSignalStrengthWcdma: ss=2147483647 ber=2147483647 rscp=2147483647 ecno=2147483647 mLevel=0,mTdscdma=CellSignalStrengthTdscdma: rssi=2147483647 ber=2147483647 rscp=2147483647 mLevel=0,mLte=CellSignalStrengthLte: rssi=-63 rsrp=-93 rsrq=-9 rssnr=12 cqiTableIndex=2147483647 cqi=2147483647 ta=2147483647 level=3 parametersUseForLevel=0,mNr=CellSignalStrengthNr:{ csiRsrp = 2147483647 csiRsrq = 2147483647 csiCqiTableIndex = 2147483647 csiCqiReport = [] ssRsrp = 2147483647 ssRsrq = 2147483647 ssSinr = 2147483647 level = 0 parametersUseForLevel = 0 timingAdvance = 2147483647 },primary=CellSignalStrengthLte}
    mDataActivity=0
    mDataConnectionState=2
    mCellIdentity=null
mPreciseDataConnectionStates:
local logs:
11-02 10:15:01.337 - notifyDataConnectionForSubscriber: subId=2 phoneId=1 state=2
";

    /// Android 9 single SIM: no `Phone Id=` headers, old numeric signal
    /// format, roaming.
    const REGISTRY_ANDROID_9: &str = "  mCallState=0
  mCallIncomingNumber=
  mServiceState={mVoiceRegState=0(IN_SERVICE), mDataRegState=0(IN_SERVICE), mVoiceRoamingType=international, mDataRoamingType=international, mVoiceOperatorAlphaLong=Orange F, mVoiceOperatorAlphaShort=Orange, mDataOperatorAlphaLong=Orange F, mDataOperatorAlphaShort=Orange, isManualNetworkSelection=false(automatic), mRilVoiceRadioTechnology=14(LTE), mRilDataRadioTechnology=14(LTE), mIsDataRoamingFromRegistration=true}
  mSignalStrength=SignalStrength: 19 99 -120 -160 -120 -1 -1 27 -98 -11 65 2147483647 2147483647 2147483647 gsm|lte level=3
  mMessageWaiting=false
  mDataActivity=0
  mDataConnectionState=2
";

    /// A phone in airplane mode: everything unavailable.
    const REGISTRY_AIRPLANE: &str = "  Phone Id=0
    mServiceState={mVoiceRegState=3(POWER_OFF), mDataRegState=3(POWER_OFF), mOperatorAlphaLong=null, mOperatorAlphaShort=null, getRilDataRadioTechnology=0(Unknown), mIsDataRoamingFromRegistration=false}
    mSignalStrength=SignalStrength:{mCdma=CellSignalStrengthCdma: cdmaDbm=2147483647 cdmaEcio=2147483647 evdoDbm=2147483647 evdoEcio=2147483647 evdoSnr=2147483647 level=0,mGsm=CellSignalStrengthGsm: rssi=2147483647 ber=2147483647 mTa=2147483647 mLevel=0,mWcdma=CellSignalStrengthWcdma: ss=2147483647 ber=2147483647 rscp=2147483647 ecno=2147483647 mLevel=0,mTdscdma=CellSignalStrengthTdscdma: rssi=2147483647 ber=2147483647 rscp=2147483647 mLevel=0,mLte=CellSignalStrengthLte: rssi=2147483647 rsrp=2147483647 rsrq=2147483647 rssnr=2147483647 cqiTableIndex=2147483647 cqi=2147483647 ta=2147483647 level=0 parametersUseForLevel=0,mNr=CellSignalStrengthNr:{ csiRsrp = 2147483647 csiRsrq = 2147483647 csiCqiTableIndex = 2147483647 csiCqiReport = [] ssRsrp = 2147483647 ssRsrq = 2147483647 ssSinr = 2147483647 level = 0 parametersUseForLevel = 0 timingAdvance = 2147483647 },primary=CellSignalStrengthLte}
    mDataConnectionState=0
";

    #[test]
    fn battery_aosp() {
        assert_eq!(
            parse_battery(BATTERY_AOSP),
            BatteryReading {
                level_pct: Some(87),
                charging: Some(true),
                temperature_dc: Some(291),
            }
        );
    }

    #[test]
    fn battery_samsung_extras_and_scale() {
        assert_eq!(
            parse_battery(BATTERY_SAMSUNG),
            BatteryReading {
                level_pct: Some(14),
                charging: Some(false),
                temperature_dc: Some(326),
            }
        );
        let r = parse_battery("  level: 50\n  scale: 200\n  AC powered: true\n");
        assert_eq!(r.level_pct, Some(25));
        assert_eq!(r.charging, Some(true));
        assert_eq!(parse_battery("garbage"), BatteryReading::default());
    }

    #[test]
    fn registry_picks_the_sim_with_data() {
        let r = parse_telephony_registry(REGISTRY_DUAL_SIM);
        assert!(r.data_connected);
        assert_eq!(r.data_state, Some(2));
        assert_eq!(r.operator.as_deref(), Some("Telekom.de"));
        assert_eq!(r.access_tech.as_deref(), Some("LTE"));
        assert_eq!(r.registration, Some(Registration::Home));
        assert_eq!(r.rssi_dbm, Some(-63));
        assert_eq!(r.rsrp_dbm, Some(-93));
        assert_eq!(r.rsrq_db, Some(-9.0));
        // Android 12+ dumps (with cqiTableIndex) give rssnr in dB.
        assert_eq!(r.sinr_db, Some(12.0));
    }

    #[test]
    fn registry_android_9() {
        let r = parse_telephony_registry(REGISTRY_ANDROID_9);
        assert!(r.data_connected);
        assert_eq!(r.rssi_dbm, Some(-75));
        assert_eq!(r.rsrp_dbm, Some(-98));
        assert_eq!(r.rsrq_db, Some(-11.0));
        assert_eq!(r.sinr_db, Some(6.5));
        assert_eq!(r.registration, Some(Registration::Roaming));
        assert_eq!(r.operator.as_deref(), Some("Orange F"));
        assert_eq!(r.access_tech.as_deref(), Some("LTE"));
    }

    #[test]
    fn registry_in_airplane_mode() {
        let r = parse_telephony_registry(REGISTRY_AIRPLANE);
        assert!(!r.data_connected);
        assert_eq!(r.data_state, Some(0));
        assert_eq!(r.operator, None);
        assert_eq!(r.access_tech, None);
        assert_eq!(r.rsrp_dbm, None);
        assert_eq!(r.rssi_dbm, None);
        assert_eq!(r.sinr_db, None);
        assert_eq!(r.registration, Some(Registration::NotRegistered));
    }

    #[test]
    fn local_logs_are_not_state() {
        let text = "  Phone Id=0\n    mDataConnectionState=0\nlocal logs:\n\
                    11-02 10:15:01.337 - mDataConnectionState=2 notified\n";
        let r = parse_telephony_registry(text);
        assert_eq!(r.data_state, Some(0));
        assert!(!r.data_connected);
    }

    #[test]
    fn signal_android_10_rssnr_in_tenths() {
        let s = parse_signal_strength(
            "SignalStrength:{mCdma=CellSignalStrengthCdma: cdmaDbm=2147483647 cdmaEcio=2147483647 evdoDbm=2147483647 evdoEcio=2147483647 evdoSnr=2147483647 level=0,mGsm=CellSignalStrengthGsm: rssi=2147483647 ber=2147483647 mTa=2147483647 mLevel=0,mWcdma=CellSignalStrengthWcdma: ss=2147483647 ber=2147483647 rscp=2147483647 ecno=2147483647 mLevel=0,mTdscdma=CellSignalStrengthTdscdma: rssi=2147483647 ber=2147483647 rscp=2147483647 mLevel=0,mLte=CellSignalStrengthLte: rssi=-77 rsrp=-101 rsrq=-10 rssnr=134 cqi=2147483647 ta=2147483647 level=3,mNr=CellSignalStrengthNr:{ csiRsrp = 2147483647 csiRsrq = 2147483647 csiSinr = 2147483647 ssRsrp = 2147483647 ssRsrq = 2147483647 ssSinr = 2147483647 level = 0 },primary=CellSignalStrengthLte}",
        );
        assert_eq!(s.rsrp_dbm, Some(-101));
        assert_eq!(s.sinr_db, Some(13.4));
        assert_eq!(s.rssi_dbm, Some(-77));
    }

    #[test]
    fn signal_nr_standalone_and_wcdma() {
        let nr = parse_signal_strength(
            "SignalStrength:{mCdma=CellSignalStrengthCdma: cdmaDbm=2147483647 level=0,mGsm=CellSignalStrengthGsm: rssi=2147483647 ber=2147483647 mTa=2147483647 mLevel=0,mWcdma=CellSignalStrengthWcdma: ss=2147483647 ber=2147483647 rscp=2147483647 ecno=2147483647 mLevel=0,mTdscdma=CellSignalStrengthTdscdma: rssi=2147483647 ber=2147483647 rscp=2147483647 mLevel=0,mLte=CellSignalStrengthLte: rssi=2147483647 rsrp=2147483647 rsrq=2147483647 rssnr=2147483647 cqiTableIndex=2147483647 cqi=2147483647 ta=2147483647 level=0 parametersUseForLevel=0,mNr=CellSignalStrengthNr:{ csiRsrp = -90 csiRsrq = -11 csiCqiTableIndex = 2147483647 csiCqiReport = [] ssRsrp = -88 ssRsrq = -10 ssSinr = 21 level = 4 parametersUseForLevel = 1 timingAdvance = 2147483647 },primary=CellSignalStrengthNr}",
        );
        assert_eq!(nr.rsrp_dbm, Some(-88));
        assert_eq!(nr.rsrq_db, Some(-10.0));
        assert_eq!(nr.sinr_db, Some(21.0));

        let w = parse_signal_strength(
            "SignalStrength:{mCdma=CellSignalStrengthCdma: cdmaDbm=2147483647 level=0,mGsm=CellSignalStrengthGsm: rssi=2147483647 ber=2147483647 mTa=2147483647 mLevel=0,mWcdma=CellSignalStrengthWcdma: ss=-85 ber=2147483647 rscp=-95 ecno=-6 mLevel=3,mTdscdma=CellSignalStrengthTdscdma: rssi=2147483647 ber=2147483647 rscp=2147483647 mLevel=0,mLte=CellSignalStrengthLte: rssi=2147483647 rsrp=2147483647 rsrq=2147483647 rssnr=2147483647 cqi=2147483647 ta=2147483647 level=0,mNr=CellSignalStrengthNr:{ ssRsrp = 2147483647 ssRsrq = 2147483647 ssSinr = 2147483647 level = 0 },primary=CellSignalStrengthWcdma}",
        );
        assert_eq!(w.rssi_dbm, Some(-85));
        assert_eq!(w.rsrp_dbm, None);
    }

    #[test]
    fn config_defaults_and_validation() {
        let cfg: AndroidConfig = toml::from_str("").unwrap();
        assert_eq!(cfg.airplane_hold_secs, 5);
        assert_eq!(cfg.adb, "adb");
        let b = AndroidBackend::new(&cfg, None).unwrap();
        assert!(b.shell.su, "local mode defaults to su");
        assert_eq!(b.ladder(), &["data", "airplane"]);

        let cfg: AndroidConfig = toml::from_str("adb_serial = \"R58M123\"").unwrap();
        assert!(!AndroidBackend::new(&cfg, None).unwrap().shell.su);

        let cfg: AndroidConfig = toml::from_str("airplane_hold_secs = 2").unwrap();
        let e = AndroidBackend::new(&cfg, None).err().unwrap();
        assert!(e.contains("airplane_hold_secs = 2 is too short"), "{e}");
        assert!(e.contains("minimum 3"), "{e}");

        assert!(toml::from_str::<AndroidConfig>("root = true").is_err());
        let cfg: AndroidConfig = toml::from_str("adb_serial = \" \"").unwrap();
        assert!(AndroidBackend::new(&cfg, None).is_err());
    }

    #[test]
    fn command_lines() {
        let shell = |transport, su| PhoneShell {
            transport,
            su,
            timeout: Duration::from_secs(1),
        };
        let args = ["am", "broadcast", "-a", "x", "--ez", "state", "true"];
        assert_eq!(shell(Transport::Local, false).argv(&args), args);
        assert_eq!(
            shell(Transport::Local, true).argv(&["svc", "data", "enable"]),
            ["su", "-c", "svc data enable"]
        );
        let adb = Transport::Adb {
            adb: "/usr/bin/adb".into(),
            serial: "R58M123".into(),
        };
        assert_eq!(
            shell(adb.clone(), false).argv(&["svc", "data", "enable"]),
            ["/usr/bin/adb", "-s", "R58M123", "shell", "svc data enable"]
        );
        assert_eq!(
            shell(adb.clone(), true).argv(&["svc", "data", "enable"]),
            [
                "/usr/bin/adb",
                "-s",
                "R58M123",
                "shell",
                "su -c 'svc data enable'"
            ]
        );
        assert_eq!(
            shell(adb, true).describe(&["svc", "data", "enable"]),
            "/usr/bin/adb -s R58M123 shell 'su -c '\\''svc data enable'\\'''"
        );
        assert_eq!(sh_quote("it's"), r"'it'\''s'");
    }
}
