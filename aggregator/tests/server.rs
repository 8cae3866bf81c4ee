//! The server driver in-process over loopback QUIC with mutual TLS: scripted devices that answer
//! with hand-made updates run a whole fedspine run; an interrupted run says goodbye, keeps its
//! last round-end checkpoint and resumes from it; a new run refuses to replace a checkpoint; a
//! checkpoint that cannot be written stops the server without reporting the round; a resume
//! after a crash mid-write removes the temporary file and loads the last good checkpoint; a
//! device revoked while the server runs is refused from its next connection on, a connected
//! one whose certificate is revoked is closed, and the others still join.

use std::future::Future;
use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use aggregator::server::{self, ServeOptions, ServeOutcome, ServerError};
use aggregator::{pki, Coordinator, CoordinatorConfig};
use protocol::*;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

fn dims() -> ModelDims {
    ModelDims {
        n_blocks: 2,
        d_model: 8,
        n_heads: 2,
        n_kv_heads: 1,
        head_dim: 4,
        ffn: 12,
    }
}

fn config(rounds: u64) -> CoordinatorConfig {
    let mut c = CoordinatorConfig {
        rounds,
        devices_per_round: 3,
        over_selection: 0.0,
        round_deadline_ms: 20_000,
        max_rank: 8,
        seed: 3,
        ..CoordinatorConfig::default()
    };
    c.arms.ranks = vec![2, 4, 8];
    c.arms.ratio_max = 0.3;
    c
}

fn pki_dir(dir: &Path, devices: &[u64]) {
    pki::init_ca(dir).unwrap();
    pki::issue_server(dir, &["localhost".into()]).unwrap();
    for &d in devices {
        pki::issue_device(dir, DeviceId(d)).unwrap();
    }
}

/// A scripted device: joins, answers every round configuration with its slice plus a small
/// shift of `B`, and returns the goodbye reason and the rounds it answered.
async fn device(pki: &Path, id: u64, addr: SocketAddr) -> (Option<ByeReason>, Vec<u64>) {
    device_until(pki, id, addr, u64::MAX).await
}

/// [`device`] that answers rounds up to `last` only (it keeps reading, silently, after that).
async fn device_until(
    pki: &Path,
    id: u64,
    addr: SocketAddr,
    last: u64,
) -> (Option<ByeReason>, Vec<u64>) {
    let config = transport::load_client_config(pki, DeviceId(id)).unwrap();
    let endpoint = transport::client_endpoint("127.0.0.1:0".parse().unwrap(), config).unwrap();
    let mut conn = transport::connect(&endpoint, addr, "localhost", DEFAULT_MAX_FRAME_BYTES)
        .await
        .unwrap();
    conn.stream
        .send(&Message::Join(Join {
            protocol_version: PROTOCOL_VERSION,
            device_id: DeviceId(id),
            capabilities: Capabilities {
                ram_bytes: 4 << 30,
                backend: "scripted".into(),
                bench_score: None,
                // Two boards of one class and one of another (the metrics count per class).
                device_class: Some(if id == 3 { "rpi5" } else { "jetson-nx" }.into()),
            },
        }))
        .await
        .unwrap();
    let mut answered = Vec::new();
    loop {
        match conn.stream.recv().await {
            Ok(Some(Message::RoundConfig(rc))) if rc.round.0 <= last => {
                let slice = rc.global.unwrap();
                let mut adapter = slice.adapter.to_f32();
                for layer in &mut adapter.layers {
                    if let Buffer::F32(b) = &mut layer.b.data {
                        for (i, x) in b.iter_mut().enumerate() {
                            *x += 0.01 * ((i as u64 + id) % 3) as f32;
                        }
                    }
                }
                let update = Update {
                    round: rc.round,
                    adapter,
                    kept: slice.kept,
                    stats: UpdateStats {
                        loss_pre: 3.0,
                        loss_post: 2.0,
                        sparsity: 0.0,
                        param_count: 100,
                        compute_ms: 5,
                        bytes_down: 100,
                        bytes_up: 100,
                        peak_mem_bytes: 1 << 20,
                        samples: 8,
                        steps: rc.local_steps,
                    },
                };
                answered.push(rc.round.0);
                conn.stream.send(&Message::Update(update)).await.unwrap();
            }
            Ok(Some(Message::Bye(bye))) => return (Some(bye.reason), answered),
            Ok(Some(_)) => {}
            Ok(None) | Err(_) => return (None, answered),
        }
    }
}

