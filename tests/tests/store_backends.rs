//! The control plane's store on both backends: every scenario runs once on
//! SQLite (a file in a temporary directory) and once on PostgreSQL (a fresh
//! database on this process's throwaway cluster), through the public
//! `Store` API only.

use std::time::Duration;

use control_plane::registry::Counters;
use control_plane::store::{
    Backend, DevicePatch, DeviceRotation, DeviceSeen, LabelRotation, LinkUse, RotationRow, Store,
    StoreError, SubUserError, now_ms,
};
use shared::wire::{ExitInfo, ExitStatus, Heartbeat, Registration, Telemetry};
use tests::{Postgres, TempDir};

/// A store on a fresh database of one backend.
struct TestDb {
    store: Store,
    url: String,
    // Dropped after the store: SQLite's files live here.
    _dir: Option<TempDir>,
}

impl TestDb {
    async fn new(backend: Backend, label: &str) -> TestDb {
        let (url, dir) = match backend {
            Backend::Sqlite => {
                let dir = TempDir::new(&format!("store-{label}"));
                let url = format!("sqlite://{}", dir.join("cellgate.db").display());
                (url, Some(dir))
            }
            Backend::Postgres => {
                let label = label.to_string();
                let url =
                    tokio::task::spawn_blocking(move || Postgres::shared().create_database(&label))
                        .await
                        .unwrap();
                (url, None)
            }
        };
        let store = Store::connect(&url, None).await.unwrap();
        assert_eq!(store.backend(), backend);
        TestDb {
            store,
            url,
            _dir: dir,
        }
    }

    /// Another store on the same database, like a second control plane.
    async fn second(&self) -> Store {
        Store::connect(&self.url, None).await.unwrap()
    }
}

/// Each scenario as a test per backend: `sqlite::NAME`, `postgres::NAME`.
macro_rules! on_both_backends {
    ($($name:ident),* $(,)?) => {
        mod sqlite {
            $(
                #[tokio::test]
                async fn $name() {
                    super::$name(super::Backend::Sqlite).await
                }
            )*
        }
        mod postgres {
            $(
                #[tokio::test]
                async fn $name() {
                    super::$name(super::Backend::Postgres).await
                }
            )*
        }
    };
}

on_both_backends!(
    admin_tokens,
    enroll_tokens_work_once_and_expire,
    racing_enrollments_spend_a_token_once,
    devices_crud_and_patch,
    customers,
    exits_upsert_and_counters,
    rotations_and_ip_history,
    rotation_links,
    label_rotation,
    telemetry_round_trip_and_prune,
    two_stores_share_one_database,
    exit_ports_assign_keep_and_release,
    racing_port_assignments_get_distinct_ports,
    credentials_share_the_login_namespace,
    sub_users_hang_off_one_parent,
    api_keys_by_hash,
    allow_lists_per_customer,
    bans_upsert_expire_and_lift,
    webhook_urls,
);

/// The harness itself: a cluster of its own stops on drop and leaves no
/// directory or listener behind.
#[test]
fn a_dropped_cluster_stops_and_leaves_nothing() {
    let pg = Postgres::start();
    let dir = pg.dir().expect("a local cluster").to_path_buf();
    let port = pg.port();
    let url = pg.create_database("drop check");
    assert!(
        url.contains(&format!("127.0.0.1:{port}/cg_drop_check_")),
        "{url}"
    );
    assert_eq!(pg.psql("SELECT 1 + 1"), "2");
    let started = std::time::Instant::now();
    drop(pg);
    eprintln!("stopped in {:?}", started.elapsed());
    assert!(!dir.exists(), "{} left behind", dir.display());
    assert!(std::net::TcpStream::connect(("127.0.0.1", port)).is_err());
}

fn seen(addr: &str) -> DeviceSeen {
    DeviceSeen {
        kind: "linux".into(),
        model: "Raspberry Pi 4".into(),
        hostname: "pi-01".into(),
        agent_version: "0.1.0".into(),
        operator: String::new(),
        addr: addr.into(),
    }
}

/// Enroll a device `id` (fingerprint `fp-ID`) through a fresh token.
async fn enrolled(s: &Store, id: &str) {
    let hash = format!("hash-{id}");
    s.insert_enroll_token(&format!("tok-{id}"), id, &hash, now_ms() + 60_000)
        .await
        .unwrap();
    let name = s
        .enroll_device(&hash, id, &format!("fp-{id}"), &seen("10.0.0.1:1"))
        .await
        .unwrap();
    assert_eq!(name.as_deref(), Some(id));
}

fn exit(name: &str, method: &str, ladder: &[&str]) -> ExitInfo {
    ExitInfo {
        name: name.into(),
        interface: Some(format!("wwan-{name}")),
        method: method.into(),
        ladder: ladder.iter().map(|s| s.to_string()).collect(),
    }
}

async fn admin_tokens(b: Backend) {
    let db = TestDb::new(b, "admin").await;
    let s = &db.store;
    assert_eq!(s.admin_token_count().await.unwrap(), 0);
    s.insert_admin_token("a1", "initial", "h1").await.unwrap();
    s.insert_admin_token("a2", "cli", "h2").await.unwrap();
    assert_eq!(s.admin_token_count().await.unwrap(), 2);
    assert!(s.admin_token_exists("h1").await.unwrap());
    assert!(!s.admin_token_exists("nope").await.unwrap());
    // The hash is unique: a second insert is a database error, not a panic.
    assert!(s.insert_admin_token("a3", "dup", "h1").await.is_err());
    s.delete_admin_token("h1").await.unwrap();
    assert!(!s.admin_token_exists("h1").await.unwrap());
    assert_eq!(s.admin_token_count().await.unwrap(), 1);
}

