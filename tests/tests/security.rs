//! Security of a running `aggregator serve` process, probed by clients in this test: a client
//! without a certificate or with another CA's certificate is refused at the handshake, a
//! device claiming another device's id is refused with `IdentityMismatch`, a wrong protocol
//! version (in the join or in the frame header) gets a clear reject, and forged frames (a
//! 4 GiB length prefix, a vector claiming 64 GiB inside a small frame) are refused without the
//! server allocating them; afterwards a valid device still joins, and SIGTERM stops the server
//! cleanly.

mod common;

use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use aggregator::pki;
use common::*;
use protocol::*;
use transport::{identity, TransportError};

const LIMIT: Duration = Duration::from_secs(20);

fn join(id: u64, version: u16) -> Message {
    Message::Join(Join {
        protocol_version: version,
        device_id: DeviceId(id),
        capabilities: Capabilities {
            ram_bytes: 1 << 30,
            backend: "probe".into(),
            bench_score: None,
            device_class: None,
        },
    })
}

fn endpoint(config: quinn::ClientConfig) -> quinn::Endpoint {
    transport::client_endpoint("127.0.0.1:0".parse().unwrap(), config).unwrap()
}

/// Connects, sends `first` (a message or raw bytes), and returns what came back: messages
/// until the server closed, then the close (or error) text.
async fn probe(
    config: quinn::ClientConfig,
    addr: SocketAddr,
    first: Result<Message, Vec<u8>>,
) -> Result<(Vec<Message>, String), TransportError> {
    let ep = endpoint(config);
    let mut conn = transport::connect(&ep, addr, "localhost", DEFAULT_MAX_FRAME_BYTES).await?;
    match first {
        Ok(msg) => {
            conn.stream.send(&msg).await?;
        }
        Err(bytes) => conn.stream.send_raw(&bytes).await?,
    }
    let mut got = Vec::new();
    let end = loop {
        match tokio::time::timeout(LIMIT, conn.stream.recv()).await {
            Ok(Ok(Some(Message::Welcome(w)))) => {
                // Accepted: nothing more to learn from this connection.
                got.push(Message::Welcome(w));
                conn.connection
                    .close(quinn::VarInt::from_u32(0), b"probe done");
                return Ok((got, "welcomed".into()));
            }
            Ok(Ok(Some(m))) => got.push(m),
            Ok(Ok(None)) => break "stream finished".to_string(),
            Ok(Err(e)) => {
                if got.is_empty() {
                    return Err(e);
                }
                break e.to_string();
            }
            Err(_) => return Ok((got, "no answer".into())),
        }
    };
    let reason = match tokio::time::timeout(LIMIT, conn.connection.closed()).await {
        Ok(quinn::ConnectionError::ApplicationClosed(c)) => {
            String::from_utf8_lossy(&c.reason).into_owned()
        }
        Ok(other) => other.to_string(),
        Err(_) => "still open".into(),
    };
    Ok((got, format!("{end}; closed: {reason}")))
}

fn rejects(got: &[Message]) -> Vec<String> {
    got.iter()
        .filter_map(|m| match m {
            Message::Reject(r) => Some(r.reason.to_string()),
            _ => None,
        })
        .collect()
}

/// A frame with a valid header whose body is `payload` after the magic and `version`.
fn raw_frame(version: u16, payload: &[u8]) -> Vec<u8> {
    let mut body = vec![b'F', b'S'];
    body.extend_from_slice(&version.to_le_bytes());
    body.extend_from_slice(payload);
    let mut frame = (body.len() as u32).to_le_bytes().to_vec();
    frame.extend_from_slice(&body);
    frame
}

fn client_of(pki_dir: &Path, id: u64) -> quinn::ClientConfig {
    transport::load_client_config(pki_dir, DeviceId(id)).unwrap()
}

