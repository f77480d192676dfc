//! The customer's own API under `/api/v1/me`: plan, usage, the exits the
//! plan allows, and sticky sessions. Authenticated by the customer's API
//! key (`Bearer cgk_…`), never by an admin token. Everything is scoped to
//! the key's customer: sessions are the customer's own, usage and limits
//! the account's (a sub-user's parent's).

use std::time::Instant;

use axum::extract::{Path, Query, Request, State as AxState};
use axum::http::{HeaderMap, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, get, post};
use axum::{Extension, Json, Router};
use serde::Deserialize;
use serde_json::{Value, json};

use super::accounts::API_KEY_PREFIX;
use super::{ApiError, ApiResult, Shared};
use crate::limits::Now;
use crate::rotation;
use crate::routing::Filter;
use crate::state::State;
use crate::store::{CustomerRow, PlanRow, now_ms};
use crate::tokens;

/// The customer a request's API key belongs to, with the account whose
/// plan and usage apply.
#[derive(Clone)]
struct Me {
    customer: CustomerRow,
    account_id: String,
    plan_id: Option<String>,
    expires_at: Option<i64>,
}

pub fn public_routes(state: Shared) -> Router<Shared> {
    Router::new()
        .route("/api/v1/me", get(me))
        .route("/api/v1/me/usage", get(usage))
        .route("/api/v1/me/exits", get(exits))
        .route("/api/v1/me/sessions", get(sessions))
        .route("/api/v1/me/sessions/{session}", delete(release_session))
        .route("/api/v1/me/sessions/{session}/rotate", post(rotate_session))
        .route_layer(middleware::from_fn_with_state(state, require_api_key))
}

fn unauthorized(message: &'static str) -> Response {
    ApiError::new(StatusCode::UNAUTHORIZED, "unauthorized", message).into_response()
}

async fn require_api_key(
    AxState(state): AxState<Shared>,
    headers: HeaderMap,
    mut req: Request,
    next: Next,
) -> Response {
    let presented = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| {
            v.strip_prefix("Bearer ")
                .or_else(|| v.strip_prefix("bearer "))
        })
        .map(str::trim);
    let Some(key) = presented.filter(|k| k.starts_with(API_KEY_PREFIX) && k.len() <= 128) else {
        return unauthorized("customer API key required");
    };
    let customer = match state
        .store
        .customer_by_api_key(&tokens::sha256_hex(key))
        .await
    {
        Ok(Some(c)) => c,
        Ok(None) => return unauthorized("invalid API key"),
        Err(e) => return ApiError::from(e).into_response(),
    };
    let parent = match customer.parent_id.as_deref() {
        Some(pid) => match state.store.customer_by_id(pid).await {
            Ok(p) => p,
            Err(e) => return ApiError::from(e).into_response(),
        },
        None => None,
    };
    let disabled = customer.disabled || parent.as_ref().is_some_and(|p| p.disabled);
    if disabled || (customer.parent_id.is_some() && parent.is_none()) {
        return ApiError::new(
            StatusCode::FORBIDDEN,
            "forbidden",
            "the account is disabled",
        )
        .into_response();
    }
    let me = match parent {
        Some(p) => Me {
            account_id: p.id.clone(),
            plan_id: p.plan_id.clone(),
            expires_at: match (customer.expires_at, p.expires_at) {
                (Some(a), Some(b)) => Some(a.min(b)),
                (a, b) => a.or(b),
            },
            customer,
        },
        None => Me {
            account_id: customer.id.clone(),
            plan_id: customer.plan_id.clone(),
            expires_at: customer.expires_at,
            customer,
        },
    };
    req.extensions_mut().insert(me);
    next.run(req).await
}

fn plan_of(state: &State, me: &Me) -> std::sync::Arc<PlanRow> {
    state.plan_for(me.plan_id.as_deref())
}

async fn me(AxState(state): AxState<Shared>, Extension(me): Extension<Me>) -> Json<Value> {
    let plan = plan_of(&state, &me);
    Json(json!({
        "id": me.customer.id,
        "username": me.customer.username,
        "sub_user": me.customer.parent_id.is_some(),
        "expires_at": me.expires_at,
        "plan": {
            "name": plan.limits.name,
            "max_threads": plan.limits.max_threads,
            "new_conn_per_sec": plan.limits.new_conn_per_sec,
            "bw_conn_bps": plan.limits.bw_conn_bps,
            "bw_customer_bps": plan.limits.bw_customer_bps,
            "quota_bytes": plan.limits.quota_bytes,
            "allowed_ports": plan.limits.allowed_ports,
            "allowed_labels": plan.allowed_labels,
        },
    }))
}

