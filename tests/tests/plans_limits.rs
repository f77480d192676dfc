//! Plans and limits, targeting through the username, sticky sessions,
//! usage accounting and the request log, end to end with real curl.

use std::time::Duration;

use serde_json::{Value, json};
use tests::{
    Blob, Cluster, ClusterOpts, Curl, FileServer, SocksTarget, assert_eventually, socks5_attempt,
};

const CP_CONFIG: &str = r#"
[fleet]
counters_flush_secs = 1
"#;

fn cluster(name: &str, agents: usize) -> Cluster {
    Cluster::start(ClusterOpts {
        agents,
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

fn set_plan(c: &Cluster, plan: Value) -> Value {
    let r = c.api().post("/api/v1/plans", Some(&plan));
    assert_eq!(r.status, 201, "{}", r.text());
    let p = r.json();
    let r = c.api().request(
        "PATCH",
        &format!("/api/v1/customers/{}/access", customer_id(c)),
        Some(&json!({"plan": p["id"]})),
    );
    assert_eq!(r.status, 200, "{}", r.text());
    p
}

fn code_of(r: &tests::CurlResult) -> String {
    r.stdout.trim().to_string()
}

#[test]
fn thread_limit_answers_429_and_socks_0x02_with_the_reason() {
    let c = cluster("plan-threads", 1);
    set_plan(&c, json!({"name": "basic", "max_threads": 2}));
    let site = FileServer::start("origin", None);
    // Two long transfers hold both slots.
    let mut held = Vec::new();
    for i in 0..2 {
        held.push(
            Curl::new()
                .proxy(&c.http_proxy())
                .arg("-o")
                .arg("/dev/null")
                .max_time(Duration::from_secs(20))
                .arg(site.url("/trickle"))
                .spawn(c.dir(), &format!("hold{i}")),
        );
    }
    assert_eventually!(
        Duration::from_secs(10),
        site.stats
            .trickled
            .load(std::sync::atomic::Ordering::Relaxed)
            > 0
            && site.connections() >= 2,
        "the transfers never started"
    );
    let r = Curl::new()
        .proxy(&c.http_proxy())
        .write_out("\n%{http_code}")
        .arg(site.url("/hello"))
        .run();
    assert!(r.stdout.ends_with("429"), "{r:?}");
    assert!(
        r.stdout.contains("connection limit reached: 2 of 2"),
        "{r:?}"
    );
    // The refusal is in the request log, with its reason.
    let cid = customer_id(&c);
    assert_eventually!(
        Duration::from_secs(10),
        c.api()
            .get(&format!("/api/v1/request-log?customer={cid}"))
            .json()
            .as_array()
            .is_some_and(|rows| rows.iter().any(|r| r["outcome"] == "limited"
                && r["error"]
                    .as_str()
                    .unwrap_or("")
                    .contains("connection limit"))),
        "no limited row in the request log"
    );
    let out = socks5_attempt(
        c.addrs.socks,
        &c.user,
        &c.pass,
        1,
        &SocksTarget::V4([127, 0, 0, 1].into(), site.port()),
        Duration::from_secs(5),
    );
    assert_eq!(out.reply, Some(0x02), "{out:?}");
    drop(held);
    // Slots come back when the transfers end.
    assert_eventually!(
        Duration::from_secs(15),
        code_of(
            &Curl::new()
                .proxy(&c.http_proxy())
                .write_out("%{http_code}")
                .arg("-o")
                .arg("/dev/null")
                .arg(site.url("/hello"))
                .run()
        ) == "200",
        "slots were never released"
    );
}

#[test]
fn targeting_and_sticky_sessions_through_the_username() {
    let c = cluster("plan-targeting", 2);
    let site = FileServer::start("origin", None);
    let api = c.api();
    let (a, b) = (c.agents[0].device_id.clone(), c.agents[1].device_id.clone());
    let r = api.request(
        "PATCH",
        &format!("/api/v1/devices/{a}"),
        Some(&json!({"labels": ["pool-a"], "region": "eu-central"})),
    );
    assert_eq!(r.status, 200);
    std::thread::sleep(Duration::from_secs(6)); // attributes reload every 5 s
    let through = |user: &str| {
        Curl::new()
            .proxy(&c.http_proxy_as(user, &c.pass))
            .write_out("\n%{http_code}")
            .arg(site.url("/hello"))
            .run()
    };
    let requests = |dev: &str| -> i64 {
        api.device(dev).unwrap()["exits"][0]["counters"]["requests"]
            .as_i64()
            .unwrap_or(0)
    };
    let (a0, b0) = (requests(&a), requests(&b));
    for _ in 0..4 {
        let r = through(&format!("{}-label-pool_a", c.user));
        assert!(r.stdout.ends_with("200"), "{r:?}");
    }
    for _ in 0..2 {
        let r = through(&format!("{}-region-eu_central", c.user));
        assert!(r.stdout.ends_with("200"), "{r:?}");
    }
    assert_eq!(
        requests(&a) - a0,
        6,
        "every targeted request went to the labelled device"
    );
    assert_eq!(requests(&b) - b0, 0);

    // Nothing matches: a clear 503; a malformed parameter: 407 saying why.
    // Countries are set by administrators.
    let r = api.request(
        "PATCH",
        &format!("/api/v1/devices/{b}"),
        Some(&json!({"country": "DE"})),
    );
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.json()["country"], "de");
    std::thread::sleep(Duration::from_secs(6));
    let b1 = requests(&b);
    let r = through(&format!("{}-country-de", c.user));
    assert!(r.stdout.ends_with("200"), "{r:?}");
    assert_eq!(
        requests(&b) - b1,
        1,
        "country targeting picked the German device"
    );
    let r = through(&format!("{}-country-fr", c.user));
    assert!(
        r.stdout.ends_with("503") && r.stdout.contains("no available exit matches country=fr"),
        "{r:?}"
    );
    let r = through(&format!("{}-country-de-colour-red", c.user));
    assert!(
        r.stdout.ends_with("407") && r.stdout.contains("unknown parameter"),
        "{r:?}"
    );
    // A wrong password with parameters is still a wrong password.
    let r = Curl::new()
        .proxy(&c.http_proxy_as(&format!("{}-label-pool_a", c.user), "wrong-password"))
        .write_out("\n%{http_code}")
        .arg(site.url("/hello"))
        .run();
    assert!(r.stdout.ends_with("407"), "{r:?}");

    // A sticky session keeps its exit.
    let (a0, b0) = (requests(&a), requests(&b));
    for _ in 0..6 {
        let r = through(&format!("{}-session-s1-ttl-5m", c.user));
        assert!(r.stdout.ends_with("200"), "{r:?}");
    }
    let (da, db) = (requests(&a) - a0, requests(&b) - b0);
    assert!(
        (da, db) == (6, 0) || (da, db) == (0, 6),
        "session moved: {da}/{db}"
    );
}

#[test]
fn usage_and_request_log_add_up() {
    let mut c = cluster("plan-usage", 1);
    set_plan(
        &c,
        json!({"name": "metered", "quota_bytes": 1_000_000_000u64, "log_mode": "host"}),
    );
    let blob = Blob::random(1 << 20, 3);
    let site = FileServer::start("origin", Some(blob.clone()));
    for _ in 0..3 {
        Curl::new()
            .proxy(&c.http_proxy())
            .arg("-o")
            .arg("/dev/null")
            .arg(site.url("/blob"))
            .run()
            .expect_ok("download");
    }
    let cid = customer_id(&c);
    let usage = |c: &Cluster| {
        c.api()
            .get(&format!("/api/v1/customers/{cid}/usage"))
            .json()
    };
    assert_eventually!(
        Duration::from_secs(10),
        usage(&c)["days"][0]["requests"] == 3,
        "{}",
        usage(&c)
    );
    let u = usage(&c);
    let down = u["days"][0]["bytes_down"].as_u64().unwrap();
    assert!((3 << 20..(3 << 20) + 4096).contains(&down), "{u}");
    assert_eq!(u["live"]["threads"], 0, "{u}");
    assert!(
        u["live"]["bytes_this_month"].as_u64().unwrap() >= 3 << 20,
        "{u}"
    );

    // The request log keeps the host only on this plan.
    let log = c
        .api()
        .get(&format!("/api/v1/request-log?customer={cid}"))
        .json();
    let rows = log.as_array().unwrap();
    assert_eq!(rows.len(), 3, "{log}");
    assert!(rows.iter().all(|r| r["outcome"] == "ok"), "{log}");
    assert_eq!(rows[0]["target_host"], "127.0.0.1");
    assert!(rows[0]["target_port"].is_null() && rows[0]["target_path"].is_null());
    let csv = c
        .api()
        .get(&format!("/api/v1/request-log?customer={cid}&format=csv"))
        .text();
    assert_eq!(csv.lines().count(), 4, "{csv}");

    // A graceful stop flushes everything: usage equals what the exit
    // counted, byte for byte, after a restart.
    Curl::new()
        .proxy(&c.http_proxy())
        .arg("-o")
        .arg("/dev/null")
        .arg(site.url("/blob"))
        .run()
        .expect_ok("download");
    assert!(c.terminate_cp(Duration::from_secs(20)), "graceful stop");
    c.restart_cp();
    let u = usage(&c);
    let dev = c.agents[0].device_id.clone();
    let exit = &c.api().device(&dev).unwrap()["exits"][0];
    assert_eq!(u["days"][0]["requests"], 4, "{u}");
    assert_eq!(
        u["days"][0]["bytes_down"], exit["totals"]["bytes_down"],
        "{u} vs {exit}"
    );
    assert_eq!(
        u["days"][0]["bytes_up"], exit["totals"]["bytes_up"],
        "{u} vs {exit}"
    );
}

#[test]
fn quota_cuts_a_long_tunnel_while_it_runs() {
    let c = cluster("plan-quota-mid-flow", 1);
    let quota: u64 = 3_000_000;
    set_plan(&c, json!({"name": "small", "quota_bytes": quota}));
    let blob = Blob::random(20 << 20, 11);
    let site = FileServer::start("origin", Some(blob));
    // One CONNECT tunnel (`-p`) carrying a 20 MB download: before the
    // quota was counted mid-flow it ran to the end.
    let r = Curl::new()
        .proxy(&c.http_proxy())
        .arg("-p")
        .arg("-o")
        .arg("/dev/null")
        .write_out("%{size_download}")
        .max_time(Duration::from_secs(60))
        .arg(site.url("/blob"))
        .run();
    assert_ne!(r.code, 0, "the download was not cut off: {r:?}");
    let got: u64 = r.stdout.trim().parse().expect("size_download");
    // The control plane counts every 64 KiB per flow and a kicked flow
    // relays at most one more read each way (64 KiB up, one batch of QUIC
    // chunks down), so the overshoot is a few hundred KiB; 1 MB leaves
    // room for the origin's response head and scheduling.
    assert!(got < quota + 1_000_000, "received {got} bytes");

    // The next connection is refused with the reason.
    let r = Curl::new()
        .proxy(&c.http_proxy())
        .write_out("\n%{http_code}")
        .arg(site.url("/hello"))
        .run();
    assert!(r.stdout.ends_with("403"), "{r:?}");
    assert!(
        r.stdout.contains("monthly data quota of 3.0 MB used up"),
        "{r:?}"
    );

    // Usage shows the quota used up, and the usage table and the live
    // monthly count agree byte for byte: what was counted while the flow
    // ran was not counted again at its end.
    let cid = customer_id(&c);
    let usage = || {
        c.api()
            .get(&format!("/api/v1/customers/{cid}/usage"))
            .json()
    };
    let table = |u: &Value| {
        u["days"][0]["bytes_up"].as_u64().unwrap_or(0)
            + u["days"][0]["bytes_down"].as_u64().unwrap_or(0)
    };
    assert_eventually!(
        Duration::from_secs(10),
        {
            let u = usage();
            table(&u) > 0 && Some(table(&u)) == u["live"]["bytes_this_month"].as_u64()
        },
        "{}",
        usage()
    );
    let u = usage();
    let used = table(&u);
    assert!((quota..quota + 1_000_000).contains(&used), "{u}");
    assert_eq!(u["live"]["threads"], 0, "{u}");
}
