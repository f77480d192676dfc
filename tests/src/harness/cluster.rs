//! A cluster: one control plane in a fresh data directory, one customer,
//! and N enrolled edge agents, all real processes on 127.0.0.1.
//!
//! ```ignore
//! let c = Cluster::start(ClusterOpts { agents: 2, ..ClusterOpts::named("paths") });
//! Curl::new().proxy(&c.http_proxy()).arg(url).run().expect_ok("GET");
//! ```

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Output;
use std::time::{Duration, Instant};

use serde::Deserialize;

use super::api::Api;
use super::process::{Proc, command, control_plane_bin, edge_agent_bin, run_bounded, tail};
use super::temp::TempDir;
use super::wait::eventually;

/// How to start a [`Cluster`].
#[derive(Debug, Clone)]
pub struct ClusterOpts {
    /// Label for the temporary directory and log messages.
    pub name: String,
    /// `--allow-private-targets` on the control plane and every agent, so
    /// customers can reach the local test servers.
    pub allow_private: bool,
    /// Agents enrolled, started and awaited online.
    pub agents: usize,
    /// Control-plane TOML configuration (`--config`), e.g.
    /// `handshake_timeout_secs = 2`.
    pub config_toml: Option<String>,
    /// The customer added at start (username, password).
    pub customer: (String, String),
    /// Address every control-plane listener binds (port 0). Agents in
    /// network namespaces need one they can reach, e.g. a testbed's
    /// internet address.
    pub bind_ip: std::net::IpAddr,
    /// `--database-url` for the control plane. `None`: SQLite in the data
    /// directory, unless `CELLGATE_E2E_DATABASE=postgres` asks for a fresh
    /// database on this process's throwaway PostgreSQL cluster.
    pub database_url: Option<String>,
}

/// How to run an agent process: a command prefix (e.g. `ip netns exec NS`),
/// a configuration file, extra environment.
#[derive(Debug, Clone, Default)]
pub struct AgentLaunch {
    pub prefix: Vec<String>,
    pub config_toml: Option<String>,
    pub env: Vec<(String, String)>,
    /// Run this agent binary instead of the workspace's (e.g. a private
    /// copy that a self-update may replace).
    pub binary: Option<PathBuf>,
}

impl ClusterOpts {
    pub fn named(name: &str) -> Self {
        Self {
            name: name.to_string(),
            ..Self::default()
        }
    }
}

impl Default for ClusterOpts {
    fn default() -> Self {
        Self {
            name: "cluster".into(),
            allow_private: true,
            agents: 1,
            config_toml: None,
            customer: ("alice".into(), "alice-secret-1".into()),
            bind_ip: std::net::Ipv4Addr::LOCALHOST.into(),
            database_url: None,
        }
    }
}

/// The control plane's bound addresses (its ready file).
#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq)]
pub struct Addrs {
    pub http: SocketAddr,
    pub socks: SocketAddr,
    pub api: SocketAddr,
    pub quic: SocketAddr,
}

/// An enrolled agent: its identity directory, device id and process.
#[derive(Debug)]
pub struct Agent {
    pub name: String,
    pub state_dir: PathBuf,
    pub device_id: String,
    pub log: PathBuf,
    proc: Option<Proc>,
}

impl Agent {
    pub fn is_running(&mut self) -> bool {
        self.proc.as_mut().is_some_and(Proc::is_running)
    }

    pub fn log_text(&self) -> String {
        super::process::read_lossy(&self.log)
    }

    pub fn pid(&self) -> Option<u32> {
        self.proc.as_ref().and_then(Proc::pid)
    }
}

pub struct Cluster {
    pub opts: ClusterOpts,
    pub addrs: Addrs,
    /// The admin token the control plane printed at its first start.
    pub admin_token: String,
    pub user: String,
    pub pass: String,
    pub agents: Vec<Agent>,
    cp: Option<Proc>,
    cp_log: PathBuf,
    data_dir: PathBuf,
    database_url: Option<String>,
    ready_file: PathBuf,
    config_path: Option<PathBuf>,
    started: Instant,
    // Last: dropped after every process is gone.
    dir: TempDir,
}

