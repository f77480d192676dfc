//! The simulated modem without I/O and without a clock: bytes and `now` go
//! in, output chunks, port changes and link calls come out (collected in
//! [`Fx`], taken by the driver after every event).
//!
//! Two halves:
//! - the **dialogue**: line assembly, echo, fault decisions, final result
//!   codes, commands queued while one is still running;
//! - the **network**: radio phase (off, searching, attaching, registered,
//!   resetting), the PDP context, and the link calls that make the carrier
//!   hand out a (new or same) address.
//!
//! A command whose answer depends on the network (`AT+CGACT=1,1`,
//! `AT+CFUN=0`) parks in [`Busy::Waiting`] until its link call returns, as a
//! real module answers only once the context is up or down.

use std::collections::VecDeque;
use std::net::Ipv4Addr;
use std::time::{Duration, Instant};

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use super::command::{self, Line, LineBuf};
use super::dialect::{self, Profile};
use super::{Fault, SameIp, SimOptions, SimStats};

/// Lines typed while a command runs wait here; more are dropped.
pub(super) const MAX_QUEUED: usize = 16;
/// Commands kept for [`Machine::commands`]; older ones are dropped.
const MAX_LOG: usize = 10_000;
/// Pause between the `\r` and the `\n` under [`Fault::SplitCrLf`], long
/// enough for a reader to see two reads.
pub(super) const SPLIT_GAP: Duration = Duration::from_millis(20);

/// Something for the driver to do, in order.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum Out {
    /// Write `data` once `gap` has passed since the previous write.
    Bytes { data: Vec<u8>, gap: Duration },
    /// The module resets: the USB port disappears.
    PortDown,
    /// The module booted: a new port appears.
    PortUp,
}

/// A call on the [`super::ModemLink`], answered by [`Machine::link_done`]
/// with the same token.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum LinkCall {
    Down,
    Up { new_ip: bool },
}

/// Effects collected since the driver last looked.
#[derive(Debug, Default)]
pub(super) struct Fx {
    pub out: Vec<Out>,
    pub link: Vec<(u64, LinkCall)>,
}

/// Radio and registration.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Phase {
    /// `AT+CFUN=0` or `=4`: no radio, not registered.
    Off {
        fun: u8,
    },
    /// Radio on, looking for the network until `until`. `boot` marks the
    /// attach after a module reset (its same-IP rule differs).
    Searching {
        until: Instant,
        boot: bool,
    },
    /// Attach accepted; the default bearer comes up when link call `token`
    /// returns.
    Attaching {
        token: u64,
    },
    Registered {
        pdp: Pdp,
    },
    /// Module reset: the port vanishes at `drop_at` (`None` once gone) and
    /// a new one appears at `until`.
    Resetting {
        drop_at: Option<Instant>,
        until: Instant,
    },
}

/// The PDP context (cid 1) while registered.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Pdp {
    Active,
    Inactive,
    /// `AT+CGACT=1,1` accepted; the network answers at `until`.
    Activating {
        until: Instant,
    },
    /// The network answered; up once link call `token` returns.
    Linking {
        token: u64,
    },
}

/// A final result code.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Final {
    Ok,
    Error,
    Cme(u16),
}

/// What a command's answer waits for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Wait {
    Link(u64),
    Attach,
    Pdp,
}

/// What one command did.
pub(super) enum Step {
    Info(Vec<String>),
    Fail(Final),
    Wait(Wait),
    Reset,
}

/// Output shaping from [`Fault::SlowBytes`] and [`Fault::SplitCrLf`].
#[derive(Clone, Copy, Debug, Default)]
pub(super) struct Shaping {
    slow: Option<Duration>,
    split: bool,
}

/// An answer not sent yet, with its decorations.
#[derive(Debug)]
struct Pending {
    info: Vec<String>,
    fin: Final,
    urcs: Vec<String>,
    garbage: Vec<u8>,
    shaping: Shaping,
    not_before: Instant,
}

#[derive(Debug)]
enum Busy {
    Waiting { on: Wait, answer: Pending },
    Until { at: Instant, answer: Pending },
}

/// How a command-line's faults resolved.
#[derive(Default)]
struct Applied {
    decisive: Option<Decisive>,
    delay: Option<Duration>,
    urcs: Vec<String>,
    garbage: Vec<u8>,
    shaping: Shaping,
}