async fn enroll_tokens_work_once_and_expire(b: Backend) {
    let db = TestDb::new(b, "enroll").await;
    let s = &db.store;
    s.insert_enroll_token("t1", "pi-01", "h1", now_ms() + 60_000)
        .await
        .unwrap();
    s.insert_enroll_token("t2", "pi-02", "h2", now_ms() - 1)
        .await
        .unwrap();
    let seen = seen("192.0.2.7:4433");
    let first = s.enroll_device("h1", "dev-a", "fp-a", &seen).await.unwrap();
    assert_eq!(first.as_deref(), Some("pi-01"));
    assert_eq!(
        s.enroll_device("h1", "dev-b", "fp-b", &seen).await.unwrap(),
        None,
        "a token works once"
    );
    assert_eq!(
        s.enroll_device("h2", "dev-c", "fp-c", &seen).await.unwrap(),
        None,
        "an expired token does not work"
    );
    assert_eq!(
        s.enroll_device("nope", "dev-d", "fp-d", &seen)
            .await
            .unwrap(),
        None
    );
    // A device id that exists already: the token is not spent by the
    // failed attempt (the transaction rolls back).
    s.insert_enroll_token("t3", "pi-03", "h3", now_ms() + 60_000)
        .await
        .unwrap();
    assert!(matches!(
        s.enroll_device("h3", "dev-a", "fp-x", &seen).await,
        Err(StoreError::Conflict(_))
    ));
    assert_eq!(
        s.enroll_device("h3", "dev-e", "fp-e", &seen)
            .await
            .unwrap()
            .as_deref(),
        Some("pi-03")
    );
    let devices = s.devices().await.unwrap();
    let ids: Vec<&str> = devices.iter().map(|d| d.id.as_str()).collect();
    assert_eq!(ids, ["dev-a", "dev-e"]);
    let d = &devices[0];
    assert_eq!((d.name.as_str(), d.kind.as_str()), ("pi-01", "linux"));
    assert_eq!(d.model, "Raspberry Pi 4");
    assert!(!d.disabled && !d.maintenance);
    assert_eq!(d.last_addr, None);
    assert_eq!(d.last_seen_at, None);
    assert_eq!(d.labels, Vec::<String>::new());
    assert_eq!(
        d.rotation,
        DeviceRotation {
            enabled: true,
            ..DeviceRotation::default()
        }
    );
}

async fn racing_enrollments_spend_a_token_once(b: Backend) {
    let db = TestDb::new(b, "race").await;
    let s = db.store.clone();
    s.insert_enroll_token("t1", "pi-01", "h1", now_ms() + 60_000)
        .await
        .unwrap();
    let tasks: Vec<_> = (0..8)
        .map(|i| {
            let s = s.clone();
            tokio::spawn(async move {
                s.enroll_device("h1", &format!("dev-{i}"), &format!("fp-{i}"), &seen("x"))
                    .await
            })
        })
        .collect();
    let mut granted = 0;
    for t in tasks {
        match t.await.unwrap() {
            Ok(Some(_)) => granted += 1,
            Ok(None) => {}
            // SQLite may refuse a writer that waited too long; never twice.
            Err(e) => panic!("enrollment failed: {e}"),
        }
    }
    assert_eq!(granted, 1);
    assert_eq!(s.devices().await.unwrap().len(), 1);
}

async fn devices_crud_and_patch(b: Backend) {
    let db = TestDb::new(b, "devices").await;
    let s = &db.store;
    enrolled(s, "dev-a").await;
    enrolled(s, "dev-b").await;

    let mut facts = seen("198.51.100.4:50000");
    facts.operator = "Vodafone".into();
    facts.agent_version = "0.2.0".into();
    s.device_connected("dev-a", &facts).await.unwrap();
    s.device_connected("dev-a", &facts).await.unwrap();
    let a = s.device("dev-a").await.unwrap().unwrap();
    assert_eq!(a.connects, 2);
    assert_eq!(a.last_addr.as_deref(), Some("198.51.100.4:50000"));
    assert_eq!(a.operator, "Vodafone");
    assert_eq!(a.agent_version, "0.2.0");
    assert!(a.last_seen_at.unwrap() >= a.created_at);
    s.device_seen("dev-a", "198.51.100.4:50001").await.unwrap();
    let a = s.device_by_fingerprint("fp-dev-a").await.unwrap().unwrap();
    assert_eq!(a.last_addr.as_deref(), Some("198.51.100.4:50001"));
    assert!(s.device_by_fingerprint("fp-none").await.unwrap().is_none());

    let patch = DevicePatch {
        name: Some("roof-modem".into()),
        region: Some("eu-west".into()),
        labels: Some(vec!["de".into(), "lte".into()]),
        maintenance: Some(true),
        country: Some("DE".into()),
    };
    assert!(s.patch_device("dev-a", &patch).await.unwrap());
    assert!(!s.patch_device("dev-zzz", &patch).await.unwrap());
    // Fields left out stay as they were.
    let only_name = DevicePatch {
        name: Some("roof".into()),
        ..DevicePatch::default()
    };
    assert!(s.patch_device("dev-a", &only_name).await.unwrap());
    let a = s.device("dev-a").await.unwrap().unwrap();
    assert_eq!(a.name, "roof");
    assert_eq!(a.region, "eu-west");
    assert_eq!(a.labels, ["de", "lte"]);
    assert!(a.maintenance);

    let rot = DeviceRotation {
        enabled: false,
        every_secs: Some(300),
        jitter_secs: None,
        after_requests: Some(5_000_000_000),
    };
    assert!(s.set_device_rotation("dev-a", &rot).await.unwrap());
    assert!(!s.set_device_rotation("dev-zzz", &rot).await.unwrap());
    assert_eq!(s.device("dev-a").await.unwrap().unwrap().rotation, rot);

    assert!(s.set_device_disabled("dev-b", true).await.unwrap());
    assert!(s.device("dev-b").await.unwrap().unwrap().disabled);
    assert!(s.set_device_disabled("dev-b", false).await.unwrap());
    assert!(!s.device("dev-b").await.unwrap().unwrap().disabled);
    assert!(!s.set_device_disabled("dev-zzz", true).await.unwrap());

    // Deleting a device takes its exits and rotation links with it.
    s.upsert_exits("dev-a", &[exit("lte0", "at", &["pdp"])])
        .await
        .unwrap();
    s.insert_rotation_link("l1", "dev-a", "lte0", "lh1", 60)
        .await
        .unwrap();
    assert!(s.delete_device("dev-a").await.unwrap());
    assert!(!s.delete_device("dev-a").await.unwrap());
    assert!(s.device("dev-a").await.unwrap().is_none());
    assert!(s.exits_of("dev-a").await.unwrap().is_empty());
    assert!(s.rotation_links("dev-a").await.unwrap().is_empty());
    assert!(matches!(
        s.use_rotation_link("lh1").await.unwrap(),
        LinkUse::Unknown
    ));
    assert_eq!(s.devices().await.unwrap().len(), 1);
}

