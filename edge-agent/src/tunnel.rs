//! The tunnel: one QUIC connection to the control plane, redialed with
//! exponential backoff and jitter whenever it ends.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::Context;
use bytes::BytesMut;
use quinn::{Connection, ConnectionError, Endpoint};
use rand::Rng;
use shared::quic::framed::{read_frame, write_frame};
use shared::quic::transport::agent_transport;
use shared::wire::{
    CommandResult, ControlMsg, DeviceFacts, DeviceKind, Event, Heartbeat, Hello,
    MIN_PROTOCOL_VERSION, MqttGrant, PROTOCOL_VERSION, RejectCode, SERVER_NAME, close_code,
};
use tokio::sync::broadcast;
use tokio_util::sync::CancellationToken;
use tracing::{Instrument, debug, info, info_span, warn};

use crate::commands::{Claim, Executor};
use crate::config::AgentConfig;
use crate::exits::Exits;
use crate::forward::{FlowCounters, serve_flow};
use crate::identity::Identity;

/// Time allowed for the QUIC handshake plus `Hello`/`Welcome`.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// A session that lasted this long resets the backoff.
const STABLE_SESSION: Duration = Duration::from_secs(10);

/// Counters shared by the session and the flows it serves.
#[derive(Default, Debug)]
pub struct AgentStats {
    pub flows: FlowCounters,
    pub sessions: AtomicU64,
    pub online: AtomicU32,
}

/// Run the agent until `shutdown` fires.
pub async fn run(cfg: AgentConfig, shutdown: CancellationToken) -> anyhow::Result<()> {
    cfg.validate()?;
    let identity = Identity::load(&cfg.state_dir)?;
    run_with_stats(cfg, identity, Arc::new(AgentStats::default()), shutdown).await
}

pub async fn run_with_stats(
    cfg: AgentConfig,
    identity: Identity,
    stats: Arc<AgentStats>,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let addr_text = cfg
        .control_plane
        .clone()
        .unwrap_or_else(|| identity.meta.control_plane.clone());
    let mut client =
        crate::tls::device_client_config(&identity.ca_der, &identity.cert_der, &identity.key_der)?;
    client.transport_config(agent_transport(&cfg.liveness()));
    let exits = Arc::new(crate::exits::Exits::from_config(&cfg.exits).map_err(anyhow::Error::msg)?);
    let exec = Arc::new(Executor::new(
        exits.clone(),
        &cfg.state_dir,
        cfg.config_path.clone(),
        cfg.reboot_command.clone(),
        crate::commands::restarter(),
    ));
    let span = info_span!("agent", device = %identity.meta.device_id);
    async move {
        info!(control_plane = %addr_text, exits = exits.all().len(), "agent starting");
        let stored = crate::mqtt::load_grant(&cfg.state_dir);
        let (grant_tx, grant_rx) = tokio::sync::watch::channel(stored.filter(|_| cfg.mqtt_enabled));
        let (tunnel_tx, tunnel_rx) = tokio::sync::watch::channel(false);
        if cfg.mqtt_enabled {
            tokio::spawn(crate::mqtt::run(
                exec.clone(),
                crate::mqtt::Inputs {
                    grant: grant_rx,
                    tunnel_up: tunnel_rx,
                    url_override: cfg.mqtt_url.clone(),
                    state_dir: cfg.state_dir.clone(),
                },
                shutdown.clone(),
            ));
        }
        let events = spawn_link_watch(&exits, &shutdown);
        spawn_telemetry(&exits, Duration::from_secs(cfg.telemetry_secs), &shutdown);
        let mut endpoint: Option<(SocketAddr, Endpoint)> = None;
        let mut attempt: u32 = 0;
        loop {
            if shutdown.is_cancelled() {
                break;
            }
            let started = Instant::now();
            let outcome = async {
                let addr = resolve(&addr_text).await?;
                // One endpoint for the agent's lifetime, bound to the
                // wildcard address so that a new uplink address migrates
                // the connection rather than breaking it.
                let ep = match &endpoint {
                    Some((fam, ep)) if fam.is_ipv4() == addr.is_ipv4() => ep.clone(),
                    _ => {
                        let ep = make_endpoint(addr)?;
                        endpoint = Some((addr, ep.clone()));
                        ep
                    }
                };
                let ctx = SessionCtx {
                    cfg: &cfg,
                    stats: &stats,
                    exits: &exits,
                    exec: &exec,
                    grant: &grant_tx,
                    tunnel: &tunnel_tx,
                    events: &events,
                    shutdown: &shutdown,
                };
                session(&ep, addr, client.clone(), ctx).await
            };
            // Stop promptly even while resolving or mid-handshake; a live
            // session handles shutdown itself (closing the connection).
            let outcome = tokio::select! {
                r = outcome => r,
                _ = shutdown.cancelled() => Ok(SessionEnd::Shutdown),
            };
            match outcome {
                Ok(SessionEnd::Shutdown) => break,
                Ok(SessionEnd::Closed(reason)) => info!(%reason, "tunnel closed"),
                Err(e) => warn!("tunnel: {e:#}"),
            }
            if started.elapsed() >= STABLE_SESSION {
                attempt = 0;
            }
            let delay = backoff(attempt, Duration::from_secs(cfg.max_backoff_secs));
            attempt = attempt.saturating_add(1);
            debug!(?delay, attempt, "reconnecting after backoff");
            tokio::select! {
                _ = shutdown.cancelled() => break,
                _ = tokio::time::sleep(delay) => {}
            }
        }
        if let Some((_, ep)) = endpoint {
            ep.close(close_code::NORMAL.into(), b"agent shutting down");
            let _ = tokio::time::timeout(Duration::from_millis(500), ep.wait_idle()).await;
        }
        info!("agent stopped");
        Ok(())
    }
    .instrument(span)
    .await
}

