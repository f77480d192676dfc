//! Security tables against a real cluster (TESTBED 3.3/3.4): who gets in
//! (S1), password guessing (B6), slow handshakes (B5), the spam-port policy
//! (S3) and secrets in logs (S7). Every row is a case with the outcome a
//! customer or an attacker would notice: a status code, an RFC 1929 status
//! byte, a closed connection, a log line.
//!
//! Several rows need connections from different source addresses: Linux
//! routes all of 127.0.0.0/8 to the loopback interface, so a socket bound
//! to 127.0.x.y before connecting reaches the control plane from there.

use std::io::{ErrorKind, Read, Write};
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4, TcpStream};
use std::os::fd::AsRawFd;
use std::time::{Duration, Instant};

use base64::Engine;
use nix::sys::socket::{AddressFamily, SockFlag, SockType, SockaddrIn, bind, connect, socket};
use serde_json::json;
use tests::harness::api::{RawReply, read_until_closed};
use tests::harness::socks::{greeting, request, userpass};
use tests::{Cluster, ClusterOpts, Curl, FileServer, SocksTarget, eventually};

const REPLY_TIMEOUT: Duration = Duration::from_secs(10);
/// Scheduling slack on a busy 2-core machine.
const SLACK: Duration = Duration::from_secs(3);

// ---- sockets from chosen loopback addresses ----------------------------

fn lo(a: u8, b: u8, c: u8) -> Ipv4Addr {
    Ipv4Addr::new(127, a, b, c)
}

/// A TCP connection to `to` from `src` (any port).
fn connect_from(src: Ipv4Addr, to: SocketAddr) -> TcpStream {
    let SocketAddr::V4(to) = to else {
        panic!("IPv4 proxy address expected, got {to}")
    };
    let fd = socket(
        AddressFamily::Inet,
        SockType::Stream,
        SockFlag::SOCK_CLOEXEC,
        None,
    )
    .expect("socket");
    bind(fd.as_raw_fd(), &SockaddrIn::from(SocketAddrV4::new(src, 0)))
        .unwrap_or_else(|e| panic!("bind {src}: {e}"));
    connect(fd.as_raw_fd(), &SockaddrIn::from(to))
        .unwrap_or_else(|e| panic!("connect {src} -> {to}: {e}"));
    let s = TcpStream::from(fd);
    let _ = s.set_nodelay(true);
    s
}

/// Send `bytes` from `src`, then read until the server closes, `enough`
/// says the answer so far is complete, or `timeout` passes.
fn exchange_from(
    src: Ipv4Addr,
    to: SocketAddr,
    bytes: &[u8],
    enough: impl Fn(&[u8]) -> bool,
    timeout: Duration,
) -> RawReply {
    let start = Instant::now();
    let mut s = connect_from(src, to);
    let mut data = Vec::new();
    let closed = if s.write_all(bytes).is_err() {
        let _ = read_until_closed(&mut s, &mut data, start, timeout);
        true
    } else {
        let mut buf = [0u8; 16 * 1024];
        loop {
            let left = timeout.saturating_sub(start.elapsed());
            if enough(&data) || left.is_zero() {
                break false;
            }
            let _ = s.set_read_timeout(Some(left));
            match s.read(&mut buf) {
                Ok(0) => break true,
                Ok(k) => data.extend_from_slice(&buf[..k]),
                Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
                    break false;
                }
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(_) => break true,
            }
        }
    };
    RawReply {
        data,
        closed,
        elapsed: start.elapsed(),
    }
}

/// Read to the close.
fn to_close(_: &[u8]) -> bool {
    false
}

fn b64(bytes: &[u8]) -> String {
    base64::engine::general_purpose::STANDARD.encode(bytes)
}

/// `Basic base64(user ":" pass)` over raw bytes.
fn basic(user: &[u8], pass: &[u8]) -> String {
    format!("Basic {}", b64(&[user, b":", pass].concat()))
}

fn proxy_auth(value: &str) -> String {
    format!("Proxy-Authorization: {value}\r\n")
}

/// An absolute-form GET for the origin's `/hello`, with `headers`.
fn get(origin: SocketAddr, headers: &str) -> Vec<u8> {
    format!(
        "GET http://{origin}/hello HTTP/1.1\r\nHost: {origin}\r\n{headers}Connection: close\r\n\r\n"
    )
    .into_bytes()
}

fn connect_req(authority: &str, headers: &str) -> Vec<u8> {
    format!("CONNECT {authority} HTTP/1.1\r\nHost: {authority}\r\n{headers}\r\n").into_bytes()
}

/// What an HTTP attempt from `src` got: `Ok(())` for the origin's page,
/// else a description.
fn http_outcome(r: &RawReply) -> Result<(), String> {
    match r.status() {
        Some(200) if r.text().ends_with("hello from origin\n") => Ok(()),
        Some(s) => Err(format!("{s} (closed {})", r.closed)),
        None => Err(format!("no answer {:?} (closed {})", r.text(), r.closed)),
    }
}

