//! Loopback QUIC tests: mutual TLS identifies devices, refuses clients without a certificate,
//! with another CA's certificate or another ALPN, a device certificate cannot serve as the
//! aggregator, a revoked device is refused after its handshake, a private key others can read
//! is refused on load, oversized frames are refused, and a frame must arrive whole within its
//! deadline once its first byte came (a trickled one fails, a split but timely one passes), and
//! a send to a peer that stops reading ends at its deadline.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use protocol::*;
use quinn::crypto::rustls::QuicClientConfig;
use rcgen::{
    BasicConstraints, CertificateParams, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose,
};
use tokio::time::timeout;
use transport::{identity, TransportError};

const LIMIT: Duration = Duration::from_secs(20);

/// Sets a file's permission bits (Unix).
fn chmod(path: &Path, mode: u32) {
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).unwrap();
    }
    #[cfg(not(unix))]
    let _ = (path, mode);
}

/// Writes a certificate and its key (owner-only) where the PKI layout expects them.
fn write_pair(paths: &identity::CertPaths, cert: &rcgen::Certificate, key: &KeyPair) {
    std::fs::write(&paths.cert, cert.pem()).unwrap();
    std::fs::write(&paths.key, key.serialize_pem()).unwrap();
    chmod(&paths.key, 0o600);
}

/// A PKI directory as `aggregator ca` lays it out (issuance is the aggregator's; these are
/// test certificates with the same names and usages): a CA, a server certificate for
/// `localhost` and `127.0.0.1`, and one certificate per device.
fn pki_dir(dir: &Path, devices: &[u64]) {
    let ca_key = KeyPair::generate().unwrap();
    let mut ca = CertificateParams::default();
    ca.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    ca.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    write_pair(
        &identity::ca_paths(dir),
        &ca.self_signed(&ca_key).unwrap(),
        &ca_key,
    );
    let issuer = Issuer::new(ca, ca_key);
    let leaf = |names: Vec<String>, usage, paths: identity::CertPaths| {
        let key = KeyPair::generate().unwrap();
        let mut params = CertificateParams::new(names).unwrap();
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![usage];
        params.use_authority_key_identifier_extension = true;
        write_pair(&paths, &params.signed_by(&key, &issuer).unwrap(), &key);
    };
    leaf(
        vec!["localhost".into(), "127.0.0.1".into()],
        ExtendedKeyUsagePurpose::ServerAuth,
        identity::server_paths(dir),
    );
    for &d in devices {
        leaf(
            vec![identity::device_dns_name(DeviceId(d))],
            ExtendedKeyUsagePurpose::ClientAuth,
            identity::device_paths(dir, DeviceId(d)),
        );
    }
}

/// A full-rank update of zeros over every adapted layer of the model.
fn zero_adapter(dims: &ModelDims, rank: u32, alpha: f32) -> AdapterPayload {
    let layers = (0..dims.n_blocks)
        .flat_map(|block| {
            Proj::ALL.into_iter().map(move |proj| {
                let (out, inp) = dims.full_shape(proj);
                LayerAdapter {
                    block,
                    proj,
                    a: Tensor2::zeros(rank, inp as u32),
                    b: Tensor2::zeros(out as u32, rank),
                }
            })
        })
        .collect();
    AdapterPayload {
        rank,
        alpha,
        layers,
    }
}

fn server(dir: &Path) -> (quinn::Endpoint, SocketAddr) {
    let config = transport::load_server_config(dir).unwrap();
    let endpoint = transport::server_endpoint("127.0.0.1:0".parse().unwrap(), config).unwrap();
    let addr = endpoint.local_addr().unwrap();
    (endpoint, addr)
}

fn client(config: quinn::ClientConfig) -> quinn::Endpoint {
    transport::client_endpoint("127.0.0.1:0".parse().unwrap(), config).unwrap()
}

fn join(id: u64) -> Message {
    Message::Join(Join {
        protocol_version: PROTOCOL_VERSION,
        device_id: DeviceId(id),
        capabilities: Capabilities {
            ram_bytes: 4 << 30,
            backend: "flex".into(),
            bench_score: None,
            device_class: None,
        },
    })
}

