//! A device with N mobile uplinks, built from network namespaces.
//!
//! ```text
//!  root namespace ("the internet": control plane, targets, IP echo)
//!    internet address 203.0.113.{1+slot}/32 on cg{slot}r0
//!    cg{slot}r{i}  10.250.{slot}.{4i+1}/30, route 198.18.x.0/24 (uplink i's pool)
//!        | veth
//!  carrier namespace cg{slot}c{i}  (one per uplink: the operator's network)
//!    wan    current public address 198.18.x.k/32, default via the root side
//!           nft: masquerade out of wan; only the bed's internet is forwarded
//!    radio  10.{slot}.{i}.1/24 (the "modem" address a device talks to)
//!        | veth
//!  host namespace cg{slot}h  (the device: a Pi with N modems)
//!    wwan{i} 10.{slot}.{i}.h/24, default via 10.{slot}.{i}.1 metric 100+i
//! ```
//!
//! Glossary:
//! - **slot**: a number in `0..64` that one bed holds (an flock on
//!   `/run/cellgate-testbed/slot-N.lock`) for its lifetime; every name and
//!   address of the bed derives from it, so beds in parallel test processes
//!   never meet, and a bed starting on a slot first removes whatever a
//!   crashed run left there.
//! - **public address**: what the internet sees for an uplink: the carrier
//!   masquerades the device's traffic to the single address on its `wan`
//!   interface. Rotating replaces that address with the next one of the
//!   uplink's pool; the kernel then drops the NAT state of the old address
//!   (masquerade does that when its address goes away), so old flows die as
//!   they do behind a real carrier-grade NAT.
//! - **host address**: the device's private address on `wwan{i}` (the
//!   modem's DHCP lease); phones get a new one with each data session.
//! - **state file**: one JSON file per uplink holding the names, the pools
//!   and the current indexes. In-process calls ([`Uplink`]) and shell fakes
//!   (the `testbed_net` binary) both read and update it under an flock, so
//!   they always agree on the current addresses.
//!
//! The pools lie in 198.18.0.0/15 and the internet addresses in
//! 203.0.113.0/24: test ranges outside everything the target deny list
//! refuses, so an agent with the production policy can dial the bed's
//! internet and the control plane sees "public" egress addresses.
//!
//! A device reaches only its bed's internet: anything else is rejected by
//! the carrier (fast "unreachable", and nothing ever leaves the machine
//! whatever the root namespace forwards). `data_down` takes `wwan{i}` down,
//! as airplane mode does to a modem's interface: connects through it fail
//! at once, and unbound sockets fall back to the next uplink's route.
//!
//! Using it (sketch):
//!
//! ```ignore
//! let bed = Bed::new(BedOptions { uplinks: 2, ..Default::default() })?;
//! // Servers in the test process are in the root namespace already.
//! let cp = TcpListener::bind((bed.internet_ip(), 0))?;
//! // The agent runs on the device.
//! let agent = Proc::spawn("agent", netns_command(bed.host_ns(), &command(edge_agent_bin())), &log);
//! // A modem simulator drives uplink 1; a HiLink emulator lives in its carrier.
//! let link: Arc<dyn ModemLink> = bed.modem_link(1);
//! let web = bind_tcp_in(bed.carrier_ns(1), (bed.modem_ip(1), 80).into())?;
//! // A shell fake gets `bed.uplink_state_file(0)` and runs `testbed_net`.
//! ```
//!
//! Everything needs root (CAP_NET_ADMIN), `ip` (iproute2) and `nft`
//! (nftables); conntrack(8) is used only if the kernel ever keeps the NAT
//! state of a rotated address. `testbed_net sweep` removes what killed test
//! runs left behind in slots no bed holds.

use std::collections::BTreeSet;
use std::ffi::OsStr;
use std::fs::{File, OpenOptions};
use std::io::{self, Read, Write};
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4, TcpListener, TcpStream, UdpSocket};
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, bail, ensure};
use nix::errno::Errno;
use nix::fcntl::{Flock, FlockArg};
use nix::sched::CloneFlags;
use nix::sys::socket::{self, AddressFamily, SockFlag, SockType, SockaddrIn, sockopt};
use nix::sys::time::{TimeVal, TimeValLike};
use serde::{Deserialize, Serialize};

use super::ModemLink;

/// How many beds can exist at once on one machine.
pub const MAX_SLOTS: u8 = 64;
/// Uplinks per bed: the pools give each (slot, uplink) its own /24 of
/// 198.18.0.0/15, which holds 64 × 8 of them.
pub const MAX_UPLINKS: usize = 8;
/// The carrier interface facing the device (the radio side).
pub const CARRIER_RADIO_IF: &str = "radio";
/// The carrier interface facing the internet (the root namespace).
pub const CARRIER_WAN_IF: &str = "wan";

/// Host-address indexes cycle through `10.{slot}.{i}.2..=254` (.1 is the
/// modem); public ones through `1..=254` of the uplink's pool.
const FIRST_HOST_INDEX: u8 = 2;
const FIRST_POOL_INDEX: u8 = 1;
const LAST_INDEX: u8 = 254;
const HOST_PREFIX_LEN: u8 = 24;
const NAT_TABLE: &str = "cellgate";
const LOSS_TABLE: &str = "cellgate_loss";
/// Every `ip`/`nft` call is bounded; none takes more than milliseconds.
const COMMAND_TIMEOUT: Duration = Duration::from_secs(10);
/// How long to wait for another holder of an uplink's state lock.
const STATE_LOCK_TIMEOUT: Duration = Duration::from_secs(10);
/// How long the kernel may take to drop the NAT state of a rotated address.
const CONNTRACK_FLUSH_TIMEOUT: Duration = Duration::from_secs(2);
const STATE_VERSION: u32 = 1;

// ---------------------------------------------------------------------------
// The plan: names and addresses, a pure function of the slot.
// ---------------------------------------------------------------------------

/// The names and addresses of one bed, derived from its slot alone.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Plan {
    slot: u8,
    uplinks: usize,
}

impl Plan {
    pub fn new(slot: u8, uplinks: usize) -> anyhow::Result<Self> {
        ensure!(slot < MAX_SLOTS, "slot {slot} out of range 0..{MAX_SLOTS}");
        ensure!(
            (1..=MAX_UPLINKS).contains(&uplinks),
            "a bed has 1..={MAX_UPLINKS} uplinks, not {uplinks}"
        );
        Ok(Self { slot, uplinks })
    }

    pub fn slot(&self) -> u8 {
        self.slot
    }

    pub fn uplinks(&self) -> usize {
        self.uplinks
    }

    /// The device's namespace.
    pub fn host_ns(&self) -> String {
        format!("cg{}h", self.slot)
    }

    /// Uplink `i`'s carrier namespace.
    pub fn carrier_ns(&self, i: usize) -> String {
        format!("cg{}c{i}", self.slot)
    }

    /// The root-namespace end of uplink `i`'s link to its carrier.
    pub fn root_if(&self, i: usize) -> String {
        format!("cg{}r{i}", self.slot)
    }

    /// The device's interface for uplink `i` (inside the host namespace,
    /// so the same in every bed).
    pub fn host_if(i: usize) -> String {
        format!("wwan{i}")
    }

