//! SOCKS5 server-side handshake codec: RFC 1928 with RFC 1929
//! username/password authentication.
//!
//! The client sends three messages in order, each answered by the server
//! before the next one comes:
//!
//! 1. greeting (`VER NMETHODS METHODS…`) → method choice (`VER METHOD`)
//! 2. username/password (`0x01 ULEN UNAME PLEN PASSWD`) → status (`0x01 STATUS`)
//! 3. request (`VER CMD RSV ATYP DST.ADDR DST.PORT`) → reply
//!    (`VER REP RSV ATYP BND.ADDR BND.PORT`)
//!
//! Every `parse_*` function looks at the front of a buffer and returns the
//! message plus how many bytes it used, or `Ok(None)` when the message is not
//! complete yet. Bytes after the message are not touched: a client may
//! pipeline its next message (or even payload) right behind.
//!
//! Errors are reported as soon as the offending byte is in the buffer, so a
//! SOCKS4 client or a wrong address type is refused without waiting for bytes
//! that may never come.
//!
//! This module depends only on `shared`, `thiserror` and std, so the fuzz
//! targets can include it by path while the rest of the crate is in flux.

use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr};

use shared::target::TargetAddr;

/// The protocol version byte of every RFC 1928 message.
pub const VERSION: u8 = 5;
/// The version byte of the RFC 1929 sub-negotiation (not the SOCKS version).
pub const AUTH_VERSION: u8 = 0x01;

/// "No authentication required". Offered by most clients; never chosen,
/// because every cellgate customer is identified by username/password.
pub const METHOD_NONE: u8 = 0x00;
/// RFC 1929 username/password.
pub const METHOD_USERPASS: u8 = 0x02;
/// "No acceptable methods": the client must close after reading it.
pub const NO_ACCEPTABLE_METHOD: u8 = 0xFF;

/// Upper bound for one client handshake message, so the I/O layer can read
/// into a fixed buffer and never grow it on a peer's say-so.
///
/// The largest message is the RFC 1929 sub-negotiation with a 255-byte
/// username and a 255-byte password: 1 + 1 + 255 + 1 + 255 = 513 bytes. A
/// greeting is at most 2 + 255 = 257 and a request at most 4 + 1 + 255 + 2 =
/// 262. The two spare bytes keep the bound a round "header + 2 × 255 + port"
/// figure; nothing needs them.
pub const MAX_MESSAGE: usize = 515;

const ATYP_IPV4: u8 = 0x01;
const ATYP_DOMAIN: u8 = 0x03;
const ATYP_IPV6: u8 = 0x04;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SocksError {
    /// Includes SOCKS4 and SOCKS4a clients (version byte 4), and anything
    /// that is not SOCKS at all (an HTTP request on the SOCKS port).
    #[error("unsupported SOCKS version {0}")]
    UnsupportedVersion(u8),
    #[error("the greeting offers no authentication method")]
    NoMethods,
    #[error("unsupported username/password sub-negotiation version {0}")]
    BadAuthVersion(u8),
    #[error("unknown SOCKS command {0:#04x}")]
    UnknownCommand(u8),
    #[error("unsupported address type {0:#04x}")]
    UnsupportedAddressType(u8),
    /// Empty or invalid domain name, a numeric name that would dodge the
    /// IP-literal checks, or port 0.
    #[error("invalid target address")]
    BadAddress,
}

impl SocksError {
    /// The reply to send before closing when a request fails to parse;
    /// `None` means close without a reply (errors in the greeting and the
    /// sub-negotiation, where RFC 1928 has no reply message to send).
    ///
    /// A bad address gets `GeneralFailure` rather than `HostUnreachable`:
    /// nothing was tried, so claiming the host is unreachable would be a
    /// lie that invites clients to retry the same request elsewhere.
    pub fn reply(&self) -> Option<Reply> {
        match self {
            SocksError::UnknownCommand(_) => Some(Reply::CommandNotSupported),
            SocksError::UnsupportedAddressType(_) => Some(Reply::AddressTypeNotSupported),
            SocksError::BadAddress => Some(Reply::GeneralFailure),
            SocksError::UnsupportedVersion(_)
            | SocksError::NoMethods
            | SocksError::BadAuthVersion(_) => None,
        }
    }
}

