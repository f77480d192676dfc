//! Running commands, whichever way they arrive (the tunnel's control
//! stream or MQTT), each id at most once.
//!
//! The ids already run are kept in memory and in the state directory
//! (`commands.seen`), so neither an MQTT redelivery, nor the same command
//! sent again over the other channel, nor a restart in between runs a
//! command twice.

use std::collections::{HashMap, VecDeque};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use shared::mqtt::Action;
use shared::wire::{Command, CommandDetail, CommandKind, CommandResult};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tracing::{info, warn};

use crate::exits::Exits;

/// Ids remembered (in memory and on disk).
const REMEMBERED: usize = 512;
/// The file of remembered ids in the state directory.
pub const SEEN_FILE: &str = "commands.seen";
/// The IP-echo URL of the last session, for commands arriving over MQTT
/// while the tunnel is down.
const ECHO_FILE: &str = "ip-echo.url";

/// What to do once a command's result has been sent.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum After {
    Nothing,
    /// Restart the agent process (after a restart or a new configuration).
    Restart,
    /// Run the reboot command.
    Reboot,
}

/// How the agent restarts itself; `None` (an in-process agent) refuses
/// restart commands.
pub type Restarter = Arc<dyn Fn() + Send + Sync>;

static RESTARTER: std::sync::OnceLock<Restarter> = std::sync::OnceLock::new();

/// Let restart commands restart this process (the binary's `main` does;
/// an agent running inside another program does not).
pub fn install_restarter(r: Restarter) {
    let _ = RESTARTER.set(r);
}

/// The installed restarter, if any.
pub fn restarter() -> Option<Restarter> {
    RESTARTER.get().cloned()
}

pub struct Executor {
    exits: Arc<Exits>,
    state_dir: PathBuf,
    config_path: Option<PathBuf>,
    reboot_command: Vec<String>,
    restarter: Option<Restarter>,
    /// The IP-echo URL of the current (or last) session.
    echo_url: RwLock<String>,
    seen: Mutex<Seen>,
    /// The tunnel of the current session (self-updates download through it).
    conn: Mutex<Option<quinn::Connection>>,
}

#[derive(Default)]
struct Seen {
    order: VecDeque<String>,
    /// Result of each remembered id once it finished (`None`: running).
    results: HashMap<String, Option<CommandResult>>,
}

/// The outcome of offering a command to [`Executor::claim`].
pub enum Claim {
    /// First time: run it.
    Run,
    /// Seen before and finished: this was its result.
    Done(Option<CommandResult>),
}

impl Executor {
    pub fn new(
        exits: Arc<Exits>,
        state_dir: &Path,
        config_path: Option<PathBuf>,
        reboot_command: Vec<String>,
        restarter: Option<Restarter>,
    ) -> Self {
        let mut seen = Seen::default();
        if let Ok(text) = std::fs::read_to_string(state_dir.join(SEEN_FILE)) {
            for id in text.lines().filter(|l| shared::mqtt::valid_command_id(l)) {
                if !seen.results.contains_key(id) {
                    seen.order.push_back(id.to_string());
                    seen.results.insert(id.to_string(), None);
                }
            }
            while seen.order.len() > REMEMBERED {
                if let Some(old) = seen.order.pop_front() {
                    seen.results.remove(&old);
                }
            }
        }
        Self {
            exits,
            state_dir: state_dir.to_path_buf(),
            config_path,
            reboot_command,
            restarter,
            echo_url: RwLock::new(
                std::fs::read_to_string(state_dir.join(ECHO_FILE))
                    .map(|s| s.trim().to_string())
                    .unwrap_or_default(),
            ),
            seen: Mutex::new(seen),
            conn: Mutex::new(None),
        }
    }

    /// The tunnel of the current session, or `None` between sessions.
    pub fn set_connection(&self, conn: Option<quinn::Connection>) {
        if let Ok(mut c) = self.conn.lock() {
            *c = conn;
        }
    }

    /// Use (and remember) the IP-echo URL a session announced.
    pub fn set_echo_url(&self, url: &str) {
        let changed = match self.echo_url.write() {
            Ok(mut u) if *u != url => {
                *u = url.to_string();
                true
            }
            _ => false,
        };
        if changed
            && let Err(e) =
                shared::files::write_atomic(&self.state_dir.join(ECHO_FILE), url.as_bytes(), 0o600)
        {
            warn!("remembering the IP-echo URL failed: {e}");
        }
    }

    pub fn exits(&self) -> &Arc<Exits> {
        &self.exits
    }

