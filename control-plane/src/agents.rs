//! The QUIC side: agents connect here. A connection without a client
//! certificate may only enroll; a connection with one is a device session,
//! identified by the certificate's fingerprint and nothing else.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use bytes::BytesMut;
use quinn::crypto::rustls::QuicServerConfig;
use quinn::{Connection, Endpoint, Incoming};
use rustls::RootCertStore;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use rustls::server::WebPkiClientVerifier;
use sha2::{Digest, Sha256};
use shared::quic::framed::{read_frame, write_frame};
use shared::quic::transport::control_plane_transport;
use shared::wire::{
    ControlMsg, DEFAULT_EXIT, EnrollMsg, Event, ExitInfo, Hello, MIN_PROTOCOL_VERSION,
    PROTOCOL_VERSION, Reject, RejectCode, Welcome, close_code, negotiate, valid_exit_name,
};
use tokio_util::sync::CancellationToken;
use tracing::{Instrument, debug, info, info_span, warn};

use crate::pki::fingerprint_hex;
use std::collections::HashMap;

use tokio::sync::mpsc;

use crate::registry::{DeviceSession, ExitPhase, Pending};
use crate::state::State;
use crate::store::{DeviceSeen, now_ms};

const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// With flows active, a tunnel from which no datagram arrived for this long
/// is dead (the control plane sends a probe every second meanwhile).
const SILENT_WITH_FLOWS: Duration = Duration::from_secs(5);

pub fn server_config(state: &State) -> anyhow::Result<quinn::ServerConfig> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut roots = RootCertStore::empty();
    roots.add(CertificateDer::from(state.pki.ca_cert_der.clone()))?;
    let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider.clone())
        .allow_unauthenticated()
        .build()?;
    let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(state.pki.server_key_der.clone()));
    let mut tls = rustls::ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_client_cert_verifier(verifier)
        .with_single_cert(
            vec![CertificateDer::from(state.pki.server_cert_der.clone())],
            key,
        )?;
    tls.alpn_protocols = vec![shared::wire::ALPN.to_vec()];
    // 0-RTT data could be replayed; the tunnel never needs it.
    tls.max_early_data_size = 0;
    let quic = QuicServerConfig::try_from(tls)?;
    let mut sc = quinn::ServerConfig::with_crypto(Arc::new(quic));
    sc.transport_config(control_plane_transport(&state.cfg.liveness()));
    Ok(sc)
}

/// The QUIC endpoint, with the persisted stateless-reset key.
pub fn endpoint(state: &State) -> anyhow::Result<Endpoint> {
    let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, &state.pki.reset_key);
    let mut config = quinn::EndpointConfig::new(Arc::new(key));
    shared::quic::transport::tune_endpoint(&mut config);
    // Connection IDs must validate after a restart too, or the new process
    // drops the agents' packets instead of answering with a reset.
    let mut cid_key = [0u8; 8];
    cid_key.copy_from_slice(&state.pki.reset_key[..8]);
    let cid_key = u64::from_le_bytes(cid_key);
    config.cid_generator(move || {
        Box::new(quinn_proto::HashedConnectionIdGenerator::from_key(cid_key))
    });
    let socket = shared::quic::transport::bind_udp(state.cfg.quic_listen)?;
    Ok(Endpoint::new(
        config,
        Some(server_config(state)?),
        socket,
        Arc::new(quinn::TokioRuntime),
    )?)
}

pub async fn serve(endpoint: Endpoint, state: Arc<State>, shutdown: CancellationToken) {
    loop {
        let incoming = tokio::select! {
            _ = shutdown.cancelled() => break,
            i = endpoint.accept() => match i { Some(i) => i, None => break },
        };
        let tasks = state.tasks.clone();
        let state = state.clone();
        let shutdown = shutdown.clone();
        tasks.spawn(async move {
            handle(incoming, state, shutdown).await;
        });
    }
    endpoint.close(close_code::NORMAL.into(), b"control plane shutting down");
}

