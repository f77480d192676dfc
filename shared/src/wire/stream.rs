//! Messages at the head of a data stream.

use serde::{Deserialize, Serialize};

use crate::target::TargetAddr;

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum StreamMsg {
    /// CP → agent, first frame of every data stream.
    /// `exit` names which of the agent's exits (uplinks) the flow leaves
    /// through.
    Open {
        flow_id: u64,
        exit: String,
        target: TargetAddr,
    },
    /// Agent → CP: connected; raw bytes follow in both directions.
    Opened,
    /// Agent → CP: not connected; the stream ends. Also CP → agent when a
    /// [`StreamMsg::FetchRelease`] cannot be served.
    Refused {
        reason: RefuseReason,
        message: String,
    },
    /// Agent → CP, first frame of a stream the agent opens: send the
    /// binary of this release.
    FetchRelease { version: String, target: String },
    /// CP → agent: exactly `size` raw bytes of the binary follow, then the
    /// stream ends. The agent refuses a size other than the signed one.
    Release { size: u64 },
}

/// Why an exit did not connect. Mapped to HTTP statuses and SOCKS5 reply
/// codes in one place on the control plane.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum RefuseReason {
    /// The target is on the deny list (after DNS resolution).
    Denied,
    /// The name did not resolve.
    DnsFailed,
    /// The target actively refused (TCP RST).
    ConnectionRefused,
    NetworkUnreachable,
    HostUnreachable,
    Timeout,
    /// The agent is shutting down or overloaded.
    ExitUnavailable,
    Other,
}

impl RefuseReason {
    /// Whether another exit could plausibly succeed where this one failed.
    pub fn retryable(self) -> bool {
        !matches!(self, RefuseReason::Denied | RefuseReason::DnsFailed)
    }
}
