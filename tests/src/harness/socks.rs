//! A raw SOCKS5 client (RFC 1928 + RFC 1929) that reports every byte the
//! server answered, for the cases curl hides (method 0xFF, the RFC 1929
//! status byte, reply codes).

use std::io::{Read, Write};
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use super::api::read_until_closed;

/// `DST.ADDR` + `DST.PORT` of a request.
#[derive(Debug, Clone)]
pub enum SocksTarget {
    V4(Ipv4Addr, u16),
    V6(Ipv6Addr, u16),
    Domain(String, u16),
}

impl SocksTarget {
    /// `ATYP DST.ADDR DST.PORT`.
    pub fn encode(&self) -> Vec<u8> {
        let mut v = Vec::new();
        let port = match self {
            SocksTarget::V4(ip, p) => {
                v.push(0x01);
                v.extend_from_slice(&ip.octets());
                p
            }
            SocksTarget::V6(ip, p) => {
                v.push(0x04);
                v.extend_from_slice(&ip.octets());
                p
            }
            SocksTarget::Domain(d, p) => {
                v.push(0x03);
                v.push(u8::try_from(d.len()).expect("domain longer than 255"));
                v.extend_from_slice(d.as_bytes());
                p
            }
        };
        v.extend_from_slice(&port.to_be_bytes());
        v
    }
}

impl std::fmt::Display for SocksTarget {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            SocksTarget::V4(ip, p) => write!(f, "{ip}:{p}"),
            SocksTarget::V6(ip, p) => write!(f, "[{ip}]:{p}"),
            SocksTarget::Domain(d, p) => write!(f, "{d}:{p}"),
        }
    }
}

/// `VER NMETHODS METHODS`.
pub fn greeting(methods: &[u8]) -> Vec<u8> {
    let mut v = vec![0x05, methods.len() as u8];
    v.extend_from_slice(methods);
    v
}

/// `0x01 ULEN UNAME PLEN PASSWD`.
pub fn userpass(user: &[u8], pass: &[u8]) -> Vec<u8> {
    let mut v = vec![0x01, user.len() as u8];
    v.extend_from_slice(user);
    v.push(pass.len() as u8);
    v.extend_from_slice(pass);
    v
}

/// `VER CMD RSV` + target.
pub fn request(cmd: u8, target: &SocksTarget) -> Vec<u8> {
    let mut v = vec![0x05, cmd, 0x00];
    v.extend_from_slice(&target.encode());
    v
}

/// How far a SOCKS5 attempt got.
#[derive(Debug)]
pub struct SocksOutcome {
    /// The method the server chose (0x02 or 0xFF), if it answered.
    pub method: Option<u8>,
    /// RFC 1929 status (0 = success), if the server got that far.
    pub auth_status: Option<u8>,
    /// `REP` of the reply to the request, if any.
    pub reply: Option<u8>,
    /// After a refusal: the server closed the connection before the deadline.
    pub closed: bool,
    /// The connected stream on success (`reply == Some(0)`).
    pub stream: Option<TcpStream>,
}

fn read_exact_by(s: &mut TcpStream, buf: &mut [u8], deadline: Instant) -> bool {
    let mut got = 0;
    while got < buf.len() {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return false;
        }
        let _ = s.set_read_timeout(Some(left));
        match s.read(&mut buf[got..]) {
            Ok(0) | Err(_) => return false,
            Ok(n) => got += n,
        }
    }
    true
}

fn closes(s: &mut TcpStream, deadline: Instant) -> bool {
    let mut rest = Vec::new();
    let now = Instant::now();
    read_until_closed(s, &mut rest, now, deadline.saturating_duration_since(now)) && rest.is_empty()
}

/// Greeting offering username/password, authentication, then `cmd`
/// (0x01 CONNECT, 0x02 BIND, 0x03 UDP ASSOCIATE) to `target`; all within
/// `timeout`.
pub fn socks5_attempt(
    proxy: SocketAddr,
    user: &str,
    pass: &str,
    cmd: u8,
    target: &SocksTarget,
    timeout: Duration,
) -> SocksOutcome {
    let deadline = Instant::now() + timeout;
    let mut out = SocksOutcome {
        method: None,
        auth_status: None,
        reply: None,
        closed: false,
        stream: None,
    };
    let mut s = TcpStream::connect_timeout(&proxy, Duration::from_secs(5))
        .unwrap_or_else(|e| panic!("connect to SOCKS proxy {proxy}: {e}"));
    let _ = s.set_nodelay(true);
    let mut two = [0u8; 2];
    if s.write_all(&greeting(&[0x02])).is_err() || !read_exact_by(&mut s, &mut two, deadline) {
        out.closed = true;
        return out;
    }
    out.method = Some(two[1]);
    if two[1] != 0x02 {
        out.closed = closes(&mut s, deadline);
        return out;
    }
    if s.write_all(&userpass(user.as_bytes(), pass.as_bytes()))
        .is_err()
        || !read_exact_by(&mut s, &mut two, deadline)
    {
        out.closed = true;
        return out;
    }
    out.auth_status = Some(two[1]);
    if two[1] != 0x00 {
        out.closed = closes(&mut s, deadline);
        return out;
    }
    let mut head = [0u8; 4];
    if s.write_all(&request(cmd, target)).is_err() || !read_exact_by(&mut s, &mut head, deadline) {
        out.closed = true;
        return out;
    }
    out.reply = Some(head[1]);
    let rest = match head[3] {
        0x01 => 4 + 2,
        0x04 => 16 + 2,
        0x03 => {
            let mut l = [0u8; 1];
            if !read_exact_by(&mut s, &mut l, deadline) {
                out.closed = true;
                return out;
            }
            usize::from(l[0]) + 2
        }
        _ => 0,
    };
    let mut bound = vec![0u8; rest];
    if !read_exact_by(&mut s, &mut bound, deadline) {
        out.closed = true;
        return out;
    }
    if head[1] == 0x00 {
        let _ = s.set_read_timeout(None);
        out.stream = Some(s);
    } else {
        out.closed = closes(&mut s, deadline);
    }
    out
}
