//! A throwaway PostgreSQL cluster: `initdb` and `pg_ctl` from the local
//! installation, on a free loopback port, in a temporary directory that is
//! removed afterwards.
//!
//! ```ignore
//! let url = Postgres::shared().create_database("enroll"); // a fresh, empty database
//! ```
//!
//! - One cluster per test process ([`Postgres::shared`]); nextest runs each
//!   test in its own process, so every test pays one start (about 1.3 s on
//!   two cores) and gets its own databases.
//! - Speed over durability: `fsync=off` and `full_page_writes=off` only risk
//!   data on an OS crash. `synchronous_commit` stays on, as in production.
//! - Password authentication (SCRAM) with a generated password, over TCP on
//!   127.0.0.1; the Unix socket lives in the temporary directory.
//! - As root the server runs as the `postgres` user (PostgreSQL refuses
//!   root); as anyone else it runs as that user.
//! - Cleanup is bounded: `pg_ctl stop -m fast`, then SIGKILL. The shared
//!   cluster is never dropped (statics are not), so a watchdog process
//!   stops it and removes its directory once the test process is gone, also
//!   when the test was killed.
//! - `CELLGATE_TEST_POSTGRES_URL=postgres://USER:PASSWORD@HOST:PORT` uses an
//!   existing server instead (a role allowed to create databases).

use std::fs::File;
use std::net::TcpListener;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::OnceLock;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use super::process::{read_lossy, tail};

const START_TIMEOUT: Duration = Duration::from_secs(30);
const STOP_TIMEOUT: Duration = Duration::from_secs(15);
const PSQL_TIMEOUT: Duration = Duration::from_secs(30);
/// Another process may take a free port between the probe and the bind.
const START_ATTEMPTS: u32 = 3;
const SUPERUSER: &str = "postgres";

/// A running PostgreSQL server to create test databases on.
#[derive(Debug)]
pub struct Postgres {
    host: String,
    port: u16,
    user: String,
    password: String,
    /// `None` for an external server (nothing to stop).
    local: Option<Local>,
}

/// What a cluster started here needs to be stopped and removed.
#[derive(Debug)]
struct Local {
    dir: PathBuf,
    bin: PathBuf,
    as_postgres: bool,
}

