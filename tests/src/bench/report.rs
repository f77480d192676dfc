//! Results of a bench run and their markdown report (medians, ratios,
//! targets with PASS/FAIL). Rendering is pure: it only reads [`Results`].

use std::collections::HashMap;
use std::fmt::Write as _;

use serde_json::Value;

/// One successful `lg` run with the CPU seconds each measured side used.
#[derive(Debug, Clone)]
pub struct Sample {
    pub v: Value,
    pub cpu: Vec<(String, f64)>,
}

pub type Runs = Vec<Result<Sample, String>>;

/// Memory of one side of a peer during the idle test.
#[derive(Debug, Clone)]
pub struct Side {
    pub label: String,
    pub before_kib: u64,
    pub holding_kib: u64,
}

#[derive(Debug, Clone)]
pub struct Idle {
    pub opened: u64,
    pub errors: u64,
    pub alive_after_hold: u64,
    pub sides: Vec<Side>,
}

#[derive(Debug, Clone, Default)]
pub struct Plan {
    pub rounds: usize,
    pub quick: bool,
    pub bulk_bytes: u64,
    pub cps_workers: usize,
    pub cps_secs: f64,
    pub rtt: Vec<(usize, usize)>,
    pub rtt_max_secs: f64,
    pub idle_conns: usize,
    pub idle_peer_conns: usize,
    pub idle_hold_secs: f64,
    pub iperf_secs: u64,
}

#[derive(Debug, Default)]
pub struct Results {
    pub plan: Plan,
    /// Every route in display order, with the reason it is unavailable.
    pub routes: Vec<(String, Option<String>)>,
    pub s1: HashMap<String, Runs>,
    pub iperf: Vec<Result<f64, String>>,
    pub iperf_unavailable: Option<String>,
    pub s3: HashMap<String, Runs>,
    pub s4: HashMap<(String, usize), Runs>,
    /// route → (connections asked for, outcome)
    pub s5: Vec<(String, usize, Result<Idle, String>)>,
    /// S6 (active connections), when it ran; it renders itself.
    pub s6: Option<crate::s6::S6Results>,
    pub meta: Vec<String>,
    /// Peer processes that exited during the run (they should not).
    pub exits: Vec<String>,
    pub seconds: f64,
}

const DIRECT: &str = "direct";
const NOISE: &str = "rathole-noise";
const RATHOLE_TCP: &str = "rathole-tcp";
const CELLGATE: [&str; 2] = ["cellgate-http", "cellgate-socks5"];
const GIB: f64 = (1u64 << 30) as f64;

pub fn median(mut xs: Vec<f64>) -> Option<f64> {
    if xs.is_empty() {
        return None;
    }
    xs.sort_by(|a, b| a.total_cmp(b));
    let n = xs.len();
    Some(if n % 2 == 1 {
        xs[n / 2]
    } else {
        (xs[n / 2 - 1] + xs[n / 2]) / 2.0
    })
}

fn values(runs: Option<&Runs>, key: &str) -> Vec<f64> {
    runs.map(|r| {
        r.iter()
            .filter_map(|s| s.as_ref().ok())
            .filter_map(|s| s.v.get(key).and_then(Value::as_f64))
            .collect()
    })
    .unwrap_or_default()
}

fn med(runs: Option<&Runs>, key: &str) -> Option<f64> {
    median(values(runs, key))
}

fn f(x: Option<f64>, digits: usize) -> String {
    match x {
        Some(v) => format!("{v:.digits$}"),
        None => "n/a".into(),
    }
}

fn times(r: Option<f64>) -> String {
    r.map_or("n/a".into(), |r| format!("{r:.2}×"))
}

fn ratio(a: Option<f64>, b: Option<f64>) -> Option<f64> {
    match (a, b) {
        (Some(a), Some(b)) if b > 0.0 => Some(a / b),
        _ => None,
    }
}

fn size_label(bytes: usize) -> String {
    if bytes >= 1024 && bytes.is_multiple_of(1024) {
        format!("{} KiB", bytes / 1024)
    } else {
        format!("{bytes} B")
    }
}

impl Results {
    fn available(&self, route: &str) -> bool {
        self.routes
            .iter()
            .any(|(r, why)| r == route && why.is_none())
    }

    fn na(&self, route: &str) -> String {
        match self.routes.iter().find(|(r, _)| r == route) {
            Some((_, Some(_))) => "n/a (not running)".into(),
            _ => "n/a".into(),
        }
    }