async fn customers(b: Backend) {
    let db = TestDb::new(b, "customers").await;
    let s = &db.store;
    let alice = s
        .insert_customer("cus-000000000001", "alice", "$argon2id$a")
        .await
        .unwrap();
    assert!(!alice.disabled);
    assert!(matches!(
        s.insert_customer("cus-000000000002", "alice", "x").await,
        Err(StoreError::Conflict(_))
    ));
    s.insert_customer("cus-000000000003", "bob", "$argon2id$b")
        .await
        .unwrap();
    let all = s.customers().await.unwrap();
    let names: Vec<&str> = all.iter().map(|c| c.username.as_str()).collect();
    assert_eq!(names, ["alice", "bob"]);
    let a = s.customer_by_username("alice").await.unwrap().unwrap();
    assert_eq!(
        (a.id.as_str(), a.password_hash.as_str()),
        ("cus-000000000001", "$argon2id$a")
    );
    assert!(
        s.set_customer_password("alice", "$argon2id$new")
            .await
            .unwrap()
    );
    assert!(!s.set_customer_password("nobody", "x").await.unwrap());
    assert_eq!(
        s.customer_by_username("alice")
            .await
            .unwrap()
            .unwrap()
            .password_hash,
        "$argon2id$new"
    );
    assert_eq!(
        s.delete_customer("cus-000000000001")
            .await
            .unwrap()
            .as_deref(),
        Some("alice")
    );
    assert_eq!(
        s.delete_customer("bob").await.unwrap().as_deref(),
        Some("bob")
    );
    assert_eq!(s.delete_customer("bob").await.unwrap(), None);
    assert!(s.customers().await.unwrap().is_empty());
}

async fn exits_upsert_and_counters(b: Backend) {
    let db = TestDb::new(b, "exits").await;
    let s = &db.store;
    enrolled(s, "dev-a").await;
    let rows = s
        .upsert_exits(
            "dev-a",
            &[
                exit("wwan1", "at", &["pdp", "radio"]),
                exit("wwan0", "none", &[]),
            ],
        )
        .await
        .unwrap();
    let names: Vec<&str> = rows.iter().map(|e| e.name.as_str()).collect();
    assert_eq!(names, ["wwan0", "wwan1"]);
    assert_eq!(rows[1].ladder, ["pdp", "radio"]);
    assert_eq!(rows[1].state, "ready");
    assert_eq!(rows[1].external_ip, None);
    assert_eq!(rows[1].requests, 0);

    // Declared again: the backend changes, nothing is duplicated.
    let rows = s
        .upsert_exits(
            "dev-a",
            &[ExitInfo {
                interface: None,
                ..exit("wwan1", "hilink", &["dataswitch", "reboot"])
            }],
        )
        .await
        .unwrap();
    assert_eq!(rows.len(), 2);
    let w1 = &rows[1];
    assert_eq!(
        (w1.method.as_str(), w1.interface.as_deref()),
        ("hilink", None)
    );
    assert_eq!(w1.ladder, ["dataswitch", "reboot"]);

    s.set_exit_state("dev-a", "wwan1", "failed", Some("no address"))
        .await
        .unwrap();
    let w1 = &s.exits_of("dev-a").await.unwrap()[1];
    assert_eq!(
        (w1.state.as_str(), w1.state_reason.as_deref()),
        ("failed", Some("no address"))
    );
    s.set_exit_state("dev-a", "wwan1", "ready", None)
        .await
        .unwrap();
    assert_eq!(s.exits_of("dev-a").await.unwrap()[1].state_reason, None);

    s.exit_ip_seen("dev-a", "wwan1", "203.0.113.9")
        .await
        .unwrap();
    // Byte counters beyond 32 bits survive (BIGINT on both).
    let d = Counters {
        requests: 3,
        successes: 2,
        failures: 1,
        open_ms_total: 150,
        bytes_up: 5_000_000_000,
        bytes_down: 7,
    };
    s.add_exit_counters("dev-a", "wwan1", &d, Some("203.0.113.9"))
        .await
        .unwrap();
    s.add_exit_counters("dev-a", "wwan1", &d, Some("203.0.113.9"))
        .await
        .unwrap();
    // No address known: the exit counts, no history row does.
    s.add_exit_counters("dev-a", "wwan1", &d, None)
        .await
        .unwrap();
    let w1 = &s.exits_of("dev-a").await.unwrap()[1];
    assert_eq!(w1.external_ip.as_deref(), Some("203.0.113.9"));
    assert!(w1.ip_checked_at.is_some());
    assert_eq!(
        (w1.requests, w1.successes, w1.failures, w1.open_ms_total),
        (9, 6, 3, 450)
    );
    assert_eq!((w1.bytes_up, w1.bytes_down), (15_000_000_000, 21));
    let hist = s.ip_history("dev-a", 10).await.unwrap();
    assert_eq!(hist.len(), 1);
    assert_eq!(
        (hist[0].exit.as_str(), hist[0].ip.as_str(), hist[0].requests),
        ("wwan1", "203.0.113.9", 6)
    );
}

