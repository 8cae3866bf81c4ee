//! Floods and slow peers against the server over real QUIC with mutual TLS on loopback: a
//! device that does not read is closed after the write timeout (its round still closes for
//! the others) or when its queue is over its byte budget; a frame trickled byte by byte is dropped at its
//! deadline; the per-address caps refuse the connection and the handshake over them, and a
//! handshake that stalls is dropped at its budget; a second connection of an active device is
//! refused while a silent one is replaced; a message flood is throttled and closed while honest
//! devices finish their round; 1,280 stalled QUIC Initials from 80 addresses hold no
//! connection slot (address validation by Retry) and a real device still joins within 2 s,
//! while with validation off the same flood fills every slot and keeps it out; a device that
//! comes back with other RAM keeps its bandit; the frames waiting for the coordinator stay
//! within the server's byte budget; a device cannot open a second stream.

mod common;
mod netkit;

use std::sync::Arc;
use std::time::{Duration, Instant};

use aggregator::coordinator::{Command, Coordinator, Event};
use protocol::*;
use tokio::sync::oneshot;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_selected_device_that_does_not_read_is_closed_at_the_write_timeout_and_the_round_closes()
{
    let dir = tempfile::tempdir().unwrap();
    let pki = dir.path().join("pki");
    netkit::pki_dir(&pki, 1..=4);
    let mut opts = netkit::options(dir.path());
    opts.limits.write_timeout = Duration::from_secs(1);
    let mut config = netkit::config(1, 4);
    config.arms.ranks = vec![8];
    let (server, addr) =
        netkit::spawn_server(config, netkit::wide_dims(), &opts, std::future::pending()).await;
    // Device 4 accepts 4 KiB and reads nothing: its quarter-megabyte round configuration
    // blocks the server's write.
    let mut stuck = netkit::connect(&pki, 4, addr, "127.0.0.1", Some(4096))
        .await
        .unwrap();
    stuck.conn.stream.send(&common::join_msg(4)).await.unwrap();
    let honest = netkit::spawn_honest(&pki, addr, 1..=3);
    let reason = stuck.closed().await;
    assert!(
        reason.contains("did not finish within 1000 ms: the device does not read"),
        "{reason}"
    );
    netkit::expect_finished(honest, &[1]).await;
    let outcome = netkit::outcome(server).await;
    assert_eq!(outcome.net.slow_readers, 1);
    assert_eq!(outcome.counters.updates_accepted, 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_device_whose_queue_is_over_its_byte_budget_is_closed_not_buffered() {
    let dir = tempfile::tempdir().unwrap();
    let pki = dir.path().join("pki");
    netkit::pki_dir(&pki, 1..=4);
    let mut opts = netkit::options(dir.path());
    opts.limits.outbound_queue_bytes = 1024;
    opts.limits.write_timeout = Duration::from_secs(60);
    let mut config = netkit::config(1, 4);
    config.arms.ranks = vec![8];
    config.round_deadline_ms = 2_000;
    let (server, addr) =
        netkit::spawn_server(config, netkit::wide_dims(), &opts, std::future::pending()).await;
    // Device 4 reads nothing and accepts 512 bytes: its round configuration (queued while less
    // than the 1 KiB budget was) stays half-written; at the deadline its goodbye finds the
    // budget used up.
    let mut stuck = netkit::connect(&pki, 4, addr, "127.0.0.1", Some(512))
        .await
        .unwrap();
    stuck.conn.stream.send(&common::join_msg(4)).await.unwrap();
    let honest = netkit::spawn_honest(&pki, addr, 1..=3);
    let reason = stuck.closed().await;
    assert!(
        reason.contains("outbound queue over 1024 bytes: the device does not read"),
        "{reason}"
    );
    netkit::expect_finished(honest, &[1]).await;
    let outcome = netkit::outcome(server).await;
    assert_eq!(outcome.net.slow_readers, 1);
    assert_eq!(outcome.counters.updates_accepted, 3);
}

/// The frames waiting for the coordinator thread are bounded in bytes, not only in number:
/// with a 64 KiB budget, four round-sized updates (each larger than the whole budget) wait one
/// at a time, the budget is reached and never passed, and none is lost.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn inbound_frames_wait_within_the_servers_byte_budget() {
    let dir = tempfile::tempdir().unwrap();
    let pki = dir.path().join("pki");
    netkit::pki_dir(&pki, 1..=4);
    let mut opts = netkit::options(dir.path());
    opts.limits.inbound_bytes_total = 64 << 10;
    let mut config = netkit::config(1, 4);
    config.arms.ranks = vec![8];
    let (server, addr) =
        netkit::spawn_server(config, netkit::wide_dims(), &opts, std::future::pending()).await;
    let honest = netkit::spawn_honest(&pki, addr, 1..=4);
    netkit::expect_finished(honest, &[1]).await;
    let outcome = netkit::outcome(server).await;
    assert_eq!(outcome.counters.updates_accepted, 4);
    assert_eq!(outcome.net.peak_inbound_bytes, 64 << 10);
}

/// A device may open one stream, the one the server reads: a second one is never granted, so
/// it cannot park data the server never reads in quinn's buffers.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_device_cannot_open_a_second_stream() {
    let dir = tempfile::tempdir().unwrap();
    let opts = netkit::options(dir.path());
    let (server, stop_tx, mut peer) =
        netkit::one_joined_device(&dir.path().join("pki"), &opts).await;
    let second = tokio::time::timeout(Duration::from_secs(1), peer.conn.connection.open_bi()).await;
    assert!(second.is_err(), "the server granted a second stream");
    // The first stream still works.
    peer.conn
        .stream
        .send(&Message::Heartbeat(Heartbeat {
            round: None,
            steps_done: 0,
        }))
        .await
        .unwrap();
    stop_tx.send(()).unwrap();
    netkit::outcome(server).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_frame_trickled_byte_by_byte_is_dropped_at_its_deadline() {
    let dir = tempfile::tempdir().unwrap();
    let mut opts = netkit::options(dir.path());
    opts.limits.frame_read_timeout = Duration::from_secs(1);
    let (server, stop_tx, mut peer) =
        netkit::one_joined_device(&dir.path().join("pki"), &opts).await;
    // A frame that declares 1 MiB, then a byte every 100 ms.
    let started = Instant::now();
    let mut header = (1u32 << 20).to_le_bytes().to_vec();
    header.extend_from_slice(&protocol::codec::MAGIC);
    peer.conn.stream.send_raw(&header).await.unwrap();
    let connection = peer.conn.connection.clone();
    let trickle = tokio::spawn(async move {
        for _ in 0..100 {
            tokio::time::sleep(Duration::from_millis(100)).await;
            if peer.conn.stream.send_raw(&[0]).await.is_err() {
                break;
            }
        }
    });
    let reason = netkit::close_reason(&connection).await;
    let after = started.elapsed();
    assert!(
        reason.contains("a frame did not arrive whole within 1000 ms"),
        "{reason}"
    );
    assert!(
        after >= Duration::from_millis(1000) && after < Duration::from_millis(2500),
        "closed after {after:?}"
    );
    trickle.abort();
    stop_tx.send(()).unwrap();
    let outcome = netkit::outcome(server).await;
    assert_eq!(outcome.net.frame_timeouts, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_per_address_caps_refuse_the_connection_over_them_and_a_stalled_handshake_is_dropped_at_its_budget(
) {
    let dir = tempfile::tempdir().unwrap();
    let pki = dir.path().join("pki");
    netkit::pki_dir(&pki, 1..=8);
    let mut opts = netkit::options(dir.path());
    opts.limits.max_connections_per_ip = 3;
    opts.limits.max_handshakes_per_ip = 2;
    opts.limits.handshake_timeout = Duration::from_secs(1);
    let (stop_tx, stop_rx) = oneshot::channel::<()>();
    let (server, addr) = netkit::spawn_server(netkit::config(1, 9), common::dims(), &opts, async {
        let _ = stop_rx.await;
    })
    .await;
    let welcomed = |r: &Result<Message, String>| matches!(r, Ok(Message::Welcome(_)));

    // Three connections from 127.0.0.1 are the cap; the fourth is refused.
    let mut held = Vec::new();
    for id in 1..=3 {
        let mut peer = netkit::connect(&pki, id, addr, "127.0.0.1", None)
            .await
            .unwrap();
        let answer = peer.join(id).await;
        assert!(welcomed(&answer), "device {id}: {answer:?}");
        held.push(peer);
    }
    let fourth = netkit::connect(&pki, 4, addr, "127.0.0.1", None).await;
    assert!(
        fourth.is_err(),
        "the fourth connection from one address was accepted"
    );
    // Another address is not affected.
    let mut other = netkit::connect(&pki, 5, addr, "127.0.0.2", None)
        .await
        .unwrap();
    assert!(welcomed(&other.join(5).await));

    // Two handshakes from 127.0.0.3 that never open their stream hold its two handshake
    // slots: a third is refused until the budget drops them.
    let stalled_at = Instant::now();
    let mut stalled = Vec::new();
    for id in [6, 7] {
        stalled.push(
            netkit::connect(&pki, id, addr, "127.0.0.3", None)
                .await
                .unwrap(),
        );
    }
    let third = netkit::connect(&pki, 8, addr, "127.0.0.3", None).await;
    assert!(third.is_err(), "a third concurrent handshake was accepted");
    for peer in &stalled {
        let reason = peer.closed().await;
        assert_ne!(reason, "still open");
    }
    let dropped_after = stalled_at.elapsed();
    assert!(
        dropped_after >= Duration::from_millis(900) && dropped_after < Duration::from_secs(3),
        "stalled handshakes dropped after {dropped_after:?}"
    );
    let mut late = netkit::connect(&pki, 8, addr, "127.0.0.3", None)
        .await
        .unwrap();
    assert!(welcomed(&late.join(8).await));

    stop_tx.send(()).unwrap();
    let outcome = netkit::outcome(server).await;
    assert_eq!(outcome.net.address_refusals, 2);
    assert_eq!(outcome.net.handshake_timeouts, 2);
    drop(held);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_connection_of_an_active_device_is_refused_and_a_silent_one_is_replaced() {
    let dir = tempfile::tempdir().unwrap();
    let pki = dir.path().join("pki");
    netkit::pki_dir(&pki, [1]);
    let mut opts = netkit::options(dir.path());
    opts.limits.duplicate_idle = Some(Duration::from_secs(1));
    let (stop_tx, stop_rx) = oneshot::channel::<()>();
    let (server, addr) = netkit::spawn_server(netkit::config(1, 3), common::dims(), &opts, async {
        let _ = stop_rx.await;
    })
    .await;
    let welcomed = |r: &Result<Message, String>| matches!(r, Ok(Message::Welcome(_)));
    let mut first = netkit::connect(&pki, 1, addr, "127.0.0.1", None)
        .await
        .unwrap();
    assert!(welcomed(&first.join(1).await));

    // The same certificate again while the first connection is active: refused with the
    // reason, and the first connection still works.
    let mut intruder = netkit::connect(&pki, 1, addr, "127.0.0.1", None)
        .await
        .unwrap();
    let refused = intruder.join(1).await;
    match &refused {
        Err(reason) => assert!(
            reason.contains("device-1 already has an active connection"),
            "{reason}"
        ),
        Ok(msg) => panic!("a duplicate connection got {msg:?}"),
    }
    assert!(welcomed(&first.join(1).await));

    // Once the first connection is silent past the window, a new one replaces it.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let mut third = netkit::connect(&pki, 1, addr, "127.0.0.1", None)
        .await
        .unwrap();
    assert!(welcomed(&third.join(1).await));
    let reason = first.closed().await;
    assert!(
        reason.starts_with("replaced: this connection was silent"),
        "{reason}"
    );

    stop_tx.send(()).unwrap();
    let outcome = netkit::outcome(server).await;
    assert_eq!(outcome.net.duplicate_refusals, 1);
    assert_eq!(outcome.net.duplicate_replacements, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_heartbeat_flood_is_throttled_and_closed_while_honest_devices_finish_their_round() {
    let dir = tempfile::tempdir().unwrap();
    let pki = dir.path().join("pki");
    netkit::pki_dir(&pki, 1..=4);
    let mut opts = netkit::options(dir.path());
    opts.limits.messages_per_second = 20.0;
    opts.limits.message_burst = 10;
    let (server, addr) = netkit::spawn_server(
        netkit::config(1, 3),
        common::dims(),
        &opts,
        std::future::pending(),
    )
    .await;
    let flooder = tokio::spawn({
        let pki = pki.clone();
        async move {
            let mut peer = netkit::connect(&pki, 4, addr, "127.0.0.2", None)
                .await
                .unwrap();
            let beat = encode_frame(&Message::Heartbeat(Heartbeat {
                round: None,
                steps_done: 0,
            }))
            .unwrap();
            let started = Instant::now();
            let mut sent = 0u32;
            while sent < 10_000 && peer.conn.stream.send_raw(&beat).await.is_ok() {
                sent += 1;
            }
            (peer.closed().await, started.elapsed())
        }
    });
    let honest = netkit::spawn_honest(&pki, addr, 1..=3);
    let (reason, after) = flooder.await.unwrap();
    assert!(
        reason.contains("message flood: more than 20 messages per second"),
        "{reason}"
    );
    assert!(after < Duration::from_secs(5), "closed after {after:?}");
    netkit::expect_finished(honest, &[1]).await;
    let outcome = netkit::outcome(server).await;
    assert_eq!(outcome.net.flood_disconnects, 1);
    assert_eq!(outcome.net.rate_limited_messages, 11);
    // Only the burst and the sustained rate reached the coordinator.
    let allowed = 10 + (20.0 * after.as_secs_f64()).ceil() as u64;
    assert!(
        outcome.counters.heartbeats <= allowed,
        "{} heartbeats passed, at most {allowed} allowed",
        outcome.counters.heartbeats
    );
    assert_eq!(outcome.counters.updates_accepted, 3);
}

/// The flood both address-validation tests send: from each loopback address 127.0.0.a, `a` in
/// `addresses`, `per_address` connection attempts of one real QUIC Initial packet each, never
/// continued (the sender ignores every answer), as a spoofing or stalling attacker would.
/// Returns the packets sent.
fn send_stalled_initials(
    client: quinn::ClientConfig,
    addr: std::net::SocketAddr,
    addresses: std::ops::Range<u8>,
    per_address: usize,
) -> usize {
    let mut sent = 0;
    for a in addresses {
        let socket = std::net::UdpSocket::bind(format!("127.0.0.{a}:0")).unwrap();
        let mut endpoint = quinn_proto::Endpoint::new(
            Arc::new(quinn_proto::EndpointConfig::default()),
            None,
            false,
            Some([a; 32]),
        );
        let mut attempts = Vec::new();
        for _ in 0..per_address {
            let now = Instant::now();
            let (_, mut conn) = endpoint
                .connect(now, client.clone(), addr, "localhost")
                .unwrap();
            let mut buf = Vec::new();
            if let Some(t) = conn.poll_transmit(now, 1, &mut buf) {
                socket.send_to(&buf[..t.size], addr).unwrap();
                sent += 1;
            }
            attempts.push(conn);
        }
        // Stay within the kernel's default socket buffer on the server side, even when a busy
        // machine slows the server's handshakes (the flood still ends in about 3 s, well inside
        // the 10 s handshake budget that keeps its slots taken).
        std::thread::sleep(Duration::from_millis(40));
    }
    sent
}

/// 80 addresses x 16 attempts: 1,280 stalled Initials, each address at the per-address
/// handshake cap, together a quarter more than the server's 1,024 connection slots.
const FLOOD_ADDRESSES: std::ops::Range<u8> = 10..90;
const FLOOD_PER_ADDRESS: usize = 16;

/// Runs the flood against a server with or without address validation, then a real device
/// connects from 127.0.0.1 and joins. Returns the device's answer (or why it got none) within
/// `patience`, the time it took, and the server's outcome.
async fn flood_then_join(
    validate_addresses: bool,
    patience: Duration,
) -> (
    Result<Message, String>,
    Duration,
    aggregator::server::ServeOutcome,
) {
    let dir = tempfile::tempdir().unwrap();
    let pki = dir.path().join("pki");
    netkit::pki_dir(&pki, [1]);
    let mut opts = netkit::options(dir.path());
    opts.limits.validate_addresses = validate_addresses;
    let (stop_tx, stop_rx) = oneshot::channel::<()>();
    let (server, addr) = netkit::spawn_server(netkit::config(1, 3), common::dims(), &opts, async {
        let _ = stop_rx.await;
    })
    .await;
    let client = transport::load_client_config(&pki, DeviceId(1)).unwrap();
    let sent = tokio::task::spawn_blocking(move || {
        send_stalled_initials(client, addr, FLOOD_ADDRESSES, FLOOD_PER_ADDRESS)
    })
    .await
    .unwrap();
    assert_eq!(sent, FLOOD_ADDRESSES.len() * FLOOD_PER_ADDRESS);

    let started = Instant::now();
    let attempt = async {
        let mut peer = netkit::connect(&pki, 1, addr, "127.0.0.1", None).await?;
        peer.join(1).await
    };
    let answer = match tokio::time::timeout(patience, attempt).await {
        Ok(answer) => answer,
        Err(_) => Err(format!("no answer within {patience:?}")),
    };
    let took = started.elapsed();
    stop_tx.send(()).unwrap();
    let outcome = netkit::outcome(server).await;
    eprintln!(
        "validation {validate_addresses}: {answer:?} after {took:?}; {:?}",
        outcome.net
    );
    (answer, took, outcome)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stalled_initials_hold_no_slot_and_a_real_device_joins_within_two_seconds() {
    let (answer, took, outcome) = flood_then_join(true, Duration::from_secs(10)).await;
    assert!(matches!(answer, Ok(Message::Welcome(_))), "{answer:?}");
    assert!(took < Duration::from_secs(2), "joined after {took:?}");
    // Every attempt got a stateless Retry (the real device's first Initial too); none held a
    // slot, so nothing was refused for capacity and no handshake timed out.
    assert!(outcome.net.retries_sent >= 1000, "{:?}", outcome.net);
    assert_eq!(outcome.net.capacity_refusals, 0);
    assert_eq!(outcome.net.address_refusals, 0);
    assert_eq!(outcome.net.handshake_timeouts, 0);
}

/// The contrast: the same flood against a server with address validation off fills every
/// connection slot with handshakes that never finish, and the real device is refused; so the
/// test above passes because of the Retry, not because the flood is too weak to matter.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_address_validation_the_same_flood_keeps_a_real_device_out() {
    let (answer, _, outcome) = flood_then_join(false, Duration::from_secs(2)).await;
    assert!(
        !matches!(answer, Ok(Message::Welcome(_))),
        "the device joined through the flood: {:?}",
        outcome.net
    );
    assert_eq!(outcome.net.retries_sent, 0);
    assert!(outcome.net.capacity_refusals >= 1, "{:?}", outcome.net);
}

#[test]
fn a_device_that_comes_back_with_other_ram_keeps_its_bandit() {
    let mut config = netkit::config(2, 1);
    config.round_interval_ms = 10;
    let mut coord = Coordinator::new(config, common::dims()).unwrap();
    let device = DeviceId(1);
    let mut now = Timestamp(0);
    let join = |ram_bytes: u64| Event::Message {
        device,
        msg: Message::Join(Join {
            protocol_version: PROTOCOL_VERSION,
            device_id: device,
            capabilities: Capabilities {
                ram_bytes,
                backend: "flex".into(),
                bench_score: None,
                device_class: None,
            },
        }),
        bytes: 64,
    };
    let mut cmds = coord.handle(now, Event::Connected { device });
    cmds.extend(coord.handle(now, join(4 << 30)));
    cmds.extend(coord.handle_timeout(now));
    let rc = cmds
        .iter()
        .find_map(|c| match c {
            Command::Send {
                msg: Message::RoundConfig(rc),
                ..
            } => Some(rc.clone()),
            _ => None,
        })
        .expect("round 1 starts with the one device");
    now = Timestamp(50);
    let update = Message::Update(common::shifted_answer(1, &rc, 2.0, 5));
    let bytes = encode_frame(&update).unwrap().len() as u64;
    let cmds = coord.handle(
        now,
        Event::Message {
            device,
            msg: update,
            bytes,
        },
    );
    assert!(cmds.iter().any(|c| matches!(c, Command::Checkpoint)));
    let learned = coord.state().bandit_digest();
    let fresh = Coordinator::new(netkit::config(2, 1), common::dims())
        .unwrap()
        .state()
        .bandit_digest();
    assert_ne!(learned, fresh);

    // The same device on a new connection with half the RAM.
    coord.handle(now, Event::Disconnected { device });
    coord.handle(now, Event::Connected { device });
    let cmds = coord.handle(now, join(2 << 30));
    assert!(matches!(
        cmds.as_slice(),
        [Command::Send {
            msg: Message::Welcome(_),
            ..
        }]
    ));
    assert_eq!(coord.state().bandit_digest(), learned);
    assert_eq!(
        coord.device(device).unwrap().capabilities.ram_bytes,
        2 << 30
    );
}
