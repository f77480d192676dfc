//! The control plane's private PKI: a CA that signs the control plane's
//! server certificate and every device certificate. Created on first start
//! in `DATA_DIR/pki/`, loaded afterwards.

use std::fs;
use std::path::Path;

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose, PKCS_ECDSA_P256_SHA256, PublicKeyData, SignatureAlgorithm,
};
use sha2::{Digest, Sha256};

const CA_CERT: &str = "ca.crt.der";
const CA_KEY: &str = "ca.key.der";
const SERVER_CERT: &str = "server.crt.der";
const SERVER_KEY: &str = "server.key.der";
const CA_NAME: &str = "cellgate device CA";
/// Key for QUIC stateless resets. Kept across restarts so a restarted
/// control plane can tell agents at once that their old connection is gone,
/// instead of leaving them to wait out the idle timeout.
const RESET_KEY: &str = "quic-reset.key";

#[derive(Debug, thiserror::Error)]
pub enum PkiError {
    #[error("{path}: {source}")]
    Io {
        path: std::path::PathBuf,
        source: std::io::Error,
    },
    #[error("certificate: {0}")]
    Cert(#[from] rcgen::Error),
    #[error("the agent's public key is not an uncompressed P-256 point")]
    BadPublicKey,
}

pub struct Pki {
    pub ca_cert_der: Vec<u8>,
    ca_key: KeyPair,
    pub server_cert_der: Vec<u8>,
    pub server_key_der: Vec<u8>,
    /// SHA-256 of the server certificate, pinned by enrollment tokens.
    pub server_fingerprint: [u8; 32],
    pub reset_key: Vec<u8>,
}

fn ca_params() -> CertificateParams {
    let mut p = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, CA_NAME);
    p.distinguished_name = dn;
    p.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    p.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    p
}

impl Pki {
    /// Load the PKI from `dir`, creating it on first start.
    pub fn load_or_create(dir: &Path) -> Result<Self, PkiError> {
        fs::create_dir_all(dir).map_err(io_err(dir))?;
        let ca_key_path = dir.join(CA_KEY);
        let (ca_cert_der, ca_key) = if ca_key_path.exists() {
            let key = KeyPair::try_from(read(&ca_key_path)?.as_slice())?;
            (read(&dir.join(CA_CERT))?, key)
        } else {
            let key = KeyPair::generate()?;
            let cert = ca_params().self_signed(&key)?;
            write(&dir.join(CA_CERT), cert.der(), 0o644)?;
            write(&ca_key_path, &key.serialize_der(), 0o600)?;
            (cert.der().to_vec(), key)
        };
        let server_key_path = dir.join(SERVER_KEY);
        let (server_cert_der, server_key_der) = if server_key_path.exists() {
            (read(&dir.join(SERVER_CERT))?, read(&server_key_path)?)
        } else {
            let key = KeyPair::generate()?;
            let mut p = CertificateParams::new(vec![shared::wire::SERVER_NAME.to_string()])?;
            p.distinguished_name
                .push(DnType::CommonName, "cellgate control plane");
            p.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
            p.key_usages = vec![KeyUsagePurpose::DigitalSignature];
            let issuer = Issuer::new(ca_params(), &ca_key);
            let cert = p.signed_by(&key, &issuer)?;
            write(&dir.join(SERVER_CERT), cert.der(), 0o644)?;
            write(&server_key_path, &key.serialize_der(), 0o600)?;
            (cert.der().to_vec(), key.serialize_der())
        };
        let server_fingerprint = Sha256::digest(&server_cert_der).into();
        let reset_path = dir.join(RESET_KEY);
        let reset_key = if reset_path.exists() && read(&reset_path)?.len() == 32 {
            read(&reset_path)?
        } else {
            let k = rand::random::<[u8; 32]>().to_vec();
            write(&reset_path, &k, 0o600)?;
            k
        };
        Ok(Self {
            reset_key,
            ca_cert_der,
            ca_key,
            server_cert_der,
            server_key_der,
            server_fingerprint,
        })
    }

    /// Issue a client certificate for `device_id` over the agent's own key.
    pub fn sign_device(&self, device_id: &str, public_key: &[u8]) -> Result<Vec<u8>, PkiError> {
        if public_key.len() != 65 || public_key[0] != 0x04 {
            return Err(PkiError::BadPublicKey);
        }
        let mut p = CertificateParams::new(Vec::<String>::new())?;
        p.distinguished_name.push(DnType::CommonName, device_id);
        p.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        p.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        let issuer = Issuer::new(ca_params(), &self.ca_key);
        let cert = p.signed_by(&RawP256(public_key), &issuer)?;
        Ok(cert.der().to_vec())
    }
}

/// SHA-256 hex of a certificate, the key under which devices are stored.
pub fn fingerprint_hex(der: &[u8]) -> String {
    hex::encode(Sha256::digest(der))
}

struct RawP256<'a>(&'a [u8]);

impl PublicKeyData for RawP256<'_> {
    fn der_bytes(&self) -> &[u8] {
        self.0
    }
    fn algorithm(&self) -> &'static SignatureAlgorithm {
        &PKCS_ECDSA_P256_SHA256
    }
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> PkiError + '_ {
    move |source| PkiError::Io {
        path: path.to_path_buf(),
        source,
    }
}

fn read(path: &Path) -> Result<Vec<u8>, PkiError> {
    fs::read(path).map_err(io_err(path))
}

fn write(path: &Path, data: &[u8], mode: u32) -> Result<(), PkiError> {
    shared::files::write_atomic(path, data, mode).map_err(io_err(path))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn creates_then_loads_the_same_identity() {
        let dir = std::env::temp_dir().join(format!("cg-pki-{}", rand::random::<u64>()));
        let a = Pki::load_or_create(&dir).unwrap();
        let b = Pki::load_or_create(&dir).unwrap();
        assert_eq!(a.server_fingerprint, b.server_fingerprint);
        assert_eq!(a.ca_cert_der, b.ca_cert_der);
        let key = KeyPair::generate().unwrap();
        let cert = b.sign_device("dev-1", key.public_key_raw()).unwrap();
        assert!(!cert.is_empty());
        assert!(b.sign_device("dev-1", &[1, 2, 3]).is_err());
        let _ = fs::remove_dir_all(dir);
    }
}