/// Full-jitter exponential backoff: uniform in [base/2, base], base doubling
/// from 500 ms up to `cap`. The first retry after a long session is quick.
pub fn backoff(attempt: u32, cap: Duration) -> Duration {
    let base = Duration::from_millis(500)
        .saturating_mul(1u32 << attempt.min(16))
        .min(cap);
    let lo = base / 2;
    let jitter = rand::rng().random_range(0..=(base - lo).as_millis() as u64);
    lo + Duration::from_millis(jitter)
}

enum SessionEnd {
    Shutdown,
    Closed(String),
}

/// What a session needs from the agent around it.
struct SessionCtx<'a> {
    cfg: &'a AgentConfig,
    stats: &'a Arc<AgentStats>,
    exits: &'a Arc<Exits>,
    exec: &'a Arc<Executor>,
    grant: &'a tokio::sync::watch::Sender<Option<MqttGrant>>,
    tunnel: &'a tokio::sync::watch::Sender<bool>,
    events: &'a broadcast::Sender<Event>,
    shutdown: &'a CancellationToken,
}

/// Forward link and address changes of the exits' interfaces to every
/// session (as `Event`s). No-op without interfaces.
fn spawn_link_watch(exits: &Exits, shutdown: &CancellationToken) -> broadcast::Sender<Event> {
    let (tx, _) = broadcast::channel(64);
    let ifaces = exits.interfaces();
    if ifaces.is_empty() {
        return tx;
    }
    let mut rx = match crate::net::watch::watch_links(ifaces) {
        Ok(rx) => rx,
        Err(e) => {
            warn!("cannot watch the uplink interfaces: {e}");
            return tx;
        }
    };
    let out = tx.clone();
    let stop = shutdown.clone();
    tokio::spawn(async move {
        loop {
            let ev = tokio::select! {
                _ = stop.cancelled() => break,
                ev = rx.recv() => match ev { Some(ev) => ev, None => break },
            };
            use crate::net::watch::LinkEvent;
            let msg = match ev {
                LinkEvent::LinkUp { ifname } => Event::LinkUp { interface: ifname },
                LinkEvent::LinkDown { ifname } => Event::LinkDown { interface: ifname },
                LinkEvent::AddrAdded { ifname, addr } => Event::AddressChanged {
                    interface: ifname,
                    address: addr.to_string(),
                    added: true,
                },
                LinkEvent::AddrRemoved { ifname, addr } => Event::AddressChanged {
                    interface: ifname,
                    address: addr.to_string(),
                    added: false,
                },
            };
            info!(?msg, "uplink change");
            let _ = out.send(msg);
        }
    });
    tx
}

