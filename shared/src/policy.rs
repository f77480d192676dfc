//! The customer-target deny list.
//!
//! The control plane applies it to IP literals before choosing an exit; the
//! agent applies it again to every address its own DNS resolution returns,
//! right before it dials. Only the address part can be lifted, by
//! `allow_private_targets` (tests and the local demo); ports stay denied.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use serde::{Deserialize, Serialize};

/// Ports never dialed for customers: SMTP submission and relay (spam).
pub const DENIED_PORTS: &[u16] = &[25, 465, 587];

/// Why a target was denied.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum DenyReason {
    Loopback,
    Unspecified,
    Private,
    SharedAddressSpace,
    LinkLocal,
    Multicast,
    Broadcast,
    Reserved,
    Port,
    /// The control plane's own listeners.
    ControlPlane,
}

impl DenyReason {
    pub fn as_str(self) -> &'static str {
        match self {
            DenyReason::Loopback => "loopback address",
            DenyReason::Unspecified => "unspecified address",
            DenyReason::Private => "private address",
            DenyReason::SharedAddressSpace => "carrier-grade NAT address",
            DenyReason::LinkLocal => "link-local address",
            DenyReason::Multicast => "multicast address",
            DenyReason::Broadcast => "broadcast address",
            DenyReason::Reserved => "reserved address",
            DenyReason::Port => "port not allowed",
            DenyReason::ControlPlane => "control plane endpoint",
        }
    }
}

/// What may be dialed. `Default` is the safe production policy.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct TargetPolicy {
    /// Lift the address part of the deny list (never the port part).
    pub allow_private_targets: bool,
    /// Ports of the control plane's own listeners: refused on loopback and
    /// unspecified addresses even when private targets are allowed, because
    /// an agent on the control plane's host would otherwise reach them.
    pub protected_ports: Vec<u16>,
    /// Inclusive port ranges protected like `protected_ports` (the control
    /// plane's port-per-exit listeners).
    pub protected_port_ranges: Vec<(u16, u16)>,
    /// The control plane's own non-loopback addresses, refused on
    /// `protected_ports` as well.
    pub protected_ips: Vec<IpAddr>,
}

impl TargetPolicy {
    pub fn check(&self, ip: IpAddr, port: u16) -> Result<(), DenyReason> {
        if DENIED_PORTS.contains(&port) {
            return Err(DenyReason::Port);
        }
        let ip = canonical(ip);
        let protected = self.protected_ports.contains(&port)
            || self
                .protected_port_ranges
                .iter()
                .any(|(lo, hi)| (*lo..=*hi).contains(&port));
        if protected
            && (ip.is_loopback()
                || ip.is_unspecified()
                || self.protected_ips.iter().any(|p| canonical(*p) == ip))
        {
            return Err(DenyReason::ControlPlane);
        }
        if self.allow_private_targets {
            return Ok(());
        }
        match classify(ip) {
            Some(r) => Err(r),
            None => Ok(()),
        }
    }

    pub fn check_port(&self, port: u16) -> Result<(), DenyReason> {
        if DENIED_PORTS.contains(&port) {
            Err(DenyReason::Port)
        } else {
            Ok(())
        }
    }
}

/// IPv4-mapped (`::ffff:a.b.c.d`) and IPv4-compatible (`::a.b.c.d`) forms are
/// judged as the IPv4 address they carry.
pub fn canonical(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => {
            if let Some(v4) = v6.to_ipv4_mapped() {
                return IpAddr::V4(v4);
            }
            let s = v6.segments();
            if s[..6] == [0, 0, 0, 0, 0, 0] && !(s[6] == 0 && s[7] <= 1) {
                // Deprecated IPv4-compatible form; `::` and `::1` excluded.
                return IpAddr::V4(Ipv4Addr::new(
                    (s[6] >> 8) as u8,
                    s[6] as u8,
                    (s[7] >> 8) as u8,
                    s[7] as u8,
                ));
            }
            IpAddr::V6(v6)
        }
        v4 => v4,
    }
}

/// The deny class of an address, `None` for a public address.
pub fn classify(ip: IpAddr) -> Option<DenyReason> {
    match canonical(ip) {
        IpAddr::V4(v4) => classify_v4(v4),
        IpAddr::V6(v6) => classify_v6(v6),
    }
}

fn classify_v4(ip: Ipv4Addr) -> Option<DenyReason> {
    let o = ip.octets();
    if o[0] == 127 {
        Some(DenyReason::Loopback)
    } else if o[0] == 0 {
        Some(DenyReason::Unspecified)
    } else if o[0] == 10
        || (o[0] == 172 && (16..=31).contains(&o[1]))
        || (o[0] == 192 && o[1] == 168)
    {
        Some(DenyReason::Private)
    } else if o[0] == 100 && (64..=127).contains(&o[1]) {
        Some(DenyReason::SharedAddressSpace)
    } else if o[0] == 169 && o[1] == 254 {
        Some(DenyReason::LinkLocal)
    } else if ip.is_broadcast() {
        Some(DenyReason::Broadcast)
    } else if (224..=239).contains(&o[0]) {
        Some(DenyReason::Multicast)
    } else if o[0] >= 240 {
        Some(DenyReason::Reserved)
    } else {
        None
    }
}

