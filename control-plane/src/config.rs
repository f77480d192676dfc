//! Control-plane configuration: TOML file, then command-line and
//! environment overrides, then `validate()` before anything binds.

use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// Database, PKI and runtime files live here.
    pub data_dir: PathBuf,
    /// The database: `sqlite://PATH` or
    /// `postgres://USER:PASSWORD@HOST:PORT/DATABASE`. `None` keeps the
    /// embedded SQLite file `cellgate.db` in `data_dir`. Several control
    /// planes may share one PostgreSQL database. Holds a password: log it
    /// only through `store::redacted_url`.
    pub database_url: Option<String>,
    /// Connection pool size (default 4 for SQLite, 10 for PostgreSQL).
    pub database_max_connections: Option<u32>,
    /// Customer HTTP proxy (CONNECT and absolute-form HTTP).
    pub http_listen: SocketAddr,
    /// Customer SOCKS5 proxy.
    pub socks_listen: SocketAddr,
    /// REST API and health endpoint.
    pub api_listen: SocketAddr,
    /// QUIC listener for edge agents (UDP).
    pub quic_listen: SocketAddr,
    /// `host:port` agents dial, written into enrollment tokens. Defaults to
    /// the QUIC listener's address (loopback when it listens on all
    /// addresses), which only suits agents on this host.
    pub public_addr: Option<String>,
    /// Lift the address part of the target deny list (tests, local demos).
    pub allow_private_targets: bool,
    /// A customer must finish its proxy handshake within this time.
    pub handshake_timeout_secs: u64,
    /// How long a device may take to connect to a target.
    pub connect_timeout_secs: u64,
    /// Idle keep-alive time between requests on a customer HTTP connection.
    pub http_idle_secs: u64,
    /// Plain-HTTP forwarding: time an origin has to start its response once
    /// the request was sent, before the customer gets 504.
    pub response_timeout_secs: u64,
    /// Heartbeat period asked of agents; three missed ones mark a device
    /// offline.
    pub heartbeat_interval_secs: u64,
    /// Lifetime of an enrollment token unless given explicitly.
    pub enroll_token_ttl_secs: u64,
    /// QUIC keep-alive and idle timeout for tunnels.
    pub tunnel_keep_alive_secs: u64,
    pub tunnel_idle_timeout_secs: u64,
    /// IP rotation: `[rotation]`.
    pub rotation: RotationSettings,
    /// Fleet bookkeeping: `[fleet]`.
    pub fleet: FleetSettings,
    /// Port per exit: `[ports]`.
    pub ports: PortsSettings,
    /// Device commands over an MQTT broker (optional: without a broker,
    /// commands use the tunnel only).
    pub mqtt: MqttSettings,
    /// Brute-force backoff and handshake caps on the proxy listeners.
    pub security: SecuritySettings,
    /// Signed agent releases and updates: `[releases]`.
    pub releases: ReleaseSettings,
}

/// Agent releases: the signing key and how long updates may take.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ReleaseSettings {
    /// The ed25519 release key (32 raw bytes, mode 0600), created on first
    /// use. Default: `release.key` in `data_dir`. Give every control plane
    /// that shares a database the same key: agents learn it at enrollment.
    pub key_path: Option<PathBuf>,
    /// A device must fetch, check and install a release within this time.
    pub update_timeout_secs: u64,
    /// In a rollout, a device must be back with the new version this long
    /// after it installed it, or the rollout halts.
    pub rollout_deadline_secs: u64,
}

impl Default for ReleaseSettings {
    fn default() -> Self {
        Self {
            key_path: None,
            update_timeout_secs: 900,
            rollout_deadline_secs: 180,
        }
    }
}

impl Config {
    /// Where the release signing key lives.
    pub fn release_key_path(&self) -> PathBuf {
        self.releases
            .key_path
            .clone()
            .unwrap_or_else(|| self.data_dir.join("release.key"))
    }
}

