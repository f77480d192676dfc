//! The agent's exits: one per uplink (modem, phone, Ethernet), each with its
//! own interface, DNS, rotation backend and telemetry.
//!
//! An agent without `[[exit]]` sections has one exit, `default`, that
//! follows the host's routing and cannot rotate.

use std::io;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde::Deserialize;
use shared::wire::{CommandDetail, DEFAULT_EXIT, ExitInfo, ExitStatus, Telemetry, valid_exit_name};
use tokio::net::TcpStream;
use tokio::time::Instant;
use tracing::{info, warn};

use crate::net;
use crate::rotate::{Backend, RotationConfig};

/// `[[exit]]` in the agent's configuration.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ExitConfig {
    /// Unique per agent: `[a-z0-9_-]`, 1-32 characters.
    pub name: String,
    /// The uplink interface (`wwan0`, `usb0`, `eth1`); egress sockets and
    /// DNS queries of this exit are bound to it (`SO_BINDTODEVICE`, needs
    /// `CAP_NET_RAW`). Unset: the host's routing decides.
    pub interface: Option<String>,
    /// Nameservers reached through this uplink (`"10.0.0.1"` or
    /// `"10.0.0.1:53"`). Default: those of /etc/resolv.conf, which must then
    /// be reachable through the interface (a local stub such as
    /// 127.0.0.53 is not).
    #[serde(default)]
    pub dns: Vec<String>,
    /// How this exit changes its public address.
    #[serde(default)]
    pub rotation: RotationConfig,
}

/// One exit, ready to serve.
pub struct Exit {
    pub name: String,
    pub interface: Option<String>,
    resolver: Option<net::dns::Resolver>,
    pub method: &'static str,
    pub ladder: Vec<String>,
    backend: tokio::sync::Mutex<Backend>,
    telemetry: Mutex<Telemetry>,
}

/// The answer to a command: (ok, message, detail).
pub type Outcome = (bool, String, Option<CommandDetail>);

impl Exit {
    pub fn from_config(c: &ExitConfig) -> Result<Self, String> {
        if !valid_exit_name(&c.name) {
            return Err(format!(
                "exit name {:?} is invalid: use 1-32 characters a-z, 0-9, '_' or '-'",
                c.name
            ));
        }
        let iface = c.interface.as_deref();
        if let Some(i) = iface {
            net::bind::check_ifname(i).map_err(|e| format!("exit {}: {e}", c.name))?;
        }
        let resolver = match (iface, c.dns.is_empty()) {
            (None, true) => None,
            (_, false) => {
                let servers = c
                    .dns
                    .iter()
                    .map(|s| parse_nameserver(s))
                    .collect::<Result<Vec<_>, _>>()
                    .map_err(|e| format!("exit {}: {e}", c.name))?;
                Some(net::dns::Resolver::new(servers, iface))
            }
            (Some(_), true) => Some(
                net::dns::Resolver::from_system(iface)
                    .map_err(|e| format!("exit {}: {e}", c.name))?,
            ),
        };
        let backend =
            Backend::new(&c.rotation, iface).map_err(|e| format!("exit {}: {e}", c.name))?;
        Ok(Self {
            name: c.name.clone(),
            interface: c.interface.clone(),
            resolver,
            method: backend.method(),
            ladder: backend.ladder(),
            backend: tokio::sync::Mutex::new(backend),
            telemetry: Mutex::new(Telemetry::default()),
        })
    }

    fn implicit() -> Self {
        Self {
            name: DEFAULT_EXIT.to_string(),
            interface: None,
            resolver: None,
            method: "none",
            ladder: Vec::new(),
            backend: tokio::sync::Mutex::new(Backend::None),
            telemetry: Mutex::new(Telemetry::default()),
        }
    }

    pub fn info(&self) -> ExitInfo {
        ExitInfo {
            name: self.name.clone(),
            interface: self.interface.clone(),
            method: self.method.to_string(),
            ladder: self.ladder.clone(),
        }
    }

    /// Resolve a customer's target through this exit.
    pub async fn resolve(&self, host: &str, port: u16) -> io::Result<Vec<SocketAddr>> {
        match &self.resolver {
            Some(r) => r.lookup(host, port).await,
            None => Ok(tokio::net::lookup_host((host, port)).await?.collect()),
        }
    }

    /// Connect to a target through this exit's uplink.
    pub async fn connect(&self, addr: SocketAddr, timeout: Duration) -> io::Result<TcpStream> {
        net::bind::connect_tcp(addr, self.interface.as_deref(), timeout).await
    }