#[derive(Deserialize)]
struct UsageQuery {
    days: Option<i64>,
}

async fn usage(
    AxState(state): AxState<Shared>,
    Extension(me): Extension<Me>,
    Query(q): Query<UsageQuery>,
) -> ApiResult<Json<Value>> {
    let days = q.days.unwrap_or(31).clamp(1, 366);
    let since = crate::usage::day_of(now_ms()) - days + 1;
    let rows = state.store.customer_usage(&me.account_id, since).await?;
    Ok(Json(json!({
        "customer_id": me.account_id,
        "live": state.limiter.snapshot(&me.account_id, Now::system()),
        "unflushed": state.usage.pending_of(&me.account_id),
        "days": rows
            .iter()
            .map(|(day, u)| json!({"day": day, "bytes_up": u.bytes_up, "bytes_down": u.bytes_down,
                "connections": u.connections, "requests": u.requests}))
            .collect::<Vec<_>>(),
    })))
}

#[derive(Deserialize)]
struct ExitsQuery {
    format: Option<String>,
}

async fn exits(
    AxState(state): AxState<Shared>,
    Extension(me): Extension<Me>,
    Query(q): Query<ExitsQuery>,
) -> Response {
    let plan = plan_of(&state, &me);
    let filter = Filter {
        allowed_labels: plan.allowed_labels.clone(),
        ..Filter::default()
    };
    let mut list: Vec<(String, String, String, String, String, Option<String>)> =
        state.registry.with_routes(|routes| {
            routes
                .iter()
                .filter(|r| r.exit.available())
                .filter_map(|r| {
                    let a = r.exit.attrs();
                    filter
                        .matches(&r.exit.device_id, &r.exit.name, &a)
                        .then(|| {
                            (
                                r.session.name.clone(),
                                r.exit.name.clone(),
                                a.country.clone(),
                                a.region.clone(),
                                a.operator.clone(),
                                r.exit.external_ip(),
                            )
                        })
                })
                .collect()
        });
    list.sort();
    match q.format.as_deref() {
        None | Some("json") => Json(
            list.into_iter()
                .map(|(device, exit, country, region, operator, ip)| {
                    json!({"device": device, "exit": exit, "country": country,
                        "region": region, "operator": operator, "external_ip": ip})
                })
                .collect::<Vec<_>>(),
        )
        .into_response(),
        Some("text") => {
            let mut out = String::new();
            for (device, exit, _, _, _, ip) in list {
                out.push_str(&format!(
                    "{device}/{exit} {}\n",
                    ip.as_deref().unwrap_or("-")
                ));
            }
            ([(header::CONTENT_TYPE, "text/plain; charset=utf-8")], out).into_response()
        }
        Some(_) => ApiError::bad_request("format must be json or text").into_response(),
    }
}

/// A device's name for customers (ids are fleet internals).
fn device_name(state: &State, device_id: &str) -> String {
    state
        .registry
        .get(device_id)
        .map(|s| s.name.clone())
        .unwrap_or_default()
}

async fn sessions(AxState(state): AxState<Shared>, Extension(me): Extension<Me>) -> Json<Value> {
    let list = state
        .router
        .sessions
        .of_customer(&me.customer.id, Instant::now());
    Json(Value::Array(
        list.into_iter()
            .map(|(session, device_id, exit, ttl)| {
                let ip = state
                    .registry
                    .exit(&device_id, &exit)
                    .and_then(|e| e.external_ip());
                json!({
                    "session": session,
                    "device": device_name(&state, &device_id),
                    "exit": exit,
                    "external_ip": ip,
                    "expires_in_secs": ttl,
                })
            })
            .collect(),
    ))
}

fn no_session() -> Response {
    ApiError::not_found("session").into_response()
}

async fn release_session(
    AxState(state): AxState<Shared>,
    Extension(me): Extension<Me>,
    Path(session): Path<String>,
) -> Response {
    if state.router.sessions.release(&me.customer.id, &session) {
        StatusCode::NO_CONTENT.into_response()
    } else {
        no_session()
    }
}

/// Rotate the exit a session is bound to. Like a rotation link, the answer
/// is the outcome only, not the fleet's internals.
async fn rotate_session(
    AxState(state): AxState<Shared>,
    Extension(me): Extension<Me>,
    Path(session): Path<String>,
) -> Response {
    let Some((device_id, exit)) = state.router.sessions.exit_of(&me.customer.id, &session) else {
        return no_session();
    };
    super::fleet::public_outcome(
        rotation::rotate(&state, &device_id, Some(&exit), "customer").await,
        no_session,
    )
}
