//! Invariant checks of the `agent_session` fuzz target (`fuzz/`): arbitrary event sequences into
//! the sans-IO [`AgentSession`], decoded from fuzz bytes; and the replay of that target's
//! committed corpus as a unit test. Compiled with the `fuzzing` feature (and in tests) only;
//! not part of the agent's API.
//!
//! An input is a sequence of events, each an opcode byte and its operands: connected,
//! disconnected, a message (a frame body decoded by the wire codec, or a round configuration or
//! Welcome built field by field from the bytes, so that caps and clocks are reached without
//! the fuzzer having to discover bincode), a job done (ok, failed, or for another round), an
//! undelivered message, a timer firing at a later time, progress. The driver is modelled
//! faithfully where the session relies on it: a job is reported done only while one runs.

use std::sync::Arc;

use protocol::{
    decode_body, encode_frame, Arm, Capabilities, DeviceId, FailReason, GlobalSlice, KeptIndices,
    Message, ModelDims, Proj, RankPruning, RoundConfig, RoundFailed, RoundId, RoundOptions,
    Timestamp, UpdateStats, Welcome, DEFAULT_MAX_FRAME_BYTES, PROTOCOL_VERSION,
};

use super::{
    AgentCommand, AgentConfig, AgentEvent, AgentSession, DeviceState, JobOutcome, RoundLimits,
};
use crate::cost::PrunedModel;
use crate::lora::HostFactors;
use crate::model::ModelConfig;
use crate::prune::{Criterion, KeptIndicesExt, PruneConfig};

/// Events per input at most.
pub const MAX_EVENTS: usize = 256;

/// Commands one event may produce at most: the session's outbox bound, plus a `Cancel` and a
/// heartbeat from a timer.
pub const MAX_COMMANDS: usize = super::MAX_OUTBOX + 2;

/// The model the fuzzed device holds (that of the session's unit tests).
fn model() -> ModelConfig {
    ModelConfig::dense(256, 64, 4, 4, 2, 16, 128, true)
}

fn session(ram_bytes: u64) -> AgentSession {
    let cfg = model();
    let config = AgentConfig {
        device_id: DeviceId(3),
        capabilities: Capabilities {
            ram_bytes,
            backend: "flex".into(),
            bench_score: None,
            device_class: None,
        },
        criterion: Criterion::LoraGradient,
        prune: PruneConfig::for_layers(4),
        min_prune_events: 8,
        f16_updates: ram_bytes & 1 == 1,
        costs: Arc::new(PrunedModel {
            dense: cfg.clone(),
            seq_len: 16,
        }),
        limits: RoundLimits::default(),
        keep_adapter: true,
    };
    let state = DeviceState {
        kept: KeptIndices::dense(&cfg),
        adapter: None,
        importance: Default::default(),
    };
    AgentSession::new(config, state)
}

/// A cursor over the fuzz bytes; reads past the end give zeros.
struct Bytes<'a>(&'a [u8]);

impl Bytes<'_> {
    fn u8(&mut self) -> u8 {
        match self.0.split_first() {
            Some((&b, rest)) => {
                self.0 = rest;
                b
            }
            None => 0,
        }
    }

    fn u16(&mut self) -> u16 {
        u16::from_le_bytes([self.u8(), self.u8()])
    }

    fn u32(&mut self) -> u32 {
        u32::from_le_bytes([self.u8(), self.u8(), self.u8(), self.u8()])
    }

    fn u64(&mut self) -> u64 {
        u64::from(self.u32()) | (u64::from(self.u32()) << 32)
    }

    /// A value that is small most of the time and sometimes at or near the type's limit.
    fn wide(&mut self) -> u64 {
        match self.u8() % 8 {
            0 => u64::MAX,
            1 => u64::MAX / 2,
            2 => u64::from(u32::MAX),
            3 => self.u64(),
            _ => u64::from(self.u16()),
        }
    }

    fn f32(&mut self) -> f32 {
        match self.u8() % 8 {
            0 => f32::NAN,
            1 => f32::INFINITY,
            2 => -1.0,
            3 => 0.0,
            4 => f32::from_bits(self.u32()),
            5 => 1e30,
            _ => f32::from(self.u8()) / 64.0,
        }
    }

    fn take(&mut self, n: usize) -> &[u8] {
        let n = n.min(self.0.len());
        let (head, rest) = self.0.split_at(n);
        self.0 = rest;
        head
    }

    fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