    /// Record `id` as run (before running it); `Done` when it ran already.
    /// `persist`: remember it across restarts too (commands with effects).
    pub fn claim(&self, id: &str, persist: bool) -> Claim {
        let mut seen = self.seen.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(r) = seen.results.get(id) {
            return Claim::Done(r.clone());
        }
        seen.order.push_back(id.to_string());
        seen.results.insert(id.to_string(), None);
        while seen.order.len() > REMEMBERED {
            if let Some(old) = seen.order.pop_front() {
                seen.results.remove(&old);
            }
        }
        if !persist {
            return Claim::Run;
        }
        let mut text = seen.order.iter().cloned().collect::<Vec<_>>().join("\n");
        text.push('\n');
        drop(seen);
        if let Err(e) =
            shared::files::write_atomic(&self.state_dir.join(SEEN_FILE), text.as_bytes(), 0o600)
        {
            warn!("remembering command ids failed: {e}");
        }
        Claim::Run
    }

    fn finished(&self, r: &CommandResult) {
        let mut seen = self.seen.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(slot) = seen.results.get_mut(&r.id) {
            *slot = Some(r.clone());
        }
    }

    /// Run a command (already claimed) and say what to do after answering.
    pub async fn run(&self, cmd: Command) -> (CommandResult, After) {
        let echo_url = self.echo_url.read().map(|u| u.clone()).unwrap_or_default();
        let ((ok, message, detail), after) = self.execute(cmd.kind, &echo_url).await;
        let r = CommandResult {
            id: cmd.id,
            ok,
            message,
            detail,
        };
        info!(id = %r.id, ok = r.ok, message = %r.message, "command finished");
        self.finished(&r);
        (r, if ok { after } else { After::Nothing })
    }

    async fn execute(&self, kind: CommandKind, echo_url: &str) -> (crate::exits::Outcome, After) {
        let exits = &self.exits;
        let unknown = |exit: &str| {
            (
                false,
                format!(
                    "this agent has no exit {exit:?} (exits: {})",
                    exit_names(exits)
                ),
                None,
            )
        };
        let done = |o| (o, After::Nothing);
        match kind {
            CommandKind::Ping => done((true, "pong".to_string(), None)),
            CommandKind::CheckIp { exit } => done(match exits.get(&exit) {
                Some(e) => e.check_ip(echo_url).await,
                None => unknown(&exit),
            }),
            CommandKind::Rotate {
                exit,
                rung,
                limit_ms,
            } => done(match exits.get(&exit) {
                Some(e) => {
                    let limit = Duration::from_millis(u64::from(limit_ms).clamp(1000, 900_000));
                    e.rotate(rung, limit, echo_url).await
                }
                None => unknown(&exit),
            }),
            CommandKind::SpeedTest { exit, bytes } => {
                done(self.speed_test(exit, bytes, echo_url).await)
            }
            CommandKind::RestartAgent => match &self.restarter {
                Some(_) => ((true, "restarting the agent".into(), None), After::Restart),
                None => done((
                    false,
                    "this agent cannot restart itself (it runs in-process)".into(),
                    None,
                )),
            },
            CommandKind::Reboot => {
                if self.reboot_command.is_empty() {
                    done((false, "no reboot_command is configured".into(), None))
                } else {
                    (
                        (
                            true,
                            format!("rebooting ({})", self.reboot_command.join(" ")),
                            None,
                        ),
                        After::Reboot,
                    )
                }
            }
            CommandKind::UpdateConfig { toml } => match self.update_config(&toml) {
                Ok(path) if self.restarter.is_some() => (
                    (
                        true,
                        format!("configuration written to {}; restarting", path.display()),
                        None,
                    ),
                    After::Restart,
                ),
                Ok(path) => done((
                    true,
                    format!(
                        "configuration written to {}; it applies at the next start",
                        path.display()
                    ),
                    None,
                )),
                Err(e) => done((false, e, None)),
            },
            kind @ CommandKind::SelfUpdate { .. } => {
                let conn = self.conn.lock().ok().and_then(|c| c.clone());
                done(match conn {
                    Some(conn) => crate::update::self_update(&conn, kind).await,
                    None => (
                        false,
                        "self-update needs the tunnel: the release downloads through it".into(),
                        None,
                    ),
                })
            }
        }
    }

    /// Validate a new configuration and write it over the agent's file
    /// (the previous one is kept as `.prev`).
    fn update_config(&self, text: &str) -> Result<PathBuf, String> {
        let path = self
            .config_path
            .clone()
            .ok_or("the agent runs without a configuration file (--config)")?;
        let cfg = crate::AgentConfig::from_toml(text)
            .map_err(|e| format!("the new configuration does not parse: {e}"))?;
        cfg.validate()
            .map_err(|e| format!("the new configuration is invalid: {e}"))?;
        if path.exists() {
            let mut prev = path.clone().into_os_string();
            prev.push(".prev");
            std::fs::copy(&path, &prev)
                .map_err(|e| format!("keeping the previous configuration failed: {e}"))?;
        }
        shared::files::write_atomic(&path, text.as_bytes(), 0o640)
            .map_err(|e| format!("writing {} failed: {e}", path.display()))?;
        Ok(path)
    }