#[derive(Clone, Copy)]
enum Decisive {
    NoReply,
    Error,
    Cme(u16),
}

#[derive(Clone, Copy)]
enum Rotation {
    Pdp,
    Radio,
}

pub(super) struct Machine {
    pub(super) opts: SimOptions,
    pub(super) profile: Profile,
    faults: Vec<Fault>,
    /// For [`Fault::RandomUrcs`] timing and choice.
    rng: StdRng,
    /// For [`SameIp::Probability`], apart so its sequence does not depend on
    /// URC timing.
    same_ip_rng: StdRng,

    // Dialogue settings (reset by ATZ, AT&F and a module reset).
    pub(super) echo: bool,
    pub(super) cmee: u8,
    /// `AT+CREG=n`, `AT+CGREG=n`, `AT+CEREG=n`.
    pub(super) reg_urc: [u8; 3],
    pub(super) sregs: [u32; 16],
    /// The registration stat last reported by URC.
    last_stat: u8,

    input: LineBuf,
    queued: VecDeque<Line>,
    busy: Option<Busy>,

    pub(super) phase: Phase,
    /// The last link call issued was `Up`.
    link_up: bool,
    next_token: u64,
    /// Up calls in flight and whether they asked for a new address.
    ups: Vec<(u64, bool)>,
    random_urc_at: Option<Instant>,

    pub(super) ip_index: u32,
    pdp_cycles: u32,
    radio_cycles: u32,
    resets: u32,
    log: VecDeque<String>,
    fx: Fx,
}

impl Machine {
    /// A registered modem with an active context, as the link is at start.
    pub fn new(opts: SimOptions, profile: Profile, seed: u64, now: Instant) -> Self {
        let same_ip_seed = match opts.same_ip {
            SameIp::Probability { seed: own, .. } => own,
            _ => seed,
        };
        let faults = opts.faults.clone();
        let mut m = Machine {
            opts,
            profile,
            faults: Vec::new(),
            rng: StdRng::seed_from_u64(seed),
            same_ip_rng: StdRng::seed_from_u64(same_ip_seed),
            echo: true,
            cmee: 1,
            reg_urc: [0; 3],
            sregs: dialect::default_sregs(),
            last_stat: 1,
            input: LineBuf::default(),
            queued: VecDeque::new(),
            busy: None,
            phase: Phase::Registered { pdp: Pdp::Active },
            link_up: true,
            next_token: 1,
            ups: Vec::new(),
            random_urc_at: None,
            ip_index: 0,
            pdp_cycles: 0,
            radio_cycles: 0,
            resets: 0,
            log: VecDeque::new(),
            fx: Fx::default(),
        };
        m.set_faults(faults, now);
        m
    }

    pub fn take_fx(&mut self) -> Fx {
        std::mem::take(&mut self.fx)
    }

    pub fn commands(&self) -> Vec<String> {
        self.log.iter().cloned().collect()
    }

    pub fn stats(&self) -> SimStats {
        SimStats {
            pdp_cycles: self.pdp_cycles,
            radio_cycles: self.radio_cycles,
            resets: self.resets,
            ip_index: self.ip_index,
            radio_on: !matches!(self.phase, Phase::Off { .. } | Phase::Resetting { .. }),
            attached: matches!(self.phase, Phase::Registered { .. }),
            pdp_active: self.pdp_active(),
            port_present: self.port_up(),
            echo: self.echo,
        }
    }

    pub fn set_faults(&mut self, faults: Vec<Fault>, now: Instant) {
        self.faults = faults;
        self.schedule_random_urc(now);
    }

    pub fn faults(&self) -> Vec<Fault> {
        self.faults.clone()
    }

    /// When [`Machine::tick`] next has something to do.
    pub fn next_deadline(&self) -> Option<Instant> {
        let phase = match self.phase {
            Phase::Resetting {
                drop_at: Some(at), ..
            } => Some(at),
            Phase::Searching { until, .. } | Phase::Resetting { until, .. } => Some(until),
            Phase::Registered {
                pdp: Pdp::Activating { until },
            } => Some(until),
            _ => None,
        };
        let busy = match &self.busy {
            Some(Busy::Until { at, .. }) => Some(*at),
            _ => None,
        };
        [phase, busy, self.random_urc_at]
            .into_iter()
            .flatten()
            .min()
    }

