//! Messages on the control stream and on the enrollment stream.

use serde::{Deserialize, Deserializer, Serialize};

use crate::policy::TargetPolicy;

/// Most entries accepted in any list inside a message. Bounds what a decode
/// allocates whatever length prefix a peer sends.
pub const MAX_LIST_ITEMS: usize = 64;

/// Everything that travels on the control stream, in both directions.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum ControlMsg {
    /// Agent → CP, first frame.
    Hello(Hello),
    /// CP → agent, answer to an accepted `Hello`.
    Welcome(Welcome),
    /// CP → agent, answer to a refused `Hello`; the connection closes next.
    Reject(Reject),
    /// Agent → CP, periodically.
    Heartbeat(Heartbeat),
    /// CP → agent.
    Command(Command),
    /// Agent → CP, exactly one per command id.
    CommandResult(CommandResult),
    /// Agent → CP, something happened on the device.
    Event(Event),
    /// CP → agent while customer flows are active: makes the agent's QUIC
    /// stack acknowledge something, so a silent agent is noticed in seconds
    /// instead of after the idle timeout. The agent ignores it.
    Probe,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum DeviceKind {
    Android,
    UsbModem,
    RaspberryPi,
    #[default]
    Linux,
}

/// What a device says about itself. Informational only: identity comes from
/// the device's certificate, never from these fields.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeviceFacts {
    pub kind: DeviceKind,
    pub hostname: String,
    pub model: String,
    pub os: String,
    pub operator: Option<String>,
    #[serde(deserialize_with = "bounded_vec")]
    pub interfaces: Vec<String>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Hello {
    pub min_version: u16,
    pub max_version: u16,
    pub agent_version: String,
    pub facts: DeviceFacts,
    /// The exits this agent serves (one per modem or uplink). Empty means
    /// one implicit exit, [`DEFAULT_EXIT`], using the host's routing.
    #[serde(deserialize_with = "bounded_vec")]
    pub exits: Vec<ExitInfo>,
}

/// Name of the exit of an agent that configures none.
pub const DEFAULT_EXIT: &str = "default";

/// Longest exit name; names are `[a-z0-9_-]`, 1..=32 bytes.
pub const MAX_EXIT_NAME: usize = 32;

/// Whether `name` is acceptable as an exit name.
pub fn valid_exit_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= MAX_EXIT_NAME
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_' || b == b'-')
}

/// One exit of an agent: an uplink customers' connections leave through.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExitInfo {
    pub name: String,
    /// The uplink interface egress sockets are bound to (`None`: the host's
    /// routing decides).
    pub interface: Option<String>,
    /// Rotation backend: `at`, `android`, `hilink`, `netlink`, `command`,
    /// or `none`.
    pub method: String,
    /// The backend's escalation ladder, softest step first
    /// (e.g. `pdp`, `radio`, `reset`). Empty when the exit cannot rotate.
    #[serde(deserialize_with = "bounded_vec")]
    pub ladder: Vec<String>,
}

/// Radio and device readings, each present only when the hardware reports it.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Telemetry {
    /// Received signal strength, dBm.
    pub rssi_dbm: Option<i16>,
    /// LTE/NR reference signal received power, dBm.
    pub rsrp_dbm: Option<i16>,
    /// Reference signal received quality, dB.
    pub rsrq_db: Option<f32>,
    /// Signal to interference-plus-noise ratio, dB.
    pub sinr_db: Option<f32>,
    /// Signal bars 0..=5 where that is all the device tells (HiLink).
    pub signal_bars: Option<u8>,
    /// Access technology: `GSM`, `WCDMA`, `LTE`, `NR5G`, …
    pub access_tech: Option<String>,
    /// Band as the modem names it, e.g. `LTE BAND 3`.
    pub band: Option<String>,
    pub operator: Option<String>,
    pub registration: Option<Registration>,
    pub cell_id: Option<String>,
    pub battery_pct: Option<u8>,
    pub charging: Option<bool>,
    /// Tenths of a degree Celsius.
    pub temperature_dc: Option<i16>,
}