/// Accepts one connection and returns the device id it was mapped to (or the error).
async fn accept_one(
    endpoint: &quinn::Endpoint,
) -> Result<transport::DeviceConnection, TransportError> {
    let incoming = endpoint.accept().await.expect("endpoint open");
    transport::accept_device(incoming, DEFAULT_MAX_FRAME_BYTES).await
}

/// A client that connects, joins and waits for an answer; all of it must fail for a refused
/// client (the TLS 1.3 client may finish its handshake before the server rejects it).
async fn try_session(
    endpoint: &quinn::Endpoint,
    addr: SocketAddr,
) -> Result<Message, TransportError> {
    let mut conn = transport::connect(endpoint, addr, "localhost", DEFAULT_MAX_FRAME_BYTES).await?;
    conn.stream.send(&join(7)).await?;
    conn.stream.recv().await?.ok_or(TransportError::Truncated {
        expected: 1,
        got: 0,
    })
}

#[tokio::test]
async fn a_device_with_a_valid_certificate_is_identified() {
    let dir = tempfile::tempdir().unwrap();
    pki_dir(dir.path(), &[7]);
    let (server_ep, addr) = server(dir.path());
    let server_task = tokio::spawn(async move {
        let mut dev = accept_one(&server_ep).await.unwrap();
        let first = dev.stream.recv().await.unwrap().unwrap();
        dev.stream
            .send(&Message::Welcome(Welcome {
                protocol_version: PROTOCOL_VERSION,
                device_id: dev.device,
                model: ModelDims::SMOLLM2_135M,
                lora_alpha: 16.0,
                heartbeat_interval_ms: 1000,
            }))
            .await
            .unwrap();
        // A multi-MB update arrives whole.
        let big = dev.stream.recv().await.unwrap().unwrap();
        let end = dev.stream.recv().await.unwrap();
        (dev.device, first, big, end, dev.stream.bytes_received())
    });
    let client_ep = client(transport::load_client_config(dir.path(), DeviceId(7)).unwrap());
    let mut conn = timeout(
        LIMIT,
        transport::connect(&client_ep, addr, "localhost", DEFAULT_MAX_FRAME_BYTES),
    )
    .await
    .unwrap()
    .unwrap();
    conn.stream.send(&join(7)).await.unwrap();
    let welcome = timeout(LIMIT, conn.stream.recv()).await.unwrap().unwrap();
    assert!(matches!(welcome, Some(Message::Welcome(w)) if w.device_id == DeviceId(7)));
    // A full rank-16 SmolLM2 update (about 20 MB) crosses in one frame.
    let dims = ModelDims::SMOLLM2_135M;
    let kept = KeptIndices::full(&dims);
    let adapter = zero_adapter(&dims, 16, 16.0);
    let update = Message::Update(Update {
        round: RoundId(1),
        adapter,
        kept,
        stats: UpdateStats {
            loss_pre: 3.0,
            loss_post: 2.5,
            sparsity: 0.0,
            param_count: 134_515_008,
            compute_ms: 1000,
            bytes_down: 0,
            bytes_up: 0,
            peak_mem_bytes: 0,
            samples: 32,
            steps: 10,
        },
    });
    conn.stream.send(&update).await.unwrap();
    conn.stream.finish().unwrap();
    let (device, first, got_big, end, received) =
        timeout(LIMIT, server_task).await.unwrap().unwrap();
    assert_eq!(device, DeviceId(7));
    assert_eq!(first, join(7));
    assert_eq!(got_big, update);
    assert_eq!(end, None);
    assert_eq!(received, conn.stream.bytes_sent());
    assert!(received > 19_000_000, "{received}");
}

#[tokio::test]
async fn a_client_without_a_certificate_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    pki_dir(dir.path(), &[]);
    let (server_ep, addr) = server(dir.path());
    let ca = identity::load_ca(dir.path()).unwrap();
    let client_ep = client(transport::client_config(&ca, None).unwrap());
    let (server_side, client_side) = tokio::join!(
        timeout(LIMIT, accept_one(&server_ep)),
        timeout(LIMIT, try_session(&client_ep, addr)),
    );
    let err = server_side.unwrap().unwrap_err();
    assert!(matches!(err, TransportError::Connection(_)), "{err}");
    assert!(client_side.unwrap().is_err());
}

