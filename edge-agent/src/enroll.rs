//! Trading a one-time enrollment token for a device identity.

use std::path::Path;
use std::time::Duration;

use bytes::BytesMut;
use shared::enroll::EnrollToken;
use shared::quic::framed::{read_frame, write_frame};
use shared::wire::{EnrollMsg, MIN_PROTOCOL_VERSION, PROTOCOL_VERSION, SERVER_NAME, close_code};

use crate::identity::{Identity, IdentityMeta};
use crate::tunnel::{device_facts, make_endpoint, resolve};

const ENROLL_TIMEOUT: Duration = Duration::from_secs(20);

#[derive(Debug, thiserror::Error)]
pub enum EnrollError {
    #[error("{0}")]
    Token(#[from] shared::enroll::TokenError),
    #[error("this enrollment token expired; ask for a new one")]
    Expired,
    #[error(transparent)]
    Identity(#[from] crate::identity::IdentityError),
    #[error("cannot reach the control plane at {addr}: {message}")]
    Connect { addr: String, message: String },
    #[error("the control plane refused the enrollment: {0}")]
    Refused(String),
    #[error("enrollment failed: {0}")]
    Protocol(String),
}

/// Enroll and store the identity in `state_dir`. `control_plane` overrides
/// the address carried by the token (e.g. when the agent reaches the control
/// plane through a different name).
pub async fn enroll(
    token_text: &str,
    state_dir: &Path,
    control_plane: Option<&str>,
) -> Result<Identity, EnrollError> {
    let token = EnrollToken::decode(token_text)?;
    if token.expires_at < unix_now() {
        return Err(EnrollError::Expired);
    }
    if Identity::exists(state_dir) {
        return Err(
            crate::identity::IdentityError::AlreadyEnrolled(state_dir.to_path_buf()).into(),
        );
    }
    let addr_text = control_plane.unwrap_or(&token.addr).to_string();
    let connect_err = |message: String| EnrollError::Connect {
        addr: addr_text.clone(),
        message,
    };
    let key = rcgen::KeyPair::generate().map_err(|e| EnrollError::Protocol(e.to_string()))?;
    let addr = resolve(&addr_text)
        .await
        .map_err(|e| connect_err(e.to_string()))?;
    let endpoint = make_endpoint(addr).map_err(|e| connect_err(e.to_string()))?;
    let client = crate::tls::enroll_client_config(token.fingerprint)
        .map_err(|e| EnrollError::Protocol(e.to_string()))?;

    let exchange = async {
        let conn = endpoint
            .connect_with(client, addr, SERVER_NAME)
            .map_err(|e| connect_err(e.to_string()))?
            .await
            .map_err(|e| connect_err(e.to_string()))?;
        let (mut send, mut recv) = conn
            .open_bi()
            .await
            .map_err(|e| EnrollError::Protocol(e.to_string()))?;
        let request = EnrollMsg::Request {
            min_version: MIN_PROTOCOL_VERSION,
            max_version: PROTOCOL_VERSION,
            secret: token.secret.clone(),
            public_key: key.public_key_raw().to_vec(),
            facts: device_facts(),
        };
        write_frame(&mut send, &request)
            .await
            .map_err(|e| EnrollError::Protocol(e.to_string()))?;
        let mut buf = BytesMut::new();
        let answer = read_frame::<EnrollMsg>(&mut recv, &mut buf)
            .await
            .map_err(|e| EnrollError::Protocol(e.to_string()))?;
        conn.close(close_code::ENROLL_DONE.into(), b"enrolled");
        match answer {
            Some(EnrollMsg::Granted {
                device_id,
                device_name,
                certificate,
                ca_certificate,
                release_key,
            }) => Ok((
                Identity {
                    meta: IdentityMeta {
                        device_id,
                        device_name,
                        control_plane: addr_text.clone(),
                    },
                    key_der: key.serialize_der(),
                    cert_der: certificate,
                    ca_der: ca_certificate,
                },
                release_key,
            )),
            Some(EnrollMsg::Refused { message }) => Err(EnrollError::Refused(message)),
            Some(other) => Err(EnrollError::Protocol(format!(
                "unexpected answer {other:?}"
            ))),
            None => Err(EnrollError::Protocol(
                "control plane closed the stream".into(),
            )),
        }
    };
    let (identity, release_key) = tokio::time::timeout(ENROLL_TIMEOUT, exchange)
        .await
        .map_err(|_| connect_err("timed out".into()))??;
    let _ = tokio::time::timeout(Duration::from_secs(2), endpoint.wait_idle()).await;
    identity.store(state_dir)?;
    // The key self-updates must be signed with (empty from a control plane
    // that signs none).
    if !release_key.is_empty() {
        crate::update::store_release_key(state_dir, &release_key).map_err(|e| {
            EnrollError::Protocol(format!(
                "storing the release key in {}: {e}",
                state_dir.display()
            ))
        })?;
    }
    Ok(identity)
}

pub(crate) fn unix_now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}
