//! Prometheus `GET /metrics` (admin token, like the rest of the admin API).
//!
//! Nothing here runs on the proxy path: a scrape reads what the control
//! plane already keeps (the live registry's atomics, the limiter's and the
//! authenticator's counters, one query for the device list) into a
//! [`Snapshot`], and [`render`] turns that into the OpenMetrics text format
//! with `prometheus-client`. Every metric is prefixed `cellgate_`.
//!
//! Counters (`*_total`) count since this process started and are per
//! control-plane node; the database holds the long-term totals. Forgetting a
//! deleted device's exits lowers them, which Prometheus treats as a counter
//! reset.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use axum::extract::State as AxState;
use axum::http::header::CONTENT_TYPE;
use axum::response::{IntoResponse, Response};
use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::{ConstGauge, Gauge};
use prometheus_client::metrics::info::Info;
use prometheus_client::registry::Registry;

use crate::api::ApiError;
use crate::registry::DeviceSession;
use crate::state::State;
use crate::store::DeviceRow;

/// The content type Prometheus asks for first; `render` writes this format.
pub const CONTENT_TYPE_OPENMETRICS: &str =
    "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// Device statuses, as `GET /api/v1/devices` reports them.
pub const DEVICE_STATUSES: [&str; 7] = [
    "online",
    "offline",
    "disabled",
    "maintenance",
    "rotating",
    "draining",
    "failed",
];

/// Exit statuses, as the exits of `GET /api/v1/devices` report them.
pub const EXIT_STATUSES: [&str; 7] = [
    "ready",
    "draining",
    "rotating",
    "failed",
    "link_down",
    "maintenance",
    "offline",
];

/// What one scrape reports. Every status is present (zero when no device or
/// exit has it), so dashboards and alerts see a series instead of none.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Snapshot {
    pub version: String,
    pub devices_by_status: Vec<(&'static str, u64)>,
    pub exits_by_status: Vec<(&'static str, u64)>,
    /// Device tunnels connected now.
    pub tunnels: u64,
    /// Customer flows open through exits now.
    pub active_flows: u64,
    /// Customer connections open now, as the limiter counts them.
    pub customer_connections: u64,
    /// Bytes relayed since start: customer to target, target to customer.
    pub bytes_up: u64,
    pub bytes_down: u64,
    /// Flows opened through an exit since start, by outcome.
    pub flows_succeeded: u64,
    pub flows_failed: u64,
    /// Password verifications run, attempts refused by a backoff, alerts.
    pub auth_hash_runs: u64,
    pub auth_refused_in_backoff: u64,
    pub auth_alerts: u64,
}

/// `GET /metrics`.
pub async fn scrape(AxState(state): AxState<Arc<State>>) -> Result<Response, ApiError> {
    let snap = snapshot(&state).await?;
    Ok(([(CONTENT_TYPE, CONTENT_TYPE_OPENMETRICS)], render(&snap)).into_response())
}

/// Read the current state. One database query (the device list); the rest
/// are atomics and short locks the proxy path does not wait on for long.
pub async fn snapshot(state: &State) -> Result<Snapshot, crate::store::StoreError> {
    let devices = state.store.devices().await?;
    let sessions: HashMap<String, Arc<DeviceSession>> = state
        .registry
        .snapshot()
        .into_iter()
        .map(|s| (s.device_id.clone(), s))
        .collect();

    let mut snap = Snapshot {
        version: env!("CARGO_PKG_VERSION").to_string(),
        tunnels: sessions.len() as u64,
        ..Snapshot::default()
    };

    let mut by_device: HashMap<&'static str, u64> = HashMap::new();
    for d in &devices {
        *by_device
            .entry(device_status(d, sessions.get(&d.id).map(|s| &**s)))
            .or_default() += 1;
    }
    snap.devices_by_status = count_all(&DEVICE_STATUSES, &by_device);

    let mut by_exit: HashMap<&'static str, u64> = HashMap::new();
    for e in state.registry.all_exits() {
        let session = sessions.get(&e.device_id);
        // An exit the connected agent no longer declares is not counted.
        if session.is_some_and(|s| s.exit(&e.name).is_none()) {
            continue;
        }
        *by_exit.entry(e.view(session.is_some()).status).or_default() += 1;
        let c = e.counters();
        snap.bytes_up += c.bytes_up;
        snap.bytes_down += c.bytes_down;
        snap.flows_succeeded += c.successes;
        snap.flows_failed += c.failures;
        snap.active_flows += u64::from(e.active_flows.load(Ordering::Relaxed));
    }
    snap.exits_by_status = count_all(&EXIT_STATUSES, &by_exit);

    snap.customer_connections = state
        .limiter
        .snapshot_all(crate::limits::Now::system())
        .iter()
        .map(|c| u64::from(c.threads))
        .sum();
    let auth = state.auth.stats();
    snap.auth_hash_runs = auth.hash_runs;
    snap.auth_refused_in_backoff = auth.refused_in_backoff;
    snap.auth_alerts = auth.alerts;
    Ok(snap)
}

/// A device's status by the same precedence as the devices API, from the
/// live exits of its session instead of the stored exit rows.
fn device_status(d: &DeviceRow, session: Option<&DeviceSession>) -> &'static str {
    let Some(s) = session else {
        return if d.disabled {
            "disabled"
        } else if d.maintenance {
            "maintenance"
        } else {
            "offline"
        };
    };
    let statuses: Vec<&str> = s.exits.iter().map(|e| e.view(true).status).collect();
    if d.disabled {
        "disabled"
    } else if d.maintenance {
        "maintenance"
    } else if statuses.contains(&"rotating") {
        "rotating"
    } else if statuses.contains(&"draining") {
        "draining"
    } else if !statuses.is_empty() && statuses.iter().all(|s| *s == "failed") {
        "failed"
    } else {
        "online"
    }
}

