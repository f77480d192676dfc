//! Process bookkeeping for the bench: every peer runs in its own session
//! (`setsid`, so session id = process group id = its PID), is recorded by PID
//! (in memory and in a pid file, so a run killed with SIGKILL is cleaned up by
//! the next one) and is stopped by signalling its process group.
//!
//! CPU and memory are read from `/proc` as text: `stat` utime+stime (plus
//! cutime+cstime, so reaped worker processes still count) and `smaps_rollup`
//! Pss, summed over every process of the peer's session.

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Context;
use tokio::process::{Child, ChildStdout, Command};

/// One managed peer process (a session leader).
struct Managed {
    name: String,
    pid: u32,
    child: Child,
}

/// The registry of everything the bench started. Cloning shares it.
#[derive(Clone)]
pub struct Procs {
    inner: Arc<Mutex<Inner>>,
}

struct Inner {
    list: Vec<Managed>,
    pidfile: PathBuf,
}

impl Drop for Inner {
    /// Last resort (panic, early return): SIGKILL every group still recorded.
    fn drop(&mut self) {
        for m in &self.list {
            signal_group(m.pid, "KILL");
        }
    }
}

impl Procs {
    /// Kills leftovers recorded in `pidfile` by an earlier run that could not
    /// clean up, then starts a fresh record.
    pub fn new(pidfile: &Path) -> Procs {
        kill_stale(pidfile);
        let _ = std::fs::write(pidfile, "");
        Procs {
            inner: Arc::new(Mutex::new(Inner {
                list: Vec::new(),
                pidfile: pidfile.to_path_buf(),
            })),
        }
    }

    /// Starts `program args` in a new session with stdout and stderr appended
    /// to `log`; returns its PID (= session id = process group id).
    pub fn spawn(
        &self,
        name: &str,
        program: &Path,
        args: &[String],
        env: &[(&str, &str)],
        log: &Path,
    ) -> anyhow::Result<u32> {
        let out = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(log)
            .with_context(|| format!("open {}", log.display()))?;
        let err = out.try_clone()?;
        let (pid, _) = self.spawn_inner(name, program, args, env, out.into(), err.into())?;
        Ok(pid)
    }

    /// Like [`Procs::spawn`] but hands back the child's stdout (stderr goes to `log`).
    pub fn spawn_piped(
        &self,
        name: &str,
        program: &Path,
        args: &[String],
        env: &[(&str, &str)],
        log: &Path,
    ) -> anyhow::Result<(u32, ChildStdout)> {
        let err = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(log)
            .with_context(|| format!("open {}", log.display()))?;
        let (pid, stdout) =
            self.spawn_inner(name, program, args, env, Stdio::piped(), err.into())?;
        Ok((pid, stdout.context("no stdout pipe")?))
    }

    fn spawn_inner(
        &self,
        name: &str,
        program: &Path,
        args: &[String],
        env: &[(&str, &str)],
        stdout: Stdio,
        stderr: Stdio,
    ) -> anyhow::Result<(u32, Option<ChildStdout>)> {
        // `setsid PROG` execs in place (our child is not a group leader), so
        // the PID we record is the peer's own PID and its session id.
        let mut cmd = match which("setsid") {
            Some(setsid) => {
                let mut c = Command::new(setsid);
                c.arg(program);
                c
            }
            None => {
                let mut c = Command::new(program);
                c.process_group(0);
                c
            }
        };
        cmd.args(args)
            .envs(env.iter().copied())
            .stdin(Stdio::null())
            .stdout(stdout)
            .stderr(stderr)
            .kill_on_drop(false);
        let mut child = cmd
            .spawn()
            .with_context(|| format!("start {name} ({})", program.display()))?;
        let pid = child.id().context("child exited before we saw its pid")?;
        let stdout = child.stdout.take();
        let mut inner = self.inner.lock().expect("procs lock");
        let line = format!(
            "{pid}\t{}\n",
            program.file_name().unwrap_or_default().to_string_lossy()
        );
        append(&inner.pidfile, &line);
        inner.list.push(Managed {
            name: name.to_string(),
            pid,
            child,
        });
        Ok((pid, stdout))
    }

    /// `Some(status)` if the process has exited.
    pub fn exited(&self, pid: u32) -> Option<String> {
        let mut inner = self.inner.lock().expect("procs lock");
        let m = inner.list.iter_mut().find(|m| m.pid == pid)?;
        match m.child.try_wait() {
            Ok(Some(st)) => Some(st.to_string()),
            Ok(None) => None,
            Err(e) => Some(format!("unknown ({e})")),
        }
    }

    /// Stops the given processes (TERM, then KILL after a grace period).
    pub async fn stop(&self, pids: &[u32]) {
        let taken: Vec<Managed> = {
            let mut inner = self.inner.lock().expect("procs lock");
            let (take, keep) = std::mem::take(&mut inner.list)
                .into_iter()
                .partition(|m| pids.contains(&m.pid));
            inner.list = keep;
            take
        };
        stop_all(taken).await;
    }

