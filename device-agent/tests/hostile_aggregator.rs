//! A hostile aggregator against the device session (sans-IO, no model): round configurations
//! with a rank or batch of `u32::MAX` are refused with a clear `RoundFailed`, no `Train`, and
//! nothing sized for them is allocated (a counting allocator watches), and a Welcome with a
//! huge heartbeat interval neither panics nor wraps the session's timers; and a job the driver
//! cancels (its deadline passed) stops at its next step (on the tiny random model).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use device_agent::cost::PrunedModel;
use device_agent::job::{run_job, LocalData};
use device_agent::model::ModelConfig;
use device_agent::prune::{Criterion, HeldModel, KeptIndicesExt, PruneConfig};
use device_agent::session::{
    AgentCommand, AgentConfig, AgentEvent, AgentSession, DeviceState, RoundLimits, TrainJob,
};
use protocol::{
    Arm, Capabilities, DeviceId, FailReason, KeptIndices, Message, ModelDims, RoundConfig,
    RoundFailed, RoundId, Timestamp, Welcome, PROTOCOL_VERSION,
};

#[global_allocator]
static A: test_support::CountingAllocator = test_support::CountingAllocator;

fn tiny() -> ModelConfig {
    ModelConfig::dense(256, 64, 4, 4, 2, 16, 128, true)
}

/// The settings of a device with 1 GiB of RAM holding the tiny test model.
fn agent_config() -> AgentConfig {
    AgentConfig {
        device_id: DeviceId(3),
        capabilities: Capabilities {
            ram_bytes: 1 << 30,
            backend: "flex".into(),
            bench_score: None,
            device_class: None,
        },
        criterion: Criterion::LoraGradient,
        prune: PruneConfig::for_layers(4),
        min_prune_events: 8,
        f16_updates: false,
        costs: Arc::new(PrunedModel {
            dense: tiny(),
            seq_len: 16,
        }),
        limits: RoundLimits::default(),
        keep_adapter: true,
    }
}

/// A connected session of a device with 1 GiB of RAM, welcomed with `heartbeat_ms`.
fn session(heartbeat_ms: u64, now: Timestamp) -> AgentSession {
    let config = agent_config();
    let state = DeviceState {
        kept: KeptIndices::dense(&tiny()),
        adapter: None,
        importance: Default::default(),
    };
    let mut s = AgentSession::new(config, state);
    s.handle(now, AgentEvent::Connected);
    s.handle(
        now,
        AgentEvent::Message {
            msg: Message::Welcome(Welcome {
                protocol_version: PROTOCOL_VERSION,
                device_id: DeviceId(3),
                model: ModelDims::SMOLLM2_135M,
                lora_alpha: 16.0,
                heartbeat_interval_ms: heartbeat_ms,
            }),
            bytes: 100,
        },
    );
    s
}

fn config(round: u64, rank: u32, batch: u32) -> Message {
    Message::RoundConfig(RoundConfig {
        round: RoundId(round),
        arm: Arm::new(0.2, rank),
        target_sparsity: None,
        global: None,
        deadline_ms: u64::MAX,
        local_steps: 4,
        prune_interval_steps: 2,
        learning_rate: 1e-3,
        batch_size: batch,
        seed: 9,
        options: Default::default(),
    })
}

#[test]
fn a_huge_rank_or_batch_is_refused_without_allocating_for_it() {
    let mut s = session(0, Timestamp(0));
    for (round, rank, batch, why) in [
        (1, u32::MAX, 2, "rank 4294967295 is not in [1, 256]"),
        (2, 8, u32::MAX, "batch size 4294967295 is not in [1, 64]"),
        (3, u32::MAX, u32::MAX, "rank 4294967295 is not in [1, 256]"),
    ] {
        let event = AgentEvent::Message {
            msg: config(round, rank, batch),
            bytes: 100,
        };
        let (cmds, peak) = test_support::thread_peak_during(|| s.handle(Timestamp(round), event));
        assert!(
            peak < 64 << 10,
            "handling the configuration allocated {peak} bytes at its peak"
        );
        match cmds.as_slice() {
            [AgentCommand::Send(Message::RoundFailed(RoundFailed {
                round: r,
                reason: FailReason::Error(text),
            }))] => {
                assert_eq!(*r, RoundId(round));
                assert_eq!(text, &format!("round configuration refused: {why}"));
            }
            other => panic!("expected one RoundFailed, got {other:?}"),
        }
        assert!(!s.is_training());
    }
    // The device is not wedged: a configuration within the caps trains.
    let cmds = s.handle(
        Timestamp(10),
        AgentEvent::Message {
            msg: config(4, 8, 2),
            bytes: 100,
        },
    );
    assert!(matches!(cmds.as_slice(), [AgentCommand::Train { .. }]));
}

#[test]
fn a_huge_heartbeat_interval_neither_panics_nor_wraps() {
    for interval in [u64::MAX, u64::MAX / 2, u64::MAX / 2 + 1] {
        let now = Timestamp(u64::MAX / 2 + 7);
        let mut s = session(interval, now);
        let due = s.poll_timeout().expect("a heartbeat is scheduled");
        assert_eq!(due, now.plus_ms(interval));
        assert!(due > now);
        // Nothing is due before its time, and at the end of time one beat goes out.
        assert!(s.handle_timeout(now).is_empty());
        let cmds = s.handle_timeout(Timestamp(u64::MAX));
        assert!(matches!(
            cmds.as_slice(),
            [AgentCommand::Send(Message::Heartbeat(_))]
        ));
        assert_eq!(s.poll_timeout(), Some(Timestamp(u64::MAX)));
    }
}

#[test]
fn a_cancelled_job_stops_at_its_next_step() {
    let base = device_agent::client::tiny_model(&burn::tensor::Device::flex());
    let data = LocalData::Lm(device_agent::client::synthetic_shard(8, 8, 2, 1));
    let mut agent = agent_config();
    agent.prune = PruneConfig::for_layers(base.config.n_layers());
    let job = TrainJob {
        round: RoundId(1),
        arm: Arm::new(0.0, 2),
        target_sparsity: None,
        global: None,
        local_steps: 6,
        prune_every: 2,
        lr: 1e-3,
        batch: 2,
        seed: 3,
        alpha: 16.0,
        deadline: Timestamp(u64::MAX),
        rank_pruning: None,
        memory: device_agent::cost::MemoryMode::KeepActivations,
    };
    let state = DeviceState::fresh(&base);
    // The driver's flag is set (the session said Cancel) while step 2 runs: the job stops
    // after that step instead of running all 6.
    let cancel = AtomicBool::new(false);
    let mut seen = Vec::new();
    let held = HeldModel::sliced(&base, &state.kept).unwrap();
    let r = run_job(&job, &state, held, &data, &agent, |step| {
        seen.push(step);
        if step == 2 {
            cancel.store(true, Ordering::SeqCst);
        }
        !cancel.load(Ordering::SeqCst)
    });
    let err = r.outcome.expect_err("a cancelled job has no outcome");
    assert_eq!(
        err.to_string(),
        "stopped after 2 of 6 local steps: the round's deadline passed"
    );
    assert_eq!(seen, vec![1, 2]);
    // Uncancelled, the same job runs every step.
    // The cancelled round handed its model back; the next one runs on it.
    let out = run_job(&job, &state, r.held, &data, &agent, |_| true)
        .outcome
        .expect("the job runs");
    assert_eq!(out.stats.steps, 6);
}
