//! Who may use the proxy, and where it may go: customer credentials on both
//! ports, customers deleted through the API, the target deny list (SSRF),
//! and the answer when no exit is online.

use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr};
use std::time::Duration;

use serde_json::json;
use tests::harness::api::RawReply;
use tests::harness::socks::{greeting, userpass};
use tests::{
    Cluster, ClusterOpts, Curl, FileServer, Sentinel, SocksTarget, raw_exchange, socks5_attempt,
};

const REPLY_TIMEOUT: Duration = Duration::from_secs(15);

fn basic(user: &str, pass: &str) -> String {
    use base64::Engine;
    format!(
        "Basic {}",
        base64::engine::general_purpose::STANDARD.encode(format!("{user}:{pass}"))
    )
}

fn raw(addr: SocketAddr, req: String) -> RawReply {
    raw_exchange(addr, req.as_bytes(), false, REPLY_TIMEOUT)
}

fn get_req(authority: &str, auth: Option<&str>) -> String {
    let mut r = format!("GET http://{authority}/hello HTTP/1.1\r\nHost: {authority}\r\n");
    if let Some(a) = auth {
        r.push_str(&format!("Proxy-Authorization: {a}\r\n"));
    }
    r.push_str("Connection: close\r\n\r\n");
    r
}

fn connect_req(authority: &str, auth: Option<&str>) -> String {
    let mut r = format!("CONNECT {authority} HTTP/1.1\r\nHost: {authority}\r\n");
    if let Some(a) = auth {
        r.push_str(&format!("Proxy-Authorization: {a}\r\n"));
    }
    r.push_str("\r\n");
    r
}

fn assert_407(r: &RawReply, what: &str) {
    let resp = r
        .response()
        .unwrap_or_else(|| panic!("{what}: no HTTP answer: {:?}", r.text()));
    assert_eq!(resp.status, 407, "{what}: {:?}", r.text());
    let pa = resp.header("Proxy-Authenticate").unwrap_or_default();
    assert!(
        pa.to_ascii_lowercase().starts_with("basic"),
        "{what}: Proxy-Authenticate is {pa:?}"
    );
    assert!(r.closed, "{what}: connection left open after 407");
}

#[test]
fn http_proxy_answers_407_without_valid_credentials() {
    let c = Cluster::start(ClusterOpts::named("http-407"));
    let origin = FileServer::start("origin", None);
    let target = origin.addr.to_string();
    let proxy = c.addrs.http;

    let cases: Vec<(&str, Option<String>)> = vec![
        ("no credentials", None),
        ("wrong password", Some(basic(&c.user, "not-the-password"))),
        ("unknown user", Some(basic("mallory", &c.pass))),
        ("empty password", Some(basic(&c.user, ""))),
        ("not base64", Some("Basic !!!!".to_string())),
        ("bearer scheme", Some(format!("Bearer {}", c.pass))),
        (
            "username with a colon",
            Some(basic(&format!("{}:x", c.user), &c.pass)),
        ),
    ];
    for (what, auth) in &cases {
        assert_407(
            &raw(proxy, get_req(&target, auth.as_deref())),
            &format!("GET, {what}"),
        );
        assert_407(
            &raw(proxy, connect_req(&target, auth.as_deref())),
            &format!("CONNECT, {what}"),
        );
    }
    // Credentials in `Authorization` (meant for the origin) are not proxy
    // credentials.
    let r = raw(
        proxy,
        format!(
            "GET http://{target}/hello HTTP/1.1\r\nHost: {target}\r\nAuthorization: {}\r\n\r\n",
            basic(&c.user, &c.pass)
        ),
    );
    assert_407(&r, "credentials in Authorization");

    // The same through curl.
    let hdrs = c.dir().join("407.headers");
    let r = Curl::new()
        .proxy(&format!("http://{proxy}"))
        .arg("-D")
        .arg(&hdrs)
        .write_out("%{http_code}")
        .arg("-o")
        .arg("/dev/null")
        .arg(origin.url("/hello"))
        .run();
    r.expect_ok("curl without credentials");
    assert_eq!(r.stdout, "407");
    let h = std::fs::read_to_string(&hdrs).unwrap().to_ascii_lowercase();
    assert!(h.contains("proxy-authenticate: basic"), "{h}");
    let r = Curl::new()
        .proxy(&c.http_proxy_as(&c.user, "wrong-password"))
        .write_out("%{http_code}")
        .arg("-o")
        .arg("/dev/null")
        .arg(origin.url("/hello"))
        .run();
    assert_eq!(r.stdout, "407", "curl wrong password: {}", r.stderr);
    // CONNECT: curl gives up with exit 56 and reports the 407.
    let r = Curl::new()
        .proxy(&c.http_proxy_as(&c.user, "wrong-password"))
        .arg("-p")
        .write_out("%{http_connect}")
        .arg(origin.url("/hello"))
        .run();
    assert_ne!(r.code, 0, "CONNECT with a wrong password succeeded");
    assert_eq!(r.stdout, "407", "curl CONNECT wrong password: {}", r.stderr);

    assert_eq!(
        origin.connections(),
        0,
        "a refused customer reached the origin"
    );
    // Sanity: the right credentials work.
    let r = Curl::new()
        .proxy(&c.http_proxy())
        .arg(origin.url("/hello"))
        .run();
    r.expect_ok("valid credentials");
    assert_eq!(r.stdout, "hello from origin\n");
}

