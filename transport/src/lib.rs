//! FedSpine transport: QUIC with mutual TLS between the aggregator (server) and the device
//! agents (clients), framed message streams, and device identities in certificates.
//!
//! quinn 0.11 on rustls 0.23 with the ring provider, passed explicitly to every builder (and
//! installable as the process default with [`install_crypto_provider`]), TLS 1.3 only, ALPN
//! [`ALPN`] on both sides. The server requires a client certificate chaining to the private CA
//! and reads the device id out of it ([`peer_device_id`]); a client trusts only the CA and
//! presents its device certificate.
//!
//! One connection carries one long-lived bidirectional stream, opened by the device, on which
//! both sides exchange length-prefixed frames ([`protocol::codec`]), every read capped.
//!
//! | module | job |
//! |---|---|
//! | [`identity`] | PKI file names, PEM loading, device DNS name <-> id, certificate -> device |
//! | [`tls`] | rustls server and client configurations |
//! | [`endpoint`] | transport parameters, quinn configs and endpoints, accept and connect |
//! | [`frame`] | frames over a stream ([`send_frame`], [`send_frame_within`], [`recv_frame`], [`recv_frame_within`], [`FramedStream`]) |
//! | [`revocation`] | the revocation list (`revoked.txt`) checked after the handshake |
//!
//! The crate does not re-export quinn or tokio: a driver depends on them itself. Issuing
//! certificates is the aggregator's (`aggregator::pki`); this crate only reads them.

pub mod endpoint;
pub mod frame;
pub mod identity;
pub mod revocation;
pub mod tls;

pub use endpoint::{
    accept_device, accept_device_checked, client_config, client_endpoint, connect, connect_with,
    load_client_config, load_client_config_with_idle, load_server_config, server_config,
    server_endpoint, transport_config, transport_config_with_idle, AggregatorConnection,
    DeviceConnection, CONNECTION_RECEIVE_WINDOW_BYTES, IDLE_TIMEOUT, INCOMING_BUFFER_TOTAL_BYTES,
    KEEP_ALIVE_INTERVAL, MAX_INCOMING, SEND_WINDOW_BYTES, STREAM_RECEIVE_WINDOW_BYTES,
    UDP_SOCKET_BUFFER_BYTES,
};
pub use frame::{
    recv_frame, recv_frame_within, send_frame, send_frame_bytes, send_frame_within, FramedStream,
};
pub use identity::{
    ca_paths, device_dns_name, device_id_from_cert, device_paths, load_ca, load_certs,
    load_identity, load_key, parse_device_dns_name, peer_certificate, peer_device_id,
    read_private_key, server_paths, CertPaths, Identity, IdentityError, CA_CERT_FILE, CA_KEY_FILE,
    DEVICE_DOMAIN, SERVER_CERT_FILE, SERVER_KEY_FILE,
};
pub use revocation::{
    Fingerprint, RevocationError, RevocationList, Revocations, Revoked, REVOKED_FILE,
};
pub use tls::{
    client_tls_config, crypto_provider, install_crypto_provider, server_tls_config, ALPN,
};

use std::net::SocketAddr;

use quinn::crypto::rustls::NoInitialCipherSuite;

/// Why a transport operation failed.
#[derive(Debug, thiserror::Error)]
pub enum TransportError {
    #[error("TLS configuration: {0}")]
    Tls(#[from] rustls::Error),
    #[error("client certificate verifier: {0}")]
    Verifier(#[from] rustls::server::VerifierBuilderError),
    #[error("TLS configuration lacks the QUIC initial cipher suite: {0}")]
    CipherSuite(#[from] NoInitialCipherSuite),
    #[error(transparent)]
    Identity(#[from] IdentityError),
    #[error("cannot bind UDP socket {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot start connecting: {0}")]
    Connect(#[from] quinn::ConnectError),
    #[error("connection failed: {0}")]
    Connection(#[from] quinn::ConnectionError),
    #[error("stream write failed: {0}")]
    Write(#[from] quinn::WriteError),
    #[error("stream read failed: {0}")]
    Read(#[from] quinn::ReadError),
    #[error("stream already closed: {0}")]
    ClosedStream(#[from] quinn::ClosedStream),
    #[error(transparent)]
    Codec(#[from] protocol::CodecError),
    #[error("refused: {0}")]
    Revoked(#[from] Revoked),
    #[error("stream ended inside a frame: {got} of {expected} bytes")]
    Truncated { expected: usize, got: usize },
    #[error("a frame did not arrive whole within {limit_ms} ms of its first byte")]
    FrameTimeout { limit_ms: u64 },
    #[error("a frame was not sent whole within {limit_ms} ms: the peer is not reading")]
    SendTimeout { limit_ms: u64 },
}
