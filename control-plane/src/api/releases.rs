//! Release routes: published releases, updating one device, its update
//! history, and rolling updates over a label.

use axum::extract::rejection::JsonRejection;
use axum::extract::{Path, State as AxState};
use axum::http::StatusCode;
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::Deserialize;
use serde_json::{Value, json};

use super::{ApiError, ApiResult, Shared};
use crate::release::{self, UpdateError};

pub fn admin_routes() -> Router<Shared> {
    Router::new()
        .route("/releases", get(list_releases))
        .route("/releases/{version}/rollout", post(create_rollout))
        .route("/rollouts", get(list_rollouts))
        .route("/rollouts/{id}", get(get_rollout))
        .route("/devices/{id}/update", post(update_device))
        .route("/devices/{id}/updates", get(device_updates))
}

async fn list_releases(AxState(state): AxState<Shared>) -> ApiResult<Json<Value>> {
    Ok(Json(
        serde_json::to_value(state.store.releases().await?).unwrap_or(Value::Null),
    ))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct UpdateReq {
    version: String,
    target: Option<String>,
}

async fn update_device(
    AxState(state): AxState<Shared>,
    Path(id): Path<String>,
    body: Result<Json<UpdateReq>, JsonRejection>,
) -> ApiResult<Json<Value>> {
    let Json(req) = body?;
    if state.store.device(&id).await?.is_none() {
        return Err(ApiError::not_found("device"));
    }
    let rel = release::find_release(&state.store, &req.version, req.target.as_deref())
        .await?
        .map_err(|m| ApiError::new(StatusCode::NOT_FOUND, "not_found", m))?;
    match release::update_device(&state, &id, &rel, None).await {
        Ok(row) => Ok(Json(json!({ "update": row }))),
        Err(UpdateError::Offline) => Err(ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "offline",
            "device is offline",
        )),
        Err(e @ UpdateError::AlreadyThere(_)) => Err(ApiError::new(
            StatusCode::CONFLICT,
            "conflict",
            e.to_string(),
        )),
        Err(e @ (UpdateError::Refused(_) | UpdateError::Lost(_))) => Err(ApiError::new(
            StatusCode::BAD_GATEWAY,
            "update_failed",
            e.to_string(),
        )),
        Err(UpdateError::Store(e)) => Err(e.into()),
    }
}

async fn device_updates(
    AxState(state): AxState<Shared>,
    Path(id): Path<String>,
) -> ApiResult<Json<Value>> {
    if state.store.device(&id).await?.is_none() {
        return Err(ApiError::not_found("device"));
    }
    Ok(Json(
        serde_json::to_value(state.store.device_updates(&id, 50).await?).unwrap_or(Value::Null),
    ))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RolloutReq {
    label: String,
    batch: Option<usize>,
    target: Option<String>,
}

async fn create_rollout(
    AxState(state): AxState<Shared>,
    Path(version): Path<String>,
    body: Result<Json<RolloutReq>, JsonRejection>,
) -> ApiResult<(StatusCode, Json<Value>)> {
    let Json(req) = body?;
    if !super::fleet::valid_label(&req.label) {
        return Err(ApiError::bad_request(format!(
            "invalid label {:?}",
            req.label
        )));
    }
    let batch = req.batch.unwrap_or(1);
    if batch == 0 || batch > 1000 {
        return Err(ApiError::bad_request("batch must be within 1..=1000"));
    }
    let rel = release::find_release(&state.store, &version, req.target.as_deref())
        .await?
        .map_err(|m| ApiError::new(StatusCode::NOT_FOUND, "not_found", m))?;
    let row = release::start_rollout(state.clone(), rel, &req.label, batch).await?;
    Ok((
        StatusCode::ACCEPTED,
        Json(serde_json::to_value(row).unwrap_or(Value::Null)),
    ))
}

async fn list_rollouts(AxState(state): AxState<Shared>) -> ApiResult<Json<Value>> {
    Ok(Json(
        serde_json::to_value(state.store.rollouts().await?).unwrap_or(Value::Null),
    ))
}

async fn get_rollout(
    AxState(state): AxState<Shared>,
    Path(id): Path<String>,
) -> ApiResult<Json<Value>> {
    let row = state
        .store
        .rollout(&id)
        .await?
        .ok_or_else(|| ApiError::not_found("rollout"))?;
    let count = |s: &str| row.devices.iter().filter(|d| d.state == s).count();
    let mut v = serde_json::to_value(&row).unwrap_or(Value::Null);
    v["counts"] = json!({
        "done": count("done"),
        "failed": count("failed"),
        "updating": count("updating"),
        "pending": count("pending"),
    });
    Ok(Json(v))
}
