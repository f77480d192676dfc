//! Editing a plan in place (`PATCH /api/v1/plans/{id}`): the new limits
//! reach the customers on it, and sub-users logged in before the change, on
//! their next connection; bad edits are refused like bad new plans.

use std::time::Duration;

use serde_json::{Value, json};
use tests::{Api, Cluster, ClusterOpts, Curl, FileServer, assert_eventually};

const CP_CONFIG: &str = r#"
[fleet]
counters_flush_secs = 1
"#;

fn cluster(name: &str) -> Cluster {
    Cluster::start(ClusterOpts {
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
        .unwrap_or_else(|| panic!("no customer {}: {list}", c.user))["id"]
        .as_str()
        .unwrap()
        .to_string()
}

fn new_plan(api: &Api, plan: Value) -> String {
    let r = api.post("/api/v1/plans", Some(&plan));
    assert_eq!(r.status, 201, "{}", r.text());
    r.json()["id"].as_str().unwrap().to_string()
}

fn patch(api: &Api, path: &str, body: Value) -> tests::ApiResponse {
    api.request("PATCH", path, Some(&body))
}

/// One request through the HTTP proxy: the body, then the status code.
fn through(c: &Cluster, user: &str, pass: &str, url: &str) -> String {
    Curl::new()
        .proxy(&c.http_proxy_as(user, pass))
        .write_out("\n%{http_code}")
        .arg(url)
        .run()
        .stdout
}

/// Start a long transfer as `user` and return once the origin saw it
/// arrive. A short request just before releases its slot when the proxy
/// sees its connection close, which can trail curl's exit a little: a
/// transfer refused for that is started again.
fn hold(
    c: &Cluster,
    site: &FileServer,
    user: &str,
    pass: &str,
    url: &str,
    name: &str,
) -> tests::CurlRun {
    use std::sync::atomic::Ordering::Relaxed;
    let seen = site.stats.connections.load(Relaxed);
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let mut run = Curl::new()
            .proxy(&c.http_proxy_as(user, pass))
            .arg("-o")
            .arg("/dev/null")
            .max_time(Duration::from_secs(30))
            .arg(url)
            .spawn(c.dir(), name);
        let settled = tests::eventually(Duration::from_secs(3), Duration::from_millis(20), || {
            (site.stats.connections.load(Relaxed) > seen || !run.is_running()).then_some(())
        });
        if settled.is_some() && run.is_running() {
            return run;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "{name} was never admitted"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn raising_the_thread_limit_admits_more_connections_for_the_customer_and_its_sub_user() {
    let c = cluster("plan-edit-threads");
    let api = c.api();
    let site = FileServer::start("origin", None);
    let hello = site.url("/hello");
    let trickle = site.url("/trickle");
    let cid = customer_id(&c);
    let plan = new_plan(&api, json!({"name": "solo", "max_threads": 1}));
    let r = patch(
        &api,
        &format!("/api/v1/customers/{cid}/access"),
        json!({"plan": plan}),
    );
    assert_eq!(r.status, 200, "{}", r.text());
    let r = api.post(
        &format!("/api/v1/customers/{cid}/sub-users"),
        Some(&json!({"username": "edit-team", "password": "team-secret-1"})),
    );
    assert_eq!(r.status, 201, "{}", r.text());
    let (user, pass) = (c.user.clone(), c.pass.clone());
    let (sub, sub_pass) = ("edit-team", "team-secret-1");

    // Both log in before the change (the proxy caches verified logins).
    assert!(through(&c, &user, &pass, &hello).ends_with("200"));
    assert!(through(&c, sub, sub_pass, &hello).ends_with("200"));

    // One long transfer takes the only slot: a second connection is
    // refused, for the customer and for its sub-user alike.
    let mut held = vec![hold(&c, &site, &user, &pass, &trickle, "hold-1")];
    assert_eventually!(
        Duration::from_secs(10),
        through(&c, &user, &pass, &hello).ends_with("429"),
        "the first transfer never took the slot"
    );
    let r = through(&c, sub, sub_pass, &hello);
    assert!(
        r.ends_with("429") && r.contains("connection limit reached: 1 of 1"),
        "{r:?}"
    );

    // Raise the limit to three threads.
    let r = patch(
        &api,
        &format!("/api/v1/plans/{plan}"),
        json!({"max_threads": 3}),
    );
    assert_eq!(r.status, 200, "{}", r.text());
    let edited = r.json();
    assert_eq!(edited["id"], plan.as_str());
    assert_eq!(edited["limits"]["name"], "solo");
    assert_eq!(edited["limits"]["max_threads"], 3);

    // At once, without waiting for the periodic reload: the second and
    // third connections are accepted, through the login the sub-user
    // made before the change and through the customer's.
    let r = through(&c, sub, sub_pass, &hello);
    assert!(r.ends_with("200"), "second connection (sub-user): {r:?}");
    let r = through(&c, &user, &pass, &hello);
    assert!(r.ends_with("200"), "second connection (customer): {r:?}");
    held.push(hold(&c, &site, sub, sub_pass, &trickle, "hold-2"));
    held.push(hold(&c, &site, &user, &pass, &trickle, "hold-3"));
    // Three held: the fourth is refused, with the new limit in the reason.
    assert_eventually!(
        Duration::from_secs(10),
        through(&c, sub, sub_pass, &hello).contains("connection limit reached: 3 of 3"),
        "the second and third transfers were not both admitted"
    );
    let r = through(&c, &user, &pass, &hello);
    assert!(
        r.ends_with("429") && r.contains("3 of 3 concurrent connections"),
        "{r:?}"
    );

    // A change of the parent's access reaches the sub-user's cached login
    // at once: a roomier plan, then disabling the parent.
    let roomy = new_plan(&api, json!({"name": "roomy", "max_threads": 10}));
    let r = patch(
        &api,
        &format!("/api/v1/customers/{cid}/access"),
        json!({"plan": roomy}),
    );
    assert_eq!(r.status, 200, "{}", r.text());
    let r = through(&c, sub, sub_pass, &hello);
    assert!(
        r.ends_with("200"),
        "sub-user after its parent's new plan: {r:?}"
    );
    let r = patch(
        &api,
        &format!("/api/v1/customers/{cid}/access"),
        json!({"disabled": true}),
    );
    assert_eq!(r.status, 200, "{}", r.text());
    let r = through(&c, sub, sub_pass, &hello);
    assert!(r.ends_with("407"), "sub-user of a disabled parent: {r:?}");
    drop(held);
}

#[test]
fn bad_edits_are_refused_with_the_reason_and_change_nothing() {
    let c = cluster("plan-edit-errors");
    let api = c.api();
    let plan = new_plan(
        &api,
        json!({"name": "basic", "max_threads": 2, "quota_bytes": 1_000_000}),
    );
    new_plan(&api, json!({"name": "other"}));
    let path = format!("/api/v1/plans/{plan}");
    let error_of = |r: &tests::ApiResponse| {
        r.json()["error"]["message"]
            .as_str()
            .unwrap_or_default()
            .to_string()
    };
    for (body, status, says) in [
        (json!({"max_threads": -1}), 400, "max_threads"),
        (json!({"threads": 3}), 400, "unknown field `threads`"),
        (
            json!({"new_conn_per_sec": 0}),
            400,
            "new_conn_per_sec must be greater than zero",
        ),
        (json!({"strategy": "fastest"}), 400, "strategy must be"),
        (
            json!({"allowed_ports": [[90, 80]]}),
            400,
            "port range 90-80",
        ),
        (json!({"name": "no spaces"}), 400, "name must be"),
        (json!({"name": null}), 400, "name cannot be null"),
        (json!({"name": "other"}), 409, "plan other already exists"),
    ] {
        let r = patch(&api, &path, body.clone());
        assert_eq!(r.status, status, "{body}: {}", r.text());
        assert!(error_of(&r).contains(says), "{body}: {}", r.text());
    }
    let plans = api.get("/api/v1/plans").json();
    let basic = plans
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["id"] == plan.as_str())
        .unwrap()
        .clone();
    assert_eq!(basic["limits"]["name"], "basic", "{basic}");
    assert_eq!(basic["limits"]["max_threads"], 2, "{basic}");

    // By name; `null` removes a limit, a missing field keeps its value.
    let r = patch(
        &api,
        "/api/v1/plans/basic",
        json!({"quota_bytes": null, "name": "basic-2"}),
    );
    assert_eq!(r.status, 200, "{}", r.text());
    let p = r.json();
    assert_eq!(p["limits"]["quota_bytes"], Value::Null, "{p}");
    assert_eq!(p["limits"]["max_threads"], 2, "{p}");
    assert_eq!(p["limits"]["name"], "basic-2", "{p}");

    let r = patch(&api, "/api/v1/plans/plan-000000000000", json!({}));
    assert_eq!(r.status, 404, "{}", r.text());
    for token in [None, Some("not-the-admin-token")] {
        let r =
            Api::new(c.addrs.api, token).request("PATCH", &path, Some(&json!({"max_threads": 9})));
        assert_eq!(r.status, 401, "{token:?}: {}", r.text());
    }
    let plans = api.get("/api/v1/plans").json();
    assert!(
        plans
            .as_array()
            .unwrap()
            .iter()
            .any(|p| p["id"] == plan.as_str() && p["limits"]["max_threads"] == 2),
        "{plans}"
    );
}
