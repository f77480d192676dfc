//! The REST API (axum): `/health`, and under `/api/v1` devices, customers
//! and enrollment tokens. Every route but `/health` needs an admin bearer
//! token; every error is JSON `{"error": {"code", "message"}}`.

use std::sync::Arc;

use axum::extract::rejection::JsonRejection;
use axum::extract::{Path, Request, State as AxState};
use axum::http::{HeaderMap, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::Deserialize;
use serde_json::{Value, json};
use shared::wire::close_code;

use crate::proxy::auth::hash_password;
use crate::registry::LiveInfo;
use crate::state::State;
use crate::store::{DeviceRow, StoreError};
use crate::tokens;

mod access;
mod accounts;
mod commands;
mod customer;
mod fleet;
mod plans;
mod ports;
mod releases;

type Shared = Arc<State>;

#[derive(Debug)]
pub struct ApiError {
    status: StatusCode,
    code: &'static str,
    message: String,
}

impl ApiError {
    fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        Self {
            status,
            code,
            message: message.into(),
        }
    }
    fn not_found(what: &str) -> Self {
        Self::new(
            StatusCode::NOT_FOUND,
            "not_found",
            format!("{what} not found"),
        )
    }
    fn bad_request(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, "bad_request", message)
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = Json(json!({"error": {"code": self.code, "message": self.message}}));
        (self.status, body).into_response()
    }
}

impl From<StoreError> for ApiError {
    fn from(e: StoreError) -> Self {
        match e {
            StoreError::Conflict(what) => Self::new(
                StatusCode::CONFLICT,
                "conflict",
                format!("{what} already exists"),
            ),
            other => {
                tracing::error!("store: {other}");
                Self::new(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "internal",
                    "internal error",
                )
            }
        }
    }
}

impl From<JsonRejection> for ApiError {
    fn from(e: JsonRejection) -> Self {
        Self::bad_request(e.body_text())
    }
}

type ApiResult<T> = Result<T, ApiError>;

pub fn router(state: Shared) -> Router {
    let v1 = Router::new()
        .route("/devices", get(list_devices))
        .route(
            "/devices/{id}",
            get(get_device).delete(delete_device).patch(patch_device),
        )
        .route("/devices/{id}/disable", post(disable_device))
        .route("/devices/{id}/enable", post(enable_device))
        .route("/customers", get(list_customers).post(create_customer))
        .route("/customers/{id}", axum::routing::delete(delete_customer))
        .route("/enroll-tokens", post(create_enroll_token))
        .merge(fleet::admin_routes())
        .merge(commands::admin_routes())
        .merge(plans::admin_routes())
        .merge(access::admin_routes())
        .merge(accounts::admin_routes())
        .merge(releases::admin_routes())
        .route_layer(middleware::from_fn_with_state(state.clone(), require_admin));
    Router::new()
        .route("/health", get(health))
        .merge(fleet::public_routes())
        .merge(ports::routes(state.clone()))
        .merge(customer::public_routes(state.clone()))
        .route("/openapi.json", get(openapi))
        .route(
            "/metrics",
            get(crate::metrics::scrape)
                .route_layer(middleware::from_fn_with_state(state.clone(), require_admin)),
        )
        .nest("/api/v1", v1)
        .fallback(|| async { ApiError::not_found("route") })
        .method_not_allowed_fallback(|| async {
            ApiError::new(
                StatusCode::METHOD_NOT_ALLOWED,
                "method_not_allowed",
                "method not allowed on this route",
            )
        })
        .layer(axum::extract::DefaultBodyLimit::max(64 * 1024))
        .with_state(state)
}

async fn require_admin(
    AxState(state): AxState<Shared>,
    headers: HeaderMap,
    req: Request,
    next: Next,
) -> Response {
    let presented = headers
        .get(axum::http::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| {
            v.strip_prefix("Bearer ")
                .or_else(|| v.strip_prefix("bearer "))
        })
        .map(str::trim);
    let Some(token) = presented.filter(|t| t.starts_with(tokens::ADMIN_PREFIX)) else {
        return ApiError::new(
            StatusCode::UNAUTHORIZED,
            "unauthorized",
            "admin bearer token required",
        )
        .into_response();
    };
    match state
        .store
        .admin_token_exists(&tokens::sha256_hex(token))
        .await
    {
        Ok(true) => next.run(req).await,
        Ok(false) => ApiError::new(
            StatusCode::UNAUTHORIZED,
            "unauthorized",
            "invalid admin token",
        )
        .into_response(),
        Err(e) => ApiError::from(e).into_response(),
    }
}

