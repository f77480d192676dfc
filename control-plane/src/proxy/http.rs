//! HTTP proxy connections: `CONNECT` tunnels, and absolute-form plain HTTP
//! requests forwarded one upstream flow per request, with keep-alive to the
//! customer (so consecutive requests may go to different hosts).

use std::io;
use std::net::SocketAddr;
use std::time::Duration;

use bytes::{Buf, BytesMut};
use quinn::{RecvStream, SendStream};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tracing::{Instrument, debug, info_span};

use super::auth::AuthError;
use super::error::ProxyError;
use super::exit;
use super::http_head::{
    self, BodyFraming, ChunkedTracker, HeadError, ProxyAuth, RequestHead, RequestTarget,
    ResponseHead,
};
use super::socks::log_refusal;
use crate::state::State;

const READ_CHUNK: usize = 16 * 1024;
const TIMED_OUT: &str = "the origin did not answer in time";

enum HeadRead {
    Head(Box<RequestHead>),
    /// The client closed between requests, or never sent one.
    Closed,
    Bad(HeadError),
    TimedOut,
}

/// `pinned`: the (device id, exit name) of a per-exit port
/// ([`crate::ports`]), else `None`.
pub async fn handle(
    mut tcp: TcpStream,
    peer: SocketAddr,
    state: &State,
    pinned: Option<(String, String)>,
) {
    let span = info_span!("http", %peer);
    async move {
        let mut buf = BytesMut::new();
        let handshake = state.cfg.handshake_timeout();
        let idle = Duration::from_secs(state.cfg.http_idle_secs);
        let mut first = true;
        loop {
            let read = if first {
                tokio::time::timeout(handshake, read_head(&mut tcp, &mut buf, handshake))
                    .await
                    .unwrap_or(HeadRead::TimedOut)
            } else {
                match tokio::time::timeout(idle, wait_readable(&mut tcp, &mut buf)).await {
                    Ok(Ok(true)) => read_head(&mut tcp, &mut buf, handshake).await,
                    _ => HeadRead::Closed,
                }
            };
            first = false;
            let head = match read {
                HeadRead::Head(h) => h,
                HeadRead::Closed | HeadRead::TimedOut => return,
                HeadRead::Bad(e) => {
                    debug!("bad request head: {e}");
                    let (status, reason) = match e.status() {
                        431 => (431, "Request Header Fields Too Large"),
                        _ => (400, "Bad Request"),
                    };
                    let body = format!("cellgate: {e}\n");
                    let _ = tcp
                        .write_all(&http_head::simple_response(status, reason, &[], &body))
                        .await;
                    return;
                }
            };
            let user = match head.proxy_credentials() {
                ProxyAuth::Basic { username, password } => {
                    // Under the handshake deadline: credential checks queue
                    // for a bounded pool of hashers.
                    tokio::time::timeout(handshake, state.auth.verify(&username, &password))
                        .await
                        .unwrap_or(Err(AuthError::Unavailable))
                }
                // Software that cannot send credentials: its source
                // address may stand for them.
                ProxyAuth::Missing => {
                    super::allowlist::lookup(state, peer.ip()).ok_or(AuthError::Invalid)
                }
                ProxyAuth::Malformed => Err(AuthError::Invalid),
            };
            let principal = match user {
                Ok(p) => p,
                Err(e) => {
                    let resp = match e {
                        // Not the customer's fault (database down): never
                        // claim the credentials were wrong.
                        AuthError::Unavailable => http_head::simple_response(
                            503,
                            "Service Unavailable",
                            &[("Retry-After", "5")],
                            "cellgate: authentication is temporarily unavailable, try again shortly\n",
                        ),
                        AuthError::BadParams(msg) => {
                            debug!("username parameters: {msg}");
                            http_head::simple_response(
                                407,
                                "Proxy Authentication Required",
                                &[("Proxy-Authenticate", "Basic realm=\"cellgate\"")],
                                &format!("cellgate: {msg}\n"),
                            )
                        }
                        AuthError::Invalid => {
                            debug!("proxy authentication missing or wrong");
                            http_head::simple_response(
                                407,
                                "Proxy Authentication Required",
                                &[("Proxy-Authenticate", "Basic realm=\"cellgate\"")],
                                "cellgate: proxy authentication required\n",
                            )
                        }
                    };
                    let _ = tcp.write_all(&resp).await;
                    return;
                }
            };
            let target = head.target.addr().clone();
            let span = info_span!("flow", customer = %principal.username, %target);
            let access = exit::Access {
                plan: state.plan_for(principal.plan_id.as_deref()),
                principal,
                client: peer.ip(),
                pinned: pinned.clone(),
            };
            let keep = match &head.target {
                RequestTarget::Authority(_) => {
                    connect_tunnel(&mut tcp, &mut buf, &head, state, &access)
                        .instrument(span)
                        .await;
                    false
                }
                RequestTarget::Absolute { .. } => {
                    forward(&mut tcp, &mut buf, &head, state, &access)
                        .instrument(span)
                        .await
                }
            };
            if !keep {
                return;
            }
        }
    }
    .instrument(span)
    .await
}

