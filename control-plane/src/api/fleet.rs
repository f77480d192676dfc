//! Fleet routes: exits, rotation (on demand, links, schedules), IP history,
//! telemetry, and the public IP-echo and rotation-link endpoints.

use std::net::SocketAddr;

use axum::body::Bytes;
use axum::extract::connect_info::ConnectInfo;
use axum::extract::rejection::JsonRejection;
use axum::extract::{Path, Query, Request, State as AxState};
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, get, post, put};
use axum::{Json, Router};
use serde::Deserialize;
use serde_json::{Value, json};

use super::{ApiError, ApiResult, Shared};
use crate::rotation::{self, RotateError};
use crate::state::State;
use crate::store::{DeviceRotation, LabelRotation, LinkUse, RotationRow, now_ms};
use crate::tokens;

/// Prefix of rotation-link tokens.
pub const LINK_PREFIX: &str = "cgr_";

pub fn admin_routes() -> Router<Shared> {
    Router::new()
        .route("/devices/{id}/rotate", post(rotate_device))
        .route("/devices/{id}/rotations", get(device_rotations))
        .route("/rotations", get(all_rotations))
        .route("/devices/{id}/ips", get(device_ips))
        .route("/devices/{id}/telemetry", get(device_telemetry))
        .route(
            "/devices/{id}/rotation",
            get(get_rotation_settings).put(put_rotation_settings),
        )
        .route(
            "/devices/{id}/rotation-links",
            get(list_links).post(create_link),
        )
        .route("/rotation-links/{id}", delete(delete_link))
        .route("/label-rotation", get(list_label_rotation))
        .route(
            "/label-rotation/{label}",
            put(put_label_rotation).delete(delete_label_rotation),
        )
}

/// Routes without the admin token: the IP echo agents use and rotation
/// links (the secret is in the path).
pub fn public_routes() -> Router<Shared> {
    Router::new()
        .route("/ip", get(ip_echo))
        .route("/speedtest", get(speed_test))
        .route("/rotate/{token}", get(use_link).post(use_link))
}

pub fn valid_label(l: &str) -> bool {
    !l.is_empty()
        && l.len() <= 32
        && l.bytes().all(|b| {
            b.is_ascii_lowercase() || b.is_ascii_digit() || matches!(b, b'_' | b'-' | b'.')
        })
}

/// The device's exits: live state when the device was seen since start,
/// merged with the totals the database holds.
pub async fn exits_json(state: &State, device_id: &str, online: bool) -> ApiResult<Vec<Value>> {
    let rows = state.store.exits_of(device_id).await?;
    let session = state.registry.get(device_id);
    let mut out = Vec::with_capacity(rows.len());
    for row in rows {
        // An exit the connected agent no longer declares.
        let retired = session
            .as_ref()
            .is_some_and(|s| s.exit(&row.name).is_none());
        let mut v = match state.registry.exit(device_id, &row.name) {
            Some(e) if !retired => {
                let view = e.view(online);
                let mut v = serde_json::to_value(&view).unwrap_or(Value::Null);
                // Totals: flushed rows plus what is not flushed yet.
                let pending = e
                    .counters()
                    .minus(&e.flushed.lock().map(|g| *g).unwrap_or_default());
                v["totals"] = json!({
                    "requests": row.requests + pending.requests as i64,
                    "successes": row.successes + pending.successes as i64,
                    "failures": row.failures + pending.failures as i64,
                    "bytes_up": row.bytes_up + pending.bytes_up as i64,
                    "bytes_down": row.bytes_down + pending.bytes_down as i64,
                });
                v
            }
            _ => json!({
                "name": row.name,
                "interface": row.interface,
                "method": row.method,
                "ladder": row.ladder,
                "status": if retired {
                    "not_declared"
                } else if row.state == "failed" {
                    "failed"
                } else {
                    "offline"
                },
                "reason": row.state_reason,
                "external_ip": row.external_ip,
                "totals": {
                    "requests": row.requests,
                    "successes": row.successes,
                    "failures": row.failures,
                    "bytes_up": row.bytes_up,
                    "bytes_down": row.bytes_down,
                },
            }),
        };
        v["ip_checked_at"] = json!(row.ip_checked_at);
        v["last_rotation_at"] = json!(row.last_rotation_at);
        out.push(v);
    }
    Ok(out)
}

