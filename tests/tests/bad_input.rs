//! Hostile and broken clients on both proxy ports: random bytes, truncated
//! handshakes, oversized and malformed heads, SOCKS5 protocol edge cases,
//! and a thousand idle connections. Every connection gets its answer or is
//! closed within the handshake deadline, real customers keep being served,
//! and the control plane stays up.

use std::io::{ErrorKind, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use rand::{Rng, RngCore, SeedableRng};
use tests::harness::api::RawReply;
use tests::harness::socks::{greeting, request, userpass};
use tests::{
    Blob, Cluster, ClusterOpts, Curl, FileServer, SocksTarget, raise_fd_limit, raw_exchange,
    sha256_file,
};

/// The handshake deadline configured for these tests.
const DEADLINE: Duration = Duration::from_secs(2);
/// Scheduling slack on a busy 2-core machine.
const SLACK: Duration = Duration::from_secs(3);

fn cluster(name: &str, handshake_secs: u64) -> Cluster {
    Cluster::start(ClusterOpts {
        config_toml: Some(format!("handshake_timeout_secs = {handshake_secs}\n")),
        ..ClusterOpts::named(name)
    })
}

fn seed() -> u64 {
    let seed = std::env::var("CELLGATE_E2E_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(rand::random);
    eprintln!("seed {seed} (rerun with CELLGATE_E2E_SEED={seed})");
    seed
}

/// The control plane survived and still serves a customer on both ports.
fn still_serving(c: &mut Cluster, origin: &FileServer) {
    assert!(c.cp_running(), "the control plane exited");
    assert!(c.api().healthy(), "/health failed");
    let r = Curl::new()
        .proxy(&c.http_proxy())
        .arg(origin.url("/hello"))
        .run();
    r.expect_ok("HTTP customer after the abuse");
    let r = Curl::new()
        .proxy(&c.socks_proxy())
        .arg(origin.url("/hello"))
        .run();
    r.expect_ok("SOCKS customer after the abuse");
}

/// Run all `(label, addr, payload, half_close)` exchanges concurrently.
fn exchange_all(
    cases: Vec<(String, SocketAddr, Vec<u8>, bool)>,
) -> Vec<(String, Vec<u8>, RawReply)> {
    std::thread::scope(|s| {
        let handles: Vec<_> = cases
            .into_iter()
            .map(|(label, addr, payload, half)| {
                s.spawn(move || {
                    let r = raw_exchange(addr, &payload, half, DEADLINE + SLACK + SLACK);
                    (label, payload, r)
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    })
}

#[test]
fn random_bytes_on_both_proxy_ports_are_answered_or_closed_within_the_deadline() {
    let mut c = cluster("random-bytes", 2);
    let origin = FileServer::start("origin", None);
    let seed = seed();
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let mut cases = Vec::new();
    for (port_name, addr) in [("http", c.addrs.http), ("socks", c.addrs.socks)] {
        for i in 0..60 {
            let len = match i % 4 {
                0 => rng.random_range(1..8),
                1 => rng.random_range(8..512),
                _ => rng.random_range(512..8192),
            };
            let mut payload = vec![0u8; len];
            if i % 3 == 0 {
                // Printable noise, closer to what a confused client sends.
                for b in &mut payload {
                    *b = rng.random_range(0x20..0x7f);
                }
            } else {
                rng.fill_bytes(&mut payload);
            }
            cases.push((format!("{port_name} #{i}"), addr, payload, i % 2 == 0));
        }
    }
    let mut failures = Vec::new();
    for (label, payload, r) in exchange_all(cases) {
        let head = &payload[..payload.len().min(16)];
        if !r.closed || r.elapsed > DEADLINE + SLACK {
            failures.push(format!(
                "{label} ({} bytes, starts {head:02x?}): closed {} after {:?}",
                payload.len(),
                r.closed,
                r.elapsed
            ));
        } else if label.starts_with("http") && !r.data.is_empty() {
            if !matches!(r.status(), Some(400 | 431)) {
                failures.push(format!("{label}: unexpected answer {:?}", r.text()));
            }
        } else if label.starts_with("socks") && !r.data.is_empty() && r.data[0] != 0x05 {
            failures.push(format!("{label}: unexpected answer {:02x?}", r.data));
        }
    }
    assert!(failures.is_empty(), "seed {seed}:\n{}", failures.join("\n"));
    still_serving(&mut c, &origin);
}

#[test]
fn truncated_handshakes_at_every_offset_are_closed_within_the_deadline() {
    let mut c = cluster("truncated", 2);
    let origin = FileServer::start("origin", None);
    let socks_full = [
        greeting(&[0x02]),
        userpass(c.user.as_bytes(), c.pass.as_bytes()),
        request(
            0x01,
            &SocksTarget::Domain("localhost".into(), origin.port()),
        ),
    ];
    let (g_len, a_len) = (socks_full[0].len(), socks_full[1].len());
    let socks_full = socks_full.concat();
    let http_full = format!(
        "CONNECT {} HTTP/1.1\r\nHost: {}\r\nProxy-Authorization: {}\r\n\r\n",
        origin.addr,
        origin.addr,
        c.basic_auth()
    )
    .into_bytes();

    let mut cases = Vec::new();
    for k in 0..socks_full.len() {
        for half in [false, true] {
            cases.push((
                format!("socks {k} half-close {half}"),
                c.addrs.socks,
                socks_full[..k].to_vec(),
                half,
            ));
        }
    }
    for k in 0..http_full.len() {
        for half in [false, true] {
            cases.push((
                format!("http {k} half-close {half}"),
                c.addrs.http,
                http_full[..k].to_vec(),
                half,
            ));
        }
    }
    let total = cases.len();
    let mut failures = Vec::new();
    for (label, prefix, r) in exchange_all(cases) {
        let k = prefix.len();
        let half = label.ends_with("true");
        // A client that hangs up mid-handshake is dropped at once; one that
        // goes quiet is dropped at the deadline.
        let limit = if half { SLACK } else { DEADLINE + SLACK };
        if !r.closed || r.elapsed > limit {
            failures.push(format!(
                "{label}: closed {} after {:?}",
                r.closed, r.elapsed
            ));
            continue;
        }
        let expected: Vec<u8> = if label.starts_with("socks") {
            let mut e = Vec::new();
            if k >= g_len {
                e.extend([0x05, 0x02]);
            }
            if k >= g_len + a_len {
                e.extend([0x01, 0x00]);
            }
            e
        } else {
            Vec::new()
        };
        if label.starts_with("socks") {
            if r.data != expected {
                failures.push(format!(
                    "{label}: answered {:02x?}, expected {expected:02x?}",
                    r.data
                ));
            }
        } else if half && k > 0 {
            // EOF inside the head: a 400 (or a bare close).
            if !(r.data.is_empty() || r.status() == Some(400)) {
                failures.push(format!("{label}: answered {:?}", r.text()));
            }
        } else if !r.data.is_empty() {
            failures.push(format!("{label}: answered {:?}", r.text()));
        }
    }
    assert!(
        failures.is_empty(),
        "{} of {total} truncated handshakes misbehaved:\n{}",
        failures.len(),
        failures.join("\n")
    );
    assert_eq!(
        origin.connections(),
        0,
        "a truncated handshake reached the origin"
    );
    // The complete handshakes do work.
    let r = raw_exchange(c.addrs.socks, &socks_full, false, Duration::from_secs(1));
    assert_eq!(
        &r.data[..6],
        &[0x05, 0x02, 0x01, 0x00, 0x05, 0x00],
        "{:02x?}",
        r.data
    );
    let r = raw_exchange(c.addrs.http, &http_full, false, Duration::from_secs(1));
    assert!(r.text().starts_with("HTTP/1.1 200"), "{:?}", r.text());
    still_serving(&mut c, &origin);
}

#[test]
fn oversized_and_malformed_http_heads_get_431_or_400_then_close() {
    let mut c = cluster("bad-http", 2);
    let origin = FileServer::start("origin", None);
    let auth = c.basic_auth();
    let o = origin.addr;
    let big = "a".repeat(70 * 1024);
    let many: String = (0..200).map(|i| format!("X-H{i}: v\r\n")).collect();
    let just_over: String = (0..129).map(|i| format!("X-H{i}: v\r\n")).collect();
    let cases: Vec<(&str, String, u16)> = vec![
        // > 64 KiB without an end: refused once the limit is reached.
        (
            "oversized, unterminated",
            format!("GET http://{o}/ HTTP/1.1\r\nX-Big: {big}"),
            431,
        ),
        (
            "oversized, complete",
            format!(
                "GET http://{o}/ HTTP/1.1\r\nProxy-Authorization: {auth}\r\nX-Big: {big}\r\n\r\n"
            ),
            431,
        ),
        (
            "oversized request line",
            format!("GET http://{o}/{big} HTTP/1.1\r\n\r\n"),
            431,
        ),
        (
            "200 header fields",
            format!("GET http://{o}/ HTTP/1.1\r\nProxy-Authorization: {auth}\r\n{many}\r\n"),
            431,
        ),
        (
            "129 header fields",
            format!("CONNECT {o} HTTP/1.1\r\nProxy-Authorization: {auth}\r\n{just_over}\r\n"),
            431,
        ),
        (
            "garbage request line",
            "HELLO THERE\r\n\r\n".to_string(),
            400,
        ),
        (
            "binary request line",
            "\u{1}\u{2}\u{3} \u{7f}\r\n\r\n".to_string(),
            400,
        ),
        (
            "origin-form",
            format!("GET /hello HTTP/1.1\r\nHost: {o}\r\nProxy-Authorization: {auth}\r\n\r\n"),
            400,
        ),
        (
            "asterisk-form",
            "OPTIONS * HTTP/1.1\r\nHost: x\r\n\r\n".to_string(),
            400,
        ),
        (
            "CONNECT without port",
            format!(
                "CONNECT localhost HTTP/1.1\r\nHost: localhost\r\nProxy-Authorization: {auth}\r\n\r\n"
            ),
            400,
        ),
        (
            "CONNECT port 0",
            format!("CONNECT 127.0.0.1:0 HTTP/1.1\r\nProxy-Authorization: {auth}\r\n\r\n"),
            400,
        ),
        (
            "CONNECT port 65536",
            format!("CONNECT 127.0.0.1:65536 HTTP/1.1\r\nProxy-Authorization: {auth}\r\n\r\n"),
            400,
        ),
        (
            "CONNECT unclosed IPv6",
            format!(
                "CONNECT [::1:{} HTTP/1.1\r\nProxy-Authorization: {auth}\r\n\r\n",
                o.port()
            ),
            400,
        ),
        (
            "CONNECT bad host",
            format!("CONNECT exa_mple..com:80 HTTP/1.1\r\nProxy-Authorization: {auth}\r\n\r\n"),
            400,
        ),
        (
            "https absolute-form",
            format!("GET https://{o}/ HTTP/1.1\r\nProxy-Authorization: {auth}\r\n\r\n"),
            400,
        ),
        (
            "ftp absolute-form",
            format!("GET ftp://{o}/ HTTP/1.1\r\nProxy-Authorization: {auth}\r\n\r\n"),
            400,
        ),
        (
            "GET with authority-form",
            format!("GET {o} HTTP/1.1\r\nProxy-Authorization: {auth}\r\n\r\n"),
            400,
        ),
        (
            "HTTP/2 preface",
            "PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_string(),
            400,
        ),
        (
            "Content-Length and Transfer-Encoding",
            format!(
                "POST http://{o}/sha256 HTTP/1.1\r\nProxy-Authorization: {auth}\r\nContent-Length: 4\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n"
            ),
            400,
        ),
        (
            "two Content-Lengths",
            format!(
                "POST http://{o}/sha256 HTTP/1.1\r\nProxy-Authorization: {auth}\r\nContent-Length: 4\r\nContent-Length: 5\r\n\r\nabcde"
            ),
            400,
        ),
        (
            "Transfer-Encoding not chunked last",
            format!(
                "POST http://{o}/sha256 HTTP/1.1\r\nProxy-Authorization: {auth}\r\nTransfer-Encoding: chunked, gzip\r\n\r\n"
            ),
            400,
        ),
        (
            "negative Content-Length",
            format!(
                "POST http://{o}/sha256 HTTP/1.1\r\nProxy-Authorization: {auth}\r\nContent-Length: -1\r\n\r\n"
            ),
            400,
        ),
    ];
    let mut failures = Vec::new();
    for (what, req, want) in &cases {
        let r = raw_exchange(c.addrs.http, req.as_bytes(), false, DEADLINE + SLACK);
        if r.status() != Some(*want) || !r.closed {
            failures.push(format!(
                "{what}: wanted {want} then close; got {:?} (closed {}) after {:?}",
                r.text().lines().next().unwrap_or(""),
                r.closed,
                r.elapsed
            ));
        }
    }
    assert!(
        failures.is_empty(),
        "malformed heads:\n{}",
        failures.join("\n")
    );
    assert_eq!(origin.connections(), 0, "a malformed request was forwarded");
    still_serving(&mut c, &origin);
}

/// Greeting, authentication and one request in a single write; the answer
/// bytes after the two handshake replies.
fn socks_after_auth(c: &Cluster, req: &[u8]) -> RawReply {
    let mut all = greeting(&[0x02]);
    all.extend(userpass(c.user.as_bytes(), c.pass.as_bytes()));
    all.extend_from_slice(req);
    let mut r = raw_exchange(c.addrs.socks, &all, false, DEADLINE + SLACK);
    assert_eq!(
        &r.data[..4.min(r.data.len())],
        &[0x05, 0x02, 0x01, 0x00],
        "handshake replies"
    );
    r.data.drain(..4);
    r
}

#[test]
fn socks5_protocol_edge_cases_get_their_reply_codes() {
    let mut c = cluster("socks-edge", 2);
    let origin = FileServer::start("origin", None);
    let p = origin.port();
    let port = p.to_be_bytes();
    let target = SocksTarget::V4([127, 0, 0, 1].into(), p);
    let long_name = format!("{}.example", "a".repeat(250));
    let cases: Vec<(&str, Vec<u8>, u8)> = vec![
        ("BIND", request(0x02, &target), 0x07),
        ("UDP ASSOCIATE", request(0x03, &target), 0x07),
        ("unknown command 0x09", request(0x09, &target), 0x07),
        (
            "ATYP 0x02",
            [&[0x05, 0x01, 0x00, 0x02, 1, 2, 3, 4][..], &port].concat(),
            0x08,
        ),
        (
            "ATYP 0x05",
            [&[0x05, 0x01, 0x00, 0x05, 1, 2, 3, 4][..], &port].concat(),
            0x08,
        ),
        (
            "domain length 0",
            [&[0x05, 0x01, 0x00, 0x03, 0x00][..], &port].concat(),
            0x01,
        ),
        (
            "port 0",
            request(0x01, &SocksTarget::V4([127, 0, 0, 1].into(), 0)),
            0x01,
        ),
        (
            "domain of 255 bytes (over 253)",
            [
                &[0x05, 0x01, 0x00, 0x03, 255][..],
                &long_name.as_bytes()[..255],
                &port,
            ]
            .concat(),
            0x01,
        ),
        (
            "domain with a space",
            request(0x01, &SocksTarget::Domain("exa mple.com".into(), p)),
            0x01,
        ),
        (
            "domain not UTF-8",
            [&[0x05, 0x01, 0x00, 0x03, 2, 0xff, 0xfe][..], &port].concat(),
            0x01,
        ),
        (
            "refused port",
            request(0x01, &SocksTarget::V4([127, 0, 0, 1].into(), closed_port())),
            0x05,
        ),
    ];
    let mut failures = Vec::new();
    for (what, req, want) in &cases {
        let r = socks_after_auth(&c, req);
        if r.data.get(..2) != Some(&[0x05, *want][..]) || !r.closed {
            failures.push(format!(
                "{what}: wanted REP {want:#04x} then close; got {:02x?} closed {}",
                r.data, r.closed
            ));
        }
    }
    // No reply at all where RFC 1928 has none: close.
    let no_reply: Vec<(&str, Vec<u8>, Vec<u8>)> = vec![
        (
            "SOCKS4 CONNECT",
            [&[0x04, 0x01][..], &port, &[127, 0, 0, 1], b"alice\0"].concat(),
            vec![],
        ),
        (
            "SOCKS4a CONNECT",
            [
                &[0x04, 0x01][..],
                &port,
                &[0, 0, 0, 1],
                b"alice\0localhost\0",
            ]
            .concat(),
            vec![],
        ),
        ("zero methods", vec![0x05, 0x00], vec![]),
        (
            "HTTP on the SOCKS port",
            b"GET / HTTP/1.1\r\n\r\n".to_vec(),
            vec![],
        ),
        (
            "auth version 5",
            [greeting(&[0x02]), vec![0x05, 1, b'a', 1, b'b']].concat(),
            vec![0x05, 0x02],
        ),
        (
            "255-byte username and password",
            [greeting(&[0x02]), userpass(&[b'u'; 255], &[b'p'; 255])].concat(),
            vec![0x05, 0x02, 0x01, 0x01],
        ),
        (
            "request version 4 after auth",
            [
                greeting(&[0x02]),
                userpass(c.user.as_bytes(), c.pass.as_bytes()),
                vec![0x04, 0x01, 0x00, 0x01, 127, 0, 0, 1],
                port.to_vec(),
            ]
            .concat(),
            vec![0x05, 0x02, 0x01, 0x00],
        ),
    ];
    for (what, bytes, want) in &no_reply {
        let r = raw_exchange(c.addrs.socks, bytes, false, DEADLINE + SLACK);
        if &r.data != want || !r.closed || r.elapsed > SLACK {
            failures.push(format!(
                "{what}: wanted {want:02x?} then a prompt close; got {:02x?} closed {} after {:?}",
                r.data, r.closed, r.elapsed
            ));
        }
    }
    // All 255 methods offered: username/password is chosen.
    let all_methods: Vec<u8> = (0..=254).collect();
    let r = raw_exchange(
        c.addrs.socks,
        &greeting(&all_methods),
        true,
        DEADLINE + SLACK,
    );
    if r.data.get(..2) != Some(&[0x05, 0x02][..]) {
        failures.push(format!("255 methods: got {:02x?}", r.data));
    }
    assert!(
        failures.is_empty(),
        "SOCKS5 edge cases:\n{}",
        failures.join("\n")
    );

    // An optimistic client: request and first data in one write.
    let mut req = request(0x01, &target);
    req.extend_from_slice(
        format!(
            "GET /hello HTTP/1.1\r\nHost: {}\r\nConnection: close\r\n\r\n",
            origin.addr
        )
        .as_bytes(),
    );
    let r = socks_after_auth(&c, &req);
    assert_eq!(r.data.get(..2), Some(&[0x05, 0x00][..]), "{:02x?}", r.data);
    let text = String::from_utf8_lossy(&r.data[10..]).into_owned();
    assert!(
        text.starts_with("HTTP/1.1 200") && text.ends_with("hello from origin\n"),
        "{text:?}"
    );
    still_serving(&mut c, &origin);
}

/// A local port with nothing listening.
fn closed_port() -> u16 {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    l.local_addr().unwrap().port()
}

/// Still open (no EOF, no reset, nothing received)?
fn is_open(mut s: &TcpStream) -> bool {
    let mut b = [0u8; 1];
    matches!(s.read(&mut b), Err(e) if e.kind() == ErrorKind::WouldBlock)
}

#[test]
fn a_thousand_idle_connections_do_not_starve_customers_and_are_closed_at_the_deadline() {
    let limit = raise_fd_limit(16 * 1024);
    assert!(
        limit >= 2500,
        "this test holds 1,000 sockets (and the control plane 1,000 more): \
         raise the open-files limit (ulimit -n) to at least 2500, it is {limit}"
    );
    // A longer deadline than the other tests, so the idle connections are
    // surely still held while the customer downloads.
    let deadline = Duration::from_secs(5);
    let mut c = cluster("idle-1000", deadline.as_secs());
    let blob = Blob::random(8 * 1024 * 1024, 1000);
    let origin = FileServer::start("origin", Some(blob.clone()));

    let opened = Instant::now();
    let mut idle: Vec<(&str, TcpStream)> = Vec::with_capacity(1000);
    for i in 0..1000 {
        let (name, addr) = if i % 2 == 0 {
            ("http", c.addrs.http)
        } else {
            ("socks", c.addrs.socks)
        };
        let s = TcpStream::connect_timeout(&addr, Duration::from_secs(5))
            .unwrap_or_else(|e| panic!("idle connection {i} to the {name} port: {e}"));
        s.set_nonblocking(true).unwrap();
        idle.push((name, s));
    }
    eprintln!("1000 idle connections open after {:?}", opened.elapsed());

    // A customer downloads through both ports meanwhile.
    for (what, curl) in [
        ("http", Curl::new().proxy(&c.http_proxy())),
        ("socks", Curl::new().proxy(&c.socks_proxy())),
    ] {
        let out = c.dir().join(format!("{what}.bin"));
        let t = Instant::now();
        let r = curl
            .output(&out)
            .arg(origin.url("/blob"))
            .max_time(Duration::from_secs(30))
            .run();
        r.expect_ok(&format!("{what} download beside 1000 idle connections"));
        assert_eq!(sha256_file(&out).0, blob.sha256(), "{what} body");
        eprintln!(
            "{what}: 8 MiB downloaded in {:?} beside the idle connections",
            t.elapsed()
        );
    }
    let during = opened.elapsed();
    let open_now = idle.iter_mut().filter(|(_, s)| is_open(s)).count();
    eprintln!("{open_now} of 1000 idle connections still open {during:?} after opening");
    if during + Duration::from_millis(500) < deadline {
        assert!(
            open_now >= 990,
            "idle connections were dropped early: {open_now} open after {during:?}"
        );
    }

    // Then the server closes all of them at the deadline.
    let mut open: Vec<(&str, TcpStream)> = idle;
    let mut last_close = Duration::ZERO;
    while !open.is_empty() && opened.elapsed() < deadline + SLACK + SLACK {
        open.retain_mut(|(_, s)| is_open(s));
        last_close = opened.elapsed();
        std::thread::sleep(Duration::from_millis(50));
    }
    let left_http = open.iter().filter(|(n, _)| *n == "http").count();
    assert!(
        open.is_empty(),
        "{} idle connections ({left_http} on the HTTP port) still open {:?} after opening; deadline {deadline:?}",
        open.len(),
        opened.elapsed()
    );
    eprintln!("all 1000 idle connections closed by the server within {last_close:?} of opening");
    assert!(
        last_close <= deadline + SLACK,
        "idle connections were closed only after {last_close:?} (deadline {deadline:?})"
    );
    // Writing to one now fails or is ignored; the server is fine.
    let _ = TcpStream::connect(c.addrs.http).and_then(|mut s| s.write_all(b"x"));
    still_serving(&mut c, &origin);
}