/// Refresh every exit's telemetry in the background.
fn spawn_telemetry(exits: &Arc<Exits>, every: Duration, shutdown: &CancellationToken) {
    let exits = exits.clone();
    let stop = shutdown.clone();
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(every);
        loop {
            tokio::select! {
                _ = stop.cancelled() => break,
                _ = tick.tick() => {}
            }
            for e in exits.all() {
                if e.method != "none" {
                    e.refresh_telemetry().await;
                }
            }
        }
    });
}

async fn session(
    endpoint: &Endpoint,
    addr: SocketAddr,
    client: quinn::ClientConfig,
    ctx: SessionCtx<'_>,
) -> anyhow::Result<SessionEnd> {
    let SessionCtx {
        cfg,
        stats,
        exits,
        exec,
        grant,
        tunnel,
        events,
        shutdown,
    } = ctx;
    let handshake = async {
        let conn = endpoint
            .connect_with(client, addr, SERVER_NAME)?
            .await
            .with_context(|| format!("connecting to {addr}"))?;
        let (mut send, mut recv) = conn.open_bi().await?;
        let hello = ControlMsg::Hello(Hello {
            min_version: MIN_PROTOCOL_VERSION,
            max_version: PROTOCOL_VERSION,
            agent_version: crate::AGENT_VERSION.to_string(),
            facts: {
                let mut f = device_facts();
                // A plain Linux host that drives modems is a modem host.
                if f.kind == DeviceKind::Linux
                    && exits
                        .all()
                        .iter()
                        .any(|e| matches!(e.method, "at" | "hilink"))
                {
                    f.kind = DeviceKind::UsbModem;
                }
                f
            },
            exits: exits.infos(),
        });
        write_frame(&mut send, &hello).await?;
        let mut buf = BytesMut::new();
        let answer = read_frame::<ControlMsg>(&mut recv, &mut buf).await;
        anyhow::Ok((conn, send, recv, buf, answer))
    };
    let (conn, mut send, mut recv, mut buf, answer) =
        tokio::time::timeout(HANDSHAKE_TIMEOUT, handshake)
            .await
            .context("handshake timed out")??;
    let welcome = match answer {
        Ok(Some(ControlMsg::Welcome(w))) => w,
        Ok(Some(ControlMsg::Reject(r))) => {
            let hint = match r.code {
                RejectCode::DeviceDisabled => " (an administrator disabled this device)",
                RejectCode::UnknownDevice => {
                    " (the control plane no longer knows this device; enroll again)"
                }
                RejectCode::IncompatibleVersion => " (upgrade the agent or the control plane)",
                RejectCode::ProtocolError => "",
            };
            anyhow::bail!("control plane refused the tunnel: {}{hint}", r.message);
        }
        Ok(other) => anyhow::bail!("unexpected answer to Hello: {other:?}"),
        Err(e) => anyhow::bail!("{}", close_text(&conn).unwrap_or_else(|| e.to_string())),
    };
    info!(
        device = %welcome.device_id,
        name = %welcome.device_name,
        version = welcome.version,
        remote = %conn.remote_address(),
        "tunnel up"
    );
    // Reaching the control plane commits a self-update on probation.
    for ev in crate::update::on_welcome() {
        write_frame(&mut send, &ControlMsg::Event(ev)).await?;
        crate::update::reports_sent();
    }
    stats.sessions.fetch_add(1, Ordering::Relaxed);
    stats.online.store(1, Ordering::Relaxed);
    let policy = Arc::new(shared::wire::policy_for(
        &welcome,
        cfg.allow_private_targets,
    ));
    let connect_timeout = Duration::from_secs(cfg.connect_timeout_secs);
    let hb_every = Duration::from_millis(u64::from(welcome.heartbeat_interval_ms.max(1000)));
    let mut heartbeat = tokio::time::interval_at(tokio::time::Instant::now() + hb_every, hb_every);
    let started = Instant::now();
    let mut seq = 0u64;
    let echo_url = cfg
        .ip_echo_url
        .clone()
        .unwrap_or_else(|| welcome.ip_echo_url.clone());
    exec.set_echo_url(&echo_url);
    if cfg.mqtt_enabled && *grant.borrow() != welcome.mqtt {
        if let Err(e) = crate::mqtt::store_grant(&cfg.state_dir, welcome.mqtt.as_ref()) {
            warn!("keeping the MQTT credentials failed: {e}");
        }
        grant.send_replace(welcome.mqtt.clone());
    }
    tunnel.send_replace(true);
    exec.set_connection(Some(conn.clone()));
    let (result_tx, mut results) =
        tokio::sync::mpsc::channel::<(CommandResult, crate::commands::After)>(16);
    let mut events = events.subscribe();

    let end = loop {
        tokio::select! {
            _ = shutdown.cancelled() => {
                conn.close(close_code::NORMAL.into(), b"agent shutting down");
                break SessionEnd::Shutdown;
            }
            stream = conn.accept_bi() => match stream {
                Ok((s, r)) => {
                    let policy = policy.clone();
                    let stats = stats.clone();
                    let exits = exits.clone();
                    tokio::spawn(async move {
                        serve_flow(s, r, &policy, &exits, connect_timeout, &stats.flows).await;
                    });
                }
                Err(e) => break SessionEnd::Closed(describe(&e)),
            },
            msg = read_frame::<ControlMsg>(&mut recv, &mut buf) => match msg {
                Ok(Some(ControlMsg::Command(cmd))) => {
                    let tx = result_tx.clone();
                    match exec.claim(&cmd.id, crate::mqtt::persist(&cmd.kind)) {
                        Claim::Run => {
                            let exec = exec.clone();
                            tokio::spawn(async move {
                                let _ = tx.send(exec.run(cmd).await).await;
                            });
                        }
                        Claim::Done(done) => {
                            // Sent again (e.g. after it went out on MQTT):
                            // never run twice; answer with what is known.
                            let r = done.unwrap_or_else(|| CommandResult {
                                message: format!("command {} was already run by this agent", cmd.id),
                                id: cmd.id,
                                ok: false,
                                detail: None,
                            });
                            let _ = tx.send((r, crate::commands::After::Nothing)).await;
                        }
                    }
                }
                Ok(Some(ControlMsg::Probe)) => {}
                Ok(Some(other)) => debug!(?other, "ignoring control message"),
                Ok(None) => break SessionEnd::Closed("control stream ended".into()),
                Err(e) => break SessionEnd::Closed(close_text(&conn).unwrap_or_else(|| e.to_string())),
            },
            Some((r, after)) = results.recv() => {
                if let Err(e) = write_frame(&mut send, &ControlMsg::CommandResult(r)).await {
                    break SessionEnd::Closed(close_text(&conn).unwrap_or_else(|| e.to_string()));
                }
                let exec = exec.clone();
                tokio::spawn(async move { exec.after(after).await });
            }
            ev = events.recv() => {
                if let Ok(ev) = ev
                    && let Err(e) = write_frame(&mut send, &ControlMsg::Event(ev)).await
                {
                    break SessionEnd::Closed(close_text(&conn).unwrap_or_else(|| e.to_string()));
                }
            }
            _ = heartbeat.tick() => {
                seq += 1;
                let hb = ControlMsg::Heartbeat(Heartbeat {
                    seq,
                    active_flows: stats.flows.active.load(Ordering::Relaxed),
                    load_centi: load_average_centi(),
                    uptime_s: started.elapsed().as_secs(),
                    bytes_up: stats.flows.bytes_up.load(Ordering::Relaxed),
                    bytes_down: stats.flows.bytes_down.load(Ordering::Relaxed),
                    exits: exits.statuses(),
                });
                if let Err(e) = write_frame(&mut send, &hb).await {
                    break SessionEnd::Closed(close_text(&conn).unwrap_or_else(|| e.to_string()));
                }
            }
        }
    };
    stats.online.store(0, Ordering::Relaxed);
    tunnel.send_replace(false);
    exec.set_connection(None);
    Ok(end)
}

