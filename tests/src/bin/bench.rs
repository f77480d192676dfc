//! `bench`: the side-by-side benchmark of cellgate against its peers.
//!
//! ```text
//! cargo run --release -p tests --bin bench               # full run (≈ 10–15 min)
//! cargo run --release -p tests --bin bench -- --quick    # smoke run (≈ 1–2 min)
//! ```
//!
//! One run: installs the peers (`tests/bench/peers.sh install`), builds
//! cellgate (`cargo build --release -p control-plane -p edge-agent`, skip with
//! `--no-build`), starts the sink, microsocks, dante, rathole (TCP and Noise),
//! an iperf3 server and cellgate (control plane + edge agent) on 127.0.0.1,
//! each in its own session, then runs interleaved rounds of S1 (bulk), S3
//! (connection rate) and S4 (latency), then S5 (idle memory) once, then S6
//! (1,000 and 10,000 active connections, one 1 KiB GET per second each,
//! under a plan so limits and accounting run) once, last, and prints
//! a markdown table of medians, ratios and targets (also written to `--out`,
//! default `target/bench-report.md`). Every peer is stopped by PID on exit,
//! error, Ctrl-C, SIGTERM and SIGHUP. A peer that cannot start is "n/a"; a
//! missed target is reported, never an error: the exit code is non-zero only
//! when the harness itself breaks.
#![forbid(unsafe_code)]

#[path = "../bench/peers.rs"]
mod peers;
#[path = "../bench/procs.rs"]
mod procs;
#[path = "../bench/report.rs"]
mod report;
#[path = "../bench/s6.rs"]
mod s6;

use std::path::{Path, PathBuf};
use std::process::{ExitCode, Stdio};
use std::time::{Duration, Instant};

use anyhow::Context;
use clap::Parser;
use peers::{Cellgate, Ctx, Route};
use procs::Procs;
use report::{Idle, Plan, Results, Sample, Side};
use serde_json::Value;
use tokio::signal::unix::{SignalKind, signal};

#[derive(Parser, Debug, Clone)]
#[command(about = "Side-by-side benchmark: cellgate vs direct, microsocks, dante, rathole")]
struct Args {
    /// Interleaved rounds (medians are taken over them). Default 3 (1 with --quick).
    #[arg(long)]
    rounds: Option<usize>,
    /// Shrink everything for a smoke run.
    #[arg(long)]
    quick: bool,
    /// S1 download size in bytes (default 1 GiB, 128 MiB with --quick).
    #[arg(long)]
    bytes: Option<u64>,
    /// S5 connections through cellgate (default 10000, 1000 with --quick).
    #[arg(long)]
    idle_conns: Option<usize>,
    /// S5 connections through microsocks and rathole-tcp (default 5000, 500 with --quick).
    #[arg(long)]
    idle_peer_conns: Option<usize>,
    /// Markdown report file (default target/bench-report.md in the workspace).
    #[arg(long)]
    out: Option<PathBuf>,
    /// Don't run tests/bench/peers.sh install.
    #[arg(long)]
    no_install: bool,
    /// Don't build control-plane/edge-agent; use what is in target/release.
    #[arg(long)]
    no_build: bool,
    /// Take control-plane and edge-agent from this directory instead of
    /// target/release, and don't build them (e.g. `target/debug` to check the
    /// plumbing; debug figures are meaningless for performance).
    #[arg(long)]
    cellgate_dir: Option<PathBuf>,
    /// Leave cellgate out (peers and direct only).
    #[arg(long)]
    skip_cellgate: bool,
    /// Only these routes, comma-separated (direct, cellgate-http,
    /// cellgate-socks5, microsocks, dante, rathole-tcp, rathole-noise).
    #[arg(long, value_delimiter = ',')]
    only: Vec<String>,
    /// Scenarios to run, comma-separated (s1, s3, s4, s5, s6).
    #[arg(long, value_delimiter = ',', default_value = "s1,s3,s4,s5,s6")]
    scenarios: Vec<String>,
    /// S6 connection counts, run in this order (default 1000,10000; 1000 with --quick).
    #[arg(long, value_delimiter = ',')]
    s6_conns: Vec<usize>,
    /// S6 measuring window in seconds (default 20, 5 with --quick).
    #[arg(long)]
    s6_secs: Option<f64>,
    /// S6 wait between "every connection open" and the window.
    #[arg(long, default_value_t = 3.0)]
    s6_settle_secs: f64,
    /// S6 routes, comma-separated (direct, cellgate-http, cellgate-connect,
    /// cellgate-socks5); `direct` is the physical reference.
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "direct,cellgate-http,cellgate-socks5"
    )]
    s6_via: Vec<String>,
    /// Bound on `cargo build` of cellgate.
    #[arg(long, default_value_t = 1800)]
    build_timeout_secs: u64,
}