    /// Where the bed's internet lives: targets and the control plane listen
    /// here (or on 0.0.0.0), agents dial it.
    pub fn internet_ip(&self) -> Ipv4Addr {
        Ipv4Addr::new(203, 0, 113, 1 + self.slot)
    }

    /// The root side of uplink `i`'s link: the carrier's default gateway.
    pub fn root_gateway(&self, i: usize) -> Ipv4Addr {
        Ipv4Addr::new(10, 250, self.slot, 4 * i as u8 + 1)
    }

    /// The /24 that holds the root sides of all this bed's carrier links.
    pub fn root_links_net(&self) -> Ipv4Addr {
        Ipv4Addr::new(10, 250, self.slot, 0)
    }

    /// The MAC both ends of one of uplink `i`'s links share (`link` 1: the
    /// radio link, 2: the link to the root namespace); locally
    /// administered, unique per slot.
    pub fn link_mac(&self, i: usize, link: u8) -> String {
        format!("02:cb:{:02x}:{:02x}:00:{link:02x}", self.slot, i)
    }

    /// The first three octets of uplink `i`'s host /24.
    pub fn host_net(&self, i: usize) -> [u8; 3] {
        [10, self.slot, i as u8]
    }

    /// The first three octets of uplink `i`'s public /24.
    pub fn pool_net(&self, i: usize) -> [u8; 3] {
        let idx = self.slot as usize * MAX_UPLINKS + i;
        [198, 18 + (idx / 256) as u8, (idx % 256) as u8]
    }

    /// Names of the namespaces of this bed.
    pub fn namespaces(&self) -> Vec<String> {
        let mut v = vec![self.host_ns()];
        v.extend((0..self.uplinks).map(|i| self.carrier_ns(i)));
        v
    }

    /// The state of uplink `i` right after the bed is built.
    pub fn initial_state(&self, i: usize, opts: &BedOptions) -> UplinkState {
        let mut st = UplinkState {
            version: STATE_VERSION,
            slot: self.slot,
            uplink: i,
            host_ns: self.host_ns(),
            carrier_ns: self.carrier_ns(i),
            host_if: Self::host_if(i),
            carrier_radio_if: CARRIER_RADIO_IF.into(),
            carrier_wan_if: CARRIER_WAN_IF.into(),
            root_if: self.root_if(i),
            root_gateway: self.root_gateway(i),
            internet_ip: self.internet_ip(),
            route_metric: 100 + i as u32,
            host_net: self.host_net(i),
            host_index: FIRST_HOST_INDEX,
            pool_net: self.pool_net(i),
            pool_index: FIRST_POOL_INDEX,
            new_host_addr_on_rotation: opts.new_host_addr_on_rotation,
            data_up: true,
            loss_percent: 0,
            rotations: 0,
            public_ip: Ipv4Addr::UNSPECIFIED,
            host_addr: Ipv4Addr::UNSPECIFIED,
        };
        st.refresh_derived();
        st
    }
}

/// What kind of testbed object a name denotes, parsed back from the name,
/// so leftovers of a slot can be found without any record of them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SlotObject {
    /// `cg{slot}h`
    HostNs,
    /// `cg{slot}c{i}`
    CarrierNs(usize),
    /// `cg{slot}r{i}`
    RootIf(usize),
}

/// The slot and kind of a testbed name, `None` for anything else.
pub fn parse_slot_name(name: &str) -> Option<(u8, SlotObject)> {
    let rest = name.strip_prefix("cg")?;
    let digits = rest.bytes().take_while(u8::is_ascii_digit).count();
    if digits == 0 || digits > 2 {
        return None;
    }
    let slot: u8 = rest[..digits].parse().ok()?;
    if slot >= MAX_SLOTS || (digits == 2 && rest.starts_with('0')) {
        return None;
    }
    let tail = &rest[digits..];
    let index = |s: &str| -> Option<usize> {
        let ok = !s.is_empty()
            && s.len() <= 2
            && s.bytes().all(|b| b.is_ascii_digit())
            && !(s.len() == 2 && s.starts_with('0'));
        ok.then(|| s.parse().ok()).flatten()
    };
    let kind = if tail == "h" {
        SlotObject::HostNs
    } else if let Some(i) = tail.strip_prefix('c') {
        SlotObject::CarrierNs(index(i)?)
    } else if let Some(i) = tail.strip_prefix('r') {
        SlotObject::RootIf(index(i)?)
    } else {
        return None;
    };
    Some((slot, kind))
}

fn next_index(current: u8, first: u8) -> u8 {
    if current >= LAST_INDEX || current < first {
        first
    } else {
        current + 1
    }
}

fn addr(net: [u8; 3], host: u8) -> Ipv4Addr {
    Ipv4Addr::new(net[0], net[1], net[2], host)
}

// ---------------------------------------------------------------------------
// The state file.
// ---------------------------------------------------------------------------

/// Everything a process needs to act on one uplink, as stored in its state
/// file. The indexes are the truth; `public_ip` and `host_addr` are
/// rewritten from them on every save, for readers of the file.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UplinkState {
    pub version: u32,
    pub slot: u8,
    pub uplink: usize,
    pub host_ns: String,
    pub carrier_ns: String,
    pub host_if: String,
    pub carrier_radio_if: String,
    pub carrier_wan_if: String,
    pub root_if: String,
    pub root_gateway: Ipv4Addr,
    pub internet_ip: Ipv4Addr,
    /// Metric of the host's default route through this uplink (uplink 0
    /// is the preferred one).
    pub route_metric: u32,
    /// First three octets of the host /24; the modem (carrier) is `.1`.
    pub host_net: [u8; 3],
    pub host_index: u8,
    /// First three octets of the public /24.
    pub pool_net: [u8; 3],
    pub pool_index: u8,
    /// Whether a rotation also renews the device's private address, as a
    /// phone's new data session does.
    pub new_host_addr_on_rotation: bool,
    pub data_up: bool,
    pub loss_percent: u8,
    /// How many times the public address changed.
    pub rotations: u32,
    pub public_ip: Ipv4Addr,
    pub host_addr: Ipv4Addr,
}

impl UplinkState {
    pub fn public_ip(&self) -> Ipv4Addr {
        addr(self.pool_net, self.pool_index)
    }

    pub fn host_addr(&self) -> Ipv4Addr {
        addr(self.host_net, self.host_index)
    }

    /// The modem's address on the radio link: the host's gateway.
    pub fn host_gateway(&self) -> Ipv4Addr {
        addr(self.host_net, 1)
    }

    /// Advance to the next public address; returns (old, new).
    pub fn advance_public(&mut self) -> (Ipv4Addr, Ipv4Addr) {
        let old = self.public_ip();
        self.pool_index = next_index(self.pool_index, FIRST_POOL_INDEX);
        self.rotations += 1;
        self.refresh_derived();
        (old, self.public_ip())
    }

    /// Advance to the next host address; returns (old, new).
    pub fn advance_host(&mut self) -> (Ipv4Addr, Ipv4Addr) {
        let old = self.host_addr();
        self.host_index = next_index(self.host_index, FIRST_HOST_INDEX);
        self.refresh_derived();
        (old, self.host_addr())
    }