/// How rotations run. Seed defaults: 600 s schedule, 3 attempts 10 s apart,
/// 60 s per attempt.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RotationSettings {
    /// In-flight flows get this long to finish before the rotation starts
    /// (no new flows go to the exit meanwhile).
    pub drain_grace_secs: u64,
    /// Attempts before a rotation fails; each escalates one rung of the
    /// backend's ladder (soft step first, then harder ones).
    pub attempts: u32,
    /// Pause between attempts.
    pub retry_delay_secs: u64,
    /// Limit for one attempt: the device's step plus reading the new IP.
    pub attempt_timeout_secs: u64,
    /// A new address must differ from the exit's last this-many addresses.
    pub recent_ips: u32,
    /// Interval of a schedule that names none.
    pub default_every_secs: u64,
    /// Rotation links may be used at most once per this many seconds unless
    /// created with another interval.
    pub link_min_interval_secs: u64,
    /// How often a failed exit's address is checked again; it returns to
    /// the pool when a check succeeds.
    pub recheck_failed_secs: u64,
    /// Where agents read their exits' public addresses. Default: this
    /// control plane's `/ip` on the API port, at the host agents dial.
    pub ip_echo_url: Option<String>,
}

impl Default for RotationSettings {
    fn default() -> Self {
        Self {
            drain_grace_secs: 10,
            attempts: 3,
            retry_delay_secs: 10,
            attempt_timeout_secs: 60,
            recent_ips: 3,
            default_every_secs: 600,
            link_min_interval_secs: 60,
            recheck_failed_secs: 30,
            ip_echo_url: None,
        }
    }
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct FleetSettings {
    /// One telemetry sample per device per this many seconds is stored.
    pub telemetry_sample_secs: u64,
    /// Telemetry samples older than this are deleted.
    pub telemetry_retention_hours: u64,
    /// Exit counters (requests, bytes) are written to the database this
    /// often; a crash loses at most one interval of them.
    pub counters_flush_secs: u64,
    /// Request-log rows older than this many days are deleted.
    pub request_log_retention_days: u64,
}

impl Default for FleetSettings {
    fn default() -> Self {
        Self {
            telemetry_sample_secs: 60,
            telemetry_retention_hours: 24,
            counters_flush_secs: 5,
            request_log_retention_days: 30,
        }
    }
}

impl Default for Config {
    fn default() -> Self {
        Self {
            data_dir: PathBuf::from("./cellgate-data"),
            database_url: None,
            database_max_connections: None,
            http_listen: SocketAddr::from(([0, 0, 0, 0], 8080)),
            socks_listen: SocketAddr::from(([0, 0, 0, 0], 1080)),
            api_listen: SocketAddr::from(([127, 0, 0, 1], 8000)),
            quic_listen: SocketAddr::from(([0, 0, 0, 0], 4433)),
            public_addr: None,
            allow_private_targets: false,
            handshake_timeout_secs: 10,
            connect_timeout_secs: 10,
            http_idle_secs: 60,
            response_timeout_secs: 60,
            heartbeat_interval_secs: 15,
            enroll_token_ttl_secs: 24 * 3600,
            tunnel_keep_alive_secs: 10,
            tunnel_idle_timeout_secs: 30,
            rotation: RotationSettings::default(),
            fleet: FleetSettings::default(),
            ports: PortsSettings::default(),
            releases: ReleaseSettings::default(),
            mqtt: MqttSettings::default(),
            security: SecuritySettings::default(),
        }
    }
}

/// Brute-force backoff for proxy logins and caps on pending handshakes.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SecuritySettings {
    /// Failed logins from one address (IPv4, IPv6 /64) before it backs
    /// off; higher than per username, since customers share NAT addresses.
    pub auth_source_failures: u32,
    /// Failed logins against one username before it backs off (an
    /// address that logged in as that user in the last 24 h is exempt).
    pub auth_user_failures: u32,
    /// The first backoff; it doubles with each further failure.
    pub auth_backoff_secs: u64,
    /// The longest backoff.
    pub auth_max_backoff_secs: u64,
    /// Pending handshakes one address may hold once a listener is busy.
    pub handshakes_per_source: usize,
    /// A listener is busy from this many pending handshakes on.
    pub handshakes_busy_from: usize,
    /// Pending handshakes per listener in all; beyond it new connections
    /// are closed at once.
    pub handshakes_total: usize,
}

