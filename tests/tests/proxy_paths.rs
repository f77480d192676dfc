//! Customer traffic through both proxy ports, end to end: real curl →
//! control plane → QUIC tunnel → edge agent → local origin, bytes checked
//! by SHA-256.

use std::time::Duration;

use tests::{Blob, Cluster, ClusterOpts, Curl, FileServer, TlsMaterial, sha256_file, sha256_hex};

/// At least 50 MB per bulk transfer.
const BIG: usize = 52 * 1024 * 1024;

/// Download to a file with `curl`, then compare length and SHA-256 with
/// the blob the origin served.
fn download_and_check(c: &Cluster, blob: &Blob, curl: Curl, what: &str) {
    let out = c.dir().join(format!("{what}.download"));
    let r = curl
        .output(&out)
        .write_out("%{http_code} %{http_connect} %{size_download} %{speed_download}")
        .max_time(Duration::from_secs(180))
        .run();
    r.expect_ok(what);
    let fields: Vec<&str> = r.stdout.split_whitespace().collect();
    assert_eq!(fields.first(), Some(&"200"), "{what}: {}", r.stdout);
    let (sha, len) = sha256_file(&out);
    assert_eq!(len, blob.len() as u64, "{what}: wrong length");
    assert_eq!(sha, blob.sha256(), "{what}: body differs from the origin's");
    let speed: f64 = fields.get(3).and_then(|s| s.parse().ok()).unwrap_or(0.0);
    eprintln!(
        "{what}: {len} bytes intact in {:?} ({:.1} MB/s), -w {:?}",
        r.elapsed,
        speed / 1e6,
        r.stdout
    );
    let _ = std::fs::remove_file(&out);
}

#[test]
fn https_through_connect_moves_50mb_intact() {
    let c = Cluster::start(ClusterOpts::named("https-connect"));
    let tls = TlsMaterial::generate(c.dir());
    let blob = Blob::random(BIG, 0xC0FFEE);
    let origin = FileServer::start_tls("tls-origin", Some(blob.clone()), &tls);
    // `localhost`: the name travels in CONNECT and the agent resolves it.
    let curl = Curl::new()
        .proxy(&c.http_proxy())
        .arg("--cacert")
        .arg(&tls.ca_pem)
        .arg(origin.url_as("https", "localhost", "/blob"));
    download_and_check(&c, &blob, curl.clone(), "https-connect");
    // curl really tunnelled: the proxy answered CONNECT with 200.
    let r = curl
        .write_out("%{http_connect}")
        .arg("-o")
        .arg("/dev/null")
        .arg("-r")
        .arg("0-0")
        .run();
    r.expect_ok("CONNECT probe");
    assert_eq!(r.stdout.trim(), "200", "CONNECT answer");
}

#[test]
fn plain_http_absolute_form_moves_50mb_intact() {
    let c = Cluster::start(ClusterOpts::named("plain-get"));
    let blob = Blob::random(BIG, 0xBEEF);
    let origin = FileServer::start("origin", Some(blob.clone()));
    // An IP literal: checked at the control plane, dialed as is.
    let curl = Curl::new().proxy(&c.http_proxy()).arg(origin.url("/blob"));
    download_and_check(&c, &blob, curl, "plain-get");
}

#[test]
fn socks5_hostname_moves_50mb_intact() {
    let c = Cluster::start(ClusterOpts::named("socks5-hostname"));
    let blob = Blob::random(BIG, 0x50C5);
    let origin = FileServer::start("origin", Some(blob.clone()));
    let curl = Curl::new()
        .arg("--socks5-hostname")
        .arg(c.addrs.socks.to_string())
        .arg("--proxy-user")
        .arg(format!("{}:{}", c.user, c.pass))
        .arg(origin.url_as("http", "localhost", "/blob"));
    download_and_check(&c, &blob, curl, "socks5-hostname");
}

