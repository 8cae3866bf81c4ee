//! Pure tests of the aggregation math: exact vs. the average of products, HetLoRA by hand,
//! holder-wise normalisation, SVD re-factoring, robust methods, rejection and clipping.

use aggregator::aggregate::*;
use protocol::*;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

fn tiny() -> ModelDims {
    ModelDims {
        n_blocks: 1,
        d_model: 4,
        n_heads: 2,
        n_kv_heads: 1,
        head_dim: 2,
        ffn: 4,
    }
}

fn random_adapter(
    dims: &ModelDims,
    kept: &KeptIndices,
    rank: u32,
    alpha: f32,
    rng: &mut ChaCha8Rng,
) -> AdapterPayload {
    let mut layers = Vec::new();
    for (block, bk) in kept.blocks.iter().enumerate() {
        for proj in Proj::ALL {
            let (out, inp) = kept_shape(dims, proj, bk);
            let mut fill = |n: usize| (0..n).map(|_| rng.random_range(-1.0f32..1.0)).collect();
            let a = Tensor2::f32(rank, inp as u32, fill(rank as usize * inp));
            let b = Tensor2::f32(out as u32, rank, fill(out * rank as usize));
            layers.push(LayerAdapter {
                block: block as u32,
                proj,
                a,
                b,
            });
        }
    }
    AdapterPayload {
        rank,
        alpha,
        layers,
    }
}

/// The settings these tests run with: `method`, the full SVD, everything else at its default.
fn settings(method: AggregationMethod) -> AggregationConfig {
    AggregationConfig {
        method,
        svd: SvdMode::Full,
        ..AggregationConfig::default()
    }
}

/// The trimmed mean dropping `trim_fraction` at each end.
fn trimmed_mean(trim_fraction: f64) -> AggregationConfig {
    AggregationConfig {
        trim_fraction,
        ..settings(AggregationMethod::TrimmedMean)
    }
}

fn contribution(
    device: u64,
    adapter: AdapterPayload,
    kept: KeptIndices,
    samples: u64,
) -> Contribution {
    Contribution {
        device: DeviceId(device),
        adapter,
        kept,
        samples,
    }
}

/// `s B A` of a device layer in full coordinates, with a mask of held coordinates.
fn device_delta(
    dims: &ModelDims,
    adapter: &AdapterPayload,
    kept: &KeptIndices,
    block: u32,
    proj: Proj,
) -> (Vec<f64>, Vec<bool>) {
    let layer = adapter
        .layers
        .iter()
        .find(|l| l.block == block && l.proj == proj)
        .unwrap();
    let map = layer_index_map(dims, proj, &kept.blocks[block as usize]);
    let (out, inp) = dims.full_shape(proj);
    let r = adapter.rank as usize;
    let mut d = vec![0.0; out * inp];
    let mut held = vec![false; out * inp];
    for (ol, &o) in map.rows.iter().enumerate() {
        for (jl, &j) in map.cols.iter().enumerate() {
            let v: f64 = (0..r)
                .map(|i| layer.b.get(ol, i) as f64 * layer.a.get(i, jl) as f64)
                .sum();
            d[o as usize * inp + j as usize] = adapter.scale() * v;
            held[o as usize * inp + j as usize] = true;
        }
    }
    (d, held)
}

fn assert_close(got: &[f32], want: &[f64], tol: f64, what: &str) {
    assert_eq!(got.len(), want.len(), "{what}: length");
    for (i, (&g, &w)) in got.iter().zip(want).enumerate() {
        assert!(
            (g as f64 - w).abs() <= tol * (1.0 + w.abs()),
            "{what}[{i}]: got {g}, want {w}"
        );
    }
}

