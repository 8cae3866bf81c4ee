//! Crash consistency of the aggregator *process*: `aggregator serve` is paused at a failpoint
//! (`FEDSPINE_FAILPOINT`, see `aggregator::checkpoint::failpoint`) and SIGKILLed there, in
//! round 2 of 3: during the round's aggregation (one of its two updates folded in), after the
//! checkpoint's temporary file is written but before the rename, and after the rename. On disk
//! each time is exactly the last good round's checkpoint (round 1, round 1 plus a stale
//! temporary file, round 2); `serve --resume` removes the temporary file, starts from that
//! checkpoint (its round and bandit state) and finishes the run, and its final global adapter
//! equals an uninterrupted run's bit for bit (nothing lost, nothing applied twice).
//!
//! Two scripted devices answer every round configuration with their slice plus a fixed shift
//! (over loopback QUIC with mutual TLS, reconnecting when the server goes away). One rank arm
//! and two updates per round make the global adapter independent of arrival order and timing
//! (a sum of two terms is the same either way round), so runs are comparable bit for bit.

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use aggregator::checkpoint::{self, FAILPOINT_ENV};
use aggregator::coordinator::STATE_SCHEMA;
use aggregator::server::CHECKPOINT_FILE;
use aggregator::{pki, CoordinatorState};
use protocol::*;

const ROUNDS: u64 = 3;
const TIMEOUT: Duration = Duration::from_secs(90);

fn run_toml() -> String {
    format!(
        "rounds = {ROUNDS}
devices_per_round = 2
over_selection = 0.0
min_devices = 2
quorum_fraction = 1.0
round_deadline_ms = 60000
local_steps = 4
prune_interval_steps = 2
learning_rate = 0.01
batch_size = 2
lora_alpha = 16.0
max_rank = 4
heartbeat_interval_ms = 1000
seed = 5

[arms]
ratio_min = 0.0
ratio_max = 0.2
ranks = [4]

[aggregation]
method = \"exact\"

[model]
n_blocks = 2
d_model = 8
n_heads = 2
n_kv_heads = 1
head_dim = 4
ffn = 12
"
    )
}

/// A run directory: PKI for the server and devices 1 and 2, the run config.
fn run_dir() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    let pki_dir = dir.path().join("pki");
    pki::init_ca(&pki_dir).unwrap();
    pki::issue_server(&pki_dir, &["localhost".into()]).unwrap();
    for d in [1, 2] {
        pki::issue_device(&pki_dir, DeviceId(d)).unwrap();
    }
    std::fs::write(dir.path().join("run.toml"), run_toml()).unwrap();
    dir
}

/// `aggregator serve` as a child process, its stdout and stderr lines on a channel.
struct Server {
    child: Child,
    lines: mpsc::Receiver<String>,
    seen: Vec<String>,
}

impl Server {
    fn start(dir: &Path, listen: &str, resume: bool, failpoint: Option<&str>) -> Server {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_aggregator"));
        cmd.arg("serve")
            .arg("--config")
            .arg(dir.join("run.toml"))
            .arg("--pki")
            .arg(dir.join("pki"))
            .args(["--listen", listen])
            .arg("--state")
            .arg(dir.join("state"))
            .arg("--metrics")
            .arg(dir.join("metrics.jsonl"))
            .args(["--finish-grace-s", "1"])
            .env_remove(FAILPOINT_ENV)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        if resume {
            cmd.arg("--resume");
        }
        if let Some(point) = failpoint {
            cmd.env(FAILPOINT_ENV, point);
        }
        let mut child = cmd.spawn().expect("spawn the aggregator binary");
        let (tx, lines) = mpsc::channel();
        let out = child.stdout.take().unwrap();
        let err = child.stderr.take().unwrap();
        for pipe in [
            Box::new(out) as Box<dyn std::io::Read + Send>,
            Box::new(err),
        ] {
            let tx = tx.clone();
            std::thread::spawn(move || {
                for line in BufReader::new(pipe).lines().map_while(Result::ok) {
                    if tx.send(line).is_err() {
                        break;
                    }
                }
            });
        }
        Server {
            child,
            lines,
            seen: Vec::new(),
        }
    }

