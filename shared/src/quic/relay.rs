//! Moving bytes between a TCP socket and a QUIC bidirectional stream.
//!
//! Both directions run concurrently on the same `&TcpStream` (tokio's
//! readiness API works through a shared reference), with half-close: EOF
//! from TCP finishes the QUIC stream and the end of the QUIC stream shuts
//! down TCP's write side, while the other direction keeps going. An error in
//! either direction aborts both.
//!
//! Memory: the TCP→QUIC direction allocates its read buffer only once the
//! socket is readable and drops it when the socket drains, and QUIC→TCP
//! takes chunks straight from quinn's receive buffer, so an idle flow holds
//! no copy buffers at all. Backpressure comes from quinn's flow control on
//! one side and from the TCP send buffer on the other.
//!
//! Rate limits: [`relay_throttled`] takes an optional [`Throttle`] that is
//! told about every chunk as the relay hands it on and may answer with a
//! pause for that direction, taken once the chunk is handed over; a paused
//! direction reads nothing, so the pause turns into backpressure on its
//! sender. [`relay`] (no throttle) runs the same loops with the pacing point
//! compiled out: it is a generic whose unthrottled form can never pause, and
//! the relay's future is as large as before throttling existed.

use std::future::Future;
use std::io;
use std::net::Shutdown;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use quinn::{ReadError, RecvStream, SendStream, VarInt};
use tokio::net::TcpStream;

use crate::wire::close_code;

/// Bytes read from TCP per chunk handed to quinn.
const CHUNK: usize = 64 * 1024;

/// How a relay ended, and how much it moved.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct RelayStats {
    /// TCP → QUIC.
    pub to_quic: u64,
    /// QUIC → TCP.
    pub to_tcp: u64,
    /// Both directions ended with a clean EOF.
    pub clean: bool,
}

/// Which way bytes move through the relay.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Direction {
    /// TCP → QUIC. On the control plane: customer → target (upload).
    ToQuic,
    /// QUIC → TCP. On the control plane: target → customer (download).
    ToTcp,
}

/// Rate control for one relayed connection.
///
/// Object safe on purpose: the relay holds a `&dyn Throttle` and does the
/// waiting itself, so implementations are plain synchronous bookkeeping
/// (typically token buckets on atomics) and need no async trait.
pub trait Throttle: Send + Sync {
    /// `n` bytes (`n > 0`) are being handed on in `dir`. Returns how long
    /// that direction must pause after the handover before it reads more, or
    /// `None` to go on at once.
    ///
    /// Called once per chunk on the hot path: must not block or allocate.
    /// The bytes are already accounted when this returns, so a relay that is
    /// dropped during the pause leaves the throttle consistent.
    fn pace(&self, dir: Direction, n: usize) -> Option<Duration>;
}

/// Relay until both directions end. `pending_to_tcp` is data already read
/// from the QUIC stream (behind a frame) that must reach TCP first.
///
/// A plain `fn` handing out the inner future, so the unthrottled relay's
/// state is exactly the copy loops' (an `async fn` wrapper would add its
/// own frame to every flow).
pub fn relay(
    tcp: &TcpStream,
    send: &mut SendStream,
    recv: &mut RecvStream,
    pending_to_tcp: Bytes,
) -> impl Future<Output = RelayStats> {
    relay_paced(tcp, send, recv, pending_to_tcp, Unpaced)
}

/// [`relay`] with an optional [`Throttle`]; `None` takes exactly the
/// unthrottled path.
pub async fn relay_throttled(
    tcp: &TcpStream,
    send: &mut SendStream,
    recv: &mut RecvStream,
    pending_to_tcp: Bytes,
    throttle: Option<&dyn Throttle>,
) -> RelayStats {
    match throttle {
        None => relay_paced(tcp, send, recv, pending_to_tcp, Unpaced).await,
        Some(t) => relay_paced(tcp, send, recv, pending_to_tcp, Paced(t)).await,
    }
}

/// Where the copy loops ask whether to pause. A generic rather than an
/// `Option<&dyn Throttle>` so that the unthrottled loops carry neither the
/// branch nor a timer in their state; passed by value, so the unthrottled
/// form (a zero-sized type) adds no bytes to them either.
trait Pacer: Copy {
    type Pause: Future<Output = ()>;
    fn pause(&self, dir: Direction, n: usize) -> Option<Self::Pause>;
}

