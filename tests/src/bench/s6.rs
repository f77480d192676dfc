//! S6, active concurrency: N keep-alive customer connections, each sending
//! one `GET` for 1 KiB per second, through cellgate's full path (customer →
//! control plane → QUIC → agent → origin) with a plan whose limits are high
//! enough never to refuse, so the limiter and the usage accounting run on
//! every connection and request; and the same load straight to the origin
//! (`direct`), the physical reference.
//!
//! Glossary:
//! - **origin**: `lg serve-http`, a keep-alive HTTP/1.1 server answering
//!   `GET /r/1024` with 1 KiB, in its own session.
//! - **via**: how the customer reaches it: `direct`; `cellgate-http`,
//!   absolute-form requests to the HTTP proxy (each request is its own
//!   upstream flow: a QUIC stream and a TCP connection from the agent, and a
//!   credential check); `cellgate-connect`, keep-alive requests inside one
//!   CONNECT tunnel per connection; `cellgate-socks5`, the same inside one
//!   SOCKS5 tunnel.
//! - **window**: the measured interval, starting a few seconds after every
//!   connection is open. `lg active` prints a line when it starts and ends;
//!   the bench reads `/proc` CPU counters at those moments.

use std::fmt::Write as _;
use std::net::SocketAddr;
use std::path::Path;
use std::process::Stdio;
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use tokio::io::{AsyncBufReadExt, BufReader};

use crate::peers::{self, Ctx, Route};
use crate::procs;

/// Every via S6 knows, in report order.
pub const VIAS: [&str; 4] = [
    "direct",
    "cellgate-http",
    "cellgate-connect",
    "cellgate-socks5",
];

#[derive(Debug, Clone, Default)]
pub struct Plan6 {
    /// Connection counts, run in this order (each with every via).
    pub conns: Vec<usize>,
    pub window_secs: f64,
    pub settle_secs: f64,
    pub vias: Vec<String>,
}

/// One `lg active` run with the counters read around its window.
#[derive(Debug, Clone)]
pub struct Measured {
    /// `lg active`'s result line.
    pub v: Value,
    /// The window as timed by the bench, between the two phase lines.
    pub window_secs: f64,
    /// CPU seconds used during the window: every measured side, then `lg`.
    pub cpu: Vec<(String, f64)>,
    /// Control-plane CPU seconds from the start of `lg` until every
    /// connection was open (handshakes, credential checks, tunnel setup).
    pub open_cpu: Option<f64>,
    /// Control-plane RSS (KiB) before `lg` started and at the window's end.
    pub rss_kib: Option<(u64, u64)>,
    /// `/proc/loadavg` at the window's end (other work on the machine).
    pub load: String,
    /// Argon2 verifications the control plane ran during the whole run
    /// (open phase included), when its `/metrics` exposes the counter.
    pub password_checks: Option<u64>,
}

#[derive(Debug, Clone, Default)]
pub struct S6Results {
    pub plan: Plan6,
    /// The plan applied to the bench customer, or why it could not be.
    pub plan_note: String,
    /// (via, connections asked for, outcome)
    pub runs: Vec<(String, usize, Result<Measured, String>)>,
}

/// One way to reach the origin, with the processes measured for it.
#[derive(Debug, Clone)]
pub struct Via {
    pub name: String,
    pub lg_args: Vec<String>,
    /// Extra `active` arguments (`--forward`).
    pub mode_args: Vec<String>,
    pub sides: Vec<(String, u32)>,
}

