//! MQTT topics and JSON payloads for device commands.
//!
//! Topics, under a prefix (default `cellgate`):
//! - `{prefix}/devices/{device}/cmd`: commands in (QoS 1, not retained);
//! - `{prefix}/devices/{device}/result`: one result per command id out;
//! - `{prefix}/devices/{device}/state`: the device's state out (retained;
//!   the broker publishes `{"online":false}` there when the agent vanishes);
//! - `{prefix}/devices/{device}/desired`: desired configuration in (retained).
//!
//! Payloads are small JSON objects so that `mosquitto_pub`/`mosquitto_sub`
//! work by hand:
//!
//! ```text
//! {"id":"op-1","command":"rotate","exit":"wwan0","method":"pdp"}
//! {"id":"op-2","command":"ping"}
//! {"id":"op-3","command":"speed_test","bytes":5000000}
//! {"id":"op-4","command":"update_config","toml":"telemetry_secs = 60\n"}
//! {"id":"op-5","command":"restart_agent"}
//! {"id":"op-6","command":"reboot"}
//! {"id":"op-7","command":"self_update","version":"0.2.0"}
//! ```
//!
//! Every command may carry `"expires_at"` (Unix seconds): an agent that
//! receives it later does not run it and answers `expired`.
//!
//! Everything here is pure: bytes in, values or errors out.

use serde::{Deserialize, Serialize};

use crate::wire::{CommandDetail, CommandResult};

/// Default topic prefix.
pub const DEFAULT_PREFIX: &str = "cellgate";
/// Largest command payload accepted (a configuration update is the biggest).
pub const MAX_PAYLOAD: usize = 64 * 1024;
/// Longest command id; ids are printable ASCII without spaces.
pub const MAX_COMMAND_ID: usize = 64;

/// The four per-device topics.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Topics {
    pub cmd: String,
    pub result: String,
    pub state: String,
    pub desired: String,
}

impl Topics {
    pub fn new(prefix: &str, device: &str) -> Self {
        let base = format!("{prefix}/devices/{device}");
        Self {
            cmd: format!("{base}/cmd"),
            result: format!("{base}/result"),
            state: format!("{base}/state"),
            desired: format!("{base}/desired"),
        }
    }
}

/// Which device and which of its topics a topic name is, for subscribers
/// of `{prefix}/devices/+/…`.
pub fn parse_topic<'a>(prefix: &str, topic: &'a str) -> Option<(&'a str, &'a str)> {
    let rest = topic.strip_prefix(prefix)?.strip_prefix("/devices/")?;
    let (device, leaf) = rest.split_once('/')?;
    (!device.is_empty() && !leaf.contains('/')).then_some((device, leaf))
}

/// Host and port of an `mqtt://host[:port]` URL (port 1883 by default).
pub fn parse_url(url: &str) -> Result<(String, u16), String> {
    let rest = url
        .strip_prefix("mqtt://")
        .or_else(|| url.strip_prefix("tcp://"))
        .ok_or("must start with mqtt:// (TLS brokers are not supported yet)")?;
    let rest = rest.trim_end_matches('/');
    if rest.is_empty() || rest.contains(['/', '@', '?', '#', ' ']) {
        return Err("must be mqtt://host or mqtt://host:port".into());
    }
    let (host, port) = match rest.rsplit_once(':') {
        Some((h, _)) if !h.ends_with(']') && h.contains(':') => (rest, None),
        Some((h, p)) => (h, Some(p)),
        None => (rest, None),
    };
    let port = match port {
        Some(p) => p
            .parse::<u16>()
            .ok()
            .filter(|p| *p != 0)
            .ok_or("bad port")?,
        None => 1883,
    };
    let host = host.trim_start_matches('[').trim_end_matches(']');
    if host.is_empty() {
        return Err("missing host".into());
    }
    Ok((host.to_string(), port))
}

/// Whether `s` can name a device in a topic and as a broker user: no MQTT
/// wildcards, separators, spaces or control characters.
pub fn valid_device_id(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 64
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_' || b == b'.')
}

/// Whether `s` is acceptable as a command id.
pub fn valid_command_id(s: &str) -> bool {
    !s.is_empty() && s.len() <= MAX_COMMAND_ID && s.bytes().all(|b| b.is_ascii_graphic())
}

/// A command as operators and the control plane publish it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CommandMsg {
    pub id: String,
    #[serde(flatten)]
    pub action: Action,
    /// Unix seconds after which the command must not run.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expires_at: Option<i64>,
}

/// What a command asks for.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "command", rename_all = "snake_case")]
pub enum Action {
    Ping,
    /// Rotate an exit's IP. `exit` may be left out on a one-exit device;
    /// `method` names a step of the exit's ladder (default: the first).
    Rotate {
        #[serde(default, skip_serializing_if = "Option::is_none")]
        exit: Option<String>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        method: Option<String>,
    },
    /// Reboot the device (the agent's configured reboot command).
    Reboot,
    /// Restart the agent process.
    RestartAgent,
    /// Replace the agent's configuration file, then restart the agent.
    UpdateConfig {
        toml: String,
    },
    /// Download `bytes` through an exit and report the throughput.
    SpeedTest {
        #[serde(default, skip_serializing_if = "Option::is_none")]
        exit: Option<String>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        bytes: Option<u32>,
    },
    /// Update the agent to a published, signed release.
    SelfUpdate {
        version: String,
    },
}

