//! Starting the sink, the peers and cellgate for the bench, each in its own
//! session, and the `lg` runner every scenario goes through.
//!
//! A peer that cannot start yields `Err(reason)`: the bench reports it as
//! "n/a" with the reason instead of failing.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use serde_json::Value;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::Command;

use crate::procs::{Procs, which};

/// Proxy credentials used for every peer that supports them.
pub const USER: &str = "bench";
pub const PASS: &str = "benchpass";
/// cellgate's data directory and ready file, under the bench's work directory.
pub const CELLGATE_DATA: &str = "cellgate-data";
pub const CELLGATE_READY: &str = "cellgate-ready.json";
/// How long a freshly started peer gets to carry its first connection.
pub const READY_WITHIN: Duration = Duration::from_secs(20);

/// Shared context for starting peers and running `lg`.
pub struct Ctx {
    pub procs: Procs,
    pub work: PathBuf,
    pub lg: PathBuf,
    pub sink: SocketAddr,
}

/// One way of reaching the sink: direct, or through a peer.
#[derive(Debug, Clone)]
pub struct Route {
    pub name: String,
    /// `lg` arguments selecting the path (`--direct`/`--proxy`, `--target`).
    pub lg_args: Vec<String>,
    /// Processes (session leaders) measured for CPU and memory, with a label.
    pub sides: Vec<(String, u32)>,
}

impl Route {
    pub fn direct(ctx: &Ctx) -> Route {
        Route {
            name: "direct".into(),
            lg_args: vec!["--direct".into(), "--target".into(), ctx.sink.to_string()],
            sides: vec![],
        }
    }

    fn proxy(name: &str, url: String, target: SocketAddr, sides: Vec<(String, u32)>) -> Route {
        Route {
            name: name.into(),
            lg_args: vec!["--proxy".into(), url, "--target".into(), target.to_string()],
            sides,
        }
    }

    /// Tunnels expose the sink on a local port: lg talks to it "directly".
    fn tunnel(name: &str, exposed: SocketAddr, sides: Vec<(String, u32)>) -> Route {
        Route {
            name: name.into(),
            lg_args: vec!["--direct".into(), "--target".into(), exposed.to_string()],
            sides,
        }
    }
}

/// Runs `lg ROUTE MODE...` bounded by `limit`; returns its JSON result line.
pub async fn run_lg(
    ctx: &Ctx,
    route: &Route,
    mode: &[String],
    limit: Duration,
) -> Result<Value, String> {
    let mut cmd = Command::new(&ctx.lg);
    cmd.args(&route.lg_args)
        .args(mode)
        .arg("--timeout-secs")
        .arg(limit.as_secs().max(1).to_string())
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    let child = cmd.spawn().map_err(|e| format!("start lg: {e}"))?;
    let out = tokio::time::timeout(limit + Duration::from_secs(5), child.wait_with_output())
        .await
        .map_err(|_| format!("lg {} timed out after {}s", mode[0], limit.as_secs()))?
        .map_err(|e| format!("lg: {e}"))?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    let last = stdout.lines().rev().find(|l| l.starts_with('{'));
    let v: Value = match last.map(serde_json::from_str) {
        Some(Ok(v)) => v,
        _ => {
            return Err(format!(
                "lg {} printed no result ({}): {}",
                mode[0],
                out.status,
                tail(&String::from_utf8_lossy(&out.stderr), 300)
            ));
        }
    };
    if let Some(e) = v.get("error").and_then(Value::as_str) {
        return Err(e.to_string());
    }
    Ok(v)
}

/// Waits until one echo exchange through `route` works.
pub async fn probe(ctx: &Ctx, route: &Route, within: Duration) -> Result<(), String> {
    let deadline = Instant::now() + within;
    let mode: Vec<String> = ["rtt", "--size", "16", "--count", "2", "--max-secs", "2"]
        .map(String::from)
        .to_vec();
    let mut last = String::new();
    while Instant::now() < deadline {
        match run_lg(ctx, route, &mode, Duration::from_secs(3)).await {
            Ok(_) => return Ok(()),
            Err(e) => last = e,
        }
        for (label, pid) in &route.sides {
            if let Some(st) = ctx.procs.exited(*pid) {
                return Err(format!("{label} exited ({st})"));
            }
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    Err(format!(
        "not carrying traffic after {}s: {last}",
        within.as_secs()
    ))
}

/// A port that was free a moment ago (bind :0, read, release).
pub fn free_port() -> Result<u16, String> {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .map_err(|e| format!("no free port: {e}"))
}

fn local(port: u16) -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], port))
}

