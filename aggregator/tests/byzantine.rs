//! Pinned update metadata against a Byzantine device: ten devices answer one round, one of them
//! lies in its metadata (an enormous sample count, an enormous alpha with tiny factors, no or
//! missing layers, enormous losses). Under every aggregation method the global adapter must stay
//! finite and close to the aggregate of the nine honest devices alone, and every lie must be a
//! counted reject (or, for the sample count, a counted clip). A non-finite aggregate keeps the
//! previous global adapter, and a state with a non-finite global adapter is not restored.

mod common;

use aggregator::aggregate::{AggregationMethod, GlobalAdapter, SvdMode};
use aggregator::coordinator::{Command, Coordinator, CoordinatorConfig, Event, RoundSummary};
use aggregator::strategy::{FixedPruneConfig, StrategyConfig};
use protocol::{
    Buffer, Capabilities, DeviceId, Join, Message, RoundConfig, Timestamp, Update, PROTOCOL_VERSION,
};

use common::{dims, shifted_answer};

const BYZANTINE: u64 = 10;

/// `devices` devices per round, all selected, one round, fixed arms (ratio 0.25, rank 4),
/// local_steps 4 x batch_size 4 = 16 samples per honest update.
fn config(devices: usize, method: AggregationMethod) -> CoordinatorConfig {
    let mut c = CoordinatorConfig {
        rounds: 1,
        devices_per_round: devices,
        over_selection: 0.0,
        quorum_fraction: 0.5,
        round_deadline_ms: 1_000,
        local_steps: 4,
        prune_interval_steps: 2,
        batch_size: 4,
        max_rank: 8,
        seed: 11,
        strategy: StrategyConfig::FixedPrune(FixedPruneConfig {
            prune_ratio: 0.25,
            rank: 4,
        }),
        ..CoordinatorConfig::default()
    };
    c.arms.ranks = vec![2, 4, 8];
    c.aggregation.method = method;
    c
}

/// Every aggregation configuration the coordinator offers (each method, both SVD modes, norm
/// clipping), by name, for `devices` devices per round.
fn variants(devices: usize) -> Vec<(&'static str, CoordinatorConfig)> {
    let with = |_: usize, method, f: fn(&mut CoordinatorConfig)| {
        let mut c = config(devices, method);
        f(&mut c);
        c
    };
    vec![
        ("hetlora", with(devices, AggregationMethod::HetLora, |_| {})),
        ("mean", with(devices, AggregationMethod::Mean, |_| {})),
        (
            "exact-full",
            with(devices, AggregationMethod::Exact, |c| {
                c.aggregation.svd = SvdMode::Full
            }),
        ),
        (
            "exact-randomized",
            with(devices, AggregationMethod::Exact, |c| {
                c.aggregation.svd = SvdMode::Randomized
            }),
        ),
        ("median", with(devices, AggregationMethod::Median, |_| {})),
        (
            "trimmed-mean",
            with(devices, AggregationMethod::TrimmedMean, |_| {}),
        ),
        (
            "hetlora-clipped",
            with(devices, AggregationMethod::HetLora, |c| {
                c.aggregation.clip_norm = Some(2.0)
            }),
        ),
        (
            "exact-clipped",
            with(devices, AggregationMethod::Exact, |c| {
                c.aggregation.clip_norm = Some(2.0)
            }),
        ),
    ]
}

/// The honest answer to `rc`: the slice with B shifted (a non-zero delta), its kept maps, 16
/// samples and plausible losses.
fn honest(device: u64, rc: &RoundConfig) -> Update {
    shifted_answer(device, rc, 2.5, 100)
}

/// One Byzantine behaviour: how it edits its honest answer, and whether the coordinator must
/// refuse it (`true`) or accept it with its sample count clipped (`false`).
struct Attack {
    name: &'static str,
    edit: fn(&mut Update),
    rejected: bool,
}

