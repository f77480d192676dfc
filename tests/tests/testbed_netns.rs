//! The netns device testbed itself: each uplink leaves through its own
//! public address, rotations change exactly that address, a downed uplink
//! fails fast, a long-lived UDP flow survives a host address change, the
//! `testbed_net` script interface agrees with the in-process one, and a
//! dropped bed leaves nothing behind.
//!
//! Needs root, iproute2 and nftables (as every netns test does).

use std::collections::BTreeSet;
use std::io::{BufRead, BufReader, ErrorKind};
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4, TcpListener, UdpSocket};
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use tests::run_bounded;
use tests::testbed::ModemLink;
use tests::testbed::netns::{
    Bed, BedOptions, Plan, UplinkState, bind_tcp_in, connect_tcp_in, slot_leftovers,
    testbed_net_bin, udp_socket_in,
};

const CONNECT: Duration = Duration::from_secs(3);

fn bed(uplinks: usize) -> Bed {
    let start = Instant::now();
    let bed = Bed::new(BedOptions {
        uplinks,
        ..BedOptions::default()
    })
    .expect("building the netns testbed (needs root, iproute2, nftables)");
    eprintln!(
        "bed slot {} with {uplinks} uplinks built in {:?}",
        bed.slot(),
        start.elapsed()
    );
    bed
}

