//! The device identity kept in the state dir.

use std::fs;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

const META: &str = "identity.json";
const KEY: &str = "device.key.der";
const CERT: &str = "device.crt.der";
const CA: &str = "ca.crt.der";

/// Everything the agent needs to connect.
#[derive(Clone)]
pub struct Identity {
    pub meta: IdentityMeta,
    /// PKCS#8 DER private key.
    pub key_der: Vec<u8>,
    pub cert_der: Vec<u8>,
    pub ca_der: Vec<u8>,
}

impl std::fmt::Debug for Identity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Identity")
            .field("meta", &self.meta)
            .field("key_der", &"<redacted>")
            .finish_non_exhaustive()
    }
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct IdentityMeta {
    pub device_id: String,
    pub device_name: String,
    pub control_plane: String,
}

#[derive(Debug, thiserror::Error)]
pub enum IdentityError {
    #[error("no device identity in {0} (run `edge-agent enroll TOKEN --state-dir {0}` first)")]
    NotEnrolled(PathBuf),
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path} is damaged: {message}")]
    Damaged { path: PathBuf, message: String },
    #[error("{0} already holds an identity; use another --state-dir or remove it to enroll again")]
    AlreadyEnrolled(PathBuf),
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> IdentityError + '_ {
    move |source| IdentityError::Io {
        path: path.to_path_buf(),
        source,
    }
}

impl Identity {
    pub fn exists(dir: &Path) -> bool {
        dir.join(META).exists()
    }

    pub fn load(dir: &Path) -> Result<Self, IdentityError> {
        let meta_path = dir.join(META);
        if !meta_path.exists() {
            return Err(IdentityError::NotEnrolled(dir.to_path_buf()));
        }
        let meta_text = fs::read_to_string(&meta_path).map_err(io_err(&meta_path))?;
        let meta = serde_json::from_str(&meta_text).map_err(|e| IdentityError::Damaged {
            path: meta_path.clone(),
            message: e.to_string(),
        })?;
        let read = |name: &str| {
            let p = dir.join(name);
            fs::read(&p).map_err(io_err(&p))
        };
        Ok(Self {
            meta,
            key_der: read(KEY)?,
            cert_der: read(CERT)?,
            ca_der: read(CA)?,
        })
    }

    /// Write atomically-enough for a one-time operation: the metadata file,
    /// which marks the identity as present, is written last.
    pub fn store(&self, dir: &Path) -> Result<(), IdentityError> {
        if Self::exists(dir) {
            return Err(IdentityError::AlreadyEnrolled(dir.to_path_buf()));
        }
        fs::create_dir_all(dir).map_err(io_err(dir))?;
        write_file(&dir.join(KEY), &self.key_der, 0o600)?;
        write_file(&dir.join(CERT), &self.cert_der, 0o644)?;
        write_file(&dir.join(CA), &self.ca_der, 0o644)?;
        let meta = serde_json::to_vec_pretty(&self.meta).unwrap_or_default();
        write_file(&dir.join(META), &meta, 0o644)
    }
}

fn write_file(path: &Path, data: &[u8], mode: u32) -> Result<(), IdentityError> {
    shared::files::write_atomic(path, data, mode).map_err(io_err(path))
}
