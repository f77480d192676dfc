//! Live fleet state: which devices are connected right now, their exits
//! (one per uplink) with their routing state and counters, commands in
//! flight to each device, and the round-robin choice of an exit.
//!
//! An exit's state outlives the device's sessions: a rotation that makes the
//! agent reconnect finds the same [`ExitState`] (draining, rotating, its
//! counters) when the device comes back.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU8, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use serde::Serialize;

use crate::routing::DeviceAttrs;
use shared::wire::{Command, CommandKind, CommandResult, ExitInfo, Heartbeat, Telemetry};
use tokio::sync::{mpsc, oneshot};

/// Where an exit stands for routing.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
#[repr(u8)]
pub enum ExitPhase {
    /// Takes new flows (when its device is online and not in maintenance).
    Ready = 0,
    /// No new flows; in-flight flows get a grace period before a rotation.
    Draining = 1,
    /// The device is changing the exit's address.
    Rotating = 2,
    /// A rotation failed and the exit's address could not be verified; out
    /// of the pool until a check succeeds.
    Failed = 3,
}

impl ExitPhase {
    fn from_u8(v: u8) -> Self {
        match v {
            1 => ExitPhase::Draining,
            2 => ExitPhase::Rotating,
            3 => ExitPhase::Failed,
            _ => ExitPhase::Ready,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            ExitPhase::Ready => "ready",
            ExitPhase::Draining => "draining",
            ExitPhase::Rotating => "rotating",
            ExitPhase::Failed => "failed",
        }
    }
}

/// One exit of a device: routing state and hot counters.
pub struct ExitState {
    pub device_id: String,
    pub name: String,
    pub info: RwLock<ExitInfo>,
    phase: AtomicU8,
    /// Why the exit is failed, or what the last rotation reported.
    pub reason: Mutex<Option<String>>,
    /// Set from the device's maintenance flag.
    pub maintenance: AtomicBool,
    /// The uplink's link state as the last heartbeat said.
    pub link_up: AtomicBool,
    pub external_ip: Mutex<Option<String>>,
    pub telemetry: Mutex<Option<Telemetry>>,
    pub active_flows: AtomicU32,
    /// Flows opened (attempts), successful opens, failed opens.
    pub requests: AtomicU64,
    pub successes: AtomicU64,
    pub failures: AtomicU64,
    /// Sum of successful open times, milliseconds.
    pub open_ms_total: AtomicU64,
    pub bytes_up: AtomicU64,
    pub bytes_down: AtomicU64,
    /// Flows since the last rotation ("rotate after N requests").
    pub since_rotation: AtomicU64,
    /// Counter values already written to the database.
    pub flushed: Mutex<Counters>,
    /// The device's attributes routing filters look at.
    attrs: RwLock<Arc<DeviceAttrs>>,
}

/// A snapshot of an exit's counters.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct Counters {
    pub requests: u64,
    pub successes: u64,
    pub failures: u64,
    pub open_ms_total: u64,
    pub bytes_up: u64,
    pub bytes_down: u64,
}

impl Counters {
    pub fn minus(&self, earlier: &Counters) -> Counters {
        Counters {
            requests: self.requests.saturating_sub(earlier.requests),
            successes: self.successes.saturating_sub(earlier.successes),
            failures: self.failures.saturating_sub(earlier.failures),
            open_ms_total: self.open_ms_total.saturating_sub(earlier.open_ms_total),
            bytes_up: self.bytes_up.saturating_sub(earlier.bytes_up),
            bytes_down: self.bytes_down.saturating_sub(earlier.bytes_down),
        }
    }

    pub fn is_zero(&self) -> bool {
        *self == Counters::default()
    }
}

impl ExitState {
    pub fn new(device_id: &str, info: ExitInfo) -> Self {
        Self {
            device_id: device_id.to_string(),
            name: info.name.clone(),
            info: RwLock::new(info),
            phase: AtomicU8::new(ExitPhase::Ready as u8),
            reason: Mutex::new(None),
            maintenance: AtomicBool::new(false),
            link_up: AtomicBool::new(true),
            external_ip: Mutex::new(None),
            telemetry: Mutex::new(None),
            active_flows: AtomicU32::new(0),
            requests: AtomicU64::new(0),
            successes: AtomicU64::new(0),
            failures: AtomicU64::new(0),
            open_ms_total: AtomicU64::new(0),
            bytes_up: AtomicU64::new(0),
            bytes_down: AtomicU64::new(0),
            since_rotation: AtomicU64::new(0),
            flushed: Mutex::new(Counters::default()),
            attrs: RwLock::new(Arc::new(DeviceAttrs::default())),
        }
    }

