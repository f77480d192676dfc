//! Signed agent updates end to end, with two real builds of the agent: the
//! workspace's `edge-agent` and `edge-agent-next`, built with
//! `CELLGATE_AGENT_VERSION` set (tests/run.sh builds it; this file builds
//! it into its own target directory when it is missing).
//!
//! Every agent runs from a private copy of its binary (stripped, to keep the
//! temporary directories small), so an update replaces that copy and never
//! the workspace's build.

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde_json::{Value, json};
use tests::{AgentLaunch, Cluster, ClusterOpts, assert_eventually, edge_agent_bin, sha256_file};

const CP_CONFIG: &str = r#"
heartbeat_interval_secs = 1
[releases]
rollout_deadline_secs = 60
"#;

/// Agents reconnect fast and give a new binary 5 s to reach the control
/// plane.
fn agent_toml(control_plane: Option<&str>) -> String {
    let mut t = String::from("max_backoff_secs = 1\nupdate_deadline_secs = 5\n");
    if let Some(cp) = control_plane {
        t.push_str(&format!("control_plane = \"{cp}\"\n"));
    }
    t
}

/// The second build: `CELLGATE_TEST_AGENT_NEXT`, else `edge-agent-next`
/// beside the workspace's binaries, else built now into a separate target
/// directory (slow, but never a silent skip).
fn next_agent() -> PathBuf {
    if let Some(p) = std::env::var_os("CELLGATE_TEST_AGENT_NEXT") {
        let p = PathBuf::from(p);
        assert!(
            p.is_file(),
            "CELLGATE_TEST_AGENT_NEXT={} is missing",
            p.display()
        );
        return p;
    }
    let beside = edge_agent_bin().with_file_name("edge-agent-next");
    if beside.is_file() {
        return beside;
    }
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let target_dir = root.join("target/agent-next");
    let built = target_dir.join("debug/edge-agent");
    if !built.is_file() {
        eprintln!("building the second agent into {}", target_dir.display());
        let st = std::process::Command::new(env!("CARGO"))
            .current_dir(&root)
            .env("CELLGATE_AGENT_VERSION", "99.0.0-next")
            .args([
                "build",
                "-p",
                "edge-agent",
                "--bin",
                "edge-agent",
                "--target-dir",
            ])
            .arg(&target_dir)
            .status()
            .expect("run cargo");
        assert!(st.success(), "building the second agent failed");
    }
    built
}

fn version_of(bin: &Path) -> String {
    let out = std::process::Command::new(bin)
        .arg("--version")
        .output()
        .expect("--version");
    let text = String::from_utf8_lossy(&out.stdout);
    text.split_whitespace()
        .nth(1)
        .unwrap_or_else(|| panic!("no version in {text:?}"))
        .to_string()
}

/// A stripped copy of `src` at `dest`.
fn install_copy(src: &Path, dest: &Path) {
    std::fs::create_dir_all(dest.parent().unwrap()).unwrap();
    let stripped = std::process::Command::new("strip")
        .arg("-o")
        .arg(dest)
        .arg(src)
        .status()
        .is_ok_and(|s| s.success());
    if !stripped {
        std::fs::copy(src, dest).unwrap();
    }
}

struct Setup {
    c: Cluster,
    /// Per agent: the binary it runs.
    bins: Vec<PathBuf>,
    old_version: String,
    next_version: String,
    /// The stripped next build, as published.
    next_bin: PathBuf,
    old_sha: String,
}

fn setup(name: &str, agents: usize) -> Setup {
    let mut c = Cluster::start(ClusterOpts {
        agents: 0,
        config_toml: Some(CP_CONFIG.into()),
        ..ClusterOpts::named(name)
    });
    let next_bin = c.dir().join("next/edge-agent");
    install_copy(&next_agent(), &next_bin);
    let mut bins = Vec::new();
    for i in 0..agents {
        let idx = c.enroll_agent(&format!("dev{i}"));
        let bin = c.dir().join(format!("bin{i}/edge-agent"));
        install_copy(&edge_agent_bin(), &bin);
        c.start_agent_with(idx, &launch(&bin, None));
        bins.push(bin);
    }
    c.wait_online(agents, Duration::from_secs(20));
    let old_version = version_of(&bins[0]);
    let next_version = version_of(&next_bin);
    assert_ne!(old_version, next_version, "the two builds must differ");
    let old_sha = sha256_file(&bins[0]).0;
    Setup {
        c,
        bins,
        old_version,
        next_version,
        next_bin,
        old_sha,
    }
}

