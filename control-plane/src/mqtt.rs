//! The control plane's MQTT side: one client to the broker, per-device
//! broker credentials and ACLs, and command results coming back.
//!
//! Broker identities: the control plane is `[mqtt] username`, each device
//! is its device id. Passwords are derived (HMAC-SHA256) from a secret in
//! the data directory (`mqtt.key`), so none is stored: the control plane
//! can hand a device its password in every session's `Welcome`, and the
//! broker files hold only PBKDF2 hashes. Nodes sharing a database must
//! share `mqtt.key`.

use std::collections::HashMap;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use hmac::{Hmac, Mac};
use rumqttc::{AsyncClient, Event, EventLoop, MqttOptions, Packet, QoS};
use sha2::{Sha256, Sha512};
use shared::mqtt::{CommandMsg, Topics};
use shared::wire::MqttGrant;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use crate::config::MqttSettings;
use crate::state::State;
use crate::store::{CommandRow, StoreError, now_ms};

/// The secret broker passwords derive from.
pub const KEY_FILE: &str = "mqtt.key";
/// PBKDF2 rounds in the generated password file. The passwords are 128
/// random bits, so the hash only has to be one-way, not slow.
const PBKDF2_ROUNDS: u32 = 1000;
/// Reconnect backoff cap: the broker is usually back within seconds.
const MAX_BACKOFF: Duration = Duration::from_secs(5);

pub struct Mqtt {
    pub settings: MqttSettings,
    secret: [u8; 32],
    client: AsyncClient,
    eventloop: Mutex<Option<EventLoop>>,
    connected: AtomicBool,
    last_error: Mutex<String>,
    /// The latest `state` each device published.
    states: Mutex<HashMap<String, serde_json::Value>>,
    files_lock: tokio::sync::Mutex<()>,
}

impl Mqtt {
    /// A client for `settings` (not yet connected: see [`run`]); `None`
    /// without a broker URL.
    pub fn new(settings: &MqttSettings, data_dir: &Path) -> anyhow::Result<Option<Arc<Self>>> {
        if settings.url.is_empty() {
            return Ok(None);
        }
        let secret = load_or_create_key(&data_dir.join(KEY_FILE))?;
        let (host, port) = shared::mqtt::parse_url(&settings.url).map_err(anyhow::Error::msg)?;
        // A stable client id per node, so the broker keeps the session (and
        // queued results) across reconnects.
        let node = hex::encode(&hmac(&secret, &format!("node:{}", data_dir.display()))[..4]);
        let mut opts = MqttOptions::new(format!("{}-{node}", settings.username), host, port);
        let password = hmac_password(&secret, &settings.username);
        opts.set_credentials(settings.username.clone(), password)
            .set_keep_alive(Duration::from_secs(15))
            .set_clean_session(false)
            .set_max_packet_size(
                shared::mqtt::MAX_PAYLOAD + 1024,
                shared::mqtt::MAX_PAYLOAD + 1024,
            );
        let (client, eventloop) = AsyncClient::new(opts, 64);
        Ok(Some(Arc::new(Self {
            settings: settings.clone(),
            secret,
            client,
            eventloop: Mutex::new(Some(eventloop)),
            connected: AtomicBool::new(false),
            last_error: Mutex::new("not connected yet".into()),
            states: Mutex::new(HashMap::new()),
            files_lock: tokio::sync::Mutex::new(()),
        })))
    }

    /// What a device needs to reach the broker.
    pub fn grant(&self, device_id: &str) -> MqttGrant {
        MqttGrant {
            url: self
                .settings
                .device_url
                .clone()
                .unwrap_or_else(|| self.settings.url.clone()),
            username: device_id.to_string(),
            password: hmac_password(&self.secret, device_id),
            topic_prefix: self.settings.topic_prefix.clone(),
        }
    }

    pub fn is_connected(&self) -> bool {
        self.connected.load(Ordering::Relaxed)
    }

