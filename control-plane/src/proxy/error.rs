//! Why a customer's connection failed, said once, and mapped in one place
//! to an HTTP status and a SOCKS5 reply.

use shared::wire::RefuseReason;

use super::socks5::Reply;

#[derive(Debug, thiserror::Error)]
pub enum ProxyError {
    /// The target is on the deny list (literal here, or resolved at the exit).
    #[error("target not allowed: {0}")]
    Denied(String),
    #[error("no exit is online")]
    NoExit,
    /// Exits are online, but none matches the username's targeting.
    #[error("no available exit matches {0}")]
    NoMatch(String),
    /// A plan limit refused the connection; the text says which.
    #[error("{}", .0.message)]
    Limited(crate::limits::Denial),
    /// The exit could not reach the target.
    #[error("exit could not connect ({reason:?}): {message}")]
    Upstream {
        reason: RefuseReason,
        message: String,
    },
    /// The tunnel to the exit failed.
    #[error("exit failed: {0}")]
    Exit(String),
    #[error("timed out waiting for the exit or the origin")]
    Timeout,
}

impl ProxyError {
    pub fn http_status(&self) -> (u16, &'static str) {
        match self {
            ProxyError::Denied(_)
            | ProxyError::Upstream {
                reason: RefuseReason::Denied,
                ..
            } => (403, "Forbidden"),
            ProxyError::NoExit | ProxyError::NoMatch(_) => (503, "Service Unavailable"),
            ProxyError::Limited(d) => match d.kind {
                crate::limits::DenialKind::Threads
                | crate::limits::DenialKind::ConnRate
                | crate::limits::DenialKind::LockedOut => (429, "Too Many Requests"),
                _ => (403, "Forbidden"),
            },
            ProxyError::Timeout
            | ProxyError::Upstream {
                reason: RefuseReason::Timeout,
                ..
            } => (504, "Gateway Timeout"),
            ProxyError::Upstream { .. } | ProxyError::Exit(_) => (502, "Bad Gateway"),
        }
    }

    pub fn socks_reply(&self) -> Reply {
        match self {
            ProxyError::Denied(_) | ProxyError::Limited(_) => Reply::NotAllowed,
            ProxyError::NoExit | ProxyError::NoMatch(_) | ProxyError::Exit(_) => {
                Reply::GeneralFailure
            }
            ProxyError::Timeout => Reply::HostUnreachable,
            ProxyError::Upstream { reason, .. } => match reason {
                RefuseReason::Denied => Reply::NotAllowed,
                RefuseReason::NetworkUnreachable => Reply::NetworkUnreachable,
                RefuseReason::DnsFailed | RefuseReason::HostUnreachable | RefuseReason::Timeout => {
                    Reply::HostUnreachable
                }
                RefuseReason::ConnectionRefused => Reply::ConnectionRefused,
                RefuseReason::ExitUnavailable | RefuseReason::Other => Reply::GeneralFailure,
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mapping_table() {
        let up = |reason| ProxyError::Upstream {
            reason,
            message: String::new(),
        };
        let cases: Vec<(ProxyError, u16, Reply)> = vec![
            (ProxyError::Denied("x".into()), 403, Reply::NotAllowed),
            (up(RefuseReason::Denied), 403, Reply::NotAllowed),
            (ProxyError::NoExit, 503, Reply::GeneralFailure),
            (ProxyError::Timeout, 504, Reply::HostUnreachable),
            (up(RefuseReason::Timeout), 504, Reply::HostUnreachable),
            (
                up(RefuseReason::ConnectionRefused),
                502,
                Reply::ConnectionRefused,
            ),
            (
                up(RefuseReason::NetworkUnreachable),
                502,
                Reply::NetworkUnreachable,
            ),
            (up(RefuseReason::DnsFailed), 502, Reply::HostUnreachable),
            (ProxyError::Exit("x".into()), 502, Reply::GeneralFailure),
        ];
        for (e, status, reply) in cases {
            assert_eq!(e.http_status().0, status, "{e}");
            assert_eq!(e.socks_reply() as u8, reply as u8, "{e}");
        }
    }
}
