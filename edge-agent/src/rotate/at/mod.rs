//! `at` rotation backend: a serial modem driven by AT commands.
//!
//! Concepts:
//! - **AT port**: the modem's serial command interface (`/dev/ttyUSB2`,
//!   better its `/dev/serial/by-id/…` name). Opened for each operation and
//!   closed after it, because a module reset makes it vanish and come back.
//! - **profile**: the commands of one modem family as data: how to
//!   recognise it, its ladder, its telemetry commands ([`profile`]). Shipped
//!   profiles are compiled in; a custom one can be a file.
//! - **rung**: one way to get a new address, softest first: `pdp` (PDP
//!   context off/on), `radio` (`AT+CFUN=0`/`1`), `reset` (module reset,
//!   USB re-enumeration).
//! - **attach**: after a rung, the modem is registered (`+CEREG`/`+CREG`
//!   stat 1 or 5) and its PDP context has an address again.
//! - **URC**: an unsolicited result code; it can arrive in the middle of a
//!   response and is kept apart from it ([`codec`]).
//!
//! Layers: [`codec`] (pure bytes → lines → responses), [`telemetry`] (pure
//! answer parsers), [`client`] (async, one command at a time, deadlines),
//! [`port`] (opening the serial device), and [`AtBackend`] here (rungs,
//! attach wait, telemetry). Nothing blocks: every wait has a deadline.

use std::path::PathBuf;
use std::time::Duration;

use serde::Deserialize;
use shared::wire::Telemetry;
use tokio::time::{Instant, sleep, sleep_until, timeout_at};
use tracing::Instrument;

use super::RotateError;

pub mod client;
pub mod codec;
pub mod port;
pub mod profile;
pub mod telemetry;

use client::{AtClient, AtError};
use port::{PortSource, SerialPath, Transport};
use profile::{Profile, Rung, Step, render};

/// `[exit.rotation]` with `backend = "at"`.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AtConfig {
    /// The AT port. A `/dev/serial/by-id/…` name survives re-enumeration
    /// (after a module reset `ttyUSB2` may come back as `ttyUSB5`).
    pub port: PathBuf,
    /// A shipped profile name (`quectel-ec25`, `simcom-sim7600`,
    /// `huawei-stick`, `generic-3gpp`) or a path to a profile file.
    #[serde(default = "default_profile")]
    pub profile: String,
    /// Irrelevant for USB modems (the line is virtual) but needed for
    /// modems on a real UART.
    #[serde(default = "default_baud")]
    pub baud: u32,
    /// The PDP context the data connection uses.
    #[serde(default = "default_cid")]
    pub cid: u8,
    /// Default per-command timeout; a profile can set its own per command.
    #[serde(default = "default_command_timeout_ms")]
    pub command_timeout_ms: u64,
    /// How long to wait after a rung for registration and a PDP address.
    #[serde(default = "default_attach_timeout_secs")]
    pub attach_timeout_secs: u64,
}

pub fn default_profile() -> String {
    "generic-3gpp".into()
}
pub fn default_baud() -> u32 {
    115_200
}
pub fn default_cid() -> u8 {
    1
}
pub fn default_command_timeout_ms() -> u64 {
    5_000
}
pub fn default_attach_timeout_secs() -> u64 {
    45
}

impl Default for AtConfig {
    /// Everything at its default except `port`, which has none: a default
    /// config does not validate.
    fn default() -> Self {
        AtConfig {
            port: PathBuf::new(),
            profile: default_profile(),
            baud: default_baud(),
            cid: default_cid(),
            command_timeout_ms: default_command_timeout_ms(),
            attach_timeout_secs: default_attach_timeout_secs(),
        }
    }
}

impl AtConfig {
    pub fn validate(&self) -> Result<(), String> {
        if self.port.as_os_str().is_empty() {
            return Err("at rotation: port is required, e.g. port = \
                 \"/dev/serial/by-id/usb-Quectel_EG25-G-if02-port0\""
                .into());
        }
        if !self.port.is_absolute() {
            return Err(format!(
                "at rotation: port {:?} must be an absolute device path",
                self.port
            ));
        }
        if !(300..=4_000_000).contains(&self.baud) {
            return Err(format!(
                "at rotation: baud {} is outside 300..=4000000",
                self.baud
            ));
        }
        if !(1..=32).contains(&self.cid) {
            return Err(format!("at rotation: cid {} is outside 1..=32", self.cid));
        }
        if !(100..=120_000).contains(&self.command_timeout_ms) {
            return Err(format!(
                "at rotation: command_timeout_ms {} is outside 100..=120000",
                self.command_timeout_ms
            ));
        }
        if !(1..=600).contains(&self.attach_timeout_secs) {
            return Err(format!(
                "at rotation: attach_timeout_secs {} is outside 1..=600",
                self.attach_timeout_secs
            ));
        }
        Ok(())
    }
}