fn count_all(
    names: &[&'static str],
    counts: &HashMap<&'static str, u64>,
) -> Vec<(&'static str, u64)> {
    let mut out: Vec<(&'static str, u64)> = names
        .iter()
        .map(|n| (*n, counts.get(n).copied().unwrap_or(0)))
        .collect();
    // A status this module does not know yet still shows up.
    let mut extra: Vec<_> = counts
        .iter()
        .filter(|(k, _)| !names.contains(k))
        .map(|(k, v)| (*k, *v))
        .collect();
    extra.sort();
    out.extend(extra);
    out
}

type Labels = Vec<(&'static str, &'static str)>;

fn gauge(v: u64) -> ConstGauge {
    ConstGauge::new(i64::try_from(v).unwrap_or(i64::MAX))
}

fn family(pairs: &[(&'static str, u64)], key: &'static str) -> Family<Labels, Gauge> {
    let f = Family::<Labels, Gauge>::default();
    for (name, n) in pairs {
        f.get_or_create(&vec![(key, *name)])
            .set(i64::try_from(*n).unwrap_or(i64::MAX));
    }
    f
}

/// The OpenMetrics text of a snapshot (ends with `# EOF`).
pub fn render(s: &Snapshot) -> String {
    let mut r = Registry::with_prefix("cellgate");
    r.register(
        "build",
        "Version of this control plane",
        Info::new(vec![("version", s.version.clone())]),
    );
    r.register(
        "devices",
        "Enrolled devices by status",
        family(&s.devices_by_status, "status"),
    );
    r.register(
        "exits",
        "Exits seen since start by status (offline: their device is not connected)",
        family(&s.exits_by_status, "status"),
    );
    r.register(
        "device_tunnels",
        "Device QUIC tunnels connected now",
        gauge(s.tunnels),
    );
    r.register(
        "active_flows",
        "Customer flows open through exits now",
        gauge(s.active_flows),
    );
    r.register(
        "customer_connections",
        "Customer proxy connections open now",
        gauge(s.customer_connections),
    );
    let bytes = Family::<Labels, prometheus_client::metrics::counter::Counter>::default();
    bytes
        .get_or_create(&vec![("direction", "up")])
        .inc_by(s.bytes_up);
    bytes
        .get_or_create(&vec![("direction", "down")])
        .inc_by(s.bytes_down);
    r.register(
        "relayed_bytes",
        "Bytes relayed through exits since start (up: customer to target)",
        bytes,
    );
    let flows = Family::<Labels, prometheus_client::metrics::counter::Counter>::default();
    flows
        .get_or_create(&vec![("result", "success")])
        .inc_by(s.flows_succeeded);
    flows
        .get_or_create(&vec![("result", "failure")])
        .inc_by(s.flows_failed);
    r.register(
        "exit_flows",
        "Flows opened through exits since start, by result",
        flows,
    );
    r.register(
        "auth_password_checks",
        "Password hash verifications run since start",
        ConstCounter::new(s.auth_hash_runs),
    );
    r.register(
        "auth_refused_in_backoff",
        "Login attempts refused by a backoff since start",
        ConstCounter::new(s.auth_refused_in_backoff),
    );
    r.register(
        "auth_alerts",
        "Sources and usernames that reached their failure threshold since start",
        ConstCounter::new(s.auth_alerts),
    );
    let mut out = String::new();
    // Writing into a String cannot fail.
    let _ = encode(&mut out, &r);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn render_writes_every_series() {
        let s = Snapshot {
            version: "9.9.9".into(),
            devices_by_status: count_all(&DEVICE_STATUSES, &HashMap::from([("online", 2)])),
            exits_by_status: count_all(&EXIT_STATUSES, &HashMap::from([("ready", 3)])),
            tunnels: 2,
            active_flows: 4,
            bytes_up: 10,
            bytes_down: 20,
            ..Snapshot::default()
        };
        let text = render(&s);
        for line in [
            "cellgate_build_info{version=\"9.9.9\"} 1",
            "cellgate_devices{status=\"online\"} 2",
            "cellgate_devices{status=\"failed\"} 0",
            "cellgate_exits{status=\"ready\"} 3",
            "cellgate_device_tunnels 2",
            "cellgate_active_flows 4",
            "cellgate_relayed_bytes_total{direction=\"up\"} 10",
            "cellgate_relayed_bytes_total{direction=\"down\"} 20",
            "cellgate_exit_flows_total{result=\"failure\"} 0",
        ] {
            assert!(
                text.lines().any(|l| l == line),
                "{line:?} missing in\n{text}"
            );
        }
        assert!(text.ends_with("# EOF\n"), "{text}");
    }

    #[test]
    fn unknown_statuses_are_kept() {
        let v = count_all(&["a"], &HashMap::from([("b", 1)]));
        assert_eq!(v, vec![("a", 0), ("b", 1)]);
    }
}