fn is_407(r: &RawReply) -> bool {
    r.status() == Some(407) && r.closed
}

/// Greeting (username/password only), then `auth` as the client's next
/// message; reads until a successful negotiation (the server then waits
/// for a request) or the close.
fn socks_from(src: Ipv4Addr, proxy: SocketAddr, auth: &[u8]) -> RawReply {
    let bytes = [greeting(&[0x02]), auth.to_vec()].concat();
    exchange_from(src, proxy, &bytes, |d| d == SOCKS_OK, REPLY_TIMEOUT)
}

const SOCKS_OK: [u8; 4] = [0x05, 0x02, 0x01, 0x00];
const SOCKS_REFUSED: [u8; 4] = [0x05, 0x02, 0x01, 0x01];

fn socks_refused(r: &RawReply) -> bool {
    r.data == SOCKS_REFUSED && r.closed
}

fn create_customer(c: &Cluster, name: &str, password: &str) {
    let r = c.api().post(
        "/api/v1/customers",
        Some(&json!({"username": name, "password": password})),
    );
    assert_eq!(r.status, 201, "create customer {name}: {}", r.text());
}

// ---- S1: no authentication bypass -------------------------------------

/// One row of the bypass matrix: what the client sends on each port (if
/// that port can express it) and whether it must get in.
struct Row {
    what: &'static str,
    /// A complete HTTP request.
    http: Option<Vec<u8>>,
    /// The message after a username/password greeting.
    socks: Option<Vec<u8>>,
    admit: bool,
}

