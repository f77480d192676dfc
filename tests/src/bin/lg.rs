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
//! lg --proxy http://u:p@127.0.0.1:8080 --target 127.0.0.1:9100 active --conns 1000 --forward
//! lg serve-http --listen 127.0.0.1:0
//! ```
//!
//! `active` and `serve-http` speak HTTP/1.1 instead of the sink protocol:
//! `serve-http` is a keep-alive origin answering `GET /r/N` with N zero bytes,
//! and `active` holds N keep-alive connections to it, each sending one GET per
//! interval (through a CONNECT or SOCKS5 tunnel, straight, or with `--forward`
//! as absolute-form requests to the HTTP proxy). It prints
//! `{"phase":"established"}` once every connection is open,
//! `{"phase":"window"}` when its measuring window starts and
//! `{"phase":"window_end"}` when it ends, so a harness can read CPU counters
//! at the same moments.
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
#[command(
    about = "Load generator: bulk, cps, rtt, idle and active through SOCKS5 / HTTP CONNECT / direct"
)]
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
    /// Runtime threads; 0 = 1 for bulk/rtt (current-thread), one per core otherwise.
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
    /// N keep-alive HTTP connections to a `serve-http` origin, each sending
    /// one GET per interval; latency is counted over a window that starts
    /// `--settle-secs` after every connection is open.
    Active {
        #[arg(long, default_value_t = 1000)]
        conns: usize,
        /// Time between two requests of one connection.
        #[arg(long, default_value_t = 1000)]
        interval_ms: u64,
        #[arg(long, default_value_t = 1024)]
        response_bytes: u64,
        /// Wait between "all open" and the start of the window.
        #[arg(long, default_value_t = 3.0)]
        settle_secs: f64,
        #[arg(long, default_value_t = 20.0)]
        window_secs: f64,
        /// Connections being opened at once.
        #[arg(long, default_value_t = 256)]
        concurrency: usize,
        /// Per-connection bound on open + handshake.
        #[arg(long, default_value_t = 15.0)]
        open_timeout_secs: f64,
        /// Per-request bound; a slower request counts as an error.
        #[arg(long, default_value_t = 10.0)]
        request_timeout_secs: f64,
        /// With an http:// proxy: absolute-form requests (`GET http://target/…`,
        /// credentials on every request) instead of a CONNECT tunnel.
        #[arg(long)]
        forward: bool,
    },
    /// The HTTP/1.1 origin for `active`: `GET /r/N` answers N zero bytes,
    /// keep-alive. Prints `listening ADDR` first.
    ServeHttp {
        #[arg(long, default_value = "127.0.0.1:0")]
        listen: String,
    },
}