fn attacks() -> Vec<Attack> {
    vec![
        Attack {
            name: "samples=u64::MAX with a shifted B",
            edit: |u| {
                u.stats.samples = u64::MAX;
                for layer in &mut u.adapter.layers {
                    if let Buffer::F32(b) = &mut layer.b.data {
                        b.iter_mut().for_each(|x| *x += 0.02);
                    }
                }
            },
            rejected: false,
        },
        Attack {
            name: "alpha=1e38 with tiny factors",
            edit: |u| {
                u.adapter.alpha = 1.0e38;
                for layer in &mut u.adapter.layers {
                    for t in [&mut layer.a, &mut layer.b] {
                        if let Buffer::F32(v) = &mut t.data {
                            v.iter_mut().for_each(|x| *x = *x * 1.0e-18 + 1.0e-19);
                        }
                    }
                }
            },
            rejected: true,
        },
        Attack {
            name: "zero layers",
            edit: |u| u.adapter.layers.clear(),
            rejected: true,
        },
        Attack {
            name: "one layer missing",
            edit: |u| {
                u.adapter.layers.pop();
            },
            rejected: true,
        },
        Attack {
            name: "huge losses",
            edit: |u| {
                u.stats.loss_pre = 1.0e30;
                u.stats.loss_post = 1.0e-3;
            },
            rejected: true,
        },
    ]
}

/// Drives a coordinator on virtual time; records the round configurations and summaries.
struct Harness {
    coord: Coordinator,
    now: Timestamp,
    configs: Vec<(u64, RoundConfig)>,
    summaries: Vec<RoundSummary>,
}

impl Harness {
    fn new(config: CoordinatorConfig) -> Harness {
        Harness {
            coord: Coordinator::new(config, dims()).expect("valid config"),
            now: Timestamp(0),
            configs: Vec::new(),
            summaries: Vec::new(),
        }
    }

    fn record(&mut self, cmds: Vec<Command>) {
        for cmd in cmds {
            match cmd {
                Command::Send {
                    device,
                    msg: Message::RoundConfig(rc),
                } => self.configs.push((device.0, rc)),
                Command::RoundClosed(s) => self.summaries.push(*s),
                _ => {}
            }
        }
    }

    fn event(&mut self, event: Event) {
        let cmds = self.coord.handle(self.now, event);
        self.record(cmds);
        while let Some(t) = self.coord.poll_timeout() {
            if t > self.now {
                break;
            }
            let cmds = self.coord.handle_timeout(self.now);
            self.record(cmds);
        }
    }

    /// Lets time pass to `until`, firing every timer due on the way.
    fn wait_until(&mut self, until: Timestamp) {
        while let Some(t) = self.coord.poll_timeout() {
            if t > until {
                break;
            }
            self.now = self.now.max(t);
            let cmds = self.coord.handle_timeout(self.now);
            self.record(cmds);
        }
        self.now = self.now.max(until);
    }

    fn message(&mut self, device: u64, msg: Message) {
        self.event(Event::Message {
            device: DeviceId(device),
            msg,
            bytes: 4096,
        });
    }

    fn join(&mut self, device: u64) {
        self.event(Event::Connected {
            device: DeviceId(device),
        });
        self.message(
            device,
            Message::Join(Join {
                protocol_version: PROTOCOL_VERSION,
                device_id: DeviceId(device),
                capabilities: Capabilities {
                    ram_bytes: 4 << 30,
                    backend: "flex".into(),
                    bench_score: None,
                    device_class: None,
                },
            }),
        );
    }

    fn config_of(&self, device: u64) -> RoundConfig {
        self.configs
            .iter()
            .rev()
            .find(|(d, _)| *d == device)
            .map(|(_, rc)| rc.clone())
            .expect("the device was sent a round configuration")
    }
}

/// One round: devices `1..=honest` answer honestly (in order), then device 10 (if present)
/// answers with `edit` applied.
fn run_round(
    config: CoordinatorConfig,
    honest_devices: u64,
    byzantine: Option<fn(&mut Update)>,
) -> Harness {
    let mut h = Harness::new(config);
    let mut ids: Vec<u64> = (1..=honest_devices).collect();
    if byzantine.is_some() {
        ids.push(BYZANTINE);
    }
    for &d in &ids {
        h.join(d);
    }
    assert_eq!(h.configs.len(), ids.len(), "every device is selected");
    for d in 1..=honest_devices {
        let rc = h.config_of(d);
        h.message(d, Message::Update(honest(d, &rc)));
    }
    if let Some(edit) = byzantine {
        let rc = h.config_of(BYZANTINE);
        let mut update = honest(BYZANTINE, &rc);
        edit(&mut update);
        h.message(BYZANTINE, Message::Update(update));
    }
    // A refused last answer does not close the round early: the deadline does.
    h.wait_until(Timestamp(1_000));
    assert_eq!(h.summaries.len(), 1, "the round closed");
    h
}