#[test]
fn exact_with_equal_ranks_and_no_pruning_is_the_average_of_products() {
    let dims = tiny();
    let kept = KeptIndices::full(&dims);
    let mut rng = ChaCha8Rng::seed_from_u64(1);
    let adapters: Vec<_> = (0..3)
        .map(|_| random_adapter(&dims, &kept, 2, 4.0, &mut rng))
        .collect();
    for weight_by_samples in [false, true] {
        let samples = [10u64, 20, 70];
        let mut config = settings(AggregationMethod::Exact);
        config.weight_by_samples = weight_by_samples;
        let mut agg = Aggregation::new(dims, 4, config).unwrap();
        for (k, a) in adapters.iter().enumerate() {
            agg.add(contribution(k as u64, a.clone(), kept.clone(), samples[k]))
                .unwrap();
        }
        let global = agg.finish(None).unwrap();
        for proj in Proj::ALL {
            let weights: Vec<f64> = if weight_by_samples {
                samples.iter().map(|&s| s as f64 / 100.0).collect()
            } else {
                vec![1.0 / 3.0; 3]
            };
            let (out, inp) = dims.full_shape(proj);
            let mut want = vec![0.0; out * inp];
            for (a, w) in adapters.iter().zip(&weights) {
                let (d, _) = device_delta(&dims, a, &kept, 0, proj);
                for (x, y) in want.iter_mut().zip(d) {
                    *x += w * y;
                }
            }
            assert_close(&global.delta(0, proj), &want, 1e-5, proj.name());
        }
    }
}

#[test]
fn hetlora_matches_its_formula_on_a_hand_computed_case() {
    // One block, d_model 2, one head of dim 2: q is 2x2. Only q is adapted.
    let dims = ModelDims {
        n_blocks: 1,
        d_model: 2,
        n_heads: 1,
        n_kv_heads: 1,
        head_dim: 2,
        ffn: 2,
    };
    let kept = KeptIndices::full(&dims);
    let q = |rank, alpha, a: Vec<f32>, b: Vec<f32>| AdapterPayload {
        rank,
        alpha,
        layers: vec![LayerAdapter {
            block: 0,
            proj: Proj::Q,
            a: Tensor2::f32(rank, 2, a),
            b: Tensor2::f32(2, rank, b),
        }],
    };
    // Device 1: rank 1, scale 1, B1 A1 = [[2, 0], [0, 0]], |B1 A1|_F = 2.
    let d1 = q(1, 1.0, vec![1.0, 0.0], vec![2.0, 0.0]);
    // Device 2: rank 2, scale 1, B2 A2 = [[0, 1], [1, 0]], |B2 A2|_F = sqrt(2).
    let d2 = q(2, 2.0, vec![0.0, 1.0, 1.0, 0.0], vec![1.0, 0.0, 0.0, 1.0]);
    let mut config = settings(AggregationMethod::HetLora);
    config.weight_by_samples = false;
    let mut agg = Aggregation::new(dims, 2, config).unwrap();
    let n1 = agg
        .add(contribution(1, d1, kept.clone(), 5))
        .unwrap()
        .delta_norm;
    let n2 = agg
        .add(contribution(2, d2, kept.clone(), 5))
        .unwrap()
        .delta_norm;
    assert!((n1 - 2.0).abs() < 1e-12 && (n2 - 2f64.sqrt()).abs() < 1e-12);
    let g = agg.finish(None).unwrap();
    // w1 = 2 / (2 + sqrt 2) = 0.585786..., w2 = sqrt 2 / (2 + sqrt 2) = 0.414213...
    // A = w1 [[1, 0], [0, 0]] + w2 [[0, 1], [1, 0]]   (device 1 zero-padded to rank 2)
    // B = w1 [[2, 0], [0, 0]] + w2 [[1, 0], [0, 1]]
    let (w1, w2) = (0.585_786_437_6, 0.414_213_562_4);
    let layer = g.layer(0, Proj::Q);
    assert_close(&layer.a, &[w1, w2, w2, 0.0], 1e-6, "A");
    assert_close(&layer.b, &[2.0 * w1 + w2, 0.0, 0.0, w2], 1e-6, "B");
    // Device 1 receives the truncation to rank 1.
    let (slice, filled) = g.slice_for(&kept, 1, 1.0).unwrap();
    assert_eq!(filled, 1);
    let sq = &slice.layers[Proj::Q.index()];
    assert_close(&sq.a.data.to_f32_vec(), &[w1, w2], 1e-6, "sliced A");
    assert_close(
        &sq.b.data.to_f32_vec(),
        &[2.0 * w1 + w2, 0.0],
        1e-6,
        "sliced B",
    );
}

