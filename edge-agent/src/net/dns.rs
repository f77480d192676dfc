//! DNS through one uplink.
//!
//! A customer's name must be resolved through the same modem its
//! connection leaves by: a resolver reached through another uplink (or the
//! host's `127.0.0.53` stub) gives answers for the wrong network and leaks
//! the lookup. This module has two layers:
//!
//! - a pure message codec ([`encode_query`], [`decode_response`],
//!   [`decode_query`]): no I/O, bounded work on any input, malformed input is
//!   an error and never a panic;
//! - a [`Resolver`] that sends A and AAAA queries over UDP sockets bound to
//!   the exit's interface (TCP when an answer comes back truncated).
//!
//! A resolver without an interface and without nameservers is the host's
//! own resolver (`tokio::net::lookup_host`, which honours `/etc/hosts` and
//! nsswitch), exactly as single-uplink agents always resolved.
//!
//! **Nameservers for an exit with an interface.** The host's
//! `/etc/resolv.conf` often names `127.0.0.53` (systemd-resolved) or
//! another loopback stub; a loopback address cannot be reached through a
//! modem interface. Such an exit needs `dns = [...]` nameservers that are
//! reachable through its uplink (the carrier's, or a public resolver).

use std::collections::HashMap;
use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::time::Instant;
use tracing::debug;

use super::bind::{connect_tcp, udp_socket};

/// Fixed DNS header size.
pub const HEADER_LEN: usize = 12;
/// Longest name on the wire (RFC 1035 §2.3.4).
pub const MAX_NAME_WIRE_LEN: usize = 255;
/// Compression pointers followed while reading one name.
const MAX_POINTER_HOPS: usize = 64;
/// Answer records looked at; the rest of a huge answer is ignored, so the
/// work per message stays small whatever the counts in the header say.
pub const MAX_RECORDS: usize = 256;
/// Addresses kept from one answer.
pub const MAX_ADDRS: usize = 64;
/// Largest message accepted (TCP length prefix maximum).
pub const MAX_MESSAGE: usize = 65535;
/// Default overall time for one [`Resolver::lookup`].
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(5);

const CLASS_IN: u16 = 1;
const TYPE_A: u16 = 1;
const TYPE_CNAME: u16 = 5;
const TYPE_AAAA: u16 = 28;

const FLAG_QR: u16 = 0x8000;
const FLAG_AA: u16 = 0x0400;
const FLAG_TC: u16 = 0x0200;
const FLAG_RD: u16 = 0x0100;
const FLAG_RA: u16 = 0x0080;

/// The record types the resolver asks for.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum QueryType {
    A,
    Aaaa,
}

impl QueryType {
    pub fn code(self) -> u16 {
        match self {
            QueryType::A => TYPE_A,
            QueryType::Aaaa => TYPE_AAAA,
        }
    }

