//! `netlink` rotation backend: switch the uplink interface down, hold it
//! there, switch it up, and wait for it to carry an address again.
//!
//! This suits uplinks whose driver or network manager redials when the
//! interface comes back (a modem in MBIM/QMI mode managed by ModemManager,
//! a HiLink stick's `usb0` with DHCP). Routes through the interface vanish
//! with the link; whatever configured them (DHCP client, ModemManager)
//! must restore them. The hold time matters: carriers often hand back the
//! same address after a blip shorter than a few seconds.

use std::time::Duration;

use serde::Deserialize;
use shared::wire::Telemetry;
use tokio::time::Instant;
use tracing::{info, warn};

use super::RotateError;
use crate::net::link::{set_link, wait_ready};

/// Longest accepted hold.
const MAX_HOLD_SECS: u64 = 300;

/// `[exit.rotation] backend = "netlink"`.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NetlinkConfig {
    /// Seconds the interface stays down.
    #[serde(default = "default_hold_secs")]
    pub hold_secs: u64,
}

fn default_hold_secs() -> u64 {
    3
}

impl Default for NetlinkConfig {
    fn default() -> Self {
        NetlinkConfig {
            hold_secs: default_hold_secs(),
        }
    }
}

pub struct NetlinkBackend {
    interface: String,
    hold: Duration,
}

impl NetlinkBackend {
    pub fn new(cfg: &NetlinkConfig, interface: Option<&str>) -> Result<Self, String> {
        let interface = interface
            .ok_or("the netlink backend needs the exit's interface")?
            .to_string();
        crate::net::bind::check_ifname(&interface).map_err(|e| e.to_string())?;
        if cfg.hold_secs > MAX_HOLD_SECS {
            return Err(format!(
                "hold_secs = {} is longer than {MAX_HOLD_SECS} s",
                cfg.hold_secs
            ));
        }
        Ok(Self {
            interface,
            hold: Duration::from_secs(cfg.hold_secs),
        })
    }

    pub fn ladder(&self) -> &'static [&'static str] {
        &["link"]
    }

    /// Down, hold (cut short by `deadline`), up, wait until the interface is
    /// up with an address or `deadline` passes. The interface is switched
    /// back up even when this future is dropped half-way.
    pub async fn step(&mut self, rung: usize, deadline: Instant) -> Result<(), RotateError> {
        super::rung_name(self.ladder(), rung)?;
        let iface = self.interface.as_str();
        let mut restore = RestoreUp::new(iface);
        set_link(iface, false)
            .await
            .map_err(|e| RotateError::Failed(format!("setting {iface} down: {e}")))?;
        info!(interface = iface, hold = ?self.hold, "uplink down");
        tokio::time::sleep_until((Instant::now() + self.hold).min(deadline)).await;
        if let Err(first) = set_link(iface, true).await {
            warn!(interface = iface, error = %first, "setting the uplink up failed; retrying");
            tokio::time::sleep(Duration::from_millis(200)).await;
            set_link(iface, true).await.map_err(|e| {
                RotateError::Failed(format!("setting {iface} back up: {e} (it stays down)"))
            })?;
        }
        restore.disarm();
        info!(interface = iface, "uplink up again; waiting for an address");
        match wait_ready(iface, deadline).await {
            Ok(_) => Ok(()),
            Err(state) => Err(RotateError::Timeout(format!(
                "{iface} did not come back with an address in time ({state})"
            ))),
        }
    }

    pub async fn telemetry(&mut self) -> Telemetry {
        // A bare interface has no radio readings.
        Telemetry::default()
    }
}

/// Switches the interface up when dropped while armed, so a cancelled
/// rotation never leaves an exit dark.
struct RestoreUp {
    interface: Option<String>,
}

impl RestoreUp {
    fn new(interface: &str) -> Self {
        RestoreUp {
            interface: Some(interface.to_string()),
        }
    }

    fn disarm(&mut self) {
        self.interface = None;
    }
}

impl Drop for RestoreUp {
    fn drop(&mut self) {
        let Some(iface) = self.interface.take() else {
            return;
        };
        match tokio::runtime::Handle::try_current() {
            Ok(rt) => {
                rt.spawn(async move {
                    if let Err(e) = set_link(&iface, true).await {
                        warn!(interface = %iface, error = %e, "restoring the uplink failed");
                    }
                });
            }
            Err(_) => warn!(interface = %iface, "rotation cancelled with the uplink down"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config() {
        let c: NetlinkConfig = toml::from_str("").unwrap();
        assert_eq!(c.hold_secs, 3);
        assert_eq!(NetlinkConfig::default().hold_secs, 3);
        let c: NetlinkConfig = toml::from_str("hold_secs = 6").unwrap();
        assert_eq!(c.hold_secs, 6);
        assert!(toml::from_str::<NetlinkConfig>("hold = 6").is_err());
        let r: super::super::RotationConfig =
            toml::from_str("backend = \"netlink\"\nhold_secs = 5").unwrap();
        assert!(matches!(
            r,
            super::super::RotationConfig::Netlink(NetlinkConfig { hold_secs: 5 })
        ));
    }

    #[test]
    fn needs_an_interface() {
        let e = NetlinkBackend::new(&NetlinkConfig::default(), None)
            .err()
            .unwrap();
        assert_eq!(e, "the netlink backend needs the exit's interface");
        assert!(NetlinkBackend::new(&NetlinkConfig { hold_secs: 301 }, Some("wwan0")).is_err());
        assert!(NetlinkBackend::new(&NetlinkConfig::default(), Some("a/b")).is_err());
        let b = NetlinkBackend::new(&NetlinkConfig::default(), Some("wwan0")).unwrap();
        assert_eq!(b.ladder(), &["link"]);
    }

    #[tokio::test]
    async fn rungs_past_the_ladder_and_missing_interfaces_fail() {
        let mut b =
            NetlinkBackend::new(&NetlinkConfig { hold_secs: 0 }, Some("cgnosuch0")).unwrap();
        let deadline = Instant::now() + Duration::from_secs(2);
        assert!(matches!(
            b.step(1, deadline).await,
            Err(RotateError::Unsupported(_))
        ));
        let e = b.step(0, deadline).await.unwrap_err();
        assert!(matches!(e, RotateError::Failed(_)), "{e}");
        assert!(e.to_string().contains("cgnosuch0"), "{e}");
    }
}
