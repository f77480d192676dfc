//! From a customer's target to an open data stream on a device exit.

use std::sync::atomic::Ordering;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use quinn::{RecvStream, SendStream};
use shared::quic::framed::{read_frame, write_frame};
use shared::target::TargetAddr;
use shared::wire::StreamMsg;
use tracing::debug;

use super::auth::Principal;
use super::error::ProxyError;
use crate::limits::{Admission, Now};
use crate::registry::{FlowGuard, Route};
use crate::routing::{Filter, Stickiness, Want};
use crate::state::State;
use crate::store::PlanRow;
use crate::usage::{LogRow, UsageCounts, UsageKey, day_of};

/// Sticky sessions last this long unless the username says `ttl-…`.
pub const DEFAULT_SESSION_TTL: Duration = Duration::from_secs(600);

/// Who is connecting, under which plan, from where.
pub struct Access {
    pub principal: Principal,
    pub plan: std::sync::Arc<PlanRow>,
    pub client: std::net::IpAddr,
    /// (device id, exit name) when the customer came in on that exit's own
    /// port ([`crate::ports`]): the flow leaves there or nowhere, whatever
    /// the username asks for.
    pub pinned: Option<(String, String)>,
}

impl Access {
    fn filter(&self) -> Filter {
        if let Some((device, exit)) = &self.pinned {
            return Filter {
                device: Some(device.clone()),
                exit: Some(exit.clone()),
                allowed_labels: self.plan.allowed_labels.clone(),
                ..Filter::default()
            };
        }
        let p = &self.principal.params;
        Filter {
            country: p.country.clone(),
            region: p.region.clone(),
            operator: p.operator.clone(),
            kind: p
                .kind
                .as_ref()
                .map(|k| super::principal::kind_str(k).to_string()),
            label: p.label.clone(),
            device: p.device.as_ref().map(|d| d.as_str().to_string()),
            exit: p.exit.clone(),
            allowed_labels: self.plan.allowed_labels.clone(),
        }
    }
}

/// What the flow's end needs for accounting.
struct FlowMeta {
    account: String,
    login: String,
    target: TargetAddr,
    path: Option<String>,
    started_ms: i64,
    started: std::time::Instant,
    log_mode: crate::usage::LogMode,
}

/// Other exits tried after the first one fails before any byte moved.
const MAX_RETRIES: usize = 2;

/// A connected flow: the stream pair, bytes the exit sent behind `Opened`,
/// and the guard that keeps the flow counted on its device.
pub struct Flow {
    pub send: SendStream,
    pub recv: RecvStream,
    pub pending: Bytes,
    pub guard: FlowGuard,
    pub flow_id: u64,
    /// Holds the customer's connection slot for the flow's life.
    pub admission: Admission,
    meta: FlowMeta,
}

impl Flow {
    pub fn device_id(&self) -> &str {
        &self.guard.session.device_id
    }

    pub fn exit_name(&self) -> &str {
        &self.guard.exit.name
    }

    /// The plain-HTTP path, kept for the request log in full mode.
    pub fn set_path(&mut self, path: &str) {
        self.meta.path = Some(path.chars().take(512).collect());
    }

    /// Count relayed bytes, once, at the flow's end: on the device and the
    /// exit, in the usage table and the request log, and against the
    /// customer's quota. The quota is the one figure also counted while
    /// the flow runs (the relay hook, [`Admission::relay_throttle`]), so
    /// here it gets only what the hook has not charged yet.
    pub fn account(&self, state: &State, up: u64, down: u64) {
        let g = &self.guard;
        g.session.bytes_up.fetch_add(up, Ordering::Relaxed);
        g.session.bytes_down.fetch_add(down, Ordering::Relaxed);
        g.exit.bytes_up.fetch_add(up, Ordering::Relaxed);
        g.exit.bytes_down.fetch_add(down, Ordering::Relaxed);
        self.admission.record_flow_total(up, down);
        let m = &self.meta;
        state.usage.record(
            UsageKey {
                day: day_of(crate::store::now_ms()),
                customer_id: m.account.clone(),
                credential: m.login.clone(),
                device_id: g.session.device_id.clone(),
                exit: g.exit.name.clone(),
            },
            UsageCounts {
                bytes_up: up,
                bytes_down: down,
                connections: 1,
                requests: 1,
            },
        );
        let row = LogRow {
            started_at: m.started_ms,
            customer_id: m.account.clone(),
            credential: m.login.clone(),
            device_id: Some(g.session.device_id.clone()),
            exit: Some(g.exit.name.clone()),
            target_host: Some(m.target.host()),
            target_port: Some(m.target.port()),
            target_path: m.path.clone(),
            bytes_up: up,
            bytes_down: down,
            duration_ms: m.started.elapsed().as_millis() as u64,
            outcome: "ok".into(),
            error: None,
        };
        if let Some(row) = row.redacted(m.log_mode) {
            state.usage.log(row);
        }
    }
}