const ROUTE_ORDER: [&str; 7] = [
    "direct",
    "cellgate-http",
    "cellgate-socks5",
    "microsocks",
    "dante",
    "rathole-tcp",
    "rathole-noise",
];

fn main() -> ExitCode {
    let args = Args::parse();
    // Children inherit the raised soft limit, so every peer can hold 10k sockets.
    if let Err(e) = rlimit::increase_nofile_limit(u64::MAX) {
        eprintln!("bench: warning: could not raise RLIMIT_NOFILE: {e}");
    }
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("bench: tokio runtime: {e}");
            return ExitCode::from(2);
        }
    };
    rt.block_on(supervise(args))
}

/// Runs the bench as a task so that a signal or a panic still reaches the
/// cleanup below, which stops every recorded peer by PID.
async fn supervise(args: Args) -> ExitCode {
    let root = workspace_root();
    let work = root.join("target").join("bench-work");
    let pidfile = root.join("target").join("bench-pids.txt");
    if let Err(e) = std::fs::create_dir_all(root.join("target")) {
        eprintln!("bench: create target/: {e}");
        return ExitCode::from(2);
    }
    let procs = Procs::new(&pidfile);
    let (mut term, mut hup) = match (
        signal(SignalKind::terminate()),
        signal(SignalKind::hangup()),
    ) {
        (Ok(t), Ok(h)) => (t, h),
        _ => {
            eprintln!("bench: cannot install signal handlers");
            return ExitCode::from(2);
        }
    };
    let mut task = tokio::spawn(run(args, root, work, procs.clone()));
    let code = tokio::select! {
        r = &mut task => match r {
            Ok(Ok(())) => 0,
            Ok(Err(e)) => { eprintln!("bench: error: {e:#}"); 1 }
            Err(e) => { eprintln!("bench: crashed: {e}"); 101 }
        },
        _ = tokio::signal::ctrl_c() => { eprintln!("bench: interrupted (SIGINT)"); 130 }
        _ = term.recv() => { eprintln!("bench: terminated (SIGTERM)"); 143 }
        _ = hup.recv() => { eprintln!("bench: hangup (SIGHUP)"); 129 }
    };
    if !task.is_finished() {
        task.abort();
        // Dropping the task kills any running lg (kill_on_drop).
        let _ = task.await;
    }
    procs.stop_everything().await;
    ExitCode::from(code)
}

fn workspace_root() -> PathBuf {
    let compiled = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    if compiled.join("Cargo.toml").is_file() {
        compiled.canonicalize().unwrap_or(compiled)
    } else {
        std::env::current_dir().unwrap_or_else(|_| PathBuf::from("."))
    }
}

fn plan(args: &Args) -> Plan {
    let q = args.quick;
    Plan {
        rounds: args.rounds.unwrap_or(if q { 1 } else { 3 }).max(1),
        quick: q,
        bulk_bytes: args.bytes.unwrap_or(if q { 128 << 20 } else { 1 << 30 }),
        cps_workers: 32,
        cps_secs: if q { 1.0 } else { 3.0 },
        rtt: if q {
            vec![(64, 300), (4096, 200), (16384, 100), (65536, 50)]
        } else {
            vec![(64, 2000), (4096, 1000), (16384, 500), (65536, 200)]
        },
        // Bounds a peer that stalls on every exchange (~44 ms each).
        rtt_max_secs: if q { 2.0 } else { 5.0 },
        idle_conns: args.idle_conns.unwrap_or(if q { 1000 } else { 10_000 }),
        idle_peer_conns: args.idle_peer_conns.unwrap_or(if q { 500 } else { 5000 }),
        idle_hold_secs: if q { 1.0 } else { 5.0 },
        iperf_secs: if q { 1 } else { 3 },
    }
}