fn welcome(b: &mut Bytes) -> Message {
    Message::Welcome(Welcome {
        protocol_version: if b.u8() == 0xff {
            PROTOCOL_VERSION + 1
        } else {
            PROTOCOL_VERSION
        },
        device_id: DeviceId(3),
        model: ModelDims::SMOLLM2_135M,
        lora_alpha: b.f32(),
        heartbeat_interval_ms: b.wide(),
    })
}

fn round_config(b: &mut Bytes) -> Message {
    let round = RoundId(u64::from(b.u8() % 8));
    let rank = b.wide() as u32;
    let global = b.u8().is_multiple_of(4).then(|| GlobalSlice {
        adapter: protocol::AdapterPayload {
            rank: b.wide() as u32,
            alpha: b.f32(),
            layers: Vec::new(),
        },
        kept: KeptIndices::dense(&model()),
        filled_rank: 1,
    });
    Message::RoundConfig(RoundConfig {
        round,
        arm: Arm {
            prune_ratio: f64::from(b.f32()),
            rank,
        },
        target_sparsity: b.u8().is_multiple_of(4).then(|| f64::from(b.f32())),
        global,
        deadline_ms: b.wide(),
        local_steps: b.wide() as u32,
        prune_interval_steps: u32::from(b.u8()),
        learning_rate: b.f32(),
        batch_size: b.wide() as u32,
        seed: u64::from(b.u8()),
        options: RoundOptions {
            rank_pruning: b.u8().is_multiple_of(4).then(|| RankPruning {
                reg: b.f32(),
                gamma: b.f32(),
                step: b.f32(),
            }),
        },
    })
}

fn outcome(round: RoundId, b: &mut Bytes) -> JobOutcome {
    let cfg = model();
    let rank = 1 + usize::from(b.u8() % 4);
    let (rows_out, cols_in) = crate::lora::proj_dims(&cfg, 0, Proj::Q);
    let factors = vec![HostFactors {
        block: 0,
        proj: Proj::Q,
        a: vec![0.01; rank * cols_in],
        b: vec![0.02; rows_out * rank],
        rows_out,
        cols_in,
    }];
    JobOutcome {
        round,
        kept: KeptIndices::dense(&cfg),
        adapter: (rank, 16.0, factors),
        importance: Default::default(),
        stats: UpdateStats {
            loss_pre: 2.0,
            loss_post: 1.5,
            sparsity: 0.2,
            param_count: 1000,
            compute_ms: u64::from(b.u16()),
            bytes_down: 0,
            bytes_up: 0,
            peak_mem_bytes: 1 << 20,
            samples: 8,
            steps: 4,
        },
        report: crate::train::RoundReport {
            steps: Vec::new(),
            sparsity_before: 0.0,
            sparsity_after: 0.2,
            prune_events: Vec::new(),
        },
        metric_pre: 1.0,
        metric_post: 1.5,
    }
}

/// What the model driver knows: whether a job runs and which round it trains.
#[derive(Default)]
struct Driver {
    job: Option<RoundId>,
    /// The last message the session asked to send (an `Undelivered` event hands one back).
    last_sent: Option<Message>,
    connected: bool,
    alpha: f64,
}

/// What a run of events produced, for the seed tests to check that a seed reaches its path.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct Summary {
    pub trains: usize,
    pub updates_sent: usize,
    pub failures_sent: usize,
    pub cancels: usize,
    pub heartbeats: usize,
    pub closes: usize,
    pub acked_rounds: usize,
}

