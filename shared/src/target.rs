//! Customer targets: a domain or an IP address, plus a port.

use std::fmt;
use std::net::{IpAddr, SocketAddr};

use serde::{Deserialize, Serialize};

/// Longest domain name accepted (RFC 1035 limit on the wire form).
pub const MAX_DOMAIN_LEN: usize = 253;

/// Where a customer flow should go.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum TargetAddr {
    Ip(SocketAddr),
    /// A name the device resolves itself, so customers' DNS never leaks to
    /// the control plane's resolver.
    Domain(String, u16),
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum TargetError {
    #[error("missing port in {0:?}")]
    MissingPort(String),
    #[error("invalid port in {0:?}")]
    BadPort(String),
    #[error("invalid host {0:?}")]
    BadHost(String),
}

impl TargetAddr {
    pub fn port(&self) -> u16 {
        match self {
            TargetAddr::Ip(sa) => sa.port(),
            TargetAddr::Domain(_, p) => *p,
        }
    }

    /// The host part as text (IPv6 without brackets).
    pub fn host(&self) -> String {
        match self {
            TargetAddr::Ip(sa) => sa.ip().to_string(),
            TargetAddr::Domain(d, _) => d.clone(),
        }
    }

    /// Build a target from a host (name or IP literal, IPv6 with or without
    /// brackets) and a port. IP literals become [`TargetAddr::Ip`] so that the
    /// deny list applies to them before anything is sent to a device.
    pub fn from_host_port(host: &str, port: u16) -> Result<Self, TargetError> {
        let bare = host
            .strip_prefix('[')
            .and_then(|h| h.strip_suffix(']'))
            .unwrap_or(host);
        if let Ok(ip) = bare.parse::<IpAddr>() {
            return Ok(TargetAddr::Ip(SocketAddr::new(ip, port)));
        }
        if host.starts_with('[') {
            return Err(TargetError::BadHost(host.to_string()));
        }
        let name = bare.strip_suffix('.').unwrap_or(bare);
        if !is_valid_domain(name) {
            return Err(TargetError::BadHost(host.to_string()));
        }
        Ok(TargetAddr::Domain(name.to_ascii_lowercase(), port))
    }

    /// Parse `host:port`, `[v6]:port`.
    pub fn parse_authority(s: &str) -> Result<Self, TargetError> {
        let (host, port) = if let Some(rest) = s.strip_prefix('[') {
            let end = rest
                .find(']')
                .ok_or_else(|| TargetError::BadHost(s.to_string()))?;
            let port = rest[end + 1..]
                .strip_prefix(':')
                .ok_or_else(|| TargetError::MissingPort(s.to_string()))?;
            (&s[..end + 2], port)
        } else {
            s.rsplit_once(':')
                .ok_or_else(|| TargetError::MissingPort(s.to_string()))?
        };
        let port = parse_port(port).ok_or_else(|| TargetError::BadPort(s.to_string()))?;
        Self::from_host_port(host, port)
    }
}

/// A port in decimal, 1..=65535, digits only.
pub fn parse_port(s: &str) -> Option<u16> {
    if s.is_empty() || s.len() > 5 || !s.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    match s.parse::<u16>() {
        Ok(0) | Err(_) => None,
        Ok(p) => Some(p),
    }
}

/// Letters, digits, `-`, `_` and dots; labels 1..=63; total ≤ 253.
/// Names made only of digits and dots are refused because resolvers read
/// some of them as IPv4 (`2130706433`, `127.1`), which would dodge the
/// literal check at the control plane.
pub fn is_valid_domain(name: &str) -> bool {
    if name.is_empty() || name.len() > MAX_DOMAIN_LEN {
        return false;
    }
    let labels_ok = name.split('.').all(|l| {
        !l.is_empty()
            && l.len() <= 63
            && l.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
    });
    if !labels_ok {
        return false;
    }
    // Numeric-looking names (decimal, octal, hex IPv4 forms) are not domains.
    let last = name.rsplit('.').next().unwrap_or("");
    let numeric_last = last.bytes().all(|b| b.is_ascii_digit())
        || (last.len() > 2
            && (last.starts_with("0x") || last.starts_with("0X"))
            && last[2..].bytes().all(|b| b.is_ascii_hexdigit()));
    !numeric_last
}

impl fmt::Display for TargetAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            TargetAddr::Ip(sa) => write!(f, "{sa}"),
            TargetAddr::Domain(d, p) => write!(f, "{d}:{p}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_authorities() {
        assert_eq!(
            TargetAddr::parse_authority("example.com:443").unwrap(),
            TargetAddr::Domain("example.com".into(), 443)
        );
        assert_eq!(
            TargetAddr::parse_authority("[::1]:80").unwrap(),
            TargetAddr::Ip("[::1]:80".parse().unwrap())
        );
        assert_eq!(
            TargetAddr::parse_authority("10.0.0.1:8080").unwrap(),
            TargetAddr::Ip("10.0.0.1:8080".parse().unwrap())
        );
        assert!(TargetAddr::parse_authority("example.com").is_err());
        assert!(TargetAddr::parse_authority("example.com:0").is_err());
        assert!(TargetAddr::parse_authority("example.com:65536").is_err());
        assert!(TargetAddr::parse_authority("[::1:80").is_err());
        assert!(TargetAddr::parse_authority("exa mple.com:80").is_err());
    }

    #[test]
    fn numeric_names_are_not_domains() {
        for n in [
            "2130706433",
            "127.1",
            "0x7f.1",
            "0x7f000001",
            "017700000001",
        ] {
            assert!(TargetAddr::from_host_port(n, 80).is_err(), "{n}");
        }
        assert!(TargetAddr::from_host_port("1.example", 80).is_ok());
        assert!(TargetAddr::from_host_port("Example.COM.", 80).is_ok());
    }
}
