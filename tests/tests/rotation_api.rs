//! Rotation mechanics without a network testbed: everything on loopback,
//! where an exit's public address never changes. That makes the
//! verify-retry-escalate path run on every rotation: each attempt is one
//! rung harder, the rotation fails with the reason, and the exit returns to
//! the pool because its address check still works.

use std::time::Duration;

use serde_json::{Value, json};
use tests::{AgentLaunch, Cluster, ClusterOpts, Curl, FileServer, assert_eventually};

const CP_CONFIG: &str = r#"
heartbeat_interval_secs = 1
[rotation]
drain_grace_secs = 1
attempts = 3
retry_delay_secs = 0
attempt_timeout_secs = 10
[fleet]
telemetry_sample_secs = 1
counters_flush_secs = 1
"#;

/// An agent whose one exit rotates with a script that records each rung.
fn agent_config(dir: &std::path::Path) -> (String, std::path::PathBuf) {
    let log = dir.join("rungs.log");
    let script = dir.join("rotate.sh");
    std::fs::write(
        &script,
        format!(
            "#!/bin/sh\necho \"$CELLGATE_RUNG\" >> '{}'\n[ \"$1\" = fail ] && {{ echo 'modem said no' >&2; exit 3; }}\nexit 0\n",
            log.display()
        ),
    )
    .unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o755)).unwrap();
    let s = script.display();
    let toml = format!(
        r#"
[[exit]]
name = "lo"
[exit.rotation]
backend = "command"
timeout_secs = 5
rungs = [
  {{ name = "soft", command = ["{s}"] }},
  {{ name = "hard", command = ["{s}"] }},
]
"#
    );
    (toml, log)
}

fn start() -> (Cluster, std::path::PathBuf) {
    let mut c = Cluster::start(ClusterOpts {
        agents: 0,
        config_toml: Some(CP_CONFIG.into()),
        ..ClusterOpts::named("rotation-api")
    });
    let (toml, log) = agent_config(c.dir());
    let i = c.enroll_agent("rotor");
    c.start_agent_with(
        i,
        &AgentLaunch {
            config_toml: Some(toml),
            ..AgentLaunch::default()
        },
    );
    c.wait_online(1, Duration::from_secs(20));
    (c, log)
}

fn exit_of(c: &Cluster, id: &str) -> Value {
    let d = c.api().device(id).expect("device");
    d["exits"][0].clone()
}

#[test]
fn same_address_retries_escalates_and_returns_to_the_pool() {
    let (c, log) = start();
    let id = c.agents[0].device_id.clone();
    let api = c.api();
    // The exit is declared with its backend and ladder, and its address
    // gets checked when the device connects.
    assert_eventually!(
        Duration::from_secs(10),
        exit_of(&c, &id)["external_ip"] == "127.0.0.1",
        "exit address never checked: {}",
        exit_of(&c, &id)
    );
    let e = exit_of(&c, &id);
    assert_eq!(e["name"], "lo");
    assert_eq!(e["method"], "command");
    assert_eq!(e["ladder"], json!(["soft", "hard"]));
    assert_eq!(e["status"], "ready");

    let r = api.post(&format!("/api/v1/devices/{id}/rotate"), None);
    assert_eq!(r.status, 502, "{}", r.text());
    let v = r.json();
    assert_eq!(v["error"]["code"], "rotation_failed");
    let rot = &v["rotation"];
    assert_eq!(rot["attempts"], 3);
    assert_eq!(
        rot["rungs"],
        json!(["soft", "hard", "hard"]),
        "escalates, then stays on the last rung"
    );
    assert_eq!(rot["outcome"], "failed");
    assert_eq!(rot["old_ip"], "127.0.0.1");
    assert!(rot["new_ip"].is_null());
    let err = rot["error"].as_str().unwrap();
    assert!(err.contains("stayed 127.0.0.1"), "{err}");
    assert_eq!(
        std::fs::read_to_string(&log).unwrap(),
        "soft\nhard\nhard\n",
        "one script run per attempt"
    );
    // The uplink still works, so the exit is back in the pool, with the
    // reason visible.
    let e = exit_of(&c, &id);
    assert_eq!(e["status"], "ready", "{e}");
    assert!(
        e["reason"]
            .as_str()
            .unwrap_or("")
            .contains("last rotation failed"),
        "{e}"
    );
    let site = FileServer::start("origin", None);
    Curl::new()
        .proxy(&c.http_proxy())
        .arg(site.url("/hello"))
        .run()
        .expect_ok("proxying after a failed rotation");

    // The record is stored, and the IP history has the address.
    let rows = api.get(&format!("/api/v1/devices/{id}/rotations")).json();
    assert_eq!(rows.as_array().unwrap().len(), 1);
    assert_eq!(rows[0]["cause"], "api");
    let ips = api.get(&format!("/api/v1/devices/{id}/ips")).json();
    assert_eq!(ips[0]["ip"], "127.0.0.1");

    // The CLI reports the failure and exits non-zero.
    let out = c.cp_cli(&["device", "rotate", &id]);
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("stayed 127.0.0.1"), "{stderr}");
    let rows = api.get(&format!("/api/v1/devices/{id}/rotations")).json();
    assert_eq!(rows[0]["cause"], "cli");
}

