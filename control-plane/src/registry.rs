//! Live device sessions: which devices are connected right now, and the
//! round-robin choice of an exit among them.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, RwLock};

use serde::Serialize;
use shared::wire::Heartbeat;

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
    pub external_ip: Option<String>,
}

impl DeviceSession {
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
                external_ip: h.external_ip,
            }),
        }
    }
}

/// Counts a flow as active on its device for as long as it lives.
pub struct FlowGuard {
    pub session: Arc<DeviceSession>,
}

impl FlowGuard {
    pub fn new(session: Arc<DeviceSession>) -> Self {
        session.active_flows.fetch_add(1, Ordering::Relaxed);
        session.total_flows.fetch_add(1, Ordering::Relaxed);
        Self { session }
    }
}

impl Drop for FlowGuard {
    fn drop(&mut self) {
        self.session.active_flows.fetch_sub(1, Ordering::Relaxed);
    }
}

#[derive(Default)]
pub struct Registry {
    sessions: RwLock<Vec<Arc<DeviceSession>>>,
    rr: AtomicUsize,
    next_session: AtomicU64,
}

impl Registry {
    pub fn next_session_id(&self) -> u64 {
        self.next_session.fetch_add(1, Ordering::Relaxed) + 1
    }

    /// Register a session; returns the session it replaces, if any.
    pub fn insert(&self, s: Arc<DeviceSession>) -> Option<Arc<DeviceSession>> {
        let mut v = self.sessions.write().unwrap_or_else(|e| e.into_inner());
        let old = v
            .iter()
            .position(|x| x.device_id == s.device_id)
            .map(|i| v.remove(i));
        v.push(s);
        old
    }

    /// Remove a session, unless a newer session of the device replaced it.
    pub fn remove(&self, device_id: &str, session_id: u64) {
        let mut v = self.sessions.write().unwrap_or_else(|e| e.into_inner());
        v.retain(|x| !(x.device_id == device_id && x.session_id == session_id));
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

    /// Round robin over online devices, skipping `exclude`.
    pub fn pick(&self, exclude: &[String]) -> Option<Arc<DeviceSession>> {
        let v = self.sessions.read().unwrap_or_else(|e| e.into_inner());
        if v.is_empty() {
            return None;
        }
        let start = self.rr.fetch_add(1, Ordering::Relaxed);
        (0..v.len())
            .map(|i| &v[(start + i) % v.len()])
            .find(|s| !exclude.contains(&s.device_id))
            .cloned()
    }
}