impl Action {
    /// The command's name as it appears in payloads and the API.
    pub fn name(&self) -> &'static str {
        match self {
            Action::Ping => "ping",
            Action::Rotate { .. } => "rotate",
            Action::Reboot => "reboot",
            Action::RestartAgent => "restart_agent",
            Action::UpdateConfig { .. } => "update_config",
            Action::SpeedTest { .. } => "speed_test",
            Action::SelfUpdate { .. } => "self_update",
        }
    }
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum PayloadError {
    #[error("payload of {0} bytes is over the {MAX_PAYLOAD}-byte limit")]
    TooLarge(usize),
    #[error("not a valid command: {0}")]
    Invalid(String),
    #[error("command id must be 1 to {MAX_COMMAND_ID} printable characters without spaces")]
    BadId,
}

/// Decode a command payload.
pub fn decode_command(payload: &[u8]) -> Result<CommandMsg, PayloadError> {
    if payload.len() > MAX_PAYLOAD {
        return Err(PayloadError::TooLarge(payload.len()));
    }
    let invalid = |m: String| PayloadError::Invalid(m);
    let obj: serde_json::Map<String, serde_json::Value> =
        serde_json::from_slice(payload).map_err(|e| invalid(e.to_string()))?;
    // Unknown fields are errors, not silently ignored: a typo in a hand
    // written command must not run something else than meant.
    let fields: &[&str] = match obj.get("command").and_then(|c| c.as_str()) {
        Some("rotate") => &["exit", "method"],
        Some("update_config") => &["toml"],
        Some("speed_test") => &["exit", "bytes"],
        Some("self_update") => &["version"],
        _ => &[],
    };
    if let Some(k) = obj.keys().find(|k| {
        !["id", "command", "expires_at"].contains(&k.as_str()) && !fields.contains(&k.as_str())
    }) {
        return Err(invalid(format!("unknown field `{k}`")));
    }
    let msg: CommandMsg = serde_json::from_value(serde_json::Value::Object(obj))
        .map_err(|e| invalid(e.to_string()))?;
    if !valid_command_id(&msg.id) {
        return Err(PayloadError::BadId);
    }
    Ok(msg)
}

/// Best effort: the id of a payload that did not decode, so the error
/// result can name it.
pub fn salvage_id(payload: &[u8]) -> Option<String> {
    #[derive(Deserialize)]
    struct OnlyId {
        id: String,
    }
    if payload.len() > MAX_PAYLOAD {
        return None;
    }
    let v: OnlyId = serde_json::from_slice(payload).ok()?;
    valid_command_id(&v.id).then_some(v.id)
}

/// A command's result as published on `result`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ResultMsg {
    pub id: String,
    /// `succeeded`, `failed` or `expired`.
    pub status: String,
    pub message: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub detail: Option<serde_json::Value>,
    /// Unix seconds.
    pub finished_at: i64,
}

impl ResultMsg {
    pub fn from_result(r: &CommandResult, finished_at: i64) -> Self {
        Self {
            id: r.id.clone(),
            status: if r.ok { "succeeded" } else { "failed" }.into(),
            message: r.message.clone(),
            detail: r.detail.as_ref().map(detail_json),
            finished_at,
        }
    }
}

/// Decode a result payload (the control plane's side).
pub fn decode_result(payload: &[u8]) -> Result<ResultMsg, PayloadError> {
    if payload.len() > MAX_PAYLOAD {
        return Err(PayloadError::TooLarge(payload.len()));
    }
    let msg: ResultMsg =
        serde_json::from_slice(payload).map_err(|e| PayloadError::Invalid(e.to_string()))?;
    if !valid_command_id(&msg.id) {
        return Err(PayloadError::BadId);
    }
    Ok(msg)
}

/// A command result's detail as JSON, the same shape in the API and on MQTT.
pub fn detail_json(d: &CommandDetail) -> serde_json::Value {
    match d {
        CommandDetail::Rotated {
            exit,
            rung,
            backend_ms,
            verify_ms,
            ip,
        } => serde_json::json!({
            "kind": "rotated", "exit": exit, "method": rung,
            "backend_ms": backend_ms, "verify_ms": verify_ms, "ip": ip,
        }),
        CommandDetail::Ip { exit, ip } => {
            serde_json::json!({"kind": "ip", "exit": exit, "ip": ip})
        }
        CommandDetail::SpeedTest {
            exit,
            bytes,
            millis,
            first_byte_ms,
        } => serde_json::json!({
            "kind": "speed_test", "exit": exit, "bytes": bytes, "millis": millis,
            "first_byte_ms": first_byte_ms,
            "mbit_per_s": if *millis == 0 { 0.0 } else { *bytes as f64 * 8.0 / 1000.0 / f64::from(*millis) },
        }),
    }
}