async fn rotations_and_ip_history(b: Backend) {
    let db = TestDb::new(b, "rotations").await;
    let s = &db.store;
    enrolled(s, "dev-a").await;
    enrolled(s, "dev-b").await;
    s.upsert_exits("dev-a", &[exit("lte0", "at", &["pdp", "radio"])])
        .await
        .unwrap();
    for ip in ["203.0.113.1", "203.0.113.2", "203.0.113.3"] {
        s.exit_ip_seen("dev-a", "lte0", ip).await.unwrap();
        // last_seen is in milliseconds: keep the order unambiguous.
        tokio::time::sleep(Duration::from_millis(3)).await;
    }
    // Seen again: moves to the front, still one row.
    s.exit_ip_seen("dev-a", "lte0", "203.0.113.1")
        .await
        .unwrap();
    assert_eq!(
        s.recent_ips("dev-a", "lte0", 2).await.unwrap(),
        ["203.0.113.1", "203.0.113.3"]
    );
    assert_eq!(s.ip_history("dev-a", 10).await.unwrap().len(), 3);
    assert!(s.recent_ips("dev-a", "other", 5).await.unwrap().is_empty());

    let base = now_ms();
    let record = |id: &str, device: &str, started: i64, ok: bool| RotationRow {
        id: id.into(),
        device_id: device.into(),
        exit: "lte0".into(),
        cause: "api".into(),
        method: "at".into(),
        rungs: if ok {
            vec!["pdp".into()]
        } else {
            vec!["pdp".into(), "radio".into()]
        },
        attempts: if ok { 1 } else { 2 },
        old_ip: Some("203.0.113.1".into()),
        new_ip: ok.then(|| "203.0.113.4".into()),
        outcome: if ok { "success" } else { "failed" }.into(),
        error: (!ok).then(|| "address did not change".into()),
        drain_ms: 10,
        backend_ms: 2_000,
        duration_ms: 2_500,
        started_at: started,
        finished_at: started + 2_500,
    };
    s.insert_rotation(&record("r1", "dev-a", base, true))
        .await
        .unwrap();
    s.insert_rotation(&record("r2", "dev-a", base + 10_000, false))
        .await
        .unwrap();
    s.insert_rotation(&record("r3", "dev-b", base + 20_000, true))
        .await
        .unwrap();
    let mine = s.rotations(Some("dev-a"), 10).await.unwrap();
    let ids: Vec<&str> = mine.iter().map(|r| r.id.as_str()).collect();
    assert_eq!(ids, ["r2", "r1"]);
    let failed = &mine[0];
    assert_eq!(failed.rungs, ["pdp", "radio"]);
    assert_eq!(failed.new_ip, None);
    assert_eq!(failed.error.as_deref(), Some("address did not change"));
    assert_eq!(mine[1].new_ip.as_deref(), Some("203.0.113.4"));
    let all = s.rotations(None, 2).await.unwrap();
    let ids: Vec<&str> = all.iter().map(|r| r.id.as_str()).collect();
    assert_eq!(ids, ["r3", "r2"]);
    // The exit remembers its last rotation.
    let lte0 = &s.exits_of("dev-a").await.unwrap()[0];
    assert_eq!(lte0.last_rotation_at, Some(base + 12_500));
    // Ids are unique.
    assert!(
        s.insert_rotation(&record("r1", "dev-a", base, true))
            .await
            .is_err()
    );
}