fn close_text(conn: &Connection) -> Option<String> {
    conn.close_reason().map(|e| describe(&e))
}

fn describe(e: &ConnectionError) -> String {
    match e {
        ConnectionError::ApplicationClosed(c) => {
            let reason = String::from_utf8_lossy(&c.reason);
            let code = c.error_code.into_inner() as u32;
            match code {
                close_code::DEVICE_DISABLED => {
                    format!("device disabled by an administrator: {reason}")
                }
                close_code::UNKNOWN_DEVICE => {
                    format!("device unknown to the control plane: {reason}")
                }
                close_code::INCOMPATIBLE_VERSION => {
                    format!("incompatible protocol version: {reason}")
                }
                _ => format!("closed by the control plane (code {code}): {reason}"),
            }
        }
        ConnectionError::TimedOut => "control plane unreachable (idle timeout)".into(),
        ConnectionError::Reset => "the control plane restarted (stateless reset)".into(),
        other => other.to_string(),
    }
}

/// Resolve `host:port`, preferring IPv4 (mobile uplinks are often v4-only).
pub async fn resolve(addr: &str) -> anyhow::Result<SocketAddr> {
    let addrs: Vec<SocketAddr> = tokio::net::lookup_host(addr)
        .await
        .with_context(|| format!("resolving {addr}"))?
        .collect();
    addrs
        .iter()
        .find(|a| a.is_ipv4())
        .or_else(|| addrs.first())
        .copied()
        .with_context(|| format!("{addr} resolved to no address"))
}