    pub fn status(&self) -> serde_json::Value {
        let states = self.states.lock().map(|s| s.clone()).unwrap_or_default();
        serde_json::json!({
            "configured": true,
            "url": self.settings.url,
            "connected": self.is_connected(),
            "last_error": if self.is_connected() { None } else {
                self.last_error.lock().ok().map(|e| e.clone())
            },
            "device_states": states,
        })
    }

    /// Publish a command to a device (QoS 1). Fails at once when the broker
    /// is unreachable, so the caller can report it instead of queueing
    /// blindly.
    pub async fn publish_command(&self, device_id: &str, msg: &CommandMsg) -> Result<(), String> {
        if !self.is_connected() {
            let why = self
                .last_error
                .lock()
                .map(|e| e.clone())
                .unwrap_or_default();
            return Err(format!("the MQTT broker is unreachable ({why})"));
        }
        let topic = Topics::new(&self.settings.topic_prefix, device_id).cmd;
        let payload = serde_json::to_vec(msg).map_err(|e| e.to_string())?;
        self.client
            .try_publish(topic, QoS::AtLeastOnce, false, payload)
            .map_err(|e| format!("publishing to the MQTT broker failed: {e}"))
    }

    /// Rewrite the broker's password and ACL files (when configured) for
    /// the control plane and every device, then run the reload command.
    pub async fn write_broker_files(&self, state: &State) -> anyhow::Result<()> {
        let Some(dir) = &self.settings.broker_files_dir else {
            return Ok(());
        };
        let _guard = self.files_lock.lock().await;
        let devices = state.store.devices().await?;
        let mut users = vec![self.settings.username.clone()];
        users.extend(
            devices
                .iter()
                .filter(|d| shared::mqtt::valid_device_id(&d.id))
                .map(|d| d.id.clone()),
        );
        let mut passwd =
            String::from("# Generated by the cellgate control plane; edits are lost.\n");
        for u in &users {
            passwd.push_str(&passwd_line(u, &hmac_password(&self.secret, u)));
            passwd.push('\n');
        }
        if let Some(extra) = &self.settings.extra_passwd_file {
            passwd.push_str(&read_extra(extra)?);
        }
        let mut acl = acl_text(&self.settings.username, &self.settings.topic_prefix);
        if let Some(extra) = &self.settings.extra_acl_file {
            acl.push_str(&read_extra(extra)?);
        }
        std::fs::create_dir_all(dir)?;
        // Owner and group only: a broker running as another user reads the
        // files through the group.
        shared::files::write_atomic(&dir.join("passwd"), passwd.as_bytes(), 0o640)?;
        shared::files::write_atomic(&dir.join("acl"), acl.as_bytes(), 0o640)?;
        info!(users = users.len(), dir = %dir.display(), "broker password and ACL files written");
        if let Some((prog, args)) = self.settings.reload_command.split_first() {
            let out = tokio::time::timeout(
                Duration::from_secs(10),
                tokio::process::Command::new(prog)
                    .args(args)
                    .kill_on_drop(true)
                    .output(),
            )
            .await;
            match out {
                Ok(Ok(o)) if o.status.success() => debug!("broker reloaded"),
                Ok(Ok(o)) => warn!(
                    status = %o.status,
                    stderr = %String::from_utf8_lossy(&o.stderr).trim(),
                    "the broker reload command failed"
                ),
                Ok(Err(e)) => warn!("running the broker reload command failed: {e}"),
                Err(_) => warn!("the broker reload command took over 10 s"),
            }
        }
        Ok(())
    }

    fn set_state(&self, device: &str, payload: &[u8]) {
        let v = match serde_json::from_slice::<serde_json::Value>(payload) {
            Ok(v) if v.is_object() => v,
            _ => return,
        };
        if let Ok(mut s) = self.states.lock()
            && (s.len() < 100_000 || s.contains_key(device))
        {
            s.insert(device.to_string(), v);
        }
    }
}

/// Rewrite the broker files (after an enrollment or a device removal).
pub async fn refresh_broker_files(state: &State) {
    if let Some(m) = &state.mqtt
        && let Err(e) = m.write_broker_files(state).await
    {
        warn!("writing the broker files failed: {e:#}");
    }
}

