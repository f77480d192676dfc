//! Signed agent releases: the release key, publishing, serving binaries
//! over the tunnel, updating one device, and rolling updates over a label.
//!
//! Glossary:
//! - **release key**: an ed25519 key of this control plane (file, mode
//!   0600, created on first use). Agents receive its public half at
//!   enrollment and accept only releases it signed.
//! - **manifest**: version, target, SHA-256 and size of a binary; the
//!   signature covers its canonical text ([`shared::release`]).
//! - **update**: one `SelfUpdate` command to one device, recorded in
//!   `device_updates`; it is *committed* when the device comes back with
//!   the new version and *rolled back* when the agent reports it restored
//!   its previous binary.
//! - **rollout**: updates over the devices of a label, `batch` at a time,
//!   halting at the first failure.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use ed25519_dalek::{Signer, SigningKey};
use sha2::{Digest, Sha256};
use shared::release::{MAX_RELEASE_SIZE, Manifest, ManifestError};
use shared::wire::{CommandKind, Event, RefuseReason, StreamMsg};
use tracing::{debug, info, warn};

use crate::state::State;
use crate::store::{
    DeviceUpdateRow, ReleaseRow, RolloutDevice, RolloutRow, Store, StoreError, now_ms,
};

/// The release signing key.
pub struct ReleaseKey {
    signing: SigningKey,
}

#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    #[error("release key {path}: {source}")]
    Io {
        path: String,
        source: std::io::Error,
    },
    #[error("release key {0} is not 32 bytes")]
    Damaged(String),
}

impl ReleaseKey {
    /// Read the key at `path`, creating it (mode 0600) when missing.
    pub fn load_or_create(path: &Path) -> Result<Self, KeyError> {
        let io = |source| KeyError::Io {
            path: path.display().to_string(),
            source,
        };
        match shared::files::load_or_create_secret(path) {
            Ok((seed, created)) => {
                if created {
                    info!(path = %path.display(), "created the release signing key");
                }
                Ok(Self {
                    signing: SigningKey::from_bytes(&seed),
                })
            }
            Err(e) if e.kind() == std::io::ErrorKind::InvalidData => {
                Err(KeyError::Damaged(path.display().to_string()))
            }
            Err(e) => Err(io(e)),
        }
    }

    /// The configured key of this control plane.
    pub fn of(cfg: &crate::Config) -> Result<Self, KeyError> {
        Self::load_or_create(&cfg.release_key_path())
    }

    pub fn public(&self) -> [u8; 32] {
        self.signing.verifying_key().to_bytes()
    }

    pub fn sign(&self, m: &Manifest) -> Result<[u8; 64], ManifestError> {
        Ok(self.signing.sign(&m.signed_bytes()?).to_bytes())
    }
}