/// How long the backend waits for what. One set for devices; tests use
/// shorter ones (the crate does not pause Tokio's clock).
#[derive(Clone, Copy, Debug)]
struct Timing {
    /// Pause between attach polls and between attempts to reach the port.
    poll_interval: Duration,
    /// `AT` on a freshly opened port.
    probe_timeout: Duration,
    /// Each `init` command and the identification query.
    init_timeout: Duration,
    /// Each query while waiting for attach.
    poll_command_timeout: Duration,
    /// The whole telemetry read, and each of its commands by default.
    telemetry_budget: Duration,
    telemetry_command_timeout: Duration,
    /// After a resetting command, how long the port may take to go away,
    /// and how often to look.
    gone_wait: Duration,
    gone_poll: Duration,
}

const DEVICE_TIMING: Timing = Timing {
    poll_interval: Duration::from_millis(500),
    probe_timeout: Duration::from_secs(1),
    init_timeout: Duration::from_secs(1),
    poll_command_timeout: Duration::from_secs(2),
    telemetry_budget: Duration::from_secs(3),
    telemetry_command_timeout: Duration::from_secs(1),
    gone_wait: Duration::from_secs(20),
    gone_poll: Duration::from_millis(200),
};

type Link = AtClient<Box<dyn Transport>>;

pub struct AtBackend {
    port: Box<dyn PortSource>,
    profile: Profile,
    cid: u8,
    command_timeout: Duration,
    attach_timeout: Duration,
    interface: Option<String>,
    /// Where network interfaces appear (`/sys/class/net`).
    net_root: PathBuf,
    /// The modem's identification was read and checked against the
    /// profile.
    identified: bool,
    timing: Timing,
}

impl AtBackend {
    pub fn new(cfg: &AtConfig, interface: Option<&str>) -> Result<Self, String> {
        let source = SerialPath {
            path: cfg.port.clone(),
            baud: cfg.baud,
        };
        Self::with_source(
            cfg,
            interface,
            Box::new(source),
            PathBuf::from("/sys/class/net"),
        )
    }

    /// [`AtBackend::new`] with the port and the interface directory
    /// supplied (tests use an in-memory modem and a scratch directory).
    pub fn with_source(
        cfg: &AtConfig,
        interface: Option<&str>,
        port: Box<dyn PortSource>,
        net_root: PathBuf,
    ) -> Result<Self, String> {
        cfg.validate()?;
        let profile = Profile::load(&cfg.profile).map_err(|e| format!("at rotation: {e}"))?;
        if let Some(iface) = interface
            && (iface.is_empty() || iface.contains('/') || iface.len() > 15)
        {
            return Err(format!(
                "at rotation: {iface:?} is not a network interface name"
            ));
        }
        Ok(AtBackend {
            port,
            profile,
            cid: cfg.cid,
            command_timeout: Duration::from_millis(cfg.command_timeout_ms),
            attach_timeout: Duration::from_secs(cfg.attach_timeout_secs),
            interface: interface.map(str::to_string),
            net_root,
            identified: false,
            timing: DEVICE_TIMING,
        })
    }

    pub fn profile(&self) -> &Profile {
        &self.profile
    }

    pub fn ladder(&self) -> Vec<String> {
        self.profile.rung_names()
    }

    pub async fn step(&mut self, rung: usize, deadline: Instant) -> Result<(), RotateError> {
        let names = self.ladder();
        let refs: Vec<&str> = names.iter().map(String::as_str).collect();
        let name = super::rung_name(&refs, rung)?.to_string();
        let rung = self.profile.rungs[rung].clone();
        let span = tracing::info_span!("at_rung", port = %self.port.describe(), rung = %name);
        async move {
            let started = Instant::now();
            let link = self.connect(deadline).await?;
            let link = self.run_steps(link, &rung, deadline).await?;
            let link = if rung.reenumerates {
                drop(link);
                Some(self.await_reenumeration(&rung, deadline).await?)
            } else {
                link
            };
            self.await_attach(link, deadline).await?;
            tracing::info!(
                took_ms = started.elapsed().as_millis() as u64,
                "rung done: registered with a PDP address"
            );
            Ok(())
        }
        .instrument(span)
        .await
    }