    pub fn attrs(&self) -> Arc<DeviceAttrs> {
        self.attrs
            .read()
            .map(|a| a.clone())
            .unwrap_or_else(|e| e.into_inner().clone())
    }

    pub fn phase(&self) -> ExitPhase {
        ExitPhase::from_u8(self.phase.load(Ordering::Acquire))
    }

    pub fn set_phase(&self, p: ExitPhase) {
        self.phase.store(p as u8, Ordering::Release);
    }

    /// Move from `from` to `to`; false when the exit was not in `from`.
    pub fn transition(&self, from: ExitPhase, to: ExitPhase) -> bool {
        self.phase
            .compare_exchange(from as u8, to as u8, Ordering::AcqRel, Ordering::Acquire)
            .is_ok()
    }

    /// Whether new flows may go here (the device's session is checked by
    /// the caller).
    pub fn available(&self) -> bool {
        self.phase() == ExitPhase::Ready
            && !self.maintenance.load(Ordering::Relaxed)
            && self.link_up.load(Ordering::Relaxed)
    }

    pub fn counters(&self) -> Counters {
        Counters {
            requests: self.requests.load(Ordering::Relaxed),
            successes: self.successes.load(Ordering::Relaxed),
            failures: self.failures.load(Ordering::Relaxed),
            open_ms_total: self.open_ms_total.load(Ordering::Relaxed),
            bytes_up: self.bytes_up.load(Ordering::Relaxed),
            bytes_down: self.bytes_down.load(Ordering::Relaxed),
        }
    }

    pub fn external_ip(&self) -> Option<String> {
        self.external_ip.lock().ok().and_then(|g| g.clone())
    }

    pub fn set_external_ip(&self, ip: Option<String>) {
        if let Ok(mut g) = self.external_ip.lock() {
            *g = ip;
        }
    }

    pub fn reason(&self) -> Option<String> {
        self.reason.lock().ok().and_then(|g| g.clone())
    }

    pub fn set_reason(&self, r: Option<String>) {
        if let Ok(mut g) = self.reason.lock() {
            *g = r;
        }
    }

    pub fn view(&self, online: bool) -> ExitView {
        let info = self
            .info
            .read()
            .map(|i| i.clone())
            .unwrap_or_else(|e| e.into_inner().clone());
        let status = if !online {
            "offline"
        } else if self.maintenance.load(Ordering::Relaxed) {
            "maintenance"
        } else if !self.link_up.load(Ordering::Relaxed) && self.phase() == ExitPhase::Ready {
            "link_down"
        } else {
            self.phase().as_str()
        };
        let c = self.counters();
        ExitView {
            name: self.name.clone(),
            interface: info.interface,
            method: info.method,
            ladder: info.ladder,
            status,
            reason: self.reason(),
            external_ip: self.external_ip(),
            active_flows: self.active_flows.load(Ordering::Relaxed),
            avg_open_ms: if c.successes > 0 {
                Some(c.open_ms_total as f64 / c.successes as f64)
            } else {
                None
            },
            counters: c,
            telemetry: self.telemetry.lock().ok().and_then(|g| g.clone()),
        }
    }
}

/// What the API shows about an exit.
#[derive(Debug, Clone, Serialize)]
pub struct ExitView {
    pub name: String,
    pub interface: Option<String>,
    pub method: String,
    pub ladder: Vec<String>,
    /// offline | maintenance | link_down | ready | draining | rotating | failed
    pub status: &'static str,
    pub reason: Option<String>,
    pub external_ip: Option<String>,
    pub active_flows: u32,
    pub avg_open_ms: Option<f64>,
    /// Since the control plane started (the database holds the totals).
    pub counters: Counters,
    pub telemetry: Option<Telemetry>,
}

/// A command waiting for the agent's result.
pub type Pending = oneshot::Sender<CommandResult>;

