//! A tiny HTTP/1.1 client over `TcpStream`: the control plane's REST API,
//! and raw exchanges with the proxy ports where the test controls every
//! byte.

use std::io::{self, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use serde_json::Value;

/// A parsed HTTP response.
#[derive(Debug, Clone)]
pub struct ApiResponse {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl ApiResponse {
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    pub fn json(&self) -> Value {
        serde_json::from_slice(&self.body).unwrap_or_else(|e| {
            panic!(
                "response (status {}) is not JSON: {e}: {}",
                self.status,
                self.text()
            )
        })
    }

    /// First header of that name (case-insensitive).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    /// Parse one response from the start of `raw` (status line, headers,
    /// and a body framed by Content-Length or chunked, else the rest).
    /// `None` if there is no complete head.
    pub fn parse(raw: &[u8]) -> Option<Self> {
        let end = find(raw, b"\r\n\r\n")?;
        let head = String::from_utf8_lossy(&raw[..end]).into_owned();
        let mut lines = head.split("\r\n");
        let status_line = lines.next()?;
        let mut parts = status_line.splitn(3, ' ');
        let version = parts.next()?;
        if !version.starts_with("HTTP/1.") {
            return None;
        }
        let status = parts.next()?.parse().ok()?;
        let headers: Vec<(String, String)> = lines
            .filter_map(|l| l.split_once(':'))
            .map(|(k, v)| (k.trim().to_string(), v.trim().to_string()))
            .collect();
        let rest = &raw[end + 4..];
        let get = |n: &str| {
            headers
                .iter()
                .find(|(k, _)| k.eq_ignore_ascii_case(n))
                .map(|(_, v)| v.clone())
        };
        let body = if let Some(len) = get("content-length").and_then(|v| v.parse::<usize>().ok()) {
            rest[..len.min(rest.len())].to_vec()
        } else if get("transfer-encoding").is_some_and(|v| v.eq_ignore_ascii_case("chunked")) {
            dechunk(rest)
        } else {
            rest.to_vec()
        };
        Some(Self {
            status,
            headers,
            body,
        })
    }
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

fn dechunk(mut data: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    while let Some(eol) = find(data, b"\r\n") {
        let size_text = String::from_utf8_lossy(&data[..eol]);
        let size = usize::from_str_radix(size_text.split(';').next().unwrap_or("").trim(), 16)
            .unwrap_or(0);
        data = &data[eol + 2..];
        if size == 0 || data.len() < size {
            break;
        }
        out.extend_from_slice(&data[..size]);
        data = &data[(size + 2).min(data.len())..];
    }
    out
}

/// What came back on a raw connection.
#[derive(Debug, Clone)]
pub struct RawReply {
    /// Everything the server sent.
    pub data: Vec<u8>,
    /// The server closed the connection (EOF or reset) before the deadline.
    pub closed: bool,
    /// Time from connect until close (or until the deadline).
    pub elapsed: Duration,
}

impl RawReply {
    pub fn response(&self) -> Option<ApiResponse> {
        ApiResponse::parse(&self.data)
    }

    pub fn status(&self) -> Option<u16> {
        self.response().map(|r| r.status)
    }

    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.data).into_owned()
    }
}

/// Connect to `addr`, send `request` (nothing if empty), optionally
/// half-close, then read until the server closes or `timeout` passes.
/// A reset or a failed write counts as "closed" too: the server is allowed
/// to drop a connection that sends garbage.
pub fn raw_exchange(
    addr: SocketAddr,
    request: &[u8],
    half_close: bool,
    timeout: Duration,
) -> RawReply {
    let start = Instant::now();
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(5))
        .unwrap_or_else(|e| panic!("connect {addr}: {e}"));
    let mut data = Vec::new();
    if !request.is_empty() && s.write_all(request).is_err() {
        // The server closed while we were still sending: read what it said.
        let _ = read_until_closed(&mut s, &mut data, start, timeout);
        return RawReply {
            data,
            closed: true,
            elapsed: start.elapsed(),
        };
    }
    if half_close {
        let _ = s.shutdown(Shutdown::Write);
    }
    let closed = read_until_closed(&mut s, &mut data, start, timeout);
    RawReply {
        data,
        closed,
        elapsed: start.elapsed(),
    }
}

