//! Device commands: issue one (sent over the tunnel, or MQTT when the
//! device is not connected), follow its status, and the broker link.

use std::time::Duration;

use axum::body::Bytes;
use axum::extract::{Path, Query, State as AxState};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use serde::Deserialize;
use serde_json::{Value, json};

use super::{ApiError, ApiResult, Shared};
use crate::commands::{self, IssueError};

pub fn admin_routes() -> Router<Shared> {
    Router::new()
        .route(
            "/devices/{id}/commands",
            get(list_commands).post(issue_command),
        )
        .route("/commands/{id}", get(get_command))
        .route("/mqtt", get(mqtt_status))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct IssueQuery {
    /// Wait up to this many seconds for an outcome (max 300).
    wait: Option<u64>,
    /// Expire the command after this many seconds instead of the default.
    ttl: Option<u64>,
}

/// `POST /api/v1/devices/{id}/commands` with a command body as on MQTT,
/// without the id: `{"command":"ping"}`, `{"command":"rotate","exit":"wwan0"}`.
async fn issue_command(
    AxState(state): AxState<Shared>,
    Path(id): Path<String>,
    Query(q): Query<IssueQuery>,
    body: Bytes,
) -> Response {
    let mut obj: serde_json::Map<String, Value> = match serde_json::from_slice(&body) {
        Ok(o) => o,
        Err(e) => return ApiError::bad_request(format!("invalid JSON body: {e}")).into_response(),
    };
    if obj.contains_key("id") || obj.contains_key("expires_at") {
        return ApiError::bad_request("id and expires_at are set by the control plane (use ?ttl=)")
            .into_response();
    }
    // The payload codec checks fields exactly as for MQTT.
    obj.insert("id".into(), Value::String("api".into()));
    let action = match shared::mqtt::decode_command(Value::Object(obj).to_string().as_bytes()) {
        Ok(m) => m.action,
        Err(e) => return ApiError::bad_request(e.to_string()).into_response(),
    };
    if let Some(ttl) = q.ttl
        && !(10..=7 * 24 * 3600).contains(&ttl)
    {
        return ApiError::bad_request("ttl must be within 10..=604800 seconds").into_response();
    }
    let row = match commands::issue(&state, &id, action, q.ttl.map(Duration::from_secs)).await {
        Ok(r) => r,
        Err(IssueError::NotFound(_)) => return ApiError::not_found("device").into_response(),
        Err(IssueError::Invalid(m)) => return ApiError::bad_request(m).into_response(),
        Err(IssueError::Store(e)) => return ApiError::from(e).into_response(),
    };
    let row = match q.wait.filter(|w| *w > 0) {
        Some(w) => {
            match commands::wait_final(&state, &row.id, Duration::from_secs(w.min(300))).await {
                Ok(Some(r)) => r,
                Ok(None) => row,
                Err(e) => return ApiError::from(e).into_response(),
            }
        }
        None => row,
    };
    let status = if row.is_final() {
        StatusCode::OK
    } else {
        StatusCode::ACCEPTED
    };
    (status, Json(json!({ "command": row }))).into_response()
}

#[derive(Deserialize)]
struct ListQuery {
    limit: Option<i64>,
}

async fn list_commands(
    AxState(state): AxState<Shared>,
    Path(id): Path<String>,
    Query(q): Query<ListQuery>,
) -> ApiResult<Json<Value>> {
    if state.store.device(&id).await?.is_none() {
        return Err(ApiError::not_found("device"));
    }
    let rows = state
        .store
        .device_commands(&id, q.limit.unwrap_or(50).clamp(1, 1000))
        .await?;
    Ok(Json(json!({ "commands": rows })))
}

async fn get_command(
    AxState(state): AxState<Shared>,
    Path(id): Path<String>,
) -> ApiResult<Json<Value>> {
    match state.store.command(&id).await? {
        Some(r) => Ok(Json(json!({ "command": r }))),
        None => Err(ApiError::not_found("command")),
    }
}

async fn mqtt_status(AxState(state): AxState<Shared>) -> Json<Value> {
    Json(match &state.mqtt {
        Some(m) => m.status(),
        None => json!({"configured": false}),
    })
}
