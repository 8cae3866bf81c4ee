//! The in-place fp32 products against an f64 reference, on every kernel this host may use, at
//! ragged shapes; the same bits on one thread as on many.

use super::*;

/// Deterministic values in [-1, 1) from a seed (a small LCG: the tests need spread, not quality).
fn values(len: usize, seed: u64) -> Vec<f32> {
    let mut s = seed
        .wrapping_mul(6364136223846793005)
        .wrapping_add(1442695040888963407);
    (0..len)
        .map(|_| {
            s = s
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            ((s >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
        })
        .collect()
}

/// `out` within fp32 rounding of the f64 reference: each cell within 1e-5 of the sum of the
/// magnitudes of its terms (the bound on reordered fp32 sums of a few hundred terms).
#[allow(clippy::too_many_arguments)] // a product's operands, shape and layout, named as the kernels name them
fn assert_close(
    out: &[f32],
    a: &[f32],
    m: usize,
    w: &[f32],
    rows: usize,
    cols: usize,
    layout: Layout,
    what: &str,
) {
    let want = reference(a, m, w, rows, cols, layout);
    let abs_a: Vec<f32> = a.iter().map(|v| v.abs()).collect();
    let abs_w: Vec<f32> = w.iter().map(|v| v.abs()).collect();
    let scale = reference(&abs_a, m, &abs_w, rows, cols, layout);
    assert_eq!(out.len(), want.len(), "{what}: output length");
    for (i, ((&o, &r), &s)) in out.iter().zip(&want).zip(&scale).enumerate() {
        assert!(
            (o - r).abs() <= 1e-5 * s + 1e-30,
            "{what}: cell {i}: {o} against {r} (terms' magnitude {s})"
        );
    }
}

#[test]
fn products_match_the_reference_on_ragged_shapes() {
    let kernels = Kernel::all_usable();
    if kernels.is_empty() {
        eprintln!("no AVX2/AVX-512 on this CPU: the products are not used here");
        return;
    }
    // Ragged in every dimension: rows past a tile and a task's block, reduced lengths past a
    // vector and a pass (KC), output columns past a panel and a dot-product block.
    let shapes = [
        (1, 1, 1),
        (5, 7, 15),
        (7, 256, 33),
        (97, 300, 70),
        (200, 577, 49),
        (13, 64, 161),
    ];
    for kernel in kernels {
        for (t, &(m, k, n)) in shapes.iter().enumerate() {
            let a = values(m * k, 3 * t as u64);
            let w = values(k * n, 3 * t as u64 + 1);
            let plain = product_on(kernel, &a, m, &w, k, n, Layout::Plain);
            assert_close(
                &plain,
                &a,
                m,
                &w,
                k,
                n,
                Layout::Plain,
                &format!("{kernel:?} plain {m}x{k}x{n}"),
            );
            let tr = product_on(kernel, &a, m, &w, n, k, Layout::Transposed);
            assert_close(
                &tr,
                &a,
                m,
                &w,
                n,
                k,
                Layout::Transposed,
                &format!("{kernel:?} transposed {m}x{k}x{n}"),
            );
        }
    }
}

#[test]
fn products_are_the_same_bits_on_one_thread() {
    let Some(kernel) = Kernel::detect() else {
        return;
    };
    let (m, k, n) = (150, 520, 100);
    let a = values(m * k, 11);
    let w = values(k * n, 12);
    let both = |layout| {
        let (rows, cols) = if layout == Layout::Plain {
            (k, n)
        } else {
            (n, k)
        };
        let many = product_on(kernel, &a, m, &w, rows, cols, layout);
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(1)
            .build()
            .unwrap();
        let one = pool.install(|| product_on(kernel, &a, m, &w, rows, cols, layout));
        assert!(
            many.iter()
                .zip(&one)
                .all(|(x, y)| x.to_bits() == y.to_bits()),
            "{layout:?}: a product differs between one thread and {}",
            rayon::current_num_threads()
        );
    };
    both(Layout::Plain);
    both(Layout::Transposed);
}

#[test]
fn empty_dimensions_give_zeros_and_bad_lengths_are_refused() {
    let Some(kernel) = Kernel::detect() else {
        return;
    };
    assert_eq!(
        product_on(kernel, &[], 0, &[1.0; 6], 2, 3, Layout::Plain),
        Vec::<f32>::new()
    );
    assert_eq!(
        product_on(kernel, &[], 4, &[], 0, 3, Layout::Plain),
        vec![0.0; 12]
    );
    let short = std::panic::catch_unwind(|| {
        product_on(kernel, &[1.0; 5], 2, &[1.0; 6], 3, 2, Layout::Plain)
    });
    assert!(
        short.is_err(),
        "a left operand of 5 values for 2 x 3 must be refused"
    );
}