/// A client endpoint on the wildcard address of `peer`'s family.
pub fn make_endpoint(peer: SocketAddr) -> std::io::Result<Endpoint> {
    let local = match peer.ip() {
        IpAddr::V4(_) => SocketAddr::new(IpAddr::V4(Ipv4Addr::UNSPECIFIED), 0),
        IpAddr::V6(_) => SocketAddr::new(IpAddr::V6(Ipv6Addr::UNSPECIFIED), 0),
    };
    let mut cfg = quinn::EndpointConfig::default();
    shared::quic::transport::tune_endpoint(&mut cfg);
    let socket = shared::quic::transport::bind_udp(local)?;
    Endpoint::new(cfg, None, socket, Arc::new(quinn::TokioRuntime))
}

/// What the agent can tell about its host.
pub fn device_facts() -> DeviceFacts {
    let hostname = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|s| s.trim().to_string())
        .unwrap_or_default();
    let os = std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .map(|s| format!("{} {}", std::env::consts::OS, s.trim()))
        .unwrap_or_else(|_| std::env::consts::OS.to_string());
    let model = std::fs::read_to_string("/proc/device-tree/model")
        .map(|s| s.trim_end_matches('\0').trim().to_string())
        .unwrap_or_default();
    let kind = if model.starts_with("Raspberry Pi") {
        DeviceKind::RaspberryPi
    } else if std::path::Path::new("/system/build.prop").exists() {
        DeviceKind::Android
    } else {
        DeviceKind::Linux
    };
    let interfaces = std::fs::read_dir("/sys/class/net")
        .map(|d| {
            d.filter_map(|e| e.ok())
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .filter(|n| n != "lo")
                .take(shared::wire::MAX_LIST_ITEMS)
                .collect()
        })
        .unwrap_or_default();
    DeviceFacts {
        kind,
        hostname,
        model,
        os,
        operator: None,
        interfaces,
    }
}

fn load_average_centi() -> u32 {
    std::fs::read_to_string("/proc/loadavg")
        .ok()
        .and_then(|s| {
            s.split_whitespace()
                .next()
                .and_then(|v| v.parse::<f64>().ok())
        })
        .map(|v| (v * 100.0) as u32)
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_grows_with_jitter_and_caps() {
        let cap = Duration::from_secs(30);
        for attempt in 0..40 {
            let d = backoff(attempt, cap);
            let base = Duration::from_millis(500)
                .saturating_mul(1 << attempt.min(16))
                .min(cap);
            assert!(d >= base / 2 && d <= base, "attempt {attempt}: {d:?}");
        }
        assert!(backoff(30, cap) <= cap);
    }
}
