//! The agent's MQTT side: commands in on `cmd` (and a desired
//! configuration on `desired`), results out on `result`, the device's state
//! (retained) on `state`. Works while the tunnel is down; the broker
//! credentials come from the control plane's `Welcome` and are kept in the
//! state directory (`mqtt.json`).

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use rumqttc::{AsyncClient, Event, LastWill, MqttOptions, Packet, QoS};
use serde::Deserialize;
use shared::mqtt::{ExitState, ResultMsg, StateMsg, Topics};
use shared::wire::{Command, CommandResult, MqttGrant};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use crate::commands::{Claim, Executor};

/// Where the broker credentials are kept.
pub const GRANT_FILE: &str = "mqtt.json";
/// The last desired-configuration revision applied.
const DESIRED_FILE: &str = "desired.revision";
const MAX_BACKOFF: Duration = Duration::from_secs(5);
const STATE_EVERY: Duration = Duration::from_secs(60);

/// The stored grant, if any.
pub fn load_grant(state_dir: &Path) -> Option<MqttGrant> {
    let text = std::fs::read(state_dir.join(GRANT_FILE)).ok()?;
    let g: StoredGrant = serde_json::from_slice(&text).ok()?;
    Some(MqttGrant {
        url: g.url,
        username: g.username,
        password: g.password,
        topic_prefix: g.topic_prefix,
    })
}

/// Keep (or, with `None`, forget) the grant the control plane sent.
pub fn store_grant(state_dir: &Path, grant: Option<&MqttGrant>) -> std::io::Result<()> {
    let path = state_dir.join(GRANT_FILE);
    match grant {
        Some(g) => {
            let text = serde_json::json!({
                "url": g.url, "username": g.username,
                "password": g.password, "topic_prefix": g.topic_prefix,
            });
            shared::files::write_atomic(&path, text.to_string().as_bytes(), 0o600)
        }
        None => match std::fs::remove_file(&path) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(e),
            _ => Ok(()),
        },
    }
}

#[derive(Deserialize)]
struct StoredGrant {
    url: String,
    username: String,
    password: String,
    topic_prefix: String,
}

/// What the MQTT task watches.
pub struct Inputs {
    pub grant: watch::Receiver<Option<MqttGrant>>,
    pub tunnel_up: watch::Receiver<bool>,
    /// Replaces the broker URL of the grant (the broker as this device
    /// reaches it).
    pub url_override: Option<String>,
    pub state_dir: PathBuf,
}

/// Run the MQTT client until shutdown, following grant changes.
pub async fn run(exec: Arc<Executor>, mut inputs: Inputs, shutdown: CancellationToken) {
    loop {
        let grant = inputs.grant.borrow_and_update().clone();
        match grant {
            Some(mut g) => {
                if let Some(u) = &inputs.url_override {
                    g.url = u.clone();
                }
                let session = connection(
                    &exec,
                    &g,
                    &mut inputs.tunnel_up,
                    &inputs.state_dir,
                    &shutdown,
                );
                tokio::select! {
                    _ = session => {}
                    _ = inputs.grant.changed() => {
                        info!("MQTT credentials changed; reconnecting");
                        continue;
                    }
                }
                if shutdown.is_cancelled() {
                    return;
                }
            }
            None => {
                tokio::select! {
                    _ = shutdown.cancelled() => return,
                    r = inputs.grant.changed() => if r.is_err() { return },
                }
            }
        }
    }
}