/// One connected device.
pub struct DeviceSession {
    pub device_id: String,
    pub name: String,
    /// Distinguishes a reconnect of the same device from its old session.
    pub session_id: u64,
    pub conn: quinn::Connection,
    pub agent_version: String,
    pub connected_at_ms: i64,
    pub active_flows: AtomicU32,
    pub total_flows: AtomicU64,
    /// Customer → target bytes.
    pub bytes_up: AtomicU64,
    /// Target → customer bytes.
    pub bytes_down: AtomicU64,
    pub last_heartbeat: Mutex<Option<(i64, Heartbeat)>>,
    pub exits: Vec<Arc<ExitState>>,
    /// Commands for the session's control stream.
    pub commands: mpsc::Sender<(Command, Pending)>,
}

#[derive(Debug, thiserror::Error)]
pub enum CommandError {
    #[error("device is offline")]
    Offline,
    #[error("the device's tunnel closed before it answered")]
    Lost,
    #[error("no answer from the device within {0:?}")]
    Timeout(Duration),
}

impl DeviceSession {
    pub fn exit(&self, name: &str) -> Option<&Arc<ExitState>> {
        self.exits.iter().find(|e| e.name == name)
    }

    /// Send a command on the control stream and wait for its result.
    pub async fn command(
        &self,
        id: String,
        kind: CommandKind,
        timeout: Duration,
    ) -> Result<CommandResult, CommandError> {
        let (tx, rx) = oneshot::channel();
        self.commands
            .send((Command { id, kind }, tx))
            .await
            .map_err(|_| CommandError::Offline)?;
        match tokio::time::timeout(timeout, rx).await {
            Ok(Ok(r)) => Ok(r),
            Ok(Err(_)) => Err(CommandError::Lost),
            Err(_) => Err(CommandError::Timeout(timeout)),
        }
    }

    pub fn live_info(&self) -> LiveInfo {
        let hb = self.last_heartbeat.lock().ok().and_then(|g| g.clone());
        LiveInfo {
            session_id: self.session_id,
            remote_addr: self.conn.remote_address(),
            agent_version: self.agent_version.clone(),
            connected_at: self.connected_at_ms,
            active_flows: self.active_flows.load(Ordering::Relaxed),
            total_flows: self.total_flows.load(Ordering::Relaxed),
            bytes_up: self.bytes_up.load(Ordering::Relaxed),
            bytes_down: self.bytes_down.load(Ordering::Relaxed),
            rtt_ms: self.conn.rtt().as_secs_f64() * 1000.0,
            last_heartbeat_at: hb.as_ref().map(|(t, _)| *t),
            heartbeat: hb.map(|(_, h)| HeartbeatView {
                seq: h.seq,
                active_flows: h.active_flows,
                load: f64::from(h.load_centi) / 100.0,
                uptime_s: h.uptime_s,
                bytes_up: h.bytes_up,
                bytes_down: h.bytes_down,
            }),
        }
    }
}

/// What the API shows about a live session.
#[derive(Debug, Clone, Serialize)]
pub struct LiveInfo {
    pub session_id: u64,
    pub remote_addr: SocketAddr,
    pub agent_version: String,
    pub connected_at: i64,
    pub active_flows: u32,
    pub total_flows: u64,
    pub bytes_up: u64,
    pub bytes_down: u64,
    pub rtt_ms: f64,
    pub last_heartbeat_at: Option<i64>,
    pub heartbeat: Option<HeartbeatView>,
}

#[derive(Debug, Clone, Serialize)]
pub struct HeartbeatView {
    pub seq: u64,
    pub active_flows: u32,
    pub load: f64,
    pub uptime_s: u64,
    pub bytes_up: u64,
    pub bytes_down: u64,
}

/// Counts a flow as active on its device and exit for as long as it lives.
pub struct FlowGuard {
    pub session: Arc<DeviceSession>,
    pub exit: Arc<ExitState>,
}

impl FlowGuard {
    pub fn new(session: Arc<DeviceSession>, exit: Arc<ExitState>) -> Self {
        session.active_flows.fetch_add(1, Ordering::Relaxed);
        session.total_flows.fetch_add(1, Ordering::Relaxed);
        exit.active_flows.fetch_add(1, Ordering::Relaxed);
        exit.requests.fetch_add(1, Ordering::Relaxed);
        exit.since_rotation.fetch_add(1, Ordering::Relaxed);
        Self { session, exit }
    }
}