#[test]
fn socks5_refuses_wrong_credentials_and_no_auth_clients() {
    let c = Cluster::start(ClusterOpts::named("socks-auth"));
    let origin = FileServer::start("origin", None);
    let target = SocksTarget::V4(Ipv4Addr::LOCALHOST, origin.port());

    // curl reports a refused SOCKS handshake as CURLE_PROXY (97).
    let r = Curl::new()
        .proxy(&c.socks_proxy_as(&c.user, "wrong-password"))
        .arg(origin.url("/hello"))
        .run();
    assert_eq!(
        r.code, 97,
        "curl exit code for a wrong SOCKS password: {}",
        r.stderr
    );
    let r = Curl::new()
        .proxy(&format!("socks5h://{}", c.addrs.socks))
        .arg(origin.url("/hello"))
        .run();
    assert_eq!(
        r.code, 97,
        "curl exit code without SOCKS credentials: {}",
        r.stderr
    );

    // RFC 1929 status byte on the wire, then close.
    for (user, pass) in [
        (c.user.as_str(), "wrong-password"),
        ("mallory", c.pass.as_str()),
        (c.user.as_str(), ""),
        ("", ""),
    ] {
        let o = socks5_attempt(c.addrs.socks, user, pass, 0x01, &target, REPLY_TIMEOUT);
        assert_eq!(o.method, Some(0x02), "{user}/{pass}: method");
        assert_eq!(o.auth_status, Some(0x01), "{user}/{pass}: RFC 1929 status");
        assert_eq!(o.reply, None, "{user}/{pass}: got as far as a request");
        assert!(o.closed, "{user}/{pass}: connection left open");
    }

    // Clients offering only "no authentication" (or GSSAPI) get 0xFF.
    for methods in [&[0x00u8][..], &[0x00, 0x01], &[0x01], &[0x80, 0xFE]] {
        let r = raw_exchange(c.addrs.socks, &greeting(methods), false, REPLY_TIMEOUT);
        assert_eq!(r.data, [0x05, 0xFF], "methods {methods:02x?}");
        assert!(r.closed, "methods {methods:02x?}: connection left open");
    }
    // Offering both picks username/password, never "none".
    let mut hs = greeting(&[0x00, 0x02]);
    hs.extend(userpass(b"mallory", b"nope-nope"));
    let r = raw_exchange(c.addrs.socks, &hs, false, REPLY_TIMEOUT);
    assert_eq!(r.data, [0x05, 0x02, 0x01, 0x01]);
    assert!(r.closed);

    assert_eq!(
        origin.connections(),
        0,
        "a refused customer reached the origin"
    );
    let o = socks5_attempt(
        c.addrs.socks,
        &c.user,
        &c.pass,
        0x01,
        &target,
        REPLY_TIMEOUT,
    );
    assert_eq!(o.reply, Some(0x00), "valid credentials: {o:?}");
}

