//! `lg`: the load generator of the benchmark harness.
//!
//! Talks to the `sink` (see `sink.rs` for its 9-byte request protocol) either
//! directly (`--direct`, the physical-limit reference) or through a proxy:
//! `--proxy socks5://[user:pass@]host:port` or `--proxy http://[user:pass@]host:port`
//! (HTTP CONNECT with `Proxy-Authorization: Basic`). User and password are
//! taken literally (no percent-decoding). TCP_NODELAY is set on every socket.
//!
//! Each mode prints exactly one JSON result line on stdout (`idle` prints one
//! extra `{"phase":"holding",...}` line first, when all its connections are
//! open). On failure it prints `{"mode":..,"error":..}` and exits with 1.
//!
//! ```text
//! lg --direct --target 127.0.0.1:9000 bulk --bytes 1073741824 [--upload]
//! lg --proxy socks5://u:p@127.0.0.1:1080 --target 127.0.0.1:9000 cps --workers 32 --duration-secs 3
//! lg --proxy http://u:p@127.0.0.1:8080 --target 127.0.0.1:9000 rtt --size 64 --count 2000
//! lg --proxy socks5://127.0.0.1:1080 --target 127.0.0.1:9000 idle --conns 10000 --hold-secs 5
//! ```
#![forbid(unsafe_code)]

#[path = "../bench/proto.rs"]
mod proto;

use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use base64::Engine;
use clap::{Parser, Subcommand};
use proto::{CHUNK, Request};
use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::task::JoinSet;

/// An exchange at least this slow counts as a stall (Nagle meeting delayed ACK costs ~40 ms).
const STALL: Duration = Duration::from_millis(10);

#[derive(Parser, Debug)]
#[command(about = "Load generator: bulk, cps, rtt and idle through SOCKS5 / HTTP CONNECT / direct")]
struct Args {
    /// Proxy URL: socks5://[user:pass@]host:port or http://[user:pass@]host:port.
    #[arg(long, global = true, conflicts_with = "direct")]
    proxy: Option<String>,
    /// Connect straight to the target (physical-limit reference).
    #[arg(long, global = true)]
    direct: bool,
    /// The sink, host:port.
    #[arg(long, global = true)]
    target: Option<String>,
    /// Hard bound on the whole run.
    #[arg(long, global = true, default_value_t = 300)]
    timeout_secs: u64,
    /// Runtime threads; 0 = 1 for bulk/rtt (current-thread), one per core for cps/idle.
    #[arg(long, global = true, default_value_t = 0)]
    threads: usize,
    #[command(subcommand)]
    mode: Mode,
}

#[derive(Subcommand, Debug, Clone)]
enum Mode {
    /// One connection: download (or upload) N bytes.
    Bulk {
        #[arg(long, default_value_t = 1 << 30)]
        bytes: u64,
        #[arg(long)]
        upload: bool,
    },
    /// Connection rate: connect + handshake + request + small response + close, per iteration.
    Cps {
        #[arg(long, default_value_t = 32)]
        workers: usize,
        #[arg(long, default_value_t = 3.0)]
        duration_secs: f64,
        #[arg(long, default_value_t = 1024)]
        response_bytes: u64,
        /// Per-iteration bound; a slower iteration counts as an error.
        #[arg(long, default_value_t = 5.0)]
        iteration_timeout_secs: f64,
    },
    /// Ping-pong latency on one established connection.
    Rtt {
        #[arg(long, default_value_t = 64)]
        size: usize,
        #[arg(long, default_value_t = 2000)]
        count: usize,
        /// Stop early (reporting `truncated`) after this long, e.g. when every exchange stalls.
        #[arg(long, default_value_t = 20.0)]
        max_secs: f64,
    },
    /// Open N connections, prove each is live, hold them, close.
    Idle {
        #[arg(long, default_value_t = 10_000)]
        conns: usize,
        #[arg(long, default_value_t = 5.0)]
        hold_secs: f64,
        /// Connections being opened at once.
        #[arg(long, default_value_t = 256)]
        concurrency: usize,
        /// Per-connection bound on open + handshake + first exchange.
        #[arg(long, default_value_t = 10.0)]
        open_timeout_secs: f64,
    },
}