/// Covered elsewhere, not repeated here (auth_and_policy.rs:
/// `http_proxy_answers_407_without_valid_credentials`,
/// `socks5_refuses_wrong_credentials_and_no_auth_clients`; bad_input.rs:
/// `socks5_protocol_edge_cases_get_their_reply_codes`): no credentials,
/// wrong password, unknown user, empty password, not base64, Bearer scheme,
/// credentials in `Authorization` on a GET, SOCKS5 offering only NO-AUTH
/// (method 0xFF), RFC 1929 version 5 with junk credentials, and 255-byte
/// SOCKS username and password.
///
/// Every row runs from its own source address and is followed by a control:
/// alice's exact credentials from the same address get in. So a refusal is
/// the row's own, not the brute-force backoff and not an outage.
#[test]
fn s1_only_exact_valid_credentials_get_in() {
    let c = Cluster::start(ClusterOpts::named("s1-bypass"));
    let origin = FileServer::start("origin", None);
    let o = origin.addr;
    let (alice, pass) = (c.user.as_bytes().to_vec(), c.pass.as_bytes().to_vec());
    let bob_pass = "bob-password-1";
    create_customer(&c, "bob", bob_pass);
    let colon_pass = "pa:ss:word-123";
    create_customer(&c, "colon-user", colon_pass);
    let with = |user: &[u8], pw: &[u8]| {
        (
            Some(get(o, &proxy_auth(&basic(user, pw)))),
            Some(userpass(user, pw)),
        )
    };
    let cat = |a: &[u8], b: &[u8]| [a, b].concat();

    let mut rows: Vec<Row> = Vec::new();
    let mut add = |what, (http, socks): (Option<Vec<u8>>, Option<Vec<u8>>), admit| {
        rows.push(Row {
            what,
            http,
            socks,
            admit,
        })
    };
    add("exact credentials", with(&alice, &pass), true);
    add(
        "right password of another user (bob's for alice)",
        with(&alice, bob_pass.as_bytes()),
        false,
    );
    add(
        "right password of another user (alice's for bob)",
        with(b"bob", &pass),
        false,
    );
    add(
        "credentials in Authorization on a CONNECT",
        (
            Some(connect_req(
                &o.to_string(),
                &format!("Authorization: {}\r\n", basic(&alice, &pass)),
            )),
            None,
        ),
        false,
    );
    // RFC 7235: the scheme is case-insensitive; the credentials are not.
    add(
        "lowercase `basic`, exact credentials",
        (
            Some(get(
                o,
                &proxy_auth(&format!("basic {}", b64(&cat(&alice, &cat(b":", &pass))))),
            )),
            None,
        ),
        true,
    );
    add(
        "lowercase `basic`, wrong password",
        (
            Some(get(
                o,
                &proxy_auth(&format!("basic {}", b64(b"alice:nope-nope"))),
            )),
            None,
        ),
        false,
    );
    // Basic credentials are not URL-encoded (curl decodes `%69` in a proxy
    // URL before it encodes, so this is a raw-header case).
    add(
        "percent-encoded username al%69ce",
        with(b"al%69ce", &pass),
        false,
    );
    add(
        "percent-encoded password",
        with(&alice, b"alice%2Dsecret%2D1"),
        false,
    );
    add(
        "NUL after the username",
        with(&cat(&alice, b"\0"), &pass),
        false,
    );
    add("NUL inside the username", with(b"ali\0ce", &pass), false);
    add(
        "NUL after the password",
        with(&alice, &cat(&pass, b"\0")),
        false,
    );
    add(
        "extra colon: alice:PASS:extra (the password is `PASS:extra`)",
        with(&alice, &cat(&pass, b":extra")),
        false,
    );
    add(
        "a password that does contain colons",
        with(b"colon-user", colon_pass.as_bytes()),
        true,
    );
    add(
        "colon password cut at the first colon",
        with(b"colon-user", b"pa"),
        false,
    );
    add(
        "username with a trailing space",
        with(b"alice ", &pass),
        false,
    );
    add(
        "username with a leading space",
        with(b" alice", &pass),
        false,
    );
    add(
        "password with a trailing space",
        with(&alice, &cat(&pass, b" ")),
        false,
    );
    add("username in another case", with(b"Alice", &pass), false);
    add(
        "UTF-8 lookalike username (Cyrillic a)",
        with("\u{430}lice".as_bytes(), &pass),
        false,
    );
    add(
        "UTF-8 lookalike username (fullwidth a)",
        with("\u{ff41}lice".as_bytes(), &pass),
        false,
    );
    add(
        "255-byte username",
        (Some(get(o, &proxy_auth(&basic(&[b'a'; 255], &pass)))), None),
        false,
    );
    add(
        "256-byte username",
        (Some(get(o, &proxy_auth(&basic(&[b'a'; 256], &pass)))), None),
        false,
    );
    add(
        "two Proxy-Authorization headers, valid one first",
        (
            Some(get(
                o,
                &(proxy_auth(&basic(&alice, &pass)) + &proxy_auth(&basic(&alice, b"wrong"))),
            )),
            None,
        ),
        false,
    );
    add(
        "two Proxy-Authorization headers, valid one last",
        (
            Some(get(
                o,
                &(proxy_auth(&basic(&alice, b"wrong")) + &proxy_auth(&basic(&alice, &pass))),
            )),
            None,
        ),
        false,
    );
    add(
        "valid token followed by junk",
        (
            Some(get(o, &proxy_auth(&format!("{} x", basic(&alice, &pass))))),
            None,
        ),
        false,
    );
    // RFC 1929 sub-negotiation version other than 1, with alice's exact
    // credentials: no status at all, just a close.
    for (what, v) in [
        ("RFC 1929 version 0x00, exact credentials", 0x00u8),
        ("RFC 1929 version 0x02, exact credentials", 0x02),
        ("RFC 1929 version 0x05, exact credentials", 0x05),
    ] {
        let mut m = userpass(&alice, &pass);
        m[0] = v;
        add(what, (None, Some(m)), false);
    }
    // ROUTING PARAMETERS (S1, frp CVE-2026-40910 regression): once the
    // username parser (proxy/principal.rs) is wired in, add rows here:
    // `alice-country-de` + wrong password, `alice-session-x` + another
    // customer's password, `bob-country-de` + alice's password, parameters
    // with percent-encoding / NUL / lookalikes, each refused; and
    // `alice-country-de` + alice's password admitted as alice.
    // EXPIRED PLAN: add a row once plans can expire.

    let mut failures = Vec::new();
    for (i, row) in rows.iter().enumerate() {
        let src = lo(1, 0, 10 + i as u8);
        if let Some(req) = &row.http {
            let r = exchange_from(src, c.addrs.http, req, to_close, REPLY_TIMEOUT);
            let got = http_outcome(&r);
            let ok = if row.admit { got.is_ok() } else { is_407(&r) };
            if !ok {
                failures.push(format!(
                    "HTTP  {}: want {}, got {got:?}",
                    row.what,
                    if row.admit { "200" } else { "407 + close" }
                ));
            }
        }
        if let Some(m) = &row.socks {
            let r = socks_from(src, c.addrs.socks, m);
            let ok = if row.admit {
                r.data == SOCKS_OK
            } else {
                // A refusal: status 1, or no status at all; never 0.
                r.closed && (r.data == SOCKS_REFUSED || r.data == [0x05, 0x02])
            };
            if !ok {
                failures.push(format!(
                    "SOCKS {}: got {:02x?} closed {}",
                    row.what, r.data, r.closed
                ));
            }
        }
        let control = exchange_from(
            src,
            c.addrs.http,
            &get(o, &proxy_auth(&basic(&alice, &pass))),
            to_close,
            REPLY_TIMEOUT,
        );
        if let Err(e) = http_outcome(&control) {
            failures.push(format!("control after `{}` from {src}: {e}", row.what));
        }
    }

    // A disabled customer. There is no API or CLI for the flag yet, so it
    // is set in the database directly (skipped without the sqlite3 tool).
    let dora_pass = "dora-password-1";
    create_customer(&c, "dora", dora_pass);
    let db = c.data_dir().join("cellgate.db");
    let set = std::process::Command::new("sqlite3")
        .arg(&db)
        .arg("UPDATE customers SET disabled = 1 WHERE username = 'dora';")
        .output();
    match set {
        Ok(out) if out.status.success() => {
            let src = lo(1, 1, 1);
            let r = exchange_from(
                src,
                c.addrs.http,
                &get(o, &proxy_auth(&basic(b"dora", dora_pass.as_bytes()))),
                to_close,
                REPLY_TIMEOUT,
            );
            if !is_407(&r) {
                failures.push(format!("HTTP  disabled customer: {:?}", http_outcome(&r)));
            }
            let r = socks_from(src, c.addrs.socks, &userpass(b"dora", dora_pass.as_bytes()));
            if !socks_refused(&r) {
                failures.push(format!("SOCKS disabled customer: {:02x?}", r.data));
            }
        }
        other => {
            eprintln!("SKIPPED disabled-customer row: cannot set the flag with sqlite3 ({other:?})")
        }
    }

    assert!(
        failures.is_empty(),
        "{} of {} rows failed:\n{}",
        failures.len(),
        rows.len() + 1,
        failures.join("\n")
    );
    eprintln!("S1: {} rows on both ports as expected", rows.len() + 1);
}

