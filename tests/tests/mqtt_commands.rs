//! Device commands over a real mosquitto broker: by hand with
//! `mosquitto_pub`/`mosquitto_sub`, through the API with the tunnel up and
//! down, per-device ACLs, and a broker outage.

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde_json::Value;
use tests::harness::mosquitto::OPERATOR;
use tests::{AgentLaunch, Cluster, ClusterOpts, Curl, FileServer, Mosquitto, assert_eventually};

/// An exit whose rotation script counts its runs.
fn agent_toml(dir: &Path, name: &str, extra: &str) -> (String, PathBuf) {
    let count = dir.join(format!("{name}-rotations"));
    let script = dir.join(format!("{name}-rotate.sh"));
    std::fs::write(
        &script,
        format!(
            "#!/bin/sh\necho \"$CELLGATE_RUNG\" >> '{}'\n",
            count.display()
        ),
    )
    .unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o755)).unwrap();
    let toml = format!(
        r#"{extra}
[[exit]]
name = "lo"
[exit.rotation]
backend = "command"
timeout_secs = 5
rungs = [{{ name = "soft", command = ["{s}"] }}, {{ name = "hard", command = ["{s}"] }}]
"#,
        s = script.display()
    );
    (toml, count)
}

fn rotations(count: &Path) -> usize {
    std::fs::read_to_string(count)
        .map(|s| s.lines().count())
        .unwrap_or(0)
}

struct Farm {
    c: Cluster,
    broker: Mosquitto,
    counts: Vec<PathBuf>,
}

impl Farm {
    fn start(label: &str, agents: usize) -> Self {
        let broker = Mosquitto::prepare(label);
        let cfg = format!("heartbeat_interval_secs = 1\n{}", broker.cp_toml());
        let mut c = Cluster::start(ClusterOpts {
            agents: 0,
            config_toml: Some(cfg),
            ..ClusterOpts::named(label)
        });
        let mut broker = broker;
        broker.start();
        let mut counts = Vec::new();
        for n in 0..agents {
            let name = format!("dev{n}");
            let i = c.enroll_agent(&name);
            let (toml, count) = agent_toml(c.dir(), &name, "");
            c.start_agent_with(
                i,
                &AgentLaunch {
                    config_toml: Some(toml),
                    ..AgentLaunch::default()
                },
            );
            counts.push(count);
        }
        c.wait_online(agents, Duration::from_secs(20));
        let f = Self { c, broker, counts };
        for i in 0..agents {
            f.wait_mqtt_online(i);
        }
        f
    }

    fn id(&self, i: usize) -> String {
        self.c.agents[i].device_id.clone()
    }

    /// The device's broker credentials, as the agent keeps them.
    fn creds(&self, i: usize) -> (String, String) {
        let g: Value = serde_json::from_slice(
            &std::fs::read(self.c.agents[i].state_dir.join("mqtt.json")).expect("mqtt.json"),
        )
        .unwrap();
        (
            g["username"].as_str().unwrap().to_string(),
            g["password"].as_str().unwrap().to_string(),
        )
    }

    fn mqtt_status(&self) -> Value {
        self.c.api().get("/api/v1/mqtt").json()
    }

    /// Wait until the control plane sees the device's retained state
    /// saying it is online over MQTT.
    fn wait_mqtt_online(&self, i: usize) {
        let id = self.id(i);
        assert_eventually!(
            Duration::from_secs(20),
            self.mqtt_status()["device_states"][&id]["online"] == true,
            "device {id} never came online over MQTT: {}\n{}",
            self.mqtt_status(),
            self.c.agents[i].log_text()
        );
    }

    fn topic(&self, i: usize, leaf: &str) -> String {
        format!("cellgate/devices/{}/{leaf}", self.id(i))
    }

    fn command(&self, id: &str) -> Value {
        self.c.api().get(&format!("/api/v1/commands/{id}")).json()["command"].clone()
    }

    fn issue(&self, i: usize, body: &str, wait: u32) -> Value {
        let r = self.c.api().post(
            &format!("/api/v1/devices/{}/commands?wait={wait}", self.id(i)),
            Some(&serde_json::from_str(body).unwrap()),
        );
        assert!(r.status == 200 || r.status == 202, "{}", r.text());
        r.json()["command"].clone()
    }
}