impl Postgres {
    /// This process's cluster, started on first use (or the server named by
    /// `CELLGATE_TEST_POSTGRES_URL`).
    pub fn shared() -> &'static Postgres {
        static SHARED: OnceLock<Postgres> = OnceLock::new();
        SHARED.get_or_init(|| match std::env::var("CELLGATE_TEST_POSTGRES_URL") {
            Ok(url) if !url.is_empty() => Postgres::external(&url),
            _ => Postgres::start(),
        })
    }

    /// Start a new cluster, stopped and removed when dropped.
    pub fn start() -> Postgres {
        let started = Instant::now();
        let bin = bindir();
        let as_postgres = nix::unistd::geteuid().is_root();
        let dir = make_dir(as_postgres);
        let password = hex::encode(rand::random::<[u8; 16]>());
        let mut pg = Postgres {
            host: "127.0.0.1".into(),
            port: 0,
            user: SUPERUSER.into(),
            password,
            local: Some(Local {
                dir,
                bin,
                as_postgres,
            }),
        };
        pg.initdb();
        let mut last_error = String::new();
        for _ in 0..START_ATTEMPTS {
            pg.port = free_port();
            match pg.pg_ctl_start() {
                Ok(()) => {
                    pg.spawn_watchdog();
                    eprintln!(
                        "[postgres] cluster on 127.0.0.1:{} up in {:?}",
                        pg.port,
                        started.elapsed()
                    );
                    return pg;
                }
                Err(e) => last_error = e,
            }
        }
        panic!("PostgreSQL did not start in {START_ATTEMPTS} attempts: {last_error}");
    }

    fn external(url: &str) -> Postgres {
        let rest = url
            .split_once("://")
            .map(|(_, r)| r)
            .unwrap_or_else(|| panic!("CELLGATE_TEST_POSTGRES_URL must be a postgres:// URL"));
        let authority = rest.split(['/', '?']).next().unwrap_or_default();
        let (user_info, host_port) = authority
            .rsplit_once('@')
            .expect("CELLGATE_TEST_POSTGRES_URL needs USER:PASSWORD@");
        let (user, password) = user_info.split_once(':').unwrap_or((user_info, ""));
        let (host, port) = host_port.rsplit_once(':').unwrap_or((host_port, "5432"));
        Postgres {
            host: host.to_string(),
            port: port.parse().expect("port in CELLGATE_TEST_POSTGRES_URL"),
            user: user.to_string(),
            password: password.to_string(),
            local: None,
        }
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// The cluster's temporary directory (data, socket, logs); `None` for
    /// an external server.
    pub fn dir(&self) -> Option<&Path> {
        self.local.as_ref().map(|l| l.dir.as_path())
    }

    /// `postgres://USER:PASSWORD@HOST:PORT/DB`.
    pub fn url(&self, db: &str) -> String {
        format!(
            "postgres://{}:{}@{}:{}/{db}",
            self.user, self.password, self.host, self.port
        )
    }

    /// Create an empty database named after `label` (plus this process and
    /// a counter, so every call gets a new one) and return its URL.
    pub fn create_database(&self, label: &str) -> String {
        static SEQ: AtomicU32 = AtomicU32::new(0);
        let mut stem: String = label
            .chars()
            .map(|c| {
                if c.is_ascii_alphanumeric() {
                    c.to_ascii_lowercase()
                } else {
                    '_'
                }
            })
            .take(40)
            .collect();
        if stem.is_empty() {
            stem.push_str("db");
        }
        let name = format!(
            "cg_{stem}_{}_{}",
            std::process::id(),
            SEQ.fetch_add(1, Ordering::Relaxed)
        );
        // The name is [a-z0-9_] only, so quoting it is enough.
        self.psql(&format!("CREATE DATABASE \"{name}\""));
        self.url(&name)
    }

    /// Run one SQL statement as the superuser on the `postgres` database.
    pub fn psql(&self, sql: &str) -> String {
        let psql = match &self.local {
            Some(l) => l.bin.join("psql"),
            None => bindir().join("psql"),
        };
        let mut cmd = Command::new(psql);
        cmd.args(["-X", "-q", "-A", "-t", "-v", "ON_ERROR_STOP=1"])
            .arg("-h")
            .arg(&self.host)
            .arg("-p")
            .arg(self.port.to_string())
            .arg("-U")
            .arg(&self.user)
            .arg("-d")
            .arg("postgres")
            .arg("-c")
            .arg(sql)
            .env("PGPASSWORD", &self.password)
            .env("PGCONNECT_TIMEOUT", "10");
        let out = super::process::run_bounded(cmd, PSQL_TIMEOUT);
        assert!(
            out.status.success(),
            "psql {sql:?} failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    }

    fn local(&self) -> &Local {
        self.local.as_ref().expect("a cluster started here")
    }

    fn initdb(&self) {
        let l = self.local();
        let pwfile = l.dir.join("pwfile");
        std::fs::write(&pwfile, format!("{}\n", self.password)).expect("write pwfile");
        chown_postgres(&pwfile, l.as_postgres);
        let mut cmd = l.command("initdb");
        cmd.arg("-D")
            .arg(l.dir.join("data"))
            .args(["-A", "scram-sha-256", "-U", SUPERUSER, "--no-sync"])
            .args(["-E", "UTF8", "--locale=C"])
            .arg(format!("--pwfile={}", pwfile.display()));
        let log = l.dir.join("initdb.log");
        let ok = run_logged(cmd, &log, START_TIMEOUT);
        let _ = std::fs::remove_file(&pwfile);
        assert!(ok, "initdb failed:\n{}", tail(&read_lossy(&log), 30));
    }

    fn pg_ctl_start(&self) -> Result<(), String> {
        let l = self.local();
        let opts = format!(
            "-c listen_addresses=127.0.0.1 -p {} -k {} -c fsync=off -c full_page_writes=off",
            self.port,
            l.dir.display()
        );
        let mut cmd = l.command("pg_ctl");
        cmd.arg("-D")
            .arg(l.dir.join("data"))
            .arg("-o")
            .arg(opts)
            .arg("-l")
            .arg(l.dir.join("server.log"))
            .args(["-w", "-t", &START_TIMEOUT.as_secs().to_string(), "start"]);
        if run_logged(cmd, &l.dir.join("pg_ctl.log"), START_TIMEOUT + STOP_TIMEOUT) {
            Ok(())
        } else {
            let why = tail(&read_lossy(&l.dir.join("server.log")), 20);
            // A failed start may leave a postmaster behind (e.g. one that
            // never finished starting): stop it before trying another port.
            self.stop();
            Err(why)
        }
    }

    /// Stop the server (fast shutdown, then SIGKILL); bounded.
    fn stop(&self) {
        let l = self.local();
        let data = l.dir.join("data");
        if !data.join("postmaster.pid").exists() {
            return;
        }
        let mut cmd = l.command("pg_ctl");
        cmd.arg("-D").arg(&data).args([
            "-m",
            "fast",
            "-w",
            "-t",
            &STOP_TIMEOUT.as_secs().to_string(),
            "stop",
        ]);
        if !run_logged(cmd, &l.dir.join("pg_ctl.log"), STOP_TIMEOUT + STOP_TIMEOUT)
            && let Some(pid) = postmaster_pid(&data)
        {
            eprintln!("[postgres] fast shutdown failed; killing postmaster {pid}");
            let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGKILL);
        }
    }

    /// Stop the cluster and remove its directory once this process is
    /// gone without dropping it: the shared cluster (statics are never
    /// dropped), or a test killed outright. A drop removes the directory,
    /// which ends the watchdog.
    fn spawn_watchdog(&self) {
        let l = self.local();
        // Fast shutdown is SIGINT to the postmaster; give it 10 s, then KILL.
        // The outer shell exits at once (and is reaped here); the loop in
        // the background lives on, adopted by init.
        const SCRIPT: &str = r#"(
while kill -0 "$1" 2>/dev/null && [ -d "$2" ]; do sleep 0.5; done
[ -d "$2" ] || exit 0
pid=$(head -n 1 "$2/data/postmaster.pid" 2>/dev/null)
if [ -n "$pid" ]; then
  kill -INT "$pid" 2>/dev/null
  i=0
  while kill -0 "$pid" 2>/dev/null && [ "$i" -lt 100 ]; do sleep 0.1; i=$((i+1)); done
  kill -KILL "$pid" 2>/dev/null
fi
rm -rf "$2"
) &"#;
        let mut cmd = Command::new("sh");
        cmd.arg("-c")
            .arg(SCRIPT)
            .arg("cellgate-pg-watchdog")
            .arg(std::process::id().to_string())
            .arg(&l.dir)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            // Its own process group: a runner that kills the test's group
            // must not take the watchdog with it.
            .process_group(0);
        let status = cmd.status().expect("start the PostgreSQL watchdog");
        assert!(status.success(), "PostgreSQL watchdog: {status}");
    }
}

