//! Issuing secrets: admin API tokens and device enrollment tokens. Both are
//! 256-bit random values shown once and stored only as SHA-256 (they are
//! not passwords: no dictionary to slow down, so a fast hash is right).

use std::path::Path;

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use sha2::{Digest, Sha256};
use shared::enroll::EnrollToken;

use crate::config::Config;
use crate::pki::Pki;
use crate::state::BoundAddrs;
use crate::store::{Store, StoreError, now_ms};

pub const ADMIN_PREFIX: &str = "cga_";
pub const RUNTIME_FILE: &str = "runtime.json";

pub fn sha256_hex(secret: &str) -> String {
    hex::encode(Sha256::digest(secret.as_bytes()))
}

fn random_secret() -> String {
    URL_SAFE_NO_PAD.encode(rand::random::<[u8; 32]>())
}

fn short_id(prefix: &str) -> String {
    format!("{prefix}-{}", hex::encode(rand::random::<[u8; 6]>()))
}

pub async fn create_admin_token(store: &Store, label: &str) -> Result<String, StoreError> {
    let token = format!("{ADMIN_PREFIX}{}", random_secret());
    store
        .insert_admin_token(&short_id("adm"), label, &sha256_hex(&token))
        .await?;
    Ok(token)
}

/// Names of devices: what operators type and see in lists.
pub fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 64
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
}

pub struct IssuedToken {
    pub token: String,
    pub expires_at: i64,
    pub control_plane: String,
}

pub async fn create_enroll_token(
    store: &Store,
    pki: &Pki,
    agent_addr: String,
    name: &str,
    ttl_secs: u64,
) -> Result<IssuedToken, StoreError> {
    let secret = random_secret();
    let expires_at = now_ms() / 1000 + ttl_secs as i64;
    store
        .insert_enroll_token(
            &short_id("enr"),
            name,
            &sha256_hex(&secret),
            expires_at * 1000,
        )
        .await?;
    let token = EnrollToken {
        addr: agent_addr.clone(),
        fingerprint: pki.server_fingerprint,
        secret,
        expires_at,
    };
    Ok(IssuedToken {
        token: token.encode(),
        expires_at,
        control_plane: agent_addr,
    })
}

/// The address written into tokens: the configured public address, else
/// the running server's QUIC address (from its runtime file), else the
/// configured listener. A wildcard IP becomes loopback.
pub fn agent_addr(cfg: &Config, running: Option<BoundAddrs>) -> String {
    if let Some(a) = &cfg.public_addr {
        return a.clone();
    }
    let running = running.or_else(|| read_runtime(&cfg.data_dir));
    let mut quic = running.map(|r| r.quic).unwrap_or(cfg.quic_listen);
    if quic.ip().is_unspecified() {
        quic.set_ip(if quic.is_ipv4() {
            std::net::Ipv4Addr::LOCALHOST.into()
        } else {
            std::net::Ipv6Addr::LOCALHOST.into()
        });
    }
    quic.to_string()
}

pub fn read_runtime(data_dir: &Path) -> Option<BoundAddrs> {
    let text = std::fs::read_to_string(data_dir.join(RUNTIME_FILE)).ok()?;
    serde_json::from_str(&text).ok()
}

pub fn write_json_atomically(path: &Path, value: &impl serde::Serialize) -> std::io::Result<()> {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, serde_json::to_vec_pretty(value).unwrap_or_default())?;
    std::fs::rename(tmp, path)
}