#[tokio::test]
async fn a_certificate_from_another_ca_is_refused() {
    let ours = tempfile::tempdir().unwrap();
    pki_dir(ours.path(), &[]);
    let theirs = tempfile::tempdir().unwrap();
    pki_dir(theirs.path(), &[7]);
    let (server_ep, addr) = server(ours.path());
    // The client trusts our CA (so it accepts the server) but presents a device certificate
    // signed by another CA.
    let identity =
        identity::load_identity(&identity::device_paths(theirs.path(), DeviceId(7))).unwrap();
    let ca = identity::load_ca(ours.path()).unwrap();
    let client_ep = client(transport::client_config(&ca, Some(identity)).unwrap());
    let (server_side, client_side) = tokio::join!(
        timeout(LIMIT, accept_one(&server_ep)),
        timeout(LIMIT, try_session(&client_ep, addr)),
    );
    let err = server_side.unwrap().unwrap_err();
    assert!(
        err.to_string().contains("invalid peer certificate"),
        "{err}"
    );
    assert!(client_side.unwrap().is_err());
}

#[tokio::test]
async fn a_server_from_another_ca_is_refused_by_the_client() {
    let ours = tempfile::tempdir().unwrap();
    pki_dir(ours.path(), &[7]);
    let theirs = tempfile::tempdir().unwrap();
    pki_dir(theirs.path(), &[]);
    let (server_ep, addr) = server(theirs.path());
    let client_ep = client(transport::load_client_config(ours.path(), DeviceId(7)).unwrap());
    let (server_side, client_side) = tokio::join!(
        timeout(LIMIT, accept_one(&server_ep)),
        timeout(LIMIT, try_session(&client_ep, addr)),
    );
    assert!(server_side.unwrap().is_err());
    let err = client_side.unwrap().unwrap_err();
    assert!(
        err.to_string().contains("invalid peer certificate"),
        "{err}"
    );
}

#[tokio::test]
async fn a_client_with_another_alpn_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    pki_dir(dir.path(), &[7]);
    let (server_ep, addr) = server(dir.path());
    let identity =
        identity::load_identity(&identity::device_paths(dir.path(), DeviceId(7))).unwrap();
    let ca = identity::load_ca(dir.path()).unwrap();
    let mut tls = transport::client_tls_config(&ca, Some(identity)).unwrap();
    tls.alpn_protocols = vec![b"fedspine/0".to_vec()];
    let config = quinn::ClientConfig::new(Arc::new(QuicClientConfig::try_from(tls).unwrap()));
    let client_ep = client(config);
    let (server_side, client_side) = tokio::join!(
        timeout(LIMIT, accept_one(&server_ep)),
        timeout(LIMIT, try_session(&client_ep, addr)),
    );
    assert!(server_side.unwrap().is_err());
    assert!(client_side.unwrap().is_err());
}

#[tokio::test]
async fn oversized_and_forged_frames_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    pki_dir(dir.path(), &[3]);
    let (server_ep, addr) = server(dir.path());
    let server_task = tokio::spawn(async move {
        let mut results = Vec::new();
        for _ in 0..2 {
            let mut dev = accept_one(&server_ep).await.unwrap();
            results.push(dev.stream.recv().await.map(|_| ()));
        }
        results
    });
    let client_ep = client(transport::load_client_config(dir.path(), DeviceId(3)).unwrap());

    // 1. A length prefix claiming 4 GiB (the most a u32 prefix can claim) and nothing else.
    let mut conn = transport::connect(&client_ep, addr, "localhost", DEFAULT_MAX_FRAME_BYTES)
        .await
        .unwrap();
    conn.stream.send_raw(&u32::MAX.to_le_bytes()).await.unwrap();

    // 2. A small frame whose inner vector length claims 64 GiB of f32 values.
    let mut conn2 = transport::connect(&client_ep, addr, "localhost", DEFAULT_MAX_FRAME_BYTES)
        .await
        .unwrap();
    let mut body = vec![
        b'F',
        b'S',
        PROTOCOL_VERSION as u8,
        (PROTOCOL_VERSION >> 8) as u8,
    ];
    body.extend_from_slice(&3u32.to_le_bytes()); // Message::Update
    body.extend_from_slice(&1u64.to_le_bytes()); // round
    body.extend_from_slice(&16u32.to_le_bytes()); // rank
    body.extend_from_slice(&16f32.to_le_bytes()); // alpha
    body.extend_from_slice(&1u64.to_le_bytes()); // one layer
    body.extend_from_slice(&[0; 8]); // block 0, proj Q
    body.extend_from_slice(&16u32.to_le_bytes());
    body.extend_from_slice(&576u32.to_le_bytes());
    body.extend_from_slice(&0u32.to_le_bytes()); // Buffer::F32
    body.extend_from_slice(&(1u64 << 34).to_le_bytes()); // 2^34 f32 = 64 GiB
    let mut frame = (body.len() as u32).to_le_bytes().to_vec();
    frame.extend_from_slice(&body);
    conn2.stream.send_raw(&frame).await.unwrap();

    let results = timeout(LIMIT, server_task).await.unwrap().unwrap();
    let mut texts: Vec<String> = results
        .into_iter()
        .map(|r| r.unwrap_err().to_string())
        .collect();
    texts.sort();
    assert_eq!(
        texts,
        vec![
            "frame body of 4294967295 bytes exceeds the limit of 134217728 bytes".to_string(),
            "invalid message body: LimitExceeded".to_string(),
        ]
    );
    drop(conn);
    drop(conn2);
}