async fn rotation_links(b: Backend) {
    let db = TestDb::new(b, "links").await;
    let s = &db.store;
    enrolled(s, "dev-a").await;
    let l1 = s
        .insert_rotation_link("l1", "dev-a", "lte0", "lh1", 60)
        .await
        .unwrap();
    assert_eq!((l1.uses, l1.last_used_at), (0, None));
    s.insert_rotation_link("l2", "dev-a", "lte0", "lh2", 0)
        .await
        .unwrap();

    match s.use_rotation_link("lh1").await.unwrap() {
        LinkUse::Granted {
            device_id,
            exit,
            used_at,
            previous_use,
        } => {
            assert_eq!((device_id.as_str(), exit.as_str()), ("dev-a", "lte0"));
            assert_eq!(previous_use, None);
            // A use whose rotation could not start is refunded: the link
            // is free again and the count is back.
            s.refund_rotation_link("lh1", used_at, previous_use)
                .await
                .unwrap();
            let links = s.rotation_links("dev-a").await.unwrap();
            let l = links.iter().find(|l| l.id == "l1").unwrap();
            assert_eq!((l.uses, l.last_used_at), (0, None));
        }
        other => panic!("first use: {other:?}"),
    }
    assert!(matches!(
        s.use_rotation_link("lh1").await.unwrap(),
        LinkUse::Granted { .. }
    ));
    match s.use_rotation_link("lh1").await.unwrap() {
        LinkUse::TooSoon { retry_after_ms } => {
            assert!(
                (55_000..=60_000).contains(&retry_after_ms),
                "{retry_after_ms}"
            )
        }
        other => panic!("second use within the interval: {other:?}"),
    }
    // No interval: every use passes.
    for _ in 0..2 {
        assert!(matches!(
            s.use_rotation_link("lh2").await.unwrap(),
            LinkUse::Granted { .. }
        ));
    }
    assert!(matches!(
        s.use_rotation_link("unknown").await.unwrap(),
        LinkUse::Unknown
    ));
    let links = s.rotation_links("dev-a").await.unwrap();
    let uses: Vec<(&str, i64, bool)> = links
        .iter()
        .map(|l| (l.id.as_str(), l.uses, l.last_used_at.is_some()))
        .collect();
    assert_eq!(uses, [("l1", 1, true), ("l2", 2, true)]);
    assert!(s.delete_rotation_link("l1").await.unwrap());
    assert!(!s.delete_rotation_link("l1").await.unwrap());
    assert!(matches!(
        s.use_rotation_link("lh1").await.unwrap(),
        LinkUse::Unknown
    ));
}

async fn label_rotation(b: Backend) {
    let db = TestDb::new(b, "labels").await;
    let s = &db.store;
    let lte = LabelRotation {
        label: "lte".into(),
        every_secs: Some(600),
        jitter_secs: Some(30),
        after_requests: None,
    };
    let de = LabelRotation {
        label: "de".into(),
        every_secs: None,
        jitter_secs: None,
        after_requests: Some(1000),
    };
    s.set_label_rotation(&lte).await.unwrap();
    s.set_label_rotation(&de).await.unwrap();
    assert_eq!(
        s.label_rotations().await.unwrap(),
        [de.clone(), lte.clone()]
    );
    // Setting again replaces, NULLs included.
    let lte2 = LabelRotation {
        every_secs: None,
        after_requests: Some(50),
        ..lte
    };
    s.set_label_rotation(&lte2).await.unwrap();
    assert_eq!(
        s.label_rotations().await.unwrap(),
        [de.clone(), lte2.clone()]
    );
    assert!(s.delete_label_rotation("de").await.unwrap());
    assert!(!s.delete_label_rotation("de").await.unwrap());
    assert_eq!(s.label_rotations().await.unwrap(), [lte2]);
}

async fn telemetry_round_trip_and_prune(b: Backend) {
    let db = TestDb::new(b, "telemetry").await;
    let s = &db.store;
    enrolled(s, "dev-a").await;
    let full = Telemetry {
        rssi_dbm: Some(-71),
        rsrp_dbm: Some(-101),
        rsrq_db: Some(-10.5),
        sinr_db: Some(13.25),
        signal_bars: Some(4),
        access_tech: Some("LTE".into()),
        band: Some("LTE BAND 3".into()),
        operator: Some("Telekom.de".into()),
        registration: Some(Registration::Roaming),
        cell_id: Some("1A2B3C".into()),
        battery_pct: Some(87),
        charging: Some(false),
        temperature_dc: Some(-55),
    };
    let hb = |t2: Telemetry| Heartbeat {
        active_flows: 12,
        load_centi: 275,
        exits: vec![
            ExitStatus {
                name: "lte0".into(),
                link_up: true,
                telemetry: full.clone(),
            },
            ExitStatus {
                name: "lte1".into(),
                link_up: false,
                telemetry: t2,
            },
        ],
        ..Heartbeat::default()
    };
    let t0 = now_ms() - 10_000;
    s.insert_telemetry("dev-a", &hb(Telemetry::default()), t0)
        .await
        .unwrap();
    let charging = Telemetry {
        charging: Some(true),
        ..Telemetry::default()
    };
    s.insert_telemetry("dev-a", &hb(charging), t0 + 5_000)
        .await
        .unwrap();

    // The device takes its operator from the first exit that knows one.
    assert_eq!(
        s.device("dev-a").await.unwrap().unwrap().operator,
        "Telekom.de"
    );

    let rows = s.telemetry("dev-a", 0, 100).await.unwrap();
    assert_eq!(rows.len(), 4);
    // Oldest first.
    let order: Vec<(i64, &str)> = rows.iter().map(|r| (r.at - t0, r.exit.as_str())).collect();
    assert_eq!(
        order,
        [(0, "lte0"), (0, "lte1"), (5_000, "lte0"), (5_000, "lte1")]
    );
    let r = &rows[0];
    assert!(r.link_up);
    assert_eq!((r.rssi_dbm, r.rsrp_dbm), (Some(-71), Some(-101)));
    assert_eq!((r.rsrq_db, r.sinr_db), (Some(-10.5), Some(13.25)));
    assert_eq!(r.signal_bars, Some(4));
    assert_eq!(r.access_tech.as_deref(), Some("LTE"));
    assert_eq!(r.band.as_deref(), Some("LTE BAND 3"));
    assert_eq!(r.registration.as_deref(), Some("roaming"));
    assert_eq!(r.cell_id.as_deref(), Some("1A2B3C"));
    assert_eq!((r.battery_pct, r.charging), (Some(87), Some(false)));
    assert_eq!(r.temperature_c, Some(-5.5));
    assert_eq!((r.active_flows, r.load), (12, 2.75));
    // An exit that reports nothing stores NULLs and reads back as None.
    let empty = &rows[1];
    assert!(!empty.link_up);
    assert_eq!((empty.rssi_dbm, empty.rsrq_db), (None, None));
    assert_eq!((empty.charging, empty.temperature_c), (None, None));
    assert_eq!(
        (empty.access_tech.as_deref(), empty.registration.as_deref()),
        (None, None)
    );
    assert_eq!(rows[3].charging, Some(true));

    // `since` and `limit`: the newest samples, still oldest first.
    let newest = s.telemetry("dev-a", 0, 2).await.unwrap();
    assert!(newest.iter().all(|r| r.at == t0 + 5_000));
    assert_eq!(s.telemetry("dev-a", t0 + 1, 100).await.unwrap().len(), 2);
    assert!(s.telemetry("dev-b", 0, 100).await.unwrap().is_empty());

    assert_eq!(s.prune_telemetry(t0 + 1).await.unwrap(), 2);
    assert_eq!(s.telemetry("dev-a", 0, 100).await.unwrap().len(), 2);
    assert_eq!(s.prune_telemetry(t0 + 1).await.unwrap(), 0);
}

