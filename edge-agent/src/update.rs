//! Signed self-update with rollback.
//!
//! The control plane sends `SelfUpdate` with a release's manifest fields and
//! the release key's signature over them. The agent:
//!
//! 1. checks the version differs from its own, the target is its own, and
//!    the signature verifies with the key it stored at enrollment;
//! 2. fetches the binary over the tunnel (a stream it opens with
//!    `FetchRelease`), writing it next to its own executable while hashing,
//!    and refuses it unless size and SHA-256 match the signed manifest;
//! 3. keeps its current binary as `<exe>.prev` (a hard link), writes the
//!    **pending marker** (`update-pending.json` in the state dir), renames
//!    the new binary over its own path and fsyncs the directory;
//! 4. answers the command, closes the tunnel and re-executes itself with
//!    the same arguments.
//!
//! On start a pending marker puts the new binary **on probation**: each
//! start is counted; the first `Welcome` from the control plane commits the
//! update (the marker goes). If no `Welcome` arrives within the marker's
//! deadline, or the binary has been started more than [`MAX_STARTS`] times
//! without committing (a crash loop under a supervisor), the agent renames
//! `<exe>.prev` back over its path, leaves a rollback report
//! (`update-rolled-back.json`) and re-executes the old binary, which sends
//! the report to the control plane as `Event::UpdateRolledBack` once
//! connected.

use std::io;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Mutex, OnceLock};
use std::time::Duration;

use bytes::BytesMut;
use ed25519_dalek::{Signature, VerifyingKey};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use shared::quic::framed::{read_frame, write_frame};
use shared::release::{MAX_RELEASE_SIZE, Manifest, PUBLIC_KEY_LEN};
use shared::wire::{CommandDetail, CommandKind, Event, StreamMsg};
use tokio::io::AsyncWriteExt;
use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn};

/// The control plane's release key, 64 hex digits, stored at enrollment.
pub const RELEASE_KEY_FILE: &str = "release-key.pub";
/// Present while a new binary is on probation.
pub const PENDING_FILE: &str = "update-pending.json";
/// Left by a rollback for the restored binary to report.
pub const ROLLBACK_FILE: &str = "update-rolled-back.json";
/// Starts of a new binary without reaching the control plane before it is
/// rolled back.
pub const MAX_STARTS: u32 = 3;
/// Time between answering the command and closing the tunnel for the
/// restart: closing a QUIC connection discards unsent stream data, so the
/// answer gets this long to leave.
const ANSWER_GRACE: Duration = Duration::from_secs(1);
/// Upper bound for fetching a release over the tunnel.
const FETCH_TIMEOUT: Duration = Duration::from_secs(900);

/// What the pending marker records.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Pending {
    /// The agent's executable (now the new binary).
    pub exe: PathBuf,
    /// The previous binary, restored on rollback.
    pub previous: PathBuf,
    pub from_version: String,
    pub to_version: String,
    /// Each start of the new binary has this long to reach the control plane.
    pub deadline_secs: u64,
    /// Starts of the new binary so far.
    pub starts: u32,
}

/// The rollback report the restored binary sends.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RolledBack {
    pub from_version: String,
    pub to_version: String,
    pub reason: String,
}

/// What a start with a pending marker does.
#[derive(Debug, PartialEq, Eq)]
pub enum StartDecision {
    /// This is the new binary: reach the control plane within `deadline`.
    Probation { deadline: Duration },
    /// Restore the previous binary now.
    RollBack { reason: String },
    /// The marker names a version this binary is not (the swap never
    /// happened): drop it and report why.
    Stale { reason: String },
}

/// Decide what a start does, after `p.starts` was counted. Pure.
pub fn decide(p: &Pending, own_version: &str) -> StartDecision {
    if own_version != p.to_version {
        return StartDecision::Stale {
            reason: format!(
                "the update to {} did not take effect (this binary is {own_version})",
                p.to_version
            ),
        };
    }
    if p.starts > MAX_STARTS {
        return StartDecision::RollBack {
            reason: format!(
                "version {} was started {} times without reaching the control plane",
                p.to_version,
                p.starts - 1
            ),
        };
    }
    StartDecision::Probation {
        deadline: Duration::from_secs(p.deadline_secs.max(1)),
    }
}