// ---- B6: password guessing --------------------------------------------

/// The control plane's brute-force defaults (`AuthLimits::default()`).
const USER_THRESHOLD: usize = 10;
const SOURCE_THRESHOLD: usize = 20;

fn http_login(c: &Cluster, origin: SocketAddr, src: Ipv4Addr, user: &str, pass: &str) -> RawReply {
    exchange_from(
        src,
        c.addrs.http,
        &get(
            origin,
            &proxy_auth(&basic(user.as_bytes(), pass.as_bytes())),
        ),
        to_close,
        REPLY_TIMEOUT,
    )
}

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

fn wait_for_log(c: &Cluster, needle: &str) -> bool {
    eventually(Duration::from_secs(5), Duration::from_millis(50), || {
        c.cp_log_text().contains(needle).then_some(())
    })
    .is_some()
}

#[test]
fn b6_password_guessing_backs_off_per_source_and_per_username() {
    let c = Cluster::start(ClusterOpts::named("b6-guessing"));
    let origin = FileServer::start("origin", None);
    let o = origin.addr;
    let (alice, pass) = (c.user.clone(), c.pass.clone());
    for name in ["bob", "carol", "dave"] {
        create_customer(&c, name, &format!("{name}-password-1"));
    }
    let home = lo(0, 0, 1);
    let attacker = lo(2, 0, 1);

    // Alice works from home first: that address becomes trusted for her.
    http_outcome(&http_login(&c, o, home, &alice, &pass)).expect("alice from home");

    // 30 wrong passwords for alice from one address, one connection each.
    let mut took = Vec::new();
    for i in 0..30 {
        let r = http_login(&c, o, attacker, &alice, &format!("guess-{i}"));
        assert!(is_407(&r), "guess {i}: {:?}", r.text());
        took.push(r.elapsed);
    }
    let hashed = median(took[..USER_THRESHOLD].to_vec());
    let refused = median(took[SOURCE_THRESHOLD..].to_vec());
    eprintln!(
        "30 guesses: median {hashed:?} for the first {USER_THRESHOLD} (argon2 each), \
         {refused:?} for the last 10 (refused in backoff, no argon2)"
    );
    // The control plane says why, and raised alerts at both thresholds.
    for needle in [
        format!("auth: user {alice} reached {USER_THRESHOLD} failed logins"),
        format!("auth: {attacker} reached {SOURCE_THRESHOLD} failed logins"),
        format!("auth: backoff for user {alice} ("),
        format!("auth: backoff for {attacker} ("),
    ] {
        assert!(wait_for_log(&c, &needle), "no log line {needle:?}");
    }
    let socks_login = |src, user: &str, pw: &str| {
        socks_from(
            src,
            c.addrs.socks,
            &userpass(user.as_bytes(), pw.as_bytes()),
        )
    };

    // Who gets in now. Order matters only in that every row but the last
    // runs while both backoffs (30 s and more) are on.
    let bob_pass = "bob-password-1";
    type Attempt<'a> = (&'a str, Ipv4Addr, &'a str, &'a str, bool);
    let table: Vec<Attempt<'_>> = vec![
        (
            "the guessing address, alice's right password",
            attacker,
            &alice,
            &pass,
            false,
        ),
        (
            "the guessing address, another customer",
            attacker,
            "bob",
            bob_pass,
            false,
        ),
        (
            "a new address, alice's right password",
            lo(2, 0, 2),
            &alice,
            &pass,
            false,
        ),
        (
            "alice's home address, her right password",
            home,
            &alice,
            &pass,
            true,
        ),
        (
            "a new address, another customer",
            lo(2, 0, 3),
            "bob",
            bob_pass,
            true,
        ),
    ];
    let mut failures = Vec::new();
    for (what, src, user, pw, admit) in &table {
        let h = http_login(&c, o, *src, user, pw);
        let s = socks_login(*src, user, pw);
        let (h_ok, s_ok) = if *admit {
            (http_outcome(&h).is_ok(), s.data == SOCKS_OK)
        } else {
            (is_407(&h), socks_refused(&s))
        };
        if !h_ok || !s_ok {
            failures.push(format!(
                "{what} ({src}, {user}): HTTP {:?}, SOCKS {:02x?}",
                http_outcome(&h),
                s.data
            ));
        }
    }

    // A customer who mistypes from one address and then gets it right
    // starts afresh: 14 wrong passwords in all, never in backoff.
    let typo = lo(3, 0, 1);
    for round in 0..2 {
        for i in 0..7 {
            let r = http_login(&c, o, typo, "carol", &format!("typo-{round}-{i}"));
            assert!(is_407(&r), "carol typo {round}/{i}");
        }
        if let Err(e) = http_outcome(&http_login(&c, o, typo, "carol", "carol-password-1")) {
            failures.push(format!("carol after 7 typos (round {round}): {e}"));
        }
    }
    // Guesses spread over addresses are not wiped out by the customer's
    // own login elsewhere: 9 guesses, dave logs in from a new address
    // (now trusted for him), one more guess reaches the threshold.
    for i in 0..9u8 {
        let src = lo(3, 1, 1 + i % 2);
        assert!(is_407(&http_login(&c, o, src, "dave", &format!("g{i}"))));
    }
    let dave_home = lo(3, 2, 1);
    if let Err(e) = http_outcome(&http_login(&c, o, dave_home, "dave", "dave-password-1")) {
        failures.push(format!("dave after 9 spread guesses: {e}"));
    }
    assert!(is_407(&http_login(&c, o, lo(3, 1, 3), "dave", "g9")));
    if !is_407(&http_login(&c, o, lo(3, 3, 1), "dave", "dave-password-1")) {
        failures.push("dave from a new address after 10 spread guesses: not refused".into());
    }
    if let Err(e) = http_outcome(&http_login(&c, o, dave_home, "dave", "dave-password-1")) {
        failures.push(format!("dave from his trusted address: {e}"));
    }
    // That the backoff ends is a unit test with injected time (auth.rs):
    // the shortest backoff here is 30 s.
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

