//! A throwaway mosquitto broker on a loopback port, whose password and ACL
//! files the control plane writes (its `[mqtt] broker_files_dir`), plus an
//! operator user for hand-driven `mosquitto_pub`/`mosquitto_sub`.

use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use super::process::{Proc, command, run_bounded};
use super::temp::TempDir;

/// The operator user every broker here has (readwrite on all topics).
pub const OPERATOR: (&str, &str) = ("operator", "operator-secret");

pub struct Mosquitto {
    pub port: u16,
    dir: TempDir,
    conf: PathBuf,
    proc: Option<Proc>,
}

impl Mosquitto {
    /// Pick a port and write the configuration; the broker starts with
    /// [`Mosquitto::start`] once the control plane wrote its files.
    pub fn prepare(label: &str) -> Self {
        for tool in [
            "mosquitto",
            "mosquitto_passwd",
            "mosquitto_pub",
            "mosquitto_sub",
        ] {
            assert!(
                which(tool).is_some(),
                "{tool} is not installed (apt install mosquitto mosquitto-clients; tests/run.sh does)"
            );
        }
        let dir = TempDir::new(&format!("mqtt-{label}"));
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("a free port")
            .port();
        let d = dir.path();
        let out = run_bounded(
            {
                let mut c = command(which("mosquitto_passwd").expect("mosquitto_passwd"));
                c.args(["-c", "-b"])
                    .arg(d.join("operator.passwd"))
                    .args([OPERATOR.0, OPERATOR.1]);
                c
            },
            Duration::from_secs(10),
        );
        assert!(out.status.success(), "mosquitto_passwd: {out:?}");
        std::fs::write(
            d.join("operator.acl"),
            format!("user {}\ntopic readwrite #\n", OPERATOR.0),
        )
        .unwrap();
        let conf = d.join("mosquitto.conf");
        std::fs::write(
            &conf,
            format!(
                "listener {port} 127.0.0.1\n\
                 allow_anonymous false\n\
                 password_file {files}/passwd\n\
                 acl_file {files}/acl\n\
                 persistence false\n\
                 user root\n\
                 log_dest stderr\n\
                 log_type error\nlog_type warning\nlog_type notice\nlog_type information\n",
                files = d.join("broker").display(),
            ),
        )
        .unwrap();
        Self {
            port,
            dir,
            conf,
            proc: None,
        }
    }

    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    pub fn url(&self) -> String {
        format!("mqtt://127.0.0.1:{}", self.port)
    }

    /// The control plane's `[mqtt]` section for this broker.
    pub fn cp_toml(&self) -> String {
        let d = self.dir.path();
        format!(
            "[mqtt]\nurl = \"{}\"\nbroker_files_dir = \"{}\"\nextra_passwd_file = \"{}\"\n\
             extra_acl_file = \"{}\"\nreload_command = [\"pkill\", \"-HUP\", \"-f\", \"{}\"]\n",
            self.url(),
            d.join("broker").display(),
            d.join("operator.passwd").display(),
            d.join("operator.acl").display(),
            self.conf.display(),
        )
    }

    /// Start (or restart) the broker; waits for the control plane's files
    /// and for the port to accept.
    pub fn start(&mut self) {
        let passwd = self.dir.path().join("broker/passwd");
        let deadline = Instant::now() + Duration::from_secs(20);
        while !passwd.exists() {
            assert!(
                Instant::now() < deadline,
                "the control plane never wrote {}",
                passwd.display()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        let mut cmd = command(which("mosquitto").expect("mosquitto"));
        cmd.arg("-c").arg(&self.conf);
        self.proc = Some(Proc::spawn(
            "mosquitto",
            cmd,
            &self.dir.path().join("mosquitto.log"),
        ));
        let deadline = Instant::now() + Duration::from_secs(10);
        while TcpStream::connect(("127.0.0.1", self.port)).is_err() {
            assert!(
                Instant::now() < deadline,
                "mosquitto did not listen: {}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// SIGKILL the broker.
    pub fn kill(&mut self) {
        if let Some(p) = self.proc.as_mut() {
            p.kill();
        }
        self.proc = None;
    }

    pub fn log(&self) -> String {
        super::process::read_lossy(&self.dir.path().join("mosquitto.log"))
    }

    /// `mosquitto_pub` as `user`, with extra arguments (e.g. `-V mqttv5`).
    pub fn publish(
        &self,
        user: (&str, &str),
        topic: &str,
        payload: &str,
        extra: &[&str],
    ) -> Output {
        let mut c = command("mosquitto_pub");
        c.args(["-h", "127.0.0.1", "-p", &self.port.to_string()])
            .args(["-u", user.0, "-P", user.1, "-t", topic, "-m", payload])
            .args(extra);
        run_bounded(c, Duration::from_secs(20))
    }

    /// Start `mosquitto_sub` as `user` on `topic`: it exits after `count`
    /// messages or `secs` seconds; read its lines with [`Sub::wait`].
    pub fn subscribe(&self, user: (&str, &str), topic: &str, count: u32, secs: u32) -> Sub {
        let mut c = Command::new("mosquitto_sub");
        c.args(["-h", "127.0.0.1", "-p", &self.port.to_string()])
            .args(["-u", user.0, "-P", user.1, "-t", topic, "-q", "1"])
            .args(["-C", &count.to_string(), "-W", &secs.to_string(), "-v"])
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let child = c.spawn().expect("start mosquitto_sub");
        // Give the subscription a moment to reach the broker.
        std::thread::sleep(Duration::from_millis(300));
        Sub { child: Some(child) }
    }
}

impl Drop for Mosquitto {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A running `mosquitto_sub`.
pub struct Sub {
    child: Option<Child>,
}

impl Sub {
    /// Wait for it to end (count reached or timeout): (topic, payload)
    /// pairs it printed, and its stderr.
    pub fn wait(mut self) -> (Vec<(String, String)>, String) {
        let out = self
            .child
            .take()
            .expect("running")
            .wait_with_output()
            .expect("mosquitto_sub output");
        let lines = String::from_utf8_lossy(&out.stdout)
            .lines()
            .filter_map(|l| l.split_once(' '))
            .map(|(t, p)| (t.to_string(), p.to_string()))
            .collect();
        (lines, String::from_utf8_lossy(&out.stderr).into_owned())
    }
}

impl Drop for Sub {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// Where `tool` is: on PATH, or in /usr/sbin (Debian's broker lives there,
/// off the PATH of unprivileged users).
fn which(tool: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain([PathBuf::from("/usr/sbin"), PathBuf::from("/usr/bin")])
        .map(|d| d.join(tool))
        .find(|p| p.is_file())
}