/// Network registration state (3GPP `+CREG`/`+CEREG` `<stat>`). Named in
/// snake case in JSON (the wire format numbers variants).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Registration {
    NotRegistered,
    Home,
    Searching,
    Denied,
    Unknown,
    Roaming,
}

impl Registration {
    pub fn as_str(self) -> &'static str {
        match self {
            Registration::NotRegistered => "not_registered",
            Registration::Home => "home",
            Registration::Searching => "searching",
            Registration::Denied => "denied",
            Registration::Unknown => "unknown",
            Registration::Roaming => "roaming",
        }
    }
}

/// One exit's state in a heartbeat.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct ExitStatus {
    pub name: String,
    /// The uplink interface is up and has an address (always true for an
    /// exit without an interface).
    pub link_up: bool,
    pub telemetry: Telemetry,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Welcome {
    /// The negotiated protocol version.
    pub version: u16,
    pub device_id: String,
    pub device_name: String,
    pub heartbeat_interval_ms: u32,
    /// Extra constraints from the control plane, merged into the agent's own
    /// policy (they can only tighten it).
    ///
    /// Bounded like every list: unbounded, a 64 KiB frame of one-byte
    /// varints decodes into a 128 KiB vector.
    #[serde(deserialize_with = "bounded_vec")]
    pub protected_ports: Vec<u16>,
    /// The control plane's own addresses as this agent sees them (the
    /// address it dialed, the configured public address): refused on
    /// `protected_ports` so customers cannot loop back into the control
    /// plane through a device.
    #[serde(deserialize_with = "bounded_vec")]
    pub protected_ips: Vec<std::net::IpAddr>,
    /// Inclusive port ranges protected like `protected_ports` (the control
    /// plane's port-per-exit listeners).
    #[serde(deserialize_with = "bounded_vec")]
    pub protected_port_ranges: Vec<(u16, u16)>,
    /// Where the agent reads an exit's public address (plain-text IP-echo
    /// endpoint); the agent's own configuration may override it.
    pub ip_echo_url: String,
    /// The device's MQTT broker credentials when the control plane uses a
    /// broker; the agent keeps them so commands reach it over MQTT while the
    /// tunnel is down.
    pub mqtt: Option<MqttGrant>,
}

