//! Tests of the Q8_0 base: the block rule against the GGUF reader, the matmul against a scalar
//! reference on awkward shapes, every dot path against the portable one, and a tiny random
//! model whose quantized forward (full and KV-cached) stays close to fp32.

use super::*;
use crate::gguf::{self, GgmlType};
use crate::model::{to_rows, KvCache, Llama, ModelConfig};
use burn::tensor::Device;

fn seeded(n: usize, seed: u32, scale: f32) -> Vec<f32> {
    let mut state = seed;
    (0..n)
        .map(|_| {
            state = state.wrapping_mul(1_664_525).wrapping_add(1_013_904_223);
            ((state >> 8) as f32 / (1u32 << 24) as f32 * 2.0 - 1.0) * scale
        })
        .collect()
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
fn blocks_are_the_gguf_writers_and_read_back_exactly() {
    let v = seeded(5 * 70, 3, 2.0);
    let m = Q8Matrix::quantize(&v, 5, 70).unwrap();
    for r in 0..5 {
        // The writer pads each row to whole blocks the same way.
        let bytes = gguf::writer::quantize(GgmlType::Q8_0, &v[r * 70..(r + 1) * 70]);
        let back = gguf::dequantize(GgmlType::Q8_0, &bytes, 70);
        assert_eq!(back, m.dequantize_row(r), "row {r}");
        // Quantizing the dequantized values again gives the same blocks (a Q8_0 file loses
        // nothing more when its base is held quantized).
        let again = Q8Matrix::quantize(&back, 1, 70).unwrap();
        assert_eq!(again.dequantize_row(0), back, "row {r} re-quantized");
        // Within half a step of the original.
        for (k, (&a, &b)) in v[r * 70..(r + 1) * 70].iter().zip(&back).enumerate() {
            let d = m.d[r * m.nb + k / QK];
            let step = half::f16::from_bits(d).to_f32();
            assert!((a - b).abs() <= 0.5 * step * 1.01 + 1e-7, "{a} vs {b}");
        }
    }
    assert!(Q8Matrix::quantize(&v, 5, 71).is_err());
}

#[test]
fn matmul_matches_the_scalar_reference_on_awkward_shapes() {
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
        let m = Q8Matrix::quantize(&w, rows, cols).unwrap();
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
                "[{n}x{rows}x{cols}] #{k}: {a} vs {b}"
            );
        }
        // Within the quantization error of the fp32 product: each operand carries at most
        // half a step (max/254) per value.
        let fp = reference(&x, &w, n, rows, cols);
        for (k, (&a, &b)) in y.iter().zip(&fp).enumerate() {
            let bound = 2.0 * (cols as f64).sqrt() * 3.0 * 0.3 / 254.0 + 1e-6;
            assert!(
                (a as f64 - b).abs() <= bound,
                "[{n}x{rows}x{cols}] #{k}: {a} vs fp32 {b} (bound {bound})"
            );
        }
    }
    // A wrong activation length is an error, not a panic.
    let m = Q8Matrix::quantize(&seeded(64, 1, 1.0), 2, 32).unwrap();
    assert!(matches!(
        m.matmul(&[0.0; 31], 1),
        Err(QuantError::Shape { .. })
    ));
}

#[test]
fn every_dot_path_agrees_with_the_portable_one() {
    let (n, rows, cols) = (7, 200, 45 + 576 + 32);
    let w = seeded(rows * cols, 77, 0.5);
    // Include values that quantize to +-127 and to 0.
    let mut x = seeded(n * cols, 78, 4.0);
    x[3] = 4.0;
    x[4] = -4.0;
    x[5] = 0.0;
    let m = Q8Matrix::quantize(&w, rows, cols).unwrap();
    let base = m.matmul_with(DotPath::Portable, &x, n).unwrap();
    let (_, hw) = crate::cpu::hardware();
    for path in [DotPath::Avx2, DotPath::Avx512Vnni] {
        let y = m.matmul_with(path, &x, n).unwrap();
        let worst = y
            .iter()
            .zip(&base)
            .fold(0f32, |a, (p, q)| a.max((p - q).abs() / q.abs().max(1.0)));
        assert!(
            worst < 1e-5,
            "{path} (hardware offers {hw}) differs from portable by {worst}"
        );
    }
    assert!(
        "q4_k".parse::<BasePrecision>().is_err()
            && "Q8_0".parse::<BasePrecision>().unwrap() == BasePrecision::Q8_0
    );
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
    for tie in [true, false] {
        let fp = Llama::random(tiny(2, tie), 5, &device);
        let mut q = fp.clone();
        let rep = q
            .set_base_precision(BasePrecision::Q8_0)
            .unwrap()
            .expect("quantized");
        assert!(q.quant_base().is_some() && fp.quant_base().is_none());
        // The fp32 tensors are gone from the quantized model.
        assert_eq!(q.blocks[0].wq.dims(), [0, 0]);
        assert!(rep.q8_bytes * 3 < rep.fp32_bytes, "{rep:?}");
        let ids: Vec<u32> = vec![3, 14, 15, 92, 65, 35, 89, 79];
        let a = to_rows(fp.forward(fp.tokens_tensor(&[ids.clone()]), None));
        let b = to_rows(q.forward(q.tokens_tensor(&[ids.clone()]), None));
        let scale = a.iter().flatten().fold(0f32, |m, v| m.max(v.abs()));
        let worst = a
            .iter()
            .flatten()
            .zip(b.iter().flatten())
            .fold(0f32, |m, (x, y)| m.max((x - y).abs()));
        assert!(worst < 0.05 * scale, "tie {tie}: {worst} of {scale}");
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