/// The client's first message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Greeting {
    /// Offered methods in the client's order (1..=255 of them).
    pub methods: Vec<u8>,
}

/// RFC 1929 credentials, as raw bytes: RFC 1929 says nothing about their
/// encoding, and the auth layer decides what to accept (empty ones too).
#[derive(Clone, PartialEq, Eq)]
pub struct UserPass {
    pub username: Vec<u8>,
    pub password: Vec<u8>,
}

impl std::fmt::Debug for UserPass {
    // The password must never reach a log line through `{:?}`.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("UserPass")
            .field("username", &String::from_utf8_lossy(&self.username))
            .field("password", &"***")
            .finish()
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Command {
    Connect,
    Bind,
    UdpAssociate,
}

impl Command {
    pub fn code(self) -> u8 {
        match self {
            Command::Connect => 0x01,
            Command::Bind => 0x02,
            Command::UdpAssociate => 0x03,
        }
    }

    fn from_code(code: u8) -> Result<Self, SocksError> {
        match code {
            0x01 => Ok(Command::Connect),
            0x02 => Ok(Command::Bind),
            0x03 => Ok(Command::UdpAssociate),
            other => Err(SocksError::UnknownCommand(other)),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request {
    /// Parsed even when cellgate does not serve it (BIND), so the caller
    /// answers `CommandNotSupported` with a proper reply.
    pub command: Command,
    /// For UDP ASSOCIATE this is where the client will send from, often
    /// all zeros; see RFC 1928 §7.
    pub target: TargetAddr,
}

/// RFC 1928 reply codes (the `REP` field).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Reply {
    Succeeded = 0,
    GeneralFailure = 1,
    NotAllowed = 2,
    NetworkUnreachable = 3,
    HostUnreachable = 4,
    ConnectionRefused = 5,
    TtlExpired = 6,
    CommandNotSupported = 7,
    AddressTypeNotSupported = 8,
}

/// Parse the greeting (`VER NMETHODS METHODS…`).
pub fn parse_greeting(buf: &[u8]) -> Result<Option<(Greeting, usize)>, SocksError> {
    let Some(&ver) = buf.first() else {
        return Ok(None);
    };
    if ver != VERSION {
        return Err(SocksError::UnsupportedVersion(ver));
    }
    let Some(&n) = buf.get(1) else {
        return Ok(None);
    };
    if n == 0 {
        return Err(SocksError::NoMethods);
    }
    let end = 2 + usize::from(n);
    let Some(methods) = buf.get(2..end) else {
        return Ok(None);
    };
    Ok(Some((
        Greeting {
            methods: methods.to_vec(),
        },
        end,
    )))
}

/// The method the server answers with. Username/password is required even
/// when the client also offers "no authentication": an open SOCKS port
/// would be an open proxy.
pub fn select_method(greeting: &Greeting) -> u8 {
    select_method_for(greeting, false)
}

/// Like [`select_method`], but also accepts NO-AUTH when `source_allowed`
/// (the client's address is allow-listed). Credentials still win when the
/// client offers both.
pub fn select_method_for(greeting: &Greeting, source_allowed: bool) -> u8 {
    if greeting.methods.contains(&METHOD_USERPASS) {
        METHOD_USERPASS
    } else if source_allowed && greeting.methods.contains(&METHOD_NONE) {
        METHOD_NONE
    } else {
        NO_ACCEPTABLE_METHOD
    }
}

pub fn encode_method_choice(method: u8) -> [u8; 2] {
    [VERSION, method]
}

/// Parse the RFC 1929 sub-negotiation (`0x01 ULEN UNAME PLEN PASSWD`).
pub fn parse_userpass(buf: &[u8]) -> Result<Option<(UserPass, usize)>, SocksError> {
    let Some(&ver) = buf.first() else {
        return Ok(None);
    };
    if ver != AUTH_VERSION {
        return Err(SocksError::BadAuthVersion(ver));
    }
    let Some((username, rest)) = length_prefixed(&buf[1..]) else {
        return Ok(None);
    };
    let Some((password, _)) = length_prefixed(rest) else {
        return Ok(None);
    };
    let used = 1 + 1 + username.len() + 1 + password.len();
    Ok(Some((
        UserPass {
            username: username.to_vec(),
            password: password.to_vec(),
        },
        used,
    )))
}

/// `0x01 0x00` on success; any other status tells the client to close.
pub fn encode_auth_status(success: bool) -> [u8; 2] {
    [AUTH_VERSION, if success { 0x00 } else { 0x01 }]
}

/// Parse a request (`VER CMD RSV ATYP DST.ADDR DST.PORT`).
///
/// `RSV` is not checked: RFC 1928 says it is reserved and clients send 0,
/// but refusing a client for a byte with no meaning gains nothing.
pub fn parse_request(buf: &[u8]) -> Result<Option<(Request, usize)>, SocksError> {
    let Some(&ver) = buf.first() else {
        return Ok(None);
    };
    if ver != VERSION {
        return Err(SocksError::UnsupportedVersion(ver));
    }
    let Some(&cmd) = buf.get(1) else {
        return Ok(None);
    };
    let command = Command::from_code(cmd)?;
    let Some(&atyp) = buf.get(3) else {
        return Ok(None);
    };
    let addr = &buf[4..];
    let (target, addr_len) = match atyp {
        ATYP_IPV4 => {
            let Some((ip, port)) = fixed_addr::<4>(addr) else {
                return Ok(None);
            };
            let ip = Ipv4Addr::from(ip);
            (
                TargetAddr::Ip(SocketAddr::new(ip.into(), nonzero(port)?)),
                4 + 2,
            )
        }
        ATYP_IPV6 => {
            let Some((ip, port)) = fixed_addr::<16>(addr) else {
                return Ok(None);
            };
            let ip = Ipv6Addr::from(ip);
            (
                TargetAddr::Ip(SocketAddr::new(ip.into(), nonzero(port)?)),
                16 + 2,
            )
        }
        ATYP_DOMAIN => {
            let Some(&len) = addr.first() else {
                return Ok(None);
            };
            if len == 0 {
                return Err(SocksError::BadAddress);
            }
            let Some((name, _)) = length_prefixed(addr) else {
                return Ok(None);
            };
            let Some(port) = addr.get(1 + name.len()..1 + name.len() + 2) else {
                return Ok(None);
            };
            let port = nonzero(u16::from_be_bytes([port[0], port[1]]))?;
            let name = std::str::from_utf8(name).map_err(|_| SocksError::BadAddress)?;
            // Same rules as the HTTP proxy: IP literals become `Ip` so the
            // deny list sees them, numeric names that resolvers read as IPv4
            // are refused.
            let target =
                TargetAddr::from_host_port(name, port).map_err(|_| SocksError::BadAddress)?;
            (target, 1 + name.len() + 2)
        }
        other => return Err(SocksError::UnsupportedAddressType(other)),
    };
    Ok(Some((Request { command, target }, 4 + addr_len)))
}

/// Encode a reply. `bound` is the address the server bound for the client
/// (`BND.ADDR`/`BND.PORT`); cellgate has no meaningful one for CONNECT over a
/// tunnel, and `None` sends `0.0.0.0:0`, which clients accept.
pub fn encode_reply(reply: Reply, bound: Option<SocketAddr>) -> Vec<u8> {
    let bound = bound.unwrap_or_else(|| SocketAddr::from((Ipv4Addr::UNSPECIFIED, 0)));
    let mut out = Vec::with_capacity(4 + 16 + 2);
    out.extend_from_slice(&[VERSION, reply as u8, 0x00]);
    match bound {
        SocketAddr::V4(a) => {
            out.push(ATYP_IPV4);
            out.extend_from_slice(&a.ip().octets());
        }
        SocketAddr::V6(a) => {
            out.push(ATYP_IPV6);
            out.extend_from_slice(&a.ip().octets());
        }
    }
    out.extend_from_slice(&bound.port().to_be_bytes());
    out
}

/// `LEN` then `LEN` bytes: the field and what follows it, or `None` if the
/// buffer ends first.
fn length_prefixed(buf: &[u8]) -> Option<(&[u8], &[u8])> {
    let (&len, rest) = buf.split_first()?;
    let len = usize::from(len);
    (rest.len() >= len).then(|| rest.split_at(len))
}

/// An `N`-byte address followed by a big-endian port.
fn fixed_addr<const N: usize>(buf: &[u8]) -> Option<([u8; N], u16)> {
    let ip: [u8; N] = buf.get(..N)?.try_into().ok()?;
    let port = buf.get(N..N + 2)?;
    Some((ip, u16::from_be_bytes([port[0], port[1]])))
}

fn nonzero(port: u16) -> Result<u16, SocksError> {
    if port == 0 {
        Err(SocksError::BadAddress)
    } else {
        Ok(port)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// The client side of a request, for round trips. Panics on a domain
    /// over 255 bytes, which the strategies never produce.
    fn encode_request(command: Command, target: &TargetAddr) -> Vec<u8> {
        let mut out = vec![VERSION, command.code(), 0x00];
        match target {
            TargetAddr::Ip(SocketAddr::V4(a)) => {
                out.push(ATYP_IPV4);
                out.extend_from_slice(&a.ip().octets());
            }
            TargetAddr::Ip(SocketAddr::V6(a)) => {
                out.push(ATYP_IPV6);
                out.extend_from_slice(&a.ip().octets());
            }
            TargetAddr::Domain(d, _) => {
                out.push(ATYP_DOMAIN);
                out.push(u8::try_from(d.len()).expect("domain fits a length byte"));
                out.extend_from_slice(d.as_bytes());
            }
        }
        out.extend_from_slice(&target.port().to_be_bytes());
        out
    }

    fn domain_request(cmd: u8, name: &[u8], port: u16) -> Vec<u8> {
        let mut out = vec![VERSION, cmd, 0x00, ATYP_DOMAIN, name.len() as u8];
        out.extend_from_slice(name);
        out.extend_from_slice(&port.to_be_bytes());
        out
    }

    fn userpass(user: &[u8], pass: &[u8]) -> Vec<u8> {
        let mut out = vec![AUTH_VERSION, user.len() as u8];
        out.extend_from_slice(user);
        out.push(pass.len() as u8);
        out.extend_from_slice(pass);
        out
    }

    /// Every proper prefix of a complete message is "incomplete", and the
    /// full message (with trailing bytes) consumes exactly its own length.
    fn assert_prefixes_incomplete<T: std::fmt::Debug>(
        msg: &[u8],
        parse: impl Fn(&[u8]) -> Result<Option<(T, usize)>, SocksError>,
    ) {
        for cut in 0..msg.len() {
            assert!(
                matches!(parse(&msg[..cut]), Ok(None)),
                "prefix {cut} of {msg:02x?}"
            );
        }
        let mut with_tail = msg.to_vec();
        with_tail.extend_from_slice(b"\x05tail");
        let (_, used) = parse(&with_tail).unwrap().unwrap();
        assert_eq!(used, msg.len());
    }

    #[test]
    fn greetings() {
        type Want = Result<Option<(Vec<u8>, usize)>, SocksError>;
        let cases: &[(&[u8], Want)] = &[
            (b"", Ok(None)),
            (b"\x05", Ok(None)),
            (b"\x05\x01", Ok(None)),
            (b"\x05\x01\x02", Ok(Some((vec![2], 3)))),
            (b"\x05\x02\x00\x02", Ok(Some((vec![0, 2], 4)))),
            (b"\x05\x03\x00\x01\x02tail", Ok(Some((vec![0, 1, 2], 5)))),
            (b"\x05\x00", Err(SocksError::NoMethods)),
            (b"\x04\x01\x00\x50", Err(SocksError::UnsupportedVersion(4))),
            (b"\x04", Err(SocksError::UnsupportedVersion(4))),
            (
                b"GET / HTTP/1.1\r\n",
                Err(SocksError::UnsupportedVersion(b'G')),
            ),
        ];
        for (input, want) in cases {
            let got = parse_greeting(input).map(|o| o.map(|(g, n)| (g.methods, n)));
            assert_eq!(&got, want, "{input:02x?}");
        }
        let mut all = vec![VERSION, 255];
        all.extend(0..=254u8);
        let (g, n) = parse_greeting(&all).unwrap().unwrap();
        assert_eq!((g.methods.len(), n), (255, 257));
        assert_prefixes_incomplete(&all, parse_greeting);
    }

    #[test]
    fn socks4_and_4a_are_refused() {
        // SOCKS4 CONNECT 1.2.3.4:80 and SOCKS4a CONNECT example.com:80.
        let v4 = b"\x04\x01\x00\x50\x01\x02\x03\x04user\x00";
        let v4a = b"\x04\x01\x00\x50\x00\x00\x00\x01user\x00example.com\x00";
        for msg in [&v4[..], &v4a[..]] {
            assert_eq!(parse_greeting(msg), Err(SocksError::UnsupportedVersion(4)));
            assert_eq!(parse_request(msg), Err(SocksError::UnsupportedVersion(4)));
            assert_eq!(SocksError::UnsupportedVersion(4).reply(), None);
        }
    }

    #[test]
    fn method_selection_requires_userpass() {
        let cases: &[(&[u8], u8)] = &[
            (&[METHOD_NONE], NO_ACCEPTABLE_METHOD),
            (&[METHOD_NONE, METHOD_USERPASS], METHOD_USERPASS),
            (&[METHOD_USERPASS, METHOD_NONE], METHOD_USERPASS),
            (&[0x01], NO_ACCEPTABLE_METHOD),
            (&[0x01, 0x03, 0x80, 0xFE], NO_ACCEPTABLE_METHOD),
            (&[0xFF, 0x02], METHOD_USERPASS),
        ];
        for (methods, want) in cases {
            let g = Greeting {
                methods: methods.to_vec(),
            };
            assert_eq!(select_method(&g), *want, "{methods:02x?}");
        }
        let g = |m: &[u8]| Greeting {
            methods: m.to_vec(),
        };
        assert_eq!(select_method_for(&g(&[METHOD_NONE]), true), METHOD_NONE);
        assert_eq!(
            select_method_for(&g(&[METHOD_NONE]), false),
            NO_ACCEPTABLE_METHOD
        );
        assert_eq!(
            select_method_for(&g(&[METHOD_NONE, METHOD_USERPASS]), true),
            METHOD_USERPASS
        );
        assert_eq!(select_method_for(&g(&[0x01]), true), NO_ACCEPTABLE_METHOD);
        assert_eq!(encode_method_choice(METHOD_USERPASS), [5, 2]);
        assert_eq!(encode_method_choice(NO_ACCEPTABLE_METHOD), [5, 0xFF]);
    }

    #[test]
    fn userpass_edges() {
        let long = [b'u'; 255];
        let cases: &[(&[u8], &[u8])] = &[
            (b"", b""),
            (b"", b"pw"),
            (b"user", b""),
            (b"alice-session-x7k2", b"s3cr:et"),
            (&long, &long),
            (b"nul\0inside", b"\xff\xfe not utf-8"),
        ];
        for (user, pass) in cases {
            let msg = userpass(user, pass);
            assert!(msg.len() <= MAX_MESSAGE);
            let (up, n) = parse_userpass(&msg).unwrap().unwrap();
            assert_eq!(
                (&up.username[..], &up.password[..], n),
                (*user, *pass, msg.len())
            );
            assert_prefixes_incomplete(&msg, parse_userpass);
        }
        assert_eq!(
            parse_userpass(b"\x05\x01\x02"),
            Err(SocksError::BadAuthVersion(5))
        );
        // ULEN claims more than is there: incomplete, not a panic.
        assert_eq!(parse_userpass(b"\x01\xffabc"), Ok(None));
        assert_eq!(parse_userpass(b"\x01\x01a\xffabc"), Ok(None));
        assert_eq!(encode_auth_status(true), [1, 0]);
        assert_eq!(encode_auth_status(false), [1, 1]);
        let shown = format!("{:?}", parse_userpass(&userpass(b"u", b"hunter2")));
        assert!(!shown.contains("hunter2"), "{shown}");
    }

    #[test]
    fn requests() {
        type Want = Result<Option<(Command, TargetAddr, usize)>, SocksError>;
        let ip = |s: &str| TargetAddr::Ip(s.parse().unwrap());
        let dom = |s: &str, p| TargetAddr::Domain(s.into(), p);
        let valid_255 = {
            // 4 labels of 63 + 3 dots = 255: one over the DNS limit.
            let label = "a".repeat(63);
            [label.as_str(); 4].join(".")
        };
        let valid_253 = valid_255[2..].to_string();
        let cases: Vec<(Vec<u8>, Want)> = vec![
            (
                b"\x05\x01\x00\x01\x7f\x00\x00\x01\x00\x50".to_vec(),
                Ok(Some((Command::Connect, ip("127.0.0.1:80"), 10))),
            ),
            (
                b"\x05\x01\x00\x04\0\0\0\0\0\0\0\0\0\0\xff\xff\x7f\0\0\x01\x01\xbb".to_vec(),
                Ok(Some((Command::Connect, ip("[::ffff:127.0.0.1]:443"), 22))),
            ),
            (
                domain_request(1, b"Example.COM", 443),
                Ok(Some((Command::Connect, dom("example.com", 443), 18))),
            ),
            (
                domain_request(2, b"example.com", 21),
                Ok(Some((Command::Bind, dom("example.com", 21), 18))),
            ),
            (
                domain_request(3, b"10.0.0.1", 53),
                Ok(Some((Command::UdpAssociate, ip("10.0.0.1:53"), 15))),
            ),
            (
                b"\x05\x03\x00\x01\0\0\0\0\x10\x00".to_vec(),
                Ok(Some((Command::UdpAssociate, ip("0.0.0.0:4096"), 10))),
            ),
            (
                domain_request(1, valid_253.as_bytes(), 80),
                Ok(Some((Command::Connect, dom(&valid_253, 80), 260))),
            ),
            (
                domain_request(1, valid_255.as_bytes(), 80),
                Err(SocksError::BadAddress),
            ),
            (domain_request(1, b"", 80), Err(SocksError::BadAddress)),
            (
                b"\x05\x01\x00\x03\x00".to_vec(),
                Err(SocksError::BadAddress),
            ),
            (
                domain_request(1, b"2130706433", 80),
                Err(SocksError::BadAddress),
            ),
            (domain_request(1, b"127.1", 80), Err(SocksError::BadAddress)),
            (
                domain_request(1, b"exa mple.com", 80),
                Err(SocksError::BadAddress),
            ),
            (
                domain_request(1, b"\xc3\x28.com", 80),
                Err(SocksError::BadAddress),
            ),
            (
                domain_request(1, b"example.com", 0),
                Err(SocksError::BadAddress),
            ),
            (
                b"\x05\x01\x00\x01\x01\x02\x03\x04\x00\x00".to_vec(),
                Err(SocksError::BadAddress),
            ),
            // Length byte says 255 but only three bytes follow.
            (b"\x05\x01\x00\x03\xffabc".to_vec(), Ok(None)),
            (
                b"\x05\x01\x00\x02\x01\x02".to_vec(),
                Err(SocksError::UnsupportedAddressType(2)),
            ),
            (
                b"\x05\x01\x00\x05".to_vec(),
                Err(SocksError::UnsupportedAddressType(5)),
            ),
            (
                b"\x05\x04\x00\x01".to_vec(),
                Err(SocksError::UnknownCommand(4)),
            ),
            (b"\x05\x00".to_vec(), Err(SocksError::UnknownCommand(0))),
            (b"\x04\x01".to_vec(), Err(SocksError::UnsupportedVersion(4))),
            // RSV is ignored.
            (
                b"\x05\x01\x07\x01\x01\x02\x03\x04\x00\x50".to_vec(),
                Ok(Some((Command::Connect, ip("1.2.3.4:80"), 10))),
            ),
        ];
        for (input, want) in cases {
            let got = parse_request(&input).map(|o| o.map(|(r, n)| (r.command, r.target, n)));
            assert_eq!(got, want, "{input:02x?}");
            if let Ok(Some(_)) = want {
                assert_prefixes_incomplete(&input, parse_request);
            }
        }
    }

    #[test]
    fn error_replies() {
        let cases = [
            (
                SocksError::UnknownCommand(9),
                Some(Reply::CommandNotSupported),
            ),
            (
                SocksError::UnsupportedAddressType(2),
                Some(Reply::AddressTypeNotSupported),
            ),
            (SocksError::BadAddress, Some(Reply::GeneralFailure)),
            (SocksError::UnsupportedVersion(4), None),
            (SocksError::NoMethods, None),
            (SocksError::BadAuthVersion(0), None),
        ];
        for (err, want) in cases {
            assert_eq!(err.reply(), want, "{err}");
        }
    }

    #[test]
    fn replies() {
        assert_eq!(
            encode_reply(Reply::Succeeded, None),
            [5, 0, 0, 1, 0, 0, 0, 0, 0, 0]
        );
        assert_eq!(
            encode_reply(
                Reply::CommandNotSupported,
                Some("10.1.2.3:1080".parse().unwrap())
            ),
            [5, 7, 0, 1, 10, 1, 2, 3, 0x04, 0x38]
        );
        let v6 = encode_reply(Reply::HostUnreachable, Some("[::1]:443".parse().unwrap()));
        assert_eq!(&v6[..4], [5, 4, 0, 4]);
        assert_eq!(v6.len(), 22);
        assert_eq!(&v6[19..], [1, 1, 0xbb]);
        assert_eq!(Reply::AddressTypeNotSupported as u8, 8);
    }

    #[test]
    fn largest_messages_fit_the_bound() {
        let mut greeting = vec![VERSION, 255];
        greeting.extend([0u8; 255]);
        let auth = userpass(&[b'a'; 255], &[b'b'; 255]);
        let request = domain_request(1, &[b'a'; 255], 80);
        for msg in [greeting, auth, request] {
            assert!(msg.len() <= MAX_MESSAGE, "{}", msg.len());
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

    /// A request up to its address type, then a length byte and tail of any
    /// size: the shape that reaches the length arithmetic.
    fn structured_request() -> impl Strategy<Value = Vec<u8>> {
        (
            prop_oneof![Just(5u8), any::<u8>()],
            prop_oneof![1..=3u8, any::<u8>()],
            any::<u8>(),
            prop_oneof![
                Just(ATYP_DOMAIN),
                Just(ATYP_IPV4),
                Just(ATYP_IPV6),
                any::<u8>()
            ],
            any::<u8>(),
            proptest::collection::vec(any::<u8>(), 0..300),
        )
            .prop_map(|(v, c, r, a, len, tail)| {
                let mut out = vec![v, c, r, a, len];
                out.extend(tail);
                out
            })
    }

    fn structured_userpass() -> impl Strategy<Value = Vec<u8>> {
        (
            any::<u8>(),
            proptest::collection::vec(any::<u8>(), 0..260),
            any::<u8>(),
            proptest::collection::vec(any::<u8>(), 0..260),
        )
            .prop_map(|(ulen, user, plen, pass)| {
                let mut out = vec![AUTH_VERSION, ulen];
                out.extend(user);
                out.push(plen);
                out.extend(pass);
                out
            })
    }

    /// Runs every parser and checks the accounting invariants.
    fn check_all_parsers(buf: &[u8]) {
        if let Ok(Some((g, n))) = parse_greeting(buf) {
            assert!(n <= buf.len());
            assert_eq!(n, 2 + g.methods.len());
        }
        if let Ok(Some((up, n))) = parse_userpass(buf) {
            assert!(n <= buf.len() && n <= MAX_MESSAGE);
            assert_eq!(n, 3 + up.username.len() + up.password.len());
        }
        match parse_request(buf) {
            Ok(Some((r, n))) => {
                assert!(n <= buf.len() && n <= MAX_MESSAGE);
                assert_ne!(r.target.port(), 0);
                // What was parsed re-parses the same from its own bytes.
                let again = parse_request(&buf[..n]).unwrap().unwrap();
                assert_eq!(again, (r, n));
            }
            Ok(None) => assert!(buf.len() < 4 + 1 + 255 + 2),
            Err(_) => {}
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(2_000))]

        #[test]
        fn arbitrary_bytes_never_panic(buf in proptest::collection::vec(any::<u8>(), 0..600)) {
            check_all_parsers(&buf);
        }

        #[test]
        fn structured_requests(buf in structured_request()) {
            check_all_parsers(&buf);
            // A well-formed domain request is complete exactly when the
            // length byte's worth of name and two port bytes are present.
            if buf[0] == VERSION && (1..=3).contains(&buf[1]) && buf[3] == ATYP_DOMAIN && buf[4] > 0 {
                let need = 5 + usize::from(buf[4]) + 2;
                match parse_request(&buf) {
                    Ok(None) => prop_assert!(buf.len() < need),
                    Ok(Some((_, n))) => prop_assert_eq!(n, need),
                    Err(e) => prop_assert_eq!(e, SocksError::BadAddress),
                }
            }
        }

        #[test]
        fn structured_userpass_accounting(buf in structured_userpass()) {
            check_all_parsers(&buf);
            let ulen = usize::from(buf[1]);
            let complete = buf.len() > 2 + ulen && buf.len() >= 3 + ulen + usize::from(buf[2 + ulen]);
            prop_assert_eq!(parse_userpass(&buf).unwrap().is_some(), complete);
        }

        #[test]
        fn request_round_trip(
            target in target_strategy(),
            cmd in prop_oneof![Just(Command::Connect), Just(Command::Bind), Just(Command::UdpAssociate)],
            tail in proptest::collection::vec(any::<u8>(), 0..8),
        ) {
            let mut bytes = encode_request(cmd, &target);
            let len = bytes.len();
            bytes.extend(&tail);
            let (req, n) = parse_request(&bytes).unwrap().unwrap();
            prop_assert_eq!(n, len);
            prop_assert_eq!(req, Request { command: cmd, target });
            for cut in 0..len {
                prop_assert_eq!(parse_request(&bytes[..cut]), Ok(None));
            }
        }

        #[test]
        fn reply_round_trip(
            code in 0u8..=8,
            // The reply has no room for IPv6 flow labels and scope ids.
            bound in proptest::option::of(any::<SocketAddr>().prop_map(|a| SocketAddr::new(a.ip(), a.port()))),
        ) {
            let reply = [
                Reply::Succeeded, Reply::GeneralFailure, Reply::NotAllowed,
                Reply::NetworkUnreachable, Reply::HostUnreachable, Reply::ConnectionRefused,
                Reply::TtlExpired, Reply::CommandNotSupported, Reply::AddressTypeNotSupported,
            ][usize::from(code)];
            let bytes = encode_reply(reply, bound);
            prop_assert_eq!(bytes[1], code);
            // A reply has the request's layout, so the request parser
            // reads its address back (port 0 is the only thing it refuses).
            let mut as_request = bytes.clone();
            as_request[1] = Command::Connect.code();
            let want = bound.unwrap_or_else(|| SocketAddr::from((Ipv4Addr::UNSPECIFIED, 0)));
            match parse_request(&as_request) {
                Ok(Some((r, n))) => {
                    prop_assert_eq!(n, bytes.len());
                    prop_assert_eq!(r.target, TargetAddr::Ip(want));
                }
                other => {
                    prop_assert_eq!(other, Err(SocksError::BadAddress));
                    prop_assert_eq!(want.port(), 0);
                }
            }
        }

        #[test]
        fn userpass_round_trip(
            user in proptest::collection::vec(any::<u8>(), 0..=255),
            pass in proptest::collection::vec(any::<u8>(), 0..=255),
        ) {
            let bytes = userpass(&user, &pass);
            let (up, n) = parse_userpass(&bytes).unwrap().unwrap();
            prop_assert_eq!(n, bytes.len());
            prop_assert_eq!(up, UserPass { username: user, password: pass });
        }
    }
}
