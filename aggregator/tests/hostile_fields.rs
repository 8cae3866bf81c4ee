//! What a device with a valid certificate controls beyond its update and must not be able to
//! turn against the server: the length of the text it sends (its backend name, its failure
//! report), its class across joins, how often it reconnects mid-round, and the byte counts it
//! reports. Each is bounded where the coordinator keeps or sums it.

mod common;

use aggregator::coordinator::MAX_FAILURE_REASON_CHARS;
use common::scenario::{config, Harness, Step};
use protocol::{
    Capabilities, DeviceId, FailReason, Join, Message, MAX_BACKEND_CHARS, PROTOCOL_VERSION,
};

fn join_as(id: u64, backend: String, class: Option<&str>) -> Message {
    Message::Join(Join {
        protocol_version: PROTOCOL_VERSION,
        device_id: DeviceId(id),
        capabilities: Capabilities {
            ram_bytes: 4 << 30,
            backend,
            bench_score: None,
            device_class: class.map(str::to_string),
        },
    })
}

fn lines_for<'a>(h: &'a Harness, what: &'a str) -> impl Iterator<Item = &'a str> {
    h.transcript.lines().filter(move |l| l.contains(what))
}

/// A backend name is kept in the device's record and checkpointed: past 64 characters the
/// Join is refused, counted, and the device gets no record.
#[test]
fn a_long_backend_name_is_refused_and_counted() {
    let mut h = Harness::new(config());
    h.step(Step::Connect(1));
    h.deliver(1, join_as(1, "x".repeat(10_000), None), 10_100);
    assert_eq!(
        lines_for(&h, "d1 <- reject malformed").count(),
        1,
        "{}",
        h.transcript
    );
    assert_eq!(lines_for(&h, "d1 <- welcome").count(), 0);
    assert_eq!(h.coord.counters().rejects_of("malformed"), 1);
    assert!(h.coord.device(DeviceId(1)).is_none(), "no record kept");
    // At the limit it is a name like any other.
    h.step(Step::Connect(2));
    h.deliver(2, join_as(2, "y".repeat(MAX_BACKEND_CHARS), None), 128);
    assert_eq!(
        lines_for(&h, "d2 <- welcome").count(),
        1,
        "{}",
        h.transcript
    );
}

/// A failure report's text goes into the round summary (and from there into the metrics file
/// and the Prometheus series): 100 KB of it is cut to 256 characters.
#[test]
fn a_failure_report_is_cut_before_it_is_kept() {
    let mut h = Harness::new(config());
    for d in 1..=3 {
        h.step(Step::Join(d));
    }
    h.step(Step::Fail(1, FailReason::Error("z".repeat(100_000))));
    h.step(Step::Answer(2));
    h.step(Step::Answer(3));
    let s = h.summaries.first().expect("round 1 closed");
    let failed = s
        .failed
        .iter()
        .find(|f| f.device.0 == 1)
        .expect("d1 failed");
    assert_eq!(failed.kind, "error");
    assert!(
        failed.reason.chars().count() <= MAX_FAILURE_REASON_CHARS,
        "{}",
        failed.reason.len()
    );
    assert!(
        failed.reason.contains("zzz"),
        "the start of the report is kept"
    );
}

/// Classes pool bandit observations (`bandit_scope = "class"`) and name metric series: a
/// device keeps the class it first joined as, whatever it claims later.
#[test]
fn a_device_keeps_the_class_it_first_joined_as() {
    let mut h = Harness::new(config());
    h.step(Step::Connect(1));
    h.deliver(1, join_as(1, "flex".into(), Some("jetson-tx2")), 64);
    for other in ["jetson-agx", "rpi5", "phone"] {
        h.step(Step::Vanish(1));
        h.step(Step::Connect(1));
        h.deliver(1, join_as(1, "flex".into(), Some(other)), 64);
    }
    let record = h.coord.device(DeviceId(1)).expect("joined");
    assert_eq!(
        record.capabilities.device_class.as_deref(),
        Some("jetson-tx2")
    );
    assert_eq!(
        lines_for(&h, "d1 <- welcome").count(),
        4,
        "{}",
        h.transcript
    );
}

/// Every reconnection of a selected device that owes its update used to cut and encode its
/// slice again on the coordinator's thread. Ten reconnections in one round get the
/// configuration three more times, then Welcomes only; the round still closes on time.
#[test]
fn a_device_reconnecting_in_a_loop_is_sent_its_configuration_three_more_times_at_most() {
    let mut h = Harness::new(config());
    for d in 1..=3 {
        h.step(Step::Join(d));
    }
    assert_eq!(lines_for(&h, "d1 <- round_config").count(), 1);
    for _ in 0..10 {
        h.step(Step::Vanish(1));
        h.step(Step::Join(1));
    }
    assert_eq!(lines_for(&h, "d1 <- welcome").count(), 11);
    assert_eq!(
        lines_for(&h, "d1 <- round_config").count(),
        4,
        "{}",
        h.transcript
    );
    h.step(Step::Answer(2));
    h.step(Step::Answer(3));
    h.step(Step::Wait(2_000));
    let s = h.summaries.first().expect("round 1 closed at its deadline");
    assert_eq!(s.missed, vec![DeviceId(1)]);
    assert!(s.aggregated);
}

