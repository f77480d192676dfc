//! Child processes: locating the binaries, spawning long-running ones with
//! their output in a log file (killed on drop), and running short commands
//! with a deadline.

use std::ffi::OsStr;
use std::fs::{File, OpenOptions};
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::time::{Duration, Instant};

/// The `control-plane` binary next to the test executable, or
/// `CELLGATE_CONTROL_PLANE_BIN`.
pub fn control_plane_bin() -> PathBuf {
    locate("control-plane", "CELLGATE_CONTROL_PLANE_BIN")
}

/// The `edge-agent` binary next to the test executable, or
/// `CELLGATE_EDGE_AGENT_BIN`.
pub fn edge_agent_bin() -> PathBuf {
    locate("edge-agent", "CELLGATE_EDGE_AGENT_BIN")
}

/// One of the workspace's binaries: `env` when set, else next to the test
/// executable.
pub fn locate(name: &str, env: &str) -> PathBuf {
    if let Some(p) = std::env::var_os(env) {
        let p = PathBuf::from(p);
        assert!(
            p.is_file(),
            "{env}={} does not name a file; run cargo build --workspace first",
            p.display()
        );
        return p;
    }
    // The test executable is target/<profile>/deps/<test>-<hash>; the
    // workspace binaries live one directory up.
    let exe = std::env::current_exe().expect("current_exe");
    let deps = exe.parent().expect("test executable has a directory");
    let candidates = [deps.parent().map(|d| d.join(name)), Some(deps.join(name))];
    for c in candidates.into_iter().flatten() {
        if c.is_file() {
            return c;
        }
    }
    panic!(
        "the {name} binary was not found next to {} (looked in {}/..): \
         run cargo build --workspace first, or set {env}",
        exe.display(),
        deps.display()
    );
}

/// A command for one of our binaries with an environment that cannot leak
/// into the test: no `CELLGATE_*` overrides from the caller's shell, plain
/// (uncoloured) logs at `info` unless `CELLGATE_E2E_RUST_LOG` says otherwise.
pub fn command(program: impl AsRef<OsStr>) -> Command {
    let mut cmd = Command::new(program);
    for (k, _) in std::env::vars_os() {
        let k = k.to_string_lossy().into_owned();
        if k.starts_with("CELLGATE_") {
            cmd.env_remove(&k);
        }
    }
    let log = std::env::var("CELLGATE_E2E_RUST_LOG").unwrap_or_else(|_| "info".into());
    cmd.env("RUST_LOG", log).env("NO_COLOR", "1");
    cmd.stdin(Stdio::null());
    cmd
}

/// Raise this process's soft `RLIMIT_NOFILE` (children inherit it), so
/// tests holding a thousand sockets do not trip a 1024 default.
pub fn raise_fd_limit(want: u64) -> u64 {
    rlimit::increase_nofile_limit(want).unwrap_or(0)
}

/// Run a short command to completion, failing the test if it takes longer
/// than `timeout` (the child is killed first).
pub fn run_bounded(mut cmd: Command, timeout: Duration) -> Output {
    let shown = format!("{cmd:?}");
    cmd.stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = cmd
        .spawn()
        .unwrap_or_else(|e| panic!("cannot run {shown}: {e}"));
    let mut out = child.stdout.take().expect("piped stdout");
    let mut err = child.stderr.take().expect("piped stderr");
    let out_t = std::thread::spawn(move || {
        let mut v = Vec::new();
        let _ = out.read_to_end(&mut v);
        v
    });
    let err_t = std::thread::spawn(move || {
        let mut v = Vec::new();
        let _ = err.read_to_end(&mut v);
        v
    });
    let start = Instant::now();
    let status = loop {
        match child.try_wait() {
            Ok(Some(s)) => break s,
            Ok(None) if start.elapsed() < timeout => std::thread::sleep(Duration::from_millis(10)),
            Ok(None) | Err(_) => {
                let _ = child.kill();
                let _ = child.wait();
                let stdout = out_t.join().unwrap_or_default();
                let stderr = err_t.join().unwrap_or_default();
                panic!(
                    "{shown} did not finish within {timeout:?}\nstdout:\n{}\nstderr:\n{}",
                    String::from_utf8_lossy(&stdout),
                    String::from_utf8_lossy(&stderr)
                );
            }
        }
    };
    Output {
        status,
        stdout: out_t.join().unwrap_or_default(),
        stderr: err_t.join().unwrap_or_default(),
    }
}