impl Mode {
    fn name(&self) -> &'static str {
        match self {
            Mode::Bulk { .. } => "bulk",
            Mode::Cps { .. } => "cps",
            Mode::Rtt { .. } => "rtt",
            Mode::Idle { .. } => "idle",
            Mode::Active { .. } => "active",
            Mode::ServeHttp { .. } => "serve-http",
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
    if let Mode::ServeHttp { listen } = &args.mode {
        return serve_http(listen).await;
    }
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
        Mode::Active {
            conns,
            interval_ms,
            response_bytes,
            settle_secs,
            window_secs,
            concurrency,
            open_timeout_secs,
            request_timeout_secs,
            forward,
        } => {
            let opts = ActiveOpts {
                conns,
                interval: Duration::from_millis(interval_ms.max(1)),
                response_bytes,
                settle: secs(settle_secs),
                window: secs(window_secs),
                concurrency,
                open_timeout: secs(open_timeout_secs),
                request_timeout: secs(request_timeout_secs),
                forward,
            };
            active(dialer.clone(), opts).await?
        }
        Mode::ServeHttp { .. } => unreachable!("handled above"),
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

    /// A TCP connection to the proxy (or the target when direct), no handshake.
    async fn dial_tcp(&self) -> anyhow::Result<TcpStream> {
        let s = TcpStream::connect(self.connect_to)
            .await
            .with_context(|| format!("connect {}", self.connect_to))?;
        s.set_nodelay(true)?;
        Ok(s)
    }

    /// A connected stream to the sink, handshake done.
    async fn dial(&self) -> anyhow::Result<TcpStream> {
        let mut s = self.dial_tcp().await?;
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

// ---------------------------------------------------------------------------
// Active HTTP connections (S6) and their origin
// ---------------------------------------------------------------------------

struct ActiveOpts {
    conns: usize,
    interval: Duration,
    response_bytes: u64,
    settle: Duration,
    window: Duration,
    concurrency: usize,
    open_timeout: Duration,
    request_timeout: Duration,
    forward: bool,
}

/// Where the run is: before the window, in it, or past it (tasks stop).
const WARMING: u8 = 0;
const MEASURING: u8 = 1;
const STOPPED: u8 = 2;

/// What one connection's task saw.
#[derive(Default)]
struct ConnStats {
    opened: bool,
    open_error: Option<String>,
    /// Requests started in the window that completed, with their latency (µs).
    lat_us: Vec<u32>,
    /// Requests started in the window that failed or timed out.
    errors: u64,
    first_error: Option<String>,
    /// Connections re-opened after a failed request.
    reopened: u64,
    /// Requests of any phase that completed.
    total_ok: u64,
}

async fn active(dialer: Dialer, o: ActiveOpts) -> anyhow::Result<serde_json::Value> {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicU8, AtomicUsize, Ordering};

    let request = {
        let path = format!("/r/{}", o.response_bytes);
        let host = &dialer.target;
        match (&dialer.kind, o.forward) {
            (ProxyKind::Http { authorization }, true) => {
                let auth = authorization
                    .as_ref()
                    .map(|a| format!("Proxy-Authorization: {a}\r\n"))
                    .unwrap_or_default();
                format!("GET http://{host}{path} HTTP/1.1\r\nHost: {host}\r\n{auth}\r\n")
            }
            (_, true) => bail!("--forward needs an http:// proxy"),
            _ => format!("GET {path} HTTP/1.1\r\nHost: {host}\r\n\r\n"),
        }
    };
    let request: Arc<[u8]> = Arc::from(request.into_bytes());
    let phase = Arc::new(AtomicU8::new(WARMING));
    let settled = Arc::new(AtomicUsize::new(0));
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let opening = Arc::new(tokio::sync::Semaphore::new(o.concurrency.max(1)));
    let start = Instant::now();
    let mut set = JoinSet::new();
    for _ in 0..o.conns {
        let dialer = dialer.clone();
        let request = request.clone();
        let phase = phase.clone();
        let settled = settled.clone();
        let opening = opening.clone();
        let mut stop = stop_rx.clone();
        let (interval, open_timeout, request_timeout, forward) =
            (o.interval, o.open_timeout, o.request_timeout, o.forward);
        set.spawn(async move {
            let mut st = ConnStats::default();
            let open = |dialer: Dialer| async move {
                tokio::time::timeout(open_timeout, async {
                    if forward {
                        dialer.dial_tcp().await
                    } else {
                        dialer.dial().await
                    }
                })
                .await
                .unwrap_or_else(|_| Err(anyhow::anyhow!("open timed out")))
            };
            let first = {
                let _permit = opening.acquire().await;
                open(dialer.clone()).await
            };
            settled.fetch_add(1, Ordering::Relaxed);
            let mut conn = match first {
                Ok(s) => {
                    st.opened = true;
                    Some(s)
                }
                Err(e) => {
                    st.open_error = Some(format!("{e:#}"));
                    return st;
                }
            };
            // Spread the connections over the interval.
            let offset = Duration::from_micros(
                rand::random::<u64>() % u64::try_from(interval.as_micros()).unwrap_or(1).max(1),
            );
            let mut ticks =
                tokio::time::interval_at(tokio::time::Instant::now() + offset, interval);
            ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            let mut buf: Vec<u8> = Vec::with_capacity(4096);
            loop {
                tokio::select! {
                    _ = ticks.tick() => {}
                    _ = stop.changed() => break,
                }
                let in_window = match phase.load(Ordering::Relaxed) {
                    STOPPED => break,
                    p => p == MEASURING,
                };
                let s = match conn.as_mut() {
                    Some(s) => s,
                    None => match open(dialer.clone()).await {
                        Ok(s) => {
                            st.reopened += 1;
                            conn.insert(s)
                        }
                        Err(e) => {
                            if in_window {
                                st.errors += 1;
                                st.first_error
                                    .get_or_insert_with(|| format!("reopen: {e:#}"));
                            }
                            continue;
                        }
                    },
                };
                let t0 = Instant::now();
                let r = tokio::time::timeout(request_timeout, http_exchange(s, &request, &mut buf))
                    .await
                    .unwrap_or_else(|_| Err(anyhow::anyhow!("request timed out")));
                match r {
                    Ok(()) => {
                        st.total_ok += 1;
                        if in_window {
                            st.lat_us
                                .push(u32::try_from(t0.elapsed().as_micros()).unwrap_or(u32::MAX));
                        }
                    }
                    Err(e) => {
                        if in_window {
                            st.errors += 1;
                            st.first_error.get_or_insert_with(|| format!("{e:#}"));
                        }
                        conn = None;
                        buf.clear();
                    }
                }
            }
            st
        });
    }
    // Every connection opened (or failed to).
    while settled.load(Ordering::Relaxed) < o.conns {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let open_seconds = start.elapsed().as_secs_f64();
    println!(
        "{}",
        json!({"phase": "established", "open_seconds": round(open_seconds, 3)})
    );
    tokio::time::sleep(o.settle).await;
    phase.store(MEASURING, Ordering::Relaxed);
    let w0 = Instant::now();
    println!("{}", json!({"phase": "window"}));
    tokio::time::sleep(o.window).await;
    phase.store(STOPPED, Ordering::Relaxed);
    let window = w0.elapsed().as_secs_f64();
    println!("{}", json!({"phase": "window_end"}));
    let _ = stop_tx.send(true);

    let mut lat: Vec<u64> = Vec::new();
    let (mut opened, mut errors, mut reopened, mut total_ok) = (0usize, 0u64, 0u64, 0u64);
    let mut open_errors = 0usize;
    let mut first_open_error = None;
    let mut first_error = None;
    while let Some(r) = set.join_next().await {
        let st = r.context("active connection task panicked")?;
        if st.opened {
            opened += 1;
        } else {
            open_errors += 1;
            if first_open_error.is_none() {
                first_open_error = st.open_error;
            }
        }
        lat.extend(st.lat_us.iter().map(|&u| u64::from(u)));
        errors += st.errors;
        reopened += st.reopened;
        total_ok += st.total_ok;
        if first_error.is_none() {
            first_error = st.first_error;
        }
    }
    lat.sort_unstable();
    let expected = opened as f64 * window / o.interval.as_secs_f64();
    if let Some(e) = first_open_error.as_ref().or(first_error.as_ref()) {
        eprintln!("lg active: {open_errors} open errors, {errors} request errors, first: {e}");
    }
    let ms = |us: f64| round(us / 1000.0, 3);
    Ok(json!({
        "mode": "active",
        "forward": o.forward,
        "conns": o.conns,
        "opened": opened,
        "open_errors": open_errors,
        "open_seconds": round(open_seconds, 3),
        "window_secs": round(window, 3),
        "requests": lat.len(),
        "expected_requests": round(expected, 0),
        "req_per_s": round(lat.len() as f64 / window, 1),
        "errors": errors,
        "reopened": reopened,
        "total_ok": total_ok,
        "p50_ms": ms(pct(&lat, 50.0)),
        "p99_ms": ms(pct(&lat, 99.0)),
        "max_ms": ms(lat.last().copied().unwrap_or(0) as f64),
        "first_open_error": first_open_error,
        "first_error": first_error,
    }))
}

/// Sends one request and reads one complete response (status 200, a
/// `Content-Length` body) from a keep-alive connection.
async fn http_exchange(s: &mut TcpStream, request: &[u8], buf: &mut Vec<u8>) -> anyhow::Result<()> {
    s.write_all(request).await.context("write request")?;
    let (head_end, body_len) = loop {
        if let Some(pos) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = std::str::from_utf8(&buf[..pos]).context("non-UTF-8 response head")?;
            let status = head
                .split_whitespace()
                .nth(1)
                .and_then(|c| c.parse::<u16>().ok())
                .with_context(|| format!("malformed response head {head:?}"))?;
            if status != 200 {
                bail!("answered {}", head.lines().next().unwrap_or_default());
            }
            let len = head
                .lines()
                .find_map(|l| {
                    let (k, v) = l.split_once(':')?;
                    k.trim()
                        .eq_ignore_ascii_case("content-length")
                        .then(|| v.trim().parse::<usize>().ok())?
                })
                .context("response without Content-Length")?;
            break (pos + 4, len);
        }
        if buf.len() > 16 * 1024 {
            bail!("response head larger than 16 KiB");
        }
        read_more(s, buf).await?;
    };
    while buf.len() < head_end + body_len {
        read_more(s, buf).await?;
    }
    buf.drain(..head_end + body_len);
    Ok(())
}

async fn read_more(s: &mut TcpStream, buf: &mut Vec<u8>) -> anyhow::Result<()> {
    buf.reserve(4096);
    let n = s.read_buf(buf).await.context("read response")?;
    if n == 0 {
        bail!("connection closed mid-response");
    }
    Ok(())
}

/// The origin for `active`: keep-alive HTTP/1.1, `GET /r/N` answers N zero
/// bytes (1 KiB for any other path). Runs until killed or `--timeout-secs`.
async fn serve_http(listen: &str) -> anyhow::Result<serde_json::Value> {
    let listener = tokio::net::TcpListener::bind(listen)
        .await
        .with_context(|| format!("bind {listen}"))?;
    println!("listening {}", listener.local_addr()?);
    loop {
        let Ok((s, _)) = listener.accept().await else {
            // Out of descriptors, most likely: let some connections end.
            tokio::time::sleep(Duration::from_millis(10)).await;
            continue;
        };
        let _ = s.set_nodelay(true);
        tokio::spawn(async move {
            let _ = serve_http_conn(s).await;
        });
    }
}

async fn serve_http_conn(mut s: TcpStream) -> anyhow::Result<()> {
    let mut buf: Vec<u8> = Vec::with_capacity(2048);
    let mut out: Vec<u8> = Vec::new();
    loop {
        let Some(pos) = buf.windows(4).position(|w| w == b"\r\n\r\n") else {
            if buf.len() > 64 * 1024 {
                bail!("request head too large");
            }
            buf.reserve(2048);
            if s.read_buf(&mut buf).await? == 0 {
                return Ok(());
            }
            continue;
        };
        let head = String::from_utf8_lossy(&buf[..pos]).into_owned();
        buf.drain(..pos + 4);
        let path = head.split_whitespace().nth(1).unwrap_or("/");
        let n = path
            .rsplit_once("/r/")
            .and_then(|(_, n)| n.parse::<usize>().ok())
            .unwrap_or(1024)
            .min(16 << 20);
        let close = head.lines().any(|l| {
            l.split_once(':').is_some_and(|(k, v)| {
                k.trim().eq_ignore_ascii_case("connection")
                    && v.trim().eq_ignore_ascii_case("close")
            })
        });
        out.clear();
        out.extend_from_slice(
            format!(
                "HTTP/1.1 200 OK\r\nContent-Length: {n}\r\nContent-Type: application/octet-stream\r\n{}\r\n",
                if close { "Connection: close\r\n" } else { "" }
            )
            .as_bytes(),
        );
        out.resize(out.len() + n, 0);
        s.write_all(&out).await?;
        if close {
            return Ok(());
        }
    }
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