fn classify_v6(ip: Ipv6Addr) -> Option<DenyReason> {
    let s = ip.segments();
    if ip.is_loopback() {
        Some(DenyReason::Loopback)
    } else if ip.is_unspecified() {
        Some(DenyReason::Unspecified)
    } else if s[0] & 0xfe00 == 0xfc00 {
        Some(DenyReason::Private) // unique local fc00::/7
    } else if s[0] & 0xffc0 == 0xfe80 || s[0] & 0xffc0 == 0xfec0 {
        Some(DenyReason::LinkLocal) // fe80::/10 and deprecated site-local
    } else if s[0] & 0xff00 == 0xff00 {
        Some(DenyReason::Multicast)
    } else if s[0] == 0x64 && s[1] == 0xff9b {
        // NAT64 well-known prefix: judge the embedded IPv4 address.
        let v4 = Ipv4Addr::new((s[6] >> 8) as u8, s[6] as u8, (s[7] >> 8) as u8, s[7] as u8);
        classify_v4(v4)
    } else if s[0] == 0x2002 {
        // 6to4: judge the embedded IPv4 address.
        let v4 = Ipv4Addr::new((s[1] >> 8) as u8, s[1] as u8, (s[2] >> 8) as u8, s[2] as u8);
        classify_v4(v4)
    } else {
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn denied(s: &str) -> bool {
        TargetPolicy::default()
            .check(s.parse().unwrap(), 443)
            .is_err()
    }

    #[test]
    fn deny_table() {
        let deny = [
            "127.0.0.1",
            "127.255.255.254",
            "0.0.0.0",
            "0.1.2.3",
            "10.1.2.3",
            "172.16.0.1",
            "172.31.255.255",
            "192.168.1.1",
            "100.64.0.1",
            "100.127.255.255",
            "169.254.169.254",
            "224.0.0.1",
            "239.255.255.250",
            "255.255.255.255",
            "240.0.0.1",
            "::1",
            "::",
            "fd00:ec2::254",
            "fc00::1",
            "fe80::1",
            "febf::1",
            "ff02::1",
            "::ffff:127.0.0.1",
            "::ffff:169.254.169.254",
            "::ffff:10.0.0.1",
            "::ffff:192.168.0.1",
            "::127.0.0.1",
            "64:ff9b::7f00:1",
            "2002:7f00:1::",
        ];
        for a in deny {
            assert!(denied(a), "{a} should be denied");
        }
        let allow = [
            "1.1.1.1",
            "8.8.8.8",
            "172.32.0.1",
            "100.128.0.1",
            "2606:4700::1111",
            "::ffff:1.1.1.1",
        ];
        for a in allow {
            assert!(!denied(a), "{a} should be allowed");
        }
    }

    #[test]
    fn ports_stay_denied_when_private_is_allowed() {
        let p = TargetPolicy {
            allow_private_targets: true,
            protected_ports: vec![8000],
            protected_port_ranges: vec![(4000, 4999)],
            protected_ips: vec!["203.0.113.7".parse().unwrap()],
        };
        let cp = Err(DenyReason::ControlPlane);
        assert_eq!(p.check("203.0.113.7".parse().unwrap(), 8000), cp);
        // The port-per-exit range, at both ends and inside.
        for port in [4000, 4321, 4999] {
            assert_eq!(p.check("203.0.113.7".parse().unwrap(), port), cp);
            assert_eq!(p.check("127.0.0.1".parse().unwrap(), port), cp);
        }
        assert_eq!(p.check("203.0.113.7".parse().unwrap(), 5000), Ok(()));
        assert_eq!(p.check("::ffff:203.0.113.7".parse().unwrap(), 8000), cp);
        assert!(p.check("203.0.113.7".parse().unwrap(), 443).is_ok());
        assert!(p.check("127.0.0.1".parse().unwrap(), 8080).is_ok());
        assert_eq!(
            p.check("1.1.1.1".parse().unwrap(), 25),
            Err(DenyReason::Port)
        );
        assert_eq!(
            p.check("127.0.0.1".parse().unwrap(), 8000),
            Err(DenyReason::ControlPlane)
        );
        assert_eq!(
            p.check("::ffff:127.0.0.1".parse().unwrap(), 8000),
            Err(DenyReason::ControlPlane)
        );
        assert!(p.check("10.0.0.1".parse().unwrap(), 8000).is_ok());
    }
}
