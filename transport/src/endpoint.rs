//! QUIC endpoints and connections: transport parameters, quinn server/client configs from a
//! PKI directory, UDP sockets with enlarged buffers, accepting a device (certificate -> device
//! id) and connecting to the aggregator. One connection carries one long-lived bidirectional
//! stream, opened by the device.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use protocol::DeviceId;
use quinn::crypto::rustls::{QuicClientConfig, QuicServerConfig};
use quinn::{Connection, Endpoint, VarInt};
use rustls::pki_types::CertificateDer;

use crate::frame::FramedStream;
use crate::identity::{self, Identity};
use crate::revocation::{Fingerprint, Revocations};
use crate::tls::{client_tls_config, server_tls_config};
use crate::TransportError;

/// Per-stream receive window: a whole 20 MB update can be in flight.
pub const STREAM_RECEIVE_WINDOW_BYTES: u32 = 32 << 20;
/// Per-connection receive window.
pub const CONNECTION_RECEIVE_WINDOW_BYTES: u32 = 64 << 20;
/// Per-connection send window.
pub const SEND_WINDOW_BYTES: u64 = 64 << 20;
/// Streams a peer may open: the one message stream a device opens. The aggregator reads only
/// that one, so a further stream would let a device park data nobody reads in quinn's buffers;
/// quinn never grants it.
pub const MESSAGE_STREAMS: u32 = 1;
/// A connection with no traffic for this long is dropped.
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(60);
/// Keep-alive interval, well inside the idle timeout.
pub const KEEP_ALIVE_INTERVAL: Duration = Duration::from_secs(10);
/// Most connection attempts quinn holds before the server decided on them (accept, retry or
/// refuse, which the aggregator does at once); more are refused by quinn itself.
pub const MAX_INCOMING: usize = 4096;
/// Bytes quinn buffers for all undecided connection attempts together.
pub const INCOMING_BUFFER_TOTAL_BYTES: u64 = 16 << 20;
/// Requested UDP socket buffer size (the kernel caps it, e.g. at `net.core.rmem_max`): the
/// default (about 200 KiB on Linux) overflows when many devices upload at once.
pub const UDP_SOCKET_BUFFER_BYTES: usize = 4 << 20;

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
        .max_concurrent_bidi_streams(VarInt::from_u32(MESSAGE_STREAMS))
        .max_concurrent_uni_streams(VarInt::from_u32(0))
        .keep_alive_interval(Some(KEEP_ALIVE_INTERVAL.min(idle / 3)));
    // Durations below 2^62 ms fit the idle-timeout encoding.
    if let Ok(idle) = quinn::IdleTimeout::try_from(idle) {
        t.max_idle_timeout(Some(idle));
    }
    t
}

/// quinn server config from a server identity and the CA that signs device certificates.
pub fn server_config(
    identity: Identity,
    ca: &[CertificateDer<'static>],
) -> Result<quinn::ServerConfig, TransportError> {
    let crypto = QuicServerConfig::try_from(server_tls_config(identity, ca)?)?;
    let mut config = quinn::ServerConfig::with_crypto(Arc::new(crypto));
    config
        .transport_config(Arc::new(transport_config()))
        .max_incoming(MAX_INCOMING)
        .incoming_buffer_size_total(INCOMING_BUFFER_TOTAL_BYTES);
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
    let identity = identity::load_identity(&identity::server_paths(pki_dir))?;
    server_config(identity, &identity::load_ca(pki_dir)?)
}

/// Client config of device `id` from a PKI directory (`device-<id>.pem`, its key, `ca.pem`).
pub fn load_client_config(
    pki_dir: &Path,
    id: DeviceId,
) -> Result<quinn::ClientConfig, TransportError> {
    let identity = identity::load_identity(&identity::device_paths(pki_dir, id))?;
    client_config(&identity::load_ca(pki_dir)?, Some(identity))
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

/// A device connection as the aggregator sees it: the certified device id and its stream.
#[derive(Debug)]
pub struct DeviceConnection {
    pub device: DeviceId,
    /// SHA-256 of the device's certificate (DER).
    pub fingerprint: Fingerprint,
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
    accept(incoming, max_frame_bytes, None).await
}

/// [`accept_device`], refusing a device or certificate that `revocations` lists (checked right
/// after the handshake, against the file as it is now): the connection is closed with the
/// reason (error code 2) and [`TransportError::Revoked`] returned.
pub async fn accept_device_checked(
    incoming: quinn::Incoming,
    max_frame_bytes: usize,
    revocations: &Revocations,
) -> Result<DeviceConnection, TransportError> {
    accept(incoming, max_frame_bytes, Some(revocations)).await
}

async fn accept(
    incoming: quinn::Incoming,
    max_frame_bytes: usize,
    revocations: Option<&Revocations>,
) -> Result<DeviceConnection, TransportError> {
    let connection = incoming.await?;
    let identified = identity::peer_certificate(&connection).and_then(|leaf| {
        identity::device_id_from_cert(&leaf).map(|id| (id, Fingerprint::of(&leaf)))
    });
    let (device, fingerprint) = match identified {
        Ok(found) => found,
        Err(e) => {
            connection.close(VarInt::from_u32(1), b"certificate names no device");
            return Err(e.into());
        }
    };
    if let Some(revoked) = revocations.and_then(|r| r.check(device, fingerprint).err()) {
        connection.close(VarInt::from_u32(2), revoked.to_string().as_bytes());
        return Err(revoked.into());
    }
    let (send, recv) = connection.accept_bi().await?;
    tracing::debug!(%device, remote = %connection.remote_address(), "device connected");
    Ok(DeviceConnection {
        device,
        fingerprint,
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

/// [`connect`] with a client config of its own, so one endpoint (one UDP socket) can carry
/// the connections of many identities (load tests, gateways).
pub async fn connect_with(
    endpoint: &Endpoint,
    config: quinn::ClientConfig,
    addr: SocketAddr,
    server_name: &str,
    max_frame_bytes: usize,
) -> Result<AggregatorConnection, TransportError> {
    let connection = endpoint.connect_with(config, addr, server_name)?.await?;
    let (send, recv) = connection.open_bi().await?;
    Ok(AggregatorConnection {
        connection,
        stream: FramedStream::new(send, recv, max_frame_bytes),
    })
}