struct Ctx {
    state_dir: PathBuf,
    /// The executable as it was at start (after a swap, `/proc/self/exe`
    /// names a deleted file).
    exe: PathBuf,
    deadline: Duration,
    shutdown: CancellationToken,
}

static CTX: OnceLock<Ctx> = OnceLock::new();
/// Set once a new binary is installed: `main` re-executes after the agent
/// stopped.
static RESTART: AtomicBool = AtomicBool::new(false);
static BUSY: AtomicBool = AtomicBool::new(false);
/// The marker while this binary is on probation; taken by whichever comes
/// first, the commit or the watchdog.
static PROBATION: Mutex<Option<(PathBuf, Pending)>> = Mutex::new(None);

/// Allow self-updates in this process (only the `edge-agent` binary calls
/// this: an agent embedded in another program must not replace it).
/// `shutdown` stops the agent for the restart.
pub fn enable(state_dir: &Path, deadline: Duration, shutdown: CancellationToken) {
    let exe = std::env::current_exe().unwrap_or_default();
    let _ = CTX.set(Ctx {
        state_dir: state_dir.to_path_buf(),
        exe,
        deadline,
        shutdown,
    });
}

/// Whether the agent stopped to run a newly installed binary.
pub fn restart_requested() -> bool {
    RESTART.load(Ordering::SeqCst)
}

/// Replace this process with `exe`, same arguments. Returns only on failure.
pub fn exec(exe: &Path) -> io::Error {
    use std::os::unix::process::CommandExt;
    let mut cmd = std::process::Command::new(exe);
    cmd.args(std::env::args_os().skip(1));
    cmd.exec()
}

/// Re-execute the installed binary after a successful update.
pub fn exec_new() -> anyhow::Error {
    match CTX.get() {
        Some(c) => {
            info!(exe = %c.exe.display(), "restarting into the new binary");
            anyhow::Error::new(exec(&c.exe)).context("re-executing the new binary")
        }
        None => anyhow::anyhow!("self-update is not enabled in this process"),
    }
}

fn read_json<T: for<'de> Deserialize<'de>>(path: &Path) -> io::Result<Option<T>> {
    match std::fs::read(path) {
        Ok(b) => serde_json::from_slice(&b)
            .map(Some)
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e)),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e),
    }
}

fn write_json<T: Serialize>(path: &Path, v: &T) -> io::Result<()> {
    let data = serde_json::to_vec_pretty(v).map_err(io::Error::other)?;
    shared::files::write_atomic(path, &data, 0o644)
}

fn sync_dir(path: &Path) -> io::Result<()> {
    let dir = path.parent().unwrap_or(Path::new("."));
    std::fs::File::open(dir)?.sync_all()
}

/// Called before the agent starts: counts a start of a binary on
/// probation, and rolls back (re-executing the previous binary) when the
/// rules say so. Returns normally otherwise.
pub fn on_start(state_dir: &Path) -> anyhow::Result<()> {
    let path = state_dir.join(PENDING_FILE);
    let Some(mut p) = read_json::<Pending>(&path)? else {
        return Ok(());
    };
    p.starts = p.starts.saturating_add(1);
    write_json(&path, &p)?;
    match decide(&p, crate::AGENT_VERSION) {
        StartDecision::Probation { deadline } => {
            info!(
                version = %p.to_version,
                start = p.starts,
                ?deadline,
                "new binary on probation until it reaches the control plane"
            );
            if let Ok(mut g) = PROBATION.lock() {
                *g = Some((state_dir.to_path_buf(), p));
            }
            // A plain thread: it must fire even if the runtime is wedged.
            std::thread::Builder::new()
                .name("update-watchdog".into())
                .spawn(move || {
                    std::thread::sleep(deadline);
                    let taken = PROBATION.lock().ok().and_then(|mut g| g.take());
                    if let Some((dir, p)) = taken {
                        let reason = format!(
                            "version {} did not reach the control plane within {} s",
                            p.to_version,
                            deadline.as_secs()
                        );
                        let e = roll_back(&dir, &p, &reason);
                        error!("rollback failed: {e:#}");
                        std::process::exit(1);
                    }
                })?;
            Ok(())
        }
        StartDecision::RollBack { reason } => Err(roll_back(state_dir, &p, &reason)),
        StartDecision::Stale { reason } => {
            warn!("{reason}");
            write_json(
                &state_dir.join(ROLLBACK_FILE),
                &RolledBack {
                    from_version: crate::AGENT_VERSION.to_string(),
                    to_version: p.to_version.clone(),
                    reason,
                },
            )?;
            std::fs::remove_file(&path)?;
            Ok(())
        }
    }
}