#[derive(Clone, Copy)]
struct Unpaced;

impl Pacer for Unpaced {
    type Pause = NoPause;
    #[inline(always)]
    fn pause(&self, _: Direction, _: usize) -> Option<Self::Pause> {
        None
    }
}

/// The unthrottled pause: uninhabited, so the loops' pause states are
/// unreachable and take no room.
enum NoPause {}

impl Future for NoPause {
    type Output = ();
    fn poll(self: std::pin::Pin<&mut Self>, _: &mut std::task::Context<'_>) -> std::task::Poll<()> {
        match *self {}
    }
}

#[derive(Clone, Copy)]
struct Paced<'a>(&'a dyn Throttle);

impl Pacer for Paced<'_> {
    type Pause = tokio::time::Sleep;
    fn pause(&self, dir: Direction, n: usize) -> Option<Self::Pause> {
        if n == 0 {
            return None;
        }
        self.0.pace(dir, n).map(tokio::time::sleep)
    }
}

async fn relay_paced<P: Pacer>(
    tcp: &TcpStream,
    send: &mut SendStream,
    recv: &mut RecvStream,
    pending_to_tcp: Bytes,
    pacer: P,
) -> RelayStats {
    let mut stats = RelayStats::default();
    let failed = {
        let up = tcp_to_quic(tcp, send, &mut stats.to_quic, pacer);
        let down = quic_to_tcp(recv, tcp, pending_to_tcp, &mut stats.to_tcp, pacer);
        tokio::pin!(up, down);
        let (mut up_done, mut down_done) = (false, false);
        loop {
            tokio::select! {
                r = &mut up, if !up_done => {
                    if r.is_err() { break true; }
                    up_done = true;
                }
                r = &mut down, if !down_done => {
                    if r.is_err() { break true; }
                    down_done = true;
                }
            }
            if up_done && down_done {
                break false;
            }
        }
    };
    if failed {
        let code = VarInt::from_u32(close_code::STREAM_ABORTED);
        let _ = send.reset(code);
        let _ = recv.stop(code);
        abort_on_close(tcp);
    }
    stats.clean = !failed;
    stats
}

async fn tcp_to_quic<P: Pacer>(
    tcp: &TcpStream,
    send: &mut SendStream,
    moved: &mut u64,
    pacer: P,
) -> io::Result<()> {
    let mut buf = BytesMut::new();
    loop {
        tcp.readable().await?;
        if buf.capacity() == buf.len() {
            buf.reserve(CHUNK);
        }
        match tcp.try_read_buf(&mut buf) {
            Ok(0) => {
                let _ = send.finish();
                return Ok(());
            }
            Ok(n) => {
                *moved += n as u64;
                // Asked before the write (so `n` is not kept across it) and
                // awaited after it: the chunk is quinn's by then, so a
                // throttled flow holds no buffer while it waits, and the
                // write's own time counts toward the pause.
                let pause = pacer.pause(Direction::ToQuic, n);
                send.write_chunk(buf.split().freeze())
                    .await
                    .map_err(io::Error::other)?;
                if let Some(pause) = pause {
                    pause.await;
                }
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                if buf.is_empty() {
                    // Drained: give the buffer back while the flow idles.
                    buf = BytesMut::new();
                }
            }
            Err(e) => return Err(e),
        }
    }
}

async fn quic_to_tcp<P: Pacer>(
    recv: &mut RecvStream,
    tcp: &TcpStream,
    pending: Bytes,
    moved: &mut u64,
    pacer: P,
) -> io::Result<()> {
    if !pending.is_empty() {
        write_all(tcp, &pending).await?;
        *moved += pending.len() as u64;
        if let Some(pause) = pacer.pause(Direction::ToTcp, pending.len()) {
            pause.await;
        }
    }
    // Everything quinn has ready goes out in one vectored write: a large
    // message arrives as many datagram-sized chunks, and one write per
    // chunk would cost a syscall and a wake-up of the reader each.
    let mut chunks: [Bytes; BATCH] = Default::default();
    loop {
        match recv.read_chunks(&mut chunks).await {
            Ok(Some(n)) => {
                let written = write_all_vectored(tcp, &mut chunks[..n]).await?;
                *moved += written;
                if let Some(pause) = pacer.pause(Direction::ToTcp, written as usize) {
                    pause.await;
                }
            }
            Ok(None) => {
                let _ = socket2::SockRef::from(tcp).shutdown(Shutdown::Write);
                return Ok(());
            }
            Err(ReadError::ClosedStream) => return Ok(()),
            Err(e) => return Err(io::Error::other(e)),
        }
    }
}

