//! `sink`: the target server of the benchmark harness.
//!
//! Prints `listening 127.0.0.1:PORT` as its first stdout line, then serves
//! until killed. Every socket has TCP_NODELAY set.
//!
//! # Protocol
//! The client opens a connection (directly or through a proxy) and sends a
//! 9-byte header: one mode byte, then a big-endian `u64` argument. The sink
//! never speaks first.
//!
//! | mode | argument  | sink behaviour |
//! |------|-----------|----------------|
//! | `D`  | N         | download: writes N zero bytes in 256 KiB writes, then closes |
//! | `U`  | N         | upload: reads exactly N bytes, replies with the count read (`u64` BE), closes |
//! | `E`  | size hint | echo: writes back everything it reads until EOF; the hint (clamped to 4..=256 KiB) sizes the buffer |
//! | `R`  | N         | response: writes N zero bytes (e.g. 1 KiB for connection-rate tests), then closes |
//!
//! An unknown mode byte closes the connection. The encoder/decoder lives in
//! `tests/src/bench/proto.rs`, shared with `lg`.
#![forbid(unsafe_code)]

#[path = "../bench/proto.rs"]
mod proto;

use std::time::Duration;

use anyhow::Context;
use clap::Parser;
use proto::{CHUNK, HEADER_LEN, Request};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

static ZEROS: [u8; CHUNK] = [0u8; CHUNK];

#[derive(Parser, Debug)]
#[command(about = "Benchmark target server (download/upload/echo/response)")]
struct Args {
    /// Address to listen on.
    #[arg(long, default_value = "127.0.0.1:0")]
    listen: String,
    /// Tokio worker threads (0 = one per core).
    #[arg(long, default_value_t = 0)]
    threads: usize,
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    proto::raise_nofile();
    let mut rt = tokio::runtime::Builder::new_multi_thread();
    if args.threads > 0 {
        rt.worker_threads(args.threads);
    }
    rt.enable_all().build()?.block_on(run(args))
}

async fn run(args: Args) -> anyhow::Result<()> {
    let listener = TcpListener::bind(&args.listen)
        .await
        .with_context(|| format!("bind {}", args.listen))?;
    println!("listening {}", listener.local_addr()?);
    loop {
        match listener.accept().await {
            Ok((stream, _)) => {
                tokio::spawn(async move {
                    // A peer vanishing mid-transfer is normal in load tests.
                    let _ = serve(stream).await;
                });
            }
            Err(e) => {
                // EMFILE and friends: back off instead of spinning.
                eprintln!("sink: accept: {e}");
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
    }
}

async fn serve(mut stream: TcpStream) -> std::io::Result<()> {
    stream.set_nodelay(true)?;
    let mut header = [0u8; HEADER_LEN];
    stream.read_exact(&mut header).await?;
    match Request::decode(&header) {
        Some(Request::Download(n)) | Some(Request::Response(n)) => {
            write_zeros(&mut stream, n).await?;
            stream.shutdown().await?;
        }
        Some(Request::Upload(n)) => {
            let mut buf = vec![0u8; CHUNK];
            let mut got = 0u64;
            while got < n {
                let want = usize::try_from(n - got).unwrap_or(CHUNK).min(CHUNK);
                let r = stream.read(&mut buf[..want]).await?;
                if r == 0 {
                    break;
                }
                got += r as u64;
            }
            stream.write_all(&got.to_be_bytes()).await?;
            stream.shutdown().await?;
        }
        Some(Request::Echo(hint)) => {
            let size = usize::try_from(hint).unwrap_or(CHUNK).clamp(4096, CHUNK);
            let mut buf = vec![0u8; size];
            loop {
                let r = stream.read(&mut buf).await?;
                if r == 0 {
                    break;
                }
                stream.write_all(&buf[..r]).await?;
            }
        }
        None => {}
    }
    Ok(())
}

async fn write_zeros(stream: &mut TcpStream, mut n: u64) -> std::io::Result<()> {
    while n > 0 {
        let len = usize::try_from(n).unwrap_or(CHUNK).min(CHUNK);
        stream.write_all(&ZEROS[..len]).await?;
        n -= len as u64;
    }
    Ok(())
}
