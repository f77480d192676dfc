//! A USB LTE modem's AT port, simulated on a pseudo-terminal.
//!
//! The program under test (the edge agent, a separate process) opens
//! [`ModemSim::port_path`], a symlink standing in for `/dev/ttyUSB2`, and
//! talks AT to it as to real hardware. The simulator answers like the model
//! it plays and acts on the simulated network through a [`ModemLink`]:
//! taking the data session down and bringing it back with a new (or, by
//! policy, the same) public address.
//!
//! Concepts:
//! - **model** ([`SimModel`]): the dialect: identity strings, vendor
//!   commands (`AT+QENG`, `AT+CPSI?`, `AT^SYSINFOEX`) and reset commands.
//! - **rotation**: softest to hardest, `AT+CGACT=0,1`/`=1,1` (PDP context),
//!   `AT+CFUN=0`/`=1` (radio), `AT+CFUN=1,1` / `AT+CRESET` / `AT^RESET`
//!   (module reset: `OK`, then the USB port disappears, the host's open
//!   descriptor reads EOF or EIO and writes fail, and later a new pty
//!   appears behind the same symlink, printing `RDY` and friends).
//! - **same IP** ([`SameIp`]): whether a soft rotation gets the previous
//!   public address back, so a test can drive the agent's retry and
//!   escalation path deterministically.
//! - **fault** ([`Fault`]): misbehaviour injected per command pattern (no
//!   reply, `ERROR`, `+CME ERROR`, a URC inside a response, garbage, delay)
//!   or on all output (slow bytes, `\r\n` split across writes, random URCs).
//!
//! Real framing throughout: echo is on until `ATE0` (and again after `ATZ`,
//! `AT&F` or a reset); information lines are `\r\n<line>\r\n`, the final
//! result `\r\nOK\r\n`; lines without the `AT` prefix are ignored; commands
//! that change the network answer once the change is done, and lines typed
//! meanwhile wait their turn. Timing is real time, scaled by [`Delays`].
//!
//! One thread per simulator serves the pty (a current-thread runtime), and
//! one thread makes the [`ModemLink`] calls, which may block. Both stop, and
//! the pty, symlink and temporary directory go away, when the [`ModemSim`]
//! drops.
//!
//! ```ignore
//! let link = Arc::new(RecordingLink::default());
//! let sim = ModemSim::start(SimOptions { same_ip: SameIp::FirstN { pdp: 1, radio: 0 }, ..Default::default() }, link)?;
//! agent_config.port = sim.port_path();
//! ```

use std::collections::VecDeque;
use std::fs::File;
use std::io::{self, Read, Write};
use std::os::fd::OwnedFd;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use nix::fcntl::OFlag;
use nix::sys::termios::{self, SetArg};
use tokio::io::unix::AsyncFd;
use tokio::sync::{Notify, mpsc, oneshot};

use super::ModemLink;
use crate::harness::temp::TempDir;

mod command;
mod dialect;
mod machine;

use machine::{LinkCall, Machine, Out};

/// The modem model the simulator plays.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum SimModel {
    /// Quectel EC25: `AT+QNWINFO`, `AT+QENG="servingcell"`, `RDY` and
    /// `+QIND` after boot.
    #[default]
    QuectelEc25,
    /// SIMCom SIM7600: `AT+CPSI?`, `AT+CNMP`, `AT+CRESET`.
    SimcomSim7600,
    /// Huawei E3372 in stick (non-HiLink) mode: `AT^SYSINFOEX`, `AT^RESET`.
    HuaweiStick,
    /// 3GPP commands only.
    Generic,
}

/// How long the network takes. Tests usually scale the defaults down with
/// [`Delays::scaled`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Delays {
    /// `AT+CGACT=1,1` until the context is up (then `data_up`).
    pub pdp: Duration,
    /// `AT+CFUN=1` (or the end of a reset) until registered (then
    /// `data_up`).
    pub radio: Duration,
    /// From the port vanishing in a module reset until it comes back.
    pub reset: Duration,
    /// From the `OK` to a reset command until the port vanishes. The host
    /// must read the `OK` within it: what it has not read when the pty
    /// closes is lost, as with a USB port that disappears.
    pub reset_grace: Duration,
}

impl Default for Delays {
    fn default() -> Self {
        Delays {
            pdp: Duration::from_secs(1),
            radio: Duration::from_secs(2),
            reset: Duration::from_secs(4),
            reset_grace: Duration::from_millis(300),
        }
    }
}

impl Delays {
    /// The network delays times `factor` (a negative or non-finite factor
    /// leaves them as they are). `reset_grace` stays: it is the host's
    /// reading time, not the network's.
    pub fn scaled(self, factor: f64) -> Self {
        let f = |d: Duration| Duration::try_from_secs_f64(d.as_secs_f64() * factor).unwrap_or(d);
        Delays {
            pdp: f(self.pdp),
            radio: f(self.radio),
            reset: f(self.reset),
            reset_grace: self.reset_grace,
        }
    }
}

/// Whether a soft rotation (PDP re-activation or radio cycle) hands back
/// the previous public address. Module resets follow
/// [`SimOptions::reset_keeps_ip`] instead.
#[derive(Clone, Debug, Default, PartialEq)]
pub enum SameIp {
    /// Always a new address.
    #[default]
    Never,
    /// Never a new address from a soft rotation.
    Always,
    /// The first `pdp` PDP re-activations and the first `radio` radio
    /// cycles keep the address; later ones get a new one.
    FirstN { pdp: u32, radio: u32 },
    /// Each soft rotation keeps the address with probability `p`, drawn
    /// from an RNG seeded with `seed` (printed at start).
    Probability { p: f64, seed: u64 },
}