#[test]
fn a_hand_published_rotation_runs_once_and_answers_on_result() {
    let f = Farm::start("mqtt-hand", 1);
    let results = f.broker.subscribe(OPERATOR, &f.topic(0, "result"), 1, 30);
    let cmd = r#"{"id":"op-1","command":"rotate","method":"hard"}"#;
    let out = f
        .broker
        .publish(OPERATOR, &f.topic(0, "cmd"), cmd, &["-q", "1"]);
    assert!(out.status.success(), "{out:?}");
    let (got, err) = results.wait();
    assert_eq!(got.len(), 1, "one result: {got:?} {err}");
    let r: Value = serde_json::from_str(&got[0].1).unwrap();
    assert_eq!(r["id"], "op-1");
    assert_eq!(r["status"], "succeeded", "{r}");
    assert_eq!(r["detail"]["method"], "hard", "{r}");
    assert_eq!(r["detail"]["ip"], "127.0.0.1", "{r}");
    assert_eq!(
        std::fs::read_to_string(&f.counts[0]).unwrap(),
        "hard\n",
        "the named method ran"
    );

    // QoS 1 redelivery (or a second publish) of the same id: not run again,
    // no second result.
    let more = f.broker.subscribe(OPERATOR, &f.topic(0, "result"), 1, 4);
    let out = f
        .broker
        .publish(OPERATOR, &f.topic(0, "cmd"), cmd, &["-q", "1"]);
    assert!(out.status.success());
    let (again, _) = more.wait();
    assert!(again.is_empty(), "no second result: {again:?}");
    assert_eq!(rotations(&f.counts[0]), 1, "rotated once");

    // The control plane tracked the hand-published command.
    assert_eventually!(
        Duration::from_secs(10),
        f.command("op-1")["status"] == "succeeded",
        "{}",
        f.command("op-1")
    );
    assert_eq!(f.command("op-1")["channel"], "mqtt");

    // Bad commands get a failed result naming the problem, and run nothing.
    let results = f.broker.subscribe(OPERATOR, &f.topic(0, "result"), 2, 20);
    f.broker.publish(
        OPERATOR,
        &f.topic(0, "cmd"),
        r#"{"id":"op-2","command":"format_disk"}"#,
        &["-q", "1"],
    );
    f.broker.publish(
        OPERATOR,
        &f.topic(0, "cmd"),
        r#"{"id":"op-3","command":"rotate","method":"warp"}"#,
        &["-q", "1"],
    );
    let (got, err) = results.wait();
    assert_eq!(got.len(), 2, "{got:?} {err}");
    let texts: Vec<Value> = got
        .iter()
        .map(|(_, p)| serde_json::from_str(p).unwrap())
        .collect();
    assert!(texts.iter().all(|r| r["status"] == "failed"), "{texts:?}");
    assert!(
        texts.iter().any(|r| r["id"] == "op-3"
            && r["message"]
                .as_str()
                .unwrap()
                .contains("no method \"warp\"")),
        "{texts:?}"
    );
    // An expired command is not run.
    let results = f.broker.subscribe(OPERATOR, &f.topic(0, "result"), 1, 20);
    f.broker.publish(
        OPERATOR,
        &f.topic(0, "cmd"),
        r#"{"id":"op-4","command":"rotate","expires_at":1000}"#,
        &["-q", "1"],
    );
    let (got, _) = results.wait();
    assert!(got[0].1.contains("\"expired\""), "{got:?}");
    assert_eq!(rotations(&f.counts[0]), 1);
}

