//! Extra logins, sub-users and the customer API end to end: credentials and
//! sub-users through the real proxy with curl, API keys on `/api/v1/me`,
//! and one customer never seeing another's data.

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

fn id_of(c: &Cluster, username: &str) -> String {
    let list = c.api().get("/api/v1/customers").json();
    list.as_array()
        .unwrap()
        .iter()
        .find(|x| x["username"] == username)
        .unwrap_or_else(|| panic!("no customer {username}: {list}"))["id"]
        .as_str()
        .unwrap()
        .to_string()
}

fn status_through(c: &Cluster, user: &str, pass: &str, url: &str) -> String {
    Curl::new()
        .proxy(&c.http_proxy_as(user, pass))
        .write_out("\n%{http_code}")
        .arg(url)
        .run()
        .stdout
}

fn new_key(c: &Cluster, customer: &str) -> String {
    let r = c.api().post(
        &format!("/api/v1/customers/{customer}/api-keys"),
        Some(&json!({"label": "test"})),
    );
    assert_eq!(r.status, 201, "{}", r.text());
    let key = r.json()["key"].as_str().unwrap().to_string();
    assert!(key.starts_with("cgk_"), "{key}");
    key
}

fn as_key(c: &Cluster, key: &str) -> Api {
    Api::new(c.addrs.api, Some(key))
}

#[test]
fn credentials_log_in_as_their_owner_and_sub_users_share_its_limits() {
    let c = cluster("accounts-logins");
    let site = FileServer::start("origin", None);
    let api = c.api();
    let alice = id_of(&c, &c.user);

    // An extra login: works through the proxy, counts under its owner.
    let r = api.post(
        &format!("/api/v1/customers/{alice}/credentials"),
        Some(&json!({"username": "alice-scraper", "password": "scraper-secret-1"})),
    );
    assert_eq!(r.status, 201, "{}", r.text());
    let cred = r.json();
    assert!(cred.get("password_hash").is_none(), "{cred}");
    // Taken logins and logins the proxy would parse are refused.
    for (name, want) in [(c.user.as_str(), 409), ("alice-session-x", 400), ("", 400)] {
        let r = api.post(
            &format!("/api/v1/customers/{alice}/credentials"),
            Some(&json!({"username": name, "password": "long-enough-1"})),
        );
        assert_eq!(r.status, want, "{name}: {}", r.text());
    }
    let r = api.post(
        "/api/v1/customers",
        Some(&json!({"username": "alice-scraper", "password": "long-enough-1"})),
    );
    assert_eq!(r.status, 409, "{}", r.text());
    let r = api.post(
        "/api/v1/customers",
        Some(&json!({"username": "eve-country-de", "password": "long-enough-1"})),
    );
    assert_eq!(r.status, 400, "{}", r.text());

    for _ in 0..2 {
        let out = status_through(&c, "alice-scraper", "scraper-secret-1", &site.url("/hello"));
        assert!(out.ends_with("200"), "{out}");
    }
    let out = status_through(&c, "alice-scraper", "wrong-password", &site.url("/hello"));
    assert!(out.ends_with("407"), "{out}");
    let usage = || api.get(&format!("/api/v1/customers/{alice}/usage")).json();
    assert_eventually!(
        Duration::from_secs(10),
        usage()["days"][0]["requests"] == 2,
        "{}",
        usage()
    );
    let log = api
        .get(&format!("/api/v1/request-log?customer={alice}"))
        .json();
    assert!(
        log.as_array()
            .unwrap()
            .iter()
            .any(|r| r["credential"] == "alice-scraper"),
        "{log}"
    );
    let listed = api
        .get(&format!("/api/v1/customers/{alice}/credentials"))
        .json();
    assert_eq!(listed.as_array().unwrap().len(), 1, "{listed}");
    assert!(!listed.to_string().contains("argon2"), "{listed}");
    // Deleted: the login stops working at once.
    let r = api.delete(&format!(
        "/api/v1/credentials/{}",
        cred["id"].as_str().unwrap()
    ));
    assert_eq!(r.status, 204);
    let out = status_through(&c, "alice-scraper", "scraper-secret-1", &site.url("/hello"));
    assert!(out.ends_with("407"), "{out}");

    // A sub-user connects under the parent's plan: one thread between them.
    let r = api.post(
        "/api/v1/plans",
        Some(&json!({"name": "one", "max_threads": 1})),
    );
    assert_eq!(r.status, 201, "{}", r.text());
    let plan = r.json()["id"].as_str().unwrap().to_string();
    let r = api.request(
        "PATCH",
        &format!("/api/v1/customers/{alice}/access"),
        Some(&json!({"plan": plan})),
    );
    assert_eq!(r.status, 200, "{}", r.text());
    let r = api.post(
        &format!("/api/v1/customers/{alice}/sub-users"),
        Some(&json!({"username": "alice-team", "password": "team-secret-1"})),
    );
    assert_eq!(r.status, 201, "{}", r.text());
    let sub = r.json();
    assert_eq!(sub["parent_id"], alice.as_str());
    let r = api.post(
        &format!(
            "/api/v1/customers/{}/sub-users",
            sub["id"].as_str().unwrap()
        ),
        Some(&json!({"username": "deeper", "password": "team-secret-1"})),
    );
    assert_eq!(r.status, 400, "{}", r.text());
    let subs = api
        .get(&format!("/api/v1/customers/{alice}/sub-users"))
        .json();
    assert_eq!(subs.as_array().unwrap().len(), 1, "{subs}");

    let mut held = Curl::new()
        .proxy(&c.http_proxy_as("alice-team", "team-secret-1"))
        .arg("-o")
        .arg("/dev/null")
        .max_time(Duration::from_secs(20))
        .arg(site.url("/trickle"))
        .spawn(c.dir(), "sub-user-hold");
    assert_eventually!(
        Duration::from_secs(10),
        site.stats
            .trickled
            .load(std::sync::atomic::Ordering::Relaxed)
            > 0,
        "the sub-user's transfer never started"
    );
    let out = status_through(&c, &c.user, &c.pass, &site.url("/hello"));
    assert!(
        out.ends_with("429") && out.contains("connection limit reached: 1 of 1"),
        "{out}"
    );
    drop(held.wait(Duration::from_secs(25)));
}