/// One client for one grant: connect, reconnect with backoff, serve
/// commands. Returns at shutdown.
async fn connection(
    exec: &Arc<Executor>,
    g: &MqttGrant,
    tunnel_up: &mut watch::Receiver<bool>,
    state_dir: &Path,
    shutdown: &CancellationToken,
) {
    let (host, port) = match shared::mqtt::parse_url(&g.url) {
        Ok(hp) => hp,
        Err(e) => {
            warn!(url = %g.url, "unusable MQTT broker URL: {e}");
            shutdown.cancelled().await;
            return;
        }
    };
    let topics = Topics::new(&g.topic_prefix, &g.username);
    let mut opts = MqttOptions::new(g.username.clone(), host, port);
    opts.set_credentials(g.username.clone(), g.password.clone())
        .set_keep_alive(Duration::from_secs(30))
        // The broker keeps QoS 1 commands for us while we are away.
        .set_clean_session(false)
        .set_max_packet_size(
            shared::mqtt::MAX_PAYLOAD + 1024,
            shared::mqtt::MAX_PAYLOAD + 1024,
        )
        .set_last_will(LastWill::new(
            topics.state.clone(),
            shared::mqtt::offline_state(),
            QoS::AtLeastOnce,
            true,
        ));
    let (client, mut eventloop) = AsyncClient::new(opts, 32);
    let mut delay = Duration::from_millis(250);
    let mut connected = false;
    let mut state_tick = tokio::time::interval(STATE_EVERY);
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => {
                // A clean goodbye: retained state says offline.
                let _ = client.try_publish(&topics.state, QoS::AtLeastOnce, true, shared::mqtt::offline_state());
                let _ = client.try_disconnect();
                let _ = tokio::time::timeout(Duration::from_millis(500), async {
                    while eventloop.poll().await.is_ok() {}
                }).await;
                return;
            }
            _ = tunnel_up.changed() => {
                if connected {
                    publish_state(&client, &topics, exec, *tunnel_up.borrow());
                }
            }
            _ = state_tick.tick() => {
                if connected {
                    publish_state(&client, &topics, exec, *tunnel_up.borrow());
                }
            }
            ev = eventloop.poll() => match ev {
                Ok(Event::Incoming(Packet::ConnAck(_))) => {
                    delay = Duration::from_millis(250);
                    connected = true;
                    let _ = client.try_subscribe(&topics.cmd, QoS::AtLeastOnce);
                    let _ = client.try_subscribe(&topics.desired, QoS::AtLeastOnce);
                    publish_state(&client, &topics, exec, *tunnel_up.borrow());
                    info!(broker = %g.url, "connected to the MQTT broker");
                }
                Ok(Event::Incoming(Packet::Publish(p))) => {
                    let exec = exec.clone();
                    let client = client.clone();
                    let topics = topics.clone();
                    let state_dir = state_dir.to_path_buf();
                    tokio::spawn(async move {
                        if p.topic == topics.cmd {
                            on_command(&exec, &client, &topics, &p.payload).await;
                        } else if p.topic == topics.desired {
                            on_desired(&exec, &client, &topics, &state_dir, &p.payload).await;
                        }
                    });
                }
                Ok(_) => {}
                Err(e) => {
                    if connected {
                        warn!("lost the MQTT broker: {e}; reconnecting");
                    } else {
                        debug!("MQTT broker unreachable: {e}");
                    }
                    connected = false;
                    tokio::select! {
                        _ = shutdown.cancelled() => return,
                        _ = tokio::time::sleep(delay) => {}
                    }
                    delay = (delay * 2).min(MAX_BACKOFF);
                }
            }
        }
    }
}

fn publish_state(client: &AsyncClient, topics: &Topics, exec: &Executor, tunnel: bool) {
    let state = StateMsg {
        online: true,
        version: crate::AGENT_VERSION.to_string(),
        tunnel,
        exits: exec
            .exits()
            .all()
            .iter()
            .map(|e| ExitState {
                name: e.name.clone(),
                link_up: e.link_up(),
            })
            .collect(),
        updated_at: unix_now(),
    };
    if let Ok(bytes) = serde_json::to_vec(&state) {
        let _ = client.try_publish(&topics.state, QoS::AtLeastOnce, true, bytes);
    }
}