async fn handle(incoming: Incoming, state: Arc<State>, shutdown: CancellationToken) {
    let remote = incoming.remote_address();
    let conn = match tokio::time::timeout(HANDSHAKE_TIMEOUT, incoming).await {
        Ok(Ok(c)) => c,
        Ok(Err(e)) => {
            debug!(%remote, "tunnel handshake failed: {e}");
            return;
        }
        Err(_) => {
            debug!(%remote, "tunnel handshake timed out");
            return;
        }
    };
    let cert = conn
        .peer_identity()
        .and_then(|i| i.downcast::<Vec<CertificateDer<'static>>>().ok())
        .and_then(|chain| chain.first().map(|c| c.as_ref().to_vec()));
    match cert {
        None => {
            enrollment(conn, &state)
                .instrument(info_span!("enroll", %remote))
                .await
        }
        Some(der) => {
            let fp = fingerprint_hex(&der);
            device_session(conn, fp, state, shutdown)
                .instrument(info_span!("tunnel", %remote))
                .await
        }
    }
}

/// Heartbeat fields that describe exits: link state and radio readings.
fn apply_heartbeat(session: &DeviceSession, hb: &shared::wire::Heartbeat) {
    for st in &hb.exits {
        if let Some(e) = session.exit(&st.name) {
            e.link_up.store(st.link_up, Ordering::Relaxed);
            if let Ok(mut t) = e.telemetry.lock() {
                *t = Some(st.telemetry.clone());
            }
        }
    }
}

fn apply_event(session: &DeviceSession, ev: &Event) {
    let by_iface = |iface: &str| {
        session
            .exits
            .iter()
            .filter(|e| {
                e.info
                    .read()
                    .map(|i| i.interface.as_deref() == Some(iface))
                    .unwrap_or(false)
            })
            .cloned()
            .collect::<Vec<_>>()
    };
    match ev {
        Event::LinkUp { interface } => {
            info!(%interface, "uplink up");
            for e in by_iface(interface) {
                e.link_up.store(true, Ordering::Relaxed);
            }
        }
        Event::LinkDown { interface } => {
            info!(%interface, "uplink down");
            for e in by_iface(interface) {
                e.link_up.store(false, Ordering::Relaxed);
            }
        }
        Event::AddressChanged {
            interface,
            address,
            added,
        } => info!(%interface, %address, added, "uplink address changed"),
        Event::Log { level, message } => info!(level, %message, "device log"),
        // Recorded by `release::on_event`.
        Event::UpdateRolledBack { .. } => {}
    }
}

fn seen_from(
    hello_facts: &shared::wire::DeviceFacts,
    agent_version: &str,
    addr: String,
) -> DeviceSeen {
    DeviceSeen {
        kind: kind_name(&hello_facts.kind).to_string(),
        operator: hello_facts.operator.clone().unwrap_or_default(),
        model: hello_facts.model.clone(),
        hostname: hello_facts.hostname.clone(),
        agent_version: agent_version.to_string(),
        addr,
    }
}

pub fn kind_name(k: &shared::wire::DeviceKind) -> &'static str {
    use shared::wire::DeviceKind::*;
    match k {
        Android => "android",
        UsbModem => "usb_modem",
        RaspberryPi => "raspberry_pi",
        Linux => "linux",
    }
}

/// The exits a `Hello` declares, or the one implicit exit; an error text
/// for names that are invalid or repeated.
fn hello_exits(hello: &Hello) -> Result<Vec<ExitInfo>, String> {
    if hello.exits.is_empty() {
        return Ok(vec![ExitInfo {
            name: DEFAULT_EXIT.to_string(),
            interface: None,
            method: "none".into(),
            ladder: Vec::new(),
        }]);
    }
    let mut seen = std::collections::HashSet::new();
    for e in &hello.exits {
        if !valid_exit_name(&e.name) {
            return Err(format!(
                "invalid exit name {:?} (use 1-32 characters a-z, 0-9, '_' or '-')",
                e.name
            ));
        }
        if !seen.insert(e.name.as_str()) {
            return Err(format!("exit name {:?} appears twice", e.name));
        }
    }
    Ok(hello.exits.clone())
}