/// The effective delta `B̃ Ã` of every layer, dense (rotation- and sign-free, so aggregates
/// re-factored by SVD compare by what they do).
fn deltas(g: &GlobalAdapter) -> Vec<Vec<f64>> {
    let r = g.rank as usize;
    g.layers
        .iter()
        .map(|l| {
            let (out, inp) = g.dims.full_shape(l.proj);
            let mut w = vec![0.0f64; out * inp];
            for o in 0..out {
                for k in 0..r {
                    let b = l.b[o * r + k] as f64;
                    for i in 0..inp {
                        w[o * inp + i] += b * l.a[k * inp + i] as f64;
                    }
                }
            }
            w
        })
        .collect()
}

/// Largest absolute difference between two sets of layer deltas.
fn max_diff(x: &[Vec<f64>], y: &[Vec<f64>]) -> f64 {
    x.iter()
        .zip(y)
        .flat_map(|(a, b)| a.iter().zip(b).map(|(p, q)| (p - q).abs()))
        .fold(0.0, f64::max)
}

#[test]
fn a_byzantine_device_cannot_steer_any_aggregation_method() {
    let runs = variants(10).into_iter().zip(variants(9)).zip(variants(1));
    for (((name, config), (_, honest_config)), (_, solo_config)) in runs {
        let reference = run_round(honest_config, 9, None);
        let ref_summary = &reference.summaries[0];
        assert!(
            ref_summary.aggregated,
            "{name}: the honest round aggregates"
        );
        let ref_global = reference.coord.global().clone();
        assert!(ref_global.is_finite());
        let ref_deltas = deltas(&ref_global);
        let scale = ref_deltas
            .iter()
            .flatten()
            .fold(0.0f64, |m, v| m.max(v.abs()));
        assert!(scale > 0.0, "{name}: the honest aggregate is not trivial");

        for attack in attacks() {
            let what = format!("{name} / {}", attack.name);
            let h = run_round(config.clone(), 9, Some(attack.edit));
            let s = &h.summaries[0];
            let global = h.coord.global();
            assert!(global.is_finite(), "{what}: the global adapter is finite");
            assert!(s.aggregated, "{what}: the honest updates were aggregated");
            assert!(!s.non_finite_aggregate, "{what}");
            let counters = h.coord.counters();
            let diff = max_diff(&deltas(global), &ref_deltas);
            if attack.rejected {
                // The lie is refused before it touches the aggregation: the global adapter is
                // the honest-only aggregate (the same nine updates in the same order).
                assert_eq!(counters.total_rejects(), 1, "{what}: one counted reject");
                assert_eq!(counters.rejects_of("malformed"), 1, "{what}");
                assert_eq!(s.rejects.get("malformed"), Some(&1), "{what}");
                assert_eq!(counters.updates_accepted, 9, "{what}");
                let failed: Vec<u64> = s.failed.iter().map(|f| f.device.0).collect();
                assert_eq!(failed, vec![BYZANTINE], "{what}");
                assert!(
                    diff <= 1e-6 * scale,
                    "{what}: global moved by {diff} (scale {scale}) from the honest aggregate"
                );
            } else {
                // Accepted with its sample count clipped to the honest 16: it weighs as one
                // device among ten, so it moves the global at most a quarter of the way from
                // the honest aggregate to its own update (norm weights of hetlora included).
                assert_eq!(counters.total_rejects(), 0, "{what}");
                assert_eq!(counters.samples_clipped, 1, "{what}: a counted clip");
                assert_eq!(s.samples_clipped, 1, "{what}");
                assert_eq!(counters.updates_accepted, 10, "{what}");
                let p = s
                    .participants
                    .iter()
                    .find(|p| p.device.0 == BYZANTINE)
                    .expect("the clipped update was accepted");
                assert_eq!(
                    p.samples, 16,
                    "{what}: samples pinned to local_steps * batch"
                );
                assert_eq!(s.mean_loss_pre, Some(3.0), "{what}");
                // Its own update alone (the only device of a round) is `own` away from the
                // honest aggregate; unclipped (weight 2^64 against 16) it would be the global.
                let solo = run_round(solo_config.clone(), 0, Some(attack.edit));
                let own = max_diff(&deltas(solo.coord.global()), &ref_deltas);
                assert!(own > 10.0 * 1e-6 * scale, "{what}: the shift is visible");
                assert!(
                    diff <= 0.25 * own,
                    "{what}: global moved by {diff}, its own update is {own} away"
                );
            }
        }
    }
}