    fn s1_gbit(&self, route: &str) -> Option<f64> {
        med(self.s1.get(route), "gbit_per_s")
    }

    fn s3_cps(&self, route: &str) -> Option<f64> {
        med(self.s3.get(route), "conn_per_s")
    }

    fn s4_p50(&self, route: &str, size: usize) -> Option<f64> {
        med(self.s4.get(&(route.to_string(), size)), "p50_us")
    }

    /// Sum of stalls over rounds; `truncated` runs count as stalled too.
    fn s4_stalls(&self, route: &str, size: usize) -> Option<u64> {
        let runs = self.s4.get(&(route.to_string(), size))?;
        let ok: Vec<&Sample> = runs.iter().filter_map(|r| r.as_ref().ok()).collect();
        if ok.is_empty() {
            return None;
        }
        Some(
            ok.iter()
                .map(|s| {
                    let stalls = s.v.get("stalls").and_then(Value::as_u64).unwrap_or(0);
                    let truncated = s.v.get("truncated").and_then(Value::as_bool) == Some(true);
                    stalls.max(u64::from(truncated))
                })
                .sum(),
        )
    }

    /// CPU seconds per GiB per side (median over rounds).
    fn s1_cpu(&self, route: &str) -> Vec<(String, f64)> {
        let Some(runs) = self.s1.get(route) else {
            return vec![];
        };
        let ok: Vec<&Sample> = runs.iter().filter_map(|r| r.as_ref().ok()).collect();
        let Some(first) = ok.first() else {
            return vec![];
        };
        first
            .cpu
            .iter()
            .map(|(label, _)| {
                let per_gib: Vec<f64> = ok
                    .iter()
                    .filter_map(|s| {
                        let bytes = s.v.get("bytes").and_then(Value::as_f64)?;
                        let cpu = s.cpu.iter().find(|(l, _)| l == label)?.1;
                        Some(cpu / (bytes / GIB))
                    })
                    .collect();
                (label.clone(), median(per_gib).unwrap_or(f64::NAN))
            })
            .collect()
    }

    fn s5_per_conn(&self, route: &str) -> Option<Vec<(String, f64)>> {
        let (_, _, res) = self.s5.iter().find(|(r, _, _)| r == route)?;
        let idle = res.as_ref().ok()?;
        if idle.opened == 0 {
            return None;
        }
        Some(
            idle.sides
                .iter()
                .map(|s| {
                    let delta = s.holding_kib as f64 - s.before_kib as f64;
                    (s.label.clone(), delta / idle.opened as f64)
                })
                .collect(),
        )
    }

    pub fn markdown(&self) -> String {
        let mut o = String::new();
        let p = &self.plan;
        let _ = writeln!(o, "# cellgate bench report\n");
        for m in &self.meta {
            let _ = writeln!(o, "- {m}");
        }
        let _ = writeln!(
            o,
            "- rounds: {} (interleaved, medians){}; wall time {:.0} s\n",
            p.rounds,
            if p.quick {
                "; **--quick smoke run**"
            } else {
                ""
            },
            self.seconds
        );
        self.render_routes(&mut o);
        self.render_s1(&mut o);
        self.render_s3(&mut o);
        self.render_s4(&mut o);
        self.render_s5(&mut o);
        if let Some(s6) = &self.s6 {
            o.push_str(&s6.markdown());
        }
        self.render_targets(&mut o);
        self.render_errors(&mut o);
        o
    }

    fn render_routes(&self, o: &mut String) {
        let unavailable: Vec<_> = self
            .routes
            .iter()
            .filter_map(|(r, why)| why.as_ref().map(|w| (r, w)))
            .collect();
        if unavailable.is_empty() && self.iperf_unavailable.is_none() {
            return;
        }
        let _ = writeln!(o, "## Not running (reported as n/a)\n");
        for (r, why) in unavailable {
            let _ = writeln!(o, "- **{r}**: {why}");
        }
        if let Some(why) = &self.iperf_unavailable {
            let _ = writeln!(o, "- **iperf3**: {why}");
        }
        let _ = writeln!(o);
    }

