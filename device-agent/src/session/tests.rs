//! Unit tests of the device session: jobs across reconnections, re-sent and superseded
//! configurations, the outbox, the out-of-memory pre-check, byte accounting, and a hostile
//! aggregator's values (heartbeat intervals, caps, the round deadline) (sans-IO, no model).

use super::*;
use crate::cost::{MemoryMode, PrunedModel};
use crate::model::ModelConfig;
use crate::prune::KeptIndicesExt;
use protocol::{ModelDims, Welcome};

fn tiny() -> ModelConfig {
    ModelConfig::dense(256, 64, 4, 4, 2, 16, 128, true)
}

/// The costs the test sessions size rounds with.
fn costs() -> PrunedModel {
    PrunedModel {
        dense: tiny(),
        seq_len: 16,
    }
}

fn session() -> AgentSession {
    session_with_ram(1 << 30)
}

/// A connected, welcomed session of a device with `ram_bytes` of RAM.
fn session_with_ram(ram_bytes: u64) -> AgentSession {
    let cfg = tiny();
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
        f16_updates: false,
        costs: Arc::new(costs()),
        limits: RoundLimits::default(),
        keep_adapter: true,
    };
    let state = DeviceState {
        kept: KeptIndices::dense(&cfg),
        adapter: None,
        importance: Default::default(),
    };
    let mut s = AgentSession::new(config, state);
    s.handle(Timestamp(0), AgentEvent::Connected);
    s.handle(Timestamp(0), msg(welcome()));
    s
}

/// A message as the driver delivers it (a 100-byte frame).
fn msg(m: Message) -> AgentEvent {
    AgentEvent::Message { msg: m, bytes: 100 }
}

fn welcome() -> Message {
    Message::Welcome(Welcome {
        protocol_version: PROTOCOL_VERSION,
        device_id: DeviceId(3),
        model: ModelDims::SMOLLM2_135M,
        lora_alpha: 16.0,
        heartbeat_interval_ms: 0,
    })
}

fn config(round: u64, rank: u32, deadline_ms: u64) -> Message {
    Message::RoundConfig(RoundConfig {
        round: RoundId(round),
        arm: Arm {
            prune_ratio: 0.2,
            rank,
        },
        target_sparsity: None,
        global: None,
        deadline_ms,
        local_steps: 4,
        prune_interval_steps: 2,
        learning_rate: 1e-3,
        batch_size: 2,
        seed: 9,
        options: Default::default(),
    })
}

fn failed() -> AgentEvent {
    AgentEvent::JobDone(Err(FailReason::Error("test".into())))
}

fn trains(cmds: &[AgentCommand]) -> Vec<(RoundId, u32, Timestamp)> {
    cmds.iter()
        .filter_map(|c| match c {
            AgentCommand::Train { job, .. } => Some((job.round, job.arm.rank, job.deadline)),
            _ => None,
        })
        .collect()
}

fn failures(cmds: &[AgentCommand]) -> Vec<RoundId> {
    cmds.iter()
        .filter_map(|c| match c {
            AgentCommand::Send(Message::RoundFailed(f)) => Some(f.round),
            _ => None,
        })
        .collect()
}

#[test]
fn a_job_survives_a_reconnection_and_a_re_sent_configuration() {
    let mut s = session();
    let c = s.handle(Timestamp(10), msg(config(1, 8, 60_000)));
    assert_eq!(trains(&c).len(), 1);
    assert!(s.handle(Timestamp(20), AgentEvent::Disconnected).is_empty());
    let c = s.handle(Timestamp(30), AgentEvent::Connected);
    assert!(matches!(
        c.as_slice(),
        [AgentCommand::Send(Message::Join(_))]
    ));
    assert!(
        s.is_training(),
        "reconnecting must not forget the running job"
    );
    s.handle(Timestamp(31), msg(welcome()));
    // The aggregator re-sends the same job with the deadline left: no second job.
    let c = s.handle(Timestamp(32), msg(config(1, 8, 40_000)));
    assert!(
        trains(&c).is_empty(),
        "a re-sent configuration must not start a second job"
    );
    // The running job's result is still reported for its round.
    let c = s.handle(Timestamp(50), failed());
    assert_eq!(failures(&c), vec![RoundId(1)]);
    assert!(!s.is_training());
}