fn tool(name: &str) -> Result<PathBuf, String> {
    which(name).ok_or_else(|| format!("`{name}` not installed (tests/bench/peers.sh install)"))
}

pub fn tail(text: &str, max: usize) -> String {
    let t = text.trim();
    let start = t.len().saturating_sub(max);
    let start = (start..t.len())
        .find(|&i| t.is_char_boundary(i))
        .unwrap_or(t.len());
    t[start..].replace('\n', " | ")
}

fn log_tail(path: &Path) -> String {
    tail(&std::fs::read_to_string(path).unwrap_or_default(), 400)
}

fn is_root() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("Uid:"))
                .map(|v| v.split_whitespace().next() == Some("0"))
        })
        .unwrap_or(false)
}

/// Starts the sink; returns its PID and address.
pub async fn start_sink(
    procs: &Procs,
    sink_bin: &Path,
    work: &Path,
) -> anyhow::Result<(u32, SocketAddr)> {
    let (pid, stdout) = procs.spawn_piped(
        "sink",
        sink_bin,
        &["--listen".into(), "127.0.0.1:0".into()],
        &[],
        &work.join("sink.log"),
    )?;
    let mut lines = BufReader::new(stdout).lines();
    let first = tokio::time::timeout(Duration::from_secs(10), lines.next_line())
        .await
        .map_err(|_| anyhow::anyhow!("sink did not print its address within 10s"))??
        .ok_or_else(|| anyhow::anyhow!("sink exited without printing its address"))?;
    let addr = first
        .strip_prefix("listening ")
        .ok_or_else(|| anyhow::anyhow!("unexpected first sink line {first:?}"))?
        .parse()?;
    // Keep draining stdout so the sink can never block on a full pipe.
    tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
    Ok((pid, addr))
}

pub async fn start_microsocks(ctx: &Ctx) -> Result<Route, String> {
    let bin = tool("microsocks")?;
    let port = free_port()?;
    let args: Vec<String> = vec![
        "-i".into(),
        "127.0.0.1".into(),
        "-p".into(),
        port.to_string(),
        "-u".into(),
        USER.into(),
        "-P".into(),
        PASS.into(),
    ];
    let log = ctx.work.join("microsocks.log");
    let pid = ctx
        .procs
        .spawn("microsocks", &bin, &args, &[], &log)
        .map_err(|e| format!("{e:#}"))?;
    let url = format!("socks5://{USER}:{PASS}@{}", local(port));
    let route = Route::proxy(
        "microsocks",
        url,
        ctx.sink,
        vec![("microsocks".into(), pid)],
    );
    ready_or_stop(ctx, route, &log).await
}

pub async fn start_dante(ctx: &Ctx) -> Result<Route, String> {
    let bin = tool("danted").or_else(|_| tool("sockd"))?;
    let port = free_port()?;
    // Username auth in dante checks system accounts, so it runs without auth.
    let users = if is_root() {
        "user.privileged: nobody\nuser.unprivileged: nobody\n"
    } else {
        ""
    };
    let conf = format!(
        "logoutput: stderr\n\
         internal: 127.0.0.1 port = {port}\n\
         external: 127.0.0.1\n\
         socksmethod: none\n\
         clientmethod: none\n\
         {users}\
         client pass {{\n  from: 127.0.0.0/8 to: 0.0.0.0/0\n}}\n\
         socks pass {{\n  from: 127.0.0.0/8 to: 0.0.0.0/0\n}}\n"
    );
    let conf_path = ctx.work.join("danted.conf");
    std::fs::write(&conf_path, conf).map_err(|e| format!("write dante config: {e}"))?;
    let args: Vec<String> = vec![
        "-f".into(),
        conf_path.display().to_string(),
        "-p".into(),
        ctx.work.join("danted.pid").display().to_string(),
    ];
    let log = ctx.work.join("danted.log");
    let pid = ctx
        .procs
        .spawn("dante", &bin, &args, &[], &log)
        .map_err(|e| format!("{e:#}"))?;
    let url = format!("socks5://{}", local(port));
    let route = Route::proxy("dante", url, ctx.sink, vec![("dante".into(), pid)]);
    ready_or_stop(ctx, route, &log).await
}