    /// Whether the uplink is up with an address (always for no interface).
    pub fn link_up(&self) -> bool {
        match &self.interface {
            None => true,
            Some(i) => {
                let s = net::link::link_state(i);
                s.up && !s.addrs.is_empty()
            }
        }
    }

    pub fn status(&self) -> ExitStatus {
        ExitStatus {
            name: self.name.clone(),
            link_up: self.link_up(),
            telemetry: self.telemetry.lock().map(|t| t.clone()).unwrap_or_default(),
        }
    }

    /// Read fresh telemetry unless a rotation holds the backend.
    pub async fn refresh_telemetry(&self) {
        let Ok(mut b) = self.backend.try_lock() else {
            return;
        };
        let t = b.telemetry().await;
        drop(b);
        if let Ok(mut g) = self.telemetry.lock() {
            *g = t;
        }
    }

    /// The exit's public address, read through its uplink.
    pub async fn public_ip(&self, echo_url: &str, timeout: Duration) -> Result<IpAddr, String> {
        if echo_url.is_empty() {
            return Err(
                "no IP-echo URL configured (set ip_echo_url in the agent's configuration)".into(),
            );
        }
        net::echo::external_ip(echo_url, self.interface.as_deref(), timeout)
            .await
            .map_err(|e| e.to_string())
    }

    /// `CheckIp`: read the public address, retrying briefly.
    pub async fn check_ip(&self, echo_url: &str) -> Outcome {
        let deadline = Instant::now() + Duration::from_secs(15);
        match self.read_ip_until(echo_url, deadline).await {
            Ok(ip) => (
                true,
                ip.to_string(),
                Some(CommandDetail::Ip {
                    exit: self.name.clone(),
                    ip: ip.to_string(),
                }),
            ),
            Err(e) => (
                false,
                format!("reading the public address failed: {e}"),
                None,
            ),
        }
    }

    async fn read_ip_until(&self, echo_url: &str, deadline: Instant) -> Result<IpAddr, String> {
        if echo_url.is_empty() {
            // Nothing to retry: say so at once.
            return self.public_ip(echo_url, Duration::ZERO).await;
        }
        // Right after a link comes back the first SYN is often lost (routes
        // and NAT state are still settling) and TCP would retry it only
        // after a second: start with short tries and lengthen them.
        const TRIES_MS: [u64; 4] = [750, 1500, 3000, 5000];
        let mut last = String::from("no attempt");
        for n in 0usize.. {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                break;
            }
            let per_try = Duration::from_millis(TRIES_MS[n.min(TRIES_MS.len() - 1)]);
            match self.public_ip(echo_url, left.min(per_try)).await {
                Ok(ip) => return Ok(ip),
                Err(e) => last = e,
            }
            let pause =
                Duration::from_millis(250).min(deadline.saturating_duration_since(Instant::now()));
            tokio::time::sleep(pause).await;
        }
        Err(last)
    }

    /// `Rotate`: run one rung, wait for the uplink, read the new address.
    pub async fn rotate(&self, rung: u8, limit: Duration, echo_url: &str) -> Outcome {
        let deadline = Instant::now() + limit;
        let rung_name = self
            .ladder
            .get(rung as usize)
            .cloned()
            .unwrap_or_else(|| format!("#{rung}"));
        let detail = |backend_ms: u32, verify_ms: u32, ip: Option<String>| {
            Some(CommandDetail::Rotated {
                exit: self.name.clone(),
                rung: rung_name.clone(),
                backend_ms,
                verify_ms,
                ip,
            })
        };
        let started = Instant::now();
        info!(exit = %self.name, rung = %rung_name, "rotation step");
        let mut backend = match tokio::time::timeout_at(deadline, self.backend.lock()).await {
            Ok(b) => b,
            Err(_) => return (false, "the backend stayed busy".into(), detail(0, 0, None)),
        };
        let stepped = backend.step(rung as usize, deadline).await;
        drop(backend);
        let backend_ms = started.elapsed().as_millis() as u32;
        if let Err(e) = stepped {
            warn!(exit = %self.name, rung = %rung_name, "rotation step failed: {e}");
            return (
                false,
                format!("{} step {rung_name} failed: {e}", self.method),
                detail(backend_ms, 0, None),
            );
        }
        let verify_started = Instant::now();
        if let Some(iface) = &self.interface
            && let Err(state) = net::link::wait_ready(iface, deadline).await
        {
            return (
                false,
                format!(
                    "after step {rung_name} the uplink {iface} did not come back (up: {}, addresses: {})",
                    state.up,
                    state.addrs.len()
                ),
                detail(
                    backend_ms,
                    verify_started.elapsed().as_millis() as u32,
                    None,
                ),
            );
        }
        match self.read_ip_until(echo_url, deadline).await {
            Ok(ip) => {
                let verify_ms = verify_started.elapsed().as_millis() as u32;
                info!(exit = %self.name, %ip, backend_ms, verify_ms, "rotation step done");
                (
                    true,
                    format!("step {rung_name} done; public address {ip}"),
                    detail(backend_ms, verify_ms, Some(ip.to_string())),
                )
            }
            Err(e) => (
                false,
                format!("step {rung_name} ran but the public address could not be read: {e}"),
                detail(
                    backend_ms,
                    verify_started.elapsed().as_millis() as u32,
                    None,
                ),
            ),
        }
    }
}

