//! Port per exit: with `[ports] range` set, every exit gets its own local
//! port the first time it is seen (lowest free port of the range, kept in
//! the `exit_ports` table across restarts) and a listener on it. A
//! connection there authenticates like on the main proxy ports, speaks HTTP
//! proxy or SOCKS5 (told apart by its first byte) and always leaves through
//! that exit; while the exit is away it gets the usual "no exit" answer.
//!
//! Glossary:
//! - **assigned port**: a row of `exit_ports`; it stays until the device is
//!   deleted.
//! - **pinned**: a flow that must leave through one (device, exit) pair
//!   ([`crate::proxy::exit::Access::pinned`]).

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use crate::config::PortRange;
use crate::proxy::{self, Protocol};
use crate::state::State;

/// How often new exits are given ports and missing listeners are bound.
/// Also how soon a port assigned by another control plane on the same
/// database gets its listener here.
const SCAN_EVERY: Duration = Duration::from_secs(1);

/// The first byte of every SOCKS5 greeting (the protocol version).
const SOCKS5_VERSION: u8 = 0x05;

/// Which proxy protocol a connection speaks, from its first byte: SOCKS5
/// greetings start with the version 5, everything else is taken for HTTP
/// (whose requests start with a method name).
pub fn protocol_of(first: u8) -> Protocol {
    if first == SOCKS5_VERSION {
        Protocol::Socks5
    } else {
        Protocol::Http
    }
}

/// Wait for a connection's first byte without consuming it; `None` when
/// the client closes or sends nothing within `deadline`.
pub async fn sniff(tcp: &TcpStream, deadline: Duration) -> Option<Protocol> {
    let mut first = [0u8; 1];
    match tokio::time::timeout(deadline, tcp.peek(&mut first)).await {
        Ok(Ok(1..)) => Some(protocol_of(first[0])),
        Ok(Ok(_)) => None,
        Ok(Err(e)) => {
            debug!("reading the first byte: {e}");
            None
        }
        Err(_) => {
            debug!("no first byte before the handshake deadline");
            None
        }
    }
}

/// The host customers reach this control plane at: the host of the public
/// address agents dial (loopback when none is configured).
pub fn public_host(state: &State) -> String {
    let addr = crate::tokens::agent_addr(&state.cfg, state.addrs.get().copied());
    match addr.rsplit_once(':') {
        Some((host, _)) => host.to_string(),
        None => addr,
    }
}

/// A bound per-exit listener.
struct Bound {
    device_id: String,
    exit: String,
    stop: CancellationToken,
}

/// What the scan loop remembers between rounds.
#[derive(Default)]
struct Listeners {
    bound: HashMap<u16, Bound>,
    /// Ports whose bind failed, logged once until a bind succeeds.
    failed: HashSet<u16>,
    /// The range was full at the last assignment (logged once).
    full: bool,
}

/// Give ports to new exits and keep one listener per assigned port, until
/// shutdown.
pub async fn run(state: Arc<State>, range: PortRange, shutdown: CancellationToken) {
    info!(
        range = %format!("{}-{}", range.lo, range.hi),
        ip = %state.cfg.ports.listen_ip,
        "port per exit on"
    );
    let mut l = Listeners::default();
    let mut tick = tokio::time::interval(SCAN_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut store_failing = false;
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => break,
            _ = tick.tick() => {}
        }
        match scan(&state, range, &mut l, &shutdown).await {
            Ok(()) => store_failing = false,
            Err(e) if !store_failing => {
                store_failing = true;
                warn!("port per exit: {e}");
            }
            Err(e) => debug!("port per exit: {e}"),
        }
    }
    for b in l.bound.values() {
        b.stop.cancel();
    }
}

