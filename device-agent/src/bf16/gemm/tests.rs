//! The bf16 kernels against their scalar specification, on every kernel this host may use.

use super::*;

fn values(len: usize, seed: u32) -> Vec<f32> {
    let mut s = seed.wrapping_mul(2_654_435_761).max(1);
    (0..len)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 17;
            s ^= s << 5;
            (s as f32 / u32::MAX as f32) * 2.0 - 1.0
        })
        .collect()
}

#[test]
fn rounding_is_nearest_even() {
    assert_eq!(bf16_value(bf16_bits(1.0)), 1.0);
    // 1 + 2^-8 lies halfway between 1 and 1 + 2^-7: ties go to the even (1.0).
    assert_eq!(bf16_value(bf16_bits(1.0 + 1.0 / 256.0)), 1.0);
    assert_eq!(bf16_value(bf16_bits(1.0 + 3.0 / 256.0)), 1.0 + 1.0 / 64.0);
    assert!(bf16_value(bf16_bits(f32::NAN)).is_nan());
}

/// The vector rounding (where present) is the scalar rule, bit for bit: ties to even, both
/// signs, the tail past the last 32.
#[test]
fn row_rounding_matches_the_scalar_rule() {
    let mut v = values(101, 9);
    // Exact ties between two bf16 neighbours, odd and even.
    v[3] = 1.0 + 1.0 / 256.0;
    v[4] = 1.0 + 3.0 / 256.0;
    v[5] = -(1.0 + 1.0 / 256.0);
    let mut got = vec![0u32; v.len().div_ceil(2)];
    round_row(&v, &mut got);
    for (i, x) in v.iter().enumerate() {
        let half = (got[i / 2] >> (16 * (i % 2))) as u16;
        assert_eq!(half, bf16_bits(*x), "value {i}: {x}");
    }
    assert_eq!(got[50] >> 16, 0, "odd length pads with 0");
}

/// A per-call product reuses this thread's buffers: after a large product of large values, a
/// smaller ragged one (odd k, n off the panel, m off the block) must see none of them, in
/// its padding or its ragged columns.
#[test]
fn reused_buffers_leave_nothing_behind() {
    if !available() {
        return;
    }
    let big = values(200 * 700, 3)
        .iter()
        .map(|v| v * 1e3)
        .collect::<Vec<_>>();
    let wbig = values(700 * 300, 4)
        .iter()
        .map(|v| v * 1e3)
        .collect::<Vec<_>>();
    for layout in [Layout::Plain, Layout::Transposed] {
        let (m, k, n) = (37, 41, 45);
        let _ = product(&big, 200, &wbig, 700, 300, Layout::Plain);
        let a = values(m * k, 5);
        let w = values(k * n, 6);
        let (rows, cols) = match layout {
            Layout::Transposed => (n, k),
            Layout::Plain => (k, n),
        };
        let got = product(&a, m, &w, rows, cols, layout);
        let mut want = vec![0f32; m * n];
        reference(&a, m, &PackedB::pack(&w, rows, cols, layout), &mut want);
        for (i, (g, w)) in got.iter().zip(&want).enumerate() {
            assert!(
                (g - w).abs() <= 1e-5 * k as f32,
                "{layout:?} cell {i}: {g} vs {w}"
            );
        }
    }
}

/// Both layouts, ragged shapes (odd k, n off the panel, m off the tile), against the
/// reference and against the fp32 product within bf16's rounding.
#[test]
fn kernel_matches_the_reference_on_ragged_shapes() {
    for &(m, k, n) in &[
        (1, 1, 1),
        (3, 7, 5),
        (8, 64, 32),
        (13, 33, 47),
        (70, 130, 97),
        (64, 64, 64),
        (96, 600, 70),
    ] {
        let a = values(m * k, 1 + m as u32);
        let w = values(n * k, 7 + n as u32);
        for layout in [Layout::Transposed, Layout::Plain] {
            // Transposed: w is [n][k]; Plain: the same numbers read as [k][n].
            let (rows, cols) = match layout {
                Layout::Transposed => (n, k),
                Layout::Plain => (k, n),
            };
            let b = PackedB::pack(&w, rows, cols, layout);
            let mut want = vec![0f32; m * n];
            reference(&a, m, &b, &mut want);
            // fp32 product of the unrounded inputs: bf16 keeps 8 bits, so each term is off
            // by at most ~2^-8 relative; over k terms of size <= 1 the sum by <= k * 2^-7.
            for r in 0..m {
                for j in 0..n {
                    let exact: f32 = (0..k)
                        .map(|kk| {
                            let wv = match layout {
                                Layout::Transposed => w[j * k + kk],
                                Layout::Plain => w[kk * n + j],
                            };
                            a[r * k + kk] * wv
                        })
                        .sum();
                    let got = want[r * n + j];
                    assert!(
                        (exact - got).abs() <= k as f32 / 128.0,
                        "{m}x{k}x{n} {layout:?} ({r},{j}): {got} vs fp32 {exact}"
                    );
                }
            }
            for kernel in Kernel::all_usable() {
                let mut got = vec![f32::NAN; m * n];
                matmul_on(kernel, &a, m, &b, &mut got);
                for (i, (g, w)) in got.iter().zip(&want).enumerate() {
                    // Same products; only the order of the fp32 additions differs.
                    assert!(
                        (g - w).abs() <= 1e-5 * k as f32,
                        "{m}x{k}x{n} {layout:?} {kernel} cell {i}: kernel {g}, reference {w}"
                    );
                }
            }
        }
    }
}
