//! Signed agent releases: the manifest the control plane signs and the
//! agent verifies before it replaces itself.
//!
//! The signature (ed25519, by the control plane's release key) covers a
//! canonical byte string built from four fields, one `key=value` line each,
//! in this order, every line ending in `\n`, UTF-8, no other whitespace:
//!
//! ```text
//! cellgate-release-v1
//! version=0.2.0
//! target=x86_64-unknown-linux-gnu
//! sha256=<64 lowercase hex digits of the binary's SHA-256>
//! size=<the binary's length in bytes, decimal, no leading zeros>
//! ```
//!
//! Versions and targets are restricted to `[A-Za-z0-9._+-]` (1..=64 bytes),
//! so no field can smuggle a line break into the signed text.

/// First line of the signed text; a new format gets a new tag.
pub const MANIFEST_TAG: &str = "cellgate-release-v1";
/// Largest agent binary a release may carry.
pub const MAX_RELEASE_SIZE: u64 = 256 * 1024 * 1024;
/// Length of an ed25519 public key.
pub const PUBLIC_KEY_LEN: usize = 32;
/// Length of an ed25519 signature.
pub const SIGNATURE_LEN: usize = 64;

/// What a release signature covers.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Manifest {
    pub version: String,
    pub target: String,
    pub sha256: [u8; 32],
    pub size: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ManifestError {
    #[error("invalid version {0:?}: use 1-64 characters from A-Z a-z 0-9 . _ + -")]
    Version(String),
    #[error(
        "invalid target {0:?}: use a target triple such as x86_64-unknown-linux-gnu (1-64 characters from A-Z a-z 0-9 . _ + -)"
    )]
    Target(String),
    #[error("a release must hold 1..={MAX_RELEASE_SIZE} bytes, not {0}")]
    Size(u64),
}

fn valid_token(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 64
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'+' | b'-'))
}

/// Whether `v` is acceptable as a release version.
pub fn valid_version(v: &str) -> bool {
    valid_token(v)
}

/// Whether `t` is acceptable as a target triple.
pub fn valid_target(t: &str) -> bool {
    valid_token(t)
}

impl Manifest {
    /// Check the fields that go into the signed text.
    pub fn validate(&self) -> Result<(), ManifestError> {
        if !valid_version(&self.version) {
            return Err(ManifestError::Version(self.version.clone()));
        }
        if !valid_target(&self.target) {
            return Err(ManifestError::Target(self.target.clone()));
        }
        if self.size == 0 || self.size > MAX_RELEASE_SIZE {
            return Err(ManifestError::Size(self.size));
        }
        Ok(())
    }

    /// The canonical byte string the signature covers (see the module
    /// documentation). Fails for fields that could make it ambiguous.
    pub fn signed_bytes(&self) -> Result<Vec<u8>, ManifestError> {
        self.validate()?;
        let mut hex = String::with_capacity(64);
        for b in self.sha256 {
            hex.push_str(&format!("{b:02x}"));
        }
        Ok(format!(
            "{MANIFEST_TAG}\nversion={}\ntarget={}\nsha256={hex}\nsize={}\n",
            self.version, self.target, self.size
        )
        .into_bytes())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn m() -> Manifest {
        Manifest {
            version: "0.2.0".into(),
            target: "x86_64-unknown-linux-gnu".into(),
            sha256: [0xab; 32],
            size: 1234,
        }
    }

    #[test]
    fn canonical_text_is_stable() {
        let text = String::from_utf8(m().signed_bytes().unwrap()).unwrap();
        assert_eq!(
            text,
            format!(
                "cellgate-release-v1\nversion=0.2.0\ntarget=x86_64-unknown-linux-gnu\nsha256={}\nsize=1234\n",
                "ab".repeat(32)
            )
        );
    }

    #[test]
    fn fields_that_could_forge_lines_are_refused() {
        let mut bad = m();
        bad.version = "1\nsize=1".into();
        assert!(matches!(bad.signed_bytes(), Err(ManifestError::Version(_))));
        let mut bad = m();
        bad.target = String::new();
        assert!(matches!(bad.signed_bytes(), Err(ManifestError::Target(_))));
        let mut bad = m();
        bad.size = 0;
        assert!(matches!(bad.signed_bytes(), Err(ManifestError::Size(0))));
        bad.size = MAX_RELEASE_SIZE + 1;
        assert!(bad.validate().is_err());
        assert!(valid_version("1.0.0-rc.1+build5"));
        assert!(!valid_version(&"x".repeat(65)));
    }
}