/// Refusal limits wide enough to let factors near `f32::MAX` through validation, so that the
/// aggregate itself overflows.
fn overflowing_config(method: AggregationMethod) -> CoordinatorConfig {
    let mut c = config(2, method);
    c.aggregation.max_factor_norm = 1.0e300;
    c.aggregation.max_layer_delta_norm = 1.0e300;
    c
}

#[test]
fn a_non_finite_aggregate_keeps_the_previous_global_and_is_reported() {
    let mut h = Harness::new(overflowing_config(AggregationMethod::Mean));
    let before = h.coord.global().clone();
    for d in [1, 2] {
        h.join(d);
    }
    for d in [1, 2] {
        let rc = h.config_of(d);
        let mut update = honest(d, &rc);
        for layer in &mut update.adapter.layers {
            if let Buffer::F32(b) = &mut layer.b.data {
                b.iter_mut().for_each(|x| *x = 3.0e38);
            }
        }
        h.message(d, Message::Update(update));
    }
    h.wait_until(Timestamp(1_000));
    assert_eq!(h.summaries.len(), 1);
    let s = &h.summaries[0];
    assert_eq!(s.participants.len(), 2, "both updates passed validation");
    assert!(s.quorum_met);
    assert!(
        !s.aggregated,
        "the overflowing aggregate did not replace the global"
    );
    assert!(s.non_finite_aggregate, "the summary says so");
    assert!(s.progress_line(1).contains("aggregate not finite"));
    let c = h.coord.counters();
    assert_eq!(c.non_finite_aggregates, 1);
    assert_eq!(c.rounds_aggregated, 0);
    assert_eq!(c.aggregation_errors, 0);
    assert_eq!(h.coord.global(), &before, "the previous global is kept");
    assert!(
        h.coord.state().global.is_finite(),
        "what is checkpointed is finite"
    );
}

#[test]
fn restore_refuses_a_state_whose_global_adapter_is_not_finite() {
    let config = config(9, AggregationMethod::HetLora);
    let h = run_round(config.clone(), 9, None);
    let good = h.coord.state();
    assert!(Coordinator::restore(config.clone(), good.clone()).is_ok());
    for poison in [f32::NAN, f32::INFINITY, f32::NEG_INFINITY] {
        let mut bad = good.clone();
        let last = bad.global.layers.len() - 1;
        bad.global.layers[last].b[0] = poison;
        let err = match Coordinator::restore(config.clone(), bad) {
            Ok(_) => panic!("a global adapter holding {poison} was restored"),
            Err(e) => e.to_string(),
        };
        assert!(err.contains("non-finite"), "{poison}: {err}");
    }
}

#[test]
fn the_metadata_bounds_have_defaults_and_are_validated() {
    let c = CoordinatorConfig::from_toml_str("rounds = 2").expect("older TOML still parses");
    assert_eq!((c.max_samples, c.max_loss), (1_000_000, 1.0e3));
    let c = CoordinatorConfig::from_toml_str("max_samples = 64\nmax_loss = 20.0").expect("parses");
    assert_eq!((c.max_samples, c.max_loss), (64, 20.0));
    // Clipped to max_samples and to local_steps * batch_size (40 * 4 by default).
    assert_eq!(c.pinned_samples(u64::MAX), 64);
    assert_eq!(c.pinned_samples(10), 10);
    let wide = CoordinatorConfig::default();
    assert_eq!(wide.pinned_samples(u64::MAX), 160);
    for bad in [
        "max_samples = 0",
        "max_loss = 0.0",
        "max_loss = -1.0",
        "max_loss = nan",
    ] {
        assert!(CoordinatorConfig::from_toml_str(bad).is_err(), "{bad}");
    }
}

/// Every layer's factors of `g`, flattened (bit-for-bit comparisons).
fn factors(g: &GlobalAdapter) -> Vec<f32> {
    g.layers
        .iter()
        .flat_map(|l| l.a.iter().chain(&l.b).copied())
        .collect()
}

