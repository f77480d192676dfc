//! Per-uplink networking against real interfaces.
//!
//! Each test builds its own pair of network namespaces:
//!
//! ```text
//!  agent host (…a)                      "internet" (…b)
//!  up1 10.213.1.2/24  ── veth ──  p1 10.213.1.1/24
//!  up2 10.213.2.2/24  ── veth ──  p2 10.213.2.1/24
//!  default via up2 (metric 100)        servers on 10.213.9.1 (lo)
//!  default via up1 (metric 200)
//! ```
//!
//! so unbound traffic leaves through up2, and only an interface-bound
//! socket leaves through up1. Servers in the internet namespace tell the
//! client which address they saw. The test body runs on a thread that has
//! entered the agent namespace; server sockets are created on a thread in
//! the internet namespace and served from the same runtime (a socket stays
//! in the namespace it was created in).
//!
//! Needs root (namespaces, `SO_BINDTODEVICE`, link changes); skipped with a
//! message otherwise. Run: `cargo test -p edge-agent --test uplink_net --
//! --nocapture` to see the measured event latencies.

use std::collections::HashMap;
use std::fs::File;
use std::future::Future;
use std::net::{IpAddr, SocketAddr};
use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use edge_agent::net::bind::{connect_tcp, udp_socket};
use edge_agent::net::dns::{Resolver, decode_query, testing};
use edge_agent::net::echo::external_ip;
use edge_agent::net::link::{link_state, set_link, wait_ready};
use edge_agent::net::watch::{LinkEvent, watch_links};
use edge_agent::rotate::RotateError;
use edge_agent::rotate::netlink::{NetlinkBackend, NetlinkConfig};
use nix::sched::CloneFlags;
use socket2::{Domain, Socket, Type};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::mpsc::Receiver;
use tokio::time::Instant;

const SERVER: &str = "10.213.9.1";
const UP1_ADDR: &str = "10.213.1.2";
const UP2_ADDR: &str = "10.213.2.2";

static NEXT: AtomicU32 = AtomicU32::new(0);

/// The two namespaces; deleted on drop, also when a test fails.
struct Topology {
    agent: String,
    net: String,
}

impl Topology {
    /// `None` (after saying why) when this host cannot run the test.
    fn new() -> Option<Topology> {
        if !nix::unistd::geteuid().is_root() {
            eprintln!("skipping: needs root (network namespaces, SO_BINDTODEVICE)");
            return None;
        }
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let base = format!("cgnt{}n{n}", std::process::id());
        let topo = Topology {
            agent: format!("{base}a"),
            net: format!("{base}b"),
        };
        for ns in [&topo.agent, &topo.net] {
            match Command::new("ip").args(["netns", "add", ns]).output() {
                Ok(o) if o.status.success() => {}
                Ok(o) => {
                    eprintln!(
                        "skipping: cannot create network namespaces: {}",
                        String::from_utf8_lossy(&o.stderr).trim()
                    );
                    return None;
                }
                Err(e) => {
                    eprintln!("skipping: cannot run `ip`: {e}");
                    return None;
                }
            }
        }
        let (a, b) = (topo.agent.as_str(), topo.net.as_str());
        for (ns, cmd) in [
            (a, "link set lo up".to_string()),
            (b, "link set lo up".to_string()),
            (a, format!("link add up1 type veth peer name p1 netns {b}")),
            (a, format!("link add up2 type veth peer name p2 netns {b}")),
            (a, format!("addr add {UP1_ADDR}/24 dev up1")),
            (a, format!("addr add {UP2_ADDR}/24 dev up2")),
            (b, "addr add 10.213.1.1/24 dev p1".to_string()),
            (b, "addr add 10.213.2.1/24 dev p2".to_string()),
            (b, format!("addr add {SERVER}/32 dev lo")),
            (a, "link set up1 up".to_string()),
            (a, "link set up2 up".to_string()),
            (b, "link set p1 up".to_string()),
            (b, "link set p2 up".to_string()),
            (
                a,
                "route add default via 10.213.2.1 dev up2 metric 100".to_string(),
            ),
            (
                a,
                "route add default via 10.213.1.1 dev up1 metric 200".to_string(),
            ),
        ] {
            topo.ip(ns, &cmd);
        }
        Some(topo)
    }