    fn refresh_derived(&mut self) {
        self.public_ip = self.public_ip();
        self.host_addr = self.host_addr();
    }

    pub fn to_json(&self) -> String {
        let mut s = self.clone();
        s.refresh_derived();
        serde_json::to_string_pretty(&s).expect("state serialises")
    }

    pub fn from_json(text: &str) -> anyhow::Result<Self> {
        let st: Self = serde_json::from_str(text).context("parsing the uplink state file")?;
        ensure!(
            st.version == STATE_VERSION,
            "uplink state version {} (this code reads {STATE_VERSION})",
            st.version
        );
        Ok(st)
    }
}

// ---------------------------------------------------------------------------
// Running ip / nft.
// ---------------------------------------------------------------------------

/// `ip netns exec <ns> <program>`: a command that runs inside `ns`.
pub fn command_in(ns: &str, program: impl AsRef<OsStr>) -> Command {
    let mut cmd = Command::new("ip");
    cmd.args(["netns", "exec", ns]).arg(program);
    cmd
}

/// The same command as `cmd` (program, arguments, environment changes,
/// working directory), run inside `ns`: wraps a harness-built command,
/// e.g. `Proc::spawn("agent", netns_command(bed.host_ns(), &command(edge_agent_bin())), log)`.
pub fn netns_command(ns: &str, cmd: &Command) -> Command {
    let mut wrapped = command_in(ns, cmd.get_program());
    wrapped.args(cmd.get_args());
    for (k, v) in cmd.get_envs() {
        match v {
            Some(v) => wrapped.env(k, v),
            None => wrapped.env_remove(k),
        };
    }
    if let Some(dir) = cmd.get_current_dir() {
        wrapped.current_dir(dir);
    }
    wrapped
}

/// Run `cmd` to completion within [`COMMAND_TIMEOUT`], feeding it `stdin`;
/// its stdout on success, an error carrying its stderr otherwise.
fn run(mut cmd: Command, stdin: Option<&str>) -> anyhow::Result<String> {
    let shown = format!("{cmd:?}");
    cmd.stdin(if stdin.is_some() {
        Stdio::piped()
    } else {
        Stdio::null()
    })
    .stdout(Stdio::piped())
    .stderr(Stdio::piped());
    let mut child = cmd
        .spawn()
        .with_context(|| format!("cannot run {shown} (is iproute2/nftables installed?)"))?;
    if let (Some(text), Some(mut pipe)) = (stdin, child.stdin.take()) {
        pipe.write_all(text.as_bytes())
            .with_context(|| format!("writing the input of {shown}"))?;
    }
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
        if let Some(s) = child.try_wait()? {
            break s;
        }
        if start.elapsed() >= COMMAND_TIMEOUT {
            let _ = child.kill();
            let _ = child.wait();
            bail!("{shown} did not finish within {COMMAND_TIMEOUT:?}");
        }
        std::thread::sleep(Duration::from_millis(2));
    };
    let stdout = String::from_utf8_lossy(&out_t.join().unwrap_or_default()).into_owned();
    let stderr = String::from_utf8_lossy(&err_t.join().unwrap_or_default()).into_owned();
    if !status.success() {
        let input = stdin.map(|s| format!("\ninput:\n{s}")).unwrap_or_default();
        bail!("{shown} failed ({status}): {}{input}", stderr.trim());
    }
    Ok(stdout)
}

/// `ip [-n ns] -batch -` with one command per line; stops at the first
/// failing line unless `force`.
fn ip_batch(ns: Option<&str>, lines: &[String], force: bool) -> anyhow::Result<()> {
    if lines.is_empty() {
        return Ok(());
    }
    let mut cmd = Command::new("ip");
    if let Some(ns) = ns {
        cmd.args(["-n", ns]);
    }
    if force {
        cmd.arg("-force");
    }
    cmd.args(["-batch", "-"]);
    run(cmd, Some(&(lines.join("\n") + "\n"))).map(drop)
}

fn nft(ns: &str, script: &str) -> anyhow::Result<()> {
    let mut cmd = command_in(ns, "nft");
    cmd.args(["-f", "-"]);
    run(cmd, Some(script)).map(drop)
}

// ---------------------------------------------------------------------------
// Namespaces from the test process.
// ---------------------------------------------------------------------------

/// The file `ip netns` keeps a named namespace alive with.
pub fn netns_path(ns: &str) -> PathBuf {
    Path::new("/run/netns").join(ns)
}

/// Run `f` on a fresh thread that has entered the network namespace `ns`.
/// Sockets created there stay in that namespace for their whole life, so
/// this is how a test binds a server or an emulator inside a carrier or
/// the host namespace; the calling thread never changes namespace.
pub fn in_netns<T: Send>(ns: &str, f: impl FnOnce() -> T + Send) -> io::Result<T> {
    let file = File::open(netns_path(ns))
        .map_err(|e| io::Error::new(e.kind(), format!("namespace {ns}: {e}")))?;
    std::thread::scope(|s| {
        s.spawn(move || -> io::Result<T> {
            nix::sched::setns(&file, CloneFlags::CLONE_NEWNET).map_err(io::Error::from)?;
            Ok(f())
        })
        .join()
        .unwrap_or_else(|panic| std::panic::resume_unwind(panic))
    })
}

/// A TCP listener bound to `addr` inside `ns`.
pub fn bind_tcp_in(ns: &str, addr: SocketAddr) -> io::Result<TcpListener> {
    in_netns(ns, || TcpListener::bind(addr))?
}

/// A UDP socket bound to `addr` inside `ns`.
pub fn bind_udp_in(ns: &str, addr: SocketAddr) -> io::Result<UdpSocket> {
    in_netns(ns, || UdpSocket::bind(addr))?
}

/// A UDP socket inside `ns` bound to `addr` and, with `device`, to that
/// interface (SO_BINDTODEVICE), as an agent pins a flow to one modem.
pub fn udp_socket_in(ns: &str, device: Option<&str>, addr: SocketAddr) -> io::Result<UdpSocket> {
    in_netns(ns, || {
        let sock = UdpSocket::bind(addr)?;
        if let Some(dev) = device {
            socket::setsockopt(&sock, sockopt::BindToDevice, &dev.into())?;
        }
        Ok(sock)
    })?
}

/// Connect to `to` from inside `ns`, through `device` when given
/// (SO_BINDTODEVICE), giving up after `timeout`.
pub fn connect_tcp_in(
    ns: &str,
    device: Option<&str>,
    to: SocketAddrV4,
    timeout: Duration,
) -> io::Result<TcpStream> {
    in_netns(ns, || -> io::Result<TcpStream> {
        let fd: OwnedFd = socket::socket(
            AddressFamily::Inet,
            SockType::Stream,
            SockFlag::SOCK_CLOEXEC,
            None,
        )?;
        if let Some(dev) = device {
            socket::setsockopt(&fd, sockopt::BindToDevice, &dev.into())?;
        }
        // Linux bounds a blocking connect by the send timeout.
        let ms = timeout.as_millis().clamp(1, i64::MAX as u128) as i64;
        socket::setsockopt(&fd, sockopt::SendTimeout, &TimeVal::milliseconds(ms))?;
        match socket::connect(fd.as_raw_fd(), &SockaddrIn::from(to)) {
            Ok(()) => {}
            Err(Errno::EINPROGRESS) => {
                return Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    format!("connect to {to} timed out after {timeout:?}"),
                ));
            }
            Err(e) => return Err(e.into()),
        }
        socket::setsockopt(&fd, sockopt::SendTimeout, &TimeVal::zero())?;
        Ok(TcpStream::from(fd))
    })?
}