    fn render_s1(&self, o: &mut String) {
        let p = &self.plan;
        let _ = writeln!(
            o,
            "## S1 — single-connection download, {} MiB\n",
            p.bulk_bytes >> 20
        );
        let _ = writeln!(
            o,
            "| Route | Gbit/s median (runs) | × direct | × rathole-noise | CPU-s per GiB |"
        );
        let _ = writeln!(o, "|---|---|---|---|---|");
        let direct = self.s1_gbit(DIRECT);
        let noise = self.s1_gbit(NOISE);
        if !self.iperf.is_empty() {
            let ok: Vec<f64> = self
                .iperf
                .iter()
                .filter_map(|r| r.as_ref().ok())
                .copied()
                .collect();
            let m = median(ok.clone());
            let _ = writeln!(
                o,
                "| iperf3 -P1, {} s (loopback reference) | {} ({}) | {} | | – |",
                p.iperf_secs,
                f(m, 2),
                runs_list(&ok),
                f(ratio(m, direct), 2)
            );
        }
        for (route, _) in &self.routes {
            if !self.available(route) {
                let _ = writeln!(o, "| {route} | {} | | | |", self.na(route));
                continue;
            }
            let vals = values(self.s1.get(route), "gbit_per_s");
            let m = median(vals.clone());
            let cpu = self.s1_cpu(route);
            let cpu_txt = match cpu.len() {
                0 if route == DIRECT => "–".to_string(),
                0 => "n/a".to_string(),
                1 => format!("{:.2}", cpu[0].1),
                _ => format!(
                    "{} = {:.2}",
                    cpu.iter()
                        .map(|(l, v)| format!("{l} {v:.2}"))
                        .collect::<Vec<_>>()
                        .join(" + "),
                    cpu.iter().map(|(_, v)| v).sum::<f64>()
                ),
            };
            let _ = writeln!(
                o,
                "| {route} | {} ({}) | {} | {} | {cpu_txt} |",
                f(m, 2),
                runs_list(&vals),
                f(ratio(m, direct), 2),
                f(ratio(m, noise), 2),
            );
        }
        let _ = writeln!(o);
    }

    fn render_s3(&self, o: &mut String) {
        let p = &self.plan;
        let _ = writeln!(
            o,
            "## S3 — connection rate, {} workers, {} s, 1 KiB response\n",
            p.cps_workers, p.cps_secs
        );
        let _ = writeln!(
            o,
            "| Route | conn/s | p50 ms | p99 ms | errors | × rathole-tcp | peer CPU (cores) |"
        );
        let _ = writeln!(o, "|---|---|---|---|---|---|---|");
        let rt = self.s3_cps(RATHOLE_TCP);
        for (route, _) in &self.routes {
            if !self.available(route) {
                let _ = writeln!(o, "| {route} | {} | | | | | |", self.na(route));
                continue;
            }
            let runs = self.s3.get(route);
            let cps = med(runs, "conn_per_s");
            let errors: f64 = values(runs, "errors").iter().sum();
            let failed = runs.map_or(0, |r| r.iter().filter(|x| x.is_err()).count());
            let cores = runs
                .map(|r| {
                    let per_run: Vec<f64> = r
                        .iter()
                        .filter_map(|s| s.as_ref().ok())
                        .filter_map(|s| {
                            let secs = s.v.get("seconds").and_then(Value::as_f64)?;
                            (!s.cpu.is_empty())
                                .then(|| s.cpu.iter().map(|(_, c)| c).sum::<f64>() / secs)
                        })
                        .collect();
                    median(per_run)
                })
                .unwrap_or(None);
            let _ = writeln!(
                o,
                "| {route} | {} | {} | {} | {}{} | {} | {} |",
                f(cps, 0),
                f(med(runs, "p50_ms"), 2),
                f(med(runs, "p99_ms"), 2),
                errors,
                if failed > 0 {
                    format!(" ({failed} runs failed)")
                } else {
                    String::new()
                },
                f(ratio(cps, rt), 2),
                if route == DIRECT {
                    "–".into()
                } else {
                    f(cores, 2)
                },
            );
        }
        let _ = writeln!(o);
    }

