//! From a customer's target to an open data stream on a device exit.

use std::sync::atomic::Ordering;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use quinn::{RecvStream, SendStream};
use shared::quic::framed::{read_frame, write_frame};
use shared::target::TargetAddr;
use shared::wire::StreamMsg;
use tracing::debug;

use super::error::ProxyError;
use crate::registry::{FlowGuard, Route};
use crate::state::State;

/// Other exits tried after the first one fails before any byte moved.
const MAX_RETRIES: usize = 2;

/// A connected flow: the stream pair, bytes the exit sent behind `Opened`,
/// and the guard that keeps the flow counted on its device.
pub struct Flow {
    pub send: SendStream,
    pub recv: RecvStream,
    pub pending: Bytes,
    pub guard: FlowGuard,
    pub flow_id: u64,
}

impl Flow {
    pub fn device_id(&self) -> &str {
        &self.guard.session.device_id
    }

    pub fn exit_name(&self) -> &str {
        &self.guard.exit.name
    }

    /// Count relayed bytes on the device and the exit.
    pub fn account(&self, up: u64, down: u64) {
        let g = &self.guard;
        g.session.bytes_up.fetch_add(up, Ordering::Relaxed);
        g.session.bytes_down.fetch_add(down, Ordering::Relaxed);
        g.exit.bytes_up.fetch_add(up, Ordering::Relaxed);
        g.exit.bytes_down.fetch_add(down, Ordering::Relaxed);
    }
}

/// Check the target, pick an exit, open a stream; retry other exits when an
/// exit fails in a way another exit might not.
pub async fn connect(state: &State, target: &TargetAddr) -> Result<Flow, ProxyError> {
    let policy = state.target_policy();
    policy
        .check_port(target.port())
        .map_err(|r| ProxyError::Denied(r.as_str().into()))?;
    if let TargetAddr::Ip(sa) = target {
        policy
            .check(sa.ip(), sa.port())
            .map_err(|r| ProxyError::Denied(r.as_str().into()))?;
    }
    let mut tried: Vec<(String, String)> = Vec::new();
    let mut last = ProxyError::NoExit;
    for _ in 0..=MAX_RETRIES {
        let want = crate::routing::Want {
            filter: &crate::routing::Filter::default(),
            strategy: crate::routing::Strategy::RoundRobin,
            client: std::net::Ipv4Addr::UNSPECIFIED.into(),
            session: None,
            exclude: &tried,
        };
        let Some((route, _)) = state.router.pick(&state.registry, &want) else {
            break;
        };
        let exit = route.exit.clone();
        let flow_id = state.flow_ids.fetch_add(1, Ordering::Relaxed) + 1;
        match open_on(route, flow_id, target, state.cfg.connect_timeout()).await {
            Ok(flow) => {
                crate::rotation::note_request(state, &exit);
                return Ok(flow);
            }
            Err(e) => {
                debug!(device = %exit.device_id, exit = %exit.name, flow = flow_id, "exit failed: {e}");
                let retry = match &e {
                    ProxyError::Upstream { reason, .. } => reason.retryable(),
                    ProxyError::Exit(_) | ProxyError::Timeout => true,
                    ProxyError::Denied(_) | ProxyError::NoExit => false,
                };
                tried.push((exit.device_id.clone(), exit.name.clone()));
                last = e;
                if !retry {
                    break;
                }
            }
        }
    }
    Err(last)
}

async fn open_on(
    route: Route,
    flow_id: u64,
    target: &TargetAddr,
    connect_timeout: Duration,
) -> Result<Flow, ProxyError> {
    let started = std::time::Instant::now();
    let guard = FlowGuard::new(route.session, route.exit);
    // The agent's own connect timeout plus room for the tunnel round trip.
    let deadline = connect_timeout + Duration::from_secs(2);
    let opened = tokio::time::timeout(deadline, async {
        let (mut send, mut recv) = guard
            .session
            .conn
            .open_bi()
            .await
            .map_err(|e| ProxyError::Exit(e.to_string()))?;
        write_frame(
            &mut send,
            &StreamMsg::Open {
                flow_id,
                exit: guard.exit.name.clone(),
                target: target.clone(),
            },
        )
        .await
        .map_err(|e| ProxyError::Exit(e.to_string()))?;
        let mut buf = BytesMut::new();
        match read_frame::<StreamMsg>(&mut recv, &mut buf).await {
            Ok(Some(StreamMsg::Opened)) => Ok((send, recv, buf.freeze())),
            Ok(Some(StreamMsg::Refused { reason, message })) => {
                Err(ProxyError::Upstream { reason, message })
            }
            Ok(Some(other)) => Err(ProxyError::Exit(format!("unexpected answer {other:?}"))),
            Ok(None) => Err(ProxyError::Exit("exit closed the stream".into())),
            Err(e) => Err(ProxyError::Exit(e.to_string())),
        }
    })
    .await;
    let exit = &guard.exit;
    match opened {
        Ok(Ok((send, recv, pending))) => {
            exit.successes.fetch_add(1, Ordering::Relaxed);
            exit.open_ms_total
                .fetch_add(started.elapsed().as_millis() as u64, Ordering::Relaxed);
            Ok(Flow {
                send,
                recv,
                pending,
                guard,
                flow_id,
            })
        }
        Ok(Err(e)) => {
            // A target's refusal is not the exit's fault.
            if !matches!(e, ProxyError::Upstream { .. }) {
                exit.failures.fetch_add(1, Ordering::Relaxed);
            }
            Err(e)
        }
        Err(_) => {
            exit.failures.fetch_add(1, Ordering::Relaxed);
            Err(ProxyError::Timeout)
        }
    }
}
