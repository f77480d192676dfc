//! Who may hold a tunnel: in-process control plane, real QUIC on loopback,
//! a hand-driven client in place of the agent so it can misbehave.

use std::net::SocketAddr;
use std::time::Duration;

use bytes::BytesMut;
use control_plane::{Config, app, tokens};
use edge_agent::identity::Identity;
use shared::quic::framed::{read_frame, write_frame};
use shared::wire::{ControlMsg, DeviceFacts, Hello, RejectCode, SERVER_NAME, close_code};

fn temp_dir(label: &str) -> std::path::PathBuf {
    let d = std::env::temp_dir().join(format!("cg-{label}-{}", rand::random::<u64>()));
    std::fs::create_dir_all(&d).unwrap();
    d
}

async fn start() -> (app::App, Identity, std::path::PathBuf) {
    let dir = temp_dir("admission");
    let lo: SocketAddr = "127.0.0.1:0".parse().unwrap();
    let cfg = Config {
        data_dir: dir.join("cp"),
        http_listen: lo,
        socks_listen: lo,
        api_listen: lo,
        quic_listen: lo,
        ..Config::default()
    };
    let app = app::start(cfg).await.unwrap();
    let addr = tokens::agent_addr(&app.state.cfg, Some(app.addrs));
    let issued = tokens::create_enroll_token(&app.state.store, &app.state.pki, addr, "probe", 60)
        .await
        .unwrap();
    let id = edge_agent::enroll::enroll(&issued.token, &dir.join("agent"), None)
        .await
        .unwrap();
    (app, id, dir)
}

async fn hello(
    id: &Identity,
    quic: SocketAddr,
    min: u16,
    max: u16,
) -> (quinn::Connection, Option<ControlMsg>) {
    let ep = edge_agent::tunnel::make_endpoint(quic).unwrap();
    let client =
        edge_agent::tls::device_client_config(&id.ca_der, &id.cert_der, &id.key_der).unwrap();
    let conn = ep
        .connect_with(client, quic, SERVER_NAME)
        .unwrap()
        .await
        .unwrap();
    let (mut send, mut recv) = conn.open_bi().await.unwrap();
    let msg = ControlMsg::Hello(Hello {
        min_version: min,
        max_version: max,
        agent_version: "test".into(),
        facts: DeviceFacts::default(),
        exits: vec![],
    });
    write_frame(&mut send, &msg).await.unwrap();
    let mut buf = BytesMut::new();
    let answer = tokio::time::timeout(
        Duration::from_secs(5),
        read_frame::<ControlMsg>(&mut recv, &mut buf),
    )
    .await
    .unwrap()
    .ok()
    .flatten();
    (conn, answer)
}

#[tokio::test]
async fn incompatible_versions_are_refused_with_a_clear_error() {
    let (app, id, dir) = start().await;
    let (conn, answer) = hello(&id, app.addrs.quic, 99, 120).await;
    match answer {
        Some(ControlMsg::Reject(r)) => {
            assert_eq!(r.code, RejectCode::IncompatibleVersion);
            assert!(
                r.message.contains("incompatible protocol versions"),
                "{}",
                r.message
            );
            assert!(
                r.message.contains("upgrade the local side"),
                "{}",
                r.message
            );
        }
        other => panic!("expected a Reject, got {other:?}"),
    }
    let closed = tokio::time::timeout(Duration::from_secs(5), conn.closed())
        .await
        .unwrap();
    match closed {
        quinn::ConnectionError::ApplicationClosed(c) => {
            assert_eq!(
                c.error_code.into_inner(),
                u64::from(close_code::INCOMPATIBLE_VERSION)
            );
        }
        other => panic!("expected an application close, got {other}"),
    }
    assert_eq!(app.state.registry.online_count(), 0);
    app.shutdown().await;
    let _ = std::fs::remove_dir_all(dir);
}