fn rotate_error(e: RotateError) -> Response {
    match e {
        RotateError::NotFound(m) => {
            ApiError::new(StatusCode::NOT_FOUND, "not_found", m).into_response()
        }
        RotateError::Conflict(m) => {
            ApiError::new(StatusCode::CONFLICT, "conflict", m).into_response()
        }
        RotateError::Offline(m) => {
            ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "offline", m).into_response()
        }
        RotateError::Failed(row) => (
            StatusCode::BAD_GATEWAY,
            Json(json!({
                "error": {
                    "code": "rotation_failed",
                    "message": row.error.clone().unwrap_or_default(),
                },
                "rotation": *row,
            })),
        )
            .into_response(),
        RotateError::Store(e) => ApiError::from(e).into_response(),
    }
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RotateBody {
    exit: Option<String>,
}

#[derive(Deserialize, Default)]
struct ExitQuery {
    exit: Option<String>,
    cause: Option<String>,
}

async fn rotate_device(
    AxState(state): AxState<Shared>,
    Path(id): Path<String>,
    Query(q): Query<ExitQuery>,
    body: Bytes,
) -> Response {
    let b: RotateBody = if body.iter().all(|b| b.is_ascii_whitespace()) {
        RotateBody::default()
    } else {
        match serde_json::from_slice(&body) {
            Ok(b) => b,
            Err(e) => {
                return ApiError::bad_request(format!("invalid JSON body: {e}")).into_response();
            }
        }
    };
    let exit = b.exit.or(q.exit);
    // The CLI says so; anything else is the API.
    let cause = match q.cause.as_deref() {
        Some("cli") => "cli",
        _ => "api",
    };
    match rotation::rotate(&state, &id, exit.as_deref(), cause).await {
        Ok(row) => Json(json!({ "rotation": row })).into_response(),
        Err(e) => rotate_error(e),
    }
}

#[derive(Deserialize)]
struct LimitQuery {
    limit: Option<i64>,
    since: Option<i64>,
}

fn limit(q: &LimitQuery, default: i64, max: i64) -> i64 {
    q.limit.unwrap_or(default).clamp(1, max)
}

async fn require_device(state: &State, id: &str) -> ApiResult<()> {
    state
        .store
        .device(id)
        .await?
        .map(|_| ())
        .ok_or_else(|| ApiError::not_found("device"))
}

async fn device_rotations(
    AxState(state): AxState<Shared>,
    Path(id): Path<String>,
    Query(q): Query<LimitQuery>,
) -> ApiResult<Json<Vec<RotationRow>>> {
    require_device(&state, &id).await?;
    Ok(Json(
        state
            .store
            .rotations(Some(&id), limit(&q, 50, 1000))
            .await?,
    ))
}

async fn all_rotations(
    AxState(state): AxState<Shared>,
    Query(q): Query<LimitQuery>,
) -> ApiResult<Json<Vec<RotationRow>>> {
    Ok(Json(
        state.store.rotations(None, limit(&q, 50, 1000)).await?,
    ))
}

async fn device_ips(
    AxState(state): AxState<Shared>,
    Path(id): Path<String>,
    Query(q): Query<LimitQuery>,
) -> ApiResult<Json<Value>> {
    require_device(&state, &id).await?;
    let rows = state.store.ip_history(&id, limit(&q, 100, 10_000)).await?;
    Ok(Json(serde_json::to_value(rows).unwrap_or(Value::Null)))
}

async fn device_telemetry(
    AxState(state): AxState<Shared>,
    Path(id): Path<String>,
    Query(q): Query<LimitQuery>,
) -> ApiResult<Json<Value>> {
    require_device(&state, &id).await?;
    let since = q.since.unwrap_or_else(|| now_ms() - 24 * 3_600_000);
    let rows = state
        .store
        .telemetry(&id, since, limit(&q, 5000, 50_000))
        .await?;
    Ok(Json(serde_json::to_value(rows).unwrap_or(Value::Null)))
}

