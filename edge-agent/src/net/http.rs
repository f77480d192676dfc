//! A small HTTP/1.1 client for the agent's own requests (the IP-echo check,
//! a HiLink stick's API): `http://` only, one request per connection,
//! bounded response size and time, optionally bound to an interface.
//!
//! A host name in the URL is resolved by the host's resolver, not through
//! the interface (the client has no per-exit nameservers); URLs used through
//! an uplink should name an IP address when that matters (a HiLink stick is
//! always `192.168.8.1`-style anyway).
//!
//! The response parser ([`parse_response`]) is a pure function over the
//! bytes read so far: `Ok(None)` means "need more bytes".

use std::net::SocketAddr;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};

use super::bind::connect_tcp;

/// Largest response (head and body) read.
pub const MAX_RESPONSE: usize = 1 << 20;
/// Largest response head.
pub const MAX_HEAD: usize = 64 * 1024;
/// Most header lines in one head.
pub const MAX_HEADERS: usize = 128;

#[derive(Debug, thiserror::Error)]
pub enum HttpError {
    #[error("bad URL {0}")]
    Url(String),
    #[error("{0}")]
    Io(#[from] std::io::Error),
    #[error("no answer within {0:?}")]
    Timeout(Duration),
    #[error("malformed response: {0}")]
    Malformed(String),
    #[error("response larger than {MAX_RESPONSE} bytes")]
    TooLarge,
}

pub struct Request<'a> {
    pub method: &'a str,
    /// `http://host[:port]/path?query`
    pub url: &'a str,
    /// Extra headers; `Host`, `Connection: close` and `Content-Length` are
    /// added by [`send`].
    pub headers: &'a [(&'a str, &'a str)],
    pub body: &'a [u8],
}

