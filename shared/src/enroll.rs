//! Enrollment tokens: what an administrator hands to a new device.
//!
//! Text form: `cgt1_` followed by base64url (no padding) of the postcard
//! encoding of [`EnrollToken`]. The secret is 32 random bytes; the control
//! plane stores only its SHA-256.

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use serde::{Deserialize, Serialize};

pub const TOKEN_PREFIX: &str = "cgt1_";
const MAX_TOKEN_TEXT: usize = 2048;

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct EnrollToken {
    /// Address agents dial (`host:port` of the QUIC listener).
    pub addr: String,
    /// SHA-256 of the control plane's server certificate (DER), pinned
    /// during enrollment before the agent knows the CA.
    pub fingerprint: [u8; 32],
    /// The one-time secret.
    pub secret: String,
    /// Unix seconds after which the token is refused.
    pub expires_at: i64,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum TokenError {
    #[error("not a cellgate enrollment token (expected the prefix {TOKEN_PREFIX})")]
    Prefix,
    #[error("enrollment token is damaged (copy it again, completely)")]
    Damaged,
}

impl EnrollToken {
    pub fn encode(&self) -> String {
        let bytes = postcard::to_stdvec(self).unwrap_or_default();
        format!("{TOKEN_PREFIX}{}", URL_SAFE_NO_PAD.encode(bytes))
    }

    pub fn decode(text: &str) -> Result<Self, TokenError> {
        let text = text.trim();
        let body = text.strip_prefix(TOKEN_PREFIX).ok_or(TokenError::Prefix)?;
        if body.len() > MAX_TOKEN_TEXT {
            return Err(TokenError::Damaged);
        }
        let bytes = URL_SAFE_NO_PAD
            .decode(body)
            .map_err(|_| TokenError::Damaged)?;
        postcard::from_bytes(&bytes).map_err(|_| TokenError::Damaged)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip() {
        let t = EnrollToken {
            addr: "cp.example.net:4433".into(),
            fingerprint: [7; 32],
            secret: "s3cret".into(),
            expires_at: 1_900_000_000,
        };
        let s = t.encode();
        assert!(s.starts_with(TOKEN_PREFIX));
        assert_eq!(EnrollToken::decode(&format!("  {s}\n")).unwrap(), t);
        assert_eq!(EnrollToken::decode("nope"), Err(TokenError::Prefix));
        assert_eq!(
            EnrollToken::decode(&s[..s.len() - 3]),
            Err(TokenError::Damaged)
        );
    }
}