    pub fn from_code(code: u16) -> Option<Self> {
        match code {
            TYPE_A => Some(QueryType::A),
            TYPE_AAAA => Some(QueryType::Aaaa),
            _ => None,
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum DnsError {
    #[error("{0:?} is not a valid host name")]
    InvalidName(String),
    #[error("malformed DNS message: {0}")]
    Malformed(&'static str),
    #[error("answer id does not match the query")]
    IdMismatch,
    #[error("answer is for a different question")]
    QuestionMismatch,
    #[error("no such domain (NXDOMAIN)")]
    NxDomain,
    #[error("nameserver failure (SERVFAIL)")]
    ServFail,
    #[error("nameserver refused the query (REFUSED)")]
    Refused,
    #[error("nameserver answered with error code {0}")]
    Rcode(u8),
}

/// The DNS header, decoded.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Header {
    pub id: u16,
    pub flags: u16,
    pub qdcount: u16,
    pub ancount: u16,
    pub nscount: u16,
    pub arcount: u16,
}

impl Header {
    pub fn decode(msg: &[u8]) -> Result<Self, DnsError> {
        let mut r = Reader::new(msg);
        Ok(Header {
            id: r.u16()?,
            flags: r.u16()?,
            qdcount: r.u16()?,
            ancount: r.u16()?,
            nscount: r.u16()?,
            arcount: r.u16()?,
        })
    }

    fn encode(&self, out: &mut Vec<u8>) {
        for v in [
            self.id,
            self.flags,
            self.qdcount,
            self.ancount,
            self.nscount,
            self.arcount,
        ] {
            out.extend_from_slice(&v.to_be_bytes());
        }
    }

    pub fn is_response(&self) -> bool {
        self.flags & FLAG_QR != 0
    }

    pub fn opcode(&self) -> u8 {
        ((self.flags >> 11) & 0xF) as u8
    }

    /// The TC bit: the answer did not fit and should be asked over TCP.
    pub fn truncated(&self) -> bool {
        self.flags & FLAG_TC != 0
    }

    pub fn rcode(&self) -> u8 {
        (self.flags & 0xF) as u8
    }
}

/// What a response said about the question.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Answer {
    /// Addresses of the asked type, for the name or the end of its CNAME
    /// chain, in answer order (at most [`MAX_ADDRS`]).
    pub addrs: Vec<IpAddr>,
    /// The CNAME chain followed from the question name, in order.
    pub cnames: Vec<String>,
    /// The TC bit was set: the answer may be incomplete.
    pub truncated: bool,
}

/// A decoded question (for responders in tests and tools).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Question {
    pub id: u16,
    /// Lower case, without the trailing dot.
    pub name: String,
    pub qtype: u16,
    pub qclass: u16,
}

/// Lower-case `name`, drop one trailing dot, and check it is a host name
/// that fits a DNS message.
pub fn normalize_name(name: &str) -> Result<String, DnsError> {
    let bad = || DnsError::InvalidName(name.chars().take(300).collect());
    let trimmed = name.strip_suffix('.').unwrap_or(name);
    if trimmed.is_empty() || trimmed.len() > MAX_NAME_WIRE_LEN - 2 {
        return Err(bad());
    }
    for label in trimmed.split('.') {
        let ok = !label.is_empty()
            && label.len() <= 63
            && label
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
        if !ok {
            return Err(bad());
        }
    }
    Ok(trimmed.to_ascii_lowercase())
}

/// A recursive query for `name`, type `qtype`, class IN.
pub fn encode_query(id: u16, name: &str, qtype: QueryType) -> Result<Vec<u8>, DnsError> {
    let name = normalize_name(name)?;
    let mut out = Vec::with_capacity(HEADER_LEN + name.len() + 6);
    Header {
        id,
        flags: FLAG_RD,
        qdcount: 1,
        ancount: 0,
        nscount: 0,
        arcount: 0,
    }
    .encode(&mut out);
    encode_name(&name, &mut out);
    out.extend_from_slice(&qtype.code().to_be_bytes());
    out.extend_from_slice(&CLASS_IN.to_be_bytes());
    Ok(out)
}

/// [`encode_query`] with a random id; returns the id to match the answer.
pub fn new_query(name: &str, qtype: QueryType) -> Result<(u16, Vec<u8>), DnsError> {
    let id: u16 = rand::random();
    Ok((id, encode_query(id, name, qtype)?))
}

/// `name` must be normalized.
fn encode_name(name: &str, out: &mut Vec<u8>) {
    for label in name.split('.') {
        out.push(label.len() as u8);
        out.extend_from_slice(label.as_bytes());
    }
    out.push(0);
}

/// Decode the response to the query (`id`, `name`, `qtype`).
///
/// A response with another id or question is [`DnsError::IdMismatch`] /
/// [`DnsError::QuestionMismatch`] (a late or forged datagram: keep
/// waiting). NXDOMAIN, SERVFAIL and REFUSED are distinct errors. A
/// response with no record of the asked type ("no data") is an empty
/// [`Answer`]. With the TC bit set, whatever records arrived whole are
/// returned and `truncated` is set.
pub fn decode_response(
    msg: &[u8],
    id: u16,
    name: &str,
    qtype: QueryType,
) -> Result<Answer, DnsError> {
    let header = Header::decode(msg)?;
    if !header.is_response() {
        return Err(DnsError::Malformed("not a response"));
    }
    if header.id != id {
        return Err(DnsError::IdMismatch);
    }
    if header.opcode() != 0 {
        return Err(DnsError::Malformed("unexpected opcode"));
    }
    let rcode_error = match header.rcode() {
        0 => None,
        3 => Some(DnsError::NxDomain),
        2 => Some(DnsError::ServFail),
        5 => Some(DnsError::Refused),
        n => Some(DnsError::Rcode(n)),
    };
    let qname = normalize_name(name)?;
    let mut pos = HEADER_LEN;
    match header.qdcount {
        // Some servers drop the question from error answers.
        0 => return Err(rcode_error.unwrap_or(DnsError::QuestionMismatch)),
        1 => {
            let (asked, end) = read_name(msg, pos)?;
            let mut r = Reader::at(msg, end);
            let (t, c) = (r.u16()?, r.u16()?);
            if asked != qname || t != qtype.code() || c != CLASS_IN {
                return Err(DnsError::QuestionMismatch);
            }
            pos = r.pos;
        }
        _ => return Err(DnsError::Malformed("more than one question")),
    }
    if let Some(e) = rcode_error {
        return Err(e);
    }
    let truncated = header.truncated();
    let mut records = Vec::new();
    for _ in 0..usize::from(header.ancount).min(MAX_RECORDS) {
        match read_record(msg, pos) {
            Ok((record, next)) => {
                pos = next;
                if let Some(record) = record {
                    records.push(record);
                }
            }
            // A truncated message may end inside a record.
            Err(_) if truncated => break,
            Err(e) => return Err(e),
        }
    }
    Ok(resolve_chain(&qname, qtype, &records, truncated))
}

/// Follow the CNAME chain from `qname` and keep the addresses of the names
/// on it. Loops in the chain end it.
fn resolve_chain(qname: &str, qtype: QueryType, records: &[Record], truncated: bool) -> Answer {
    let mut chain: Vec<&str> = vec![qname];
    while chain.len() <= records.len() {
        let last = chain[chain.len() - 1];
        let next = records.iter().find_map(|r| match r {
            Record::Cname { owner, target } if owner == last => Some(target.as_str()),
            _ => None,
        });
        match next {
            Some(target) if !chain.contains(&target) => chain.push(target),
            _ => break,
        }
    }
    let addrs = records
        .iter()
        .filter_map(|r| match (r, qtype) {
            (Record::A { owner, addr }, QueryType::A) if chain.contains(&owner.as_str()) => {
                Some(IpAddr::V4(*addr))
            }
            (Record::Aaaa { owner, addr }, QueryType::Aaaa) if chain.contains(&owner.as_str()) => {
                Some(IpAddr::V6(*addr))
            }
            _ => None,
        })
        .take(MAX_ADDRS)
        .collect();
    Answer {
        addrs,
        cnames: chain[1..].iter().map(|s| s.to_string()).collect(),
        truncated,
    }
}

/// Decode a query message (one question).
pub fn decode_query(msg: &[u8]) -> Result<Question, DnsError> {
    let header = Header::decode(msg)?;
    if header.is_response() {
        return Err(DnsError::Malformed("not a query"));
    }
    if header.qdcount != 1 {
        return Err(DnsError::Malformed("a query must have one question"));
    }
    let (name, end) = read_name(msg, HEADER_LEN)?;
    let mut r = Reader::at(msg, end);
    Ok(Question {
        id: header.id,
        name,
        qtype: r.u16()?,
        qclass: r.u16()?,
    })
}

#[derive(Debug)]
enum Record {
    A { owner: String, addr: Ipv4Addr },
    Aaaa { owner: String, addr: Ipv6Addr },
    Cname { owner: String, target: String },
}

/// One resource record at `pos`; `None` for records the resolver ignores.
fn read_record(msg: &[u8], pos: usize) -> Result<(Option<Record>, usize), DnsError> {
    let (owner, end) = read_name(msg, pos)?;
    let mut r = Reader::at(msg, end);
    let rtype = r.u16()?;
    let class = r.u16()?;
    let _ttl = r.u32()?;
    let rdlen = usize::from(r.u16()?);
    let rdata_start = r.pos;
    let rdata = r.take(rdlen)?;
    let next = r.pos;
    if class != CLASS_IN {
        return Ok((None, next));
    }
    let record = match rtype {
        TYPE_A => {
            let b: [u8; 4] = rdata
                .try_into()
                .map_err(|_| DnsError::Malformed("A record is not 4 bytes"))?;
            Some(Record::A {
                owner,
                addr: Ipv4Addr::from(b),
            })
        }
        TYPE_AAAA => {
            let b: [u8; 16] = rdata
                .try_into()
                .map_err(|_| DnsError::Malformed("AAAA record is not 16 bytes"))?;
            Some(Record::Aaaa {
                owner,
                addr: Ipv6Addr::from(b),
            })
        }
        TYPE_CNAME => {
            let (target, end) = read_name(msg, rdata_start)?;
            if end != next {
                return Err(DnsError::Malformed("CNAME target does not fill its record"));
            }
            Some(Record::Cname { owner, target })
        }
        _ => None,
    };
    Ok((record, next))
}

/// Read the (possibly compressed) name at `start`. Returns the name in
/// lower case without the trailing dot (the root is `""`), and the offset
/// right after the name where it started.
///
/// Terminates on any input: every pointer must go strictly before the
/// start of the labels it interrupts, at most [`MAX_POINTER_HOPS`] pointers
/// are followed, and a name longer than 255 bytes is an error. Bytes other
/// than letters, digits, `-` and `_` are written as `\DDD`, so they can
/// never make a name equal to a valid host name.
pub fn read_name(msg: &[u8], start: usize) -> Result<(String, usize), DnsError> {
    let truncated = DnsError::Malformed("name runs past the end of the message");
    let mut out = String::new();
    let mut pos = start;
    let mut segment_start = start;
    let mut end = None;
    let mut hops = 0;
    let mut wire_len = 0usize;
    loop {
        let len = *msg.get(pos).ok_or(truncated.clone())?;
        match len & 0xC0 {
            0x00 if len == 0 => {
                wire_len += 1;
                if wire_len > MAX_NAME_WIRE_LEN {
                    return Err(DnsError::Malformed("name longer than 255 bytes"));
                }
                return Ok((out, end.unwrap_or(pos + 1)));
            }
            0x00 => {
                let len = usize::from(len);
                let label = msg.get(pos + 1..pos + 1 + len).ok_or(truncated.clone())?;
                wire_len += 1 + len;
                if wire_len > MAX_NAME_WIRE_LEN {
                    return Err(DnsError::Malformed("name longer than 255 bytes"));
                }
                if !out.is_empty() {
                    out.push('.');
                }
                for &b in label {
                    if b.is_ascii_alphanumeric() || b == b'-' || b == b'_' {
                        out.push(b.to_ascii_lowercase() as char);
                    } else {
                        out.push_str(&format!("\\{b:03}"));
                    }
                }
                pos += 1 + len;
            }
            0xC0 => {
                let low = *msg.get(pos + 1).ok_or(truncated.clone())?;
                let target = (usize::from(len & 0x3F) << 8) | usize::from(low);
                if end.is_none() {
                    end = Some(pos + 2);
                }
                hops += 1;
                if hops > MAX_POINTER_HOPS {
                    return Err(DnsError::Malformed("too many compression pointers"));
                }
                if target >= segment_start {
                    return Err(DnsError::Malformed(
                        "compression pointer does not point back",
                    ));
                }
                pos = target;
                segment_start = target;
            }
            _ => return Err(DnsError::Malformed("unsupported label type")),
        }
    }
}

/// Bounds-checked big-endian reads.
struct Reader<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    fn new(buf: &'a [u8]) -> Self {
        Reader { buf, pos: 0 }
    }