/// Drive the MQTT client until shutdown: reconnect with backoff, subscribe
/// on every connection, and record what devices publish.
pub async fn run(state: Arc<State>, shutdown: CancellationToken) {
    let Some(m) = state.mqtt.clone() else { return };
    if let Err(e) = m.write_broker_files(&state).await {
        warn!("writing the broker files failed: {e:#}");
    }
    let Some(mut eventloop) = m.eventloop.lock().ok().and_then(|mut e| e.take()) else {
        return;
    };
    let prefix = m.settings.topic_prefix.clone();
    let mut delay = Duration::from_millis(250);
    loop {
        let ev = tokio::select! {
            _ = shutdown.cancelled() => break,
            ev = eventloop.poll() => ev,
        };
        match ev {
            Ok(Event::Incoming(Packet::ConnAck(_))) => {
                delay = Duration::from_millis(250);
                for leaf in ["result", "state", "cmd"] {
                    let _ = m
                        .client
                        .try_subscribe(format!("{prefix}/devices/+/{leaf}"), QoS::AtLeastOnce);
                }
                m.connected.store(true, Ordering::Relaxed);
                info!(url = %m.settings.url, "connected to the MQTT broker");
            }
            Ok(Event::Incoming(Packet::Publish(p))) => {
                let Some((device, leaf)) = shared::mqtt::parse_topic(&prefix, &p.topic) else {
                    continue;
                };
                let (device, leaf) = (device.to_string(), leaf.to_string());
                match leaf.as_str() {
                    "state" => m.set_state(&device, &p.payload),
                    "result" | "cmd" => {
                        let st = state.clone();
                        state.tasks.spawn(async move {
                            let r = if leaf == "result" {
                                on_result(&st, &device, &p.payload).await
                            } else {
                                on_command_seen(&st, &device, &p.payload).await
                            };
                            if let Err(e) = r {
                                warn!(%device, "recording an MQTT {leaf} failed: {e}");
                            }
                        });
                    }
                    _ => {}
                }
            }
            Ok(_) => {}
            Err(e) => {
                if m.connected.swap(false, Ordering::Relaxed) {
                    warn!("lost the MQTT broker: {e}; reconnecting");
                } else {
                    debug!("MQTT broker unreachable: {e}");
                }
                if let Ok(mut le) = m.last_error.lock() {
                    *le = e.to_string();
                }
                tokio::select! {
                    _ = shutdown.cancelled() => break,
                    _ = tokio::time::sleep(delay) => {}
                }
                delay = (delay * 2).min(MAX_BACKOFF);
            }
        }
    }
    let _ = m.client.try_disconnect();
}

/// A device published a result: record it on its command.
async fn on_result(state: &State, device: &str, payload: &[u8]) -> Result<(), StoreError> {
    let r = match shared::mqtt::decode_result(payload) {
        Ok(r) => r,
        Err(e) => {
            debug!(%device, "ignoring a malformed result: {e}");
            return Ok(());
        }
    };
    let Some(row) = state.store.command(&r.id).await? else {
        debug!(%device, id = %r.id, "result for a command this control plane never saw");
        return Ok(());
    };
    if row.device_id != device {
        warn!(%device, id = %r.id, "a device published a result for another device's command");
        return Ok(());
    }
    let status = match r.status.as_str() {
        "succeeded" | "failed" | "expired" => r.status.as_str(),
        _ => "failed",
    };
    state
        .store
        .command_finished(&r.id, status, &r.message, r.detail.as_ref())
        .await?;
    Ok(())
}

/// Someone (an operator's tool, or this control plane) published a
/// command: track it, so that hand-published commands show in the API too.
async fn on_command_seen(state: &State, device: &str, payload: &[u8]) -> Result<(), StoreError> {
    let Ok(msg) = shared::mqtt::decode_command(payload) else {
        return Ok(());
    };
    if state.store.device(device).await?.is_none() {
        return Ok(());
    }
    let now = now_ms();
    let ttl = state.cfg.mqtt.command_ttl_secs as i64 * 1000;
    let row = CommandRow {
        id: msg.id.clone(),
        device_id: device.to_string(),
        command: msg.action.name().to_string(),
        payload: serde_json::to_value(&msg).unwrap_or_default(),
        status: "delivered".into(),
        channel: Some("mqtt".into()),
        message: String::new(),
        detail: None,
        created_at: now,
        expires_at: msg.expires_at.map(|s| s * 1000).unwrap_or(now + ttl),
        delivered_at: Some(now),
        finished_at: None,
    };
    match state.store.insert_command(&row).await {
        Ok(()) | Err(StoreError::Conflict(_)) => Ok(()),
        Err(e) => Err(e),
    }
}