    pub async fn telemetry(&mut self) -> Telemetry {
        let mut t = Telemetry::default();
        let budget = Instant::now() + self.timing.telemetry_budget;
        let span = tracing::debug_span!("at_telemetry", port = %self.port.describe());
        // The inner reads respect the budget; the outer bound is a backstop.
        let _ = timeout_at(budget, self.read_telemetry(&mut t, budget).instrument(span)).await;
        t
    }

    async fn read_telemetry(&mut self, t: &mut Telemetry, budget: Instant) {
        let mut link = match self.connect_once(budget).await {
            Ok(l) => l,
            Err(e) => {
                tracing::debug!("no telemetry: {e}");
                return;
            }
        };
        for tc in &self.profile.telemetry {
            let limit = tc
                .timeout
                .unwrap_or(self.timing.telemetry_command_timeout)
                .min(remaining(budget));
            if limit.is_zero() {
                break;
            }
            let command = render(&tc.command, self.cid);
            match link.command(&command, limit).await {
                Ok(r) if r.result.is_ok() => {
                    telemetry::apply(t, tc.parser, &r.lines, tc.sinr_scale)
                }
                Ok(r) => tracing::debug!(%command, result = %r.result, "telemetry query refused"),
                Err(AtError::Timeout { .. }) => {
                    tracing::debug!(%command, "telemetry query unanswered")
                }
                Err(e) => {
                    tracing::debug!(%command, "telemetry stopped: {e}");
                    return;
                }
            }
        }
    }

    /// Open the port, check that the modem answers, run the profile's
    /// `init`. One attempt.
    async fn connect_once(&mut self, deadline: Instant) -> Result<Link, String> {
        let port = self.port.describe();
        if !self.port.present() {
            return Err(format!("{port} does not exist"));
        }
        let io = self
            .port
            .open()
            .map_err(|e| format!("cannot open {port}: {e}"))?;
        let mut link = AtClient::new(io);
        let limit = self.timing.probe_timeout.min(remaining(deadline));
        match link.command("AT", limit).await {
            Ok(r) if r.result.is_ok() => {}
            Ok(r) => return Err(format!("{port} answered {} to AT", r.result)),
            Err(e) => return Err(format!("{port}: {e}")),
        }
        for command in &self.profile.init {
            let command = render(command, self.cid);
            let limit = self.timing.init_timeout.min(remaining(deadline));
            match link.command(&command, limit).await {
                Ok(r) if !r.result.is_ok() => {
                    tracing::debug!(%command, result = %r.result, "init command refused")
                }
                Ok(_) => {}
                Err(AtError::Timeout { .. }) => {
                    tracing::debug!(%command, "init command unanswered")
                }
                Err(e) => return Err(format!("{port}: {e}")),
            }
        }
        if !self.identified {
            self.identify(&mut link, deadline).await;
        }
        Ok(link)
    }

    /// Read the modem's identification once and warn when the configured
    /// profile is not written for it.
    async fn identify(&mut self, link: &mut Link, deadline: Instant) {
        let limit = self.timing.init_timeout.min(remaining(deadline));
        let Ok(r) = link.command("ATI", limit).await else {
            return;
        };
        self.identified = true;
        if !r.result.is_ok() {
            return;
        }
        let ident = r.lines.join(" ");
        if self.profile.matches(&ident) {
            tracing::info!(modem = %ident, profile = %self.profile.name, "modem identified");
        } else {
            let hint = profile::identify(&ident)
                .map(|p| format!("; profile = \"{p}\" is written for it"))
                .unwrap_or_default();
            tracing::warn!(
                modem = %ident,
                profile = %self.profile.name,
                "the modem is not one the configured profile is written for{hint}"
            );
        }
    }

