//! Plans, a customer's access (plan, expiry, disabled), live usage and the
//! request log.

use axum::extract::rejection::JsonRejection;
use axum::extract::{Path, Query, State as AxState};
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, get};
use axum::{Json, Router};
use serde::Deserialize;
use serde_json::{Value, json};

use super::{ApiError, ApiResult, Shared};
use crate::limits::{Now, PlanLimits};
use crate::routing::Strategy;
use crate::store::{PlanRow, now_ms};
use crate::usage::LogMode;

pub fn admin_routes() -> Router<Shared> {
    Router::new()
        .route("/plans", get(list_plans).post(create_plan))
        .route("/plans/{id}", delete(delete_plan).patch(patch_plan))
        .route("/customers/{id}/access", axum::routing::patch(patch_access))
        .route("/customers/{id}/usage", get(customer_usage))
        .route("/request-log", get(request_log))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct NewPlan {
    name: String,
    max_threads: Option<u32>,
    new_conn_per_sec: Option<u32>,
    bw_conn_bps: Option<u64>,
    bw_customer_bps: Option<u64>,
    quota_bytes: Option<u64>,
    allowed_ports: Option<Vec<(u16, u16)>>,
    #[serde(default)]
    allowed_labels: Vec<String>,
    strategy: Option<String>,
    log_mode: Option<String>,
}

async fn list_plans(AxState(state): AxState<Shared>) -> ApiResult<Json<Vec<PlanRow>>> {
    Ok(Json(state.store.plans().await?))
}

/// A plan's editable fields, checked: what creation and editing store.
struct ValidPlan {
    limits: PlanLimits,
    allowed_labels: Vec<String>,
    strategy: Strategy,
    log_mode: LogMode,
}

/// The one place a plan's fields are checked, for creation and editing
/// alike (an edit is checked as the whole plan it produces).
fn validate_plan(b: NewPlan) -> ApiResult<ValidPlan> {
    if !crate::tokens::valid_name(&b.name) {
        return Err(ApiError::bad_request(
            "name must be 1-64 characters: letters, digits, '.', '_' or '-'",
        ));
    }
    let strategy = match b.strategy.as_deref() {
        None => Strategy::default(),
        Some(s) => Strategy::parse(s).ok_or_else(|| {
            ApiError::bad_request(
                "strategy must be round_robin, least_connections, random, weighted or ip_hash",
            )
        })?,
    };
    let log_mode = match b.log_mode.as_deref() {
        None => LogMode::default(),
        Some(s) => LogMode::parse(s)
            .ok_or_else(|| ApiError::bad_request("log_mode must be off, host or full"))?,
    };
    if let Some(bad) = b
        .allowed_labels
        .iter()
        .find(|l| !super::fleet::valid_label(l))
    {
        return Err(ApiError::bad_request(format!("invalid label {bad:?}")));
    }
    let limits = PlanLimits {
        name: b.name,
        max_threads: b.max_threads,
        new_conn_per_sec: b.new_conn_per_sec,
        bw_conn_bps: b.bw_conn_bps,
        bw_customer_bps: b.bw_customer_bps,
        quota_bytes: b.quota_bytes,
        expires_at_ms: None,
        allowed_ports: b.allowed_ports,
    };
    limits
        .validate()
        .map_err(|e| ApiError::bad_request(e.to_string()))?;
    Ok(ValidPlan {
        limits,
        allowed_labels: b.allowed_labels,
        strategy,
        log_mode,
    })
}

/// Publish a created or edited plan to this node's plans cache at once,
/// rather than at the next periodic reload (every 5 s, which is how other
/// nodes on the same database learn of it). Cached logins hold a plan id,
/// not a plan, so their next connection already finds the new limits.
fn publish_plan(state: &crate::state::State, plan: &PlanRow) {
    if let Ok(mut m) = state.plans.write() {
        m.insert(plan.id.clone(), std::sync::Arc::new(plan.clone()));
    }
}

async fn create_plan(
    AxState(state): AxState<Shared>,
    body: Result<Json<NewPlan>, JsonRejection>,
) -> ApiResult<(StatusCode, Json<PlanRow>)> {
    let Json(b) = body?;
    let v = validate_plan(b)?;
    let plan = PlanRow {
        id: format!("plan-{}", hex::encode(rand::random::<[u8; 6]>())),
        limits: v.limits,
        allowed_labels: v.allowed_labels,
        strategy: v.strategy,
        log_mode: v.log_mode,
        created_at: now_ms(),
    };
    state.store.insert_plan(&plan).await?;
    publish_plan(&state, &plan);
    Ok((StatusCode::CREATED, Json(plan)))
}

/// The fields of [`NewPlan`], each optional: a missing field keeps its
/// value, `null` clears an optional limit (no limit) or puts back the
/// default (`allowed_labels`, `strategy`, `log_mode`).
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct PlanPatch {
    #[serde(default, with = "serde_with_none")]
    name: Option<Option<String>>,
    #[serde(default, with = "serde_with_none")]
    max_threads: Option<Option<u32>>,
    #[serde(default, with = "serde_with_none")]
    new_conn_per_sec: Option<Option<u32>>,
    #[serde(default, with = "serde_with_none")]
    bw_conn_bps: Option<Option<u64>>,
    #[serde(default, with = "serde_with_none")]
    bw_customer_bps: Option<Option<u64>>,
    #[serde(default, with = "serde_with_none")]
    quota_bytes: Option<Option<u64>>,
    #[serde(default, with = "serde_with_none")]
    allowed_ports: Option<Option<Vec<(u16, u16)>>>,
    #[serde(default, with = "serde_with_none")]
    allowed_labels: Option<Option<Vec<String>>>,
    #[serde(default, with = "serde_with_none")]
    strategy: Option<Option<String>>,
    #[serde(default, with = "serde_with_none")]
    log_mode: Option<Option<String>>,
}

impl PlanPatch {
    /// The creation request this edit amounts to: the current plan with
    /// the patch laid over it.
    fn over(self, p: &PlanRow) -> ApiResult<NewPlan> {
        let l = &p.limits;
        let name = match self.name {
            Some(Some(n)) => n,
            Some(None) => return Err(ApiError::bad_request("name cannot be null")),
            None => l.name.clone(),
        };
        Ok(NewPlan {
            name,
            max_threads: self.max_threads.unwrap_or(l.max_threads),
            new_conn_per_sec: self.new_conn_per_sec.unwrap_or(l.new_conn_per_sec),
            bw_conn_bps: self.bw_conn_bps.unwrap_or(l.bw_conn_bps),
            bw_customer_bps: self.bw_customer_bps.unwrap_or(l.bw_customer_bps),
            quota_bytes: self.quota_bytes.unwrap_or(l.quota_bytes),
            allowed_ports: self
                .allowed_ports
                .unwrap_or_else(|| l.allowed_ports.clone()),
            allowed_labels: match self.allowed_labels {
                Some(v) => v.unwrap_or_default(),
                None => p.allowed_labels.clone(),
            },
            strategy: self
                .strategy
                .unwrap_or_else(|| Some(p.strategy.as_str().to_string())),
            log_mode: self
                .log_mode
                .unwrap_or_else(|| Some(p.log_mode.as_str().to_string())),
        })
    }
}

/// Edit a plan (by id or name). Customers on it get the new limits on
/// their next connection; connections already open keep running.
async fn patch_plan(
    AxState(state): AxState<Shared>,
    Path(id): Path<String>,
    body: Result<Json<PlanPatch>, JsonRejection>,
) -> ApiResult<Json<PlanRow>> {
    let Json(b) = body?;
    let current = state
        .store
        .plan(&id)
        .await?
        .ok_or_else(|| ApiError::not_found("plan"))?;
    let v = validate_plan(b.over(&current)?)?;
    let plan = PlanRow {
        limits: v.limits,
        allowed_labels: v.allowed_labels,
        strategy: v.strategy,
        log_mode: v.log_mode,
        ..current
    };
    if !state.store.update_plan(&plan).await? {
        // Deleted meanwhile.
        return Err(ApiError::not_found("plan"));
    }
    publish_plan(&state, &plan);
    tracing::info!(plan = %plan.id, name = %plan.limits.name, "plan edited");
    Ok(Json(plan))
}

async fn delete_plan(
    AxState(state): AxState<Shared>,
    Path(id): Path<String>,
) -> ApiResult<StatusCode> {
    if state.store.delete_plan(&id).await? {
        if let Ok(mut m) = state.plans.write() {
            m.remove(&id);
        }
        Ok(StatusCode::NO_CONTENT)
    } else {
        Err(ApiError::not_found("plan"))
    }
}

/// `null` clears a field; a missing field keeps it.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct AccessPatch {
    #[serde(default, with = "serde_with_none")]
    plan: Option<Option<String>>,
    #[serde(default, with = "serde_with_none")]
    expires_at: Option<Option<i64>>,
    disabled: Option<bool>,
    /// Where limit events are POSTed (`http://…`; `https://` is stored
    /// but not delivered to yet).
    #[serde(default, with = "serde_with_none")]
    webhook_url: Option<Option<String>>,
}