    /// Bytes from the host.
    pub fn input(&mut self, bytes: &[u8], now: Instant) {
        for &b in bytes {
            if !self.port_up() {
                return;
            }
            let Some(line) = self.input.push(b) else {
                continue;
            };
            if self.busy.is_some() || !self.queued.is_empty() {
                if self.queued.len() < MAX_QUEUED {
                    self.queued.push_back(line);
                }
            } else {
                self.process_line(line, now);
            }
        }
    }

    /// Fire every timer due at `now`.
    pub fn tick(&mut self, now: Instant) {
        loop {
            let mut progressed = false;
            match self.phase {
                Phase::Resetting {
                    drop_at: Some(at),
                    until,
                } if at <= now => {
                    self.fx.out.push(Out::PortDown);
                    self.phase = Phase::Resetting {
                        drop_at: None,
                        until,
                    };
                    progressed = true;
                }
                Phase::Resetting {
                    drop_at: None,
                    until,
                } if until <= now => {
                    self.boot(now);
                    progressed = true;
                }
                Phase::Searching { until, boot } if until <= now => {
                    let keep = if boot {
                        self.opts.reset_keeps_ip
                    } else {
                        self.radio_cycles += 1;
                        self.keeps_ip(Rotation::Radio)
                    };
                    let token = self.link(LinkCall::Up { new_ip: !keep });
                    self.phase = Phase::Attaching { token };
                    progressed = true;
                }
                Phase::Registered {
                    pdp: Pdp::Activating { until },
                } if until <= now => {
                    self.pdp_cycles += 1;
                    let keep = self.keeps_ip(Rotation::Pdp);
                    let token = self.link(LinkCall::Up { new_ip: !keep });
                    self.phase = Phase::Registered {
                        pdp: Pdp::Linking { token },
                    };
                    progressed = true;
                }
                _ => {}
            }
            if matches!(&self.busy, Some(Busy::Until { at, .. }) if *at <= now) {
                if let Some(Busy::Until { answer, .. }) = self.busy.take() {
                    self.send_answer(answer);
                }
                progressed = true;
            }
            if self.random_urc_at.is_some_and(|at| at <= now) {
                self.fire_random_urc();
                self.schedule_random_urc(now);
                progressed = true;
            }
            if !progressed {
                break;
            }
        }
        self.drain(now);
    }

    /// Link call `token` returned.
    pub fn link_done(&mut self, token: u64, now: Instant) {
        if let Some(pos) = self.ups.iter().position(|(t, _)| *t == token) {
            let (_, new_ip) = self.ups.remove(pos);
            if new_ip {
                self.ip_index += 1;
            }
        }
        match self.phase {
            Phase::Attaching { token: t } if t == token => {
                self.phase = Phase::Registered { pdp: Pdp::Active };
                self.reg_changed();
                self.complete(|w| matches!(w, Wait::Attach | Wait::Pdp), now);
            }
            Phase::Registered {
                pdp: Pdp::Linking { token: t },
            } if t == token => {
                self.phase = Phase::Registered { pdp: Pdp::Active };
                self.complete(|w| w == Wait::Pdp, now);
            }
            _ => {}
        }
        self.complete(|w| w == Wait::Link(token), now);
        self.drain(now);
    }

    /// An unsolicited result code now (from the test, or the simulation).
    pub fn urc(&mut self, text: &str) {
        let sh = self.idle_shaping();
        self.emit(format!("\r\n{text}\r\n").into_bytes(), sh);
    }

    pub(super) fn port_up(&self) -> bool {
        !matches!(self.phase, Phase::Resetting { .. })
    }

    pub(super) fn pdp_active(&self) -> bool {
        self.phase == Phase::Registered { pdp: Pdp::Active }
    }

    /// `+CEREG` stat: 1 registered, 2 searching, 0 not searching.
    pub(super) fn reg_stat(&self) -> u8 {
        match self.phase {
            Phase::Registered { .. } => 1,
            Phase::Searching { .. } | Phase::Attaching { .. } => 2,
            Phase::Off { .. } | Phase::Resetting { .. } => 0,
        }
    }