/// Device 0 prunes query head 1 and MLP channel 1; device 1 keeps everything.
fn pruned_pair(dims: &ModelDims) -> (KeptIndices, KeptIndices) {
    let full = KeptIndices::full(dims);
    let mut pruned = full.clone();
    pruned.blocks[0] = BlockKept {
        query_heads: vec![0],
        kv_heads: vec![0],
        mlp_channels: vec![0, 2, 3],
    };
    (pruned, full)
}

#[test]
fn a_coordinate_held_by_one_device_takes_that_devices_value() {
    let dims = tiny();
    let (pruned, full) = pruned_pair(&dims);
    let mut rng = ChaCha8Rng::seed_from_u64(2);
    let a0 = random_adapter(&dims, &pruned, 2, 8.0, &mut rng);
    let a1 = random_adapter(&dims, &full, 2, 8.0, &mut rng);
    let sqrt_s1 = (a1.scale()).sqrt();
    // Rows/columns only device 1 holds: q rows 2..4, o columns 2..4, gate/up row 1, down col 1.
    for config in [
        settings(AggregationMethod::HetLora),
        settings(AggregationMethod::Median),
        trimmed_mean(0.25),
    ] {
        let method = config.method;
        let mut agg = Aggregation::new(dims, 2, config).unwrap();
        agg.add(contribution(0, a0.clone(), pruned.clone(), 10))
            .unwrap();
        agg.add(contribution(1, a1.clone(), full.clone(), 30))
            .unwrap();
        let g = agg.finish(None).unwrap();
        let l1 = |p: Proj| &a1.layers[p.index()];
        for (proj, rows) in [
            (Proj::Q, vec![2, 3]),
            (Proj::Gate, vec![1]),
            (Proj::Up, vec![1]),
        ] {
            for o in rows {
                let got = &g.layer(0, proj).b[o * 2..o * 2 + 2];
                let want: Vec<f64> = (0..2)
                    .map(|i| sqrt_s1 * l1(proj).b.get(o, i) as f64)
                    .collect();
                assert_close(
                    got,
                    &want,
                    1e-6,
                    &format!("{} {proj} row {o}", method.name()),
                );
            }
        }
        for (proj, cols) in [(Proj::O, vec![2, 3]), (Proj::Down, vec![1])] {
            for j in cols {
                let inp = dims.full_shape(proj).1;
                let got: Vec<f32> = (0..2).map(|i| g.layer(0, proj).a[i * inp + j]).collect();
                let want: Vec<f64> = (0..2)
                    .map(|i| sqrt_s1 * l1(proj).a.get(i, j) as f64)
                    .collect();
                assert_close(
                    &got,
                    &want,
                    1e-6,
                    &format!("{} {proj} col {j}", method.name()),
                );
            }
        }
    }
    // Exact: the delta's coordinates held only by device 1 equal its own s B A there.
    let mut agg = Aggregation::new(dims, 4, settings(AggregationMethod::Exact)).unwrap();
    agg.add(contribution(0, a0.clone(), pruned.clone(), 10))
        .unwrap();
    agg.add(contribution(1, a1.clone(), full.clone(), 30))
        .unwrap();
    let g = agg.finish(None).unwrap();
    for proj in Proj::ALL {
        let (d0, held0) = device_delta(&dims, &a0, &pruned, 0, proj);
        let (d1, _) = device_delta(&dims, &a1, &full, 0, proj);
        // Held by both: sample-weighted mean 1/4, 3/4; held by device 1 only: its value.
        let want: Vec<f64> = (0..d1.len())
            .map(|i| {
                if held0[i] {
                    0.25 * d0[i] + 0.75 * d1[i]
                } else {
                    d1[i]
                }
            })
            .collect();
        assert_close(&g.delta(0, proj), &want, 1e-5, proj.name());
    }
}

