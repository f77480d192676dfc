//! Sockets that leave through one uplink interface.
//!
//! Binding only the source address is not enough on a host with several
//! modems: with forwarding or several default routes the kernel may still
//! pick another interface. `SO_BINDTODEVICE` pins the socket to the device,
//! so routing is looked up among that device's routes only (and a socket
//! bound to a down device fails at once with "network unreachable"). The
//! option needs `CAP_NET_RAW`.

use std::io;
use std::net::SocketAddr;
use std::time::Duration;

use socket2::{Domain, Protocol, Socket, Type};
use tokio::net::{TcpSocket, TcpStream, UdpSocket};

/// Longest interface name the kernel accepts (`IFNAMSIZ` minus the NUL).
pub const MAX_IFNAME_LEN: usize = 15;

/// Connect to `addr` within `timeout`, through `interface` when given.
///
/// The stream gets the options every customer dial has always had:
/// `TCP_NODELAY` and TCP keepalive. With `interface` `None` this is plain
/// `TcpStream::connect` and the host's routing decides.
pub async fn connect_tcp(
    addr: SocketAddr,
    interface: Option<&str>,
    timeout: Duration,
) -> io::Result<TcpStream> {
    let connect = async {
        match interface {
            None => TcpStream::connect(addr).await,
            Some(iface) => {
                let socket =
                    Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
                socket.set_nonblocking(true)?;
                bind_device(&socket, iface)?;
                let socket = TcpSocket::from_std_stream(socket.into());
                socket.connect(addr).await.map_err(|e| {
                    io::Error::new(e.kind(), format!("{e} (through interface {iface})"))
                })
            }
        }
    };
    let tcp = match tokio::time::timeout(timeout, connect).await {
        Ok(result) => result?,
        Err(_) => {
            return Err(io::Error::new(
                io::ErrorKind::TimedOut,
                match interface {
                    Some(iface) => format!(
                        "connecting to {addr} through interface {iface} timed out after {timeout:?}"
                    ),
                    None => format!("connecting to {addr} timed out after {timeout:?}"),
                },
            ));
        }
    };
    let _ = tcp.set_nodelay(true);
    shared::quic::relay::enable_keepalive(&tcp);
    Ok(tcp)
}

/// A UDP socket bound to `local` (usually `0.0.0.0:0` or `[::]:0`), through
/// `interface` when given. Must be called within a Tokio runtime.
pub fn udp_socket(local: SocketAddr, interface: Option<&str>) -> io::Result<UdpSocket> {
    let socket = Socket::new(Domain::for_address(local), Type::DGRAM, Some(Protocol::UDP))?;
    socket.set_nonblocking(true)?;
    if let Some(iface) = interface {
        bind_device(&socket, iface)?;
    }
    socket.bind(&local.into())?;
    UdpSocket::from_std(socket.into())
}

/// Pin `socket` to `iface` (`SO_BINDTODEVICE`), with errors that tell the
/// operator what to fix.
pub fn bind_device(socket: &Socket, iface: &str) -> io::Result<()> {
    check_ifname(iface)?;
    socket
        .bind_device(Some(iface.as_bytes()))
        .map_err(|e| match e.raw_os_error() {
            Some(code) if code == nix::libc::EPERM => io::Error::new(
                io::ErrorKind::PermissionDenied,
                format!(
                    "binding a socket to interface {iface} needs CAP_NET_RAW \
                     (run the agent as root or grant it CAP_NET_RAW): {e}"
                ),
            ),
            Some(code) if code == nix::libc::ENODEV => io::Error::new(
                io::ErrorKind::NotFound,
                format!("interface {iface} does not exist: {e}"),
            ),
            _ => io::Error::new(
                e.kind(),
                format!("binding a socket to interface {iface}: {e}"),
            ),
        })
}

/// Reject names the kernel would refuse or silently truncate.
pub fn check_ifname(iface: &str) -> io::Result<()> {
    let valid = !iface.is_empty()
        && iface.len() <= MAX_IFNAME_LEN
        && iface != "."
        && iface != ".."
        && iface
            .bytes()
            .all(|b| b.is_ascii_graphic() && b != b'/' && b != b':');
    if valid {
        Ok(())
    } else {
        Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("{iface:?} is not a valid interface name"),
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn without_interface_behaves_like_tokio() {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        let tcp = connect_tcp(addr, None, Duration::from_secs(2))
            .await
            .unwrap();
        assert!(tcp.nodelay().unwrap());
        assert!(socket2::SockRef::from(&tcp).keepalive().unwrap());
        drop(l);
        let e = connect_tcp(addr, None, Duration::from_secs(2))
            .await
            .unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::ConnectionRefused);
    }

    #[tokio::test]
    async fn unknown_interface_is_a_clear_error() {
        let addr: SocketAddr = "127.0.0.1:9".parse().unwrap();
        let e = connect_tcp(addr, Some("cgnosuch0"), Duration::from_secs(2))
            .await
            .unwrap_err();
        let text = e.to_string();
        // As root the device is missing; without privileges the kernel
        // refuses the option first.
        assert!(
            text.contains("does not exist") || text.contains("CAP_NET_RAW"),
            "{text}"
        );
        let e = udp_socket("0.0.0.0:0".parse().unwrap(), Some("cgnosuch0")).unwrap_err();
        assert!(e.to_string().contains("cgnosuch0"), "{e}");
    }

    #[test]
    fn interface_names_are_checked() {
        assert!(check_ifname("wwan0").is_ok());
        assert!(check_ifname("enx0c5b8f279a64").is_ok());
        for bad in ["", "a/b", "way-too-long-name0", "has space", "a:b", ".."] {
            assert_eq!(
                check_ifname(bad).unwrap_err().kind(),
                io::ErrorKind::InvalidInput,
                "{bad}"
            );
        }
    }

    #[tokio::test]
    async fn udp_socket_without_interface_binds() {
        let s = udp_socket("127.0.0.1:0".parse().unwrap(), None).unwrap();
        assert!(s.local_addr().unwrap().port() != 0);
    }
}