fn parse_nameserver(s: &str) -> Result<SocketAddr, String> {
    if let Ok(ip) = s.parse::<IpAddr>() {
        return Ok(SocketAddr::new(ip, 53));
    }
    s.parse::<SocketAddr>()
        .map_err(|_| format!("invalid nameserver {s:?} (expected an IP or IP:port)"))
}

/// Every exit of the agent.
pub struct Exits {
    list: Vec<Arc<Exit>>,
}

impl Exits {
    pub fn from_config(configs: &[ExitConfig]) -> Result<Self, String> {
        if configs.is_empty() {
            return Ok(Self {
                list: vec![Arc::new(Exit::implicit())],
            });
        }
        if configs.len() > shared::wire::MAX_LIST_ITEMS {
            return Err(format!(
                "at most {} exits per agent",
                shared::wire::MAX_LIST_ITEMS
            ));
        }
        let mut list: Vec<Arc<Exit>> = Vec::with_capacity(configs.len());
        for c in configs {
            if list.iter().any(|e| e.name == c.name) {
                return Err(format!("exit name {:?} appears twice", c.name));
            }
            list.push(Arc::new(Exit::from_config(c)?));
        }
        Ok(Self { list })
    }

    pub fn get(&self, name: &str) -> Option<&Arc<Exit>> {
        self.list.iter().find(|e| e.name == name)
    }

    pub fn all(&self) -> &[Arc<Exit>] {
        &self.list
    }

    /// The exits as `Hello` declares them; empty for the implicit exit.
    pub fn infos(&self) -> Vec<ExitInfo> {
        if self.list.len() == 1
            && self.list[0].name == DEFAULT_EXIT
            && self.list[0].method == "none"
            && self.list[0].interface.is_none()
        {
            return Vec::new();
        }
        self.list.iter().map(|e| e.info()).collect()
    }

    pub fn statuses(&self) -> Vec<ExitStatus> {
        self.list.iter().map(|e| e.status()).collect()
    }

    /// Interfaces to watch for link and address changes.
    pub fn interfaces(&self) -> Vec<String> {
        self.list
            .iter()
            .filter_map(|e| e.interface.clone())
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(name: &str) -> ExitConfig {
        ExitConfig {
            name: name.into(),
            interface: None,
            dns: vec![],
            rotation: RotationConfig::None,
        }
    }

    #[test]
    fn implicit_exit_is_declared_as_none() {
        let e = Exits::from_config(&[]).unwrap();
        assert_eq!(e.all().len(), 1);
        assert!(e.get(DEFAULT_EXIT).is_some());
        assert!(e.infos().is_empty());
    }

    #[test]
    fn names_are_checked() {
        assert!(Exits::from_config(&[cfg("m1"), cfg("m1")]).is_err());
        assert!(Exits::from_config(&[cfg("Bad Name")]).is_err());
        let e = Exits::from_config(&[cfg("m1"), cfg("m2")]).unwrap();
        assert_eq!(e.infos().len(), 2);
        assert_eq!(e.infos()[1].method, "none");
    }

    #[test]
    fn nameservers_parse() {
        assert_eq!(
            parse_nameserver("10.0.0.1").unwrap(),
            "10.0.0.1:53".parse().unwrap()
        );
        assert_eq!(
            parse_nameserver("[::1]:5353").unwrap(),
            "[::1]:5353".parse().unwrap()
        );
        assert!(parse_nameserver("dns.example").is_err());
    }
}