#[test]
fn customers_deleted_through_the_api_are_refused() {
    let c = Cluster::start(ClusterOpts::named("customer-delete"));
    let origin = FileServer::start("origin", None);
    let api = c.api();
    let target = SocksTarget::V4(Ipv4Addr::LOCALHOST, origin.port());
    let mut ids = Vec::new();
    for name in ["bob", "carol"] {
        let r = api.post(
            "/api/v1/customers",
            Some(&json!({"username": name, "password": format!("{name}-password")})),
        );
        assert_eq!(r.status, 201, "create {name}: {}", r.text());
        ids.push(r.json()["id"].as_str().expect("customer id").to_string());
    }
    let http_ok = |user: &str| {
        let r = Curl::new()
            .proxy(&c.http_proxy_as(user, &format!("{user}-password")))
            .write_out("%{http_code}")
            .arg("-o")
            .arg("/dev/null")
            .arg(origin.url("/hello"))
            .run();
        r.stdout
    };
    let socks_status = |user: &str| {
        socks5_attempt(
            c.addrs.socks,
            user,
            &format!("{user}-password"),
            0x01,
            &target,
            REPLY_TIMEOUT,
        )
        .auth_status
    };
    // carol authenticates (and is cached by the control plane) ...
    assert_eq!(http_ok("carol"), "200");
    assert_eq!(socks_status("carol"), Some(0x00));

    // ... bob never did. Delete bob by name and carol by id.
    let r = api.delete("/api/v1/customers/bob");
    assert_eq!(r.status, 204, "delete bob: {}", r.text());
    let r = api.delete(&format!("/api/v1/customers/{}", ids[1]));
    assert_eq!(r.status, 204, "delete carol: {}", r.text());

    // Both are refused at once: deleting through the API also drops the
    // control plane's cache of verified credentials.
    for user in ["bob", "carol"] {
        assert_eq!(http_ok(user), "407", "{user} after deletion (HTTP)");
        assert_eq!(
            socks_status(user),
            Some(0x01),
            "{user} after deletion (SOCKS)"
        );
    }
    let list = api.get("/api/v1/customers").json();
    let names: Vec<&str> = list
        .as_array()
        .expect("customer list")
        .iter()
        .filter_map(|c| c["username"].as_str())
        .collect();
    assert_eq!(names, [c.user.as_str()], "customers left: {list}");
    let r = api.delete("/api/v1/customers/bob");
    assert_eq!(r.status, 404, "second delete: {}", r.text());
    assert_eq!(r.json()["error"]["code"], "not_found");
    // The original customer is unaffected.
    assert_eq!(http_ok_as(&c, &origin), "200");
}

fn http_ok_as(c: &Cluster, origin: &FileServer) -> String {
    Curl::new()
        .proxy(&c.http_proxy())
        .write_out("%{http_code}")
        .arg("-o")
        .arg("/dev/null")
        .arg(origin.url("/hello"))
        .run()
        .stdout
}

/// A host part for URLs / CONNECT, and what the SOCKS request carries.
struct Denied {
    host: String,
    port: u16,
    socks: SocksTarget,
    /// Numeric names resolvers read as IPv4: a 400 is as good as a 403, and
    /// a SOCKS general failure as good as "not allowed"; never connected.
    numeric_name: bool,
}

