//! IP rotation backends.
//!
//! Every backend offers an escalation **ladder**: named steps, softest first
//! (for a modem: PDP re-activation, radio off/on, module reset). The control
//! plane asks for one rung per attempt and escalates when the public address
//! did not change. A backend's `step` performs the rung and returns once the
//! backend believes the data link is back; the caller then waits for the
//! uplink interface and reads the public address through it.
//!
//! Backends:
//! - [`at`]: serial modem, AT commands, per-model profiles.
//! - [`android`]: airplane mode / mobile data through shell commands, locally
//!   (root) or through `adb -s SERIAL shell`.
//! - [`hilink`]: Huawei HiLink HTTP API.
//! - [`netlink`]: link down/up of the uplink interface.
//! - [`command`]: the operator's own script.

use serde::Deserialize;
use shared::wire::Telemetry;
use tokio::time::Instant;

pub mod android;
pub mod at;
pub mod command;
pub mod hilink;
pub mod netlink;

/// Why a rung failed. The text reaches the operator verbatim (API, logs), so
/// it names the device-side cause: `modem answered +CME ERROR: 30 (no
/// network service) to AT+CGACT=1,1`.
#[derive(Debug, thiserror::Error)]
pub enum RotateError {
    /// The device did not answer (or the link did not come back) in time.
    #[error("timed out: {0}")]
    Timeout(String),
    /// The device answered with an error.
    #[error("{0}")]
    Failed(String),
    /// The backend cannot do this (e.g. a rung index past the ladder).
    #[error("not supported: {0}")]
    Unsupported(String),
}

/// Per-exit rotation settings: `[exit.rotation]` with `backend = "…"`.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(tag = "backend", rename_all = "snake_case")]
pub enum RotationConfig {
    /// The exit cannot rotate.
    #[default]
    None,
    At(at::AtConfig),
    Android(android::AndroidConfig),
    Hilink(hilink::HilinkConfig),
    Netlink(netlink::NetlinkConfig),
    Command(command::CommandConfig),
}

/// A configured backend, ready to run rungs.
pub enum Backend {
    None,
    At(at::AtBackend),
    Android(android::AndroidBackend),
    Hilink(hilink::HilinkBackend),
    Netlink(netlink::NetlinkBackend),
    Command(command::CommandBackend),
}

impl Backend {
    /// `interface` is the exit's uplink interface, if it has one.
    pub fn new(cfg: &RotationConfig, interface: Option<&str>) -> Result<Self, String> {
        Ok(match cfg {
            RotationConfig::None => Backend::None,
            RotationConfig::At(c) => Backend::At(at::AtBackend::new(c, interface)?),
            RotationConfig::Android(c) => {
                Backend::Android(android::AndroidBackend::new(c, interface)?)
            }
            RotationConfig::Hilink(c) => Backend::Hilink(hilink::HilinkBackend::new(c, interface)?),
            RotationConfig::Netlink(c) => {
                Backend::Netlink(netlink::NetlinkBackend::new(c, interface)?)
            }
            RotationConfig::Command(c) => {
                Backend::Command(command::CommandBackend::new(c, interface)?)
            }
        })
    }

    pub fn method(&self) -> &'static str {
        match self {
            Backend::None => "none",
            Backend::At(_) => "at",
            Backend::Android(_) => "android",
            Backend::Hilink(_) => "hilink",
            Backend::Netlink(_) => "netlink",
            Backend::Command(_) => "command",
        }
    }

    /// Rung names, softest first.
    pub fn ladder(&self) -> Vec<String> {
        let names: &[&str] = match self {
            Backend::None => &[],
            Backend::At(b) => return b.ladder(),
            Backend::Android(b) => b.ladder(),
            Backend::Hilink(b) => b.ladder(),
            Backend::Netlink(b) => b.ladder(),
            Backend::Command(b) => return b.ladder(),
        };
        names.iter().map(|s| s.to_string()).collect()
    }

    /// Run rung `rung` (an index into [`Backend::ladder`]); give up at
    /// `deadline`.
    pub async fn step(&mut self, rung: usize, deadline: Instant) -> Result<(), RotateError> {
        match self {
            Backend::None => Err(RotateError::Unsupported(
                "this exit has no rotation backend configured".into(),
            )),
            Backend::At(b) => b.step(rung, deadline).await,
            Backend::Android(b) => b.step(rung, deadline).await,
            Backend::Hilink(b) => b.step(rung, deadline).await,
            Backend::Netlink(b) => b.step(rung, deadline).await,
            Backend::Command(b) => b.step(rung, deadline).await,
        }
    }

    /// Best-effort readings; fields the device does not report stay `None`.
    /// Bounded in time by the backend (a silent modem costs at most a few
    /// seconds, never blocks forever).
    pub async fn telemetry(&mut self) -> Telemetry {
        match self {
            Backend::None | Backend::Netlink(_) | Backend::Command(_) => Telemetry::default(),
            Backend::At(b) => b.telemetry().await,
            Backend::Android(b) => b.telemetry().await,
            Backend::Hilink(b) => b.telemetry().await,
        }
    }
}

/// The name of rung `rung`, or a clear error past the end of the ladder.
pub fn rung_name<'a>(ladder: &[&'a str], rung: usize) -> Result<&'a str, RotateError> {
    ladder.get(rung).copied().ok_or_else(|| {
        RotateError::Unsupported(format!(
            "rung {rung} does not exist (ladder: {})",
            ladder.join(", ")
        ))
    })
}