/// Starts `lg serve-http` in its own session; returns its PID and address.
pub async fn start_origin(ctx: &Ctx) -> Result<(u32, SocketAddr), String> {
    let args: Vec<String> = [
        "serve-http",
        "--listen",
        "127.0.0.1:0",
        "--timeout-secs",
        "86400",
    ]
    .map(String::from)
    .to_vec();
    let (pid, stdout) = ctx
        .procs
        .spawn_piped("origin", &ctx.lg, &args, &[], &ctx.work.join("origin.log"))
        .map_err(|e| format!("{e:#}"))?;
    let mut lines = BufReader::new(stdout).lines();
    let first = tokio::time::timeout(Duration::from_secs(10), lines.next_line())
        .await
        .map_err(|_| "origin did not print its address within 10s".to_string())?
        .map_err(|e| e.to_string())?
        .ok_or("origin exited without printing its address")?;
    let addr = first
        .strip_prefix("listening ")
        .and_then(|a| a.parse().ok())
        .ok_or_else(|| format!("unexpected first origin line {first:?}"))?;
    tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
    Ok((pid, addr))
}

/// The vias asked for that can run: `direct` always, the cellgate ones
/// when their proxy route is up.
pub fn vias(
    wanted: &[String],
    routes: &[Route],
    origin: SocketAddr,
    origin_pid: u32,
) -> (Vec<Via>, Vec<(String, String)>) {
    let mut ok = Vec::new();
    let mut missing = Vec::new();
    let origin_side = ("origin".to_string(), origin_pid);
    for name in VIAS {
        if !wanted.iter().any(|w| w == name) {
            continue;
        }
        let (route_name, mode_args) = match name {
            "direct" => {
                ok.push(Via {
                    name: name.into(),
                    lg_args: vec!["--direct".into(), "--target".into(), origin.to_string()],
                    mode_args: vec![],
                    sides: vec![origin_side.clone()],
                });
                continue;
            }
            "cellgate-http" => ("cellgate-http", vec!["--forward".to_string()]),
            "cellgate-connect" => ("cellgate-http", vec![]),
            _ => ("cellgate-socks5", vec![]),
        };
        let route = routes.iter().find(|r| r.name == route_name);
        let url = route.and_then(|r| {
            let i = r.lg_args.iter().position(|a| a == "--proxy")?;
            r.lg_args.get(i + 1).cloned()
        });
        match (route, url) {
            (Some(r), Some(url)) => {
                let mut sides = r.sides.clone();
                sides.push(origin_side.clone());
                ok.push(Via {
                    name: name.into(),
                    lg_args: vec!["--proxy".into(), url, "--target".into(), origin.to_string()],
                    mode_args,
                    sides,
                });
            }
            _ => missing.push((name.to_string(), format!("{route_name} is not running"))),
        }
    }
    (ok, missing)
}

/// The plan S6 runs under: every limit set, none reached.
pub fn bench_plan() -> Value {
    json!({
        "name": "bench-s6",
        "max_threads": 20_000,
        "new_conn_per_sec": 100_000,
        "bw_conn_bps": 1_000_000_000u64,
        "bw_customer_bps": 10_000_000_000u64,
        "quota_bytes": 10_000_000_000_000u64,
        "allowed_ports": [[1, 65535]],
    })
}

/// The running control plane's admin API, with a token made by the CLI.
#[derive(Clone)]
pub struct Api {
    base: String,
    token: String,
}

impl Api {
    pub async fn connect(control_plane: &Path, work: &Path) -> Result<Api, String> {
        let ready = std::fs::read_to_string(work.join(peers::CELLGATE_READY))
            .map_err(|e| format!("read the ready file: {e}"))?;
        let ready: Value = serde_json::from_str(&ready).map_err(|e| format!("ready file: {e}"))?;
        let api = ready
            .get("api")
            .and_then(Value::as_str)
            .ok_or("ready file has no api address")?;
        let data = work.join(peers::CELLGATE_DATA).display().to_string();
        let out = peers::admin(
            control_plane,
            &[
                "--data-dir",
                &data,
                "admin-token",
                "create",
                "--label",
                "bench-s6",
            ],
            &[("RUST_LOG", "warn")],
        )
        .await?;
        let token = out
            .lines()
            .rev()
            .map(str::trim)
            .find(|l| !l.is_empty())
            .ok_or("`admin-token create` printed nothing")?
            .to_string();
        Ok(Api {
            base: format!("http://{api}"),
            token,
        })
    }

