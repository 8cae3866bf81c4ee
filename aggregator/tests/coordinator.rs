//! Scenario tests of the round coordinator on virtual time (the harness is
//! `common/scenario.rs`): how a round closes, is abandoned or waits for a device that comes
//! back, and which updates and messages it refuses. Arms, strategies, device classes and
//! restoring are `coordinator_arms.rs`.

mod common;

use aggregator::coordinator::Coordinator;
use expect_test::expect;
use protocol::{
    Buffer, Capabilities, DeviceId, FailReason, Join, KeptIndices, Message, RoundId, Update,
    UpdateStats, PROTOCOL_VERSION,
};

use common::scenario::{check, config, Step::*};
use common::{dims, join_msg};

#[test]
fn a_round_closes_when_every_selected_device_answered() {
    let h = check(
        config(),
        vec![
            Join(1),
            Join(2),
            Join(3),
            Wait(50),
            Answer(1),
            Answer(3),
            Answer(2),
        ],
        expect![[r#"
            @0     d1 <- welcome
            @0     d2 <- welcome
            @0     d3 <- welcome
            @0     d1 <- round_config round-1 ratio 0.250 rank 4 ffn kept 24 deadline 1000ms
            @0     d2 <- round_config round-1 ratio 0.250 rank 4 ffn kept 24 deadline 1000ms
            @0     d3 <- round_config round-1 ratio 0.250 rank 4 ffn kept 24 deadline 1000ms
            @50    d1 <- ack round-1
            @50    d3 <- ack round-1
            @50    d2 <- ack round-1
            @50    checkpoint
            @50    closed round-1 by target_reached: selected [1, 2, 3] ok [1, 2, 3] missed [] failed [] quorum 2 met, aggregated
        "#]],
    );
    let s = &h.summaries[0];
    assert_eq!(s.mean_loss_pre, Some(3.0));
    assert!(s
        .participants
        .iter()
        .all(|p| p.reward > 0.0 && p.delta_norm > 0.0));
    assert_eq!(h.coord.counters().updates_accepted, 3);
}

#[test]
fn stragglers_past_the_deadline_are_missed_and_their_late_update_refused() {
    let mut c = config();
    c.round_interval_ms = 500;
    let h = check(
        c,
        vec![
            Join(1),
            Join(2),
            Join(3),
            Wait(100),
            Answer(1),
            Answer(2),
            Wait(1_000),
            AnswerRound(3, 1),
            Wait(500),
            AnswerRound(3, 1),
        ],
        expect![[r#"
            @0     d1 <- welcome
            @0     d2 <- welcome
            @0     d3 <- welcome
            @0     d1 <- round_config round-1 ratio 0.250 rank 4 ffn kept 24 deadline 1000ms
            @0     d2 <- round_config round-1 ratio 0.250 rank 4 ffn kept 24 deadline 1000ms
            @0     d3 <- round_config round-1 ratio 0.250 rank 4 ffn kept 24 deadline 1000ms
            @100   d1 <- ack round-1
            @100   d2 <- ack round-1
            @1000  checkpoint
            @1000  closed round-1 by deadline: selected [1, 2, 3] ok [1, 2] missed [3] failed [] quorum 2 met, aggregated
            @1100  d3 <- reject update for round-1 arrived after the round closed
            @1500  d1 <- round_config round-2 ratio 0.250 rank 4 ffn kept 24 deadline 1000ms
            @1500  d2 <- round_config round-2 ratio 0.250 rank 4 ffn kept 24 deadline 1000ms
            @1500  d3 <- round_config round-2 ratio 0.250 rank 4 ffn kept 24 deadline 1000ms
            @1600  d3 <- reject update for round-1 is stale: the current round is round-2
        "#]],
    );
    let s = &h.summaries[0];
    assert_eq!(s.missed, vec![DeviceId(3)]);
    assert!(s.quorum_met && s.aggregated);
    let rec = h.coord.device(DeviceId(3)).unwrap();
    assert_eq!((rec.rounds_selected, rec.rounds_missed), (2, 1));
    assert_eq!(h.coord.counters().rejects_of("late_update"), 1);
    assert_eq!(h.coord.counters().rejects_of("stale_round"), 1);
}

#[test]
fn without_quorum_at_the_deadline_the_round_is_abandoned() {
    let mut c = config();
    c.quorum_fraction = 1.0;
    let before = Coordinator::new(c.clone(), dims())
        .unwrap()
        .global()
        .clone();
    let h = check(
        c,
        vec![Join(1), Join(2), Join(3), Answer(2), Wait(1_000)],
        expect![[r#"
            @0     d1 <- welcome
            @0     d2 <- welcome
            @0     d3 <- welcome
            @0     d1 <- round_config round-1 ratio 0.250 rank 4 ffn kept 24 deadline 1000ms
            @0     d2 <- round_config round-1 ratio 0.250 rank 4 ffn kept 24 deadline 1000ms
            @0     d3 <- round_config round-1 ratio 0.250 rank 4 ffn kept 24 deadline 1000ms
            @0     d2 <- ack round-1
            @1000  checkpoint
            @1000  closed round-1 by deadline: selected [1, 2, 3] ok [2] missed [1, 3] failed [] quorum 3 not met
        "#]],
    );
    assert_eq!(
        h.coord.global(),
        &before,
        "an abandoned round leaves the global adapter alone"
    );
    assert_eq!(h.coord.counters().rounds_abandoned, 1);
    assert_eq!(h.summaries[0].participants[0].reward, 0.0);
}

#[test]
fn a_device_that_vanishes_mid_round_does_not_hold_the_round_up() {
    check(
        config(),
        vec![
            Join(1),
            Join(2),
            Join(3),
            Answer(1),
            Vanish(3),
            Wait(20),
            Answer(2),
            Join(3),
        ],
        expect![[r#"
            @0     d1 <- welcome
            @0     d2 <- welcome
            @0     d3 <- welcome
            @0     d1 <- round_config round-1 ratio 0.250 rank 4 ffn kept 24 deadline 1000ms
            @0     d2 <- round_config round-1 ratio 0.250 rank 4 ffn kept 24 deadline 1000ms
            @0     d3 <- round_config round-1 ratio 0.250 rank 4 ffn kept 24 deadline 1000ms
            @0     d1 <- ack round-1
            @20    d2 <- ack round-1
            @20    checkpoint
            @20    closed round-1 by all_answered: selected [1, 2, 3] ok [1, 2] missed [3] failed [] quorum 2 met, aggregated
            @20    d3 <- welcome
        "#]],
    );
}

#[test]
fn a_selected_device_that_comes_back_gets_its_round_again_and_counts() {
    check(
        config(),
        vec![
            Join(1),
            Join(2),
            Join(3),
            Vanish(3),
            Wait(300),
            Join(3),
            Answer(1),
            Answer(2),
            Answer(3),
        ],
        expect![[r#"
            @0     d1 <- welcome
            @0     d2 <- welcome
            @0     d3 <- welcome
            @0     d1 <- round_config round-1 ratio 0.250 rank 4 ffn kept 24 deadline 1000ms
            @0     d2 <- round_config round-1 ratio 0.250 rank 4 ffn kept 24 deadline 1000ms
            @0     d3 <- round_config round-1 ratio 0.250 rank 4 ffn kept 24 deadline 1000ms
            @300   d3 <- welcome
            @300   d3 <- round_config round-1 ratio 0.250 rank 4 ffn kept 24 deadline 700ms
            @300   d1 <- ack round-1
            @300   d2 <- ack round-1
            @300   d3 <- ack round-1
            @300   checkpoint
            @300   closed round-1 by target_reached: selected [1, 2, 3] ok [1, 2, 3] missed [] failed [] quorum 2 met, aggregated
        "#]],
    );
}

#[test]
fn duplicate_stale_unselected_and_future_updates_are_refused() {
    let mut c = config();
    c.devices_per_round = 2;
    c.min_devices = Some(2);
    let h = check(
        c,
        vec![
            Join(1),
            Join(2),
            Answer(1),
            Answer(1),
            Join(3),
            Raw(3, Message::Update(answer_for_nobody()), 512),
            AnswerRound(1, 1),
            Answer(2),
            Wait(10),
            AnswerRound(1, 1),
            AnswerWith(2, |u| u.round = RoundId(9)),
        ],
        expect![[r#"
            @0     d1 <- welcome
            @0     d2 <- welcome
            @0     d1 <- round_config round-1 ratio 0.250 rank 4 ffn kept 24 deadline 1000ms
            @0     d2 <- round_config round-1 ratio 0.250 rank 4 ffn kept 24 deadline 1000ms
            @0     d1 <- ack round-1
            @0     d1 <- reject duplicate update for round-1
            @0     d3 <- welcome
            @0     d3 <- reject device was not selected for round-1
            @0     d1 <- reject duplicate update for round-1
            @0     d2 <- ack round-1
            @0     checkpoint
            @0     closed round-1 by target_reached: selected [1, 2] ok [1, 2] missed [] failed [] quorum 1 met, aggregated
            @10    d1 <- round_config round-2 ratio 0.250 rank 4 ffn kept 24 deadline 1000ms
            @10    d2 <- round_config round-2 ratio 0.250 rank 4 ffn kept 24 deadline 1000ms
            @10    d1 <- reject update for round-1 is stale: the current round is round-2
            @10    d2 <- reject malformed update: round-9 has not started (latest is round-2)
        "#]],
    );
    let c = h.coord.counters();
    assert_eq!(c.rejects_of("duplicate_update"), 2);
    assert_eq!(c.rejects_of("not_selected"), 1);
    assert_eq!(c.rejects_of("stale_round"), 1);
    assert_eq!(c.rejects_of("malformed"), 1);
}

#[test]
fn a_nan_update_is_refused_and_counts_as_a_failure() {
    let h = check(
        config(),
        vec![
            Join(1),
            Join(2),
            Join(3),
            AnswerWith(2, |u| {
                if let Buffer::F32(a) = &mut u.adapter.layers[3].a.data {
                    a[1] = f32::NAN;
                }
            }),
            AnswerWith(3, |u| u.stats.loss_post = f32::INFINITY),
            Answer(1),
        ],
        expect![[r#"
            @0     d1 <- welcome
            @0     d2 <- welcome
            @0     d3 <- welcome
            @0     d1 <- round_config round-1 ratio 0.250 rank 4 ffn kept 24 deadline 1000ms
            @0     d2 <- round_config round-1 ratio 0.250 rank 4 ffn kept 24 deadline 1000ms
            @0     d3 <- round_config round-1 ratio 0.250 rank 4 ffn kept 24 deadline 1000ms
            @0     d2 <- reject update contains non-finite values
            @0     d3 <- reject update contains non-finite values
            @0     d1 <- ack round-1
            @0     checkpoint
            @0     closed round-1 by all_answered: selected [1, 2, 3] ok [1] missed [] failed [2, 3] quorum 2 not met
        "#]],
    );
    let s = &h.summaries[0];
    let kinds: Vec<&str> = s.failed.iter().map(|f| f.kind.as_str()).collect();
    assert_eq!(kinds, ["non_finite", "non_finite"]);
    assert_eq!(h.coord.counters().rejects_of("non_finite"), 2);
}

#[test]
fn oversized_and_wrong_rank_updates_are_refused() {
    let mut c = config();
    c.max_update_bytes = 10_000;
    check(
        c,
        vec![
            Join(1),
            Join(2),
            Join(3),
            AnswerSized(1, 10_001),
            AnswerWith(2, |u| u.adapter.rank = 2),
            Answer(3),
        ],
        expect![[r#"
            @0     d1 <- welcome
            @0     d2 <- welcome
            @0     d3 <- welcome
            @0     d1 <- round_config round-1 ratio 0.250 rank 4 ffn kept 24 deadline 1000ms
            @0     d2 <- round_config round-1 ratio 0.250 rank 4 ffn kept 24 deadline 1000ms
            @0     d3 <- round_config round-1 ratio 0.250 rank 4 ffn kept 24 deadline 1000ms
            @0     d1 <- reject message of 10001 bytes exceeds the limit of 10000 bytes
            @0     d2 <- reject malformed update: adapter rank 2 differs from the round's rank 4
            @0     d3 <- ack round-1
            @0     checkpoint
            @0     closed round-1 by all_answered: selected [1, 2, 3] ok [3] missed [] failed [1, 2] quorum 2 not met
        "#]],
    );
}

#[test]
fn wrong_version_other_identity_and_unexpected_messages_are_refused() {
    let wrong_version = Message::Join(Join {
        protocol_version: PROTOCOL_VERSION + 1,
        device_id: DeviceId(1),
        capabilities: Capabilities {
            ram_bytes: 1 << 30,
            backend: "flex".into(),
            bench_score: None,
            device_class: None,
        },
    });
    let h = check(
        config(),
        vec![
            Connect(1),
            Raw(1, wrong_version, 64),
            Connect(2),
            Raw(2, join_msg(5), 64),
            Connect(4),
            Raw(4, Message::Ack(protocol::Ack { round: RoundId(1) }), 16),
            Raw(4, Message::Update(answer_for_nobody()), 512),
        ],
        expect![[r#"
            @0     d1 <- reject protocol version mismatch: aggregator speaks 2, device sent 3
            @0     d1 disconnected: protocol version mismatch: aggregator speaks 2, device sent 3
            @0     d2 <- reject device id device-5 does not match the certificate's device-2
            @0     d2 disconnected: device id device-5 does not match the certificate's device-2
            @0     d4 <- reject unexpected ack message
            @0     d4 <- reject the device has not joined
        "#]],
    );
    assert!(!h.coord.is_joined(DeviceId(1)) && !h.coord.is_joined(DeviceId(2)));
}

fn answer_for_nobody() -> Update {
    let coord = Coordinator::new(config(), dims()).unwrap();
    let (adapter, _) = coord
        .global()
        .slice_for(&KeptIndices::full(&dims()), 4, 32.0)
        .unwrap();
    Update {
        round: RoundId(1),
        adapter,
        kept: KeptIndices::full(&dims()),
        stats: answer_stats(),
    }
}

fn answer_stats() -> UpdateStats {
    UpdateStats {
        loss_pre: 1.0,
        loss_post: 1.0,
        sparsity: 0.0,
        param_count: 1,
        compute_ms: 1,
        bytes_down: 1,
        bytes_up: 1,
        peak_mem_bytes: 1,
        samples: 1,
        steps: 1,
    }
}

#[test]
fn out_of_memory_teaches_the_filter_and_the_arm_is_not_played_again() {
    let h = check(
        config(),
        vec![
            Join(1),
            Join(2),
            Join(3),
            Fail(
                1,
                FailReason::OutOfMemory {
                    needed_bytes: 5 << 30,
                    ram_bytes: 4 << 30,
                },
            ),
            Answer(2),
            Answer(3),
            Wait(10),
        ],
        expect![[r#"
            @0     d1 <- welcome
            @0     d2 <- welcome
            @0     d3 <- welcome
            @0     d1 <- round_config round-1 ratio 0.250 rank 4 ffn kept 24 deadline 1000ms
            @0     d2 <- round_config round-1 ratio 0.250 rank 4 ffn kept 24 deadline 1000ms
            @0     d3 <- round_config round-1 ratio 0.250 rank 4 ffn kept 24 deadline 1000ms
            @0     d2 <- ack round-1
            @0     d3 <- ack round-1
            @0     checkpoint
            @0     closed round-1 by all_answered: selected [1, 2, 3] ok [2, 3] missed [] failed [1] quorum 2 met, aggregated
            @10    d2 <- round_config round-2 ratio 0.250 rank 4 ffn kept 24 deadline 1000ms
            @10    d3 <- round_config round-2 ratio 0.250 rank 4 ffn kept 24 deadline 1000ms
        "#]],
    );
    let rec = h.coord.device(DeviceId(1)).unwrap();
    let excl = rec.bandit.filter.exclusions(1);
    assert_eq!(excl.len(), 1);
    assert_eq!((excl[0].corner.prune_ratio, excl[0].corner.rank), (0.25, 4));
    assert_eq!(h.coord.counters().out_of_memory, 1);
    assert_eq!(h.coord.counters().no_feasible_arm, 1);
    assert_eq!(h.coord.selected(), vec![DeviceId(2), DeviceId(3)]);
}

#[test]
fn the_last_round_says_goodbye_and_late_joiners_are_told_it_is_over() {
    let mut c = config();
    c.rounds = 1;
    let h = check(
        c,
        vec![
            Join(1),
            Join(2),
            Join(3),
            Answer(1),
            Answer(2),
            Answer(3),
            Wait(100),
            Join(4),
        ],
        expect![[r#"
            @0     d1 <- welcome
            @0     d2 <- welcome
            @0     d3 <- welcome
            @0     d1 <- round_config round-1 ratio 0.250 rank 4 ffn kept 24 deadline 1000ms
            @0     d2 <- round_config round-1 ratio 0.250 rank 4 ffn kept 24 deadline 1000ms
            @0     d3 <- round_config round-1 ratio 0.250 rank 4 ffn kept 24 deadline 1000ms
            @0     d1 <- ack round-1
            @0     d2 <- ack round-1
            @0     d3 <- ack round-1
            @0     checkpoint
            @0     closed round-1 by target_reached: selected [1, 2, 3] ok [1, 2, 3] missed [] failed [] quorum 2 met, aggregated
            @0     d1 <- bye Finished
            @0     d2 <- bye Finished
            @0     d3 <- bye Finished
            @0     finished
            @100   d4 <- welcome
            @100   d4 <- bye Finished
        "#]],
    );
    assert!(h.coord.is_finished());
    assert_eq!(h.coord.poll_timeout(), None);
}