/// Check the target, pick an exit, open a stream; retry other exits when an
/// exit fails in a way another exit might not.
pub async fn connect(
    state: &State,
    target: &TargetAddr,
    access: &Access,
) -> Result<Flow, ProxyError> {
    let started = std::time::Instant::now();
    let started_ms = crate::store::now_ms();
    let r = connect_inner(state, target, access).await;
    if let Err(e) = &r {
        // Refusals and failures belong in the request log too.
        let outcome = match e {
            ProxyError::Limited(_) => "limited",
            ProxyError::Denied(_) | ProxyError::NoExit | ProxyError::NoMatch(_) => "refused",
            _ => "failed",
        };
        let row = LogRow {
            started_at: started_ms,
            customer_id: access.principal.account_id.clone(),
            credential: access.principal.username.clone(),
            device_id: None,
            exit: None,
            target_host: Some(target.host()),
            target_port: Some(target.port()),
            target_path: None,
            bytes_up: 0,
            bytes_down: 0,
            duration_ms: started.elapsed().as_millis() as u64,
            outcome: outcome.into(),
            error: Some(e.to_string().chars().take(300).collect()),
        };
        if let Some(row) = row.redacted(access.plan.log_mode) {
            state.usage.log(row);
        }
    }
    r
}

async fn connect_inner(
    state: &State,
    target: &TargetAddr,
    access: &Access,
) -> Result<Flow, ProxyError> {
    let policy = state.target_policy();
    policy
        .check_port(target.port())
        .map_err(|r| ProxyError::Denied(r.as_str().into()))?;
    if let TargetAddr::Ip(sa) = target {
        policy
            .check(sa.ip(), sa.port())
            .map_err(|r| ProxyError::Denied(r.as_str().into()))?;
    }
    // The plan's own port list, then the customer's limits.
    let plan = &access.plan.limits;
    plan.check_port(target.port())
        .map_err(ProxyError::Limited)?;
    // The customer's own expiry tightens the plan's; only then is a copy
    // of the limits needed.
    let with_expiry;
    let limits = match access.principal.expires_at {
        Some(exp) => {
            let mut l = plan.clone();
            l.expires_at_ms = Some(l.expires_at_ms.map_or(exp, |p| p.min(exp)));
            with_expiry = l;
            &with_expiry
        }
        None => plan,
    };
    let admission = state
        .limiter
        .admit(&access.principal.account_id, limits, Now::system())
        .map_err(ProxyError::Limited)?;
    let filter = access.filter();
    let params = &access.principal.params;
    let session = params
        .session
        .as_deref()
        .filter(|_| access.pinned.is_none())
        .map(|s| {
            (
                access.principal.customer_id.as_str(),
                s,
                params.ttl.unwrap_or(DEFAULT_SESSION_TTL),
            )
        });
    let mut tried: Vec<(String, String)> = Vec::new();
    let mut last = ProxyError::NoExit;
    for attempt in 0..=MAX_RETRIES {
        let want = Want {
            filter: &filter,
            strategy: access.plan.strategy,
            client: access.client,
            session,
            exclude: &tried,
        };
        let Some((route, sticky)) = state.router.pick(&state.registry, &want) else {
            // A pinned exit that is away is the usual "no exit".
            if attempt == 0
                && access.pinned.is_none()
                && filter != Filter::default()
                && state.registry.online_count() > 0
            {
                last = ProxyError::NoMatch(describe(&filter));
            }
            break;
        };
        if let Stickiness::Moved { from, why } = &sticky {
            tracing::info!(
                session = params.session.as_deref().unwrap_or(""),
                from = %from,
                to = %format!("{}/{}", route.exit.device_id, route.exit.name),
                "sticky session moved: {why}"
            );
        }
        let exit = route.exit.clone();
        let flow_id = state.flow_ids.fetch_add(1, Ordering::Relaxed) + 1;
        match open_on(route, flow_id, target, state.cfg.connect_timeout()).await {
            Ok((send, recv, pending, guard)) => {
                crate::rotation::note_request(state, &exit);
                return Ok(Flow {
                    send,
                    recv,
                    pending,
                    guard,
                    flow_id,
                    admission,
                    meta: FlowMeta {
                        account: access.principal.account_id.clone(),
                        login: access.principal.username.clone(),
                        target: target.clone(),
                        path: None,
                        started_ms: crate::store::now_ms(),
                        started: std::time::Instant::now(),
                        log_mode: access.plan.log_mode,
                    },
                });
            }
            Err(e) => {
                debug!(device = %exit.device_id, exit = %exit.name, flow = flow_id, "exit failed: {e}");
                let retry = match &e {
                    ProxyError::Upstream { reason, .. } => reason.retryable(),
                    ProxyError::Exit(_) | ProxyError::Timeout => true,
                    ProxyError::Denied(_)
                    | ProxyError::NoExit
                    | ProxyError::NoMatch(_)
                    | ProxyError::Limited(_) => false,
                };
                tried.push((exit.device_id.clone(), exit.name.clone()));
                last = e;
                if !retry {
                    break;
                }
            }
        }
    }
    Err(last)
}