/// Chunks taken from quinn per vectored write.
const BATCH: usize = 32;

/// Write every chunk, in order, with as few syscalls as the socket allows;
/// the chunks are released as they are written.
async fn write_all_vectored(tcp: &TcpStream, chunks: &mut [Bytes]) -> io::Result<u64> {
    let total: u64 = chunks.iter().map(|c| c.len() as u64).sum();
    let mut first = 0;
    while first < chunks.len() {
        tcp.writable().await?;
        let slices: Vec<io::IoSlice<'_>> = chunks[first..]
            .iter()
            .map(|c| io::IoSlice::new(c))
            .collect();
        match tcp.try_write_vectored(&slices) {
            Ok(mut n) => {
                while n > 0 && first < chunks.len() {
                    let len = chunks[first].len();
                    if n >= len {
                        n -= len;
                        chunks[first] = Bytes::new();
                        first += 1;
                    } else {
                        let _ = chunks[first].split_to(n);
                        n = 0;
                    }
                }
                while first < chunks.len() && chunks[first].is_empty() {
                    first += 1;
                }
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
            Err(e) => return Err(e),
        }
    }
    Ok(total)
}

/// Make the socket's close send RST instead of FIN. A failed relay must not
/// look like an orderly end: with close-delimited data (HTTP/1.0 bodies,
/// raw protocols) a FIN would pass a truncated transfer off as complete.
pub fn abort_on_close(tcp: &TcpStream) {
    let _ = socket2::SockRef::from(tcp).set_linger(Some(std::time::Duration::ZERO));
}

/// TCP keepalive for customer and target sockets: a peer that vanished
/// without FIN or RST (a phone that lost coverage, a NAT that forgot the
/// mapping) is noticed in about two minutes instead of never, so its flow,
/// stream slot and sockets are released.
pub fn enable_keepalive(tcp: &TcpStream) {
    let ka = socket2::TcpKeepalive::new()
        .with_time(std::time::Duration::from_secs(60))
        .with_interval(std::time::Duration::from_secs(10))
        .with_retries(6);
    let _ = socket2::SockRef::from(tcp).set_tcp_keepalive(&ka);
}

/// Write all of `data` through a shared reference.
pub async fn write_all(tcp: &TcpStream, mut data: &[u8]) -> io::Result<()> {
    while !data.is_empty() {
        tcp.writable().await?;
        match tcp.try_write(data) {
            Ok(n) => data = &data[n..],
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::net::SocketAddr;
    use std::sync::{Arc, Mutex};
    use std::time::Instant;

    use quinn::crypto::rustls::{QuicClientConfig, QuicServerConfig};
    use quinn::{Endpoint, ServerConfig};
    use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
    use rustls::pki_types::{CertificateDer, PrivatePkcs8KeyDer, ServerName, UnixTime};
    use rustls::server::{ClientHello, ResolvesServerCert};
    use rustls::sign::CertifiedKey;
    use rustls::{DigitallySignedStruct, SignatureScheme};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpListener;

    use super::*;

    /// A throttle without burst: every byte costs `1/rate` seconds, so N
    /// bytes can never pass in less than about N/rate.
    struct Steady {
        rate: f64,
        next: Mutex<Instant>,
        seen: Mutex<[u64; 2]>,
    }

    impl Steady {
        fn new(rate: u64) -> Self {
            Self {
                rate: rate as f64,
                next: Mutex::new(Instant::now()),
                seen: Mutex::new([0; 2]),
            }
        }
    }

    impl Throttle for Steady {
        fn pace(&self, dir: Direction, n: usize) -> Option<Duration> {
            self.seen.lock().unwrap()[dir as usize] += n as u64;
            let now = Instant::now();
            let mut next = self.next.lock().unwrap();
            *next = (*next).max(now) + Duration::from_secs_f64(n as f64 / self.rate);
            Some(*next - now)
        }
    }

    // The relay does not care who the peer is; the test tunnel runs TLS with
    // a fixed key and a client that accepts any certificate.
    #[derive(Debug)]
    struct AnyServer;

    impl ServerCertVerifier for AnyServer {
        fn verify_server_cert(
            &self,
            _: &CertificateDer<'_>,
            _: &[CertificateDer<'_>],
            _: &ServerName<'_>,
            _: &[u8],
            _: UnixTime,
        ) -> Result<ServerCertVerified, rustls::Error> {
            Ok(ServerCertVerified::assertion())
        }
        fn verify_tls12_signature(
            &self,
            _: &[u8],
            _: &CertificateDer<'_>,
            _: &DigitallySignedStruct,
        ) -> Result<HandshakeSignatureValid, rustls::Error> {
            Ok(HandshakeSignatureValid::assertion())
        }
        fn verify_tls13_signature(
            &self,
            _: &[u8],
            _: &CertificateDer<'_>,
            _: &DigitallySignedStruct,
        ) -> Result<HandshakeSignatureValid, rustls::Error> {
            Ok(HandshakeSignatureValid::assertion())
        }
        fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
            vec![SignatureScheme::ED25519]
        }
    }

    #[derive(Debug)]
    struct FixedKey(Arc<CertifiedKey>);

    impl ResolvesServerCert for FixedKey {
        fn resolve(&self, _: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
            Some(self.0.clone())
        }
    }

    /// An Ed25519 key in PKCS#8 v1 form: the fixed header, then the seed.
    fn test_key() -> PrivatePkcs8KeyDer<'static> {
        let mut der = vec![
            0x30, 0x2e, 0x02, 0x01, 0x00, 0x30, 0x05, 0x06, 0x03, 0x2b, 0x65, 0x70, 0x04, 0x22,
            0x04, 0x20,
        ];
        der.extend_from_slice(&[7u8; 32]);
        PrivatePkcs8KeyDer::from(der)
    }

    /// A connected QUIC pair on loopback: (client endpoint, server endpoint,
    /// client-side connection, server-side connection).
    async fn quic_pair() -> (Endpoint, Endpoint, quinn::Connection, quinn::Connection) {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let key = rustls::crypto::ring::sign::any_eddsa_type(&test_key()).unwrap();
        let certified = CertifiedKey::new(vec![CertificateDer::from(vec![0x30, 0x00])], key);
        let server_tls = rustls::ServerConfig::builder_with_provider(provider.clone())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .unwrap()
            .with_no_client_auth()
            .with_cert_resolver(Arc::new(FixedKey(Arc::new(certified))));
        let server_cfg =
            ServerConfig::with_crypto(Arc::new(QuicServerConfig::try_from(server_tls).unwrap()));
        let loopback: SocketAddr = "127.0.0.1:0".parse().unwrap();
        let server = Endpoint::server(server_cfg, loopback).unwrap();
        let client_tls = rustls::ClientConfig::builder_with_provider(provider)
            .with_protocol_versions(&[&rustls::version::TLS13])
            .unwrap()
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(AnyServer))
            .with_no_client_auth();
        let client_cfg =
            quinn::ClientConfig::new(Arc::new(QuicClientConfig::try_from(client_tls).unwrap()));
        let client = Endpoint::client(loopback).unwrap();
        let connecting = client
            .connect_with(client_cfg, server.local_addr().unwrap(), "relay.test")
            .unwrap();
        let (c, s) = tokio::join!(connecting, async {
            server.accept().await.unwrap().await.unwrap()
        });
        (client, server, c.unwrap(), s)
    }

    /// Relay one TCP connection and one QUIC stream: the customer writes
    /// `up` bytes into TCP, the far QUIC end writes `down` bytes; both ends
    /// read everything. Returns what each end received, the relay's stats,
    /// and how long the whole exchange took.
    async fn exchange(
        up: usize,
        down: usize,
        throttle: Option<&dyn Throttle>,
    ) -> (Vec<u8>, Vec<u8>, RelayStats, Duration) {
        let (_client_ep, _server_ep, near, far) = quic_pair().await;
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (customer, accepted) = tokio::join!(TcpStream::connect(addr), listener.accept());
        let mut customer = customer.unwrap();
        let (relayed_tcp, _) = accepted.unwrap();
        let (mut send, mut recv) = near.open_bi().await.unwrap();
        let up_data: Vec<u8> = (0..up).map(|i| (i % 251) as u8).collect();
        let down_data: Vec<u8> = (0..down).map(|i| (i % 241) as u8).collect();
        let started = Instant::now();
        let customer_side = async {
            let (mut rd, mut wr) = customer.split();
            let write = async {
                wr.write_all(&up_data).await.unwrap();
                wr.shutdown().await.unwrap();
            };
            let mut got = Vec::new();
            let read = rd.read_to_end(&mut got);
            let (_, r) = tokio::join!(write, read);
            r.unwrap();
            got
        };
        let far_side = async {
            // The stream reaches the far end with its first frame.
            let (mut fs, mut fr) = far.accept_bi().await.unwrap();
            let write = async {
                fs.write_all(&down_data).await.unwrap();
                fs.finish().unwrap();
            };
            let read = fr.read_to_end(usize::MAX);
            let (_, r) = tokio::join!(write, read);
            let got = r.unwrap();
            // Keep the stream open until the peer has everything.
            let _ = fs.stopped().await;
            got
        };
        let relay_side = async {
            let stats =
                relay_throttled(&relayed_tcp, &mut send, &mut recv, Bytes::new(), throttle).await;
            drop(relayed_tcp);
            stats
        };
        let (got_down, got_up, stats) = tokio::join!(customer_side, far_side, relay_side);
        let elapsed = started.elapsed();
        assert_eq!(got_up, up_data, "upload corrupted");
        assert_eq!(got_down, down_data, "download corrupted");
        (got_up, got_down, stats, elapsed)
    }

    #[tokio::test]
    async fn unthrottled_moves_everything_both_ways() {
        let (up, down, stats, _) = exchange(300_000, 500_000, None).await;
        assert_eq!((up.len(), down.len()), (300_000, 500_000));
        assert_eq!(stats.to_quic, 300_000);
        assert_eq!(stats.to_tcp, 500_000);
        assert!(stats.clean);
    }

    #[tokio::test]
    async fn throttled_upload_takes_at_least_n_over_r() {
        let (n, rate) = (400_000usize, 1_000_000u64);
        let steady = Steady::new(rate);
        let (_, _, stats, took) = exchange(n, 0, Some(&steady)).await;
        assert!(stats.clean);
        assert_eq!(*steady.seen.lock().unwrap(), [n as u64, 0]);
        let floor = Duration::from_secs_f64(0.8 * n as f64 / rate as f64);
        assert!(took >= floor, "{n} bytes at {rate} B/s took {took:?}");
    }

    #[tokio::test]
    async fn throttled_download_takes_at_least_n_over_r() {
        let (n, rate) = (400_000usize, 1_000_000u64);
        let steady = Steady::new(rate);
        let (_, _, stats, took) = exchange(0, n, Some(&steady)).await;
        assert!(stats.clean);
        assert_eq!(*steady.seen.lock().unwrap(), [0, n as u64]);
        let floor = Duration::from_secs_f64(0.8 * n as f64 / rate as f64);
        assert!(took >= floor, "{n} bytes at {rate} B/s took {took:?}");
    }

    #[tokio::test]
    async fn a_throttle_that_never_pauses_changes_nothing() {
        struct Free;
        impl Throttle for Free {
            fn pace(&self, _: Direction, _: usize) -> Option<Duration> {
                None
            }
        }
        let (up, down, stats, _) = exchange(200_000, 200_000, Some(&Free)).await;
        assert_eq!((up.len(), down.len()), (200_000, 200_000));
        assert_eq!((stats.to_quic, stats.to_tcp), (200_000, 200_000));
    }
}
