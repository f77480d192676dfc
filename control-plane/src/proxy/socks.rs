//! SOCKS5 connections: handshake under a deadline, authenticate, connect
//! through an exit, relay.

use std::net::SocketAddr;

use bytes::BytesMut;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tracing::{Instrument, debug, info_span};

use super::auth::AuthError;
use super::socks5::{self, Command, Reply};
use super::{error::ProxyError, exit};
use crate::state::State;

/// Why a handshake ended without a flow. Logged at debug level: garbage and
/// scanners are routine on a public proxy port.
#[derive(Debug, thiserror::Error)]
enum Handshake {
    #[error("client went away")]
    Closed,
    #[error("socket: {0}")]
    Io(#[from] std::io::Error),
    #[error("{0}")]
    Protocol(#[from] socks5::SocksError),
    #[error("message longer than any valid SOCKS5 message")]
    TooLong,
}

/// Read until `parse` yields a message; the buffer never grows beyond a
/// valid message's size.
async fn read_msg<T>(
    tcp: &mut TcpStream,
    buf: &mut BytesMut,
    parse: impl Fn(&[u8]) -> Result<Option<(T, usize)>, socks5::SocksError>,
) -> Result<T, Handshake> {
    loop {
        if let Some((msg, used)) = parse(buf)? {
            let _ = buf.split_to(used);
            return Ok(msg);
        }
        if buf.len() >= socks5::MAX_MESSAGE {
            return Err(Handshake::TooLong);
        }
        buf.reserve(socks5::MAX_MESSAGE - buf.len());
        if tcp.read_buf(buf).await? == 0 {
            return Err(Handshake::Closed);
        }
    }
}

/// `pinned`: the (device id, exit name) of a per-exit port
/// ([`crate::ports`]), else `None`.
pub async fn handle(
    mut tcp: TcpStream,
    peer: SocketAddr,
    state: &State,
    pinned: Option<(String, String)>,
) {
    let span = info_span!("socks5", %peer);
    async move {
        let mut buf = BytesMut::new();
        let deadline = state.cfg.handshake_timeout();
        let req = match tokio::time::timeout(deadline, handshake(&mut tcp, &mut buf, state, peer)).await {
            Ok(Ok(Some(req))) => req,
            Ok(Ok(None)) => return,
            Ok(Err(e)) => {
                debug!("handshake failed: {e}");
                return;
            }
            Err(_) => {
                debug!("handshake deadline passed");
                return;
            }
        };
        let (target, principal) = req;
        let span = info_span!("flow", customer = %principal.username, %target);
        let access = exit::Access {
            plan: state.plan_for(principal.plan_id.as_deref()),
            principal,
            client: peer.ip(),
            pinned,
        };
        async move {
            let flow = match exit::connect(state, &target, &access).await {
                Ok(f) => f,
                Err(e) => {
                    log_refusal(&e);
                    let _ = tcp.write_all(&socks5::encode_reply(e.socks_reply(), None)).await;
                    return;
                }
            };
            let mut flow = flow;
            if tcp.write_all(&socks5::encode_reply(Reply::Succeeded, None)).await.is_err() {
                return;
            }
            // Data the client sent right behind its request (optimistic
            // clients) goes out first.
            let early = buf.len() as u64;
            let handshake_buf = std::mem::take(&mut buf);
            if !handshake_buf.is_empty() && flow.send.write_chunk(handshake_buf.freeze()).await.is_err() {
                return;
            }
            let pending = std::mem::take(&mut flow.pending);
            let stats = super::relay_flow(&tcp, &mut flow, pending).await;
            flow.account(state, stats.to_quic + early, stats.to_tcp);
            debug!(device = %flow.device_id(), up = stats.to_quic + early, down = stats.to_tcp, "flow done");
        }
        .instrument(span)
        .await
    }
    .instrument(span)
    .await
}

pub(super) fn log_refusal(e: &ProxyError) {
    match e {
        ProxyError::Denied(_) => debug!("refused: {e}"),
        _ => tracing::info!("failed: {e}"),
    }
}

type Accepted = (shared::target::TargetAddr, super::auth::Principal);

async fn handshake(
    tcp: &mut TcpStream,
    buf: &mut BytesMut,
    state: &State,
    peer: SocketAddr,
) -> Result<Option<Accepted>, Handshake> {
    let greeting = read_msg(tcp, buf, socks5::parse_greeting).await?;
    // NO-AUTH only for an allow-listed source (software that cannot send
    // credentials); everyone else gets 0xFF for it as before.
    let by_source = match greeting.methods.contains(&socks5::METHOD_NONE) {
        true => super::allowlist::lookup(state, peer.ip()),
        false => None,
    };
    let method = socks5::select_method_for(&greeting, by_source.is_some());
    tcp.write_all(&socks5::encode_method_choice(method)).await?;
    let principal = match (method, by_source) {
        (socks5::METHOD_NONE, Some(p)) => p,
        (socks5::METHOD_USERPASS, _) => match userpass(tcp, buf, state).await? {
            Some(p) => p,
            None => return Ok(None),
        },
        _ => return Ok(None),
    };
    let req = match read_msg(tcp, buf, socks5::parse_request).await {
        Ok(r) => r,
        Err(Handshake::Protocol(e)) => {
            if let Some(reply) = e.reply() {
                tcp.write_all(&socks5::encode_reply(reply, None)).await?;
            }
            return Err(Handshake::Protocol(e));
        }
        Err(e) => return Err(e),
    };
    if req.command != Command::Connect {
        tcp.write_all(&socks5::encode_reply(Reply::CommandNotSupported, None))
            .await?;
        return Ok(None);
    }
    Ok(Some((req.target, principal)))
}

/// RFC 1929: read and check the credentials, answer the status; `None`
/// when the client is turned away.
async fn userpass(
    tcp: &mut TcpStream,
    buf: &mut BytesMut,
    state: &State,
) -> Result<Option<super::auth::Principal>, Handshake> {
    let creds = read_msg(tcp, buf, socks5::parse_userpass).await?;
    let principal = match state.auth.verify(&creds.username, &creds.password).await {
        Ok(p) => p,
        Err(AuthError::BadParams(msg)) => {
            debug!("username parameters: {msg}");
            tcp.write_all(&socks5::encode_auth_status(false)).await?;
            return Ok(None);
        }
        Err(AuthError::Invalid) => {
            debug!(user = %String::from_utf8_lossy(&creds.username), "authentication failed");
            tcp.write_all(&socks5::encode_auth_status(false)).await?;
            return Ok(None);
        }
        Err(AuthError::Unavailable) => {
            // Not the customer's fault: close without claiming the
            // password was wrong.
            tracing::warn!("authentication unavailable (database?)");
            return Ok(None);
        }
    };
    tcp.write_all(&socks5::encode_auth_status(true)).await?;
    Ok(Some(principal))
}