    /// `ip -n NS ARGS`, which must succeed.
    fn ip(&self, ns: &str, args: &str) {
        let out = Command::new("ip")
            .args(["-n", ns])
            .args(args.split_whitespace())
            .output()
            .expect("run ip");
        assert!(
            out.status.success(),
            "ip -n {ns} {args}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    fn agent_ip(&self, args: &str) {
        self.ip(&self.agent, args);
    }

    fn net_ip(&self, args: &str) {
        self.ip(&self.net, args);
    }

    /// Run `body` on a runtime inside the agent namespace.
    fn run<F: Future>(&self, body: impl FnOnce() -> F + Send) -> F::Output
    where
        F::Output: Send,
    {
        in_ns(&self.agent, || {
            tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap()
                .block_on(body())
        })
    }

    /// Create sockets (or anything) in the internet namespace.
    fn in_net<T: Send>(&self, f: impl FnOnce() -> T + Send) -> T {
        in_ns(&self.net, f)
    }
}

impl Drop for Topology {
    fn drop(&mut self) {
        for ns in [&self.agent, &self.net] {
            let _ = Command::new("ip").args(["netns", "del", ns]).output();
        }
    }
}

/// Run `f` on a thread that entered namespace `ns`.
fn in_ns<T: Send>(ns: &str, f: impl FnOnce() -> T + Send) -> T {
    std::thread::scope(|s| {
        let handle = s.spawn(|| {
            let file = File::open(format!("/run/netns/{ns}")).expect("open namespace");
            nix::sched::setns(&file, CloneFlags::CLONE_NEWNET).expect("setns");
            f()
        });
        handle
            .join()
            .unwrap_or_else(|p| std::panic::resume_unwind(p))
    })
}

/// A listening TCP socket, optionally bound to a device.
fn tcp_listener(addr: &str, device: Option<&str>) -> std::net::TcpListener {
    let addr: SocketAddr = addr.parse().unwrap();
    let s = Socket::new(Domain::IPV4, Type::STREAM, None).unwrap();
    s.set_reuse_address(true).unwrap();
    if let Some(d) = device {
        s.bind_device(Some(d.as_bytes())).unwrap();
    }
    s.bind(&addr.into()).unwrap();
    s.listen(64).unwrap();
    s.set_nonblocking(true).unwrap();
    s.into()
}

/// Accept forever; tell each client the address it came from, then close.
fn serve_peer_address(listener: std::net::TcpListener) {
    let listener = tokio::net::TcpListener::from_std(listener).unwrap();
    tokio::spawn(async move {
        loop {
            let (mut s, peer) = listener.accept().await.unwrap();
            let _ = s.write_all(peer.ip().to_string().as_bytes()).await;
        }
    });
}

/// An IP-echo HTTP endpoint.
fn serve_http_echo(listener: std::net::TcpListener) {
    let listener = tokio::net::TcpListener::from_std(listener).unwrap();
    tokio::spawn(async move {
        loop {
            let (mut s, peer) = listener.accept().await.unwrap();
            tokio::spawn(async move {
                let mut req = Vec::new();
                let mut b = [0u8; 1024];
                while !req.windows(4).any(|w| w == b"\r\n\r\n") {
                    match s.read(&mut b).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => req.extend_from_slice(&b[..n]),
                    }
                }
                let body = peer.ip().to_string();
                let reply = format!(
                    "HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: {}\r\n\r\n{body}\n",
                    body.len() + 1
                );
                let _ = s.write_all(reply.as_bytes()).await;
            });
        }
    });
}

type Seen = Arc<Mutex<Vec<(String, SocketAddr)>>>;