/// Where and how a device connects to the MQTT broker.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct MqttGrant {
    /// `mqtt://host:port`.
    pub url: String,
    pub username: String,
    pub password: String,
    pub topic_prefix: String,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum RejectCode {
    IncompatibleVersion,
    DeviceDisabled,
    UnknownDevice,
    ProtocolError,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Reject {
    pub code: RejectCode,
    pub message: String,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Heartbeat {
    pub seq: u64,
    pub active_flows: u32,
    /// One-minute load average × 100.
    pub load_centi: u32,
    pub uptime_s: u64,
    pub bytes_up: u64,
    pub bytes_down: u64,
    #[serde(deserialize_with = "bounded_vec")]
    pub exits: Vec<ExitStatus>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Command {
    /// Unique per command (see [`crate::mqtt::valid_command_id`]); an agent
    /// runs a given id at most once, whichever way it arrives.
    pub id: String,
    pub kind: CommandKind,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum CommandKind {
    Ping,
    /// Run step `rung` of the exit's ladder, wait for the uplink, then read
    /// the exit's public address. Answered with [`CommandDetail::Rotated`].
    Rotate {
        exit: String,
        rung: u8,
        limit_ms: u32,
    },
    /// Read the exit's public address. Answered with [`CommandDetail::Ip`].
    CheckIp {
        exit: String,
    },
    RestartAgent,
    Reboot,
    /// Download `bytes` from the IP echo's `/speedtest` through an exit.
    /// Answered with [`CommandDetail::SpeedTest`].
    SpeedTest {
        exit: Option<String>,
        bytes: u32,
    },
    UpdateConfig {
        toml: String,
    },
    /// Replace the agent's binary with release `version` for `target`,
    /// fetched over the tunnel ([`crate::wire::StreamMsg::FetchRelease`]).
    /// `signature` is the release key's ed25519 signature over the manifest
    /// these fields make ([`crate::release::Manifest::signed_bytes`]); the
    /// agent checks it with the key it received at enrollment.
    SelfUpdate {
        version: String,
        target: String,
        sha256: [u8; 32],
        size: u64,
        signature: Vec<u8>,
    },
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CommandResult {
    pub id: String,
    pub ok: bool,
    pub message: String,
    pub detail: Option<CommandDetail>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum CommandDetail {
    Rotated {
        exit: String,
        /// The ladder step that ran.
        rung: String,
        /// Time the backend's step took, milliseconds.
        backend_ms: u32,
        /// Time from the step's end until the public address was read.
        verify_ms: u32,
        /// The public address read after the step, if it could be read.
        ip: Option<String>,
    },
    Ip {
        exit: String,
        ip: String,
    },
    SpeedTest {
        exit: String,
        bytes: u64,
        millis: u32,
        first_byte_ms: u32,
    },
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Event {
    LinkUp {
        interface: String,
    },
    LinkDown {
        interface: String,
    },
    /// `added` false: the address went away.
    AddressChanged {
        interface: String,
        address: String,
        added: bool,
    },
    Log {
        level: u8,
        message: String,
    },
    /// A self-update did not take: the new binary never reached the control
    /// plane (or kept crashing), so the agent restored its previous binary,
    /// which now runs `from_version` again.
    UpdateRolledBack {
        from_version: String,
        to_version: String,
        reason: String,
    },
}

/// Messages on an enrollment connection (no client certificate yet).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum EnrollMsg {
    /// Agent → CP: the token's secret and the public half of a key the agent
    /// generated; the private key never leaves the device.
    Request {
        min_version: u16,
        max_version: u16,
        secret: String,
        /// Raw public key (uncompressed P-256 point).
        public_key: Vec<u8>,
        facts: DeviceFacts,
    },
    /// CP → agent: the device's identity and credential.
    Granted {
        device_id: String,
        device_name: String,
        /// DER certificate for the agent's key, signed by the CA.
        certificate: Vec<u8>,
        /// DER certificate of the CA the agent must trust from now on.
        ca_certificate: Vec<u8>,
        /// The control plane's ed25519 release key (32 bytes): the agent
        /// accepts only self-updates signed by it.
        release_key: Vec<u8>,
    },
    Refused {
        message: String,
    },
}

/// Policy the agent uses by default for a given control-plane switch.
pub fn policy_for(welcome: &Welcome, allow_private_targets: bool) -> TargetPolicy {
    TargetPolicy {
        allow_private_targets,
        protected_ports: welcome.protected_ports.clone(),
        protected_port_ranges: welcome.protected_port_ranges.clone(),
        protected_ips: welcome.protected_ips.clone(),
    }
}

fn bounded_vec<'de, D, T>(d: D) -> Result<Vec<T>, D::Error>
where
    D: Deserializer<'de>,
    T: Deserialize<'de>,
{
    struct V<T>(std::marker::PhantomData<T>);
    impl<'de, T: Deserialize<'de>> serde::de::Visitor<'de> for V<T> {
        type Value = Vec<T>;
        fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            write!(f, "a list of at most {MAX_LIST_ITEMS} items")
        }
        fn visit_seq<A: serde::de::SeqAccess<'de>>(self, mut seq: A) -> Result<Vec<T>, A::Error> {
            if seq.size_hint().unwrap_or(0) > MAX_LIST_ITEMS {
                return Err(serde::de::Error::custom("list too long"));
            }
            let mut v = Vec::new();
            while let Some(x) = seq.next_element()? {
                if v.len() == MAX_LIST_ITEMS {
                    return Err(serde::de::Error::custom("list too long"));
                }
                v.push(x);
            }
            Ok(v)
        }
    }
    d.deserialize_seq(V(std::marker::PhantomData))
}
