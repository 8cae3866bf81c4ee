//! Tests of the quantized base: the Q8_0 block rule against the GGUF reader (the 4-bit rules:
//! `q4`), the matmul in every block format against a scalar reference on awkward shapes, every
//! dot path against the portable one, and a tiny random model whose quantized forward (full and
//! KV-cached) stays close to fp32.

use super::*;
use crate::gguf::{self, GgmlType};
use crate::model::{to_rows, KvCache, Llama, ModelConfig};
use burn::tensor::Device;

use test_support::seeded_noise as seeded;

const FORMATS: [BlockFormat; 3] = [BlockFormat::Q8_0, BlockFormat::Q4_0, BlockFormat::Q4_1];

/// Half a weight step as a fraction of the block's largest magnitude (Q4_1's step spans
/// max - min, at most twice that).
fn half_step(format: BlockFormat) -> f64 {
    match format {
        BlockFormat::Q8_0 => 1.0 / 254.0,
        BlockFormat::Q4_0 => 1.0 / 16.0,
        BlockFormat::Q4_1 => 1.0 / 15.0,
    }
}

/// `x[n, cols] · w[rows, cols]ᵀ` in f64.
fn reference(x: &[f32], w: &[f32], n: usize, rows: usize, cols: usize) -> Vec<f64> {
    let mut y = vec![0f64; n * rows];
    for i in 0..n {
        for j in 0..rows {
            y[i * rows + j] = (0..cols)
                .map(|k| x[i * cols + k] as f64 * w[j * cols + k] as f64)
                .sum();
        }
    }
    y
}

/// The activations as the kernels see them after quantization.
fn dequantized_rows(q: &QRows, cols: usize) -> Vec<f32> {
    (0..q.n)
        .flat_map(|i| {
            (0..cols).map(move |k| q.qs[i * q.nb * QK + k] as f32 * q.d[i * q.nb + k / QK])
        })
        .collect()
}

#[test]
fn rounding_matches_std_round_at_halves_and_their_neighbours() {
    let mut xs = vec![0.0f32, -0.0, 127.0, -127.0, 127.49, -127.5];
    for k in -256..=256 {
        let h = k as f32 * 0.5;
        xs.extend([h, h.next_up(), h.next_down()]);
    }
    for x in xs {
        assert_eq!(round_half_away(x), x.round(), "{x}");
    }
}

#[test]
fn whole_finite_blocks_quantize_as_the_scalar_rule_and_others_fall_back() {
    // The rule written out value by value, with the saturating cast: what the fast path
    // (whole blocks of finite values) must reproduce exactly.
    fn rule(values: &[f32]) -> ([i8; QK], f32) {
        let amax = values.iter().fold(0f32, |a, v| a.max(v.abs()));
        let d = amax / 127.0;
        let inv = if d > 0.0 { 1.0 / d } else { 0.0 };
        let mut q = [0i8; QK];
        for (i, qi) in q.iter_mut().enumerate() {
            let v = values.get(i).copied().unwrap_or(0.0);
            *qi = (v * inv).round().clamp(-127.0, 127.0) as i8;
        }
        (q, d)
    }
    let mut blocks: Vec<Vec<f32>> = (0..200).map(|k| seeded(QK, 500 + k, 3.0)).collect();
    // Values landing on halves of a step, zeros, one huge value, a short block, and
    // non-finite values (the fallback: NaN quantises to 0, an infinity makes every step 0).
    blocks.push((0..QK).map(|i| i as f32 * 0.5 - 8.0).collect());
    blocks.push(vec![0.0; QK]);
    let mut big = seeded(QK, 9, 1.0);
    big[7] = 3.0e38;
    blocks.push(big);
    blocks.push(seeded(13, 10, 1.0));
    for bad in [f32::NAN, f32::INFINITY, f32::NEG_INFINITY] {
        let mut b = seeded(QK, 11, 1.0);
        b[4] = bad;
        blocks.push(b);
    }
    for (k, b) in blocks.iter().enumerate() {
        let mut q = [0i8; QK];
        let d = quantize_block(b, &mut q);
        let (want, wd) = rule(b);
        assert_eq!(q, want, "block {k}");
        assert!(
            d == wd || (d.is_nan() && wd.is_nan()),
            "block {k}: {d} vs {wd}"
        );
    }
}