#[test]
fn the_aggregator_refuses_strangers_impostors_wrong_versions_and_forged_frames() {
    let dir = tempfile::tempdir().unwrap();
    let dir = dir.path();
    let pki_dir = dir.join("pki");
    make_pki(&pki_dir, &[1, 2]);
    // Two devices per round: a single probe never starts a round.
    std::fs::write(
        dir.join("run.toml"),
        tiny_run_config(1, "").replace("min_devices = 3", "min_devices = 5"),
    )
    .unwrap();
    let (mut agg, addr) = start_aggregator(dir, "aggregator", "127.0.0.1:0", false);
    let addr: SocketAddr = addr.parse().unwrap();
    let rss_before = agg.peak_rss_bytes();

    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        transport::install_crypto_provider();
        let ca = identity::load_ca(&pki_dir).unwrap();

        // No client certificate: the handshake is refused.
        let no_cert = transport::client_config(&ca, None).unwrap();
        let r = probe(no_cert, addr, Ok(join(1, PROTOCOL_VERSION))).await;
        assert!(r.is_err(), "a client without a certificate got {r:?}");

        // A certificate from another CA (the client trusts ours): refused.
        let other = dir.join("other-ca");
        pki::init_ca(&other).unwrap();
        pki::issue_device(&other, DeviceId(1)).unwrap();
        let stranger =
            identity::load_identity(&identity::device_paths(&other, DeviceId(1))).unwrap();
        let other_ca = transport::client_config(&ca, Some(stranger)).unwrap();
        let r = probe(other_ca, addr, Ok(join(1, PROTOCOL_VERSION))).await;
        assert!(r.is_err(), "another CA's certificate got {r:?}");

        // Device 2's certificate claiming device 1.
        let (got, end) = probe(client_of(&pki_dir, 2), addr, Ok(join(1, PROTOCOL_VERSION)))
            .await
            .unwrap();
        assert_eq!(
            rejects(&got),
            ["device id device-1 does not match the certificate's device-2"]
        );
        assert!(end.contains("does not match the certificate"), "{end}");

        // A join speaking another protocol version.
        let (got, _) = probe(client_of(&pki_dir, 1), addr, Ok(join(1, 99)))
            .await
            .unwrap();
        assert_eq!(
            rejects(&got),
            ["protocol version mismatch: aggregator speaks 2, device sent 99"]
        );

        // A frame header with another protocol version: the reject names it, and so does the
        // close reason (readable by a peer that cannot decode our frames).
        let (got, end) = probe(client_of(&pki_dir, 1), addr, Err(raw_frame(9, &[0; 16])))
            .await
            .unwrap();
        assert_eq!(
            rejects(&got),
            ["protocol version mismatch: aggregator speaks 2, device sent 9"]
        );
        assert!(end.contains("closed: protocol version mismatch"), "{end}");

        // A length prefix claiming 4 GiB: refused from the prefix alone.
        let mut huge = u32::MAX.to_le_bytes().to_vec();
        huge.extend_from_slice(b"FS");
        huge.extend_from_slice(&PROTOCOL_VERSION.to_le_bytes());
        let (got, _) = probe(client_of(&pki_dir, 1), addr, Err(huge))
            .await
            .unwrap();
        assert_eq!(
            rejects(&got),
            ["message of 4294967295 bytes exceeds the limit of 134217728 bytes"]
        );

        // An update whose layer vector claims 2^36 entries (about 64 GiB) inside a small frame.
        let mut payload = Vec::new();
        payload.extend_from_slice(&3u32.to_le_bytes()); // Message::Update
        payload.extend_from_slice(&1u64.to_le_bytes()); // round
        payload.extend_from_slice(&8u32.to_le_bytes()); // rank
        payload.extend_from_slice(&16f32.to_le_bytes()); // alpha
        payload.extend_from_slice(&(1u64 << 36).to_le_bytes()); // layers.len()
        payload.extend_from_slice(&[0u8; 64]);
        let (got, _) = probe(
            client_of(&pki_dir, 1),
            addr,
            Err(raw_frame(PROTOCOL_VERSION, &payload)),
        )
        .await
        .unwrap();
        let r = rejects(&got);
        assert_eq!(r.len(), 1, "{r:?}");
        assert!(
            r[0].starts_with("malformed update: invalid message body"),
            "{r:?}"
        );

        // The server is alive and serves a valid device.
        let (got, _) = probe(client_of(&pki_dir, 1), addr, Ok(join(1, PROTOCOL_VERSION)))
            .await
            .unwrap_or_else(|e| panic!("valid device refused: {e}"));
        assert!(
            matches!(got.first(), Some(Message::Welcome(w)) if w.device_id == DeviceId(1)),
            "{got:?}"
        );
    });

    // Nothing close to the claimed sizes was ever resident.
    let peak = agg.peak_rss_bytes().expect("aggregator still running");
    assert!(
        peak < 512 << 20,
        "aggregator peak RSS {peak} bytes (before the probes: {rss_before:?})"
    );
    let events = metrics(dir);
    let refused: Vec<&str> = events
        .iter()
        .filter(|v| v["event"] == "refused")
        .map(|v| v["kind"].as_str().unwrap())
        .collect();
    assert_eq!(refused, ["version_mismatch", "too_large", "malformed"]);

    // A graceful stop (SIGTERM, handled like Ctrl-C): exit 0, nothing lost, resumable.
    let term = std::process::Command::new("kill")
        .args(["-TERM", &agg.pid().to_string()])
        .status()
        .unwrap();
    assert!(term.success());
    let status = agg.wait(Duration::from_secs(20));
    assert!(status.success(), "{status}\n{}", agg.log_tail());
    assert!(
        agg.stdout
            .iter()
            .any(|l| l == "stopped after round 0 of 1; continue with --resume"),
        "{:?}",
        agg.stdout
    );
}
