//! Device commands issued through the API: recorded, sent over the tunnel
//! when the device is connected and over MQTT otherwise, and tracked to an
//! outcome (pending → delivered → succeeded | failed | expired).
//!
//! A command is executed at most once whichever way it travels: the agent
//! remembers the ids it ran, so a command that falls back from a dropped
//! tunnel to MQTT cannot run twice.

use std::sync::Arc;
use std::time::Duration;

use shared::mqtt::{Action, CommandMsg};
use shared::wire::CommandKind;
use tracing::{debug, info};

use crate::registry::CommandError;
use crate::rotation::{self, RotateError};
use crate::state::State;
use crate::store::{CommandRow, StoreError, now_ms};

/// Default size of a speed test download.
pub const SPEED_TEST_BYTES: u32 = 5_000_000;
/// Largest speed test download.
pub const MAX_SPEED_TEST_BYTES: u32 = 100_000_000;

#[derive(Debug, thiserror::Error)]
pub enum IssueError {
    #[error("no device {0}")]
    NotFound(String),
    #[error("{0}")]
    Invalid(String),
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// Record a command for a device and start delivering it. Returns the
/// command as recorded (status `pending`).
pub async fn issue(
    state: &Arc<State>,
    device_id: &str,
    action: Action,
    ttl: Option<Duration>,
) -> Result<CommandRow, IssueError> {
    if state.store.device(device_id).await?.is_none() {
        return Err(IssueError::NotFound(device_id.to_string()));
    }
    validate(&action)?;
    let ttl = ttl.unwrap_or(Duration::from_secs(state.cfg.mqtt.command_ttl_secs));
    let now = now_ms();
    let expires_at = now + ttl.as_millis() as i64;
    let msg = CommandMsg {
        id: format!("cmd-{}", hex::encode(rand::random::<[u8; 8]>())),
        action,
        expires_at: Some((expires_at + 999) / 1000),
    };
    let row = CommandRow {
        id: msg.id.clone(),
        device_id: device_id.to_string(),
        command: msg.action.name().to_string(),
        payload: serde_json::to_value(&msg).unwrap_or_default(),
        status: "pending".into(),
        channel: None,
        message: String::new(),
        detail: None,
        created_at: now,
        expires_at,
        delivered_at: None,
        finished_at: None,
    };
    state.store.insert_command(&row).await?;
    info!(id = %row.id, device = %device_id, command = %row.command, "command issued");
    let st = state.clone();
    let device = device_id.to_string();
    state.tasks.spawn(async move {
        if let Err(e) = deliver(&st, &device, msg, ttl).await {
            tracing::warn!("recording a command's progress failed: {e}");
        }
    });
    Ok(row)
}

fn validate(action: &Action) -> Result<(), IssueError> {
    let bad = |m: &str| Err(IssueError::Invalid(m.to_string()));
    match action {
        Action::SpeedTest { bytes: Some(b), .. } if *b == 0 || *b > MAX_SPEED_TEST_BYTES => {
            bad("speed_test bytes must be within 1..=100000000")
        }
        Action::UpdateConfig { toml } if toml.parse::<toml::Table>().is_err() => {
            bad("update_config toml is not valid TOML")
        }
        Action::SelfUpdate { version } if version.is_empty() || version.len() > 64 => {
            bad("self_update needs a version")
        }
        _ => Ok(()),
    }
}

/// The tunnel form of a command (rotations and self-updates take their
/// own engines).
fn kind_of(action: &Action) -> Option<(CommandKind, Duration)> {
    let short = Duration::from_secs(15);
    Some(match action {
        Action::Ping => (CommandKind::Ping, short),
        Action::Rotate { .. } => return None,
        Action::Reboot => (CommandKind::Reboot, short),
        Action::RestartAgent => (CommandKind::RestartAgent, short),
        Action::UpdateConfig { toml } => (CommandKind::UpdateConfig { toml: toml.clone() }, short),
        Action::SpeedTest { exit, bytes } => (
            CommandKind::SpeedTest {
                exit: exit.clone(),
                bytes: bytes.unwrap_or(SPEED_TEST_BYTES),
            },
            Duration::from_secs(120),
        ),
        Action::SelfUpdate { .. } => return None,
    })
}

async fn deliver(
    state: &Arc<State>,
    device_id: &str,
    msg: CommandMsg,
    ttl: Duration,
) -> Result<(), StoreError> {
    let store = &state.store;
    let id = msg.id.clone();
    if let Some(session) = state.registry.get(device_id) {
        store.command_delivered(&id, "quic").await?;
        match &msg.action {
            Action::Rotate { exit, .. } => {
                // Over the tunnel a rotation is the control plane's own:
                // drain, escalate along the exit's ladder, verify the IP.
                let (status, message, detail) =
                    match rotation::rotate(state, device_id, exit.as_deref(), "command").await {
                        Ok(row) => (
                            "succeeded",
                            format!(
                                "rotated {} → {}",
                                row.old_ip.as_deref().unwrap_or("?"),
                                row.new_ip.as_deref().unwrap_or("?")
                            ),
                            serde_json::to_value(&row).ok(),
                        ),
                        Err(RotateError::Failed(row)) => (
                            "failed",
                            row.error
                                .clone()
                                .unwrap_or_else(|| "rotation failed".into()),
                            serde_json::to_value(&*row).ok(),
                        ),
                        Err(e) => ("failed", e.to_string(), None),
                    };
                store
                    .command_finished(&id, status, &message, detail.as_ref())
                    .await?;
                return Ok(());
            }
            Action::SelfUpdate { version } => {
                // The release engine: looks the release up, sends it signed,
                // and records the device update.
                let (status, message) = match crate::release::find_release(store, version, None)
                    .await?
                {
                    Err(e) => ("failed", e),
                    Ok(rel) => {
                        match crate::release::update_device(state, device_id, &rel, None).await {
                            Ok(row) => ("succeeded", format!("{} ({})", row.message, row.id)),
                            Err(crate::release::UpdateError::Store(e)) => return Err(e),
                            Err(e) => ("failed", e.to_string()),
                        }
                    }
                };
                store.command_finished(&id, status, &message, None).await?;
                return Ok(());
            }
            action => {
                let (kind, timeout) = kind_of(action).expect("not a rotation or self-update");
                match session.command(id.clone(), kind, timeout.min(ttl)).await {
                    Ok(r) => {
                        let status = if r.ok { "succeeded" } else { "failed" };
                        let detail = r.detail.as_ref().map(shared::mqtt::detail_json);
                        store
                            .command_finished(&id, status, &r.message, detail.as_ref())
                            .await?;
                        return Ok(());
                    }
                    Err(e @ CommandError::Timeout(_)) => {
                        store
                            .command_finished(&id, "failed", &e.to_string(), None)
                            .await?;
                        return Ok(());
                    }
                    // The tunnel went away under the command: MQTT may
                    // still reach the device, and it runs an id only once.
                    Err(e) => debug!(%id, "tunnel lost during the command ({e}); trying MQTT"),
                }
            }
        }
    }
    if let Action::SelfUpdate { .. } = msg.action {
        store
            .command_finished(
                &id,
                "failed",
                "the device is not connected; a self-update needs its tunnel (the release downloads through it)",
                None,
            )
            .await?;
        return Ok(());
    }
    match &state.mqtt {
        Some(m) => match m.publish_command(device_id, &msg).await {
            Ok(()) => store.command_delivered(&id, "mqtt").await?,
            Err(e) => {
                store
                    .command_finished(
                        &id,
                        "failed",
                        &format!("the device is not connected and {e}"),
                        None,
                    )
                    .await?;
            }
        },
        None => {
            store
                .command_finished(
                    &id,
                    "failed",
                    "the device is not connected (and no MQTT broker is configured)",
                    None,
                )
                .await?;
        }
    }
    Ok(())
}

/// Wait up to `wait` for a command to reach an outcome; its latest state.
pub async fn wait_final(
    state: &State,
    id: &str,
    wait: Duration,
) -> Result<Option<CommandRow>, StoreError> {
    let deadline = tokio::time::Instant::now() + wait;
    loop {
        let row = state.store.command(id).await?;
        match &row {
            Some(r) if !r.is_final() && tokio::time::Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            _ => return Ok(row),
        }
    }
}