impl Default for SecuritySettings {
    fn default() -> Self {
        let a = crate::proxy::auth::AuthLimits::default();
        let h = crate::proxy::HandshakeLimits::default();
        Self {
            auth_source_failures: a.source_threshold,
            auth_user_failures: a.user_threshold,
            auth_backoff_secs: a.base_backoff.as_secs(),
            auth_max_backoff_secs: a.max_backoff.as_secs(),
            handshakes_per_source: h.per_source,
            handshakes_busy_from: h.busy_from,
            handshakes_total: h.total,
        }
    }
}

impl SecuritySettings {
    pub fn auth_limits(&self) -> crate::proxy::auth::AuthLimits {
        crate::proxy::auth::AuthLimits {
            source_threshold: self.auth_source_failures,
            user_threshold: self.auth_user_failures,
            base_backoff: Duration::from_secs(self.auth_backoff_secs),
            max_backoff: Duration::from_secs(self.auth_max_backoff_secs),
            ..Default::default()
        }
    }

    pub fn handshake_limits(&self) -> crate::proxy::HandshakeLimits {
        crate::proxy::HandshakeLimits {
            per_source: self.handshakes_per_source,
            busy_from: self.handshakes_busy_from,
            total: self.handshakes_total,
        }
    }
}

/// The MQTT broker the control plane and agents use for device commands.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct MqttSettings {
    /// `mqtt://host:port` of the broker; empty: no MQTT.
    pub url: String,
    /// The broker as devices reach it (default: `url`).
    pub device_url: Option<String>,
    /// Topics live under `{topic_prefix}/devices/{device}/`.
    pub topic_prefix: String,
    /// The control plane's broker user. Its password, and each device's
    /// (whose broker user is its device id), derive from a secret kept in
    /// the data directory (`mqtt.key`).
    pub username: String,
    /// Where to write a mosquitto `passwd` and `acl` file for the control
    /// plane and every device (rewritten on enrollment and removal); empty:
    /// the operator provisions the broker (see the README).
    pub broker_files_dir: Option<PathBuf>,
    /// Lines appended verbatim to the generated passwd file (the operator's
    /// own broker users, e.g. made with `mosquitto_passwd`).
    pub extra_passwd_file: Option<PathBuf>,
    /// Lines appended verbatim to the generated ACL file.
    pub extra_acl_file: Option<PathBuf>,
    /// Run after the files change so the broker rereads them, e.g.
    /// `["systemctl", "reload", "mosquitto"]` or `["pkill", "-HUP", "-x", "mosquitto"]`.
    pub reload_command: Vec<String>,
    /// Commands without a result after this long are `expired`; agents do
    /// not run a command that reaches them later.
    pub command_ttl_secs: u64,
}

impl Default for MqttSettings {
    fn default() -> Self {
        Self {
            url: String::new(),
            device_url: None,
            topic_prefix: shared::mqtt::DEFAULT_PREFIX.to_string(),
            username: "cellgate-control-plane".to_string(),
            broker_files_dir: None,
            extra_passwd_file: None,
            extra_acl_file: None,
            reload_command: Vec::new(),
            command_ttl_secs: 600,
        }
    }
}

/// Port per exit: each exit gets its own listener port from `range`, kept
/// across restarts, that speaks HTTP proxy and SOCKS5 and always leaves
/// through that exit. Off unless `range` is set.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PortsSettings {
    /// `"4000-4999"`: the ports exits are given, lowest free first.
    pub range: Option<String>,
    /// Address the per-exit listeners bind.
    pub listen_ip: IpAddr,
}

impl Default for PortsSettings {
    fn default() -> Self {
        Self {
            range: None,
            listen_ip: IpAddr::from([0, 0, 0, 0]),
        }
    }
}

/// At most this many per-exit ports: each is a listening socket.
pub const MAX_EXIT_PORTS: u32 = 4096;

/// An inclusive range of TCP ports.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PortRange {
    pub lo: u16,
    pub hi: u16,
}

impl PortRange {
    pub fn contains(&self, port: u16) -> bool {
        (self.lo..=self.hi).contains(&port)
    }