/// Wait until a byte of the next request arrives; `false` on EOF.
async fn wait_readable(tcp: &mut TcpStream, buf: &mut BytesMut) -> io::Result<bool> {
    if !buf.is_empty() {
        return Ok(true);
    }
    buf.reserve(READ_CHUNK);
    Ok(tcp.read_buf(buf).await? > 0)
}

async fn read_head(tcp: &mut TcpStream, buf: &mut BytesMut, deadline: Duration) -> HeadRead {
    let read = async {
        loop {
            match http_head::parse_request_head(buf) {
                Ok(Some((head, used))) => {
                    buf.advance(used);
                    return HeadRead::Head(Box::new(head));
                }
                Ok(None) => {}
                Err(e) => return HeadRead::Bad(e),
            }
            if buf.len() >= http_head::MAX_HEAD_LEN {
                return HeadRead::Bad(HeadError::TooLarge);
            }
            buf.reserve(READ_CHUNK);
            match tcp.read_buf(buf).await {
                Ok(0) if buf.is_empty() => return HeadRead::Closed,
                Ok(0) => {
                    return HeadRead::Bad(HeadError::Malformed(
                        "connection closed inside the request head".into(),
                    ));
                }
                Ok(_) => {}
                Err(_) => return HeadRead::Closed,
            }
        }
    };
    tokio::time::timeout(deadline, read)
        .await
        .unwrap_or(HeadRead::TimedOut)
}

async fn refuse(tcp: &mut TcpStream, e: &ProxyError) {
    log_refusal(e);
    let (status, reason) = e.http_status();
    let body = format!("cellgate: {e}\n");
    let retry = match e {
        ProxyError::Limited(d) => d.retry_after.map(|r| r.as_secs().max(1).to_string()),
        _ => None,
    };
    let headers: Vec<(&str, &str)> = retry.iter().map(|r| ("Retry-After", r.as_str())).collect();
    let _ = tcp
        .write_all(&http_head::simple_response(status, reason, &headers, &body))
        .await;
}

async fn connect_tunnel(
    tcp: &mut TcpStream,
    buf: &mut BytesMut,
    head: &RequestHead,
    state: &State,
    access: &exit::Access,
) {
    if !head.method.eq_ignore_ascii_case("CONNECT") {
        let resp = http_head::simple_response(
            400,
            "Bad Request",
            &[],
            "cellgate: authority-form needs CONNECT\n",
        );
        let _ = tcp.write_all(&resp).await;
        return;
    }
    let mut flow = match exit::connect(state, head.target.addr(), access).await {
        Ok(f) => f,
        Err(e) => return refuse(tcp, &e).await,
    };
    if tcp
        .write_all(b"HTTP/1.1 200 Connection established\r\n\r\n")
        .await
        .is_err()
    {
        return;
    }
    let early = buf.len() as u64;
    // Hand pipelined bytes to the exit and release the head buffer: a
    // tunnel may stay open for hours.
    let head_buf = std::mem::take(buf);
    if !head_buf.is_empty() && flow.send.write_chunk(head_buf.freeze()).await.is_err() {
        return;
    }
    let pending = std::mem::take(&mut flow.pending);
    let stats = super::relay_flow(tcp, &mut flow, pending).await;
    flow.account(state, stats.to_quic + early, stats.to_tcp);
    debug!(device = %flow.device_id(), up = stats.to_quic + early, down = stats.to_tcp, "tunnel done");
}

