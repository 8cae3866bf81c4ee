//! The one-pass LoRA gradients against an f64 reference on every kernel this host may use, at
//! ragged shapes and every padded rank the tiles take; the same bits on any number of threads.

use super::*;
use crate::test_values::uniform;

/// Each cell within 1e-5 of the sum of its terms' magnitudes (reordered fp32 sums).
fn assert_close(got: &[f32], want: &[f32], scale: &[f32], what: &str) {
    assert_eq!(got.len(), want.len(), "{what}: length");
    for (i, ((&o, &r), &s)) in got.iter().zip(want).zip(scale).enumerate() {
        assert!(
            (o - r).abs() <= 1e-5 * s + 1e-30,
            "{what}: cell {i}: {o} against {r} (terms' magnitude {s})"
        );
    }
}

fn abs(v: &[f32]) -> Vec<f32> {
    v.iter().map(|x| x.abs()).collect()
}

#[test]
fn gradients_match_the_reference_on_ragged_shapes_and_ranks() {
    let kernels = Kernel::all_usable();
    if kernels.is_empty() {
        eprintln!("no AVX2/AVX-512 on this CPU: the kernels are not used here");
        return;
    }
    // Rows past a tile and a row block, columns past a group and a column block; ranks of one
    // lane, a vector and a lane, and the widest each mode takes on each kernel.
    let shapes = [(1, 1), (7, 5), (37, 131), (530, 259), (64, 576)];
    for kernel in kernels {
        let lanes = kernel.lanes();
        let ranks = [1, 8, lanes - 1, MAX_RANK, MAX_RANK + 1];
        for (t, &(n, c)) in shapes.iter().enumerate() {
            for &r in &ranks {
                let seed = (t * 100 + r) as u64;
                let m = uniform(n * c, seed, -1.0, 1.0);
                let s = uniform(n * r, seed + 1, -1.0, 1.0);
                let w = uniform(c * r, seed + 2, -1.0, 1.0);
                let (abs_m, abs_s, abs_w) = (abs(&m), abs(&s), abs(&w));
                for with_w in [true, false] {
                    let what = format!("{kernel:?} {n}x{c} rank {r} with w {with_w}");
                    let wopt = with_w.then_some(&w[..]);
                    let got = grads_on(kernel, &m, n, c, &s, wopt, r);
                    let Some((p, g)) = got else {
                        assert!(r > MAX_RANK, "{what}: no product");
                        continue;
                    };
                    assert!(r <= MAX_RANK, "{what}: a product past the widest rank");
                    let (want_p, want_g) = reference(&m, n, c, &s, wopt, r);
                    let (scale_p, scale_g) =
                        reference(&abs_m, n, c, &abs_s, with_w.then_some(&abs_w[..]), r);
                    assert_close(&g, &want_g, &scale_g, &format!("{what}: g"));
                    assert_eq!(p.is_some(), with_w, "{what}: p given when w is");
                    if let (Some(p), Some(want), Some(scale)) = (p, want_p, scale_p) {
                        assert_close(&p, &want, &scale, &format!("{what}: p"));
                    }
                }
            }
        }
    }
}

#[test]
fn gradients_do_not_depend_on_the_thread_count() {
    let Some(kernel) = Kernel::detect() else {
        eprintln!("no AVX2/AVX-512 on this CPU: the kernels are not used here");
        return;
    };
    // Several row blocks, and one row block with its columns split: the tasks' partial sums
    // meet either way.
    for (n, c) in [(1100, 300), (250, 700)] {
        let r = 16;
        let m = uniform(n * c, 7, -1.0, 1.0);
        let s = uniform(n * r, 8, -1.0, 1.0);
        let w = uniform(c * r, 9, -1.0, 1.0);
        for wopt in [Some(&w[..]), None] {
            let on = |threads: usize| {
                rayon::ThreadPoolBuilder::new()
                    .num_threads(threads)
                    .build()
                    .expect("thread pool")
                    .install(|| grads_on(kernel, &m, n, c, &s, wopt, r))
                    .expect("rank 16 has a tile")
            };
            let one = on(1);
            for threads in [2, 3, 5] {
                assert!(
                    one == on(threads),
                    "{n}x{c}, with w {}: {threads} threads changed the bits",
                    wopt.is_some()
                );
            }
        }
    }
}

#[test]
fn empty_operands_give_zero_gradients() {
    let Some(kernel) = Kernel::detect() else {
        return;
    };
    let (p, g) = grads_on(kernel, &[], 0, 3, &[], Some(&[1.0; 6]), 2).expect("rank 2");
    assert_eq!((p, g), (Some(vec![]), vec![0.0; 6]));
}