    /// The carrier-side address of the context: changes exactly when the
    /// carrier hands out a new public address.
    pub(super) fn private_ip(&self) -> Ipv4Addr {
        let i = self.ip_index;
        Ipv4Addr::new(
            10,
            64 + ((i / 62_500) % 64) as u8,
            ((i / 250) % 250) as u8,
            (i % 250) as u8 + 2,
        )
    }

    /// Settings a module reset or `ATZ` restores.
    pub(super) fn default_settings(&mut self) {
        self.echo = true;
        self.cmee = 1;
        self.reg_urc = [0; 3];
        self.sregs = dialect::default_sregs();
    }

    // ---- network ---------------------------------------------------------

    pub(super) fn radio_off(&mut self, fun: u8) -> Step {
        if matches!(self.phase, Phase::Off { .. }) {
            self.phase = Phase::Off { fun };
            return Step::Info(vec![]);
        }
        self.phase = Phase::Off { fun };
        self.reg_changed();
        if self.link_up {
            Step::Wait(Wait::Link(self.link(LinkCall::Down)))
        } else {
            Step::Info(vec![])
        }
    }

    pub(super) fn radio_on(&mut self, now: Instant) -> Step {
        if matches!(self.phase, Phase::Off { .. }) {
            self.phase = Phase::Searching {
                until: now + self.opts.delays.radio,
                boot: false,
            };
            self.reg_changed();
        }
        Step::Info(vec![])
    }

    pub(super) fn pdp_on(&mut self, now: Instant) -> Step {
        let waits = self.opts.cgact_waits;
        let wait = |w| {
            if waits {
                Step::Wait(w)
            } else {
                Step::Info(vec![])
            }
        };
        match self.phase {
            Phase::Off { .. } | Phase::Resetting { .. } => Step::Fail(Final::Cme(30)),
            Phase::Searching { .. } | Phase::Attaching { .. } => wait(Wait::Attach),
            Phase::Registered { pdp } => match pdp {
                Pdp::Active => Step::Info(vec![]),
                Pdp::Inactive => {
                    self.phase = Phase::Registered {
                        pdp: Pdp::Activating {
                            until: now + self.opts.delays.pdp,
                        },
                    };
                    wait(Wait::Pdp)
                }
                Pdp::Activating { .. } | Pdp::Linking { .. } => wait(Wait::Pdp),
            },
        }
    }

    pub(super) fn pdp_off(&mut self) -> Step {
        match self.phase {
            Phase::Registered { pdp } if pdp != Pdp::Inactive => {
                self.phase = Phase::Registered { pdp: Pdp::Inactive };
                if self.link_up {
                    Step::Wait(Wait::Link(self.link(LinkCall::Down)))
                } else {
                    Step::Info(vec![])
                }
            }
            // While attaching the default bearer is not the host's to drop.
            _ => Step::Info(vec![]),
        }
    }

    fn begin_reset(&mut self, now: Instant) {
        self.resets += 1;
        if self.link_up {
            self.link(LinkCall::Down);
        }
        let drop_at = now + self.opts.delays.reset_grace;
        self.phase = Phase::Resetting {
            drop_at: Some(drop_at),
            until: drop_at + self.opts.delays.reset,
        };
        self.input.clear();
        self.queued.clear();
        self.busy = None;
    }

    fn boot(&mut self, now: Instant) {
        self.phase = Phase::Searching {
            until: now + self.opts.delays.radio,
            boot: true,
        };
        self.fx.out.push(Out::PortUp);
        self.default_settings();
        self.last_stat = self.reg_stat();
        if self.opts.boot_urcs {
            for u in self.profile.boot_urcs {
                self.urc(u);
            }
        }
    }

    fn link(&mut self, call: LinkCall) -> u64 {
        let token = self.next_token;
        self.next_token += 1;
        self.link_up = matches!(call, LinkCall::Up { .. });
        if let LinkCall::Up { new_ip } = call {
            self.ups.push((token, new_ip));
        }
        self.fx.link.push((token, call));
        token
    }

    fn keeps_ip(&mut self, r: Rotation) -> bool {
        match &self.opts.same_ip {
            SameIp::Never => false,
            SameIp::Always => true,
            SameIp::FirstN { pdp, radio } => match r {
                Rotation::Pdp => self.pdp_cycles <= *pdp,
                Rotation::Radio => self.radio_cycles <= *radio,
            },
            SameIp::Probability { p, .. } => {
                let p = if p.is_nan() { 0.0 } else { p.clamp(0.0, 1.0) };
                self.same_ip_rng.random_bool(p)
            }
        }
    }