/// A long-running child whose stdout and stderr go to one log file (opened
/// for appending, so a restarted process continues the same log). Killed
/// with SIGKILL and reaped on drop.
#[derive(Debug)]
pub struct Proc {
    name: String,
    log: PathBuf,
    child: Option<Child>,
    status: Option<ExitStatus>,
}

impl Proc {
    pub fn spawn(name: &str, cmd: Command, log: &Path) -> Self {
        Self::spawn_split(name, cmd, None, log)
    }

    /// Like [`Proc::spawn`], with stdout in its own file when `stdout` is
    /// given (the log then holds stderr only).
    pub fn spawn_split(name: &str, mut cmd: Command, stdout: Option<&Path>, log: &Path) -> Self {
        let open = |p: &Path| {
            OpenOptions::new()
                .create(true)
                .append(true)
                .open(p)
                .unwrap_or_else(|e| panic!("cannot open {}: {e}", p.display()))
        };
        let file = open(log);
        let out = match stdout {
            Some(p) => open(p),
            None => file.try_clone().expect("clone log file handle"),
        };
        cmd.stdout(out).stderr(file);
        let child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {name} ({cmd:?}): {e}"));
        Self {
            name: name.to_string(),
            log: log.to_path_buf(),
            child: Some(child),
            status: None,
        }
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    pub fn log_path(&self) -> &Path {
        &self.log
    }

    /// The whole log so far.
    pub fn log(&self) -> String {
        read_lossy(&self.log)
    }

    /// The last `lines` lines of the log.
    pub fn log_tail(&self, lines: usize) -> String {
        tail(&self.log(), lines)
    }

    /// Whether the process is still running (reaps it if it exited).
    pub fn is_running(&mut self) -> bool {
        match self.child.as_mut().map(Child::try_wait) {
            Some(Ok(None)) => true,
            Some(Ok(Some(s))) => {
                self.status = Some(s);
                self.child = None;
                false
            }
            _ => false,
        }
    }

    /// How the process ended, if it did.
    pub fn exit_status(&mut self) -> Option<ExitStatus> {
        self.is_running();
        self.status
    }

    /// SIGKILL and reap.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            self.status = c.wait().ok();
        }
    }

    /// SIGTERM, then wait up to `grace` before SIGKILL. Returns the exit
    /// status and whether the process exited within the grace period.
    pub fn terminate(&mut self, grace: Duration) -> (Option<ExitStatus>, bool) {
        let Some(pid) = self.pid() else {
            return (self.status, true);
        };
        // No libc here (the workspace forbids unsafe code): kill(1) it is.
        let _ = Command::new("kill")
            .arg("-TERM")
            .arg(pid.to_string())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
        let exited = self.wait_exit(grace).is_some();
        if !exited {
            self.kill();
        }
        (self.status, exited)
    }

    /// Wait up to `timeout` for the process to exit on its own.
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<ExitStatus> {
        let start = Instant::now();
        loop {
            if !self.is_running() {
                return self.status;
            }
            if start.elapsed() >= timeout {
                return None;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.kill();
    }
}

pub(crate) fn read_lossy(p: &Path) -> String {
    let mut v = Vec::new();
    if let Ok(mut f) = File::open(p) {
        let _ = f.read_to_end(&mut v);
    }
    String::from_utf8_lossy(&v).into_owned()
}

pub(crate) fn tail(text: &str, lines: usize) -> String {
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}