async fn run(args: Args, root: PathBuf, work: PathBuf, procs: Procs) -> anyhow::Result<()> {
    let started = Instant::now();
    let plan = plan(&args);
    let _ = std::fs::remove_dir_all(&work);
    std::fs::create_dir_all(&work).with_context(|| format!("create {}", work.display()))?;
    let bin_dir = std::env::current_exe()?
        .parent()
        .context("no directory for the bench binary")?
        .to_path_buf();
    let lg = bin_dir.join("lg");
    let sink = bin_dir.join("sink");
    for b in [&lg, &sink] {
        anyhow::ensure!(
            b.is_file(),
            "{} missing: build with `cargo build --release -p tests`",
            b.display()
        );
    }
    let wanted = |r: &str| args.only.is_empty() || args.only.iter().any(|o| o == r);
    let want_cellgate =
        !args.skip_cellgate && (wanted("cellgate-http") || wanted("cellgate-socks5"));
    let scen = |s: &str| args.scenarios.iter().any(|x| x.eq_ignore_ascii_case(s));

    if !args.no_install {
        install_peers(&root, &work).await;
    }
    let cellgate_dir = args
        .cellgate_dir
        .clone()
        .unwrap_or_else(|| root.join("target").join("release"));
    let cellgate_build = if want_cellgate && !args.no_build && args.cellgate_dir.is_none() {
        build_cellgate(&root, &work, Duration::from_secs(args.build_timeout_secs)).await
    } else {
        Ok(())
    };

    eprintln!(
        "bench: starting sink and peers (logs in {})",
        work.display()
    );
    let (_sink_pid, sink_addr) = peers::start_sink(&procs, &sink, &work).await?;
    let ctx = Ctx {
        procs: procs.clone(),
        work: work.clone(),
        lg,
        sink: sink_addr,
    };

    let mut results = Results {
        plan: plan.clone(),
        meta: meta(&root),
        ..Results::default()
    };
    let mut routes: Vec<Route> = Vec::new();
    let mut record = |results: &mut Results, name: &str, r: Result<Route, String>| match r {
        Ok(route) => {
            eprintln!("bench:   {name}: ready");
            results.routes.push((name.to_string(), None));
            routes.push(route);
        }
        Err(why) => {
            eprintln!("bench:   {name}: n/a — {why}");
            results.routes.push((name.to_string(), Some(why)));
        }
    };
    let mut cellgate: Option<Result<(Route, Route), String>> = None;
    for name in ROUTE_ORDER {
        if !wanted(name) {
            continue;
        }
        match name {
            "direct" => {
                let route = Route::direct(&ctx);
                let r = peers::probe(&ctx, &route, peers::READY_WITHIN)
                    .await
                    .map(|()| route);
                if let Err(e) = &r {
                    anyhow::bail!("direct path to the sink does not work: {e}");
                }
                record(&mut results, name, r);
            }
            "cellgate-http" | "cellgate-socks5" => {
                // One control plane + agent serves both proxy routes.
                if cellgate.is_none() {
                    let started = match (&cellgate_build, want_cellgate) {
                        (_, false) => Err("skipped (--skip-cellgate)".to_string()),
                        (Err(e), true) => Err(format!("cellgate: {e}")),
                        (Ok(()), true) => {
                            let cg = Cellgate {
                                control_plane: cellgate_dir.join("control-plane"),
                                edge_agent: cellgate_dir.join("edge-agent"),
                            };
                            peers::start_cellgate(&ctx, &cg)
                                .await
                                .map_err(|e| format!("cellgate: {e}"))
                        }
                    };
                    cellgate = Some(started);
                }
                let r = match cellgate.as_ref() {
                    Some(Ok((http, socks))) => Ok(if name == "cellgate-http" {
                        http.clone()
                    } else {
                        socks.clone()
                    }),
                    Some(Err(e)) => Err(e.clone()),
                    None => Err("not started".to_string()),
                };
                record(&mut results, name, r);
            }
            "microsocks" => record(&mut results, name, peers::start_microsocks(&ctx).await),
            "dante" => record(&mut results, name, peers::start_dante(&ctx).await),
            "rathole-tcp" => record(&mut results, name, peers::start_rathole(&ctx, false).await),
            "rathole-noise" => record(&mut results, name, peers::start_rathole(&ctx, true).await),
            _ => {}
        }
    }
    if results
        .routes
        .iter()
        .any(|(r, why)| r.starts_with("cellgate") && why.is_none())
    {
        let dir = cellgate_dir.display().to_string();
        let note = if dir.contains("debug") {
            " (**debug build: figures say nothing about performance**)"
        } else {
            ""
        };
        results.meta.push(format!("cellgate binaries: {dir}{note}"));
    }
    let iperf_port = if scen("s1") {
        match peers::start_iperf3(&ctx).await {
            Ok(p) => Some(p),
            Err(e) => {
                results.iperf_unavailable = Some(e);
                None
            }
        }
    } else {
        None
    };

    // S5 first, while every process is fresh: memory freed by the bulk and
    // rate tests stays in the allocators and would hide per-connection growth.
    if scen("s5") {
        for name in ["cellgate-socks5", "microsocks", "rathole-tcp"] {
            let Some(route) = routes.iter().find(|r| r.name == name) else {
                continue;
            };
            let conns = if name.starts_with("cellgate") {
                plan.idle_conns
            } else {
                plan.idle_peer_conns
            };
            let r = idle(&ctx, route, conns, plan.idle_hold_secs).await;
            match &r {
                Ok(i) => eprintln!(
                    "bench:   S5 {name}: {} held; {}",
                    i.opened,
                    i.sides
                        .iter()
                        .map(|s| format!(
                            "{} {:.1} KiB/conn",
                            s.label,
                            (s.holding_kib as f64 - s.before_kib as f64) / i.opened.max(1) as f64
                        ))
                        .collect::<Vec<_>>()
                        .join(", ")
                ),
                Err(e) => eprintln!("bench:   S5 {name}: failed: {e}"),
            }
            results.s5.push((name.to_string(), conns, r));
        }
    }

    for round in 1..=plan.rounds {
        eprintln!("bench: round {round}/{}", plan.rounds);
        if scen("s1") {
            if let Some(port) = iperf_port {
                let r = peers::run_iperf3(port, plan.iperf_secs).await;
                eprintln!(
                    "bench:   S1 iperf3: {}",
                    show(&r.as_ref().map(|g| format!("{g:.2} Gbit/s")))
                );
                results.iperf.push(r);
            }
            for route in &routes {
                let mode = vec![
                    "bulk".to_string(),
                    "--bytes".into(),
                    plan.bulk_bytes.to_string(),
                ];
                let r = measured(&ctx, route, &mode, Duration::from_secs(120)).await;
                eprintln!(
                    "bench:   S1 {}: {}",
                    route.name,
                    brief(&r, "gbit_per_s", "Gbit/s")
                );
                results.s1.entry(route.name.clone()).or_default().push(r);
            }
        }
        if scen("s3") {
            settle().await;
            for route in &routes {
                let mode = vec![
                    "cps".to_string(),
                    "--workers".into(),
                    plan.cps_workers.to_string(),
                    "--duration-secs".into(),
                    plan.cps_secs.to_string(),
                    "--response-bytes".into(),
                    "1024".into(),
                ];
                let limit = Duration::from_secs_f64(plan.cps_secs + 30.0);
                let r = measured(&ctx, route, &mode, limit).await;
                eprintln!(
                    "bench:   S3 {}: {}",
                    route.name,
                    brief(&r, "conn_per_s", "conn/s")
                );
                results.s3.entry(route.name.clone()).or_default().push(r);
            }
        }
        if scen("s4") {
            // Let the previous scenario's TIME_WAIT churn and softirq work drain.
            settle().await;
            for &(size, count) in &plan.rtt {
                for route in &routes {
                    let mode = vec![
                        "rtt".to_string(),
                        "--size".into(),
                        size.to_string(),
                        "--count".into(),
                        count.to_string(),
                        "--max-secs".into(),
                        plan.rtt_max_secs.to_string(),
                    ];
                    let limit = Duration::from_secs_f64(plan.rtt_max_secs + 20.0);
                    let r = measured(&ctx, route, &mode, limit).await;
                    eprintln!(
                        "bench:   S4 {size} B {}: {}",
                        route.name,
                        brief(&r, "p50_us", "µs p50")
                    );
                    results
                        .s4
                        .entry((route.name.clone(), size))
                        .or_default()
                        .push(r);
                }
            }
        }
    }

    // S6 last: it puts the bench customer on a plan.
    if scen("s6") {
        results.s6 = Some(
            active(
                &ctx,
                &args,
                &routes,
                &cellgate_dir.join("control-plane"),
                &work,
            )
            .await,
        );
    }

    for route in &routes {
        for (label, pid) in &route.sides {
            if let Some(st) = procs.exited(*pid) {
                let line = format!(
                    "{label} (pid {pid}, used by {}) exited during the run: {st}",
                    route.name
                );
                eprintln!("bench: {line}");
                if !results
                    .exits
                    .iter()
                    .any(|l| l.starts_with(&format!("{label} (pid {pid},")))
                {
                    results.exits.push(line);
                }
            }
        }
    }
    results.seconds = started.elapsed().as_secs_f64();
    let md = results.markdown();
    println!("{md}");
    let out = args
        .out
        .clone()
        .unwrap_or_else(|| root.join("target").join("bench-report.md"));
    std::fs::write(&out, &md).with_context(|| format!("write {}", out.display()))?;
    eprintln!("bench: report written to {}", out.display());
    Ok(())
}

