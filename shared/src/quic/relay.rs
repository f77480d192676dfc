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

use std::io;
use std::net::Shutdown;

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

/// Relay until both directions end. `pending_to_tcp` is data already read
/// from the QUIC stream (behind a frame) that must reach TCP first.
pub async fn relay(
    tcp: &TcpStream,
    send: &mut SendStream,
    recv: &mut RecvStream,
    pending_to_tcp: Bytes,
) -> RelayStats {
    let mut stats = RelayStats::default();
    let failed = {
        let up = tcp_to_quic(tcp, send, &mut stats.to_quic);
        let down = quic_to_tcp(recv, tcp, pending_to_tcp, &mut stats.to_tcp);
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

async fn tcp_to_quic(tcp: &TcpStream, send: &mut SendStream, moved: &mut u64) -> io::Result<()> {
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
                send.write_chunk(buf.split().freeze())
                    .await
                    .map_err(io::Error::other)?;
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

async fn quic_to_tcp(
    recv: &mut RecvStream,
    tcp: &TcpStream,
    pending: Bytes,
    moved: &mut u64,
) -> io::Result<()> {
    if !pending.is_empty() {
        write_all(tcp, &pending).await?;
        *moved += pending.len() as u64;
    }
    // Everything quinn has ready goes out in one vectored write: a large
    // message arrives as many datagram-sized chunks, and one write per
    // chunk would cost a syscall and a wake-up of the reader each.
    let mut chunks: [Bytes; BATCH] = Default::default();
    loop {
        match recv.read_chunks(&mut chunks).await {
            Ok(Some(n)) => {
                *moved += write_all_vectored(tcp, &mut chunks[..n]).await?;
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