fn launch(bin: &Path, control_plane: Option<&str>) -> AgentLaunch {
    AgentLaunch {
        config_toml: Some(agent_toml(control_plane)),
        binary: Some(bin.to_path_buf()),
        ..AgentLaunch::default()
    }
}

fn publish(c: &Cluster, bin: &Path, version: &str, key: Option<&Path>) {
    let bin = bin.to_string_lossy().into_owned();
    let mut args = vec![
        "release",
        "publish",
        bin.as_str(),
        "--version",
        version,
        "--target",
        edge_agent::AGENT_TARGET,
    ];
    let key = key.map(|k| k.to_string_lossy().into_owned());
    if let Some(k) = &key {
        args.extend(["--key", k.as_str()]);
    }
    let out = c.cp_cli(&args);
    assert!(
        out.status.success(),
        "release publish: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn live_version(c: &Cluster, id: &str) -> Option<String> {
    c.api()
        .device(id)
        .and_then(|d| d["live"]["agent_version"].as_str().map(str::to_string))
}

fn latest_update(c: &Cluster, id: &str) -> Value {
    c.api().get(&format!("/api/v1/devices/{id}/updates")).json()[0].clone()
}

#[test]
fn update_installs_the_signed_build_and_keeps_the_previous() {
    let s = setup("update-ok", 1);
    let c = &s.c;
    let id = c.agents[0].device_id.clone();
    publish(c, &s.next_bin, &s.next_version, None);
    let list = c.cp_cli(&["release", "list"]);
    assert!(String::from_utf8_lossy(&list.stdout).contains(&s.next_version));

    let r = c.api().post(
        &format!("/api/v1/devices/{id}/update"),
        Some(&json!({"version": s.next_version})),
    );
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.json()["update"]["status"], "restarting");

    assert_eventually!(
        Duration::from_secs(30),
        live_version(c, &id).as_deref() == Some(s.next_version.as_str()),
        "device never came back with {}",
        s.next_version
    );
    assert_eventually!(
        Duration::from_secs(10),
        latest_update(c, &id)["status"] == "committed",
        "update not committed: {}",
        latest_update(c, &id)
    );
    let u = latest_update(c, &id);
    assert_eq!(u["from_version"], s.old_version);
    assert_eq!(u["to_version"], s.next_version);
    // On disk: the new binary in place, the old one kept beside it, the
    // probation marker gone.
    assert_eq!(sha256_file(&s.bins[0]), sha256_file(&s.next_bin));
    let prev = s.bins[0].with_file_name("edge-agent.prev");
    assert_eq!(sha256_file(&prev).0, s.old_sha);
    assert!(!c.agents[0].state_dir.join("update-pending.json").exists());
    assert_eq!(version_of(&s.bins[0]), s.next_version);
}

#[test]
fn corrupted_and_foreign_releases_are_refused() {
    let s = setup("update-refused", 1);
    let c = &s.c;
    let id = c.agents[0].device_id.clone();

    // The stored bytes no longer match the signed manifest.
    publish(c, &s.next_bin, &s.next_version, None);
    let db = c.data_dir().join("cellgate.db");
    let sql = format!(
        "UPDATE release_chunks SET data = randomblob(length(data)) WHERE seq = 0 AND version = '{}';",
        s.next_version
    );
    let st = std::process::Command::new("sqlite3")
        .arg(&db)
        .arg(&sql)
        .status()
        .expect("sqlite3 (apt-get install sqlite3)");
    assert!(st.success());
    let r = c.api().post(
        &format!("/api/v1/devices/{id}/update"),
        Some(&json!({"version": s.next_version})),
    );
    assert_eq!(r.status, 502, "{}", r.text());
    let msg = r.json()["error"]["message"].as_str().unwrap().to_string();
    assert!(msg.contains("checksum mismatch"), "{msg}");
    assert_eq!(latest_update(c, &id)["status"], "refused");

    // Signed by a key the agent never received.
    let other_key = c.dir().join("other-release.key");
    publish(c, &s.next_bin, "99.1.0-foreign", Some(&other_key));
    let r = c.api().post(
        &format!("/api/v1/devices/{id}/update"),
        Some(&json!({"version": "99.1.0-foreign"})),
    );
    assert_eq!(r.status, 502, "{}", r.text());
    let msg = r.json()["error"]["message"].as_str().unwrap().to_string();
    assert!(msg.contains("does not verify"), "{msg}");

    // Still the old build, online, untouched on disk.
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(
        live_version(c, &id).as_deref(),
        Some(s.old_version.as_str())
    );
    assert_eq!(sha256_file(&s.bins[0]).0, s.old_sha);
    assert!(!s.bins[0].with_file_name(".edge-agent.new").exists());
}

