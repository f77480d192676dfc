//! Source-address allow lists, operator bans and limit webhooks, end to end
//! with real curl and raw SOCKS5.

use std::io::{Read, Write};
use std::net::{IpAddr, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::{Value, json};
use tests::{Blob, Cluster, ClusterOpts, Curl, FileServer, SocksTarget, assert_eventually};

const CP_CONFIG: &str = r#"
[fleet]
counters_flush_secs = 1
"#;

fn cluster(name: &str) -> Cluster {
    Cluster::start(ClusterOpts {
        agents: 1,
        config_toml: Some(CP_CONFIG.into()),
        ..ClusterOpts::named(name)
    })
}

fn customer_id(c: &Cluster) -> String {
    let list = c.api().get("/api/v1/customers").json();
    list.as_array()
        .unwrap()
        .iter()
        .find(|x| x["username"] == c.user.as_str())
        .unwrap()["id"]
        .as_str()
        .unwrap()
        .to_string()
}

/// The proxy URL without credentials.
fn bare_proxy(c: &Cluster) -> String {
    format!("http://{}", c.addrs.http)
}

fn fetch(proxy: &str, url: &str) -> tests::CurlResult {
    Curl::new()
        .proxy(proxy)
        .write_out("\n%{http_code}")
        .arg(url)
        .run()
}

/// A TCP connection to `to` from the local address `from`.
fn connect_from(from: IpAddr, to: SocketAddr) -> TcpStream {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let s = rt.block_on(async {
        let sock = tokio::net::TcpSocket::new_v4().unwrap();
        sock.bind(SocketAddr::new(from, 0)).unwrap();
        sock.connect(to).await.unwrap().into_std().unwrap()
    });
    s.set_nonblocking(false).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s
}

/// SOCKS5 greeting offering NO-AUTH only; the method the proxy chose.
fn socks_no_auth(s: &mut TcpStream) -> Option<u8> {
    s.write_all(&[0x05, 0x01, 0x00]).ok()?;
    let mut two = [0u8; 2];
    s.read_exact(&mut two).ok()?;
    Some(two[1])
}

#[test]
fn allow_listed_sources_connect_without_credentials() {
    let c = cluster("allow-list");
    let site = FileServer::start("origin", None);
    let cid = customer_id(&c);
    let api = c.api();

    let r = fetch(&bare_proxy(&c), &site.url("/hello"));
    assert!(r.stdout.ends_with("407"), "{r:?}");

    let r = api.post(
        &format!("/api/v1/customers/{cid}/ips"),
        Some(&json!({"cidr": "127.0.0.1/32"})),
    );
    assert_eq!(r.status, 201, "{}", r.text());
    assert_eq!(r.json()["cidr"], "127.0.0.1/32");
    // Host bits set and garbage are refused with a reason.
    let r = api.post(
        &format!("/api/v1/customers/{cid}/ips"),
        Some(&json!({"cidr": "10.0.0.1/8"})),
    );
    assert_eq!(r.status, 400, "{}", r.text());
    assert!(r.text().contains("10.0.0.0/8"), "{}", r.text());
    let listed = api.get(&format!("/api/v1/customers/{cid}/ips")).json();
    assert_eq!(listed.as_array().unwrap().len(), 1, "{listed}");

    for _ in 0..2 {
        let r = fetch(&bare_proxy(&c), &site.url("/hello"));
        assert!(r.stdout.ends_with("200"), "{r:?}");
    }
    // Wrong credentials from the same address still fail: credentials win.
    let r = fetch(&c.http_proxy_as(&c.user, "wrong"), &site.url("/hello"));
    assert!(r.stdout.ends_with("407"), "{r:?}");

    let usage = || api.get(&format!("/api/v1/customers/{cid}/usage")).json();
    assert_eventually!(
        Duration::from_secs(10),
        usage()["days"][0]["requests"] == 2,
        "{}",
        usage()
    );

    // SOCKS5 NO-AUTH: accepted from the listed address...
    let mut s = connect_from([127, 0, 0, 1].into(), c.addrs.socks);
    assert_eq!(socks_no_auth(&mut s), Some(0x00));
    let target = SocksTarget::V4([127, 0, 0, 1].into(), site.port());
    let mut req = vec![0x05, 0x01, 0x00];
    req.extend_from_slice(&target.encode());
    s.write_all(&req).unwrap();
    let mut head = [0u8; 4];
    s.read_exact(&mut head).unwrap();
    assert_eq!(head[1], 0x00, "SOCKS reply {head:02x?}");
    let rest = match head[3] {
        0x01 => 6,
        0x04 => 18,
        other => panic!("address type {other}"),
    };
    let mut skip = vec![0u8; rest];
    s.read_exact(&mut skip).unwrap();
    s.write_all(b"GET /hello HTTP/1.0\r\nHost: origin\r\n\r\n")
        .unwrap();
    let mut body = String::new();
    let _ = s.read_to_string(&mut body);
    assert!(body.starts_with("HTTP/1.1 200"), "{body}");
    // ...and refused (0xFF) from another.
    let mut s = connect_from([127, 0, 0, 2].into(), c.addrs.socks);
    assert_eq!(socks_no_auth(&mut s), Some(0xFF));

    // Removing the network (URL-encoded '/') ends it.
    let r = api.delete(&format!("/api/v1/customers/{cid}/ips/127.0.0.1%2F32"));
    assert_eq!(r.status, 204, "{}", r.text());
    let r = fetch(&bare_proxy(&c), &site.url("/hello"));
    assert!(r.stdout.ends_with("407"), "{r:?}");
    let mut s = connect_from([127, 0, 0, 1].into(), c.addrs.socks);
    assert_eq!(socks_no_auth(&mut s), Some(0xFF));
}

#[test]
fn a_ban_closes_open_transfers_and_refuses_until_lifted() {
    let mut c = cluster("ban");
    let site = FileServer::start("origin", None);
    let cid = customer_id(&c);
    let api = c.api();
    let mut held = Curl::new()
        .proxy(&c.http_proxy())
        .arg("-o")
        .arg("/dev/null")
        .max_time(Duration::from_secs(60))
        .arg(site.url("/trickle"))
        .spawn(c.dir(), "trickle");
    assert_eventually!(
        Duration::from_secs(10),
        site.stats.trickled.load(Ordering::Relaxed) > 0,
        "the transfer never started"
    );
    let r = api.post(
        &format!("/api/v1/customers/{cid}/ban"),
        Some(&json!({"reason": "abuse report 4711"})),
    );
    assert_eq!(r.status, 200, "{}", r.text());
    let done = held.wait(Duration::from_secs(10));
    assert!(done.is_some(), "the open transfer survived the ban");

    let r = fetch(&c.http_proxy(), &site.url("/hello"));
    assert!(r.stdout.ends_with("403"), "{r:?}");
    assert!(r.stdout.contains("abuse report 4711"), "{r:?}");
    let bans = api.get("/api/v1/bans").json();
    assert_eq!(bans[0]["customer_id"], cid.as_str(), "{bans}");

    // The ban outlives a restart of the control plane.
    c.restart_cp();
    c.wait_online(1, Duration::from_secs(20));
    assert_eventually!(
        Duration::from_secs(10),
        fetch(&c.http_proxy(), &site.url("/hello"))
            .stdout
            .contains("abuse report 4711"),
        "the ban was forgotten at restart"
    );
    let api = c.api();

    let r = api.delete(&format!("/api/v1/customers/{cid}/ban"));
    assert_eq!(r.status, 204, "{}", r.text());
    let r = fetch(&c.http_proxy(), &site.url("/hello"));
    assert!(r.stdout.ends_with("200"), "{r:?}");
    assert_eq!(api.get("/api/v1/bans").json(), json!([]));
    let r = api.delete(&format!("/api/v1/customers/{cid}/ban"));
    assert_eq!(r.status, 404, "{}", r.text());
}

/// A webhook receiver: answers 200 to every request and keeps the bodies.
fn webhook_receiver() -> (SocketAddr, Arc<Mutex<Vec<Value>>>) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let got = Arc::new(Mutex::new(Vec::new()));
    let keep = got.clone();
    std::thread::spawn(move || {
        for conn in listener.incoming() {
            let Ok(mut s) = conn else { continue };
            let _ = s.set_read_timeout(Some(Duration::from_secs(5)));
            let mut buf = Vec::new();
            let mut chunk = [0u8; 4096];
            let body = loop {
                let Ok(n) = s.read(&mut chunk) else {
                    break None;
                };
                if n == 0 {
                    break None;
                }
                buf.extend_from_slice(&chunk[..n]);
                let text = String::from_utf8_lossy(&buf).to_string();
                let Some(end) = text.find("\r\n\r\n") else {
                    continue;
                };
                let len = text[..end]
                    .lines()
                    .find_map(|l| {
                        let (k, v) = l.split_once(':')?;
                        k.eq_ignore_ascii_case("content-length")
                            .then(|| v.trim().parse::<usize>().ok())?
                    })
                    .unwrap_or(0);
                if buf.len() >= end + 4 + len {
                    break Some(buf[end + 4..end + 4 + len].to_vec());
                }
            };
            let _ =
                s.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\nConnection: close\r\n\r\n");
            if let Some(v) = body.and_then(|b| serde_json::from_slice(&b).ok()) {
                keep.lock().unwrap().push(v);
            }
        }
    });
    (addr, got)
}