async fn two_stores_share_one_database(b: Backend) {
    let db = TestDb::new(b, "shared").await;
    // Both open (and migrate) the same database concurrently, like two
    // control planes starting together.
    let (x, y) = tokio::join!(db.second(), db.second());
    enrolled(&x, "dev-a").await;
    y.insert_customer("cus-000000000001", "alice", "h")
        .await
        .unwrap();
    assert_eq!(db.store.devices().await.unwrap().len(), 1);
    assert!(x.customer_by_username("alice").await.unwrap().is_some());
    // A rotation link is rate-limited across stores, not per store.
    x.insert_rotation_link("l1", "dev-a", "lte0", "lh1", 60)
        .await
        .unwrap();
    assert!(matches!(
        x.use_rotation_link("lh1").await.unwrap(),
        LinkUse::Granted { .. }
    ));
    assert!(matches!(
        y.use_rotation_link("lh1").await.unwrap(),
        LinkUse::TooSoon { .. }
    ));
    x.close().await;
    y.close().await;
}

/// Port per exit: lowest free port first, kept, freed with the device.
async fn exit_ports_assign_keep_and_release(b: Backend) {
    let db = TestDb::new(b, "exit ports").await;
    let s = &db.store;
    enrolled(s, "dev-a").await;
    enrolled(s, "dev-b").await;
    assert_eq!(
        s.assign_exit_port("dev-a", "lte0", 4000, 4002)
            .await
            .unwrap(),
        Some(4000)
    );
    assert_eq!(
        s.assign_exit_port("dev-a", "lte1", 4000, 4002)
            .await
            .unwrap(),
        Some(4001)
    );
    assert_eq!(
        s.assign_exit_port("dev-b", "lte0", 4000, 4002)
            .await
            .unwrap(),
        Some(4002)
    );
    // Kept on later calls, and by another store on the same database.
    assert_eq!(
        s.assign_exit_port("dev-a", "lte0", 4000, 4002)
            .await
            .unwrap(),
        Some(4000)
    );
    let other = db.second().await;
    assert_eq!(
        other
            .assign_exit_port("dev-b", "lte0", 4000, 4002)
            .await
            .unwrap(),
        Some(4002)
    );
    other.close().await;
    // The range is full.
    enrolled(s, "dev-c").await;
    assert_eq!(
        s.assign_exit_port("dev-c", "lte0", 4000, 4002)
            .await
            .unwrap(),
        None
    );
    let ports: Vec<(u16, String, String)> = s
        .exit_ports()
        .await
        .unwrap()
        .into_iter()
        .map(|r| (r.port, r.device_id, r.exit_name))
        .collect();
    assert_eq!(
        ports,
        vec![
            (4000, "dev-a".into(), "lte0".into()),
            (4001, "dev-a".into(), "lte1".into()),
            (4002, "dev-b".into(), "lte0".into()),
        ]
    );
    // Releasing a device frees its ports; the lowest is taken again.
    assert_eq!(s.release_exit_ports("dev-a").await.unwrap(), 2);
    assert_eq!(
        s.assign_exit_port("dev-c", "lte0", 4000, 4002)
            .await
            .unwrap(),
        Some(4000)
    );
    // Deleting a device frees them too.
    assert!(s.delete_device("dev-b").await.unwrap());
    assert!(s.exit_port("dev-b", "lte0").await.unwrap().is_none());
    // A port outside a changed range is replaced by one inside it.
    assert_eq!(
        s.assign_exit_port("dev-c", "lte0", 5000, 5009)
            .await
            .unwrap(),
        Some(5000)
    );
    assert_eq!(s.exit_ports().await.unwrap().len(), 1);
    // An unknown device gets no port.
    assert!(
        s.assign_exit_port("dev-x", "lte0", 5000, 5009)
            .await
            .is_err()
    );
}