const READY_TIMEOUT: Duration = Duration::from_secs(20);
const CLI_TIMEOUT: Duration = Duration::from_secs(30);
const ONLINE_TIMEOUT: Duration = Duration::from_secs(20);

impl Cluster {
    pub fn start(opts: ClusterOpts) -> Self {
        super::process::raise_fd_limit(16 * 1024);
        let dir = TempDir::new(&opts.name);
        let config_path = opts.config_toml.as_ref().map(|t| {
            let p = dir.join("control-plane.toml");
            std::fs::write(&p, t).expect("write control-plane config");
            p
        });
        let ip = opts.bind_ip;
        let database_url = opts
            .database_url
            .clone()
            .or_else(|| e2e_database(&opts.name));
        let mut c = Cluster {
            addrs: Addrs {
                http: (ip, 0).into(),
                socks: (ip, 0).into(),
                api: (ip, 0).into(),
                quic: (ip, 0).into(),
            },
            admin_token: String::new(),
            user: opts.customer.0.clone(),
            pass: opts.customer.1.clone(),
            agents: Vec::new(),
            cp: None,
            cp_log: dir.join("control-plane.log"),
            data_dir: dir.join("cp-data"),
            database_url,
            ready_file: dir.join("ready.json"),
            config_path,
            started: Instant::now(),
            opts,
            dir,
        };
        c.spawn_cp_and_wait();
        c.admin_token = c.read_admin_token();
        let (user, pass) = (c.user.clone(), c.pass.clone());
        let out = c.cp_cli(&["customer", "add", &user, "--password", &pass]);
        c.assert_cli_ok(&out, "customer add");
        for i in 0..c.opts.agents {
            let idx = c.enroll_agent(&format!("agent-{i}"));
            c.start_agent(idx);
        }
        let n = c.opts.agents;
        if n > 0 {
            c.wait_online(n, ONLINE_TIMEOUT);
        }
        eprintln!(
            "[{}] cluster up in {:?}: {:?}, {} agent(s), dir {}",
            c.opts.name,
            c.started.elapsed(),
            c.addrs,
            n,
            c.dir.path().display()
        );
        c
    }

    /// The temporary directory (for test files next to the logs).
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    pub fn data_dir(&self) -> &Path {
        &self.data_dir
    }

    /// The control plane's `--database-url`, when not SQLite in the data
    /// directory.
    pub fn database_url(&self) -> Option<&str> {
        self.database_url.as_deref()
    }

    /// The admin API with the admin token.
    pub fn api(&self) -> Api {
        Api::new(self.addrs.api, Some(&self.admin_token))
    }

    /// `http://user:pass@127.0.0.1:PORT` for `curl -x`.
    pub fn http_proxy(&self) -> String {
        self.http_proxy_as(&self.user, &self.pass)
    }

    pub fn http_proxy_as(&self, user: &str, pass: &str) -> String {
        format!("http://{user}:{pass}@{}", self.addrs.http)
    }

    /// `socks5h://user:pass@127.0.0.1:PORT` (the proxy resolves names).
    pub fn socks_proxy(&self) -> String {
        self.socks_proxy_as(&self.user, &self.pass)
    }

    pub fn socks_proxy_as(&self, user: &str, pass: &str) -> String {
        format!("socks5h://{user}:{pass}@{}", self.addrs.socks)
    }

    /// `Proxy-Authorization: Basic …` value for raw requests.
    pub fn basic_auth(&self) -> String {
        use base64::Engine;
        let raw = format!("{}:{}", self.user, self.pass);
        format!(
            "Basic {}",
            base64::engine::general_purpose::STANDARD.encode(raw)
        )
    }

    // ---- control plane -------------------------------------------------