    /// Download `bytes` from the IP echo's `/speedtest` through an exit.
    async fn speed_test(
        &self,
        exit: Option<String>,
        bytes: u32,
        echo_url: &str,
    ) -> crate::exits::Outcome {
        let e = match &exit {
            Some(name) => match self.exits.get(name) {
                Some(e) => e.clone(),
                None => {
                    return (
                        false,
                        format!(
                            "this agent has no exit {name:?} (exits: {})",
                            exit_names(&self.exits)
                        ),
                        None,
                    );
                }
            },
            None => match self.exits.all().first() {
                Some(e) => e.clone(),
                None => return (false, "this agent has no exit".into(), None),
            },
        };
        let Some(base) = echo_url.strip_suffix("/ip") else {
            return (
                false,
                "the speed test needs the control plane's IP echo (an ip_echo_url ending in /ip)"
                    .into(),
                None,
            );
        };
        let url = format!("{base}/speedtest?bytes={bytes}");
        match tokio::time::timeout(Duration::from_secs(110), download(&e, &url)).await {
            Ok(Ok((got, first_byte, total))) => {
                let millis = total.as_millis().max(1) as u32;
                let mbit = got as f64 * 8.0 / 1000.0 / f64::from(millis);
                (
                    true,
                    format!(
                        "{got} bytes in {millis} ms through {} ({mbit:.1} Mbit/s)",
                        e.name
                    ),
                    Some(CommandDetail::SpeedTest {
                        exit: e.name.clone(),
                        bytes: got,
                        millis,
                        first_byte_ms: first_byte.as_millis() as u32,
                    }),
                )
            }
            Ok(Err(err)) => (false, format!("speed test failed: {err}"), None),
            Err(_) => (false, "speed test took over 110 s".into(), None),
        }
    }

    /// Carry out what a finished command asked for after its answer left.
    pub async fn after(&self, after: After) {
        match after {
            After::Nothing => {}
            After::Restart => {
                if let Some(r) = &self.restarter {
                    // Give the answer a moment to reach the wire.
                    tokio::time::sleep(Duration::from_millis(300)).await;
                    info!("restarting the agent on command");
                    r();
                }
            }
            After::Reboot => {
                tokio::time::sleep(Duration::from_millis(300)).await;
                let Some((prog, args)) = self.reboot_command.split_first() else {
                    return;
                };
                info!(command = %self.reboot_command.join(" "), "rebooting on command");
                match tokio::process::Command::new(prog).args(args).status().await {
                    Ok(s) if s.success() => {}
                    Ok(s) => warn!(status = %s, "the reboot command failed"),
                    Err(e) => warn!("running the reboot command failed: {e}"),
                }
            }
        }
    }
}

/// Turn an MQTT action into the command the agent runs; rotations name a
/// method, which becomes the step of the exit's ladder.
pub fn kind_of(action: Action, exits: &Exits) -> Result<CommandKind, String> {
    Ok(match action {
        Action::Ping => CommandKind::Ping,
        Action::Reboot => CommandKind::Reboot,
        Action::RestartAgent => CommandKind::RestartAgent,
        Action::UpdateConfig { toml } => CommandKind::UpdateConfig { toml },
        Action::SelfUpdate { version } => {
            return Err(format!(
                "self_update {version} cannot come over MQTT: the signed release downloads through \
                 the tunnel; issue it through the control plane's API"
            ));
        }
        Action::SpeedTest { exit, bytes } => CommandKind::SpeedTest {
            exit,
            bytes: bytes.unwrap_or(5_000_000).clamp(1, 100_000_000),
        },
        Action::Rotate { exit, method } => {
            let e = match &exit {
                Some(name) => exits.get(name).ok_or_else(|| {
                    format!(
                        "this agent has no exit {name:?} (exits: {})",
                        exit_names(exits)
                    )
                })?,
                None => match exits.all() {
                    [one] => one,
                    _ => {
                        return Err(format!(
                            "this agent has several exits; name one with \"exit\" ({})",
                            exit_names(exits)
                        ));
                    }
                },
            };
            if e.ladder.is_empty() {
                return Err(format!(
                    "exit {} cannot rotate (no rotation backend)",
                    e.name
                ));
            }
            let rung = match &method {
                Some(m) => e.ladder.iter().position(|r| r == m).ok_or_else(|| {
                    format!(
                        "exit {} has no method {m:?} (its ladder: {})",
                        e.name,
                        e.ladder.join(", ")
                    )
                })?,
                None => 0,
            };
            CommandKind::Rotate {
                exit: e.name.clone(),
                rung: rung as u8,
                limit_ms: 120_000,
            }
        }
    })
}