#[test]
fn blocks_are_the_gguf_writers_and_read_back_exactly() {
    let v = seeded(5 * 70, 3, 2.0);
    let m = QMatrix::quantize(BlockFormat::Q8_0, &v, 5, 70).unwrap();
    for r in 0..5 {
        // The writer pads each row to whole blocks the same way.
        let bytes = gguf::writer::quantize(GgmlType::Q8_0, &v[r * 70..(r + 1) * 70]);
        let back = gguf::dequantize(GgmlType::Q8_0, &bytes, 70);
        assert_eq!(back, m.dequantize_row(r), "row {r}");
        // Quantizing the dequantized values again gives the same blocks (a Q8_0 file loses
        // nothing more when its base is held quantized).
        let again = QMatrix::quantize(BlockFormat::Q8_0, &back, 1, 70).unwrap();
        assert_eq!(again.dequantize_row(0), back, "row {r} re-quantized");
        // Within half a step of the original.
        for (k, (&a, &b)) in v[r * 70..(r + 1) * 70].iter().zip(&back).enumerate() {
            let d = m.d[r * m.nb + k / QK];
            let step = half::f16::from_bits(d).to_f32();
            assert!((a - b).abs() <= 0.5 * step * 1.01 + 1e-7, "{a} vs {b}");
        }
    }
    assert!(QMatrix::quantize(BlockFormat::Q8_0, &v, 5, 71).is_err());
}

#[test]
fn matmul_matches_the_scalar_reference_on_awkward_shapes() {
    for format in FORMATS {
        matmul_against_reference(format);
    }
}

fn matmul_against_reference(format: BlockFormat) {
    let mut seed = 10;
    // n: decode, odd, and a prompt-sized block; cols: whole blocks, a ragged last block,
    // fewer than one block, and the model's widths; rows large enough for the parallel path.
    for &(n, rows, cols) in &[
        (1, 7, 32),
        (3, 5, 45),
        (6, 11, 96),
        (2, 9, 7),
        (5, 33, 576),
        (1, 1536, 576),
        (17, 300, 1536),
        (4, 0, 64),
        (0, 8, 64),
    ] {
        seed += 1;
        let w = seeded(rows * cols, seed, 0.3);
        let x = seeded(n * cols, seed + 100, 3.0);
        let m = QMatrix::quantize(format, &w, rows, cols).unwrap();
        assert_eq!(m.format(), format);
        let y = m.matmul(&x, n).unwrap();
        assert_eq!(y.len(), n * rows);
        // Exact up to f32 rounding against the dequantized operands.
        let wd: Vec<f32> = (0..rows).flat_map(|r| m.dequantize_row(r)).collect();
        let xq = QRows::quantize(&x, n, cols).unwrap();
        let xd = dequantized_rows(&xq, cols);
        let exact = reference(&xd, &wd, n, rows, cols);
        let scale = exact.iter().fold(1e-3f64, |a, v| a.max(v.abs()));
        for (k, (&a, &b)) in y.iter().zip(&exact).enumerate() {
            assert!(
                (a as f64 - b).abs() <= 1e-5 * scale,
                "{format} [{n}x{rows}x{cols}] #{k}: {a} vs {b}"
            );
        }
        // Within the quantization error of the fp32 product: each operand carries at most
        // half a step per value (activations max/254).
        let fp = reference(&x, &w, n, rows, cols);
        for (k, (&a, &b)) in y.iter().zip(&fp).enumerate() {
            let bound =
                2.0 * (cols as f64).sqrt() * 3.0 * 0.3 * (1.0 / 254.0 + half_step(format)) + 1e-6;
            assert!(
                (a as f64 - b).abs() <= bound,
                "{format} [{n}x{rows}x{cols}] #{k}: {a} vs fp32 {b} (bound {bound})"
            );
        }
    }
    // A wrong activation length is an error, not a panic.
    let m = QMatrix::quantize(BlockFormat::Q8_0, &seeded(64, 1, 1.0), 2, 32).unwrap();
    assert!(matches!(
        m.matmul(&[0.0; 31], 1),
        Err(QuantError::Shape { .. })
    ));
}