/// Set sysctls (dotted names) of the namespace `ns`.
fn sysctls_in(ns: &str, settings: &[(&str, &str)]) -> anyhow::Result<()> {
    in_netns(ns, || -> anyhow::Result<()> {
        for (key, value) in settings {
            let path = Path::new("/proc/sys").join(key.replace('.', "/"));
            std::fs::write(&path, value).with_context(|| format!("{ns}: sysctl {key}={value}"))?;
        }
        Ok(())
    })?
}

/// The `testbed_net` binary next to the test executable, or
/// `CELLGATE_TESTBED_NET_BIN`.
pub fn testbed_net_bin() -> PathBuf {
    crate::harness::process::locate("testbed_net", "CELLGATE_TESTBED_NET_BIN")
}

// ---------------------------------------------------------------------------
// Locks.
// ---------------------------------------------------------------------------

/// Where slot locks and state files live.
pub fn testbed_dir() -> PathBuf {
    std::env::var_os("CELLGATE_TESTBED_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/run/cellgate-testbed"))
}

/// An exclusive flock on a file that is only removed by its holder: after
/// locking, the path must still name the locked file, or a previous holder
/// removed it in between and the lock is worthless.
fn try_lock_path(path: &Path) -> anyhow::Result<Option<Flock<File>>> {
    let file = OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(path)
        .with_context(|| format!("opening {}", path.display()))?;
    let lock = match Flock::lock(file, FlockArg::LockExclusiveNonblock) {
        Ok(l) => l,
        Err((_, Errno::EWOULDBLOCK)) => return Ok(None),
        Err((_, e)) => return Err(e).with_context(|| format!("flock {}", path.display())),
    };
    let held = lock.metadata()?;
    match std::fs::metadata(path) {
        Ok(m) if m.ino() == held.ino() && m.dev() == held.dev() => Ok(Some(lock)),
        _ => Ok(None),
    }
}

fn lock_path_bounded(path: &Path, timeout: Duration) -> anyhow::Result<Flock<File>> {
    let start = Instant::now();
    loop {
        if let Some(l) = try_lock_path(path)? {
            return Ok(l);
        }
        ensure!(
            start.elapsed() < timeout,
            "{} stayed locked for {timeout:?}",
            path.display()
        );
        std::thread::sleep(Duration::from_millis(5));
    }
}

// ---------------------------------------------------------------------------
// One uplink.
// ---------------------------------------------------------------------------

/// One uplink of a bed, acting through its state file. Cheap to open from
/// anywhere (the `testbed_net` binary does); every operation takes the
/// state lock, applies the change to the namespaces and saves the state.
#[derive(Debug)]
pub struct Uplink {
    state_file: PathBuf,
    lock_file: PathBuf,
}

impl Uplink {
    /// The uplink whose state is in `state_file`.
    pub fn open(state_file: impl Into<PathBuf>) -> Self {
        let state_file = state_file.into();
        let lock_file = state_file.with_extension("lock");
        Self {
            state_file,
            lock_file,
        }
    }

    pub fn state_file(&self) -> &Path {
        &self.state_file
    }

    /// The current state, read under the lock.
    pub fn state(&self) -> anyhow::Result<UplinkState> {
        self.with_state(|st| Ok(st.clone()))
    }

    fn with_state<T>(
        &self,
        f: impl FnOnce(&mut UplinkState) -> anyhow::Result<T>,
    ) -> anyhow::Result<T> {
        let _lock = lock_path_bounded(&self.lock_file, STATE_LOCK_TIMEOUT)?;
        let text = std::fs::read_to_string(&self.state_file)
            .with_context(|| format!("reading {}", self.state_file.display()))?;
        let mut st = UplinkState::from_json(&text)?;
        let before = st.clone();
        let out = f(&mut st)?;
        if st != before {
            write_state(&self.state_file, &st)?;
        }
        Ok(out)
    }

    /// The data session ends: the device's interface goes down, as it does
    /// with a modem in airplane mode (the address stays, the routes go).
    pub fn try_data_down(&self) -> anyhow::Result<()> {
        self.with_state(|st| {
            ip_batch(
                Some(&st.host_ns),
                &[format!("link set dev {} down", st.host_if)],
                false,
            )?;
            st.data_up = false;
            Ok(())
        })
    }

    /// The data session comes back, with a new public address when
    /// `new_ip` (and a new host address too when the bed says so).
    /// Returns the public address.
    pub fn try_data_up(&self, new_ip: bool) -> anyhow::Result<Ipv4Addr> {
        self.with_state(|st| {
            if new_ip {
                rotate_public(st)?;
                if st.new_host_addr_on_rotation {
                    renumber_host(st)?;
                }
            }
            link_up(st)?;
            Ok(st.public_ip())
        })
    }

    /// Give the device's interface a new address, adding it before the old
    /// one is deleted (no outage; the kernel promotes the new address).
    /// Returns the new host address.
    pub fn try_hot_swap_host_addr(&self) -> anyhow::Result<Ipv4Addr> {
        self.with_state(|st| {
            let (old, new) = st.advance_host();
            let mut lines = vec![
                format!("addr add {new}/{HOST_PREFIX_LEN} dev {}", st.host_if),
                format!("addr del {old}/{HOST_PREFIX_LEN} dev {}", st.host_if),
            ];
            if st.data_up {
                lines.push(default_route(st));
            }
            ip_batch(Some(&st.host_ns), &lines, false)?;
            Ok(new)
        })
    }

    /// Down for `down_for`, then up with the same public address and, with
    /// `new_host_addr`, a new host address. The state lock is not held
    /// while the link is down, so other changes may land in between.
    pub fn try_link_flap(&self, down_for: Duration, new_host_addr: bool) -> anyhow::Result<()> {
        self.try_data_down()?;
        std::thread::sleep(down_for);
        self.with_state(|st| {
            if new_host_addr {
                renumber_host(st)?;
            }
            link_up(st)
        })
    }

    /// Drop `percent` % of the packets the carrier forwards, each way
    /// (0 removes the loss).
    pub fn try_set_loss(&self, percent: u8) -> anyhow::Result<()> {
        ensure!(percent <= 100, "loss {percent} % is not a percentage");
        self.with_state(|st| {
            apply_loss(&st.carrier_ns, percent)?;
            st.loss_percent = percent;
            Ok(())
        })
    }

    /// The current public address.
    pub fn try_public_ip(&self) -> anyhow::Result<Ipv4Addr> {
        self.with_state(|st| Ok(st.public_ip()))
    }