/// The OpenAPI document, kept beside the crate and embedded.
pub const OPENAPI: &str = include_str!("../openapi.json");

async fn openapi() -> Response {
    (
        [(axum::http::header::CONTENT_TYPE, "application/json")],
        OPENAPI,
    )
        .into_response()
}

async fn health(AxState(state): AxState<Shared>) -> Json<Value> {
    Json(json!({"status": "ok", "devices_online": state.registry.online_count()}))
}

async fn device_json(state: &State, d: DeviceRow) -> ApiResult<Value> {
    let live: Option<LiveInfo> = state.registry.get(&d.id).map(|s| s.live_info());
    let exits = fleet::exits_json(state, &d.id, live.is_some()).await?;
    let exit_status = |s: &str| exits.iter().any(|e| e["status"] == s);
    let status = if d.disabled {
        "disabled"
    } else if d.maintenance {
        "maintenance"
    } else if live.is_none() {
        "offline"
    } else if exit_status("rotating") {
        "rotating"
    } else if exit_status("draining") {
        "draining"
    } else if !exits.is_empty() && exits.iter().all(|e| e["status"] == "failed") {
        "failed"
    } else {
        "online"
    };
    let mut v = serde_json::to_value(&d).unwrap_or(Value::Null);
    if let Value::Object(m) = &mut v {
        m.insert("status".into(), json!(status));
        m.insert("reconnects".into(), json!((d.connects - 1).max(0)));
        m.insert("exits".into(), Value::Array(exits));
        m.insert(
            "live".into(),
            serde_json::to_value(live).unwrap_or(Value::Null),
        );
    }
    Ok(v)
}

async fn list_devices(AxState(state): AxState<Shared>) -> ApiResult<Json<Value>> {
    let rows = state.store.devices().await?;
    let mut out = Vec::with_capacity(rows.len());
    for d in rows {
        out.push(device_json(&state, d).await?);
    }
    Ok(Json(Value::Array(out)))
}

async fn get_device(
    AxState(state): AxState<Shared>,
    Path(id): Path<String>,
) -> ApiResult<Json<Value>> {
    let d = state
        .store
        .device(&id)
        .await?
        .ok_or_else(|| ApiError::not_found("device"))?;
    Ok(Json(device_json(&state, d).await?))
}

async fn patch_device(
    AxState(state): AxState<Shared>,
    Path(id): Path<String>,
    body: Result<Json<crate::store::DevicePatch>, JsonRejection>,
) -> ApiResult<Json<Value>> {
    let Json(p) = body?;
    if let Some(n) = &p.name
        && !tokens::valid_name(n)
    {
        return Err(ApiError::bad_request(
            "name must be 1-64 characters: letters, digits, '.', '_' or '-'",
        ));
    }
    if let Some(labels) = &p.labels {
        if labels.len() > 32 {
            return Err(ApiError::bad_request("at most 32 labels"));
        }
        if let Some(bad) = labels.iter().find(|l| !fleet::valid_label(l)) {
            return Err(ApiError::bad_request(format!(
                "invalid label {bad:?}: use 1-32 characters a-z, 0-9, '_', '-' or '.'"
            )));
        }
    }
    if p.country.as_ref().is_some_and(|c| {
        !(c.is_empty() || (c.len() == 2 && c.bytes().all(|b| b.is_ascii_alphabetic())))
    }) {
        return Err(ApiError::bad_request(
            "country must be a two-letter ISO 3166-1 code (or empty)",
        ));
    }
    if p.region.as_ref().is_some_and(|r| r.len() > 64) {
        return Err(ApiError::bad_request(
            "region must be at most 64 characters",
        ));
    }
    if !state.store.patch_device(&id, &p).await? {
        return Err(ApiError::not_found("device"));
    }
    if let Some(m) = p.maintenance {
        state.registry.set_maintenance(&id, m);
    }
    let d = state
        .store
        .device(&id)
        .await?
        .ok_or_else(|| ApiError::not_found("device"))?;
    Ok(Json(device_json(&state, d).await?))
}

