//! QUIC transport with mutual TLS: endpoint builders for the aggregator (server) and the device
//! agents (client), the certificate-to-device mapping, and framed message streams.
//!
//! quinn 0.11 on rustls 0.23 with the ring provider, passed explicitly to every builder (and
//! installable as the process default with [`install_crypto_provider`]), TLS 1.3 only, ALPN
//! [`ALPN`] on both sides. The server requires a client certificate chaining to the private CA
//! (rustls' `WebPkiClientVerifier`) and reads the device id out of it
//! ([`peer_device_id`]); a client trusts only the CA and presents its device certificate.
//!
//! One connection carries one long-lived bidirectional stream, opened by the device, on which
//! both sides exchange length-prefixed frames ([`protocol::codec`]). Every read is capped: the
//! length prefix is checked against the frame limit before the body is read, and the body is
//! read in chunks, so memory follows the bytes actually received.
//!
//! This module (and the binaries) are the only places in the aggregator that use tokio.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use protocol::{
    decode_body, encode_frame, frame_body_len, CodecError, DeviceId, Message, FRAME_HEADER_BYTES,
};
use quinn::crypto::rustls::{NoInitialCipherSuite, QuicClientConfig, QuicServerConfig};
use quinn::{Connection, Endpoint, RecvStream, SendStream, VarInt};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::CertificateDer;
use rustls::server::WebPkiClientVerifier;
use rustls::RootCertStore;

use crate::pki::{self, Identity, PkiError};

/// The async runtime and QUIC crates this transport is built on, for drivers outside this
/// crate (the device agent's client) so that they use exactly the same versions.
pub use {quinn, tokio};