/// The device state published (retained) on `state`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct StateMsg {
    pub online: bool,
    #[serde(default)]
    pub version: String,
    /// Whether the QUIC tunnel to the control plane is up.
    #[serde(default)]
    pub tunnel: bool,
    #[serde(default)]
    pub exits: Vec<ExitState>,
    /// Unix seconds.
    #[serde(default)]
    pub updated_at: i64,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ExitState {
    pub name: String,
    pub link_up: bool,
}

/// The will the broker publishes when an agent vanishes.
pub fn offline_state() -> Vec<u8> {
    br#"{"online":false}"#.to_vec()
}

/// Encode the password file line mosquitto reads (`user:$7$iterations$salt$hash`,
/// PBKDF2-HMAC-SHA512), from an already computed hash.
pub fn mosquitto_passwd_line(user: &str, iterations: u32, salt: &[u8], hash: &[u8]) -> String {
    use base64::Engine;
    let b64 = base64::engine::general_purpose::STANDARD;
    format!(
        "{user}:$7${iterations}${}${}",
        b64.encode(salt),
        b64.encode(hash)
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hand_written_commands_decode() {
        let c =
            decode_command(br#"{"id":"op-1","command":"rotate","exit":"wwan0","method":"pdp"}"#)
                .unwrap();
        assert_eq!(c.id, "op-1");
        assert_eq!(
            c.action,
            Action::Rotate {
                exit: Some("wwan0".into()),
                method: Some("pdp".into())
            }
        );
        let c = decode_command(br#"{"id":"p","command":"ping","expires_at":5}"#).unwrap();
        assert_eq!((c.action, c.expires_at), (Action::Ping, Some(5)));
        let c = decode_command(br#"{"command":"update_config","toml":"a = 1","id":"u"}"#).unwrap();
        assert_eq!(c.action.name(), "update_config");
    }

    #[test]
    fn bad_commands_are_errors() {
        for bad in [
            &br#"{"id":"x","command":"format_disk"}"#[..],
            br#"{"id":"x","command":"ping","extra":1}"#,
            br#"{"command":"ping"}"#,
            br#"{"id":"","command":"ping"}"#,
            br#"{"id":"a b","command":"ping"}"#,
            br#"{"id":"x","command":"rotate","exit":5}"#,
            b"not json",
            b"",
        ] {
            assert!(
                decode_command(bad).is_err(),
                "{}",
                String::from_utf8_lossy(bad)
            );
        }
        let big = vec![b' '; MAX_PAYLOAD + 1];
        assert_eq!(
            decode_command(&big),
            Err(PayloadError::TooLarge(MAX_PAYLOAD + 1))
        );
        assert_eq!(
            salvage_id(br#"{"id":"k","command":"nope"}"#),
            Some("k".into())
        );
    }

    #[test]
    fn commands_round_trip() {
        for action in [
            Action::Ping,
            Action::Rotate {
                exit: None,
                method: None,
            },
            Action::SpeedTest {
                exit: Some("a".into()),
                bytes: Some(10),
            },
            Action::SelfUpdate {
                version: "1.2.3".into(),
            },
        ] {
            let c = CommandMsg {
                id: "i".into(),
                action,
                expires_at: None,
            };
            let bytes = serde_json::to_vec(&c).unwrap();
            assert_eq!(decode_command(&bytes).unwrap(), c);
        }
    }

    #[test]
    fn urls_parse() {
        assert_eq!(
            parse_url("mqtt://127.0.0.1:1884"),
            Ok(("127.0.0.1".into(), 1884))
        );
        assert_eq!(parse_url("mqtt://broker"), Ok(("broker".into(), 1883)));
        assert_eq!(parse_url("mqtt://[::1]:9"), Ok(("::1".into(), 9)));
        for bad in [
            "http://x",
            "mqtt://",
            "mqtt://h:0",
            "mqtt://h:x",
            "mqtt://u@h",
            "mqtts://h",
        ] {
            assert!(parse_url(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn topics_parse_back() {
        let t = Topics::new("cellgate", "dev-1");
        assert_eq!(t.cmd, "cellgate/devices/dev-1/cmd");
        assert_eq!(
            parse_topic("cellgate", &t.result),
            Some(("dev-1", "result"))
        );
        assert_eq!(parse_topic("cellgate", "cellgate/devices//result"), None);
        assert_eq!(parse_topic("cellgate", "other/devices/a/result"), None);
        assert_eq!(parse_topic("cellgate", "cellgate/devices/a/b/c"), None);
        assert!(valid_device_id("dev-0a1b"));
        for bad in ["", "+", "#", "a/b", "a b", "é"] {
            assert!(!valid_device_id(bad), "{bad}");
        }
    }
}