/// `country=de operator=vodafone` for a filter's set fields.
fn describe(f: &Filter) -> String {
    let mut parts = Vec::new();
    let mut add = |k: &str, v: &Option<String>| {
        if let Some(v) = v {
            parts.push(format!("{k}={v}"));
        }
    };
    add("country", &f.country);
    add("region", &f.region);
    add("operator", &f.operator);
    add("kind", &f.kind);
    add("label", &f.label);
    add("device", &f.device);
    add("exit", &f.exit);
    if !f.allowed_labels.is_empty() {
        parts.push(format!("pools={}", f.allowed_labels.join(",")));
    }
    parts.join(" ")
}

type Opened = (SendStream, RecvStream, Bytes, FlowGuard);

async fn open_on(
    route: Route,
    flow_id: u64,
    target: &TargetAddr,
    connect_timeout: Duration,
) -> Result<Opened, ProxyError> {
    let started = std::time::Instant::now();
    let guard = FlowGuard::new(route.session, route.exit);
    // The agent's own connect timeout plus room for the tunnel round trip.
    let deadline = connect_timeout + Duration::from_secs(2);
    let opened = tokio::time::timeout(deadline, async {
        let (mut send, mut recv) = guard
            .session
            .conn
            .open_bi()
            .await
            .map_err(|e| ProxyError::Exit(e.to_string()))?;
        write_frame(
            &mut send,
            &StreamMsg::Open {
                flow_id,
                exit: guard.exit.name.clone(),
                target: target.clone(),
            },
        )
        .await
        .map_err(|e| ProxyError::Exit(e.to_string()))?;
        let mut buf = BytesMut::new();
        match read_frame::<StreamMsg>(&mut recv, &mut buf).await {
            Ok(Some(StreamMsg::Opened)) => Ok((send, recv, buf.freeze())),
            Ok(Some(StreamMsg::Refused { reason, message })) => {
                Err(ProxyError::Upstream { reason, message })
            }
            Ok(Some(other)) => Err(ProxyError::Exit(format!("unexpected answer {other:?}"))),
            Ok(None) => Err(ProxyError::Exit("exit closed the stream".into())),
            Err(e) => Err(ProxyError::Exit(e.to_string())),
        }
    })
    .await;
    let exit = &guard.exit;
    match opened {
        Ok(Ok((send, recv, pending))) => {
            exit.successes.fetch_add(1, Ordering::Relaxed);
            exit.open_ms_total
                .fetch_add(started.elapsed().as_millis() as u64, Ordering::Relaxed);
            Ok((send, recv, pending, guard))
        }
        Ok(Err(e)) => {
            // A target's refusal is not the exit's fault.
            if !matches!(e, ProxyError::Upstream { .. }) {
                exit.failures.fetch_add(1, Ordering::Relaxed);
            }
            Err(e)
        }
        Err(_) => {
            exit.failures.fetch_add(1, Ordering::Relaxed);
            Err(ProxyError::Timeout)
        }
    }
}