    fn at(buf: &'a [u8], pos: usize) -> Self {
        Reader { buf, pos }
    }

    fn take(&mut self, n: usize) -> Result<&'a [u8], DnsError> {
        let end = self
            .pos
            .checked_add(n)
            .filter(|&e| e <= self.buf.len())
            .ok_or(DnsError::Malformed("message ends early"))?;
        let s = &self.buf[self.pos..end];
        self.pos = end;
        Ok(s)
    }

    fn u16(&mut self) -> Result<u16, DnsError> {
        let b = self.take(2)?;
        Ok(u16::from_be_bytes([b[0], b[1]]))
    }

    fn u32(&mut self) -> Result<u32, DnsError> {
        let b = self.take(4)?;
        Ok(u32::from_be_bytes([b[0], b[1], b[2], b[3]]))
    }
}

/// Nameservers from `resolv.conf` text: `nameserver ADDR` lines, port 53.
/// Comments (`#`, `;`) and other directives are ignored; an IPv6 zone
/// suffix (`%eth0`) is dropped.
pub fn parse_resolv_conf(text: &str) -> Vec<SocketAddr> {
    text.lines()
        .filter_map(|line| {
            let line = line.split(['#', ';']).next().unwrap_or("");
            let mut words = line.split_whitespace();
            if words.next() != Some("nameserver") {
                return None;
            }
            let addr = words.next()?;
            let addr = addr.split('%').next().unwrap_or(addr);
            addr.parse::<IpAddr>()
                .ok()
                .map(|ip| SocketAddr::new(ip, 53))
        })
        .collect()
}

/// Why a name could not be resolved; the text is what the customer's
/// refusal and the agent's log say.
fn resolve_error(kind: io::ErrorKind, text: String) -> io::Error {
    io::Error::new(kind, text)
}

/// Resolves host names, through one uplink when it has an interface.
#[derive(Clone, Debug)]
pub struct Resolver {
    /// Queried in order, each tried twice, round robin. Empty without an
    /// interface: the host's resolver answers.
    nameservers: Vec<SocketAddr>,
    /// The uplink the queries leave by.
    interface: Option<String>,
    /// For one whole [`Resolver::lookup`].
    timeout: Duration,
}

