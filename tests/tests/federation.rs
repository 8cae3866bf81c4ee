//! End-to-end federation over loopback QUIC with mutual TLS, as real processes: one
//! `aggregator serve` and three `device-agent join` (tiny test model, synthetic data, real
//! training). Two fedspine rounds lower the held-out loss; a SIGKILLed aggregator resumes from
//! its round-end checkpoint with the bandit state it had after round 1.

mod common;

use std::time::Duration;

use common::*;

const ROUND_TIMEOUT: Duration = Duration::from_secs(150);

fn mean(values: impl Iterator<Item = f64>) -> f64 {
    let v: Vec<f64> = values.collect();
    v.iter().sum::<f64>() / v.len() as f64
}

fn per_device_loss_pre(round: &serde_json::Value) -> Vec<(u64, f64)> {
    let mut v: Vec<(u64, f64)> = round["participants"]
        .as_array()
        .expect("participants")
        .iter()
        .map(|p| {
            (
                p["device"].as_u64().unwrap(),
                p["loss_pre"].as_f64().unwrap(),
            )
        })
        .collect();
    v.sort_by_key(|(d, _)| *d);
    v
}

#[test]
fn two_fedspine_rounds_over_quic_lower_the_held_out_loss() {
    let dir = tempfile::tempdir().unwrap();
    let dir = dir.path();
    make_pki(&dir.join("pki"), &[1, 2, 3]);
    std::fs::write(dir.join("run.toml"), tiny_run_config(2, "")).unwrap();
    let (mut agg, addr) = start_aggregator(dir, "aggregator", "127.0.0.1:0", false);
    let mut agents: Vec<Proc> = (1..=3).map(|id| start_agent(dir, id, &addr)).collect();

    let status = agg.wait(2 * ROUND_TIMEOUT);
    assert!(status.success(), "aggregator: {status}\n{}", agg.log_tail());
    assert!(
        agg.stdout.iter().any(|l| l == "finished: 2 of 2 rounds"),
        "{:?}",
        agg.stdout
    );
    for a in &mut agents {
        let status = a.wait(Duration::from_secs(30));
        assert!(status.success(), "{}: {status}\n{}", a.name, a.log_tail());
        assert!(
            a.stdout
                .iter()
                .any(|l| l.starts_with("finished: 2 rounds acknowledged")),
            "{}: {:?}",
            a.name,
            a.stdout
        );
    }

    let rounds = round_lines(dir);
    assert_eq!(rounds.len(), 2);
    for r in &rounds {
        assert_eq!(r["strategy"], "fedspine");
        assert_eq!(r["aggregated"], true, "{r}");
        assert_eq!(r["participants"].as_array().unwrap().len(), 3, "{r}");
        for p in r["participants"].as_array().unwrap() {
            assert!(p["compute_ms"].as_u64().unwrap() > 0, "{p}");
            assert!(p["bytes_up"].as_u64().unwrap() > 10_000, "{p}");
            assert!(p["bytes_down"].as_u64().unwrap() > 10_000, "{p}");
            let rank = p["arm"]["rank"].as_u64().unwrap();
            assert!(rank == 4 || rank == 8, "{p}");
        }
    }
    // Round 2 starts from the aggregate of round 1: its held-out loss before local training is
    // the aggregated adapter's loss on each device's own held-out windows. It must be lower
    // than the loss before round 1 (base model, B = 0), on average and on every device.
    let before = per_device_loss_pre(&rounds[0]);
    let after = per_device_loss_pre(&rounds[1]);
    for ((d, b), (_, a)) in before.iter().zip(&after) {
        assert!(
            a < b,
            "device {d}: held-out loss {b} before round 1, {a} after it"
        );
    }
    let (b, a) = (
        mean(before.iter().map(|x| x.1)),
        mean(after.iter().map(|x| x.1)),
    );
    assert!(a < 0.95 * b, "mean held-out loss {b} -> {a}");
    // fedspine prunes: some device ended round 1 sparser than it started.
    assert!(
        rounds[0]["participants"]
            .as_array()
            .unwrap()
            .iter()
            .any(|p| p["sparsity"].as_f64().unwrap() > 0.0),
        "{}",
        rounds[0]
    );
}