/// Checks one event's commands and updates the model driver.
fn check_commands(
    session: &AgentSession,
    driver: &mut Driver,
    summary: &mut Summary,
    cmds: &[AgentCommand],
) {
    assert!(
        cmds.len() <= MAX_COMMANDS,
        "{} commands for one event",
        cmds.len()
    );
    assert!(session.outbox().len() <= super::MAX_OUTBOX);
    for cmd in cmds {
        match cmd {
            AgentCommand::Send(msg) => {
                let frame = match encode_frame(msg) {
                    Ok(frame) => frame,
                    Err(e) => panic!(
                        "the session sent a {} that does not encode: {e}",
                        msg.kind()
                    ),
                };
                assert!(frame.len() <= DEFAULT_MAX_FRAME_BYTES);
                match msg {
                    Message::Update(_) => summary.updates_sent += 1,
                    Message::RoundFailed(_) => summary.failures_sent += 1,
                    Message::Heartbeat(_) => summary.heartbeats += 1,
                    _ => {}
                }
                driver.last_sent = Some(msg.clone());
            }
            AgentCommand::Train { job, .. } => {
                assert!(
                    driver.job.is_none(),
                    "a second job ({}) while {:?} runs",
                    job.round,
                    driver.job
                );
                let limits = &session.config.limits;
                assert!(job.arm.rank >= 1 && job.arm.rank <= limits.max_rank);
                assert!(job.batch >= 1 && job.batch as u64 <= u64::from(limits.max_batch));
                assert!(job.local_steps >= 1);
                assert!(job.local_steps as u64 <= u64::from(limits.max_local_steps));
                assert!(job.lr.is_finite() && job.lr > 0.0 && job.lr <= limits.max_learning_rate);
                assert!(job.alpha.is_finite() && job.alpha > 0.0 && job.alpha <= limits.max_alpha);
                assert!(job.prune_every >= 1);
                assert_eq!(job.alpha, driver.alpha);
                driver.job = Some(job.round);
                summary.trains += 1;
            }
            AgentCommand::Cancel(round) => {
                assert_eq!(driver.job, Some(*round));
                summary.cancels += 1;
            }
            AgentCommand::Close(why) => {
                assert!(!why.is_empty());
                summary.closes += 1;
            }
        }
    }
}

/// Whether `cmds` answer round `round` with a failure report (sent now, or kept in the outbox
/// while disconnected).
fn reports_failure(session: &AgentSession, cmds: &[AgentCommand], round: RoundId) -> bool {
    let is_fail = |m: &Message| matches!(m, Message::RoundFailed(f) if f.round == round);
    cmds.iter()
        .any(|c| matches!(c, AgentCommand::Send(m) if is_fail(m)))
        || session.outbox().last().is_some_and(is_fail)
}

/// The fuzz target's entry: [`run_session_events`], its summary dropped.
pub fn check_session_events(data: &[u8]) {
    run_session_events(data);
}