type HmacSha256 = Hmac<Sha256>;

fn hmac(secret: &[u8; 32], data: &str) -> Vec<u8> {
    let mut mac = HmacSha256::new_from_slice(secret).expect("HMAC takes any key length");
    mac.update(data.as_bytes());
    mac.finalize().into_bytes().to_vec()
}

/// A broker user's password: 128 bits derived from the secret.
pub fn hmac_password(secret: &[u8; 32], user: &str) -> String {
    hex::encode(&hmac(secret, &format!("mqtt-user:{user}"))[..16])
}

/// A mosquitto password-file line for `user` (PBKDF2-HMAC-SHA512, `$7$`).
pub fn passwd_line(user: &str, password: &str) -> String {
    let salt: [u8; 12] = rand::random();
    let mut hash = [0u8; 64];
    pbkdf2::pbkdf2_hmac::<Sha512>(password.as_bytes(), &salt, PBKDF2_ROUNDS, &mut hash);
    shared::mqtt::mosquitto_passwd_line(user, PBKDF2_ROUNDS, &salt, &hash)
}

/// The ACL: the control plane may use every device topic; a device may
/// read only its own `cmd` and `desired` and write only its own `result`
/// and `state` (mosquitto's `%u` is the connecting user, the device id).
pub fn acl_text(cp_user: &str, prefix: &str) -> String {
    format!(
        "# Generated by the cellgate control plane; edits are lost.\n\
         user {cp_user}\n\
         topic readwrite {prefix}/#\n\
         \n\
         pattern read {prefix}/devices/%u/cmd\n\
         pattern read {prefix}/devices/%u/desired\n\
         pattern write {prefix}/devices/%u/result\n\
         pattern write {prefix}/devices/%u/state\n"
    )
}

fn read_extra(path: &Path) -> anyhow::Result<String> {
    let mut s = std::fs::read_to_string(path)
        .map_err(|e| anyhow::anyhow!("reading {}: {e}", path.display()))?;
    if !s.ends_with('\n') {
        s.push('\n');
    }
    Ok(format!("\n# From {}\n{s}", path.display()))
}

fn load_or_create_key(path: &Path) -> anyhow::Result<[u8; 32]> {
    shared::files::load_or_create_secret(path)
        .map(|(k, _)| k)
        .map_err(|e| anyhow::anyhow!("the MQTT key {}: {e}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn passwords_are_stable_and_distinct() {
        let k = [7u8; 32];
        assert_eq!(hmac_password(&k, "dev-1"), hmac_password(&k, "dev-1"));
        assert_ne!(hmac_password(&k, "dev-1"), hmac_password(&k, "dev-2"));
        assert_ne!(
            hmac_password(&k, "dev-1"),
            hmac_password(&[8u8; 32], "dev-1")
        );
        assert_eq!(hmac_password(&k, "dev-1").len(), 32);
    }

    #[test]
    fn passwd_line_has_mosquitto_shape() {
        let line = passwd_line("dev-1", "pw");
        let parts: Vec<&str> = line.split('$').collect();
        assert_eq!(parts[0], "dev-1:");
        assert_eq!(parts[1], "7");
        assert_eq!(parts[2], PBKDF2_ROUNDS.to_string());
        assert_eq!(parts.len(), 5);
    }

    #[test]
    fn acl_confines_devices_to_their_topics() {
        let acl = acl_text("cp", "cellgate");
        assert!(acl.contains("pattern read cellgate/devices/%u/cmd\n"));
        assert!(acl.contains("pattern write cellgate/devices/%u/state\n"));
        assert!(!acl.contains("pattern readwrite"));
    }
}