/// Deserialize "absent" as `None` and `null` as `Some(None)`.
mod serde_with_none {
    use serde::{Deserialize, Deserializer};

    pub fn deserialize<'de, D, T>(d: D) -> Result<Option<Option<T>>, D::Error>
    where
        D: Deserializer<'de>,
        T: Deserialize<'de>,
    {
        Option::<T>::deserialize(d).map(Some)
    }
}

async fn patch_access(
    AxState(state): AxState<Shared>,
    Path(id): Path<String>,
    body: Result<Json<AccessPatch>, JsonRejection>,
) -> ApiResult<Json<Value>> {
    let Json(b) = body?;
    if let Some(Some(u)) = &b.webhook_url
        && !crate::webhooks::valid_url(u)
    {
        return Err(ApiError::bad_request(
            "webhook_url must be an http:// or https:// URL with a host",
        ));
    }
    let plan_id = match &b.plan {
        Some(Some(p)) => Some(Some(
            state
                .store
                .plan(p)
                .await?
                .ok_or_else(|| ApiError::not_found("plan"))?
                .id,
        )),
        Some(None) => Some(None),
        None => None,
    };
    let customer = state
        .store
        .customers()
        .await?
        .into_iter()
        .find(|c| c.id == id || c.username == id)
        .ok_or_else(|| ApiError::not_found("customer"))?;
    state
        .store
        .update_customer_access(
            &customer.id,
            plan_id.as_ref().map(|p| p.as_deref()),
            b.expires_at,
            b.disabled,
        )
        .await?;
    if let Some(url) = &b.webhook_url {
        state
            .store
            .set_customer_webhook(&customer.id, url.as_deref())
            .await?;
    }
    // Cached logins carry the plan id, expiry and disabled state: forget
    // the customer's, and with it those of its sub-users and extra
    // credentials (see `Authenticator::invalidate`).
    state.auth.invalidate(&customer.username);
    // So do allow-listed sources.
    if let Err(e) = crate::proxy::allowlist::refresh(&state).await {
        tracing::warn!("reloading allow lists failed: {e}");
    }
    let c = state
        .store
        .customers()
        .await?
        .into_iter()
        .find(|c| c.id == customer.id)
        .ok_or_else(|| ApiError::not_found("customer"))?;
    Ok(Json(json!({
        "id": c.id,
        "username": c.username,
        "disabled": c.disabled,
        "plan_id": c.plan_id,
        "expires_at": c.expires_at,
        "webhook_url": state.store.customer_webhook(&c.id).await?,
    })))
}