    /// Waits for a line that satisfies `pred` and returns it.
    fn wait_line(&mut self, what: &str, pred: impl Fn(&str) -> bool) -> String {
        let end = Instant::now() + TIMEOUT;
        loop {
            let left = end.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(line) => {
                    self.seen.push(line.clone());
                    if pred(&line) {
                        return line;
                    }
                }
                Err(_) => {
                    let _ = self.child.kill();
                    let tail = self.seen[self.seen.len().saturating_sub(30)..].join("\n");
                    panic!("no line {what} from the aggregator; its last lines:\n{tail}");
                }
            }
        }
    }

    fn listening(&mut self) -> String {
        let line = self.wait_line("listening on", |l| l.starts_with("listening on "));
        line.trim_start_matches("listening on ").to_string()
    }

    fn finished(mut self) {
        self.wait_line("finished", |l| {
            l == format!("finished: {ROUNDS} of {ROUNDS} rounds")
        });
        let status = self.child.wait().unwrap();
        assert!(status.success(), "the aggregator exited with {status}");
    }

    /// SIGKILL (`Child::kill` on Unix), then reap.
    fn kill(mut self) {
        self.child.kill().unwrap();
        self.child.wait().unwrap();
    }
}

/// A scripted device: joins, answers every round configuration with its slice plus a shift of
/// `B` that depends on its id, and reconnects when the connection ends, until the server says
/// the run is finished (or `TIMEOUT` passes). Returns the rounds it answered.
async fn device(pki: PathBuf, id: u64, addr: SocketAddr) -> Vec<u64> {
    let end = Instant::now() + TIMEOUT;
    let config = transport::load_client_config(&pki, DeviceId(id)).unwrap();
    let endpoint = transport::client_endpoint("127.0.0.1:0".parse().unwrap(), config).unwrap();
    let mut answered = Vec::new();
    while Instant::now() < end {
        let Ok(mut conn) =
            transport::connect(&endpoint, addr, "localhost", DEFAULT_MAX_FRAME_BYTES).await
        else {
            tokio::time::sleep(Duration::from_millis(200)).await;
            continue;
        };
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
        if conn.stream.send(&join).await.is_err() {
            continue;
        }
        loop {
            match conn.stream.recv().await {
                Ok(Some(Message::RoundConfig(rc))) => {
                    let Some(slice) = rc.global else {
                        panic!("round {} came without a global slice", rc.round);
                    };
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
                    if conn.stream.send(&Message::Update(update)).await.is_err() {
                        break;
                    }
                }
                Ok(Some(Message::Bye(Bye {
                    reason: ByeReason::Finished,
                }))) => return answered,
                Ok(Some(_)) => {}
                Ok(None) | Err(_) => break,
            }
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    answered
}

/// Runs devices 1 and 2 against `addr` on a runtime of their own thread, until the run ends.
fn spawn_devices(dir: &Path, addr: &str) -> std::thread::JoinHandle<Vec<Vec<u64>>> {
    let pki = dir.join("pki");
    let addr: SocketAddr = addr.parse().unwrap();
    std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async move {
            let tasks: Vec<_> = [1, 2]
                .into_iter()
                .map(|id| tokio::spawn(device(pki.clone(), id, addr)))
                .collect();
            let mut answered = Vec::new();
            for t in tasks {
                answered.push(t.await.unwrap());
            }
            answered
        })
    })
}

fn checkpoint_path(dir: &Path) -> PathBuf {
    dir.join("state").join(CHECKPOINT_FILE)
}

fn saved(dir: &Path) -> CoordinatorState {
    checkpoint::read(&checkpoint_path(dir), STATE_SCHEMA).expect("a whole checkpoint")
}

/// Temporary checkpoint files in the state directory.
fn temps(dir: &Path) -> Vec<String> {
    std::fs::read_dir(dir.join("state"))
        .unwrap()
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.contains(".tmp"))
        .collect()
}

/// Every value of the global adapter as bits.
fn global_bits(state: &CoordinatorState) -> Vec<u32> {
    state
        .global
        .layers
        .iter()
        .flat_map(|l| l.a.iter().chain(&l.b).map(|x| x.to_bits()))
        .collect()
}