/// Runs the events `data` encodes through a fresh session (see the module docs) and says
/// what it produced.
///
/// Invariants: no panic; at most [`MAX_COMMANDS`] commands per event and an outbox of at most
/// `MAX_OUTBOX` messages; every message sent encodes within the default frame limit; never a
/// second `Train` while a job runs; every job within the device's caps and at the Welcome's
/// alpha; a `Cancel` only for the running job; a round configuration over the caps that reaches
/// an idle device is answered with its `RoundFailed` and starts nothing; a timer's next
/// deadline never lies in the past of the time it was asked at.
pub fn run_session_events(data: &[u8]) -> Summary {
    let mut summary = Summary::default();
    let mut b = Bytes(data);
    let ram = match b.u8() % 4 {
        0 => u64::MAX,
        1 => 1 << 20,
        _ => 1 << 30,
    };
    let mut s = session(ram);
    let mut driver = Driver {
        alpha: 32.0,
        ..Driver::default()
    };
    let mut now = Timestamp(u64::from(b.u16()));
    for _ in 0..MAX_EVENTS {
        if b.is_empty() {
            break;
        }
        let op = b.u8();
        let event = match op % 10 {
            0 => {
                driver.connected = true;
                AgentEvent::Connected
            }
            1 => {
                driver.connected = false;
                AgentEvent::Disconnected
            }
            2 => {
                // A frame body through the wire codec.
                let len = usize::from(b.u16() % 2048);
                match decode_body(b.take(len)) {
                    Ok(msg) => AgentEvent::Message {
                        msg,
                        bytes: len as u64,
                    },
                    Err(_) => continue,
                }
            }
            3 | 4 => {
                let msg = if op % 10 == 3 {
                    round_config(&mut b)
                } else {
                    welcome(&mut b)
                };
                AgentEvent::Message {
                    bytes: b.wide(),
                    msg,
                }
            }
            5 => {
                // The driver reports a job done only while one runs.
                let Some(round) = driver.job.take() else {
                    continue;
                };
                let result = match b.u8() % 4 {
                    0 => Err(FailReason::Error("the job failed".into())),
                    1 => Ok(outcome(RoundId(round.0.wrapping_add(1)), &mut b)),
                    _ => Ok(outcome(round, &mut b)),
                };
                AgentEvent::JobDone(result)
            }
            6 => match driver.last_sent.take() {
                Some(msg) => AgentEvent::Undelivered(msg),
                None => AgentEvent::Undelivered(Message::RoundFailed(RoundFailed {
                    round: RoundId(u64::from(b.u8())),
                    reason: FailReason::Error("undelivered".into()),
                })),
            },
            7 | 8 => {
                now = Timestamp(now.0.saturating_add(b.wide() % (1 << 40)));
                let asked = now;
                let cmds = s.handle_timeout(now);
                check_commands(&s, &mut driver, &mut summary, &cmds);
                if let Some(t) = s.poll_timeout() {
                    assert!(
                        t > asked || s.is_training(),
                        "a timer due at {t:?} is left after handling {asked:?}"
                    );
                }
                continue;
            }
            _ => {
                s.set_progress(b.u32());
                continue;
            }
        };
        // What the caps say about a round configuration that reaches an idle device.
        let over_caps = match &event {
            AgentEvent::Message {
                msg: Message::RoundConfig(rc),
                ..
            } if driver.job.is_none() && s.last_update.is_none() => s
                .config
                .limits
                .check(rc, s.alpha)
                .is_err()
                .then_some(rc.round),
            _ => None,
        };
        if let AgentEvent::Message {
            msg: Message::Welcome(w),
            ..
        } = &event
        {
            if w.protocol_version == PROTOCOL_VERSION {
                driver.alpha = f64::from(w.lora_alpha);
            }
        }
        let cmds = s.handle(now, event);
        check_commands(&s, &mut driver, &mut summary, &cmds);
        if let Some(round) = over_caps {
            assert!(
                !cmds.iter().any(|c| matches!(c, AgentCommand::Train { .. })),
                "a configuration over the caps started a job"
            );
            assert!(
                reports_failure(&s, &cmds, round),
                "a configuration over the caps was not answered with RoundFailed"
            );
        }
        if cmds.iter().any(|c| matches!(c, AgentCommand::Close(_))) {
            break;
        }
    }
    summary.acked_rounds = s.acked_rounds.len();
    summary
}

