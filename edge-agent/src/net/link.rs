//! The state of one uplink interface, waiting for it, and switching it.
//!
//! State is read with `getifaddrs` (netlink under the hood), which follows
//! the calling thread's network namespace; `/sys/class/net` would show the
//! namespace sysfs was mounted in, so it is not used.

use std::io;
use std::net::IpAddr;
use std::time::Duration;

use nix::net::if_::InterfaceFlags;
use rtnetlink::LinkUnspec;
use tokio::time::Instant;

/// How often [`wait_ready`] looks again.
const POLL_EVERY: Duration = Duration::from_millis(150);
/// Bound on one netlink request.
const NETLINK_TIMEOUT: Duration = Duration::from_secs(5);

/// One interface as the kernel sees it now.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct LinkState {
    pub exists: bool,
    /// Administratively up (`IFF_UP`) and carrying traffic: carrier present
    /// (`IFF_LOWER_UP`) and operationally up (`IFF_RUNNING`). Both, because
    /// the kernel updates `IFF_RUNNING` lazily (up to a second after a
    /// carrier change) while `IFF_LOWER_UP` follows the carrier at once.
    pub up: bool,
    /// `IFF_UP` alone: set up by someone, maybe without carrier. Tells "the
    /// modem has no data session" apart from "the link was switched off".
    pub admin_up: bool,
    /// Every address on the interface (IPv4 and IPv6, link-local too).
    pub addrs: Vec<IpAddr>,
}

impl LinkState {
    /// Up with an address traffic can leave from.
    pub fn is_ready(&self) -> bool {
        self.up && self.addrs.iter().any(is_usable_addr)
    }
}

impl std::fmt::Display for LinkState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if !self.exists {
            return f.write_str("does not exist");
        }
        let state = match (self.up, self.admin_up) {
            (true, _) => "up",
            (false, true) => "up without carrier",
            (false, false) => "down",
        };
        write!(f, "{state}, addresses [")?;
        for (i, a) in self.addrs.iter().enumerate() {
            if i > 0 {
                f.write_str(", ")?;
            }
            write!(f, "{a}")?;
        }
        f.write_str("]")
    }
}

/// An address an uplink can carry customer traffic from: unicast and
/// neither loopback, unspecified nor IPv6 link-local. Private and CGNAT
/// IPv4 addresses count: that is what carriers and HiLink sticks hand out.
pub fn is_usable_addr(ip: &IpAddr) -> bool {
    match ip {
        IpAddr::V4(a) => {
            !(a.is_loopback()
                || a.is_unspecified()
                || a.is_link_local()
                || a.is_multicast()
                || a.is_broadcast())
        }
        IpAddr::V6(a) => {
            !(a.is_loopback()
                || a.is_unspecified()
                || a.is_multicast()
                || a.is_unicast_link_local())
        }
    }
}

/// The state of `iface` (all fields false/empty when it does not exist or
/// the kernel cannot be asked).
pub fn link_state(iface: &str) -> LinkState {
    match all_link_states() {
        Ok(mut all) => all.remove(iface).unwrap_or_default(),
        Err(e) => {
            tracing::debug!(interface = iface, error = %e, "reading interfaces failed");
            LinkState::default()
        }
    }
}

/// Every interface of the calling thread's network namespace.
pub fn all_link_states() -> io::Result<std::collections::HashMap<String, LinkState>> {
    let mut out: std::collections::HashMap<String, LinkState> = Default::default();
    for ifa in nix::ifaddrs::getifaddrs().map_err(io::Error::from)? {
        let st = out.entry(ifa.interface_name.clone()).or_default();
        st.exists = true;
        st.admin_up = ifa.flags.contains(InterfaceFlags::IFF_UP);
        st.up = st.admin_up
            && ifa
                .flags
                .contains(InterfaceFlags::IFF_RUNNING | InterfaceFlags::IFF_LOWER_UP);
        let ip = ifa.address.as_ref().and_then(|a| {
            a.as_sockaddr_in()
                .map(|s| IpAddr::V4(s.ip()))
                .or_else(|| a.as_sockaddr_in6().map(|s| IpAddr::V6(s.ip())))
        });
        if let Some(ip) = ip
            && !st.addrs.contains(&ip)
        {
            st.addrs.push(ip);
        }
    }
    Ok(out)
}