impl Resolver {
    /// Query `nameservers` through `interface`. With no nameservers and no
    /// interface this is the host's resolver.
    pub fn new(nameservers: Vec<SocketAddr>, interface: Option<&str>) -> Self {
        Resolver {
            nameservers,
            interface: interface.map(str::to_string),
            timeout: DEFAULT_TIMEOUT,
        }
    }

    /// The host's resolver for `None`; for an interface, the non-loopback
    /// nameservers of `/etc/resolv.conf` queried through it.
    pub fn from_system(interface: Option<&str>) -> io::Result<Self> {
        match interface {
            None => Ok(Self::new(Vec::new(), None)),
            Some(_) => {
                let text = std::fs::read_to_string("/etc/resolv.conf").map_err(|e| {
                    io::Error::new(e.kind(), format!("reading /etc/resolv.conf: {e}"))
                })?;
                Self::from_resolv_conf(&text, interface)
            }
        }
    }

    /// [`Resolver::from_system`] over given `resolv.conf` text.
    pub fn from_resolv_conf(text: &str, interface: Option<&str>) -> io::Result<Self> {
        let Some(iface) = interface else {
            return Ok(Self::new(Vec::new(), None));
        };
        let all = parse_resolv_conf(text);
        let (loopback, usable): (Vec<_>, Vec<_>) = all.iter().partition(|a| a.ip().is_loopback());
        if usable.is_empty() {
            let found = if loopback.is_empty() {
                "resolv.conf names no nameserver".to_string()
            } else {
                format!(
                    "resolv.conf only names loopback nameservers ({}), which cannot be \
                     reached through a modem interface",
                    join(&loopback)
                )
            };
            return Err(io::Error::new(
                io::ErrorKind::NotFound,
                format!(
                    "no nameserver for interface {iface}: {found}; an exit with an interface \
                     needs `dns = [...]` nameservers reachable through that uplink"
                ),
            ));
        }
        if !loopback.is_empty() {
            debug!(interface = iface, skipped = %join(&loopback), "loopback nameservers skipped");
        }
        Ok(Self::new(usable, interface))
    }

    /// Overall time for one lookup (default [`DEFAULT_TIMEOUT`]).
    pub fn with_timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    pub fn nameservers(&self) -> &[SocketAddr] {
        &self.nameservers
    }

    pub fn interface(&self) -> Option<&str> {
        self.interface.as_deref()
    }

    /// Addresses of `host` with `port`. IP literals and `localhost` are
    /// answered without a query. Through nameservers, A and AAAA are asked
    /// concurrently and IPv4 addresses come first; through the host's
    /// resolver the order is the system's, as it always was.
    pub async fn lookup(&self, host: &str, port: u16) -> io::Result<Vec<SocketAddr>> {
        if let Some(addrs) = literal_addrs(host, port) {
            return Ok(addrs);
        }
        let deadline = Instant::now() + self.timeout;
        if self.nameservers.is_empty() && self.interface.is_none() {
            return match tokio::time::timeout_at(deadline, tokio::net::lookup_host((host, port)))
                .await
            {
                Ok(r) => r.map(|it| it.collect()),
                Err(_) => Err(resolve_error(
                    io::ErrorKind::TimedOut,
                    format!("resolving {host} timed out after {:?}", self.timeout),
                )),
            };
        }
        let via = match &self.interface {
            Some(iface) => format!(" through interface {iface}"),
            None => String::new(),
        };
        let hint = if self.interface.is_some() {
            "; an exit with an interface needs `dns = [...]` nameservers reachable through \
             that uplink"
        } else {
            ""
        };
        if self.nameservers.is_empty() {
            return Err(resolve_error(
                io::ErrorKind::NotFound,
                format!("cannot resolve {host}{via}: no nameserver configured{hint}"),
            ));
        }
        let name = normalize_name(host)
            .map_err(|e| resolve_error(io::ErrorKind::InvalidInput, e.to_string()))?;
        let (v4, v6) = tokio::join!(
            self.query_type(&name, QueryType::A, deadline),
            self.query_type(&name, QueryType::Aaaa, deadline)
        );
        let mut out = Vec::new();
        for addrs in [&v4, &v6].into_iter().flatten() {
            out.extend(addrs.iter().map(|ip| SocketAddr::new(*ip, port)));
        }
        if !out.is_empty() {
            return Ok(out);
        }
        let servers = join(&self.nameservers);
        Err(match (v4, v6) {
            (Err(QueryFailure::Answer(DnsError::NxDomain)), _)
            | (_, Err(QueryFailure::Answer(DnsError::NxDomain))) => resolve_error(
                io::ErrorKind::NotFound,
                format!("{host}: no such domain (NXDOMAIN from {servers}{via})"),
            ),
            (Ok(_), Ok(_)) => resolve_error(
                io::ErrorKind::NotFound,
                format!("{host} has no A or AAAA record ({servers}{via})"),
            ),
            (Err(QueryFailure::Timeout), _) | (_, Err(QueryFailure::Timeout)) => resolve_error(
                io::ErrorKind::TimedOut,
                format!(
                    "resolving {host}: no answer from {servers}{via} within {:?}{hint}",
                    self.timeout
                ),
            ),
            (Err(e), _) | (_, Err(e)) => resolve_error(
                io::ErrorKind::Other,
                format!("resolving {host} with {servers}{via}: {e}{hint}"),
            ),
        })
    }

    /// One record type: each nameserver twice, round robin, until one gives
    /// a definite answer (addresses, no data, or NXDOMAIN).
    async fn query_type(
        &self,
        name: &str,
        qtype: QueryType,
        deadline: Instant,
    ) -> Result<Vec<IpAddr>, QueryFailure> {
        let tries = self.nameservers.len() * 2;
        let per_try = (self.timeout / tries as u32).max(Duration::from_secs(1));
        let mut last = QueryFailure::Timeout;
        for ns in self.nameservers.iter().chain(self.nameservers.iter()) {
            let now = Instant::now();
            if now >= deadline {
                break;
            }
            let try_deadline = (now + per_try).min(deadline);
            match self.query_one(*ns, name, qtype, try_deadline).await {
                Ok(addrs) => return Ok(addrs),
                Err(QueryFailure::Answer(DnsError::NxDomain)) => {
                    return Err(QueryFailure::Answer(DnsError::NxDomain));
                }
                Err(e) => {
                    debug!(nameserver = %ns, ?qtype, error = %e, "DNS query failed");
                    // A timeout from a later server must not hide a clearer
                    // reason from an earlier one.
                    if !matches!(e, QueryFailure::Timeout) || matches!(last, QueryFailure::Timeout)
                    {
                        last = e;
                    }
                }
            }
        }
        Err(last)
    }