    /// One call; the status and the body.
    async fn call(
        &self,
        method: &str,
        path: &str,
        body: Option<&Value>,
    ) -> Result<(u16, Vec<u8>), String> {
        let url = format!("{}{path}", self.base);
        let auth = format!("Bearer {}", self.token);
        let body = body.map(Value::to_string).unwrap_or_default();
        let headers = [
            ("Authorization", auth.as_str()),
            ("Content-Type", "application/json"),
        ];
        let res = edge_agent::net::http::send(
            edge_agent::net::http::Request {
                method,
                url: &url,
                headers: &headers,
                body: body.as_bytes(),
            },
            None,
            Duration::from_secs(15),
        )
        .await
        .map_err(|e| format!("{method} {url}: {e}"))?;
        Ok((res.status, res.body))
    }

    async fn json(&self, method: &str, path: &str, body: Option<&Value>) -> Result<Value, String> {
        let (status, body) = self.call(method, path, body).await?;
        let v: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
        if !(200..300).contains(&status) {
            return Err(format!("{method} {path}: HTTP {status}: {v}"));
        }
        Ok(v)
    }

    /// Argon2 verifications so far, from `GET /metrics`, when the control
    /// plane exposes them.
    pub async fn password_checks(&self) -> Option<u64> {
        let (status, body) = self.call("GET", "/metrics", None).await.ok()?;
        if status != 200 {
            return None;
        }
        parse_metric(&String::from_utf8_lossy(&body), PASSWORD_CHECKS)
    }
}

/// The control plane's counter of argon2 verifications.
pub const PASSWORD_CHECKS: &str = "cellgate_auth_password_checks_total";

/// The value of an unlabelled sample `name` in Prometheus/OpenMetrics text.
pub fn parse_metric(text: &str, name: &str) -> Option<u64> {
    text.lines().find_map(|l| {
        let rest = l.strip_prefix(name)?;
        let value = rest.strip_prefix(' ')?.split_whitespace().next()?;
        value.parse::<f64>().ok().map(|v| v as u64)
    })
}

/// Creates [`bench_plan`] through the admin API and puts the bench customer
/// on it; returns a one-line description.
pub async fn apply_plan(api: &Api) -> Result<String, String> {
    let plan = api
        .json("POST", "/api/v1/plans", Some(&bench_plan()))
        .await?;
    let plan_id = plan
        .get("id")
        .and_then(Value::as_str)
        .ok_or("plan without id")?
        .to_string();
    let customers = api.json("GET", "/api/v1/customers", None).await?;
    let cid = customers
        .as_array()
        .into_iter()
        .flatten()
        .find(|c| c.get("username").and_then(Value::as_str) == Some(peers::USER))
        .and_then(|c| c.get("id").and_then(Value::as_str))
        .ok_or("bench customer not found")?
        .to_string();
    api.json(
        "PATCH",
        &format!("/api/v1/customers/{cid}/access"),
        Some(&json!({"plan": plan_id})),
    )
    .await?;
    let p = bench_plan();
    Ok(format!(
        "Plan `bench-s6` on the customer: max_threads {}, new_conn_per_sec {}, bw_conn_bps {}, \
         bw_customer_bps {}, quota_bytes {}, ports 1–65535, request log `{}` (the default)",
        p["max_threads"],
        p["new_conn_per_sec"],
        p["bw_conn_bps"],
        p["bw_customer_bps"],
        p["quota_bytes"],
        plan.get("log_mode")
            .and_then(Value::as_str)
            .unwrap_or("host"),
    ))
}

/// CPU seconds per side, read at one moment.
type Reading = (Instant, Vec<(String, f64)>);