/// Restore the previous binary, leave the report, re-execute. Returns only
/// on failure.
fn roll_back(state_dir: &Path, p: &Pending, reason: &str) -> anyhow::Error {
    warn!(%reason, previous = %p.previous.display(), "rolling back to version {}", p.from_version);
    let run = || -> io::Result<io::Error> {
        std::fs::rename(&p.previous, &p.exe)?;
        sync_dir(&p.exe)?;
        write_json(
            &state_dir.join(ROLLBACK_FILE),
            &RolledBack {
                from_version: p.from_version.clone(),
                to_version: p.to_version.clone(),
                reason: reason.to_string(),
            },
        )?;
        std::fs::remove_file(state_dir.join(PENDING_FILE))?;
        Ok(exec(&p.exe))
    };
    match run() {
        Ok(e) => anyhow::Error::new(e).context("re-executing the previous binary"),
        Err(e) => anyhow::Error::new(e).context("restoring the previous binary"),
    }
}

/// Called when the control plane welcomed this agent: commits an update on
/// probation, and returns the rollback reports to send.
pub fn on_welcome() -> Vec<Event> {
    let taken = PROBATION.lock().ok().and_then(|mut g| g.take());
    if let Some((dir, p)) = taken {
        match std::fs::remove_file(dir.join(PENDING_FILE)) {
            Ok(()) => info!(
                "update from {} to {} committed (previous binary kept as {})",
                p.from_version,
                p.to_version,
                p.previous.display()
            ),
            Err(e) => warn!("committing the update: {e}"),
        }
    }
    let Some(c) = CTX.get() else {
        return Vec::new();
    };
    match read_json::<RolledBack>(&c.state_dir.join(ROLLBACK_FILE)) {
        Ok(Some(r)) => vec![Event::UpdateRolledBack {
            from_version: r.from_version,
            to_version: r.to_version,
            reason: r.reason,
        }],
        Ok(None) => Vec::new(),
        Err(e) => {
            warn!("unreadable rollback report: {e}");
            Vec::new()
        }
    }
}

/// The reports `on_welcome` returned reached the control plane.
pub fn reports_sent() {
    if let Some(c) = CTX.get() {
        let _ = std::fs::remove_file(c.state_dir.join(ROLLBACK_FILE));
    }
}

/// Store the release key received at enrollment.
pub fn store_release_key(state_dir: &Path, key: &[u8]) -> io::Result<()> {
    shared::files::write_atomic(
        &state_dir.join(RELEASE_KEY_FILE),
        hex::encode(key).as_bytes(),
        0o644,
    )
}

fn load_release_key(state_dir: &Path) -> Result<VerifyingKey, String> {
    let path = state_dir.join(RELEASE_KEY_FILE);
    let text = std::fs::read_to_string(&path).map_err(|e| {
        format!(
            "no release key in {} ({e}); this agent was enrolled without one, enroll it again to allow updates",
            path.display()
        )
    })?;
    let raw = hex::decode(text.trim()).map_err(|e| format!("{}: {e}", path.display()))?;
    let raw: [u8; PUBLIC_KEY_LEN] = raw
        .try_into()
        .map_err(|_| format!("{}: not a 32-byte key", path.display()))?;
    VerifyingKey::from_bytes(&raw).map_err(|e| format!("{}: {e}", path.display()))
}

/// Check the signature over the manifest with the stored key.
pub fn verify_manifest(key: &VerifyingKey, m: &Manifest, signature: &[u8]) -> Result<(), String> {
    let text = m.signed_bytes().map_err(|e| e.to_string())?;
    let sig = Signature::from_slice(signature)
        .map_err(|_| format!("malformed signature ({} bytes)", signature.len()))?;
    key.verify_strict(&text, &sig).map_err(|_| {
        "the release signature does not verify with the release key received at enrollment".into()
    })
}

