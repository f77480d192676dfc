//! IP rotation: drain, rotate, verify, retry with escalation.
//!
//! A rotation of one exit:
//! 1. **Drain**: the exit takes no new flows; in-flight flows get
//!    `drain_grace_secs` to finish while the router serves new flows from
//!    other exits.
//! 2. **Rotate**: the agent runs one rung of the exit's backend ladder
//!    (attempt 1 the softest, each retry one rung harder) and then reads the
//!    exit's public address through the exit's own uplink.
//! 3. **Verify**: success only if the new address differs from the old one
//!    and from the exit's `recent_ips` previous addresses. Otherwise retry
//!    after `retry_delay_secs`, up to `attempts`.
//!
//! A failed rotation leaves the exit out of the pool (`failed`, with the
//! reason) unless a final address check shows the uplink still works; a
//! failed exit is checked again every `recheck_failed_secs` and returns when
//! a check succeeds.
//!
//! Triggers: the API and CLI, rotation links, schedules per device or label
//! (interval with jitter), and "after N requests". The [`run`] loop drives
//! the automatic ones, flushes exit counters and prunes telemetry.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rand::Rng;
use shared::wire::{CommandDetail, CommandKind};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use crate::registry::{CommandError, DeviceSession, ExitPhase, ExitState};
use crate::state::State;
use crate::store::{DeviceRow, LabelRotation, RotationRow, StoreError, now_ms};

/// Time an agent has to answer an address check.
const CHECK_TIMEOUT: Duration = Duration::from_secs(20);

#[derive(Debug, thiserror::Error)]
pub enum RotateError {
    #[error("{0}")]
    NotFound(String),
    /// The request cannot run now (already rotating, rotation disabled, no
    /// backend, several exits and none named).
    #[error("{0}")]
    Conflict(String),
    #[error("{0}")]
    Offline(String),
    /// The rotation ran and failed; the record says why.
    #[error("rotation failed: {}", .0.error.as_deref().unwrap_or("unknown error"))]
    Failed(Box<RotationRow>),
    #[error(transparent)]
    Store(#[from] StoreError),
}

type ExitKey = (String, String);

/// (device, exit, cause) for the background loop; cause `check` reads the
/// address instead of rotating.
type Trigger = (String, String, &'static str);

/// Automatic-rotation settings of one exit, resolved from its device and
/// labels.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Schedule {
    pub every_secs: Option<u64>,
    pub jitter_secs: u64,
    pub after_requests: Option<u64>,
}

/// Rotation bookkeeping shared by every trigger.
#[derive(Default)]
pub struct Rotator {
    inflight: Mutex<HashSet<ExitKey>>,
    schedules: Mutex<HashMap<String, Schedule>>,
    next_due: Mutex<HashMap<ExitKey, Instant>>,
    /// Per device: rotate after this many requests (0: never), read on the
    /// hot path.
    after_requests: Mutex<HashMap<String, Arc<AtomicU64>>>,
    triggers: Mutex<Option<mpsc::UnboundedSender<Trigger>>>,
    /// Customers whose month usage the limiter has been told.
    quota_loaded: Mutex<HashSet<String>>,
}

struct Inflight<'a> {
    rotator: &'a Rotator,
    key: ExitKey,
}

impl Drop for Inflight<'_> {
    fn drop(&mut self) {
        if let Ok(mut s) = self.rotator.inflight.lock() {
            s.remove(&self.key);
        }
    }
}

impl Rotator {
    fn begin(&self, key: ExitKey) -> Option<Inflight<'_>> {
        let mut s = self.inflight.lock().unwrap_or_else(|e| e.into_inner());
        if !s.insert(key.clone()) {
            return None;
        }
        Some(Inflight { rotator: self, key })
    }

    pub fn is_rotating(&self, device_id: &str, exit: &str) -> bool {
        self.inflight
            .lock()
            .map(|s| s.contains(&(device_id.to_string(), exit.to_string())))
            .unwrap_or(false)
    }

    fn after_requests_of(&self, device_id: &str) -> u64 {
        self.after_requests
            .lock()
            .ok()
            .and_then(|m| m.get(device_id).map(|a| a.load(Ordering::Relaxed)))
            .unwrap_or(0)
    }

    fn reschedule(&self, key: &ExitKey) {
        let sched = self
            .schedules
            .lock()
            .ok()
            .and_then(|m| m.get(&key.0).copied())
            .unwrap_or_default();
        let mut due = self.next_due.lock().unwrap_or_else(|e| e.into_inner());
        match sched.every_secs {
            Some(every) => {
                due.insert(
                    key.clone(),
                    Instant::now() + jittered(every, sched.jitter_secs),
                );
            }
            None => {
                due.remove(key);
            }
        }
    }
}

