//! `command` rotation backend: the operator's own script.
//!
//! Each rung is a program with its arguments, run without a shell:
//!
//! ```toml
//! [exit.rotation]
//! backend = "command"
//! timeout_secs = 60
//! rungs = [
//!   { name = "soft", command = ["/usr/local/bin/rotate.sh", "--soft"] },
//!   { name = "hard", command = ["/usr/local/bin/rotate.sh", "--hard"] },
//! ]
//! ```
//!
//! or, for a single rung named `command`, `command = ["/usr/local/bin/rotate.sh"]`.
//!
//! The program sees `CELLGATE_RUNG` (the rung's name) and
//! `CELLGATE_EXIT_INTERFACE` (the exit's uplink interface, when it has one).
//! It runs in a process group of its own so that a timeout kills everything
//! it started, not just the top process. Exit status 0 means "the data link
//! is back"; anything else fails the rung with the exit status and the last
//! lines of its standard error.
//!
//! This file also holds [`run_bounded`], the process runner the `android`
//! backend uses for its shell commands: bounded in time and in captured
//! output, and killing the whole process group on timeout.

use std::process::{ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use nix::sys::signal::{Signal, killpg};
use nix::unistd::Pid;
use serde::Deserialize;
use shared::wire::Telemetry;
use tokio::io::{AsyncRead, AsyncReadExt};
use tokio::time::Instant;

use super::RotateError;

/// Standard error kept for the error message (its tail).
const STDERR_CAP: usize = 4 * 1024;
/// Standard output is drained so the script never blocks on a full pipe;
/// only a little is kept, for debug logs.
const STDOUT_CAP: usize = 1024;
/// Lines of standard error quoted in an error.
const STDERR_LINES: usize = 8;
/// After the script exits, how long its leftovers may keep our pipes open
/// before the rest of its process group is killed.
const PIPE_GRACE: Duration = Duration::from_secs(2);

fn default_timeout_secs() -> u64 {
    60
}

/// `[exit.rotation]` with `backend = "command"`.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CommandConfig {
    /// The ladder, softest first. Exclusive with `command`.
    #[serde(default)]
    pub rungs: Vec<CommandRung>,
    /// Shorthand for a one-rung ladder named `command`.
    #[serde(default)]
    pub command: Option<Vec<String>>,
    /// Longest a rung may run; the rotation's own deadline caps it too.
    #[serde(default = "default_timeout_secs")]
    pub timeout_secs: u64,
}

impl Default for CommandConfig {
    fn default() -> Self {
        Self {
            rungs: Vec::new(),
            command: None,
            timeout_secs: default_timeout_secs(),
        }
    }
}

/// One rung of an operator-defined ladder.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CommandRung {
    /// Shown in the API and passed as `CELLGATE_RUNG`.
    pub name: String,
    /// Program and arguments; no shell is involved.
    pub command: Vec<String>,
}

impl CommandConfig {
    /// The ladder this configuration describes, or why it is unusable.
    pub fn validate(&self) -> Result<Vec<CommandRung>, String> {
        let rungs = match (&self.command, self.rungs.is_empty()) {
            (Some(_), false) => {
                return Err(
                    "command backend: set either `command` or `rungs`, not both".to_string()
                );
            }
            (None, true) => {
                return Err(
                    "command backend: set `command = [\"/path/to/script\", …]` or `rungs`"
                        .to_string(),
                );
            }
            (Some(argv), true) => vec![CommandRung {
                name: "command".to_string(),
                command: argv.clone(),
            }],
            (None, false) => self.rungs.clone(),
        };
        for (i, r) in rungs.iter().enumerate() {
            if r.name.trim().is_empty() {
                return Err(format!("command backend: rung {i} has an empty name"));
            }
            if rungs[..i].iter().any(|o| o.name == r.name) {
                return Err(format!(
                    "command backend: rung name {:?} is used twice",
                    r.name
                ));
            }
            match r.command.first() {
                None => {
                    return Err(format!(
                        "command backend: rung {:?} has an empty command",
                        r.name
                    ));
                }
                Some(p) if p.is_empty() => {
                    return Err(format!(
                        "command backend: rung {:?} has an empty program name",
                        r.name
                    ));
                }
                Some(_) => {}
            }
        }
        if self.timeout_secs == 0 {
            return Err("command backend: timeout_secs must be at least 1".to_string());
        }
        Ok(rungs)
    }
}

