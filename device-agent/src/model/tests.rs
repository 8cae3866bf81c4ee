//! The decoder against its own definitions: shapes, cached decoding, attention variants.

use super::*;
use burn::tensor::{Distribution, TensorData};
use test_support::seeded_noise as seeded;

fn max_diff(a: Tensor<2>, b: Tensor<2>) -> f32 {
    (a - b).abs().max().into_scalar()
}

fn tiny(n_layers: usize) -> ModelConfig {
    let mut c = ModelConfig::dense(61, 32, n_layers, 4, 2, 8, 48, true);
    c.max_seq_len = 64;
    c
}

fn dev() -> Device {
    Device::flex()
}

fn block(n_heads: usize, n_kv_heads: usize, ffn_dim: usize, q_to_kv: Vec<usize>) -> BlockShape {
    BlockShape {
        n_heads,
        n_kv_heads,
        ffn_dim,
        q_to_kv,
    }
}

#[test]
fn output_shapes() {
    let m = Llama::random(tiny(2), 1, &dev());
    let toks = m.tokens_tensor(&[vec![1, 2, 3, 4, 5], vec![6, 7, 8, 9, 10]]);
    let logits = m.forward(toks, None);
    assert_eq!(logits.dims(), [10, 61]);
    let mut c = tiny(2);
    c.tie_embeddings = false;
    let m = Llama::random(c, 1, &dev());
    let logits = m.forward(m.tokens_tensor(&[vec![1, 2, 3]]), None);
    assert_eq!(logits.dims(), [3, 61]);
}

/// Cached decoding gives the logits of the whole sequence at once: two sequences, a
/// one-token prompt, 20 decoded tokens (the host buffers grow past their first 16
/// positions), a 3-token chunk after cached positions (attention through tensors built from
/// the buffers) and more decoded tokens; on equal KV groups and on a pruned model whose
/// blocks map query heads to KV heads unevenly (one block without attention).
#[test]
fn kv_cache_decoding_equals_full_sequence() {
    let mut pruned = tiny(3);
    pruned.blocks[0] = block(3, 2, 20, vec![0, 1, 1]);
    pruned.blocks[1] = block(0, 0, 48, vec![]);
    for (what, cfg) in [("equal groups", tiny(3)), ("pruned", pruned)] {
        let m = Llama::random(cfg, 7, &dev());
        let seqs: Vec<Vec<u32>> = (0..2u32)
            .map(|b| (0..27u32).map(|i| (i * 7 + b * 13 + 3) % 61).collect())
            .collect();
        let full = to_rows(m.forward(m.tokens_tensor(&seqs), None));
        let mut cache = KvCache::new(3);
        let mut got = vec![Vec::new(); 2];
        let mut at = 0;
        for chunk in std::iter::once(1).chain([1; 20]).chain([3]).chain([1; 3]) {
            let part: Vec<Vec<u32>> = seqs.iter().map(|s| s[at..at + chunk].to_vec()).collect();
            let rows = to_rows(m.logits(m.hidden(m.tokens_tensor(&part), None, Some(&mut cache))));
            for (b, g) in got.iter_mut().enumerate() {
                g.extend(rows[b * chunk..(b + 1) * chunk].iter().cloned());
            }
            at += chunk;
        }
        assert_eq!(cache.len(), 27);
        let got: Vec<Vec<f32>> = got.into_iter().flatten().collect();
        assert_eq!(got.len(), full.len());
        for (i, (a, b)) in full.iter().zip(&got).enumerate() {
            for (x, y) in a.iter().zip(b) {
                assert!((x - y).abs() < 1e-4, "{what}, row {i}: {x} vs {y}");
            }
        }
    }
}