    /// The current host (private) address.
    pub fn host_addr(&self) -> Ipv4Addr {
        self.with_state(|st| Ok(st.host_addr()))
            .unwrap_or_else(|e| panic!("uplink {}: {e:#}", self.state_file.display()))
    }
}

fn expect_ok<T>(link: &Uplink, what: &str, r: anyhow::Result<T>) -> T {
    r.unwrap_or_else(|e| panic!("{what} on {}: {e:#}", link.state_file.display()))
}

impl ModemLink for Uplink {
    fn data_down(&self) {
        expect_ok(self, "data_down", self.try_data_down());
    }

    fn data_up(&self, new_ip: bool) {
        expect_ok(self, "data_up", self.try_data_up(new_ip));
    }

    fn public_ip(&self) -> Ipv4Addr {
        expect_ok(self, "public_ip", self.try_public_ip())
    }
}

fn write_state(path: &Path, st: &UplinkState) -> anyhow::Result<()> {
    let tmp = path.with_extension("json.tmp");
    std::fs::write(&tmp, st.to_json() + "\n")
        .with_context(|| format!("writing {}", tmp.display()))?;
    std::fs::rename(&tmp, path).with_context(|| format!("replacing {}", path.display()))
}

fn default_route(st: &UplinkState) -> String {
    format!(
        "route replace default via {} dev {} metric {}",
        st.host_gateway(),
        st.host_if,
        st.route_metric
    )
}

/// Bring the device's interface up and restore its default route (the
/// kernel deletes routes through an interface that goes down).
fn link_up(st: &mut UplinkState) -> anyhow::Result<()> {
    ip_batch(
        Some(&st.host_ns),
        &[format!("link set dev {} up", st.host_if), default_route(st)],
        false,
    )?;
    st.data_up = true;
    Ok(())
}

/// Replace the device's address (whatever is on the interface goes).
fn renumber_host(st: &mut UplinkState) -> anyhow::Result<()> {
    let (_, new) = st.advance_host();
    let mut lines = vec![
        format!("addr flush dev {}", st.host_if),
        format!("addr add {new}/{HOST_PREFIX_LEN} dev {}", st.host_if),
    ];
    if st.data_up {
        lines.push(default_route(st));
    }
    ip_batch(Some(&st.host_ns), &lines, false)
}

/// Move the carrier to the next public address of the pool. The new
/// address is added before the old one goes: deleting the last address of
/// `wan` would take the carrier's default route with it. Deleting the old
/// address makes the kernel drop the masqueraded flows that used it.
fn rotate_public(st: &mut UplinkState) -> anyhow::Result<()> {
    let (old, new) = st.advance_public();
    ip_batch(
        Some(&st.carrier_ns),
        &[
            format!("addr add {new}/32 dev {}", st.carrier_wan_if),
            format!("addr del {old}/32 dev {}", st.carrier_wan_if),
            format!(
                "route replace default via {} dev {} onlink",
                st.root_gateway, st.carrier_wan_if
            ),
        ],
        false,
    )?;
    wait_conntrack_forgets(&st.carrier_ns, old)
}

/// Wait until no connection-tracking entry of the carrier still maps to
/// `old`. The kernel drops them asynchronously; if it has not within the
/// bound, flush the carrier's table with conntrack(8) when installed.
fn wait_conntrack_forgets(carrier_ns: &str, old: Ipv4Addr) -> anyhow::Result<()> {
    let needle = format!("dst={old} ");
    let read = || {
        in_netns(carrier_ns, || {
            std::fs::read_to_string("/proc/thread-self/net/nf_conntrack")
        })
        .and_then(|r| r)
    };
    let start = Instant::now();
    loop {
        match read() {
            Ok(table) if !table.contains(&needle) => return Ok(()),
            Ok(_) if start.elapsed() < CONNTRACK_FLUSH_TIMEOUT => {
                std::thread::sleep(Duration::from_millis(10));
            }
            Ok(_) => break,
            // No conntrack table in /proc on this kernel: nothing to check.
            Err(e) if e.kind() == io::ErrorKind::NotFound => break,
            Err(e) => return Err(e).context("reading the carrier's conntrack table"),
        }
    }
    let mut cmd = command_in(carrier_ns, "conntrack");
    cmd.arg("-F");
    match run(cmd, None) {
        Ok(_) => Ok(()),
        Err(e) => match read() {
            Ok(table) if table.contains(&needle) => Err(e).context(format!(
                "NAT state of {old} survived the rotation (apt-get install conntrack)"
            )),
            _ => Ok(()),
        },
    }
}

fn apply_loss(carrier_ns: &str, percent: u8) -> anyhow::Result<()> {
    nft(carrier_ns, &loss_script(percent))
}

/// The nft script that sets a carrier's loss to `percent` (0: none).
fn loss_script(percent: u8) -> String {
    // Declaring the table first makes the delete succeed when it is absent.
    let mut script = format!("table inet {LOSS_TABLE}\ndelete table inet {LOSS_TABLE}\n");
    if percent > 0 {
        // numgen's modulus is exclusive: 100 % loss is a plain drop.
        let matcher = if percent >= 100 {
            String::new()
        } else {
            format!("numgen random mod 100 < {percent} ")
        };
        script += &format!(
            "table inet {LOSS_TABLE} {{\n\
             \tchain forward {{\n\
             \t\ttype filter hook forward priority -10; policy accept;\n\
             \t\t{matcher}counter drop\n\
             \t}}\n\
             }}\n"
        );
    }
    script
}

/// The carrier's NAT and its guard: the device reaches the bed's internet
/// (and the carrier links' root sides) and nothing else, whatever the root
/// namespace's forwarding settings.
fn carrier_nft(plan: &Plan) -> String {
    format!(
        "table ip {NAT_TABLE} {{\n\
         \tchain postrouting {{\n\
         \t\ttype nat hook postrouting priority srcnat; policy accept;\n\
         \t\toifname \"{CARRIER_WAN_IF}\" masquerade\n\
         \t}}\n\
         \tchain forward {{\n\
         \t\ttype filter hook forward priority filter; policy accept;\n\
         \t\tiifname \"{CARRIER_RADIO_IF}\" ip daddr != {{ {}, {}/24 }} counter reject with icmp type admin-prohibited\n\
         \t}}\n\
         }}\n",
        plan.internet_ip(),
        plan.root_links_net()
    )
}

// ---------------------------------------------------------------------------
// The bed.
// ---------------------------------------------------------------------------

/// How to build a [`Bed`].
#[derive(Clone, Debug)]
pub struct BedOptions {
    /// Modems of the device, `1..=MAX_UPLINKS`.
    pub uplinks: usize,
    /// Whether a rotation (`data_up(true)`) also gives the device a new
    /// private address, as phones get; HiLink sticks keep theirs.
    pub new_host_addr_on_rotation: bool,
}

impl Default for BedOptions {
    fn default() -> Self {
        Self {
            uplinks: 1,
            new_host_addr_on_rotation: true,
        }
    }
}

/// A device namespace with its uplinks, carriers and internet. Dropping it
/// removes every namespace, interface, route and file of its slot, also
/// while a test panics; [`Bed::close`] does the same and reports failures.
#[derive(Debug)]
pub struct Bed {
    plan: Plan,
    dir: PathBuf,
    /// `None` once the bed is closed.
    hold: Option<SlotHold>,
    host_ns: String,
    carrier_ns: Vec<String>,
    uplinks: Vec<Arc<Uplink>>,
}