async fn set_disabled(state: &State, id: &str, disabled: bool) -> ApiResult<Json<Value>> {
    if !state.store.set_device_disabled(id, disabled).await? {
        return Err(ApiError::not_found("device"));
    }
    if disabled {
        state
            .registry
            .kick(id, close_code::DEVICE_DISABLED, "device disabled");
    }
    let d = state
        .store
        .device(id)
        .await?
        .ok_or_else(|| ApiError::not_found("device"))?;
    Ok(Json(device_json(state, d).await?))
}

async fn disable_device(
    AxState(state): AxState<Shared>,
    Path(id): Path<String>,
) -> ApiResult<Json<Value>> {
    set_disabled(&state, &id, true).await
}

async fn enable_device(
    AxState(state): AxState<Shared>,
    Path(id): Path<String>,
) -> ApiResult<Json<Value>> {
    set_disabled(&state, &id, false).await
}

async fn delete_device(
    AxState(state): AxState<Shared>,
    Path(id): Path<String>,
) -> ApiResult<StatusCode> {
    if !state.store.delete_device(&id).await? {
        return Err(ApiError::not_found("device"));
    }
    state
        .registry
        .kick(&id, close_code::UNKNOWN_DEVICE, "device deleted");
    state.registry.forget_device(&id);
    // Its broker identity goes with it.
    crate::mqtt::refresh_broker_files(&state).await;
    Ok(StatusCode::NO_CONTENT)
}

async fn list_customers(AxState(state): AxState<Shared>) -> ApiResult<Json<Value>> {
    Ok(Json(
        serde_json::to_value(state.store.customers().await?).unwrap_or(Value::Null),
    ))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct NewCustomer {
    username: String,
    password: String,
}

/// Usernames customers type into proxy settings: no separators that
/// proxies or URLs treat specially.
/// What `valid_username` accepts, for error messages.
pub const USERNAME_RULE: &str = "1-64 characters from A-Z a-z 0-9 _ . -, not starting with cus-";

pub fn valid_username(u: &str) -> bool {
    !u.starts_with(crate::store::CUSTOMER_ID_PREFIX)
        && !u.is_empty()
        && u.len() <= 64
        && u.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'-'))
}

pub fn valid_password(p: &str) -> Result<(), &'static str> {
    if p.len() < 8 {
        return Err("password must have at least 8 characters");
    }
    if p.len() > 128 {
        return Err("password must have at most 128 characters");
    }
    Ok(())
}

async fn create_customer(
    AxState(state): AxState<Shared>,
    body: Result<Json<NewCustomer>, JsonRejection>,
) -> ApiResult<(StatusCode, Json<Value>)> {
    let Json(c) = body?;
    accounts::check_login(&c.username)?;
    valid_password(&c.password).map_err(ApiError::bad_request)?;
    let pw = c.password.clone();
    let hash = tokio::task::spawn_blocking(move || hash_password(&pw))
        .await
        .map_err(|e| ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "internal", e.to_string()))?
        .map_err(|e| ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "internal", e))?;
    let id = format!("cus-{}", hex::encode(rand::random::<[u8; 6]>()));
    // Checks the credentials' usernames too, in the same transaction.
    let row = state
        .store
        .insert_account(&id, &c.username, &hash, None)
        .await
        .map_err(|e| match e {
            crate::store::SubUserError::Store(e) => ApiError::from(e),
            other => ApiError::bad_request(other.to_string()),
        })?;
    Ok((
        StatusCode::CREATED,
        Json(serde_json::to_value(row).unwrap_or(Value::Null)),
    ))
}

