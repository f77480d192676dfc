//! A customer's extra logins (credentials), sub-users and API keys, as the
//! administrator manages them.

use axum::extract::rejection::JsonRejection;
use axum::extract::{Path, State as AxState};
use axum::http::StatusCode;
use axum::routing::{delete, get};
use axum::{Json, Router};
use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use serde::Deserialize;
use serde_json::{Value, json};

use super::{ApiError, ApiResult, Shared, USERNAME_RULE, valid_password, valid_username};
use crate::proxy::auth::hash_password;
use crate::proxy::principal::login_conflicts_with_params;
use crate::state::State;
use crate::store::{ApiKeyRow, CredentialRow, CustomerRow, SubUserError};
use crate::tokens;

/// Prefix of customer API keys.
pub const API_KEY_PREFIX: &str = "cgk_";

pub fn admin_routes() -> Router<Shared> {
    Router::new()
        .route(
            "/customers/{id}/credentials",
            get(list_credentials).post(create_credential),
        )
        .route("/credentials/{id}", delete(delete_credential))
        .route(
            "/customers/{id}/sub-users",
            get(list_sub_users).post(create_sub_user),
        )
        .route(
            "/customers/{id}/api-keys",
            get(list_api_keys).post(create_api_key),
        )
        .route("/api-keys/{id}", delete(delete_api_key))
}

/// The checks every new login passes: the customer rule, and no part of it
/// that the proxy would read as a routing parameter.
pub fn check_login(username: &str) -> ApiResult<()> {
    if !valid_username(username) {
        return Err(ApiError::bad_request(format!("username: {USERNAME_RULE}")));
    }
    if login_conflicts_with_params(username) {
        return Err(ApiError::bad_request(
            "username: it contains a routing parameter name (such as country or session) \
             between dashes; choose another",
        ));
    }
    Ok(())
}

/// Argon2id off the async threads.
pub async fn hash_off_thread(password: String) -> ApiResult<String> {
    tokio::task::spawn_blocking(move || hash_password(&password))
        .await
        .map_err(|e| ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "internal", e.to_string()))?
        .map_err(|e| ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "internal", e))
}

/// A customer by id or username.
async fn customer(state: &State, id: &str) -> ApiResult<CustomerRow> {
    let found = match state.store.customer_by_id(id).await? {
        Some(c) => Some(c),
        None => state.store.customer_by_username(id).await?,
    };
    found.ok_or_else(|| ApiError::not_found("customer"))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct NewLogin {
    username: String,
    password: String,
}

async fn create_credential(
    AxState(state): AxState<Shared>,
    Path(id): Path<String>,
    body: Result<Json<NewLogin>, JsonRejection>,
) -> ApiResult<(StatusCode, Json<CredentialRow>)> {
    let Json(b) = body?;
    check_login(&b.username)?;
    valid_password(&b.password).map_err(ApiError::bad_request)?;
    let owner = customer(&state, &id).await?;
    let hash = hash_off_thread(b.password).await?;
    let cred_id = format!("crd-{}", hex::encode(rand::random::<[u8; 6]>()));
    let row = state
        .store
        .insert_credential(&cred_id, &owner.id, &b.username, &hash)
        .await?
        .ok_or_else(|| ApiError::not_found("customer"))?;
    Ok((StatusCode::CREATED, Json(row)))
}

async fn list_credentials(
    AxState(state): AxState<Shared>,
    Path(id): Path<String>,
) -> ApiResult<Json<Vec<CredentialRow>>> {
    let owner = customer(&state, &id).await?;
    Ok(Json(state.store.credentials_of(&owner.id).await?))
}

async fn delete_credential(
    AxState(state): AxState<Shared>,
    Path(id): Path<String>,
) -> ApiResult<StatusCode> {
    let name = state
        .store
        .delete_credential(&id)
        .await?
        .ok_or_else(|| ApiError::not_found("credential"))?;
    state.auth.invalidate(&name);
    Ok(StatusCode::NO_CONTENT)
}

async fn create_sub_user(
    AxState(state): AxState<Shared>,
    Path(id): Path<String>,
    body: Result<Json<NewLogin>, JsonRejection>,
) -> ApiResult<(StatusCode, Json<CustomerRow>)> {
    let Json(b) = body?;
    check_login(&b.username)?;
    valid_password(&b.password).map_err(ApiError::bad_request)?;
    let parent = customer(&state, &id).await?;
    let hash = hash_off_thread(b.password).await?;
    let sub_id = format!("cus-{}", hex::encode(rand::random::<[u8; 6]>()));
    let row = state
        .store
        .insert_account(&sub_id, &b.username, &hash, Some(&parent.id))
        .await
        .map_err(|e| match e {
            SubUserError::NoParent => ApiError::not_found("customer"),
            SubUserError::ParentIsSubUser => ApiError::bad_request(e.to_string()),
            SubUserError::Store(e) => e.into(),
        })?;
    Ok((StatusCode::CREATED, Json(row)))
}

async fn list_sub_users(
    AxState(state): AxState<Shared>,
    Path(id): Path<String>,
) -> ApiResult<Json<Vec<CustomerRow>>> {
    let parent = customer(&state, &id).await?;
    Ok(Json(state.store.sub_users(&parent.id).await?))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct NewApiKey {
    label: String,
}

async fn create_api_key(
    AxState(state): AxState<Shared>,
    Path(id): Path<String>,
    body: Result<Json<NewApiKey>, JsonRejection>,
) -> ApiResult<(StatusCode, Json<Value>)> {
    let Json(b) = body?;
    if b.label.is_empty() || b.label.len() > 64 || b.label.chars().any(char::is_control) {
        return Err(ApiError::bad_request(
            "label must be 1-64 characters without control characters",
        ));
    }
    let owner = customer(&state, &id).await?;
    let key = format!(
        "{API_KEY_PREFIX}{}",
        URL_SAFE_NO_PAD.encode(rand::random::<[u8; 32]>())
    );
    let key_id = format!("key-{}", hex::encode(rand::random::<[u8; 6]>()));
    let row = state
        .store
        .insert_api_key(&key_id, &owner.id, &b.label, &tokens::sha256_hex(&key))
        .await?
        .ok_or_else(|| ApiError::not_found("customer"))?;
    let mut v = serde_json::to_value(&row).unwrap_or(Value::Null);
    // Shown once: only its hash is stored.
    v["key"] = json!(key);
    Ok((StatusCode::CREATED, Json(v)))
}

async fn list_api_keys(
    AxState(state): AxState<Shared>,
    Path(id): Path<String>,
) -> ApiResult<Json<Vec<ApiKeyRow>>> {
    let owner = customer(&state, &id).await?;
    Ok(Json(state.store.api_keys_of(&owner.id).await?))
}

async fn delete_api_key(
    AxState(state): AxState<Shared>,
    Path(id): Path<String>,
) -> ApiResult<StatusCode> {
    if state.store.delete_api_key(&id).await? {
        Ok(StatusCode::NO_CONTENT)
    } else {
        Err(ApiError::not_found("api key"))
    }
}