    pub fn len(&self) -> u32 {
        u32::from(self.hi) - u32::from(self.lo) + 1
    }

    pub fn is_empty(&self) -> bool {
        false
    }
}

/// Parse `"LO-HI"` (or a single port): `1 <= LO <= HI`, at most
/// [`MAX_EXIT_PORTS`] ports.
pub fn parse_port_range(s: &str) -> Result<PortRange, String> {
    let s = s.trim();
    let (lo, hi) = s.split_once('-').unwrap_or((s, s));
    let num = |t: &str| {
        t.trim()
            .parse::<u16>()
            .map_err(|_| format!("{:?} is not a port number", t.trim()))
    };
    let (lo, hi) = (num(lo)?, num(hi)?);
    if lo == 0 {
        return Err("port 0 cannot be in the range".into());
    }
    if lo > hi {
        return Err(format!("the range {lo}-{hi} is backwards"));
    }
    let r = PortRange { lo, hi };
    if r.len() > MAX_EXIT_PORTS {
        return Err(format!(
            "the range {lo}-{hi} holds {} ports, at most {MAX_EXIT_PORTS} are allowed",
            r.len()
        ));
    }
    Ok(r)
}

impl PortsSettings {
    /// The parsed range; `None` when port per exit is off. Call after
    /// `validate()`, which rejects a bad range.
    pub fn range(&self) -> Option<PortRange> {
        self.range.as_deref().and_then(|s| parse_port_range(s).ok())
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error(transparent)]
    File(#[from] shared::config_file::ConfigFileError),
    #[error("invalid configuration: {0}")]
    Invalid(String),
}

impl Config {
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        Ok(shared::config_file::load_toml(path)?)
    }