#[test]
fn rotation_links_are_rate_limited_and_revocable() {
    let (c, _log) = start();
    let id = c.agents[0].device_id.clone();
    let api = c.api();
    let r = api.post(
        &format!("/api/v1/devices/{id}/rotation-links"),
        Some(&json!({"min_interval_secs": 30})),
    );
    assert_eq!(r.status, 201, "{}", r.text());
    let link = r.json();
    let url = link["url"].as_str().unwrap().to_string();
    assert!(url.contains("/rotate/cgr_"), "{url}");
    // Listing never shows the secret again.
    let list = api
        .get(&format!("/api/v1/devices/{id}/rotation-links"))
        .text();
    assert!(!list.contains(link["token"].as_str().unwrap()));

    // A rotation that cannot start (the device is disabled) does not use
    // up the link's interval.
    assert_eq!(
        api.post(&format!("/api/v1/devices/{id}/disable"), None)
            .status,
        200
    );
    for _ in 0..2 {
        let r = Curl::new().arg("-w").arg("\n%{http_code}").arg(&url).run();
        assert!(!r.stdout.ends_with("429"), "{}", r.stdout);
    }
    assert_eq!(
        api.post(&format!("/api/v1/devices/{id}/enable"), None)
            .status,
        200
    );
    c.wait_online(1, Duration::from_secs(20));

    // Plain curl, no credentials: the rotation runs (and fails here, on
    // loopback, with the reason).
    let first = Curl::new().arg("-w").arg("\n%{http_code}").arg(&url).run();
    let text = first.stdout.clone();
    assert!(text.ends_with("502"), "{text}");
    assert!(text.contains("the address is still 127.0.0.1"), "{text}");
    assert!(
        !text.contains("dev-"),
        "no fleet internals on a public link: {text}"
    );
    let again = Curl::new()
        .arg("-D")
        .arg("-")
        .arg(&url)
        .run()
        .stdout
        .clone();
    assert!(again.starts_with("HTTP/1.1 429"), "{again}");
    assert!(
        again.to_ascii_lowercase().contains("retry-after:"),
        "{again}"
    );

    let del = api.delete(&format!(
        "/api/v1/rotation-links/{}",
        link["id"].as_str().unwrap()
    ));
    assert_eq!(del.status, 204);
    let gone = Curl::new().arg("-w").arg("\n%{http_code}").arg(&url).run();
    assert!(
        gone.stdout.clone().ends_with("404"),
        "{}",
        gone.stdout.clone()
    );
    // A made-up token is just as unknown.
    let base = url.split("/rotate/").next().unwrap();
    let fake = Curl::new()
        .arg("-w")
        .arg("\n%{http_code}")
        .arg(format!("{base}/rotate/cgr_nope"))
        .run();
    assert!(fake.stdout.clone().ends_with("404"));
}