    /// Registration URCs for the hosts that asked (`AT+CEREG=1`/`2`).
    fn reg_changed(&mut self) {
        let stat = self.reg_stat();
        if stat == self.last_stat {
            return;
        }
        self.last_stat = stat;
        for (i, name) in ["+CREG", "+CGREG", "+CEREG"].into_iter().enumerate() {
            let n = self.reg_urc[i];
            if n > 0 {
                let text = dialect::reg_urc(self, name, n);
                self.urc(&text);
            }
        }
    }

    // ---- dialogue --------------------------------------------------------

    fn process_line(&mut self, line: Line, now: Instant) {
        let start = command::at_start(&line.raw);
        let applied = match start {
            Some(s) => {
                let upper = String::from_utf8_lossy(&line.raw[s..]).to_ascii_uppercase();
                self.take_faults(&upper)
            }
            None => Applied {
                shaping: self.idle_shaping(),
                ..Applied::default()
            },
        };
        if self.echo {
            let mut e = line.raw.clone();
            e.push(line.term);
            self.emit(e, applied.shaping);
        }
        // Without the AT prefix a modem ignores the line.
        let Some(start) = start else {
            return;
        };
        let text = String::from_utf8_lossy(&line.raw[start..]).into_owned();
        if self.log.len() >= MAX_LOG {
            self.log.pop_front();
        }
        self.log.push_back(text.clone());

        let mut answer = Pending {
            info: vec![],
            fin: Final::Ok,
            urcs: applied.urcs,
            garbage: applied.garbage,
            shaping: applied.shaping,
            not_before: now + applied.delay.unwrap_or_default(),
        };
        match applied.decisive {
            Some(Decisive::NoReply) => return,
            Some(Decisive::Error) => return self.finish(answer, Final::Error, now),
            Some(Decisive::Cme(c)) => return self.finish(answer, Final::Cme(c), now),
            None => {}
        }
        if line.overflow {
            return self.finish(answer, Final::Error, now);
        }
        // `text` starts with the two ASCII bytes of the prefix.
        let body = text[2..].to_ascii_uppercase();
        let Some(cmds) = command::parse(&body) else {
            return self.finish(answer, Final::Error, now);
        };
        for cmd in &cmds {
            match dialect::exec(self, cmd, now) {
                Step::Info(lines) => answer.info.extend(lines),
                Step::Fail(f) => return self.finish(answer, f, now),
                Step::Wait(on) => {
                    self.busy = Some(Busy::Waiting { on, answer });
                    return;
                }
                Step::Reset => {
                    // The OK goes out before the port does.
                    answer.not_before = now;
                    self.finish(answer, Final::Ok, now);
                    self.begin_reset(now);
                    return;
                }
            }
        }
        self.finish(answer, Final::Ok, now);
    }

    fn finish(&mut self, mut answer: Pending, fin: Final, now: Instant) {
        answer.fin = fin;
        if answer.not_before > now {
            self.busy = Some(Busy::Until {
                at: answer.not_before,
                answer,
            });
        } else {
            self.send_answer(answer);
        }
    }

    /// Finish the parked command if it waits for something `done` accepts.
    fn complete(&mut self, done: impl Fn(Wait) -> bool, now: Instant) {
        if matches!(&self.busy, Some(Busy::Waiting { on, .. }) if done(*on))
            && let Some(Busy::Waiting { answer, .. }) = self.busy.take()
        {
            self.finish(answer, Final::Ok, now);
        }
    }

    fn send_answer(&mut self, a: Pending) {
        let mut bytes = a.garbage;
        for (i, l) in a.info.iter().enumerate() {
            if i == 0 {
                bytes.extend_from_slice(b"\r\n");
            }
            bytes.extend_from_slice(l.as_bytes());
            bytes.extend_from_slice(b"\r\n");
        }
        for u in &a.urcs {
            bytes.extend_from_slice(format!("\r\n{u}\r\n").as_bytes());
        }
        let fin = dialect::final_text(a.fin, self.cmee);
        bytes.extend_from_slice(format!("\r\n{fin}\r\n").as_bytes());
        self.emit(bytes, a.shaping);
    }

