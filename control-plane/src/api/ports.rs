//! Port per exit: the admin's list of every assigned port, and the
//! customer's list of the ports their plan may use (`GET /ports`, checked
//! with their proxy credentials).

use std::collections::HashMap;
use std::net::SocketAddr;

use axum::extract::connect_info::ConnectInfo;
use axum::extract::{Query, State as AxState};
use axum::http::{HeaderMap, StatusCode, header};
use axum::middleware;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use base64::Engine;
use serde::{Deserialize, Serialize};

use super::{ApiError, ApiResult, Shared};
use crate::proxy::auth::AuthError;
use crate::routing::{DeviceAttrs, Filter};
use crate::state::State;
use crate::store::DeviceRow;

/// `GET /api/v1/ports` (admin) and `GET /ports` (customer).
pub fn routes(state: Shared) -> Router<Shared> {
    Router::new()
        .route(
            "/api/v1/ports",
            get(admin_ports)
                .route_layer(middleware::from_fn_with_state(state, super::require_admin)),
        )
        .route("/ports", get(customer_ports))
}

/// One assigned port as listed.
#[derive(Debug, Serialize)]
struct PortView {
    port: u16,
    /// `host:port` as customers dial it.
    address: String,
    device_id: String,
    device: String,
    exit: String,
    online: bool,
    external_ip: Option<String>,
}

/// Every assigned port with its exit's live state; `allowed` filters.
async fn views(
    state: &State,
    allowed: impl Fn(&DeviceRow, &str) -> bool,
) -> ApiResult<Vec<PortView>> {
    let devices: HashMap<String, DeviceRow> = state
        .store
        .devices()
        .await?
        .into_iter()
        .map(|d| (d.id.clone(), d))
        .collect();
    let host = crate::ports::public_host(state);
    let range = state.cfg.ports.range();
    let mut out = Vec::new();
    for row in state.store.exit_ports().await? {
        // Ports outside the configured range have no listener.
        if !range.is_some_and(|r| r.contains(row.port)) {
            continue;
        }
        let Some(device) = devices.get(&row.device_id) else {
            continue;
        };
        if !allowed(device, &row.exit_name) {
            continue;
        }
        let online = state
            .registry
            .get(&row.device_id)
            .is_some_and(|s| s.exit(&row.exit_name).is_some());
        let external_ip = state
            .registry
            .exit(&row.device_id, &row.exit_name)
            .and_then(|e| e.external_ip());
        out.push(PortView {
            port: row.port,
            address: format!("{host}:{}", row.port),
            device_id: row.device_id,
            device: device.name.clone(),
            exit: row.exit_name,
            online,
            external_ip,
        });
    }
    Ok(out)
}

async fn admin_ports(AxState(state): AxState<Shared>) -> ApiResult<Json<Vec<PortView>>> {
    Ok(Json(views(&state, |_, _| true).await?))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct CustomerQuery {
    /// `text` (default: one `host:port` per line) or `json`.
    format: Option<String>,
    /// Include exits that are offline now (default: only usable ones).
    #[serde(default)]
    all: bool,
}

/// `user:password` from `Authorization: Basic …`.
fn basic_credentials(headers: &HeaderMap) -> Option<(Vec<u8>, Vec<u8>)> {
    let value = headers.get(header::AUTHORIZATION)?.as_bytes().trim_ascii();
    let (scheme, token) = value.split_at(value.iter().position(|&b| b == b' ')?);
    if !scheme.eq_ignore_ascii_case(b"basic") {
        return None;
    }
    let decoded = base64::engine::general_purpose::STANDARD
        .decode(token.trim_ascii())
        .ok()?;
    let colon = decoded.iter().position(|&b| b == b':')?;
    Some((decoded[..colon].to_vec(), decoded[colon + 1..].to_vec()))
}

fn unauthorized(message: &str) -> Response {
    let mut r = ApiError::new(StatusCode::UNAUTHORIZED, "unauthorized", message).into_response();
    r.headers_mut().insert(
        header::WWW_AUTHENTICATE,
        header::HeaderValue::from_static("Basic realm=\"cellgate\""),
    );
    r
}

async fn customer_ports(
    AxState(state): AxState<Shared>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
    query: Result<Query<CustomerQuery>, axum::extract::rejection::QueryRejection>,
) -> Response {
    let Query(q) = match query {
        Ok(q) => q,
        Err(e) => return ApiError::bad_request(e.body_text()).into_response(),
    };
    let json = match q.format.as_deref() {
        None | Some("text") => false,
        Some("json") => true,
        Some(_) => return ApiError::bad_request("format must be text or json").into_response(),
    };
    let Some((user, pass)) = basic_credentials(&headers) else {
        return unauthorized("proxy credentials required (HTTP Basic)");
    };
    let principal = match state.auth.verify_from(Some(peer.ip()), &user, &pass).await {
        Ok(p) => p,
        Err(AuthError::Unavailable) => {
            return ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "unavailable",
                "authentication is temporarily unavailable",
            )
            .into_response();
        }
        Err(_) => return unauthorized("wrong credentials"),
    };
    let plan = state.plan_for(principal.plan_id.as_deref());
    let filter = Filter {
        allowed_labels: plan.allowed_labels.clone(),
        ..Filter::default()
    };
    let listed = views(&state, |d, exit| {
        !d.disabled && filter.matches(&d.id, exit, &DeviceAttrs::of(d))
    })
    .await;
    let mut listed = match listed {
        Ok(v) => v,
        Err(e) => return e.into_response(),
    };
    if !q.all {
        listed.retain(|v| v.online);
    }
    if json {
        return Json(listed).into_response();
    }
    let text: String = listed.iter().map(|v| format!("{}\n", v.address)).collect();
    ([(header::CONTENT_TYPE, "text/plain; charset=utf-8")], text).into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn basic_credentials_are_read() {
        let mut h = HeaderMap::new();
        assert_eq!(basic_credentials(&h), None);
        h.insert(
            header::AUTHORIZATION,
            "Basic YWxpY2U6cDpx".parse().unwrap(), // alice:p:q
        );
        assert_eq!(
            basic_credentials(&h),
            Some((b"alice".to_vec(), b"p:q".to_vec()))
        );
        h.insert(header::AUTHORIZATION, "Bearer abc".parse().unwrap());
        assert_eq!(basic_credentials(&h), None);
    }
}