fn denied_table(port: u16, has_v6: bool) -> Vec<Denied> {
    let v4 = |s: &str, p: u16| Denied {
        host: s.to_string(),
        port: p,
        socks: SocksTarget::V4(s.parse().unwrap(), p),
        numeric_name: false,
    };
    let v6 = |s: &str| Denied {
        host: format!("[{s}]"),
        port,
        socks: SocksTarget::V6(s.parse::<Ipv6Addr>().unwrap(), port),
        numeric_name: false,
    };
    let name = |s: &str, numeric: bool| Denied {
        host: s.to_string(),
        port,
        socks: SocksTarget::Domain(s.to_string(), port),
        numeric_name: numeric,
    };
    let mut t = vec![
        v4("127.0.0.1", port),
        v4("127.0.0.2", port),
        v4("0.0.0.0", port),
        v4("169.254.169.254", port),
        v4("10.0.0.1", port),
        v4("172.16.0.1", port),
        v4("172.31.255.255", port),
        v4("192.168.1.1", port),
        v4("100.64.0.1", port),
        v4("224.0.0.1", port),
        v4("255.255.255.255", port),
        v4("240.0.0.1", port),
        v6("::ffff:127.0.0.1"),
        v6("::ffff:169.254.169.254"),
        v6("::ffff:10.0.0.1"),
        v6("::127.0.0.1"),
        v6("::"),
        v6("fd00::1"),
        v6("fd00:ec2::254"),
        v6("fe80::1"),
        v6("ff02::1"),
        v6("64:ff9b::7f00:1"),
        v6("2002:7f00:1::"),
        name("2130706433", true),
        name("0x7f.1", true),
        name("127.1", true),
        name("0x7f000001", true),
        name("017700000001", true),
        // Names that resolve to loopback: refused by the agent after its
        // own resolution.
        name("localhost", false),
        name("LocalHost", false),
        name("localhost.", false),
        // An IP literal sent as a SOCKS domain name is still a literal.
        Denied {
            host: "127.0.0.1".into(),
            port,
            socks: SocksTarget::Domain("127.0.0.1".into(), port),
            numeric_name: false,
        },
        // Spam ports on a public address (TEST-NET-1: must never be dialed).
        v4("192.0.2.1", 25),
        v4("192.0.2.1", 465),
        v4("192.0.2.1", 587),
        Denied {
            host: "example.com".into(),
            port: 25,
            socks: SocksTarget::Domain("example.com".into(), 25),
            numeric_name: false,
        },
    ];
    if has_v6 {
        t.push(v6("::1"));
    }
    t
}

#[test]
fn denied_targets_are_refused_on_both_ports_and_never_dialed() {
    let c = Cluster::start(ClusterOpts {
        allow_private: false,
        ..ClusterOpts::named("deny-list")
    });
    let sentinel = Sentinel::start();
    let auth = c.basic_auth();
    let table = denied_table(sentinel.port, sentinel.has_v6);
    let mut failures = Vec::new();
    for d in &table {
        let authority = format!("{}:{}", d.host, d.port);
        let ok_status = |s: Option<u16>| match s {
            Some(403) => true,
            Some(400) => d.numeric_name,
            _ => false,
        };
        let g = raw(c.addrs.http, get_req(&authority, Some(&auth)));
        if !ok_status(g.status()) || !g.closed {
            failures.push(format!("GET {authority}: {:?}", g.text()));
        }
        let k = raw(c.addrs.http, connect_req(&authority, Some(&auth)));
        if !ok_status(k.status()) || !k.closed {
            failures.push(format!("CONNECT {authority}: {:?}", k.text()));
        }
        let o = socks5_attempt(
            c.addrs.socks,
            &c.user,
            &c.pass,
            0x01,
            &d.socks,
            REPLY_TIMEOUT,
        );
        let socks_ok = match o.reply {
            Some(0x02) => true,
            Some(0x01) => d.numeric_name,
            _ => false,
        };
        if !socks_ok || !o.closed {
            failures.push(format!(
                "SOCKS {}: reply {:?} closed {}",
                d.socks, o.reply, o.closed
            ));
        }
    }
    // curl's own URL handling on a few (it may normalise numeric hosts to
    // dotted quads first; either way the answer is a refusal).
    for host in [
        "127.0.0.1",
        "2130706433",
        "0x7f.1",
        "[::ffff:127.0.0.1]",
        "localhost",
        "169.254.169.254",
    ] {
        let url = format!("http://{host}:{}/", sentinel.port);
        let r = Curl::new()
            .proxy(&c.http_proxy())
            .write_out("%{http_code}")
            .arg("-o")
            .arg("/dev/null")
            .arg(&url)
            .run();
        if !(r.stdout == "403" || r.stdout == "400") {
            failures.push(format!("curl {url}: {} {}", r.stdout, r.stderr));
        }
        let r = Curl::new().proxy(&c.socks_proxy()).arg(&url).run();
        if r.code != 97 {
            failures.push(format!("curl socks5h {url}: exit {} {}", r.code, r.stderr));
        }
    }
    assert!(
        failures.is_empty(),
        "{} of {} denied targets were not refused properly:\n{}",
        failures.len(),
        table.len(),
        failures.join("\n")
    );
    assert_eq!(
        sentinel.accepted(),
        0,
        "a denied target was dialed: the sentinel on port {} accepted a connection",
        sentinel.port
    );
    assert!(c.api().healthy());
}