#[derive(Debug)]
pub struct Response {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl Response {
    /// First header named `name` (case-insensitive).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

/// Send `req` and read the whole response, all within `timeout`. The
/// connection leaves through `interface` when given.
pub async fn send(
    req: Request<'_>,
    interface: Option<&str>,
    timeout: Duration,
) -> Result<Response, HttpError> {
    let url = parse_url(req.url)?;
    let head_only = req.method.eq_ignore_ascii_case("HEAD");
    let request = encode_request(&req, &url)?;
    match tokio::time::timeout(
        timeout,
        exchange(&url, &request, head_only, interface, timeout),
    )
    .await
    {
        Ok(result) => result,
        Err(_) => Err(HttpError::Timeout(timeout)),
    }
}

async fn exchange(
    url: &Url<'_>,
    request: &[u8],
    head_only: bool,
    interface: Option<&str>,
    timeout: Duration,
) -> Result<Response, HttpError> {
    let addrs: Vec<SocketAddr> = match url.host.parse::<std::net::IpAddr>() {
        Ok(ip) => vec![SocketAddr::new(ip, url.port)],
        Err(_) => tokio::net::lookup_host((url.host, url.port))
            .await
            .map_err(|e| std::io::Error::new(e.kind(), format!("resolving {}: {e}", url.host)))?
            .collect(),
    };
    let mut last = std::io::Error::new(
        std::io::ErrorKind::NotFound,
        format!("{} has no address", url.host),
    );
    let mut stream = None;
    for addr in addrs {
        match connect_tcp(addr, interface, timeout).await {
            Ok(tcp) => {
                stream = Some(tcp);
                break;
            }
            Err(e) => last = e,
        }
    }
    let mut stream = stream.ok_or(last)?;
    stream.write_all(request).await?;
    let mut buf = Vec::new();
    let mut chunk = vec![0u8; 64 * 1024];
    loop {
        let n = stream.read(&mut chunk).await?;
        buf.extend_from_slice(&chunk[..n]);
        if buf.len() > MAX_RESPONSE {
            return Err(HttpError::TooLarge);
        }
        if let Some(response) = parse_response(&buf, n == 0, head_only)? {
            return Ok(response);
        }
        if n == 0 {
            // parse_response never asks for more after the end.
            return Err(HttpError::Malformed("incomplete response".into()));
        }
    }
}

/// The parts of an `http://` URL the client needs.
#[derive(Debug, PartialEq, Eq)]
pub struct Url<'a> {
    /// Name or IP address, without IPv6 brackets.
    pub host: &'a str,
    pub port: u16,
    /// As written in the URL, for the `Host` header.
    pub authority: &'a str,
    /// Path and query, at least `/`.
    pub target: String,
}

pub fn parse_url(url: &str) -> Result<Url<'_>, HttpError> {
    let bad = |why: &str| HttpError::Url(format!("{url}: {why}"));
    let scheme_end = url
        .find("://")
        .ok_or_else(|| bad("expected http://host/path"))?;
    let scheme = &url[..scheme_end];
    if scheme.eq_ignore_ascii_case("https") {
        return Err(bad("https is not supported; use http://"));
    }
    if !scheme.eq_ignore_ascii_case("http") {
        return Err(bad("only http:// is supported"));
    }
    let rest = &url[scheme_end + 3..];
    let rest = rest.split('#').next().unwrap_or(rest);
    let split = rest.find(['/', '?']).unwrap_or(rest.len());
    let (authority, target) = rest.split_at(split);
    if authority.contains('@') {
        return Err(bad("user information in the URL is not supported"));
    }
    let (host, port) = if let Some(after) = authority.strip_prefix('[') {
        let close = after.find(']').ok_or_else(|| bad("unclosed ["))?;
        let host = &after[..close];
        if host.parse::<std::net::Ipv6Addr>().is_err() {
            return Err(bad("invalid IPv6 address"));
        }
        (host, &after[close + 1..])
    } else {
        match authority.rfind(':') {
            Some(i) => (&authority[..i], &authority[i..]),
            None => (authority, ""),
        }
    };
    let port = match port {
        "" => 80,
        p => p
            .strip_prefix(':')
            .and_then(|p| p.parse::<u16>().ok())
            .filter(|&p| p != 0)
            .ok_or_else(|| bad("invalid port"))?,
    };
    let host_ok = !host.is_empty()
        && host
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-._:".contains(&b));
    if !host_ok {
        return Err(bad("invalid host"));
    }
    if target.bytes().any(|b| b <= b' ' || b == 0x7F) {
        return Err(bad("spaces or control characters in the path"));
    }
    let target = if target.starts_with('/') {
        target.to_string()
    } else {
        format!("/{target}")
    };
    Ok(Url {
        host,
        port,
        authority,
        target,
    })
}

fn is_token(s: &str) -> bool {
    !s.is_empty()
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b))
}

/// The request bytes: our framing headers first, then the caller's.
pub fn encode_request(req: &Request<'_>, url: &Url<'_>) -> Result<Vec<u8>, HttpError> {
    let invalid =
        |what: String| HttpError::Io(std::io::Error::new(std::io::ErrorKind::InvalidInput, what));
    if !is_token(req.method) {
        return Err(invalid(format!("invalid method {:?}", req.method)));
    }
    let mut out = format!(
        "{} {} HTTP/1.1\r\nHost: {}\r\nConnection: close\r\n",
        req.method, url.target, url.authority
    );
    let has_body = !req.body.is_empty()
        || ["POST", "PUT", "PATCH"]
            .iter()
            .any(|m| req.method.eq_ignore_ascii_case(m));
    if has_body {
        out.push_str(&format!("Content-Length: {}\r\n", req.body.len()));
    }
    for (name, value) in req.headers {
        if !is_token(name) {
            return Err(invalid(format!("invalid header name {name:?}")));
        }
        if ["host", "connection", "content-length", "transfer-encoding"]
            .iter()
            .any(|h| name.eq_ignore_ascii_case(h))
        {
            return Err(invalid(format!(
                "header {name} is set by the client itself"
            )));
        }
        if value.bytes().any(|b| b == b'\r' || b == b'\n' || b == 0) {
            return Err(invalid(format!(
                "header {name} has a line break in its value"
            )));
        }
        out.push_str(&format!("{name}: {value}\r\n"));
    }
    out.push_str("\r\n");
    let mut out = out.into_bytes();
    out.extend_from_slice(req.body);
    Ok(out)
}