pub struct CommandBackend {
    rungs: Vec<CommandRung>,
    timeout: Duration,
    interface: Option<String>,
}

impl CommandBackend {
    pub fn new(cfg: &CommandConfig, interface: Option<&str>) -> Result<Self, String> {
        Ok(Self {
            rungs: cfg.validate()?,
            timeout: Duration::from_secs(cfg.timeout_secs),
            interface: interface.map(str::to_string),
        })
    }

    pub fn ladder(&self) -> Vec<String> {
        self.rungs.iter().map(|r| r.name.clone()).collect()
    }

    pub async fn step(&mut self, rung: usize, deadline: Instant) -> Result<(), RotateError> {
        let Some(r) = self.rungs.get(rung) else {
            return Err(RotateError::Unsupported(format!(
                "rung {rung} does not exist (ladder: {})",
                self.ladder().join(", ")
            )));
        };
        let shown = r.command.join(" ");
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(RotateError::Timeout(format!(
                "rung {}: no time left to run {shown}",
                r.name
            )));
        }
        let (budget, limited_by) = if left < self.timeout {
            (left, "the rotation deadline")
        } else {
            (self.timeout, "timeout_secs")
        };

        let mut cmd = tokio::process::Command::new(&r.command[0]);
        cmd.args(&r.command[1..]).env("CELLGATE_RUNG", &r.name);
        match &self.interface {
            Some(i) => cmd.env("CELLGATE_EXIT_INTERFACE", i),
            None => cmd.env_remove("CELLGATE_EXIT_INTERFACE"),
        };
        tracing::info!(rung = %r.name, command = %shown, "running rotation command");
        let caps = Caps {
            stdout: (Keep::Head, STDOUT_CAP),
            stderr: (Keep::Tail, STDERR_CAP),
        };
        match run_bounded(cmd, budget, caps).await {
            Err(RunError::Spawn(e)) => Err(RotateError::Failed(format!(
                "rung {}: cannot run {}: {e}",
                r.name, r.command[0]
            ))),
            Err(RunError::TimedOut { stderr, .. }) => Err(RotateError::Timeout(format!(
                "rung {}: {shown} still running after {:?} ({limited_by}); killed its process group{}",
                r.name,
                budget,
                stderr_suffix(&stderr.bytes)
            ))),
            Ok(done) if done.status.success() => {
                tracing::debug!(
                    rung = %r.name,
                    stdout = %String::from_utf8_lossy(&done.stdout.bytes),
                    "rotation command succeeded"
                );
                Ok(())
            }
            Ok(done) => Err(RotateError::Failed(format!(
                "rung {}: {shown} {}{}",
                r.name,
                exit_text(done.status),
                stderr_suffix(&done.stderr.bytes)
            ))),
        }
    }

    pub async fn telemetry(&mut self) -> Telemetry {
        Telemetry::default()
    }
}

fn stderr_suffix(stderr: &[u8]) -> String {
    let tail = last_lines(stderr, STDERR_LINES);
    if tail.is_empty() {
        String::new()
    } else {
        format!("; stderr: {tail}")
    }
}

/// "exited with code 3" / "was killed by signal SIGKILL".
pub(super) fn exit_text(status: ExitStatus) -> String {
    use std::os::unix::process::ExitStatusExt;
    if let Some(code) = status.code() {
        format!("exited with code {code}")
    } else if let Some(sig) = status.signal() {
        match Signal::try_from(sig) {
            Ok(s) => format!("was killed by signal {}", s.as_str()),
            Err(_) => format!("was killed by signal {sig}"),
        }
    } else {
        format!("ended with {status}")
    }
}