    /// Stops everything that is still recorded.
    pub async fn stop_everything(&self) {
        let taken = std::mem::take(&mut self.inner.lock().expect("procs lock").list);
        let n = taken.len();
        stop_all(taken).await;
        if n > 0 {
            eprintln!("bench: stopped {n} peer process groups");
        }
        let pidfile = self.inner.lock().expect("procs lock").pidfile.clone();
        let _ = std::fs::write(pidfile, "");
    }
}

async fn stop_all(mut list: Vec<Managed>) {
    // TERM to the leader only: dante's mother process then stops and reaps its
    // workers itself. Signalling the whole group at once orphans the workers,
    // and the init of some sandboxes never reaps them.
    for m in &list {
        signal(&m.pid.to_string(), "TERM");
    }
    for m in &mut list {
        let graceful = tokio::time::timeout(Duration::from_secs(3), m.child.wait()).await;
        if !matches!(graceful, Ok(Ok(_))) {
            eprintln!("bench: {} (pid {}) ignored SIGTERM; killing", m.name, m.pid);
            signal_group(m.pid, "KILL");
            let _ = tokio::time::timeout(Duration::from_secs(3), m.child.wait()).await;
        }
        // Worker processes (dante) may outlive their leader briefly.
        if !session_members(m.pid).is_empty() {
            signal_group(m.pid, "KILL");
        }
    }
}

/// Sends `sig` to process group `pgid`.
fn signal_group(pgid: u32, sig: &str) {
    if pgid > 1 {
        signal(&format!("-{pgid}"), sig);
    }
}

/// Sends `sig` to `target` (a PID, or `-PGID`) with the `kill` utility (no
/// unsafe, no libc).
fn signal(target: &str, sig: &str) {
    if target
        .trim_start_matches('-')
        .parse::<u32>()
        .is_ok_and(|p| p <= 1)
    {
        return;
    }
    let ok = std::process::Command::new("kill")
        .args(["-s", sig, "--", target])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .map(|s| s.success())
        .unwrap_or(false);
    if !ok {
        // No `kill` binary: the shell builtin does the same.
        let _ = std::process::Command::new("sh")
            .args(["-c", &format!("kill -s {sig} -- {target}")])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
    }
}

fn append(path: &Path, line: &str) {
    use std::io::Write;
    if let Ok(mut f) = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
    {
        let _ = f.write_all(line.as_bytes());
    }
}

/// Kills process groups recorded by an earlier run, if the PID is still a
/// session leader running the same program (guards against PID reuse).
fn kill_stale(pidfile: &Path) {
    let Ok(text) = std::fs::read_to_string(pidfile) else {
        return;
    };
    for line in text.lines() {
        let Some((pid, prog)) = line.split_once('\t') else {
            continue;
        };
        let Ok(pid) = pid.parse::<u32>() else {
            continue;
        };
        let Some(st) = read_stat(pid) else { continue };
        let argv0 = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
        let argv0 = String::from_utf8_lossy(argv0.split(|&b| b == 0).next().unwrap_or_default())
            .to_string();
        if (st.session == pid || st.pgrp == pid) && argv0.ends_with(prog) {
            eprintln!("bench: killing leftover {prog} (pid {pid}) from an earlier run");
            signal_group(pid, "KILL");
        }
    }
}

/// The fields of `/proc/PID/stat` the bench uses.
#[derive(Debug, Clone, Copy)]
pub struct Stat {
    pub pgrp: u32,
    pub session: u32,
    /// utime + stime + cutime + cstime, in clock ticks.
    pub ticks: u64,
}

/// A load generator's stdout as lines, and its whole stderr collected in
/// the background (for the error message if it fails).
pub fn take_output(
    child: &mut Child,
) -> Result<
    (
        tokio::io::Lines<tokio::io::BufReader<ChildStdout>>,
        tokio::task::JoinHandle<String>,
    ),
    String,
> {
    use tokio::io::AsyncBufReadExt;
    let stdout = child.stdout.take().ok_or("no stdout")?;
    let stderr = child.stderr.take().ok_or("no stderr")?;
    let err_task = tokio::spawn(async move {
        let mut lines = tokio::io::BufReader::new(stderr).lines();
        let mut text = String::new();
        while let Ok(Some(l)) = lines.next_line().await {
            text.push_str(&l);
            text.push('\n');
        }
        text
    });
    Ok((tokio::io::BufReader::new(stdout).lines(), err_task))
}

pub fn read_stat(pid: u32) -> Option<Stat> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    parse_stat(&text)
}

