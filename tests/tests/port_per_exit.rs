//! Port per exit, end to end: with `[ports] range` set every exit gets its
//! own port, traffic on it (HTTP proxy or SOCKS5) leaves through exactly
//! that exit, customers list their ports at `GET /ports`, and the ports
//! survive a control-plane restart.

use std::collections::BTreeMap;
use std::net::TcpListener;
use std::time::Duration;

use serde_json::Value;
use tests::{Cluster, ClusterOpts, Curl, FileServer, eventually};

/// Ports in the test's range: room for both exits and a few spares.
const RANGE_LEN: u16 = 8;

/// A run of `RANGE_LEN` consecutive ports free on 127.0.0.1 right now.
/// Another process may still take one before the control plane binds it;
/// the control plane then keeps retrying, and the range has spares.
fn free_range() -> (u16, u16) {
    for _ in 0..200 {
        let lo: u16 = rand::random_range(20_000..60_000);
        let hi = lo + RANGE_LEN - 1;
        let held: Vec<TcpListener> = (lo..=hi)
            .map_while(|p| TcpListener::bind(("127.0.0.1", p)).ok())
            .collect();
        if held.len() == usize::from(RANGE_LEN) {
            return (lo, hi);
        }
    }
    panic!("no {RANGE_LEN} consecutive free ports found");
}

/// Assigned ports by device id, from the admin API, once every agent's
/// exit has one.
fn ports_by_device(c: &Cluster) -> BTreeMap<String, u16> {
    eventually(Duration::from_secs(20), Duration::from_millis(200), || {
        let r = c.api().get("/api/v1/ports");
        assert_eq!(r.status, 200, "{}", r.text());
        let map: BTreeMap<String, u16> = r
            .json()
            .as_array()?
            .iter()
            .filter(|p| p["online"] == true)
            .map(|p| {
                (
                    p["device_id"].as_str().unwrap_or_default().to_string(),
                    p["port"].as_u64().unwrap_or(0) as u16,
                )
            })
            .collect();
        (map.len() == c.agents.len()).then_some(map)
    })
    .unwrap_or_else(|| {
        c.dump_logs();
        panic!(
            "not every exit got a port: {}",
            c.api().get("/api/v1/ports").text()
        )
    })
}

/// The device's first exit's request counter (since the control plane
/// started).
fn requests(c: &Cluster, device_id: &str) -> u64 {
    let d = c.api().device(device_id).expect("device");
    d["exits"][0]["counters"]["requests"].as_u64().unwrap_or(0)
}

fn customer_ports(c: &Cluster, query: &str) -> String {
    let r = Curl::new()
        .arg("--fail")
        .arg("-u")
        .arg(format!("{}:{}", c.user, c.pass))
        .arg(format!("http://{}/ports{query}", c.addrs.api))
        .run();
    r.expect_ok("GET /ports");
    r.stdout.clone()
}