/// Misbehaviour. Patterns match a command line case-insensitively as a
/// substring (`"+CGACT=1"` matches `AT+CGACT=1,1`; `""` matches every
/// command).
#[derive(Clone, Debug, PartialEq)]
pub enum Fault {
    /// Swallow matching commands: echo (when on) but no answer, and the
    /// command does not run.
    NoReply(String),
    /// Answer matching commands with `ERROR` without running them.
    Error(String),
    /// Answer matching commands with `+CME ERROR: <code>` (as `AT+CMEE`
    /// formats it) without running them.
    CmeError(String, u16),
    /// Run matching commands but hold the answer this long; later commands
    /// wait behind it.
    Delay(String, Duration),
    /// Put this URC between the information lines and the final result of
    /// matching commands (`+CEREG: 5`, `+QIND: "csq",20,99`).
    UrcInResponse(String, String),
    /// Send these bytes before the answer to matching commands.
    GarbageBefore(String, Vec<u8>),
    /// Write every byte of every answer (and echo, and URC) separately,
    /// this long apart.
    SlowBytes(Duration),
    /// Write each `\r\n` as two writes, `\r` then `\n` 20 ms later.
    SplitCrLf,
    /// One of `urcs` at random times, `mean` apart on average (uniform in
    /// 0.5–1.5 × `mean`).
    RandomUrcs { mean: Duration, urcs: Vec<String> },
    /// The inner fault applies to the next `n` command lines it matches
    /// (for [`Fault::SlowBytes`] and [`Fault::SplitCrLf`]: the next `n`
    /// command lines), then disappears.
    Times(u32, Box<Fault>),
}

impl Fault {
    /// This fault for the next `n` matching commands only.
    pub fn times(self, n: u32) -> Fault {
        Fault::Times(n, Box::new(self))
    }
}

/// Everything about a simulated modem. `Default` is a Quectel EC25 on
/// Vodafone.de with realistic delays and no faults.
#[derive(Clone, Debug)]
pub struct SimOptions {
    pub model: SimModel,
    pub delays: Delays,
    pub same_ip: SameIp,
    /// A module reset keeps the public address (default: it never does).
    pub reset_keeps_ip: bool,
    /// Faults from the start; change them later with
    /// [`ModemSim::set_faults`].
    pub faults: Vec<Fault>,
    /// `AT+CGACT=1,1` answers `OK` only once the context is up, and
    /// `AT+CGACT=0,1` / `AT+CFUN=0` once it is down, as real modules do
    /// (default true). With false, the activation answers at once and
    /// completes in the background.
    pub cgact_waits: bool,
    /// Print `RDY` and friends after a reset (Quectel, SIMCom).
    pub boot_urcs: bool,
    /// The `AT+CSQ` signal index (0–31); the LTE figures in
    /// `AT+QENG`/`AT+CPSI?` follow from it.
    pub csq: u8,
    /// Long operator name for `AT+COPS?`.
    pub operator: String,
    /// MCC and MNC, e.g. `"26202"`.
    pub plmn: String,
    pub apn: String,
    /// Defaults to a distinct IMEI per simulator in this process.
    pub imei: Option<String>,
    /// Seeds random URC timing; random (and printed) when `None`.
    pub seed: Option<u64>,
    /// Name of the symlink, inside the simulator's temporary directory.
    pub port_name: String,
}

impl Default for SimOptions {
    fn default() -> Self {
        SimOptions {
            model: SimModel::default(),
            delays: Delays::default(),
            same_ip: SameIp::default(),
            reset_keeps_ip: false,
            faults: Vec::new(),
            cgact_waits: true,
            boot_urcs: true,
            csq: 23,
            operator: "Vodafone.de".into(),
            plmn: "26202".into(),
            apn: "internet".into(),
            imei: None,
            seed: None,
            port_name: "ttyUSB2".into(),
        }
    }
}

/// Counters and current state.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SimStats {
    /// PDP re-activations that reached the network.
    pub pdp_cycles: u32,
    /// Radio on after off (`AT+CFUN=1` after `=0`/`=4`) that reached the
    /// attach.
    pub radio_cycles: u32,
    /// Module resets.
    pub resets: u32,
    /// How many times the carrier handed out a new address (0: the start
    /// address).
    pub ip_index: u32,
    pub radio_on: bool,
    /// Registered (`+CEREG` stat 1).
    pub attached: bool,
    pub pdp_active: bool,
    /// The port (symlink and pty) exists; false during a reset.
    pub port_present: bool,
    pub echo: bool,
}

/// A running simulator. Dropping it stops it and removes its port.
pub struct ModemSim {
    shared: Arc<Shared>,
    link_path: PathBuf,
    stop: Option<oneshot::Sender<()>>,
    server: Option<JoinHandle<()>>,
    link_worker: Option<JoinHandle<()>>,
    /// Removed after the threads have stopped (fields drop after `drop`).
    _dir: TempDir,
}

/// State the handle and the serving thread share.
struct Shared {
    machine: Mutex<Machine>,
    /// Wakes the serving thread after the handle changed the machine.
    wake: Notify,
    /// The current `/dev/pts/N`, `None` during a reset.
    pts: Mutex<Option<PathBuf>>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// Output queued beyond this is dropped (nobody is reading the port).
const MAX_QUEUED_OUTPUT: usize = 64 * 1024;
/// Retry interval when the pty buffer is full or a new pty cannot be made.
const RETRY: Duration = Duration::from_millis(10);

impl ModemSim {
    /// Open a pty, point the port symlink at it and start answering.
    pub fn start(opts: SimOptions, link: Arc<dyn ModemLink>) -> io::Result<ModemSim> {
        static SEQ: AtomicU32 = AtomicU32::new(1);
        let seq = SEQ.fetch_add(1, Ordering::Relaxed);
        let imei = opts
            .imei
            .clone()
            .unwrap_or_else(|| format!("8676980{:08}", (std::process::id() % 1000) * 10_000 + seq));
        let seed = opts.seed.unwrap_or_else(rand::random);
        if opts
            .faults
            .iter()
            .any(|f| matches!(f, Fault::RandomUrcs { .. }))
            || opts.seed.is_none()
        {
            eprintln!("modem-sim: seed {seed} (SimOptions::seed replays it)");
        }
        if let SameIp::Probability { p, seed } = opts.same_ip {
            eprintln!("modem-sim: same-IP probability {p}, seed {seed}");
        }
        if opts.port_name.is_empty() || opts.port_name.contains('/') {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "port_name must be a plain file name",
            ));
        }