#[test]
fn coordinates_nobody_holds_keep_the_previous_global_value() {
    let dims = tiny();
    let (pruned, _) = pruned_pair(&dims);
    let mut rng = ChaCha8Rng::seed_from_u64(3);
    let previous = GlobalAdapter::init_lora(dims, 2, 4.0, &mut rng);
    let mut previous = previous;
    for l in &mut previous.layers {
        for x in &mut l.b {
            *x = rng.random_range(-1.0..1.0);
        }
    }
    let a0 = random_adapter(&dims, &pruned, 2, 4.0, &mut rng);
    // (The exact method compares deltas: see the next test.)
    for method in [AggregationMethod::HetLora, AggregationMethod::Median] {
        let mut agg = Aggregation::new(dims, 2, settings(method)).unwrap();
        agg.add(contribution(0, a0.clone(), pruned.clone(), 1))
            .unwrap();
        let g = agg.finish(Some(&previous)).unwrap();
        let prev_gate = previous.layer(0, Proj::Gate);
        assert_eq!(
            &g.layer(0, Proj::Gate).b[2..4],
            &prev_gate.b[2..4],
            "{}",
            method.name()
        );
        let prev_down = previous.layer(0, Proj::Down);
        let got: Vec<f32> = (0..2)
            .map(|i| g.layer(0, Proj::Down).a[i * 4 + 1])
            .collect();
        let want: Vec<f32> = (0..2).map(|i| prev_down.a[i * 4 + 1]).collect();
        assert_eq!(got, want, "{}", method.name());
    }
}

#[test]
fn exact_keeps_the_previous_delta_where_nobody_holds_it() {
    let dims = tiny();
    let (pruned, _) = pruned_pair(&dims);
    let mut rng = ChaCha8Rng::seed_from_u64(4);
    let mut previous = GlobalAdapter::zeros(dims, 4);
    for l in &mut previous.layers {
        for x in l.a.iter_mut().chain(l.b.iter_mut()) {
            *x = rng.random_range(-1.0..1.0);
        }
    }
    let a0 = random_adapter(&dims, &pruned, 2, 4.0, &mut rng);
    // max_rank 4 = full rank of every 4x4 layer: the SVD re-factoring is exact.
    let mut agg = Aggregation::new(dims, 4, settings(AggregationMethod::Exact)).unwrap();
    agg.add(contribution(0, a0.clone(), pruned.clone(), 1))
        .unwrap();
    let g = agg.finish(Some(&previous)).unwrap();
    for proj in [Proj::Q, Proj::O, Proj::Gate, Proj::Up, Proj::Down] {
        let (d0, held) = device_delta(&dims, &a0, &pruned, 0, proj);
        let prev: Vec<f32> = previous.delta(0, proj);
        let want: Vec<f64> = (0..d0.len())
            .map(|i| if held[i] { d0[i] } else { prev[i] as f64 })
            .collect();
        assert_close(&g.delta(0, proj), &want, 1e-5, proj.name());
    }
}

#[test]
fn svd_refactoring_reproduces_a_low_rank_matrix_and_slices_back() {
    let dims = ModelDims {
        n_blocks: 1,
        d_model: 12,
        n_heads: 3,
        n_kv_heads: 1,
        head_dim: 4,
        ffn: 16,
    };
    let kept = KeptIndices::full(&dims);
    let mut rng = ChaCha8Rng::seed_from_u64(5);
    let a = random_adapter(&dims, &kept, 3, 6.0, &mut rng);
    let mut agg = Aggregation::new(dims, 5, settings(AggregationMethod::Exact)).unwrap();
    agg.add(contribution(0, a.clone(), kept.clone(), 1))
        .unwrap();
    let g = agg.finish(None).unwrap();
    for proj in Proj::ALL {
        let (want, _) = device_delta(&dims, &a, &kept, 0, proj);
        assert_close(&g.delta(0, proj), &want, 1e-5, proj.name());
        // Components beyond the matrix's rank 3 carry (numerically) nothing: the product of
        // their factor norms is the size of a rounding-level singular value.
        let l = g.layer(0, proj);
        let (out, inp) = dims.full_shape(proj);
        for i in 3..5 {
            let a_norm: f32 = l.a[i * inp..(i + 1) * inp]
                .iter()
                .map(|x| x * x)
                .sum::<f32>()
                .sqrt();
            let b_norm: f32 = (0..out).map(|o| l.b[o * 5 + i].powi(2)).sum::<f32>().sqrt();
            assert!(
                a_norm * b_norm < 1e-5,
                "{proj}: component {i} carries {}",
                a_norm * b_norm
            );
        }
    }
    // Slicing back to the device's rank and alpha reproduces its own delta.
    let (slice, filled) = g.slice_for(&kept, 3, 6.0).unwrap();
    assert_eq!(filled, 3);
    validate_adapter(&dims, &slice, &kept, &ValidationLimits::default()).unwrap();
    for proj in Proj::ALL {
        let (want, _) = device_delta(&dims, &a, &kept, 0, proj);
        let (got, _) = device_delta(&dims, &slice, &kept, 0, proj);
        let got: Vec<f32> = got.iter().map(|&x| x as f32).collect();
        assert_close(&got, &want, 1e-5, proj.name());
    }
}