#[test]
fn a_different_configuration_waits_for_the_running_job_and_supersedes_it() {
    let mut s = session();
    s.handle(Timestamp(10), msg(config(1, 8, 60_000)));
    // The same round re-planned (another rank), e.g. by an aggregator resumed from a
    // checkpoint: queued, not started alongside.
    let c = s.handle(Timestamp(100), msg(config(1, 4, 30_000)));
    assert!(trains(&c).is_empty());
    // When the running job ends, its result is dropped and the queued job starts, its
    // deadline still counted from when its configuration arrived.
    let c = s.handle(Timestamp(1_100), failed());
    assert!(
        failures(&c).is_empty(),
        "the superseded job must not be reported"
    );
    assert_eq!(
        trains(&c),
        vec![(RoundId(1), 4, Timestamp(1_100 + 30_000 - 1_000))]
    );
    assert!(s.is_training());
    let c = s.handle(Timestamp(2_000), failed());
    assert_eq!(failures(&c), vec![RoundId(1)]);
}

fn finished(round: u64) -> AgentEvent {
    let cfg = ModelConfig::dense(256, 64, 4, 4, 2, 16, 128, true);
    AgentEvent::JobDone(Ok(JobOutcome {
        round: RoundId(round),
        kept: KeptIndices::dense(&cfg),
        adapter: (8, 16.0, Vec::new()),
        importance: Default::default(),
        stats: UpdateStats {
            loss_pre: 2.0,
            loss_post: 1.5,
            sparsity: 0.2,
            param_count: 1000,
            compute_ms: 5,
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
    }))
}

fn updates(cmds: &[AgentCommand]) -> Vec<RoundId> {
    cmds.iter()
        .filter_map(|c| match c {
            AgentCommand::Send(Message::Update(u)) => Some(u.round),
            _ => None,
        })
        .collect()
}

#[test]
fn a_job_finished_while_disconnected_is_answered_not_trained_again() {
    let mut s = session();
    s.handle(Timestamp(10), msg(config(1, 8, 60_000)));
    s.handle(Timestamp(20), AgentEvent::Disconnected);
    // The job ends while the link is down: the update waits in the outbox and goes out
    // after the next Welcome.
    let c = s.handle(Timestamp(30), finished(1));
    assert!(c.is_empty());
    s.handle(Timestamp(40), AgentEvent::Connected);
    let c = s.handle(Timestamp(41), msg(welcome()));
    assert_eq!(updates(&c), vec![RoundId(1)]);
    // The aggregator has not seen the update yet and re-sends the configuration: the
    // device answers with the same update instead of training the job a second time.
    let c = s.handle(Timestamp(42), msg(config(1, 8, 50_000)));
    assert!(trains(&c).is_empty());
    assert_eq!(updates(&c), vec![RoundId(1)]);
    // Once acknowledged, the next round's configuration trains normally.
    s.handle(
        Timestamp(50),
        msg(Message::Ack(protocol::Ack { round: RoundId(1) })),
    );
    let c = s.handle(Timestamp(60), msg(config(2, 8, 60_000)));
    assert_eq!(trains(&c).len(), 1);
}

#[test]
fn a_queued_configuration_whose_deadline_passed_is_reported_failed() {
    let mut s = session();
    s.handle(Timestamp(0), msg(config(1, 8, 60_000)));
    s.handle(Timestamp(1_000), msg(config(2, 8, 5_000)));
    // Round 1's job ends 10 s after round 2's configuration arrived (5 s deadline).
    let c = s.handle(Timestamp(11_000), finished(1));
    assert!(updates(&c).is_empty() && trains(&c).is_empty());
    assert_eq!(failures(&c), vec![RoundId(2)]);
    assert!(!s.is_training());
}

fn sent_updates(cmds: &[AgentCommand]) -> Vec<Update> {
    cmds.iter()
        .filter_map(|c| match c {
            AgentCommand::Send(Message::Update(u)) => Some(u.clone()),
            _ => None,
        })
        .collect()
}

#[test]
fn answers_produced_while_disconnected_wait_for_the_next_welcome() {
    let mut s = session();
    s.handle(Timestamp(0), msg(config(1, 8, 60_000)));
    s.handle(Timestamp(5), AgentEvent::Disconnected);
    // A failure report produced while the link is down is kept, not sent.
    assert!(s.handle(Timestamp(10), failed()).is_empty());
    assert_eq!(s.outbox().len(), 1);
    // Joining sends only Join; the outbox goes out after the Welcome, oldest first.
    let c = s.handle(Timestamp(20), AgentEvent::Connected);
    assert!(matches!(
        c.as_slice(),
        [AgentCommand::Send(Message::Join(_))]
    ));
    let c = s.handle(Timestamp(21), msg(welcome()));
    assert_eq!(failures(&c), vec![RoundId(1)]);
    assert!(s.outbox().is_empty());
    // An update the driver could not deliver is kept too; other messages are not.
    s.handle(Timestamp(30), msg(config(2, 8, 60_000)));
    let c = s.handle(Timestamp(40), finished(2));
    let update = c.into_iter().next().unwrap();
    let AgentCommand::Send(update) = update else {
        panic!("an update was expected")
    };
    s.handle(Timestamp(41), AgentEvent::Undelivered(update));
    s.handle(
        Timestamp(41),
        AgentEvent::Undelivered(Message::Heartbeat(Heartbeat {
            round: None,
            steps_done: 0,
        })),
    );
    s.handle(Timestamp(42), AgentEvent::Disconnected);
    s.handle(Timestamp(50), AgentEvent::Connected);
    let c = s.handle(Timestamp(51), msg(welcome()));
    assert_eq!(updates(&c), vec![RoundId(2)]);
    assert_eq!(c.len(), 1);
}

#[test]
fn a_restart_keeps_the_state_and_forgets_the_rest() {
    let mut s = session();
    s.handle(Timestamp(0), msg(config(1, 8, 60_000)));
    s.handle(Timestamp(5), AgentEvent::Disconnected);
    s.handle(Timestamp(10), finished(1));
    let kept = s.state().kept.clone();
    s.restart();
    assert!(!s.is_training() && s.outbox().is_empty());
    assert_eq!(s.state().kept, kept);
}

#[test]
fn a_round_that_does_not_fit_in_ram_fails_before_it_starts() {
    let kept = KeptIndices::dense(&tiny());
    let low = MemoryMode::RecomputeBlocks;
    let need4 = costs().round_memory(&kept, 4, 2, low);
    let need8 = costs().round_memory(&kept, 8, 2, low);
    assert!(need4 < need8);
    let mut s = session_with_ram((need4 + need8) / 2);
    let c = s.handle(Timestamp(0), msg(config(1, 8, 60_000)));
    assert!(trains(&c).is_empty());
    match c.as_slice() {
        [AgentCommand::Send(Message::RoundFailed(f))] => {
            assert_eq!(f.round, RoundId(1));
            assert_eq!(
                f.reason,
                FailReason::OutOfMemory {
                    needed_bytes: need8,
                    ram_bytes: (need4 + need8) / 2,
                }
            );
        }
        other => panic!("expected one RoundFailed, got {other:?}"),
    }
    assert!(!s.is_training());
    // A smaller rank fits and trains, from the session's state.
    let c = s.handle(Timestamp(10), msg(config(2, 4, 60_000)));
    match c.as_slice() {
        [AgentCommand::Train { job, state }] => {
            assert_eq!(job.arm.rank, 4);
            assert_eq!(state.kept, kept);
        }
        other => panic!("expected a Train command, got {other:?}"),
    }
}

#[test]
fn a_device_short_of_ram_recomputes_blocks_instead_of_failing() {
    let kept = KeptIndices::dense(&tiny());
    let keep = costs().round_memory(&kept, 8, 2, MemoryMode::KeepActivations);
    let low = costs().round_memory(&kept, 8, 2, MemoryMode::RecomputeBlocks);
    assert!(low < keep, "recomputing must need less: {low} vs {keep}");
    for (ram, want) in [
        (keep, MemoryMode::KeepActivations),
        (keep - 1, MemoryMode::RecomputeBlocks),
        (low, MemoryMode::RecomputeBlocks),
    ] {
        let mut s = session_with_ram(ram);
        let c = s.handle(Timestamp(0), msg(config(1, 8, 60_000)));
        match c.as_slice() {
            [AgentCommand::Train { job, .. }] => assert_eq!(job.memory, want, "RAM {ram}"),
            other => panic!("RAM {ram}: expected a Train command, got {other:?}"),
        }
    }
}

#[test]
fn an_update_counts_its_configuration_download_and_its_own_upload() {
    let mut s = session();
    s.handle(
        Timestamp(0),
        AgentEvent::Message {
            msg: config(1, 8, 60_000),
            bytes: 1_234,
        },
    );
    // A configuration queued behind the running job keeps its own frame size.
    s.handle(
        Timestamp(5),
        AgentEvent::Message {
            msg: config(2, 8, 60_000),
            bytes: 777,
        },
    );
    let c = s.handle(Timestamp(10), failed());
    assert_eq!(trains(&c).len(), 1, "the queued job starts");
    let c = s.handle(Timestamp(20), finished(2));
    let [u] = sent_updates(&c).try_into().unwrap();
    assert_eq!(u.stats.bytes_down, 777);
    let frame = protocol::encode_frame(&Message::Update(u.clone())).unwrap();
    assert_eq!(u.stats.bytes_up, frame.len() as u64);
    // Other fields of the job's statistics pass through.
    assert_eq!((u.stats.compute_ms, u.stats.steps), (5, 4));
}

fn welcome_with_heartbeat(ms: u64) -> Message {
    let Message::Welcome(w) = welcome() else {
        unreachable!("welcome() builds a Welcome")
    };
    Message::Welcome(Welcome {
        heartbeat_interval_ms: ms,
        ..w
    })
}

fn heartbeats(cmds: &[AgentCommand]) -> usize {
    cmds.iter()
        .filter(|c| matches!(c, AgentCommand::Send(Message::Heartbeat(_))))
        .count()
}

#[test]
fn a_huge_heartbeat_interval_saturates_instead_of_wrapping() {
    for interval in [u64::MAX, u64::MAX / 2] {
        let mut s = session();
        let now = Timestamp(u64::MAX / 2 + 10);
        s.handle(now, msg(welcome_with_heartbeat(interval)));
        let due = s.poll_timeout().expect("a heartbeat is scheduled");
        assert!(due >= now, "the next beat {due} must not wrap before {now}");
        assert_eq!(due, now.plus_ms(interval));
        // At the end of time the beat is sent and the next one saturates too.
        let c = s.handle_timeout(Timestamp(u64::MAX));
        assert_eq!(heartbeats(&c), 1);
        assert_eq!(s.poll_timeout(), Some(Timestamp(u64::MAX)));
        // A job's deadline from the network saturates as well.
        let c = s.handle(Timestamp(u64::MAX - 5), msg(config(1, 8, u64::MAX)));
        assert_eq!(trains(&c), vec![(RoundId(1), 8, Timestamp(u64::MAX))]);
    }
}

#[test]
fn a_heartbeat_interval_under_a_second_is_raised_to_one() {
    // A hostile aggregator asking for a beat every millisecond gets one a second: over ten
    // seconds of timers fired every millisecond, ten beats.
    for asked in [1, 999] {
        let mut s = session();
        s.handle(Timestamp(0), msg(welcome_with_heartbeat(asked)));
        assert_eq!(
            s.poll_timeout(),
            Some(Timestamp(protocol::MIN_HEARTBEAT_INTERVAL_MS))
        );
        let beats: usize = (1..=10_000)
            .map(|t| heartbeats(&s.handle_timeout(Timestamp(t))))
            .sum();
        assert_eq!(beats, 10, "asked {asked} ms");
    }
    // 0 (none) and anything from a second up are kept as they are.
    let mut s = session();
    s.handle(Timestamp(0), msg(welcome_with_heartbeat(0)));
    assert_eq!(s.poll_timeout(), None);
    s.handle(Timestamp(0), msg(welcome_with_heartbeat(1_500)));
    assert_eq!(s.poll_timeout(), Some(Timestamp(1_500)));
}

fn refusal(cmds: &[AgentCommand]) -> String {
    match cmds {
        [AgentCommand::Send(Message::RoundFailed(RoundFailed {
            reason: FailReason::Error(why),
            ..
        }))] => why.clone(),
        other => panic!("expected one RoundFailed, got {other:?}"),
    }
}

#[test]
fn a_configuration_over_the_caps_is_refused_with_its_reason() {
    let mut s = session();
    let Message::RoundConfig(base) = config(1, 8, 60_000) else {
        unreachable!("config() builds a RoundConfig")
    };
    let cases: Vec<(RoundConfig, &str)> = vec![
        (
            RoundConfig {
                arm: Arm::new(0.2, u32::MAX),
                ..base.clone()
            },
            "rank 4294967295 is not in [1, 256]",
        ),
        (
            RoundConfig {
                batch_size: u32::MAX,
                ..base.clone()
            },
            "batch size 4294967295 is not in [1, 64]",
        ),
        (
            RoundConfig {
                local_steps: 10_001,
                ..base.clone()
            },
            "local steps 10001 is not in [1, 10000]",
        ),
        (
            RoundConfig {
                learning_rate: f32::NAN,
                ..base.clone()
            },
            "learning rate NaN is not a finite value in (0, 1]",
        ),
        (
            RoundConfig {
                learning_rate: 2.0,
                ..base.clone()
            },
            "learning rate 2 is not a finite value in (0, 1]",
        ),
        (
            RoundConfig {
                arm: Arm::new(f64::INFINITY, 8),
                ..base.clone()
            },
            "prune ratio inf is not in [0, 1)",
        ),
        (
            RoundConfig {
                target_sparsity: Some(0.95),
                ..base.clone()
            },
            "target sparsity 0.95 is not in [0, 0.9]",
        ),
        (
            RoundConfig {
                arm: Arm::new(1.5, 8),
                target_sparsity: Some(0.5),
                ..base.clone()
            },
            "pruning pace 1.5 is not in [0, 1]",
        ),
        (
            RoundConfig {
                options: protocol::RoundOptions {
                    rank_pruning: Some(protocol::RankPruning {
                        reg: 0.01,
                        gamma: 0.1,
                        step: 1.0,
                    }),
                },
                ..base.clone()
            },
            "rank pruning step 1 is not in (0, 1)",
        ),
    ];
    for (i, (rc, why)) in cases.into_iter().enumerate() {
        let round = RoundId(i as u64 + 1);
        let c = s.handle(
            Timestamp(i as u64),
            msg(Message::RoundConfig(RoundConfig { round, ..rc })),
        );
        assert!(trains(&c).is_empty());
        assert_eq!(failures(&c), vec![round]);
        assert_eq!(refusal(&c), format!("round configuration refused: {why}"));
        assert!(!s.is_training());
    }
    // A Welcome's alpha over the cap refuses the rounds that would train with it.
    let Message::Welcome(w) = welcome() else {
        unreachable!("welcome() builds a Welcome")
    };
    s.handle(
        Timestamp(50),
        msg(Message::Welcome(Welcome {
            lora_alpha: f32::INFINITY,
            ..w
        })),
    );
    let c = s.handle(Timestamp(60), msg(config(9, 8, 60_000)));
    assert_eq!(
        refusal(&c),
        "round configuration refused: LoRA alpha inf is not a finite value in (0, 10000]"
    );
    // Within the caps, the device trains again.
    s.handle(Timestamp(70), msg(welcome()));
    let c = s.handle(Timestamp(80), msg(config(10, 256, 60_000)));
    assert_eq!(trains(&c).len(), 1);
}

fn cancels(cmds: &[AgentCommand]) -> Vec<RoundId> {
    cmds.iter()
        .filter_map(|c| match c {
            AgentCommand::Cancel(r) => Some(*r),
            _ => None,
        })
        .collect()
}

#[test]
fn a_job_running_at_its_deadline_fails_then_and_its_late_result_is_dropped() {
    let mut s = session();
    s.handle(Timestamp(1_000), msg(config(1, 8, 5_000)));
    assert_eq!(s.poll_timeout(), Some(Timestamp(6_000)));
    s.set_progress(3);
    // Before the deadline nothing happens.
    assert!(s.handle_timeout(Timestamp(5_999)).is_empty());
    let c = s.handle_timeout(Timestamp(6_000));
    assert_eq!(cancels(&c), vec![RoundId(1)]);
    assert_eq!(failures(&c), vec![RoundId(1)]);
    assert_eq!(
        refusal(&c[1..]),
        "the round's deadline passed after 3 of 4 local steps"
    );
    assert_eq!(s.poll_timeout(), None, "the deadline fires once");
    // The device stays busy until the job ends: the next round waits for it.
    let c = s.handle(Timestamp(6_500), msg(config(2, 8, 60_000)));
    assert!(trains(&c).is_empty());
    // The late result is not sent; the queued round starts.
    let c = s.handle(Timestamp(7_000), finished(1));
    assert!(updates(&c).is_empty() && failures(&c).is_empty());
    assert_eq!(trains(&c), vec![(RoundId(2), 8, Timestamp(66_500))]);
    // A job that ends in time is not cancelled, and its late timer does nothing.
    let c = s.handle(Timestamp(8_000), finished(2));
    assert_eq!(updates(&c), vec![RoundId(2)]);
    assert!(s.handle_timeout(Timestamp(70_000)).is_empty());
}

#[test]
fn a_deadline_passing_while_disconnected_is_reported_after_the_welcome() {
    let mut s = session();
    s.handle(Timestamp(0), msg(config(1, 8, 1_000)));
    s.handle(Timestamp(10), AgentEvent::Disconnected);
    let c = s.handle_timeout(Timestamp(1_000));
    assert_eq!(cancels(&c), vec![RoundId(1)]);
    assert!(
        failures(&c).is_empty(),
        "nothing is sent while disconnected"
    );
    // The late result (here a cancelled job's error) is dropped, not reported twice.
    assert!(s.handle(Timestamp(1_100), failed()).is_empty());
    s.handle(Timestamp(2_000), AgentEvent::Connected);
    let c = s.handle(Timestamp(2_001), msg(welcome()));
    assert_eq!(failures(&c), vec![RoundId(1)]);
    assert_eq!(c.len(), 1);
}

#[test]
fn a_welcome_handled_after_the_transport_went_down_leaves_no_due_heartbeat() {
    // The agent_session fuzzer's finding: a Welcome read before a drop was noticed, handled
    // after it, scheduled a heartbeat that `handle_timeout` never sends while disconnected, so
    // `poll_timeout` kept reporting a past time (a driver sleeping until it would spin).
    let beating = |interval| {
        let Message::Welcome(mut w) = welcome() else {
            unreachable!()
        };
        w.heartbeat_interval_ms = interval;
        msg(Message::Welcome(w))
    };
    let mut s = session();
    s.handle(Timestamp(0), beating(5_000));
    assert_eq!(s.poll_timeout(), Some(Timestamp(5_000)));
    s.handle(Timestamp(1_000), AgentEvent::Disconnected);
    assert_eq!(s.poll_timeout(), None);
    s.handle(Timestamp(1_001), beating(5_000));
    assert_eq!(
        s.poll_timeout(),
        None,
        "no heartbeat is due while disconnected"
    );
    assert!(s.handle_timeout(Timestamp(1 << 40)).is_empty());
    assert_eq!(s.poll_timeout(), None);
    // The next connection's Welcome starts the beat again.
    s.handle(Timestamp(2_000), AgentEvent::Connected);
    s.handle(Timestamp(2_001), beating(5_000));
    assert_eq!(s.poll_timeout(), Some(Timestamp(7_001)));
}

#[test]
fn the_trained_adapter_is_kept_only_when_the_config_says_so() {
    let cfg = ModelConfig::dense(256, 64, 4, 4, 2, 16, 128, true);
    let factors =
        crate::lora::Adapter::new(&cfg, 8, 16.0, 1, &burn::tensor::Device::flex()).to_host();
    for keep in [true, false] {
        let mut s = session();
        s.config.keep_adapter = keep;
        s.handle(Timestamp(0), msg(config(1, 8, 60_000)));
        let AgentEvent::JobDone(Ok(mut out)) = finished(1) else {
            unreachable!()
        };
        out.adapter = (8, 16.0, factors.clone());
        let c = s.handle(Timestamp(10), AgentEvent::JobDone(Ok(out)));
        // Either way the update carries the factors, moved or copied.
        let [u] = sent_updates(&c).try_into().unwrap();
        assert_eq!(crate::wire::adapter_from_wire(&u.adapter), factors);
        let held = s
            .state()
            .adapter
            .as_ref()
            .map(|(r, a, f)| (*r, *a, f.clone()));
        if keep {
            assert_eq!(held, Some((8, 16.0, factors.clone())));
        } else {
            assert_eq!(
                held, None,
                "a session told not to keep its adapter held one"
            );
        }
    }
}

/// A hostile aggregator's text and repetition cannot grow the session: of 1,000 rejects whose
/// reasons are 100 KB each it keeps the newest 32, cut to 256 characters, and counts them all;
/// 1,000 acknowledgements of a round it never sent an update for add nothing, and the one
/// update it did send is counted once however often it is acknowledged.
#[test]
fn rejects_and_acks_from_the_aggregator_are_bounded() {
    let mut s = session();
    s.handle(Timestamp(1), msg(welcome()));
    for i in 0..1_000u64 {
        let reason = format!("{i:04}{}", "x".repeat(100_000));
        s.handle(
            Timestamp(2 + i),
            msg(Message::Reject(protocol::Reject {
                round: None,
                reason: protocol::RejectReason::Malformed(reason),
            })),
        );
    }
    assert_eq!(s.rejects_total, 1_000);
    assert_eq!(s.rejects.len(), super::KEPT_REJECTS);
    assert!(s
        .rejects
        .iter()
        .all(|r| r.chars().count() <= super::REJECT_REASON_CHARS));
    assert!(
        s.rejects.back().is_some_and(|r| r.contains("0999")),
        "the newest is kept: {:?}",
        s.rejects.back().map(|r| &r[..40])
    );
    for i in 0..1_000u64 {
        s.handle(
            Timestamp(2_000 + i),
            msg(Message::Ack(protocol::Ack { round: RoundId(7) })),
        );
    }
    assert!(s.acked_rounds.is_empty(), "no update was sent for round 7");
    s.handle(Timestamp(3_000), msg(config(1, 8, 60_000)));
    let c = s.handle(Timestamp(3_010), finished(1));
    assert_eq!(updates(&c), vec![RoundId(1)]);
    for i in 0..100u64 {
        s.handle(
            Timestamp(3_020 + i),
            msg(Message::Ack(protocol::Ack { round: RoundId(1) })),
        );
    }
    assert_eq!(s.acked_rounds, vec![RoundId(1)]);
}