#[test]
fn keep_alive_carries_requests_to_two_hosts_over_one_proxy_connection() {
    let c = Cluster::start(ClusterOpts::named("keep-alive"));
    let blob = Blob::random(2 * 1024 * 1024 + 17, 7);
    let a = FileServer::start("A", Some(blob.clone()));
    let b = FileServer::start("B", None);
    let (out_a, out_b, out_c, out_d) = (
        c.dir().join("a.bin"),
        c.dir().join("b.txt"),
        c.dir().join("c.bin"),
        c.dir().join("d.txt"),
    );
    // Four requests, alternating hosts, mixing Content-Length and chunked
    // bodies, on what curl sees as one proxy connection.
    let r = Curl::new()
        .proxy(&c.http_proxy())
        .write_out("%{num_connects} %{http_code}\\n")
        .output(&out_a)
        .arg(a.url("/blob"))
        .output(&out_b)
        .arg(b.url("/hello"))
        .output(&out_c)
        .arg(a.url("/chunked"))
        .output(&out_d)
        .arg(b.url("/chunked"))
        .arg("-v")
        .run();
    r.expect_ok("keep-alive run");
    let lines: Vec<&str> = r.stdout.lines().collect();
    assert_eq!(
        lines,
        ["1 200", "0 200", "0 200", "0 200"],
        "expected one connection reused for all requests; curl -v:\n{}",
        r.stderr
    );
    let verbose = r.stderr.to_ascii_lowercase();
    assert!(
        verbose.contains("re-using existing") || verbose.contains("reusing existing"),
        "curl did not report reuse:\n{}",
        r.stderr
    );
    assert_eq!(sha256_file(&out_a).0, blob.sha256(), "A /blob");
    assert_eq!(sha256_file(&out_c).0, blob.sha256(), "A /chunked");
    assert_eq!(std::fs::read_to_string(&out_b).unwrap(), "hello from B\n");
    assert_eq!(std::fs::read_to_string(&out_d).unwrap(), "hello from B\n");
    // Each origin saw its own upstream connection(s); the customer side
    // was one connection (num_connects above).
    assert!(a.connections() >= 1 && b.connections() >= 1);
}

fn post_body(c: &Cluster, origin: &FileServer, body: &[u8], extra: &[&str], what: &str) {
    let file = c.dir().join(format!("{what}.body"));
    std::fs::write(&file, body).unwrap();
    let r = Curl::new()
        .proxy(&c.http_proxy())
        .args(extra.iter().copied())
        .arg("--data-binary")
        .arg(format!("@{}", file.display()))
        .arg("-H")
        .arg("Content-Type: application/octet-stream")
        .arg(origin.url("/sha256"))
        .max_time(Duration::from_secs(60))
        .run();
    r.expect_ok(what);
    assert_eq!(
        r.stdout.trim(),
        format!("{} {}", sha256_hex(body), body.len()),
        "{what}: the origin received a different body"
    );
    eprintln!("{what}: {} bytes in {:?}", body.len(), r.elapsed);
}

#[test]
fn post_bodies_reach_the_origin_intact() {
    let c = Cluster::start(ClusterOpts::named("post"));
    let origin = FileServer::start("echo", None);
    let body = Blob::random(3 * 1024 * 1024 + 5, 99);
    // Content-Length framing, without Expect (sent at once).
    post_body(
        &c,
        &origin,
        &body.data,
        &["-H", "Expect:"],
        "post-content-length",
    );
    // Chunked framing.
    post_body(
        &c,
        &origin,
        &body.data,
        &["-H", "Expect:", "-H", "Transfer-Encoding: chunked"],
        "post-chunked",
    );
    // A small body.
    post_body(&c, &origin, b"hello=world", &[], "post-small");
}

#[test]
fn post_with_expect_100_continue_is_not_stalled() {
    // curl sends `Expect: 100-continue` for large bodies and waits for the
    // origin's "100 Continue" (here up to 8 s) before sending the body. A
    // proxy that waits for the body before relaying the interim response
    // stalls such clients until their own timeout.
    let c = Cluster::start(ClusterOpts::named("post-expect"));
    let origin = FileServer::start("echo", None);
    let body = Blob::random(2 * 1024 * 1024, 100);
    let file = c.dir().join("expect.body");
    std::fs::write(&file, &*body.data).unwrap();
    let r = Curl::new()
        .proxy(&c.http_proxy())
        .arg("--expect100-timeout")
        .arg("8")
        .arg("-H")
        .arg("Expect: 100-continue")
        .arg("--data-binary")
        .arg(format!("@{}", file.display()))
        .arg(origin.url("/sha256"))
        .max_time(Duration::from_secs(30))
        .run();
    r.expect_ok("POST with Expect: 100-continue");
    assert_eq!(
        r.stdout.trim(),
        format!("{} {}", body.sha256(), body.len()),
        "body mangled"
    );
    eprintln!("POST with Expect: 100-continue took {:?}", r.elapsed);
    assert!(
        r.elapsed < Duration::from_secs(4),
        "POST with Expect: 100-continue took {:?}: the proxy did not relay the origin's \
         100 Continue before the client's body, so the client waited for its own timeout",
        r.elapsed
    );
}