#[test]
fn slices_cut_the_kept_rows_and_pad_missing_rank() {
    let dims = tiny();
    let (pruned, _) = pruned_pair(&dims);
    let mut rng = ChaCha8Rng::seed_from_u64(6);
    let g = GlobalAdapter::init_lora(dims, 2, 2.0, &mut rng);
    let (slice, filled) = g.slice_for(&pruned, 4, 2.0).unwrap();
    assert_eq!(filled, 2);
    validate_adapter(&dims, &slice, &pruned, &ValidationLimits::default()).unwrap();
    let down = &slice.layers[Proj::Down.index()];
    assert_eq!((down.a.rows, down.a.cols), (4, 3));
    // A's padded components are zero; kept columns 0, 2, 3 come from the global, scaled by
    // 1/sqrt(alpha/rank) = sqrt(2).
    let gd = g.layer(0, Proj::Down);
    for (jl, j) in [0usize, 2, 3].into_iter().enumerate() {
        for i in 0..2 {
            let want = gd.a[i * 4 + j] * 2f32.sqrt();
            assert!((down.a.get(i, jl) - want).abs() < 1e-6);
        }
        for i in 2..4 {
            assert_eq!(down.a.get(i, jl), 0.0);
        }
    }
    // A device of the global rank and its alpha receives exactly the drawn init.
    let (same, _) = g.slice_for(&KeptIndices::full(&dims), 2, 2.0).unwrap();
    assert_eq!(same.layers[0].a.data.to_f32_vec(), g.layer(0, Proj::Q).a);
}

#[test]
fn median_and_trimmed_mean_resist_an_outlier() {
    let dims = tiny();
    let kept = KeptIndices::full(&dims);
    let mut rng = ChaCha8Rng::seed_from_u64(7);
    let honest = random_adapter(&dims, &kept, 2, 2.0, &mut rng);
    let mut outlier = honest.clone();
    for l in &mut outlier.layers {
        if let Buffer::F32(v) = &mut l.b.data {
            v.iter_mut().for_each(|x| *x = 5.0);
        }
    }
    for config in [settings(AggregationMethod::Median), trimmed_mean(0.25)] {
        let method = config.method;
        let mut agg = Aggregation::new(dims, 2, config).unwrap();
        for k in 0..3 {
            agg.add(contribution(k, honest.clone(), kept.clone(), 1))
                .unwrap();
        }
        agg.add(contribution(9, outlier.clone(), kept.clone(), 1))
            .unwrap();
        let g = agg.finish(None).unwrap();
        for proj in Proj::ALL {
            let (want, _) = device_delta(&dims, &honest, &kept, 0, proj);
            assert_close(
                &g.delta(0, proj),
                &want,
                1e-5,
                &format!("{} {proj}", method.name()),
            );
        }
    }
}

#[test]
fn bad_updates_are_refused_before_touching_state() {
    let dims = tiny();
    let kept = KeptIndices::full(&dims);
    let mut rng = ChaCha8Rng::seed_from_u64(8);
    let good = random_adapter(&dims, &kept, 2, 2.0, &mut rng);
    let mut nan = good.clone();
    if let Buffer::F32(v) = &mut nan.layers[3].a.data {
        v[2] = f32::NAN;
    }
    let mut huge = good.clone();
    if let Buffer::F32(v) = &mut huge.layers[5].b.data {
        v.iter_mut().for_each(|x| *x = 900.0);
    }
    let high_rank = random_adapter(&dims, &kept, 4, 2.0, &mut rng);
    for method in [
        AggregationMethod::HetLora,
        AggregationMethod::Exact,
        AggregationMethod::Median,
    ] {
        let mut config = settings(method);
        config.max_layer_delta_norm = 100.0;
        let mut agg = Aggregation::new(dims, 2, config.clone()).unwrap();
        agg.add(contribution(0, good.clone(), kept.clone(), 1))
            .unwrap();
        let bytes = agg.state_bytes();
        let e = agg
            .add(contribution(1, nan.clone(), kept.clone(), 1))
            .unwrap_err();
        assert_eq!(e.reject_reason(), RejectReason::NonFinite);
        let e = agg
            .add(contribution(2, huge.clone(), kept.clone(), 1))
            .unwrap_err();
        assert!(
            matches!(e, AggregateError::DeltaNormTooLarge { proj: Proj::Up, .. }),
            "{e}"
        );
        assert!(matches!(
            e.reject_reason(),
            RejectReason::NormTooLarge { .. }
        ));
        let e = agg
            .add(contribution(3, high_rank.clone(), kept.clone(), 1))
            .unwrap_err();
        assert_eq!(e.to_string(), "invalid update: rank 4 is outside 1..=2");
        assert_eq!((agg.len(), agg.state_bytes()), (1, bytes));
        let with_rejects = agg.finish(None).unwrap();
        let mut alone = Aggregation::new(dims, 2, config).unwrap();
        alone
            .add(contribution(0, good.clone(), kept.clone(), 1))
            .unwrap();
        assert_eq!(
            with_rejects,
            alone.finish(None).unwrap(),
            "{}",
            method.name()
        );
    }
}

