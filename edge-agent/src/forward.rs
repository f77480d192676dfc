//! Serving one customer flow: read `Open`, resolve on the device, check the
//! deny list on every resolved address, dial with a timeout, answer, relay.

use std::io;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::time::Duration;

use bytes::BytesMut;
use quinn::{RecvStream, SendStream};
use shared::policy::TargetPolicy;
use shared::quic::framed::{read_frame, write_frame};
use shared::quic::relay::relay;
use shared::target::TargetAddr;
use shared::wire::{RefuseReason, StreamMsg};
use tokio::net::TcpStream;
use tracing::{Instrument, debug, debug_span};

use crate::exits::{Exit, Exits};

/// Time the control plane has to send `Open` after opening a stream.
const OPEN_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Default, Debug)]
pub struct FlowCounters {
    pub active: AtomicU32,
    pub total: AtomicU64,
    /// Device → target.
    pub bytes_up: AtomicU64,
    /// Target → device.
    pub bytes_down: AtomicU64,
}

pub async fn serve_flow(
    mut send: SendStream,
    mut recv: RecvStream,
    policy: &TargetPolicy,
    exits: &Exits,
    connect_timeout: Duration,
    counters: &FlowCounters,
) {
    let mut buf = BytesMut::new();
    let open =
        tokio::time::timeout(OPEN_TIMEOUT, read_frame::<StreamMsg>(&mut recv, &mut buf)).await;
    let (flow_id, exit_name, target) = match open {
        Ok(Ok(Some(StreamMsg::Open {
            flow_id,
            exit,
            target,
        }))) => (flow_id, exit, target),
        _ => {
            let _ = send.reset(shared::wire::close_code::PROTOCOL_ERROR.into());
            return;
        }
    };
    counters.active.fetch_add(1, Ordering::Relaxed);
    counters.total.fetch_add(1, Ordering::Relaxed);
    let span = debug_span!("flow", id = flow_id, exit = %exit_name, %target);
    async {
        let dialed = match exits.get(&exit_name) {
            Some(exit) => dial(&target, policy, connect_timeout, exit).await,
            None => Err((
                RefuseReason::ExitUnavailable,
                format!("this agent has no exit {exit_name:?}"),
            )),
        };
        match dialed {
            Ok(tcp) => {
                if write_frame(&mut send, &StreamMsg::Opened).await.is_err() {
                    return;
                }
                // Anything the control plane sent behind `Open` is customer data.
                if !buf.is_empty() && shared::quic::relay::write_all(&tcp, &buf).await.is_err() {
                    return;
                }
                let early = buf.len() as u64;
                let stats = relay(&tcp, &mut send, &mut recv, bytes::Bytes::new()).await;
                counters
                    .bytes_up
                    .fetch_add(stats.to_tcp + early, Ordering::Relaxed);
                counters
                    .bytes_down
                    .fetch_add(stats.to_quic, Ordering::Relaxed);
                debug!(
                    up = stats.to_tcp + early,
                    down = stats.to_quic,
                    clean = stats.clean,
                    "flow done"
                );
            }
            Err((reason, message)) => {
                debug!(?reason, %message, "refused");
                let _ = write_frame(&mut send, &StreamMsg::Refused { reason, message }).await;
                let _ = send.finish();
            }
        }
    }
    .instrument(span)
    .await;
    counters.active.fetch_sub(1, Ordering::Relaxed);
}

type Refusal = (RefuseReason, String);