#[test]
fn refusals_are_explained() {
    let (mut c, _log) = start();
    let api = c.api();
    let id = c.agents[0].device_id.clone();
    // A second device without configured exits cannot rotate.
    let j = c.enroll_agent("plain");
    c.start_agent(j);
    c.wait_online(2, Duration::from_secs(20));
    let plain = c.agents[j].device_id.clone();
    let r = api.post(&format!("/api/v1/devices/{plain}/rotate"), None);
    assert_eq!(r.status, 409, "{}", r.text());
    assert!(r.text().contains("no rotation backend"), "{}", r.text());
    // Unknown exit, unknown device.
    let r = api.post(
        &format!("/api/v1/devices/{id}/rotate"),
        Some(&json!({"exit": "nope"})),
    );
    assert_eq!(r.status, 404);
    assert!(r.text().contains("exits: lo"), "{}", r.text());
    assert_eq!(
        api.post("/api/v1/devices/dev-000000000000/rotate", None)
            .status,
        404
    );
    // Rotation disabled for the device.
    let r = api.request(
        "PUT",
        &format!("/api/v1/devices/{id}/rotation"),
        Some(&json!({"enabled": false})),
    );
    assert_eq!(r.status, 200, "{}", r.text());
    let r = api.post(&format!("/api/v1/devices/{id}/rotate"), None);
    assert_eq!(r.status, 409);
    assert!(r.text().contains("rotation is disabled"), "{}", r.text());
    // Offline device.
    c.kill_agent(j);
    c.wait_status(&plain, "offline", Duration::from_secs(10));
    let r = api.post(&format!("/api/v1/devices/{plain}/rotate"), None);
    assert_eq!(r.status, 503, "{}", r.text());
}

#[test]
fn device_settings_maintenance_and_telemetry() {
    let (c, _log) = start();
    let api = c.api();
    let id = c.agents[0].device_id.clone();
    let r = api.request(
        "PATCH",
        &format!("/api/v1/devices/{id}"),
        Some(&json!({"region": "eu-central", "labels": ["berlin", "pool-a"]})),
    );
    assert_eq!(r.status, 200, "{}", r.text());
    let d = r.json();
    assert_eq!(d["region"], "eu-central");
    assert_eq!(d["labels"], json!(["berlin", "pool-a"]));
    let bad = api.request(
        "PATCH",
        &format!("/api/v1/devices/{id}"),
        Some(&json!({"labels": ["Not Valid"]})),
    );
    assert_eq!(bad.status, 400);

    // Maintenance takes the device out of routing.
    let site = FileServer::start("origin", None);
    let r = api.request(
        "PATCH",
        &format!("/api/v1/devices/{id}"),
        Some(&json!({"maintenance": true})),
    );
    assert_eq!(r.json()["status"], "maintenance");
    let out = Curl::new()
        .proxy(&c.http_proxy())
        .arg("-o")
        .arg("/dev/null")
        .arg("-w")
        .arg("%{http_code}")
        .arg(site.url("/hello"))
        .run();
    assert_eq!(out.stdout.clone(), "503");
    api.request(
        "PATCH",
        &format!("/api/v1/devices/{id}"),
        Some(&json!({"maintenance": false})),
    );
    Curl::new()
        .proxy(&c.http_proxy())
        .arg(site.url("/hello"))
        .run()
        .expect_ok("after maintenance");

    // Counters reach the database; telemetry samples are kept.
    assert_eventually!(
        Duration::from_secs(10),
        exit_of(&c, &id)["totals"]["successes"]
            .as_i64()
            .unwrap_or(0)
            >= 1,
        "no exit counters: {}",
        exit_of(&c, &id)
    );
    assert_eventually!(
        Duration::from_secs(10),
        api.get(&format!("/api/v1/devices/{id}/telemetry"))
            .json()
            .as_array()
            .is_some_and(|a| !a.is_empty()),
        "no telemetry samples"
    );
    let t = api.get(&format!("/api/v1/devices/{id}/telemetry")).json();
    assert_eq!(t[0]["exit"], "lo");
    assert_eq!(t[0]["link_up"], true);

    // The public IP echo.
    let ip = Curl::new()
        .arg(format!("http://{}/ip", c.addrs.api))
        .run()
        .stdout
        .clone();
    assert_eq!(ip.trim(), "127.0.0.1");
}