/// Parses `/proc/PID/stat`; the command name is in parentheses and may
/// contain spaces, so fields are counted after the last `)`.
pub fn parse_stat(text: &str) -> Option<Stat> {
    let rest = &text[text.rfind(')')? + 1..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    // f[0] is field 3 (state); field n is f[n - 3].
    let num = |n: usize| f.get(n - 3).and_then(|v| v.parse::<u64>().ok());
    let pgrp = u32::try_from(num(5)?).ok()?;
    let session = u32::try_from(num(6)?).ok()?;
    let ticks = num(14)? + num(15)? + num(16)? + num(17)?;
    Some(Stat {
        pgrp,
        session,
        ticks,
    })
}

/// PIDs of every process whose session id (or, without `setsid`, process
/// group id) is `sid`.
pub fn session_members(sid: u32) -> Vec<u32> {
    let mut out = Vec::new();
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return out;
    };
    for e in dir.flatten() {
        let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else {
            continue;
        };
        if read_stat(pid).is_some_and(|s| s.session == sid || s.pgrp == sid) {
            out.push(pid);
        }
    }
    out
}

/// CPU seconds (user + system, including reaped children) used so far by
/// every process in session `sid`.
pub fn session_cpu_secs(sid: u32) -> f64 {
    let hz = clock_ticks_per_sec();
    let ticks: u64 = session_members(sid)
        .into_iter()
        .filter_map(read_stat)
        .map(|s| s.ticks)
        .sum();
    ticks as f64 / hz
}

/// CPU seconds (user + system, including reaped children) of one process.
pub fn pid_cpu_secs(pid: u32) -> f64 {
    read_stat(pid).map_or(0.0, |s| s.ticks as f64 / clock_ticks_per_sec())
}

/// Resident set size (KiB, `VmRSS`) summed over session `sid`.
pub fn session_rss_kib(sid: u32) -> u64 {
    session_members(sid)
        .into_iter()
        .filter_map(|pid| std::fs::read_to_string(format!("/proc/{pid}/status")).ok())
        .filter_map(|t| parse_status_kib(&t, "VmRSS:"))
        .sum()
}

/// A `kB` field of `/proc/PID/status`.
pub fn parse_status_kib(status: &str, field: &str) -> Option<u64> {
    status
        .lines()
        .find_map(|l| l.strip_prefix(field))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
}

/// Proportional set size (KiB) summed over session `sid`.
pub fn session_pss_kib(sid: u32) -> u64 {
    session_members(sid)
        .into_iter()
        .filter_map(|pid| std::fs::read_to_string(format!("/proc/{pid}/smaps_rollup")).ok())
        .filter_map(|t| parse_pss(&t))
        .sum()
}

pub fn parse_pss(smaps_rollup: &str) -> Option<u64> {
    smaps_rollup
        .lines()
        .find_map(|l| l.strip_prefix("Pss:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
}

fn clock_ticks_per_sec() -> f64 {
    static HZ: std::sync::OnceLock<f64> = std::sync::OnceLock::new();
    *HZ.get_or_init(|| {
        std::process::Command::new("getconf")
            .arg("CLK_TCK")
            .output()
            .ok()
            .and_then(|o| String::from_utf8(o.stdout).ok())
            .and_then(|s| s.trim().parse::<f64>().ok())
            .filter(|&v| v > 0.0)
            .unwrap_or(100.0)
    })
}

/// Finds an executable on PATH, plus the places peers.sh installs to that a
/// non-login PATH may lack (`~/.cargo/bin`, `/usr/sbin`).
pub fn which(name: &str) -> Option<PathBuf> {
    let mut dirs: Vec<PathBuf> = std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).collect())
        .unwrap_or_default();
    if let Some(ch) = std::env::var_os("CARGO_HOME") {
        dirs.push(PathBuf::from(ch).join("bin"));
    }
    if let Some(home) = std::env::var_os("HOME") {
        dirs.push(PathBuf::from(home).join(".cargo/bin"));
    }
    dirs.extend(["/usr/sbin", "/sbin", "/usr/local/sbin"].map(PathBuf::from));
    let mut seen = HashSet::new();
    dirs.into_iter()
        .filter(|d| seen.insert(d.clone()))
        .map(|d| d.join(name))
        .find(|p| is_executable(p))
}

fn is_executable(p: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(p).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stat_with_spaces_in_comm() {
        let s = "42 (my (odd) prog) S 1 42 42 0 -1 4194560 100 0 0 0 7 3 2 1 20 0 1 0 5 0 0";
        let st = parse_stat(s).unwrap();
        assert_eq!(st.session, 42);
        assert_eq!(st.ticks, 7 + 3 + 2 + 1);
    }

    #[test]
    fn status_rss_line() {
        let t = "Name:\tcp\nVmHWM:\t  9000 kB\nVmRSS:\t  8123 kB\n";
        assert_eq!(parse_status_kib(t, "VmRSS:"), Some(8123));
        assert_eq!(parse_status_kib(t, "VmSwap:"), None);
    }

    #[test]
    fn pss_line() {
        let t = "55d0-7ff [rollup]\nRss:   1000 kB\nPss:    812 kB\nPss_Anon: 700 kB\n";
        assert_eq!(parse_pss(t), Some(812));
    }
}