/// Application protocol negotiated by TLS; both sides must set it or the handshake fails.
pub const ALPN: &[u8] = b"fedspine/1";
/// Per-stream receive window: a whole 20 MB update can be in flight.
pub const STREAM_RECEIVE_WINDOW_BYTES: u32 = 32 << 20;
/// Per-connection receive window.
pub const CONNECTION_RECEIVE_WINDOW_BYTES: u32 = 64 << 20;
/// Per-connection send window.
pub const SEND_WINDOW_BYTES: u64 = 64 << 20;
/// A connection with no traffic for this long is dropped.
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(60);
/// Keep-alive interval, well inside the idle timeout.
pub const KEEP_ALIVE_INTERVAL: Duration = Duration::from_secs(10);
/// Requested UDP socket buffer size (the kernel caps it, e.g. at `net.core.rmem_max`): the
/// default (about 200 KiB on Linux) overflows when many devices upload at once.
pub const UDP_SOCKET_BUFFER_BYTES: usize = 4 << 20;
/// Largest chunk read from a stream at once.
const READ_CHUNK_BYTES: usize = 1 << 20;

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
    Pki(#[from] PkiError),
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
    Codec(#[from] CodecError),
    #[error("stream ended inside a frame: {got} of {expected} bytes")]
    Truncated { expected: usize, got: usize },
    #[error("peer presented no certificate")]
    NoPeerCertificate,
}

/// The ring provider, shared by every config built here.
pub fn crypto_provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Installs ring as the process-wide rustls provider; harmless if one is already installed.
/// Call once at start-up in binaries (the builders here do not depend on it).
pub fn install_crypto_provider() {
    let _ = rustls::crypto::ring::default_provider().install_default();
}

/// Transport parameters sized for multi-MB updates.
pub fn transport_config() -> quinn::TransportConfig {
    transport_config_with_idle(IDLE_TIMEOUT)
}

/// [`transport_config`] with another idle timeout (the smaller of both sides' applies), and
/// keep-alives often enough (at most a third of it) that a healthy idle connection survives.
/// A short timeout lets a device notice a vanished aggregator quickly.
pub fn transport_config_with_idle(idle: Duration) -> quinn::TransportConfig {
    let mut t = quinn::TransportConfig::default();
    t.stream_receive_window(VarInt::from_u32(STREAM_RECEIVE_WINDOW_BYTES))
        .receive_window(VarInt::from_u32(CONNECTION_RECEIVE_WINDOW_BYTES))
        .send_window(SEND_WINDOW_BYTES)
        .max_concurrent_bidi_streams(VarInt::from_u32(4))
        .max_concurrent_uni_streams(VarInt::from_u32(0))
        .keep_alive_interval(Some(KEEP_ALIVE_INTERVAL.min(idle / 3)));
    // Durations below 2^62 ms fit the idle-timeout encoding.
    if let Ok(idle) = quinn::IdleTimeout::try_from(idle) {
        t.max_idle_timeout(Some(idle));
    }
    t
}

fn root_store(ca: &[CertificateDer<'static>]) -> Result<RootCertStore, TransportError> {
    let mut roots = RootCertStore::empty();
    for cert in ca {
        roots.add(cert.clone())?;
    }
    Ok(roots)
}

/// rustls server config: TLS 1.3, ALPN, client certificates required and verified against `ca`.
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

/// quinn server config from a server identity and the CA that signs device certificates.
pub fn server_config(
    identity: Identity,
    ca: &[CertificateDer<'static>],
) -> Result<quinn::ServerConfig, TransportError> {
    let crypto = QuicServerConfig::try_from(server_tls_config(identity, ca)?)?;
    let mut config = quinn::ServerConfig::with_crypto(Arc::new(crypto));
    config.transport_config(Arc::new(transport_config()));
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

/// quinn client config for a device.
pub fn client_config(
    ca: &[CertificateDer<'static>],
    identity: Option<Identity>,
) -> Result<quinn::ClientConfig, TransportError> {
    let crypto = QuicClientConfig::try_from(client_tls_config(ca, identity)?)?;
    let mut config = quinn::ClientConfig::new(Arc::new(crypto));
    config.transport_config(Arc::new(transport_config()));
    Ok(config)
}

/// Server config from a PKI directory (`server.pem`, `server.key.pem`, `ca.pem`).
pub fn load_server_config(pki_dir: &Path) -> Result<quinn::ServerConfig, TransportError> {
    let identity = pki::load_identity(&pki::server_paths(pki_dir))?;
    server_config(identity, &pki::load_ca(pki_dir)?)
}

/// Client config of device `id` from a PKI directory (`device-<id>.pem`, its key, `ca.pem`).
pub fn load_client_config(
    pki_dir: &Path,
    id: DeviceId,
) -> Result<quinn::ClientConfig, TransportError> {
    let identity = pki::load_identity(&pki::device_paths(pki_dir, id))?;
    client_config(&pki::load_ca(pki_dir)?, Some(identity))
}

/// [`load_client_config`] with the idle timeout of [`transport_config_with_idle`].
pub fn load_client_config_with_idle(
    pki_dir: &Path,
    id: DeviceId,
    idle: Duration,
) -> Result<quinn::ClientConfig, TransportError> {
    let mut config = load_client_config(pki_dir, id)?;
    config.transport_config(Arc::new(transport_config_with_idle(idle)));
    Ok(config)
}

/// A UDP socket bound to `addr` with enlarged buffers (best effort: a kernel cap is logged,
/// not an error).
fn bind_udp(addr: SocketAddr) -> Result<std::net::UdpSocket, TransportError> {
    let bind_err = |source| TransportError::Bind { addr, source };
    let socket = socket2::Socket::new(
        socket2::Domain::for_address(addr),
        socket2::Type::DGRAM,
        Some(socket2::Protocol::UDP),
    )
    .map_err(bind_err)?;
    if addr.is_ipv6() {
        // Accept IPv4-mapped peers too where the platform allows it.
        let _ = socket.set_only_v6(false);
    }
    for (what, result) in [
        (
            "receive",
            socket.set_recv_buffer_size(UDP_SOCKET_BUFFER_BYTES),
        ),
        ("send", socket.set_send_buffer_size(UDP_SOCKET_BUFFER_BYTES)),
    ] {
        if let Err(e) = result {
            tracing::warn!(%addr, buffer = what, error = %e, "cannot enlarge UDP socket buffer");
        }
    }
    socket.bind(&addr.into()).map_err(bind_err)?;
    Ok(socket.into())
}

fn endpoint_on(
    addr: SocketAddr,
    server: Option<quinn::ServerConfig>,
) -> Result<Endpoint, TransportError> {
    let socket = bind_udp(addr)?;
    Endpoint::new(
        quinn::EndpointConfig::default(),
        server,
        socket,
        Arc::new(quinn::TokioRuntime),
    )
    .map_err(|source| TransportError::Bind { addr, source })
}

/// A server endpoint listening on `addr` (needs a tokio runtime).
pub fn server_endpoint(
    addr: SocketAddr,
    config: quinn::ServerConfig,
) -> Result<Endpoint, TransportError> {
    endpoint_on(addr, Some(config))
}

/// A client endpoint bound to `bind` (e.g. `0.0.0.0:0`) using `config` for its connections
/// (needs a tokio runtime).
pub fn client_endpoint(
    bind: SocketAddr,
    config: quinn::ClientConfig,
) -> Result<Endpoint, TransportError> {
    let mut endpoint = endpoint_on(bind, None)?;
    endpoint.set_default_client_config(config);
    Ok(endpoint)
}

/// The device a connection's verified client certificate names.
pub fn peer_device_id(connection: &Connection) -> Result<DeviceId, TransportError> {
    let identity = connection
        .peer_identity()
        .ok_or(TransportError::NoPeerCertificate)?;
    let certs = identity
        .downcast::<Vec<CertificateDer<'static>>>()
        .map_err(|_| TransportError::NoPeerCertificate)?;
    let leaf = certs.first().ok_or(TransportError::NoPeerCertificate)?;
    Ok(pki::device_id_from_cert(leaf)?)
}

/// Writes one frame; returns its size in bytes.
pub async fn send_frame(send: &mut SendStream, message: &Message) -> Result<usize, TransportError> {
    let frame = encode_frame(message)?;
    send.write_all(&frame).await?;
    Ok(frame.len())
}

/// Reads one frame: `Ok(None)` when the peer finished the stream at a frame boundary. The
/// length prefix is checked against `max_frame_bytes` before any body byte is read, and the
/// body buffer grows only as bytes arrive. Returns the message and the frame size.
pub async fn recv_frame(
    recv: &mut RecvStream,
    max_frame_bytes: usize,
) -> Result<Option<(Message, usize)>, TransportError> {
    let mut header = [0u8; FRAME_HEADER_BYTES];
    let mut filled = 0;
    while filled < FRAME_HEADER_BYTES {
        match recv.read(&mut header[filled..]).await? {
            Some(n) => filled += n,
            None if filled == 0 => return Ok(None),
            None => {
                return Err(TransportError::Truncated {
                    expected: FRAME_HEADER_BYTES,
                    got: filled,
                })
            }
        }
    }
    let body_len = frame_body_len(header, max_frame_bytes)?;
    let mut body = Vec::with_capacity(body_len.min(READ_CHUNK_BYTES));
    while body.len() < body_len {
        let want = (body_len - body.len()).min(READ_CHUNK_BYTES);
        match recv.read_chunk(want, true).await? {
            Some(chunk) => body.extend_from_slice(&chunk.bytes),
            None => {
                return Err(TransportError::Truncated {
                    expected: body_len,
                    got: body.len(),
                })
            }
        }
    }
    let message = decode_body(&body)?;
    Ok(Some((message, FRAME_HEADER_BYTES + body_len)))
}

/// Both halves of a bidirectional stream carrying frames, with byte counters.
#[derive(Debug)]
pub struct FramedStream {
    send: SendStream,
    recv: RecvStream,
    max_frame_bytes: usize,
    bytes_sent: u64,
    bytes_received: u64,
}

impl FramedStream {
    /// Wraps a bidirectional stream; incoming frames over `max_frame_bytes` are refused.
    pub fn new(send: SendStream, recv: RecvStream, max_frame_bytes: usize) -> FramedStream {
        FramedStream {
            send,
            recv,
            max_frame_bytes,
            bytes_sent: 0,
            bytes_received: 0,
        }
    }

    /// Sends one message; returns the frame size.
    pub async fn send(&mut self, message: &Message) -> Result<usize, TransportError> {
        let n = send_frame(&mut self.send, message).await?;
        self.bytes_sent += n as u64;
        Ok(n)
    }

    /// Receives one message; `None` when the peer finished its side.
    pub async fn recv(&mut self) -> Result<Option<Message>, TransportError> {
        match recv_frame(&mut self.recv, self.max_frame_bytes).await? {
            Some((message, n)) => {
                self.bytes_received += n as u64;
                Ok(Some(message))
            }
            None => Ok(None),
        }
    }

    /// Writes raw bytes (for tests that forge frames).
    pub async fn send_raw(&mut self, bytes: &[u8]) -> Result<(), TransportError> {
        self.send.write_all(bytes).await?;
        self.bytes_sent += bytes.len() as u64;
        Ok(())
    }

    /// Finishes the sending side (the peer's `recv` then returns `None`).
    pub fn finish(&mut self) -> Result<(), TransportError> {
        Ok(self.send.finish()?)
    }

    /// The two halves, for a driver that reads and writes concurrently (use [`send_frame`]
    /// and [`recv_frame`] on them).
    pub fn into_parts(self) -> (SendStream, RecvStream) {
        (self.send, self.recv)
    }

    /// Frame bytes sent so far.
    pub fn bytes_sent(&self) -> u64 {
        self.bytes_sent
    }

    /// Frame bytes received so far.
    pub fn bytes_received(&self) -> u64 {
        self.bytes_received
    }
}

/// A device connection as the aggregator sees it: the certified device id and its stream.
#[derive(Debug)]
pub struct DeviceConnection {
    pub device: DeviceId,
    pub connection: Connection,
    pub stream: FramedStream,
}

/// Completes an incoming connection: TLS handshake (the client certificate is verified against
/// the CA by rustls), maps the certificate to a device id, and accepts the device's stream.
/// Whether the id is a registered device is the caller's (the coordinator's) decision.
pub async fn accept_device(
    incoming: quinn::Incoming,
    max_frame_bytes: usize,
) -> Result<DeviceConnection, TransportError> {
    let connection = incoming.await?;
    let device = match peer_device_id(&connection) {
        Ok(id) => id,
        Err(e) => {
            connection.close(VarInt::from_u32(1), b"certificate names no device");
            return Err(e);
        }
    };
    let (send, recv) = connection.accept_bi().await?;
    tracing::debug!(%device, remote = %connection.remote_address(), "device connected");
    Ok(DeviceConnection {
        device,
        connection,
        stream: FramedStream::new(send, recv, max_frame_bytes),
    })
}

/// A device's connection to the aggregator.
#[derive(Debug)]
pub struct AggregatorConnection {
    pub connection: Connection,
    pub stream: FramedStream,
}

/// Connects to the aggregator at `addr` (whose certificate must name `server_name`) and opens
/// the message stream. The stream becomes visible to the server with the first message sent.
pub async fn connect(
    endpoint: &Endpoint,
    addr: SocketAddr,
    server_name: &str,
    max_frame_bytes: usize,
) -> Result<AggregatorConnection, TransportError> {
    let connection = endpoint.connect(addr, server_name)?.await?;
    let (send, recv) = connection.open_bi().await?;
    Ok(AggregatorConnection {
        connection,
        stream: FramedStream::new(send, recv, max_frame_bytes),
    })
}