impl Mode {
    fn name(&self) -> &'static str {
        match self {
            Mode::Bulk { .. } => "bulk",
            Mode::Cps { .. } => "cps",
            Mode::Rtt { .. } => "rtt",
            Mode::Idle { .. } => "idle",
        }
    }
}

fn main() {
    let args = Args::parse();
    let mode = args.mode.name();
    proto::raise_nofile();
    let threads = match (args.threads, &args.mode) {
        (0, Mode::Bulk { .. } | Mode::Rtt { .. }) => 1,
        (n, _) => n,
    };
    let rt = if threads == 1 {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
    } else {
        let mut b = tokio::runtime::Builder::new_multi_thread();
        if threads > 0 {
            b.worker_threads(threads);
        }
        b.enable_all().build()
    };
    let result = rt.context("tokio runtime").and_then(|rt| {
        let limit = Duration::from_secs(args.timeout_secs);
        rt.block_on(async move {
            match tokio::time::timeout(limit, run(args)).await {
                Ok(r) => r,
                Err(_) => bail!("timed out after {}s", limit.as_secs()),
            }
        })
    });
    match result {
        Ok(v) => println!("{v}"),
        Err(e) => {
            let msg = format!("{e:#}");
            eprintln!("lg {mode}: {msg}");
            println!("{}", json!({ "mode": mode, "error": msg }));
            std::process::exit(1);
        }
    }
}

async fn run(args: Args) -> anyhow::Result<serde_json::Value> {
    let target = args
        .target
        .clone()
        .context("--target host:port is required")?;
    let dialer = match (&args.proxy, args.direct) {
        (Some(url), false) => Dialer::proxy(url, &target).await?,
        (None, true) => Dialer::direct(&target).await?,
        _ => bail!("exactly one of --proxy URL or --direct is required"),
    };
    let mut out = match args.mode {
        Mode::Bulk { bytes, upload } => bulk(&dialer, bytes, upload).await?,
        Mode::Cps {
            workers,
            duration_secs,
            response_bytes,
            iteration_timeout_secs,
        } => {
            cps(
                dialer.clone(),
                workers,
                secs(duration_secs),
                response_bytes,
                secs(iteration_timeout_secs),
            )
            .await?
        }
        Mode::Rtt {
            size,
            count,
            max_secs,
        } => rtt(&dialer, size, count, secs(max_secs)).await?,
        Mode::Idle {
            conns,
            hold_secs,
            concurrency,
            open_timeout_secs,
        } => {
            idle(
                dialer.clone(),
                conns,
                secs(hold_secs),
                concurrency,
                secs(open_timeout_secs),
            )
            .await?
        }
    };
    out["via"] = json!(dialer.label());
    Ok(out)
}

fn secs(s: f64) -> Duration {
    Duration::from_secs_f64(s.max(0.0))
}

// ---------------------------------------------------------------------------
// Dialing: direct, SOCKS5, HTTP CONNECT
// ---------------------------------------------------------------------------

#[derive(Clone, Debug)]
enum ProxyKind {
    Direct,
    Socks5 { auth: Option<(String, String)> },
    Http { authorization: Option<String> },
}

#[derive(Clone, Debug)]
struct Dialer {
    kind: ProxyKind,
    /// Where the TCP connection goes: the proxy, or the target when direct.
    connect_to: SocketAddr,
    /// The target as given (`host:port`), for the proxy request.
    target: String,
}

impl Dialer {
    async fn direct(target: &str) -> anyhow::Result<Dialer> {
        Ok(Dialer {
            kind: ProxyKind::Direct,
            connect_to: resolve(target).await?,
            target: target.to_string(),
        })
    }