/// rathole server + client forwarding a local port to the sink, over plain
/// TCP or Noise (NK, 25519/ChaChaPoly/BLAKE2s).
pub async fn start_rathole(ctx: &Ctx, noise: bool) -> Result<Route, String> {
    let bin = tool("rathole")?;
    let name = if noise {
        "rathole-noise"
    } else {
        "rathole-tcp"
    };
    let control = free_port()?;
    let exposed = free_port()?;
    let (server_transport, client_transport) = if noise {
        let (private, public) = rathole_keypair(&bin).await?;
        let pattern = "Noise_NK_25519_ChaChaPoly_BLAKE2s";
        (
            format!(
                "[server.transport]\ntype = \"noise\"\n[server.transport.noise]\n\
                 pattern = \"{pattern}\"\nlocal_private_key = \"{private}\"\n"
            ),
            format!(
                "[client.transport]\ntype = \"noise\"\n[client.transport.noise]\n\
                 pattern = \"{pattern}\"\nremote_public_key = \"{public}\"\n"
            ),
        )
    } else {
        (String::new(), String::new())
    };
    let server = format!(
        "[server]\nbind_addr = \"127.0.0.1:{control}\"\ndefault_token = \"cellgate-bench\"\n\
         {server_transport}\
         [server.services.sink]\nbind_addr = \"127.0.0.1:{exposed}\"\n"
    );
    let client = format!(
        "[client]\nremote_addr = \"127.0.0.1:{control}\"\ndefault_token = \"cellgate-bench\"\n\
         {client_transport}\
         [client.services.sink]\nlocal_addr = \"{}\"\n",
        ctx.sink
    );
    let server_toml = ctx.work.join(format!("{name}-server.toml"));
    let client_toml = ctx.work.join(format!("{name}-client.toml"));
    std::fs::write(&server_toml, server).map_err(|e| e.to_string())?;
    std::fs::write(&client_toml, client).map_err(|e| e.to_string())?;
    let env = [("RUST_LOG", "warn")];
    let slog = ctx.work.join(format!("{name}-server.log"));
    let clog = ctx.work.join(format!("{name}-client.log"));
    let spid = ctx
        .procs
        .spawn(
            &format!("{name} server"),
            &bin,
            &["-s".into(), server_toml.display().to_string()],
            &env,
            &slog,
        )
        .map_err(|e| format!("{e:#}"))?;
    let cpid = match ctx.procs.spawn(
        &format!("{name} client"),
        &bin,
        &["-c".into(), client_toml.display().to_string()],
        &env,
        &clog,
    ) {
        Ok(p) => p,
        Err(e) => {
            ctx.procs.stop(&[spid]).await;
            return Err(format!("{e:#}"));
        }
    };
    let route = Route::tunnel(
        name,
        local(exposed),
        vec![("server".into(), spid), ("client".into(), cpid)],
    );
    match probe(ctx, &route, READY_WITHIN).await {
        Ok(()) => Ok(route),
        Err(e) => {
            ctx.procs.stop(&[spid, cpid]).await;
            Err(format!(
                "{e}; server log: {}; client log: {}",
                log_tail(&slog),
                log_tail(&clog)
            ))
        }
    }
}

async fn rathole_keypair(bin: &Path) -> Result<(String, String), String> {
    let out = tokio::time::timeout(
        Duration::from_secs(10),
        Command::new(bin)
            .arg("--genkey")
            .kill_on_drop(true)
            .output(),
    )
    .await
    .map_err(|_| "rathole --genkey timed out".to_string())?
    .map_err(|e| format!("rathole --genkey: {e}"))?;
    let text = String::from_utf8_lossy(&out.stdout);
    let after = |label: &str| {
        let mut lines = text.lines().map(str::trim);
        lines.find(|l| l.starts_with(label))?;
        lines.find(|l| !l.is_empty()).map(str::to_string)
    };
    match (after("Private Key"), after("Public Key")) {
        (Some(private), Some(public)) => Ok((private, public)),
        _ => Err(format!(
            "unexpected `rathole --genkey` output: {}",
            tail(&text, 200)
        )),
    }
}

async fn ready_or_stop(ctx: &Ctx, route: Route, log: &Path) -> Result<Route, String> {
    match probe(ctx, &route, READY_WITHIN).await {
        Ok(()) => Ok(route),
        Err(e) => {
            let pids: Vec<u32> = route.sides.iter().map(|s| s.1).collect();
            ctx.procs.stop(&pids).await;
            Err(format!("{e}; log: {}", log_tail(log)))
        }
    }
}