#[derive(Debug, thiserror::Error)]
pub enum PublishError {
    #[error(transparent)]
    Manifest(#[from] ManifestError),
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// Hash, sign and store a binary as release `version` for `target`.
pub async fn publish(
    store: &Store,
    key: &ReleaseKey,
    data: &[u8],
    version: &str,
    target: &str,
) -> Result<ReleaseRow, PublishError> {
    let manifest = Manifest {
        version: version.to_string(),
        target: target.to_string(),
        sha256: Sha256::digest(data).into(),
        size: data.len() as u64,
    };
    let signature = key.sign(&manifest)?;
    let row = ReleaseRow {
        version: manifest.version.clone(),
        target: manifest.target.clone(),
        sha256: hex::encode(manifest.sha256),
        size: manifest.size as i64,
        signature: hex::encode(signature),
        key_id: hex::encode(key.public()),
        created_at: now_ms(),
    };
    store.insert_release(&row, data).await?;
    Ok(row)
}

/// Answer a `FetchRelease` stream an agent opened: the announced size,
/// then the stored pieces.
pub async fn serve_fetch(store: Store, mut send: quinn::SendStream, mut recv: quinn::RecvStream) {
    use shared::quic::framed::{read_frame, write_frame};
    let mut buf = bytes::BytesMut::new();
    let (version, target) = match read_frame::<StreamMsg>(&mut recv, &mut buf).await {
        Ok(Some(StreamMsg::FetchRelease { version, target })) => (version, target),
        other => {
            debug!(?other, "unexpected stream from an agent");
            let _ = send.reset(shared::wire::close_code::PROTOCOL_ERROR.into());
            return;
        }
    };
    let refuse = |message: String| StreamMsg::Refused {
        reason: RefuseReason::Other,
        message,
    };
    let row = match store.release(&version, &target).await {
        Ok(Some(r)) => r,
        Ok(None) => {
            let _ = write_frame(
                &mut send,
                &refuse(format!("no release {version} for {target}")),
            )
            .await;
            let _ = send.finish();
            return;
        }
        Err(e) => {
            warn!("reading release {version}/{target}: {e}");
            let _ = write_frame(&mut send, &refuse("internal error".into())).await;
            let _ = send.finish();
            return;
        }
    };
    info!(%version, %target, size = row.size, "serving a release");
    if write_frame(
        &mut send,
        &StreamMsg::Release {
            size: row.size as u64,
        },
    )
    .await
    .is_err()
    {
        return;
    }
    let mut seq = 0i64;
    loop {
        match store.release_chunk(&version, &target, seq).await {
            Ok(Some(piece)) => {
                if send.write_all(&piece).await.is_err() {
                    return;
                }
            }
            Ok(None) => break,
            Err(e) => {
                warn!("reading release {version}/{target} piece {seq}: {e}");
                let _ = send.reset(shared::wire::close_code::STREAM_ABORTED.into());
                return;
            }
        }
        seq += 1;
    }
    let _ = send.finish();
    let _ = tokio::time::timeout(Duration::from_secs(30), send.stopped()).await;
}

/// The release an update names: `target` when given, else the only target
/// published for `version`.
pub async fn find_release(
    store: &Store,
    version: &str,
    target: Option<&str>,
) -> Result<Result<ReleaseRow, String>, StoreError> {
    if let Some(t) = target {
        return Ok(store
            .release(version, t)
            .await?
            .ok_or_else(|| format!("no release {version} for {t}")));
    }
    let all: Vec<ReleaseRow> = store
        .releases()
        .await?
        .into_iter()
        .filter(|r| r.version == version)
        .collect();
    Ok(match all.len() {
        0 => Err(format!("no release {version}")),
        1 => Ok(all.into_iter().next().unwrap_or_else(|| unreachable!())),
        _ => Err(format!(
            "release {version} exists for several targets ({}); name one with \"target\"",
            all.iter()
                .map(|r| r.target.as_str())
                .collect::<Vec<_>>()
                .join(", ")
        )),
    })
}

/// Why an update could not be sent or was refused.
#[derive(Debug, thiserror::Error)]
pub enum UpdateError {
    #[error("device is offline")]
    Offline,
    #[error("the device already runs version {0}")]
    AlreadyThere(String),
    #[error("the device refused the update: {0}")]
    Refused(String),
    #[error("{0}")]
    Lost(String),
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// Send release `rel` to a device and wait for its answer. `Ok` means the
/// agent installed it and is restarting; the record turns `committed` when
/// the device reconnects with the new version.
pub async fn update_device(
    state: &State,
    device_id: &str,
    rel: &ReleaseRow,
    rollout_id: Option<&str>,
) -> Result<DeviceUpdateRow, UpdateError> {
    let session = state.registry.get(device_id).ok_or(UpdateError::Offline)?;
    if session.agent_version == rel.version {
        return Err(UpdateError::AlreadyThere(rel.version.clone()));
    }
    let mut row = DeviceUpdateRow {
        id: format!("upd-{}", hex::encode(rand::random::<[u8; 6]>())),
        device_id: device_id.to_string(),
        from_version: session.agent_version.clone(),
        to_version: rel.version.clone(),
        target: rel.target.clone(),
        status: "installing".into(),
        message: String::new(),
        rollout_id: rollout_id.map(str::to_string),
        started_at: now_ms(),
        finished_at: None,
    };
    state.store.insert_device_update(&row).await?;
    let kind = CommandKind::SelfUpdate {
        version: rel.version.clone(),
        target: rel.target.clone(),
        sha256: hex::decode(&rel.sha256)
            .ok()
            .and_then(|v| v.try_into().ok())
            .unwrap_or([0; 32]),
        size: rel.size as u64,
        signature: hex::decode(&rel.signature).unwrap_or_default(),
    };
    let timeout = Duration::from_secs(state.cfg.releases.update_timeout_secs);
    let id = state.registry.next_command_id();
    info!(device = %device_id, version = %rel.version, "sending a self-update");
    let (status, message, result) = match session.command(id, kind, timeout).await {
        Ok(r) if r.ok => ("restarting", r.message.clone(), Ok(())),
        Ok(r) => (
            "refused",
            r.message.clone(),
            Err(UpdateError::Refused(r.message)),
        ),
        Err(e) => (
            "failed",
            e.to_string(),
            Err(UpdateError::Lost(e.to_string())),
        ),
    };
    state
        .store
        .set_device_update(&row.id, status, &message, status != "restarting")
        .await?;
    row.status = status.into();
    row.message = message;
    result.map(|()| row)
}

/// A device connected with `version`: commits an update that waited for it.
pub async fn device_connected(store: &Store, device_id: &str, version: &str) {
    let latest = match store.device_updates(device_id, 1).await {
        Ok(mut v) => v.pop(),
        Err(e) => {
            debug!("reading updates: {e}");
            return;
        }
    };
    if let Some(u) = latest
        && u.status == "restarting"
        && u.to_version == version
    {
        let msg = format!("running version {version}");
        if let Err(e) = store
            .set_device_update(&u.id, "committed", &msg, true)
            .await
        {
            warn!("recording the committed update: {e}");
        }
        info!(device = %device_id, %version, "update committed");
    }
}

/// Record what an agent reports about its updates.
pub fn on_event(state: &State, device_id: &str, ev: &Event) {
    let Event::UpdateRolledBack {
        from_version,
        to_version,
        reason,
    } = ev
    else {
        return;
    };
    warn!(device = %device_id, %from_version, %to_version, %reason, "device rolled back an update");
    let store = state.store.clone();
    let device_id = device_id.to_string();
    let (to_version, reason) = (to_version.clone(), reason.clone());
    state.tasks.spawn(async move {
        let latest = store
            .device_updates(&device_id, 1)
            .await
            .ok()
            .and_then(|mut v| v.pop());
        let msg = format!("rolled back: {reason}");
        match latest {
            Some(u) if u.to_version == to_version => {
                if let Err(e) = store
                    .set_device_update(&u.id, "rolled_back", &msg, true)
                    .await
                {
                    warn!("recording the rollback: {e}");
                }
            }
            _ => debug!("a rollback for no recorded update"),
        }
    });
}

/// Start a rollout of `rel` over the devices labelled `label`, `batch` at
/// a time, in the background.
pub async fn start_rollout(
    state: Arc<State>,
    rel: ReleaseRow,
    label: &str,
    batch: usize,
) -> Result<RolloutRow, StoreError> {
    let devices: Vec<RolloutDevice> = state
        .store
        .devices()
        .await?
        .into_iter()
        .filter(|d| d.labels.iter().any(|l| l == label) && !d.disabled)
        .map(|d| RolloutDevice {
            device_id: d.id,
            state: "pending".into(),
            message: String::new(),
        })
        .collect();
    let row = RolloutRow {
        id: format!("rol-{}", hex::encode(rand::random::<[u8; 6]>())),
        version: rel.version.clone(),
        target: rel.target.clone(),
        label: label.to_string(),
        batch: batch as i64,
        state: "running".into(),
        halted_reason: None,
        devices,
        created_at: now_ms(),
        finished_at: None,
    };
    state.store.insert_rollout(&row).await?;
    let tasks = state.tasks.clone();
    let r = row.clone();
    tasks.spawn(async move { run_rollout(state, rel, r).await });
    Ok(row)
}

async fn run_rollout(state: Arc<State>, rel: ReleaseRow, mut row: RolloutRow) {
    info!(rollout = %row.id, version = %rel.version, label = %row.label, devices = row.devices.len(), "rollout started");
    let batch = row.batch.max(1) as usize;
    let mut next = 0;
    while next < row.devices.len() {
        let end = (next + batch).min(row.devices.len());
        for d in &mut row.devices[next..end] {
            d.state = "updating".into();
        }
        save(&state.store, &row).await;
        let outcomes = futures::future::join_all(
            row.devices[next..end]
                .iter()
                .map(|d| one_device(&state, &rel, &d.device_id, &row.id)),
        )
        .await;
        let mut failure = None;
        for (d, outcome) in row.devices[next..end].iter_mut().zip(outcomes) {
            match outcome {
                Ok(msg) => {
                    d.state = "done".into();
                    d.message = msg;
                }
                Err(msg) => {
                    d.state = "failed".into();
                    d.message = msg.clone();
                    failure.get_or_insert(format!("{}: {msg}", d.device_id));
                }
            }
        }
        next = end;
        if let Some(reason) = failure {
            warn!(rollout = %row.id, %reason, "rollout halted");
            row.state = "halted".into();
            row.halted_reason = Some(reason);
            row.finished_at = Some(now_ms());
            save(&state.store, &row).await;
            return;
        }
        save(&state.store, &row).await;
    }
    row.state = "done".into();
    row.finished_at = Some(now_ms());
    save(&state.store, &row).await;
    info!(rollout = %row.id, "rollout done");
}

async fn save(store: &Store, row: &RolloutRow) {
    if let Err(e) = store.save_rollout(row).await {
        warn!(rollout = %row.id, "saving rollout progress: {e}");
    }
}

/// Update one device and wait until it is back with the new version.
async fn one_device(
    state: &State,
    rel: &ReleaseRow,
    device_id: &str,
    rollout_id: &str,
) -> Result<String, String> {
    let update = match update_device(state, device_id, rel, Some(rollout_id)).await {
        Ok(u) => u,
        Err(UpdateError::AlreadyThere(v)) => return Ok(format!("already on {v}")),
        Err(e) => return Err(e.to_string()),
    };
    let deadline = Duration::from_secs(state.cfg.releases.rollout_deadline_secs);
    let started = tokio::time::Instant::now();
    loop {
        if let Some(s) = state.registry.get(device_id)
            && s.agent_version == rel.version
        {
            return Ok(format!("running {}", rel.version));
        }
        let recorded = state
            .store
            .device_updates(device_id, 1)
            .await
            .ok()
            .and_then(|mut v| v.pop());
        if let Some(u) = recorded
            && u.id == update.id
            && u.status == "rolled_back"
        {
            return Err(u.message);
        }
        if started.elapsed() >= deadline {
            return Err(format!(
                "not back with version {} within {} s",
                rel.version,
                deadline.as_secs()
            ));
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// Largest binary `release publish` accepts (the agents' own limit).
pub const MAX_SIZE: u64 = MAX_RELEASE_SIZE;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key_is_created_private_and_reloaded() {
        use std::os::unix::fs::PermissionsExt;
        let dir = std::env::temp_dir().join(format!("cg-relkey-{}", std::process::id()));
        let path = dir.join("release.key");
        let a = ReleaseKey::load_or_create(&path).unwrap();
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        let b = ReleaseKey::load_or_create(&path).unwrap();
        assert_eq!(a.public(), b.public());
        std::fs::write(&path, b"short").unwrap();
        assert!(matches!(
            ReleaseKey::load_or_create(&path),
            Err(KeyError::Damaged(_))
        ));
        std::fs::remove_dir_all(dir).unwrap();
    }
}