        let dir = TempDir::new("modem-sim");
        let link_path = dir.join(&opts.port_name);
        let pty = open_pty()?;
        point_link(&link_path, &pty.pts)?;

        let profile = dialect::profile(opts.model, &imei, &opts.plmn);
        let machine = Machine::new(opts, profile, seed, Instant::now());
        let shared = Arc::new(Shared {
            machine: Mutex::new(machine),
            wake: Notify::new(),
            pts: Mutex::new(Some(pty.pts.clone())),
        });

        let (link_tx, link_rx) = std::sync::mpsc::channel::<(u64, LinkCall)>();
        let (done_tx, done_rx) = mpsc::unbounded_channel::<u64>();
        let link_worker = std::thread::Builder::new()
            .name("modem-sim-link".into())
            .spawn(move || run_link(link, link_rx, done_tx))?;

        let (stop_tx, stop_rx) = oneshot::channel();
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        let server = {
            let shared = shared.clone();
            let link_path = link_path.clone();
            std::thread::Builder::new()
                .name("modem-sim".into())
                .spawn(move || {
                    let rt = match tokio::runtime::Builder::new_current_thread()
                        .enable_all()
                        .build()
                    {
                        Ok(rt) => rt,
                        Err(e) => {
                            let _ = ready_tx.send(Err(e));
                            return;
                        }
                    };
                    let server = Server {
                        shared,
                        link_path,
                        link_tx,
                        done_rx,
                        port: None,
                        outq: VecDeque::new(),
                        queued_bytes: 0,
                        head_at: None,
                    };
                    rt.block_on(server.run(pty, stop_rx, ready_tx));
                })?
        };
        let started = ready_rx.recv().unwrap_or_else(|_| {
            Err(io::Error::other(
                "modem simulator thread exited during start",
            ))
        });
        let sim = ModemSim {
            shared,
            link_path,
            stop: Some(stop_tx),
            server: Some(server),
            link_worker: Some(link_worker),
            _dir: dir,
        };
        started.map(|()| sim)
    }

    /// The port to open: a symlink to the current pty slave. It disappears
    /// during a module reset and then points at a new pty.
    pub fn port_path(&self) -> PathBuf {
        self.link_path.clone()
    }

    /// The pty slave the port points at now; `None` during a reset.
    pub fn pts_path(&self) -> Option<PathBuf> {
        lock(&self.shared.pts).clone()
    }

    /// Every AT command line received, in order (without the terminator).
    pub fn commands(&self) -> Vec<String> {
        lock(&self.shared.machine).commands()
    }

    pub fn stats(&self) -> SimStats {
        let mut st = lock(&self.shared.machine).stats();
        // The port as the host sees it, which lags the modem's own state by
        // one turn of the serving loop.
        st.port_present = self.pts_path().is_some();
        st
    }

    /// Replace the faults. Commands read after this returns see the new
    /// ones.
    pub fn set_faults(&self, faults: Vec<Fault>) {
        lock(&self.shared.machine).set_faults(faults, Instant::now());
        self.shared.wake.notify_one();
    }

    pub fn add_fault(&self, fault: Fault) {
        let mut m = lock(&self.shared.machine);
        let mut faults = m.faults();
        faults.push(fault);
        m.set_faults(faults, Instant::now());
        drop(m);
        self.shared.wake.notify_one();
    }

    pub fn clear_faults(&self) {
        self.set_faults(Vec::new());
    }

    /// The faults still in force (limited ones disappear once used up).
    pub fn faults(&self) -> Vec<Fault> {
        lock(&self.shared.machine).faults()
    }

    /// Send an unsolicited result code now (`+CEREG: 2`, `RING`).
    pub fn inject_urc(&self, text: &str) {
        lock(&self.shared.machine).urc(text);
        self.shared.wake.notify_one();
    }
}

impl Drop for ModemSim {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        // The server thread drops the link sender on exit, which ends the
        // link worker once its current call returns.
        if let Some(t) = self.server.take() {
            let _ = t.join();
        }
        if let Some(t) = self.link_worker.take() {
            let _ = t.join();
        }
    }
}

/// Makes the [`ModemLink`] calls in order, off the serving thread.
fn run_link(
    link: Arc<dyn ModemLink>,
    rx: std::sync::mpsc::Receiver<(u64, LinkCall)>,
    done: mpsc::UnboundedSender<u64>,
) {
    while let Ok((token, call)) = rx.recv() {
        let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| match call {
            LinkCall::Down => link.data_down(),
            LinkCall::Up { new_ip } => link.data_up(new_ip),
        }));
        if r.is_err() {
            eprintln!("modem-sim: link call {call:?} panicked; carrying on");
        }
        let _ = done.send(token);
    }
}

/// A pty pair: the simulator reads and writes the master; the slave stays
/// open here too so the master never sees EIO while no client has the port
/// open.
struct PtyPair {
    master: File,
    slave: OwnedFd,
    pts: PathBuf,
}

/// Open a pty in raw mode (no echo, no line editing), both ends
/// close-on-exec so child processes never hold it open past a reset.
fn open_pty() -> io::Result<PtyPair> {
    // Serialised: pty allocation in some libraries is not thread-safe, and
    // tests create many.
    static PTY_LOCK: Mutex<()> = Mutex::new(());
    let _guard = lock(&PTY_LOCK);
    let master = nix::pty::posix_openpt(
        OFlag::O_RDWR | OFlag::O_NOCTTY | OFlag::O_CLOEXEC | OFlag::O_NONBLOCK,
    )?;
    nix::pty::grantpt(&master)?;
    nix::pty::unlockpt(&master)?;
    let pts = PathBuf::from(nix::pty::ptsname_r(&master)?);
    let slave: OwnedFd = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(OFlag::O_NOCTTY.bits())
        .open(&pts)?
        .into();
    let mut t = termios::tcgetattr(&slave)?;
    termios::cfmakeraw(&mut t);
    termios::tcsetattr(&slave, SetArg::TCSANOW, &t)?;
    Ok(PtyPair {
        master: File::from(OwnedFd::from(master)),
        slave,
        pts,
    })
}