fn metrics(dir: &Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(dir.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

/// An uninterrupted run's final state.
fn uninterrupted() -> CoordinatorState {
    let dir = run_dir();
    let mut server = Server::start(dir.path(), "127.0.0.1:0", false, None);
    let addr = server.listening();
    let devices = spawn_devices(dir.path(), &addr);
    server.finished();
    for answered in devices.join().unwrap() {
        assert_eq!(answered, vec![1, 2, 3]);
    }
    let state = saved(dir.path());
    assert_eq!(state.round.0, ROUNDS);
    state
}

/// Kills the server at `failpoint` (armed for its `hit`-th hit), checks what is on disk, resumes
/// and returns the final state.
fn killed_and_resumed(
    reference: &[u32],
    failpoint: &str,
    hit: u32,
    round_on_disk: u64,
    temp_left: bool,
) -> CoordinatorState {
    let dir = run_dir();
    let dir = dir.path();
    let armed = format!("{failpoint}:{hit}");
    let mut server = Server::start(dir, "127.0.0.1:0", false, Some(&armed));
    let addr = server.listening();
    let devices = spawn_devices(dir, &addr);
    server.wait_line("the failpoint", |l| {
        l.starts_with(&format!("failpoint {failpoint} reached (hit {hit})"))
    });
    server.kill();

    // What a crash here leaves: the last good round's checkpoint, whole.
    let on_disk = saved(dir);
    assert_eq!(on_disk.round.0, round_on_disk, "{failpoint}");
    assert!(on_disk.global.is_finite() && on_disk.global.is_well_formed());
    assert_ne!(
        global_bits(&on_disk),
        reference,
        "{failpoint}: every round moves the global adapter (else the comparison shows nothing)"
    );
    assert_eq!(
        !temps(dir).is_empty(),
        temp_left,
        "{failpoint}: {:?}",
        temps(dir)
    );

    let mut resumed = Server::start(dir, &addr, true, None);
    assert_eq!(resumed.listening(), addr);
    resumed.finished();
    for answered in devices.join().unwrap() {
        // Every round answered at least once; the interrupted one perhaps twice.
        for round in 1..=ROUNDS {
            assert!(answered.contains(&round), "{failpoint}: {answered:?}");
        }
    }
    assert!(temps(dir).is_empty(), "{failpoint}: {:?}", temps(dir));

    // The resumed run started from exactly what was on disk.
    let events = metrics(dir);
    let starts: Vec<&serde_json::Value> = events.iter().filter(|v| v["event"] == "start").collect();
    assert_eq!(starts.len(), 2, "{failpoint}");
    assert_eq!(starts[1]["resumed"], true);
    assert_eq!(starts[1]["round"], round_on_disk);
    assert_eq!(
        starts[1]["bandit_digest"].as_str(),
        Some(on_disk.bandit_digest().as_str()),
        "{failpoint}: the resumed run did not start from the checkpoint on disk"
    );
    let final_state = saved(dir);
    assert_eq!(final_state.round.0, ROUNDS);
    final_state
}

#[test]
fn a_server_killed_mid_aggregation_or_mid_checkpoint_resumes_to_the_uninterrupted_result() {
    let reference = global_bits(&uninterrupted());
    // Hit 3 of `mid-aggregation` is round 2's first acknowledged update (two per round); hit 2
    // of a checkpoint failpoint is round 2's checkpoint (one per round, none at the start).
    for (failpoint, hit, round_on_disk, temp_left) in [
        ("mid-aggregation", 3, 1, false),
        ("after-temp-write", 2, 1, true),
        ("after-rename", 2, 2, false),
    ] {
        let resumed = killed_and_resumed(&reference, failpoint, hit, round_on_disk, temp_left);
        assert!(
            global_bits(&resumed) == reference,
            "{failpoint}: the resumed run's global adapter differs from the uninterrupted run's"
        );
        assert!(resumed.devices.iter().all(|d| d.rounds_completed == ROUNDS));
    }
}

#[test]
fn an_unarmed_or_malformed_failpoint_is_inert() {
    // Another point's name, and a hit count that is not a number: the run goes through.
    for armed in ["no-such-point", "after-rename:x"] {
        let dir = run_dir();
        let mut server = Server::start(dir.path(), "127.0.0.1:0", false, Some(armed));
        let addr = server.listening();
        let devices = spawn_devices(dir.path(), &addr);
        server.finished();
        devices.join().unwrap();
        assert_eq!(saved(dir.path()).round.0, ROUNDS, "{armed}");
    }
}