async fn enrollment(conn: Connection, state: &State) {
    let result = tokio::time::timeout(HANDSHAKE_TIMEOUT, async {
        let (mut send, mut recv) = conn.accept_bi().await?;
        let mut buf = BytesMut::new();
        let msg = read_frame::<EnrollMsg>(&mut recv, &mut buf).await?;
        let answer = match msg {
            Some(EnrollMsg::Request {
                min_version,
                max_version,
                secret,
                public_key,
                facts,
            }) => {
                enroll_answer(
                    state,
                    &conn,
                    min_version,
                    max_version,
                    &secret,
                    &public_key,
                    &facts,
                )
                .await
            }
            _ => EnrollMsg::Refused {
                message: "expected an enrollment request".into(),
            },
        };
        write_frame(&mut send, &answer).await?;
        let _ = send.finish();
        anyhow::Ok(())
    })
    .await;
    if let Ok(Err(e)) = result {
        debug!("enrollment exchange failed: {e:#}");
    }
    // Let the agent read the answer and close first.
    let _ = tokio::time::timeout(Duration::from_secs(3), conn.closed()).await;
}

async fn enroll_answer(
    state: &State,
    conn: &Connection,
    min_version: u16,
    max_version: u16,
    secret: &str,
    public_key: &[u8],
    facts: &shared::wire::DeviceFacts,
) -> EnrollMsg {
    if let Err(e) = negotiate(
        MIN_PROTOCOL_VERSION,
        PROTOCOL_VERSION,
        min_version,
        max_version,
    ) {
        return EnrollMsg::Refused {
            message: e.to_string(),
        };
    }
    let device_id = format!("dev-{}", hex::encode(rand::random::<[u8; 6]>()));
    let cert = match state.pki.sign_device(&device_id, public_key) {
        Ok(c) => c,
        Err(e) => {
            return EnrollMsg::Refused {
                message: e.to_string(),
            };
        }
    };
    let token_hash = hex::encode(Sha256::digest(secret.as_bytes()));
    let seen = seen_from(facts, "", conn.remote_address().to_string());
    let release_key = match crate::release::ReleaseKey::of(&state.cfg) {
        Ok(k) => k.public().to_vec(),
        Err(e) => {
            warn!("enrollment refused: {e}");
            return EnrollMsg::Refused {
                message: "internal error, try again".into(),
            };
        }
    };
    match state
        .store
        .enroll_device(&token_hash, &device_id, &fingerprint_hex(&cert), &seen)
        .await
    {
        Ok(Some(name)) => {
            info!(device = %device_id, %name, "device enrolled");
            // The broker learns the device before its first session.
            crate::mqtt::refresh_broker_files(state).await;
            EnrollMsg::Granted {
                device_id,
                device_name: name,
                certificate: cert,
                ca_certificate: state.pki.ca_cert_der.clone(),
                release_key,
            }
        }
        Ok(None) => {
            warn!("enrollment refused: token invalid, expired or already used");
            EnrollMsg::Refused {
                message: "enrollment token is invalid, expired or already used".into(),
            }
        }
        Err(e) => {
            warn!("enrollment failed: {e}");
            EnrollMsg::Refused {
                message: "internal error, try again".into(),
            }
        }
    }
}

async fn reject(
    conn: &Connection,
    send: &mut quinn::SendStream,
    code: RejectCode,
    close: u32,
    message: &str,
) {
    let _ = write_frame(
        send,
        &ControlMsg::Reject(Reject {
            code,
            message: message.to_string(),
        }),
    )
    .await;
    let _ = send.finish();
    // Give the frame a moment to leave before the close frame overtakes it.
    let _ = tokio::time::timeout(Duration::from_millis(200), send.stopped()).await;
    conn.close(close.into(), message.as_bytes());
}