#[test]
fn head_answers_headers_only_and_keeps_the_connection_usable() {
    let c = Cluster::start(ClusterOpts::named("head"));
    let blob = Blob::random(5 * 1024 * 1024, 5);
    let origin = FileServer::start("origin", Some(blob.clone()));
    let out = c.dir().join("after-head.bin");
    let head = c.dir().join("head.txt");
    // HEAD, then GET on the same proxy connection: a proxy that waited for
    // a body after HEAD would hang the first or corrupt the second.
    let r = Curl::new()
        .proxy(&c.http_proxy())
        .write_out("%{num_connects} %{http_code} %{size_download}\\n")
        .arg("-I")
        .output(&head)
        .arg(origin.url("/blob"))
        .arg("--next")
        .proxy(&c.http_proxy())
        .write_out("%{num_connects} %{http_code} %{size_download}\\n")
        .output(&out)
        .arg(origin.url("/blob"))
        .max_time(Duration::from_secs(30))
        .run();
    r.expect_ok("HEAD then GET");
    let head = std::fs::read_to_string(&head).unwrap().to_ascii_lowercase();
    assert!(
        head.starts_with("http/1.1 200"),
        "HEAD status line:\n{head}"
    );
    assert!(
        head.contains(&format!("content-length: {}", blob.len())),
        "HEAD lost Content-Length:\n{head}"
    );
    let lines: Vec<&str> = r.stdout.lines().collect();
    assert_eq!(
        lines,
        ["1 200 0".to_string(), format!("0 200 {}", blob.len())],
        "HEAD must carry no body and leave the connection reusable"
    );
    assert_eq!(sha256_file(&out).0, blob.sha256(), "GET after HEAD");
}

#[test]
fn two_agents_share_the_load_and_both_carry_traffic() {
    let c = Cluster::start(ClusterOpts {
        agents: 2,
        ..ClusterOpts::named("two-agents")
    });
    let origin = FileServer::start("origin", None);
    for i in 0..6 {
        let r = Curl::new()
            .proxy(&c.http_proxy())
            .arg(origin.url("/hello"))
            .run();
        r.expect_ok(&format!("request {i}"));
        assert_eq!(r.stdout, "hello from origin\n");
    }
    // Round robin: both devices served flows.
    let devices = c.api().devices();
    for d in &devices {
        let flows = d["live"]["total_flows"].as_u64().unwrap_or(0);
        assert!(flows >= 1, "device {} carried no flow: {d}", d["id"]);
    }
}

#[test]
fn forwarded_requests_carry_no_proxy_credentials_or_proxy_headers() {
    let c = Cluster::start(ClusterOpts::named("forwarded-head"));
    let origin = FileServer::start("origin", None);
    let r = Curl::new()
        .proxy(&c.http_proxy())
        .arg("-H")
        .arg("X-Custom: kept")
        .arg("-H")
        .arg("Authorization: Basic b3JpZ2luOmNyZWRz")
        .arg("-H")
        .arg("Proxy-Connection: keep-alive")
        .arg(origin.url("/headers?q=1"))
        .run();
    r.expect_ok("GET /headers");
    let seen = r.stdout.to_ascii_lowercase();
    eprintln!("origin saw:\n{}", r.stdout);
    // Absolute-form became origin-form.
    assert!(
        seen.starts_with("get /headers?q=1\n"),
        "request line: {seen}"
    );
    assert!(
        seen.contains(&format!("host: {}", origin.addr)),
        "Host: {seen}"
    );
    // The customer's proxy credentials never reach the target; nor do
    // headers that would reveal a proxy.
    for leaked in [
        "proxy-authorization",
        "proxy-connection",
        "via:",
        "x-forwarded-for",
        "forwarded:",
    ] {
        assert!(
            !seen.contains(leaked),
            "{leaked} forwarded to the origin:\n{seen}"
        );
    }
    assert!(
        !seen.contains(&c.pass.to_ascii_lowercase()),
        "the customer's password reached the origin"
    );
    // Headers meant for the origin are forwarded untouched.
    assert!(seen.contains("x-custom: kept"), "{seen}");
    assert!(
        seen.contains("authorization: basic b3jpz2luomnyzwrz"),
        "{seen}"
    );
}