#[test]
fn a_killed_aggregator_resumes_rounds_two_and_three_with_the_bandit_state_of_round_one() {
    let dir = tempfile::tempdir().unwrap();
    let dir = dir.path();
    make_pki(&dir.join("pki"), &[1, 2, 3]);
    // A pause between rounds makes the kill land between round 1 and round 2.
    std::fs::write(
        dir.join("run.toml"),
        tiny_run_config(3, "round_interval_ms = 1500"),
    )
    .unwrap();
    let (mut agg, addr) = start_aggregator(dir, "aggregator", "127.0.0.1:0", false);
    let mut agents: Vec<Proc> = (1..=3).map(|id| start_agent(dir, id, &addr)).collect();

    wait_until(ROUND_TIMEOUT, "round 1 to close", || {
        !round_lines(dir).is_empty()
    });
    agg.kill();
    let checkpoint = dir.join("state").join(aggregator::server::CHECKPOINT_FILE);
    let saved: aggregator::CoordinatorState =
        aggregator::checkpoint::read(&checkpoint, aggregator::coordinator::STATE_SCHEMA)
            .expect("the checkpoint written at the end of round 1");
    assert_eq!(saved.round.0, 1);
    assert_eq!(saved.devices.len(), 3);

    // A new run must not silently replace the checkpoint.
    let out = std::process::Command::new(&bins().aggregator)
        .arg("serve")
        .arg("--config")
        .arg(dir.join("run.toml"))
        .arg("--pki")
        .arg(dir.join("pki"))
        .args(["--listen", "127.0.0.1:0"])
        .arg("--state")
        .arg(dir.join("state"))
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("pass --resume"), "{err}");

    let (mut agg, addr2) = start_aggregator(dir, "aggregator-resumed", &addr, true);
    assert_eq!(addr2, addr);
    let status = agg.wait(3 * ROUND_TIMEOUT);
    assert!(
        status.success(),
        "resumed aggregator: {status}\n{}",
        agg.log_tail()
    );
    assert!(
        agg.stdout.iter().any(|l| l == "finished: 3 of 3 rounds"),
        "{:?}",
        agg.stdout
    );
    for a in &mut agents {
        let status = a.wait(Duration::from_secs(30));
        assert!(status.success(), "{}: {status}\n{}", a.name, a.log_tail());
    }

    let events = metrics(dir);
    let starts: Vec<&serde_json::Value> = events.iter().filter(|v| v["event"] == "start").collect();
    assert_eq!(starts.len(), 2);
    assert_eq!(starts[1]["resumed"], true);
    assert_eq!(starts[1]["round"], 1);
    assert_eq!(
        starts[1]["bandit_digest"].as_str().unwrap(),
        saved.bandit_digest(),
        "the resumed run must continue from the bandit state saved after round 1"
    );
    assert_ne!(
        starts[0]["bandit_digest"], starts[1]["bandit_digest"],
        "round 1 taught the bandits something"
    );
    let rounds: Vec<u64> = round_lines(dir)
        .iter()
        .map(|r| r["round"].as_u64().unwrap())
        .collect();
    assert_eq!(rounds, vec![1, 2, 3]);
    for r in round_lines(dir) {
        assert_eq!(r["aggregated"], true, "{r}");
    }
    let last: aggregator::CoordinatorState =
        aggregator::checkpoint::read(&checkpoint, aggregator::coordinator::STATE_SCHEMA).unwrap();
    assert_eq!(last.round.0, 3);
    assert!(last.devices.iter().all(|d| d.rounds_completed == 3));
}
