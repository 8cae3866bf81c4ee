//! TLS configurations for both sides: rustls 0.23 on the ring provider, TLS 1.3 only, ALPN
//! [`ALPN`]; the server requires a client certificate chaining to the private CA, a client
//! trusts only that CA.

use std::sync::Arc;

use rustls::crypto::CryptoProvider;
use rustls::pki_types::CertificateDer;
use rustls::server::WebPkiClientVerifier;
use rustls::RootCertStore;

use crate::identity::Identity;
use crate::TransportError;

/// Application protocol negotiated by TLS; both sides must set it or the handshake fails.
pub const ALPN: &[u8] = b"fedspine/1";

/// The ring provider, shared by every config built here.
pub fn crypto_provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Installs ring as the process-wide rustls provider; harmless if one is already installed.
/// Call once at start-up in binaries (the builders here do not depend on it).
pub fn install_crypto_provider() {
    let _ = rustls::crypto::ring::default_provider().install_default();
}

fn root_store(ca: &[CertificateDer<'static>]) -> Result<RootCertStore, TransportError> {
    let mut roots = RootCertStore::empty();
    for cert in ca {
        roots.add(cert.clone())?;
    }
    Ok(roots)
}

/// rustls server config: TLS 1.3, ALPN, client certificates required and verified against `ca`
/// (rustls' `WebPkiClientVerifier`).
pub fn server_tls_config(
    identity: Identity,
    ca: &[CertificateDer<'static>],
) -> Result<rustls::ServerConfig, TransportError> {
    let provider = crypto_provider();
    let verifier =
        WebPkiClientVerifier::builder_with_provider(Arc::new(root_store(ca)?), provider.clone())
            .build()?;
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_client_cert_verifier(verifier)
        .with_single_cert(identity.chain, identity.key)?;
    config.alpn_protocols = vec![ALPN.to_vec()];
    Ok(config)
}

/// rustls client config: TLS 1.3, ALPN, trusts only `ca`, presents `identity` when given
/// (a client without one is refused by the aggregator; `None` exists for tests and tools).
pub fn client_tls_config(
    ca: &[CertificateDer<'static>],
    identity: Option<Identity>,
) -> Result<rustls::ClientConfig, TransportError> {
    let builder = rustls::ClientConfig::builder_with_provider(crypto_provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_root_certificates(root_store(ca)?);
    let mut config = match identity {
        Some(id) => builder.with_client_auth_cert(id.chain, id.key)?,
        None => builder.with_no_client_auth(),
    };
    config.alpn_protocols = vec![ALPN.to_vec()];
    Ok(config)
}