/// Point `link` at `target`, replacing any old link atomically.
fn point_link(link: &Path, target: &Path) -> io::Result<()> {
    let tmp = link.with_extension("new");
    let _ = std::fs::remove_file(&tmp);
    std::os::unix::fs::symlink(target, &tmp)?;
    std::fs::rename(&tmp, link)
}

struct Port {
    master: AsyncFd<File>,
    _slave: OwnedFd,
}

/// The serving thread: owns the pty and turns machine effects into writes,
/// port changes and link calls.
struct Server {
    shared: Arc<Shared>,
    link_path: PathBuf,
    link_tx: std::sync::mpsc::Sender<(u64, LinkCall)>,
    done_rx: mpsc::UnboundedReceiver<u64>,
    port: Option<Port>,
    outq: VecDeque<Out>,
    queued_bytes: usize,
    /// When the head of `outq` may go out.
    head_at: Option<Instant>,
}

impl Server {
    async fn run(
        mut self,
        first: PtyPair,
        mut stop: oneshot::Receiver<()>,
        ready: std::sync::mpsc::Sender<io::Result<()>>,
    ) {
        match register(first.master) {
            Ok(master) => {
                self.port = Some(Port {
                    master,
                    _slave: first.slave,
                });
                let _ = ready.send(Ok(()));
            }
            Err(e) => {
                let _ = ready.send(Err(e));
                return;
            }
        }
        drop(ready);
        let mut buf = [0u8; 1024];
        loop {
            self.apply_fx();
            let now = Instant::now();
            if self.head_at.is_none()
                && let Some(front) = self.outq.front()
            {
                let gap = match front {
                    Out::Bytes { gap, .. } => *gap,
                    _ => Duration::ZERO,
                };
                self.head_at = Some(now + gap);
            }
            let deadline = lock(&self.shared.machine).next_deadline();
            tokio::select! {
                biased;
                _ = &mut stop => break,
                Some(token) = self.done_rx.recv() => {
                    lock(&self.shared.machine).link_done(token, Instant::now());
                }
                r = read_port(self.port.as_ref(), &mut buf) => match r {
                    Ok(n) if n > 0 => {
                        lock(&self.shared.machine).input(&buf[..n], Instant::now());
                    }
                    Ok(_) => {}
                    Err(e) => {
                        // Not expected while the slave is held open; do not spin.
                        eprintln!("modem-sim: pty read: {e}");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                    }
                },
                _ = sleep_until(deadline) => {
                    lock(&self.shared.machine).tick(Instant::now());
                }
                _ = sleep_until(self.head_at) => self.write_head(),
                _ = self.shared.wake.notified() => {}
            }
        }
        self.close_port();
    }

    /// Queue the machine's output and send its link calls.
    fn apply_fx(&mut self) {
        let fx = lock(&self.shared.machine).take_fx();
        for call in fx.link {
            // The worker outlives this thread; a send cannot fail before
            // shutdown.
            let _ = self.link_tx.send(call);
        }
        for out in fx.out {
            if let Out::Bytes { data, .. } = &out {
                if self.queued_bytes + data.len() > MAX_QUEUED_OUTPUT {
                    continue;
                }
                self.queued_bytes += data.len();
            }
            self.outq.push_back(out);
        }
    }

    fn write_head(&mut self) {
        self.head_at = None;
        let Some(front) = self.outq.front_mut() else {
            return;
        };
        match front {
            Out::Bytes { data, .. } => {
                let Some(port) = &self.port else {
                    self.pop_head();
                    return;
                };
                match port.master.get_ref().write(data) {
                    Ok(n) if n >= data.len() => self.pop_head(),
                    Ok(n) => {
                        data.drain(..n);
                        self.queued_bytes = self.queued_bytes.saturating_sub(n);
                        self.head_at = Some(Instant::now());
                    }
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                        self.head_at = Some(Instant::now() + RETRY);
                    }
                    Err(e) => {
                        eprintln!("modem-sim: pty write: {e}");
                        self.pop_head();
                    }
                }
            }
            Out::PortDown => {
                self.close_port();
                self.pop_head();
            }
            Out::PortUp => match self.open_port() {
                Ok(()) => self.pop_head(),
                Err(e) => {
                    eprintln!("modem-sim: cannot re-create the port: {e}; retrying");
                    self.head_at = Some(Instant::now() + RETRY * 10);
                }
            },
        }
    }

    fn pop_head(&mut self) {
        if let Some(Out::Bytes { data, .. }) = self.outq.pop_front() {
            self.queued_bytes = self.queued_bytes.saturating_sub(data.len());
        }
    }

    /// The USB device is gone: no link, no pty (the host side sees EOF).
    fn close_port(&mut self) {
        let _ = std::fs::remove_file(&self.link_path);
        *lock(&self.shared.pts) = None;
        self.port = None;
    }

    fn open_port(&mut self) -> io::Result<()> {
        let pty = open_pty()?;
        let master = register(pty.master)?;
        point_link(&self.link_path, &pty.pts)?;
        *lock(&self.shared.pts) = Some(pty.pts);
        self.port = Some(Port {
            master,
            _slave: pty.slave,
        });
        Ok(())
    }
}

/// Register the pty master with the reactor. The safe constructor is
/// deprecated because an arbitrary `T` could change the descriptor it
/// reports; a `File` owns its descriptor for life, so it cannot.
#[allow(deprecated)]
fn register(master: File) -> io::Result<AsyncFd<File>> {
    AsyncFd::new(master)
}

async fn read_port(port: Option<&Port>, buf: &mut [u8]) -> io::Result<usize> {
    let Some(port) = port else {
        return std::future::pending().await;
    };
    loop {
        let mut guard = port.master.readable().await?;
        match guard.try_io(|fd| fd.get_ref().read(buf)) {
            Ok(r) => return r,
            Err(_would_block) => continue,
        }
    }
}