// ---- B5: slow handshakes -------------------------------------------------

/// The control plane's per-listener handshake limits
/// (`HandshakeLimits::default()`).
const PER_SOURCE: usize = 64;
const BUSY_FROM: usize = 1024;

/// A slow client: one byte now, one more per tick, never a whole message.
struct Slow {
    stream: TcpStream,
    port: &'static str,
    next: usize,
    opened: Instant,
    /// `Some(when)` once the server closed it; what it said before.
    closed: Option<Duration>,
    said: Vec<u8>,
}

/// The bytes a slow client dribbles: an HTTP head that never ends, or a
/// SOCKS5 greeting announcing 255 methods.
fn dribble(port: &str, i: usize) -> u8 {
    const HTTP: &[u8] = b"GET http://slow.example/ HTTP/1.1\r\nX-Slow: ";
    match port {
        "http" => HTTP.get(i).copied().unwrap_or(b'a'),
        _ => [0x05, 0xFF].get(i).copied().unwrap_or(0x00),
    }
}

impl Slow {
    fn open(src: Ipv4Addr, addr: SocketAddr, port: &'static str) -> Self {
        let mut stream = connect_from(src, addr);
        let _ = stream.write_all(&[dribble(port, 0)]);
        stream.set_nonblocking(true).unwrap();
        Self {
            stream,
            port,
            next: 1,
            opened: Instant::now(),
            closed: None,
            said: Vec::new(),
        }
    }

    /// Notice a close; `true` while still open.
    fn poll(&mut self) -> bool {
        if self.closed.is_some() {
            return false;
        }
        let mut buf = [0u8; 256];
        loop {
            match self.stream.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => self.said.extend_from_slice(&buf[..n]),
                Err(e) if e.kind() == ErrorKind::WouldBlock => return true,
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(_) => break,
            }
        }
        self.closed = Some(self.opened.elapsed());
        false
    }

    fn tick(&mut self) {
        if self.poll() {
            let _ = self.stream.write(&[dribble(self.port, self.next)]);
            self.next += 1;
        }
    }
}