impl Drop for FlowGuard {
    fn drop(&mut self) {
        self.session.active_flows.fetch_sub(1, Ordering::Relaxed);
        self.exit.active_flows.fetch_sub(1, Ordering::Relaxed);
    }
}

/// A routable pair: a live session and one of its exits.
#[derive(Clone)]
pub struct Route {
    pub session: Arc<DeviceSession>,
    pub exit: Arc<ExitState>,
}

#[derive(Default)]
pub struct Registry {
    sessions: RwLock<Vec<Arc<DeviceSession>>>,
    /// Every exit ever seen since start, by (device, exit name).
    exits: RwLock<HashMap<(String, String), Arc<ExitState>>>,
    /// Flattened (session, exit) pairs of live sessions, rebuilt when a
    /// session comes or goes.
    routes: RwLock<Vec<Route>>,
    next_session: AtomicU64,
    next_command: AtomicU64,
}

impl Registry {
    pub fn next_session_id(&self) -> u64 {
        self.next_session.fetch_add(1, Ordering::Relaxed) + 1
    }

    /// A command id unique across restarts of this process: agents run an
    /// id at most once and remember ids across their own restarts.
    pub fn next_command_id(&self) -> String {
        static BOOT: std::sync::OnceLock<String> = std::sync::OnceLock::new();
        let boot = BOOT.get_or_init(|| hex::encode(rand::random::<[u8; 4]>()));
        let n = self.next_command.fetch_add(1, Ordering::Relaxed) + 1;
        format!("cp-{boot}-{n}")
    }

    /// The state of each of `infos` for `device_id`, created on first sight
    /// and updated (interface, method, ladder) on later ones.
    pub fn exits_for(&self, device_id: &str, infos: &[ExitInfo]) -> Vec<Arc<ExitState>> {
        let mut map = self.exits.write().unwrap_or_else(|e| e.into_inner());
        infos
            .iter()
            .map(|info| {
                let key = (device_id.to_string(), info.name.clone());
                let e = map
                    .entry(key)
                    .or_insert_with(|| Arc::new(ExitState::new(device_id, info.clone())));
                if let Ok(mut i) = e.info.write() {
                    *i = info.clone();
                }
                e.clone()
            })
            .collect()
    }

    pub fn exit(&self, device_id: &str, name: &str) -> Option<Arc<ExitState>> {
        let map = self.exits.read().unwrap_or_else(|e| e.into_inner());
        map.get(&(device_id.to_string(), name.to_string())).cloned()
    }

    /// Every known exit of a device, sorted by name.
    pub fn device_exits(&self, device_id: &str) -> Vec<Arc<ExitState>> {
        let map = self.exits.read().unwrap_or_else(|e| e.into_inner());
        let mut v: Vec<_> = map
            .values()
            .filter(|e| e.device_id == device_id)
            .cloned()
            .collect();
        v.sort_by(|a, b| a.name.cmp(&b.name));
        v
    }

    pub fn all_exits(&self) -> Vec<Arc<ExitState>> {
        let map = self.exits.read().unwrap_or_else(|e| e.into_inner());
        map.values().cloned().collect()
    }

    /// Forget a deleted device's exits.
    pub fn forget_device(&self, device_id: &str) {
        let mut map = self.exits.write().unwrap_or_else(|e| e.into_inner());
        map.retain(|(d, _), _| d != device_id);
    }

    /// Set the routing attributes of a device's exits.
    pub fn set_attrs(&self, device_id: &str, attrs: DeviceAttrs) {
        let attrs = Arc::new(attrs);
        for e in self.device_exits(device_id) {
            if let Ok(mut a) = e.attrs.write()
                && **a != *attrs
            {
                *a = attrs.clone();
            }
        }
    }

    /// Run `f` over the routable (session, exit) pairs.
    pub fn with_routes<T>(&self, f: impl FnOnce(&[Route]) -> T) -> T {
        let v = self.routes.read().unwrap_or_else(|e| e.into_inner());
        f(&v)
    }