async fn sleep_until(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(tokio::time::Instant::from_std(at)).await,
        None => std::future::pending().await,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testbed::RecordingLink;
    use nix::sys::termios::SpecialCharacterIndices;
    use std::fs::OpenOptions;

    /// Pty tests run one at a time.
    static PTY_TESTS: Mutex<()> = Mutex::new(());

    fn serial() -> MutexGuard<'static, ()> {
        lock(&PTY_TESTS)
    }

    fn fast() -> Delays {
        Delays {
            pdp: Duration::from_millis(100),
            radio: Duration::from_millis(150),
            reset: Duration::from_millis(200),
            reset_grace: Duration::from_millis(100),
        }
    }

    fn start(opts: SimOptions) -> (ModemSim, Arc<RecordingLink>) {
        let link = Arc::new(RecordingLink::default());
        let sim = ModemSim::start(
            SimOptions {
                seed: Some(1),
                ..opts
            },
            link.clone(),
        )
        .expect("start simulator");
        (sim, link)
    }

    fn events(link: &RecordingLink) -> Vec<String> {
        lock(&link.events).clone()
    }

    /// The host side, as the agent opens it: the symlink, raw mode; reads
    /// time out after 100 ms (VMIN 0, VTIME 1).
    struct Host {
        f: File,
        buf: Vec<u8>,
    }

    impl Host {
        fn open(path: &Path) -> Host {
            let f = OpenOptions::new()
                .read(true)
                .write(true)
                .custom_flags(OFlag::O_NOCTTY.bits())
                .open(path)
                .unwrap_or_else(|e| panic!("open {}: {e}", path.display()));
            let mut t = termios::tcgetattr(&f).expect("tcgetattr");
            termios::cfmakeraw(&mut t);
            t.control_chars[SpecialCharacterIndices::VMIN as usize] = 0;
            t.control_chars[SpecialCharacterIndices::VTIME as usize] = 1;
            termios::tcsetattr(&f, SetArg::TCSANOW, &t).expect("tcsetattr");
            Host { f, buf: Vec::new() }
        }

        fn send(&mut self, s: &str) {
            self.f.write_all(s.as_bytes()).expect("write to port");
        }

        /// One read (up to 100 ms).
        fn read_once(&mut self) -> io::Result<Vec<u8>> {
            let mut b = [0u8; 256];
            let n = self.f.read(&mut b)?;
            Ok(b[..n].to_vec())
        }

        /// Everything up to and including `needle`.
        fn until(&mut self, needle: &str, timeout: Duration) -> String {
            let start = Instant::now();
            loop {
                if let Some(pos) = find(&self.buf, needle.as_bytes()) {
                    let rest = self.buf.split_off(pos + needle.len());
                    let got = std::mem::replace(&mut self.buf, rest);
                    return String::from_utf8_lossy(&got).into_owned();
                }
                assert!(
                    start.elapsed() < timeout,
                    "no {needle:?} within {timeout:?}; got {:?}",
                    String::from_utf8_lossy(&self.buf)
                );
                let chunk = self.read_once().expect("read port");
                self.buf.extend(chunk);
            }
        }

        /// Send `cmd` and return the answer up to its final `OK`/`ERROR`.
        fn cmd(&mut self, cmd: &str) -> String {
            self.send(&format!("{cmd}\r"));
            let start = Instant::now();
            loop {
                if let Some(end) = final_end(&self.buf) {
                    let rest = self.buf.split_off(end);
                    let got = std::mem::replace(&mut self.buf, rest);
                    return String::from_utf8_lossy(&got).into_owned();
                }
                assert!(
                    start.elapsed() < Duration::from_secs(3),
                    "no final result for {cmd:?}; got {:?}",
                    String::from_utf8_lossy(&self.buf)
                );
                let chunk = self.read_once().expect("read port");
                self.buf.extend(chunk);
            }
        }

        /// Whatever arrives within `d`.
        fn drain_for(&mut self, d: Duration) -> String {
            let start = Instant::now();
            while start.elapsed() < d {
                let chunk = self.read_once().expect("read port");
                self.buf.extend(chunk);
            }
            String::from_utf8_lossy(&std::mem::take(&mut self.buf)).into_owned()
        }
    }

    /// Where the first final result code (`OK`, `ERROR`, `+CME ERROR: …`)
    /// ends.
    fn final_end(buf: &[u8]) -> Option<usize> {
        let ends = [
            find(buf, b"\r\nOK\r\n").map(|p| p + 6),
            find(buf, b"\r\nERROR\r\n").map(|p| p + 9),
            find(buf, b"\r\n+CME ERROR: ").and_then(|p| {
                let tail = p + 2;
                find(&buf[tail..], b"\r\n").map(|q| tail + q + 2)
            }),
        ];
        ends.into_iter().flatten().min()
    }

    fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
        hay.windows(needle.len()).position(|w| w == needle)
    }

    #[test]
    fn basic_commands_with_and_without_echo() {
        let _g = serial();
        let (sim, _link) = start(SimOptions::default());
        let mut h = Host::open(&sim.port_path());
        assert_eq!(h.cmd("AT"), "AT\r\r\nOK\r\n", "echo is on by default");
        assert_eq!(
            h.cmd("ATI"),
            "ATI\r\r\nQuectel\r\nEC25\r\nRevision: EC25EFAR06A06M4G\r\n\r\nOK\r\n"
        );
        assert_eq!(h.cmd("ATE0"), "ATE0\r\r\nOK\r\n");
        assert!(!sim.stats().echo);
        assert_eq!(h.cmd("AT"), "\r\nOK\r\n");
        assert_eq!(h.cmd("at+csq"), "\r\n+CSQ: 23,99\r\n\r\nOK\r\n");
        assert_eq!(h.cmd("AT+CGMI"), "\r\nQuectel\r\n\r\nOK\r\n");
        assert_eq!(h.cmd("AT+CGMM"), "\r\nEC25\r\n\r\nOK\r\n");
        assert_eq!(
            h.cmd("AT+COPS?"),
            "\r\n+COPS: 0,0,\"Vodafone.de\",7\r\n\r\nOK\r\n"
        );
        assert_eq!(h.cmd("AT+CREG?"), "\r\n+CREG: 0,1\r\n\r\nOK\r\n");
        assert_eq!(h.cmd("AT+CEREG?"), "\r\n+CEREG: 0,1\r\n\r\nOK\r\n");
        assert_eq!(h.cmd("AT+CGATT?"), "\r\n+CGATT: 1\r\n\r\nOK\r\n");
        assert_eq!(h.cmd("AT+CGACT?"), "\r\n+CGACT: 1,1\r\n\r\nOK\r\n");
        assert_eq!(h.cmd("AT+CFUN?"), "\r\n+CFUN: 1\r\n\r\nOK\r\n");
        assert_eq!(
            h.cmd("AT+CGPADDR=1"),
            "\r\n+CGPADDR: 1,\"10.64.0.2\"\r\n\r\nOK\r\n"
        );
        assert_eq!(
            h.cmd("AT+QNWINFO"),
            "\r\n+QNWINFO: \"FDD LTE\",\"26202\",\"LTE BAND 3\",1300\r\n\r\nOK\r\n"
        );
        let qeng = h.cmd("AT+QENG=\"servingcell\"");
        let line = qeng.trim_start().lines().next().unwrap_or_default();
        let fields: Vec<&str> = line.trim_start_matches("+QENG: ").split(',').collect();
        assert_eq!(
            fields[..5],
            ["\"servingcell\"", "\"NOCONN\"", "\"LTE\"", "\"FDD\"", "262"]
        );
        assert_eq!(fields.len(), 18, "{line}");
        assert_eq!(
            fields[13..17],
            ["-95", "-10", "-67", "12"],
            "RSRP, RSRQ, RSSI, SINR"
        );
        assert_eq!(h.cmd("AT+BOGUS"), "\r\nERROR\r\n");
        assert_eq!(h.cmd("AT+CMEE=2;+CMEE?"), "\r\n+CMEE: 2\r\n\r\nOK\r\n");
        assert_eq!(h.cmd("ATE1"), "\r\nOK\r\n");
        assert_eq!(h.cmd("AT"), "AT\r\r\nOK\r\n");
        assert_eq!(sim.commands()[..3], ["AT", "ATI", "ATE0"]);
    }

    #[test]
    fn each_model_speaks_its_dialect() {
        let _g = serial();
        let cases: [(SimModel, &str, &str, &str); 4] = [
            (
                SimModel::QuectelEc25,
                "AT+QENG=\"servingcell\"",
                "+QENG: \"servingcell\",\"NOCONN\"",
                "AT+CRESET",
            ),
            (
                SimModel::SimcomSim7600,
                "AT+CPSI?",
                "+CPSI: LTE,Online,262-02,0x1A2B",
                "AT+QNWINFO",
            ),
            (
                SimModel::HuaweiStick,
                "AT^SYSINFOEX",
                "^SYSINFOEX: 2,3,0,1,,6,\"LTE\",101,\"LTE\"",
                "AT+CPSI?",
            ),
            (SimModel::Generic, "AT+CGMI", "Generic", "AT^SYSINFOEX"),
        ];
        for (model, cmd, want, foreign) in cases {
            let (sim, _link) = start(SimOptions {
                model,
                ..SimOptions::default()
            });
            let mut h = Host::open(&sim.port_path());
            h.cmd("ATE0");
            let got = h.cmd(cmd);
            assert!(
                got.contains(want) && got.ends_with("\r\nOK\r\n"),
                "{model:?} {cmd}: {got:?}"
            );
            assert_eq!(h.cmd(foreign), "\r\nERROR\r\n", "{model:?} {foreign}");
        }
    }

    #[test]
    fn pdp_cycle_takes_the_link_down_and_up_with_a_new_ip() {
        let _g = serial();
        let (sim, link) = start(SimOptions {
            delays: fast(),
            ..SimOptions::default()
        });
        let ip0 = link.public_ip();
        let mut h = Host::open(&sim.port_path());
        h.cmd("ATE0");
        assert_eq!(h.cmd("AT+CGACT=0,1"), "\r\nOK\r\n");
        assert_eq!(events(&link), ["down"], "OK comes after data_down returned");
        assert_eq!(h.cmd("AT+CGPADDR=1"), "\r\n+CGPADDR: 1\r\n\r\nOK\r\n");
        assert_eq!(h.cmd("AT+CGACT?"), "\r\n+CGACT: 1,0\r\n\r\nOK\r\n");
        let t = Instant::now();
        assert_eq!(h.cmd("AT+CGACT=1,1"), "\r\nOK\r\n");
        assert!(t.elapsed() >= fast().pdp, "activation takes the PDP delay");
        assert_eq!(events(&link), ["down", "up new_ip=true"]);
        assert_ne!(link.public_ip(), ip0);
        assert_eq!(
            h.cmd("AT+CGPADDR=1"),
            "\r\n+CGPADDR: 1,\"10.64.0.3\"\r\n\r\nOK\r\n"
        );
        let st = sim.stats();
        assert_eq!((st.pdp_cycles, st.ip_index, st.pdp_active), (1, 1, true));
    }

    #[test]
    fn same_ip_first_n_hands_back_the_same_address() {
        let _g = serial();
        let (sim, link) = start(SimOptions {
            delays: fast(),
            same_ip: SameIp::FirstN { pdp: 1, radio: 1 },
            ..SimOptions::default()
        });
        let ip0 = link.public_ip();
        let mut h = Host::open(&sim.port_path());
        h.cmd("ATE0");
        for _ in 0..2 {
            h.cmd("AT+CGACT=0,1");
            h.cmd("AT+CGACT=1,1");
        }
        assert_eq!(
            events(&link),
            ["down", "up new_ip=false", "down", "up new_ip=true"]
        );
        let ip1 = link.public_ip();
        assert_ne!(ip1, ip0);

        // Radio cycles: registration shows "searching" during the attach.
        for round in 0..2 {
            assert_eq!(h.cmd("AT+CFUN=0"), "\r\nOK\r\n");
            assert_eq!(h.cmd("AT+CEREG?"), "\r\n+CEREG: 0,0\r\n\r\nOK\r\n");
            assert_eq!(h.cmd("AT+CSQ"), "\r\n+CSQ: 99,99\r\n\r\nOK\r\n");
            assert_eq!(h.cmd("AT+CGACT=1,1"), "\r\n+CME ERROR: 30\r\n");
            assert_eq!(h.cmd("AT+CFUN=1"), "\r\nOK\r\n");
            assert_eq!(h.cmd("AT+CEREG?"), "\r\n+CEREG: 0,2\r\n\r\nOK\r\n");
            assert_eq!(h.cmd("AT+COPS?"), "\r\n+COPS: 0\r\n\r\nOK\r\n");
            crate::assert_eventually!(
                Duration::from_secs(2),
                sim.stats().attached,
                "round {round}: never re-attached"
            );
            assert_eq!(h.cmd("AT+CEREG?"), "\r\n+CEREG: 0,1\r\n\r\nOK\r\n");
        }
        assert_eq!(
            events(&link)[4..],
            ["down", "up new_ip=false", "down", "up new_ip=true"]
        );
        let st = sim.stats();
        assert_eq!((st.pdp_cycles, st.radio_cycles, st.ip_index), (2, 2, 2));
    }

    #[test]
    fn reset_re_enumerates_the_port() {
        let _g = serial();
        let (sim, link) = start(SimOptions {
            delays: fast(),
            ..SimOptions::default()
        });
        let path = sim.port_path();
        let old_pts = sim.pts_path().expect("port present");
        assert_eq!(std::fs::read_link(&path).ok(), Some(old_pts.clone()));
        let mut h = Host::open(&path);
        h.cmd("ATE0");
        assert_eq!(h.cmd("AT+CFUN=1,1"), "\r\nOK\r\n");

        // After the grace period the old port hangs up: EOF or EIO on read,
        // EIO on write.
        crate::assert_eventually!(
            Duration::from_secs(1),
            !sim.stats().port_present,
            "port never went away"
        );
        assert_hung_up(&mut h);
        assert!(
            std::fs::symlink_metadata(&path).is_err(),
            "symlink removed during reset"
        );
        assert_eq!(events(&link), ["down"]);

        crate::assert_eventually!(
            Duration::from_secs(2),
            std::fs::read_link(&path).is_ok(),
            "port never came back"
        );
        let new_pts = sim.pts_path().expect("port back");
        assert_ne!(new_pts, old_pts, "a new pty, as after USB re-enumeration");
        assert_eq!(std::fs::read_link(&path).ok(), Some(new_pts));
        drop(h);

        let mut h = Host::open(&path);
        let boot = h.until("+QIND: PB DONE\r\n", Duration::from_secs(1));
        assert!(boot.starts_with("\r\nRDY\r\n"), "{boot:?}");
        assert_eq!(
            h.cmd("AT"),
            "AT\r\r\nOK\r\n",
            "echo back on after the reset"
        );
        crate::assert_eventually!(Duration::from_secs(2), sim.stats().attached, "no attach");
        assert_eq!(events(&link), ["down", "up new_ip=true"]);
        assert_eq!(sim.stats().resets, 1);
    }

    #[test]
    fn simcom_creset_re_enumerates_too() {
        let _g = serial();
        let (sim, _link) = start(SimOptions {
            model: SimModel::SimcomSim7600,
            delays: fast(),
            boot_urcs: false,
            ..SimOptions::default()
        });
        let mut h = Host::open(&sim.port_path());
        h.cmd("ATE0");
        h.cmd("AT+CRESET");
        crate::assert_eventually!(
            Duration::from_secs(1),
            !sim.stats().port_present,
            "no reset"
        );
        crate::assert_eventually!(Duration::from_secs(2), sim.stats().port_present, "no boot");
        let mut h = Host::open(&sim.port_path());
        assert_eq!(h.cmd("AT"), "AT\r\r\nOK\r\n");
    }

    #[test]
    fn fault_no_reply_swallows_the_command() {
        let _g = serial();
        let (sim, _link) = start(SimOptions::default());
        let mut h = Host::open(&sim.port_path());
        h.cmd("ATE0");
        sim.set_faults(vec![Fault::NoReply("+CSQ".into())]);
        h.send("AT+CSQ\r");
        assert_eq!(h.drain_for(Duration::from_millis(300)), "");
        assert_eq!(h.cmd("AT"), "\r\nOK\r\n", "the modem still answers others");
        sim.clear_faults();
        assert!(h.cmd("AT+CSQ").contains("+CSQ: 23,99"));
    }

    #[test]
    fn fault_cme_error_and_error() {
        let _g = serial();
        let (sim, link) = start(SimOptions {
            faults: vec![
                Fault::CmeError("+CGACT=1".into(), 30),
                Fault::Error("+COPS".into()),
            ],
            delays: fast(),
            ..SimOptions::default()
        });
        let mut h = Host::open(&sim.port_path());
        h.cmd("ATE0");
        h.cmd("AT+CGACT=0,1");
        assert_eq!(h.cmd("AT+CGACT=1,1"), "\r\n+CME ERROR: 30\r\n");
        assert_eq!(events(&link), ["down"], "the failed command did not run");
        assert_eq!(h.cmd("AT+COPS?"), "\r\nERROR\r\n");
        h.cmd("AT+CMEE=2");
        assert_eq!(
            h.cmd("AT+CGACT=1,1"),
            "\r\n+CME ERROR: no network service\r\n"
        );
    }

    #[test]
    fn fault_urc_inside_a_response_and_garbage_before() {
        let _g = serial();
        let (sim, _link) = start(SimOptions::default());
        let mut h = Host::open(&sim.port_path());
        h.cmd("ATE0");
        sim.set_faults(vec![
            Fault::UrcInResponse("+CSQ".into(), "+CEREG: 5".into()),
            Fault::UrcInResponse("+CSQ".into(), "+QIND: \"csq\",20,99".into()),
            Fault::GarbageBefore("+CGMM".into(), b"\xff\x00~#".to_vec()),
        ]);
        assert_eq!(
            h.cmd("AT+CSQ"),
            "\r\n+CSQ: 23,99\r\n\r\n+CEREG: 5\r\n\r\n+QIND: \"csq\",20,99\r\n\r\nOK\r\n"
        );
        assert_eq!(h.cmd("AT+CGMM"), "\u{fffd}\u{0}~#\r\nEC25\r\n\r\nOK\r\n");
    }

    #[test]
    fn fault_slow_bytes_and_split_line_ends() {
        let _g = serial();
        let (sim, _link) = start(SimOptions::default());
        let mut h = Host::open(&sim.port_path());
        h.cmd("ATE0");

        sim.set_faults(vec![Fault::SlowBytes(Duration::from_millis(40))]);
        let t = Instant::now();
        h.send("AT\r");
        let mut reads = Vec::new();
        let mut got = Vec::new();
        while !got.ends_with(b"OK\r\n") && t.elapsed() < Duration::from_secs(2) {
            let b = h.read_once().expect("read");
            if !b.is_empty() {
                got.extend_from_slice(&b);
                reads.push(b);
            }
        }
        assert_eq!(got, b"\r\nOK\r\n");
        assert!(
            t.elapsed() >= Duration::from_millis(200),
            "{:?}",
            t.elapsed()
        );
        assert!(reads.len() >= 4, "bytes trickled in: {reads:?}");

        sim.set_faults(vec![Fault::SplitCrLf]);
        h.send("AT+CSQ\r");
        let t = Instant::now();
        let mut reads = Vec::new();
        let mut got = Vec::new();
        while !got.ends_with(b"OK\r\n") && t.elapsed() < Duration::from_secs(2) {
            let b = h.read_once().expect("read");
            if !b.is_empty() {
                got.extend_from_slice(&b);
                reads.push(b);
            }
        }
        assert_eq!(got, b"\r\n+CSQ: 23,99\r\n\r\nOK\r\n");
        assert!(
            reads.iter().any(|r| r.ends_with(b"\r")),
            "some write ended between \\r and \\n: {reads:?}"
        );
    }

    #[test]
    fn fault_delay_and_random_urcs() {
        let _g = serial();
        let (sim, _link) = start(SimOptions {
            faults: vec![Fault::Delay("+COPS".into(), Duration::from_millis(300))],
            ..SimOptions::default()
        });
        let mut h = Host::open(&sim.port_path());
        h.cmd("ATE0");
        let t = Instant::now();
        assert!(h.cmd("AT+COPS?").contains("Vodafone.de"));
        assert!(t.elapsed() >= Duration::from_millis(300));

        sim.set_faults(vec![Fault::RandomUrcs {
            mean: Duration::from_millis(50),
            urcs: vec!["+QIND: \"csq\",20,99".into()],
        }]);
        h.until("\r\n+QIND: \"csq\",20,99\r\n", Duration::from_secs(1));
        h.until("\r\n+QIND: \"csq\",20,99\r\n", Duration::from_secs(1));
        sim.clear_faults();
        h.drain_for(Duration::from_millis(150));
        assert_eq!(h.cmd("AT"), "\r\nOK\r\n");
        sim.inject_urc("RING");
        h.until("\r\nRING\r\n", Duration::from_secs(1));
    }

    #[test]
    fn garbage_and_overlong_lines_do_not_hurt() {
        let _g = serial();
        let (sim, _link) = start(SimOptions::default());
        let mut h = Host::open(&sim.port_path());
        h.cmd("ATE0");
        let mut junk: Vec<u8> = (0..=255u8).filter(|b| *b != b'\r' && *b != b'\n').collect();
        junk.push(b'\r');
        h.f.write_all(&junk).expect("write");
        h.drain_for(Duration::from_millis(150));
        let long = format!("AT+{}", "X".repeat(2000));
        assert_eq!(h.cmd(&long), "\r\nERROR\r\n");
        assert_eq!(h.cmd("AT"), "\r\nOK\r\n");
    }

    #[test]
    fn drop_removes_the_port_and_hangs_up() {
        let _g = serial();
        let (sim, _link) = start(SimOptions::default());
        let path = sim.port_path();
        let dir = path.parent().expect("temp dir").to_path_buf();
        let pts = sim.pts_path().expect("port present");
        let mut h = Host::open(&path);
        h.cmd("AT");
        let host_fd = std::os::fd::AsRawFd::as_raw_fd(&h.f);
        assert_eq!(fds_on(&pts, host_fd), 1, "the simulator holds the slave");
        assert!(sim_threads() >= 1, "the serving thread runs");
        drop(sim);
        assert!(!dir.exists(), "temporary directory removed");
        assert_hung_up(&mut h);
        assert_eq!(
            fds_on(&pts, host_fd),
            0,
            "only the host's descriptor is left"
        );
        assert_eq!(sim_threads(), 0, "serving and link threads joined");
    }

    /// Descriptors of this process open on `path` (also once its node is
    /// gone), other than `except`.
    fn fds_on(path: &Path, except: i32) -> usize {
        let path = path.to_string_lossy().into_owned();
        std::fs::read_dir("/proc/self/fd")
            .expect("/proc/self/fd")
            .flatten()
            .filter(|e| e.file_name().to_str() != Some(&except.to_string()))
            .filter(|e| {
                std::fs::read_link(e.path()).is_ok_and(|t| {
                    let t = t.to_string_lossy();
                    t == path.as_str() || t.starts_with(&format!("{path} "))
                })
            })
            .count()
    }

    /// Threads of this process named like the simulator's (pty tests run
    /// one at a time, so these are the current test's).
    fn sim_threads() -> usize {
        std::fs::read_dir("/proc/self/task")
            .expect("/proc/self/task")
            .flatten()
            .filter(|e| {
                std::fs::read_to_string(e.path().join("comm"))
                    .is_ok_and(|c| c.starts_with("modem-sim"))
            })
            .count()
    }

    /// The pty behind `h` is gone: a read ends at once with EOF or EIO
    /// (not the 100 ms read timeout), a write fails with EIO.
    fn assert_hung_up(h: &mut Host) {
        let t = Instant::now();
        loop {
            match h.read_once() {
                Ok(b) if !b.is_empty() => continue,
                Ok(_) => assert!(
                    t.elapsed() < Duration::from_millis(90),
                    "read timed out: no hang-up"
                ),
                Err(e) => assert_eq!(e.raw_os_error(), Some(nix::errno::Errno::EIO as i32), "{e}"),
            }
            break;
        }
        let err =
            h.f.write_all(b"AT\r")
                .expect_err("write to a vanished port");
        assert_eq!(err.raw_os_error(), Some(nix::errno::Errno::EIO as i32));
    }
}
