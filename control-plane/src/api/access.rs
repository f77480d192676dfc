//! Source-address allow lists and bans of a customer.

use axum::extract::rejection::JsonRejection;
use axum::extract::{Path, State as AxState};
use axum::http::StatusCode;
use axum::routing::{delete, get};
use axum::{Json, Router};
use serde::Deserialize;
use serde_json::{Value, json};

use super::{ApiError, ApiResult, Shared};
use crate::proxy::allowlist::{self, Cidr};
use crate::store::{BanRow, CustomerIpRow, CustomerRow, now_ms};

/// Longest ban reason kept; it is shown to the customer on every refusal.
const MAX_REASON: usize = 500;

pub fn admin_routes() -> Router<Shared> {
    Router::new()
        .route("/customers/{id}/ips", get(list_ips).post(add_ip))
        .route("/customers/{id}/ips/{cidr}", delete(delete_ip))
        .route("/customers/{id}/ban", delete(lift_ban).post(ban))
        .route("/bans", get(list_bans))
}

async fn customer(state: &Shared, id: &str) -> ApiResult<CustomerRow> {
    state
        .store
        .customers()
        .await?
        .into_iter()
        .find(|c| c.id == id || c.username == id)
        .ok_or_else(|| ApiError::not_found("customer"))
}

/// Rebuild the allow list now, so a change applies to the next connection.
async fn reload(state: &Shared) {
    if let Err(e) = allowlist::refresh(state).await {
        tracing::warn!("reloading allow lists failed: {e}");
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct NewIp {
    cidr: String,
}

async fn list_ips(
    AxState(state): AxState<Shared>,
    Path(id): Path<String>,
) -> ApiResult<Json<Vec<CustomerIpRow>>> {
    let c = customer(&state, &id).await?;
    Ok(Json(state.store.customer_ips(&c.id).await?))
}

async fn add_ip(
    AxState(state): AxState<Shared>,
    Path(id): Path<String>,
    body: Result<Json<NewIp>, JsonRejection>,
) -> ApiResult<(StatusCode, Json<CustomerIpRow>)> {
    let Json(b) = body?;
    let net: Cidr = b
        .cidr
        .parse()
        .map_err(|e| ApiError::bad_request(format!("cidr: {e}")))?;
    let c = customer(&state, &id).await?;
    let canon = net.to_string();
    // One network, one customer: otherwise a source would belong to
    // whichever customer sorts first.
    if let Some(other) = state
        .store
        .all_customer_ips()
        .await?
        .into_iter()
        .find(|r| r.cidr == canon && r.customer_id != c.id)
    {
        return Err(ApiError::new(
            StatusCode::CONFLICT,
            "conflict",
            format!(
                "{canon} is already allow-listed for customer {}",
                other.customer_id
            ),
        ));
    }
    let row = state.store.add_customer_ip(&c.id, &canon).await?;
    reload(&state).await;
    Ok((StatusCode::CREATED, Json(row)))
}

/// `{cidr}` is URL-encoded (`10.0.0.0%2F24`); a bare address means its
/// single-host network.
async fn delete_ip(
    AxState(state): AxState<Shared>,
    Path((id, cidr)): Path<(String, String)>,
) -> ApiResult<StatusCode> {
    let c = customer(&state, &id).await?;
    let key = cidr.parse::<Cidr>().map(|n| n.to_string()).unwrap_or(cidr);
    if !state.store.delete_customer_ip(&c.id, &key).await? {
        return Err(ApiError::not_found("allow-list entry"));
    }
    reload(&state).await;
    Ok(StatusCode::NO_CONTENT)
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct NewBan {
    /// Unix ms; absent or null: until lifted.
    until: Option<i64>,
    #[serde(default)]
    reason: String,
}

/// Whose limiter entry a ban applies to: a sub-user's limits are its
/// parent's, so banning a sub-user suspends the account.
fn account_of(c: &CustomerRow) -> &str {
    c.parent_id.as_deref().unwrap_or(&c.id)
}

async fn ban(
    AxState(state): AxState<Shared>,
    Path(id): Path<String>,
    body: Result<Json<NewBan>, JsonRejection>,
) -> ApiResult<Json<Value>> {
    let Json(b) = body?;
    if b.reason.chars().count() > MAX_REASON || b.reason.chars().any(char::is_control) {
        return Err(ApiError::bad_request(format!(
            "reason: at most {MAX_REASON} characters, no control characters"
        )));
    }
    if b.until.is_some_and(|u| u <= now_ms()) {
        return Err(ApiError::bad_request(
            "until must be in the future (Unix ms)",
        ));
    }
    let c = customer(&state, &id).await?;
    let row = state.store.set_ban(&c.id, b.until, &b.reason).await?;
    let account = account_of(&c);
    state
        .limiter
        .ban(account, allowlist::until_time(b.until), &b.reason);
    tracing::info!(customer = %c.id, account, "customer banned");
    Ok(Json(ban_json(&row, account)))
}

async fn lift_ban(
    AxState(state): AxState<Shared>,
    Path(id): Path<String>,
) -> ApiResult<StatusCode> {
    let c = customer(&state, &id).await?;
    let stored = state.store.lift_ban(&c.id).await?;
    let account = account_of(&c).to_string();
    let live = state.limiter.unban(&account);
    // Another stored ban on the same account (the parent's own, or a
    // sibling sub-user's) still holds.
    let customers = state.store.customers().await?;
    for other in state.store.active_bans(now_ms()).await? {
        let same = customers
            .iter()
            .find(|x| x.id == other.customer_id)
            .is_some_and(|x| account_of(x) == account);
        if same {
            state.limiter.ban(
                &account,
                allowlist::until_time(other.until_at),
                &other.reason,
            );
        }
    }
    if stored || live {
        tracing::info!(customer = %c.id, "ban lifted");
        Ok(StatusCode::NO_CONTENT)
    } else {
        Err(ApiError::not_found("ban"))
    }
}

fn ban_json(b: &BanRow, account: &str) -> Value {
    json!({
        "customer_id": b.customer_id,
        "account_id": account,
        "until": b.until_at,
        "reason": b.reason,
        "created_at": b.created_at,
    })
}

async fn list_bans(AxState(state): AxState<Shared>) -> ApiResult<Json<Vec<Value>>> {
    let customers = state.store.customers().await?;
    let bans = state.store.active_bans(now_ms()).await?;
    Ok(Json(
        bans.iter()
            .map(|b| {
                let account = customers
                    .iter()
                    .find(|c| c.id == b.customer_id)
                    .map(account_of)
                    .unwrap_or(&b.customer_id);
                ban_json(b, account)
            })
            .collect(),
    ))
}