impl Bed {
    pub fn new(opts: BedOptions) -> anyhow::Result<Self> {
        ensure!(
            nix::unistd::geteuid().is_root(),
            "the netns testbed needs root (it creates namespaces and interfaces)"
        );
        // Validates the uplink count before anything is touched.
        Plan::new(0, opts.uplinks)?;
        let base = testbed_dir();
        std::fs::create_dir_all(&base).with_context(|| format!("creating {}", base.display()))?;
        let hold = acquire_slot(&base)?;
        let slot = hold.slot();
        let plan = Plan::new(slot, opts.uplinks)?;
        let mut bed = Bed {
            plan,
            dir: base.join(format!("slot-{slot}")),
            hold: Some(hold),
            host_ns: plan.host_ns(),
            carrier_ns: (0..opts.uplinks).map(|i| plan.carrier_ns(i)).collect(),
            uplinks: Vec::new(),
        };
        // From here on a failure drops `bed`, which sweeps the slot.
        sweep_slot(slot).context("removing leftovers of an earlier run")?;
        let _ = std::fs::remove_dir_all(&bed.dir);
        std::fs::create_dir_all(&bed.dir)?;
        bed.build(&opts)
            .with_context(|| format!("building testbed slot {slot}"))?;
        Ok(bed)
    }

    fn build(&mut self, opts: &BedOptions) -> anyhow::Result<()> {
        let plan = self.plan;
        let n = plan.uplinks();
        let states: Vec<UplinkState> = (0..n).map(|i| plan.initial_state(i, opts)).collect();

        ip_batch(
            None,
            &plan
                .namespaces()
                .iter()
                .map(|ns| format!("netns add {ns}"))
                .collect::<Vec<_>>(),
            false,
        )?;
        // Per-device settings copy `default`, so these go in before any
        // interface exists. Reverse-path filtering would drop replies on
        // the non-preferred uplinks; promote_secondaries keeps a hot swap
        // from deleting the new address with the old one.
        sysctls_in(
            &self.host_ns,
            &[
                ("net.ipv4.conf.all.rp_filter", "0"),
                ("net.ipv4.conf.default.rp_filter", "0"),
                ("net.ipv4.conf.all.promote_secondaries", "1"),
                ("net.ipv4.conf.default.promote_secondaries", "1"),
            ],
        )?;
        for ns in &self.carrier_ns {
            sysctls_in(
                ns,
                &[
                    ("net.ipv4.conf.all.rp_filter", "0"),
                    ("net.ipv4.conf.default.rp_filter", "0"),
                    ("net.ipv4.ip_forward", "1"),
                ],
            )?;
        }

        // Both links of an uplink are point-to-point without ARP, as a
        // modem's raw-IP wwan interface is: the two ends of a pair share
        // one MAC, so frames sent to "self" reach the peer. Neighbour
        // resolution could otherwise stall a fresh bed or a new address for
        // a full ARP retransmit (1 s) on a busy machine, dropping the oldest
        // queued packets meanwhile.
        let mut root = Vec::new();
        for st in &states {
            root.push(format!(
                "link add {} address {} netns {} type veth \
                 peer name {CARRIER_RADIO_IF} address {} netns {}",
                st.host_if,
                plan.link_mac(st.uplink, 1),
                st.host_ns,
                plan.link_mac(st.uplink, 1),
                st.carrier_ns
            ));
            root.push(format!(
                "link add {} address {} type veth \
                 peer name {CARRIER_WAN_IF} address {} netns {}",
                st.root_if,
                plan.link_mac(st.uplink, 2),
                plan.link_mac(st.uplink, 2),
                st.carrier_ns
            ));
            root.push(format!(
                "addr add {}/30 dev {}",
                st.root_gateway, st.root_if
            ));
            root.push(format!("link set dev {} arp off up", st.root_if));
            let p = st.pool_net;
            root.push(format!(
                "route replace {}.{}.{}.0/24 dev {}",
                p[0], p[1], p[2], st.root_if
            ));
        }
        root.push(format!(
            "addr add {}/32 dev {}",
            plan.internet_ip(),
            plan.root_if(0)
        ));
        ip_batch(None, &root, false)?;

        for st in &states {
            ip_batch(
                Some(&st.carrier_ns),
                &[
                    "link set dev lo up".to_string(),
                    format!(
                        "addr add {}/{HOST_PREFIX_LEN} dev {CARRIER_RADIO_IF}",
                        st.host_gateway()
                    ),
                    format!("link set dev {CARRIER_RADIO_IF} arp off up"),
                    format!("addr add {}/32 dev {CARRIER_WAN_IF}", st.public_ip()),
                    format!("link set dev {CARRIER_WAN_IF} arp off up"),
                    format!(
                        "route replace default via {} dev {CARRIER_WAN_IF} onlink",
                        st.root_gateway
                    ),
                ],
                false,
            )?;
            nft(&st.carrier_ns, &carrier_nft(&plan))?;
        }

        let mut host = vec!["link set dev lo up".to_string()];
        for st in &states {
            host.push(format!(
                "addr add {}/{HOST_PREFIX_LEN} dev {}",
                st.host_addr(),
                st.host_if
            ));
            host.push(format!("link set dev {} arp off up", st.host_if));
            host.push(default_route(st));
        }
        ip_batch(Some(&self.host_ns), &host, false)?;

        for (i, st) in states.iter().enumerate() {
            let path = self.uplink_state_file(i);
            write_state(&path, st)?;
            self.uplinks.push(Arc::new(Uplink::open(path)));
        }
        Ok(())
    }

    pub fn slot(&self) -> u8 {
        self.plan.slot()
    }

    pub fn plan(&self) -> &Plan {
        &self.plan
    }

    pub fn uplink_count(&self) -> usize {
        self.plan.uplinks()
    }

    /// The address of the bed's internet in the root namespace.
    pub fn internet_ip(&self) -> Ipv4Addr {
        self.plan.internet_ip()
    }

    /// The device's namespace.
    pub fn host_ns(&self) -> &str {
        &self.host_ns
    }

    /// Uplink `i`'s carrier namespace (where a modem emulator lives).
    pub fn carrier_ns(&self, i: usize) -> &str {
        &self.carrier_ns[i]
    }

    /// The device's interface for uplink `i`.
    pub fn host_if(&self, i: usize) -> String {
        Plan::host_if(i)
    }

    /// The modem's address as the device sees it on `wwan{i}` (the
    /// carrier side of the radio link): where a HiLink-style web API
    /// bound in the carrier namespace answers.
    pub fn modem_ip(&self, i: usize) -> Ipv4Addr {
        addr(self.plan.host_net(i), 1)
    }

    /// Uplink `i`, to hand to a modem simulator as its [`ModemLink`].
    pub fn uplink(&self, i: usize) -> Arc<Uplink> {
        Arc::clone(&self.uplinks[i])
    }