/// `every` ± up to `jitter` seconds, never below one second.
pub fn jittered(every: u64, jitter: u64) -> Duration {
    let j = jitter.min(every.saturating_sub(1));
    let secs = if j == 0 {
        every
    } else {
        rand::rng().random_range(every - j..=every + j)
    };
    Duration::from_secs(secs.max(1))
}

/// The schedule of a device: its own settings, else the first of its
/// labels (by label name) that has a policy.
pub fn resolve_schedule(
    device: &DeviceRow,
    labels: &[LabelRotation],
    default_every: u64,
) -> Schedule {
    if !device.rotation.enabled {
        return Schedule::default();
    }
    let own = &device.rotation;
    let to_u = |v: Option<i64>| v.filter(|x| *x > 0).map(|x| x as u64);
    if own.every_secs.is_some() || own.after_requests.is_some() {
        return Schedule {
            every_secs: to_u(own.every_secs),
            jitter_secs: to_u(own.jitter_secs).unwrap_or(0),
            after_requests: to_u(own.after_requests),
        };
    }
    let mut mine: Vec<&LabelRotation> = labels
        .iter()
        .filter(|l| device.labels.contains(&l.label))
        .collect();
    mine.sort_by(|a, b| a.label.cmp(&b.label));
    match mine.first() {
        Some(l) => Schedule {
            // A label policy with only a jitter still means "on schedule".
            every_secs: to_u(l.every_secs).or_else(|| {
                (l.after_requests.is_none() && l.jitter_secs.is_some()).then_some(default_every)
            }),
            jitter_secs: to_u(l.jitter_secs).unwrap_or(0),
            after_requests: to_u(l.after_requests),
        },
        None => Schedule::default(),
    }
}

/// Called for every flow routed to `exit`: starts a rotation once the
/// exit's device asks for one every N requests.
pub fn note_request(state: &State, exit: &ExitState) {
    let n = state.rotator.after_requests_of(&exit.device_id);
    if n > 0 && exit.since_rotation.load(Ordering::Relaxed) >= n {
        trigger(state, &exit.device_id, &exit.name, "requests");
    }
}

/// Ask the background loop to rotate an exit (automatic triggers).
pub fn trigger(state: &State, device_id: &str, exit: &str, cause: &'static str) {
    if state.rotator.is_rotating(device_id, exit) {
        return;
    }
    if let Ok(g) = state.rotator.triggers.lock()
        && let Some(tx) = g.as_ref()
    {
        let _ = tx.send((device_id.to_string(), exit.to_string(), cause));
    }
}

/// A device connected: learn its exits' addresses in the background.
pub fn session_started(state: &State, session: &Arc<DeviceSession>) {
    let Ok(g) = state.rotator.triggers.lock() else {
        return;
    };
    if let Some(tx) = g.as_ref() {
        for e in &session.exits {
            let _ = tx.send((session.device_id.clone(), e.name.clone(), "check"));
        }
    }
}

/// Read an exit's public address through its uplink and record it.
pub async fn check_ip(state: &State, device_id: &str, exit: &str) -> Result<String, String> {
    let session = state
        .registry
        .get(device_id)
        .ok_or_else(|| "device is offline".to_string())?;
    let id = state.registry.next_command_id();
    let r = session
        .command(
            id,
            CommandKind::CheckIp {
                exit: exit.to_string(),
            },
            CHECK_TIMEOUT,
        )
        .await
        .map_err(|e| e.to_string())?;
    let ip = match (r.ok, r.detail) {
        (true, Some(CommandDetail::Ip { ip, .. })) => ip,
        (true, _) => return Err("the agent answered without an address".into()),
        (false, _) => return Err(r.message),
    };
    if let Some(e) = state.registry.exit(device_id, exit) {
        e.set_external_ip(Some(ip.clone()));
    }
    if let Err(e) = state.store.exit_ip_seen(device_id, exit, &ip).await {
        warn!("recording the address of {device_id}/{exit} failed: {e}");
    }
    exit_verified(state, device_id, exit);
    Ok(ip)
}