#[test]
fn each_exit_gets_a_port_that_leaves_through_it() {
    let (lo, hi) = free_range();
    let c = Cluster::start(ClusterOpts {
        agents: 2,
        config_toml: Some(format!(
            "[ports]\nrange = \"{lo}-{hi}\"\nlisten_ip = \"127.0.0.1\"\n"
        )),
        ..ClusterOpts::named("port-per-exit")
    });
    let origin = FileServer::start("origin", None);
    let ports = ports_by_device(&c);
    for p in ports.values() {
        assert!((lo..=hi).contains(p), "port {p} outside {lo}-{hi}");
    }
    let (dev_a, dev_b) = (c.agents[0].device_id.clone(), c.agents[1].device_id.clone());
    let (port_a, port_b) = (ports[&dev_a], ports[&dev_b]);
    assert_ne!(port_a, port_b);

    // HTTP proxy on A's port: through A only, whatever round robin would do.
    for _ in 0..3 {
        let (a0, b0) = (requests(&c, &dev_a), requests(&c, &dev_b));
        Curl::new()
            .proxy(&format!("http://{}:{}@127.0.0.1:{port_a}", c.user, c.pass))
            .arg(origin.url("/hello"))
            .run()
            .expect_ok("HTTP via A's port");
        assert_eq!(requests(&c, &dev_a), a0 + 1, "A's port left elsewhere");
        assert_eq!(requests(&c, &dev_b), b0, "A's port used B");
    }
    // SOCKS5 on B's port.
    for _ in 0..3 {
        let (a0, b0) = (requests(&c, &dev_a), requests(&c, &dev_b));
        Curl::new()
            .arg("--socks5-hostname")
            .arg(format!("127.0.0.1:{port_b}"))
            .arg("--proxy-user")
            .arg(format!("{}:{}", c.user, c.pass))
            .arg(origin.url("/hello"))
            .run()
            .expect_ok("SOCKS5 via B's port");
        assert_eq!(requests(&c, &dev_b), b0 + 1, "B's port left elsewhere");
        assert_eq!(requests(&c, &dev_a), a0, "B's port used A");
    }
    // The per-exit ports are the control plane's own: no customer reaches
    // them through a device, not even with private targets allowed (the
    // agents learn the whole range), in range or at its ends.
    for port in [port_a, port_b, lo, hi] {
        let r = Curl::new()
            .proxy(&c.http_proxy())
            .write_out("%{http_code}")
            .arg("-o")
            .arg("/dev/null")
            .arg(format!("http://127.0.0.1:{port}/"))
            .run();
        assert_eq!(r.stdout, "403", "port {port} reachable through a device");
    }
    // Customers still authenticate there.
    let r = Curl::new()
        .proxy(&format!("http://{}:wrong@127.0.0.1:{port_a}", c.user))
        .write_out("%{http_code}")
        .arg("-o")
        .arg("/dev/null")
        .arg(origin.url("/hello"))
        .run();
    assert_eq!(r.stdout.trim(), "407", "wrong password on a port");

    // The customer's list, as text and as JSON.
    let text = customer_ports(&c, "");
    let mut lines: Vec<&str> = text.lines().collect();
    lines.sort();
    let mut want = vec![format!("127.0.0.1:{port_a}"), format!("127.0.0.1:{port_b}")];
    want.sort();
    assert_eq!(lines, want, "GET /ports text");
    let json: Value = serde_json::from_str(&customer_ports(&c, "?format=json")).unwrap();
    let mut listed: Vec<(String, u64)> = json
        .as_array()
        .expect("a JSON array")
        .iter()
        .map(|p| {
            (
                p["device_id"].as_str().unwrap().to_string(),
                p["port"].as_u64().unwrap(),
            )
        })
        .collect();
    listed.sort();
    let mut want = vec![
        (dev_a.clone(), u64::from(port_a)),
        (dev_b.clone(), u64::from(port_b)),
    ];
    want.sort();
    assert_eq!(listed, want, "GET /ports?format=json");
    // Without credentials: refused.
    let r = Curl::new()
        .write_out("%{http_code}")
        .arg("-o")
        .arg("/dev/null")
        .arg(format!("http://{}/ports", c.addrs.api))
        .run();
    assert_eq!(r.stdout.trim(), "401");
    // The admin list needs the admin token.
    let r = tests::Api::new(c.addrs.api, None).get("/api/v1/ports");
    assert_eq!(r.status, 401, "{}", r.text());

    // After a restart every exit has the port it had.
    let mut c = c;
    c.restart_cp();
    c.wait_online(2, Duration::from_secs(30));
    assert_eq!(ports_by_device(&c), ports, "ports changed across a restart");
    let a0 = requests(&c, &dev_a);
    let ok = eventually(Duration::from_secs(10), Duration::from_millis(200), || {
        Curl::new()
            .proxy(&format!("http://{}:{}@127.0.0.1:{port_a}", c.user, c.pass))
            .arg("--fail")
            .arg(origin.url("/hello"))
            .run()
            .code
            .eq(&0)
            .then_some(())
    });
    assert!(ok.is_some(), "A's port after the restart");
    assert!(requests(&c, &dev_a) > a0);
}
