//! The coordinator every task shares: configuration, store, PKI, live
//! devices, the authenticator and the bound addresses.

use std::net::SocketAddr;
use std::sync::OnceLock;
use std::sync::atomic::AtomicU64;

use serde::{Deserialize, Serialize};
use shared::policy::TargetPolicy;
use tokio_util::task::TaskTracker;

use crate::config::Config;
use crate::pki::Pki;
use crate::proxy::auth::Authenticator;
use crate::registry::Registry;
use crate::store::Store;

/// Where the listeners ended up (ports may have been 0 in the config).
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
pub struct BoundAddrs {
    pub http: SocketAddr,
    pub socks: SocketAddr,
    pub api: SocketAddr,
    pub quic: SocketAddr,
}

pub struct State {
    pub cfg: Config,
    pub store: Store,
    pub pki: Pki,
    pub registry: Registry,
    pub auth: Authenticator,
    pub addrs: OnceLock<BoundAddrs>,
    /// This host's own addresses that customers must not target: the
    /// listeners' specific IPs and the public address agents dial.
    pub own_ips: Vec<std::net::IpAddr>,
    /// The deny policy for customer targets, fixed once the listeners are
    /// bound (their ports are part of it); read on every customer flow.
    pub policy: OnceLock<TargetPolicy>,
    pub flow_ids: AtomicU64,
    pub tasks: TaskTracker,
    pub rotator: crate::rotation::Rotator,
    pub router: crate::routing::Router,
    pub limiter: crate::limits::Limiter,
    pub usage: crate::usage::Usage,
    /// Plans by id, refreshed from the store every few seconds.
    pub plans:
        std::sync::RwLock<std::collections::HashMap<String, std::sync::Arc<crate::store::PlanRow>>>,
    /// The plan of customers without one: no limits.
    pub default_plan: std::sync::Arc<crate::store::PlanRow>,
    /// The MQTT broker link, when `[mqtt] url` is set.
    pub mqtt: Option<std::sync::Arc<crate::mqtt::Mqtt>>,
}

impl State {
    /// Record where the listeners ended up, and with it the policy: our own
    /// ports are never a customer target on this host. Call before serving.
    pub fn set_bound(&self, addrs: BoundAddrs) {
        let _ = self.addrs.set(addrs);
        let _ = self.policy.set(TargetPolicy {
            allow_private_targets: self.cfg.allow_private_targets,
            protected_ports: vec![
                addrs.http.port(),
                addrs.socks.port(),
                addrs.api.port(),
                addrs.quic.port(),
            ],
            protected_port_ranges: self
                .cfg
                .ports
                .range()
                .map(|r| vec![(r.lo, r.hi)])
                .unwrap_or_default(),
            protected_ips: self.own_ips.clone(),
        });
    }

    /// Where agents read their exits' public addresses.
    pub fn ip_echo_url(&self) -> String {
        match &self.cfg.rotation.ip_echo_url {
            Some(u) => u.clone(),
            None => format!("{}/ip", self.api_base_url()),
        }
    }

    /// The API's address as devices and customers reach it: the host of
    /// the public address agents dial, with the API's port.
    pub fn api_base_url(&self) -> String {
        let addr = crate::tokens::agent_addr(&self.cfg, self.addrs.get().copied());
        let host = addr.rsplit_once(':').map(|(h, _)| h).unwrap_or(&addr);
        let port = self
            .addrs
            .get()
            .map(|a| a.api.port())
            .unwrap_or(self.cfg.api_listen.port());
        format!("http://{host}:{port}")
    }

    /// The plan a customer connects under.
    pub fn plan_for(&self, plan_id: Option<&str>) -> std::sync::Arc<crate::store::PlanRow> {
        plan_id
            .and_then(|id| self.plans.read().ok().and_then(|m| m.get(id).cloned()))
            .unwrap_or_else(|| self.default_plan.clone())
    }

    /// The control plane's check for customer targets.
    pub fn target_policy(&self) -> &TargetPolicy {
        // Set by `set_bound` before any listener serves; the fallback only
        // guards against misuse and is the strict default.
        self.policy.get_or_init(TargetPolicy::default)
    }
}