fn exit_names(exits: &Exits) -> String {
    exits
        .all()
        .iter()
        .map(|e| e.name.as_str())
        .collect::<Vec<_>>()
        .join(", ")
}

/// GET `url` through `exit`, discarding the body: (bytes, time to first
/// byte, total time).
async fn download(
    exit: &crate::exits::Exit,
    url: &str,
) -> Result<(u64, Duration, Duration), String> {
    let u = crate::net::http::parse_url(url).map_err(|e| e.to_string())?;
    let addr = exit
        .resolve(u.host, u.port)
        .await
        .map_err(|e| format!("resolving {}: {e}", u.host))?
        .into_iter()
        .next()
        .ok_or_else(|| format!("{} has no address", u.host))?;
    let started = Instant::now();
    let mut s = exit
        .connect(addr, Duration::from_secs(10))
        .await
        .map_err(|e| format!("connecting to {addr}: {e}"))?;
    let req = format!(
        "GET {} HTTP/1.1\r\nHost: {}\r\nConnection: close\r\nUser-Agent: cellgate-agent\r\n\r\n",
        u.target, u.authority
    );
    s.write_all(req.as_bytes())
        .await
        .map_err(|e| e.to_string())?;
    let mut buf = vec![0u8; 64 * 1024];
    let mut head = Vec::new();
    let mut in_head = true;
    let mut body = 0u64;
    let mut first_byte = None;
    loop {
        let n = s.read(&mut buf).await.map_err(|e| e.to_string())?;
        if n == 0 {
            break;
        }
        first_byte.get_or_insert_with(|| started.elapsed());
        if !in_head {
            body += n as u64;
            continue;
        }
        head.extend_from_slice(&buf[..n]);
        if let Some(end) = head.windows(4).position(|w| w == b"\r\n\r\n") {
            let status_line = head.split(|b| *b == b'\r').next().unwrap_or_default();
            let status = String::from_utf8_lossy(status_line).into_owned();
            if status.split(' ').nth(1) != Some("200") {
                return Err(format!("the server answered {status:?}"));
            }
            body = (head.len() - end - 4) as u64;
            in_head = false;
        } else if head.len() > 16 * 1024 {
            return Err("oversized response head".into());
        }
    }
    if in_head {
        return Err("the connection closed before a response".into());
    }
    Ok((body, first_byte.unwrap_or_default(), started.elapsed()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn executor(dir: &Path) -> Executor {
        let exits = Arc::new(Exits::from_config(&[]).unwrap());
        Executor::new(exits, dir, None, Vec::new(), None)
    }

    #[test]
    fn an_id_runs_once_even_across_restarts() {
        let dir = std::env::temp_dir().join(format!("cg-seen-{}", rand::random::<u64>()));
        std::fs::create_dir_all(&dir).unwrap();
        let x = executor(&dir);
        assert!(matches!(x.claim("a", true), Claim::Run));
        assert!(matches!(x.claim("a", true), Claim::Done(None)));
        assert!(matches!(x.claim("read", false), Claim::Run));
        assert!(matches!(x.claim("read", false), Claim::Done(None)));
        let again = executor(&dir);
        assert!(matches!(again.claim("a", true), Claim::Done(None)));
        assert!(matches!(again.claim("read", true), Claim::Run));
        assert!(matches!(again.claim("b", true), Claim::Run));
        for i in 0..REMEMBERED + 10 {
            let _ = again.claim(&format!("id-{i}"), true);
        }
        let text = std::fs::read_to_string(dir.join(SEEN_FILE)).unwrap();
        assert_eq!(text.lines().count(), REMEMBERED);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn rotate_methods_map_to_ladder_steps() {
        let exits = Exits::from_config(&[]).unwrap();
        // The implicit exit cannot rotate.
        let e = kind_of(
            Action::Rotate {
                exit: None,
                method: None,
            },
            &exits,
        )
        .unwrap_err();
        assert!(e.contains("cannot rotate"), "{e}");
        let e = kind_of(
            Action::Rotate {
                exit: Some("nope".into()),
                method: None,
            },
            &exits,
        )
        .unwrap_err();
        assert!(e.contains("no exit"), "{e}");
    }
}
