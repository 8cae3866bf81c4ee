//! End-to-end: a device agent keeps its state on disk (`device-agent join --state DIR`), as real
//! processes over loopback QUIC with mutual TLS (tiny test model, synthetic data, real
//! training). One agent is SIGKILLed mid-training in round 1 and again right after its round-2
//! upload; each time it rejoins with the kept maps its state file holds, trains no round twice,
//! and the aggregator refuses nothing, counts it in every round, and ends holding the same kept
//! maps for it as the device does. A corrupt state file stops `join` with an error naming the
//! file; `eval --state` refuses a state written for another base model.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use common::*;

const ROUND_TIMEOUT: Duration = Duration::from_secs(240);

/// Two tiny devices, three fedspine rounds, every device in every round; local rounds long
/// enough (120 steps, seconds) that a kill lands mid-training; a pruning arm in every round.
fn run_config() -> String {
    format!(
        "rounds = 3
devices_per_round = 2
over_selection = 0.0
min_devices = 2
quorum_fraction = 1.0
round_deadline_ms = 600000
local_steps = 120
prune_interval_steps = 40
learning_rate = 0.01
batch_size = 4
lora_alpha = 16.0
max_rank = 8
heartbeat_interval_ms = 1000
seed = 11

[arms]
ratio_min = 0.1
ratio_max = 0.3
ranks = [4, 8]

[aggregation]
method = \"exact\"

{TINY_MODEL_TOML}"
    )
}

fn state_dir(dir: &Path, id: u64) -> PathBuf {
    dir.join(format!("device-{id}-state"))
}

/// `device-agent join --state` with the tiny model; `name` tells incarnations apart.
fn start_agent_with_state(dir: &Path, id: u64, addr: &str, name: &str) -> Proc {
    let mut cmd = agent_command(dir, id, addr);
    cmd.arg("--state").arg(state_dir(dir, id));
    Proc::spawn(name, cmd, dir)
}

