//! The README's first command: `control-plane demo`, the whole system in one
//! process with an in-process agent enrolled through the real path.

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use tests::harness::process::command;
use tests::{
    Blob, Curl, FileServer, Proc, TempDir, assert_eventually, control_plane_bin, sha256_file,
};

#[test]
fn demo_serves_both_proxies_and_stops_cleanly_on_ctrl_c() {
    let dir = TempDir::new("demo");
    let blob = Blob::random(4 * 1024 * 1024, 0xDE30);
    let origin = FileServer::start("demo-origin", Some(blob.clone()));
    let ready = dir.join("ready.json");
    let mut cmd = command(control_plane_bin());
    cmd.args([
        "demo",
        "--http-port",
        "0",
        "--socks-port",
        "0",
        "--api-port",
        "0",
        "--quic-port",
        "0",
    ])
    .args([
        "--customer",
        "alice:alice-password",
        "--allow-private-targets",
        "--ready-file",
    ])
    .arg(&ready);
    let stdout = dir.join("demo.out");
    let mut demo = Proc::spawn_split("demo", cmd, Some(&stdout), &dir.join("demo.log"));
    assert_eventually!(
        Duration::from_secs(30),
        ready.exists() || !demo.is_running(),
        "the demo never became ready:\n{}",
        demo.log_tail(30)
    );
    assert!(
        demo.is_running(),
        "the demo exited early:\n{}",
        demo.log_tail(30)
    );
    let addrs: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&ready).unwrap()).unwrap();
    let http = addrs["http"].as_str().unwrap().to_string();
    let socks = addrs["socks"].as_str().unwrap().to_string();
    let api = addrs["api"].as_str().unwrap().to_string();

    // The banner tells a new user everything needed to use it.
    let banner = std::fs::read_to_string(&stdout).unwrap();
    for needle in [
        "cellgate demo is running",
        &format!("http://{http}"),
        &format!("socks5h://{socks}"),
        "customer        alice / alice-password",
        "admin token     cga_",
        "online over QUIC",
        "curl -x http://alice:alice-password@",
        "--socks5-hostname",
    ] {
        assert!(
            banner.contains(needle),
            "banner lacks {needle:?}:\n{banner}"
        );
    }
    let data_dir = banner
        .lines()
        .find_map(|l| l.trim().strip_prefix("data directory"))
        .and_then(|rest| rest.split_whitespace().next())
        .expect("banner names the data directory")
        .to_string();
    assert!(Path::new(&data_dir).join("cellgate.db").exists());

    // Both proxies carry bytes through the in-process agent.
    for (what, curl) in [
        (
            "http",
            Curl::new().proxy(&format!("http://alice:alice-password@{http}")),
        ),
        (
            "socks5",
            Curl::new().args([
                "--socks5-hostname",
                &socks,
                "--proxy-user",
                "alice:alice-password",
            ]),
        ),
    ] {
        let out = dir.join(format!("{what}.body"));
        curl.output(&out)
            .arg(origin.url_as("http", "localhost", "/blob"))
            .run()
            .expect_ok(what);
        let (sha, len) = sha256_file(&out);
        assert_eq!(
            (sha.as_str(), len),
            (blob.sha256(), blob.len() as u64),
            "{what}"
        );
    }

    // The printed admin token works on the API.
    let token = banner
        .lines()
        .find_map(|l| l.trim().strip_prefix("admin token"))
        .map(|t| t.trim().to_string())
        .unwrap();
    let r = Curl::new()
        .args(["-H", &format!("Authorization: Bearer {token}")])
        .arg(format!("http://{api}/api/v1/devices"))
        .run();
    r.expect_ok("api");
    assert!(r.stdout.contains("\"status\":\"online\""), "{}", r.stdout);

    // Ctrl-C: a clean exit, and the temporary data directory is gone.
    let pid = demo.pid().expect("demo is running");
    let _ = Command::new("kill")
        .args(["-INT", &pid.to_string()])
        .status();
    let status = demo.wait_exit(Duration::from_secs(15));
    assert!(
        status.is_some_and(|s| s.success()),
        "demo did not exit cleanly on SIGINT: {status:?}\n{}",
        demo.log_tail(30)
    );
    assert!(
        !Path::new(&data_dir).exists(),
        "temporary data directory {data_dir} left behind"
    );
}