    fn render_s4(&self, o: &mut String) {
        let p = &self.plan;
        let _ = writeln!(
            o,
            "## S4 — ping-pong latency on an established connection\n\nCells: p50 / p99 µs (added p50 vs direct). Exchanges per size: {}. A stall is an exchange ≥ 10 ms.\n",
            p.rtt
                .iter()
                .map(|(s, c)| format!("{} × {c}", size_label(*s)))
                .collect::<Vec<_>>()
                .join(", ")
        );
        let mut head = String::from("| Route |");
        let mut rule = String::from("|---|");
        for (s, _) in &p.rtt {
            let _ = write!(head, " {} |", size_label(*s));
            rule.push_str("---|");
        }
        let _ = writeln!(o, "{head} stalls (sizes) |\n{rule}---|");
        for (route, _) in &self.routes {
            if !self.available(route) {
                let _ = writeln!(o, "| {route} | {} |", self.na(route));
                continue;
            }
            let mut line = format!("| {route} |");
            let mut stalled = Vec::new();
            for (size, _) in &p.rtt {
                let runs = self.s4.get(&(route.clone(), *size));
                let p50 = med(runs, "p50_us");
                let p99 = med(runs, "p99_us");
                let added = match (p50, self.s4_p50(DIRECT, *size)) {
                    (Some(a), Some(d)) if route != DIRECT => format!(" ({:+.0})", a - d),
                    _ => String::new(),
                };
                let _ = write!(line, " {} / {}{added} |", f(p50, 0), f(p99, 0));
                match self.s4_stalls(route, *size) {
                    Some(0) => {}
                    Some(n) => stalled.push(format!("{}: {n}", size_label(*size))),
                    None => stalled.push(format!("{}: no data", size_label(*size))),
                }
            }
            let _ = writeln!(
                o,
                "{line} {} |",
                if stalled.is_empty() {
                    "none".to_string()
                } else {
                    format!("**{}**", stalled.join(", "))
                }
            );
        }
        let _ = writeln!(o);
    }

    fn render_s5(&self, o: &mut String) {
        let p = &self.plan;
        let _ = writeln!(
            o,
            "## S5 — idle connections held {} s (PSS growth ÷ connections)\n\ncellgate via SOCKS5 at {} connections; peers at {} (cheaper; the ratio is linear enough to compare). Measured first, on fresh processes; PSS is user-space memory only (kernel socket buffers are not in it).\n",
            p.idle_hold_secs, p.idle_conns, p.idle_peer_conns
        );
        let _ = writeln!(
            o,
            "| Route | side | held / asked | alive after hold | PSS before MiB | PSS holding MiB | KiB per connection |"
        );
        let _ = writeln!(o, "|---|---|---|---|---|---|---|");
        for (route, asked, res) in &self.s5 {
            match res {
                Err(e) => {
                    let _ = writeln!(o, "| {route} | | 0 / {asked} | | | | n/a ({}) |", short(e));
                }
                Ok(idle) => {
                    for s in &idle.sides {
                        let per = if idle.opened > 0 {
                            (s.holding_kib as f64 - s.before_kib as f64) / idle.opened as f64
                        } else {
                            f64::NAN
                        };
                        let _ = writeln!(
                            o,
                            "| {route} | {} | {} / {asked}{} | {} | {:.1} | {:.1} | {per:.1} |",
                            s.label,
                            idle.opened,
                            if idle.errors > 0 {
                                format!(" ({} failed)", idle.errors)
                            } else {
                                String::new()
                            },
                            idle.alive_after_hold,
                            s.before_kib as f64 / 1024.0,
                            s.holding_kib as f64 / 1024.0,
                        );
                    }
                }
            }
        }
        let _ = writeln!(o);
    }