#[tokio::test]
async fn a_device_certificate_cannot_serve_as_the_aggregator() {
    let dir = tempfile::tempdir().unwrap();
    pki_dir(dir.path(), &[4, 7]);
    // A rogue server presents device 4's certificate and key, signed by the very CA device 7
    // trusts.
    let stolen = identity::load_identity(&identity::device_paths(dir.path(), DeviceId(4))).unwrap();
    let ca = identity::load_ca(dir.path()).unwrap();
    let rogue = transport::server_config(stolen, &ca).unwrap();
    let server_ep = transport::server_endpoint("127.0.0.1:0".parse().unwrap(), rogue).unwrap();
    let addr = server_ep.local_addr().unwrap();
    let client_ep = client(transport::load_client_config(dir.path(), DeviceId(7)).unwrap());
    // Dialled as the aggregator's name or as the device's own name: either way the
    // certificate is for client authentication only (rustls checks the server-auth usage
    // before the name, and `aggregator ca` never issues a device certificate server-auth).
    let expect = "does not allow extended key usage for server authentication";
    for name in ["localhost", "device-4.fedspine"] {
        let client_side = timeout(
            LIMIT,
            transport::connect(&client_ep, addr, name, DEFAULT_MAX_FRAME_BYTES),
        );
        let (server_side, client_side) =
            tokio::join!(timeout(LIMIT, accept_one(&server_ep)), client_side);
        assert!(server_side.unwrap().is_err(), "{name}");
        let err = client_side.unwrap().unwrap_err().to_string();
        assert!(
            err.contains("invalid peer certificate") && err.contains(expect),
            "{name}: {err}"
        );
    }
}