#[test]
fn pipelined_connect_data_arrives_and_upstream_failures_map_to_502() {
    use tests::raw_exchange;
    let c = Cluster::start(ClusterOpts::named("connect-early"));
    let origin = FileServer::start("origin", None);
    let auth = c.basic_auth();
    // CONNECT and the first tunnelled bytes in one write.
    let req = format!(
        "CONNECT {o} HTTP/1.1\r\nHost: {o}\r\nProxy-Authorization: {auth}\r\n\r\nGET /hello HTTP/1.1\r\nHost: {o}\r\nConnection: close\r\n\r\n",
        o = origin.addr
    );
    let r = raw_exchange(c.addrs.http, req.as_bytes(), false, Duration::from_secs(15));
    let text = r.text();
    assert!(
        text.starts_with("HTTP/1.1 200") && text.ends_with("hello from origin\n"),
        "{text:?}"
    );
    // Half-close: the client sends its request and shuts down its write
    // side; the answer still comes back through the tunnel.
    let req = format!(
        "CONNECT {o} HTTP/1.1\r\nHost: {o}\r\nProxy-Authorization: {auth}\r\n\r\nGET /hello HTTP/1.1\r\nHost: {o}\r\n\r\n",
        o = origin.addr
    );
    let r = raw_exchange(c.addrs.http, req.as_bytes(), true, Duration::from_secs(15));
    assert!(r.closed, "tunnel not closed after both sides finished");
    assert!(r.text().ends_with("hello from origin\n"), "{:?}", r.text());
    // A port nobody listens on: the exit's refusal becomes 502.
    let closed = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    for req in [
        format!("CONNECT {closed} HTTP/1.1\r\nProxy-Authorization: {auth}\r\n\r\n"),
        format!(
            "GET http://{closed}/ HTTP/1.1\r\nHost: {closed}\r\nProxy-Authorization: {auth}\r\n\r\n"
        ),
        format!(
            "GET http://localhost:{}/ HTTP/1.1\r\nProxy-Authorization: {auth}\r\n\r\n",
            closed.port()
        ),
    ] {
        let r = raw_exchange(c.addrs.http, req.as_bytes(), false, Duration::from_secs(15));
        assert_eq!(
            r.status(),
            Some(502),
            "{}: {:?}",
            req.lines().next().unwrap(),
            r.text()
        );
        assert!(r.closed);
    }
}

#[test]
fn uploads_of_50mb_through_connect_and_socks5_arrive_intact() {
    let c = Cluster::start(ClusterOpts::named("upload"));
    let origin = FileServer::start("sink", None);
    let body = Blob::random(BIG, 0x0F1E);
    let file = c.dir().join("upload.body");
    std::fs::write(&file, &*body.data).unwrap();
    let want = format!("{} {}", body.sha256(), body.len());
    for (what, curl) in [
        // -p: tunnel through CONNECT even for http://.
        ("connect", Curl::new().proxy(&c.http_proxy()).arg("-p")),
        ("socks5", Curl::new().proxy(&c.socks_proxy())),
    ] {
        let r = curl
            .arg("-H")
            .arg("Expect:")
            .arg("--data-binary")
            .arg(format!("@{}", file.display()))
            .arg(origin.url_as("http", "localhost", "/sha256"))
            .max_time(Duration::from_secs(120))
            .run();
        r.expect_ok(what);
        assert_eq!(
            r.stdout.trim(),
            want,
            "{what}: the origin received a different body"
        );
        eprintln!(
            "{what}: {} bytes uploaded intact in {:?}",
            body.len(),
            r.elapsed
        );
    }
}