/// Two control planes giving ports at once never give one port twice.
async fn racing_port_assignments_get_distinct_ports(b: Backend) {
    let db = TestDb::new(b, "racing ports").await;
    enrolled(&db.store, "dev-a").await;
    let (x, y) = (db.second().await, db.second().await);
    let mut set = tokio::task::JoinSet::new();
    for i in 0..8 {
        let s = if i % 2 == 0 { x.clone() } else { y.clone() };
        // Each exit asked for by both stores.
        let exit = format!("e{}", i / 2);
        set.spawn(async move {
            (
                exit.clone(),
                s.assign_exit_port("dev-a", &exit, 7000, 7099).await,
            )
        });
    }
    let mut got: std::collections::HashMap<String, u16> = Default::default();
    while let Some(r) = set.join_next().await {
        let (exit, port) = r.unwrap();
        let port = port.unwrap().expect("a free port");
        if let Some(earlier) = got.insert(exit.clone(), port) {
            assert_eq!(earlier, port, "{exit} given two ports");
        }
    }
    let mut ports: Vec<u16> = db
        .store
        .exit_ports()
        .await
        .unwrap()
        .iter()
        .map(|r| r.port)
        .collect();
    ports.sort();
    assert_eq!(ports, vec![7000, 7001, 7002, 7003]);
    x.close().await;
    y.close().await;
}

async fn credentials_share_the_login_namespace(b: Backend) {
    let db = TestDb::new(b, "credentials").await;
    let s = &db.store;
    s.insert_customer("cus-000000000001", "alice", "$argon2id$a")
        .await
        .unwrap();
    s.insert_customer("cus-000000000002", "bob", "$argon2id$b")
        .await
        .unwrap();
    let k = s
        .insert_credential("crd-1", "cus-000000000001", "alice-scraper", "$argon2id$k")
        .await
        .unwrap()
        .unwrap();
    assert_eq!(k.customer_id, "cus-000000000001");
    // A login is unique across customers and credentials, both ways.
    for taken in ["alice-scraper", "bob"] {
        assert!(
            matches!(
                s.insert_credential("crd-2", "cus-000000000002", taken, "x")
                    .await,
                Err(StoreError::Conflict(_))
            ),
            "{taken}"
        );
    }
    assert!(matches!(
        s.insert_account("cus-000000000009", "alice-scraper", "x", None)
            .await,
        Err(SubUserError::Store(StoreError::Conflict(_)))
    ));
    assert_eq!(
        s.insert_credential("crd-3", "cus-nobody", "carol", "x")
            .await
            .unwrap(),
        None
    );
    let (owner, hash) = s
        .credential_by_username("alice-scraper")
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        (owner.id.as_str(), hash.as_str()),
        ("cus-000000000001", "$argon2id$k")
    );
    assert!(s.credential_by_username("alice").await.unwrap().is_none());
    assert_eq!(s.credentials_of("cus-000000000001").await.unwrap(), [k]);
    assert!(
        s.credentials_of("cus-000000000002")
            .await
            .unwrap()
            .is_empty()
    );
    assert_eq!(
        s.delete_credential("crd-1").await.unwrap().as_deref(),
        Some("alice-scraper")
    );
    assert_eq!(s.delete_credential("crd-1").await.unwrap(), None);
    // Deleting the owner deletes its credentials.
    s.insert_credential("crd-4", "cus-000000000002", "bob-2", "x")
        .await
        .unwrap()
        .unwrap();
    s.delete_customer("bob").await.unwrap();
    assert!(s.credential_by_username("bob-2").await.unwrap().is_none());
}

async fn sub_users_hang_off_one_parent(b: Backend) {
    let db = TestDb::new(b, "sub-users").await;
    let s = &db.store;
    s.insert_customer("cus-000000000001", "alice", "x")
        .await
        .unwrap();
    let sub = s
        .insert_account(
            "cus-000000000002",
            "alice-team",
            "y",
            Some("cus-000000000001"),
        )
        .await
        .unwrap();
    assert_eq!(sub.parent_id.as_deref(), Some("cus-000000000001"));
    assert!(matches!(
        s.insert_account("cus-000000000003", "deeper", "z", Some("cus-000000000002"))
            .await,
        Err(SubUserError::ParentIsSubUser)
    ));
    assert!(matches!(
        s.insert_account("cus-000000000004", "orphan", "z", Some("cus-nobody"))
            .await,
        Err(SubUserError::NoParent)
    ));
    assert!(matches!(
        s.insert_account(
            "cus-000000000005",
            "alice-team",
            "z",
            Some("cus-000000000001")
        )
        .await,
        Err(SubUserError::Store(StoreError::Conflict(_)))
    ));
    let subs = s.sub_users("cus-000000000001").await.unwrap();
    assert_eq!(subs.len(), 1);
    assert_eq!(subs[0].username, "alice-team");
    assert!(s.sub_users("cus-000000000002").await.unwrap().is_empty());
    let row = s.customer_by_id("cus-000000000002").await.unwrap().unwrap();
    assert_eq!(row.parent_id.as_deref(), Some("cus-000000000001"));
}