#[test]
fn api_commands_take_the_tunnel_and_mqtt_when_the_tunnel_is_down() {
    let mut f = Farm::start("mqtt-api", 1);
    let c = f.issue(0, r#"{"command":"ping"}"#, 15);
    assert_eq!(c["status"], "succeeded", "{c}");
    assert_eq!(c["channel"], "quic");
    assert_eq!(c["message"], "pong");
    let c = f.issue(0, r#"{"command":"speed_test","bytes":2000000}"#, 30);
    assert_eq!(c["status"], "succeeded", "{c}");
    assert_eq!(c["detail"]["bytes"], 2_000_000, "{c}");
    assert!(c["detail"]["mbit_per_s"].as_f64().unwrap() > 0.0, "{c}");
    // Unknown fields and commands are refused up front.
    let r = f.c.api().post(
        &format!("/api/v1/devices/{}/commands", f.id(0)),
        Some(&serde_json::json!({"command": "ping", "force": true})),
    );
    assert_eq!(r.status, 400, "{}", r.text());

    // The agent loses its tunnel (a control-plane address it cannot reach)
    // but keeps the broker: the same API call goes over MQTT.
    let id = f.id(0);
    let (toml, _) = agent_toml(f.c.dir(), "dev0", "control_plane = \"127.0.0.1:9\"");
    f.c.start_agent_with(
        0,
        &AgentLaunch {
            config_toml: Some(toml),
            ..AgentLaunch::default()
        },
    );
    f.c.wait_status(&id, "offline", Duration::from_secs(20));
    f.wait_mqtt_online(0);
    assert_eq!(f.mqtt_status()["device_states"][&id]["tunnel"], false);
    let c = f.issue(0, r#"{"command":"rotate"}"#, 30);
    assert_eq!(c["status"], "succeeded", "{c}");
    assert_eq!(c["channel"], "mqtt");
    assert_eq!(rotations(&f.counts[0]), 1);
    let list =
        f.c.api()
            .get(&format!("/api/v1/devices/{id}/commands"))
            .json();
    assert_eq!(list["commands"].as_array().unwrap().len(), 3, "{list}");
}

#[test]
fn each_device_reads_and_writes_only_its_own_topics() {
    let f = Farm::start("mqtt-acl", 2);
    let a = f.creds(0);
    let a = (a.0.as_str(), a.1.as_str());
    assert_eq!(a.0, f.id(0));
    // A listens to B's commands and to everything.
    let spy_b = f.broker.subscribe(a, &f.topic(1, "cmd"), 1, 6);
    let spy_all = f.broker.subscribe(a, "#", 50, 6);
    let results_b = f.broker.subscribe(OPERATOR, &f.topic(1, "result"), 1, 20);
    f.broker.publish(
        OPERATOR,
        &f.topic(1, "cmd"),
        r#"{"id":"for-b","command":"ping"}"#,
        &["-q", "1"],
    );
    let (got, _) = results_b.wait();
    assert_eq!(got.len(), 1, "B got its command");
    let (seen, _) = spy_b.wait();
    assert!(seen.is_empty(), "A read B's commands: {seen:?}");
    let (seen, _) = spy_all.wait();
    assert!(
        seen.iter()
            .all(|(t, _)| t.starts_with(&format!("cellgate/devices/{}/", f.id(0)))),
        "A saw other topics: {seen:?}"
    );

    // A publishes B's state: refused ("not authorized" under MQTT v5 QoS 1)
    // and nobody receives it.
    let watch = f.broker.subscribe(OPERATOR, &f.topic(1, "state"), 10, 4);
    let out = f.broker.publish(
        a,
        &f.topic(1, "state"),
        r#"{"online":false,"spoofed":true}"#,
        &["-V", "mqttv5", "-q", "1"],
    );
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(text.to_lowercase().contains("not authorized"), "{out:?}");
    let (seen, _) = watch.wait();
    assert!(
        seen.iter().all(|(_, p)| !p.contains("spoofed")),
        "the spoofed state arrived: {seen:?}"
    );
    // A cannot send B commands either.
    let out = f.broker.publish(
        a,
        &f.topic(1, "cmd"),
        r#"{"id":"evil","command":"reboot"}"#,
        &["-V", "mqttv5", "-q", "1"],
    );
    assert!(
        String::from_utf8_lossy(&out.stderr)
            .to_lowercase()
            .contains("not authorized")
            || String::from_utf8_lossy(&out.stdout)
                .to_lowercase()
                .contains("not authorized"),
        "{out:?}"
    );
    // A wrong password is refused outright.
    let out = f
        .broker
        .publish((a.0, "wrong"), &f.topic(0, "state"), "{}", &[]);
    assert!(!out.status.success());
    // Removing a device revokes its broker identity.
    let r = f.c.api().delete(&format!("/api/v1/devices/{}", f.id(1)));
    assert_eq!(r.status, 204);
    let b = f.creds(1);
    assert_eventually!(
        Duration::from_secs(10),
        !f.broker
            .publish((&b.0, &b.1), &f.topic(1, "state"), "{}", &[])
            .status
            .success(),
        "the removed device can still log in"
    );
}

#[test]
fn a_broker_outage_does_not_disturb_proxying_and_loses_no_command() {
    let mut f = Farm::start("mqtt-outage", 1);
    let site = FileServer::start("site", None);
    f.broker.kill();
    assert_eventually!(
        Duration::from_secs(10),
        f.mqtt_status()["connected"] == false,
        "{}",
        f.mqtt_status()
    );
    // A minute without the broker: customers do not notice.
    let outage = std::time::Instant::now();
    while outage.elapsed() < Duration::from_secs(60) {
        Curl::new()
            .proxy(&f.c.http_proxy())
            .arg(site.url("/hello"))
            .run()
            .expect_ok("proxying with the broker down");
        std::thread::sleep(Duration::from_secs(3));
    }
    // The device is connected: commands take the tunnel.
    let c = f.issue(0, r#"{"command":"ping"}"#, 15);
    assert_eq!(
        (&c["status"], &c["channel"]),
        (&"succeeded".into(), &"quic".into()),
        "{c}"
    );
    // Neither the tunnel nor the broker: failed at once, with the reason.
    let id = f.id(0);
    f.c.kill_agent(0);
    f.c.wait_status(&id, "offline", Duration::from_secs(20));
    let c = f.issue(0, r#"{"command":"ping"}"#, 10);
    assert_eq!(c["status"], "failed", "{c}");
    let msg = c["message"].as_str().unwrap();
    assert!(
        msg.contains("not connected") && msg.contains("MQTT broker is unreachable"),
        "{msg}"
    );
    // The agent comes back while the broker is still down, then the broker
    // returns: control plane and agent reconnect by themselves.
    let (toml, _) = agent_toml(f.c.dir(), "dev0", "");
    f.c.start_agent_with(
        0,
        &AgentLaunch {
            config_toml: Some(toml),
            ..AgentLaunch::default()
        },
    );
    f.c.wait_status(&id, "online", Duration::from_secs(20));
    let before = f.mqtt_status()["device_states"][&id]["updated_at"]
        .as_i64()
        .unwrap();
    std::thread::sleep(Duration::from_millis(1100));
    f.broker.start();
    let t = std::time::Instant::now();
    assert_eventually!(
        Duration::from_secs(15),
        f.mqtt_status()["connected"] == true
            && f.mqtt_status()["device_states"][&id]["updated_at"]
                .as_i64()
                .unwrap()
                > before,
        "{}",
        f.mqtt_status()
    );
    eprintln!(
        "control plane and agent back on the broker {:?} after it returned",
        t.elapsed()
    );
    let results = f.broker.subscribe(OPERATOR, &f.topic(0, "result"), 1, 20);
    f.broker.publish(
        OPERATOR,
        &f.topic(0, "cmd"),
        r#"{"id":"after-outage","command":"ping"}"#,
        &["-q", "1"],
    );
    let (got, _) = results.wait();
    assert_eq!(got.len(), 1, "{got:?}");
}

#[test]
fn config_updates_restarts_and_reboots_run_on_the_device() {
    let mut f = Farm::start("mqtt-admin", 1);
    let id = f.id(0);
    let marker = f.c.dir().join("rebooted");
    let extra = format!(
        "reboot_command = [\"sh\", \"-c\", \"echo reboot >> '{}'\"]",
        marker.display()
    );
    let (toml, _) = agent_toml(f.c.dir(), "dev0", &extra);
    f.c.start_agent_with(
        0,
        &AgentLaunch {
            config_toml: Some(toml.clone()),
            ..AgentLaunch::default()
        },
    );
    f.c.wait_status(&id, "online", Duration::from_secs(20));
    let pid = f.c.agents[0].pid();
    let reconnects = |f: &Farm| {
        f.c.api().device(&id).unwrap()["reconnects"]
            .as_i64()
            .unwrap()
    };
    let before = reconnects(&f);

    // Reboot: answered first, then the configured command runs.
    let c = f.issue(0, r#"{"command":"reboot"}"#, 15);
    assert_eq!(c["status"], "succeeded", "{c}");
    assert_eventually!(
        Duration::from_secs(10),
        std::fs::read_to_string(&marker).unwrap_or_default() == "reboot\n",
        "the reboot command never ran"
    );

    // Restart: the same process (same PID) starts over and reconnects.
    let c = f.issue(0, r#"{"command":"restart_agent"}"#, 15);
    assert_eq!(c["status"], "succeeded", "{c}");
    assert_eventually!(
        Duration::from_secs(20),
        reconnects(&f) > before && f.c.api().device_status(&id).as_deref() == Some("online"),
        "the agent never came back after restarting"
    );
    assert_eq!(f.c.agents[0].pid(), pid, "restarted in place");

    // A new configuration: a broken one is refused and changes nothing; a
    // valid one is written (the old one kept) and the agent restarts on it.
    let path = f.c.dir().join("dev0.toml");
    let c = f.issue(
        0,
        &serde_json::json!({"command": "update_config", "toml": "telemetry_secs = \"often\""})
            .to_string(),
        15,
    );
    assert_eq!(c["status"], "failed", "{c}");
    assert!(
        c["message"].as_str().unwrap().contains("does not parse"),
        "{c}"
    );
    assert_eq!(std::fs::read_to_string(&path).unwrap(), toml);
    let before = reconnects(&f);
    let new = format!("telemetry_secs = 7\n{toml}");
    let c = f.issue(
        0,
        &serde_json::json!({"command": "update_config", "toml": new}).to_string(),
        15,
    );
    assert_eq!(c["status"], "succeeded", "{c}");
    assert_eq!(std::fs::read_to_string(&path).unwrap(), new);
    assert_eq!(
        std::fs::read_to_string(f.c.dir().join("dev0.toml.prev")).unwrap(),
        toml
    );
    assert_eventually!(
        Duration::from_secs(20),
        reconnects(&f) > before && f.c.api().device_status(&id).as_deref() == Some("online"),
        "the agent never came back on its new configuration"
    );
}