async fn settle() {
    tokio::time::sleep(Duration::from_secs(1)).await;
}

fn show(r: &Result<String, &String>) -> String {
    match r {
        Ok(s) => s.clone(),
        Err(e) => format!("failed: {e}"),
    }
}

fn brief(r: &Result<Sample, String>, key: &str, unit: &str) -> String {
    match r {
        Ok(s) => match s.v.get(key).and_then(Value::as_f64) {
            Some(x) => format!("{x} {unit}"),
            None => "ok".into(),
        },
        Err(e) => format!("failed: {}", peers::tail(e, 200)),
    }
}

/// Runs lg through `route`, reading the CPU time of the route's processes
/// before and after.
async fn measured(
    ctx: &Ctx,
    route: &Route,
    mode: &[String],
    limit: Duration,
) -> Result<Sample, String> {
    let before: Vec<f64> = route
        .sides
        .iter()
        .map(|(_, pid)| procs::session_cpu_secs(*pid))
        .collect();
    let v = peers::run_lg(ctx, route, mode, limit).await?;
    let cpu = route
        .sides
        .iter()
        .zip(before)
        .map(|((label, pid), b)| (label.clone(), procs::session_cpu_secs(*pid) - b))
        .collect();
    Ok(Sample { v, cpu })
}

/// S6: starts the origin, puts the bench customer on a plan, then runs every
/// via at each connection count (direct first, as the reference).
async fn active(
    ctx: &Ctx,
    args: &Args,
    routes: &[Route],
    control_plane: &Path,
    work: &Path,
) -> s6::S6Results {
    let plan = s6::Plan6 {
        conns: if args.s6_conns.is_empty() {
            if args.quick {
                vec![1000]
            } else {
                vec![1000, 10_000]
            }
        } else {
            args.s6_conns.clone()
        },
        window_secs: args.s6_secs.unwrap_or(if args.quick { 5.0 } else { 20.0 }),
        settle_secs: args.s6_settle_secs,
        vias: args.s6_via.clone(),
    };
    let mut out = s6::S6Results {
        plan: plan.clone(),
        ..Default::default()
    };
    let (origin_pid, origin) = match s6::start_origin(ctx).await {
        Ok(o) => o,
        Err(e) => {
            eprintln!("bench:   S6: origin failed to start: {e}");
            out.plan_note = format!("origin failed to start: {e}");
            return out;
        }
    };
    let (vias, missing) = s6::vias(&plan.vias, routes, origin, origin_pid);
    let cellgate_up = vias.iter().any(|v| v.name.starts_with("cellgate"));
    let mut api = None;
    out.plan_note = if cellgate_up {
        let applied = async {
            let a = s6::Api::connect(control_plane, work).await?;
            let note = s6::apply_plan(&a).await?;
            api = Some(a);
            Ok::<_, String>(note)
        };
        match applied.await {
            Ok(note) => note,
            Err(e) => {
                eprintln!("bench:   S6: could not apply the plan: {e}");
                format!("**No plan applied** ({e}): limits did not run")
            }
        }
    } else {
        "cellgate not running".into()
    };
    for &n in &plan.conns {
        for (name, why) in &missing {
            out.runs.push((name.clone(), n, Err(why.clone())));
        }
        for via in &vias {
            settle().await;
            // Let the previous run's sockets finish closing.
            tokio::time::sleep(Duration::from_secs(2)).await;
            let r = s6::run(ctx, via, n, &plan, api.as_ref()).await;
            match &r {
                Ok(m) => eprintln!(
                    "bench:   S6 {} {n}: {} ok, {} errors, p99 {} ms; {}",
                    via.name,
                    m.v["requests"],
                    m.v["errors"],
                    m.v["p99_ms"],
                    m.cpu
                        .iter()
                        .map(|(l, c)| format!("{l} {:.1} %", 100.0 * c / m.window_secs))
                        .collect::<Vec<_>>()
                        .join(", ")
                ),
                Err(e) => eprintln!(
                    "bench:   S6 {} {n}: failed: {}",
                    via.name,
                    peers::tail(e, 200)
                ),
            }
            out.runs.push((via.name.clone(), n, r));
        }
    }
    out
}