async fn get_rotation_settings(
    AxState(state): AxState<Shared>,
    Path(id): Path<String>,
) -> ApiResult<Json<Value>> {
    let d = state
        .store
        .device(&id)
        .await?
        .ok_or_else(|| ApiError::not_found("device"))?;
    let labels = state.store.label_rotations().await?;
    let eff = rotation::resolve_schedule(&d, &labels, state.cfg.rotation.default_every_secs);
    Ok(Json(json!({
        "device": d.rotation,
        "effective": {
            "every_secs": eff.every_secs,
            "jitter_secs": eff.jitter_secs,
            "after_requests": eff.after_requests,
        },
    })))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RotationSettingsBody {
    #[serde(default = "yes")]
    enabled: bool,
    every_secs: Option<i64>,
    jitter_secs: Option<i64>,
    after_requests: Option<i64>,
}

fn yes() -> bool {
    true
}

fn check_schedule(
    every: Option<i64>,
    jitter: Option<i64>,
    after: Option<i64>,
) -> Result<(), ApiError> {
    if every.is_some_and(|e| !(10..=30 * 86_400).contains(&e)) {
        return Err(ApiError::bad_request(
            "every_secs must be within 10..=2592000",
        ));
    }
    if jitter.is_some_and(|j| j < 0 || Some(j) >= every.or(Some(i64::MAX))) {
        return Err(ApiError::bad_request(
            "jitter_secs must be at least 0 and below every_secs",
        ));
    }
    if after.is_some_and(|a| a < 1) {
        return Err(ApiError::bad_request("after_requests must be at least 1"));
    }
    Ok(())
}

async fn put_rotation_settings(
    AxState(state): AxState<Shared>,
    Path(id): Path<String>,
    body: Result<Json<RotationSettingsBody>, JsonRejection>,
) -> ApiResult<Json<Value>> {
    let Json(b) = body?;
    check_schedule(b.every_secs, b.jitter_secs, b.after_requests)?;
    let r = DeviceRotation {
        enabled: b.enabled,
        every_secs: b.every_secs,
        jitter_secs: b.jitter_secs,
        after_requests: b.after_requests,
    };
    if !state.store.set_device_rotation(&id, &r).await? {
        return Err(ApiError::not_found("device"));
    }
    get_rotation_settings(AxState(state), Path(id)).await
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct LabelRotationBody {
    every_secs: Option<i64>,
    jitter_secs: Option<i64>,
    after_requests: Option<i64>,
}

async fn list_label_rotation(
    AxState(state): AxState<Shared>,
) -> ApiResult<Json<Vec<LabelRotation>>> {
    Ok(Json(state.store.label_rotations().await?))
}

async fn put_label_rotation(
    AxState(state): AxState<Shared>,
    Path(label): Path<String>,
    body: Result<Json<LabelRotationBody>, JsonRejection>,
) -> ApiResult<Json<LabelRotation>> {
    let Json(b) = body?;
    if !valid_label(&label) {
        return Err(ApiError::bad_request(
            "labels are 1-32 characters a-z, 0-9, '_', '-' or '.'",
        ));
    }
    check_schedule(b.every_secs, b.jitter_secs, b.after_requests)?;
    let every = b
        .every_secs
        .or((b.after_requests.is_none()).then_some(state.cfg.rotation.default_every_secs as i64));
    let p = LabelRotation {
        label,
        every_secs: every,
        jitter_secs: b.jitter_secs,
        after_requests: b.after_requests,
    };
    state.store.set_label_rotation(&p).await?;
    Ok(Json(p))
}

async fn delete_label_rotation(
    AxState(state): AxState<Shared>,
    Path(label): Path<String>,
) -> ApiResult<StatusCode> {
    if state.store.delete_label_rotation(&label).await? {
        Ok(StatusCode::NO_CONTENT)
    } else {
        Err(ApiError::not_found("label policy"))
    }
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct LinkBody {
    exit: Option<String>,
    min_interval_secs: Option<i64>,
}

async fn create_link(
    AxState(state): AxState<Shared>,
    Path(id): Path<String>,
    body: Bytes,
) -> ApiResult<(StatusCode, Json<Value>)> {
    let b: LinkBody = if body.iter().all(|b| b.is_ascii_whitespace()) {
        LinkBody::default()
    } else {
        serde_json::from_slice(&body)
            .map_err(|e| ApiError::bad_request(format!("invalid JSON body: {e}")))?
    };
    require_device(&state, &id).await?;
    let exits = state.store.exits_of(&id).await?;
    let exit = match b.exit {
        Some(n) if exits.iter().any(|e| e.name == n) => n,
        Some(n) => return Err(ApiError::not_found(&format!("exit {n:?}"))),
        None if exits.len() == 1 => exits[0].name.clone(),
        None if exits.is_empty() => {
            return Err(ApiError::new(
                StatusCode::CONFLICT,
                "conflict",
                "the device has not connected yet, so its exits are unknown; name the exit",
            ));
        }
        None => {
            return Err(ApiError::bad_request(format!(
                "the device has {} exits; name one with \"exit\"",
                exits.len()
            )));
        }
    };
    let interval = b
        .min_interval_secs
        .unwrap_or(state.cfg.rotation.link_min_interval_secs as i64);
    if !(0..=86_400).contains(&interval) {
        return Err(ApiError::bad_request(
            "min_interval_secs must be within 0..=86400",
        ));
    }
    let token = format!(
        "{LINK_PREFIX}{}",
        base64::Engine::encode(
            &base64::engine::general_purpose::URL_SAFE_NO_PAD,
            rand::random::<[u8; 24]>()
        )
    );
    let link_id = format!("rl-{}", hex::encode(rand::random::<[u8; 6]>()));
    let row = state
        .store
        .insert_rotation_link(&link_id, &id, &exit, &tokens::sha256_hex(&token), interval)
        .await?;
    let url = format!("{}/rotate/{token}", state.api_base_url());
    let mut v = serde_json::to_value(row).unwrap_or(Value::Null);
    v["token"] = json!(token);
    v["url"] = json!(url);
    Ok((StatusCode::CREATED, Json(v)))
}

async fn list_links(
    AxState(state): AxState<Shared>,
    Path(id): Path<String>,
) -> ApiResult<Json<Value>> {
    require_device(&state, &id).await?;
    let rows = state.store.rotation_links(&id).await?;
    Ok(Json(serde_json::to_value(rows).unwrap_or(Value::Null)))
}

async fn delete_link(
    AxState(state): AxState<Shared>,
    Path(id): Path<String>,
) -> ApiResult<StatusCode> {
    if state.store.delete_rotation_link(&id).await? {
        Ok(StatusCode::NO_CONTENT)
    } else {
        Err(ApiError::not_found("rotation link"))
    }
}

/// `GET|POST /rotate/{token}`: what customers of a farm call with curl.
async fn use_link(AxState(state): AxState<Shared>, Path(token): Path<String>) -> Response {
    if !token.starts_with(LINK_PREFIX) || token.len() > 128 {
        return ApiError::not_found("rotation link").into_response();
    }
    let hash = tokens::sha256_hex(&token);
    let granted = match state.store.use_rotation_link(&hash).await {
        Ok(g) => g,
        Err(e) => return ApiError::from(e).into_response(),
    };
    match granted {
        LinkUse::Unknown => ApiError::not_found("rotation link").into_response(),
        LinkUse::TooSoon { retry_after_ms } => {
            let secs = (retry_after_ms + 999) / 1000;
            let mut r = ApiError::new(
                StatusCode::TOO_MANY_REQUESTS,
                "too_many_requests",
                format!("this link was used recently; try again in {secs} s"),
            )
            .into_response();
            if let Ok(v) = secs.to_string().parse() {
                r.headers_mut().insert(header::RETRY_AFTER, v);
            }
            r
        }
        // Whoever holds a link sees the outcome, not the fleet's internals
        // (device ids, backend steps, modem errors): those are in the
        // rotation record for administrators.
        LinkUse::Granted {
            device_id,
            exit,
            used_at,
            previous_use,
        } => {
            let outcome = rotation::rotate(&state, &device_id, Some(&exit), "link").await;
            // A rotation that could not start (busy, disabled, offline)
            // does not use up the link's interval.
            if matches!(
                outcome,
                Err(RotateError::Conflict(_) | RotateError::Offline(_) | RotateError::NotFound(_))
            ) && let Err(e) = state
                .store
                .refund_rotation_link(&hash, used_at, previous_use)
                .await
            {
                tracing::warn!("refunding a rotation-link use failed: {e}");
            }
            public_outcome(outcome, || {
                ApiError::not_found("rotation link").into_response()
            })
        }
    }
}

/// A rotation's outcome for customers (rotation links, the customer API):
/// old and new address only, never the fleet's internals (device ids,
/// backend steps, modem errors), which the rotation record keeps for
/// administrators.
pub(super) fn public_outcome(
    r: Result<crate::store::RotationRow, RotateError>,
    not_found: impl FnOnce() -> Response,
) -> Response {
    let (status, body) = match r {
        Ok(row) => (
            StatusCode::OK,
            json!({
                "ok": true,
                "old_ip": row.old_ip,
                "new_ip": row.new_ip,
                "duration_ms": row.duration_ms,
                "attempts": row.attempts,
            }),
        ),
        Err(RotateError::Failed(row)) => (
            StatusCode::BAD_GATEWAY,
            json!({
                "ok": false,
                "error": format!(
                    "the rotation failed after {} attempt(s); the address is still {}",
                    row.attempts,
                    row.old_ip.as_deref().unwrap_or("unknown")
                ),
                "old_ip": row.old_ip,
                "attempts": row.attempts,
            }),
        ),
        Err(RotateError::Offline(_)) => (
            StatusCode::SERVICE_UNAVAILABLE,
            json!({"ok": false, "error": "the exit is offline; try again later"}),
        ),
        Err(RotateError::Conflict(_)) => (
            StatusCode::CONFLICT,
            json!({"ok": false, "error": "the exit cannot rotate right now (a rotation is running, or rotation is off)"}),
        ),
        Err(RotateError::NotFound(_)) => return not_found(),
        Err(RotateError::Store(e)) => return ApiError::from(e).into_response(),
    };
    (status, Json(body)).into_response()
}

#[derive(Deserialize)]
struct SpeedQuery {
    bytes: Option<u64>,
}

/// `GET /speedtest?bytes=N`: N bytes of zeros (at most 100 MB), which
/// agents download through an exit for the speed-test command.
async fn speed_test(Query(q): Query<SpeedQuery>) -> Response {
    let total = q
        .bytes
        .unwrap_or(u64::from(crate::commands::SPEED_TEST_BYTES))
        .min(u64::from(crate::commands::MAX_SPEED_TEST_BYTES));
    const CHUNK: u64 = 64 * 1024;
    let zeros = Bytes::from(vec![0u8; CHUNK as usize]);
    let body = futures::stream::unfold(total, move |left| {
        let zeros = zeros.clone();
        async move {
            (left > 0).then(|| {
                let n = left.min(CHUNK);
                (Ok::<_, std::io::Error>(zeros.slice(..n as usize)), left - n)
            })
        }
    });
    (
        [
            (header::CACHE_CONTROL, "no-store".to_string()),
            (header::CONTENT_LENGTH, total.to_string()),
            (header::CONTENT_TYPE, "application/octet-stream".to_string()),
        ],
        axum::body::Body::from_stream(body),
    )
        .into_response()
}

/// `GET /ip`: the caller's address as plain text.
async fn ip_echo(req: Request) -> Response {
    match req.extensions().get::<ConnectInfo<SocketAddr>>() {
        Some(ConnectInfo(addr)) => (
            [(header::CACHE_CONTROL, "no-store")],
            format!("{}\n", addr.ip().to_canonical()),
        )
            .into_response(),
        None => ApiError::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "internal",
            "peer address unknown",
        )
        .into_response(),
    }
}