async fn delete_customer(
    AxState(state): AxState<Shared>,
    Path(id): Path<String>,
) -> ApiResult<StatusCode> {
    let name = state
        .store
        .delete_customer(&id)
        .await?
        .ok_or_else(|| ApiError::not_found("customer"))?;
    state.auth.invalidate(&name);
    Ok(StatusCode::NO_CONTENT)
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct NewEnrollToken {
    name: String,
    ttl_secs: Option<u64>,
}

async fn create_enroll_token(
    AxState(state): AxState<Shared>,
    body: Result<Json<NewEnrollToken>, JsonRejection>,
) -> ApiResult<(StatusCode, Json<Value>)> {
    let Json(req) = body?;
    if !tokens::valid_name(&req.name) {
        return Err(ApiError::bad_request(
            "name: 1-64 characters from A-Z a-z 0-9 _ . -",
        ));
    }
    let ttl = req.ttl_secs.unwrap_or(state.cfg.enroll_token_ttl_secs);
    if ttl == 0 || ttl > 365 * 24 * 3600 {
        return Err(ApiError::bad_request(
            "ttl_secs must be within 1..=31536000",
        ));
    }
    let addr = tokens::agent_addr(&state.cfg, state.addrs.get().copied());
    let issued =
        tokens::create_enroll_token(&state.store, &state.pki, addr, &req.name, ttl).await?;
    Ok((
        StatusCode::CREATED,
        Json(json!({
            "token": issued.token,
            "name": req.name,
            "expires_at": issued.expires_at,
            "control_plane": issued.control_plane,
        })),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The document lists exactly the routes the router serves.
    #[test]
    fn openapi_matches_routes() {
        let doc: Value = serde_json::from_str(OPENAPI).unwrap();
        let mut got: Vec<String> = Vec::new();
        for (path, item) in doc["paths"].as_object().unwrap() {
            for method in ["get", "post", "delete", "put", "patch"] {
                if item.get(method).is_some() {
                    got.push(format!("{} {path}", method.to_uppercase()));
                }
            }
        }
        got.sort();
        let mut want = vec![
            "GET /health",
            "GET /openapi.json",
            "GET /metrics",
            "GET /ip",
            "GET /speedtest",
            "GET /api/v1/devices/{id}/commands",
            "POST /api/v1/devices/{id}/commands",
            "GET /api/v1/commands/{id}",
            "GET /api/v1/mqtt",
            "GET /rotate/{token}",
            "POST /rotate/{token}",
            "GET /api/v1/plans",
            "POST /api/v1/plans",
            "DELETE /api/v1/plans/{id}",
            "PATCH /api/v1/plans/{id}",
            "PATCH /api/v1/customers/{id}/access",
            "GET /api/v1/customers/{id}/usage",
            "GET /api/v1/request-log",
            "GET /api/v1/devices",
            "GET /api/v1/devices/{id}",
            "PATCH /api/v1/devices/{id}",
            "DELETE /api/v1/devices/{id}",
            "POST /api/v1/devices/{id}/disable",
            "POST /api/v1/devices/{id}/enable",
            "POST /api/v1/devices/{id}/rotate",
            "GET /api/v1/devices/{id}/rotations",
            "GET /api/v1/devices/{id}/ips",
            "GET /api/v1/devices/{id}/telemetry",
            "GET /api/v1/devices/{id}/rotation",
            "PUT /api/v1/devices/{id}/rotation",
            "GET /api/v1/devices/{id}/rotation-links",
            "POST /api/v1/devices/{id}/rotation-links",
            "GET /api/v1/rotations",
            "DELETE /api/v1/rotation-links/{id}",
            "GET /api/v1/label-rotation",
            "PUT /api/v1/label-rotation/{label}",
            "DELETE /api/v1/label-rotation/{label}",
            "GET /api/v1/customers",
            "POST /api/v1/customers",
            "DELETE /api/v1/customers/{id}",
            "POST /api/v1/enroll-tokens",
            "GET /api/v1/customers/{id}/ips",
            "POST /api/v1/customers/{id}/ips",
            "DELETE /api/v1/customers/{id}/ips/{cidr}",
            "POST /api/v1/customers/{id}/ban",
            "DELETE /api/v1/customers/{id}/ban",
            "GET /api/v1/bans",
            "GET /api/v1/customers/{id}/credentials",
            "POST /api/v1/customers/{id}/credentials",
            "DELETE /api/v1/credentials/{id}",
            "GET /api/v1/customers/{id}/sub-users",
            "POST /api/v1/customers/{id}/sub-users",
            "GET /api/v1/customers/{id}/api-keys",
            "POST /api/v1/customers/{id}/api-keys",
            "DELETE /api/v1/api-keys/{id}",
            "GET /api/v1/me",
            "GET /api/v1/me/usage",
            "GET /api/v1/me/exits",
            "GET /api/v1/me/sessions",
            "DELETE /api/v1/me/sessions/{session}",
            "POST /api/v1/me/sessions/{session}/rotate",
            "GET /api/v1/ports",
            "GET /ports",
            "GET /api/v1/releases",
            "POST /api/v1/releases/{version}/rollout",
            "GET /api/v1/rollouts",
            "GET /api/v1/rollouts/{id}",
            "POST /api/v1/devices/{id}/update",
            "GET /api/v1/devices/{id}/updates",
        ];
        want.sort();
        assert_eq!(got, want);
    }
}