/// Parse a response from the bytes read so far. `eof` says the peer closed
/// the connection; `head_only` that the request was `HEAD`. `Ok(None)`:
/// more bytes are needed (never returned when `eof`).
pub fn parse_response(
    buf: &[u8],
    eof: bool,
    head_only: bool,
) -> Result<Option<Response>, HttpError> {
    let mut buf = buf;
    loop {
        let Some((status, headers, head_len)) = parse_head(buf)? else {
            if buf.len() > MAX_HEAD {
                return Err(HttpError::Malformed(format!(
                    "response head longer than {MAX_HEAD} bytes"
                )));
            }
            if eof {
                return Err(HttpError::Malformed(if buf.is_empty() {
                    "connection closed without a response".into()
                } else {
                    "connection closed inside the response head".into()
                }));
            }
            return Ok(None);
        };
        let rest = &buf[head_len..];
        if status == 101 {
            return Err(HttpError::Malformed(
                "unexpected protocol switch (101)".into(),
            ));
        }
        if (100..200).contains(&status) {
            // Interim response (100 Continue, 103 Early Hints): the real
            // one follows.
            buf = rest;
            continue;
        }
        let response = |body: Vec<u8>| {
            Some(Response {
                status,
                headers: headers.clone(),
                body,
            })
        };
        if head_only || status == 204 || status == 304 {
            return Ok(response(Vec::new()));
        }
        let chunked = header_values(&headers, "transfer-encoding")
            .flat_map(|v| v.split(','))
            .map(str::trim)
            .filter(|c| !c.is_empty())
            .last()
            .map(|c| c.eq_ignore_ascii_case("chunked"));
        match chunked {
            Some(true) => {
                return match decode_chunked(rest)? {
                    Some(body) => Ok(response(body)),
                    None if eof => Err(HttpError::Malformed(
                        "connection closed inside a chunked body".into(),
                    )),
                    None => Ok(None),
                };
            }
            // Another transfer coding last: the body ends with the
            // connection.
            Some(false) => {}
            None => {
                if let Some(len) = content_length(header_values(&headers, "content-length"))? {
                    if len > MAX_RESPONSE {
                        return Err(HttpError::TooLarge);
                    }
                    return if rest.len() >= len {
                        Ok(response(rest[..len].to_vec()))
                    } else if eof {
                        Err(HttpError::Malformed(format!(
                            "connection closed after {} of {len} body bytes",
                            rest.len()
                        )))
                    } else {
                        Ok(None)
                    };
                }
            }
        }
        return Ok(if eof { response(rest.to_vec()) } else { None });
    }
}

fn header_values<'a>(
    headers: &'a [(String, String)],
    name: &'a str,
) -> impl Iterator<Item = &'a str> + 'a {
    headers
        .iter()
        .filter(move |(n, _)| n.eq_ignore_ascii_case(name))
        .map(|(_, v)| v.as_str())
}

/// The one Content-Length all headers agree on.
fn content_length<'a>(values: impl Iterator<Item = &'a str>) -> Result<Option<usize>, HttpError> {
    let mut found: Option<usize> = None;
    for v in values.flat_map(|v| v.split(',')) {
        let v = v.trim();
        if v.is_empty() || v.len() > 19 || !v.bytes().all(|b| b.is_ascii_digit()) {
            return Err(HttpError::Malformed(format!(
                "invalid Content-Length {v:?}"
            )));
        }
        let n: usize = v
            .parse()
            .map_err(|_| HttpError::Malformed(format!("invalid Content-Length {v:?}")))?;
        match found {
            Some(prev) if prev != n => {
                return Err(HttpError::Malformed(
                    "conflicting Content-Length headers".into(),
                ));
            }
            _ => found = Some(n),
        }
    }
    Ok(found)
}