#[test]
fn a_build_that_never_reconnects_is_rolled_back() {
    let s = setup("update-rollback", 1);
    let c = &s.c;
    let id = c.agents[0].device_id.clone();
    let state_dir = c.agents[0].state_dir.clone();
    publish(c, &s.next_bin, &s.next_version, None);
    // The agent's configuration file now names an unreachable control
    // plane: the running agent has read it already, the new build will
    // read it at its start.
    let cfg_path = c.dir().join("dev0.toml");
    std::fs::write(&cfg_path, agent_toml(Some("127.0.0.1:1"))).unwrap();
    let r = c.api().post(
        &format!("/api/v1/devices/{id}/update"),
        Some(&json!({"version": s.next_version})),
    );
    assert_eq!(r.status, 200, "{}", r.text());
    // Once the new build started (it counts its start in the marker), the
    // configuration is repaired for the binary that comes after it.
    let marker = state_dir.join("update-pending.json");
    assert_eventually!(
        Duration::from_secs(20),
        std::fs::read_to_string(&marker)
            .ok()
            .and_then(|t| serde_json::from_str::<Value>(&t).ok())
            .is_some_and(|m| m["starts"].as_u64() >= Some(1)),
        "the new build never started"
    );
    std::fs::write(&cfg_path, agent_toml(None)).unwrap();
    let started = std::time::Instant::now();
    assert_eventually!(
        Duration::from_secs(30),
        latest_update(c, &id)["status"] == "rolled_back",
        "no rollback reported: {}",
        latest_update(c, &id)
    );
    eprintln!(
        "rollback reported {:?} after the new build started",
        started.elapsed()
    );
    let u = latest_update(c, &id);
    assert!(
        u["message"]
            .as_str()
            .unwrap()
            .contains("did not reach the control plane within 5 s"),
        "{u}"
    );
    assert_eq!(
        live_version(c, &id).as_deref(),
        Some(s.old_version.as_str())
    );
    assert_eq!(sha256_file(&s.bins[0]).0, s.old_sha);
    assert!(!marker.exists());
}

#[test]
fn rollout_over_a_label_updates_one_device_at_a_time() {
    let s = setup("update-rollout", 2);
    let c = &s.c;
    let api = c.api();
    for a in &c.agents {
        let r = api.request(
            "PATCH",
            &format!("/api/v1/devices/{}", a.device_id),
            Some(&json!({"labels": ["canary"]})),
        );
        assert_eq!(r.status, 200, "{}", r.text());
    }
    publish(c, &s.next_bin, &s.next_version, None);
    let r = api.post(
        &format!("/api/v1/releases/{}/rollout", s.next_version),
        Some(&json!({"label": "canary", "batch": 1})),
    );
    assert_eq!(r.status, 202, "{}", r.text());
    let id = r.json()["id"].as_str().unwrap().to_string();
    let mut max_updating = 0;
    assert_eventually!(
        Duration::from_secs(90),
        {
            let v = api.get(&format!("/api/v1/rollouts/{id}")).json();
            max_updating = max_updating.max(v["counts"]["updating"].as_u64().unwrap_or(0));
            v["state"] != "running"
        },
        "rollout still running"
    );
    let v = api.get(&format!("/api/v1/rollouts/{id}")).json();
    assert_eq!(v["state"], "done", "{v}");
    assert_eq!(v["counts"]["done"], 2, "{v}");
    assert_eq!(v["counts"]["failed"], 0, "{v}");
    assert!(max_updating <= 1, "batch 1 updated {max_updating} at once");
    for a in &c.agents {
        assert_eq!(
            live_version(c, &a.device_id).as_deref(),
            Some(s.next_version.as_str())
        );
    }
}