async fn scan(
    state: &Arc<State>,
    range: PortRange,
    l: &mut Listeners,
    shutdown: &CancellationToken,
) -> Result<(), crate::store::StoreError> {
    let mut rows = state.store.exit_ports().await?;
    rows.retain(|r| range.contains(r.port));
    let known: HashSet<(&str, &str)> = rows
        .iter()
        .map(|r| (r.device_id.as_str(), r.exit_name.as_str()))
        .collect();
    let new: Vec<(String, String)> = state
        .registry
        .all_exits()
        .iter()
        .filter(|e| !known.contains(&(e.device_id.as_str(), e.name.as_str())))
        .map(|e| (e.device_id.clone(), e.name.clone()))
        .collect();
    let mut added = false;
    for (device_id, exit) in new {
        match state
            .store
            .assign_exit_port(&device_id, &exit, range.lo, range.hi)
            .await
        {
            Ok(Some(port)) => {
                info!(device = %device_id, exit = %exit, port, "exit given a port");
                added = true;
            }
            Ok(None) => {
                if !l.full {
                    warn!(device = %device_id, exit = %exit, "port per exit: the range is full");
                }
                l.full = true;
            }
            // Usually a device deleted meanwhile (its row is gone).
            Err(e) => debug!(device = %device_id, exit = %exit, "no port: {e}"),
        }
    }
    if added {
        l.full = false;
        rows = state.store.exit_ports().await?;
        rows.retain(|r| range.contains(r.port));
    }
    let want: HashMap<u16, (&str, &str)> = rows
        .iter()
        .map(|r| (r.port, (r.device_id.as_str(), r.exit_name.as_str())))
        .collect();
    // Ports released (device deleted) or given to another exit.
    l.bound.retain(|port, b| {
        let keep = want.get(port) == Some(&(b.device_id.as_str(), b.exit.as_str()));
        if !keep {
            info!(port, device = %b.device_id, exit = %b.exit, "port released");
            b.stop.cancel();
        }
        keep
    });
    for (&port, &(device_id, exit)) in &want {
        if l.bound.contains_key(&port) {
            continue;
        }
        let addr = SocketAddr::new(state.cfg.ports.listen_ip, port);
        let listener = match TcpListener::bind(addr).await {
            Ok(x) => x,
            Err(e) => {
                if l.failed.insert(port) {
                    warn!(device = %device_id, exit = %exit, "cannot bind {addr}: {e}; retrying");
                }
                continue;
            }
        };
        l.failed.remove(&port);
        debug!(device = %device_id, exit = %exit, %addr, "exit port listening");
        let stop = shutdown.child_token();
        state.tasks.spawn(proxy::serve_pinned(
            listener,
            Protocol::Sniff,
            Some((device_id.to_string(), exit.to_string())),
            state.clone(),
            stop.clone(),
            state.cfg.security.handshake_limits(),
        ));
        l.bound.insert(
            port,
            Bound {
                device_id: device_id.to_string(),
                exit: exit.to_string(),
                stop,
            },
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncWriteExt;

    #[test]
    fn the_first_byte_picks_the_protocol() {
        assert!(matches!(protocol_of(0x05), Protocol::Socks5));
        for b in [b'C', b'G', b'P', 0x04, 0x00, 0x16] {
            assert!(matches!(protocol_of(b), Protocol::Http), "{b:#x}");
        }
    }

    #[tokio::test]
    async fn sniffing_leaves_the_byte_in_place() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let mut client = TcpStream::connect(addr).await.unwrap();
        let (server, _) = listener.accept().await.unwrap();
        client.write_all(&[0x05, 0x01, 0x02]).await.unwrap();
        let got = sniff(&server, Duration::from_secs(5)).await;
        assert!(matches!(got, Some(Protocol::Socks5)));
        let mut buf = [0u8; 3];
        server.peek(&mut buf).await.unwrap();
        assert_eq!(buf[0], 0x05);
        // A client that closes without a byte is nobody.
        let mut quiet = TcpStream::connect(addr).await.unwrap();
        let (server, _) = listener.accept().await.unwrap();
        quiet.shutdown().await.unwrap();
        assert!(sniff(&server, Duration::from_secs(5)).await.is_none());
        let _silent = TcpStream::connect(addr).await.unwrap();
        let (server, _) = listener.accept().await.unwrap();
        assert!(sniff(&server, Duration::from_millis(50)).await.is_none());
    }
}