/// Forward one plain-HTTP request; returns whether the customer connection
/// can carry another request.
async fn forward(
    tcp: &mut TcpStream,
    buf: &mut BytesMut,
    head: &RequestHead,
    state: &State,
    access: &exit::Access,
) -> bool {
    let req_framing = match http_head::request_body_framing(head) {
        Ok(f) => f,
        Err(e) => {
            let resp = http_head::simple_response(
                e.status(),
                "Bad Request",
                &[],
                &format!("cellgate: {e}\n"),
            );
            let _ = tcp.write_all(&resp).await;
            return false;
        }
    };
    let mut flow = match exit::connect(state, head.target.addr(), access).await {
        Ok(f) => f,
        Err(e) => {
            refuse(tcp, &e).await;
            return false;
        }
    };
    if let RequestTarget::Absolute { path_and_query, .. } = &head.target {
        // The query may carry the customer's own secrets: only the path.
        let path = path_and_query.split('?').next().unwrap_or("/");
        flow.set_path(path);
    }
    let out = http_head::encode_origin_request(head);
    let mut up = out.len() as u64;
    if flow.send.write_all(&out).await.is_err() {
        refuse(
            tcp,
            &ProxyError::Exit("tunnel closed while sending the request".into()),
        )
        .await;
        return false;
    }
    let mut rbuf = BytesMut::from(&flow.pending[..]);
    // The body goes up while the response head is awaited, so interim
    // responses (100 Continue) reach a client that waits for them before
    // sending its body.
    let (final_head, body_complete) = {
        let (mut rd, mut wr) = tcp.split();
        let upload = body_to_exit(&mut rd, buf, &mut flow.send, req_framing);
        let response = read_final_head(&mut flow.recv, &mut rbuf, &mut wr);
        // The origin's clock starts once the whole request is out: a slow
        // upload is the customer's business, a silent origin is not.
        let deadline = tokio::time::sleep(Duration::from_secs(365 * 24 * 3600));
        tokio::pin!(upload, response, deadline);
        let mut uploaded: Option<io::Result<u64>> = None;
        loop {
            tokio::select! {
                r = &mut upload, if uploaded.is_none() => {
                    if let Err(e) = &r {
                        debug!("request body: {e}");
                        return false;
                    }
                    uploaded = Some(r);
                    let wait = Duration::from_secs(state.cfg.response_timeout_secs);
                    deadline.as_mut().reset(tokio::time::Instant::now() + wait);
                }
                h = &mut response => break (h, uploaded),
                _ = &mut deadline => break (Err(TIMED_OUT.to_string()), uploaded),
            }
        }
    };
    let resp = match final_head {
        Ok(Some(r)) => r,
        Ok(None) => return false,
        Err(e) if e == TIMED_OUT => {
            refuse(tcp, &ProxyError::Timeout).await;
            return false;
        }
        Err(e) => {
            refuse(
                tcp,
                &ProxyError::Exit(format!("bad response from the origin: {e}")),
            )
            .await;
            return false;
        }
    };
    // A final answer before the whole body (e.g. 413, or 417 to an
    // Expect) leaves the rest of the body unread: the connection cannot
    // carry another request.
    let body_done = match body_complete {
        Some(Ok(n)) => {
            up += n;
            true
        }
        _ => false,
    };
    let framing = match http_head::response_body_framing(&head.method, &resp) {
        Ok(f) => f,
        Err(e) => {
            refuse(
                tcp,
                &ProxyError::Exit(format!("bad response from the origin: {e}")),
            )
            .await;
            return false;
        }
    };
    let keep = body_done
        && resp.status != 101
        && framing != BodyFraming::UntilClose
        && http_head::client_wants_keep_alive(head);
    let out_head = http_head::encode_response_head_for_client(&resp, keep);
    if tcp.write_all(&out_head).await.is_err() {
        return false;
    }
    let down = if resp.status == 101 {
        // Protocol switch (e.g. WebSocket): from here on it is a tunnel.
        let pending = rbuf.freeze();
        let stats = super::relay_flow(tcp, &mut flow, pending).await;
        up += stats.to_quic;
        stats.to_tcp
    } else {
        // A ban, lockout or used-up quota ends a download in progress, as
        // it ends a tunnel.
        let cancel = flow.admission.cancel_token().clone();
        let body = tokio::select! {
            r = body_to_client(&mut flow.recv, &mut rbuf, tcp, framing) => r,
            _ = cancel.cancelled() => Err(io::Error::other("the customer's access was revoked")),
        };
        match body {
            Ok(n) => n,
            Err(e) => {
                debug!("response body: {e}");
                // The head is out: only a reset tells the customer the body
                // is incomplete (a FIN would end a close-delimited body).
                shared::quic::relay::abort_on_close(tcp);
                flow.account(state, up, 0);
                return false;
            }
        }
    };
    flow.account(state, up, down + out_head.len() as u64);
    debug!(device = %flow.device_id(), status = resp.status, up, down, "request done");
    keep
}

/// Read response heads until a final one (or 101), passing interim 1xx
/// responses to the customer. `Ok(None)`: the customer went away.
async fn read_final_head<W: AsyncWrite + Unpin>(
    recv: &mut RecvStream,
    rbuf: &mut BytesMut,
    client: &mut W,
) -> Result<Option<ResponseHead>, String> {
    loop {
        let resp = read_response_head(recv, rbuf).await?;
        if (100..200).contains(&resp.status) && resp.status != 101 {
            if client
                .write_all(&http_head::encode_response_head_for_client(&resp, true))
                .await
                .is_err()
            {
                return Ok(None);
            }
            continue;
        }
        return Ok(Some(resp));
    }
}