    /// Process queued lines while nothing blocks them.
    fn drain(&mut self, now: Instant) {
        while self.busy.is_none() && self.port_up() {
            let Some(line) = self.queued.pop_front() else {
                break;
            };
            self.process_line(line, now);
        }
    }

    fn emit(&mut self, data: Vec<u8>, sh: Shaping) {
        if !self.port_up() || data.is_empty() {
            return;
        }
        if let Some(gap) = sh.slow {
            for b in data {
                self.fx.out.push(Out::Bytes { data: vec![b], gap });
            }
        } else if sh.split {
            let mut start = 0;
            let mut gap = Duration::ZERO;
            let cuts: Vec<usize> = data
                .windows(2)
                .enumerate()
                .filter(|(_, w)| w == b"\r\n")
                .map(|(i, _)| i + 1)
                .collect();
            for cut in cuts {
                self.fx.out.push(Out::Bytes {
                    data: data[start..cut].to_vec(),
                    gap,
                });
                start = cut;
                gap = SPLIT_GAP;
            }
            if start < data.len() {
                self.fx.out.push(Out::Bytes {
                    data: data[start..].to_vec(),
                    gap,
                });
            }
        } else {
            self.fx.out.push(Out::Bytes {
                data,
                gap: Duration::ZERO,
            });
        }
    }

    // ---- faults ----------------------------------------------------------

    /// Resolve the faults for one command line (`upper` starts at `AT`),
    /// counting down the limited ones that applied.
    fn take_faults(&mut self, upper: &str) -> Applied {
        let mut a = Applied::default();
        let mut exhausted = Vec::new();
        for (i, f) in self.faults.iter_mut().enumerate() {
            let (base, counter) = match f {
                Fault::Times(n, inner) => (base_fault(inner), Some(n)),
                other => (base_fault(other), None),
            };
            let hit = |p: &str| upper.contains(&p.to_ascii_uppercase());
            let applied = match base {
                Fault::NoReply(p) | Fault::Error(p) | Fault::CmeError(p, _)
                    if a.decisive.is_none() && hit(p) =>
                {
                    a.decisive = Some(match base {
                        Fault::NoReply(_) => Decisive::NoReply,
                        Fault::CmeError(_, c) => Decisive::Cme(*c),
                        _ => Decisive::Error,
                    });
                    true
                }
                Fault::Delay(p, d) if a.delay.is_none() && hit(p) => {
                    a.delay = Some(*d);
                    true
                }
                Fault::UrcInResponse(p, urc) if hit(p) => {
                    a.urcs.push(urc.clone());
                    true
                }
                Fault::GarbageBefore(p, g) if hit(p) => {
                    a.garbage.extend_from_slice(g);
                    true
                }
                Fault::SlowBytes(d) => {
                    a.shaping.slow = Some(*d);
                    true
                }
                Fault::SplitCrLf => {
                    a.shaping.split = true;
                    true
                }
                _ => false,
            };
            if applied && let Some(n) = counter {
                *n = n.saturating_sub(1);
                if *n == 0 {
                    exhausted.push(i);
                }
            }
        }
        for i in exhausted.into_iter().rev() {
            self.faults.remove(i);
        }
        a
    }

    /// Shaping for output no command asked for (URCs): the unlimited
    /// output faults only.
    fn idle_shaping(&self) -> Shaping {
        let mut sh = Shaping::default();
        for f in &self.faults {
            match f {
                Fault::SlowBytes(d) => sh.slow = Some(*d),
                Fault::SplitCrLf => sh.split = true,
                _ => {}
            }
        }
        sh
    }

    fn random_urcs(&self) -> Option<(Duration, &[String])> {
        self.faults.iter().find_map(|f| match base_fault(f) {
            Fault::RandomUrcs { mean, urcs } if !urcs.is_empty() && !mean.is_zero() => {
                Some((*mean, urcs.as_slice()))
            }
            _ => None,
        })
    }

    fn schedule_random_urc(&mut self, now: Instant) {
        let mean = self.random_urcs().map(|(mean, _)| mean);
        self.random_urc_at = mean.map(|mean| {
            let factor: f64 = self.rng.random_range(0.5..1.5);
            now + mean.mul_f64(factor).max(Duration::from_millis(1))
        });
    }