/// The download bytes are the device's own report: three reports of `u64::MAX` neither wrap
/// nor panic the round's total (overflow checks are on in this build); each counts at most
/// twice the largest update the server accepts.
#[test]
fn reported_byte_counts_cannot_wrap_the_round_totals() {
    let cfg = config();
    let cap = 2 * cfg.max_update_bytes;
    let mut h = Harness::new(cfg);
    for d in 1..=3 {
        h.step(Step::Join(d));
    }
    for d in 1..=3 {
        h.step(Step::AnswerWith(d, |u| u.stats.bytes_down = u64::MAX));
    }
    let s = h.summaries.first().expect("round 1 closed");
    assert_eq!(s.participants.len(), 3);
    assert_eq!(s.bytes_down, 3 * cap);
    assert!(s.participants.iter().all(|p| p.bytes_down == cap));
}

/// The sparsity a device reports feeds its reward's progress toward s* and its record: the
/// coordinator takes the one its kept maps give (the maps its adapter is checked against), so
/// a device that claims to have pruned everything gets credit for what it pruned.
#[test]
fn a_reported_sparsity_is_replaced_by_the_kept_maps_one() {
    let mut h = Harness::new(config());
    for d in 1..=3 {
        h.step(Step::Join(d));
    }
    h.step(Step::AnswerWith(1, |u| u.stats.sparsity = 1.0));
    h.step(Step::Answer(2));
    h.step(Step::Answer(3));
    let s = h.summaries.first().expect("round 1 closed");
    let dims = common::dims();
    for p in &s.participants {
        let rc = &h.configs[&(p.device.0, 1)];
        let kept = &rc.global.as_ref().expect("slice").kept;
        let want = kept.non_embedding_sparsity(&dims) as f32;
        assert_eq!(p.sparsity, want, "device {}", p.device.0);
    }
    let d1 = h.coord.device(DeviceId(1)).expect("record");
    assert!(d1.sparsity < 0.999, "recorded {}", d1.sparsity);
}

/// The losses a device reports feed the round's reward shaping, and the coordinator can only
/// range-check them. One device claiming a blow-up from a near-zero loss (a change of about
/// -1e9, inside `max_loss`) sets the loss scale for the whole round under the default
/// `loss_trim = 0`, so the honest devices' loss terms fall to about 1e-10; with a trim over the
/// liar's share the scale is an honest device's change. (Only the loss term weighs here.)
#[test]
fn a_loss_trim_keeps_one_liar_from_setting_the_others_loss_scale() {
    let rewards = |loss_trim: f64, lie: bool| {
        let mut c = config();
        c.reward = bandit::RewardWeights {
            w1: 1.0,
            w2: 0.0,
            w3: 0.0,
            w4: 0.0,
            loss_trim,
            ..bandit::RewardWeights::default()
        };
        let mut h = Harness::new(c);
        for d in 1..=3 {
            h.step(Step::Join(d));
        }
        if lie {
            h.step(Step::AnswerWith(1, |u| {
                u.stats.loss_pre = 1e-6;
                u.stats.loss_post = 1000.0;
            }));
        } else {
            h.step(Step::Answer(1));
        }
        h.step(Step::Answer(2));
        h.step(Step::Answer(3));
        let s = h.summaries.first().expect("round 1 closed").clone();
        assert_eq!(
            s.participants.len(),
            3,
            "the lie is inside the range checks"
        );
        s.participants
            .iter()
            .map(|p| (p.device.0, p.reward))
            .collect::<Vec<_>>()
    };
    // Honest changes (3 - (2.5 - 0.1 d)) / 3: device 2 0.2333, device 3 0.2667.
    let default = rewards(0.0, true);
    assert!(default[1].1 < 1e-9 && default[2].1 < 1e-9, "{default:?}");
    let trimmed = rewards(0.3, true);
    assert!((trimmed[2].1 - 1.0).abs() < 1e-6, "{trimmed:?}");
    assert!((trimmed[1].1 - 0.875).abs() < 1e-6, "{trimmed:?}");
    assert_eq!(
        trimmed[0].1, 0.0,
        "the liar's own term clamps at -1, its reward at 0"
    );
    // Honest, the same trim scales by the second largest change (device 2's 0.2333).
    let honest = rewards(0.3, false);
    assert!(
        (honest[1].1 - 1.0).abs() < 1e-6 && (honest[2].1 - 1.0).abs() < 1e-6,
        "{honest:?}"
    );
}