#[test]
fn clipping_bounds_the_delta_norm() {
    let dims = tiny();
    let kept = KeptIndices::full(&dims);
    let mut rng = ChaCha8Rng::seed_from_u64(9);
    let a = random_adapter(&dims, &kept, 2, 2.0, &mut rng);
    let norm = delta_norm(&a);
    let mut config = settings(AggregationMethod::HetLora);
    config.clip_norm = Some(norm / 4.0);
    let mut agg = Aggregation::new(dims, 2, config).unwrap();
    let accepted = agg.add(contribution(0, a, kept, 1)).unwrap();
    assert!((accepted.clip_factor - 0.25).abs() < 1e-12);
    let g = agg.finish(None).unwrap();
    let total: f64 = Proj::ALL
        .iter()
        .map(|&p| {
            g.delta(0, p)
                .iter()
                .map(|&x| (x as f64).powi(2))
                .sum::<f64>()
        })
        .sum::<f64>()
        .sqrt();
    assert!(
        (total - norm / 4.0).abs() < 1e-5 * norm,
        "{total} vs {}",
        norm / 4.0
    );
}

#[test]
fn gram_norm_equals_the_dense_norm() {
    let dims = tiny();
    let kept = KeptIndices::full(&dims);
    let mut rng = ChaCha8Rng::seed_from_u64(10);
    let a = random_adapter(&dims, &kept, 3, 6.0, &mut rng);
    for (layer, proj) in a.layers.iter().zip(Proj::ALL) {
        let (d, _) = device_delta(&dims, &a, &kept, 0, proj);
        let dense = d.iter().map(|x| x * x).sum::<f64>().sqrt();
        assert!((layer_delta_norm(layer, a.scale()) - dense).abs() < 1e-9 * (1.0 + dense));
    }
    // f16 buffers give the norm of their rounded values.
    let h = a.to_f16();
    assert!((delta_norm(&h) - delta_norm(&a)).abs() < 1e-2 * delta_norm(&a));
}

#[test]
fn mean_type_state_does_not_grow_with_the_number_of_devices() {
    let dims = tiny();
    let kept = KeptIndices::full(&dims);
    let mut rng = ChaCha8Rng::seed_from_u64(11);
    for method in [AggregationMethod::HetLora, AggregationMethod::Exact] {
        let mut agg = Aggregation::new(dims, 2, settings(method)).unwrap();
        agg.add(contribution(
            0,
            random_adapter(&dims, &kept, 2, 2.0, &mut rng),
            kept.clone(),
            1,
        ))
        .unwrap();
        let after_one = agg.state_bytes();
        for k in 1..20 {
            agg.add(contribution(
                k,
                random_adapter(&dims, &kept, 1, 2.0, &mut rng),
                kept.clone(),
                1,
            ))
            .unwrap();
        }
        assert_eq!(agg.state_bytes(), after_one, "{}", method.name());
    }
}