/// The next line at `pos`: its content (without CR LF or LF) and where the
/// following line starts; `None` without a line end yet.
fn line_at(buf: &[u8], pos: usize) -> Option<(&[u8], usize)> {
    let rest = buf.get(pos..)?;
    let nl = rest.iter().position(|&b| b == b'\n')?;
    let line = &rest[..nl];
    let line = line.strip_suffix(b"\r").unwrap_or(line);
    Some((line, pos + nl + 1))
}

type Head = (u16, Vec<(String, String)>, usize);

/// Status, headers and head length; `None` when the head is incomplete.
fn parse_head(buf: &[u8]) -> Result<Option<Head>, HttpError> {
    let malformed = |why: &str| HttpError::Malformed(why.to_string());
    let Some((status_line, mut pos)) = line_at(buf, 0) else {
        return Ok(None);
    };
    let status_line =
        std::str::from_utf8(status_line).map_err(|_| malformed("status line is not text"))?;
    let mut parts = status_line.splitn(3, ' ');
    let version = parts.next().unwrap_or("");
    if !matches!(version, "HTTP/1.1" | "HTTP/1.0") {
        return Err(HttpError::Malformed(format!(
            "not an HTTP/1.x status line: {:?}",
            status_line.chars().take(80).collect::<String>()
        )));
    }
    let code = parts.next().unwrap_or("");
    let status = if code.len() == 3 && code.bytes().all(|b| b.is_ascii_digit()) {
        code.parse::<u16>()
            .map_err(|_| malformed("invalid status code"))?
    } else {
        return Err(malformed("invalid status code"));
    };
    if !(100..600).contains(&status) {
        return Err(malformed("invalid status code"));
    }
    let mut headers = Vec::new();
    loop {
        let Some((line, next)) = line_at(buf, pos) else {
            return Ok(None);
        };
        pos = next;
        if line.is_empty() {
            return Ok(Some((status, headers, pos)));
        }
        if line[0] == b' ' || line[0] == b'\t' {
            return Err(malformed("folded header line"));
        }
        if headers.len() == MAX_HEADERS {
            return Err(HttpError::Malformed(format!(
                "more than {MAX_HEADERS} headers"
            )));
        }
        let colon = line
            .iter()
            .position(|&b| b == b':')
            .ok_or_else(|| malformed("header line without a colon"))?;
        let name =
            std::str::from_utf8(&line[..colon]).map_err(|_| malformed("invalid header name"))?;
        if !is_token(name) {
            return Err(malformed("invalid header name"));
        }
        let value = String::from_utf8_lossy(&line[colon + 1..])
            .trim()
            .to_string();
        headers.push((name.to_string(), value));
    }
}