/// A DNS responder over UDP and TCP on the same port, recording the source
/// of every query.
fn serve_dns(
    udp: std::net::UdpSocket,
    tcp: std::net::TcpListener,
    records: HashMap<String, Vec<IpAddr>>,
) -> Seen {
    let seen: Seen = Default::default();
    let records = Arc::new(records);
    let udp = tokio::net::UdpSocket::from_std(udp).unwrap();
    {
        let (seen, records) = (seen.clone(), records.clone());
        tokio::spawn(async move {
            let mut buf = [0u8; 1500];
            loop {
                let Ok((n, from)) = udp.recv_from(&mut buf).await else {
                    continue;
                };
                if let Ok(q) = decode_query(&buf[..n]) {
                    seen.lock().unwrap().push((q.name, from));
                }
                if let Some(reply) = testing::answer(&buf[..n], &records, 512) {
                    let _ = udp.send_to(&reply, from).await;
                }
            }
        });
    }
    let tcp = tokio::net::TcpListener::from_std(tcp).unwrap();
    {
        let seen = seen.clone();
        tokio::spawn(async move {
            loop {
                let (mut s, from) = tcp.accept().await.unwrap();
                let (seen, records) = (seen.clone(), records.clone());
                tokio::spawn(async move {
                    let Ok(len) = s.read_u16().await else { return };
                    let mut q = vec![0u8; len as usize];
                    if s.read_exact(&mut q).await.is_err() {
                        return;
                    }
                    if let Ok(parsed) = decode_query(&q) {
                        seen.lock()
                            .unwrap()
                            .push((format!("tcp:{}", parsed.name), from));
                    }
                    if let Some(reply) = testing::answer(&q, &records, 65535) {
                        let mut framed = (reply.len() as u16).to_be_bytes().to_vec();
                        framed.extend_from_slice(&reply);
                        let _ = s.write_all(&framed).await;
                    }
                });
            }
        });
    }
    seen
}

fn addr(s: &str) -> SocketAddr {
    s.parse().unwrap()
}

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

#[test]
fn connect_tcp_leaves_through_the_bound_interface() {
    let Some(topo) = Topology::new() else { return };
    let (only_p1, any) = topo.in_net(|| {
        (
            tcp_listener(&format!("{SERVER}:7001"), Some("p1")),
            tcp_listener(&format!("{SERVER}:7002"), None),
        )
    });
    topo.run(|| async {
        serve_peer_address(only_p1);
        serve_peer_address(any);
        let t = Duration::from_secs(3);
        let seen_from = |iface: Option<&'static str>, port: u16| async move {
            let mut s = connect_tcp(addr(&format!("{SERVER}:{port}")), iface, t).await?;
            let mut out = String::new();
            s.read_to_string(&mut out).await?;
            std::io::Result::Ok(out)
        };
        // The host's routing prefers up2; binding picks the uplink.
        assert_eq!(seen_from(None, 7002).await.unwrap(), UP2_ADDR);
        assert_eq!(seen_from(Some("up2"), 7002).await.unwrap(), UP2_ADDR);
        assert_eq!(seen_from(Some("up1"), 7002).await.unwrap(), UP1_ADDR);
        // A server only reachable through up1.
        assert_eq!(seen_from(Some("up1"), 7001).await.unwrap(), UP1_ADDR);
        assert!(seen_from(None, 7001).await.is_err());
        assert!(seen_from(Some("up2"), 7001).await.is_err());
        let tcp = connect_tcp(addr(&format!("{SERVER}:7002")), Some("up1"), t)
            .await
            .unwrap();
        assert!(tcp.nodelay().unwrap());
        drop(tcp);

        // A down uplink fails at once, not after the timeout.
        topo.agent_ip("link set up1 down");
        let started = Instant::now();
        let e = seen_from(Some("up1"), 7002).await.unwrap_err();
        let took = started.elapsed();
        assert!(took < Duration::from_secs(1), "took {took:?}: {e}");
        assert!(e.to_string().contains("up1"), "{e}");
        // The other uplink is unaffected.
        assert_eq!(seen_from(Some("up2"), 7002).await.unwrap(), UP2_ADDR);

        let e = connect_tcp(addr(&format!("{SERVER}:7002")), Some("nosuch0"), t)
            .await
            .unwrap_err();
        assert!(e.to_string().contains("nosuch0 does not exist"), "{e}");
        assert!(udp_socket(addr("0.0.0.0:0"), Some("up2")).is_ok());
    });
}