async fn api_keys_by_hash(b: Backend) {
    let db = TestDb::new(b, "api-keys").await;
    let s = &db.store;
    s.insert_customer("cus-000000000001", "alice", "x")
        .await
        .unwrap();
    let k = s
        .insert_api_key("key-1", "cus-000000000001", "laptop", "h1")
        .await
        .unwrap()
        .unwrap();
    assert_eq!(k.last_used_at, None);
    assert_eq!(
        s.insert_api_key("key-2", "cus-nobody", "x", "h2")
            .await
            .unwrap(),
        None
    );
    assert!(matches!(
        s.insert_api_key("key-3", "cus-000000000001", "dup", "h1")
            .await,
        Err(StoreError::Conflict(_))
    ));
    let before = now_ms();
    let c = s.customer_by_api_key("h1").await.unwrap().unwrap();
    assert_eq!(c.id, "cus-000000000001");
    assert!(s.customer_by_api_key("nope").await.unwrap().is_none());
    let listed = s.api_keys_of("cus-000000000001").await.unwrap();
    assert_eq!(listed.len(), 1);
    assert_eq!(listed[0].label, "laptop");
    assert!(listed[0].last_used_at.is_some_and(|t| t >= before));
    assert!(s.delete_api_key("key-1").await.unwrap());
    assert!(!s.delete_api_key("key-1").await.unwrap());
    assert!(s.customer_by_api_key("h1").await.unwrap().is_none());
}

async fn allow_lists_per_customer(b: Backend) {
    let db = TestDb::new(b, "allow-lists").await;
    let s = &db.store;
    s.insert_customer("cus-000000000001", "alice", "x")
        .await
        .unwrap();
    s.insert_customer("cus-000000000002", "bob", "x")
        .await
        .unwrap();
    let row = s
        .add_customer_ip("cus-000000000001", "10.0.0.0/24")
        .await
        .unwrap();
    assert_eq!(row.cidr, "10.0.0.0/24");
    s.add_customer_ip("cus-000000000001", "2001:db8::/32")
        .await
        .unwrap();
    s.add_customer_ip("cus-000000000002", "127.0.0.1/32")
        .await
        .unwrap();
    assert!(matches!(
        s.add_customer_ip("cus-000000000001", "10.0.0.0/24").await,
        Err(StoreError::Conflict(_))
    ));
    let mine: Vec<String> = s
        .customer_ips("cus-000000000001")
        .await
        .unwrap()
        .into_iter()
        .map(|r| r.cidr)
        .collect();
    assert_eq!(mine.len(), 2);
    assert!(mine.contains(&"10.0.0.0/24".to_string()));
    let all: Vec<(String, String)> = s
        .all_customer_ips()
        .await
        .unwrap()
        .into_iter()
        .map(|r| (r.customer_id, r.cidr))
        .collect();
    assert_eq!(all.len(), 3);
    assert!(all.contains(&("cus-000000000002".into(), "127.0.0.1/32".into())));
    assert!(
        s.delete_customer_ip("cus-000000000001", "10.0.0.0/24")
            .await
            .unwrap()
    );
    assert!(
        !s.delete_customer_ip("cus-000000000001", "10.0.0.0/24")
            .await
            .unwrap()
    );
    // Deleting the customer takes its networks along.
    assert!(s.delete_customer("bob").await.unwrap().is_some());
    assert_eq!(s.all_customer_ips().await.unwrap().len(), 1);
}

async fn bans_upsert_expire_and_lift(b: Backend) {
    let db = TestDb::new(b, "bans").await;
    let s = &db.store;
    s.insert_customer("cus-000000000001", "alice", "x")
        .await
        .unwrap();
    s.insert_customer("cus-000000000002", "bob", "x")
        .await
        .unwrap();
    let now = now_ms();
    s.set_ban("cus-000000000001", None, "abuse").await.unwrap();
    s.set_ban("cus-000000000002", Some(now + 60_000), "late payment")
        .await
        .unwrap();
    assert_eq!(s.active_bans(now).await.unwrap().len(), 2);
    // Past its end a ban no longer counts.
    assert_eq!(s.active_bans(now + 120_000).await.unwrap().len(), 1);
    // A second ban replaces the first.
    s.set_ban("cus-000000000001", Some(now + 1_000), "reviewed")
        .await
        .unwrap();
    let bans = s.active_bans(now).await.unwrap();
    let alice = bans
        .iter()
        .find(|b| b.customer_id == "cus-000000000001")
        .unwrap();
    assert_eq!(
        (alice.until_at, alice.reason.as_str()),
        (Some(now + 1_000), "reviewed")
    );
    // Another control plane on the same database sees them.
    let other = db.second().await;
    assert_eq!(other.active_bans(now).await.unwrap().len(), 2);
    assert!(s.lift_ban("cus-000000000001").await.unwrap());
    assert!(!s.lift_ban("cus-000000000001").await.unwrap());
    let left: Vec<String> = other
        .active_bans(now)
        .await
        .unwrap()
        .into_iter()
        .map(|b| b.customer_id)
        .collect();
    assert_eq!(left, ["cus-000000000002"]);
}

async fn webhook_urls(b: Backend) {
    let db = TestDb::new(b, "webhooks").await;
    let s = &db.store;
    s.insert_customer("cus-000000000001", "alice", "x")
        .await
        .unwrap();
    assert_eq!(s.customer_webhook("cus-000000000001").await.unwrap(), None);
    assert!(
        s.set_customer_webhook("cus-000000000001", Some("http://127.0.0.1:9/hook"))
            .await
            .unwrap()
    );
    assert_eq!(
        s.customer_webhook("cus-000000000001")
            .await
            .unwrap()
            .as_deref(),
        Some("http://127.0.0.1:9/hook")
    );
    assert!(
        s.set_customer_webhook("cus-000000000001", None)
            .await
            .unwrap()
    );
    assert_eq!(s.customer_webhook("cus-000000000001").await.unwrap(), None);
    assert!(!s.set_customer_webhook("cus-nobody", None).await.unwrap());
    assert_eq!(s.customer_webhook("cus-nobody").await.unwrap(), None);
}