#[tokio::test]
async fn identity_comes_from_the_certificate() {
    let (app, id, dir) = start().await;
    let (_conn, answer) = hello(&id, app.addrs.quic, 1, 1).await;
    match answer {
        Some(ControlMsg::Welcome(w)) => {
            assert_eq!(w.device_id, id.meta.device_id);
            assert_eq!(w.device_name, "probe");
            assert!(!w.protected_ports.is_empty());
            assert!(
                w.protected_ips.contains(&"127.0.0.1".parse().unwrap()),
                "the address the agent dialed"
            );
        }
        other => panic!("expected Welcome, got {other:?}"),
    }
    app.shutdown().await;
    let _ = std::fs::remove_dir_all(dir);
}

#[tokio::test]
async fn a_certificate_from_another_ca_cannot_open_a_tunnel() {
    let (app, id, dir) = start().await;
    // A look-alike CA and a client certificate it signed for the same name.
    let ca_key = rcgen::KeyPair::generate().unwrap();
    let mut ca = rcgen::CertificateParams::default();
    ca.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    ca.distinguished_name
        .push(rcgen::DnType::CommonName, "cellgate device CA");
    let key = rcgen::KeyPair::generate().unwrap();
    let mut leaf = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    leaf.distinguished_name
        .push(rcgen::DnType::CommonName, id.meta.device_id.as_str());
    leaf.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ClientAuth];
    let cert = leaf
        .signed_by(&key, &rcgen::Issuer::new(ca, &ca_key))
        .unwrap();
    // Trusts the real control plane, presents the forged certificate.
    let client =
        edge_agent::tls::device_client_config(&id.ca_der, cert.der(), &key.serialize_der())
            .unwrap();
    let ep = edge_agent::tunnel::make_endpoint(app.addrs.quic).unwrap();
    let attempt = async {
        let conn = ep
            .connect_with(client, app.addrs.quic, SERVER_NAME)?
            .await?;
        let (mut send, mut recv) = conn.open_bi().await?;
        let hello = ControlMsg::Hello(Hello {
            min_version: 1,
            max_version: 1,
            agent_version: "forged".into(),
            facts: DeviceFacts::default(),
            exits: vec![],
        });
        write_frame(&mut send, &hello).await?;
        let mut buf = BytesMut::new();
        let answer = read_frame::<ControlMsg>(&mut recv, &mut buf).await?;
        anyhow::Ok(answer)
    };
    let result = tokio::time::timeout(Duration::from_secs(10), attempt)
        .await
        .unwrap();
    assert!(
        !matches!(result, Ok(Some(ControlMsg::Welcome(_)))),
        "a foreign certificate was welcomed: {result:?}"
    );
    assert_eq!(app.state.registry.online_count(), 0);
    app.shutdown().await;
    let _ = std::fs::remove_dir_all(dir);
}