#[test]
fn resolver_queries_leave_through_the_interface() {
    let Some(topo) = Topology::new() else { return };
    let (udp, tcp) = topo.in_net(|| {
        (
            std::net::UdpSocket::bind(format!("{SERVER}:53")).unwrap(),
            tcp_listener(&format!("{SERVER}:53"), None),
        )
    });
    udp.set_nonblocking(true).unwrap();
    let many: Vec<IpAddr> = (1..=40).map(|i| IpAddr::from([198, 51, 100, i])).collect();
    let records = HashMap::from([
        (
            "exit.test".to_string(),
            vec![ip("2001:db8::7"), ip("203.0.113.7")],
        ),
        ("big.test".to_string(), many),
    ]);
    topo.run(|| async {
        let seen = serve_dns(udp, tcp, records);
        let ns = addr(&format!("{SERVER}:53"));

        let r1 = Resolver::new(vec![ns], Some("up1"));
        assert_eq!(
            r1.lookup("Exit.Test", 443).await.unwrap(),
            vec![addr("203.0.113.7:443"), addr("[2001:db8::7]:443")]
        );
        let from: Vec<_> = seen.lock().unwrap().drain(..).collect();
        assert_eq!(from.len(), 2, "{from:?}");
        assert!(from.iter().all(|(_, a)| a.ip() == ip(UP1_ADDR)), "{from:?}");

        let r2 = Resolver::new(vec![ns], Some("up2"));
        assert_eq!(r2.lookup("exit.test", 80).await.unwrap().len(), 2);
        let from: Vec<_> = seen.lock().unwrap().drain(..).collect();
        assert!(from.iter().all(|(_, a)| a.ip() == ip(UP2_ADDR)), "{from:?}");

        // Too big for a datagram: TC, then the same question over TCP,
        // also through up1.
        assert_eq!(r1.lookup("big.test", 80).await.unwrap().len(), 40);
        let from: Vec<_> = seen.lock().unwrap().drain(..).collect();
        assert!(
            from.iter()
                .any(|(q, a)| q == "tcp:big.test" && a.ip() == ip(UP1_ADDR)),
            "{from:?}"
        );
        assert!(from.iter().all(|(_, a)| a.ip() == ip(UP1_ADDR)), "{from:?}");

        let e = r1.lookup("missing.test", 80).await.unwrap_err();
        assert!(e.to_string().contains("NXDOMAIN"), "{e}");

        // A loopback stub cannot be reached through a modem interface; the
        // error says what to configure.
        let stub = Resolver::new(vec![addr("127.0.0.53:53")], Some("up1"))
            .with_timeout(Duration::from_secs(1));
        let e = stub.lookup("exit.test", 80).await.unwrap_err();
        assert!(e.to_string().contains("dns = [...]"), "{e}");

        // Nobody answering through this uplink.
        let silent = Resolver::new(vec![addr("10.213.1.1:5353")], Some("up1"))
            .with_timeout(Duration::from_millis(800));
        let started = Instant::now();
        let e = silent.lookup("exit.test", 80).await.unwrap_err();
        assert!(started.elapsed() < Duration::from_secs(2));
        assert!(e.to_string().contains("dns = [...]"), "{e}");

        // With up1 down, its lookups fail fast while up2's still work.
        topo.agent_ip("link set up1 down");
        let started = Instant::now();
        assert!(r1.lookup("exit.test", 80).await.is_err());
        assert!(started.elapsed() < Duration::from_secs(2));
        assert!(r2.lookup("exit.test", 80).await.is_ok());
    });
}