/// `hidden_last` gives the rows of `hidden` at each sequence's last position, for two
/// sequences and for one, with and without a cache; a cache it filled serves the next
/// tokens as one filled by `hidden` does (its keys and values cover every position). On
/// equal KV groups, on a pruned model (the last block without attention) and on a one-block
/// model.
#[test]
fn hidden_last_equals_the_last_rows_of_hidden() {
    let mut pruned = tiny(3);
    pruned.blocks[0] = block(3, 2, 20, vec![0, 1, 1]);
    pruned.blocks[2] = block(0, 0, 48, vec![]);
    for (what, cfg) in [
        ("equal groups", tiny(3)),
        ("pruned", pruned),
        ("one block", tiny(1)),
    ] {
        let layers = cfg.n_layers();
        let m = Llama::random(cfg, 5, &dev());
        let seqs: Vec<Vec<u32>> = (0..2u32)
            .map(|b| (0..9u32).map(|i| (i * 5 + b * 11 + 1) % 61).collect())
            .collect();
        for batch in [&seqs[..], &seqs[..1]] {
            let n = batch.len();
            let all = to_rows(m.hidden(m.tokens_tensor(batch), None, None));
            let want: Vec<Vec<f32>> = (0..n).map(|b| all[b * 9 + 8].clone()).collect();
            let mut cache = KvCache::new(layers);
            let mut ref_cache = KvCache::new(layers);
            let prompt: Vec<Vec<u32>> = batch.iter().map(|s| s[..8].to_vec()).collect();
            let _ = m.hidden(m.tokens_tensor(&prompt), None, Some(&mut ref_cache));
            let from_cache = m.hidden_last(m.tokens_tensor(&prompt), None, Some(&mut cache));
            assert_eq!(from_cache.dims(), [n, 32], "{what}: one row per sequence");
            assert_eq!(cache.len(), 8, "{what}: every prompt position cached");
            let next: Vec<Vec<u32>> = batch.iter().map(|s| s[8..].to_vec()).collect();
            let got = [
                to_rows(m.hidden_last(m.tokens_tensor(batch), None, None)),
                to_rows(m.hidden_last(m.tokens_tensor(&next), None, Some(&mut cache))),
                to_rows(m.hidden_last(m.tokens_tensor(&next), None, Some(&mut ref_cache))),
            ];
            for (way, rows) in ["whole", "after its own cache", "after hidden's cache"]
                .iter()
                .zip(&got)
            {
                assert_eq!(rows.len(), n, "{what}, {way}");
                for (b, (g, w)) in rows.iter().zip(&want).enumerate() {
                    for (x, y) in g.iter().zip(w) {
                        assert!(
                            (x - y).abs() < 1e-4,
                            "{what}, {way}, sequence {b}: {x} vs {y}"
                        );
                    }
                }
            }
        }
    }
}

/// The decode kernel on a cache with spare room, long enough that heads run in parallel,
/// against attention through tensors of the filled positions (SmolLM2's 9 heads on 3 KV
/// heads of 64).
#[test]
fn decode_attention_in_place_equals_attention_through_tensors() {
    let (heads, nkv, hd, keys, cap) = (9, 3, 64, 300, 320);
    let q = seeded(heads * hd, 1, 2.0);
    let (k, v) = (
        seeded(nkv * cap * hd, 2, 2.0),
        seeded(nkv * cap * hd, 3, 2.0),
    );
    let kv_of: Vec<usize> = (0..heads).map(|h| h / 3).collect();
    // The kernel takes the keys transposed per KV head: `[hd, cap]`.
    let kt: Vec<f32> = k
        .chunks(cap * hd)
        .flat_map(|c| (0..hd * cap).map(move |i| c[(i % cap) * hd + i / cap]))
        .collect();
    let got = crate::kernels::decode_attention(&q, &kt, &v, &kv_of, (cap, keys, hd));
    let filled = |buf: &[f32]| -> Vec<f32> {
        buf.chunks(cap * hd)
            .flat_map(|c| c[..keys * hd].to_vec())
            .collect()
    };
    let t =
        |v: Vec<f32>, dims: [usize; 4]| Tensor::<4>::from_data(TensorData::new(v, dims), &dev());
    let want = causal_attention(
        t(q, [1, heads, 1, hd]),
        t(filled(&k), [1, nkv, keys, hd]),
        t(filled(&v), [1, nkv, keys, hd]),
    );
    let got = Tensor::<2>::from_data(TensorData::new(got, [heads, hd]), &dev());
    let d = max_diff(want.reshape([heads, hd]), got);
    assert!(d < 1e-5, "differs by {d}");
}