    fn fire_random_urc(&mut self) {
        let Some((_, urcs)) = self.random_urcs() else {
            return;
        };
        let urcs = urcs.to_vec();
        let pick = self.rng.random_range(0..urcs.len());
        self.urc(&urcs[pick]);
    }
}

/// The fault under any number of [`Fault::Times`] wrappers.
fn base_fault(f: &Fault) -> &Fault {
    match f {
        Fault::Times(_, inner) => base_fault(inner),
        other => other,
    }
}

#[cfg(test)]
mod tests {
    use super::super::Delays;
    use super::*;

    fn opts() -> SimOptions {
        SimOptions {
            delays: Delays {
                pdp: Duration::from_secs(1),
                radio: Duration::from_secs(2),
                reset: Duration::from_secs(4),
                reset_grace: Duration::from_millis(500),
            },
            ..SimOptions::default()
        }
    }

    fn machine(opts: SimOptions, now: Instant) -> Machine {
        let profile = dialect::profile(opts.model, "867698040000001", &opts.plmn);
        Machine::new(opts, profile, 7, now)
    }

    /// All bytes written so far, joined, and the link calls.
    fn drain(m: &mut Machine) -> (String, Vec<(u64, LinkCall)>, Vec<Out>) {
        let fx = m.take_fx();
        let mut text = Vec::new();
        let mut other = Vec::new();
        for o in fx.out {
            match o {
                Out::Bytes { data, .. } => text.extend(data),
                o => other.push(o),
            }
        }
        (String::from_utf8_lossy(&text).into_owned(), fx.link, other)
    }

    #[test]
    fn echo_then_framed_answer() {
        let t0 = Instant::now();
        let mut m = machine(opts(), t0);
        m.input(b"AT+CSQ\r", t0);
        assert_eq!(drain(&mut m).0, "AT+CSQ\r\r\n+CSQ: 23,99\r\n\r\nOK\r\n");
        m.input(b"ATE0\r", t0);
        assert_eq!(drain(&mut m).0, "ATE0\r\r\nOK\r\n");
        m.input(b"AT\r", t0);
        assert_eq!(drain(&mut m).0, "\r\nOK\r\n");
        m.input(b"AT+NOPE\r", t0);
        assert_eq!(drain(&mut m).0, "\r\nERROR\r\n");
        m.input(b"hello\r", t0);
        assert_eq!(drain(&mut m).0, "");
        assert_eq!(m.commands(), vec!["AT+CSQ", "ATE0", "AT", "AT+NOPE"]);
    }

    #[test]
    fn pdp_cycle_waits_for_the_link_and_hands_out_a_new_address() {
        let t0 = Instant::now();
        let mut m = machine(opts(), t0);
        m.input(b"ATE0\rAT+CGACT=0,1\r", t0);
        let (text, link, _) = drain(&mut m);
        assert_eq!(
            text, "ATE0\r\r\nOK\r\n",
            "the OK of CGACT=0 waits for the link"
        );
        assert_eq!(link, vec![(1, LinkCall::Down)]);
        m.input(b"AT+CGPADDR=1\r", t0);
        assert_eq!(drain(&mut m).0, "", "queued behind the running command");
        m.link_done(1, t0);
        assert_eq!(drain(&mut m).0, "\r\nOK\r\n\r\n+CGPADDR: 1\r\n\r\nOK\r\n");

        m.input(b"AT+CGACT=1,1\r", t0);
        assert_eq!(m.next_deadline(), Some(t0 + Duration::from_secs(1)));
        m.tick(t0 + Duration::from_secs(1));
        let (text, link, _) = drain(&mut m);
        assert_eq!(text, "");
        assert_eq!(link, vec![(2, LinkCall::Up { new_ip: true })]);
        m.link_done(2, t0 + Duration::from_secs(1));
        assert_eq!(drain(&mut m).0, "\r\nOK\r\n");
        m.input(b"AT+CGPADDR=1\r", t0);
        assert_eq!(
            drain(&mut m).0,
            "\r\n+CGPADDR: 1,\"10.64.0.3\"\r\n\r\nOK\r\n"
        );
        assert_eq!(m.stats().pdp_cycles, 1);
        assert_eq!(m.stats().ip_index, 1);
    }