    /// Uplink `i` as the trait object simulators take.
    pub fn modem_link(&self, i: usize) -> Arc<dyn ModemLink> {
        self.uplink(i)
    }

    /// The file `testbed_net --state` takes for uplink `i`.
    pub fn uplink_state_file(&self, i: usize) -> PathBuf {
        self.dir.join(format!("uplink-{i}.json"))
    }

    /// The bed's directory (state and lock files).
    pub fn state_dir(&self) -> &Path {
        &self.dir
    }

    /// The address the internet currently sees for uplink `i`.
    pub fn public_ip(&self, i: usize) -> Ipv4Addr {
        self.uplinks[i].public_ip()
    }

    /// The device's current address on `wwan{i}`.
    pub fn host_addr(&self, i: usize) -> Ipv4Addr {
        self.uplinks[i].host_addr()
    }

    /// See [`Uplink::try_hot_swap_host_addr`].
    pub fn hot_swap_host_addr(&self, i: usize) -> anyhow::Result<Ipv4Addr> {
        self.uplinks[i].try_hot_swap_host_addr()
    }

    /// See [`Uplink::try_link_flap`].
    pub fn link_flap(
        &self,
        i: usize,
        down_for: Duration,
        new_host_addr: bool,
    ) -> anyhow::Result<()> {
        self.uplinks[i].try_link_flap(down_for, new_host_addr)
    }

    /// See [`Uplink::try_set_loss`].
    pub fn set_loss(&self, i: usize, percent: u8) -> anyhow::Result<()> {
        self.uplinks[i].try_set_loss(percent)
    }

    /// A command that runs inside the device's namespace.
    pub fn command_in_host(&self, program: impl AsRef<OsStr>) -> Command {
        command_in(&self.host_ns, program)
    }
}

impl Bed {
    /// Tear the bed down and report whether anything of it remains; the
    /// slot stays reserved until the returned hold drops, so a test can
    /// look at the machine without another bed reusing the names.
    pub fn close(mut self) -> anyhow::Result<SlotHold> {
        let result = self.teardown();
        let hold = self.hold.take().expect("an open bed holds its slot");
        result.map(|()| hold)
    }

    fn teardown(&self) -> anyhow::Result<()> {
        let swept = sweep_slot(self.slot());
        if std::env::var_os("CELLGATE_E2E_KEEP").is_none() {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
        swept
    }
}

impl Drop for Bed {
    fn drop(&mut self) {
        if self.hold.is_some()
            && let Err(e) = self.teardown()
        {
            eprintln!("netns testbed slot {}: cleanup failed: {e:#}", self.slot());
        }
    }
}

/// A reserved slot: an exclusive flock on `slot-N.lock`. The file is
/// removed while still locked, so no one can lock a file that is about to
/// vanish (`try_lock_path` checks the path after locking).
#[derive(Debug)]
pub struct SlotHold {
    slot: u8,
    path: PathBuf,
    lock: Option<Flock<File>>,
}

impl SlotHold {
    pub fn slot(&self) -> u8 {
        self.slot
    }
}

impl Drop for SlotHold {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
        drop(self.lock.take());
    }
}

fn try_hold_slot(base: &Path, slot: u8) -> anyhow::Result<Option<SlotHold>> {
    let path = base.join(format!("slot-{slot}.lock"));
    Ok(try_lock_path(&path)?.map(|lock| SlotHold {
        slot,
        path,
        lock: Some(lock),
    }))
}

fn acquire_slot(base: &Path) -> anyhow::Result<SlotHold> {
    for slot in 0..MAX_SLOTS {
        if let Some(hold) = try_hold_slot(base, slot)? {
            return Ok(hold);
        }
    }
    bail!(
        "all {MAX_SLOTS} testbed slots are in use (locks in {})",
        base.display()
    )
}

/// Remove the leftovers of every slot no bed holds now (what crashed or
/// killed test processes left); returns the slots that had any.
pub fn sweep_unused_slots() -> anyhow::Result<Vec<u8>> {
    let base = testbed_dir();
    let mut swept = Vec::new();
    for slot in 0..MAX_SLOTS {
        // Without the directory no bed can hold a slot.
        let hold = if base.is_dir() {
            match try_hold_slot(&base, slot)? {
                Some(h) => Some(h),
                None => continue, // a live bed
            }
        } else {
            None
        };
        if !slot_leftovers(slot)?.is_empty() {
            sweep_slot(slot)?;
            swept.push(slot);
        }
        let _ = std::fs::remove_dir_all(base.join(format!("slot-{slot}")));
        drop(hold);
    }
    Ok(swept)
}