fn options(dir: &Path) -> ServeOptions {
    let mut opts = ServeOptions::new(
        "127.0.0.1:0".parse().unwrap(),
        dir.join("pki"),
        dir.join("state"),
    );
    opts.metrics = Some(dir.join("metrics.jsonl"));
    opts.progress = false;
    opts.finish_grace = Duration::from_secs(2);
    opts
}

fn metrics_events(dir: &Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(dir.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

/// Runs `serve` on its own task until `shutdown` resolves; returns the task and the address
/// the server bound.
async fn spawn_server(
    coord: Coordinator,
    opts: &ServeOptions,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> (JoinHandle<Result<ServeOutcome, ServerError>>, SocketAddr) {
    let (addr_tx, addr_rx) = oneshot::channel();
    let server_opts = opts.clone();
    let server = tokio::spawn(async move {
        server::serve(
            coord,
            &server_opts,
            false,
            |a| addr_tx.send(a).unwrap(),
            shutdown,
        )
        .await
    });
    (server, addr_rx.await.unwrap())
}

/// Scripted devices 1, 2 and 3, each on its own task.
fn spawn_devices(pki: &Path, addr: SocketAddr) -> Vec<JoinHandle<(Option<ByeReason>, Vec<u64>)>> {
    (1..=3)
        .map(|id| {
            let pki = pki.to_path_buf();
            tokio::spawn(async move { device(&pki, id, addr).await })
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_run_completes_and_a_new_run_refuses_to_replace_its_checkpoint() {
    let dir = tempfile::tempdir().unwrap();
    let pki = dir.path().join("pki");
    pki_dir(&pki, &[1, 2, 3]);
    let opts = options(dir.path());
    let coord = server::prepare(config(2), dims(), &opts, false).unwrap();
    let (server, addr) = spawn_server(coord, &opts, std::future::pending()).await;
    let devices = spawn_devices(&pki, addr);
    for d in devices {
        let (bye, answered) = tokio::time::timeout(Duration::from_secs(60), d)
            .await
            .unwrap()
            .unwrap();
        assert_eq!(bye, Some(ByeReason::Finished));
        assert_eq!(answered, vec![1, 2]);
    }
    let outcome = tokio::time::timeout(Duration::from_secs(30), server)
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert!(outcome.finished);
    assert_eq!(outcome.round, RoundId(2));
    assert_eq!(outcome.counters.updates_accepted, 6);

    let events = metrics_events(dir.path());
    let kinds: Vec<&str> = events
        .iter()
        .map(|e| e["event"].as_str().unwrap())
        .collect();
    assert_eq!(kinds, ["start", "round", "net", "round", "net"]);
    assert_eq!(events[3]["round"], 2);
    assert_eq!(events[3]["participants"].as_array().unwrap().len(), 3);
    // Each round is followed by the network counters: every cause the run's outcome reports,
    // cumulative (never above the figure at the end, never below round 1's).
    assert_eq!(
        (events[2]["round"].as_u64(), events[4]["round"].as_u64()),
        (Some(1), Some(2))
    );
    let net = serde_json::to_value(&outcome.net).unwrap();
    for (cause, end) in net.as_object().unwrap() {
        let at = |i: usize| {
            events[i][cause]
                .as_u64()
                .unwrap_or_else(|| panic!("{cause}: {}", events[i]))
        };
        assert!(at(2) <= at(4) && at(4) <= end.as_u64().unwrap(), "{cause}");
    }
    assert!(
        events[4]["peak_queued_bytes"].as_u64().unwrap() > 0,
        "{}",
        events[4]
    );

    let err = server::prepare(config(2), dims(), &opts, false).unwrap_err();
    assert!(matches!(err, ServerError::CheckpointExists { .. }), "{err}");
    // Another model's checkpoint is refused with the file named.
    let mut other = dims();
    other.ffn = 16;
    let err = server::prepare(config(3), other, &opts, true).unwrap_err();
    let text = err.to_string();
    assert!(
        text.contains("coordinator.ckpt cannot be resumed"),
        "{text}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_interrupted_run_says_goodbye_and_resumes_from_its_last_round() {
    let dir = tempfile::tempdir().unwrap();
    let pki = dir.path().join("pki");
    pki_dir(&pki, &[1, 2, 3]);
    let opts = options(dir.path());
    let mut c = config(3);
    c.round_interval_ms = 60_000;
    let coord = server::prepare(c.clone(), dims(), &opts, false).unwrap();
    let (stop_tx, stop_rx) = oneshot::channel::<()>();
    let (server, addr) = spawn_server(coord, &opts, async {
        let _ = stop_rx.await;
    })
    .await;
    let devices = spawn_devices(&pki, addr);
    // Round 1 closes; round 2 waits a minute; interrupt in between.
    let metrics = dir.path().join("metrics.jsonl");
    tokio::time::timeout(Duration::from_secs(60), async {
        while !std::fs::read_to_string(&metrics)
            .unwrap_or_default()
            .contains("\"event\":\"round\"")
        {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
    .unwrap();
    stop_tx.send(()).unwrap();
    for d in devices {
        let (bye, answered) = d.await.unwrap();
        assert_eq!(bye, Some(ByeReason::ServerShutdown));
        assert_eq!(answered, vec![1]);
    }
    let outcome = server.await.unwrap().unwrap();
    assert!(!outcome.finished);
    assert_eq!(outcome.round, RoundId(1));

    let saved: aggregator::CoordinatorState = aggregator::checkpoint::read(
        &opts.checkpoint_path(),
        aggregator::coordinator::STATE_SCHEMA,
    )
    .unwrap();
    assert_eq!(saved.round, RoundId(1));
    let resumed = server::prepare(c, dims(), &opts, true).unwrap();
    assert_eq!(resumed.round(), RoundId(1));
    assert_eq!(resumed.state().bandit_digest(), saved.bandit_digest());
    let _: &Coordinator = &resumed;
}

#[test]
fn a_corrupt_or_foreign_checkpoint_is_refused_and_left_in_place() {
    let dir = tempfile::tempdir().unwrap();
    let opts = options(dir.path());
    std::fs::create_dir_all(&opts.state_dir).unwrap();
    let path = opts.checkpoint_path();
    // Not a checkpoint at all.
    std::fs::write(&path, b"hello").unwrap();
    let err = server::prepare(config(2), dims(), &opts, true).unwrap_err();
    assert_eq!(
        err.to_string(),
        format!(
            "checkpoint {} is not a FedSpine checkpoint (bad magic)",
            path.display()
        )
    );
    // A real checkpoint with one flipped byte in its body.
    let state = Coordinator::new(config(2), dims()).unwrap().state();
    aggregator::checkpoint::write_atomic(&path, aggregator::coordinator::STATE_SCHEMA, &state)
        .unwrap();
    let mut bytes = std::fs::read(&path).unwrap();
    let last = bytes.len() - 1;
    bytes[last] ^= 0x40;
    std::fs::write(&path, &bytes).unwrap();
    let err = server::prepare(config(2), dims(), &opts, true).unwrap_err();
    assert_eq!(
        err.to_string(),
        format!(
            "checkpoint {} is corrupt: body checksum mismatch",
            path.display()
        )
    );
    // A state written under another schema version.
    aggregator::checkpoint::write_atomic(&path, 99, &state).unwrap();
    let err = server::prepare(config(2), dims(), &opts, true).unwrap_err();
    assert!(err.to_string().contains("holds state schema 99"), "{err}");
    // Nothing was replaced.
    assert!(server::prepare(config(2), dims(), &opts, false).is_err());
    assert_eq!(
        aggregator::checkpoint::read::<aggregator::CoordinatorState>(&path, 99).unwrap(),
        state
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_checkpoint_that_cannot_be_written_stops_the_server_before_the_round_is_reported() {
    let dir = tempfile::tempdir().unwrap();
    let pki = dir.path().join("pki");
    pki_dir(&pki, &[1, 2, 3]);
    let opts = options(dir.path());
    let coord = server::prepare(config(2), dims(), &opts, false).unwrap();
    // A non-empty directory where the checkpoint goes: the rename into place fails, also for
    // root (permission bits would not stop root).
    let path = opts.checkpoint_path();
    std::fs::create_dir_all(path.join("occupied")).unwrap();
    let (server, addr) = spawn_server(coord, &opts, std::future::pending()).await;
    let devices = spawn_devices(&pki, addr);
    for d in devices {
        let (bye, answered) = tokio::time::timeout(Duration::from_secs(60), d)
            .await
            .unwrap()
            .unwrap();
        assert_eq!(bye, Some(ByeReason::ServerShutdown));
        assert_eq!(answered, vec![1]);
    }
    let err = tokio::time::timeout(Duration::from_secs(30), server)
        .await
        .unwrap()
        .unwrap()
        .unwrap_err();
    assert!(
        matches!(err, ServerError::CheckpointFailed { round: 1, .. }),
        "{err}"
    );
    let text = err.to_string();
    assert!(
        text.starts_with("round 1 closed but its checkpoint could not be written")
            && text.contains(&format!(
                "checkpoint {}: rename into place failed",
                path.display()
            )),
        "{text}"
    );
    // The round was not reported, and no temporary file is left.
    let kinds: Vec<String> = metrics_events(dir.path())
        .iter()
        .map(|e| e["event"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(kinds, ["start"]);
    let mut left: Vec<_> = std::fs::read_dir(&opts.state_dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    left.sort();
    assert_eq!(left, ["coordinator.ckpt"]);
}

#[test]
fn a_resume_after_a_crash_mid_write_loads_the_last_good_checkpoint() {
    let dir = tempfile::tempdir().unwrap();
    let opts = options(dir.path());
    std::fs::create_dir_all(&opts.state_dir).unwrap();
    let path = opts.checkpoint_path();
    let state = Coordinator::new(config(2), dims()).unwrap().state();
    aggregator::checkpoint::write_atomic(&path, aggregator::coordinator::STATE_SCHEMA, &state)
        .unwrap();
    let good = std::fs::read(&path).unwrap();
    // The dead writer's half-written next checkpoint.
    let tmp = opts.state_dir.join(".coordinator.ckpt.tmp.4000000.3");
    std::fs::write(&tmp, &good[..good.len() / 2]).unwrap();
    let resumed = server::prepare(config(2), dims(), &opts, true).unwrap();
    assert_eq!(resumed.state(), state);
    assert!(!tmp.exists());
    assert_eq!(std::fs::read(&path).unwrap(), good);
}

/// Connects as device `id`, joins, and returns the first message back or the error text (a
/// refused connection is closed with the reason).
async fn join_once(pki: &Path, id: u64, addr: SocketAddr) -> Result<Message, String> {
    let config = transport::load_client_config(pki, DeviceId(id)).map_err(|e| e.to_string())?;
    let endpoint = transport::client_endpoint("127.0.0.1:0".parse().unwrap(), config).unwrap();
    let mut conn = transport::connect(&endpoint, addr, "localhost", DEFAULT_MAX_FRAME_BYTES)
        .await
        .map_err(|e| e.to_string())?;
    let join = Message::Join(Join {
        protocol_version: PROTOCOL_VERSION,
        device_id: DeviceId(id),
        capabilities: Capabilities {
            ram_bytes: 4 << 30,
            backend: "scripted".into(),
            bench_score: None,
            device_class: None,
        },
    });
    let answer = async {
        conn.stream.send(&join).await?;
        conn.stream.recv().await
    }
    .await;
    let result =
        match answer {
            Ok(Some(msg)) => Ok(msg),
            Ok(None) => Err("stream finished".into()),
            Err(e) => {
                let reason =
                    match tokio::time::timeout(Duration::from_secs(5), conn.connection.closed())
                        .await
                    {
                        Ok(quinn::ConnectionError::ApplicationClosed(c)) => {
                            String::from_utf8_lossy(&c.reason).into_owned()
                        }
                        Ok(other) => other.to_string(),
                        Err(_) => "still open".into(),
                    };
                Err(format!("{e}; closed: {reason}"))
            }
        };
    conn.connection
        .close(quinn::VarInt::from_u32(0), b"probe done");
    result
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_device_revoked_while_the_server_runs_is_refused_and_the_others_still_join() {
    let dir = tempfile::tempdir().unwrap();
    let pki = dir.path().join("pki");
    pki_dir(&pki, &[4, 5]);
    let opts = options(dir.path());
    // Three devices per round: two never start one.
    let coord = server::prepare(config(1), dims(), &opts, false).unwrap();
    let (stop_tx, stop_rx) = oneshot::channel::<()>();
    let (server, addr) = spawn_server(coord, &opts, async {
        let _ = stop_rx.await;
    })
    .await;
    let limit = Duration::from_secs(20);
    let welcomed = |r: &Result<Message, String>| matches!(r, Ok(Message::Welcome(_)));
    let first = tokio::time::timeout(limit, join_once(&pki, 5, addr))
        .await
        .unwrap();
    assert!(welcomed(&first), "{first:?}");

    // `aggregator ca revoke --dir pki --id 5`, no restart.
    pki::revoke(&pki, Some(DeviceId(5)), &[]).unwrap();
    let refused = tokio::time::timeout(limit, join_once(&pki, 5, addr))
        .await
        .unwrap();
    match &refused {
        Err(text) => assert!(text.contains("device-5 is revoked"), "{text}"),
        Ok(msg) => panic!("a revoked device got {msg:?}"),
    }

    // Device 4 still connects, and stays connected.
    let config = transport::load_client_config(&pki, DeviceId(4)).unwrap();
    let endpoint = transport::client_endpoint("127.0.0.1:0".parse().unwrap(), config).unwrap();
    let mut held = transport::connect(&endpoint, addr, "localhost", DEFAULT_MAX_FRAME_BYTES)
        .await
        .unwrap();
    held.stream
        .send(&Message::Join(Join {
            protocol_version: PROTOCOL_VERSION,
            device_id: DeviceId(4),
            capabilities: Capabilities {
                ram_bytes: 4 << 30,
                backend: "scripted".into(),
                bench_score: None,
                device_class: None,
            },
        }))
        .await
        .unwrap();
    let welcome = tokio::time::timeout(limit, held.stream.recv())
        .await
        .unwrap();
    assert!(
        matches!(welcome, Ok(Some(Message::Welcome(_)))),
        "{welcome:?}"
    );
    assert!(held.connection.close_reason().is_none());

    // Revoking device 4's certificate closes its live connection with the reason.
    let cert4 = transport::device_paths(&pki, DeviceId(4)).cert;
    pki::revoke(&pki, None, &[cert4]).unwrap();
    let closed = tokio::time::timeout(limit, held.connection.closed())
        .await
        .unwrap();
    match closed {
        quinn::ConnectionError::ApplicationClosed(c) => {
            let reason = String::from_utf8_lossy(&c.reason).into_owned();
            assert!(reason.ends_with("of device-4 is revoked"), "{reason}");
        }
        other => panic!("expected the server to close, got {other}"),
    }

    stop_tx.send(()).unwrap();
    let outcome = tokio::time::timeout(Duration::from_secs(30), server)
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(outcome.revoked_refusals, 2);
    assert_eq!(outcome.round, RoundId(0));
}

/// A two-round server with the metrics endpoint on a free port, devices `ids` in `dir/pki`,
/// stopped by the sender returned: the task, its QUIC address, the sender, the metrics address.
async fn with_metrics(
    dir: &Path,
    ids: &[u64],
) -> (
    JoinHandle<Result<ServeOutcome, ServerError>>,
    SocketAddr,
    oneshot::Sender<()>,
    SocketAddr,
) {
    pki_dir(&dir.join("pki"), ids);
    let mut opts = options(dir);
    let prom = {
        let probe = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        probe.local_addr().unwrap()
    };
    opts.prometheus = Some(prom);
    let coord = server::prepare(config(2), dims(), &opts, false).unwrap();
    let (stop_tx, stop_rx) = oneshot::channel::<()>();
    let (server, addr) = spawn_server(coord, &opts, async move {
        let _ = stop_rx.await;
    })
    .await;
    (server, addr, stop_tx, prom)
}

/// `GET /metrics` over plain TCP; the response's body.
async fn scrape(addr: SocketAddr) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    s.write_all(b"GET /metrics HTTP/1.1\r\nHost: test\r\n\r\n")
        .await
        .unwrap();
    let mut out = Vec::new();
    s.read_to_end(&mut out).await.unwrap();
    let text = String::from_utf8(out).unwrap();
    assert!(text.starts_with("HTTP/1.1 200 OK"), "{text}");
    text.split_once("\r\n\r\n").unwrap().1.to_string()
}

/// A slow client at one address (eight connections that never finish their request) holds at
/// most its share of the metrics endpoint: the rest of its connections are closed unanswered,
/// and a scrape from another address is answered at once rather than after the slow ones'
/// deadline (five seconds).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_slow_address_cannot_hold_the_metrics_endpoint() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let dir = tempfile::tempdir().unwrap();
    let (server, _addr, stop_tx, prom) = with_metrics(dir.path(), &[1]).await;
    let from = |ip: &str| {
        let sock = tokio::net::TcpSocket::new_v4().unwrap();
        sock.bind(format!("{ip}:0").parse().unwrap()).unwrap();
        sock.connect(prom)
    };
    // Wait for the endpoint, from an address of its own.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while from("127.0.0.3").await.is_err() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "no metrics endpoint"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let mut slow = Vec::new();
    for _ in 0..8 {
        let mut s = from("127.0.0.1").await.unwrap();
        s.write_all(b"GET /met").await.unwrap();
        slow.push(s);
    }
    // A scrape from 127.0.0.2 is answered while the slow client's connections are still open.
    let other = async {
        let mut s = from("127.0.0.2").await.unwrap();
        s.write_all(b"GET /metrics HTTP/1.1\r\nHost: test\r\n\r\n")
            .await
            .unwrap();
        let mut out = Vec::new();
        s.read_to_end(&mut out).await.unwrap();
        out
    };
    let out = tokio::time::timeout(Duration::from_secs(3), other)
        .await
        .expect("a scrape from another address waited behind the slow client");
    assert!(out.starts_with(b"HTTP/1.1 200 OK"));
    // Of the slow client's eight, the server closed all but its share without an answer.
    let mut open = 0;
    for s in &mut slow {
        let mut out = Vec::new();
        match tokio::time::timeout(Duration::from_millis(500), s.read_to_end(&mut out)).await {
            Err(_) => open += 1,
            // Closed with the request unread: a reset or an end of stream, never an answer.
            Ok(_) => assert!(out.is_empty(), "{}", String::from_utf8_lossy(&out)),
        }
    }
    assert_eq!(open, server::MAX_SCRAPES_PER_ADDRESS);
    stop_tx.send(()).unwrap();
    tokio::time::timeout(Duration::from_secs(30), server)
        .await
        .unwrap()
        .unwrap()
        .unwrap();
}

fn sample(body: &str, series: &str) -> f64 {
    body.lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
        .unwrap_or_else(|| panic!("no {series} in\n{body}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prometheus_scrapes_follow_the_run_on_their_own_port() {
    let dir = tempfile::tempdir().unwrap();
    let pki = dir.path().join("pki");
    let (server, addr, stop_tx, prom) = with_metrics(dir.path(), &[1, 2, 3]).await;
    // Before any device: a valid exposition with nothing counted.
    let body = scrape(prom).await;
    assert_eq!(sample(&body, "fedspine_rounds_started_total"), 0.0);
    assert_eq!(sample(&body, "fedspine_devices_connected"), 0.0);
    // Devices 1 and 2 answer every round, device 3 only round 1: round 2 stays open.
    let mut devices = Vec::new();
    for (id, last) in [(1, u64::MAX), (2, u64::MAX), (3, 1)] {
        let pki = pki.clone();
        devices.push(tokio::spawn(async move {
            device_until(&pki, id, addr, last).await
        }));
    }
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    let body = loop {
        let body = scrape(prom).await;
        if sample(&body, "fedspine_rounds_aggregated_total") >= 1.0
            && sample(&body, "fedspine_rounds_started_total") >= 2.0
        {
            break body;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "no round closed:\n{body}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(sample(&body, "fedspine_devices_connected"), 3.0);
    assert_eq!(sample(&body, "fedspine_joins_total"), 3.0);
    // Round 1's three updates, and round 2's from devices 1 and 2 once they arrive.
    let accepted = sample(&body, "fedspine_updates_accepted_total");
    assert!((3.0..=5.0).contains(&accepted), "{accepted}");
    assert_eq!(sample(&body, "fedspine_round_duration_seconds_count"), 1.0);
    assert_eq!(sample(&body, "fedspine_last_round"), 1.0);
    let plays: f64 = body
        .lines()
        .filter(|l| l.starts_with("fedspine_arm_plays_total{"))
        .filter_map(|l| l.rsplit_once(' ')?.1.parse::<f64>().ok())
        .sum();
    assert_eq!(plays, 3.0);
    // Round 1's arms by the class each device named in its Join.
    let per_class = |metric: &str, class: &str| -> f64 {
        body.lines()
            .filter(|l| l.starts_with(&format!("{metric}{{class=\"{class}\",")))
            .filter_map(|l| l.rsplit_once(' ')?.1.parse::<f64>().ok())
            .sum()
    };
    assert_eq!(
        per_class("fedspine_arm_assignments_total", "jetson-nx"),
        2.0
    );
    assert_eq!(per_class("fedspine_arm_assignments_total", "rpi5"), 1.0);
    assert_eq!(
        per_class("fedspine_class_arm_share_ratio", "jetson-nx"),
        1.0
    );
    assert_eq!(per_class("fedspine_class_arm_share_ratio", "rpi5"), 1.0);
    assert!(sample(&body, "fedspine_bytes_total{direction=\"received\"}") > 0.0);
    // Anything but GET /metrics is refused.
    {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let mut s = tokio::net::TcpStream::connect(prom).await.unwrap();
        s.write_all(b"GET / HTTP/1.1\r\n\r\n").await.unwrap();
        let mut out = Vec::new();
        s.read_to_end(&mut out).await.unwrap();
        assert!(out.starts_with(b"HTTP/1.1 404"));
    }
    stop_tx.send(()).unwrap();
    let outcome = tokio::time::timeout(Duration::from_secs(30), server)
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert!(!outcome.finished);
    for d in devices {
        let _ = tokio::time::timeout(Duration::from_secs(30), d).await;
    }
}
