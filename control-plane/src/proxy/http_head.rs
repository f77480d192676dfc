//! HTTP/1.x proxy message heads: parsing what a customer sends to the HTTP
//! proxy port, rewriting it for the origin, and following message bodies
//! without buffering them.
//!
//! Concepts:
//! - **head**: the start line and header fields up to and including the empty
//!   line. Parsed with `httparse`, bounded by [`MAX_HEAD_LEN`] and
//!   [`MAX_HEADERS`]; "need more bytes" is `Ok(None)`.
//! - **request target**: a proxy receives either `CONNECT host:port`
//!   (authority-form, a tunnel) or `GET http://host/path` (absolute-form, a
//!   plain HTTP request to forward). Origin-form (`GET /path`) is what a
//!   client sends to an origin server, not to a proxy.
//! - **framing**: where a body ends ([`BodyFraming`]). Requests whose framing
//!   two parsers could disagree about (both `Content-Length` and
//!   `Transfer-Encoding`, conflicting lengths, a final coding other than
//!   `chunked`) are refused outright: that disagreement is what request
//!   smuggling exploits.
//! - **hop-by-hop headers**: headers that describe one connection, not the
//!   message; they are removed when forwarding. cellgate is an elite proxy,
//!   so it adds nothing that reveals it (`Via`, `X-Forwarded-For`).
//!
//! This module depends only on `shared`, `httparse`, `base64`, `thiserror`
//! and std, so the fuzz targets can include it by path.

use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use shared::target::{TargetAddr, TargetError};

/// Largest head accepted. Heads beyond it get 431 rather than being
/// buffered on the client's say-so.
pub const MAX_HEAD_LEN: usize = 64 * 1024;
/// Most header fields accepted in one head (431 beyond).
pub const MAX_HEADERS: usize = 128;
/// Longest chunk-size line (size, extensions, CRLF) a [`ChunkedTracker`]
/// accepts; nobody needs kilobytes of chunk extensions.
pub const MAX_CHUNK_LINE: usize = 4 * 1024;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HeadError {
    #[error("message head exceeds {MAX_HEAD_LEN} bytes or {MAX_HEADERS} header fields")]
    TooLarge,
    #[error("malformed message: {0}")]
    Malformed(String),
    /// Origin-form (`GET /path`) or asterisk-form (`OPTIONS *`): the client
    /// talks to us as if we were the origin server.
    #[error(
        "not a proxy request: the request target must be absolute (http://host/…) or CONNECT host:port"
    )]
    NotProxyRequest,
    /// `https://…` (clients tunnel TLS with CONNECT) or another scheme.
    #[error("unsupported URI scheme {0:?}: use CONNECT for https")]
    UnsupportedScheme(String),
}

impl HeadError {
    /// The status to answer a client's bad request with. For a bad
    /// response head from upstream the caller answers 502 instead.
    pub fn status(&self) -> u16 {
        match self {
            HeadError::TooLarge => 431,
            HeadError::Malformed(_)
            | HeadError::NotProxyRequest
            | HeadError::UnsupportedScheme(_) => 400,
        }
    }
}

fn malformed(why: impl Into<String>) -> HeadError {
    HeadError::Malformed(why.into())
}

/// One header field, in the order and the name case the peer wrote it:
/// forwarding it unchanged keeps cellgate invisible to the origin.
#[derive(Clone, PartialEq, Eq)]
pub struct Header {
    pub name: String,
    /// Raw bytes: values may carry obs-text (bytes ≥ 0x80).
    pub value: Vec<u8>,
}