#[test]
fn every_dot_path_agrees_with_the_portable_one() {
    // One activation row (decoding), fewer than a tile, tiles and a remainder; an odd and
    // an even number of blocks per row.
    for (format, (n, cols)) in FORMATS
        .into_iter()
        .flat_map(|f| [(1, 45 + 576 + 32), (1, 576), (2, 576), (7, 45 + 576 + 32)].map(|s| (f, s)))
    {
        // Past one unpacking buffer of rows for the 4-bit formats.
        let rows = 200;
        let w = seeded(rows * cols, 77, 0.5);
        // Include values that quantize to +-127 and to 0.
        let mut x = seeded(n * cols, 78, 4.0);
        x[3] = 4.0;
        x[4] = -4.0;
        x[5] = 0.0;
        let m = QMatrix::quantize(format, &w, rows, cols).unwrap();
        let base = m.matmul_with(DotPath::Portable, &x, n).unwrap();
        let (_, hw) = crate::cpu::hardware();
        // The NEON kernel sums each block in int32 and accumulates in the portable
        // kernel's order: the same bits (on other CPUs it is the portable kernel).
        assert_eq!(m.matmul_with(DotPath::NeonDot, &x, n).unwrap(), base);
        for path in [DotPath::Avx2, DotPath::Avx512Vnni] {
            let y = m.matmul_with(path, &x, n).unwrap();
            let worst = y
                .iter()
                .zip(&base)
                .fold(0f32, |a, (p, q)| a.max((p - q).abs() / q.abs().max(1.0)));
            // Q4_1's midpoint term is added after the int8 sums, the same on every path.
            let tol = 1e-5;
            assert!(
                worst < tol,
                "{format} {path} (hardware offers {hw}), n {n}, cols {cols}: differs from \
                 portable by {worst}"
            );
        }
    }
    assert!(
        "q4_k".parse::<BasePrecision>().is_err()
            && "Q8_0".parse::<BasePrecision>().unwrap() == BasePrecision::Q8_0
            && "q4_1".parse::<BasePrecision>().unwrap() == BasePrecision::Q4_1
    );
}

#[test]
fn fused_nibble_kernels_equal_the_unpacked_ones_bit_for_bit() {
    let (_, hw) = crate::cpu::hardware();
    // A CPU with AVX2 or `sdot` has a fused kernel: this test is not vacuous there.
    assert_eq!(
        [DotPath::Avx2, DotPath::NeonDot]
            .into_iter()
            .any(|p| kernels::fuses_nibbles(p, 1)),
        matches!(hw, DotPath::Avx2 | DotPath::Avx512Vnni | DotPath::NeonDot)
    );
    let tab = f16_table();
    for format in [BlockFormat::Q4_0, BlockFormat::Q4_1] {
        // Odd and even block counts, a last block with padding.
        for cols in [45 + 576 + 32, 576, 1536] {
            let rows = 37;
            let m = QMatrix::quantize(format, &seeded(rows * cols, 81, 0.5), rows, cols).unwrap();
            let mut x = seeded(cols, 82, 4.0);
            (x[0], x[1], x[2]) = (4.0, -4.0, 0.0);
            let qx = QRows::quantize(&x, 1, cols).unwrap();
            let nb = m.nb;
            let mut q = vec![0i8; rows * nb * QK];
            m.int8_rows_range(0, rows * nb * QK, &mut q);
            let unpacked = RowArgs {
                nb,
                qw: &q,
                dw: &m.d,
                qx: &qx.qs,
                dx: &qx.d,
                tab,
            };
            let fused = NibArgs {
                nb,
                nib: &m.nib,
                dw: &m.d,
                qx: &qx.qs,
                dx: &qx.d,
                off: qx.nibble_offsets(),
                tab,
                mids: &[],
                sums: &[],
            };
            for path in [DotPath::Avx2, DotPath::Avx512Vnni, DotPath::NeonDot] {
                if !kernels::fuses_nibbles(path, 1) {
                    continue;
                }
                let (mut a, mut b) = (vec![0f32; rows], vec![0f32; rows]);
                kernels::row_dots(path, &unpacked, &mut a);
                kernels::nib_row_dots(path, &fused, &mut b);
                assert_eq!(a, b, "{format} {path}, cols {cols}");
                if format == BlockFormat::Q4_1 {
                    // Q4_1's midpoint term inside the fused kernel's row loop against
                    // `add_midpoints` after the unpacked kernel: the same bits, and not zero.
                    add_midpoints(m.midpoints(), qx.block_sums(), nb, &mut a);
                    assert_ne!(a, b, "{path}, cols {cols}: the midpoints add something");
                    let with_mids = NibArgs {
                        mids: m.midpoints(),
                        sums: qx.block_sums(),
                        ..fused
                    };
                    kernels::nib_row_dots(path, &with_mids, &mut b);
                    let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
                    assert_eq!(bits(&a), bits(&b), "Q4_1 midpoints {path}, cols {cols}");
                }
            }
        }
    }
}