#[derive(Deserialize)]
struct UsageQuery {
    days: Option<i64>,
}

async fn customer_usage(
    AxState(state): AxState<Shared>,
    Path(id): Path<String>,
    Query(q): Query<UsageQuery>,
) -> ApiResult<Json<Value>> {
    let c = state
        .store
        .customers()
        .await?
        .into_iter()
        .find(|c| c.id == id || c.username == id)
        .ok_or_else(|| ApiError::not_found("customer"))?;
    let days = q.days.unwrap_or(31).clamp(1, 366);
    let since = crate::usage::day_of(now_ms()) - days + 1;
    let rows = state.store.customer_usage(&c.id, since).await?;
    let pending = state.usage.pending_of(&c.id);
    Ok(Json(json!({
        "customer_id": c.id,
        "live": state.limiter.snapshot(&c.id, Now::system()),
        "unflushed": pending,
        "days": rows
            .iter()
            .map(|(day, u)| json!({"day": day, "bytes_up": u.bytes_up, "bytes_down": u.bytes_down,
                "connections": u.connections, "requests": u.requests}))
            .collect::<Vec<_>>(),
    })))
}

#[derive(Deserialize)]
struct LogQuery {
    customer: Option<String>,
    since: Option<i64>,
    limit: Option<i64>,
    format: Option<String>,
}

fn csv_field(s: &str) -> String {
    if s.contains([',', '"', '\n', '\r']) {
        format!("\"{}\"", s.replace('"', "\"\""))
    } else {
        s.to_string()
    }
}

async fn request_log(AxState(state): AxState<Shared>, Query(q): Query<LogQuery>) -> Response {
    let since = q.since.unwrap_or_else(|| now_ms() - 24 * 3_600_000);
    let limit = q.limit.unwrap_or(1000).clamp(1, 100_000);
    let rows = match state
        .store
        .request_log(q.customer.as_deref(), since, limit)
        .await
    {
        Ok(r) => r,
        Err(e) => return ApiError::from(e).into_response(),
    };
    match q.format.as_deref() {
        None | Some("json") => Json(rows).into_response(),
        Some("csv") => {
            let mut out = String::from(
                "started_at,customer_id,credential,device_id,exit,target_host,target_port,target_path,bytes_up,bytes_down,duration_ms,outcome,error\n",
            );
            for r in rows {
                let fields = [
                    r.started_at.to_string(),
                    csv_field(&r.customer_id),
                    csv_field(&r.credential),
                    csv_field(r.device_id.as_deref().unwrap_or("")),
                    csv_field(r.exit.as_deref().unwrap_or("")),
                    csv_field(r.target_host.as_deref().unwrap_or("")),
                    r.target_port.map(|p| p.to_string()).unwrap_or_default(),
                    csv_field(r.target_path.as_deref().unwrap_or("")),
                    r.bytes_up.to_string(),
                    r.bytes_down.to_string(),
                    r.duration_ms.to_string(),
                    csv_field(&r.outcome),
                    csv_field(r.error.as_deref().unwrap_or("")),
                ];
                out.push_str(&fields.join(","));
                out.push('\n');
            }
            ([(header::CONTENT_TYPE, "text/csv; charset=utf-8")], out).into_response()
        }
        Some(_) => ApiError::bad_request("format must be json or csv").into_response(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn csv_quotes_only_when_needed() {
        assert_eq!(csv_field("example.com"), "example.com");
        assert_eq!(csv_field("a,b"), "\"a,b\"");
        assert_eq!(csv_field("say \"hi\""), "\"say \"\"hi\"\"\"");
    }
}
