//! Validation tests: each malformed payload is refused with the error that names its fault.

use expect_test::{expect, Expect};
use protocol::*;

fn dims() -> ModelDims {
    ModelDims {
        n_blocks: 2,
        d_model: 4,
        n_heads: 4,
        n_kv_heads: 2,
        head_dim: 2,
        ffn: 6,
    }
}

fn valid() -> (AdapterPayload, KeptIndices) {
    let d = dims();
    let mut kept = KeptIndices::full(&d);
    kept.blocks[0] = BlockKept {
        query_heads: vec![2, 3],
        kv_heads: vec![1],
        mlp_channels: vec![0, 5],
    };
    let rank = 2u32;
    let mut layers = Vec::new();
    for (block, bk) in kept.blocks.iter().enumerate() {
        for proj in Proj::ALL {
            let (out, inp) = kept_shape(&d, proj, bk);
            layers.push(LayerAdapter {
                block: block as u32,
                proj,
                a: Tensor2::f32(rank, inp as u32, vec![0.1; rank as usize * inp]),
                b: Tensor2::f32(out as u32, rank, vec![0.2; out * rank as usize]),
            });
        }
    }
    (
        AdapterPayload {
            rank,
            alpha: 4.0,
            layers,
        },
        kept,
    )
}

fn check(mutate: impl FnOnce(&mut AdapterPayload, &mut KeptIndices), expect: Expect) {
    let (mut adapter, mut kept) = valid();
    mutate(&mut adapter, &mut kept);
    let limits = ValidationLimits {
        max_rank: 8,
        max_factor_norm: 100.0,
    };
    let got = match validate_adapter(&dims(), &adapter, &kept, &limits) {
        Ok(()) => "ok".to_string(),
        Err(e) => format!("{e} => reject: {}", e.reject_reason()),
    };
    expect.assert_eq(&got);
}

#[test]
fn valid_payload_passes_including_f16() {
    check(|_, _| {}, expect!["ok"]);
    check(|a, _| *a = a.to_f16(), expect!["ok"]);
}

#[test]
fn kept_index_faults() {
    check(
        |_, k| k.blocks.pop().map(|_| ()).unwrap_or(()),
        expect!["kept indices cover 1 blocks, the model has 2 => reject: malformed update: kept indices cover 1 blocks, the model has 2"],
    );
    check(
        |_, k| k.blocks[1].query_heads = vec![1, 0, 2, 3],
        expect!["block 1: query heads are not sorted unique indices below n_heads => reject: malformed update: block 1: query heads are not sorted unique indices below n_heads"],
    );
    check(
        |_, k| k.blocks[1].mlp_channels = vec![0, 6],
        expect!["block 1: mlp channels are not sorted unique indices below ffn => reject: malformed update: block 1: mlp channels are not sorted unique indices below ffn"],
    );
    check(
        |_, k| k.blocks[0].kv_heads = vec![0, 1],
        expect!["block 0: kv heads differ from the set read by the kept query heads => reject: malformed update: block 0: kv heads differ from the set read by the kept query heads"],
    );
}

#[test]
fn shape_and_value_faults() {
    check(
        |a, _| a.rank = 0,
        expect!["rank 0 is outside 1..=8 => reject: malformed update: rank 0 is outside 1..=8"],
    );
    check(
        |a, _| a.alpha = f32::NAN,
        expect!["alpha NaN is not a positive finite number => reject: malformed update: alpha NaN is not a positive finite number"],
    );
    check(
        |a, _| a.layers[3].block = 2,
        expect!["layer block 2 is out of range (model has 2 blocks) => reject: malformed update: layer block 2 is out of range (model has 2 blocks)"],
    );
    check(
        |a, _| a.layers[1] = a.layers[0].clone(),
        expect!["layer 0.q appears twice => reject: malformed update: layer 0.q appears twice"],
    );
    // Block 0 keeps two query heads: its q has 4 output rows, not the full 8.
    check(
        |a, _| a.layers[0].b = Tensor2::zeros(8, 2),
        expect!["layer 0.q factor B: shape (8, 2), expected (4, 2) => reject: malformed update: layer 0.q factor B: shape (8, 2), expected (4, 2)"],
    );
    check(
        |a, _| a.layers[6].a = Tensor2::zeros(2, 6),
        expect!["layer 0.down factor A: shape (2, 6), expected (2, 2) => reject: malformed update: layer 0.down factor A: shape (2, 6), expected (2, 2)"],
    );
    check(
        |a, _| {
            if let Buffer::F32(v) = &mut a.layers[2].a.data {
                v.pop();
            }
        },
        expect!["layer 0.v factor A: 7 values for a 2x4 matrix => reject: malformed update: layer 0.v factor A: 7 values for a 2x4 matrix"],
    );
    check(
        |a, _| {
            if let Buffer::F32(v) = &mut a.layers[9].b.data {
                v[1] = f32::INFINITY;
            }
        },
        expect!["layer 1.v factor B holds non-finite values => reject: update contains non-finite values"],
    );
    check(
        |a, _| a.layers[4].a = Tensor2::f32(2, 4, vec![1.0e3; 8]),
        expect!["layer 0.gate factor A: norm 2828.42712474619 exceeds 100 => reject: update norm 2828.42712474619 exceeds the limit 100"],
    );
    // An f32 value beyond the f16 range turns infinite when encoded as f16, and is refused.
    check(
        |a, _| {
            if let Buffer::F32(v) = &mut a.layers[0].a.data {
                v[0] = 70000.0;
            }
            *a = a.to_f16();
        },
        expect!["layer 0.q factor A holds non-finite values => reject: update contains non-finite values"],
    );
}

#[test]
fn update_statistics_are_checked() {
    let (adapter, kept) = valid();
    let mut update = Update {
        round: RoundId(1),
        adapter,
        kept,
        stats: UpdateStats {
            loss_pre: 2.0,
            loss_post: 1.5,
            sparsity: 0.1,
            param_count: 10,
            compute_ms: 1,
            bytes_down: 0,
            bytes_up: 0,
            peak_mem_bytes: 0,
            samples: 4,
            steps: 1,
        },
    };
    let limits = ValidationLimits::default();
    assert_eq!(validate_update(&dims(), &update, &limits), Ok(()));
    update.stats.loss_post = f32::NAN;
    expect!["statistic loss_post is invalid: NaN"].assert_eq(
        &validate_update(&dims(), &update, &limits)
            .unwrap_err()
            .to_string(),
    );
    update.stats.loss_post = 1.0;
    update.stats.sparsity = 1.5;
    expect!["statistic sparsity is invalid: 1.5"].assert_eq(
        &validate_update(&dims(), &update, &limits)
            .unwrap_err()
            .to_string(),
    );
}