/// Wait until `iface` is up with a usable address ([`LinkState::is_ready`]),
/// looking every 150 ms. At `deadline`, the last state seen is the error.
pub async fn wait_ready(iface: &str, deadline: Instant) -> Result<LinkState, LinkState> {
    loop {
        let st = link_state(iface);
        if st.is_ready() {
            return Ok(st);
        }
        let now = Instant::now();
        if now >= deadline {
            return Err(st);
        }
        tokio::time::sleep_until((now + POLL_EVERY).min(deadline)).await;
    }
}

/// Switch `iface` administratively up or down (`ip link set dev IFACE
/// up|down`). Needs `CAP_NET_ADMIN`.
pub async fn set_link(iface: &str, up: bool) -> io::Result<()> {
    super::bind::check_ifname(iface)?;
    let (conn, handle, _) = rtnetlink::new_connection()?;
    let msg = if up {
        LinkUnspec::new_with_name(iface).up().build()
    } else {
        LinkUnspec::new_with_name(iface).down().build()
    };
    let request = handle.link().set(msg).execute();
    // The connection is driven here rather than spawned, so nothing
    // outlives the call.
    let result = tokio::time::timeout(NETLINK_TIMEOUT, async {
        tokio::select! {
            r = request => r.map_err(Some),
            _ = conn => Err(None),
        }
    })
    .await;
    let action = if up { "up" } else { "down" };
    match result {
        Ok(Ok(())) => Ok(()),
        Ok(Err(Some(e))) => Err(netlink_error(e, iface, action)),
        Ok(Err(None)) => Err(io::Error::other(format!(
            "setting {iface} {action}: the netlink connection closed"
        ))),
        Err(_) => Err(io::Error::new(
            io::ErrorKind::TimedOut,
            format!("setting {iface} {action}: no netlink answer within {NETLINK_TIMEOUT:?}"),
        )),
    }
}

fn netlink_error(e: rtnetlink::Error, iface: &str, action: &str) -> io::Error {
    let rtnetlink::Error::NetlinkError(msg) = &e else {
        return io::Error::other(format!("setting {iface} {action}: {e}"));
    };
    let os = msg.to_io();
    match os.raw_os_error() {
        Some(code) if code == nix::libc::ENODEV => io::Error::new(
            io::ErrorKind::NotFound,
            format!("interface {iface} does not exist"),
        ),
        Some(code) if code == nix::libc::EPERM => io::Error::new(
            io::ErrorKind::PermissionDenied,
            format!(
                "setting {iface} {action} needs CAP_NET_ADMIN (run the agent as root or grant \
                 it CAP_NET_ADMIN)"
            ),
        ),
        _ => io::Error::new(os.kind(), format!("setting {iface} {action}: {os}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn usable_addresses() {
        for ok in [
            "10.64.0.2",
            "100.64.1.1",
            "192.168.8.100",
            "203.0.113.1",
            "2a00::1",
            "fd00::5",
        ] {
            assert!(is_usable_addr(&ok.parse().unwrap()), "{ok}");
        }
        for no in [
            "127.0.0.1",
            "0.0.0.0",
            "169.254.3.4",
            "224.0.0.1",
            "255.255.255.255",
            "::1",
            "::",
            "fe80::1",
            "ff02::1",
        ] {
            assert!(!is_usable_addr(&no.parse().unwrap()), "{no}");
        }
    }

    #[test]
    fn loopback_and_missing_interfaces() {
        let lo = link_state("lo");
        assert!(lo.exists && lo.admin_up);
        assert!(lo.addrs.iter().all(|a| a.is_loopback()) || !lo.up);
        assert!(!lo.is_ready());
        let none = link_state("cgnosuch0");
        assert_eq!(none, LinkState::default());
        assert_eq!(none.to_string(), "does not exist");
    }

    #[tokio::test]
    async fn wait_ready_gives_up_at_the_deadline() {
        let deadline = Instant::now() + Duration::from_millis(400);
        let st = wait_ready("cgnosuch0", deadline).await.unwrap_err();
        assert!(!st.exists);
        assert!(Instant::now() >= deadline);
    }

    #[tokio::test]
    async fn set_link_on_a_missing_interface() {
        let e = set_link("cgnosuch0", true).await.unwrap_err();
        assert!(
            e.to_string().contains("does not exist") || e.to_string().contains("CAP_NET_ADMIN"),
            "{e}"
        );
        assert!(set_link("bad/name", true).await.is_err());
    }
}
