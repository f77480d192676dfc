//! TLS client configurations for the tunnel.
//!
//! Both are TLS 1.3 only with ALPN `cellgate/1` and no early data. During
//! enrollment the agent knows only the SHA-256 fingerprint of the control
//! plane's certificate (from the token) and pins exactly that certificate;
//! afterwards it trusts the control plane's private CA and nothing else,
//! and presents its own device certificate.

use std::sync::Arc;

use quinn::crypto::rustls::QuicClientConfig;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{CryptoProvider, WebPkiSupportedAlgorithms};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName, UnixTime};
use rustls::{DigitallySignedStruct, Error as TlsError, RootCertStore, SignatureScheme};
use sha2::{Digest, Sha256};
use shared::wire::ALPN;

#[derive(Debug, thiserror::Error)]
pub enum TlsSetupError {
    #[error("TLS configuration: {0}")]
    Tls(#[from] TlsError),
    #[error("QUIC crypto configuration: {0}")]
    Quic(String),
}

pub fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn finish(mut cfg: rustls::ClientConfig) -> Result<quinn::ClientConfig, TlsSetupError> {
    cfg.alpn_protocols = vec![ALPN.to_vec()];
    cfg.enable_early_data = false;
    let quic = QuicClientConfig::try_from(cfg).map_err(|e| TlsSetupError::Quic(e.to_string()))?;
    Ok(quinn::ClientConfig::new(Arc::new(quic)))
}

/// Enrollment: pin the control plane's certificate by fingerprint.
pub fn enroll_client_config(fingerprint: [u8; 32]) -> Result<quinn::ClientConfig, TlsSetupError> {
    let provider = provider();
    let verifier = Arc::new(PinnedServer {
        fingerprint,
        algorithms: provider.signature_verification_algorithms,
    });
    let cfg = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .dangerous()
        .with_custom_certificate_verifier(verifier)
        .with_no_client_auth();
    finish(cfg)
}

/// Normal operation: trust only the CA, present the device certificate.
pub fn device_client_config(
    ca_der: &[u8],
    cert_der: &[u8],
    key_der: &[u8],
) -> Result<quinn::ClientConfig, TlsSetupError> {
    let mut roots = RootCertStore::empty();
    roots.add(CertificateDer::from(ca_der.to_vec()))?;
    let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key_der.to_vec()));
    let cfg = rustls::ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_root_certificates(roots)
        .with_client_auth_cert(vec![CertificateDer::from(cert_der.to_vec())], key)?;
    finish(cfg)
}

/// Accepts exactly one end-entity certificate, by SHA-256 of its DER, and
/// still checks the handshake signature made with its key.
#[derive(Debug)]
struct PinnedServer {
    fingerprint: [u8; 32],
    algorithms: WebPkiSupportedAlgorithms,
}

impl ServerCertVerifier for PinnedServer {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, TlsError> {
        let got: [u8; 32] = Sha256::digest(end_entity.as_ref()).into();
        if got == self.fingerprint {
            Ok(ServerCertVerified::assertion())
        } else {
            Err(TlsError::General(
                "control plane certificate does not match the enrollment token's fingerprint"
                    .into(),
            ))
        }
    }

    fn verify_tls12_signature(
        &self,
        _message: &[u8],
        _cert: &CertificateDer<'_>,
        _dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, TlsError> {
        Err(TlsError::General("TLS 1.2 is not allowed".into()))
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, TlsError> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algorithms.supported_schemes()
    }
}