/// Runs `lg active` through `via` and reads the counters around its window.
pub async fn run(
    ctx: &Ctx,
    via: &Via,
    conns: usize,
    plan: &Plan6,
    api: Option<&Api>,
) -> Result<Measured, String> {
    let checks_before = match api {
        Some(a) if via.name != "direct" => a.password_checks().await,
        _ => None,
    };
    let limit =
        Duration::from_secs_f64(90.0 + plan.settle_secs + plan.window_secs + conns as f64 / 100.0);
    let cp = via
        .sides
        .iter()
        .find(|(l, _)| l == "control-plane")
        .map(|s| s.1);
    let cpu_now = |lg: u32| -> Vec<(String, f64)> {
        let mut v: Vec<(String, f64)> = via
            .sides
            .iter()
            .map(|(l, pid)| (l.clone(), procs::session_cpu_secs(*pid)))
            .collect();
        v.push(("lg".into(), procs::pid_cpu_secs(lg)));
        v
    };
    let rss_before = cp.map(procs::session_rss_kib);
    let cp_cpu_start = cp.map(procs::session_cpu_secs);
    let mut cmd = tokio::process::Command::new(&ctx.lg);
    cmd.args(&via.lg_args)
        .arg("active")
        .args(["--conns", &conns.to_string()])
        .args(["--settle-secs", &plan.settle_secs.to_string()])
        .args(["--window-secs", &plan.window_secs.to_string()])
        .args(&via.mode_args)
        .args(["--timeout-secs", &limit.as_secs().to_string()])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    let mut child = cmd.spawn().map_err(|e| format!("start lg active: {e}"))?;
    let lg_pid = child.id().unwrap_or(0);
    let (mut lines, err_task) = procs::take_output(&mut child)?;
    let work = async {
        let mut open_cpu = None;
        let mut start: Option<Reading> = None;
        // (counters, control-plane RSS, load average)
        let mut end: Option<(Reading, Option<u64>, String)> = None;
        let mut last = None;
        while let Some(line) = lines.next_line().await.map_err(|e| e.to_string())? {
            let Ok(v) = serde_json::from_str::<Value>(&line) else {
                continue;
            };
            match v.get("phase").and_then(Value::as_str) {
                Some("established") => {
                    open_cpu = cp
                        .zip(cp_cpu_start)
                        .map(|(pid, c0)| procs::session_cpu_secs(pid) - c0);
                }
                Some("window") => start = Some((Instant::now(), cpu_now(lg_pid))),
                Some("window_end") => {
                    let t = Instant::now();
                    let cpu = cpu_now(lg_pid);
                    let load = std::fs::read_to_string("/proc/loadavg")
                        .unwrap_or_default()
                        .split_whitespace()
                        .take(3)
                        .collect::<Vec<_>>()
                        .join(" ");
                    end = Some(((t, cpu), cp.map(procs::session_rss_kib), load));
                }
                _ => last = Some(v),
            }
        }
        Ok::<_, String>((open_cpu, start, end, last))
    };
    let outcome = tokio::time::timeout(limit + Duration::from_secs(10), work).await;
    let _ = tokio::time::timeout(Duration::from_secs(10), child.wait()).await;
    let stderr_text = tokio::time::timeout(Duration::from_secs(2), err_task)
        .await
        .ok()
        .and_then(Result::ok)
        .unwrap_or_default();
    let (open_cpu, start, end, last) =
        outcome.map_err(|_| format!("lg active timed out after {}s", limit.as_secs()))??;
    let v = last.ok_or_else(|| {
        format!(
            "lg active printed no result: {}",
            peers::tail(&stderr_text, 300)
        )
    })?;
    if let Some(e) = v.get("error").and_then(Value::as_str) {
        return Err(e.to_string());
    }
    let ((t0, c0), ((t1, c1), rss_end, load)) = start
        .zip(end)
        .ok_or("lg active never reported its window")?;
    let password_checks = match (checks_before, api) {
        (Some(b), Some(a)) => a.password_checks().await.map(|n| n.saturating_sub(b)),
        _ => None,
    };
    Ok(Measured {
        password_checks,
        window_secs: (t1 - t0).as_secs_f64(),
        cpu: c0
            .into_iter()
            .zip(c1)
            .map(|((l, a), (_, b))| (l, b - a))
            .collect(),
        open_cpu,
        rss_kib: rss_before.zip(rss_end),
        load,
        v,
    })
}