/// S5: opens `conns` connections through `route` with `lg idle` and samples
/// PSS of each side before and while they are held.
async fn idle(ctx: &Ctx, route: &Route, conns: usize, hold_secs: f64) -> Result<Idle, String> {
    let pss = |route: &Route| -> Vec<u64> {
        route
            .sides
            .iter()
            .map(|(_, pid)| procs::session_pss_kib(*pid))
            .collect()
    };
    let before = pss(route);
    let mut cmd = tokio::process::Command::new(&ctx.lg);
    let limit = Duration::from_secs_f64(hold_secs + 150.0);
    cmd.args(&route.lg_args)
        .args(["idle", "--conns", &conns.to_string()])
        .args(["--hold-secs", &hold_secs.to_string()])
        .args(["--timeout-secs", &limit.as_secs().to_string()])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    let mut child = cmd.spawn().map_err(|e| format!("start lg idle: {e}"))?;
    let (mut lines, err_task) = procs::take_output(&mut child)?;
    let work = async {
        let mut holding: Option<Vec<u64>> = None;
        let mut last: Option<Value> = None;
        while let Some(line) = lines.next_line().await.map_err(|e| e.to_string())? {
            let Ok(v) = serde_json::from_str::<Value>(&line) else {
                continue;
            };
            if v.get("phase").and_then(Value::as_str) == Some("holding") {
                // Sample now and once more a moment later; keep the larger.
                let first = pss(route);
                let settle = (hold_secs / 2.0).min(1.0);
                tokio::time::sleep(Duration::from_secs_f64(settle)).await;
                let second = pss(route);
                holding = Some(
                    first
                        .into_iter()
                        .zip(second)
                        .map(|(a, b)| a.max(b))
                        .collect(),
                );
            } else {
                last = Some(v);
            }
        }
        Ok::<_, String>((holding, last))
    };
    let outcome = tokio::time::timeout(limit + Duration::from_secs(5), work).await;
    let _ = tokio::time::timeout(Duration::from_secs(5), child.wait()).await;
    let stderr_text = tokio::time::timeout(Duration::from_secs(2), err_task)
        .await
        .ok()
        .and_then(Result::ok)
        .unwrap_or_default();
    let (holding, last) =
        outcome.map_err(|_| format!("lg idle timed out after {}s", limit.as_secs()))??;
    let last = last.ok_or_else(|| {
        format!(
            "lg idle printed no result: {}",
            peers::tail(&stderr_text, 300)
        )
    })?;
    if let Some(e) = last.get("error").and_then(Value::as_str) {
        return Err(e.to_string());
    }
    let holding = holding.ok_or("lg idle never reported the holding phase")?;
    let n = |k: &str| last.get(k).and_then(Value::as_u64).unwrap_or(0);
    Ok(Idle {
        opened: n("opened"),
        errors: n("errors"),
        alive_after_hold: n("alive_after_hold"),
        sides: route
            .sides
            .iter()
            .zip(before.into_iter().zip(holding))
            .map(|((label, _), (b, h))| Side {
                label: label.clone(),
                before_kib: b,
                holding_kib: h,
            })
            .collect(),
    })
}