#[test]
fn control_plane_ports_and_smtp_stay_denied_with_allow_private() {
    let c = Cluster::start(ClusterOpts::named("protected-ports"));
    let auth = c.basic_auth();
    let a = c.addrs;
    let mut targets: Vec<(String, SocksTarget)> = Vec::new();
    for port in [a.http.port(), a.socks.port(), a.api.port()] {
        targets.push((
            format!("127.0.0.1:{port}"),
            SocksTarget::V4(Ipv4Addr::LOCALHOST, port),
        ));
        targets.push((
            format!("[::ffff:127.0.0.1]:{port}"),
            SocksTarget::V6(Ipv4Addr::LOCALHOST.to_ipv6_mapped(), port),
        ));
        targets.push((
            format!("0.0.0.0:{port}"),
            SocksTarget::V4(Ipv4Addr::UNSPECIFIED, port),
        ));
        // Resolved by the agent, then checked against the ports the
        // control plane told it about.
        targets.push((
            format!("localhost:{port}"),
            SocksTarget::Domain("localhost".into(), port),
        ));
    }
    for port in [25, 465, 587] {
        targets.push((
            format!("127.0.0.1:{port}"),
            SocksTarget::V4(Ipv4Addr::LOCALHOST, port),
        ));
        targets.push((
            format!("localhost:{port}"),
            SocksTarget::Domain("localhost".into(), port),
        ));
    }
    let mut failures = Vec::new();
    for (authority, socks) in &targets {
        for req in [
            get_req(authority, Some(&auth)),
            connect_req(authority, Some(&auth)),
        ] {
            let r = raw(a.http, req.clone());
            if r.status() != Some(403) {
                failures.push(format!("{}: {:?}", req.lines().next().unwrap(), r.text()));
            }
        }
        let o = socks5_attempt(a.socks, &c.user, &c.pass, 0x01, socks, REPLY_TIMEOUT);
        if o.reply != Some(0x02) {
            failures.push(format!("SOCKS {socks}: reply {:?}", o.reply));
        }
    }
    assert!(failures.is_empty(), "not refused:\n{}", failures.join("\n"));
    // The admin API in particular was not reachable through the proxy.
    let r = Curl::new()
        .proxy(&c.http_proxy())
        .write_out("%{http_code}")
        .arg("-o")
        .arg("/dev/null")
        .arg(format!("http://{}/health", a.api))
        .run();
    assert_eq!(r.stdout, "403");
}

#[test]
fn no_exit_online_answers_503_and_socks_general_failure() {
    let c = Cluster::start(ClusterOpts {
        agents: 0,
        ..ClusterOpts::named("no-exit")
    });
    let origin = FileServer::start("origin", None);
    let auth = c.basic_auth();
    for authority in [
        origin.addr.to_string(),
        format!("localhost:{}", origin.port()),
        "example.com:80".to_string(),
    ] {
        let r = raw(c.addrs.http, get_req(&authority, Some(&auth)));
        assert_eq!(r.status(), Some(503), "GET {authority}: {:?}", r.text());
        let r = raw(c.addrs.http, connect_req(&authority, Some(&auth)));
        assert_eq!(r.status(), Some(503), "CONNECT {authority}: {:?}", r.text());
    }
    for target in [
        SocksTarget::V4(Ipv4Addr::LOCALHOST, origin.port()),
        SocksTarget::Domain("example.com".into(), 443),
    ] {
        let o = socks5_attempt(
            c.addrs.socks,
            &c.user,
            &c.pass,
            0x01,
            &target,
            REPLY_TIMEOUT,
        );
        assert_eq!(o.reply, Some(0x01), "SOCKS {target}: {o:?}");
        assert!(o.closed, "SOCKS {target}: left open");
    }
    let r = Curl::new()
        .proxy(&c.http_proxy())
        .write_out("%{http_code}")
        .arg("-o")
        .arg("/dev/null")
        .arg(origin.url("/hello"))
        .run();
    assert_eq!(r.stdout, "503");
    assert_eq!(origin.connections(), 0);
}