async fn read_response_head(
    recv: &mut RecvStream,
    rbuf: &mut BytesMut,
) -> Result<ResponseHead, String> {
    loop {
        match http_head::parse_response_head(rbuf) {
            Ok(Some((head, used))) => {
                rbuf.advance(used);
                return Ok(head);
            }
            Ok(None) => {}
            Err(e) => return Err(e.to_string()),
        }
        match recv.read_chunk(READ_CHUNK, true).await {
            Ok(Some(c)) => rbuf.extend_from_slice(&c.bytes),
            Ok(None) => return Err("origin closed before a response".into()),
            Err(e) => return Err(e.to_string()),
        }
    }
}

/// Where a framed body stands while its bytes pass through unchanged.
struct BodyCursor {
    framing: BodyFraming,
    /// Bytes still expected (`Length`), or `u64::MAX` when the end is found
    /// by the chunked tracker or by end of stream.
    left: u64,
    tracker: ChunkedTracker,
}

impl BodyCursor {
    fn new(framing: BodyFraming) -> Self {
        let left = match framing {
            BodyFraming::Empty => 0,
            BodyFraming::Length(n) => n,
            BodyFraming::Chunked | BodyFraming::UntilClose => u64::MAX,
        };
        Self {
            framing,
            left,
            tracker: ChunkedTracker::new(),
        }
    }

    fn done(&self) -> bool {
        self.left == 0
    }

    /// How many of `available` bytes belong to the body.
    fn take(&mut self, available: &[u8]) -> io::Result<usize> {
        match self.framing {
            BodyFraming::Chunked => {
                let n = self
                    .tracker
                    .feed(available)
                    .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e.to_string()))?;
                if self.tracker.is_done() {
                    self.left = 0;
                }
                Ok(n)
            }
            BodyFraming::Length(_) => {
                let n = (available.len() as u64).min(self.left) as usize;
                self.left -= n as u64;
                Ok(n)
            }
            BodyFraming::UntilClose => Ok(available.len()),
            BodyFraming::Empty => Ok(0),
        }
    }
}

/// Move a request body of the given framing from the customer to the exit.
/// Requests have no close-delimited bodies: `UntilClose` moves nothing.
async fn body_to_exit<R: AsyncRead + Unpin>(
    tcp: &mut R,
    buf: &mut BytesMut,
    send: &mut SendStream,
    framing: BodyFraming,
) -> io::Result<u64> {
    if framing == BodyFraming::UntilClose {
        return Ok(0);
    }
    let mut body = BodyCursor::new(framing);
    let mut moved = 0u64;
    while !body.done() {
        if buf.is_empty() {
            buf.reserve(READ_CHUNK);
            if tcp.read_buf(buf).await? == 0 {
                return Err(io::ErrorKind::UnexpectedEof.into());
            }
        }
        let take = body.take(buf)?;
        moved += take as u64;
        send.write_chunk(buf.split_to(take).freeze())
            .await
            .map_err(io::Error::other)?;
    }
    Ok(moved)
}

/// Move a response body of the given framing from the exit to the customer.
async fn body_to_client(
    recv: &mut RecvStream,
    rbuf: &mut BytesMut,
    tcp: &mut TcpStream,
    framing: BodyFraming,
) -> io::Result<u64> {
    let mut body = BodyCursor::new(framing);
    let mut moved = 0u64;
    while !body.done() {
        if rbuf.is_empty() {
            match recv
                .read_chunk(64 * 1024, true)
                .await
                .map_err(io::Error::other)?
            {
                Some(c) => rbuf.extend_from_slice(&c.bytes),
                None if framing == BodyFraming::UntilClose => break,
                None => return Err(io::ErrorKind::UnexpectedEof.into()),
            }
        }
        let take = body.take(rbuf)?;
        tcp.write_all(&rbuf[..take]).await?;
        rbuf.advance(take);
        moved += take as u64;
    }
    Ok(moved)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn body_cursor_stops_at_the_end_of_each_framing() {
        let mut c = BodyCursor::new(BodyFraming::Length(5));
        assert_eq!(c.take(b"abc").unwrap(), 3);
        assert!(!c.done());
        assert_eq!(c.take(b"defGET /next").unwrap(), 2);
        assert!(c.done());

        let mut c = BodyCursor::new(BodyFraming::Chunked);
        let body = b"3\r\nabc\r\n0\r\n\r\n";
        let mut used = 0;
        for piece in [&body[..4], &body[4..9], &body[9..], b"GET /next"] {
            if !c.done() {
                used += c.take(piece).unwrap();
            }
        }
        assert!(c.done());
        assert_eq!(used, body.len());

        assert!(BodyCursor::new(BodyFraming::Empty).done());
        let mut c = BodyCursor::new(BodyFraming::UntilClose);
        assert_eq!(c.take(b"anything").unwrap(), 8);
        assert!(!c.done());
        assert!(
            BodyCursor::new(BodyFraming::Chunked)
                .take(b"zz\r\n")
                .is_err()
        );
    }
}