/// The last `n` non-empty lines of `bytes`, joined with " | " so the text
/// stays on one line in logs and API answers.
pub(super) fn last_lines(bytes: &[u8], n: usize) -> String {
    let text = String::from_utf8_lossy(bytes);
    let lines: Vec<&str> = text
        .lines()
        .map(str::trim_end)
        .filter(|l| !l.trim().is_empty())
        .collect();
    let from = lines.len().saturating_sub(n);
    lines[from..].join(" | ")
}

/// Which end of an over-long output to keep.
#[derive(Clone, Copy, Debug)]
pub(super) enum Keep {
    Head,
    Tail,
}

/// Capture limits for standard output and standard error.
#[derive(Clone, Copy, Debug)]
pub(super) struct Caps {
    pub stdout: (Keep, usize),
    pub stderr: (Keep, usize),
}

/// Output of one stream, at most the configured number of bytes.
#[derive(Debug, Default)]
pub(super) struct Captured {
    pub bytes: Vec<u8>,
    /// More was written than kept.
    pub truncated: bool,
}

impl Captured {
    fn push(&mut self, chunk: &[u8], keep: Keep, cap: usize) {
        match keep {
            Keep::Head => {
                let room = cap.saturating_sub(self.bytes.len());
                if chunk.len() > room {
                    self.truncated = true;
                }
                self.bytes
                    .extend_from_slice(&chunk[..chunk.len().min(room)]);
            }
            Keep::Tail => {
                self.bytes.extend_from_slice(chunk);
                if self.bytes.len() > cap {
                    let excess = self.bytes.len() - cap;
                    self.bytes.drain(..excess);
                    self.truncated = true;
                }
            }
        }
    }
}

#[derive(Debug)]
pub(super) struct Finished {
    pub status: ExitStatus,
    pub stdout: Captured,
    pub stderr: Captured,
}

#[derive(Debug)]
pub(super) enum RunError {
    /// The program could not be started (not found, not executable, …).
    Spawn(std::io::Error),
    /// Still running at the timeout; its process group was killed. What it
    /// had written so far is kept.
    TimedOut { stdout: Captured, stderr: Captured },
}

/// Run `cmd` with no standard input, in a new process group, for at most
/// `timeout`; keep a bounded part of its output. On timeout the whole
/// process group is killed with SIGKILL.
pub(super) async fn run_bounded(
    mut cmd: tokio::process::Command,
    timeout: Duration,
    caps: Caps,
) -> Result<Finished, RunError> {
    cmd.stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0)
        .kill_on_drop(true);
    let mut child = cmd.spawn().map_err(RunError::Spawn)?;
    // With process_group(0) the group id is the child's pid.
    let pgid = child.id().map(|id| Pid::from_raw(id as i32));
    // If this future is dropped half way (the rotation was cancelled), the
    // whole group goes, not only the top process (kill_on_drop).
    let mut guard = GroupGuard(pgid);

    let out = Arc::new(Mutex::new(Captured::default()));
    let err = Arc::new(Mutex::new(Captured::default()));
    let readers = [
        child
            .stdout
            .take()
            .map(|s| tokio::spawn(capture(s, out.clone(), caps.stdout))),
        child
            .stderr
            .take()
            .map(|s| tokio::spawn(capture(s, err.clone(), caps.stderr))),
    ];
    let readers: Vec<_> = readers.into_iter().flatten().collect();

    let waited = tokio::time::timeout(timeout, child.wait()).await;
    let status = match waited {
        Ok(Ok(status)) => Some(status),
        Ok(Err(e)) => {
            kill_group(pgid);
            let _ = child.kill().await;
            finish_readers(readers, Duration::from_millis(200)).await;
            return Err(RunError::Spawn(e));
        }
        Err(_) => None,
    };
    match status {
        Some(status) => {
            // Anything the program left behind in its group may still hold
            // our pipes; give it a moment, then clean up.
            if !finish_readers_gracefully(&readers, PIPE_GRACE).await {
                kill_group(pgid);
                finish_readers(readers, Duration::from_millis(500)).await;
            }
            // A clean exit: whatever the program started on purpose and
            // that closed our pipes may keep running.
            guard.0 = None;
            Ok(Finished {
                status,
                stdout: take(&out),
                stderr: take(&err),
            })
        }
        None => {
            kill_group(pgid);
            let _ = child.kill().await;
            finish_readers(readers, Duration::from_millis(500)).await;
            Err(RunError::TimedOut {
                stdout: take(&out),
                stderr: take(&err),
            })
        }
    }
}

