//! Customer ingress: the HTTP and SOCKS5 proxies, their pure codecs, the
//! authenticator, and the path from a customer's target to a device exit.

pub mod allowlist;
pub mod auth;
pub mod error;
pub mod exit;
pub mod http;
pub mod http_head;
pub mod principal;
pub mod socks;
pub mod socks5;

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info};

use self::auth::SourceKey;
use crate::state::State;

#[derive(Clone, Copy, Debug)]
pub enum Protocol {
    Http,
    Socks5,
    /// Either, told apart by the first byte (per-exit ports).
    Sniff,
}

/// Bounds on connections that have not authenticated yet (slowloris).
/// Each listener has its own. Every handshake also has a deadline
/// (`handshake_timeout_secs`); these bound how many can be pending at once.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HandshakeLimits {
    /// Pending handshakes one source (IPv4 address, IPv6 /64) may hold
    /// while the listener is busy.
    pub per_source: usize,
    /// The listener counts as busy from this many pending handshakes on;
    /// below it one source may hold more than `per_source`. A customer
    /// opening hundreds of connections at once (scrapers do) is then not
    /// refused while nobody else is waiting, yet once the listener fills
    /// up no source can take more than its share. 0 makes `per_source`
    /// a hard cap.
    pub busy_from: usize,
    /// Pending handshakes in all: beyond it every new connection is closed.
    pub total: usize,
}

impl Default for HandshakeLimits {
    fn default() -> Self {
        Self {
            per_source: 64,
            busy_from: 1024,
            total: 4096,
        }
    }
}

/// Why a connection was closed at once.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Crowded {
    /// Its source holds its share of a busy listener.
    Source(usize),
    /// The listener holds `total` pending handshakes.
    Listener,
}

/// Pending handshakes per source: only sources with at least one are kept,
/// so the table never holds more than `total` entries.
#[derive(Debug, Default)]
struct Pending {
    total: usize,
    by_source: HashMap<SourceKey, usize>,
}

impl Pending {
    fn admit(&mut self, source: SourceKey, limits: &HandshakeLimits) -> Result<(), Crowded> {
        if self.total >= limits.total {
            return Err(Crowded::Listener);
        }
        let held = self.by_source.get(&source).copied().unwrap_or(0);
        if self.total >= limits.busy_from && held >= limits.per_source {
            return Err(Crowded::Source(held));
        }
        self.total += 1;
        *self.by_source.entry(source).or_default() += 1;
        Ok(())
    }

    fn release(&mut self, source: SourceKey) {
        self.total = self.total.saturating_sub(1);
        if let Some(n) = self.by_source.get_mut(&source) {
            *n -= 1;
            if *n == 0 {
                self.by_source.remove(&source);
            }
        }
    }
}

/// One listener's handshake bookkeeping.
struct HandshakeGate {
    limits: HandshakeLimits,
    pending: Mutex<Pending>,
    /// Refusals are logged at info at most once per interval.
    logged_at: Mutex<Option<Instant>>,
}

/// A pending handshake; dropped when the connection authenticates or ends.
struct HandshakeSlot {
    gate: Arc<HandshakeGate>,
    source: SourceKey,
}

impl Drop for HandshakeSlot {
    fn drop(&mut self) {
        self.gate.lock().release(self.source);
    }
}

const CROWDED_LOG_EVERY: Duration = Duration::from_secs(10);