#[test]
fn a_hundred_concurrent_flows_through_one_agent_arrive_intact() {
    let c = Cluster::start(ClusterOpts::named("concurrent"));
    let blob = Blob::random(1024 * 1024 + 3, 0xC0C0);
    let origin = FileServer::start("origin", Some(blob.clone()));
    let dir = c.dir().join("parallel");
    std::fs::create_dir_all(&dir).unwrap();
    // Two curl processes, 50 parallel transfers each, one per port.
    let mut runs = Vec::new();
    for (what, base) in [
        ("http", Curl::new().proxy(&c.http_proxy())),
        ("socks5", Curl::new().proxy(&c.socks_proxy())),
    ] {
        let mut curl = base
            .arg("--parallel")
            .arg("--parallel-immediate")
            .arg("--parallel-max")
            .arg("50")
            .write_out("%{http_code}\\n")
            .max_time(Duration::from_secs(120));
        for i in 0..50 {
            curl = curl
                .output(&dir.join(format!("{what}-{i}.bin")))
                .arg(origin.url("/blob"));
        }
        runs.push((what, curl.spawn(c.dir(), &format!("parallel-{what}"))));
    }
    for (what, run) in &mut runs {
        let r = run
            .wait(Duration::from_secs(150))
            .unwrap_or_else(|| panic!("{what}: parallel transfers did not finish"));
        r.expect_ok(what);
        let codes: Vec<&str> = r.stdout.lines().collect();
        assert_eq!(codes.len(), 50, "{what}: {}", r.stdout);
        assert!(codes.iter().all(|c| *c == "200"), "{what}: {}", r.stdout);
        eprintln!("{what}: 50 parallel transfers in {:?}", r.elapsed);
    }
    for what in ["http", "socks5"] {
        for i in 0..50 {
            let (sha, len) = sha256_file(&dir.join(format!("{what}-{i}.bin")));
            assert_eq!(len, blob.len() as u64, "{what} #{i} length");
            assert_eq!(sha, blob.sha256(), "{what} #{i} body");
        }
    }
    assert!(
        origin.connections() >= 100,
        "origin saw {} connections",
        origin.connections()
    );
}

#[test]
fn absolute_form_target_overrides_a_conflicting_host_header() {
    // RFC 9112 §3.2.2: a proxy that receives an absolute-form request MUST
    // ignore the received Host field and send the target's authority. A
    // forwarded `Host: evil.example` next to a connection to another host
    // confuses virtual hosting and caches at the origin.
    use tests::raw_exchange;
    let c = Cluster::start(ClusterOpts::named("host-override"));
    let origin = FileServer::start("origin", None);
    let auth = c.basic_auth();
    let o = origin.addr;
    for extra in [
        "Host: evil.example\r\n",
        "Host: evil.example\r\nHost: other.example\r\n",
    ] {
        let req = format!(
            "GET http://{o}/headers HTTP/1.1\r\n{extra}Proxy-Authorization: {auth}\r\nConnection: close\r\n\r\n"
        );
        let r = raw_exchange(c.addrs.http, req.as_bytes(), false, Duration::from_secs(15));
        let resp = r.response().expect("an answer");
        if resp.status == 400 {
            continue; // refusing conflicting Host fields is fine too
        }
        assert_eq!(resp.status, 200, "{:?}", r.text());
        let seen = resp.text().to_ascii_lowercase();
        let hosts: Vec<&str> = seen.lines().filter(|l| l.starts_with("host:")).collect();
        assert_eq!(
            hosts,
            [format!("host: {o}")],
            "the origin got the customer's Host header, not the request target's ({extra:?}):\n{seen}"
        );
    }
}

#[test]
fn a_silent_origin_gets_504_after_the_response_timeout() {
    let c = Cluster::start(ClusterOpts {
        config_toml: Some("response_timeout_secs = 2\n".into()),
        ..ClusterOpts::named("silent-origin")
    });
    // Accepts connections and never answers.
    let silent = tests::Sentinel::start();
    let r = Curl::new()
        .proxy(&c.http_proxy())
        .write_out("%{http_code}")
        .arg("-o")
        .arg("/dev/null")
        .arg(format!("http://127.0.0.1:{}/", silent.port))
        .max_time(Duration::from_secs(20))
        .run();
    assert_eq!(r.stdout.trim(), "504", "{r:?}");
    assert!(
        r.elapsed >= Duration::from_millis(1900) && r.elapsed < Duration::from_secs(10),
        "504 after {:?}, expected about 2 s",
        r.elapsed
    );
    assert_eq!(silent.accepted(), 1, "the origin was reached once");
}