#[test]
fn grouped_products_equal_each_matrix_alone_above_and_below_the_split() {
    // SmolLM2's q, k and v shapes at one decoded token (together past the parallel split,
    // k and v alone under it), at a short prompt, and a small group that stays serial.
    let cols = 576;
    // q in Q8_0 and k, v in the 4-bit formats: a group may mix them.
    let mats: Vec<QMatrix> = [576usize, 192, 192]
        .iter()
        .zip(FORMATS)
        .enumerate()
        .map(|(i, (&rows, format))| {
            let w = seeded(rows * cols, 90 + i as u32, 0.5);
            QMatrix::quantize(format, &w, rows, cols).unwrap()
        })
        .collect();
    let small = QMatrix::quantize(BlockFormat::Q8_0, &seeded(3 * 64, 95, 0.5), 3, 64).unwrap();
    let refs: Vec<&QMatrix> = mats.iter().collect();
    let path = DotPath::detect();
    for n in [1, 5] {
        let qx = QRows::quantize(&seeded(n * cols, 99, 2.0), n, cols).unwrap();
        let together = matmul_many_q(path, &refs, &qx);
        assert_eq!(together.len(), 3);
        for (m, y) in mats.iter().zip(&together) {
            assert_eq!(y, &m.matmul_q(path, &qx), "n {n}, {} rows", m.rows);
            // Each output is its weight row's dot product whichever task ran it: the
            // portable kernel's over the same rows agrees to rounding.
            let single = m.matmul_q(DotPath::Portable, &qx);
            let worst = y
                .iter()
                .zip(&single)
                .fold(0f32, |a, (p, q)| a.max((p - q).abs() / q.abs().max(1.0)));
            assert!(worst < 1e-5, "n {n}: {worst}");
        }
    }
    let qx = QRows::quantize(&seeded(2 * 64, 96, 2.0), 2, 64).unwrap();
    let y = matmul_many_q(path, &[&small, &small], &qx);
    assert_eq!(y[0], y[1]);
    assert_eq!(y[0], small.matmul_q(path, &qx));
}

#[test]
fn products_do_not_depend_on_the_thread_count() {
    // The tasks' sizes follow the pool's threads; each starts on a whole tile, so the tiled
    // kernel (several activation rows) and the 4-bit chunks see the same tiles at any count.
    // 1,538 rows: not a multiple of the tile, and the split's guided sizes end uneven.
    let (rows, cols) = (1538, 1536);
    for (i, format) in FORMATS.into_iter().enumerate() {
        let w = seeded(rows * cols, 70 + i as u32, 0.5);
        let m = QMatrix::quantize(format, &w, rows, cols).unwrap();
        for n in [1, 5, 9] {
            let qx = QRows::quantize(&seeded(n * cols, 80 + n as u32, 2.0), n, cols).unwrap();
            let on = |threads: usize| {
                let pool = rayon::ThreadPoolBuilder::new()
                    .num_threads(threads)
                    .build()
                    .unwrap();
                pool.install(|| matmul_many_q(DotPath::detect(), &[&m], &qx).remove(0))
            };
            let one = on(1);
            for threads in [2, 3, 5] {
                assert_eq!(
                    on(threads),
                    one,
                    "{format:?}, {n} rows of activations, {threads} threads"
                );
            }
        }
    }
}

fn tiny(n_layers: usize, tie: bool) -> ModelConfig {
    // d_model 64 and ffn 80: the MLP's input width is not a multiple of 32.
    let mut c = ModelConfig::dense(97, 64, n_layers, 4, 2, 16, 80, tie);
    c.max_seq_len = 64;
    c
}