#[test]
fn the_customer_api_shows_each_customer_only_its_own_data() {
    let c = cluster("accounts-me");
    let site = FileServer::start("origin", None);
    let api = c.api();
    let alice = id_of(&c, &c.user);
    let r = api.post(
        "/api/v1/customers",
        Some(&json!({"username": "bob", "password": "bob-secret-1"})),
    );
    assert_eq!(r.status, 201, "{}", r.text());
    let bob = r.json()["id"].as_str().unwrap().to_string();
    let (ka, kb) = (new_key(&c, &alice), new_key(&c, &bob));
    let keys = api
        .get(&format!("/api/v1/customers/{alice}/api-keys"))
        .json();
    assert_eq!(keys.as_array().unwrap().len(), 1, "{keys}");
    assert!(
        !keys.to_string().contains(&ka),
        "the key is shown once only"
    );

    // Missing, wrong and admin tokens are all refused on /me.
    for token in [
        None,
        Some("cgk_wrong"),
        Some(c.admin_token.as_str()),
        Some("garbage"),
    ] {
        let r = Api::new(c.addrs.api, token).get("/api/v1/me");
        assert_eq!(r.status, 401, "{token:?}: {}", r.text());
    }
    // And a customer key opens no admin route.
    assert_eq!(as_key(&c, &ka).get("/api/v1/customers").status, 401);

    let me = as_key(&c, &ka).get("/api/v1/me");
    assert_eq!(me.status, 200, "{}", me.text());
    assert_eq!(me.json()["id"], alice.as_str());
    assert_eq!(me.json()["username"], c.user.as_str());
    assert_eq!(as_key(&c, &kb).get("/api/v1/me").json()["id"], bob.as_str());

    // Alice opens a sticky session and uses the proxy.
    let out = status_through(
        &c,
        &format!("{}-session-s1", c.user),
        &c.pass,
        &site.url("/hello"),
    );
    assert!(out.ends_with("200"), "{out}");
    let sessions = as_key(&c, &ka).get("/api/v1/me/sessions").json();
    assert_eq!(sessions[0]["session"], "s1", "{sessions}");
    assert_eq!(
        sessions[0]["device"],
        c.agents[0].name.as_str(),
        "{sessions}"
    );

    // Bob sees none of it and cannot touch it.
    let kb_api = as_key(&c, &kb);
    assert_eq!(kb_api.get("/api/v1/me/sessions").json(), json!([]));
    assert_eq!(
        kb_api.post("/api/v1/me/sessions/s1/rotate", None).status,
        404
    );
    assert_eq!(kb_api.delete("/api/v1/me/sessions/s1").status, 404);
    assert_eventually!(
        Duration::from_secs(10),
        as_key(&c, &ka).get("/api/v1/me/usage").json()["days"][0]["requests"] == 1,
        "{}",
        as_key(&c, &ka).get("/api/v1/me/usage").json()
    );
    let ub = kb_api.get("/api/v1/me/usage").json();
    assert_eq!(ub["customer_id"], bob.as_str(), "{ub}");
    assert_eq!(ub["days"], json!([]), "{ub}");
    assert_eq!(
        as_key(&c, &ka).get("/api/v1/me/sessions").json()[0]["session"],
        "s1",
        "alice's session survived bob"
    );

    // Alice rotates her own session (this exit has no rotation backend, so
    // the answer is a refusal, not "no such session"), then releases it.
    let r = as_key(&c, &ka).post("/api/v1/me/sessions/s1/rotate", None);
    assert_ne!(r.status, 404, "{}", r.text());
    assert_eq!(r.json()["ok"], false, "{}", r.text());
    assert!(!r.text().contains(&c.agents[0].device_id), "{}", r.text());
    assert_eq!(as_key(&c, &ka).delete("/api/v1/me/sessions/s1").status, 204);
    assert_eq!(as_key(&c, &ka).get("/api/v1/me/sessions").json(), json!([]));

    // The exits the plan allows, as JSON and as text.
    let exits: Value = as_key(&c, &ka).get("/api/v1/me/exits").json();
    assert_eq!(exits.as_array().unwrap().len(), 1, "{exits}");
    assert_eq!(exits[0]["device"], c.agents[0].name.as_str(), "{exits}");
    let text = as_key(&c, &kb).get("/api/v1/me/exits?format=text");
    assert_eq!(text.status, 200);
    let line = text.text();
    let want = format!(
        "{}/{} ",
        exits[0]["device"].as_str().unwrap(),
        exits[0]["exit"].as_str().unwrap()
    );
    assert!(
        line.starts_with(&want) && line.lines().count() == 1,
        "{line:?}"
    );

    // A revoked key stops working.
    let id = api.get(&format!("/api/v1/customers/{bob}/api-keys")).json()[0]["id"]
        .as_str()
        .unwrap()
        .to_string();
    assert_eq!(api.delete(&format!("/api/v1/api-keys/{id}")).status, 204);
    assert_eq!(kb_api.get("/api/v1/me").status, 401);
}