    async fn query_one(
        &self,
        ns: SocketAddr,
        name: &str,
        qtype: QueryType,
        deadline: Instant,
    ) -> Result<Vec<IpAddr>, QueryFailure> {
        let (id, query) = new_query(name, qtype).map_err(QueryFailure::Answer)?;
        let udp = tokio::time::timeout_at(deadline, self.udp_exchange(ns, &query, id, name, qtype))
            .await
            .map_err(|_| QueryFailure::Timeout)??;
        if !udp.truncated {
            return Ok(udp.addrs);
        }
        // The answer did not fit a datagram: ask again over TCP, and fall
        // back to what the datagram carried if that fails.
        let tcp = tokio::time::timeout_at(deadline, self.tcp_exchange(ns, &query, id, name, qtype))
            .await
            .map_err(|_| QueryFailure::Timeout)
            .and_then(|r| r);
        match tcp {
            Ok(answer) => Ok(answer.addrs),
            Err(e) if udp.addrs.is_empty() => Err(e),
            Err(_) => Ok(udp.addrs),
        }
    }

    async fn udp_exchange(
        &self,
        ns: SocketAddr,
        query: &[u8],
        id: u16,
        name: &str,
        qtype: QueryType,
    ) -> Result<Answer, QueryFailure> {
        let local: SocketAddr = if ns.is_ipv4() {
            (Ipv4Addr::UNSPECIFIED, 0).into()
        } else {
            (Ipv6Addr::UNSPECIFIED, 0).into()
        };
        let sock = udp_socket(local, self.interface.as_deref())?;
        // Connected: datagrams from anyone else are dropped by the kernel,
        // and an ICMP "port unreachable" fails the query at once.
        sock.connect(ns).await?;
        sock.send(query).await?;
        let mut buf = vec![0u8; 4096];
        loop {
            let n = sock.recv(&mut buf).await?;
            match decode_response(&buf[..n], id, name, qtype) {
                Ok(answer) => return Ok(answer),
                Err(DnsError::IdMismatch | DnsError::QuestionMismatch) => continue,
                Err(e) => return Err(QueryFailure::Answer(e)),
            }
        }
    }

    async fn tcp_exchange(
        &self,
        ns: SocketAddr,
        query: &[u8],
        id: u16,
        name: &str,
        qtype: QueryType,
    ) -> Result<Answer, QueryFailure> {
        let mut tcp = connect_tcp(ns, self.interface.as_deref(), self.timeout).await?;
        let mut framed = Vec::with_capacity(query.len() + 2);
        framed.extend_from_slice(&(query.len() as u16).to_be_bytes());
        framed.extend_from_slice(query);
        tcp.write_all(&framed).await?;
        let len = usize::from(tcp.read_u16().await?);
        let mut buf = vec![0u8; len];
        tcp.read_exact(&mut buf).await?;
        decode_response(&buf, id, name, qtype).map_err(QueryFailure::Answer)
    }
}

#[derive(Debug, thiserror::Error)]
enum QueryFailure {
    #[error("no answer in time")]
    Timeout,
    #[error("{0}")]
    Io(#[from] io::Error),
    #[error("{0}")]
    Answer(DnsError),
}

/// IP literals (bare or in brackets) and `localhost`, answered locally as
/// the system resolver would.
fn literal_addrs(host: &str, port: u16) -> Option<Vec<SocketAddr>> {
    let bare = host
        .strip_prefix('[')
        .and_then(|h| h.strip_suffix(']'))
        .unwrap_or(host);
    if let Ok(ip) = bare.parse::<IpAddr>() {
        return Some(vec![SocketAddr::new(ip, port)]);
    }
    let name = host.strip_suffix('.').unwrap_or(host);
    if name.eq_ignore_ascii_case("localhost") {
        return Some(vec![
            SocketAddr::new(Ipv4Addr::LOCALHOST.into(), port),
            SocketAddr::new(Ipv6Addr::LOCALHOST.into(), port),
        ]);
    }
    None
}

fn join<T: std::fmt::Display>(items: &[T]) -> String {
    items
        .iter()
        .map(|i| i.to_string())
        .collect::<Vec<_>>()
        .join(", ")
}

/// A minimal authoritative responder for tests: answers A and AAAA from a
/// map, NXDOMAIN for unknown names.
pub mod testing {
    use super::*;