/// iperf3 server for the physical-limit reference row; returns its port.
pub async fn start_iperf3(ctx: &Ctx) -> Result<u16, String> {
    let bin = tool("iperf3")?;
    let port = free_port()?;
    let args: Vec<String> = [
        "-s",
        "--forceflush",
        "-B",
        "127.0.0.1",
        "-p",
        &port.to_string(),
    ]
    .map(String::from)
    .to_vec();
    let log = ctx.work.join("iperf3.log");
    let pid = ctx
        .procs
        .spawn("iperf3", &bin, &args, &[], &log)
        .map_err(|e| format!("{e:#}"))?;
    // iperf3 -s serves one client at a time, so don't probe it with a
    // connection: wait for its banner instead.
    let deadline = Instant::now() + Duration::from_secs(5);
    while Instant::now() < deadline {
        if std::fs::read_to_string(&log).is_ok_and(|t| t.contains("Server listening")) {
            return Ok(port);
        }
        if let Some(st) = ctx.procs.exited(pid) {
            return Err(format!("iperf3 -s exited ({st}): {}", log_tail(&log)));
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    ctx.procs.stop(&[pid]).await;
    Err("iperf3 -s did not start listening within 5s".into())
}

/// One `iperf3 -c` run (1 stream); Gbit/s received.
pub async fn run_iperf3(port: u16, secs: u64) -> Result<f64, String> {
    let bin = tool("iperf3")?;
    let out = tokio::time::timeout(
        Duration::from_secs(secs + 20),
        Command::new(bin)
            .args(["-c", "127.0.0.1", "-p", &port.to_string(), "-J"])
            .args(["-t", &secs.to_string()])
            .kill_on_drop(true)
            .output(),
    )
    .await
    .map_err(|_| "iperf3 -c timed out".to_string())?
    .map_err(|e| format!("iperf3 -c: {e}"))?;
    let v: Value = serde_json::from_slice(&out.stdout).map_err(|e| format!("iperf3 JSON: {e}"))?;
    v.pointer("/end/sum_received/bits_per_second")
        .and_then(Value::as_f64)
        .map(|bps| bps / 1e9)
        .ok_or_else(|| {
            format!(
                "iperf3: {}",
                v.get("error")
                    .and_then(Value::as_str)
                    .unwrap_or("no result")
            )
        })
}

/// The cellgate binaries and the CLI contract they implement.
pub struct Cellgate {
    pub control_plane: PathBuf,
    pub edge_agent: PathBuf,
}

/// Starts control plane + edge agent as separate processes, enrolls the
/// agent, adds a customer and waits until both proxies carry traffic.
/// Returns the HTTP CONNECT and SOCKS5 routes.
pub async fn start_cellgate(ctx: &Ctx, cg: &Cellgate) -> Result<(Route, Route), String> {
    for bin in [&cg.control_plane, &cg.edge_agent] {
        if !bin.is_file() {
            return Err(format!(
                "{} does not exist (cellgate not built yet?)",
                bin.display()
            ));
        }
    }
    let data = ctx.work.join(CELLGATE_DATA);
    let state = ctx.work.join("cellgate-agent");
    for d in [&data, &state] {
        let _ = std::fs::remove_dir_all(d);
        std::fs::create_dir_all(d).map_err(|e| format!("create {}: {e}", d.display()))?;
    }
    let ready = ctx.work.join(CELLGATE_READY);
    let _ = std::fs::remove_file(&ready);
    let env = [("RUST_LOG", "warn")];
    let cp_log = ctx.work.join("control-plane.log");
    let d = data.display().to_string();
    let serve: Vec<String> = [
        "serve",
        "--data-dir",
        &d,
        "--http-listen",
        "127.0.0.1:0",
        "--socks-listen",
        "127.0.0.1:0",
        "--api-listen",
        "127.0.0.1:0",
        "--quic-listen",
        "127.0.0.1:0",
        "--allow-private-targets",
        "--ready-file",
        &ready.display().to_string(),
    ]
    .map(String::from)
    .to_vec();
    let cp = ctx
        .procs
        .spawn("control-plane", &cg.control_plane, &serve, &env, &cp_log)
        .map_err(|e| format!("{e:#}"))?;
    let mut started = vec![cp];
    let result = async {
        let addrs = wait_ready_file(ctx, cp, &ready, &cp_log).await?;
        let token_out = admin(
            &cg.control_plane,
            &[
                "--data-dir",
                &d,
                "enroll-token",
                "create",
                "--name",
                "bench-agent",
            ],
            &env,
        )
        .await?;
        let token = token_out
            .lines()
            .rev()
            .map(str::trim)
            .find(|l| !l.is_empty())
            .unwrap_or_default()
            .to_string();
        if !token.starts_with("cgt1_") {
            return Err(format!(
                "`control-plane enroll-token create` printed no cgt1_ token as its last line: {}",
                tail(&token_out, 200)
            ));
        }
        admin(
            &cg.control_plane,
            &[
                "--data-dir",
                &d,
                "customer",
                "add",
                USER,
                "--password",
                PASS,
            ],
            &env,
        )
        .await?;
        let s = state.display().to_string();
        admin(&cg.edge_agent, &["enroll", &token, "--state-dir", &s], &env).await?;
        let agent_log = ctx.work.join("edge-agent.log");
        let run: Vec<String> = ["run", "--state-dir", &s, "--allow-private-targets"]
            .map(String::from)
            .to_vec();
        let agent = ctx
            .procs
            .spawn("edge-agent", &cg.edge_agent, &run, &env, &agent_log)
            .map_err(|e| format!("{e:#}"))?;
        started.push(agent);
        let sides = vec![
            ("control-plane".to_string(), cp),
            ("edge-agent".to_string(), agent),
        ];
        let http = Route::proxy(
            "cellgate-http",
            format!("http://{USER}:{PASS}@{}", addrs.0),
            ctx.sink,
            sides.clone(),
        );
        let socks = Route::proxy(
            "cellgate-socks5",
            format!("socks5://{USER}:{PASS}@{}", addrs.1),
            ctx.sink,
            sides,
        );
        for r in [&http, &socks] {
            probe(ctx, r, READY_WITHIN).await.map_err(|e| {
                format!(
                    "{}: {e}; control-plane log: {}; edge-agent log: {}",
                    r.name,
                    log_tail(&cp_log),
                    log_tail(&agent_log)
                )
            })?;
        }
        Ok((http, socks))
    }
    .await;
    if result.is_err() {
        ctx.procs.stop(&started).await;
    }
    result
}

/// Waits for `control-plane serve` to write its ready file; returns the HTTP
/// and SOCKS5 listener addresses.
async fn wait_ready_file(
    ctx: &Ctx,
    pid: u32,
    ready: &Path,
    log: &Path,
) -> Result<(SocketAddr, SocketAddr), String> {
    let deadline = Instant::now() + READY_WITHIN;
    loop {
        if let Ok(text) = std::fs::read_to_string(ready)
            && let Ok(v) = serde_json::from_str::<Value>(&text)
        {
            let addr = |k: &str| {
                v.get(k)
                    .and_then(Value::as_str)
                    .and_then(|s| s.parse::<SocketAddr>().ok())
                    .ok_or_else(|| format!("ready file lacks a valid {k:?} address: {text}"))
            };
            return Ok((addr("http")?, addr("socks")?));
        }
        if let Some(st) = ctx.procs.exited(pid) {
            return Err(format!(
                "`control-plane serve` exited ({st}) before writing its ready file \
                 (does it implement --ready-file etc. yet?); log: {}",
                log_tail(log)
            ));
        }
        if Instant::now() > deadline {
            return Err(format!(
                "`control-plane serve` wrote no ready file within {}s; log: {}",
                READY_WITHIN.as_secs(),
                log_tail(log)
            ));
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Runs a short admin command (bounded); returns its stdout.
pub async fn admin(bin: &Path, args: &[&str], env: &[(&str, &str)]) -> Result<String, String> {
    let shown = format!(
        "`{} {}`",
        bin.file_name().unwrap_or_default().to_string_lossy(),
        args.join(" ")
    );
    let out = tokio::time::timeout(
        Duration::from_secs(30),
        Command::new(bin)
            .args(args)
            .envs(env.iter().copied())
            .stdin(Stdio::null())
            .kill_on_drop(true)
            .output(),
    )
    .await
    .map_err(|_| format!("{shown} timed out after 30s"))?
    .map_err(|e| format!("{shown}: {e}"))?;
    if !out.status.success() {
        return Err(format!(
            "{shown} failed ({}); is this command implemented yet? stderr: {}",
            out.status,
            tail(&String::from_utf8_lossy(&out.stderr), 300)
        ));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}