    /// Apply a device's maintenance flag to its exits.
    pub fn set_maintenance(&self, device_id: &str, on: bool) {
        for e in self.device_exits(device_id) {
            e.maintenance.store(on, Ordering::Relaxed);
        }
    }

    fn rebuild_routes(&self, sessions: &[Arc<DeviceSession>]) {
        let routes: Vec<Route> = sessions
            .iter()
            .flat_map(|s| {
                s.exits.iter().map(move |e| Route {
                    session: s.clone(),
                    exit: e.clone(),
                })
            })
            .collect();
        *self.routes.write().unwrap_or_else(|e| e.into_inner()) = routes;
    }

    /// Register a session; returns the session it replaces, if any.
    pub fn insert(&self, s: Arc<DeviceSession>) -> Option<Arc<DeviceSession>> {
        let mut v = self.sessions.write().unwrap_or_else(|e| e.into_inner());
        let old = v
            .iter()
            .position(|x| x.device_id == s.device_id)
            .map(|i| v.remove(i));
        v.push(s);
        self.rebuild_routes(&v);
        old
    }

    /// Remove a session, unless a newer session of the device replaced it.
    pub fn remove(&self, device_id: &str, session_id: u64) {
        let mut v = self.sessions.write().unwrap_or_else(|e| e.into_inner());
        v.retain(|x| !(x.device_id == device_id && x.session_id == session_id));
        self.rebuild_routes(&v);
    }

    pub fn get(&self, device_id: &str) -> Option<Arc<DeviceSession>> {
        let v = self.sessions.read().unwrap_or_else(|e| e.into_inner());
        v.iter().find(|x| x.device_id == device_id).cloned()
    }

    pub fn online_count(&self) -> usize {
        self.sessions.read().map(|v| v.len()).unwrap_or(0)
    }

    pub fn snapshot(&self) -> Vec<Arc<DeviceSession>> {
        self.sessions.read().map(|v| v.clone()).unwrap_or_default()
    }

    /// Close a device's live tunnel, if any.
    pub fn kick(&self, device_id: &str, code: u32, reason: &str) -> bool {
        match self.get(device_id) {
            Some(s) => {
                s.conn.close(code.into(), reason.as_bytes());
                self.remove(device_id, s.session_id);
                true
            }
            None => false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn info(name: &str) -> ExitInfo {
        ExitInfo {
            name: name.into(),
            interface: None,
            method: "none".into(),
            ladder: vec![],
        }
    }

    #[test]
    fn exit_state_survives_and_updates() {
        let r = Registry::default();
        let a = r.exits_for("dev-1", &[info("m1"), info("m2")]);
        a[0].set_phase(ExitPhase::Rotating);
        let mut changed = info("m1");
        changed.method = "at".into();
        let b = r.exits_for("dev-1", &[changed]);
        assert!(Arc::ptr_eq(&a[0], &b[0]));
        assert_eq!(b[0].phase(), ExitPhase::Rotating);
        assert_eq!(b[0].info.read().unwrap().method, "at");
        assert_eq!(r.device_exits("dev-1").len(), 2);
        r.forget_device("dev-1");
        assert!(r.device_exits("dev-1").is_empty());
    }

    #[test]
    fn phases_gate_availability() {
        let e = ExitState::new("d", info("x"));
        assert!(e.available());
        assert!(e.transition(ExitPhase::Ready, ExitPhase::Draining));
        assert!(!e.available());
        assert!(!e.transition(ExitPhase::Ready, ExitPhase::Rotating));
        e.set_phase(ExitPhase::Ready);
        e.maintenance.store(true, Ordering::Relaxed);
        assert!(!e.available());
        e.maintenance.store(false, Ordering::Relaxed);
        e.link_up.store(false, Ordering::Relaxed);
        assert!(!e.available());
        assert_eq!(e.view(true).status, "link_down");
        assert_eq!(e.view(false).status, "offline");
    }

    #[test]
    fn counters_subtract() {
        let a = Counters {
            requests: 5,
            bytes_up: 10,
            ..Counters::default()
        };
        let b = Counters {
            requests: 2,
            bytes_up: 4,
            ..Counters::default()
        };
        assert_eq!(a.minus(&b).requests, 3);
        assert_eq!(a.minus(&b).bytes_up, 6);
        assert!(a.minus(&a).is_zero());
    }
}