    async fn proxy(url: &str, target: &str) -> anyhow::Result<Dialer> {
        let (scheme, rest) = url
            .split_once("://")
            .with_context(|| format!("proxy URL {url:?} has no scheme"))?;
        let (userinfo, hostport) = match rest.rsplit_once('@') {
            Some((u, h)) => (Some(u), h),
            None => (None, rest),
        };
        let hostport = hostport.trim_end_matches('/');
        let creds = userinfo.map(|u| match u.split_once(':') {
            Some((user, pass)) => (user.to_string(), pass.to_string()),
            None => (u.to_string(), String::new()),
        });
        let kind = match scheme {
            "socks5" | "socks5h" => ProxyKind::Socks5 { auth: creds },
            "http" => ProxyKind::Http {
                authorization: creds.map(|(u, p)| {
                    let b64 = base64::engine::general_purpose::STANDARD.encode(format!("{u}:{p}"));
                    format!("Basic {b64}")
                }),
            },
            other => bail!("unsupported proxy scheme {other:?} (use socks5:// or http://)"),
        };
        // Validate the target early: SOCKS5 needs a port.
        split_host_port(target)?;
        Ok(Dialer {
            kind,
            connect_to: resolve(hostport).await?,
            target: target.to_string(),
        })
    }

    fn label(&self) -> &'static str {
        match self.kind {
            ProxyKind::Direct => "direct",
            ProxyKind::Socks5 { .. } => "socks5",
            ProxyKind::Http { .. } => "http-connect",
        }
    }

    /// A connected stream to the sink, handshake done.
    async fn dial(&self) -> anyhow::Result<TcpStream> {
        let mut s = TcpStream::connect(self.connect_to)
            .await
            .with_context(|| format!("connect {}", self.connect_to))?;
        s.set_nodelay(true)?;
        match &self.kind {
            ProxyKind::Direct => {}
            ProxyKind::Socks5 { auth } => socks5_handshake(&mut s, auth.as_ref(), &self.target)
                .await
                .context("socks5 handshake")?,
            ProxyKind::Http { authorization } => {
                http_connect(&mut s, authorization.as_deref(), &self.target)
                    .await
                    .context("http CONNECT")?
            }
        }
        Ok(s)
    }
}

async fn resolve(hostport: &str) -> anyhow::Result<SocketAddr> {
    tokio::net::lookup_host(hostport)
        .await
        .with_context(|| format!("resolve {hostport}"))?
        .next()
        .with_context(|| format!("{hostport} resolved to nothing"))
}

fn split_host_port(target: &str) -> anyhow::Result<(&str, u16)> {
    let (host, port) = target
        .rsplit_once(':')
        .with_context(|| format!("target {target:?} is not host:port"))?;
    let port = port
        .parse()
        .with_context(|| format!("bad port in {target:?}"))?;
    Ok((host.trim_start_matches('[').trim_end_matches(']'), port))
}

async fn socks5_handshake(
    s: &mut TcpStream,
    auth: Option<&(String, String)>,
    target: &str,
) -> anyhow::Result<()> {
    let method = if auth.is_some() { 0x02 } else { 0x00 };
    s.write_all(&[0x05, 0x01, method]).await?;
    let mut choice = [0u8; 2];
    s.read_exact(&mut choice).await.context("method reply")?;
    if choice[0] != 0x05 {
        bail!("not a SOCKS5 server (version byte {:#04x})", choice[0]);
    }
    if choice[1] != method {
        bail!(
            "server refused auth method {method:#04x} (chose {:#04x})",
            choice[1]
        );
    }
    if let Some((user, pass)) = auth {
        let (u, p) = (user.as_bytes(), pass.as_bytes());
        if u.len() > 255 || p.len() > 255 {
            bail!("SOCKS5 user/password longer than 255 bytes");
        }
        let mut msg = Vec::with_capacity(3 + u.len() + p.len());
        msg.push(0x01);
        msg.push(u.len() as u8);
        msg.extend_from_slice(u);
        msg.push(p.len() as u8);
        msg.extend_from_slice(p);
        s.write_all(&msg).await?;
        let mut st = [0u8; 2];
        s.read_exact(&mut st).await.context("auth reply")?;
        if st[1] != 0x00 {
            bail!("SOCKS5 authentication failed (status {:#04x})", st[1]);
        }
    }
    let (host, port) = split_host_port(target)?;
    let mut req = vec![0x05, 0x01, 0x00];
    match host.parse::<IpAddr>() {
        Ok(IpAddr::V4(v4)) => {
            req.push(0x01);
            req.extend_from_slice(&v4.octets());
        }
        Ok(IpAddr::V6(v6)) => {
            req.push(0x04);
            req.extend_from_slice(&v6.octets());
        }
        Err(_) => {
            if host.len() > 255 {
                bail!("target host name too long for SOCKS5");
            }
            req.push(0x03);
            req.push(host.len() as u8);
            req.extend_from_slice(host.as_bytes());
        }
    }
    req.extend_from_slice(&port.to_be_bytes());
    s.write_all(&req).await?;
    let mut head = [0u8; 4];
    s.read_exact(&mut head).await.context("connect reply")?;
    if head[1] != 0x00 {
        bail!("SOCKS5 CONNECT refused: reply {:#04x}", head[1]);
    }
    let addr_len = match head[3] {
        0x01 => 4,
        0x04 => 16,
        0x03 => {
            let mut l = [0u8; 1];
            s.read_exact(&mut l).await?;
            usize::from(l[0])
        }
        other => bail!("SOCKS5 reply with unknown address type {other:#04x}"),
    };
    let mut rest = vec![0u8; addr_len + 2];
    s.read_exact(&mut rest).await?;
    Ok(())
}