/// A device that sends garbage on its control stream loses its tunnel with
/// a protocol-error close; the control plane keeps serving others.
#[tokio::test]
async fn malformed_control_frames_close_only_that_tunnel() {
    let (app, id, dir) = start().await;
    let cases: Vec<(&str, Vec<u8>)> = vec![
        (
            "length prefix over the frame limit",
            vec![0x7f, 0xff, 0xff, 0xff, 1, 2, 3],
        ),
        ("undecodable payload", vec![0, 0, 0, 3, 0xff, 0xff, 0xff]),
        (
            "a message only the control plane may send",
            shared::wire::frame_to_vec(&ControlMsg::Probe).unwrap(),
        ),
    ];
    for (what, bytes) in cases {
        let ep = edge_agent::tunnel::make_endpoint(app.addrs.quic).unwrap();
        let client =
            edge_agent::tls::device_client_config(&id.ca_der, &id.cert_der, &id.key_der).unwrap();
        let conn = ep
            .connect_with(client, app.addrs.quic, SERVER_NAME)
            .unwrap()
            .await
            .unwrap();
        let (mut send, mut recv) = conn.open_bi().await.unwrap();
        let hello = ControlMsg::Hello(Hello {
            min_version: 1,
            max_version: 1,
            agent_version: "fuzzy".into(),
            facts: DeviceFacts::default(),
            exits: vec![],
        });
        write_frame(&mut send, &hello).await.unwrap();
        let mut buf = BytesMut::new();
        let welcome = read_frame::<ControlMsg>(&mut recv, &mut buf).await.unwrap();
        assert!(
            matches!(welcome, Some(ControlMsg::Welcome(_))),
            "{what}: {welcome:?}"
        );
        assert_eq!(app.state.registry.online_count(), 1, "{what}");
        send.write_all(&bytes).await.unwrap();
        let closed = tokio::time::timeout(Duration::from_secs(5), conn.closed()).await;
        match closed {
            Ok(quinn::ConnectionError::ApplicationClosed(c)) => {
                assert_eq!(
                    c.error_code.into_inner(),
                    u64::from(close_code::PROTOCOL_ERROR),
                    "{what}"
                );
            }
            other => panic!("{what}: expected a protocol-error close, got {other:?}"),
        }
        tokio::time::timeout(Duration::from_secs(5), async {
            while app.state.registry.online_count() != 0 {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        })
        .await
        .unwrap_or_else(|_| panic!("{what}: the session stayed registered"));
    }
    // Still serving: a well-behaved session of the same device is welcomed.
    let (_conn, answer) = hello(&id, app.addrs.quic, 1, 1).await;
    assert!(matches!(answer, Some(ControlMsg::Welcome(_))), "{answer:?}");
    app.shutdown().await;
    let _ = std::fs::remove_dir_all(dir);
}

/// Garbage on a data stream costs the agent that stream, not its tunnel.
#[tokio::test]
async fn agents_reset_malformed_data_streams_and_keep_the_tunnel() {
    let (app, id, dir) = start().await;
    let cfg = edge_agent::AgentConfig {
        state_dir: dir.join("agent"),
        ..Default::default()
    };
    let stop = tokio_util::sync::CancellationToken::new();
    let agent = tokio::spawn(edge_agent::tunnel::run(cfg, stop.clone()));
    tokio::time::timeout(Duration::from_secs(10), async {
        while app.state.registry.online_count() == 0 {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
    .expect("agent online");
    let session = app.state.registry.get(&id.meta.device_id).unwrap();
    let garbage: Vec<Vec<u8>> = vec![
        vec![0xff; 64],
        vec![0x00, 0x10, 0x00, 0x00],
        shared::wire::frame_to_vec(&shared::wire::StreamMsg::Opened).unwrap(),
    ];
    for bytes in garbage {
        let (mut send, mut recv) = session.conn.open_bi().await.unwrap();
        send.write_all(&bytes).await.unwrap();
        let _ = send.finish();
        let r = tokio::time::timeout(Duration::from_secs(15), recv.read_to_end(1024)).await;
        match r {
            Ok(Err(quinn::ReadToEndError::Read(quinn::ReadError::Reset(_)))) => {}
            other => panic!("expected the agent to reset the stream, got {other:?}"),
        }
    }
    // The tunnel is intact: a proper Open gets a proper answer (the
    // default policy refuses loopback, which is an answer too).
    let (mut send, mut recv) = session.conn.open_bi().await.unwrap();
    let open = shared::wire::StreamMsg::Open {
        flow_id: 1,
        exit: "default".into(),
        target: shared::target::TargetAddr::Ip("127.0.0.1:9".parse().unwrap()),
    };
    write_frame(&mut send, &open).await.unwrap();
    let mut buf = BytesMut::new();
    let answer = read_frame::<shared::wire::StreamMsg>(&mut recv, &mut buf)
        .await
        .unwrap();
    assert!(
        matches!(
            answer,
            Some(shared::wire::StreamMsg::Refused {
                reason: shared::wire::RefuseReason::Denied,
                ..
            })
        ),
        "{answer:?}"
    );
    assert_eq!(app.state.registry.online_count(), 1);
    stop.cancel();
    let _ = agent.await;
    app.shutdown().await;
    let _ = std::fs::remove_dir_all(dir);
}