#[test]
fn b5_slow_handshakes_are_capped_per_source_and_closed_at_the_deadline() {
    // The production default: every slow connection must be closed by it.
    let deadline = Duration::from_secs(10);
    let c = Cluster::start(ClusterOpts {
        config_toml: Some(format!("handshake_timeout_secs = {}\n", deadline.as_secs())),
        ..ClusterOpts::named("b5-slowloris")
    });
    let origin = FileServer::start("origin", None);
    let ports = [("http", c.addrs.http), ("socks", c.addrs.socks)];

    // One source fills both listeners past the busy mark ...
    let heavy = lo(0, 0, 2);
    let per_port = BUSY_FROM + 76;
    let started = Instant::now();
    let mut slow: Vec<(Ipv4Addr, Slow)> = Vec::new();
    for _ in 0..per_port {
        for (name, addr) in ports {
            slow.push((heavy, Slow::open(heavy, addr, name)));
        }
    }
    // ... then a second slow source asks for more than its share.
    let second = lo(0, 0, 3);
    for _ in 0..100 {
        for (name, addr) in ports {
            slow.push((second, Slow::open(second, addr, name)));
        }
    }
    eprintln!(
        "{} slow connections opened in {:?}",
        slow.len(),
        started.elapsed()
    );
    std::thread::sleep(Duration::from_millis(500));
    let held = |slow: &mut Vec<(Ipv4Addr, Slow)>, src: Ipv4Addr, port: &str| {
        slow.iter_mut()
            .filter(|(s, c)| *s == src && c.port == port)
            .map(|(_, c)| c.poll())
            .filter(|open| *open)
            .count()
    };
    let mut counts = Vec::new();
    for (name, _) in ports {
        counts.push((
            name,
            held(&mut slow, heavy, name),
            held(&mut slow, second, name),
        ));
    }
    let measured = started.elapsed();
    eprintln!("held open (port, {heavy}, {second}): {counts:?}");

    // A customer from another address is served meanwhile.
    let mut latencies = Vec::new();
    for (name, proxy) in [("http", c.http_proxy()), ("socks", c.socks_proxy())] {
        let r = Curl::new()
            .proxy(&proxy)
            .write_out("%{time_total}")
            .arg("-o")
            .arg("/dev/null")
            .arg(origin.url("/hello"))
            .max_time(Duration::from_secs(10))
            .run();
        r.expect_ok(&format!("{name} customer beside the slow connections"));
        // curl's own measure (`time_total`), and wall time with curl's start.
        latencies.push((name, format!("{} s", r.stdout), r.elapsed));
    }
    eprintln!("customer from 127.0.0.1 while both listeners are busy: {latencies:?}");

    // Nobody holds more than a busy listener allows. Opening 2,400
    // connections beside other tests on 2 cores can take seconds (SYN
    // retries when the accept queue is full); if it took so long that the
    // first ones may have met their deadline already, the counts mean
    // nothing and are only reported.
    let counts_valid = measured + SLACK < deadline;
    if !counts_valid {
        eprintln!("NOT CHECKED: the per-source counts (opening took {measured:?})");
    }
    for (name, h, s) in counts.iter().filter(|_| counts_valid) {
        assert!(
            *h <= BUSY_FROM,
            "{heavy} holds {h} handshakes on the {name} port"
        );
        assert!(
            *s <= PER_SOURCE,
            "{second} holds {s} handshakes on the {name} port"
        );
        assert!(
            h + s >= BUSY_FROM,
            "the {name} port refused slow connections before it was busy: {h} + {s}"
        );
    }
    // Those closed at once were told so on the HTTP port (429), or just
    // closed.
    for (_, conn) in &slow {
        if conn.closed.is_some() && conn.port == "http" && !conn.said.is_empty() {
            let text = String::from_utf8_lossy(&conn.said);
            assert!(text.starts_with("HTTP/1.1 429"), "over the cap: {text:?}");
        }
    }

    // The deadline closes the rest while they keep dribbling a byte every
    // 2 s (each is polled every 250 ms, so its close time is exact enough).
    let stop = started + deadline + SLACK + SLACK;
    let mut wrote = Instant::now();
    while Instant::now() < stop && slow.iter_mut().any(|(_, c)| c.poll()) {
        if wrote.elapsed() >= Duration::from_secs(2) {
            wrote = Instant::now();
            for (_, conn) in slow.iter_mut() {
                conn.tick();
            }
        }
        std::thread::sleep(Duration::from_millis(250));
    }
    let open: Vec<_> = slow
        .iter_mut()
        .filter_map(|(s, c)| c.poll().then_some((*s, c.port)))
        .collect();
    assert!(
        open.is_empty(),
        "{} slow connections still open: {:?}",
        open.len(),
        &open[..open.len().min(5)]
    );
    let latest = slow
        .iter()
        .filter_map(|(_, c)| c.closed)
        .max()
        .unwrap_or_default();
    eprintln!("every slow connection closed within {latest:?} of opening (deadline {deadline:?})");
    assert!(
        latest <= deadline + SLACK,
        "a slow connection lived {latest:?}, deadline {deadline:?}"
    );
    // The slots are free again: the slow source itself can log in.
    let r = Curl::new()
        .proxy(&c.http_proxy())
        .arg("--interface")
        .arg(heavy.to_string())
        .arg(origin.url("/hello"))
        .run();
    r.expect_ok("a customer from the formerly slow address");
}

// ---- S3: spam ports -------------------------------------------------------