/// The namespaces and root interfaces of `slot` that exist now.
pub fn slot_leftovers(slot: u8) -> anyhow::Result<Vec<String>> {
    let mut found = BTreeSet::new();
    match std::fs::read_dir("/run/netns") {
        Ok(dir) => {
            for entry in dir {
                let name = entry?.file_name().to_string_lossy().into_owned();
                if matches!(parse_slot_name(&name), Some((s, SlotObject::HostNs | SlotObject::CarrierNs(_))) if s == slot)
                {
                    found.insert(name);
                }
            }
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(e).context("listing /run/netns"),
    }
    let links = run(
        {
            let mut c = Command::new("ip");
            c.args(["-o", "link", "show"]);
            c
        },
        None,
    )?;
    for line in links.lines() {
        // "7: cg3r0@if2: <BROADCAST,..."
        let Some(name) = line.split(": ").nth(1) else {
            continue;
        };
        let name = name.split('@').next().unwrap_or(name);
        if matches!(parse_slot_name(name), Some((s, SlotObject::RootIf(_))) if s == slot) {
            found.insert(name.to_string());
        }
    }
    Ok(found.into_iter().collect())
}

/// Delete everything of `slot`: root interfaces (which takes their carrier
/// ends along), the device's interfaces, then the namespaces. Interfaces
/// go explicitly because a namespace outlives `ip netns del` while a
/// socket inside it is still open.
fn sweep_slot(slot: u8) -> anyhow::Result<()> {
    let names = slot_leftovers(slot)?;
    if names.is_empty() {
        return Ok(());
    }
    let mut root = Vec::new();
    let mut namespaces = Vec::new();
    for name in &names {
        match parse_slot_name(name) {
            Some((_, SlotObject::RootIf(_))) => root.push(format!("link del {name}")),
            Some((_, SlotObject::HostNs)) => {
                if let Ok(text) = run(
                    {
                        let mut c = Command::new("ip");
                        c.args(["-n", name, "-o", "link", "show"]);
                        c
                    },
                    None,
                ) {
                    let wwan: Vec<String> = text
                        .lines()
                        .filter_map(|l| l.split(": ").nth(1))
                        .map(|n| n.split('@').next().unwrap_or(n))
                        .filter(|n| n.starts_with("wwan"))
                        .map(|n| format!("link del {n}"))
                        .collect();
                    ip_batch(Some(name), &wwan, true)?;
                }
                namespaces.push(format!("netns del {name}"));
            }
            Some((_, SlotObject::CarrierNs(_))) => namespaces.push(format!("netns del {name}")),
            None => {}
        }
    }
    root.extend(namespaces);
    ip_batch(None, &root, true)?;
    let left = slot_leftovers(slot)?;
    ensure!(left.is_empty(), "still present after cleanup: {left:?}");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn all_plans() -> impl Iterator<Item = Plan> {
        (0..MAX_SLOTS).map(|s| Plan::new(s, MAX_UPLINKS).unwrap())
    }

    #[test]
    fn names_fit_interface_limits_and_parse_back() {
        for plan in all_plans() {
            let s = plan.slot();
            assert_eq!(
                parse_slot_name(&plan.host_ns()),
                Some((s, SlotObject::HostNs))
            );
            for i in 0..plan.uplinks() {
                let root_if = plan.root_if(i);
                assert!(root_if.len() <= 15, "{root_if}");
                assert!(Plan::host_if(i).len() <= 15);
                assert_eq!(parse_slot_name(&root_if), Some((s, SlotObject::RootIf(i))));
                assert_eq!(
                    parse_slot_name(&plan.carrier_ns(i)),
                    Some((s, SlotObject::CarrierNs(i)))
                );
            }
        }
    }

    #[test]
    fn link_macs_are_unique_unicast_and_local() {
        let mut macs = BTreeSet::new();
        for plan in all_plans() {
            for i in 0..plan.uplinks() {
                for link in [1, 2] {
                    let mac = plan.link_mac(i, link);
                    let first = u8::from_str_radix(&mac[..2], 16).unwrap();
                    assert_eq!(first & 0b11, 0b10, "{mac}: locally administered unicast");
                    assert_eq!(mac.split(':').count(), 6, "{mac}");
                    assert!(macs.insert(mac));
                }
            }
        }
    }

    #[test]
    fn foreign_names_are_not_claimed() {
        for name in [
            "cg", "cgh", "cg1", "cg1x", "cg64h", "cg01h", "cg1c", "cg1c01", "cg1r", "cg1r123",
            "cg1hx", "eth0", "wwan0", "cg1c0x", "xcg1h",
        ] {
            assert_eq!(parse_slot_name(name), None, "{name}");
        }
        // A one-digit slot is not a prefix of a two-digit one.
        assert_eq!(parse_slot_name("cg10h"), Some((10, SlotObject::HostNs)));
        assert_eq!(
            parse_slot_name("cg1c0"),
            Some((1, SlotObject::CarrierNs(0)))
        );
    }

    #[test]
    fn address_plans_never_overlap() {
        let mut pools = BTreeSet::new();
        let mut internets = BTreeSet::new();
        let mut gateways = BTreeSet::new();
        let mut hosts = BTreeSet::new();
        for plan in all_plans() {
            assert!(internets.insert(plan.internet_ip()));
            for i in 0..plan.uplinks() {
                let pool = plan.pool_net(i);
                assert!(pools.insert(pool), "pool {pool:?} twice");
                assert!(pool[0] == 198 && (pool[1] == 18 || pool[1] == 19));
                assert!(gateways.insert(plan.root_gateway(i)));
                assert!(hosts.insert(plan.host_net(i)));
                // The /30s of one bed's carrier links stay apart.
                assert_eq!(plan.root_gateway(i).octets()[3] % 4, 1);
            }
        }
        assert_eq!(pools.len(), MAX_SLOTS as usize * MAX_UPLINKS);
        // The device's own addresses never fall into the internet's ranges.
        for h in &hosts {
            assert_eq!(h[0], 10);
            assert!(h[1] < 250);
        }
    }

    #[test]
    fn test_ranges_pass_the_target_policy() {
        let policy = shared::policy::TargetPolicy::default();
        let plan = Plan::new(MAX_SLOTS - 1, MAX_UPLINKS).unwrap();
        let st = plan.initial_state(MAX_UPLINKS - 1, &BedOptions::default());
        for ip in [plan.internet_ip(), st.public_ip()] {
            assert!(policy.check(ip.into(), 443).is_ok(), "{ip} is denied");
        }
    }

    #[test]
    fn plan_bounds() {
        assert!(Plan::new(MAX_SLOTS, 1).is_err());
        assert!(Plan::new(0, 0).is_err());
        assert!(Plan::new(0, MAX_UPLINKS + 1).is_err());
        let p = Plan::new(7, 3).unwrap();
        assert_eq!(p.namespaces(), ["cg7h", "cg7c0", "cg7c1", "cg7c2"]);
        assert_eq!(p.internet_ip(), Ipv4Addr::new(203, 0, 113, 8));
        assert_eq!(p.root_gateway(2), Ipv4Addr::new(10, 250, 7, 9));
    }

    #[test]
    fn rotation_walks_and_wraps_the_pools() {
        let plan = Plan::new(5, 2).unwrap();
        let mut st = plan.initial_state(1, &BedOptions::default());
        assert_eq!(st.public_ip(), Ipv4Addr::new(198, 18, 41, 1));
        assert_eq!(st.host_addr(), Ipv4Addr::new(10, 5, 1, 2));
        assert_eq!(st.host_gateway(), Ipv4Addr::new(10, 5, 1, 1));
        assert_eq!(st.route_metric, 101);
        let (old, new) = st.advance_public();
        assert_eq!(
            (old, new),
            (Ipv4Addr::new(198, 18, 41, 1), Ipv4Addr::new(198, 18, 41, 2))
        );
        assert_eq!(st.rotations, 1);
        let mut seen = BTreeSet::new();
        for _ in 0..600 {
            let (old, new) = st.advance_public();
            assert_ne!(old, new);
            assert!((1..=254).contains(&new.octets()[3]));
            seen.insert(new);
            let (old, new) = st.advance_host();
            assert_ne!(old, new);
            assert!((2..=254).contains(&new.octets()[3]), "{new}");
        }
        assert_eq!(seen.len(), 254);
    }

    #[test]
    fn state_round_trips_and_rejects_strangers() {
        let plan = Plan::new(3, 2).unwrap();
        let mut st = plan.initial_state(0, &BedOptions::default());
        st.advance_public();
        st.data_up = false;
        let text = st.to_json();
        assert!(text.contains("\"public_ip\": \"198.18.24.2\""), "{text}");
        assert_eq!(UplinkState::from_json(&text).unwrap(), st);
        let extra = text.replacen('{', "{\"surprise\": 1,", 1);
        assert!(UplinkState::from_json(&extra).is_err());
        let old = text.replace("\"version\": 1", "\"version\": 0");
        assert!(UplinkState::from_json(&old).is_err());
    }

    #[test]
    fn loss_scripts() {
        let none = loss_script(0);
        assert!(!none.contains("drop"), "{none}");
        assert!(none.contains("delete table inet cellgate_loss"));
        assert!(loss_script(30).contains("numgen random mod 100 < 30 counter drop"));
        let all = loss_script(100);
        assert!(
            all.contains("\t\tcounter drop") && !all.contains("numgen"),
            "{all}"
        );
    }

    #[test]
    fn carrier_rules_name_the_bed() {
        let plan = Plan::new(9, 1).unwrap();
        let rules = carrier_nft(&plan);
        assert!(rules.contains("oifname \"wan\" masquerade"));
        assert!(rules.contains("{ 203.0.113.10, 10.250.9.0/24 }"), "{rules}");
    }
}