    /// The answer to `query`, or `None` for input that is not a query.
    /// Answers use a compression pointer to the question name. When the
    /// answer would exceed `max_len` (512 for plain UDP), the response
    /// carries no records and sets TC, as a real server does.
    pub fn answer(
        query: &[u8],
        records: &HashMap<String, Vec<IpAddr>>,
        max_len: usize,
    ) -> Option<Vec<u8>> {
        let q = decode_query(query).ok()?;
        // The question as it was on the wire, echoed verbatim.
        let (_, qend) = read_name(query, HEADER_LEN).ok()?;
        let question = query.get(HEADER_LEN..qend + 4)?;
        let key = q.name.clone();
        let found = records.get(&key);
        let addrs: Vec<IpAddr> = found
            .map(|v| {
                v.iter()
                    .copied()
                    .filter(|ip| match q.qtype {
                        TYPE_A => ip.is_ipv4(),
                        TYPE_AAAA => ip.is_ipv6(),
                        _ => false,
                    })
                    .collect()
            })
            .unwrap_or_default();
        let rcode = if found.is_some() { 0 } else { 3 };
        let mut body = Vec::new();
        for ip in &addrs {
            body.extend_from_slice(&[0xC0, HEADER_LEN as u8]);
            let (rtype, data): (u16, Vec<u8>) = match ip {
                IpAddr::V4(a) => (TYPE_A, a.octets().to_vec()),
                IpAddr::V6(a) => (TYPE_AAAA, a.octets().to_vec()),
            };
            body.extend_from_slice(&rtype.to_be_bytes());
            body.extend_from_slice(&CLASS_IN.to_be_bytes());
            body.extend_from_slice(&60u32.to_be_bytes());
            body.extend_from_slice(&(data.len() as u16).to_be_bytes());
            body.extend_from_slice(&data);
        }
        let mut flags = FLAG_QR | FLAG_AA | FLAG_RA | (Header::decode(query).ok()?.flags & FLAG_RD);
        flags |= rcode;
        let mut ancount = addrs.len() as u16;
        if HEADER_LEN + question.len() + body.len() > max_len {
            flags |= FLAG_TC;
            ancount = 0;
            body.clear();
        }
        let mut out = Vec::new();
        Header {
            id: q.id,
            flags,
            qdcount: 1,
            ancount,
            nscount: 0,
            arcount: 0,
        }
        .encode(&mut out);
        out.extend_from_slice(question);
        out.extend_from_slice(&body);
        Some(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn records() -> HashMap<String, Vec<IpAddr>> {
        HashMap::from([(
            "exit.test".to_string(),
            vec![
                "203.0.113.7".parse().unwrap(),
                "2001:db8::7".parse().unwrap(),
                "203.0.113.8".parse().unwrap(),
            ],
        )])
    }

    /// A response built by hand: header, the question, then `answers`
    /// (already encoded).
    fn response(
        id: u16,
        flags: u16,
        qname: &str,
        qtype: u16,
        ancount: u16,
        answers: &[u8],
    ) -> Vec<u8> {
        let mut out = Vec::new();
        Header {
            id,
            flags,
            qdcount: 1,
            ancount,
            nscount: 0,
            arcount: 0,
        }
        .encode(&mut out);
        encode_name(qname, &mut out);
        out.extend_from_slice(&qtype.to_be_bytes());
        out.extend_from_slice(&CLASS_IN.to_be_bytes());
        out.extend_from_slice(answers);
        out
    }

    fn rr(owner: &[u8], rtype: u16, rdata: &[u8]) -> Vec<u8> {
        let mut out = owner.to_vec();
        out.extend_from_slice(&rtype.to_be_bytes());
        out.extend_from_slice(&CLASS_IN.to_be_bytes());
        out.extend_from_slice(&300u32.to_be_bytes());
        out.extend_from_slice(&(rdata.len() as u16).to_be_bytes());
        out.extend_from_slice(rdata);
        out
    }

    #[test]
    fn query_layout() {
        let q = encode_query(0x1234, "WWW.Example.com.", QueryType::Aaaa).unwrap();
        assert_eq!(&q[..4], &[0x12, 0x34, 0x01, 0x00]);
        assert_eq!(&q[4..12], &[0, 1, 0, 0, 0, 0, 0, 0]);
        assert_eq!(&q[12..29], b"\x03www\x07example\x03com\x00");
        assert_eq!(&q[29..], &[0, 28, 0, 1]);
        let parsed = decode_query(&q).unwrap();
        assert_eq!(parsed.name, "www.example.com");
        assert_eq!(parsed.qtype, 28);
    }

    #[test]
    fn invalid_names_are_refused() {
        for bad in [
            "",
            ".",
            "a..b",
            "bad name",
            "a/b",
            &"x".repeat(64),
            &"a.".repeat(130),
        ] {
            assert!(
                matches!(
                    encode_query(1, bad, QueryType::A),
                    Err(DnsError::InvalidName(_))
                ),
                "{bad}"
            );
        }
        assert!(encode_query(1, &format!("{}.com", "a".repeat(63)), QueryType::A).is_ok());
    }

    #[test]
    fn answers_through_the_test_responder() {
        let (id, q) = new_query("Exit.Test", QueryType::A).unwrap();
        let r = testing::answer(&q, &records(), 512).unwrap();
        let a = decode_response(&r, id, "exit.test", QueryType::A).unwrap();
        assert_eq!(
            a.addrs,
            vec![
                "203.0.113.7".parse::<IpAddr>().unwrap(),
                "203.0.113.8".parse().unwrap()
            ]
        );
        assert!(!a.truncated);
        let (id, q) = new_query("exit.test", QueryType::Aaaa).unwrap();
        let r = testing::answer(&q, &records(), 512).unwrap();
        let a = decode_response(&r, id, "exit.test", QueryType::Aaaa).unwrap();
        assert_eq!(a.addrs, vec!["2001:db8::7".parse::<IpAddr>().unwrap()]);
        let (id, q) = new_query("missing.test", QueryType::A).unwrap();
        let r = testing::answer(&q, &records(), 512).unwrap();
        assert_eq!(
            decode_response(&r, id, "missing.test", QueryType::A),
            Err(DnsError::NxDomain)
        );
    }

    #[test]
    fn oversized_answer_sets_tc() {
        let many: Vec<IpAddr> = (0..40).map(|i| IpAddr::from([198, 51, 100, i])).collect();
        let recs = HashMap::from([("big.test".to_string(), many)]);
        let (id, q) = new_query("big.test", QueryType::A).unwrap();
        let r = testing::answer(&q, &recs, 512).unwrap();
        assert!(r.len() <= 512);
        let a = decode_response(&r, id, "big.test", QueryType::A).unwrap();
        assert!(a.truncated);
        assert!(a.addrs.is_empty());
        let r = testing::answer(&q, &recs, MAX_MESSAGE).unwrap();
        let a = decode_response(&r, id, "big.test", QueryType::A).unwrap();
        assert_eq!(a.addrs.len(), 40);
    }

    #[test]
    fn follows_a_compressed_cname_chain() {
        // www.example.com CNAME edge.cdn.net (the "net"-less part
        // compressed), edge.cdn.net A 192.0.2.1, and an unrelated A record.
        let mut answers = Vec::new();
        // Owner: pointer to the question name at 12.
        let target = b"\x04edge\x03cdn\x03net\x00";
        answers.extend(rr(&[0xC0, 12], TYPE_CNAME, target));
        // The CNAME's target starts right after the rdlength of this record:
        // 12 (header) + 17 (qname) + 4 (qtype, qclass) + 2 (owner) + 10.
        let target_at = 12 + 17 + 4 + 2 + 10;
        answers.extend(rr(&[0xC0, target_at as u8], TYPE_A, &[192, 0, 2, 1]));
        answers.extend(rr(b"\x05other\x00", TYPE_A, &[192, 0, 2, 99]));
        let msg = response(7, FLAG_QR | FLAG_RA, "www.example.com", TYPE_A, 3, &answers);
        let a = decode_response(&msg, 7, "www.example.com", QueryType::A).unwrap();
        assert_eq!(a.cnames, vec!["edge.cdn.net".to_string()]);
        assert_eq!(a.addrs, vec!["192.0.2.1".parse::<IpAddr>().unwrap()]);
        // Reading from inside the target's labels.
        let (name, end) = read_name(&msg, target_at + 5).unwrap();
        assert_eq!(name, "cdn.net");
        assert_eq!(end, target_at + 14);
    }

    #[test]
    fn cname_loop_ends() {
        let mut answers = rr(&[0xC0, 12], TYPE_CNAME, &[0xC0, 12]);
        answers.extend(rr(&[0xC0, 12], TYPE_A, &[192, 0, 2, 1]));
        let msg = response(9, FLAG_QR, "loop.test", TYPE_A, 2, &answers);
        let a = decode_response(&msg, 9, "loop.test", QueryType::A).unwrap();
        assert_eq!(a.addrs.len(), 1);
        assert!(a.cnames.is_empty());
    }

    #[test]
    fn pointer_loops_and_forward_pointers_are_errors() {
        let mut msg = vec![0u8; 12];
        // A pointer to itself.
        msg.extend_from_slice(&[0xC0, 12]);
        assert!(read_name(&msg, 12).is_err());
        // A label followed by a pointer back to that label.
        let mut msg = vec![0u8; 12];
        msg.extend_from_slice(&[1, b'a', 0xC0, 12]);
        assert!(read_name(&msg, 12).is_err());
        // Two pointers pointing at each other.
        let mut msg = vec![0u8; 12];
        msg.extend_from_slice(&[0xC0, 14, 0xC0, 12]);
        assert!(read_name(&msg, 12).is_err());
        assert!(read_name(&msg, 14).is_err());
        // Reserved label types.
        let mut msg = vec![0u8; 12];
        msg.extend_from_slice(&[0x40, 0]);
        assert!(read_name(&msg, 12).is_err());
    }

    #[test]
    fn overlong_names_are_errors() {
        let mut msg = vec![0u8; 12];
        for _ in 0..5 {
            msg.push(63);
            msg.extend_from_slice(&[b'a'; 63]);
        }
        msg.push(0);
        assert_eq!(
            read_name(&msg, 12),
            Err(DnsError::Malformed("name longer than 255 bytes"))
        );
    }

    #[test]
    fn header_checks() {
        let ok = response(5, FLAG_QR, "a.test", TYPE_A, 0, &[]);
        assert_eq!(
            decode_response(&ok, 5, "a.test", QueryType::A).unwrap(),
            Answer::default()
        );
        assert_eq!(
            decode_response(&ok, 6, "a.test", QueryType::A),
            Err(DnsError::IdMismatch)
        );
        assert_eq!(
            decode_response(&ok, 5, "b.test", QueryType::A),
            Err(DnsError::QuestionMismatch)
        );
        assert_eq!(
            decode_response(&ok, 5, "a.test", QueryType::Aaaa),
            Err(DnsError::QuestionMismatch)
        );
        let query = response(5, 0, "a.test", TYPE_A, 0, &[]);
        assert!(matches!(
            decode_response(&query, 5, "a.test", QueryType::A),
            Err(DnsError::Malformed(_))
        ));
        let servfail = response(5, FLAG_QR | 2, "a.test", TYPE_A, 0, &[]);
        assert_eq!(
            decode_response(&servfail, 5, "a.test", QueryType::A),
            Err(DnsError::ServFail)
        );
        let refused = response(5, FLAG_QR | 5, "a.test", TYPE_A, 0, &[]);
        assert_eq!(
            decode_response(&refused, 5, "a.test", QueryType::A),
            Err(DnsError::Refused)
        );
        // An error answer without its question still reports the error.
        let mut bare = Vec::new();
        Header {
            id: 5,
            flags: FLAG_QR | 3,
            qdcount: 0,
            ancount: 0,
            nscount: 0,
            arcount: 0,
        }
        .encode(&mut bare);
        assert_eq!(
            decode_response(&bare, 5, "a.test", QueryType::A),
            Err(DnsError::NxDomain)
        );
    }

    #[test]
    fn truncated_input_and_huge_counts() {
        let msg = response(
            5,
            FLAG_QR,
            "a.test",
            TYPE_A,
            3,
            &rr(&[0xC0, 12], TYPE_A, &[192, 0, 2, 1]),
        );
        // Claims three answers, has one.
        assert!(decode_response(&msg, 5, "a.test", QueryType::A).is_err());
        // The same with TC set keeps the whole records.
        let mut tc = msg.clone();
        tc[2] |= (FLAG_TC >> 8) as u8;
        let a = decode_response(&tc, 5, "a.test", QueryType::A).unwrap();
        assert!(a.truncated);
        assert_eq!(a.addrs.len(), 1);
        for cut in 0..msg.len() {
            assert!(decode_response(&msg[..cut], 5, "a.test", QueryType::A).is_err());
        }
        // ancount 65535 with nothing behind it.
        let mut huge = response(5, FLAG_QR, "a.test", TYPE_A, 0, &[]);
        huge[6] = 0xFF;
        huge[7] = 0xFF;
        assert!(decode_response(&huge, 5, "a.test", QueryType::A).is_err());
        // Wrong A record length.
        let bad = response(
            5,
            FLAG_QR,
            "a.test",
            TYPE_A,
            1,
            &rr(&[0xC0, 12], TYPE_A, &[1, 2, 3]),
        );
        assert!(decode_response(&bad, 5, "a.test", QueryType::A).is_err());
    }

    #[test]
    fn resolv_conf() {
        let text = "# generated\nnameserver 127.0.0.53\noptions edns0\n\
                    nameserver 10.0.0.1 # carrier\n; nameserver 9.9.9.9\n\
                    nameserver fe80::1%wwan0\nnameserver bogus\nsearch lan\n";
        assert_eq!(
            parse_resolv_conf(text),
            vec![
                "127.0.0.53:53".parse::<SocketAddr>().unwrap(),
                "10.0.0.1:53".parse().unwrap(),
                "[fe80::1]:53".parse().unwrap(),
            ]
        );
        let r = Resolver::from_resolv_conf(text, Some("wwan0")).unwrap();
        assert_eq!(r.nameservers().len(), 2);
        assert_eq!(r.interface(), Some("wwan0"));
        let e = Resolver::from_resolv_conf("nameserver 127.0.0.53\n", Some("wwan0")).unwrap_err();
        let text = e.to_string();
        assert!(
            text.contains("127.0.0.53") && text.contains("dns = [...]"),
            "{text}"
        );
        let e = Resolver::from_resolv_conf("", Some("wwan0")).unwrap_err();
        assert!(e.to_string().contains("no nameserver"), "{e}");
        let sys = Resolver::from_resolv_conf("", None).unwrap();
        assert!(sys.nameservers().is_empty());
    }

    #[tokio::test]
    async fn literals_and_localhost_skip_queries() {
        // A resolver with an unreachable nameserver still answers these.
        let r = Resolver::new(vec!["192.0.2.1:53".parse().unwrap()], None)
            .with_timeout(Duration::from_millis(10));
        assert_eq!(
            r.lookup("192.0.2.5", 80).await.unwrap(),
            vec!["192.0.2.5:80".parse().unwrap()]
        );
        assert_eq!(
            r.lookup("[2001:db8::1]", 80).await.unwrap(),
            vec!["[2001:db8::1]:80".parse().unwrap()]
        );
        let local = r.lookup("LocalHost.", 8).await.unwrap();
        assert_eq!(local[0], "127.0.0.1:8".parse().unwrap());
        // The host's resolver path.
        let sys = Resolver::from_system(None).unwrap();
        assert!(
            sys.lookup("localhost", 1)
                .await
                .unwrap()
                .iter()
                .all(|a| a.ip().is_loopback())
        );
    }

    #[tokio::test]
    async fn resolves_against_a_local_responder() {
        let sock = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let ns = sock.local_addr().unwrap();
        let server = tokio::spawn(async move {
            let mut buf = [0u8; 512];
            loop {
                let (n, from) = sock.recv_from(&mut buf).await.unwrap();
                // A stray datagram with a wrong id first: must be ignored.
                let mut stray = testing::answer(&buf[..n], &records(), 512).unwrap();
                stray[0] ^= 0xFF;
                sock.send_to(&stray, from).await.unwrap();
                let reply = testing::answer(&buf[..n], &records(), 512).unwrap();
                sock.send_to(&reply, from).await.unwrap();
            }
        });
        let r = Resolver::new(vec![ns], None);
        let addrs = r.lookup("exit.test", 443).await.unwrap();
        assert_eq!(
            addrs,
            vec![
                "203.0.113.7:443".parse::<SocketAddr>().unwrap(),
                "203.0.113.8:443".parse().unwrap(),
                "[2001:db8::7]:443".parse().unwrap(),
            ]
        );
        let e = r.lookup("missing.test", 443).await.unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::NotFound);
        assert!(e.to_string().contains("NXDOMAIN"), "{e}");
        server.abort();
    }

    #[tokio::test]
    async fn silent_nameserver_times_out_with_the_hint() {
        // Bound but never answering.
        let silent = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let r = Resolver::new(vec![silent.local_addr().unwrap()], None)
            .with_timeout(Duration::from_millis(300));
        let started = std::time::Instant::now();
        let e = r.lookup("exit.test", 1).await.unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::TimedOut);
        assert!(started.elapsed() < Duration::from_secs(2));
        // A closed port fails at once (ICMP port unreachable).
        let closed = silent.local_addr().unwrap();
        drop(silent);
        let r = Resolver::new(vec![closed], None);
        let started = std::time::Instant::now();
        assert!(r.lookup("exit.test", 1).await.is_err());
        assert!(started.elapsed() < Duration::from_secs(2));
    }