/// Covered elsewhere (auth_and_policy.rs): ports 25/465/587 on 192.0.2.1
/// (GET, CONNECT, SOCKS IPv4) and example.com:25 under the default policy,
/// and on 127.0.0.1 / localhost with private targets allowed. Added here:
/// IPv6 literals, names for every spam port, a port with leading zeros.
#[test]
fn s3_spam_ports_are_refused_in_every_address_form() {
    let c = Cluster::start(ClusterOpts {
        allow_private: false,
        ..ClusterOpts::named("s3-ports")
    });
    let auth = proxy_auth(&c.basic_auth());
    let mut failures = Vec::new();
    for port in [25u16, 465, 587] {
        let v6: Ipv6Addr = "2001:db8::25".parse().unwrap();
        let cases = [
            (format!("[{v6}]:{port}"), SocksTarget::V6(v6, port)),
            (
                format!("mail.example.net:{port}"),
                SocksTarget::Domain("mail.example.net".into(), port),
            ),
            (
                format!("198.51.100.25:{port}"),
                SocksTarget::V4(Ipv4Addr::new(198, 51, 100, 25), port),
            ),
        ];
        for (authority, socks) in cases {
            for (how, req) in [
                ("CONNECT", connect_req(&authority, &auth)),
                (
                    "GET",
                    format!(
                        "GET http://{authority}/ HTTP/1.1\r\nHost: {authority}\r\n{auth}Connection: close\r\n\r\n"
                    )
                    .into_bytes(),
                ),
            ] {
                let r = exchange_from(lo(0, 0, 1), c.addrs.http, &req, to_close, REPLY_TIMEOUT);
                if r.status() != Some(403) {
                    failures.push(format!("{how} {authority}: {:?}", r.text().lines().next()));
                }
            }
            let msg = [
                userpass(c.user.as_bytes(), c.pass.as_bytes()),
                request(0x01, &socks),
            ]
            .concat();
            let r = exchange_from(
                lo(0, 0, 1),
                c.addrs.socks,
                &[greeting(&[0x02]), msg].concat(),
                to_close,
                REPLY_TIMEOUT,
            );
            if r.data.get(4..6) != Some(&[0x05, 0x02][..]) || !r.closed {
                failures.push(format!("SOCKS {socks}: {:02x?}", r.data));
            }
        }
        // Leading zeros are still that port, or not a port at all.
        let r = exchange_from(
            lo(0, 0, 1),
            c.addrs.http,
            &connect_req(&format!("mail.example.net:00{port}"), &auth),
            to_close,
            REPLY_TIMEOUT,
        );
        if !matches!(r.status(), Some(403 | 400)) {
            failures.push(format!("CONNECT :00{port}: {:?}", r.text().lines().next()));
        }
    }
    assert!(failures.is_empty(), "not refused:\n{}", failures.join("\n"));
}

// ---- S7: secrets stay out of the logs ------------------------------------