/// `tests/bench/peers.sh install`, bounded; a failure only means n/a peers.
async fn install_peers(root: &Path, work: &Path) {
    let script = root.join("tests/bench/peers.sh");
    let log = work.join("peers-install.log");
    eprintln!(
        "bench: installing peers (tests/bench/peers.sh install; log {})",
        log.display()
    );
    let Ok(file) = std::fs::File::create(&log) else {
        return;
    };
    let Ok(err) = file.try_clone() else { return };
    let status = tokio::time::timeout(
        Duration::from_secs(2400),
        tokio::process::Command::new("bash")
            .arg(&script)
            .arg("install")
            .stdin(Stdio::null())
            .stdout(file)
            .stderr(err)
            .kill_on_drop(true)
            .status(),
    )
    .await;
    match status {
        Ok(Ok(s)) if s.success() => {}
        Ok(Ok(s)) => eprintln!("bench: peers.sh install exited {s}; continuing"),
        Ok(Err(e)) => eprintln!("bench: cannot run peers.sh: {e}; continuing"),
        Err(_) => eprintln!("bench: peers.sh install timed out; continuing"),
    }
}

/// `cargo build --release -p control-plane -p edge-agent`, bounded.
async fn build_cellgate(root: &Path, work: &Path, limit: Duration) -> Result<(), String> {
    let log = work.join("cellgate-build.log");
    eprintln!(
        "bench: building cellgate (cargo build --release -p control-plane -p edge-agent; log {})",
        log.display()
    );
    let file = std::fs::File::create(&log).map_err(|e| e.to_string())?;
    let err = file.try_clone().map_err(|e| e.to_string())?;
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let status = tokio::time::timeout(
        limit,
        tokio::process::Command::new(cargo)
            .args([
                "build",
                "--release",
                "-p",
                "control-plane",
                "-p",
                "edge-agent",
            ])
            .current_dir(root)
            .stdin(Stdio::null())
            .stdout(file)
            .stderr(err)
            .kill_on_drop(true)
            .status(),
    )
    .await;
    let tail = || peers::tail(&std::fs::read_to_string(&log).unwrap_or_default(), 400);
    match status {
        Ok(Ok(s)) if s.success() => Ok(()),
        Ok(Ok(s)) => Err(format!("cellgate build failed ({s}): {}", tail())),
        Ok(Err(e)) => Err(format!("cannot run cargo: {e}")),
        Err(_) => Err(format!("cellgate build exceeded {}s", limit.as_secs())),
    }
}

