//! Transport parameters for the tunnel.

use std::sync::Arc;
use std::time::Duration;

use quinn::{EndpointConfig, IdleTimeout, MtuDiscoveryConfig, TransportConfig, VarInt};

/// Timing of the tunnel's liveness machinery.
#[derive(Clone, Debug)]
pub struct Liveness {
    /// QUIC keep-alive sent by the agent when the tunnel is otherwise quiet,
    /// so mobile carriers' NATs keep the UDP mapping.
    pub keep_alive: Duration,
    /// A tunnel that hears nothing for this long is dead.
    pub idle_timeout: Duration,
}

impl Default for Liveness {
    fn default() -> Self {
        Self {
            keep_alive: Duration::from_secs(10),
            idle_timeout: Duration::from_secs(30),
        }
    }
}

/// Flow-control windows sized for one device moving a few Gbit/s on a
/// low-latency path; idle streams do not allocate them.
const STREAM_WINDOW: u32 = 8 * 1024 * 1024;
const CONN_WINDOW: u32 = 32 * 1024 * 1024;
const SEND_WINDOW: u64 = 32 * 1024 * 1024;

/// Largest UDP payload accepted and the ceiling for path MTU discovery.
/// Paths start at the safe 1200 bytes and probe upward, so mobile links
/// settle near their real MTU (about 1400) while loopback and jumbo-frame
/// LANs carry fewer, larger packets: per-packet work (syscalls, headers,
/// acknowledgements) dominates the tunnel's CPU cost. The ceiling stays
/// below 6.5 KB because quinn sends up to 10 datagrams per GSO batch and
/// the kernel refuses batches over 64 KiB; above that transfers stall.
/// Measured on loopback (1 GiB through SOCKS5, release build): ceiling 1452
/// gives 2.9 Gbit/s, 4096 gives 5.5 Gbit/s, 6144 gives 6.5 Gbit/s.
pub const MAX_UDP_PAYLOAD: u16 = 6144;

/// Endpoint settings shared by both sides.
pub fn tune_endpoint(cfg: &mut EndpointConfig) {
    // Within quinn's accepted range, so this cannot fail.
    let _ = cfg.max_udp_payload_size(MAX_UDP_PAYLOAD);
}

/// Bind the tunnel's UDP socket with receive and send buffers large enough
/// to absorb bursts at Gbit/s rates (the kernel caps them at
/// `net.core.rmem_max` / `wmem_max`): drops in the socket buffer look like
/// congestion to QUIC and halve its sending rate.
pub fn bind_udp(addr: std::net::SocketAddr) -> std::io::Result<std::net::UdpSocket> {
    let domain = socket2::Domain::for_address(addr);
    let sock = socket2::Socket::new(domain, socket2::Type::DGRAM, Some(socket2::Protocol::UDP))?;
    // Best effort: a smaller buffer still works, only slower.
    let _ = sock.set_recv_buffer_size(UDP_BUFFER);
    let _ = sock.set_send_buffer_size(UDP_BUFFER);
    if addr.is_ipv6() {
        let _ = sock.set_only_v6(false);
    }
    sock.bind(&addr.into())?;
    Ok(sock.into())
}

/// Requested UDP socket buffer size.
pub const UDP_BUFFER: usize = 4 * 1024 * 1024;

/// Data streams are opened by the control plane only; the agent opens the
/// control stream and, during a self-update, one stream fetching a release.
pub const AGENT_ACCEPTS_STREAMS: u32 = 20_000;
pub const CP_ACCEPTS_STREAMS: u32 = 2;

fn base(l: &Liveness) -> TransportConfig {
    let mut t = TransportConfig::default();
    let idle = IdleTimeout::try_from(l.idle_timeout)
        .unwrap_or_else(|_| IdleTimeout::from(VarInt::from_u32(30_000)));
    t.max_idle_timeout(Some(idle))
        .stream_receive_window(VarInt::from_u32(STREAM_WINDOW))
        .receive_window(VarInt::from_u32(CONN_WINDOW))
        .send_window(SEND_WINDOW)
        .max_concurrent_uni_streams(VarInt::from_u32(0))
        .datagram_receive_buffer_size(None);
    let mut mtud = MtuDiscoveryConfig::default();
    mtud.upper_bound(MAX_UDP_PAYLOAD);
    t.mtu_discovery_config(Some(mtud));
    t
}

/// The agent's side: keeps the tunnel alive and accepts many data streams.
pub fn agent_transport(l: &Liveness) -> Arc<TransportConfig> {
    let mut t = base(l);
    t.keep_alive_interval(Some(l.keep_alive))
        .max_concurrent_bidi_streams(VarInt::from_u32(AGENT_ACCEPTS_STREAMS));
    Arc::new(t)
}

/// The control plane's side: an agent may open its control stream and one
/// release fetch at a time.
pub fn control_plane_transport(l: &Liveness) -> Arc<TransportConfig> {
    let mut t = base(l);
    t.max_concurrent_bidi_streams(VarInt::from_u32(CP_ACCEPTS_STREAMS));
    Arc::new(t)
}