/// Run a `SelfUpdate` command. Answers like every command: ok and a message.
pub async fn self_update(
    conn: &quinn::Connection,
    kind: CommandKind,
) -> (bool, String, Option<CommandDetail>) {
    let CommandKind::SelfUpdate {
        version,
        target,
        sha256,
        size,
        signature,
    } = kind
    else {
        return (false, "not a self-update".into(), None);
    };
    let Some(ctx) = CTX.get() else {
        return (
            false,
            "self-update is not available in this process (only the edge-agent binary updates itself)"
                .into(),
            None,
        );
    };
    if BUSY.swap(true, Ordering::SeqCst) {
        return (false, "an update is already in progress".into(), None);
    }
    let manifest = Manifest {
        version,
        target,
        sha256,
        size,
    };
    let outcome = install(ctx, conn, &manifest, &signature).await;
    match outcome {
        Ok(message) => {
            RESTART.store(true, Ordering::SeqCst);
            let stop = ctx.shutdown.clone();
            tokio::spawn(async move {
                tokio::time::sleep(ANSWER_GRACE).await;
                stop.cancel();
            });
            info!("{message}");
            (true, message, None)
        }
        Err(message) => {
            BUSY.store(false, Ordering::SeqCst);
            warn!(version = %manifest.version, "update refused: {message}");
            (false, message, None)
        }
    }
}

async fn install(
    ctx: &Ctx,
    conn: &quinn::Connection,
    m: &Manifest,
    signature: &[u8],
) -> Result<String, String> {
    if m.version == crate::AGENT_VERSION {
        return Err(format!("this agent already runs version {}", m.version));
    }
    if m.target != crate::AGENT_TARGET {
        return Err(format!(
            "release {} is built for {}, this agent for {}",
            m.version,
            m.target,
            crate::AGENT_TARGET
        ));
    }
    m.validate().map_err(|e| e.to_string())?;
    let key = load_release_key(&ctx.state_dir)?;
    verify_manifest(&key, m, signature)?;
    let exe = ctx.exe.clone();
    let name = exe
        .file_name()
        .ok_or_else(|| format!("cannot update {}: no file name", exe.display()))?
        .to_string_lossy()
        .into_owned();
    let tmp = exe.with_file_name(format!(".{name}.new"));
    let previous = exe.with_file_name(format!("{name}.prev"));
    let fetched = tokio::time::timeout(FETCH_TIMEOUT, fetch(conn, m, &tmp))
        .await
        .unwrap_or_else(|_| Err(format!("fetching took longer than {FETCH_TIMEOUT:?}")));
    if let Err(e) = fetched {
        let _ = tokio::fs::remove_file(&tmp).await;
        return Err(e);
    }
    let swap = || -> io::Result<()> {
        match std::fs::remove_file(&previous) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => return Err(e),
            _ => {}
        }
        if std::fs::hard_link(&exe, &previous).is_err() {
            std::fs::copy(&exe, &previous)?;
            std::fs::File::open(&previous)?.sync_all()?;
        }
        // The marker goes first: a crash between here and the rename
        // leaves a marker the old binary recognises as stale.
        write_json(
            &ctx.state_dir.join(PENDING_FILE),
            &Pending {
                exe: exe.clone(),
                previous: previous.clone(),
                from_version: crate::AGENT_VERSION.to_string(),
                to_version: m.version.clone(),
                deadline_secs: ctx.deadline.as_secs(),
                starts: 0,
            },
        )?;
        std::fs::rename(&tmp, &exe)?;
        sync_dir(&exe)
    };
    if let Err(e) = swap() {
        let _ = std::fs::remove_file(&tmp);
        let _ = std::fs::remove_file(ctx.state_dir.join(PENDING_FILE));
        return Err(format!("installing {}: {e}", exe.display()));
    }
    Ok(format!(
        "installed version {} ({} bytes, sha256 {}); restarting",
        m.version,
        m.size,
        hex::encode(m.sha256)
    ))
}