    proptest! {
        #[test]
        fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..600)) {
            let _ = decode_response(&bytes, 0, "a.test", QueryType::A);
            let _ = decode_query(&bytes);
            for start in 0..bytes.len().min(40) {
                if let Ok((name, end)) = read_name(&bytes, start) {
                    prop_assert!(end <= bytes.len());
                    // Escaping at most quadruples the 255 wire bytes.
                    prop_assert!(name.len() <= 4 * MAX_NAME_WIRE_LEN);
                }
            }
        }

        #[test]
        fn mutated_responses_never_panic(
            flips in proptest::collection::vec((0usize..200, any::<u8>()), 0..8),
            cut in 0usize..200,
        ) {
            let id = 42;
            let q = encode_query(id, "exit.test", QueryType::A).unwrap();
            let mut r = testing::answer(&q, &records(), 512).unwrap();
            for (at, v) in flips {
                if at < r.len() {
                    r[at] = v;
                }
            }
            r.truncate(cut.max(1));
            if let Ok(a) = decode_response(&r, id, "exit.test", QueryType::A) {
                prop_assert!(a.addrs.len() <= MAX_ADDRS);
            }
        }

        #[test]
        fn valid_names_round_trip(labels in proptest::collection::vec("[a-z0-9_-]{1,20}", 1..6)) {
            let name = labels.join(".");
            let q = encode_query(1, &name, QueryType::A).unwrap();
            prop_assert_eq!(decode_query(&q).unwrap().name, name);
        }
    }
}