async fn http_connect(
    s: &mut TcpStream,
    authorization: Option<&str>,
    target: &str,
) -> anyhow::Result<()> {
    let mut req = format!("CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n");
    if let Some(a) = authorization {
        req.push_str("Proxy-Authorization: ");
        req.push_str(a);
        req.push_str("\r\n");
    }
    req.push_str("\r\n");
    s.write_all(req.as_bytes()).await?;
    // The sink never speaks first, so everything up to the blank line is the
    // proxy's response; anything after it would be a protocol violation.
    let mut buf = Vec::with_capacity(256);
    let mut chunk = [0u8; 512];
    let end = loop {
        let n = s.read(&mut chunk).await?;
        if n == 0 {
            bail!(
                "proxy closed during CONNECT: {:?}",
                String::from_utf8_lossy(&buf)
            );
        }
        buf.extend_from_slice(&chunk[..n]);
        if let Some(pos) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break pos + 4;
        }
        if buf.len() > 16 * 1024 {
            bail!("CONNECT response header larger than 16 KiB");
        }
    };
    let head = String::from_utf8_lossy(&buf[..end]);
    let status = head
        .lines()
        .next()
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|c| c.parse::<u16>().ok())
        .with_context(|| format!("malformed CONNECT response {head:?}"))?;
    if !(200..300).contains(&status) {
        bail!("proxy answered {}", head.lines().next().unwrap_or_default());
    }
    if end != buf.len() {
        bail!(
            "proxy sent {} unexpected bytes after its CONNECT response",
            buf.len() - end
        );
    }
    Ok(())
}

// ---------------------------------------------------------------------------
// Modes
// ---------------------------------------------------------------------------

async fn bulk(dialer: &Dialer, bytes: u64, upload: bool) -> anyhow::Result<serde_json::Value> {
    let mut s = dialer.dial().await?;
    let mut buf = vec![0u8; CHUNK];
    let start = Instant::now();
    let moved = if upload {
        s.write_all(&Request::Upload(bytes).encode()).await?;
        let mut left = bytes;
        while left > 0 {
            let n = usize::try_from(left).unwrap_or(CHUNK).min(CHUNK);
            s.write_all(&buf[..n]).await.context("upload write")?;
            left -= n as u64;
        }
        let mut count = [0u8; 8];
        s.read_exact(&mut count)
            .await
            .context("upload count reply")?;
        u64::from_be_bytes(count)
    } else {
        s.write_all(&Request::Download(bytes).encode()).await?;
        let mut got = 0u64;
        while got < bytes {
            let n = s.read(&mut buf).await.context("download read")?;
            if n == 0 {
                break;
            }
            got += n as u64;
        }
        got
    };
    let seconds = start.elapsed().as_secs_f64();
    if moved != bytes {
        bail!("transferred {moved} of {bytes} bytes");
    }
    Ok(json!({
        "mode": "bulk",
        "direction": if upload { "upload" } else { "download" },
        "bytes": bytes,
        "seconds": round(seconds, 4),
        "gbit_per_s": round(bytes as f64 * 8.0 / seconds / 1e9, 3),
    }))
}