    pub fn validate(&self) -> Result<(), ConfigError> {
        let bad = |m: &str| Err(ConfigError::Invalid(m.to_string()));
        if self.releases.update_timeout_secs == 0 || self.releases.rollout_deadline_secs == 0 {
            return bad("releases.update_timeout_secs and rollout_deadline_secs must be positive");
        }
        if let Some(url) = &self.database_url
            && crate::store::Backend::of_url(url).is_none()
        {
            return bad(&format!(
                "database_url {:?} must start with sqlite:// or postgres://",
                crate::store::redacted_url(url)
            ));
        }
        if let Some(n) = self.database_max_connections
            && !(1..=1000).contains(&n)
        {
            return bad("database_max_connections must be within 1..=1000");
        }
        if !(1..=300).contains(&self.handshake_timeout_secs) {
            return bad("handshake_timeout_secs must be within 1..=300");
        }
        if !(1..=300).contains(&self.connect_timeout_secs) {
            return bad("connect_timeout_secs must be within 1..=300");
        }
        if !(1..=3600).contains(&self.response_timeout_secs) {
            return bad("response_timeout_secs must be within 1..=3600");
        }
        if !(1..=3600).contains(&self.heartbeat_interval_secs) {
            return bad("heartbeat_interval_secs must be within 1..=3600");
        }
        if self.tunnel_keep_alive_secs == 0
            || self.tunnel_keep_alive_secs * 2 > self.tunnel_idle_timeout_secs
        {
            return bad(
                "tunnel_keep_alive_secs must be at least 1 and at most half of tunnel_idle_timeout_secs",
            );
        }
        let r = &self.rotation;
        if !(1..=10).contains(&r.attempts) {
            return bad("rotation.attempts must be within 1..=10");
        }
        if !(5..=900).contains(&r.attempt_timeout_secs) {
            return bad("rotation.attempt_timeout_secs must be within 5..=900");
        }
        if r.drain_grace_secs > 3600 || r.retry_delay_secs > 3600 {
            return bad("rotation.drain_grace_secs and retry_delay_secs must be at most 3600");
        }
        if r.recent_ips > 100 {
            return bad("rotation.recent_ips must be at most 100");
        }
        if r.default_every_secs < 10 {
            return bad("rotation.default_every_secs must be at least 10");
        }
        if r.recheck_failed_secs == 0 {
            return bad("rotation.recheck_failed_secs must be at least 1");
        }
        if let Some(u) = &r.ip_echo_url
            && !u.starts_with("http://")
        {
            return bad("rotation.ip_echo_url must be an http:// URL");
        }
        let f = &self.fleet;
        if f.telemetry_sample_secs == 0 || f.counters_flush_secs == 0 {
            return bad("fleet.telemetry_sample_secs and counters_flush_secs must be at least 1");
        }
        if f.telemetry_retention_hours == 0 {
            return bad("fleet.telemetry_retention_hours must be at least 1");
        }
        let s = &self.security;
        if s.auth_source_failures == 0 || s.auth_user_failures == 0 {
            return bad("security.auth_source_failures and auth_user_failures must be at least 1");
        }
        if !(1..=86_400).contains(&s.auth_backoff_secs)
            || s.auth_max_backoff_secs < s.auth_backoff_secs
            || s.auth_max_backoff_secs > 7 * 86_400
        {
            return bad(
                "security.auth_backoff_secs must be within 1..=86400 and auth_max_backoff_secs between it and 604800",
            );
        }
        if s.handshakes_per_source == 0
            || s.handshakes_total == 0
            || s.handshakes_busy_from > s.handshakes_total
            || s.handshakes_total > 1_000_000
        {
            return bad(
                "security.handshakes_per_source and handshakes_total must be at least 1, handshakes_busy_from at most handshakes_total (at most 1000000)",
            );
        }
        let m = &self.mqtt;
        if !m.url.is_empty() {
            for u in std::iter::once(&m.url).chain(&m.device_url) {
                if let Err(e) = shared::mqtt::parse_url(u) {
                    return bad(&format!("mqtt url {u:?}: {e}"));
                }
            }
            if !shared::mqtt::valid_device_id(&m.username) {
                return bad("mqtt.username may hold only letters, digits, '-', '_' and '.'");
            }
            if m.topic_prefix.is_empty()
                || m.topic_prefix
                    .chars()
                    .any(|c| matches!(c, '+' | '#' | '\0') || c.is_whitespace())
            {
                return bad("mqtt.topic_prefix must be non-empty, without wildcards or spaces");
            }
            if !(10..=7 * 24 * 3600).contains(&m.command_ttl_secs) {
                return bad("mqtt.command_ttl_secs must be within 10..=604800");
            }
        }
        if self.enroll_token_ttl_secs == 0 {
            return bad("enroll_token_ttl_secs must be at least 1");
        }
        let ports = [self.http_listen, self.socks_listen, self.api_listen];
        for (i, a) in ports.iter().enumerate() {
            if a.port() != 0
                && ports[i + 1..]
                    .iter()
                    .any(|b| b.port() == a.port() && b.ip() == a.ip())
            {
                return bad(&format!("two TCP listeners share the address {a}"));
            }
        }
        if let Some(text) = &self.ports.range {
            let r = parse_port_range(text)
                .map_err(|e| ConfigError::Invalid(format!("ports.range: {e}")))?;
            if let Some(a) = ports.iter().find(|a| r.contains(a.port())) {
                return bad(&format!(
                    "ports.range {}-{} overlaps the listener {a}",
                    r.lo, r.hi
                ));
            }
        }
        Ok(())
    }

    pub fn handshake_timeout(&self) -> Duration {
        Duration::from_secs(self.handshake_timeout_secs)
    }

    pub fn connect_timeout(&self) -> Duration {
        Duration::from_secs(self.connect_timeout_secs)
    }