/// What one attempt produced.
struct Attempt {
    ip: Option<String>,
    backend_ms: u64,
}

/// Run rung `rung` on the device and read the new address. When the tunnel
/// drops during the step (an outage longer than the idle timeout), wait
/// for the device to come back and read the address then.
async fn attempt(
    state: &State,
    device_id: &str,
    exit: &str,
    rung: u8,
    limit: Duration,
) -> Result<Attempt, String> {
    let deadline = Instant::now() + limit;
    let session = state
        .registry
        .get(device_id)
        .ok_or_else(|| "device is offline".to_string())?;
    let id = state.registry.next_command_id();
    // The agent gets a little less than our limit, so that its answer (a
    // clean failure) arrives before we give up waiting.
    let kind = CommandKind::Rotate {
        exit: exit.to_string(),
        rung,
        limit_ms: limit.saturating_sub(Duration::from_secs(2)).as_millis() as u32,
    };
    match session.command(id, kind, limit).await {
        Ok(r) => {
            let (ip, backend_ms) = match r.detail {
                Some(CommandDetail::Rotated { ip, backend_ms, .. }) => (ip, u64::from(backend_ms)),
                _ => (None, 0),
            };
            if !r.ok {
                return Err(r.message);
            }
            if let Some(ip) = &ip {
                if let Some(e) = state.registry.exit(device_id, exit) {
                    e.set_external_ip(Some(ip.clone()));
                }
                if let Err(e) = state.store.exit_ip_seen(device_id, exit, ip).await {
                    warn!("recording the address of {device_id}/{exit} failed: {e}");
                }
            }
            Ok(Attempt { ip, backend_ms })
        }
        Err(CommandError::Lost | CommandError::Offline) => {
            info!(
                device = device_id,
                exit, "tunnel dropped during the step; waiting for the device"
            );
            let started = Instant::now();
            loop {
                if let Some(s) = state.registry.get(device_id)
                    && s.session_id != session.session_id
                {
                    break;
                }
                if Instant::now() >= deadline {
                    return Err("the device did not reconnect after the step".into());
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            let ip = check_ip(state, device_id, exit).await?;
            Ok(Attempt {
                ip: Some(ip),
                backend_ms: started.elapsed().as_millis() as u64,
            })
        }
        Err(e @ CommandError::Timeout(_)) => Err(e.to_string()),
    }
}

/// Rotate one exit of a device and wait for the outcome. `exit` may be
/// omitted when the device has exactly one.
pub async fn rotate(
    state: &State,
    device_id: &str,
    exit: Option<&str>,
    cause: &str,
) -> Result<RotationRow, RotateError> {
    let device = state
        .store
        .device(device_id)
        .await?
        .ok_or_else(|| RotateError::NotFound(format!("no device {device_id}")))?;
    if device.disabled {
        return Err(RotateError::Conflict(format!(
            "device {device_id} is disabled"
        )));
    }
    if device.maintenance && cause != "api" && cause != "cli" {
        return Err(RotateError::Conflict(format!(
            "device {device_id} is in maintenance; only administrators rotate it"
        )));
    }
    if !device.rotation.enabled {
        return Err(RotateError::Conflict(format!(
            "rotation is disabled for device {device_id} (enable it with PUT /api/v1/devices/{device_id}/rotation)"
        )));
    }
    let session = state
        .registry
        .get(device_id)
        .ok_or_else(|| RotateError::Offline(format!("device {device_id} is offline")))?;
    let names = || {
        session
            .exits
            .iter()
            .map(|e| e.name.as_str())
            .collect::<Vec<_>>()
            .join(", ")
    };
    let exit = match exit {
        Some(n) => session.exit(n).cloned().ok_or_else(|| {
            RotateError::NotFound(format!(
                "device {device_id} has no exit {n:?} (exits: {})",
                names()
            ))
        })?,
        None if session.exits.len() == 1 => session.exits[0].clone(),
        None => {
            return Err(RotateError::Conflict(format!(
                "device {device_id} has {} exits ({}); name the one to rotate",
                session.exits.len(),
                names()
            )));
        }
    };
    drop(session);
    let (method, ladder) = {
        let i = exit.info.read().unwrap_or_else(|e| e.into_inner());
        (i.method.clone(), i.ladder.clone())
    };
    if ladder.is_empty() {
        return Err(RotateError::Conflict(format!(
            "exit {} of device {device_id} has no rotation backend configured (set [exit.rotation] in the agent's configuration)",
            exit.name
        )));
    }
    let key = (device_id.to_string(), exit.name.clone());
    let Some(_inflight) = state.rotator.begin(key.clone()) else {
        return Err(RotateError::Conflict(format!(
            "a rotation of {device_id}/{} is already running",
            exit.name
        )));
    };
    let cfg = &state.cfg.rotation;
    let started = Instant::now();
    let started_at = now_ms();
    info!(device = device_id, exit = %exit.name, cause, "rotation requested");

    let mut old_ip = exit.external_ip();
    if old_ip.is_none() {
        old_ip = check_ip(state, device_id, &exit.name).await.ok();
    }
    let recent = state
        .store
        .recent_ips(device_id, &exit.name, i64::from(cfg.recent_ips))
        .await
        .unwrap_or_default();

    // Drain.
    exit.set_phase(ExitPhase::Draining);
    let grace = Duration::from_secs(cfg.drain_grace_secs);
    let drain_started = Instant::now();
    while exit.active_flows.load(Ordering::Relaxed) > 0 && drain_started.elapsed() < grace {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let drain_ms = drain_started.elapsed().as_millis() as i64;
    let left = exit.active_flows.load(Ordering::Relaxed);
    if left > 0 {
        info!(device = device_id, exit = %exit.name, flows = left, "grace period over; rotating with flows still open");
    }

    // Rotate and verify, escalating.
    exit.set_phase(ExitPhase::Rotating);
    let mut rungs = Vec::new();
    let mut backend_ms = 0u64;
    let mut new_ip = None;
    let mut errors: Vec<String> = Vec::new();
    let limit = Duration::from_secs(cfg.attempt_timeout_secs);
    let mut attempts = 0;
    for n in 1..=cfg.attempts {
        attempts = n;
        let rung = ((n - 1) as usize).min(ladder.len() - 1);
        rungs.push(ladder[rung].clone());
        match attempt(state, device_id, &exit.name, rung as u8, limit).await {
            Ok(a) => {
                backend_ms += a.backend_ms;
                match a.ip {
                    Some(ip) if old_ip.as_deref() == Some(ip.as_str()) => errors.push(format!(
                        "attempt {n} ({}): the public address stayed {ip}",
                        ladder[rung]
                    )),
                    Some(ip) if recent.contains(&ip) => errors.push(format!(
                        "attempt {n} ({}): the new address {ip} is one of the exit's last {} addresses",
                        ladder[rung], cfg.recent_ips
                    )),
                    Some(ip) => {
                        new_ip = Some(ip);
                        break;
                    }
                    None => errors.push(format!(
                        "attempt {n} ({}): the public address could not be read after the step",
                        ladder[rung]
                    )),
                }
            }
            Err(e) => errors.push(format!("attempt {n} ({}): {e}", ladder[rung])),
        }
        warn!(device = device_id, exit = %exit.name, "{}", errors.last().map(String::as_str).unwrap_or(""));
        if n < cfg.attempts {
            tokio::time::sleep(Duration::from_secs(cfg.retry_delay_secs)).await;
        }
    }

    let success = new_ip.is_some();
    let error = (!success).then(|| errors.join("; "));
    if success {
        exit.since_rotation.store(0, Ordering::Relaxed);
        exit.set_reason(None);
        exit.set_phase(ExitPhase::Ready);
        let _ = state
            .store
            .set_exit_state(device_id, &exit.name, "ready", None)
            .await;
    } else {
        // Back in the pool only if the uplink is verified to work.
        let why = error.clone().unwrap_or_default();
        match check_ip(state, device_id, &exit.name).await {
            Ok(ip) => {
                info!(device = device_id, exit = %exit.name, %ip, "rotation failed but the exit works; back in the pool");
                exit.set_reason(Some(format!("last rotation failed: {why}")));
                exit.set_phase(ExitPhase::Ready);
                let _ = state
                    .store
                    .set_exit_state(device_id, &exit.name, "ready", None)
                    .await;
            }
            Err(e) => {
                let reason = format!("{why}; the address check afterwards failed: {e}");
                warn!(device = device_id, exit = %exit.name, "exit failed: {reason}");
                exit.set_reason(Some(reason.clone()));
                exit.set_phase(ExitPhase::Failed);
                let _ = state
                    .store
                    .set_exit_state(device_id, &exit.name, "failed", Some(&reason))
                    .await;
            }
        }
    }
    let row = RotationRow {
        id: format!("rot-{}", hex::encode(rand::random::<[u8; 6]>())),
        device_id: device_id.to_string(),
        exit: exit.name.clone(),
        cause: cause.to_string(),
        method,
        rungs,
        attempts: i64::from(attempts),
        old_ip,
        new_ip,
        outcome: if success { "success" } else { "failed" }.into(),
        error,
        drain_ms,
        backend_ms: backend_ms as i64,
        duration_ms: started.elapsed().as_millis() as i64,
        started_at,
        finished_at: now_ms(),
    };
    if let Err(e) = state.store.insert_rotation(&row).await {
        warn!("storing the rotation record failed: {e}");
    }
    state.rotator.reschedule(&key);
    info!(
        device = device_id, exit = %row.exit, outcome = %row.outcome, attempts = row.attempts,
        old_ip = ?row.old_ip, new_ip = ?row.new_ip, duration_ms = row.duration_ms, "rotation finished"
    );
    if success {
        Ok(row)
    } else {
        Err(RotateError::Failed(Box::new(row)))
    }
}

/// Automatic rotations, failed-exit rechecks, counter flushes and
/// telemetry pruning, until `shutdown`; flushes counters once more at the
/// end.
pub async fn run(state: Arc<State>, shutdown: CancellationToken) {
    let (tx, mut rx) = mpsc::unbounded_channel();
    if let Ok(mut g) = state.rotator.triggers.lock() {
        *g = Some(tx);
    }
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    let flush_every = Duration::from_secs(state.cfg.fleet.counters_flush_secs);
    let recheck_every = Duration::from_secs(state.cfg.rotation.recheck_failed_secs);
    let mut last_flush = Instant::now();
    let mut last_policies: Option<Instant> = None;
    let mut last_recheck = Instant::now();
    let mut last_prune: Option<Instant> = None;
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => break,
            Some((device, exit, cause)) = rx.recv() => {
                let st = state.clone();
                state.tasks.spawn(async move {
                    if cause == "check" {
                        if let Err(e) = check_ip(&st, &device, &exit).await {
                            debug!(%device, %exit, "address check failed: {e}");
                        }
                        return;
                    }
                    match rotate(&st, &device, Some(&exit), cause).await {
                        Ok(_) => {}
                        Err(RotateError::Failed(_)) => {}
                        Err(e) => debug!(%device, %exit, cause, "rotation not started: {e}"),
                    }
                });
            }
            _ = tick.tick() => {
                if last_policies.is_none_or(|t| t.elapsed() >= Duration::from_secs(5)) {
                    last_policies = Some(Instant::now());
                    if let Err(e) = refresh_policies(&state).await {
                        warn!("loading rotation policies failed: {e}");
                    }
                }
                due_rotations(&state);
                state.limiter.tick(crate::limits::Now::system());
                crate::webhooks::dispatch(&state, state.limiter.take_events());
                crate::proxy::allowlist::tick(&state);
                if last_recheck.elapsed() >= recheck_every {
                    last_recheck = Instant::now();
                    recheck_failed(&state);
                }
                if last_flush.elapsed() >= flush_every {
                    last_flush = Instant::now();
                    flush_counters(&state).await;
                    flush_usage(&state).await;
                    match state.store.expire_commands(now_ms()).await {
                        Ok(n) if n > 0 => info!(commands = n, "commands expired without a result"),
                        Ok(_) => {}
                        Err(e) => warn!("expiring commands failed: {e}"),
                    }
                }
                if last_prune.is_none_or(|t| t.elapsed() >= Duration::from_secs(3600)) {
                    last_prune = Some(Instant::now());
                    let keep = state.cfg.fleet.telemetry_retention_hours as i64 * 3_600_000;
                    match state.store.prune_telemetry(now_ms() - keep).await {
                        Ok(n) if n > 0 => info!(rows = n, "pruned old telemetry"),
                        Ok(_) => {}
                        Err(e) => warn!("pruning telemetry failed: {e}"),
                    }
                    let keep = state.cfg.fleet.request_log_retention_days as i64 * 86_400_000;
                    match state.store.prune_request_log(now_ms() - keep).await {
                        Ok(n) if n > 0 => info!(rows = n, "pruned old request-log rows"),
                        Ok(_) => {}
                        Err(e) => warn!("pruning the request log failed: {e}"),
                    }
                }
            }
        }
    }
    flush_counters(&state).await;
    flush_usage(&state).await;
}

/// Write the usage table and the request log; on failure keep them for the
/// next flush.
pub async fn flush_usage(state: &State) {
    let (usage, log) = state.usage.take();
    if usage.is_empty() && log.is_empty() {
        return;
    }
    if let Err(e) = state.store.add_usage(&usage).await {
        warn!("writing usage failed (kept for the next flush): {e}");
        state.usage.restore(usage, log);
        return;
    }
    if let Err(e) = state.store.insert_request_log(&log).await {
        warn!("writing the request log failed (kept for the next flush): {e}");
        state.usage.restore(Vec::new(), log);
    }
}

async fn refresh_policies(state: &State) -> Result<(), StoreError> {
    let plans = state.store.plans().await?;
    if let Ok(mut m) = state.plans.write() {
        *m = plans
            .into_iter()
            .map(|p| (p.id.clone(), Arc::new(p)))
            .collect();
    }
    load_quotas(state).await?;
    let devices = state.store.devices().await?;
    let labels = state.store.label_rotations().await?;
    let default_every = state.cfg.rotation.default_every_secs;
    let mut schedules = HashMap::new();
    for d in &devices {
        let s = resolve_schedule(d, &labels, default_every);
        state.registry.set_maintenance(&d.id, d.maintenance);
        state
            .registry
            .set_attrs(&d.id, crate::routing::DeviceAttrs::of(d));
        {
            let mut m = state
                .rotator
                .after_requests
                .lock()
                .unwrap_or_else(|e| e.into_inner());
            m.entry(d.id.clone())
                .or_default()
                .store(s.after_requests.unwrap_or(0), Ordering::Relaxed);
        }
        schedules.insert(d.id.clone(), s);
    }
    let changed: Vec<String> = {
        let mut old = state
            .rotator
            .schedules
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        let changed = schedules
            .iter()
            .filter(|(id, s)| old.get(*id) != Some(s))
            .map(|(id, _)| id.clone())
            .collect();
        *old = schedules;
        changed
    };
    // A new or changed schedule starts counting now.
    for id in changed {
        for e in state.registry.device_exits(&id) {
            state.rotator.reschedule(&(id.clone(), e.name.clone()));
        }
    }
    Ok(())
}

/// Tell the limiter each quota customer's usage this month, once per
/// customer and process (it counts from there).
async fn load_quotas(state: &State) -> Result<(), StoreError> {
    let customers = state.store.customers().await?;
    let month_day = crate::usage::day_of(crate::store::month_start_ms(now_ms()));
    for c in customers.iter().filter(|c| c.parent_id.is_none()) {
        let plan = state.plan_for(c.plan_id.as_deref());
        if plan.limits.quota_bytes.is_none()
            || state
                .rotator
                .quota_loaded
                .lock()
                .map(|s| s.contains(&c.id))
                .unwrap_or(true)
        {
            continue;
        }
        let used = state.store.customer_bytes_since(&c.id, month_day).await? + {
            let p = state.usage.pending_of(&c.id);
            p.bytes_up + p.bytes_down
        };
        state
            .limiter
            .load_usage(&c.id, &plan.limits, used, crate::limits::Now::system());
        if let Ok(mut s) = state.rotator.quota_loaded.lock() {
            s.insert(c.id.clone());
        }
    }
    Ok(())
}

fn due_rotations(state: &State) {
    let now = Instant::now();
    let due: Vec<ExitKey> = {
        let m = state
            .rotator
            .next_due
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        m.iter()
            .filter(|(_, at)| **at <= now)
            .map(|(k, _)| k.clone())
            .collect()
    };
    for key in due {
        let online = state.registry.get(&key.0).is_some();
        let has_ladder = state
            .registry
            .exit(&key.0, &key.1)
            .map(|e| e.info.read().map(|i| !i.ladder.is_empty()).unwrap_or(false))
            .unwrap_or(false);
        // Next slot either way; an offline device is not rotated late.
        state.rotator.reschedule(&key);
        if online && has_ladder {
            trigger(state, &key.0, &key.1, "schedule");
        }
    }
}

fn recheck_failed(state: &State) {
    for e in state.registry.all_exits() {
        if e.phase() != ExitPhase::Failed || state.rotator.is_rotating(&e.device_id, &e.name) {
            continue;
        }
        if state.registry.get(&e.device_id).is_none() {
            continue;
        }
        let Ok(g) = state.rotator.triggers.lock() else {
            return;
        };
        let _ = g
            .as_ref()
            .map(|tx| tx.send((e.device_id.clone(), e.name.clone(), "check")));
    }
}

/// After a successful check, a failed exit returns to the pool.
pub fn exit_verified(state: &State, device_id: &str, exit: &str) {
    if let Some(e) = state.registry.exit(device_id, exit)
        && e.transition(ExitPhase::Failed, ExitPhase::Ready)
    {
        info!(
            device = device_id,
            exit, "address verified; exit back in the pool"
        );
        e.set_reason(None);
    }
}

/// Write counter deltas of every exit to the database.
pub async fn flush_counters(state: &State) {
    for e in state.registry.all_exits() {
        let now = e.counters();
        let before = e.flushed.lock().map(|g| *g).unwrap_or_default();
        let delta = now.minus(&before);
        if delta.is_zero() {
            continue;
        }
        let ip = e.external_ip();
        match state
            .store
            .add_exit_counters(&e.device_id, &e.name, &delta, ip.as_deref())
            .await
        {
            Ok(()) => {
                if let Ok(mut g) = e.flushed.lock() {
                    *g = now;
                }
            }
            Err(e) => warn!("flushing exit counters failed: {e}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::DeviceRotation;

    fn device(labels: &[&str], rotation: DeviceRotation) -> DeviceRow {
        DeviceRow {
            id: "dev-1".into(),
            name: "d".into(),
            cert_fingerprint: String::new(),
            disabled: false,
            kind: "linux".into(),
            model: String::new(),
            hostname: String::new(),
            agent_version: String::new(),
            last_addr: None,
            last_seen_at: None,
            connects: 0,
            created_at: 0,
            operator: String::new(),
            region: String::new(),
            country: String::new(),
            labels: labels.iter().map(|s| s.to_string()).collect(),
            maintenance: false,
            rotation,
        }
    }

    fn enabled() -> DeviceRotation {
        DeviceRotation {
            enabled: true,
            ..DeviceRotation::default()
        }
    }

    #[test]
    fn device_settings_win_over_labels() {
        let labels = vec![LabelRotation {
            label: "fast".into(),
            every_secs: Some(60),
            jitter_secs: None,
            after_requests: None,
        }];
        let d = device(&["fast"], enabled());
        assert_eq!(
            resolve_schedule(&d, &labels, 600).every_secs,
            Some(60),
            "label policy applies"
        );
        let own = device(
            &["fast"],
            DeviceRotation {
                enabled: true,
                every_secs: Some(300),
                jitter_secs: Some(30),
                after_requests: None,
            },
        );
        let s = resolve_schedule(&own, &labels, 600);
        assert_eq!((s.every_secs, s.jitter_secs), (Some(300), 30));
        let off = device(
            &["fast"],
            DeviceRotation {
                enabled: false,
                every_secs: Some(300),
                ..DeviceRotation::default()
            },
        );
        assert_eq!(resolve_schedule(&off, &labels, 600), Schedule::default());
        assert_eq!(
            resolve_schedule(&device(&["other"], enabled()), &labels, 600),
            Schedule::default()
        );
    }

    #[test]
    fn after_requests_alone_has_no_interval() {
        let d = device(
            &[],
            DeviceRotation {
                enabled: true,
                after_requests: Some(100),
                ..DeviceRotation::default()
            },
        );
        let s = resolve_schedule(&d, &[], 600);
        assert_eq!((s.every_secs, s.after_requests), (None, Some(100)));
    }

    #[test]
    fn jitter_stays_in_range() {
        for _ in 0..200 {
            let d = jittered(600, 60).as_secs();
            assert!((540..=660).contains(&d), "{d}");
        }
        assert!(jittered(5, 100).as_secs() >= 1);
        assert_eq!(jittered(10, 0), Duration::from_secs(10));
    }
}
