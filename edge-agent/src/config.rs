//! Agent configuration: TOML file, then command-line overrides.

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;
use shared::quic::transport::Liveness;

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AgentConfig {
    /// Where enrollment stored the device identity.
    pub state_dir: PathBuf,
    /// Dial private, loopback and link-local targets (tests and local demos
    /// only; never on a real device, where it exposes the device's LAN).
    pub allow_private_targets: bool,
    /// Override the control plane address stored at enrollment (`host:port`).
    pub control_plane: Option<String>,
    /// Give up connecting to a customer's target after this long.
    pub connect_timeout_secs: u64,
    /// QUIC keep-alive while the tunnel is idle (mobile NATs drop idle UDP).
    pub keep_alive_secs: u64,
    /// A tunnel that hears nothing this long is dead and gets redialed.
    pub idle_timeout_secs: u64,
    /// Upper bound of the reconnect backoff.
    pub max_backoff_secs: u64,
    /// Runtime threads: 1 suits devices (one core outruns any mobile
    /// uplink); 0 means one per CPU core.
    pub worker_threads: usize,
    /// Where exits read their public address (plain-text IP echo). Default:
    /// the URL the control plane announces (its own `/ip`).
    pub ip_echo_url: Option<String>,
    /// How often each exit's radio and battery readings are refreshed.
    pub telemetry_secs: u64,
    /// After a self-update, each start of the new binary has this long to
    /// reach the control plane before the previous binary is restored.
    pub update_deadline_secs: u64,
    /// The uplinks: `[[exit]]` sections. None: one exit, `default`, over
    /// the host's routing, which cannot rotate.
    #[serde(rename = "exit")]
    pub exits: Vec<crate::exits::ExitConfig>,
    /// Take commands over MQTT too when the control plane hands out broker
    /// credentials.
    pub mqtt_enabled: bool,
    /// The broker as this device reaches it (`mqtt://host:port`), instead
    /// of the URL the control plane announces.
    pub mqtt_url: Option<String>,
    /// What the `reboot` command runs (`[]` refuses reboots).
    pub reboot_command: Vec<String>,
    /// The file this configuration came from; `update_config` commands
    /// replace it. Set by the command line, not in the file.
    #[serde(skip)]
    pub config_path: Option<PathBuf>,
}

impl Default for AgentConfig {
    fn default() -> Self {
        Self {
            state_dir: default_state_dir(),
            allow_private_targets: false,
            control_plane: None,
            connect_timeout_secs: 10,
            keep_alive_secs: 10,
            idle_timeout_secs: 30,
            max_backoff_secs: 30,
            worker_threads: 1,
            ip_echo_url: None,
            telemetry_secs: 30,
            update_deadline_secs: 60,
            exits: Vec::new(),
            mqtt_enabled: true,
            mqtt_url: None,
            reboot_command: vec!["reboot".into()],
            config_path: None,
        }
    }
}

pub fn default_state_dir() -> PathBuf {
    PathBuf::from("/var/lib/cellgate-agent")
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error(transparent)]
    File(#[from] shared::config_file::ConfigFileError),
    #[error("invalid configuration: {0}")]
    Invalid(String),
}

impl AgentConfig {
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        Ok(shared::config_file::load_toml(path)?)
    }

    pub fn from_toml(text: &str) -> Result<Self, toml::de::Error> {
        toml::from_str(text)
    }

    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.connect_timeout_secs == 0 || self.connect_timeout_secs > 300 {
            return Err(ConfigError::Invalid(
                "connect_timeout_secs must be within 1..=300".into(),
            ));
        }
        if self.keep_alive_secs == 0 || self.keep_alive_secs * 2 > self.idle_timeout_secs {
            return Err(ConfigError::Invalid(
                "keep_alive_secs must be at least 1 and at most half of idle_timeout_secs".into(),
            ));
        }
        if self.worker_threads > 256 {
            return Err(ConfigError::Invalid(
                "worker_threads must be at most 256".into(),
            ));
        }
        if self.telemetry_secs == 0 {
            return Err(ConfigError::Invalid(
                "telemetry_secs must be at least 1".into(),
            ));
        }
        if let Some(u) = &self.ip_echo_url
            && !u.starts_with("http://")
        {
            return Err(ConfigError::Invalid(
                "ip_echo_url must be an http:// URL".into(),
            ));
        }
        crate::exits::Exits::from_config(&self.exits).map_err(ConfigError::Invalid)?;
        if self.update_deadline_secs < 5 || self.update_deadline_secs > 3600 {
            return Err(ConfigError::Invalid(
                "update_deadline_secs must be within 5..=3600".into(),
            ));
        }
        if let Some(u) = &self.mqtt_url
            && let Err(e) = shared::mqtt::parse_url(u)
        {
            return Err(ConfigError::Invalid(format!("mqtt_url {u:?}: {e}")));
        }
        if self.max_backoff_secs == 0 {
            return Err(ConfigError::Invalid(
                "max_backoff_secs must be at least 1".into(),
            ));
        }
        Ok(())
    }

    pub fn liveness(&self) -> Liveness {
        Liveness {
            keep_alive: Duration::from_secs(self.keep_alive_secs),
            idle_timeout: Duration::from_secs(self.idle_timeout_secs),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_rejects_unknown_fields() {
        let c = AgentConfig::from_toml("state_dir = \"/tmp/x\"\nallow_private_targets = true\n")
            .unwrap();
        assert!(c.allow_private_targets);
        assert_eq!(c.connect_timeout_secs, 10);
        c.validate().unwrap();
        assert!(AgentConfig::from_toml("statedir = 1").is_err());
        let bad = AgentConfig {
            keep_alive_secs: 20,
            ..AgentConfig::default()
        };
        assert!(bad.validate().is_err());
    }

    #[test]
    fn multi_modem_example_is_valid() {
        let c = AgentConfig::from_toml(include_str!(
            "../../deploy/edge-agent.multi-modem.example.toml"
        ))
        .unwrap();
        c.validate().unwrap();
        let exits = crate::exits::Exits::from_config(&c.exits).unwrap();
        let methods: Vec<&str> = exits.all().iter().map(|e| e.method).collect();
        assert_eq!(methods, ["at", "hilink", "android", "netlink", "command"]);
        assert!(exits.all().iter().all(|e| !e.ladder.is_empty()));
    }

    #[test]
    fn example_config_is_valid_and_matches_defaults() {
        let c =
            AgentConfig::from_toml(include_str!("../../deploy/edge-agent.example.toml")).unwrap();
        c.validate().unwrap();
        let d = AgentConfig::default();
        assert_eq!(c.state_dir, d.state_dir);
        assert_eq!(c.keep_alive_secs, d.keep_alive_secs);
        assert_eq!(c.idle_timeout_secs, d.idle_timeout_secs);
    }
}