async fn cps(
    dialer: Dialer,
    workers: usize,
    duration: Duration,
    response_bytes: u64,
    iteration_timeout: Duration,
) -> anyhow::Result<serde_json::Value> {
    let start = Instant::now();
    let deadline = start + duration;
    let mut set = JoinSet::new();
    for _ in 0..workers.max(1) {
        let dialer = dialer.clone();
        set.spawn(async move {
            let mut lat_us: Vec<u64> = Vec::with_capacity(16 * 1024);
            let mut errors = 0u64;
            let mut first_error: Option<String> = None;
            let mut buf = vec![0u8; usize::try_from(response_bytes).unwrap_or(1024)];
            while Instant::now() < deadline {
                let t0 = Instant::now();
                let one = async {
                    let mut s = dialer.dial().await?;
                    s.write_all(&Request::Response(response_bytes).encode())
                        .await?;
                    s.read_exact(&mut buf).await.context("read response")?;
                    anyhow::Ok(())
                };
                match tokio::time::timeout(iteration_timeout, one).await {
                    Ok(Ok(())) => {
                        lat_us.push(u64::try_from(t0.elapsed().as_micros()).unwrap_or(u64::MAX))
                    }
                    Ok(Err(e)) => {
                        errors += 1;
                        first_error.get_or_insert_with(|| format!("{e:#}"));
                        // Don't spin on a proxy that refuses instantly.
                        tokio::time::sleep(Duration::from_millis(1)).await;
                    }
                    Err(_) => {
                        errors += 1;
                        first_error.get_or_insert_with(|| "iteration timed out".into());
                    }
                }
            }
            (lat_us, errors, first_error)
        });
    }
    let mut all = Vec::new();
    let mut errors = 0u64;
    let mut first_error = None;
    while let Some(r) = set.join_next().await {
        let (lat, e, fe) = r.context("cps worker panicked")?;
        all.extend(lat);
        errors += e;
        if first_error.is_none() {
            first_error = fe;
        }
    }
    let elapsed = start.elapsed().as_secs_f64();
    all.sort_unstable();
    if let Some(e) = &first_error {
        eprintln!("lg cps: {errors} errors, first: {e}");
    }
    Ok(json!({
        "mode": "cps",
        "workers": workers,
        "seconds": round(elapsed, 3),
        "connections": all.len(),
        "conn_per_s": round(all.len() as f64 / elapsed, 1),
        "p50_ms": round(pct(&all, 50.0) / 1000.0, 3),
        "p99_ms": round(pct(&all, 99.0) / 1000.0, 3),
        "errors": errors,
        "first_error": first_error,
    }))
}

async fn rtt(
    dialer: &Dialer,
    size: usize,
    count: usize,
    max_time: Duration,
) -> anyhow::Result<serde_json::Value> {
    let size = size.max(1);
    let mut s = dialer.dial().await?;
    s.write_all(&Request::Echo(size as u64).encode()).await?;
    let out = vec![0xA5u8; size];
    let mut back = vec![0u8; size];
    let warmup = (count / 10).min(50);
    // Nanoseconds: loopback exchanges take a few µs, so µs integers are too coarse.
    let mut lat_ns: Vec<u64> = Vec::with_capacity(count);
    let start = Instant::now();
    let mut truncated = false;
    for i in 0..warmup + count {
        if start.elapsed() > max_time {
            truncated = true;
            break;
        }
        let t0 = Instant::now();
        s.write_all(&out).await.context("rtt write")?;
        s.read_exact(&mut back).await.context("rtt read")?;
        let dt = t0.elapsed();
        if i >= warmup {
            lat_ns.push(u64::try_from(dt.as_nanos()).unwrap_or(u64::MAX));
        }
    }
    let stall_ns = u64::try_from(STALL.as_nanos()).unwrap_or(u64::MAX);
    let stalls = lat_ns.iter().filter(|&&ns| ns >= stall_ns).count();
    lat_ns.sort_unstable();
    let us = |ns: f64| round(ns / 1000.0, 1);
    Ok(json!({
        "mode": "rtt",
        "size": size,
        "exchanges": lat_ns.len(),
        "truncated": truncated,
        "p50_us": us(pct(&lat_ns, 50.0)),
        "p99_us": us(pct(&lat_ns, 99.0)),
        "max_us": us(lat_ns.last().copied().unwrap_or(0) as f64),
        "stalls": stalls,
    }))
}