impl std::fmt::Debug for Header {
    // Heads get logged; credentials in them must not be.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let secret = ["proxy-authorization", "authorization", "cookie"]
            .iter()
            .any(|s| self.name.eq_ignore_ascii_case(s));
        let value = if secret {
            "***".into()
        } else {
            String::from_utf8_lossy(&self.value)
        };
        write!(f, "{}: {}", self.name, value)
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RequestTarget {
    /// `CONNECT host:port`: open a tunnel.
    Authority(TargetAddr),
    /// `http://host[:port]/path?query`: forward one request. The port
    /// defaults to 80.
    Absolute {
        target: TargetAddr,
        /// Never empty: `http://host` and `http://host?q` become `/` and
        /// `/?q`. Any `#fragment` is dropped, as it is not sent to origins.
        path_and_query: String,
    },
}

impl RequestTarget {
    pub fn addr(&self) -> &TargetAddr {
        match self {
            RequestTarget::Authority(t) | RequestTarget::Absolute { target: t, .. } => t,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RequestHead {
    pub method: String,
    pub target: RequestTarget,
    /// 0 or 1 (`HTTP/1.0`, `HTTP/1.1`).
    pub minor_version: u8,
    pub headers: Vec<Header>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ResponseHead {
    pub status: u16,
    pub minor_version: u8,
    pub reason: String,
    pub headers: Vec<Header>,
}

/// How a message body is delimited.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BodyFraming {
    Empty,
    Length(u64),
    /// Follow it with a [`ChunkedTracker`]; bytes pass through unchanged.
    Chunked,
    /// Responses only: the body ends when the origin closes.
    UntilClose,
}

/// Credentials from `Proxy-Authorization`.
#[derive(Clone, PartialEq, Eq)]
pub enum ProxyAuth {
    Missing,
    /// Present but unusable (another scheme, bad base64, no colon, several
    /// headers): answer 407 as for wrong credentials.
    Malformed,
    /// Raw bytes, split at the first colon (RFC 7617: user-ids cannot hold a
    /// colon, passwords can).
    Basic {
        username: Vec<u8>,
        password: Vec<u8>,
    },
}

impl std::fmt::Debug for ProxyAuth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ProxyAuth::Missing => f.write_str("Missing"),
            ProxyAuth::Malformed => f.write_str("Malformed"),
            ProxyAuth::Basic { username, .. } => f
                .debug_struct("Basic")
                .field("username", &String::from_utf8_lossy(username))
                .field("password", &"***")
                .finish(),
        }
    }
}

/// Parse a request head from the front of `buf`; the `usize` is the head's
/// length including the final empty line, so the body (or tunnel payload)
/// starts right after it.
///
/// Besides syntax this refuses what would make the body's end ambiguous
/// (see [`request_body_framing`]) and several `Host` fields, so that a head
/// that parses is safe to forward.
pub fn parse_request_head(buf: &[u8]) -> Result<Option<(RequestHead, usize)>, HeadError> {
    let window = &buf[..buf.len().min(MAX_HEAD_LEN)];
    let mut fields = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut req = httparse::Request::new(&mut fields);
    let Some(len) = head_status(req.parse(window), buf.len())? else {
        return Ok(None);
    };
    // httparse fills all three once the head is complete.
    let (Some(method), Some(path), Some(minor_version)) = (req.method, req.path, req.version)
    else {
        return Err(malformed("incomplete request line"));
    };
    let target = if method == "CONNECT" {
        RequestTarget::Authority(parse_authority(path)?)
    } else {
        parse_absolute_target(path)?
    };
    let head = RequestHead {
        method: method.to_string(),
        target,
        minor_version,
        headers: own_headers(req.headers),
    };
    if head.headers.iter().filter(|h| is(h, "host")).count() > 1 {
        return Err(malformed("several Host fields"));
    }
    request_body_framing(&head)?;
    Ok(Some((head, len)))
}

/// httparse's verdict on a head, with our limits applied: the head's length
/// when complete, `None` while more bytes may complete it.
fn head_status(
    parsed: httparse::Result<usize>,
    buffered: usize,
) -> Result<Option<usize>, HeadError> {
    match parsed {
        Ok(httparse::Status::Complete(len)) => Ok(Some(len)),
        Ok(httparse::Status::Partial) if buffered >= MAX_HEAD_LEN => Err(HeadError::TooLarge),
        Ok(httparse::Status::Partial) => Ok(None),
        Err(httparse::Error::TooManyHeaders) => Err(HeadError::TooLarge),
        Err(e) => Err(malformed(e.to_string())),
    }
}

/// Parse a response head from the front of `buf`, with the same limits as
/// requests. obs-fold and other leniencies stay off: the head is forwarded
/// to the client, which must see the same framing we followed.
pub fn parse_response_head(buf: &[u8]) -> Result<Option<(ResponseHead, usize)>, HeadError> {
    let window = &buf[..buf.len().min(MAX_HEAD_LEN)];
    let mut fields = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut resp = httparse::Response::new(&mut fields);
    let Some(len) = head_status(resp.parse(window), buf.len())? else {
        return Ok(None);
    };
    let (Some(status), Some(minor_version)) = (resp.code, resp.version) else {
        return Err(malformed("incomplete status line"));
    };
    // httparse takes any three digits; `055` would be forwarded as `55`,
    // which no client parses.
    if status < 100 {
        return Err(malformed("status code below 100"));
    }
    Ok(Some((
        ResponseHead {
            status,
            minor_version,
            reason: resp.reason.unwrap_or_default().to_string(),
            headers: own_headers(resp.headers),
        },
        len,
    )))
}

fn own_headers(fields: &[httparse::Header<'_>]) -> Vec<Header> {
    fields
        .iter()
        .map(|h| Header {
            name: h.name.to_string(),
            value: h.value.to_vec(),
        })
        .collect()
}

/// The error message names the problem, not the input: it may be up to
/// [`MAX_HEAD_LEN`] bytes.
fn bad_target(e: &TargetError) -> HeadError {
    malformed(match e {
        TargetError::MissingPort(_) => "request target has no port",
        TargetError::BadPort(_) => "request target port is not 1-65535",
        TargetError::BadHost(_) => "request target host is not a valid name or IP address",
    })
}

/// `host:port` or `[v6]:port`. An IPv6 literal without brackets is refused:
/// in `2001:db8::1:443` nothing says where the address ends and the port
/// begins, and guessing differently from the client sends it elsewhere.
fn parse_authority(s: &str) -> Result<TargetAddr, HeadError> {
    if !s.starts_with('[') && s.bytes().filter(|&b| b == b':').count() > 1 {
        return Err(bad_target(&TargetError::BadHost(String::new())));
    }
    TargetAddr::parse_authority(s).map_err(|e| bad_target(&e))
}

/// `http://authority[/path][?query][#fragment]`.
fn parse_absolute_target(uri: &str) -> Result<RequestTarget, HeadError> {
    if uri.starts_with('/') || uri == "*" {
        return Err(HeadError::NotProxyRequest);
    }
    let Some((scheme, rest)) = uri.split_once("://") else {
        return Err(malformed("request target is not an absolute http:// URI"));
    };
    if !scheme.eq_ignore_ascii_case("http") {
        let shown: String = scheme.chars().take(16).collect();
        return Err(HeadError::UnsupportedScheme(shown.to_ascii_lowercase()));
    }
    let rest = rest.split_once('#').map_or(rest, |(before, _)| before);
    let split = rest.find(['/', '?']).unwrap_or(rest.len());
    let (authority, path) = rest.split_at(split);
    if authority.contains('@') {
        // Credentials for the origin in the URI would be forwarded nowhere
        // (and logged everywhere); refuse rather than guess.
        return Err(malformed("userinfo in the request target"));
    }
    if authority.is_empty() {
        return Err(malformed("request target has no host"));
    }
    let has_port = match authority.rfind(']') {
        Some(end) => authority.len() > end + 1,
        None => authority.contains(':'),
    };
    let target = if has_port {
        parse_authority(authority)?
    } else {
        TargetAddr::from_host_port(authority, 80).map_err(|e| bad_target(&e))?
    };
    let path_and_query = if path.starts_with('/') {
        path.to_string()
    } else {
        format!("/{path}")
    };
    Ok(RequestTarget::Absolute {
        target,
        path_and_query,
    })
}

fn is(h: &Header, name: &str) -> bool {
    h.name.eq_ignore_ascii_case(name)
}

fn values<'a>(headers: &'a [Header], name: &'a str) -> impl Iterator<Item = &'a [u8]> + 'a {
    headers
        .iter()
        .filter(move |h| is(h, name))
        .map(|h| h.value.as_slice())
}

/// The elements of a comma-separated list field, trimmed, empty ones
/// skipped (RFC 9110 §5.6.1).
fn list_items(value: &[u8]) -> impl Iterator<Item = &[u8]> {
    value
        .split(|&b| b == b',')
        .map(<[u8]>::trim_ascii)
        .filter(|t| !t.is_empty())
}

fn has_token(headers: &[Header], name: &str, token: &str) -> bool {
    values(headers, name)
        .flat_map(list_items)
        .any(|t| t.eq_ignore_ascii_case(token.as_bytes()))
}

/// The `Content-Length`, if any. Several fields or list elements must all
/// agree (RFC 9112 §6.3 lets a recipient collapse identical ones).
fn content_length(headers: &[Header]) -> Result<Option<u64>, HeadError> {
    let mut found = None;
    for value in values(headers, "content-length") {
        let mut any = false;
        for item in value.split(|&b| b == b',').map(<[u8]>::trim_ascii) {
            any = true;
            if item.is_empty() || !item.iter().all(u8::is_ascii_digit) {
                return Err(malformed("Content-Length is not a decimal number"));
            }
            let n = std::str::from_utf8(item)
                .ok()
                .and_then(|s| s.parse::<u64>().ok())
                .ok_or_else(|| malformed("Content-Length is not a decimal number"))?;
            if found.is_some_and(|f| f != n) {
                return Err(malformed("conflicting Content-Length values"));
            }
            found = Some(n);
        }
        if !any {
            return Err(malformed("empty Content-Length"));
        }
    }
    Ok(found)
}

/// Whether the message has `Transfer-Encoding`, and if so whether its final
/// coding is `chunked`.
fn transfer_encoding(headers: &[Header]) -> Result<Option<bool>, HeadError> {
    let mut codings = Vec::new();
    let mut present = false;
    for value in values(headers, "transfer-encoding") {
        present = true;
        // Quoted parameters could hide commas; nobody sends them, and
        // refusing is safer than splitting them the way the origin might not.
        if value.contains(&b'"') {
            return Err(malformed("quoted Transfer-Encoding parameters"));
        }
        codings.extend(list_items(value));
    }
    if !present {
        return Ok(None);
    }
    let Some((last, earlier)) = codings.split_last() else {
        return Err(malformed("empty Transfer-Encoding"));
    };
    if earlier.iter().any(|c| c.eq_ignore_ascii_case(b"chunked")) {
        return Err(malformed("chunked applied more than once or not last"));
    }
    Ok(Some(last.eq_ignore_ascii_case(b"chunked")))
}

/// How the request body is delimited. Refuses every combination two
/// parsers might read differently (RFC 9112 §6.1, §6.3), so the origin ends
/// the body exactly where we do.
pub fn request_body_framing(head: &RequestHead) -> Result<BodyFraming, HeadError> {
    let cl = content_length(&head.headers)?;
    match transfer_encoding(&head.headers)? {
        Some(_) if cl.is_some() => Err(malformed("both Content-Length and Transfer-Encoding")),
        Some(_) if head.minor_version == 0 => {
            Err(malformed("Transfer-Encoding in an HTTP/1.0 request"))
        }
        Some(true) => Ok(BodyFraming::Chunked),
        Some(false) => Err(malformed("final transfer coding is not chunked")),
        None => Ok(cl.map_or(BodyFraming::Empty, BodyFraming::Length)),
    }
}

/// How a response body is delimited (RFC 9112 §6.3), given the method of
/// the request it answers. A 2xx answer to CONNECT starts a tunnel and has
/// no body of its own: `Empty`.
pub fn response_body_framing(
    req_method: &str,
    head: &ResponseHead,
) -> Result<BodyFraming, HeadError> {
    let bodiless = req_method.eq_ignore_ascii_case("HEAD")
        || (100..200).contains(&head.status)
        || head.status == 204
        || head.status == 304
        || (req_method == "CONNECT" && (200..300).contains(&head.status));
    if bodiless {
        return Ok(BodyFraming::Empty);
    }
    let cl = content_length(&head.headers)?;
    match transfer_encoding(&head.headers)? {
        // RFC 9112 lets TE override CL, but forwarding such a response
        // would hand the client the ambiguity; treat it as upstream failure.
        Some(_) if cl.is_some() => Err(malformed("both Content-Length and Transfer-Encoding")),
        Some(_) if head.minor_version == 0 => {
            Err(malformed("Transfer-Encoding in an HTTP/1.0 response"))
        }
        Some(true) => Ok(BodyFraming::Chunked),
        Some(false) => Ok(BodyFraming::UntilClose),
        None => Ok(cl.map_or(BodyFraming::UntilClose, BodyFraming::Length)),
    }
}

/// Headers that describe one connection rather than the message.
const HOP_BY_HOP: [&str; 8] = [
    "connection",
    "keep-alive",
    "proxy-connection",
    "proxy-authorization",
    "proxy-authenticate",
    "te",
    "trailer",
    "upgrade",
];

/// Never dropped even when a `Connection` field names them: without them
/// the receiver would frame the body differently from us (a classic
/// smuggling trick is `Connection: Content-Length`), or lose the vhost.
const FRAMING: [&str; 3] = ["transfer-encoding", "content-length", "host"];

fn end_to_end(headers: &[Header]) -> impl Iterator<Item = &Header> {
    let listed: Vec<&[u8]> = values(headers, "connection").flat_map(list_items).collect();
    headers.iter().filter(move |h| {
        if FRAMING.iter().any(|f| is(h, f)) {
            return true;
        }
        !HOP_BY_HOP.iter().any(|n| is(h, n))
            && !listed
                .iter()
                .any(|t| t.eq_ignore_ascii_case(h.name.as_bytes()))
    })
}

fn push_header(out: &mut Vec<u8>, name: &str, value: &[u8]) {
    out.extend_from_slice(name.as_bytes());
    out.extend_from_slice(b": ");
    out.extend_from_slice(value);
    out.extend_from_slice(b"\r\n");
}

/// `host[:port]` for a `Host` field; the port is left out when it is the
/// default, as clients do.
fn host_field(target: &TargetAddr, default_port: u16) -> String {
    let host = match target {
        TargetAddr::Ip(sa) if sa.is_ipv6() => format!("[{}]", sa.ip()),
        other => other.host(),
    };
    if target.port() == default_port {
        host
    } else {
        format!("{host}:{}", target.port())
    }
}

/// The request head to send to the origin for an absolute-form request:
/// origin-form request line, the client's headers minus hop-by-hop and
/// proxy ones, `Host` added if the client sent none (HTTP/1.0 clients may
/// not), and `Connection: close` because each request gets its own flow
/// through an exit.
///
/// The client's HTTP version is kept so the origin uses only features the
/// client understands (no chunked responses to an HTTP/1.0 client). An
/// authority-form (CONNECT) head is written with its authority as target.
pub fn encode_origin_request(head: &RequestHead) -> Vec<u8> {
    let mut out = Vec::with_capacity(256);
    out.extend_from_slice(head.method.as_bytes());
    out.push(b' ');
    match &head.target {
        RequestTarget::Absolute { path_and_query, .. } => {
            out.extend_from_slice(path_and_query.as_bytes())
        }
        RequestTarget::Authority(t) => out.extend_from_slice(host_field(t, 0).as_bytes()),
    }
    out.extend_from_slice(format!(" HTTP/1.{}\r\n", head.minor_version).as_bytes());
    // RFC 9112 §3.2.2: a proxy replaces whatever Host the client sent with
    // the authority of the absolute-form target, so the origin never sees
    // a name that disagrees with where the request actually went.
    push_header(
        &mut out,
        "Host",
        host_field(head.target.addr(), 80).as_bytes(),
    );
    for h in end_to_end(&head.headers).filter(|h| !is(h, "host")) {
        push_header(&mut out, &h.name, &h.value);
    }
    push_header(&mut out, "Connection", b"close");
    out.extend_from_slice(b"\r\n");
    out
}

/// The response head to send to the client: hop-by-hop headers removed and
/// our own `Connection` field added. The origin's HTTP version is kept (it
/// answered the client's version, see [`encode_origin_request`]).
pub fn encode_response_head_for_client(head: &ResponseHead, keep_alive: bool) -> Vec<u8> {
    let mut out = Vec::with_capacity(256);
    out.extend_from_slice(format!("HTTP/1.{} {} ", head.minor_version, head.status).as_bytes());
    out.extend_from_slice(head.reason.as_bytes());
    out.extend_from_slice(b"\r\n");
    for h in end_to_end(&head.headers) {
        push_header(&mut out, &h.name, &h.value);
    }
    let connection: &[u8] = if keep_alive { b"keep-alive" } else { b"close" };
    push_header(&mut out, "Connection", connection);
    out.extend_from_slice(b"\r\n");
    out
}

/// Whether the client asked to reuse its connection: HTTP/1.1 unless it
/// says `close`; HTTP/1.0 only if it says `keep-alive`. Old clients say
/// either in `Proxy-Connection`, which is honoured like `Connection`.
pub fn client_wants_keep_alive(head: &RequestHead) -> bool {
    if has_token(&head.headers, "connection", "close")
        || has_token(&head.headers, "proxy-connection", "close")
    {
        return false;
    }
    head.minor_version >= 1
        || has_token(&head.headers, "connection", "keep-alive")
        || has_token(&head.headers, "proxy-connection", "keep-alive")
}

impl RequestHead {
    /// Customer credentials. Only `Proxy-Authorization` counts:
    /// `Authorization` belongs to the origin and is forwarded untouched.
    pub fn proxy_credentials(&self) -> ProxyAuth {
        let mut fields = values(&self.headers, "proxy-authorization");
        let (Some(value), None) = (fields.next(), fields.next()) else {
            return if values(&self.headers, "proxy-authorization")
                .next()
                .is_none()
            {
                ProxyAuth::Missing
            } else {
                ProxyAuth::Malformed
            };
        };
        parse_basic(value).unwrap_or(ProxyAuth::Malformed)
    }
}

fn parse_basic(value: &[u8]) -> Option<ProxyAuth> {
    let value = value.trim_ascii();
    let space = value.iter().position(|&b| b == b' ')?;
    let (scheme, token) = value.split_at(space);
    if !scheme.eq_ignore_ascii_case(b"basic") {
        return None;
    }
    let decoded = STANDARD.decode(token.trim_ascii()).ok()?;
    let colon = decoded.iter().position(|&b| b == b':')?;
    Some(ProxyAuth::Basic {
        username: decoded[..colon].to_vec(),
        password: decoded[colon + 1..].to_vec(),
    })
}

/// A complete response for errors cellgate produces itself (407, 502, …).
/// CR and LF in `reason` and header values are replaced by spaces so a
/// message built from an error text cannot split the response.
pub fn simple_response(
    status: u16,
    reason: &str,
    extra_headers: &[(&str, &str)],
    body: &str,
) -> Vec<u8> {
    fn clean(s: &str) -> String {
        s.replace(['\r', '\n'], " ")
    }
    let mut out = format!("HTTP/1.1 {status} {}\r\n", clean(reason)).into_bytes();
    for (name, value) in extra_headers {
        push_header(&mut out, &clean(name), clean(value).as_bytes());
    }
    push_header(&mut out, "Content-Type", b"text/plain; charset=utf-8");
    push_header(
        &mut out,
        "Content-Length",
        body.len().to_string().as_bytes(),
    );
    push_header(&mut out, "Connection", b"close");
    out.extend_from_slice(b"\r\n");
    out.extend_from_slice(body.as_bytes());
    out
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Chunk {
    /// Hex digits of a chunk size; `digits` so far.
    Size {
        digits: u8,
    },
    /// After the size: whitespace and extensions up to CR.
    SizeRest,
    SizeLf,
    Data,
    DataCr,
    DataLf,
    /// At the start of a trailer field line or of the final empty line.
    TrailerStart,
    TrailerLine,
    TrailerLf,
    FinalLf,
    Done,
}

/// Follows a chunked body as it streams through unchanged, to find its end
/// without buffering or rewriting it (RFC 9112 §7.1).
///
/// Deliberately strict (CRLF only, no bare LF; at most 16 hex digits; no
/// whitespace before the size): where we and the receiver could disagree on
/// the end of the body, we refuse instead.
#[derive(Debug, Clone)]
pub struct ChunkedTracker {
    state: Chunk,
    /// Size being read, then bytes left in the current chunk.
    size: u64,
    line_len: usize,
    trailer_len: usize,
    failed: Option<HeadError>,
}

impl Default for ChunkedTracker {
    fn default() -> Self {
        Self::new()
    }
}

impl ChunkedTracker {
    pub fn new() -> Self {
        ChunkedTracker {
            state: Chunk::Size { digits: 0 },
            size: 0,
            line_len: 0,
            trailer_len: 0,
            failed: None,
        }
    }

    /// Whether the last chunk, the trailers and the final CRLF have passed.
    pub fn is_done(&self) -> bool {
        self.state == Chunk::Done
    }

    /// Account for `data`, the next bytes of the stream. Returns how many of
    /// them belong to the body: all of them until the body ends, then up to
    /// its exact end (the rest is the next message), then 0. After an error
    /// every call returns the same error.
    pub fn feed(&mut self, data: &[u8]) -> Result<usize, HeadError> {
        if let Some(e) = &self.failed {
            return Err(e.clone());
        }
        match self.advance(data) {
            Ok(n) => Ok(n),
            Err(e) => {
                self.failed = Some(e.clone());
                Err(e)
            }
        }
    }

    fn advance(&mut self, data: &[u8]) -> Result<usize, HeadError> {
        let mut i = 0;
        while i < data.len() {
            if self.state == Chunk::Done {
                break;
            }
            if self.state == Chunk::Data {
                let avail = (data.len() - i) as u64;
                let take = avail.min(self.size);
                // `take` ≤ the remaining input, so it fits a usize.
                i += take as usize;
                self.size -= take;
                if self.size == 0 {
                    self.state = Chunk::DataCr;
                }
                continue;
            }
            self.step(data[i])?;
            i += 1;
        }
        Ok(i)
    }

    fn step(&mut self, b: u8) -> Result<(), HeadError> {
        self.state = match self.state {
            Chunk::Size { digits } => {
                self.count_line_byte()?;
                match (b as char).to_digit(16) {
                    Some(_) if digits == 16 => {
                        return Err(malformed("chunk size over 16 hex digits"));
                    }
                    Some(d) => {
                        self.size = (self.size << 4) | u64::from(d);
                        Chunk::Size { digits: digits + 1 }
                    }
                    None if digits == 0 => return Err(malformed("chunk size is not hexadecimal")),
                    None => match b {
                        b'\r' => Chunk::SizeLf,
                        b';' | b' ' | b'\t' => Chunk::SizeRest,
                        _ => return Err(malformed("bad byte after chunk size")),
                    },
                }
            }
            Chunk::SizeRest => {
                self.count_line_byte()?;
                match b {
                    b'\r' => Chunk::SizeLf,
                    b'\t' => Chunk::SizeRest,
                    _ if b < 0x20 || b == 0x7f => {
                        return Err(malformed("control byte in chunk extension"));
                    }
                    _ => Chunk::SizeRest,
                }
            }
            Chunk::SizeLf => {
                if b != b'\n' {
                    return Err(malformed("chunk size line not ended by CRLF"));
                }
                self.line_len = 0;
                if self.size == 0 {
                    Chunk::TrailerStart
                } else {
                    Chunk::Data
                }
            }
            Chunk::DataCr if b == b'\r' => Chunk::DataLf,
            Chunk::DataLf if b == b'\n' => Chunk::Size { digits: 0 },
            Chunk::DataCr | Chunk::DataLf => {
                return Err(malformed("chunk data not followed by CRLF"));
            }
            Chunk::TrailerStart | Chunk::TrailerLine => {
                self.trailer_len += 1;
                if self.trailer_len > MAX_HEAD_LEN {
                    return Err(malformed("trailer section too large"));
                }
                match (self.state, b) {
                    (Chunk::TrailerStart, b'\r') => Chunk::FinalLf,
                    (_, b'\r') => Chunk::TrailerLf,
                    (_, b'\n') => return Err(malformed("bare LF in trailer section")),
                    _ => Chunk::TrailerLine,
                }
            }
            Chunk::TrailerLf if b == b'\n' => Chunk::TrailerStart,
            Chunk::FinalLf if b == b'\n' => Chunk::Done,
            Chunk::TrailerLf | Chunk::FinalLf => {
                return Err(malformed("bare CR in trailer section"));
            }
            // `advance` handles these without calling `step`.
            Chunk::Data | Chunk::Done => self.state,
        };
        Ok(())
    }

    fn count_line_byte(&mut self) -> Result<(), HeadError> {
        self.line_len += 1;
        if self.line_len > MAX_CHUNK_LINE {
            return Err(malformed("chunk size line too long"));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr};

    fn req(text: &str) -> Result<Option<(RequestHead, usize)>, HeadError> {
        parse_request_head(text.as_bytes())
    }

    fn head(text: &str) -> RequestHead {
        let (h, n) = req(text).unwrap().unwrap();
        assert_eq!(n, text.len());
        h
    }

    fn resp(text: &str) -> ResponseHead {
        let (h, n) = parse_response_head(text.as_bytes()).unwrap().unwrap();
        assert_eq!(n, text.len());
        h
    }

    fn ip(s: &str) -> TargetAddr {
        TargetAddr::Ip(s.parse().unwrap())
    }

    fn dom(s: &str, p: u16) -> TargetAddr {
        TargetAddr::Domain(s.into(), p)
    }

    fn bad(why: &str) -> HeadError {
        HeadError::Malformed(why.into())
    }

    fn names(encoded: &[u8]) -> Vec<String> {
        let mut fields = [httparse::EMPTY_HEADER; MAX_HEADERS];
        let mut r = httparse::Request::new(&mut fields);
        assert!(r.parse(encoded).unwrap().is_complete());
        r.headers.iter().map(|h| h.name.to_string()).collect()
    }

    #[test]
    fn connect_targets() {
        let cases: Vec<(&str, Result<TargetAddr, HeadError>)> = vec![
            ("example.com:443", Ok(dom("example.com", 443))),
            ("Example.COM:8443", Ok(dom("example.com", 8443))),
            ("93.184.216.34:443", Ok(ip("93.184.216.34:443"))),
            ("[::1]:443", Ok(ip("[::1]:443"))),
            ("[2001:db8::1]:8080", Ok(ip("[2001:db8::1]:8080"))),
            ("[::ffff:127.0.0.1]:80", Ok(ip("[::ffff:127.0.0.1]:80"))),
            ("example.com", Err(bad("request target has no port"))),
            ("[::1]", Err(bad("request target has no port"))),
            (
                "example.com:0",
                Err(bad("request target port is not 1-65535")),
            ),
            (
                "example.com:65536",
                Err(bad("request target port is not 1-65535")),
            ),
            (
                "example.com:99999",
                Err(bad("request target port is not 1-65535")),
            ),
            (
                "example.com:",
                Err(bad("request target port is not 1-65535")),
            ),
            (
                "example.com:+443",
                Err(bad("request target port is not 1-65535")),
            ),
            (
                "::1:443",
                Err(bad("request target host is not a valid name or IP address")),
            ),
            (
                "2130706433:443",
                Err(bad("request target host is not a valid name or IP address")),
            ),
            (
                "user@example.com:443",
                Err(bad("request target host is not a valid name or IP address")),
            ),
        ];
        for (authority, want) in cases {
            let text = format!("CONNECT {authority} HTTP/1.1\r\nHost: {authority}\r\n\r\n");
            let got = req(&text).map(|o| {
                let (h, _) = o.unwrap();
                assert_eq!(h.method, "CONNECT");
                match h.target {
                    RequestTarget::Authority(t) => t,
                    other => panic!("{other:?}"),
                }
            });
            assert_eq!(got, want, "{authority}");
            if let Err(e) = &got {
                assert_eq!(e.status(), 400);
            }
        }
    }

    #[test]
    fn absolute_targets() {
        let abs = |t: TargetAddr, p: &str| RequestTarget::Absolute {
            target: t,
            path_and_query: p.into(),
        };
        let cases: Vec<(&str, Result<RequestTarget, HeadError>)> = vec![
            ("http://example.com/", Ok(abs(dom("example.com", 80), "/"))),
            ("http://example.com", Ok(abs(dom("example.com", 80), "/"))),
            (
                "HTTP://Example.com:8080/a/b?x=1&y=%20",
                Ok(abs(dom("example.com", 8080), "/a/b?x=1&y=%20")),
            ),
            (
                "http://example.com?q=1",
                Ok(abs(dom("example.com", 80), "/?q=1")),
            ),
            (
                "http://example.com/p?q#frag",
                Ok(abs(dom("example.com", 80), "/p?q")),
            ),
            ("http://10.1.2.3/x", Ok(abs(ip("10.1.2.3:80"), "/x"))),
            ("http://[::1]:8080/", Ok(abs(ip("[::1]:8080"), "/"))),
            ("http://[::1]/", Ok(abs(ip("[::1]:80"), "/"))),
            ("/index.html", Err(HeadError::NotProxyRequest)),
            ("*", Err(HeadError::NotProxyRequest)),
            (
                "https://example.com/",
                Err(HeadError::UnsupportedScheme("https".into())),
            ),
            (
                "ftp://example.com/",
                Err(HeadError::UnsupportedScheme("ftp".into())),
            ),
            (
                "example.com:80",
                Err(bad("request target is not an absolute http:// URI")),
            ),
            (
                "http://user:pw@example.com/",
                Err(bad("userinfo in the request target")),
            ),
            ("http:///path", Err(bad("request target has no host"))),
            (
                "http://example.com:0/",
                Err(bad("request target port is not 1-65535")),
            ),
            (
                "http://example.com:/",
                Err(bad("request target port is not 1-65535")),
            ),
            ("http://[::1]x/", Err(bad("request target has no port"))),
            (
                "http://2001:db8::1/",
                Err(bad("request target host is not a valid name or IP address")),
            ),
            (
                "http://::1/",
                Err(bad("request target host is not a valid name or IP address")),
            ),
        ];
        for (uri, want) in cases {
            let text = format!("GET {uri} HTTP/1.1\r\nHost: example.com\r\n\r\n");
            let got = req(&text).map(|o| o.unwrap().0.target);
            assert_eq!(got, want, "{uri}");
        }
    }

    #[test]
    fn request_line_and_header_errors() {
        let cases: &[(&str, HeadError)] = &[
            (
                "GET http://a.example/ HTTP/2.0\r\n\r\n",
                bad("invalid HTTP version"),
            ),
            (
                "GET http://a.example/ HTTP/1.1\r\nX: a\r\n  folded\r\n\r\n",
                bad("invalid header name"),
            ),
            (
                "GET http://a.example/ HTTP/1.1\r\nX: a\r\n\tfolded\r\n\r\n",
                bad("invalid header name"),
            ),
            (
                "GET http://a.example/ HTTP/1.1\r\nContent-Length : 5\r\n\r\n",
                bad("invalid header name"),
            ),
            (
                "GET http://a.example/ HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n",
                bad("several Host fields"),
            ),
        ];
        for (text, want) in cases {
            assert_eq!(req(text).unwrap_err(), *want, "{text:?}");
        }
    }

    #[test]
    fn smuggling_framing() {
        use BodyFraming::*;
        let cases: &[(&str, Result<BodyFraming, HeadError>)] = &[
            ("", Ok(Empty)),
            ("Content-Length: 0\r\n", Ok(Length(0))),
            ("Content-Length: 42\r\n", Ok(Length(42))),
            (
                "content-length: 42\r\nCONTENT-LENGTH: 42\r\n",
                Ok(Length(42)),
            ),
            ("Content-Length: 42, 42\r\n", Ok(Length(42))),
            (
                "Content-Length: 18446744073709551615\r\n",
                Ok(Length(u64::MAX)),
            ),
            ("Transfer-Encoding: chunked\r\n", Ok(Chunked)),
            ("Transfer-Encoding: gzip, CHUNKED\r\n", Ok(Chunked)),
            (
                "Transfer-Encoding: gzip\r\nTransfer-Encoding: chunked\r\n",
                Ok(Chunked),
            ),
            (
                "Content-Length: 5\r\nContent-Length: 6\r\n",
                Err(bad("conflicting Content-Length values")),
            ),
            (
                "Content-Length: 5, 6\r\n",
                Err(bad("conflicting Content-Length values")),
            ),
            (
                "Content-Length: -5\r\n",
                Err(bad("Content-Length is not a decimal number")),
            ),
            (
                "Content-Length: +5\r\n",
                Err(bad("Content-Length is not a decimal number")),
            ),
            (
                "Content-Length: 0x10\r\n",
                Err(bad("Content-Length is not a decimal number")),
            ),
            (
                "Content-Length: 5 5\r\n",
                Err(bad("Content-Length is not a decimal number")),
            ),
            (
                "Content-Length: 5,\r\n",
                Err(bad("Content-Length is not a decimal number")),
            ),
            (
                "Content-Length:\r\n",
                Err(bad("Content-Length is not a decimal number")),
            ),
            (
                "Content-Length: 18446744073709551616\r\n",
                Err(bad("Content-Length is not a decimal number")),
            ),
            (
                "Content-Length: 99999999999999999999\r\n",
                Err(bad("Content-Length is not a decimal number")),
            ),
            (
                "Content-Length: 5\r\nTransfer-Encoding: chunked\r\n",
                Err(bad("both Content-Length and Transfer-Encoding")),
            ),
            (
                "Transfer-Encoding: chunked\r\nContent-Length: 5\r\n",
                Err(bad("both Content-Length and Transfer-Encoding")),
            ),
            (
                "Transfer-Encoding: gzip\r\n",
                Err(bad("final transfer coding is not chunked")),
            ),
            (
                "Transfer-Encoding: chunked, gzip\r\n",
                Err(bad("chunked applied more than once or not last")),
            ),
            (
                "Transfer-Encoding: chunked, chunked\r\n",
                Err(bad("chunked applied more than once or not last")),
            ),
            (
                "Transfer-Encoding: xchunked\r\n",
                Err(bad("final transfer coding is not chunked")),
            ),
            (
                "Transfer-Encoding: chunked;x=1\r\n",
                Err(bad("final transfer coding is not chunked")),
            ),
            (
                "Transfer-Encoding:\r\n",
                Err(bad("empty Transfer-Encoding")),
            ),
            (
                "Transfer-Encoding: , \r\n",
                Err(bad("empty Transfer-Encoding")),
            ),
            (
                "Transfer-Encoding: x;q=\",chunked\"\r\n",
                Err(bad("quoted Transfer-Encoding parameters")),
            ),
        ];
        for (fields, want) in cases {
            let text =
                format!("POST http://a.example/ HTTP/1.1\r\nHost: a.example\r\n{fields}\r\n");
            let got = req(&text).map(|o| request_body_framing(&o.unwrap().0).unwrap());
            assert_eq!(got, *want, "{fields:?}");
        }
        assert_eq!(
            req("POST http://a.example/ HTTP/1.0\r\nTransfer-Encoding: chunked\r\n\r\n")
                .unwrap_err(),
            bad("Transfer-Encoding in an HTTP/1.0 request")
        );
    }

    #[test]
    fn limits_are_431() {
        let many = |n: usize| {
            let mut t = String::from("GET http://a.example/ HTTP/1.1\r\n");
            for i in 0..n {
                t.push_str(&format!("X-H{i}: v\r\n"));
            }
            t + "\r\n"
        };
        assert_eq!(head(&many(MAX_HEADERS)).headers.len(), MAX_HEADERS);
        assert_eq!(
            req(&many(MAX_HEADERS + 1)).unwrap_err(),
            HeadError::TooLarge
        );
        assert_eq!(req(&many(300)).unwrap_err().status(), 431);
        // Too many header lines are refused even before the head is complete.
        let unfinished = many(200);
        assert_eq!(
            req(&unfinished[..unfinished.len() - 2]).unwrap_err(),
            HeadError::TooLarge
        );

        let prefix = "GET http://a.example/ HTTP/1.1\r\nX-Big: ";
        let fits = format!(
            "{prefix}{}\r\n\r\n",
            "a".repeat(MAX_HEAD_LEN - prefix.len() - 4)
        );
        assert_eq!(fits.len(), MAX_HEAD_LEN);
        assert!(req(&fits).unwrap().is_some());
        let over = format!("{prefix}{}\r\n\r\n", "a".repeat(MAX_HEAD_LEN));
        assert_eq!(req(&over).unwrap_err(), HeadError::TooLarge);
        assert_eq!(req(&over[..MAX_HEAD_LEN - 1]).unwrap(), None);
        assert_eq!(req(&over[..MAX_HEAD_LEN]).unwrap_err(), HeadError::TooLarge);
        // A huge request line alone, never finished.
        let line = format!("GET http://a.example/{}", "x".repeat(MAX_HEAD_LEN));
        assert_eq!(req(&line).unwrap_err(), HeadError::TooLarge);
        // A complete head followed by a large body is fine.
        let mut with_body =
            b"POST http://a.example/ HTTP/1.1\r\nContent-Length: 100000\r\n\r\n".to_vec();
        let head_len = with_body.len();
        with_body.resize(head_len + 100_000, b'b');
        assert_eq!(parse_request_head(&with_body).unwrap().unwrap().1, head_len);
    }

    #[test]
    fn every_prefix_is_incomplete() {
        let texts = [
            "CONNECT [::1]:443 HTTP/1.1\r\nHost: [::1]:443\r\nProxy-Authorization: Basic YTpi\r\n\r\n",
            "POST http://a.example:8080/x?y HTTP/1.0\r\nContent-Length: 3\r\nX-Empty:\r\n\r\n",
            "GET http://a.example/ HTTP/1.1\nHost: a.example\n\n",
        ];
        for text in texts {
            for cut in 0..text.len() {
                assert_eq!(req(&text[..cut]), Ok(None), "{:?}", &text[..cut]);
            }
            let mut with_tail = text.as_bytes().to_vec();
            with_tail.extend_from_slice(b"abcGET http://b.example/ HTTP/1.1\r\n\r\n");
            assert_eq!(
                parse_request_head(&with_tail).unwrap().unwrap().1,
                text.len()
            );
        }
        let response = "HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n";
        for cut in 0..response.len() {
            assert_eq!(parse_response_head(&response.as_bytes()[..cut]), Ok(None));
        }
    }

    #[test]
    fn header_order_and_case_are_kept() {
        let h = head(
            "GET http://a.example/ HTTP/1.1\r\nhOsT: a.example\r\nX-lower-UPPER: 1\r\n\
             accept: */*\r\nX-Obs: café\r\n\r\n",
        );
        let got: Vec<(&str, &[u8])> = h
            .headers
            .iter()
            .map(|h| (h.name.as_str(), &h.value[..]))
            .collect();
        assert_eq!(
            got,
            [
                ("hOsT", &b"a.example"[..]),
                ("X-lower-UPPER", b"1"),
                ("accept", b"*/*"),
                ("X-Obs", "café".as_bytes())
            ]
        );
        let out = encode_origin_request(&h);
        assert_eq!(
            String::from_utf8(out).unwrap(),
            "GET / HTTP/1.1\r\nHost: a.example\r\nX-lower-UPPER: 1\r\naccept: */*\r\n\
             X-Obs: café\r\nConnection: close\r\n\r\n",
            "other headers keep their order and case; Host is set from the target"
        );
    }

    #[test]
    fn hop_by_hop_headers_are_stripped() {
        let h = head(
            "POST http://a.example:8080/p?q=1 HTTP/1.1\r\n\
             Host: a.example:8080\r\n\
             Connection: keep-alive, X-Secret-Hop, content-length\r\n\
             connection: Upgrade\r\n\
             Keep-Alive: timeout=5\r\n\
             Proxy-Connection: keep-alive\r\n\
             Proxy-Authorization: Basic YWxpY2U6cHc=\r\n\
             Authorization: Bearer origin-token\r\n\
             TE: trailers\r\n\
             Trailer: X-Checksum\r\n\
             Upgrade: websocket\r\n\
             x-secret-hop: 1\r\n\
             Content-Length: 3\r\n\
             Cookie: a=b\r\n\r\n",
        );
        let out = encode_origin_request(&h);
        assert!(out.starts_with(b"POST /p?q=1 HTTP/1.1\r\n"));
        assert_eq!(
            names(&out),
            [
                "Host",
                "Authorization",
                "Content-Length",
                "Cookie",
                "Connection"
            ]
        );
        assert!(out.ends_with(b"Connection: close\r\n\r\n"));
        for never in ["Via", "X-Forwarded-For", "Forwarded"] {
            assert!(!names(&out).iter().any(|n| n.eq_ignore_ascii_case(never)));
        }

        // Transfer-Encoding stays even when Connection names it.
        let h = head(
            "POST http://a.example/ HTTP/1.1\r\nHost: a.example\r\n\
             Connection: transfer-encoding, host\r\nTransfer-Encoding: chunked\r\n\r\n",
        );
        assert_eq!(
            names(&encode_origin_request(&h)),
            ["Host", "Transfer-Encoding", "Connection"]
        );
    }

    #[test]
    fn host_is_set_from_the_target() {
        let cases = [
            ("http://a.example/x", "a.example"),
            ("http://a.example:8080/x", "a.example:8080"),
            ("http://[2001:db8::1]:8080/x", "[2001:db8::1]:8080"),
            ("http://[2001:db8::1]/x", "[2001:db8::1]"),
            ("http://10.0.0.1:80/x", "10.0.0.1"),
        ];
        for (uri, host) in cases {
            let h = head(&format!("GET {uri} HTTP/1.0\r\nAccept: */*\r\n\r\n"));
            let out = String::from_utf8(encode_origin_request(&h)).unwrap();
            assert_eq!(
                out,
                format!(
                    "GET /x HTTP/1.0\r\nHost: {host}\r\nAccept: */*\r\nConnection: close\r\n\r\n"
                )
            );
        }
    }

    #[test]
    fn proxy_credentials() {
        use base64::engine::general_purpose::STANDARD as B64;
        let basic = |u: &str, p: &str| ProxyAuth::Basic {
            username: u.as_bytes().to_vec(),
            password: p.as_bytes().to_vec(),
        };
        let enc = |s: &[u8]| B64.encode(s);
        let cases: Vec<(String, ProxyAuth)> = vec![
            (String::new(), ProxyAuth::Missing),
            (
                format!("Proxy-Authorization: Basic {}\r\n", enc(b"alice:pw")),
                basic("alice", "pw"),
            ),
            (
                format!("proxy-authorization: bAsIc   {}  \r\n", enc(b"alice:pw")),
                basic("alice", "pw"),
            ),
            (
                format!("Proxy-Authorization: Basic {}\r\n", enc(b"alice:p:w:")),
                basic("alice", "p:w:"),
            ),
            (
                format!("Proxy-Authorization: Basic {}\r\n", enc(b":")),
                basic("", ""),
            ),
            (
                format!(
                    "Proxy-Authorization: Basic {}\r\n",
                    enc(b"alice-session-x7k2-country-de:pw")
                ),
                basic("alice-session-x7k2-country-de", "pw"),
            ),
            (
                format!("Proxy-Authorization: Basic {}\r\n", enc(b"alice")),
                ProxyAuth::Malformed,
            ),
            (
                "Proxy-Authorization: Basic !!notbase64\r\n".into(),
                ProxyAuth::Malformed,
            ),
            (
                "Proxy-Authorization: Basic YWxpY2U6cHc\r\n".into(),
                ProxyAuth::Malformed,
            ),
            (
                "Proxy-Authorization: Basic\r\n".into(),
                ProxyAuth::Malformed,
            ),
            (
                "Proxy-Authorization: Basic \r\n".into(),
                ProxyAuth::Malformed,
            ),
            (
                "Proxy-Authorization: Bearer abc\r\n".into(),
                ProxyAuth::Malformed,
            ),
            (
                format!("Proxy-Authorization: Digest {}\r\n", enc(b"a:b")),
                ProxyAuth::Malformed,
            ),
            (
                format!("Authorization: Basic {}\r\n", enc(b"alice:pw")),
                ProxyAuth::Missing,
            ),
            (
                format!(
                    "Proxy-Authorization: Basic {}\r\nProxy-Authorization: Basic {}\r\n",
                    enc(b"alice:pw"),
                    enc(b"bob:pw")
                ),
                ProxyAuth::Malformed,
            ),
        ];
        for (fields, want) in cases {
            let h = head(&format!("CONNECT a.example:443 HTTP/1.1\r\n{fields}\r\n"));
            assert_eq!(h.proxy_credentials(), want, "{fields:?}");
        }
        // Non-UTF-8 and NUL bytes reach the auth layer as they are.
        let raw = enc(b"us\0er\xff:p\xfe");
        let h = head(&format!(
            "CONNECT a.example:443 HTTP/1.1\r\nProxy-Authorization: Basic {raw}\r\n\r\n"
        ));
        assert_eq!(
            h.proxy_credentials(),
            ProxyAuth::Basic {
                username: b"us\0er\xff".to_vec(),
                password: b"p\xfe".to_vec()
            }
        );
        let shown = format!("{:?} {:?}", h, basic("alice", "hunter2"));
        assert!(
            !shown.contains(&raw) && !shown.contains("hunter2"),
            "{shown}"
        );
    }

    #[test]
    fn keep_alive() {
        let cases = [
            ("HTTP/1.1", "", true),
            ("HTTP/1.1", "Connection: close\r\n", false),
            ("HTTP/1.1", "Connection: Keep-Alive, CLOSE\r\n", false),
            ("HTTP/1.1", "Proxy-Connection: close\r\n", false),
            ("HTTP/1.0", "", false),
            ("HTTP/1.0", "Connection: keep-alive\r\n", true),
            ("HTTP/1.0", "Proxy-Connection: Keep-Alive\r\n", true),
            ("HTTP/1.0", "Connection: upgrade\r\n", false),
        ];
        for (version, fields, want) in cases {
            let h = head(&format!("GET http://a.example/ {version}\r\n{fields}\r\n"));
            assert_eq!(client_wants_keep_alive(&h), want, "{version} {fields:?}");
        }
    }

    #[test]
    fn responses() {
        use BodyFraming::*;
        let cases: &[(&str, &str, Result<BodyFraming, HeadError>)] = &[
            (
                "GET",
                "HTTP/1.1 200 OK\r\nContent-Length: 12\r\n\r\n",
                Ok(Length(12)),
            ),
            (
                "HEAD",
                "HTTP/1.1 200 OK\r\nContent-Length: 12\r\n\r\n",
                Ok(Empty),
            ),
            ("GET", "HTTP/1.1 204 No Content\r\n\r\n", Ok(Empty)),
            (
                "GET",
                "HTTP/1.1 304 Not Modified\r\nContent-Length: 12\r\n\r\n",
                Ok(Empty),
            ),
            ("GET", "HTTP/1.1 101 Switching Protocols\r\n\r\n", Ok(Empty)),
            ("GET", "HTTP/1.1 100 Continue\r\n\r\n", Ok(Empty)),
            (
                "CONNECT",
                "HTTP/1.1 200 Connection established\r\n\r\n",
                Ok(Empty),
            ),
            (
                "CONNECT",
                "HTTP/1.1 407 Auth\r\nContent-Length: 3\r\n\r\n",
                Ok(Length(3)),
            ),
            (
                "GET",
                "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n",
                Ok(Chunked),
            ),
            (
                "GET",
                "HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip\r\n\r\n",
                Ok(UntilClose),
            ),
            ("GET", "HTTP/1.0 200 OK\r\n\r\n", Ok(UntilClose)),
            ("POST", "HTTP/1.1 500 Oops\r\n\r\n", Ok(UntilClose)),
            (
                "GET",
                "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nContent-Length: 3\r\n\r\n",
                Err(bad("both Content-Length and Transfer-Encoding")),
            ),
            (
                "GET",
                "HTTP/1.1 200 OK\r\nContent-Length: 3\r\nContent-Length: 4\r\n\r\n",
                Err(bad("conflicting Content-Length values")),
            ),
            (
                "GET",
                "HTTP/1.0 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n",
                Err(bad("Transfer-Encoding in an HTTP/1.0 response")),
            ),
        ];
        for (method, text, want) in cases {
            assert_eq!(
                response_body_framing(method, &resp(text)),
                *want,
                "{method} {text:?}"
            );
        }
        // Found by the http_head fuzz target: `055` parsed as 55 and was
        // forwarded as an unparseable two-digit status.
        assert_eq!(
            parse_response_head(b"HTTP/1.0 055 TTP/\n\n;P/1.00 TTP/1.0 1H (\r"),
            Err(bad("status code below 100"))
        );
        assert_eq!(resp("HTTP/1.1 100 Continue\r\n\r\n").status, 100);
        // obs-fold in responses is refused too.
        assert!(parse_response_head(b"HTTP/1.1 200 OK\r\nX: a\r\n b\r\n\r\n").is_err());
        assert_eq!(
            parse_response_head(b"HTTP/1.1 200 OK\r\nX: a\r\n\r\n"),
            parse_response_head(b"HTTP/1.1 200 OK\r\nX: a\r\n\r\nbody")
        );
    }

    #[test]
    fn response_head_for_client() {
        let r = resp(
            "HTTP/1.1 200 Fine Thanks\r\nServer: x\r\nConnection: close, X-Hop\r\nX-Hop: 1\r\n\
             Keep-Alive: timeout=5\r\nProxy-Authenticate: Basic\r\nTransfer-Encoding: chunked\r\n\
             set-cookie: a=b\r\n\r\n",
        );
        assert_eq!(
            String::from_utf8(encode_response_head_for_client(&r, true)).unwrap(),
            "HTTP/1.1 200 Fine Thanks\r\nServer: x\r\nTransfer-Encoding: chunked\r\nset-cookie: a=b\r\n\
             Connection: keep-alive\r\n\r\n"
        );
        let r = resp("HTTP/1.0 404 Not Found\r\nContent-Length: 0\r\n\r\n");
        assert_eq!(
            String::from_utf8(encode_response_head_for_client(&r, false)).unwrap(),
            "HTTP/1.0 404 Not Found\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
        );
    }

    #[test]
    fn simple_responses() {
        let out = simple_response(
            407,
            "Proxy Authentication Required",
            &[("Proxy-Authenticate", "Basic realm=\"cellgate\"")],
            "authentication required\n",
        );
        assert_eq!(
            String::from_utf8(out.clone()).unwrap(),
            "HTTP/1.1 407 Proxy Authentication Required\r\n\
             Proxy-Authenticate: Basic realm=\"cellgate\"\r\n\
             Content-Type: text/plain; charset=utf-8\r\nContent-Length: 24\r\n\
             Connection: close\r\n\r\nauthentication required\n"
        );
        let (r, n) = parse_response_head(&out).unwrap().unwrap();
        assert_eq!(
            response_body_framing("GET", &r),
            Ok(BodyFraming::Length(24))
        );
        assert_eq!(out.len() - n, 24);
        let injected = simple_response(502, "Bad\r\nX-Evil: 1", &[("X", "a\r\nSet-Cookie: z")], "");
        let (r, _) = parse_response_head(&injected).unwrap().unwrap();
        assert!(
            r.headers
                .iter()
                .all(|h| !h.name.starts_with("X-Evil") && h.name != "Set-Cookie")
        );
        assert_eq!(HeadError::TooLarge.status(), 431);
        assert_eq!(HeadError::NotProxyRequest.status(), 400);
        assert_eq!(HeadError::UnsupportedScheme("https".into()).status(), 400);
    }

    /// Feed `data` in the given pieces; returns the body length found.
    fn track(pieces: &[&[u8]]) -> Result<Option<usize>, HeadError> {
        let mut t = ChunkedTracker::new();
        let mut total = 0;
        for p in pieces {
            let n = t.feed(p)?;
            assert!(n <= p.len());
            total += n;
            if t.is_done() {
                return Ok(Some(total));
            }
            assert_eq!(n, p.len());
        }
        Ok(None)
    }

    #[test]
    fn chunked_bodies() {
        type Found = Result<Option<usize>, HeadError>;
        let cases: &[(&[u8], Found)] = &[
            (b"0\r\n\r\n", Ok(Some(5))),
            (b"0\r\n\r\nGET /next", Ok(Some(5))),
            (b"5\r\nhello\r\n0\r\n\r\n", Ok(Some(15))),
            (
                b"A;name=value;q=\"x y\"\r\n0123456789\r\n0 ; last\r\n\r\nrest",
                Ok(Some(46)),
            ),
            (
                b"3\r\nabc\r\n0\r\nX-Checksum: 1\r\nX-More: 2\r\n\r\nrest",
                Ok(Some(39)),
            ),
            (b"0000000000000005\r\nhello\r\n0\r\n\r\n", Ok(Some(30))),
            (b"ffffffffffffffff\r\nabc", Ok(None)),
            (b"5\r\nhel", Ok(None)),
            (
                b"00000000000000005\r\n",
                Err(bad("chunk size over 16 hex digits")),
            ),
            (
                b"10000000000000000\r\n",
                Err(bad("chunk size over 16 hex digits")),
            ),
            (b"\r\n", Err(bad("chunk size is not hexadecimal"))),
            (
                b" 5\r\nhello\r\n",
                Err(bad("chunk size is not hexadecimal")),
            ),
            (b"-5\r\n", Err(bad("chunk size is not hexadecimal"))),
            (b"5x\r\n", Err(bad("bad byte after chunk size"))),
            (b"5\nhello\n0\n\n", Err(bad("bad byte after chunk size"))),
            (b"5\r\rhello", Err(bad("chunk size line not ended by CRLF"))),
            (b"5;a\nb\r\n", Err(bad("control byte in chunk extension"))),
            (
                b"5\r\nhelloX\r\n",
                Err(bad("chunk data not followed by CRLF")),
            ),
            (
                b"5\r\nhello\rX",
                Err(bad("chunk data not followed by CRLF")),
            ),
            (b"0\r\nX: 1\n\r\n", Err(bad("bare LF in trailer section"))),
            (b"0\r\n\n", Err(bad("bare LF in trailer section"))),
            (b"0\r\n\rX", Err(bad("bare CR in trailer section"))),
            (b"0\r\nX: 1\rX", Err(bad("bare CR in trailer section"))),
        ];
        for (body, want) in cases {
            assert_eq!(track(&[body]), *want, "{:?}", String::from_utf8_lossy(body));
        }
        let mut long_ext = b"5;".to_vec();
        long_ext.resize(MAX_CHUNK_LINE + 10, b'x');
        assert_eq!(track(&[&long_ext]), Err(bad("chunk size line too long")));
        let mut ok_ext = b"5;".to_vec();
        ok_ext.resize(MAX_CHUNK_LINE - 1, b'x');
        ok_ext.extend_from_slice(b"\r\nhello\r\n0\r\n\r\n");
        assert_eq!(track(&[&ok_ext]), Ok(Some(ok_ext.len())));
        let mut big_trailer = b"0\r\n".to_vec();
        big_trailer.resize(MAX_HEAD_LEN + 10, b'x');
        assert_eq!(
            track(&[&big_trailer]),
            Err(bad("trailer section too large"))
        );
    }

    #[test]
    fn chunked_errors_stick_and_done_stays_done() {
        let mut t = ChunkedTracker::default();
        assert!(t.feed(b"zz").is_err());
        assert_eq!(
            t.feed(b"0\r\n\r\n"),
            Err(bad("chunk size is not hexadecimal"))
        );
        let mut t = ChunkedTracker::new();
        assert_eq!(t.feed(b"0\r\n\r\nabc"), Ok(5));
        assert!(t.is_done());
        assert_eq!(t.feed(b"more"), Ok(0));
    }

    #[test]
    fn chunked_split_at_every_byte() {
        let body: &[u8] = b"4;ext=1\r\nwiki\r\n5\r\npedia\r\nE\r\n in\r\n\r\nchunks.\r\n0\r\nExpires: never\r\n\r\n";
        let mut with_tail = body.to_vec();
        with_tail.extend_from_slice(b"HTTP/1.1 200 OK\r\n");
        for cut in 0..=with_tail.len() {
            let (a, b) = with_tail.split_at(cut);
            assert_eq!(track(&[a, b]), Ok(Some(body.len())), "cut at {cut}");
        }
        let bytes: Vec<&[u8]> = with_tail.chunks(1).collect();
        assert_eq!(track(&bytes), Ok(Some(body.len())));
        for cut in 0..body.len() {
            assert_eq!(track(&[&body[..cut]]), Ok(None), "prefix {cut}");
        }
    }

    fn target_strategy() -> impl Strategy<Value = TargetAddr> {
        let port = 1..=u16::MAX;
        prop_oneof![
            (any::<[u8; 4]>(), port.clone())
                .prop_map(|(ip, p)| TargetAddr::Ip(SocketAddr::new(Ipv4Addr::from(ip).into(), p))),
            (any::<[u8; 16]>(), port.clone())
                .prop_map(|(ip, p)| TargetAddr::Ip(SocketAddr::new(Ipv6Addr::from(ip).into(), p))),
            (
                "[a-z][a-z0-9-]{0,20}(\\.[a-z0-9_-]{1,20}){0,3}\\.[a-z]{2,6}",
                port
            )
                .prop_map(|(d, p)| TargetAddr::Domain(d, p)),
        ]
    }

    fn header_line() -> impl Strategy<Value = String> {
        let digits = "[0-9]{0,22}";
        prop_oneof![
            "[A-Za-z][A-Za-z0-9-]{0,15}: [ -~]{0,30}",
            digits.prop_map(|d| format!("Content-Length: {d}")),
            (digits, digits).prop_map(|(a, b)| format!("Content-Length: {a}, {b}")),
            "(chunked|gzip|identity|CHUNKED|x)(, ?(chunked|gzip|deflate)){0,2}"
                .prop_map(|v| format!("Transfer-Encoding: {v}")),
            "(close|keep-alive|Upgrade|x-hop|content-length)(, ?(close|te|x-hop)){0,2}"
                .prop_map(|v| format!("Connection: {v}")),
            "[A-Za-z0-9+/=:]{0,40}".prop_map(|v| format!("Proxy-Authorization: Basic {v}")),
            Just("X-Hop: 1".to_string()),
            Just("Host: a.example".to_string()),
        ]
    }

    /// A request line and header lines that are mostly well-formed, with
    /// framing fields of arbitrary content, then arbitrary bytes.
    fn structured_request() -> impl Strategy<Value = Vec<u8>> {
        (
            prop_oneof![
                Just("GET http://a.example/p?q=1".to_string()),
                Just("CONNECT a.example:443".to_string()),
                Just("POST http://[::1]:8080/".to_string()),
                "[A-Z]{1,7} [ -~]{0,40}",
            ],
            prop_oneof![Just("HTTP/1.1"), Just("HTTP/1.0"), Just("HTTP/1.2")],
            proptest::collection::vec(header_line(), 0..8),
            proptest::collection::vec(any::<u8>(), 0..64),
        )
            .prop_map(|(line, version, fields, tail)| {
                let mut out = format!("{line} {version}\r\n").into_bytes();
                for f in fields {
                    out.extend_from_slice(f.as_bytes());
                    out.extend_from_slice(b"\r\n");
                }
                out.extend_from_slice(b"\r\n");
                out.extend(tail);
                out
            })
    }

    fn check_request(buf: &[u8]) {
        match parse_request_head(buf) {
            Ok(Some((h, n))) => {
                assert!(n <= buf.len() && n <= MAX_HEAD_LEN);
                assert!(buf[..n].ends_with(b"\n\n") || buf[..n].ends_with(b"\n\r\n"));
                assert!(h.headers.len() <= MAX_HEADERS);
                // A head that parsed has unambiguous framing, and so does
                // what we send upstream for it.
                let framing = request_body_framing(&h).unwrap();
                let _ = h.proxy_credentials();
                let _ = client_wants_keep_alive(&h);
                let out = encode_origin_request(&h);
                if matches!(h.target, RequestTarget::Absolute { .. }) {
                    let mut fields = [httparse::EMPTY_HEADER; MAX_HEADERS + 2];
                    let mut r = httparse::Request::new(&mut fields);
                    assert!(r.parse(&out).unwrap().is_complete());
                    let proxied: Vec<Header> = own_headers(r.headers);
                    let again = RequestHead {
                        headers: proxied,
                        ..h.clone()
                    };
                    assert_eq!(request_body_framing(&again).unwrap(), framing);
                    assert!(!client_wants_keep_alive(&again) || h.minor_version == 1);
                    assert!(
                        values(&again.headers, "proxy-authorization")
                            .next()
                            .is_none()
                    );
                }
            }
            Ok(None) => assert!(buf.len() < MAX_HEAD_LEN),
            Err(_) => {}
        }
    }

    fn check_response(buf: &[u8]) {
        if let Ok(Some((h, n))) = parse_response_head(buf) {
            assert!(n <= buf.len() && n <= MAX_HEAD_LEN);
            for method in ["GET", "HEAD", "CONNECT"] {
                let _ = response_body_framing(method, &h);
            }
            let out = encode_response_head_for_client(&h, true);
            let (again, m) = parse_response_head(&out).unwrap().unwrap();
            assert_eq!(m, out.len());
            assert_eq!(again.status, h.status);
        }
    }

    fn check_chunked(buf: &[u8], split: usize) {
        let split = split.min(buf.len());
        let mut t = ChunkedTracker::new();
        let Ok(a) = t.feed(&buf[..split]) else { return };
        assert!(a <= split);
        if t.is_done() {
            assert_eq!(t.feed(&buf[split..]), Ok(0));
            return;
        }
        assert_eq!(a, split);
        if let Ok(b) = t.feed(&buf[split..]) {
            assert!(b <= buf.len() - split);
        }
    }

    /// A chunked body of the given chunks with optional extensions and
    /// trailers, in canonical form.
    fn chunked_body(chunks: &[(Vec<u8>, Option<String>)], trailers: &[String]) -> Vec<u8> {
        let mut out = Vec::new();
        for (data, ext) in chunks {
            out.extend_from_slice(format!("{:x}", data.len()).as_bytes());
            if let Some(e) = ext {
                out.extend_from_slice(format!(";{e}").as_bytes());
            }
            out.extend_from_slice(b"\r\n");
            out.extend_from_slice(data);
            out.extend_from_slice(b"\r\n");
        }
        out.extend_from_slice(b"0\r\n");
        for t in trailers {
            out.extend_from_slice(t.as_bytes());
            out.extend_from_slice(b"\r\n");
        }
        out.extend_from_slice(b"\r\n");
        out
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(1_000))]

        #[test]
        fn arbitrary_bytes_never_panic(buf in proptest::collection::vec(any::<u8>(), 0..512), split in any::<usize>()) {
            check_request(&buf);
            check_response(&buf);
            check_chunked(&buf, split);
        }

        #[test]
        fn structured_requests(buf in structured_request()) {
            check_request(&buf);
        }

        #[test]
        fn structured_responses(
            status in 100u16..1000,
            fields in proptest::collection::vec(header_line(), 0..8),
            tail in proptest::collection::vec(any::<u8>(), 0..32),
        ) {
            let mut buf = format!("HTTP/1.1 {status} Reason\r\n").into_bytes();
            for f in fields {
                buf.extend_from_slice(f.as_bytes());
                buf.extend_from_slice(b"\r\n");
            }
            buf.extend_from_slice(b"\r\n");
            let head_len = buf.len();
            buf.extend(tail);
            check_response(&buf);
            if let Ok(Some((_, n))) = parse_response_head(&buf) {
                prop_assert_eq!(n, head_len);
            }
        }

        /// A chunk-size line with an arbitrary run of hex digits and an
        /// arbitrary tail: the path to the size arithmetic.
        #[test]
        fn structured_chunk_sizes(
            digits in "[0-9a-fA-F]{1,40}",
            sep in prop_oneof![Just(""), Just(";x=y"), Just(" "), Just("\t;a")],
            tail in proptest::collection::vec(any::<u8>(), 0..64),
            split in any::<usize>(),
        ) {
            let mut buf = format!("{digits}{sep}\r\n").into_bytes();
            buf.extend(&tail);
            check_chunked(&buf, split);
            let mut t = ChunkedTracker::new();
            let res = t.feed(&buf);
            if digits.len() > 16 {
                prop_assert_eq!(res, Err(bad("chunk size over 16 hex digits")));
            } else {
                prop_assert!(res.is_ok() || tail.is_empty() || u64::from_str_radix(&digits, 16).unwrap() as usize <= tail.len());
            }
        }

        #[test]
        fn chunked_round_trip(
            chunks in proptest::collection::vec(
                (proptest::collection::vec(any::<u8>(), 1..300), proptest::option::of("[a-z]{1,8}(=[a-z0-9]{1,8})?")),
                0..6,
            ),
            trailers in proptest::collection::vec("[A-Za-z-]{1,10}: [ -~]{0,20}", 0..3),
            tail in proptest::collection::vec(any::<u8>(), 0..32),
            cuts in proptest::collection::vec(any::<prop::sample::Index>(), 0..6),
        ) {
            let body = chunked_body(&chunks, &trailers);
            let mut stream = body.clone();
            stream.extend(&tail);
            let mut cuts: Vec<usize> = cuts.iter().map(|i| i.index(stream.len() + 1)).collect();
            cuts.push(0);
            cuts.push(stream.len());
            cuts.sort_unstable();
            let pieces: Vec<&[u8]> = cuts.windows(2).map(|w| &stream[w[0]..w[1]]).collect();
            prop_assert_eq!(track(&pieces), Ok(Some(body.len())));
        }

        #[test]
        fn connect_round_trip(target in target_strategy(), tail in proptest::collection::vec(any::<u8>(), 0..16)) {
            let text = format!("CONNECT {} HTTP/1.1\r\nHost: {0}\r\n\r\n", host_field(&target, 0));
            let mut buf = text.clone().into_bytes();
            buf.extend(&tail);
            let (h, n) = parse_request_head(&buf).unwrap().unwrap();
            prop_assert_eq!(n, text.len());
            prop_assert_eq!(h.target, RequestTarget::Authority(target));
        }

        #[test]
        fn absolute_round_trip(
            target in target_strategy(),
            path in "(/[a-zA-Z0-9._~%!$&'()*+,;=:@-]{0,12}){0,4}(\\?[a-zA-Z0-9=&%/?-]{0,20})?",
            http10 in any::<bool>(),
            with_host in any::<bool>(),
        ) {
            let authority = host_field(&target, 80);
            let host = if with_host { format!("Host: {authority}\r\n") } else { String::new() };
            let text = format!(
                "GET http://{authority}{path} HTTP/1.{}\r\n{host}Proxy-Authorization: Basic YTpi\r\nX-Keep: yes\r\n\r\n",
                u8::from(!http10)
            );
            let (h, n) = parse_request_head(text.as_bytes()).unwrap().unwrap();
            prop_assert_eq!(n, text.len());
            let want_path = if path.starts_with('/') { path.clone() } else { format!("/{path}") };
            prop_assert_eq!(&h.target, &RequestTarget::Absolute { target: target.clone(), path_and_query: want_path.clone() });
            let out = encode_origin_request(&h);
            let mut fields = [httparse::EMPTY_HEADER; 8];
            let mut r = httparse::Request::new(&mut fields);
            prop_assert!(r.parse(&out).unwrap().is_complete());
            prop_assert_eq!(r.path, Some(want_path.as_str()));
            prop_assert_eq!(r.version, Some(u8::from(!http10)));
            let got: Vec<(&str, &[u8])> = r.headers.iter().map(|h| (h.name, h.value)).collect();
            let want: Vec<(&str, &[u8])> =
                vec![("Host", authority.as_bytes()), ("X-Keep", b"yes"), ("Connection", b"close")];
            prop_assert_eq!(got, want);
        }
    }

    /// Every prefix of structured heads is incomplete, whatever it holds.
    #[test]
    fn structured_prefixes_are_incomplete() {
        let mut runner = proptest::test_runner::TestRunner::new(ProptestConfig::with_cases(100));
        runner
            .run(&structured_request(), |buf| {
                let end = buf.windows(4).position(|w| w == b"\r\n\r\n").map(|p| p + 4);
                if let (Some(end), Ok(Some(_))) = (end, parse_request_head(&buf)) {
                    for cut in 0..end {
                        prop_assert_eq!(parse_request_head(&buf[..cut]), Ok(None));
                    }
                }
                Ok(())
            })
            .unwrap();
    }
}
