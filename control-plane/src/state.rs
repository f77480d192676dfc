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
    pub flow_ids: AtomicU64,
    pub tasks: TaskTracker,
}

impl State {
    /// Ports of our own listeners: never a customer target on this host.
    pub fn protected_ports(&self) -> Vec<u16> {
        match self.addrs.get() {
            Some(a) => vec![a.http.port(), a.socks.port(), a.api.port(), a.quic.port()],
            None => vec![],
        }
    }

    /// The control plane's check for literal targets.
    pub fn target_policy(&self) -> TargetPolicy {
        TargetPolicy {
            allow_private_targets: self.cfg.allow_private_targets,
            protected_ports: self.protected_ports(),
            protected_ips: self.own_ips.clone(),
        }
    }
}
