//! Real curl, always bounded by `--max-time` and by a wall-clock deadline,
//! with the caller's `.curlrc` and proxy environment variables ignored.

use std::ffi::OsString;
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use super::process::{Proc, read_lossy, run_bounded};

fn require_curl() {
    static CHECKED: OnceLock<Result<String, String>> = OnceLock::new();
    let r = CHECKED.get_or_init(|| match Command::new("curl").arg("--version").output() {
        Ok(o) if o.status.success() => Ok(String::from_utf8_lossy(&o.stdout)
            .lines()
            .next()
            .unwrap_or_default()
            .to_string()),
        Ok(o) => Err(format!("`curl --version` failed: {}", o.status)),
        Err(e) => Err(e.to_string()),
    });
    if let Err(e) = r {
        panic!(
            "curl is required by the end-to-end tests and was not found on PATH ({e}); install curl"
        );
    }
}

/// Run curl with these arguments (plus `-sS` and a 60 s `--max-time`).
pub fn curl<I, S>(args: I) -> CurlResult
where
    I: IntoIterator<Item = S>,
    S: Into<OsString>,
{
    Curl::new().args(args).run()
}

/// One curl invocation.
#[derive(Debug, Clone)]
pub struct Curl {
    args: Vec<OsString>,
    max_time: Duration,
}

/// How a curl run ended.
#[derive(Debug, Clone)]
pub struct CurlResult {
    /// curl's exit code (-1 if killed by a signal).
    pub code: i32,
    pub stdout: String,
    pub stderr: String,
    pub elapsed: Duration,
}

impl CurlResult {
    /// Panic unless curl exited 0.
    pub fn expect_ok(&self, what: &str) -> &Self {
        assert_eq!(
            self.code, 0,
            "{what}: curl exited {}\nstdout: {}\nstderr: {}",
            self.code, self.stdout, self.stderr
        );
        self
    }
}

impl Default for Curl {
    fn default() -> Self {
        Self::new()
    }
}

impl Curl {
    pub fn new() -> Self {
        require_curl();
        Self {
            args: Vec::new(),
            max_time: Duration::from_secs(60),
        }
    }

    pub fn arg(mut self, a: impl Into<OsString>) -> Self {
        self.args.push(a.into());
        self
    }

    pub fn args<I, S>(mut self, args: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<OsString>,
    {
        self.args.extend(args.into_iter().map(Into::into));
        self
    }

    /// `--max-time` (whole seconds, at least 1).
    pub fn max_time(mut self, d: Duration) -> Self {
        self.max_time = d.max(Duration::from_secs(1));
        self
    }

    /// `-x URL`.
    pub fn proxy(self, url: &str) -> Self {
        self.arg("-x").arg(url)
    }

    /// `-o PATH`.
    pub fn output(self, p: &Path) -> Self {
        self.arg("-o").arg(p.as_os_str())
    }

    /// `-w FORMAT`.
    pub fn write_out(self, fmt: &str) -> Self {
        self.arg("-w").arg(fmt)
    }

    fn command(&self) -> Command {
        let mut cmd = Command::new("curl");
        for v in [
            "http_proxy",
            "https_proxy",
            "HTTPS_PROXY",
            "HTTP_PROXY",
            "all_proxy",
            "ALL_PROXY",
            "no_proxy",
            "NO_PROXY",
            "CURL_HOME",
        ] {
            cmd.env_remove(v);
        }
        cmd.arg("-q") // ignore ~/.curlrc; must come first
            .arg("-sS")
            .arg("--max-time")
            .arg(self.max_time.as_secs().to_string())
            .arg("--connect-timeout")
            .arg("10")
            .args(&self.args);
        cmd
    }

    /// Run to completion.
    pub fn run(&self) -> CurlResult {
        let start = Instant::now();
        let out = run_bounded(self.command(), self.max_time + Duration::from_secs(15));
        CurlResult {
            code: out.status.code().unwrap_or(-1),
            stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
            elapsed: start.elapsed(),
        }
    }

    /// Start in the background; stdout/stderr go to `{dir}/{name}.out|.err`.
    pub fn spawn(&self, dir: &Path, name: &str) -> CurlRun {
        let out = dir.join(format!("{name}.out"));
        let err = dir.join(format!("{name}.err"));
        let mut cmd = self.command();
        cmd.stdin(Stdio::null());
        // curl's stdout (the -w text) stays apart from its error messages.
        let p = Proc::spawn_split(name, cmd, Some(&out), &err);
        CurlRun {
            proc: p,
            out,
            started: Instant::now(),
        }
    }
}

/// A curl running in the background; killed on drop.
pub struct CurlRun {
    proc: Proc,
    out: std::path::PathBuf,
    pub started: Instant,
}

impl CurlRun {
    pub fn is_running(&mut self) -> bool {
        self.proc.is_running()
    }

    /// Wait up to `timeout` for curl to end.
    pub fn wait(&mut self, timeout: Duration) -> Option<CurlResult> {
        let status = self.proc.wait_exit(timeout)?;
        Some(CurlResult {
            code: status.code().unwrap_or(-1),
            stdout: read_lossy(&self.out),
            stderr: self.proc.log(),
            elapsed: self.started.elapsed(),
        })
    }
}
