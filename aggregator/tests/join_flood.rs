//! Amplification over real QUIC with mutual TLS on loopback: a selected device that owes an
//! update sends 1,000 Joins and does not read. The server sends its round configuration (a
//! quarter megabyte here) once, answers each repeated Join with a Welcome only, and its queued
//! bytes and the process's heap stay within a stated budget; the other devices' round closes.
//! Its own binary, because it measures the process-wide heap peak.

mod common;
mod netkit;

use std::time::Duration;

use protocol::*;

#[global_allocator]
static GLOBAL: test_support::CountingAllocator = test_support::CountingAllocator;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_selected_device_that_sends_a_thousand_joins_and_never_reads_costs_the_server_little() {
    let dir = tempfile::tempdir().unwrap();
    let pki = dir.path().join("pki");
    netkit::pki_dir(&pki, 1..=4);
    let mut opts = netkit::options(dir.path());
    // The rate limit is not what this test is about (floods.rs tests it): let every Join in.
    opts.limits.messages_per_second = 1e9;
    opts.limits.message_burst = 1_000_000;
    let mut config = netkit::config(1, 4);
    config.arms.ranks = vec![8];
    config.arms.ratio_max = 0.0;
    let (server, addr) =
        netkit::spawn_server(config, netkit::wide_dims(), &opts, std::future::pending()).await;

    let mut flooder = netkit::connect(&pki, 4, addr, "127.0.0.1", None)
        .await
        .unwrap();
    flooder
        .conn
        .stream
        .send(&common::join_msg(4))
        .await
        .unwrap();
    let honest = netkit::spawn_honest(&pki, addr, 1..=3);
    // The flooder reads until its round configuration arrives, then stops reading.
    let rc = loop {
        let msg = tokio::time::timeout(Duration::from_secs(30), flooder.conn.stream.recv())
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        if let Message::RoundConfig(rc) = msg {
            break rc;
        }
    };
    let rc_bytes = encode_frame(&Message::RoundConfig(rc.clone()))
        .unwrap()
        .len();
    assert!(
        rc_bytes > 200_000,
        "round configuration of {rc_bytes} bytes"
    );

    let base = test_support::reset_peak();
    let join = encode_frame(&common::join_msg(4)).unwrap();
    for _ in 0..1000 {
        flooder.conn.stream.send_raw(&join).await.unwrap();
    }
    // Behind the Joins, in the same stream: the flooder gives up its round, which closes it.
    let failed = Message::RoundFailed(RoundFailed {
        round: rc.round,
        reason: FailReason::Error("flood test".into()),
    });
    flooder.conn.stream.send(&failed).await.unwrap();
    netkit::expect_finished(honest, &[1]).await;
    // What the flooder was sent since: a Welcome per Join, no round configuration, the goodbye.
    let (mut configs, mut welcomes) = (0, 0);
    loop {
        let msg = tokio::time::timeout(Duration::from_secs(10), flooder.conn.stream.recv())
            .await
            .expect("the flooder's goodbye did not come within 10 s")
            .unwrap_or_else(|e| panic!("the server closed the flooder: {e}"))
            .expect("the stream ended before the goodbye");
        match msg {
            Message::RoundConfig(_) => configs += 1,
            Message::Welcome(_) => welcomes += 1,
            Message::Bye(_) => break,
            _ => {}
        }
    }
    let heap_peak = test_support::peak_bytes().saturating_sub(base);
    let outcome = netkit::outcome(server).await;
    assert_eq!((configs, welcomes), (0, 1000));
    assert_eq!(outcome.counters.joins, 4);
    assert_eq!(outcome.counters.updates_accepted, 3);
    assert!(outcome.finished);
    // Budget: the four round configurations queued at the round start, plus 64 KiB. The old
    // behaviour (a configuration per Join) would have queued 1,000 of them (250 MB).
    let budget = 4 * rc_bytes + (64 << 10);
    assert!(
        outcome.net.peak_queued_bytes <= budget,
        "peak queued {} bytes, budget {budget}",
        outcome.net.peak_queued_bytes
    );
    assert!(outcome.net.peak_inbound_pending <= opts.limits.inbound_total);
    // The whole process (server and the four devices) grew by less than 32 MiB of heap during
    // the flood.
    assert!(
        heap_peak < 32 << 20,
        "heap peak {heap_peak} bytes above the base"
    );
}