#[test]
fn admin_api_requires_an_admin_token() {
    use tests::Api;
    let c = Cluster::start(ClusterOpts::named("api-auth"));
    let device = c.agents[0].device_id.clone();
    let routes: Vec<(&str, String, Option<serde_json::Value>)> = vec![
        ("GET", "/api/v1/devices".into(), None),
        ("GET", format!("/api/v1/devices/{device}"), None),
        ("POST", format!("/api/v1/devices/{device}/disable"), None),
        ("POST", format!("/api/v1/devices/{device}/enable"), None),
        ("DELETE", format!("/api/v1/devices/{device}"), None),
        ("GET", "/api/v1/customers".into(), None),
        (
            "POST",
            "/api/v1/customers".into(),
            Some(json!({"username": "eve", "password": "eve-password"})),
        ),
        ("DELETE", format!("/api/v1/customers/{}", c.user), None),
        (
            "POST",
            "/api/v1/enroll-tokens".into(),
            Some(json!({"name": "evil"})),
        ),
    ];
    let a = c.addrs.api;
    let bad_tokens: Vec<Option<String>> = vec![
        None,
        Some("cga_not-a-real-token".into()),
        Some(c.pass.clone()),
        Some(c.admin_token.trim_start_matches("cga_").to_string()),
        Some(format!("{}x", c.admin_token)),
    ];
    for token in &bad_tokens {
        let api = Api::new(a, token.as_deref());
        for (method, path, body) in &routes {
            let r = api.request(method, path, body.as_ref());
            assert_eq!(
                r.status,
                401,
                "{method} {path} with {token:?}: {}",
                r.text()
            );
            assert_eq!(r.json()["error"]["code"], "unauthorized", "{}", r.text());
        }
    }
    // Nothing changed behind the refusals.
    let api = c.api();
    assert_eq!(api.devices().len(), 1);
    assert_eq!(api.device_status(&device).as_deref(), Some("online"));
    let customers = api.get("/api/v1/customers").json();
    assert_eq!(customers.as_array().map(Vec::len), Some(1), "{customers}");
    // Health needs no token; unknown routes are JSON 404s.
    assert!(Api::new(a, None).healthy());
    let r = api.get("/api/v1/nope");
    assert_eq!(r.status, 404);
    assert_eq!(r.json()["error"]["code"], "not_found");
    // A second admin token from the CLI works.
    let out = c.cp_cli(&["admin-token", "create"]);
    assert!(out.status.success());
    let second = String::from_utf8_lossy(&out.stdout).trim().to_string();
    assert!(second.starts_with("cga_"), "{second:?}");
    assert_eq!(Api::new(a, Some(&second)).devices().len(), 1);
}

#[test]
fn customer_api_validates_its_input() {
    let c = Cluster::start(ClusterOpts {
        agents: 0,
        ..ClusterOpts::named("customer-api")
    });
    let api = c.api();
    let cases = [
        (json!({"username": "dave", "password": "short"}), 400),
        (
            json!({"username": "da ve", "password": "long-enough-1"}),
            400,
        ),
        (
            json!({"username": "dave:x", "password": "long-enough-1"}),
            400,
        ),
        (json!({"username": "", "password": "long-enough-1"}), 400),
        (
            json!({"username": "a".repeat(65), "password": "long-enough-1"}),
            400,
        ),
        (
            json!({"username": "dave", "password": "p".repeat(129)}),
            400,
        ),
        (json!({"username": "dave"}), 400),
        (
            json!({"username": "dave", "password": "long-enough-1", "admin": true}),
            400,
        ),
        (
            json!({"username": c.user, "password": "long-enough-1"}),
            409,
        ),
        (
            json!({"username": "dave", "password": "long-enough-1"}),
            201,
        ),
        (
            json!({"username": "dave", "password": "long-enough-2"}),
            409,
        ),
    ];
    for (body, want) in &cases {
        let r = api.post("/api/v1/customers", Some(body));
        assert_eq!(r.status, *want, "{body}: {}", r.text());
        if *want >= 400 {
            assert!(r.json()["error"]["message"].is_string(), "{}", r.text());
        }
    }
    let r = api.request("POST", "/api/v1/customers", None);
    assert_eq!(r.status, 400, "empty body: {}", r.text());
    // The created customer really works as a proxy credential.
    let r = Curl::new()
        .proxy(&c.http_proxy_as("dave", "long-enough-1"))
        .write_out("%{http_code}")
        .arg("-o")
        .arg("/dev/null")
        .arg("http://127.0.0.1:9/")
        .run();
    assert_eq!(r.stdout, "503", "dave authenticated, no exit: {}", r.stderr);
}