// ---------------------------------------------------------------------------
// Report
// ---------------------------------------------------------------------------

/// Target: control-plane CPU per 1,000 active connections, % of one core.
pub const TARGET_PCT_PER_1K: f64 = 10.0;

impl Measured {
    fn num(&self, k: &str) -> Option<f64> {
        self.v.get(k).and_then(Value::as_f64)
    }

    /// % of one core used by `label` during the window.
    fn pct(&self, label: &str) -> Option<f64> {
        let c = self.cpu.iter().find(|(l, _)| l == label)?.1;
        (self.window_secs > 0.0).then(|| 100.0 * c / self.window_secs)
    }

    fn total_pct(&self) -> f64 {
        100.0 * self.cpu.iter().map(|(_, c)| c).sum::<f64>() / self.window_secs.max(1e-9)
    }

    fn opened(&self) -> f64 {
        self.num("opened").unwrap_or(0.0)
    }

    /// Control-plane % of a core per 1,000 open connections.
    fn cp_per_1k(&self) -> Option<f64> {
        let n = self.opened();
        (n > 0.0).then(|| self.pct("control-plane").map(|p| p / (n / 1000.0)))?
    }
}

fn f(x: Option<f64>, digits: usize) -> String {
    x.map_or("n/a".into(), |v| format!("{v:.digits$}"))
}

fn short(e: &str) -> String {
    let one = e.replace('|', "/").replace('\n', " ");
    if one.chars().count() > 200 {
        format!("{}…", one.chars().take(200).collect::<String>())
    } else {
        one
    }
}

impl S6Results {
    fn get(&self, via: &str, conns: usize) -> Option<&Measured> {
        self.runs
            .iter()
            .find(|(v, n, _)| v == via && *n == conns)
            .and_then(|(_, _, r)| r.as_ref().ok())
    }