    fn cp_command(&self) -> std::process::Command {
        let mut cmd = command(control_plane_bin());
        if let Some(p) = &self.config_path {
            cmd.arg("--config").arg(p);
        }
        cmd.arg("--data-dir").arg(&self.data_dir);
        if let Some(url) = &self.database_url {
            cmd.arg("--database-url").arg(url);
        }
        cmd
    }

    /// Run `control-plane --data-dir DIR ARGS…` to completion.
    pub fn cp_cli(&self, args: &[&str]) -> Output {
        let mut cmd = self.cp_command();
        cmd.args(args);
        run_bounded(cmd, CLI_TIMEOUT)
    }

    fn assert_cli_ok(&self, out: &Output, what: &str) {
        if !out.status.success() {
            self.dump_logs();
            panic!(
                "`control-plane {what}` failed ({}):\nstdout: {}\nstderr: {}",
                out.status,
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        }
    }

    fn spawn_cp_and_wait(&mut self) {
        // The first start binds port 0; restarts bind the same ports again.
        let fresh = self.addrs.http.port() == 0;
        let deadline = Instant::now() + READY_TIMEOUT;
        loop {
            let _ = std::fs::remove_file(&self.ready_file);
            let mut cmd = self.cp_command();
            cmd.arg("serve")
                .arg("--http-listen")
                .arg(self.addrs.http.to_string())
                .arg("--socks-listen")
                .arg(self.addrs.socks.to_string())
                .arg("--api-listen")
                .arg(self.addrs.api.to_string())
                .arg("--quic-listen")
                .arg(self.addrs.quic.to_string())
                .arg("--ready-file")
                .arg(&self.ready_file);
            if self.opts.allow_private {
                cmd.arg("--allow-private-targets");
            }
            let mut p = Proc::spawn("control-plane", cmd, &self.cp_log);
            let ready = eventually(
                deadline.saturating_duration_since(Instant::now()),
                Duration::from_millis(50),
                || {
                    if !p.is_running() {
                        return Some(None);
                    }
                    let text = std::fs::read_to_string(&self.ready_file).ok()?;
                    serde_json::from_str::<Addrs>(&text).ok().map(Some)
                },
            );
            match ready {
                Some(Some(addrs)) => {
                    if !fresh {
                        assert_eq!(addrs, self.addrs, "control plane restarted on other ports");
                    }
                    self.addrs = addrs;
                    self.cp = Some(p);
                    return;
                }
                // Exited: on a restart the old ports may still be settling.
                Some(None) if !fresh && Instant::now() < deadline => {
                    eprintln!(
                        "[{}] control plane exited during restart ({:?}), retrying",
                        self.opts.name,
                        p.exit_status()
                    );
                    std::thread::sleep(Duration::from_millis(250));
                }
                Some(None) => {
                    self.cp = Some(p);
                    self.dump_logs();
                    panic!("control plane exited before writing its ready file");
                }
                None => {
                    self.cp = Some(p);
                    self.dump_logs();
                    panic!("control plane wrote no ready file within {READY_TIMEOUT:?}");
                }
            }
        }
    }

    fn read_admin_token(&self) -> String {
        const MARK: &str = "admin token (shown once; store it safely): ";
        let found = eventually(Duration::from_secs(5), Duration::from_millis(50), || {
            let log = super::process::read_lossy(&self.cp_log);
            log.lines()
                .find_map(|l| l.split_once(MARK).map(|(_, t)| t.trim().to_string()))
        });
        match found {
            Some(t) => t,
            None => {
                self.dump_logs();
                panic!("the control plane printed no admin token at its first start");
            }
        }
    }

    pub fn cp_running(&mut self) -> bool {
        self.cp.as_mut().is_some_and(Proc::is_running)
    }

    pub fn cp_pid(&self) -> Option<u32> {
        self.cp.as_ref().and_then(Proc::pid)
    }

    /// SIGKILL the control plane.
    pub fn kill_cp(&mut self) {
        if let Some(p) = self.cp.as_mut() {
            p.kill();
        }
    }

    /// SIGTERM the control plane; `true` if it exited within `grace`.
    pub fn terminate_cp(&mut self, grace: Duration) -> bool {
        match self.cp.as_mut() {
            Some(p) => {
                let (status, exited) = p.terminate(grace);
                eprintln!("[{}] control plane stopped: {status:?}", self.opts.name);
                exited
            }
            None => true,
        }
    }

    /// Start the control plane again on the same ports and data directory.
    pub fn restart_cp(&mut self) {
        if self.cp_running() {
            self.kill_cp();
        }
        self.spawn_cp_and_wait();
    }

    // ---- agents ----------------------------------------------------------

    /// `control-plane enroll-token create --name NAME [--ttl-secs N]`.
    pub fn create_enroll_token(&self, name: &str, ttl_secs: Option<u64>) -> String {
        let ttl = ttl_secs.map(|t| t.to_string());
        let mut args = vec!["enroll-token", "create", "--name", name];
        if let Some(t) = &ttl {
            args.extend(["--ttl-secs", t.as_str()]);
        }
        let out = self.cp_cli(&args);
        self.assert_cli_ok(&out, "enroll-token create");
        let stdout = String::from_utf8_lossy(&out.stdout);
        let token = stdout
            .lines()
            .rev()
            .find(|l| !l.trim().is_empty())
            .unwrap_or_default()
            .trim()
            .to_string();
        assert!(
            token.starts_with("cgt1_"),
            "unexpected token line {token:?}"
        );
        token
    }

    /// `edge-agent enroll TOKEN --state-dir DIR` (not asserted).
    pub fn run_enroll(&self, token: &str, state_dir: &Path) -> Output {
        let mut cmd = command(edge_agent_bin());
        cmd.arg("enroll")
            .arg(token)
            .arg("--state-dir")
            .arg(state_dir);
        run_bounded(cmd, CLI_TIMEOUT)
    }

    /// Create a token, enroll a new agent with it (not started yet);
    /// returns its index in [`Cluster::agents`].
    pub fn enroll_agent(&mut self, name: &str) -> usize {
        let token = self.create_enroll_token(name, None);
        let state_dir = self.dir.join(format!("agents/{name}"));
        let out = self.run_enroll(&token, &state_dir);
        let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
        if !out.status.success() {
            self.dump_logs();
            panic!(
                "edge-agent enroll failed ({}): {stdout}{}",
                out.status,
                String::from_utf8_lossy(&out.stderr)
            );
        }
        // "enrolled as dev-… (name); identity stored in …"
        let device_id = stdout
            .split_whitespace()
            .find(|w| w.starts_with("dev-"))
            .unwrap_or_else(|| panic!("no device id in enroll output: {stdout}"))
            .to_string();
        self.agents.push(Agent {
            name: name.to_string(),
            log: self.dir.join(format!("{name}.log")),
            state_dir,
            device_id,
            proc: None,
        });
        self.agents.len() - 1
    }

    /// Start (or restart) agent `i` with its state directory.
    pub fn start_agent(&mut self, i: usize) {
        self.start_agent_with(i, &AgentLaunch::default());
    }

    /// Start (or restart) agent `i` the way `launch` says.
    pub fn start_agent_with(&mut self, i: usize, launch: &AgentLaunch) {
        let allow = self.opts.allow_private;
        let config = launch.config_toml.as_ref().map(|t| {
            let p = self.dir.join(format!("{}.toml", self.agents[i].name));
            std::fs::write(&p, t).expect("write agent config");
            p
        });
        let a = &mut self.agents[i];
        if let Some(p) = a.proc.as_mut() {
            p.kill();
        }
        let bin = launch.binary.clone().unwrap_or_else(edge_agent_bin);
        let mut cmd = match launch.prefix.split_first() {
            Some((first, rest)) => {
                let mut c = command(first);
                c.args(rest).arg(&bin);
                c
            }
            None => command(&bin),
        };
        cmd.arg("run").arg("--state-dir").arg(&a.state_dir);
        if let Some(p) = &config {
            cmd.arg("--config").arg(p);
        }
        if allow {
            cmd.arg("--allow-private-targets");
        }
        for (k, v) in &launch.env {
            cmd.env(k, v);
        }
        a.proc = Some(Proc::spawn(&a.name, cmd, &a.log));
    }

    /// SIGKILL agent `i`.
    pub fn kill_agent(&mut self, i: usize) {
        if let Some(p) = self.agents[i].proc.as_mut() {
            p.kill();
        }
    }

    /// SIGTERM agent `i`; `true` if it exited within `grace` (else it is
    /// killed).
    pub fn terminate_agent(&mut self, i: usize, grace: Duration) -> bool {
        match self.agents[i].proc.as_mut() {
            Some(p) => p.terminate(grace).1,
            None => true,
        }
    }

    /// How many devices the API reports online.
    pub fn online_count(&self) -> usize {
        self.api()
            .try_request("GET", "/api/v1/devices", None)
            .ok()
            .and_then(|r| match r.json() {
                serde_json::Value::Array(v) => Some(
                    v.iter()
                        .filter(|d| d["status"].as_str() == Some("online"))
                        .count(),
                ),
                _ => None,
            })
            .unwrap_or(0)
    }

    /// Wait until exactly `n` devices are online; returns the time it took.
    pub fn wait_online(&self, n: usize, timeout: Duration) -> Duration {
        let start = Instant::now();
        if eventually(timeout, Duration::from_millis(50), || {
            (self.online_count() == n).then_some(())
        })
        .is_none()
        {
            self.dump_logs();
            panic!(
                "[{}] {} device(s) online after {timeout:?}, expected {n}",
                self.opts.name,
                self.online_count()
            );
        }
        start.elapsed()
    }

    /// Wait until the device's API status is `status`; returns the time it took.
    pub fn wait_status(&self, device_id: &str, status: &str, timeout: Duration) -> Duration {
        let start = Instant::now();
        let api = self.api();
        let mut last = None;
        let ok = eventually(timeout, Duration::from_millis(25), || {
            last = api
                .try_request("GET", &format!("/api/v1/devices/{device_id}"), None)
                .ok()
                .and_then(|r| r.json()["status"].as_str().map(str::to_string));
            (last.as_deref() == Some(status)).then_some(())
        });
        if ok.is_none() {
            self.dump_logs();
            panic!("device {device_id} is {last:?} after {timeout:?}, expected {status:?}");
        }
        start.elapsed()
    }

    /// Print the tail of every process log (called on failures).
    pub fn dump_logs(&self) {
        let show = |name: &str, p: &Path| {
            let text = super::process::read_lossy(p);
            eprintln!(
                "----- {name} ({}) last 60 lines -----\n{}\n----- end {name} -----",
                p.display(),
                tail(&text, 60)
            );
        };
        show("control-plane", &self.cp_log);
        for a in &self.agents {
            show(&a.name, &a.log);
        }
    }

    /// The control plane's log so far.
    pub fn cp_log_text(&self) -> String {
        super::process::read_lossy(&self.cp_log)
    }
}

/// `CELLGATE_E2E_DATABASE`: `postgres` gives every cluster a fresh
/// database on the shared throwaway PostgreSQL cluster; unset or `sqlite`
/// keeps SQLite.
fn e2e_database(label: &str) -> Option<String> {
    match std::env::var("CELLGATE_E2E_DATABASE").ok().as_deref() {
        None | Some("" | "sqlite") => None,
        Some("postgres") => Some(super::postgres::Postgres::shared().create_database(label)),
        Some(other) => panic!("CELLGATE_E2E_DATABASE={other:?}: use postgres or sqlite"),
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!(
                "[{}] test failed {:?} after the cluster started; process logs follow",
                self.opts.name,
                self.started.elapsed()
            );
            self.dump_logs();
        }
        for a in &mut self.agents {
            if let Some(p) = a.proc.as_mut() {
                p.kill();
            }
        }
        if let Some(p) = self.cp.as_mut() {
            p.kill();
        }
    }
}