    fn render_targets(&self, o: &mut String) {
        let _ = writeln!(o, "## Targets\n");
        let _ = writeln!(o, "| Target | Route | Measured | Result |");
        let _ = writeln!(o, "|---|---|---|---|");
        let verdict = |ok: Option<bool>| match ok {
            Some(true) => "PASS",
            Some(false) => "**FAIL**",
            None => "n/a",
        };
        let noise = self.s1_gbit(NOISE);
        let rt = self.s3_cps(RATHOLE_TCP);
        for route in CELLGATE {
            let g = self.s1_gbit(route);
            let r = ratio(g, noise);
            let _ = writeln!(
                o,
                "| S1 ≥ 1.0× rathole-noise | {route} | {} ({} vs {} Gbit/s) | {} |",
                times(r),
                f(g, 2),
                f(noise, 2),
                verdict(r.map(|r| r >= 1.0))
            );
            let _ = writeln!(
                o,
                "| S1 ≥ 1 Gbit/s | {route} | {} Gbit/s | {} |",
                f(g, 2),
                verdict(g.map(|g| g >= 1.0))
            );
        }
        for route in CELLGATE {
            let c = self.s3_cps(route);
            let r = ratio(c, rt);
            let _ = writeln!(
                o,
                "| S3 ≥ 0.9× rathole-tcp | {route} | {} ({} vs {} conn/s) | {} |",
                times(r),
                f(c, 0),
                f(rt, 0),
                verdict(r.map(|r| r >= 0.9))
            );
        }
        for route in CELLGATE {
            let sizes: Vec<usize> = self.plan.rtt.iter().map(|(s, _)| *s).collect();
            let added: Vec<Option<f64>> = sizes
                .iter()
                .map(|&s| match (self.s4_p50(route, s), self.s4_p50(DIRECT, s)) {
                    (Some(a), Some(d)) => Some(a - d),
                    _ => None,
                })
                .collect();
            let worst = if added.iter().all(Option::is_some) && !added.is_empty() {
                added.iter().flatten().copied().reduce(f64::max)
            } else {
                None
            };
            let _ = writeln!(
                o,
                "| S4 p50 added ≤ 100 µs at every size | {route} | worst {} µs | {} |",
                f(worst, 0),
                verdict(worst.map(|w| w <= 100.0))
            );
            let stalls: Vec<Option<u64>> =
                sizes.iter().map(|&s| self.s4_stalls(route, s)).collect();
            let total = if stalls.iter().all(Option::is_some) && !stalls.is_empty() {
                Some(stalls.iter().flatten().sum::<u64>())
            } else {
                None
            };
            let _ = writeln!(
                o,
                "| S4 no stall ≥ 10 ms at any size | {route} | {} stalls | {} |",
                total.map_or("n/a".into(), |t| t.to_string()),
                verdict(total.map(|t| t == 0))
            );
        }
        let s5 = self.s5_per_conn("cellgate-socks5");
        for side in ["control-plane", "edge-agent"] {
            let v = s5
                .as_ref()
                .and_then(|s| s.iter().find(|(l, _)| l == side).map(|x| x.1));
            let _ = writeln!(
                o,
                "| S5 ≤ 40 KiB per connection per side | cellgate-socks5 {side} | {} KiB | {} |",
                f(v, 1),
                verdict(v.map(|v| v <= 40.0))
            );
        }
        let _ = writeln!(o);
    }

    fn render_errors(&self, o: &mut String) {
        let mut lines = Vec::new();
        let mut push = |scenario: &str, route: &str, runs: &Runs| {
            for (i, r) in runs.iter().enumerate() {
                if let Err(e) = r {
                    lines.push(format!("{scenario} {route} run {}: {}", i + 1, short(e)));
                }
            }
        };
        for (route, _) in &self.routes {
            if let Some(r) = self.s1.get(route) {
                push("S1", route, r);
            }
            if let Some(r) = self.s3.get(route) {
                push("S3", route, r);
            }
            for (size, _) in &self.plan.rtt {
                if let Some(r) = self.s4.get(&(route.clone(), *size)) {
                    push(&format!("S4 {}", size_label(*size)), route, r);
                }
            }
        }
        for (i, r) in self.iperf.iter().enumerate() {
            if let Err(e) = r {
                lines.push(format!("S1 iperf3 run {}: {}", i + 1, short(e)));
            }
        }
        lines.extend(self.exits.iter().cloned());
        if lines.is_empty() {
            return;
        }
        let _ = writeln!(o, "## Failed runs and exited processes\n");
        for l in lines {
            let _ = writeln!(o, "- {l}");
        }
        let _ = writeln!(o);
    }
}

fn runs_list(vals: &[f64]) -> String {
    if vals.is_empty() {
        return "no run".into();
    }
    vals.iter()
        .map(|v| format!("{v:.2}"))
        .collect::<Vec<_>>()
        .join("/")
}

fn short(e: &str) -> String {
    let one = e.replace('|', "/").replace('\n', " ");
    if one.chars().count() > 300 {
        format!("{}…", one.chars().take(300).collect::<String>())
    } else {
        one
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn median_odd_even_empty() {
        assert_eq!(median(vec![3.0, 1.0, 2.0]), Some(2.0));
        assert_eq!(median(vec![4.0, 1.0, 2.0, 3.0]), Some(2.5));
        assert_eq!(median(vec![]), None);
    }
}