    pub fn markdown(&self) -> String {
        let mut o = String::new();
        let p = &self.plan;
        let _ = writeln!(
            o,
            "## S6 — active connections, one 1 KiB GET per connection per second\n\n\
             Window {} s, starting {} s after every connection is open. CPU = utime + stime \
             read from `/proc` at the window's start and end, in % of one core. \
             `cellgate-http`: absolute-form GETs to the HTTP proxy (one upstream flow and one \
             credential check per request); `cellgate-connect` / `cellgate-socks5`: keep-alive \
             GETs inside one tunnel per connection. {}.\n",
            p.window_secs, p.settle_secs, self.plan_note
        );
        let counted = self
            .runs
            .iter()
            .any(|(_, _, r)| r.as_ref().is_ok_and(|m| m.password_checks.is_some()));
        let _ = writeln!(
            o,
            "Argon2 verifications (\"argon2 runs\"): {} \"CP ms per conn opened\" is the \
             control plane's CPU from the start of the run until every connection is open, \
             divided by the connections; one argon2id verification (19 MiB, t=2) costs tens of \
             ms of CPU, so a figure far below that means the credential cache answered.\n",
            if counted {
                "the change of `cellgate_auth_password_checks_total` (`GET /metrics`) over the \
                 whole run, open phase included."
            } else {
                "not exposed by this control plane (no `cellgate_auth_password_checks_total` \
                 in `GET /metrics`), so not reported."
            }
        );
        let _ = writeln!(
            o,
            "| Route | conns | open / asked | requests ok (expected) | errors | p50 ms | p99 ms | \
             CP % core | **CP % per 1k conns** | agent % | origin % | lg % | all CPU × direct | \
             CP RSS MiB (KiB/conn) | CP ms per conn opened | argon2 runs | load avg |"
        );
        let _ = writeln!(
            o,
            "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"
        );
        let order = |v: &str| VIAS.iter().position(|x| *x == v).unwrap_or(VIAS.len());
        for &n in &p.conns {
            let mut rows: Vec<_> = self.runs.iter().filter(|(_, c, _)| *c == n).collect();
            rows.sort_by_key(|(v, _, _)| order(v));
            for (via, conns, res) in rows {
                let m = match res {
                    Ok(m) => m,
                    Err(e) => {
                        let _ =
                            writeln!(o, "| {via} | {conns} | failed: {} ||||||||||||||", short(e));
                        continue;
                    }
                };
                let direct = self.get("direct", n);
                let ratio = direct
                    .filter(|_| via != "direct")
                    .map(|d| m.total_pct() / d.total_pct().max(1e-9));
                let p50 = m.num("p50_ms");
                let p99 = m.num("p99_ms");
                let added = |mine: Option<f64>, key: &str| match (
                    mine,
                    direct.filter(|_| via != "direct").and_then(|d| d.num(key)),
                ) {
                    (Some(a), Some(d)) => format!("{a:.2} (+{:.2})", a - d),
                    (a, _) => f(a, 2),
                };
                let rss = m.rss_kib.map(|(b, e)| {
                    format!(
                        "{:.0} ({:.1})",
                        e as f64 / 1024.0,
                        (e as f64 - b as f64) / m.opened().max(1.0)
                    )
                });
                let open_ms = m
                    .open_cpu
                    .filter(|_| m.opened() > 0.0)
                    .map(|c| 1000.0 * c / m.opened());
                let _ = writeln!(
                    o,
                    "| {via} | {conns} | {:.0} / {conns}{} | {:.0} ({:.0}) | {:.0} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} |",
                    m.opened(),
                    match m.num("open_errors") {
                        Some(e) if e > 0.0 => format!(" ({e:.0} failed)"),
                        _ => String::new(),
                    },
                    m.num("requests").unwrap_or(0.0),
                    m.num("expected_requests").unwrap_or(0.0),
                    m.num("errors").unwrap_or(0.0),
                    added(p50, "p50_ms"),
                    added(p99, "p99_ms"),
                    f(m.pct("control-plane"), 1),
                    match m.cp_per_1k() {
                        Some(v) => format!("**{v:.1}**"),
                        None => "–".into(),
                    },
                    f(m.pct("edge-agent"), 1),
                    f(m.pct("origin"), 1),
                    f(m.pct("lg"), 1),
                    ratio.map_or("–".into(), |r| format!("{r:.2}×")),
                    rss.unwrap_or_else(|| "–".into()),
                    open_ms.map_or("–".into(), |v| format!("{v:.2}")),
                    m.password_checks.map_or("–".into(), |n| n.to_string()),
                    m.load,
                );
            }
        }
        let _ = writeln!(o);
        for (via, conns, res) in &self.runs {
            let Ok(m) = res else { continue };
            for key in ["first_open_error", "first_error"] {
                if let Some(e) = m.v.get(key).and_then(Value::as_str) {
                    let _ = writeln!(o, "- {via} at {conns}: {key}: {}", short(e));
                }
            }
        }
        let _ = writeln!(o);
        let _ = writeln!(o, "| S6 target | Route | conns | Measured | Result |");
        let _ = writeln!(o, "|---|---|---|---|---|");
        for (via, conns, res) in &self.runs {
            if via == "direct" {
                continue;
            }
            let m = res.as_ref().ok();
            let v = m.and_then(Measured::cp_per_1k);
            // CPU per connection means little when the load was not carried.
            let carried = m.map(|m| {
                m.num("requests").unwrap_or(0.0)
                    / m.num("expected_requests").unwrap_or(0.0).max(1.0)
            });
            let verdict = match (v, carried) {
                (Some(_), Some(c)) if c < 0.99 => {
                    format!(
                        "not comparable: only {:.0} % of the requests were sent",
                        100.0 * c
                    )
                }
                (Some(v), _) if v <= TARGET_PCT_PER_1K => "PASS".to_string(),
                (Some(v), _) => format!("**FAIL** ({:.1}× the target)", v / TARGET_PCT_PER_1K),
                (None, _) => "n/a".into(),
            };
            let _ = writeln!(
                o,
                "| control plane ≤ {TARGET_PCT_PER_1K:.0} % of a core per 1,000 conns | {via} | {conns} | {} % | {verdict} |",
                f(v, 1)
            );
            let served = m.map(|m| {
                let ok = m.num("requests").unwrap_or(0.0);
                let exp = m.num("expected_requests").unwrap_or(0.0);
                (ok, exp, m.num("errors").unwrap_or(0.0))
            });
            let _ = writeln!(
                o,
                "| every request served (≥ 99 % of expected, 0 errors) | {via} | {conns} | {} | {} |",
                served.map_or("n/a".into(), |(ok, exp, e)| format!(
                    "{ok:.0} of {exp:.0}, {e:.0} errors"
                )),
                match served {
                    Some((ok, exp, e)) if e == 0.0 && ok >= 0.99 * exp => "PASS",
                    Some(_) => "**FAIL**",
                    None => "n/a",
                }
            );
        }
        let _ = writeln!(o);
        o
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn measured(opened: f64, cp_secs: f64, window: f64) -> Measured {
        Measured {
            v: json!({"opened": opened, "requests": 100.0, "expected_requests": 100.0, "errors": 0.0}),
            window_secs: window,
            cpu: vec![("control-plane".into(), cp_secs), ("lg".into(), 1.0)],
            open_cpu: Some(0.5),
            rss_kib: Some((1000, 2000)),
            load: "1.00 1.00 1.00".into(),
            password_checks: Some(1),
        }
    }

    #[test]
    fn metric_value_is_found_by_exact_name() {
        let text = "# TYPE cellgate_auth_password_checks counter\n\
                    cellgate_auth_password_checks_total 17\n\
                    cellgate_auth_password_checks_total_other 3\n# EOF\n";
        assert_eq!(parse_metric(text, PASSWORD_CHECKS), Some(17));
        assert_eq!(parse_metric("# EOF\n", PASSWORD_CHECKS), None);
    }

    #[test]
    fn cpu_per_thousand_connections() {
        // 2 CPU-s in a 20 s window = 10 % of a core; 2,000 conns → 5 % per 1k.
        let m = measured(2000.0, 2.0, 20.0);
        assert!((m.pct("control-plane").unwrap() - 10.0).abs() < 1e-9);
        assert!((m.cp_per_1k().unwrap() - 5.0).abs() < 1e-9);
        assert!(measured(0.0, 2.0, 20.0).cp_per_1k().is_none());
    }

    #[test]
    fn report_says_fail_with_the_factor() {
        let r = S6Results {
            plan: Plan6 {
                conns: vec![1000],
                window_secs: 20.0,
                settle_secs: 3.0,
                vias: vec!["direct".into(), "cellgate-socks5".into()],
            },
            plan_note: "plan".into(),
            runs: vec![
                ("direct".into(), 1000, Ok(measured(1000.0, 0.0, 20.0))),
                // 6 CPU-s / 20 s = 30 % for 1,000 conns: 3× the target.
                (
                    "cellgate-socks5".into(),
                    1000,
                    Ok(measured(1000.0, 6.0, 20.0)),
                ),
            ],
        };
        let md = r.markdown();
        assert!(md.contains("**FAIL** (3.0× the target)"), "{md}");
    }

    #[test]
    fn cpu_is_not_judged_when_the_load_was_not_carried() {
        let mut m = measured(1000.0, 1.0, 20.0);
        m.v["requests"] = json!(50.0);
        let r = S6Results {
            plan: Plan6 {
                conns: vec![1000],
                ..Plan6::default()
            },
            plan_note: "plan".into(),
            runs: vec![("cellgate-http".into(), 1000, Ok(m))],
        };
        let md = r.markdown();
        assert!(md.contains("not comparable: only 50 %"), "{md}");
        assert!(md.contains("| 50 of 100, 0 errors | **FAIL** |"), "{md}");
    }
}