impl HandshakeGate {
    fn new(limits: HandshakeLimits) -> Arc<Self> {
        Arc::new(Self {
            limits,
            pending: Mutex::new(Pending::default()),
            logged_at: Mutex::new(None),
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Pending> {
        self.pending.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn enter(self: &Arc<Self>, ip: IpAddr) -> Result<HandshakeSlot, Crowded> {
        let source = SourceKey::from(ip);
        self.lock().admit(source, &self.limits)?;
        Ok(HandshakeSlot {
            gate: self.clone(),
            source,
        })
    }

    fn log_refusal(&self, protocol: Protocol, ip: IpAddr, why: Crowded) {
        let what = match why {
            Crowded::Source(n) => format!("{} holds {n} pending handshakes", SourceKey::from(ip)),
            Crowded::Listener => format!("{} handshakes pending in all", self.limits.total),
        };
        let mut at = self.logged_at.lock().unwrap_or_else(|e| e.into_inner());
        let now = Instant::now();
        if at.is_none_or(|t| now.duration_since(t) >= CROWDED_LOG_EVERY) {
            *at = Some(now);
            info!("{protocol:?} proxy: closing new connections at once: {what}");
        } else {
            debug!("{protocol:?} proxy: closing a new connection at once: {what}");
        }
    }
}

/// Accept customers until shutdown; each connection is its own task.
/// Relay a customer's connection over its flow, paced by the plan's
/// bandwidth limits and counted toward its quota as bytes move. When the
/// customer is locked out, banned or out of quota (also when this very
/// flow used the quota up), the connection is shut down; the relay then
/// ends and its byte counts still reach the accounting.
pub(crate) async fn relay_flow(
    tcp: &tokio::net::TcpStream,
    flow: &mut exit::Flow,
    pending: bytes::Bytes,
) -> shared::quic::relay::RelayStats {
    let cancel = flow.admission.cancel_token().clone();
    // Paces the bandwidth and counts the quota while bytes flow; `None`
    // (no hook at all) for a plan with neither. Reaching the quota kicks,
    // which cancels `cancel` below.
    let relay = shared::quic::relay::relay_throttled(
        tcp,
        &mut flow.send,
        &mut flow.recv,
        pending,
        flow.admission.relay_throttle(),
    );
    tokio::pin!(relay);
    tokio::select! {
        stats = &mut relay => stats,
        _ = cancel.cancelled() => {
            info!("closing the connection: the customer's access was revoked");
            let _ = socket2::SockRef::from(tcp).shutdown(std::net::Shutdown::Both);
            tokio::time::timeout(Duration::from_secs(5), relay)
                .await
                .unwrap_or_default()
        }
    }
}

pub async fn serve(
    listener: TcpListener,
    protocol: Protocol,
    state: Arc<State>,
    shutdown: CancellationToken,
) {
    let limits = state.cfg.security.handshake_limits();
    serve_with(listener, protocol, state, shutdown, limits).await
}

/// [`serve`] with explicit handshake limits.
pub async fn serve_with(
    listener: TcpListener,
    protocol: Protocol,
    state: Arc<State>,
    shutdown: CancellationToken,
    limits: HandshakeLimits,
) {
    serve_pinned(listener, protocol, None, state, shutdown, limits).await
}

/// [`serve_with`] whose flows all leave through `pinned` (device id, exit
/// name) when set: a per-exit port ([`crate::ports`]).
pub async fn serve_pinned(
    listener: TcpListener,
    protocol: Protocol,
    pinned: Option<(String, String)>,
    state: Arc<State>,
    shutdown: CancellationToken,
    limits: HandshakeLimits,
) {
    let gate = HandshakeGate::new(limits);
    loop {
        let (tcp, peer) = tokio::select! {
            _ = shutdown.cancelled() => break,
            r = listener.accept() => match r {
                Ok(x) => x,
                Err(e) => {
                    // Usually EMFILE: back off briefly instead of spinning.
                    debug!("accept failed: {e}");
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let slot = match gate.enter(peer.ip()) {
            Ok(s) => s,
            Err(why) => {
                gate.log_refusal(protocol, peer.ip(), why);
                if let Protocol::Http = protocol {
                    // One non-blocking write into a fresh socket buffer;
                    // SOCKS5 has no message for this before the greeting.
                    let (status, reason) = match why {
                        Crowded::Source(_) => (429, "Too Many Requests"),
                        Crowded::Listener => (503, "Service Unavailable"),
                    };
                    let _ = tcp.try_write(&http_head::simple_response(
                        status,
                        reason,
                        &[("Retry-After", "1")],
                        "cellgate: too many connections waiting to authenticate, try again shortly\n",
                    ));
                }
                continue;
            }
        };
        let _ = tcp.set_nodelay(true);
        shared::quic::relay::enable_keepalive(&tcp);
        let state = state.clone();
        let shutdown = shutdown.clone();
        let pinned = pinned.clone();
        state.tasks.clone().spawn(auth::for_connection(
            peer.ip(),
            Box::new(slot),
            async move {
                tokio::select! {
                    _ = shutdown.cancelled() => {}
                    _ = async {
                        let protocol = match protocol {
                            Protocol::Sniff => {
                                crate::ports::sniff(&tcp, state.cfg.handshake_timeout()).await
                            }
                            p => Some(p),
                        };
                        match protocol {
                            Some(Protocol::Socks5) => socks::handle(tcp, peer, &state, pinned).await,
                            Some(_) => http::handle(tcp, peer, &state, pinned).await,
                            None => {}
                        }
                    } => {}
                }
            },
        ));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn src(last: u8) -> SourceKey {
        SourceKey::from(IpAddr::from([192, 0, 2, last]))
    }

    #[test]
    fn one_source_is_capped_only_once_the_listener_is_busy() {
        let limits = HandshakeLimits {
            per_source: 2,
            busy_from: 4,
            total: 6,
        };
        let mut p = Pending::default();
        // Quiet listener: one source may take more than its share ...
        for _ in 0..4 {
            assert_eq!(p.admit(src(1), &limits), Ok(()));
        }
        // ... until the listener is busy.
        assert_eq!(p.admit(src(1), &limits), Err(Crowded::Source(4)));
        // Others still get their share, then the total is the limit.
        assert_eq!(p.admit(src(2), &limits), Ok(()));
        assert_eq!(p.admit(src(2), &limits), Ok(()));
        assert_eq!(p.admit(src(3), &limits), Err(Crowded::Listener));
        // Releasing frees slots; empty sources leave the table.
        p.release(src(2));
        p.release(src(2));
        assert_eq!(p.by_source.len(), 1);
        assert_eq!(p.admit(src(3), &limits), Ok(()));
        for _ in 0..4 {
            p.release(src(1));
        }
        p.release(src(3));
        assert_eq!((p.total, p.by_source.len()), (0, 0));
    }

    #[test]
    fn busy_from_zero_makes_per_source_a_hard_cap() {
        let limits = HandshakeLimits {
            per_source: 2,
            busy_from: 0,
            total: 100,
        };
        let mut p = Pending::default();
        assert_eq!(p.admit(src(1), &limits), Ok(()));
        assert_eq!(p.admit(src(1), &limits), Ok(()));
        assert_eq!(p.admit(src(1), &limits), Err(Crowded::Source(2)));
        assert_eq!(p.admit(src(2), &limits), Ok(()));
    }

    #[test]
    fn a_slot_is_released_when_dropped() {
        let gate = HandshakeGate::new(HandshakeLimits {
            per_source: 1,
            busy_from: 0,
            total: 10,
        });
        let ip = IpAddr::from([192, 0, 2, 1]);
        let slot = gate.enter(ip).unwrap();
        assert!(gate.enter(ip).is_err());
        drop(slot);
        assert!(gate.enter(ip).is_ok());
    }
}