#[test]
fn external_ip_per_uplink() {
    let Some(topo) = Topology::new() else { return };
    let listener = topo.in_net(|| tcp_listener(&format!("{SERVER}:8080"), None));
    topo.run(|| async {
        serve_http_echo(listener);
        let url = format!("http://{SERVER}:8080/ip");
        let t = Duration::from_secs(3);
        assert_eq!(
            external_ip(&url, Some("up1"), t).await.unwrap(),
            ip(UP1_ADDR)
        );
        assert_eq!(
            external_ip(&url, Some("up2"), t).await.unwrap(),
            ip(UP2_ADDR)
        );
        assert_eq!(external_ip(&url, None, t).await.unwrap(), ip(UP2_ADDR));
        topo.agent_ip("link set up1 down");
        let started = Instant::now();
        assert!(external_ip(&url, Some("up1"), t).await.is_err());
        assert!(started.elapsed() < Duration::from_secs(1));
    });
}

/// The next event `want` accepts within `within`, and how long it took.
/// Every event seen on the way must be about `iface`.
async fn expect_event(
    rx: &mut Receiver<LinkEvent>,
    iface: &str,
    within: Duration,
    want: impl Fn(&LinkEvent) -> bool,
) -> (LinkEvent, Duration) {
    let started = Instant::now();
    let deadline = started + within;
    loop {
        match tokio::time::timeout_at(deadline, rx.recv()).await {
            Ok(Some(ev)) => {
                assert_eq!(
                    ev.ifname(),
                    iface,
                    "event for an unwatched interface: {ev:?}"
                );
                if want(&ev) {
                    return (ev, started.elapsed());
                }
            }
            Ok(None) => panic!("watcher ended"),
            Err(_) => panic!("no matching event within {within:?}"),
        }
    }
}

/// Events arriving within `within` (for "nothing happens" checks).
async fn drain(rx: &mut Receiver<LinkEvent>, within: Duration) -> Vec<LinkEvent> {
    let mut out = Vec::new();
    let deadline = Instant::now() + within;
    while let Ok(Some(ev)) = tokio::time::timeout_at(deadline, rx.recv()).await {
        out.push(ev);
    }
    out
}

#[test]
fn link_changes_are_watched_and_waited_for() {
    let Some(topo) = Topology::new() else { return };
    topo.run(|| async {
        let mut rx = watch_links(vec!["up1".into()]).unwrap();
        let second = Duration::from_secs(1);
        let is = |want: LinkEvent| move |ev: &LinkEvent| *ev == want;
        let up1 = || "up1".to_string();

        let started = Instant::now();
        set_link("up1", false).await.unwrap();
        let (_, down_after) = expect_event(&mut rx, "up1", second, is(LinkEvent::LinkDown { ifname: up1() })).await;
        let down_total = started.elapsed();
        let st = link_state("up1");
        assert!(st.exists && !st.up && !st.admin_up, "{st:?}");
        let e = wait_ready("up1", Instant::now() + Duration::from_millis(300))
            .await
            .unwrap_err();
        assert!(!e.up);

        let started = Instant::now();
        set_link("up1", true).await.unwrap();
        let (_, up_after) = expect_event(&mut rx, "up1", second, is(LinkEvent::LinkUp { ifname: up1() })).await;
        let up_total = started.elapsed();
        let st = wait_ready("up1", Instant::now() + Duration::from_secs(5))
            .await
            .unwrap();
        assert!(st.addrs.contains(&ip(UP1_ADDR)), "{st:?}");

        // Up again while up: no event.
        set_link("up1", true).await.unwrap();
        let quiet = drain(&mut rx, Duration::from_millis(300)).await;
        assert!(
            !quiet.iter().any(|e| matches!(e, LinkEvent::LinkUp { .. } | LinkEvent::LinkDown { .. })),
            "{quiet:?}"
        );

        // Addresses.
        let started = Instant::now();
        topo.agent_ip("addr add 10.213.1.77/24 dev up1");
        let (_, added_after) = expect_event(
            &mut rx,
            "up1",
            second,
            is(LinkEvent::AddrAdded { ifname: up1(), addr: ip("10.213.1.77") }),
        )
        .await;
        let added_total = started.elapsed();
        topo.agent_ip("addr del 10.213.1.77/24 dev up1");
        expect_event(
            &mut rx,
            "up1",
            second,
            is(LinkEvent::AddrRemoved { ifname: up1(), addr: ip("10.213.1.77") }),
        )
        .await;

        // Another interface changing is not reported (expect_event checks
        // every event's interface).
        topo.agent_ip("link set up2 down");
        // Carrier loss on the far side: up1 stays administratively up.
        let started = Instant::now();
        topo.net_ip("link set p1 down");
        let (_, carrier_after) = expect_event(&mut rx, "up1", second, is(LinkEvent::LinkDown { ifname: up1() })).await;
        let carrier_total = started.elapsed();
        let st = link_state("up1");
        assert!(!st.up && st.admin_up, "{st:?}");
        assert!(st.to_string().contains("without carrier"), "{st}");
        topo.net_ip("link set p1 up");
        expect_event(&mut rx, "up1", second, is(LinkEvent::LinkUp { ifname: up1() })).await;
        assert!(drain(&mut rx, Duration::from_millis(200)).await.iter().all(|e| e.ifname() == "up1"));

        eprintln!(
            "watch_links latency (event after the change returned / after the change started): \
             LinkDown {down_after:?} / {down_total:?}, LinkUp {up_after:?} / {up_total:?}, \
             AddrAdded {added_after:?} / {added_total:?}, carrier loss {carrier_after:?} / {carrier_total:?}"
        );
    });
}