impl Drop for Postgres {
    fn drop(&mut self) {
        if let Some(l) = &self.local {
            self.stop();
            if std::env::var_os("CELLGATE_E2E_KEEP").is_some() {
                eprintln!("keeping {}", l.dir.display());
            } else {
                let _ = std::fs::remove_dir_all(&l.dir);
            }
        }
    }
}

impl Local {
    /// A PostgreSQL program, run as the `postgres` user when we are root.
    fn command(&self, program: &str) -> Command {
        let exe = self.bin.join(program);
        let mut cmd = if self.as_postgres {
            let mut c = Command::new("runuser");
            c.args(["-u", SUPERUSER, "--"]).arg(exe);
            c
        } else {
            Command::new(exe)
        };
        // Fixed locale and no inherited PG* settings.
        cmd.env("LC_ALL", "C")
            .env_remove("PGDATA")
            .env_remove("PGPORT");
        cmd
    }
}

/// The PostgreSQL server programs: `pg_config --bindir`, else the newest
/// `/usr/lib/postgresql/*/bin`.
fn bindir() -> PathBuf {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(|| {
        let has_initdb = |d: &Path| d.join("initdb").is_file() && d.join("pg_ctl").is_file();
        if let Ok(out) = Command::new("pg_config")
            .arg("--bindir")
            .stderr(Stdio::null())
            .output()
            && out.status.success()
        {
            let d = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
            if has_initdb(&d) {
                return d;
            }
        }
        let mut found: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
            .into_iter()
            .flatten()
            .flatten()
            .filter_map(|e| {
                let version = e.file_name().to_string_lossy().parse::<u32>().ok()?;
                let bin = e.path().join("bin");
                has_initdb(&bin).then_some((version, bin))
            })
            .collect();
        found.sort();
        match found.pop() {
            Some((_, bin)) => bin,
            None => panic!(
                "PostgreSQL server programs (initdb, pg_ctl) not found: install postgresql \
                 (apt-get install postgresql; tests/run.sh does this)"
            ),
        }
    })
    .clone()
}

/// A new directory the server user owns.
fn make_dir(as_postgres: bool) -> PathBuf {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    let dir = std::env::temp_dir().join(format!("cellgate-pg-{}-{nanos:08x}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap_or_else(|e| panic!("create {}: {e}", dir.display()));
    chown_postgres(&dir, as_postgres);
    dir
}

fn chown_postgres(path: &Path, as_postgres: bool) {
    if !as_postgres {
        return;
    }
    let user = nix::unistd::User::from_name(SUPERUSER)
        .ok()
        .flatten()
        .unwrap_or_else(|| panic!("no {SUPERUSER} user to run PostgreSQL as: install postgresql"));
    nix::unistd::chown(path, Some(user.uid), Some(user.gid))
        .unwrap_or_else(|e| panic!("chown {}: {e}", path.display()));
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("probe a free port")
}

fn postmaster_pid(data: &Path) -> Option<nix::unistd::Pid> {
    let text = std::fs::read_to_string(data.join("postmaster.pid")).ok()?;
    let pid: i32 = text.lines().next()?.trim().parse().ok()?;
    Some(nix::unistd::Pid::from_raw(pid))
}

/// Run a command with its output appended to `log` (never a pipe: the
/// postmaster pg_ctl starts would inherit it and hold it open); `false`
/// when it failed or outlived `timeout` (it is killed then).
fn run_logged(mut cmd: Command, log: &Path, timeout: Duration) -> bool {
    let file = File::options()
        .create(true)
        .append(true)
        .open(log)
        .unwrap_or_else(|e| panic!("open {}: {e}", log.display()));
    let err = file.try_clone().expect("clone log handle");
    cmd.stdin(Stdio::null()).stdout(file).stderr(err);
    let mut child = cmd
        .spawn()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"));
    let start = Instant::now();
    loop {
        match child.try_wait() {
            Ok(Some(status)) => return status.success(),
            Ok(None) if start.elapsed() < timeout => std::thread::sleep(Duration::from_millis(20)),
            _ => {
                let _ = child.kill();
                let _ = child.wait();
                return false;
            }
        }
    }
}