/// `device-agent state --state DIR --kept` as JSON.
fn show_state(dir: &Path) -> serde_json::Value {
    let out = Command::new(&bins().device_agent)
        .args(["state", "--kept", "--state"])
        .arg(dir)
        .output()
        .expect("running device-agent state");
    assert!(
        out.status.success(),
        "device-agent state: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("device-agent state prints JSON")
}

/// The `kept <digest>` at the end of a `state:` line.
fn kept_of(line: &str) -> String {
    line.rsplit("kept ").next().unwrap_or_default().to_string()
}

/// Waits until the process's stderr log has a line containing every one of `needles`.
fn wait_log(proc: &Proc, dir: &Path, needles: &[&str], timeout: Duration) {
    let path = dir.join(format!("{}.stderr", proc.name));
    let deadline = Instant::now() + timeout;
    loop {
        let text = std::fs::read_to_string(&path).unwrap_or_default();
        if text.lines().any(|l| needles.iter().all(|n| l.contains(n))) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{}: no log line with {needles:?}\n{}",
            proc.name,
            proc.log_tail()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn count(lines: &[String], pred: impl Fn(&str) -> bool) -> usize {
    lines.iter().filter(|l| pred(l)).count()
}

#[test]
fn a_killed_agent_rejoins_with_its_pruned_model_and_no_round_is_trained_twice() {
    let dir = tempfile::tempdir().unwrap();
    let dir = dir.path();
    make_pki(&dir.join("pki"), &[1, 2]);
    std::fs::write(dir.join("run.toml"), run_config()).unwrap();
    let (mut agg, addr) = start_aggregator(dir, "aggregator", "127.0.0.1:0", false);
    let mut a1 = start_agent_with_state(dir, 1, &addr, "device-1a");
    let mut a2 = start_agent_with_state(dir, 2, &addr, "device-2");
    let new = a1.wait_line(Duration::from_secs(60), |l| l.starts_with("state: new"));
    let dense = kept_of(&new);

    // Kill 1: mid-training in round 1. Nothing was saved for the round.
    wait_log(&a1, dir, &["round assigned", "round-1"], ROUND_TIMEOUT);
    std::thread::sleep(Duration::from_millis(200));
    a1.kill();
    let on_disk = show_state(&state_dir(dir, 1));
    assert!(
        on_disk["last_round"].is_null(),
        "the kill must land mid-training: {on_disk}"
    );
    assert_eq!(on_disk["kept_digest"], dense.as_str());
    let mut all_stdout = a1.stdout.clone();

    // It rejoins with the saved (dense) state and trains round 1 from it.
    let mut a1 = start_agent_with_state(dir, 1, &addr, "device-1b");
    let loaded = a1.wait_line(Duration::from_secs(60), |l| l.starts_with("state: loaded"));
    assert!(loaded.contains("no round yet"), "{loaded}");
    assert_eq!(kept_of(&loaded), dense);

    // Kill 2: right after the round-2 update went out.
    let uploaded = a1.wait_line(2 * ROUND_TIMEOUT, |l| {
        l.starts_with("state: saved round round-2 (uploaded)")
    });
    a1.kill();
    let pruned = kept_of(&uploaded);
    assert_ne!(pruned, dense, "the device pruned in rounds 1 and 2");
    let on_disk = show_state(&state_dir(dir, 1));
    assert_eq!(on_disk["last_round"]["round"], 2, "{on_disk}");
    assert_eq!(on_disk["kept_digest"], pruned.as_str());
    all_stdout.extend(a1.stdout.clone());

    // It rejoins with the kept maps it had uploaded.
    let mut a1 = start_agent_with_state(dir, 1, &addr, "device-1c");
    let loaded = a1.wait_line(Duration::from_secs(60), |l| l.starts_with("state: loaded"));
    assert!(loaded.contains("last round round-2"), "{loaded}");
    assert_eq!(kept_of(&loaded), pruned);

    let status = agg.wait(3 * ROUND_TIMEOUT);
    assert!(status.success(), "aggregator: {status}\n{}", agg.log_tail());
    assert!(
        agg.stdout.iter().any(|l| l == "finished: 3 of 3 rounds"),
        "{:?}",
        agg.stdout
    );
    for a in [&mut a1, &mut a2] {
        let status = a.wait(Duration::from_secs(30));
        assert!(status.success(), "{}: {status}\n{}", a.name, a.log_tail());
    }
    all_stdout.extend(a1.stdout.clone());

    // No round was trained twice: one saved result per round, over all three incarnations.
    for r in 1..=3 {
        let trained = format!("state: saved round round-{r} (trained)");
        assert_eq!(
            count(&all_stdout, |l| l.starts_with(&trained)),
            1,
            "round {r}: {all_stdout:?}"
        );
    }
    // The aggregator counted device 1 in every round, refused nothing (no stale or duplicate
    // update) and lost no one.
    let rounds = round_lines(dir);
    assert_eq!(rounds.len(), 3);
    for r in &rounds {
        let compute_ms: Vec<u64> = r["participants"]
            .as_array()
            .unwrap()
            .iter()
            .map(|p| p["compute_ms"].as_u64().unwrap())
            .collect();
        eprintln!("round {}: local rounds took {compute_ms:?} ms", r["round"]);
        assert_eq!(r["aggregated"], true, "{r}");
        assert_eq!(r["participants"].as_array().unwrap().len(), 2, "{r}");
        assert!(r["failed"].as_array().unwrap().is_empty(), "{r}");
        assert!(r["missed"].as_array().unwrap().is_empty(), "{r}");
        assert!(r["rejects"].as_object().unwrap().is_empty(), "{r}");
    }
    let checkpoint = dir.join("state").join(aggregator::server::CHECKPOINT_FILE);
    let saved: aggregator::CoordinatorState =
        aggregator::checkpoint::read(&checkpoint, aggregator::coordinator::STATE_SCHEMA).unwrap();
    assert_eq!(saved.counters.total_rejects(), 0);
    let record = saved
        .devices
        .iter()
        .find(|d| d.id.0 == 1)
        .expect("device 1's record");
    assert_eq!(record.rounds_completed, 3);
    assert_eq!(record.rounds_failed, 0);
    // The aggregator's record of the device is what the device holds.
    let final_state = show_state(&state_dir(dir, 1));
    assert_eq!(final_state["last_round"]["round"], 3);
    assert_eq!(final_state["last_round"]["status"], "acknowledged");
    let device_kept: protocol::KeptIndices =
        serde_json::from_value(final_state["kept"].clone()).unwrap();
    assert_eq!(record.kept.as_ref(), Some(&device_kept));
}

#[test]
fn unusable_state_is_an_error_naming_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let dir = dir.path();
    make_pki(&dir.join("pki"), &[1]);
    let state = state_dir(dir, 1);
    std::fs::create_dir_all(&state).unwrap();
    let file = state.join("device-state.bin");
    std::fs::write(&file, b"FSDEVST\n\x01\x00\x00\x00 torn").unwrap();
    let join = |extra: &[&str]| {
        Command::new(&bins().device_agent)
            .arg("join")
            .args(["--aggregator", "127.0.0.1:9", "--server-name", "localhost"])
            .arg("--pki")
            .arg(dir.join("pki"))
            .args(["--id", "1", "--model", "tiny", "--dataset", "synthetic"])
            .args(["--max-attempts", "1", "--reconnect-max-s", "1"])
            .args(["--idle-timeout-s", "1"])
            .arg("--state")
            .arg(&state)
            .args(extra)
            .output()
            .unwrap()
    };
    let out = join(&[]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains(&file.display().to_string()) && err.contains("truncated"),
        "{err}"
    );
    assert!(err.contains("--fresh-state"), "{err}");
    assert_eq!(
        std::fs::read(&file).unwrap(),
        b"FSDEVST\n\x01\x00\x00\x00 torn",
        "the file is left as it was"
    );

    // With --fresh-state the agent starts dense (here it then finds no aggregator) and keeps
    // the old file aside.
    let out = join(&["--fresh-state"]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains("state: fresh start"), "{stdout}");
    assert!(state.join("device-state.bin.old").is_file());
    let fresh = show_state(&state);
    assert!(fresh["last_round"].is_null(), "{fresh}");

    // A state of the tiny model is not the default model's.
    let text = dir.join("text.txt");
    std::fs::write(
        &text,
        "We the People of the United States, in Order to form",
    )
    .unwrap();
    let out = Command::new(&bins().device_agent)
        .args(["eval", "--state"])
        .arg(&state)
        .arg("--text")
        .arg(&text)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains(&file.display().to_string()) && err.contains("another base model"),
        "{err}"
    );
}
