//! From a customer's target to an open data stream on a device exit.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use quinn::{RecvStream, SendStream};
use shared::quic::framed::{read_frame, write_frame};
use shared::target::TargetAddr;
use shared::wire::StreamMsg;
use tracing::debug;

use super::error::ProxyError;
use crate::registry::{DeviceSession, FlowGuard};
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

    /// Count relayed bytes on the device.
    pub fn account(&self, up: u64, down: u64) {
        self.guard.session.bytes_up.fetch_add(up, Ordering::Relaxed);
        self.guard
            .session
            .bytes_down
            .fetch_add(down, Ordering::Relaxed);
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
    let mut tried: Vec<String> = Vec::new();
    let mut last = ProxyError::NoExit;
    for _ in 0..=MAX_RETRIES {
        let Some(exit) = state.registry.pick(&tried) else {
            break;
        };
        let flow_id = state.flow_ids.fetch_add(1, Ordering::Relaxed) + 1;
        match open_on(exit.clone(), flow_id, target, state.cfg.connect_timeout()).await {
            Ok(flow) => return Ok(flow),
            Err(e) => {
                debug!(device = %exit.device_id, flow = flow_id, "exit failed: {e}");
                let retry = match &e {
                    ProxyError::Upstream { reason, .. } => reason.retryable(),
                    ProxyError::Exit(_) | ProxyError::Timeout => true,
                    ProxyError::Denied(_) | ProxyError::NoExit => false,
                };
                tried.push(exit.device_id.clone());
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
    exit: Arc<DeviceSession>,
    flow_id: u64,
    target: &TargetAddr,
    connect_timeout: Duration,
) -> Result<Flow, ProxyError> {
    let guard = FlowGuard::new(exit);
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
    match opened {
        Ok(Ok((send, recv, pending))) => Ok(Flow {
            send,
            recv,
            pending,
            guard,
            flow_id,
        }),
        Ok(Err(e)) => Err(e),
        Err(_) => Err(ProxyError::Timeout),
    }
}