#[test]
fn all_interfaces_are_watched_with_an_empty_list() {
    let Some(topo) = Topology::new() else { return };
    topo.run(|| async {
        let mut rx = watch_links(Vec::new()).unwrap();
        topo.agent_ip("link set up2 down");
        let (ev, _) = expect_event(&mut rx, "up2", Duration::from_secs(1), |e| {
            matches!(e, LinkEvent::LinkDown { .. })
        })
        .await;
        assert_eq!(ev.ifname(), "up2");
    });
}

#[test]
fn netlink_rotation_cycles_the_uplink() {
    let Some(topo) = Topology::new() else { return };
    topo.run(|| async {
        let mut rx = watch_links(vec!["up1".into()]).unwrap();
        let mut backend =
            NetlinkBackend::new(&NetlinkConfig { hold_secs: 1 }, Some("up1")).unwrap();
        let started = Instant::now();
        backend
            .step(0, Instant::now() + Duration::from_secs(10))
            .await
            .unwrap();
        let took = started.elapsed();
        assert!(
            took >= Duration::from_secs(1) && took < Duration::from_secs(4),
            "{took:?}"
        );
        let events = drain(&mut rx, Duration::from_millis(200)).await;
        let down = events
            .iter()
            .position(|e| matches!(e, LinkEvent::LinkDown { .. }));
        let up = events
            .iter()
            .position(|e| matches!(e, LinkEvent::LinkUp { .. }));
        assert!(
            matches!((down, up), (Some(d), Some(u)) if d < u),
            "{events:?}"
        );
        assert!(link_state("up1").is_ready());

        // No carrier after the cycle: a timeout that says so, and the
        // interface is left administratively up.
        topo.net_ip("link set p1 down");
        let mut quick = NetlinkBackend::new(&NetlinkConfig { hold_secs: 0 }, Some("up1")).unwrap();
        let e = quick
            .step(0, Instant::now() + Duration::from_secs(2))
            .await
            .unwrap_err();
        assert!(matches!(e, RotateError::Timeout(_)), "{e}");
        assert!(e.to_string().contains("without carrier"), "{e}");
        assert!(link_state("up1").admin_up);
        topo.net_ip("link set p1 up");

        // A rotation dropped while the link is down puts it back up.
        let mut slow = NetlinkBackend::new(&NetlinkConfig { hold_secs: 5 }, Some("up1")).unwrap();
        let cancelled = tokio::time::timeout(
            Duration::from_millis(300),
            slow.step(0, Instant::now() + Duration::from_secs(20)),
        )
        .await;
        assert!(cancelled.is_err());
        let st = wait_ready("up1", Instant::now() + Duration::from_secs(3))
            .await
            .expect("restored after cancellation");
        assert!(st.addrs.contains(&ip(UP1_ADDR)));
    });
}