#[test]
fn quota_thresholds_reach_the_customer_webhook() {
    let c = cluster("webhooks");
    let cid = customer_id(&c);
    let api = c.api();
    let (hook, got) = webhook_receiver();
    let r = api.post(
        "/api/v1/plans",
        Some(&json!({"name": "tiny", "quota_bytes": 1_000_000u64})),
    );
    assert_eq!(r.status, 201, "{}", r.text());
    let plan = r.json()["id"].clone();
    let r = api.request(
        "PATCH",
        &format!("/api/v1/customers/{cid}/access"),
        Some(&json!({"webhook_url": "ftp://nope"})),
    );
    assert_eq!(r.status, 400, "{}", r.text());
    let r = api.request(
        "PATCH",
        &format!("/api/v1/customers/{cid}/access"),
        Some(&json!({"plan": plan, "webhook_url": format!("http://{hook}/cellgate")})),
    );
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.json()["webhook_url"], format!("http://{hook}/cellgate"));

    let blob = Blob::random(2 << 20, 9);
    let site = FileServer::start("origin", Some(blob));
    // The download crosses 80 % and then 100 % of the quota (and may be
    // cut short there).
    let _ = Curl::new()
        .proxy(&c.http_proxy())
        .arg("-o")
        .arg("/dev/null")
        .arg(site.url("/blob"))
        .run();
    let events = || -> Vec<String> {
        got.lock()
            .unwrap()
            .iter()
            .filter(|v| v["customer_id"] == cid.as_str())
            .filter_map(|v| v["event"].as_str().map(str::to_string))
            .collect()
    };
    assert_eventually!(
        Duration::from_secs(20),
        {
            let e = events();
            e.iter().any(|x| x == "quota_80") && e.iter().any(|x| x == "quota_100")
        },
        "{:?}",
        events()
    );
}