    /// Wait until the port exists and answers, or `deadline`.
    async fn connect(&mut self, deadline: Instant) -> Result<Link, RotateError> {
        loop {
            let last = match self.connect_once(deadline).await {
                Ok(link) => return Ok(link),
                Err(e) => e,
            };
            let next = Instant::now() + self.timing.poll_interval;
            if next >= deadline {
                return Err(RotateError::Timeout(format!(
                    "modem not reachable before the deadline: {last}"
                )));
            }
            sleep_until(next).await;
        }
    }

    /// Send the rung's commands. Returns the link, or `None` once a
    /// resetting command has been sent (the port is going away).
    async fn run_steps(
        &self,
        mut link: Link,
        rung: &Rung,
        deadline: Instant,
    ) -> Result<Option<Link>, RotateError> {
        for step in &rung.steps {
            let (command, timeout, disconnects) = match step {
                Step::Pause(d) => {
                    sleep_until((Instant::now() + *d).min(deadline)).await;
                    continue;
                }
                Step::Send {
                    command,
                    timeout,
                    disconnects,
                } => (
                    render(command, self.cid),
                    timeout.unwrap_or(self.command_timeout),
                    *disconnects,
                ),
            };
            let limit = timeout.min(remaining(deadline));
            if limit.is_zero() {
                return Err(RotateError::Timeout(format!(
                    "the deadline passed before {command} was sent"
                )));
            }
            let outcome = link.command(&command, limit).await;
            for urc in link.take_urcs() {
                tracing::debug!(%urc, "unsolicited during the rung");
            }
            match outcome {
                Ok(r) if r.result.is_ok() => {
                    tracing::info!(%command, "OK");
                    if disconnects {
                        return Ok(None);
                    }
                }
                Ok(r) => {
                    return Err(RotateError::Failed(format!(
                        "modem answered {} to {command}",
                        r.result
                    )));
                }
                Err(e @ (AtError::Timeout { .. } | AtError::Closed | AtError::Io(_)))
                    if disconnects =>
                {
                    tracing::info!(%command, "no answer ({e}); the module is resetting");
                    return Ok(None);
                }
                Err(AtError::Timeout { .. }) if limit < timeout => {
                    return Err(RotateError::Timeout(format!(
                        "no answer to {command} before the deadline"
                    )));
                }
                Err(e @ AtError::Timeout { .. }) => {
                    return Err(RotateError::Timeout(e.to_string()));
                }
                Err(e) => {
                    return Err(RotateError::Failed(format!(
                        "lost the modem on {} while sending {command}: {e}",
                        self.port.describe()
                    )));
                }
            }
        }
        Ok(Some(link))
    }

    /// After a module reset: wait for the port to go away, come back and
    /// answer, and for the network interface to exist again.
    async fn await_reenumeration(
        &mut self,
        rung: &Rung,
        deadline: Instant,
    ) -> Result<Link, RotateError> {
        let gone_by = (Instant::now() + self.timing.gone_wait).min(deadline);
        let mut went = false;
        while Instant::now() < gone_by {
            if !self.port.present() {
                went = true;
                break;
            }
            sleep(self.timing.gone_poll).await;
        }
        if went {
            tracing::info!("port gone; waiting for the module to come back");
        } else {
            tracing::warn!(
                rung = %rung.name,
                "the port never went away; the module may not have reset"
            );
        }
        // Settings made by `init` did not survive the reset.
        let link = self.connect(deadline).await?;
        if let Some(iface) = &self.interface {
            let path = self.net_root.join(iface);
            while !path.exists() {
                let next = Instant::now() + self.timing.poll_interval;
                if next >= deadline {
                    return Err(RotateError::Timeout(format!(
                        "network interface {iface} did not come back after the module reset"
                    )));
                }
                sleep_until(next).await;
            }
        }
        Ok(link)
    }