/// Decode a complete chunked body at the start of `buf`; `None` until its
/// last chunk and trailers have arrived.
pub fn decode_chunked(buf: &[u8]) -> Result<Option<Vec<u8>>, HttpError> {
    let malformed = |why: &str| HttpError::Malformed(format!("chunked body: {why}"));
    let mut body = Vec::new();
    let mut pos = 0;
    loop {
        let Some((line, next)) = line_at(buf, pos) else {
            if buf.len() - pos > 1024 {
                return Err(malformed("chunk size line too long"));
            }
            return Ok(None);
        };
        let size = line.split(|&b| b == b';').next().unwrap_or(b"");
        let size = std::str::from_utf8(size)
            .map_err(|_| malformed("invalid chunk size"))?
            .trim_matches([' ', '\t']);
        if size.is_empty() || size.len() > 16 || !size.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(malformed("invalid chunk size"));
        }
        let size = u64::from_str_radix(size, 16).map_err(|_| malformed("invalid chunk size"))?;
        if size > (MAX_RESPONSE - body.len()) as u64 {
            return Err(HttpError::TooLarge);
        }
        let size = size as usize;
        pos = next;
        if size == 0 {
            // Trailers up to an empty line.
            loop {
                let Some((line, next)) = line_at(buf, pos) else {
                    return Ok(None);
                };
                pos = next;
                if line.is_empty() {
                    return Ok(Some(body));
                }
            }
        }
        let Some(data) = buf.get(pos..pos + size) else {
            return Ok(None);
        };
        body.extend_from_slice(data);
        pos += size;
        // The line end after the data.
        match (buf.get(pos), buf.get(pos + 1)) {
            (None, _) | (Some(b'\r'), None) => return Ok(None),
            (Some(b'\n'), _) => pos += 1,
            (Some(b'\r'), Some(b'\n')) => pos += 2,
            _ => return Err(malformed("chunk not followed by a line end")),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::net::TcpListener;

    fn parse(raw: &[u8]) -> Result<Option<Response>, HttpError> {
        parse_response(raw, false, false)
    }

    #[test]
    fn urls() {
        let u = parse_url("http://192.168.8.1/api/device/control").unwrap();
        assert_eq!(
            (u.host, u.port, u.authority),
            ("192.168.8.1", 80, "192.168.8.1")
        );
        assert_eq!(u.target, "/api/device/control");
        let u = parse_url("HTTP://[2001:db8::1]:8080?x=1#frag").unwrap();
        assert_eq!((u.host, u.port), ("2001:db8::1", 8080));
        assert_eq!(u.authority, "[2001:db8::1]:8080");
        assert_eq!(u.target, "/?x=1");
        let u = parse_url("http://echo.example:81").unwrap();
        assert_eq!(
            (u.host, u.port, u.target.as_str()),
            ("echo.example", 81, "/")
        );
        for bad in [
            "https://x/",
            "ftp://x/",
            "x/y",
            "http://",
            "http://:80/",
            "http://a:0/",
            "http://a:99999/",
            "http://u@a/",
            "http://[zz]/",
            "http://a/b c",
            "http://a\r\nX: y/",
        ] {
            assert!(matches!(parse_url(bad), Err(HttpError::Url(_))), "{bad}");
        }
        assert!(
            parse_url("https://x/")
                .unwrap_err()
                .to_string()
                .contains("https")
        );
    }

    #[test]
    fn request_bytes() {
        let url = parse_url("http://10.0.0.1:8080/api?q=1").unwrap();
        let req = Request {
            method: "POST",
            url: "",
            headers: &[("Content-Type", "text/xml")],
            body: b"<x/>",
        };
        let bytes = encode_request(&req, &url).unwrap();
        assert_eq!(
            String::from_utf8(bytes).unwrap(),
            "POST /api?q=1 HTTP/1.1\r\nHost: 10.0.0.1:8080\r\nConnection: close\r\n\
             Content-Length: 4\r\nContent-Type: text/xml\r\n\r\n<x/>"
        );
        let get = Request {
            method: "GET",
            url: "",
            headers: &[],
            body: b"",
        };
        let text = String::from_utf8(encode_request(&get, &url).unwrap()).unwrap();
        assert!(!text.contains("Content-Length"));
        for headers in [
            &[("Host", "evil")][..],
            &[("X-A", "a\r\nInjected: 1")][..],
            &[("bad name", "v")][..],
        ] {
            let req = Request {
                method: "GET",
                url: "",
                headers,
                body: b"",
            };
            assert!(encode_request(&req, &url).is_err());
        }
    }

    #[test]
    fn content_length_body() {
        let raw = b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nX-A: b\r\n\r\nhello, extra";
        let r = parse(raw).unwrap().unwrap();
        assert_eq!(r.status, 200);
        assert_eq!(r.body, b"hello");
        assert_eq!(r.header("x-a"), Some("b"));
        // Every prefix is "need more", or an error at the end.
        for cut in 0..raw.len() - 7 {
            assert!(parse(&raw[..cut]).unwrap().is_none(), "{cut}");
            assert!(parse_response(&raw[..cut], true, false).is_err(), "{cut}");
        }
    }

    #[test]
    fn chunked_body() {
        let raw = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n\
                    4;ext=1\r\nWiki\r\n5\r\npedia\r\nE\r\n in\r\n\r\nchunks.\r\n0\r\nX-T: 1\r\n\r\n";
        let r = parse(raw).unwrap().unwrap();
        assert_eq!(r.body, b"Wikipedia in\r\n\r\nchunks.");
        for cut in 0..raw.len() {
            assert!(parse(&raw[..cut]).unwrap().is_none(), "{cut}");
        }
        // Bare LF line ends.
        let lf = b"HTTP/1.1 200 OK\nTransfer-Encoding: chunked\n\n3\nabc\n0\n\n";
        assert_eq!(parse(lf).unwrap().unwrap().body, b"abc");
        // Chunked wins over Content-Length.
        let both = b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\nTransfer-Encoding: chunked\r\n\r\n1\r\nx\r\n0\r\n\r\n";
        assert_eq!(parse(both).unwrap().unwrap().body, b"x");
    }

    #[test]
    fn malformed_chunks() {
        for raw in [
            &b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n"[..],
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabcX\r\n",
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n\r\n",
        ] {
            assert!(
                matches!(parse(raw), Err(HttpError::Malformed(_))),
                "{raw:?}"
            );
        }
        let huge = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nFFFFFFFFFFFF\r\n";
        assert!(matches!(parse(huge), Err(HttpError::TooLarge)));
        let huge = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n100001\r\n";
        assert!(matches!(parse(huge), Err(HttpError::TooLarge)));
        let endless = [
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n".as_slice(),
            &[b'1'; 2000],
        ]
        .concat();
        assert!(parse(&endless).is_err());
    }

    #[test]
    fn until_close_and_no_body() {
        let raw = b"HTTP/1.0 200 OK\r\n\r\nall of it";
        assert!(parse(raw).unwrap().is_none());
        assert_eq!(
            parse_response(raw, true, false).unwrap().unwrap().body,
            b"all of it"
        );
        let head = b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\n";
        assert!(
            parse_response(head, false, true)
                .unwrap()
                .unwrap()
                .body
                .is_empty()
        );
        let no_content = b"HTTP/1.1 204 No Content\r\n\r\n";
        assert_eq!(parse(no_content).unwrap().unwrap().status, 204);
        // Interim responses are skipped.
        let interim =
            b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok";
        let r = parse(interim).unwrap().unwrap();
        assert_eq!((r.status, r.body.as_slice()), (200, &b"ok"[..]));
    }

    #[test]
    fn malformed_heads() {
        for raw in [
            &b"SSH-2.0-OpenSSH\r\n\r\n"[..],
            b"HTTP/1.1 2000 OK\r\n\r\n",
            b"HTTP/1.1 abc OK\r\n\r\n",
            b"HTTP/1.1 200 OK\r\nNoColon\r\n\r\n",
            b"HTTP/1.1 200 OK\r\nA: b\r\n folded\r\n\r\n",
            b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\nab",
            b"HTTP/1.1 200 OK\r\nContent-Length: -1\r\n\r\n",
            b"HTTP/1.1 101 Switching\r\n\r\n",
        ] {
            assert!(
                matches!(parse(raw), Err(HttpError::Malformed(_))),
                "{raw:?}"
            );
        }
        let big = b"HTTP/1.1 200 OK\r\nContent-Length: 99999999999\r\n\r\n";
        assert!(matches!(parse(big), Err(HttpError::TooLarge)));
        let endless_head = [b"HTTP/1.1 200 OK\r\n".as_slice(), &vec![b'a'; MAX_HEAD + 1]].concat();
        assert!(parse(&endless_head).is_err());
        let many = format!(
            "HTTP/1.1 200 OK\r\n{}\r\n",
            "A: b\r\n".repeat(MAX_HEADERS + 1)
        );
        assert!(parse(many.as_bytes()).is_err());
        assert!(matches!(
            parse_response(b"", true, false),
            Err(HttpError::Malformed(m)) if m.contains("without a response")
        ));
    }

    /// Serve one connection: read the request head, answer `reply`, then
    /// keep the connection open for `linger` (a server that ignores
    /// `Connection: close`).
    async fn serve_once(
        reply: Vec<u8>,
        linger: Duration,
    ) -> (String, tokio::task::JoinHandle<String>) {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}/ip", l.local_addr().unwrap());
        let task = tokio::spawn(async move {
            let (mut s, _) = l.accept().await.unwrap();
            let mut req = Vec::new();
            let mut b = [0u8; 1024];
            while !req.windows(4).any(|w| w == b"\r\n\r\n") {
                let n = s.read(&mut b).await.unwrap();
                if n == 0 {
                    break;
                }
                req.extend_from_slice(&b[..n]);
            }
            let _ = s.write_all(&reply).await;
            tokio::time::sleep(linger).await;
            String::from_utf8_lossy(&req).into_owned()
        });
        (url, task)
    }

    fn get(url: &str) -> Request<'_> {
        Request {
            method: "GET",
            url,
            headers: &[("Accept", "text/plain")],
            body: b"",
        }
    }

    #[tokio::test]
    async fn send_reads_a_length_delimited_response_without_waiting_for_close() {
        let (url, server) = serve_once(
            b"HTTP/1.1 200 OK\r\nContent-Length: 8\r\n\r\n10.0.0.7".to_vec(),
            Duration::from_secs(30),
        )
        .await;
        let started = std::time::Instant::now();
        let r = send(get(&url), None, Duration::from_secs(5)).await.unwrap();
        assert!(started.elapsed() < Duration::from_secs(2));
        assert_eq!(r.body, b"10.0.0.7");
        server.abort();
    }

    #[tokio::test]
    async fn send_chunked_and_until_close() {
        let (url, server) = serve_once(
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n".to_vec(),
            Duration::ZERO,
        )
        .await;
        let r = send(get(&url), None, Duration::from_secs(5)).await.unwrap();
        assert_eq!(r.body, b"abc");
        let request = server.await.unwrap();
        assert!(request.starts_with("GET /ip HTTP/1.1\r\n"), "{request}");
        assert!(request.contains("\r\nConnection: close\r\n"), "{request}");
        assert!(request.contains("\r\nAccept: text/plain\r\n"), "{request}");
        let (url, _server) =
            serve_once(b"HTTP/1.0 200 OK\r\n\r\nbye".to_vec(), Duration::ZERO).await;
        let r = send(get(&url), None, Duration::from_secs(5)).await.unwrap();
        assert_eq!(r.body, b"bye");
    }

    #[tokio::test]
    async fn send_is_bounded() {
        // Too large.
        let mut big = b"HTTP/1.0 200 OK\r\n\r\n".to_vec();
        big.resize(MAX_RESPONSE + 100, b'x');
        let (url, _server) = serve_once(big, Duration::from_secs(5)).await;
        assert!(matches!(
            send(get(&url), None, Duration::from_secs(5)).await,
            Err(HttpError::TooLarge)
        ));
        // Silent server.
        let (url, _server) = serve_once(Vec::new(), Duration::from_secs(30)).await;
        let started = std::time::Instant::now();
        assert!(matches!(
            send(get(&url), None, Duration::from_millis(300)).await,
            Err(HttpError::Timeout(_))
        ));
        assert!(started.elapsed() < Duration::from_secs(2));
        // Nobody listening.
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}/", l.local_addr().unwrap());
        drop(l);
        assert!(matches!(
            send(get(&url), None, Duration::from_secs(2)).await,
            Err(HttpError::Io(_))
        ));
    }
}