/// Grouped KV heads read in place give what attention over KV heads repeated per query head
/// gives, decoding one position and a causal prompt after cached positions.
#[test]
fn grouped_attention_equals_attention_over_repeated_kv_heads() {
    let d = dev();
    let (batch, nkv, g, t, hd) = (2, 3, 3, 7, 8);
    let nh = nkv * g;
    for seq in [1, 4, t] {
        let q = Tensor::<4>::random([batch, nh, seq, hd], Distribution::Normal(0.0, 1.0), &d);
        let k = Tensor::<4>::random([batch, nkv, t, hd], Distribution::Normal(0.0, 1.0), &d);
        let v = Tensor::<4>::random([batch, nkv, t, hd], Distribution::Normal(0.0, 1.0), &d);
        let rep = |x: Tensor<4>| {
            x.reshape([batch, nkv, 1, t * hd])
                .repeat_dim(2, g)
                .reshape([batch, nh, t, hd])
        };
        let want = causal_attention(q.clone(), rep(k.clone()), rep(v.clone()));
        let got = causal_attention(q.clone(), k, v);
        assert_eq!(got.dims(), [batch, nh, seq, hd]);
        let (want, got) = (
            want.into_data().try_to_vec::<f32>().unwrap(),
            got.into_data().try_to_vec::<f32>().unwrap(),
        );
        for (a, b) in want.iter().zip(&got) {
            assert!((a - b).abs() < 1e-5, "seq {seq}: {a} vs {b}");
        }
    }
}

/// The fused attention against the same attention in burn's operations, values and the
/// gradients of `q`, `k` and `v` under autodiff: grouped KV heads (3 queries per KV head),
/// a prompt with no cache, new positions after cached ones, and one decoded position.
#[test]
fn fused_attention_has_the_values_and_gradients_of_burns_operations() {
    let device = Device::flex();
    let (batch, nkv, g, hd) = (2, 2, 3, 16);
    // The last is large enough to run row-parallel, in chunks that straddle score matrices.
    for (seq, keys) in [(9, 9), (5, 12), (1, 7), (40, 40), (100, 130)] {
        let t = |dims: [usize; 4], seed: u32| {
            let n = dims.iter().product();
            Tensor::<4>::from_data(TensorData::new(seeded(n, seed, 2.0), dims), &device)
        };
        let q = t([batch, nkv, g * seq, hd], 1);
        let k = t([batch, nkv, keys, hd], 2);
        let v = t([batch, nkv, keys, hd], 3);
        let w = t([batch, nkv, g * seq, hd], 4);
        let run = |fused: bool| {
            let (qa, ka, va) = (
                q.clone().autodiff().require_grad(),
                k.clone().autodiff().require_grad(),
                v.clone().autodiff().require_grad(),
            );
            let o = if fused {
                crate::fused::causal_attention(qa.clone(), ka.clone(), va.clone(), seq)
                    .expect("flex")
            } else {
                attention_by_ops(qa.clone(), ka.clone(), va.clone(), seq)
            };
            let gr = (o.clone() * w.clone()).sum().backward();
            let flat = |t: Tensor<4>| {
                let [a, b, c, d] = t.dims();
                t.reshape([a * b * c, d])
            };
            [
                flat(o.inner()),
                flat(qa.grad(&gr).unwrap()),
                flat(ka.grad(&gr).unwrap()),
                flat(va.grad(&gr).unwrap()),
            ]
        };
        let (ours, theirs) = (run(true), run(false));
        for (name, (a, b)) in ["value", "dq", "dk", "dv"]
            .iter()
            .zip(ours.into_iter().zip(theirs))
        {
            let d = max_diff(a, b);
            assert!(d < 2e-5, "seq {seq}, keys {keys}: {name} differs by {d}");
        }
        // Without autodiff the value is the same.
        let plain = crate::fused::causal_attention(q.clone(), k.clone(), v.clone(), seq).unwrap();
        let by_ops = attention_by_ops(q.clone(), k.clone(), v.clone(), seq);
        let [a, b, c, d] = plain.dims();
        assert!(
            max_diff(
                plain.reshape([a * b * c, d]),
                by_ops.reshape([a * b * c, d])
            ) < 2e-5
        );
    }
}

#[test]
fn unequal_blocks_run() {
    let mut c = tiny(3);
    c.blocks[0] = block(3, 2, 20, vec![0, 1, 1]);
    c.blocks[1] = block(1, 1, 48, vec![0]);
    c.blocks[2] = block(0, 0, 0, vec![]);
    assert!(c.sparsity() > 0.3);
    let m = Llama::random(c, 3, &dev());
    let rows = to_rows(m.forward(m.tokens_tensor(&[vec![1, 2, 3, 4]]), None));
    assert_eq!(rows.len(), 4);
    assert!(rows.iter().flatten().all(|v| v.is_finite()));
}