async fn idle(
    dialer: Dialer,
    conns: usize,
    hold: Duration,
    concurrency: usize,
    open_timeout: Duration,
) -> anyhow::Result<serde_json::Value> {
    let start = Instant::now();
    let mut open: Vec<TcpStream> = Vec::with_capacity(conns);
    let mut errors = 0usize;
    let mut first_error: Option<String> = None;
    let mut set = JoinSet::new();
    let mut spawned = 0usize;
    loop {
        while set.len() < concurrency.max(1) && spawned < conns {
            spawned += 1;
            let dialer = dialer.clone();
            set.spawn(async move {
                tokio::time::timeout(open_timeout, async {
                    let mut s = dialer.dial().await?;
                    s.write_all(&Request::Echo(1).encode()).await?;
                    ping(&mut s).await?;
                    anyhow::Ok(s)
                })
                .await
                .unwrap_or_else(|_| Err(anyhow::anyhow!("open timed out")))
            });
        }
        match set.join_next().await {
            Some(Ok(Ok(s))) => open.push(s),
            Some(Ok(Err(e))) => {
                errors += 1;
                first_error.get_or_insert_with(|| format!("{e:#}"));
            }
            Some(Err(e)) => bail!("idle opener panicked: {e}"),
            None => break,
        }
    }
    let open_seconds = start.elapsed().as_secs_f64();
    if let Some(e) = &first_error {
        eprintln!("lg idle: {errors} connections failed, first: {e}");
    }
    // The harness measures memory when it sees this line.
    println!(
        "{}",
        json!({
            "phase": "holding",
            "opened": open.len(),
            "errors": errors,
            "open_seconds": round(open_seconds, 3),
        })
    );
    tokio::time::sleep(hold).await;

    // Prove the held connections survived the hold, then close them.
    let opened = open.len();
    let mut alive = 0usize;
    let mut pending = open.into_iter();
    let mut set = JoinSet::new();
    loop {
        while set.len() < concurrency.max(1) {
            let Some(mut s) = pending.next() else { break };
            set.spawn(async move {
                matches!(
                    tokio::time::timeout(open_timeout, ping(&mut s)).await,
                    Ok(Ok(()))
                )
            });
        }
        match set.join_next().await {
            Some(Ok(true)) => alive += 1,
            Some(_) => {}
            None => break,
        }
    }
    Ok(json!({
        "mode": "idle",
        "conns": conns,
        "opened": opened,
        "errors": errors,
        "alive_after_hold": alive,
        "open_seconds": round(open_seconds, 3),
        "hold_secs": hold.as_secs_f64(),
        "first_error": first_error,
    }))
}

/// One 1-byte echo exchange.
async fn ping(s: &mut TcpStream) -> anyhow::Result<()> {
    s.write_all(b"p").await?;
    let mut b = [0u8; 1];
    s.read_exact(&mut b).await.context("echo")?;
    Ok(())
}

/// Nearest-rank percentile of sorted samples (0 when empty).
fn pct(sorted: &[u64], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let idx = ((p / 100.0) * (sorted.len() - 1) as f64).round() as usize;
    sorted[idx.min(sorted.len() - 1)] as f64
}

fn round(x: f64, digits: i32) -> f64 {
    let f = 10f64.powi(digits);
    (x * f).round() / f
}