/// Kills the process group when dropped while armed.
struct GroupGuard(Option<Pid>);

impl Drop for GroupGuard {
    fn drop(&mut self) {
        kill_group(self.0.take());
    }
}

fn kill_group(pgid: Option<Pid>) {
    if let Some(pgid) = pgid {
        // ESRCH (the group is already gone) is the good case.
        let _ = killpg(pgid, Signal::SIGKILL);
    }
}

fn take(c: &Arc<Mutex<Captured>>) -> Captured {
    std::mem::take(&mut *c.lock().unwrap_or_else(|p| p.into_inner()))
}

/// True when every reader reached end of file within `grace`.
async fn finish_readers_gracefully(
    readers: &[tokio::task::JoinHandle<()>],
    grace: Duration,
) -> bool {
    let until = Instant::now() + grace;
    loop {
        if readers.iter().all(|r| r.is_finished()) {
            return true;
        }
        if Instant::now() >= until {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Wait for the readers at most `grace`, then stop them; what they read so
/// far is already in the shared buffers.
async fn finish_readers(readers: Vec<tokio::task::JoinHandle<()>>, grace: Duration) {
    let _ = finish_readers_gracefully(&readers, grace).await;
    for r in readers {
        r.abort();
    }
}

async fn capture(
    mut stream: impl AsyncRead + Unpin,
    into: Arc<Mutex<Captured>>,
    (keep, cap): (Keep, usize),
) {
    let mut buf = [0u8; 8192];
    loop {
        match stream.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => into
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .push(&buf[..n], keep, cap),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;
    use std::path::{Path, PathBuf};

    /// A scratch directory removed on drop.
    struct Scratch(PathBuf);

    impl Scratch {
        fn new(label: &str) -> Self {
            use std::sync::atomic::{AtomicU32, Ordering};
            static SEQ: AtomicU32 = AtomicU32::new(0);
            let p = std::env::temp_dir().join(format!(
                "cellgate-rotate-command-{label}-{}-{}",
                std::process::id(),
                SEQ.fetch_add(1, Ordering::Relaxed)
            ));
            std::fs::create_dir_all(&p).unwrap();
            Self(p)
        }

        fn script(&self, name: &str, body: &str) -> String {
            let p = self.0.join(name);
            std::fs::write(&p, format!("#!/bin/sh\n{body}\n")).unwrap();
            std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o755)).unwrap();
            p.to_string_lossy().into_owned()
        }

        fn path(&self) -> &Path {
            &self.0
        }
    }

    impl Drop for Scratch {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    fn backend(toml_cfg: &str, interface: Option<&str>) -> CommandBackend {
        let cfg: CommandConfig = toml::from_str(toml_cfg).unwrap();
        CommandBackend::new(&cfg, interface).unwrap()
    }

    fn far() -> Instant {
        Instant::now() + Duration::from_secs(30)
    }

    #[test]
    fn config_forms_and_validation() {
        let b = backend(r#"command = ["/bin/true"]"#, None);
        assert_eq!(b.ladder(), vec!["command"]);
        assert_eq!(b.timeout, Duration::from_secs(60));

        let b = backend(
            r#"
            timeout_secs = 5
            rungs = [
              { name = "soft", command = ["/bin/true", "--soft"] },
              { name = "hard", command = ["/bin/true", "--hard"] },
            ]"#,
            None,
        );
        assert_eq!(b.ladder(), vec!["soft", "hard"]);
        assert_eq!(b.timeout, Duration::from_secs(5));

        let bad = |s: &str| {
            let cfg: CommandConfig = toml::from_str(s).unwrap();
            CommandBackend::new(&cfg, None).err().unwrap()
        };
        assert!(bad("").contains("set `command"));
        assert!(
            bad(r#"command = ["/bin/true"]
rungs = [{ name = "a", command = ["/bin/true"] }]"#)
            .contains("not both")
        );
        assert!(bad(r#"command = []"#).contains("empty command"));
        assert!(
            bad(r#"rungs = [{ name = "a", command = ["x"] }, { name = "a", command = ["y"] }]"#)
                .contains("used twice")
        );
        assert!(
            bad(r#"command = ["x"]
timeout_secs = 0"#)
            .contains("timeout_secs")
        );
        assert!(
            toml::from_str::<CommandConfig>(
                r#"command = ["x"]
shell = true"#
            )
            .is_err()
        );
    }

    #[tokio::test]
    async fn success_sees_rung_and_interface() {
        let dir = Scratch::new("ok");
        let out = dir.path().join("env.txt");
        let script = dir.script(
            "rotate.sh",
            &format!(
                "echo \"$CELLGATE_RUNG $CELLGATE_EXIT_INTERFACE $1\" > {}",
                out.display()
            ),
        );
        let mut b = backend(
            &format!(
                r#"rungs = [{{ name = "soft", command = ["{script}", "--soft"] }},
                            {{ name = "hard", command = ["{script}", "--hard"] }}]"#
            ),
            Some("wwan0"),
        );
        b.step(1, far()).await.unwrap();
        assert_eq!(
            std::fs::read_to_string(&out).unwrap().trim(),
            "hard wwan0 --hard"
        );
        let e = b.step(2, far()).await.unwrap_err();
        assert!(matches!(e, RotateError::Unsupported(_)), "{e}");
        assert!(e.to_string().contains("soft, hard"), "{e}");
    }

    #[tokio::test]
    async fn no_interface_means_variable_unset() {
        let dir = Scratch::new("noif");
        let out = dir.path().join("env.txt");
        let script = dir.script(
            "rotate.sh",
            &format!(
                "echo \"${{CELLGATE_EXIT_INTERFACE-unset}}\" > {}",
                out.display()
            ),
        );
        let mut b = backend(&format!(r#"command = ["{script}"]"#), None);
        b.step(0, far()).await.unwrap();
        assert_eq!(std::fs::read_to_string(&out).unwrap().trim(), "unset");
    }

    #[tokio::test]
    async fn non_zero_exit_reports_code_and_stderr_tail() {
        let dir = Scratch::new("fail");
        let script = dir.script(
            "rotate.sh",
            "echo 'starting' >&2\necho 'modem said: NO CARRIER' >&2\nexit 3",
        );
        let mut b = backend(&format!(r#"command = ["{script}", "--soft"]"#), None);
        let e = b.step(0, far()).await.unwrap_err();
        let text = e.to_string();
        assert!(matches!(e, RotateError::Failed(_)), "{text}");
        assert!(text.contains("exited with code 3"), "{text}");
        assert!(text.contains("modem said: NO CARRIER"), "{text}");
        assert!(text.contains("--soft"), "{text}");
    }

    #[tokio::test]
    async fn stderr_capture_is_bounded() {
        let dir = Scratch::new("big");
        // About 200 KiB of standard error, then a last telling line.
        let script = dir.script(
            "rotate.sh",
            "i=0\nwhile [ $i -lt 4000 ]; do\n  echo \"noise line $i padded to be rather long ..........................\" >&2\n  i=$((i+1))\ndone\necho 'final: rotation refused' >&2\nexit 1",
        );
        let mut b = backend(&format!(r#"command = ["{script}"]"#), None);
        let text = b.step(0, far()).await.unwrap_err().to_string();
        assert!(text.contains("final: rotation refused"), "{text}");
        assert!(text.len() < STDERR_CAP + 512, "{} bytes", text.len());
    }

    #[tokio::test]
    async fn missing_program_is_a_clear_failure() {
        let mut b = backend(r#"command = ["/nonexistent/rotate.sh"]"#, None);
        let text = b.step(0, far()).await.unwrap_err().to_string();
        assert!(text.contains("cannot run /nonexistent/rotate.sh"), "{text}");
    }

    fn alive(pid: i32) -> bool {
        // A zombie waiting for a reaper counts as dead.
        match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
            Ok(stat) => {
                let state = stat.rsplit(')').next().unwrap_or("").trim_start();
                !state.starts_with('Z')
            }
            Err(_) => false,
        }
    }

    #[tokio::test]
    async fn timeout_kills_the_whole_group() {
        let dir = Scratch::new("slow");
        let pidfile = dir.path().join("bg.pid");
        let script = dir.script(
            "rotate.sh",
            &format!(
                "sleep 60 &\necho $! > {}\necho 'waiting for modem' >&2\nsleep 60",
                pidfile.display()
            ),
        );
        let mut b = backend(
            &format!(
                r#"command = ["{script}"]
timeout_secs = 1"#
            ),
            None,
        );
        let started = Instant::now();
        let e = b.step(0, far()).await.unwrap_err();
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "{:?}",
            started.elapsed()
        );
        let text = e.to_string();
        assert!(matches!(e, RotateError::Timeout(_)), "{text}");
        assert!(text.contains("timeout_secs"), "{text}");
        assert!(text.contains("waiting for modem"), "{text}");
        let pid: i32 = std::fs::read_to_string(&pidfile)
            .unwrap()
            .trim()
            .parse()
            .unwrap();
        let gone_by = std::time::Instant::now() + Duration::from_secs(3);
        while alive(pid) && std::time::Instant::now() < gone_by {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert!(!alive(pid), "background child {pid} survived the timeout");
    }

    #[tokio::test]
    async fn deadline_caps_the_timeout() {
        let dir = Scratch::new("deadline");
        let script = dir.script("rotate.sh", "sleep 30");
        let mut b = backend(&format!(r#"command = ["{script}"]"#), None);
        let started = Instant::now();
        let e = b
            .step(0, Instant::now() + Duration::from_millis(300))
            .await
            .unwrap_err();
        assert!(started.elapsed() < Duration::from_secs(3));
        assert!(e.to_string().contains("rotation deadline"), "{e}");

        let e = b.step(0, Instant::now()).await.unwrap_err();
        assert!(matches!(e, RotateError::Timeout(_)), "{e}");
    }

    #[tokio::test]
    async fn leftover_background_job_does_not_hang_a_successful_rung() {
        let dir = Scratch::new("leftover");
        // The background job keeps stderr open after the script exits.
        let script = dir.script("rotate.sh", "sleep 30 &\nexit 0");
        let mut b = backend(&format!(r#"command = ["{script}"]"#), None);
        let started = Instant::now();
        b.step(0, far()).await.unwrap();
        assert!(started.elapsed() < PIPE_GRACE + Duration::from_secs(2));
    }

    #[tokio::test]
    async fn cancelled_rung_kills_the_whole_group() {
        let dir = Scratch::new("cancel");
        let pidfile = dir.path().join("bg.pid");
        let script = dir.script(
            "rotate.sh",
            &format!("sleep 60 &\necho $! > {}\nsleep 60", pidfile.display()),
        );
        let mut b = backend(&format!(r#"command = ["{script}"]"#), None);
        let step = b.step(0, far());
        // Give it time to start its child, then drop the step.
        let _ = tokio::time::timeout(Duration::from_millis(500), step).await;
        let pid: i32 = std::fs::read_to_string(&pidfile)
            .unwrap()
            .trim()
            .parse()
            .unwrap();
        let gone_by = std::time::Instant::now() + Duration::from_secs(3);
        while alive(pid) && std::time::Instant::now() < gone_by {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert!(
            !alive(pid),
            "background child {pid} survived the cancellation"
        );
    }

    #[test]
    fn capture_keeps_the_right_end() {
        let mut head = Captured::default();
        head.push(b"abcdef", Keep::Head, 4);
        head.push(b"gh", Keep::Head, 4);
        assert_eq!(head.bytes, b"abcd");
        assert!(head.truncated);

        let mut tail = Captured::default();
        tail.push(b"abcdef", Keep::Tail, 4);
        tail.push(b"gh", Keep::Tail, 4);
        assert_eq!(tail.bytes, b"efgh");
        assert!(tail.truncated);
    }

    #[test]
    fn last_lines_is_one_line() {
        assert_eq!(last_lines(b"a\n\nb\nc\n", 2), "b | c");
        assert_eq!(last_lines(b"", 2), "");
    }
}