/// The seed inputs of the `agent_session` target, named: a join and a round that trains and is
/// acknowledged, rounds over each cap, hostile heartbeat intervals and alpha, a disconnect with
/// an undelivered update, a deadline passing during training, a superseded configuration, and
/// every wire seed message through the codec.
pub fn seed_inputs() -> Vec<(String, Vec<u8>)> {
    // Opcodes (see `run_session_events`).
    const CONNECT: u8 = 0;
    const DISCONNECT: u8 = 1;
    const FRAME: u8 = 2;
    const CONFIG: u8 = 3;
    const WELCOME: u8 = 4;
    const DONE: [u8; 5] = [5, 2, 0, 0, 0];
    const UNDELIVERED: u8 = 6;
    const TIMER: u8 = 7;
    // `Bytes::wide` of a small value: kind 4, then a u16.
    let small = |v: u16| {
        let [lo, hi] = v.to_le_bytes();
        vec![4, lo, hi]
    };
    // Alpha 16 (kind 4: raw f32 bits), a 5 s heartbeat unless given, a 100-byte frame.
    let welcome = |alpha: &[u8], heartbeat: &[u8]| {
        let mut w = vec![WELCOME, 0];
        w.extend(alpha);
        w.extend(heartbeat);
        w.extend(small(100));
        w
    };
    let alpha16 = [4, 0, 0, 0x80, 0x41];
    // Round `round`: no global, prune ratio 0.25, no target, deadline 30 s, prune interval 2,
    // learning rate 1/64, seed 7, no round options (1 % 4 != 0), a 100-byte frame.
    let config = |round: u8, rank: &[u8], steps: &[u8], batch: &[u8]| {
        let mut c = vec![CONFIG, round];
        c.extend(rank);
        c.extend([1, 6, 16, 1]);
        c.extend(small(30_000));
        c.extend(steps);
        c.extend([2, 6, 1]);
        c.extend(batch);
        c.push(7);
        c.push(1);
        c.extend(small(100));
        c
    };
    let ok = config(1, &small(4), &small(8), &small(2));
    let joined = |alpha: &[u8], heartbeat: &[u8]| {
        let mut v = vec![2, 0, 0, CONNECT];
        v.extend(welcome(alpha, heartbeat));
        v
    };
    let framed = |m: &Message| -> Vec<u8> {
        match encode_frame(m) {
            Ok(frame) => {
                let body = &frame[protocol::FRAME_HEADER_BYTES..];
                let mut v = vec![FRAME];
                v.extend((body.len() as u16).to_le_bytes());
                v.extend(body);
                v
            }
            Err(e) => panic!("a seed {} does not encode: {e}", m.kind()),
        }
    };
    let hb5s = small(5000);
    let mut seeds = Vec::new();
    let mut v = joined(&alpha16, &hb5s);
    v.extend(&ok);
    v.extend(DONE);
    v.extend(framed(&Message::Ack(protocol::Ack { round: RoundId(1) })));
    seeds.push(("round-acked".to_string(), v));
    for (name, cfg) in [
        ("rank-max", config(1, &[0], &small(8), &small(2))),
        ("batch-max", config(1, &small(4), &small(8), &[0])),
        ("steps-max", config(1, &small(4), &[2], &small(2))),
    ] {
        let mut v = joined(&alpha16, &hb5s);
        v.extend(cfg);
        seeds.push((format!("over-cap-{name}"), v));
    }
    for (name, heartbeat) in [("heartbeat-max", [0]), ("heartbeat-half", [1])] {
        let mut v = joined(&alpha16, &heartbeat);
        v.extend([TIMER, 0, TIMER, 1, 8, 1]);
        seeds.push((name.to_string(), v));
    }
    let mut v = joined(&[1], &hb5s);
    v.extend(&ok);
    seeds.push(("alpha-infinite".to_string(), v));
    let mut v = joined(&alpha16, &hb5s);
    v.extend(&ok);
    v.push(DISCONNECT);
    v.extend(DONE);
    v.extend([UNDELIVERED, CONNECT]);
    v.extend(welcome(&alpha16, &hb5s));
    seeds.push(("update-across-reconnect".to_string(), v));
    let mut v = joined(&alpha16, &hb5s);
    v.extend(&ok);
    v.push(TIMER);
    v.extend(small(u16::MAX));
    v.extend(DONE);
    seeds.push(("deadline-during-training".to_string(), v));
    let mut v = joined(&alpha16, &hb5s);
    v.extend(&ok);
    v.extend(config(2, &small(2), &small(8), &small(2)));
    v.extend(DONE);
    v.extend(DONE);
    seeds.push(("superseded".to_string(), v));
    let mut v = vec![2, 0, 0, CONNECT];
    for m in protocol::fuzzing::seed_messages() {
        v.extend(framed(&m));
    }
    seeds.push(("wire-messages".to_string(), v));
    seeds
}

#[cfg(test)]
mod tests {
    use std::path::{Path, PathBuf};

    use super::*;