/// Resolve and connect. Every address is checked right before it is dialed,
/// and the checked address is the one dialed, so DNS rebinding between a
/// check and the connect is impossible.
pub async fn dial(
    target: &TargetAddr,
    policy: &TargetPolicy,
    timeout: Duration,
    exit: &Exit,
) -> Result<TcpStream, Refusal> {
    policy
        .check_port(target.port())
        .map_err(|r| (RefuseReason::Denied, r.as_str().to_string()))?;
    // One deadline for resolving and connecting together: the control plane
    // waits `timeout` plus a margin for the whole answer.
    let deadline = tokio::time::Instant::now() + timeout;
    let candidates: Vec<SocketAddr> = match target {
        TargetAddr::Ip(sa) => vec![*sa],
        TargetAddr::Domain(name, port) => {
            match tokio::time::timeout_at(deadline, exit.resolve(name, *port)).await {
                Ok(Ok(addrs)) => addrs,
                Ok(Err(e)) => return Err((RefuseReason::DnsFailed, format!("{name}: {e}"))),
                Err(_) => {
                    return Err((RefuseReason::Timeout, format!("resolving {name} timed out")));
                }
            }
        }
    };
    if candidates.is_empty() {
        return Err((RefuseReason::DnsFailed, "no address".into()));
    }
    let mut allowed = Vec::with_capacity(candidates.len());
    let mut denial = None;
    for a in candidates {
        match policy.check(a.ip(), a.port()) {
            Ok(()) => allowed.push(a),
            Err(r) => denial = Some(r),
        }
    }
    if allowed.is_empty() {
        let r = denial.map(|r| r.as_str()).unwrap_or("denied");
        return Err((RefuseReason::Denied, format!("{target}: {r}")));
    }
    let mut last = (RefuseReason::Other, String::from("no address to try"));
    for addr in allowed {
        let left = deadline.saturating_duration_since(tokio::time::Instant::now());
        match tokio::time::timeout_at(deadline, exit.connect(addr, left)).await {
            Ok(Ok(tcp)) => return Ok(tcp),
            Ok(Err(e)) if e.kind() == io::ErrorKind::TimedOut => {
                return Err((
                    RefuseReason::Timeout,
                    format!("connecting to {target} timed out"),
                ));
            }
            Ok(Err(e)) => last = (classify(&e), format!("{addr}: {e}")),
            Err(_) => {
                return Err((
                    RefuseReason::Timeout,
                    format!("connecting to {target} timed out"),
                ));
            }
        }
    }
    Err(last)
}

fn classify(e: &io::Error) -> RefuseReason {
    match e.kind() {
        io::ErrorKind::ConnectionRefused => RefuseReason::ConnectionRefused,
        io::ErrorKind::NetworkUnreachable => RefuseReason::NetworkUnreachable,
        io::ErrorKind::HostUnreachable => RefuseReason::HostUnreachable,
        io::ErrorKind::TimedOut => RefuseReason::Timeout,
        _ => RefuseReason::Other,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn default_exit() -> std::sync::Arc<Exit> {
        Exits::from_config(&[]).unwrap().all()[0].clone()
    }

    #[tokio::test]
    async fn denies_loopback_after_resolution() {
        let p = TargetPolicy::default();
        let t = TargetAddr::Domain("localhost".into(), 80);
        let e = dial(&t, &p, Duration::from_secs(2), &default_exit())
            .await
            .unwrap_err();
        assert_eq!(e.0, RefuseReason::Denied);
        let t = TargetAddr::Ip("[::ffff:127.0.0.1]:80".parse().unwrap());
        assert_eq!(
            dial(&t, &p, Duration::from_secs(2), &default_exit())
                .await
                .unwrap_err()
                .0,
            RefuseReason::Denied
        );
        let t = TargetAddr::Ip("1.1.1.1:25".parse().unwrap());
        assert_eq!(
            dial(&t, &p, Duration::from_secs(2), &default_exit())
                .await
                .unwrap_err()
                .0,
            RefuseReason::Denied
        );
    }

    #[tokio::test]
    async fn refused_and_allowed_with_private_switch() {
        let p = TargetPolicy {
            allow_private_targets: true,
            protected_ports: vec![],
            protected_port_ranges: vec![],
            protected_ips: vec![],
        };
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = l.local_addr().unwrap().port();
        let t = TargetAddr::Domain("localhost".into(), port);
        assert!(
            dial(&t, &p, Duration::from_secs(2), &default_exit())
                .await
                .is_ok()
        );
        drop(l);
        let t = TargetAddr::Ip(SocketAddr::from(([127, 0, 0, 1], port)));
        assert_eq!(
            dial(&t, &p, Duration::from_secs(2), &default_exit())
                .await
                .unwrap_err()
                .0,
            RefuseReason::ConnectionRefused
        );
    }
}
