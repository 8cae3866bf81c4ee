//! A short replay of the load run (`cargo bench -p aggregator --bench load` runs 1,000
//! devices): 100 scripted devices with their own certificates connect at once from four
//! loopback addresses over QUIC with Retry and mutual TLS, and all of them run two whole rounds
//! with one server; nothing is refused and nothing is lost.

mod common;
mod netkit;

use std::time::Duration;

use netkit::load;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hundred_devices_at_once_run_two_rounds_with_nothing_lost() {
    let n = 100u64;
    let dir = tempfile::tempdir().unwrap();
    let pki = dir.path().join("pki");
    netkit::pki_dir(&pki, 1..=n);
    let mut opts = netkit::options(dir.path());
    // 25 devices per address start their handshakes together.
    opts.limits.max_handshakes_per_ip = 32;
    let mut config = netkit::config(2, n as usize);
    config.round_deadline_ms = 60_000;
    let (server, addr) =
        netkit::spawn_server(config, common::dims(), &opts, std::future::pending()).await;
    let report = tokio::time::timeout(
        Duration::from_secs(120),
        load::run_devices(&pki, addr, 1..=n, 25),
    )
    .await
    .expect("the devices did not finish within 120 s");
    assert!(report.failures.is_empty(), "{:?}", report.failures);
    assert_eq!(report.answered.len(), n as usize);
    assert!(report.answered.iter().all(|a| a == &[1, 2]));
    let outcome = netkit::outcome(server).await;
    assert!(outcome.finished);
    assert_eq!(outcome.counters.updates_accepted, 2 * n);
    assert_eq!(outcome.counters.joins, n);
    let net = &outcome.net;
    assert_eq!(
        (
            net.capacity_refusals,
            net.address_refusals,
            net.handshake_timeouts,
            net.slow_readers,
            net.flood_disconnects
        ),
        (0, 0, 0, 0, 0),
        "{net:?}"
    );
    assert!(net.retries_sent >= n, "{net:?}");
    // Loose: two shared CPU cores run the server and all devices in a debug build.
    let p99 = load::quantile(&report.join_ms, 0.99);
    assert!(p99 < 10_000.0, "Join-to-Welcome p99 {p99} ms");
}