    fn inputs(dir: &Path) -> Vec<PathBuf> {
        let Ok(entries) = std::fs::read_dir(dir) else {
            return Vec::new();
        };
        let mut files: Vec<PathBuf> = entries
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.is_file())
            .collect();
        files.sort();
        files
    }

    /// The committed corpus and kept regressions of the `agent_session` fuzz target replay
    /// through the same checks (seconds, on stable).
    #[test]
    fn agent_session_fuzz_corpus_replays() {
        let fuzz = Path::new(env!("CARGO_MANIFEST_DIR")).join("../fuzz");
        let corpus = inputs(&fuzz.join("corpus/agent_session"));
        assert!(
            !corpus.is_empty(),
            "no corpus under fuzz/corpus/agent_session"
        );
        for path in corpus
            .iter()
            .chain(&inputs(&fuzz.join("regressions/agent_session")))
        {
            let bytes = match std::fs::read(path) {
                Ok(bytes) => bytes,
                Err(e) => panic!("cannot read {}: {e}", path.display()),
            };
            let outcome = std::panic::catch_unwind(|| check_session_events(&bytes));
            assert!(outcome.is_ok(), "agent_session fails on {}", path.display());
        }
    }

    /// The corpus holds every seed input as `seed-<name>` (so the fuzzer starts from them).
    /// With `FEDSPINE_WRITE_FUZZ_SEEDS=1` the seeds are (re)written there first:
    /// `FEDSPINE_WRITE_FUZZ_SEEDS=1 cargo test --workspace --lib agent_session_seeds`.
    #[test]
    fn agent_session_seeds_are_in_the_corpus() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../fuzz/corpus/agent_session");
        let write = std::env::var_os("FEDSPINE_WRITE_FUZZ_SEEDS").is_some_and(|v| v == "1");
        for (name, input) in seed_inputs() {
            let path = dir.join(format!("seed-{name}"));
            if write {
                if let Err(e) =
                    std::fs::create_dir_all(&dir).and_then(|()| std::fs::write(&path, &input))
                {
                    panic!("cannot write {}: {e}", path.display());
                }
            }
            let kept = std::fs::read(&path).ok();
            assert_eq!(
                kept.as_ref(),
                Some(&input),
                "{} is missing or stale",
                path.display()
            );
        }
    }

    /// A stream of undeliverable answers keeps the outbox at its bound, newest last, and the
    /// next Welcome sends exactly those.
    #[test]
    fn the_outbox_is_bounded_and_keeps_the_newest() {
        let mut s = session(1 << 30);
        let fail = |round: u64| {
            Message::RoundFailed(RoundFailed {
                round: RoundId(round),
                reason: FailReason::Error("undelivered".into()),
            })
        };
        for round in 0..1000 {
            assert!(s
                .handle(Timestamp(0), AgentEvent::Undelivered(fail(round)))
                .is_empty());
            assert!(s.outbox().len() <= super::super::MAX_OUTBOX);
        }
        s.handle(Timestamp(0), AgentEvent::Connected);
        let mut b = Bytes(&[0, 4, 0, 0, 0x80, 0x41, 4, 0x88, 0x13]);
        let cmds = s.handle(
            Timestamp(0),
            AgentEvent::Message {
                msg: welcome(&mut b),
                bytes: 100,
            },
        );
        let rounds: Vec<u64> = cmds
            .iter()
            .map(|c| match c {
                AgentCommand::Send(Message::RoundFailed(f)) => f.round.0,
                other => panic!("unexpected {other:?}"),
            })
            .collect();
        let max = super::super::MAX_OUTBOX as u64;
        assert_eq!(rounds, (1000 - max..1000).collect::<Vec<_>>());
        assert!(s.outbox().is_empty());
    }

    /// The seeds reach what they are named for (or the fuzzer would start far from the
    /// session's paths).
    #[test]
    fn agent_session_seeds_reach_their_paths() {
        let seeds = seed_inputs();
        let summary = |name: &str| {
            let Some((_, input)) = seeds.iter().find(|(n, _)| n == name) else {
                panic!("no seed {name}");
            };
            run_session_events(input)
        };
        let acked = summary("round-acked");
        assert_eq!(
            (acked.trains, acked.updates_sent, acked.acked_rounds),
            (1, 1, 1)
        );
        for cap in ["rank-max", "batch-max", "steps-max", "alpha-infinite"] {
            let name = if cap.starts_with("alpha") {
                cap.to_string()
            } else {
                format!("over-cap-{cap}")
            };
            let s = summary(&name);
            assert_eq!((s.trains, s.failures_sent), (0, 1), "{name}");
        }
        assert_eq!(summary("heartbeat-max").heartbeats, 0);
        let reconnect = summary("update-across-reconnect");
        assert_eq!((reconnect.trains, reconnect.updates_sent), (1, 1));
        let deadline = summary("deadline-during-training");
        assert_eq!(
            (
                deadline.cancels,
                deadline.failures_sent,
                deadline.updates_sent
            ),
            (1, 1, 0)
        );
        let superseded = summary("superseded");
        assert_eq!((superseded.trains, superseded.updates_sent), (2, 1));
        assert!(summary("wire-messages").closes <= 1);
    }
}