/// A TCP server in the root namespace that answers each connection with
/// the peer's address and closes: the IP-echo endpoint.
struct SourceEcho {
    addr: SocketAddrV4,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl SourceEcho {
    fn start(ip: Ipv4Addr) -> Self {
        let listener = TcpListener::bind((ip, 0)).expect("bind the echo server");
        listener.set_nonblocking(true).unwrap();
        let SocketAddr::V4(addr) = listener.local_addr().unwrap() else {
            unreachable!("bound an IPv4 address")
        };
        let stop = Arc::new(AtomicBool::new(false));
        let flag = Arc::clone(&stop);
        let thread = std::thread::spawn(move || {
            while !flag.load(Ordering::Relaxed) {
                match listener.accept() {
                    Ok((mut s, peer)) => {
                        use std::io::Write;
                        let _ = s.write_all(format!("{peer}\n").as_bytes());
                    }
                    Err(e) if e.kind() == ErrorKind::WouldBlock => {
                        std::thread::sleep(Duration::from_millis(5));
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(5)),
                }
            }
        });
        Self {
            addr,
            stop,
            thread: Some(thread),
        }
    }
}

impl Drop for SourceEcho {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// The address the echo server saw for a connection from the device
/// through uplink `i`.
fn seen_via(bed: &Bed, i: usize, echo: &SourceEcho) -> std::io::Result<SocketAddrV4> {
    let s = connect_tcp_in(bed.host_ns(), Some(&bed.host_if(i)), echo.addr, CONNECT)?;
    s.set_read_timeout(Some(CONNECT))?;
    let mut line = String::new();
    BufReader::new(s).read_line(&mut line)?;
    line.trim()
        .parse()
        .map_err(|e| std::io::Error::new(ErrorKind::InvalidData, format!("{line:?}: {e}")))
}

fn seen_ip(bed: &Bed, i: usize, echo: &SourceEcho) -> Ipv4Addr {
    *seen_via(bed, i, echo)
        .unwrap_or_else(|e| panic!("connect through wwan{i}: {e}"))
        .ip()
}

/// The same through curl run inside the device's namespace.
fn curl_seen_ip(bed: &Bed, i: usize, echo: &SourceEcho) -> Ipv4Addr {
    let mut cmd = bed.command_in_host("curl");
    cmd.args(["-s", "--max-time", "3", "--interface", &bed.host_if(i)])
        .arg(format!("telnet://{}", echo.addr));
    let out = run_bounded(cmd, Duration::from_secs(10));
    let text = String::from_utf8_lossy(&out.stdout);
    let addr: SocketAddrV4 = text
        .trim()
        .parse()
        .unwrap_or_else(|e| panic!("curl through wwan{i} printed {text:?} ({e}); {out:?}"));
    *addr.ip()
}

fn slot_names(plan: &Plan) -> Vec<String> {
    let mut names = plan.namespaces();
    names.extend((0..plan.uplinks()).map(|i| plan.root_if(i)));
    names
}

/// Checked with `ip` itself rather than through the testbed's own listing.
fn assert_nothing_left(plan: &Plan, also: &[String]) {
    let netns = run_bounded(
        {
            let mut c = Command::new("ip");
            c.args(["netns", "list"]);
            c
        },
        Duration::from_secs(10),
    );
    let links = run_bounded(
        {
            let mut c = Command::new("ip");
            c.args(["-o", "link", "show"]);
            c
        },
        Duration::from_secs(10),
    );
    let netns = String::from_utf8_lossy(&netns.stdout);
    let links = String::from_utf8_lossy(&links.stdout);
    let ns_names: BTreeSet<&str> = netns
        .lines()
        .filter_map(|l| l.split_whitespace().next())
        .collect();
    let link_names: BTreeSet<&str> = links
        .lines()
        .filter_map(|l| l.split(": ").nth(1))
        .map(|n| n.split('@').next().unwrap_or(n))
        .collect();
    for name in slot_names(plan).iter().chain(also) {
        assert!(
            !ns_names.contains(name.as_str()),
            "namespace {name} left behind"
        );
        assert!(
            !link_names.contains(name.as_str()),
            "interface {name} left behind"
        );
    }
    let routes = run_bounded(
        {
            let mut c = Command::new("ip");
            c.args(["-4", "route", "show"]);
            c
        },
        Duration::from_secs(10),
    );
    let routes = String::from_utf8_lossy(&routes.stdout);
    for i in 0..plan.uplinks() {
        let p = plan.pool_net(i);
        let pool = format!("{}.{}.{}.0/24", p[0], p[1], p[2]);
        assert!(
            !routes.contains(&pool),
            "route to {pool} left behind:\n{routes}"
        );
    }
    assert!(slot_leftovers(plan.slot()).unwrap().is_empty());
}

/// Close the bed and check the machine while its slot is still reserved
/// (a parallel test could otherwise reuse the names at once).
fn close_checked(bed: Bed, also: &[String]) -> Plan {
    let plan = *bed.plan();
    let dir = bed.state_dir().to_path_buf();
    let start = Instant::now();
    let hold = bed.close().expect("teardown");
    eprintln!(
        "bed slot {} torn down in {:?}",
        plan.slot(),
        start.elapsed()
    );
    assert!(!dir.exists(), "{} left behind", dir.display());
    assert_nothing_left(&plan, also);
    drop(hold);
    plan
}

#[test]
fn each_uplink_has_its_own_public_address_and_rotates_alone() {
    let bed = bed(3);
    let echo = SourceEcho::start(bed.internet_ip());

    let before: Vec<Ipv4Addr> = (0..3).map(|i| seen_ip(&bed, i, &echo)).collect();
    assert_eq!(
        before.iter().collect::<BTreeSet<_>>().len(),
        3,
        "uplinks share a public address: {before:?}"
    );
    for (i, ip) in before.iter().enumerate() {
        assert_eq!(*ip, bed.public_ip(i), "uplink {i}");
        assert_eq!(curl_seen_ip(&bed, i, &echo), *ip, "curl through uplink {i}");
    }

    // Airplane mode on uplink 1: connects through it fail at once.
    let link = bed.uplink(1);
    link.data_down();
    let start = Instant::now();
    let err = seen_via(&bed, 1, &echo).expect_err("uplink 1 is down");
    assert!(
        start.elapsed() < Duration::from_secs(1),
        "a connect through a downed uplink took {:?} ({err})",
        start.elapsed()
    );
    assert_eq!(seen_ip(&bed, 0, &echo), before[0], "uplink 0 is unaffected");

    // Back with a new address: only uplink 1 changed.
    let host_before = bed.host_addr(1);
    link.data_up(true);
    let rotated = seen_ip(&bed, 1, &echo);
    assert_ne!(rotated, before[1], "rotation kept the public address");
    assert_eq!(rotated, link.public_ip());
    assert_ne!(
        bed.host_addr(1),
        host_before,
        "a phone gets a new local address"
    );
    assert_eq!(seen_ip(&bed, 0, &echo), before[0]);
    assert_eq!(seen_ip(&bed, 2, &echo), before[2]);

    // A data session that comes back with the same address.
    link.data_down();
    link.data_up(false);
    assert_eq!(
        seen_ip(&bed, 1, &echo),
        rotated,
        "same-ip reconnect changed it"
    );
    assert_eq!(link.public_ip(), rotated);

    // A host address hot swap keeps the public address and the uplink.
    let old = bed.host_addr(2);
    let new = bed.hot_swap_host_addr(2).unwrap();
    assert_ne!(old, new);
    assert_eq!(bed.host_addr(2), new);
    assert_eq!(seen_ip(&bed, 2, &echo), before[2]);

    // The device's default route is uplink 0.
    let unbound = connect_tcp_in(bed.host_ns(), None, echo.addr, CONNECT).unwrap();
    drop(unbound);
    assert_eq!(curl_default_route_ip(&bed, &echo), before[0]);

    drop(echo);
    close_checked(bed, &[]);
}

fn curl_default_route_ip(bed: &Bed, echo: &SourceEcho) -> Ipv4Addr {
    let mut cmd = bed.command_in_host("curl");
    cmd.args(["-s", "--max-time", "3"])
        .arg(format!("telnet://{}", echo.addr));
    let out = run_bounded(cmd, Duration::from_secs(10));
    let addr: SocketAddrV4 = String::from_utf8_lossy(&out.stdout).trim().parse().unwrap();
    *addr.ip()
}

#[test]
fn loss_and_link_flaps() {
    let bed = bed(2);
    let echo = SourceEcho::start(bed.internet_ip());
    let public = seen_ip(&bed, 0, &echo);

    bed.set_loss(0, 100).unwrap();
    let err = connect_tcp_in(
        bed.host_ns(),
        Some("wwan0"),
        echo.addr,
        Duration::from_millis(500),
    )
    .expect_err("everything is dropped");
    assert_eq!(err.kind(), ErrorKind::TimedOut, "{err}");
    assert_eq!(
        seen_ip(&bed, 1, &echo),
        bed.public_ip(1),
        "only uplink 0 is lossy"
    );
    bed.set_loss(0, 0).unwrap();
    assert_eq!(seen_ip(&bed, 0, &echo), public);
    assert_eq!(bed.uplink(0).state().unwrap().loss_percent, 0);

    let host = bed.host_addr(0);
    let start = Instant::now();
    bed.link_flap(0, Duration::from_millis(300), true).unwrap();
    assert!(start.elapsed() >= Duration::from_millis(300));
    assert_ne!(bed.host_addr(0), host);
    assert_eq!(
        seen_ip(&bed, 0, &echo),
        public,
        "a flap keeps the public address"
    );

    let host = bed.host_addr(1);
    bed.link_flap(1, Duration::from_millis(100), false).unwrap();
    assert_eq!(bed.host_addr(1), host);
    assert_eq!(seen_ip(&bed, 1, &echo), bed.public_ip(1));

    drop(echo);
    close_checked(bed, &[]);
}

/// A UDP peer in the root namespace recording who sent what, answering
/// each datagram to its source (what a QUIC server does after migration).
struct UdpRecorder {
    addr: SocketAddrV4,
    seen: Arc<Mutex<Vec<(SocketAddr, u32)>>>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl UdpRecorder {
    fn start(ip: Ipv4Addr) -> Self {
        let sock = UdpSocket::bind((ip, 0)).unwrap();
        sock.set_read_timeout(Some(Duration::from_millis(20)))
            .unwrap();
        let SocketAddr::V4(addr) = sock.local_addr().unwrap() else {
            unreachable!()
        };
        let seen = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let (seen2, stop2) = (Arc::clone(&seen), Arc::clone(&stop));
        let thread = std::thread::spawn(move || {
            let mut buf = [0u8; 64];
            while !stop2.load(Ordering::Relaxed) {
                if let Ok((4, from)) = sock.recv_from(&mut buf) {
                    let seq = u32::from_be_bytes(buf[..4].try_into().unwrap());
                    seen2.lock().unwrap().push((from, seq));
                    let _ = sock.send_to(&buf[..4], from);
                }
            }
        });
        Self {
            addr,
            seen,
            stop,
            thread: Some(thread),
        }
    }

    fn sources(&self) -> Vec<SocketAddr> {
        let mut v: Vec<SocketAddr> = Vec::new();
        for (from, _) in self.seen.lock().unwrap().iter() {
            if v.last() != Some(from) {
                v.push(*from);
            }
        }
        v
    }
}

impl Drop for UdpRecorder {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Send a datagram every 10 ms for `period` on `sock` to `to`, counting
/// answers; returns (sent, answered, send errors).
fn udp_flow(
    sock: &UdpSocket,
    to: SocketAddrV4,
    first_seq: u32,
    period: Duration,
) -> (u32, u32, u32) {
    sock.set_read_timeout(Some(Duration::from_millis(10)))
        .unwrap();
    let (mut sent, mut errors) = (0u32, 0u32);
    let mut answered = 0u32;
    let start = Instant::now();
    let mut buf = [0u8; 64];
    while start.elapsed() < period {
        match sock.send_to(&(first_seq + sent).to_be_bytes(), to) {
            Ok(_) => sent += 1,
            Err(_) => errors += 1,
        }
        while let Ok((4, _)) = sock.recv_from(&mut buf) {
            answered += 1;
        }
    }
    let deadline = Instant::now() + Duration::from_secs(2);
    while Instant::now() < deadline && answered < sent {
        if let Ok((4, _)) = sock.recv_from(&mut buf) {
            answered += 1;
        }
    }
    (sent, answered, errors)
}

#[test]
fn a_long_lived_udp_flow_survives_a_host_address_hot_swap() {
    let bed = bed(1);
    let peer = UdpRecorder::start(bed.internet_ip());
    // Bound like a QUIC client (0.0.0.0:0), so the kernel picks the source
    // per datagram and follows the address change.
    let sock = udp_socket_in(bed.host_ns(), None, "0.0.0.0:0".parse().unwrap()).unwrap();
    let public = bed.public_ip(0);

    let (sent, answered, errors) = std::thread::scope(|s| {
        let flow = s.spawn(|| udp_flow(&sock, peer.addr, 0, Duration::from_millis(1500)));
        std::thread::sleep(Duration::from_millis(500));
        bed.hot_swap_host_addr(0).unwrap();
        flow.join().unwrap()
    });
    eprintln!("hot swap: sent {sent}, answered {answered}, send errors {errors}");
    assert_eq!(errors, 0, "sending failed during the swap");
    assert!(sent >= 50, "sent only {sent}");
    let received = peer.seen.lock().unwrap().len();
    assert!(
        answered + 2 >= sent,
        "answered {answered} of {sent} (the peer received {received})"
    );
    let sources = peer.sources();
    assert_eq!(
        sources.len(),
        2,
        "the peer should see one source change: {sources:?}"
    );
    for s in &sources {
        assert_eq!(s.ip(), std::net::IpAddr::V4(public), "{sources:?}");
    }

    // A rotation on the same socket: the peer sees the new public address.
    bed.uplink(0).data_up(true);
    let rotated = bed.public_ip(0);
    assert_ne!(rotated, public);
    let (sent, answered, errors) = udp_flow(&sock, peer.addr, 10_000, Duration::from_millis(300));
    assert_eq!(errors, 0);
    assert!(
        answered + 2 >= sent,
        "answered {answered} of {sent} after rotation"
    );
    let last = *peer.sources().last().unwrap();
    assert_eq!(last.ip(), std::net::IpAddr::V4(rotated));

    drop(sock);
    drop(peer);
    close_checked(bed, &[]);
}

#[test]
fn open_flows_die_on_rotation_but_survive_a_same_ip_reconnect() {
    // A HiLink stick keeps its local address, so only the carrier's NAT
    // state decides whether an open connection lives on.
    let bed = Bed::new(BedOptions {
        uplinks: 1,
        new_host_addr_on_rotation: false,
    })
    .expect("building the netns testbed");
    let listener = TcpListener::bind((bed.internet_ip(), 0)).unwrap();
    let SocketAddr::V4(to) = listener.local_addr().unwrap() else {
        unreachable!()
    };
    let open = || {
        let client = connect_tcp_in(bed.host_ns(), Some("wwan0"), to, CONNECT).unwrap();
        client.set_read_timeout(Some(CONNECT)).unwrap();
        let (server, peer) = listener.accept().unwrap();
        server.set_read_timeout(Some(CONNECT)).unwrap();
        (client, server, peer)
    };
    let ping = |client: &mut std::net::TcpStream, server: &mut std::net::TcpStream| {
        use std::io::{Read, Write};
        client.write_all(b"ping")?;
        let mut buf = [0u8; 4];
        server.read_exact(&mut buf)?;
        server.write_all(b"pong")?;
        client.read_exact(&mut buf)?;
        Ok::<_, std::io::Error>(buf)
    };

    let (mut client, mut server, peer) = open();
    assert_eq!(peer.ip(), std::net::IpAddr::V4(bed.public_ip(0)));
    let link = bed.uplink(0);
    link.data_down();
    link.data_up(false);
    assert_eq!(
        ping(&mut client, &mut server).unwrap(),
        *b"pong",
        "same-ip reconnect"
    );

    let host = bed.host_addr(0);
    link.data_down();
    link.data_up(true);
    assert_eq!(bed.host_addr(0), host, "the stick kept its local address");
    // The next segment leaves through a fresh NAT mapping; the internet
    // side has no such connection and resets it.
    let start = Instant::now();
    let reset = {
        use std::io::{Read, Write};
        client.write_all(b"ping").unwrap();
        let mut buf = [0u8; 4];
        client.read(&mut buf)
    };
    eprintln!(
        "old flow after rotation: {reset:?} after {:?}",
        start.elapsed()
    );
    assert!(
        matches!(&reset, Err(e) if e.kind() == ErrorKind::ConnectionReset),
        "the flow outlived its public address: {reset:?}"
    );
    server.set_nonblocking(true).unwrap();
    let mut buf = [0u8; 4];
    assert!(
        !matches!(std::io::Read::read(&mut server, &mut buf), Ok(n) if n > 0),
        "data arrived through the old mapping"
    );

    let (mut client, mut server, peer) = open();
    assert_eq!(peer.ip(), std::net::IpAddr::V4(bed.public_ip(0)));
    assert_eq!(ping(&mut client, &mut server).unwrap(), *b"pong");

    drop((client, server, listener));
    close_checked(bed, &[]);
}

fn testbed_net(bed: &Bed, i: usize, args: &[&str]) -> (bool, String, String) {
    let mut cmd = Command::new(testbed_net_bin());
    cmd.arg("--state").arg(bed.uplink_state_file(i)).args(args);
    let out = run_bounded(cmd, Duration::from_secs(30));
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).trim().to_string(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn testbed_net_ok(bed: &Bed, i: usize, args: &[&str]) -> String {
    let (ok, out, err) = testbed_net(bed, i, args);
    assert!(ok, "testbed_net {args:?} failed: {err}");
    out
}

#[test]
fn script_and_in_process_changes_agree() {
    let bed = bed(2);
    let echo = SourceEcho::start(bed.internet_ip());
    let link = bed.uplink(0);
    let first = link.public_ip();

    assert_eq!(testbed_net_ok(&bed, 0, &["public-ip"]), first.to_string());
    assert_eq!(testbed_net_ok(&bed, 0, &["status"]), "up");

    testbed_net_ok(&bed, 0, &["data-down"]);
    assert_eq!(testbed_net_ok(&bed, 0, &["status"]), "down");
    assert!(!link.state().unwrap().data_up);
    assert!(seen_via(&bed, 0, &echo).is_err(), "uplink 0 is down");

    let printed = testbed_net_ok(&bed, 0, &["data-up"]);
    let second = link.public_ip();
    assert_eq!(printed, second.to_string());
    assert_ne!(second, first);
    assert_eq!(seen_ip(&bed, 0, &echo), second);

    testbed_net_ok(&bed, 0, &["data-down"]);
    assert_eq!(
        testbed_net_ok(&bed, 0, &["data-up", "--same-ip"]),
        second.to_string()
    );
    assert_eq!(seen_ip(&bed, 0, &echo), second);

    link.data_up(true);
    let third = link.public_ip();
    assert_ne!(third, second);
    assert_eq!(testbed_net_ok(&bed, 0, &["public-ip"]), third.to_string());

    let swapped = testbed_net_ok(&bed, 0, &["hot-swap"]);
    assert_eq!(swapped, bed.host_addr(0).to_string());
    assert_eq!(testbed_net_ok(&bed, 0, &["host-addr"]), swapped);
    assert_eq!(seen_ip(&bed, 0, &echo), third);

    let shown: UplinkState = serde_json::from_str(&testbed_net_ok(&bed, 0, &["show"])).unwrap();
    assert_eq!(shown, link.state().unwrap());
    assert_eq!(shown.rotations, 2);

    // Uplink 1 was never touched.
    assert_eq!(
        testbed_net_ok(&bed, 1, &["public-ip"]),
        bed.public_ip(1).to_string()
    );
    assert_eq!(seen_ip(&bed, 1, &echo), bed.public_ip(1));

    // Concurrent script and in-process changes serialise on the state lock.
    std::thread::scope(|s| {
        let script = s.spawn(|| {
            for _ in 0..3 {
                testbed_net_ok(&bed, 1, &["data-up"]);
            }
        });
        for _ in 0..3 {
            bed.uplink(1).data_up(true);
        }
        script.join().unwrap();
    });
    let st = bed.uplink(1).state().unwrap();
    assert_eq!(st.rotations, 6);
    assert_eq!(seen_ip(&bed, 1, &echo), st.public_ip());

    let (ok, _, err) = testbed_net(&bed, 0, &["set-loss", "101"]);
    assert!(!ok && err.contains("percentage"), "{err}");

    drop(echo);
    let state_file = bed.uplink_state_file(0);
    close_checked(bed, &[]);
    let mut cmd = Command::new(testbed_net_bin());
    cmd.arg("--state").arg(&state_file).arg("public-ip");
    let out = run_bounded(cmd, Duration::from_secs(30));
    assert!(
        !out.status.success(),
        "a dropped bed's state file still works"
    );
}

#[test]
fn parallel_beds_are_apart_and_drop_removes_everything() {
    let (a, b) = std::thread::scope(|s| {
        let a = s.spawn(|| bed(1));
        let b = s.spawn(|| bed(2));
        (a.join().unwrap(), b.join().unwrap())
    });
    assert_ne!(a.slot(), b.slot());
    assert_ne!(a.internet_ip(), b.internet_ip());
    assert_ne!(a.host_ns(), b.host_ns());

    // A's device cannot reach B's internet: each bed is its own world.
    let echo_b = SourceEcho::start(b.internet_ip());
    let err = connect_tcp_in(a.host_ns(), None, echo_b.addr, CONNECT).expect_err("other bed");
    assert_ne!(
        err.kind(),
        ErrorKind::TimedOut,
        "refused, not silently dropped: {err}"
    );
    assert_eq!(seen_ip(&b, 1, &echo_b), b.public_ip(1));

    // Objects of A's slot it does not know about (as a crashed run leaves
    // them), and a socket still open inside one of its namespaces.
    let s = a.slot();
    for args in [
        vec!["netns".to_string(), "add".into(), format!("cg{s}c7")],
        vec![
            "link".into(),
            "add".into(),
            format!("cg{s}r7"),
            "type".into(),
            "veth".into(),
            "peer".into(),
            "name".into(),
            format!("cg{s}p7"),
        ],
    ] {
        let mut c = Command::new("ip");
        c.args(&args);
        assert!(
            run_bounded(c, Duration::from_secs(10)).status.success(),
            "{args:?}"
        );
    }
    let lingering = bind_tcp_in(a.carrier_ns(0), "0.0.0.0:0".parse().unwrap()).unwrap();

    close_checked(
        a,
        &[format!("cg{s}c7"), format!("cg{s}r7"), format!("cg{s}p7")],
    );
    drop(lingering);

    // B is untouched by A's teardown.
    assert_eq!(seen_ip(&b, 0, &echo_b), b.public_ip(0));
    drop(echo_b);
    close_checked(b, &[]);
}

fn root_ifindex(name: &str) -> u32 {
    let mut c = Command::new("ip");
    c.args(["-o", "link", "show", "dev", name]);
    let out = run_bounded(c, Duration::from_secs(10));
    let text = String::from_utf8_lossy(&out.stdout);
    text.split(':')
        .next()
        .unwrap()
        .trim()
        .parse()
        .unwrap_or_else(|e| panic!("{name}: {text:?} {e}"))
}

#[test]
fn a_panicking_test_still_cleans_up() {
    // The slot may be reused by a parallel test as soon as the bed is
    // gone, so the check is by identity: namespaces are compared with
    // handles kept open on the originals (which also keeps their inode
    // numbers from being reused), interfaces by index (never reused soon).
    let recorded = Mutex::new(None);
    let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        let bed = bed(2);
        let plan = *bed.plan();
        let namespaces: Vec<(String, std::fs::File)> = plan
            .namespaces()
            .into_iter()
            .map(|ns| {
                let f = std::fs::File::open(format!("/run/netns/{ns}")).unwrap();
                (ns, f)
            })
            .collect();
        let ifindexes: Vec<u32> = (0..plan.uplinks())
            .map(|i| root_ifindex(&plan.root_if(i)))
            .collect();
        *recorded.lock().unwrap() = Some((namespaces, ifindexes));
        panic!("a failing test");
    }));
    assert!(result.is_err());
    let (namespaces, ifindexes) = recorded.into_inner().unwrap().expect("bed was built");
    use std::os::unix::fs::MetadataExt;
    for (name, held) in &namespaces {
        if let Ok(now) = std::fs::metadata(format!("/run/netns/{name}")) {
            assert_ne!(
                now.ino(),
                held.metadata().unwrap().ino(),
                "namespace {name} left behind"
            );
        }
    }
    let mut c = Command::new("ip");
    c.args(["-o", "link", "show"]);
    let links =
        String::from_utf8_lossy(&run_bounded(c, Duration::from_secs(10)).stdout).into_owned();
    for line in links.lines() {
        let index: u32 = line.split(':').next().unwrap().trim().parse().unwrap();
        assert!(!ifindexes.contains(&index), "interface left behind: {line}");
    }
}