/// Read into `data` until EOF/reset (`true`) or the deadline (`false`).
pub fn read_until_closed(
    s: &mut TcpStream,
    data: &mut Vec<u8>,
    start: Instant,
    timeout: Duration,
) -> bool {
    let mut buf = [0u8; 16 * 1024];
    loop {
        let left = timeout.saturating_sub(start.elapsed());
        if left.is_zero() {
            return false;
        }
        let _ = s.set_read_timeout(Some(left.max(Duration::from_millis(1))));
        match s.read(&mut buf) {
            Ok(0) => return true,
            Ok(n) => data.extend_from_slice(&buf[..n]),
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                ) =>
            {
                return false;
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(_) => return true,
        }
    }
}

/// The control plane's REST API.
#[derive(Debug, Clone)]
pub struct Api {
    pub addr: SocketAddr,
    pub token: Option<String>,
}

impl Api {
    pub fn new(addr: SocketAddr, token: Option<&str>) -> Self {
        Self {
            addr,
            token: token.map(str::to_string),
        }
    }

    /// One request on a fresh connection (`Connection: close`).
    pub fn try_request(
        &self,
        method: &str,
        path: &str,
        body: Option<&Value>,
    ) -> io::Result<ApiResponse> {
        let mut s = TcpStream::connect_timeout(&self.addr, Duration::from_secs(3))?;
        // Rotations answer when they finish: up to minutes.
        s.set_read_timeout(Some(Duration::from_secs(300)))?;
        s.set_write_timeout(Some(Duration::from_secs(10)))?;
        let body = body.map(|b| b.to_string()).unwrap_or_default();
        let mut req = format!(
            "{method} {path} HTTP/1.1\r\nHost: {}\r\nConnection: close\r\nAccept: application/json\r\n",
            self.addr
        );
        if let Some(t) = &self.token {
            req.push_str(&format!("Authorization: Bearer {t}\r\n"));
        }
        if !body.is_empty() || method == "POST" {
            req.push_str(&format!(
                "Content-Type: application/json\r\nContent-Length: {}\r\n",
                body.len()
            ));
        }
        req.push_str("\r\n");
        req.push_str(&body);
        s.write_all(req.as_bytes())?;
        let mut raw = Vec::new();
        s.read_to_end(&mut raw)?;
        ApiResponse::parse(&raw).ok_or_else(|| {
            io::Error::new(
                io::ErrorKind::InvalidData,
                format!("no HTTP response: {:?}", String::from_utf8_lossy(&raw)),
            )
        })
    }

    pub fn request(&self, method: &str, path: &str, body: Option<&Value>) -> ApiResponse {
        self.try_request(method, path, body)
            .unwrap_or_else(|e| panic!("API {method} {path} on {}: {e}", self.addr))
    }

    pub fn get(&self, path: &str) -> ApiResponse {
        self.request("GET", path, None)
    }

    pub fn post(&self, path: &str, body: Option<&Value>) -> ApiResponse {
        self.request("POST", path, body)
    }

    pub fn delete(&self, path: &str) -> ApiResponse {
        self.request("DELETE", path, None)
    }

    /// `GET /api/v1/devices`, asserting success.
    pub fn devices(&self) -> Vec<Value> {
        let r = self.get("/api/v1/devices");
        assert_eq!(r.status, 200, "GET /api/v1/devices: {}", r.text());
        match r.json() {
            Value::Array(v) => v,
            other => panic!("devices is not an array: {other}"),
        }
    }

    /// One device from the list, if present.
    pub fn device(&self, id: &str) -> Option<Value> {
        self.devices()
            .into_iter()
            .find(|d| d["id"].as_str() == Some(id))
    }

    /// The device's `status` (online / offline / disabled), `None` if gone.
    pub fn device_status(&self, id: &str) -> Option<String> {
        self.device(id)
            .and_then(|d| d["status"].as_str().map(str::to_string))
    }

    /// `GET /health` succeeded with 200.
    pub fn healthy(&self) -> bool {
        Api::new(self.addr, None)
            .try_request("GET", "/health", None)
            .is_ok_and(|r| r.status == 200)
    }
}