async fn device_session(
    conn: Connection,
    fingerprint: String,
    state: Arc<State>,
    shutdown: CancellationToken,
) {
    let opened = tokio::time::timeout(HANDSHAKE_TIMEOUT, async {
        let (send, mut recv) = conn.accept_bi().await?;
        let mut buf = BytesMut::new();
        let hello = read_frame::<ControlMsg>(&mut recv, &mut buf).await?;
        anyhow::Ok((send, recv, buf, hello))
    })
    .await;
    let (mut send, mut recv, mut buf, hello) = match opened {
        Ok(Ok(x)) => x,
        _ => {
            conn.close(
                close_code::PROTOCOL_ERROR.into(),
                b"expected a control stream with Hello",
            );
            return;
        }
    };
    let Some(ControlMsg::Hello(hello)) = hello else {
        reject(
            &conn,
            &mut send,
            RejectCode::ProtocolError,
            close_code::PROTOCOL_ERROR,
            "expected Hello",
        )
        .await;
        return;
    };
    let device = match state.store.device_by_fingerprint(&fingerprint).await {
        Ok(Some(d)) => d,
        Ok(None) => {
            warn!("unknown device certificate (deleted device?)");
            reject(
                &conn,
                &mut send,
                RejectCode::UnknownDevice,
                close_code::UNKNOWN_DEVICE,
                "unknown device",
            )
            .await;
            return;
        }
        Err(e) => {
            warn!("device lookup failed: {e}");
            conn.close(close_code::PROTOCOL_ERROR.into(), b"internal error");
            return;
        }
    };
    let span = info_span!("device", id = %device.id);
    async move {
        if device.disabled {
            info!("refusing disabled device");
            reject(
                &conn,
                &mut send,
                RejectCode::DeviceDisabled,
                close_code::DEVICE_DISABLED,
                "device disabled",
            )
            .await;
            return;
        }
        let version = match negotiate(
            MIN_PROTOCOL_VERSION,
            PROTOCOL_VERSION,
            hello.min_version,
            hello.max_version,
        ) {
            Ok(v) => v,
            Err(e) => {
                warn!("{e}");
                reject(
                    &conn,
                    &mut send,
                    RejectCode::IncompatibleVersion,
                    close_code::INCOMPATIBLE_VERSION,
                    &e.to_string(),
                )
                .await;
                return;
            }
        };
        let exits = match hello_exits(&hello) {
            Ok(x) => x,
            Err(e) => {
                warn!("{e}");
                reject(
                    &conn,
                    &mut send,
                    RejectCode::ProtocolError,
                    close_code::PROTOCOL_ERROR,
                    &e,
                )
                .await;
                return;
            }
        };
        run_session(
            conn, &mut send, &mut recv, &mut buf, hello, exits, version, device, &state, &shutdown,
        )
        .await;
    }
    .instrument(span)
    .await
}