    /// Poll until registered with a PDP address, within the attach timeout
    /// and `deadline`.
    async fn await_attach(
        &mut self,
        mut link: Option<Link>,
        deadline: Instant,
    ) -> Result<(), RotateError> {
        let own_limit = Instant::now() + self.attach_timeout;
        let until = own_limit.min(deadline);
        let mut seen = AttachSeen::default();
        loop {
            if link.is_none() {
                match self.connect_once(until).await {
                    Ok(l) => link = Some(l),
                    Err(e) => seen.problem = Some(e),
                }
            }
            if let Some(l) = link.as_mut() {
                match poll_attach(
                    l,
                    self.cid,
                    self.timing.poll_command_timeout,
                    until,
                    &mut seen,
                )
                .await
                {
                    Poll::Attached => return Ok(()),
                    Poll::NotYet => {}
                    Poll::PortLost => link = None,
                }
            }
            let next = Instant::now() + self.timing.poll_interval;
            if next >= until {
                break;
            }
            sleep_until(next).await;
        }
        let window = if own_limit <= deadline {
            format!("within {} s", self.attach_timeout.as_secs())
        } else {
            "before the deadline".to_string()
        };
        Err(RotateError::Timeout(format!(
            "modem not attached {window}: {}",
            seen.describe(self.cid)
        )))
    }
}

fn remaining(deadline: Instant) -> Duration {
    deadline.saturating_duration_since(Instant::now())
}

/// What the attach wait saw last, for the timeout message.
#[derive(Default)]
struct AttachSeen {
    /// (query, stat) of the last registration answer.
    registration: Option<(&'static str, u8)>,
    /// The context had no address at the last look.
    no_address: bool,
    problem: Option<String>,
}

impl AttachSeen {
    fn describe(&self, cid: u8) -> String {
        let mut parts = Vec::new();
        match self.registration {
            Some((query, stat)) => parts.push(format!(
                "registration {} ({query} stat {stat})",
                telemetry::registration_from_stat(stat).as_str()
            )),
            None => parts.push("registration state never read".to_string()),
        }
        if self.no_address {
            parts.push(format!("PDP context {cid} has no address"));
        }
        if let Some(p) = &self.problem {
            parts.push(format!("last problem: {p}"));
        }
        parts.join("; ")
    }
}

enum Poll {
    Attached,
    NotYet,
    PortLost,
}

/// One look at registration and the PDP context.
async fn poll_attach(
    link: &mut Link,
    cid: u8,
    per_command: Duration,
    until: Instant,
    seen: &mut AttachSeen,
) -> Poll {
    /// Issue one query; `None` when it did not produce an `OK` answer.
    async fn ask(
        link: &mut Link,
        command: &str,
        per_command: Duration,
        until: Instant,
        seen: &mut AttachSeen,
    ) -> Result<Option<Vec<String>>, ()> {
        let limit = per_command.min(remaining(until));
        if limit.is_zero() {
            return Ok(None);
        }
        match link.command(command, limit).await {
            Ok(r) if r.result.is_ok() => Ok(Some(r.lines)),
            Ok(r) => {
                seen.problem = Some(format!("{command} answered {}", r.result));
                Ok(None)
            }
            Err(e @ AtError::Timeout { .. }) => {
                seen.problem = Some(e.to_string());
                Ok(None)
            }
            Err(e) => {
                seen.problem = Some(e.to_string());
                Err(())
            }
        }
    }

    seen.no_address = false;
    let mut registered = false;
    for query in ["AT+CEREG?", "AT+CREG?"] {
        match ask(link, query, per_command, until, seen).await {
            Err(()) => return Poll::PortLost,
            Ok(None) => {}
            Ok(Some(lines)) => {
                if let Some(stat) = lines
                    .iter()
                    .find_map(|l| telemetry::parse_registration_query(l))
                {
                    seen.registration = Some((query, stat));
                    if telemetry::stat_is_registered(stat) {
                        registered = true;
                        break;
                    }
                }
            }
        }
    }
    if !registered {
        return Poll::NotYet;
    }
    match ask(link, &format!("AT+CGPADDR={cid}"), per_command, until, seen).await {
        Err(()) => return Poll::PortLost,
        Ok(None) => {}
        Ok(Some(lines)) => {
            let has_address = lines
                .iter()
                .filter_map(|l| telemetry::parse_cgpaddr(l))
                .any(|(c, addrs)| c == cid && !addrs.is_empty());
            if has_address {
                return Poll::Attached;
            }
            seen.no_address = true;
        }
    }
    match ask(link, "AT+CGACT?", per_command, until, seen).await {
        Err(()) => Poll::PortLost,
        Ok(Some(lines))
            if lines
                .iter()
                .filter_map(|l| telemetry::parse_cgact(l))
                .any(|(c, active)| c == cid && active) =>
        {
            Poll::Attached
        }
        Ok(_) => Poll::NotYet,
    }
}

#[cfg(test)]
mod tests;