/// Norm screening (`screen_factor`) leaves a sign-flipped, ten-fold update out of the round under
/// every method: the global adapter is the honest-only aggregate bit for bit, the update is
/// named in the summary, counted, and earns reward 0; with no outlier screening changes nothing.
#[test]
fn norm_screening_leaves_out_a_scaled_update_under_every_method() {
    let scaled: fn(&mut Update) = |u| {
        for layer in &mut u.adapter.layers {
            if let Buffer::F32(b) = &mut layer.b.data {
                b.iter_mut().for_each(|x| *x *= -10.0);
            }
        }
    };
    let screened = |devices: usize, method: AggregationMethod| {
        let mut c = config(devices, method);
        c.aggregation.screen_factor = Some(3.0);
        c.aggregation.svd = SvdMode::Full;
        c
    };
    for method in [
        AggregationMethod::HetLora,
        AggregationMethod::Mean,
        AggregationMethod::Exact,
        AggregationMethod::Median,
        AggregationMethod::TrimmedMean,
    ] {
        let name = method.name();
        let reference = run_round(screened(9, method), 9, None);
        assert!(reference.summaries[0].screened_out.is_empty(), "{name}");
        let ref_factors = factors(reference.coord.global());

        let h = run_round(screened(10, method), 9, Some(scaled));
        let s = &h.summaries[0];
        assert!(s.aggregated, "{name}");
        let ids: Vec<u64> = s.screened_out.iter().map(|d| d.0).collect();
        assert_eq!(
            ids,
            vec![BYZANTINE],
            "{name}: the scaled update is screened out"
        );
        assert_eq!(h.coord.counters().updates_screened_out, 1, "{name}");
        let line = s.progress_line(1);
        assert!(
            line.contains("0 rejects, 1 screened out;"),
            "{name}: {line}"
        );
        assert_eq!(
            h.coord.counters().total_rejects(),
            0,
            "{name}: accepted at intake"
        );
        let p = s.participants.iter().find(|p| p.device.0 == BYZANTINE);
        assert_eq!(p.map(|p| p.reward), Some(0.0), "{name}: no reward for it");
        assert!(
            factors(h.coord.global()) == ref_factors,
            "{name}: the global adapter is the honest-only aggregate"
        );

        // Without screening the same attack moves every method but the robust ones.
        let mut open = screened(10, method);
        open.aggregation.screen_factor = None;
        let unscreened = run_round(open, 9, Some(scaled));
        let moved = factors(unscreened.coord.global()) != ref_factors;
        let robust = matches!(
            method,
            AggregationMethod::Median | AggregationMethod::TrimmedMean
        );
        assert!(moved || robust, "{name}: the attack is visible unscreened");

        // Ten honest updates: screening leaves nothing out and changes nothing.
        let on = run_round(screened(10, method), 10, None);
        let mut off_config = screened(10, method);
        off_config.aggregation.screen_factor = None;
        let off = run_round(off_config, 10, None);
        assert!(on.summaries[0].screened_out.is_empty(), "{name}");
        assert!(
            factors(on.coord.global()) == factors(off.coord.global()),
            "{name}: screening without an outlier is the plain aggregate"
        );
    }
}

#[test]
fn a_screen_factor_of_one_or_less_is_refused() {
    for k in [1.0, 0.5, f64::NAN, f64::INFINITY] {
        let mut c = config(4, AggregationMethod::HetLora);
        c.aggregation.screen_factor = Some(k);
        let e = aggregator::aggregate::Aggregation::new(dims(), 8, c.aggregation)
            .err()
            .unwrap_or_else(|| panic!("screen_factor {k} accepted"));
        assert!(e.to_string().contains("screen_factor"), "{e}");
    }
}

/// Rescales every layer of `u` to `(c A, B / c)`, `c` as large as the factor norm limit lets
/// `A` be (at most `limit`): the same products, so the same delta norms, with `A` far longer.
fn regauge(u: &mut Update, limit: f64) {
    for layer in &mut u.adapter.layers {
        let a = layer.a.data.to_f32_vec();
        let norm_a = a.iter().map(|&x| (x as f64).powi(2)).sum::<f64>().sqrt();
        let c = (0.9 * limit / norm_a) as f32;
        if let Buffer::F32(a) = &mut layer.a.data {
            a.iter_mut().for_each(|x| *x *= c);
        }
        if let Buffer::F32(b) = &mut layer.b.data {
            b.iter_mut().for_each(|x| *x /= c);
        }
    }
}