#[test]
fn s7_no_password_token_or_proxy_authorization_in_any_log() {
    let mut c = Cluster::start(ClusterOpts::named("s7-logs"));
    let origin = FileServer::start("origin", None);
    let o = origin.addr;
    let password = "Quokka-7713-Zephyr-secret";
    let wrong = "Wombat-5521-Guess-wrong";
    create_customer(&c, "s7user", password);
    let mut secrets: Vec<(String, String)> = vec![
        ("customer password".into(), password.into()),
        ("wrong password".into(), wrong.into()),
    ];
    for (what, pw) in [("right", password), ("wrong", wrong)] {
        let value = basic(b"s7user", pw.as_bytes());
        secrets.push((format!("Proxy-Authorization ({what})"), value.clone()));
        secrets.push((
            format!("Proxy-Authorization token ({what})"),
            value["Basic ".len()..].to_string(),
        ));
        secrets.push((format!("user:pass ({what})"), format!("s7user:{pw}")));
    }

    // Logins: right and wrong, both ports, curl and raw; a password typed
    // into the username field; enough guesses to trigger the backoff lines.
    Curl::new()
        .proxy(&c.http_proxy_as("s7user", password))
        .arg(origin.url("/hello"))
        .run()
        .expect_ok("HTTP right password");
    Curl::new()
        .proxy(&c.socks_proxy_as("s7user", password))
        .arg(origin.url("/hello"))
        .run()
        .expect_ok("SOCKS right password");
    for i in 0..12u8 {
        let src = lo(7, 0, 1 + i % 3);
        assert!(is_407(&http_login(&c, o, src, "s7user", wrong)));
        assert!(socks_refused(&socks_from(
            src,
            c.addrs.socks,
            &userpass(b"s7user", wrong.as_bytes())
        )));
    }
    assert!(is_407(&http_login(&c, o, lo(7, 1, 1), password, password)));
    let _ = socks_from(
        lo(7, 1, 1),
        c.addrs.socks,
        &userpass(password.as_bytes(), b"x"),
    );

    // Tokens: an enrollment token through the API (used by a new agent,
    // then replayed), one from the CLI (never used), a forged one, an admin
    // token from the CLI (used, and a wrong one tried).
    let api = c.api();
    let r = api.post("/api/v1/enroll-tokens", Some(&json!({"name": "s7-agent"})));
    assert_eq!(r.status, 201, "{}", r.text());
    let enroll = r.json()["token"].as_str().expect("token").to_string();
    let unused = c.create_enroll_token("s7-unused", None);
    let dir = c.dir().join("s7-agent");
    let out = c.run_enroll(&enroll, &dir);
    assert!(out.status.success(), "enroll: {out:?}");
    let replay = c.run_enroll(&enroll, &c.dir().join("s7-replay"));
    assert!(!replay.status.success(), "a replayed token enrolled");
    for (what, t) in [
        ("API enrollment token", &enroll),
        ("CLI enrollment token", &unused),
    ] {
        secrets.push((what.into(), t.clone()));
        let secret = shared::enroll::EnrollToken::decode(t)
            .expect("decode")
            .secret;
        secrets.push((format!("{what} secret"), secret));
    }
    let mut forged = shared::enroll::EnrollToken::decode(&enroll).unwrap();
    forged.secret = "Forged-Secret-0000-not-a-real-token-xx".into();
    let forged_text = forged.encode();
    let _ = c.run_enroll(&forged_text, &c.dir().join("s7-forged"));
    secrets.push(("forged enrollment secret".into(), forged.secret.clone()));
    let out = c.cp_cli(&["admin-token", "create", "--label", "s7"]);
    let admin = String::from_utf8_lossy(&out.stdout).trim().to_string();
    assert!(admin.starts_with("cga_"), "admin token: {admin:?}");
    let r = tests::Api::new(c.addrs.api, Some(&admin)).get("/api/v1/customers");
    assert_eq!(r.status, 200, "admin token from the CLI");
    let bad_admin = "cga_WrongWrongWrong0000000000000000000000000";
    let r = tests::Api::new(c.addrs.api, Some(bad_admin)).get("/api/v1/customers");
    assert_eq!(r.status, 401, "a wrong admin token");
    secrets.push(("admin token (CLI)".into(), admin));
    secrets.push(("wrong admin token".into(), bad_admin.into()));

    // Give the processes a moment to write, then read every log.
    std::thread::sleep(Duration::from_millis(500));
    assert!(c.cp_running(), "the control plane exited");
    let mut logs = vec![("control-plane".to_string(), c.cp_log_text())];
    for a in &c.agents {
        logs.push((a.name.clone(), a.log_text()));
    }
    // The first start prints the initial admin token once, on purpose (the
    // harness reads it from there); it must appear on that line only.
    const SHOWN_ONCE: &str = "admin token (shown once; store it safely): ";
    let cp = &logs[0].1;
    let shown: Vec<&str> = cp.lines().filter(|l| l.contains(&c.admin_token)).collect();
    assert!(
        shown.len() == 1 && shown[0].contains(SHOWN_ONCE),
        "the initial admin token appears outside its one line: {shown:?}"
    );
    let mut leaks = Vec::new();
    for (name, text) in &logs {
        for (what, secret) in &secrets {
            if let Some(line) = text.lines().find(|l| l.contains(secret.as_str())) {
                leaks.push(format!("{what} in the {name} log: {line}"));
            }
        }
        if let Some(line) = text
            .lines()
            .find(|l| l.to_ascii_lowercase().contains("proxy-authorization:"))
        {
            leaks.push(format!(
                "a Proxy-Authorization header in the {name} log: {line}"
            ));
        }
    }
    eprintln!(
        "checked {} secrets in {} logs ({} bytes)",
        secrets.len(),
        logs.len(),
        logs.iter().map(|(_, t)| t.len()).sum::<usize>()
    );
    assert!(leaks.is_empty(), "secrets in logs:\n{}", leaks.join("\n"));
}

#[test]
fn backoff_thresholds_follow_the_configuration() {
    // One failure is enough here, and the backoff outlasts the test.
    let c = Cluster::start(ClusterOpts {
        config_toml: Some(
            "[security]\nauth_user_failures = 1\nauth_backoff_secs = 600\nauth_max_backoff_secs = 600\n"
                .into(),
        ),
        ..ClusterOpts::named("auth-config")
    });
    let origin = FileServer::start("origin", None);
    create_customer(&c, "erin", "erin-password-1");
    let src = lo(3, 0, 1);
    assert!(is_407(&http_login(
        &c,
        origin.addr,
        src,
        "erin",
        "wrong-guess"
    )));
    // The right password from an address that never logged in as erin is
    // refused too now, with the same answer as a wrong one.
    assert!(is_407(&http_login(
        &c,
        origin.addr,
        lo(3, 0, 2),
        "erin",
        "erin-password-1"
    )));
    // Other users are not affected.
    assert_eq!(
        http_outcome(&http_login(&c, origin.addr, src, &c.user, &c.pass)),
        Ok(())
    );
}