/// Machine and peer versions for the report header.
fn meta(root: &Path) -> Vec<String> {
    let mut m = Vec::new();
    let first_line = |cmd: &str, args: &[&str]| -> Option<String> {
        let o = std::process::Command::new(cmd)
            .args(args)
            .stderr(Stdio::null())
            .output()
            .ok()?;
        String::from_utf8_lossy(&o.stdout)
            .lines()
            .find(|l| !l.trim().is_empty())
            .map(|l| l.trim().to_string())
    };
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    m.push(format!("machine: {cores} cores, Linux {}", kernel.trim()));
    let pkgs = first_line(
        "dpkg-query",
        &[
            "-W",
            "-f",
            "${Package} ${Version}, ",
            "iperf3",
            "microsocks",
            "dante-server",
        ],
    );
    if let Some(p) = pkgs {
        m.push(format!("peer packages: {}", p.trim_end_matches(',')));
    }
    if let Some(rh) = procs::which("rathole") {
        let v = std::process::Command::new(rh)
            .arg("--version")
            .output()
            .ok()
            .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
            .and_then(|t| {
                t.lines().find_map(|l| {
                    l.trim()
                        .strip_prefix("Build Version:")
                        .map(|v| v.trim().to_string())
                })
            });
        m.push(format!(
            "rathole {}",
            v.unwrap_or_else(|| "(version unknown)".into())
        ));
    }
    if let Some(rev) = first_line(
        "git",
        &[
            "-C",
            &root.display().to_string(),
            "rev-parse",
            "--short",
            "HEAD",
        ],
    ) {
        m.push(format!("cellgate commit: {rev}"));
    }
    m
}