/// Rescales the first two rank components of every layer of `u` against each other: row 0 of
/// `A` by `g`, row 1 by `1 / g`, and `B`'s columns 0 and 1 inversely. The products are the same
/// and `|A|_F` grows by about `g / 2` only, so no scalar test of its length sees much.
fn skew_gauge(u: &mut Update, g: f32) {
    for layer in &mut u.adapter.layers {
        let (r, inp) = (layer.a.rows as usize, layer.a.cols as usize);
        assert!(r >= 2, "the attack needs two components");
        if let Buffer::F32(a) = &mut layer.a.data {
            a[..inp].iter_mut().for_each(|x| *x *= g);
            a[inp..2 * inp].iter_mut().for_each(|x| *x /= g);
        }
        if let Buffer::F32(b) = &mut layer.b.data {
            for row in b.chunks_exact_mut(r) {
                row[0] /= g;
                row[1] *= g;
            }
        }
    }
}

/// The factors' gauge against the averaging methods (HetLoRA, plain mean), which average `A` and
/// `B` separately: one device of ten sends its honest update with its products split
/// differently between `A` and `B`. Its products, and so every delta norm the checks and the
/// screens measure, are those of an honest update, and nothing refuses it. Unbounded, `(c A,
/// B / c)` with `A` near the factor norm limit moved this round's global 103 from the honest
/// aggregate, whose largest entry is 0.10 (measured with the defences switched off).
/// - A scalar `c` is repaired: the update counts as the honest update it is, so the global is
///   the ten-honest aggregate up to rounding, and the round counts the repaired layers.
/// - A skew between two components (`g` = 1000: the scalar repair divides `A` by its length
///   ratio, which leaves the skew) is caught by the step bound: the merged layers step far
///   further than the updates do, so every layer keeps its starting value bit for bit, counted.
///   (A skew small enough to pass both, `|A|_F` within 4x of the slice's, moves a round's step
///   by a bounded factor, as any accepted update can.)
///
/// Ten honest devices trip neither.
#[test]
fn a_regauged_update_cannot_lengthen_an_averaged_aggregate() {
    for method in [AggregationMethod::HetLora, AggregationMethod::Mean] {
        for screen in [None, Some(3.0)] {
            let name = format!("{} / screen {screen:?}", method.name());
            let make = |devices| {
                let mut c = config(devices, method);
                c.aggregation.screen_factor = screen;
                c
            };
            assert_eq!(
                make(10).aggregation.max_factor_norm,
                1.0e4,
                "the default limit"
            );
            let start = Harness::new(make(10)).coord.global().clone();
            let layers = start.layers.len() as u32;
            let reference = run_round(make(10), 10, None);
            let r = &reference.summaries[0];
            assert!(r.aggregated, "{name}");
            assert_eq!(
                r.gauge,
                Default::default(),
                "{name}: honest updates trip nothing"
            );
            assert!(!r.progress_line(1).contains("gauge"), "{name}");
            let ref_factors = factors(reference.coord.global());
            assert_ne!(
                ref_factors,
                factors(&start),
                "{name}: the honest round moves the global"
            );
            let ref_deltas = deltas(reference.coord.global());
            let scale = ref_deltas
                .iter()
                .flatten()
                .fold(0.0f64, |m, v| m.max(v.abs()));

            let scalar = run_round(make(10), 9, Some(|u: &mut Update| regauge(u, 1.0e4)));
            let s = &scalar.summaries[0];
            assert!(s.aggregated, "{name}");
            assert_eq!(
                scalar.coord.counters().total_rejects(),
                0,
                "{name}: nothing refuses it"
            );
            assert!(s.screened_out.is_empty(), "{name}: its norms are honest");
            assert_eq!(
                s.gauge.layers_regauged, layers,
                "{name}: every layer repaired"
            );
            assert_eq!(s.gauge.layers_bounded, 0, "{name}");
            assert!(
                s.progress_line(1)
                    .contains(&format!("{layers} layer updates regauged")),
                "{name}: {}",
                s.progress_line(1)
            );
            let diff = max_diff(&deltas(scalar.coord.global()), &ref_deltas);
            assert!(
                diff <= 1e-5 * scale,
                "{name}: the repaired round is {diff} from the ten-honest one (scale {scale})"
            );

            let skewed = run_round(make(10), 9, Some(|u: &mut Update| skew_gauge(u, 1000.0)));
            let s = &skewed.summaries[0];
            assert!(s.aggregated, "{name}");
            assert_eq!(skewed.coord.counters().total_rejects(), 0, "{name}");
            assert_eq!(
                s.gauge.layers_bounded, layers,
                "{name}: every layer bounded"
            );
            let global = skewed.coord.global();
            assert!(global.is_finite(), "{name}");
            assert!(
                factors(global) == factors(&start),
                "{name}: every layer kept its starting value"
            );
        }
    }
}