#[test]
fn config_and_dims_errors_are_reported() {
    let dims = tiny();
    let bad = Aggregation::new(dims, 2, trimmed_mean(0.5));
    assert_eq!(
        bad.err().map(|e| e.to_string()),
        Some("invalid aggregation config: trim_fraction 0.5 is outside [0, 0.5)".to_string())
    );
    let agg = Aggregation::new(dims, 2, settings(AggregationMethod::HetLora)).unwrap();
    let mut other = dims;
    other.ffn = 8;
    let prev = GlobalAdapter::zeros(other, 2);
    assert!(matches!(
        agg.finish(Some(&prev)),
        Err(AggregateError::DimsMismatch { .. })
    ));
}

fn mid_dims() -> ModelDims {
    ModelDims {
        n_blocks: 1,
        d_model: 32,
        n_heads: 4,
        n_kv_heads: 2,
        head_dim: 8,
        ffn: 48,
    }
}

/// Frobenius distance between the global delta and the aggregated dense delta, per layer.
fn refactor_errors(
    svd: SvdMode,
    oversample: u32,
    max_rank: u32,
    adapters: &[AdapterPayload],
) -> Vec<f64> {
    let dims = mid_dims();
    let kept = KeptIndices::full(&dims);
    let mut config = settings(AggregationMethod::Exact);
    config.svd = svd;
    config.svd_oversample = oversample;
    config.svd_power_iters = 2;
    config.weight_by_samples = false;
    let mut agg = Aggregation::new(dims, max_rank, config).unwrap();
    for (k, a) in adapters.iter().enumerate() {
        agg.add(contribution(k as u64, a.clone(), kept.clone(), 1))
            .unwrap();
    }
    let g = agg.finish(None).unwrap();
    Proj::ALL
        .iter()
        .map(|&proj| {
            let (out, inp) = dims.full_shape(proj);
            let mut dense = vec![0.0; out * inp];
            for a in adapters {
                let (d, _) = device_delta(&dims, a, &kept, 0, proj);
                for (x, y) in dense.iter_mut().zip(d) {
                    *x += y / adapters.len() as f64;
                }
            }
            g.delta(0, proj)
                .iter()
                .zip(&dense)
                .map(|(&x, y)| (x as f64 - y).powi(2))
                .sum::<f64>()
                .sqrt()
        })
        .collect()
}

#[test]
fn randomized_refactoring_is_exact_on_low_rank_and_near_optimal_otherwise() {
    let dims = mid_dims();
    let kept = KeptIndices::full(&dims);
    let mut rng = ChaCha8Rng::seed_from_u64(12);
    // Randomised with 4 extra probes and 2 power iterations.
    let randomized = SvdMode::Randomized;
    // Rank 3 delta, 7 probes on 32+ dimensional layers: reproduced exactly.
    let one = vec![random_adapter(&dims, &kept, 3, 6.0, &mut rng)];
    for err in refactor_errors(randomized, 4, 3, &one) {
        assert!(err < 1e-4, "{err}");
    }
    // Six rank-4 devices: rank-24 delta truncated to rank 4. The randomised truncation error
    // is within 10% of the optimal (full SVD) one on every layer.
    let many: Vec<_> = (0..6)
        .map(|_| random_adapter(&dims, &kept, 4, 8.0, &mut rng))
        .collect();
    let full = refactor_errors(SvdMode::Full, 4, 4, &many);
    let fast = refactor_errors(randomized, 4, 4, &many);
    for ((proj, f), r) in Proj::ALL.iter().zip(&full).zip(&fast) {
        assert!(*f > 0.1, "{proj}: the case must need truncation ({f})");
        assert!(r <= &(1.10 * f), "{proj}: randomized {r} vs optimal {f}");
        assert!(
            r >= &(f * (1.0 - 1e-9)),
            "{proj}: nothing beats the optimum"
        );
    }
}

#[test]
fn a_malformed_previous_global_is_refused_not_indexed() {
    let dims = tiny();
    let mut prev = GlobalAdapter::zeros(dims, 2);
    prev.layers[3].b.pop();
    assert!(!prev.is_well_formed());
    let agg = Aggregation::new(dims, 2, settings(AggregationMethod::HetLora)).unwrap();
    assert!(matches!(
        agg.finish(Some(&prev)),
        Err(AggregateError::MalformedGlobal)
    ));
    assert!(matches!(
        prev.slice_for(&KeptIndices::full(&dims), 2, 2.0),
        Err(AggregateError::MalformedGlobal)
    ));
}