    pub fn liveness(&self) -> shared::quic::transport::Liveness {
        shared::quic::transport::Liveness {
            keep_alive: Duration::from_secs(self.tunnel_keep_alive_secs),
            idle_timeout: Duration::from_secs(self.tunnel_idle_timeout_secs),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_validate_and_unknown_fields_fail() {
        Config::default().validate().unwrap();
        let c: Config =
            toml::from_str("http_listen = \"127.0.0.1:18080\"\nallow_private_targets = true")
                .unwrap();
        assert!(c.allow_private_targets);
        assert_eq!(c.socks_listen.port(), 1080);
        assert!(toml::from_str::<Config>("http_port = 1").is_err());
        assert_eq!(c.database_url, None);
        let pg: Config =
            toml::from_str("database_url = \"postgres://cg:pw@127.0.0.1:5432/cellgate\"").unwrap();
        pg.validate().unwrap();
        let err = Config {
            database_url: Some("mysql://cg:hunter2@db/cellgate".into()),
            ..Config::default()
        }
        .validate()
        .unwrap_err()
        .to_string();
        assert!(
            err.contains("database_url") && !err.contains("hunter2"),
            "{err}"
        );
        let zero = Config {
            database_max_connections: Some(0),
            ..Config::default()
        };
        assert!(zero.validate().is_err());
        let dup = Config {
            socks_listen: "0.0.0.0:8080".parse().unwrap(),
            ..Config::default()
        };
        assert!(dup.validate().is_err());
    }

    #[test]
    fn port_ranges_parse_and_validate() {
        assert_eq!(
            parse_port_range("4000-4999"),
            Ok(PortRange { lo: 4000, hi: 4999 })
        );
        assert_eq!(
            parse_port_range(" 5000 - 5000 "),
            Ok(PortRange { lo: 5000, hi: 5000 })
        );
        assert_eq!(parse_port_range("7000").map(|r| r.len()), Ok(1));
        assert_eq!(parse_port_range("1-4096").map(|r| r.len()), Ok(4096));
        for bad in [
            "",
            "4999-4000",
            "0-10",
            "1-4097",
            "a-b",
            "4000-70000",
            "1-2-3",
        ] {
            assert!(parse_port_range(bad).is_err(), "{bad:?} parsed");
        }
        let c: Config =
            toml::from_str("[ports]\nrange = \"4000-4999\"\nlisten_ip = \"127.0.0.1\"").unwrap();
        c.validate().unwrap();
        assert_eq!(c.ports.range(), Some(PortRange { lo: 4000, hi: 4999 }));
        assert_eq!(c.ports.listen_ip, IpAddr::from([127, 0, 0, 1]));
        assert_eq!(Config::default().ports.range(), None);
        // The HTTP proxy listens on 8080 by default.
        let overlap: Config = toml::from_str("[ports]\nrange = \"8000-8100\"").unwrap();
        assert!(overlap.validate().is_err());
        let backwards: Config = toml::from_str("[ports]\nrange = \"5000-4000\"").unwrap();
        assert!(backwards.validate().is_err());
        assert!(toml::from_str::<Config>("[ports]\nfirst = 4000").is_err());
    }

    #[test]
    fn security_settings_are_checked_and_mapped() {
        let c: Config = toml::from_str(
            "[security]\nauth_user_failures = 3\nauth_backoff_secs = 5\nhandshakes_per_source = 8",
        )
        .unwrap();
        c.validate().unwrap();
        let a = c.security.auth_limits();
        assert_eq!((a.user_threshold, a.source_threshold), (3, 20));
        assert_eq!(a.base_backoff, Duration::from_secs(5));
        assert_eq!(c.security.handshake_limits().per_source, 8);
        for bad in [
            "[security]\nauth_user_failures = 0",
            "[security]\nauth_backoff_secs = 0",
            "[security]\nauth_backoff_secs = 100\nauth_max_backoff_secs = 50",
            "[security]\nhandshakes_busy_from = 5000",
            "[security]\nhandshakes_total = 0",
        ] {
            let c: Config = toml::from_str(bad).unwrap();
            assert!(c.validate().is_err(), "{bad}");
        }
    }

    #[test]
    fn example_config_is_valid_and_matches_defaults() {
        let text = include_str!("../../deploy/control-plane.example.toml");
        let c: Config = toml::from_str(text).unwrap();
        c.validate().unwrap();
        let d = Config::default();
        assert_eq!(c.handshake_timeout_secs, d.handshake_timeout_secs);
        assert_eq!(c.heartbeat_interval_secs, d.heartbeat_interval_secs);
        assert_eq!(c.http_listen, d.http_listen);
        assert_eq!(c.quic_listen, d.quic_listen);
        assert_eq!(c.database_url, d.database_url);
    }
}