async fn publish_result(client: &AsyncClient, topics: &Topics, r: &ResultMsg) {
    match serde_json::to_vec(r) {
        Ok(bytes) => {
            if let Err(e) = client
                .publish(&topics.result, QoS::AtLeastOnce, false, bytes)
                .await
            {
                warn!(id = %r.id, "publishing a command result failed: {e}");
            }
        }
        Err(e) => warn!("encoding a result failed: {e}"),
    }
}

fn failed(id: String, message: String) -> ResultMsg {
    ResultMsg {
        id,
        status: "failed".into(),
        message,
        detail: None,
        finished_at: unix_now(),
    }
}

async fn on_command(exec: &Executor, client: &AsyncClient, topics: &Topics, payload: &[u8]) {
    let msg = match shared::mqtt::decode_command(payload) {
        Ok(m) => m,
        Err(e) => {
            warn!("refusing an MQTT command: {e}");
            if let Some(id) = shared::mqtt::salvage_id(payload) {
                publish_result(client, topics, &failed(id, e.to_string())).await;
            }
            return;
        }
    };
    if let Some(exp) = msg.expires_at
        && exp < unix_now()
    {
        info!(id = %msg.id, "not running an expired command");
        let r = ResultMsg {
            status: "expired".into(),
            ..failed(
                msg.id,
                "the command expired before it reached the device".into(),
            )
        };
        publish_result(client, topics, &r).await;
        return;
    }
    let kind = match crate::commands::kind_of(msg.action, exec.exits()) {
        Ok(k) => k,
        Err(e) => {
            publish_result(client, topics, &failed(msg.id, e)).await;
            return;
        }
    };
    match exec.claim(&msg.id, persist(&kind)) {
        Claim::Run => {}
        Claim::Done(_) => {
            // A redelivery (QoS 1) or the same command sent over the
            // tunnel too: it ran once, and answered then.
            info!(id = %msg.id, "command already run; ignoring the repeat");
            return;
        }
    }
    let (r, after) = exec.run(Command { id: msg.id, kind }).await;
    publish_result(client, topics, &result_msg(&r)).await;
    exec.after(after).await;
}

/// Whether running a command of this kind must be remembered across
/// restarts (anything with an effect; reads need not).
pub fn persist(kind: &shared::wire::CommandKind) -> bool {
    use shared::wire::CommandKind as K;
    !matches!(kind, K::Ping | K::CheckIp { .. } | K::SpeedTest { .. })
}

fn result_msg(r: &CommandResult) -> ResultMsg {
    ResultMsg::from_result(r, unix_now())
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Desired {
    revision: String,
    toml: String,
}

/// A desired configuration (retained on `desired`): applied once per
/// revision, like an `update_config` command whose id is
/// `desired-{revision}`.
async fn on_desired(
    exec: &Executor,
    client: &AsyncClient,
    topics: &Topics,
    state_dir: &Path,
    payload: &[u8],
) {
    if payload.is_empty() || payload.len() > shared::mqtt::MAX_PAYLOAD {
        return;
    }
    let d: Desired = match serde_json::from_slice(payload) {
        Ok(d) => d,
        Err(e) => {
            warn!("ignoring a malformed desired configuration: {e}");
            return;
        }
    };
    let id = format!("desired-{}", d.revision);
    if !shared::mqtt::valid_command_id(&id) {
        warn!("ignoring a desired configuration with an unusable revision");
        return;
    }
    let applied = std::fs::read_to_string(state_dir.join(DESIRED_FILE)).unwrap_or_default();
    if applied.trim() == d.revision {
        return;
    }
    if let Claim::Done(_) = exec.claim(&id, true) {
        return;
    }
    let (r, after) = exec
        .run(Command {
            id,
            kind: shared::wire::CommandKind::UpdateConfig { toml: d.toml },
        })
        .await;
    if r.ok {
        let _ = shared::files::write_atomic(
            &state_dir.join(DESIRED_FILE),
            d.revision.as_bytes(),
            0o600,
        );
    }
    publish_result(client, topics, &result_msg(&r)).await;
    exec.after(after).await;
}

fn unix_now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}