#[test]
fn quantized_tiny_model_stays_close_and_caches_alike() {
    let device = Device::flex();
    let cases = [
        BasePrecision::Q8_0,
        BasePrecision::Q4_0,
        BasePrecision::Q4_1,
    ]
    .into_iter()
    .flat_map(|p| [(p, true), (p, false)]);
    for (precision, tie) in cases {
        let fp = Llama::random(tiny(2, tie), 5, &device);
        let mut q = fp.clone();
        let rep = q.set_base_precision(precision).unwrap().expect("quantized");
        assert!(q.quant_base().is_some() && fp.quant_base().is_none());
        // The fp32 tensors are gone from the quantized model.
        assert_eq!(q.blocks[0].wq.dims(), [0, 0]);
        assert!(rep.quant_bytes * 3 < rep.fp32_bytes, "{rep:?}");
        let qb = q.quant_base().unwrap();
        assert_eq!(
            qb.proj(1, protocol::Proj::Up).format(),
            precision.format().unwrap()
        );
        assert_eq!(qb.embed.format(), BlockFormat::Q8_0);
        let ids: Vec<u32> = vec![3, 14, 15, 92, 65, 35, 89, 79];
        let a = to_rows(fp.forward(fp.tokens_tensor(std::slice::from_ref(&ids)), None));
        let b = to_rows(q.forward(q.tokens_tensor(std::slice::from_ref(&ids)), None));
        let scale = a.iter().flatten().fold(0f32, |m, v| m.max(v.abs()));
        let worst = a
            .iter()
            .flatten()
            .zip(b.iter().flatten())
            .fold(0f32, |m, (x, y)| m.max((x - y).abs()));
        // 4-bit weights carry about 16x Q8_0's error.
        let tol = if precision == BasePrecision::Q8_0 {
            0.05
        } else {
            0.25
        };
        assert!(
            worst < tol * scale,
            "{precision:?} tie {tie}: {worst} of {scale}"
        );
        // KV-cached decoding of the quantized model equals its full forward.
        let mut cache = KvCache::new(2);
        let mut rows = to_rows(q.logits(q.hidden(
            q.tokens_tensor(&[ids[..5].to_vec()]),
            None,
            Some(&mut cache),
        )));
        for &t in &ids[5..] {
            rows.extend(to_rows(q.logits(q.hidden(
                q.tokens_tensor(&[vec![t]]),
                None,
                Some(&mut cache),
            ))));
        }
        for (r, c) in b.iter().flatten().zip(rows.iter().flatten()) {
            assert!((r - c).abs() < 1e-4, "{r} vs {c}");
        }
    }
}

#[test]
fn gguf_blocks_read_back_and_bad_ones_are_refused() {
    use super::file_blocks::block_bytes;
    let (rows, cols) = (5, 64);
    let w = seeded(rows * cols, 83, 0.5);
    for format in FORMATS {
        let m = QMatrix::quantize(format, &w, rows, cols).unwrap();
        let bytes = crate::gguf::writer::quantize(format.into(), &w);
        assert_eq!(bytes.len(), rows * 2 * block_bytes(format));
        let back = QMatrix::from_gguf_blocks(format, &bytes, rows, cols)
            .unwrap()
            .unwrap();
        assert!(
            back == m,
            "{format}: the writer's blocks read back as the matrix"
        );
        // Bands of rows stacked are the whole matrix.
        let band = |r0: usize, r1: usize| {
            QMatrix::quantize(format, &w[r0 * cols..r1 * cols], r1 - r0, cols).unwrap()
        };
        assert!(QMatrix::stack_rows(vec![band(0, 2), band(2, 5)]).unwrap() == m);
        let short = &bytes[..bytes.len() - 1];
        let err = QMatrix::from_gguf_blocks(format, short, rows, cols)
            .err()
            .unwrap();
        assert!(err.to_string().contains("expected"), "{err}");
        let err = QMatrix::from_gguf_blocks(format, &bytes, rows * 2, cols / 2 + 1);
        assert!(err.err().unwrap().to_string().contains("whole blocks"));
    }
    let other = QMatrix::quantize(BlockFormat::Q4_0, &w, rows, cols).unwrap();
    let q8 = QMatrix::quantize(BlockFormat::Q8_0, &w, rows, cols).unwrap();
    assert!(QMatrix::stack_rows(vec![q8, other]).is_none());
    assert!(QMatrix::stack_rows(Vec::new()).is_none());
}