#[tokio::test]
async fn a_revoked_device_is_refused_after_its_handshake_and_others_are_not() {
    let dir = tempfile::tempdir().unwrap();
    pki_dir(dir.path(), &[4, 5]);
    let revocations = transport::Revocations::open_in(dir.path()).unwrap();
    let (server_ep, addr) = server(dir.path());
    let five = client(transport::load_client_config(dir.path(), DeviceId(5)).unwrap());
    let four = client(transport::load_client_config(dir.path(), DeviceId(4)).unwrap());
    async fn session(
        ep: &quinn::Endpoint,
        addr: SocketAddr,
        id: u64,
    ) -> Result<(), TransportError> {
        let mut conn = transport::connect(ep, addr, "localhost", DEFAULT_MAX_FRAME_BYTES).await?;
        conn.stream.send(&join(id)).await?;
        // The server only reads the join; wait for it to close the connection.
        let _ = conn.stream.recv().await;
        Ok(())
    }
    async fn accept(
        server_ep: &quinn::Endpoint,
        revs: &transport::Revocations,
    ) -> Result<(DeviceId, Option<Message>), TransportError> {
        let incoming = server_ep.accept().await.expect("endpoint open");
        let mut dev =
            transport::accept_device_checked(incoming, DEFAULT_MAX_FRAME_BYTES, revs).await?;
        let first = dev.stream.recv().await?;
        dev.connection.close(quinn::VarInt::from_u32(0), b"done");
        Ok((dev.device, first))
    }
    // Before the revocation device 5 is admitted.
    let (server_side, _) = tokio::join!(
        timeout(LIMIT, accept(&server_ep, &revocations)),
        timeout(LIMIT, session(&five, addr, 5))
    );
    assert_eq!(server_side.unwrap().unwrap(), (DeviceId(5), Some(join(5))));
    // Revoke it by editing the file; the same list object sees the change.
    std::fs::write(revocations.path(), "# lost on a train\ndevice-5\n").unwrap();
    let (server_side, client_side) = tokio::join!(
        timeout(LIMIT, accept(&server_ep, &revocations)),
        timeout(LIMIT, session(&five, addr, 5))
    );
    let err = server_side.unwrap().unwrap_err();
    assert!(
        matches!(
            err,
            TransportError::Revoked(transport::Revoked::Device(DeviceId(5)))
        ),
        "{err}"
    );
    // The device learns why (from the close reason) or fails to send at all.
    if let Ok(Err(e)) = client_side {
        assert!(e.to_string().contains("device-5 is revoked"), "{e}");
    }
    let (server_side, _) = tokio::join!(
        timeout(LIMIT, accept(&server_ep, &revocations)),
        timeout(LIMIT, session(&four, addr, 4))
    );
    assert_eq!(server_side.unwrap().unwrap(), (DeviceId(4), Some(join(4))));
    // By fingerprint: device 4's current certificate only.
    let cert = identity::load_certs(&identity::device_paths(dir.path(), DeviceId(4)).cert).unwrap();
    let fp = transport::Fingerprint::of(&cert[0]);
    std::fs::write(revocations.path(), format!("{fp}\n")).unwrap();
    let (server_side, _) = tokio::join!(
        timeout(LIMIT, accept(&server_ep, &revocations)),
        timeout(LIMIT, session(&four, addr, 4))
    );
    let err = server_side.unwrap().unwrap_err();
    assert_eq!(
        err.to_string(),
        format!("refused: certificate {fp} of device-4 is revoked")
    );
}

#[cfg(unix)]
#[test]
fn a_private_key_others_can_read_is_refused_on_load() {
    let dir = tempfile::tempdir().unwrap();
    pki_dir(dir.path(), &[7]);
    let key = identity::device_paths(dir.path(), DeviceId(7)).key;
    chmod(&key, 0o644);
    let err = transport::load_client_config(dir.path(), DeviceId(7)).unwrap_err();
    assert_eq!(
        err.to_string(),
        format!(
            "{0}: private key is accessible by group or others (mode 644); restrict it with `chmod 600 {0}`",
            key.display()
        )
    );
    let server_key = identity::server_paths(dir.path()).key;
    chmod(&server_key, 0o640);
    let err = transport::load_server_config(dir.path()).unwrap_err();
    assert!(err.to_string().contains("(mode 640)"), "{err}");
    chmod(&key, 0o600);
    transport::load_client_config(dir.path(), DeviceId(7)).unwrap();
}