    #[test]
    fn radio_cycle_searches_then_registers() {
        let t0 = Instant::now();
        let mut o = opts();
        o.same_ip = SameIp::FirstN { pdp: 0, radio: 1 };
        let mut m = machine(o, t0);
        m.input(b"ATE0\rAT+CEREG=1\rAT+CFUN=0\r", t0);
        let (text, link, _) = drain(&mut m);
        assert_eq!(text, "ATE0\r\r\nOK\r\n\r\nOK\r\n\r\n+CEREG: 0\r\n");
        m.link_done(link[0].0, t0);
        assert_eq!(drain(&mut m).0, "\r\nOK\r\n");
        m.input(b"AT+CFUN=1\r", t0);
        assert_eq!(drain(&mut m).0, "\r\n+CEREG: 2\r\n\r\nOK\r\n");
        m.input(b"AT+CEREG?\r", t0);
        assert_eq!(drain(&mut m).0, "\r\n+CEREG: 1,2\r\n\r\nOK\r\n");
        let t2 = t0 + Duration::from_secs(2);
        m.tick(t2);
        let (_, link, _) = drain(&mut m);
        assert_eq!(
            link,
            vec![(2, LinkCall::Up { new_ip: false })],
            "first radio cycle keeps the IP"
        );
        m.link_done(2, t2);
        assert_eq!(drain(&mut m).0, "\r\n+CEREG: 1\r\n");
        assert_eq!(m.stats().radio_cycles, 1);
        assert!(m.stats().attached);
    }

    #[test]
    fn reset_drops_the_port_and_boots() {
        let t0 = Instant::now();
        let mut m = machine(opts(), t0);
        m.input(b"AT+CFUN=1,1\rAT\r", t0);
        let (text, link, other) = drain(&mut m);
        assert_eq!(text, "AT+CFUN=1,1\r\r\nOK\r\n");
        assert_eq!(link, vec![(1, LinkCall::Down)]);
        assert_eq!(other, vec![], "the host gets time to read the OK");
        m.input(b"AT\r", t0);
        assert_eq!(drain(&mut m).0, "", "a resetting module does not answer");
        let t0 = t0 + Duration::from_millis(500);
        m.tick(t0);
        assert_eq!(drain(&mut m).2, vec![Out::PortDown]);
        m.tick(t0 + Duration::from_secs(4));
        let (text, _, other) = drain(&mut m);
        assert_eq!(other, vec![Out::PortUp]);
        assert!(text.starts_with("\r\nRDY\r\n"), "{text:?}");
        m.input(b"AT+CEREG?\r", t0 + Duration::from_secs(4));
        assert!(drain(&mut m).0.contains("+CEREG: 0,2"));
        m.tick(t0 + Duration::from_secs(6));
        let (_, link, _) = drain(&mut m);
        assert_eq!(link, vec![(2, LinkCall::Up { new_ip: true })]);
        assert_eq!(m.stats().resets, 1);
    }

    #[test]
    fn limited_faults_count_down() {
        let t0 = Instant::now();
        let mut o = opts();
        o.faults = vec![Fault::CmeError("+CGACT".into(), 30).times(1)];
        let mut m = machine(o, t0);
        m.input(b"ATE0\rAT+CGACT?\r", t0);
        assert_eq!(drain(&mut m).0, "ATE0\r\r\nOK\r\n\r\n+CME ERROR: 30\r\n");
        m.input(b"AT+CGACT?\r", t0);
        assert_eq!(drain(&mut m).0, "\r\n+CGACT: 1,1\r\n\r\nOK\r\n");
        assert!(m.faults().is_empty());
    }

    #[test]
    fn garbage_input_never_panics() {
        let t0 = Instant::now();
        let mut m = machine(opts(), t0);
        let mut x: u32 = 1;
        let mut bytes = Vec::new();
        for _ in 0..20_000 {
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            bytes.push(match x % 7 {
                0 => b'\r',
                1 => b'A',
                2 => b'T',
                3 => b'+',
                4 => b'"',
                _ => (x >> 8) as u8,
            });
        }
        m.input(&bytes, t0);
        m.input(b"\rATE0\rAT\r", t0);
        assert!(drain(&mut m).0.ends_with("\r\nOK\r\n"));
    }
}