/// Fetch the release over a new stream into `dest`, checking size and
/// SHA-256 against the signed manifest.
async fn fetch(conn: &quinn::Connection, m: &Manifest, dest: &Path) -> Result<(), String> {
    let (mut send, mut recv) = conn
        .open_bi()
        .await
        .map_err(|e| format!("opening a stream: {e}"))?;
    write_frame(
        &mut send,
        &StreamMsg::FetchRelease {
            version: m.version.clone(),
            target: m.target.clone(),
        },
    )
    .await
    .map_err(|e| format!("asking for the release: {e}"))?;
    let _ = send.finish();
    let mut buf = BytesMut::new();
    let size = match read_frame::<StreamMsg>(&mut recv, &mut buf).await {
        Ok(Some(StreamMsg::Release { size })) => size,
        Ok(Some(StreamMsg::Refused { message, .. })) => {
            return Err(format!(
                "the control plane cannot serve the release: {message}"
            ));
        }
        Ok(other) => return Err(format!("unexpected answer to FetchRelease: {other:?}")),
        Err(e) => return Err(format!("reading the release: {e}")),
    };
    if size != m.size || size > MAX_RELEASE_SIZE {
        return Err(format!(
            "the control plane announced {size} bytes, the signed manifest says {}",
            m.size
        ));
    }
    use std::os::unix::fs::OpenOptionsExt;
    let file = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o755)
        .open(dest)
        .map_err(|e| format!("{}: {e}", dest.display()))?;
    let mut file = tokio::fs::File::from_std(file);
    let mut hasher = Sha256::new();
    let mut got: u64 = 0;
    let mut chunk = buf.split().freeze();
    loop {
        if !chunk.is_empty() {
            got += chunk.len() as u64;
            if got > size {
                return Err(format!("the control plane sent more than {size} bytes"));
            }
            hasher.update(&chunk);
            file.write_all(&chunk)
                .await
                .map_err(|e| format!("{}: {e}", dest.display()))?;
        }
        match recv.read_chunk(64 * 1024, true).await {
            Ok(Some(c)) => chunk = c.bytes,
            Ok(None) => break,
            Err(e) => return Err(format!("reading the release after {got} bytes: {e}")),
        }
    }
    if got != size {
        return Err(format!("the download ended after {got} of {size} bytes"));
    }
    let digest: [u8; 32] = hasher.finalize().into();
    if digest != m.sha256 {
        return Err(format!(
            "checksum mismatch: the download has sha256 {}, the signed manifest says {}",
            hex::encode(digest),
            hex::encode(m.sha256)
        ));
    }
    file.sync_all()
        .await
        .map_err(|e| format!("{}: {e}", dest.display()))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use ed25519_dalek::{Signer, SigningKey};

    fn pending(starts: u32) -> Pending {
        Pending {
            exe: "/opt/edge-agent".into(),
            previous: "/opt/edge-agent.prev".into(),
            from_version: "1.0.0".into(),
            to_version: "1.1.0".into(),
            deadline_secs: 60,
            starts,
        }
    }

    #[test]
    fn starts_are_counted_then_rolled_back() {
        for starts in 1..=MAX_STARTS {
            assert_eq!(
                decide(&pending(starts), "1.1.0"),
                StartDecision::Probation {
                    deadline: Duration::from_secs(60)
                }
            );
        }
        assert!(matches!(
            decide(&pending(MAX_STARTS + 1), "1.1.0"),
            StartDecision::RollBack { reason } if reason.contains("3 times")
        ));
        assert!(matches!(
            decide(&pending(1), "1.0.0"),
            StartDecision::Stale { .. }
        ));
    }

    #[test]
    fn signatures_are_checked_against_the_enrolled_key() {
        let ours = SigningKey::from_bytes(&[7; 32]);
        let theirs = SigningKey::from_bytes(&[8; 32]);
        let m = Manifest {
            version: "1.1.0".into(),
            target: "x86_64-unknown-linux-gnu".into(),
            sha256: [3; 32],
            size: 10,
        };
        let text = m.signed_bytes().unwrap();
        let good = ours.sign(&text).to_bytes();
        let key = ours.verifying_key();
        verify_manifest(&key, &m, &good).unwrap();
        let err = verify_manifest(&key, &m, &theirs.sign(&text).to_bytes()).unwrap_err();
        assert!(err.contains("does not verify"), "{err}");
        let mut other = m.clone();
        other.size = 11;
        assert!(verify_manifest(&key, &other, &good).is_err());
        assert!(verify_manifest(&key, &m, &good[..10]).is_err());
    }
}