#[tokio::test]
async fn a_frame_must_arrive_whole_within_its_deadline_from_its_first_byte() {
    let dir = tempfile::tempdir().unwrap();
    pki_dir(dir.path(), &[3]);
    let (server_ep, addr) = server(dir.path());
    let deadline = Duration::from_millis(500);
    let server_task = tokio::spawn(async move {
        let dev = accept_one(&server_ep).await.unwrap();
        let (_send, mut recv) = dev.stream.into_parts();
        // The first frame comes after an idle second (waiting for a first byte has no
        // deadline), split in two parts 100 ms apart; the second trickles.
        let first = transport::recv_frame_within(&mut recv, DEFAULT_MAX_FRAME_BYTES, deadline)
            .await
            .map(|f| f.map(|(msg, _)| msg));
        let started = std::time::Instant::now();
        let second =
            transport::recv_frame_within(&mut recv, DEFAULT_MAX_FRAME_BYTES, deadline).await;
        (first, second.map(|_| ()), started.elapsed(), dev.connection)
    });
    let client_ep = client(transport::load_client_config(dir.path(), DeviceId(3)).unwrap());
    let mut conn = transport::connect(&client_ep, addr, "localhost", DEFAULT_MAX_FRAME_BYTES)
        .await
        .unwrap();
    let frame = encode_frame(&join(3)).unwrap();
    // The stream becomes visible to the server with its first byte.
    conn.stream.send_raw(&frame[..1]).await.unwrap();
    tokio::time::sleep(Duration::from_millis(100)).await;
    conn.stream.send_raw(&frame[1..]).await.unwrap();
    tokio::time::sleep(Duration::from_millis(1000)).await;
    let trickle = tokio::spawn(async move {
        for byte in frame {
            if conn.stream.send_raw(&[byte]).await.is_err() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        conn
    });
    let (first, second, took, _connection) = timeout(LIMIT, server_task).await.unwrap().unwrap();
    assert_eq!(first.unwrap(), Some(join(3)));
    match second {
        Err(TransportError::FrameTimeout { limit_ms: 500 }) => {}
        other => panic!("expected a frame timeout, got {other:?}"),
    }
    // An idle second before the trickle's first byte (no deadline), then the 500 ms deadline.
    assert!(
        took >= Duration::from_millis(1500) && took < Duration::from_millis(2500),
        "the trickled frame failed {took:?} after the first frame"
    );
    trickle.abort();
}

/// An aggregator that accepts a device and never reads: QUIC flow control lets the first 32 MiB
/// of the stream through (the receive window) and then holds the sender, keep-alives and all.
/// A send without a deadline would wait for ever; with one it fails at the deadline, while a
/// frame within the window is taken at once (flow control, not the peer's reading, is what
/// holds a sender).
#[tokio::test]
async fn a_send_to_a_peer_that_stops_reading_ends_at_its_deadline() {
    let dir = tempfile::tempdir().unwrap();
    pki_dir(dir.path(), &[4]);
    let (server_ep, addr) = server(dir.path());
    let (held_tx, held_rx) = tokio::sync::oneshot::channel();
    let server_task = tokio::spawn(async move {
        let dev = accept_one(&server_ep).await.unwrap();
        // Hold the connection and its stream unread until the test ends.
        let _ = held_rx.await;
        drop(dev);
    });
    let client_ep = client(transport::load_client_config(dir.path(), DeviceId(4)).unwrap());
    let conn = transport::connect(&client_ep, addr, "localhost", DEFAULT_MAX_FRAME_BYTES)
        .await
        .unwrap();
    let (mut send, _recv) = conn.stream.into_parts();
    // A small frame fits the window: taken at once.
    let small = transport::send_frame_within(&mut send, &join(4), Duration::from_secs(5)).await;
    assert!(small.is_ok(), "{small:?}");
    // 40 MiB of update: more than the 32 MiB the unread stream will take.
    let floats: u32 = 10 << 20;
    let big = Message::Update(Update {
        round: RoundId(1),
        adapter: AdapterPayload {
            rank: 1,
            alpha: 1.0,
            layers: vec![LayerAdapter {
                block: 0,
                proj: Proj::ALL[0],
                a: Tensor2::f32(1, floats, vec![0.5; floats as usize]),
                b: Tensor2::f32(1, 1, vec![0.5]),
            }],
        },
        kept: KeptIndices { blocks: Vec::new() },
        stats: UpdateStats {
            loss_pre: 1.0,
            loss_post: 0.5,
            sparsity: 0.0,
            param_count: 1,
            compute_ms: 1,
            bytes_down: 1,
            bytes_up: 1,
            peak_mem_bytes: 1,
            samples: 1,
            steps: 1,
        },
    });
    let started = std::time::Instant::now();
    let deadline = Duration::from_millis(1500);
    let sent = timeout(
        LIMIT,
        transport::send_frame_within(&mut send, &big, deadline),
    )
    .await
    .expect("the deadline, not the test's limit, ends the send");
    let took = started.elapsed();
    match sent {
        Err(TransportError::SendTimeout { limit_ms: 1500 }) => {}
        other => panic!("expected a send timeout, got {other:?}"),
    }
    // The deadline covers encoding the frame too (slow in a debug build on a loaded host), so
    // only the lower bound is tight; the test's 20 s limit would be the other ending.
    assert!(
        took >= deadline && took < deadline + Duration::from_secs(10),
        "the send ended after {took:?}"
    );
    let _ = held_tx.send(());
    server_task.await.unwrap();
}