#[allow(clippy::too_many_arguments)]
async fn run_session(
    conn: Connection,
    send: &mut quinn::SendStream,
    recv: &mut quinn::RecvStream,
    buf: &mut BytesMut,
    hello: Hello,
    exit_infos: Vec<ExitInfo>,
    version: u16,
    device: crate::store::DeviceRow,
    state: &State,
    shutdown: &CancellationToken,
) {
    let hb_every = Duration::from_secs(state.cfg.heartbeat_interval_secs);
    let welcome = ControlMsg::Welcome(Welcome {
        version,
        device_id: device.id.clone(),
        device_name: device.name.clone(),
        heartbeat_interval_ms: hb_every.as_millis() as u32,
        protected_ports: state.target_policy().protected_ports.clone(),
        protected_port_ranges: state.target_policy().protected_port_ranges.clone(),
        protected_ips: state
            .own_ips
            .iter()
            .copied()
            .chain(conn.local_ip())
            .take(shared::wire::MAX_LIST_ITEMS)
            .collect(),
        ip_echo_url: state.ip_echo_url(),
        mqtt: state.mqtt.as_ref().map(|m| m.grant(&device.id)),
    });
    let exits = state.registry.exits_for(&device.id, &exit_infos);
    state
        .registry
        .set_attrs(&device.id, crate::routing::DeviceAttrs::of(&device));
    match state.store.upsert_exits(&device.id, &exit_infos).await {
        Ok(stored) => {
            for e in &exits {
                e.maintenance.store(device.maintenance, Ordering::Relaxed);
                if let Some(row) = stored.iter().find(|r| r.name == e.name) {
                    // First sight since start: take what the database knows.
                    if e.external_ip().is_none() {
                        e.set_external_ip(row.external_ip.clone());
                    }
                    if row.state == "failed" && e.phase() == ExitPhase::Ready {
                        e.set_phase(ExitPhase::Failed);
                        e.set_reason(row.state_reason.clone());
                    }
                }
            }
        }
        Err(e) => warn!("recording the device's exits failed: {e}"),
    }
    let (cmd_tx, mut cmd_rx) = mpsc::channel(16);
    let session = Arc::new(DeviceSession {
        device_id: device.id.clone(),
        name: device.name.clone(),
        session_id: state.registry.next_session_id(),
        conn: conn.clone(),
        agent_version: hello.agent_version.clone(),
        connected_at_ms: now_ms(),
        active_flows: Default::default(),
        total_flows: Default::default(),
        bytes_up: Default::default(),
        bytes_down: Default::default(),
        last_heartbeat: Default::default(),
        exits,
        commands: cmd_tx,
    });
    if let Some(old) = state.registry.insert(session.clone()) {
        old.conn
            .close(close_code::REPLACED.into(), b"replaced by a newer session");
    }
    // An administrator may have disabled or deleted the device between the
    // lookup above and the insert, when a kick could not find the session
    // yet: check again now that a kick would.
    match state.store.device(&device.id).await {
        Ok(Some(d)) if !d.disabled => {}
        Ok(found) => {
            let (code, reason): (u32, &[u8]) = match found {
                Some(_) => (close_code::DEVICE_DISABLED, b"device disabled"),
                None => (close_code::UNKNOWN_DEVICE, b"device deleted"),
            };
            state.registry.remove(&device.id, session.session_id);
            conn.close(code.into(), reason);
            info!("device disabled or deleted while connecting");
            return;
        }
        Err(e) => warn!("re-checking the device failed: {e}"),
    }
    // Welcome goes out once the session is routable, so an agent that
    // has its Welcome is always in the registry.
    if write_frame(send, &welcome).await.is_err() {
        state.registry.remove(&device.id, session.session_id);
        return;
    }
    let seen = seen_from(
        &hello.facts,
        &hello.agent_version,
        conn.remote_address().to_string(),
    );
    if let Err(e) = state.store.device_connected(&device.id, &seen).await {
        warn!("recording the connection failed: {e}");
    }
    crate::release::device_connected(&state.store, &device.id, &hello.agent_version).await;
    info!(name = %device.name, version = %hello.agent_version, exits = session.exits.len(), "device online");
    crate::rotation::session_started(state, &session);
    let mut pending: HashMap<String, Pending> = HashMap::new();
    let mut last_sample: Option<Instant> = None;

    let mut last_heard = Instant::now();
    let mut probe = tokio::time::interval(Duration::from_secs(1));
    let mut rx_seen = conn.stats().udp_rx.datagrams;
    let mut rx_changed = Instant::now();
    let reason = loop {
        tokio::select! {
            _ = shutdown.cancelled() => {
                conn.close(close_code::NORMAL.into(), b"control plane shutting down");
                break "control plane shutting down".to_string();
            }
            e = conn.closed() => break format!("{e}"),
            // The only stream an agent opens after its control stream: a
            // release fetch during a self-update.
            stream = conn.accept_bi() => {
                if let Ok((s, r)) = stream {
                    state.tasks.spawn(crate::release::serve_fetch(state.store.clone(), s, r));
                }
            }
            msg = read_frame::<ControlMsg>(recv, buf) => {
                last_heard = Instant::now();
                match msg {
                    Ok(Some(ControlMsg::Heartbeat(hb))) => {
                        debug!(seq = hb.seq, flows = hb.active_flows, "heartbeat");
                        apply_heartbeat(&session, &hb);
                        let every = Duration::from_secs(state.cfg.fleet.telemetry_sample_secs);
                        if last_sample.is_none_or(|t| t.elapsed() >= every) {
                            last_sample = Some(Instant::now());
                            let store = state.store.clone();
                            let id = device.id.clone();
                            let hb2 = hb.clone();
                            state.tasks.spawn(async move {
                                if let Err(e) = store.insert_telemetry(&id, &hb2, now_ms()).await {
                                    debug!("storing telemetry failed: {e}");
                                }
                            });
                        }
                        if let Ok(mut g) = session.last_heartbeat.lock() {
                            *g = Some((now_ms(), hb));
                        }
                    }
                    Ok(Some(ControlMsg::CommandResult(r))) => {
                        debug!(id = %r.id, ok = r.ok, message = %r.message, "command result");
                        match pending.remove(&r.id) {
                            Some(tx) => { let _ = tx.send(r); }
                            None => debug!(id = %r.id, "result for an unknown or abandoned command"),
                        }
                    }
                    Ok(Some(ControlMsg::Event(ev))) => {
                        crate::release::on_event(state, &device.id, &ev);
                        apply_event(&session, &ev);
                    }
                    Ok(Some(other)) => {
                        warn!(?other, "unexpected control message");
                        conn.close(close_code::PROTOCOL_ERROR.into(), b"unexpected control message");
                        break "protocol error".into();
                    }
                    Ok(None) => {
                        conn.close(close_code::NORMAL.into(), b"control stream ended");
                        break "control stream ended".into();
                    }
                    Err(e) => {
                        conn.close(close_code::PROTOCOL_ERROR.into(), b"bad control frame");
                        break format!("control stream: {e}");
                    }
                }
            }
            cmd = cmd_rx.recv() => {
                // The session holds a sender, so the channel never closes here.
                let Some((cmd, tx)) = cmd else { continue };
                let id = cmd.id.clone();
                if write_frame(send, &ControlMsg::Command(cmd)).await.is_err() {
                    break "control stream closed".into();
                }
                pending.retain(|_, tx| !tx.is_closed());
                pending.insert(id, tx);
            }
            _ = probe.tick() => {
                if last_heard.elapsed() > hb_every * 3 {
                    conn.close(close_code::HEARTBEAT_TIMEOUT.into(), b"missed 3 heartbeats");
                    break "missed 3 heartbeats".into();
                }
                let rx = conn.stats().udp_rx.datagrams;
                if rx != rx_seen || session.active_flows.load(Ordering::Relaxed) == 0 {
                    rx_seen = rx;
                    rx_changed = Instant::now();
                } else if rx_changed.elapsed() > SILENT_WITH_FLOWS {
                    conn.close(close_code::HEARTBEAT_TIMEOUT.into(), b"agent silent");
                    break "agent silent while flows were active".into();
                }
                if session.active_flows.load(Ordering::Relaxed) > 0
                    && write_frame(send, &ControlMsg::Probe).await.is_err()
                {
                    break "control stream closed".into();
                }
            }
        }
    };
    state.registry.remove(&device.id, session.session_id);
    // Waiting callers learn the session is gone (their senders drop).
    drop(pending);
    if let Err(e) = state
        .store
        .device_seen(&device.id, &conn.remote_address().to_string())
        .await
    {
        debug!("recording last seen failed: {e}");
    }
    info!(%reason, "device offline");
}
