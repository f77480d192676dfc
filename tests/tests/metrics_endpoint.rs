//! `GET /metrics`: admin token required, Prometheus text that parses, and
//! numbers that follow what a user does (a device online, bytes through the
//! proxy).

use std::collections::HashMap;
use std::time::Duration;

use tests::{Api, Blob, Cluster, ClusterOpts, Curl, FileServer, assert_eventually};

/// One sample line: `name{labels} value`.
#[derive(Debug, Clone, PartialEq)]
struct Sample {
    name: String,
    labels: Vec<(String, String)>,
    value: f64,
}

/// Parse the exposition text: every line is a comment (`# …`) or a sample.
fn parse(text: &str) -> Result<Vec<Sample>, String> {
    let mut out = Vec::new();
    for line in text
        .lines()
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
    {
        out.push(parse_line(line).ok_or_else(|| format!("not a sample line: {line:?}"))?);
    }
    Ok(out)
}

fn parse_line(line: &str) -> Option<Sample> {
    let name_end = line.find(['{', ' '])?;
    let name = &line[..name_end];
    let name_ok = name.chars().enumerate().all(|(i, c)| {
        c.is_ascii_alphabetic() || c == '_' || c == ':' || (i > 0 && c.is_ascii_digit())
    });
    if name.is_empty() || !name_ok {
        return None;
    }
    let mut rest = &line[name_end..];
    let mut labels = Vec::new();
    if let Some(body) = rest.strip_prefix('{') {
        let close = body.find('}')?;
        for pair in body[..close].split(',').filter(|p| !p.is_empty()) {
            let (k, v) = pair.split_once('=')?;
            let v = v.strip_prefix('"')?.strip_suffix('"')?;
            labels.push((k.to_string(), v.to_string()));
        }
        rest = &body[close + 1..];
    }
    let mut fields = rest.split_whitespace();
    let value: f64 = fields.next()?.parse().ok()?;
    // An optional timestamp, nothing else.
    if fields.nth(1).is_some() {
        return None;
    }
    Some(Sample {
        name: name.to_string(),
        labels,
        value,
    })
}

fn value(samples: &[Sample], name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    samples
        .iter()
        .find(|s| {
            s.name == name
                && labels
                    .iter()
                    .all(|(k, v)| s.labels.iter().any(|(lk, lv)| lk == k && lv == v))
        })
        .map(|s| s.value)
}

fn scrape(c: &Cluster) -> Vec<Sample> {
    let r = c.api().get("/metrics");
    assert_eq!(r.status, 200, "GET /metrics: {}", r.text());
    let ct = r.header("content-type").unwrap_or_default().to_string();
    assert!(
        ct.starts_with("application/openmetrics-text") || ct.starts_with("text/plain"),
        "content type {ct:?}"
    );
    let text = r.text();
    parse(&text).unwrap_or_else(|e| panic!("{e}\n{text}"))
}

#[test]
fn metrics_need_the_admin_token_and_count_what_happens() {
    let mut c = Cluster::start(ClusterOpts::named("metrics"));

    let anonymous = Api::new(c.addrs.api, None).get("/metrics");
    assert_eq!(anonymous.status, 401, "{}", anonymous.text());
    assert_eq!(anonymous.json()["error"]["code"], "unauthorized");
    let wrong = Api::new(c.addrs.api, Some("cga_not-a-real-token")).get("/metrics");
    assert_eq!(wrong.status, 401, "{}", wrong.text());
    // A customer's proxy password is no admin token either.
    let customer = Api::new(c.addrs.api, Some(&c.pass)).get("/metrics");
    assert_eq!(customer.status, 401, "{}", customer.text());

    let s = scrape(&c);
    let by_name: HashMap<&str, usize> = s.iter().fold(HashMap::new(), |mut m, x| {
        *m.entry(x.name.as_str()).or_default() += 1;
        m
    });
    for name in [
        "cellgate_build_info",
        "cellgate_devices",
        "cellgate_exits",
        "cellgate_device_tunnels",
        "cellgate_active_flows",
        "cellgate_relayed_bytes_total",
    ] {
        assert!(by_name.contains_key(name), "{name} missing: {s:?}");
    }
    assert_eq!(
        value(
            &s,
            "cellgate_build_info",
            &[("version", env!("CARGO_PKG_VERSION"))]
        ),
        Some(1.0)
    );
    assert_eq!(
        value(&s, "cellgate_devices", &[("status", "online")]),
        Some(1.0)
    );
    assert_eq!(
        value(&s, "cellgate_devices", &[("status", "offline")]),
        Some(0.0)
    );
    assert_eq!(
        value(&s, "cellgate_exits", &[("status", "ready")]),
        Some(1.0)
    );
    assert_eq!(value(&s, "cellgate_device_tunnels", &[]), Some(1.0));

    // Bytes through the proxy show up in the relayed counters.
    let blob = Blob::random(256 * 1024, 0x3E7);
    let origin = FileServer::start("origin", Some(blob.clone()));
    Curl::new()
        .proxy(&c.http_proxy())
        .arg("-o")
        .arg("/dev/null")
        .arg(origin.url("/blob"))
        .run()
        .expect_ok("download through the proxy");
    assert_eventually!(
        Duration::from_secs(10),
        {
            let s = scrape(&c);
            value(&s, "cellgate_relayed_bytes_total", &[("direction", "down")])
                .is_some_and(|v| v >= blob.len() as f64)
                && value(&s, "cellgate_relayed_bytes_total", &[("direction", "up")])
                    .is_some_and(|v| v > 0.0)
                && value(&s, "cellgate_exit_flows_total", &[("result", "success")])
                    .is_some_and(|v| v >= 1.0)
        },
        "relayed bytes never counted: {:?}",
        scrape(&c)
    );

    // A device whose agent stops is counted offline.
    assert!(
        c.terminate_agent(0, Duration::from_secs(10)),
        "agent did not stop"
    );
    assert_eventually!(
        Duration::from_secs(30),
        {
            let s = scrape(&c);
            value(&s, "cellgate_devices", &[("status", "offline")]) == Some(1.0)
                && value(&s, "cellgate_devices", &[("status", "online")]) == Some(0.0)
        },
        "the stopped agent's device never counted offline"
    );
}

#[test]
fn the_line_parser_rejects_what_prometheus_would() {
    assert!(parse_line("up 1").is_some());
    assert!(parse_line("a_total{x=\"1\",y=\"b\"} 2.5").is_some());
    assert!(parse_line("a 1 1700000000").is_some());
    assert!(parse_line("a{x=1} 1").is_none());
    assert!(parse_line("a").is_none());
    assert!(parse_line("9a 1").is_none());
    assert!(parse_line("a one").is_none());
}
