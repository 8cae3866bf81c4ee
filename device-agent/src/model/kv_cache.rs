//! The KV cache of generation: each block's keys and values (RoPE applied) of every position
//! seen so far, `[batch, kv_heads, positions, head_dim]`.
//!
//! On flex a block's cache is a pair of host buffers with room to grow (doubling), so a new
//! position copies only its own keys and values, and a decoded token's attention reads the
//! buffers in place ([`crate::kernels::decode_attention`]). Growing tensors by concatenation
//! instead copied the whole cache every token: about 6% of a Q8_0 token at 300 positions, and
//! growing with the context. Other backends keep tensors and concatenate (their data lives on
//! the device).

use burn::tensor::{Device, Tensor, TensorData};

/// Cached keys and values of every block.
#[derive(Debug, Clone, Default)]
pub struct KvCache {
    pub(super) layers: Vec<LayerKv>,
    pub(super) len: usize,
}

impl KvCache {
    pub fn new(n_layers: usize) -> Self {
        KvCache {
            layers: vec![LayerKv::Empty; n_layers],
            len: 0,
        }
    }
    /// Number of positions already cached.
    pub fn len(&self) -> usize {
        self.len
    }
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

/// One block's cache (what [`Llama::block_forward`](super::Llama::block_forward) appends to).
// One per block, held for a generation: the variants' sizes do not matter.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Clone, Default)]
pub enum LayerKv {
    #[default]
    Empty,
    /// Host buffers (flex).
    Host(HostKv),
    /// Device tensors grown by concatenation (other backends).
    Tensors(Tensor<4>, Tensor<4>),
}

/// Keys and values in host buffers, positions `0..len` of `cap` filled: the keys transposed,
/// `[batch, kv_heads, hd, cap]` (a score sums along positions, see
/// [`crate::kernels::decode_attention`]), the values `[batch, kv_heads, cap, hd]`.
#[derive(Debug, Clone)]
pub struct HostKv {
    kt: Vec<f32>,
    v: Vec<f32>,
    batch: usize,
    nkv: usize,
    hd: usize,
    cap: usize,
    len: usize,
}

/// A tensor's values in row-major order as `f32`.
pub(super) fn host_values<const D: usize>(t: Tensor<D>) -> Vec<f32> {
    t.into_data()
        .convert::<f32>()
        .try_into_vec::<f32>()
        .expect("f32 values after conversion")
}

impl HostKv {
    /// Room for `need` positions, keeping the filled ones (capacity doubles, so appending a
    /// position costs a constant amount of copying on average).
    fn reserve(&mut self, need: usize) {
        if need <= self.cap {
            return;
        }
        let cap = need.max(self.cap * 2).max(16);
        let (old, len, hd) = (self.cap, self.len, self.hd);
        let size = self.batch * self.nkv * cap * hd;
        // Both buffers are runs of `len` filled values every `old` (keys: per dimension; values:
        // `hd` wide per position, so runs of `len * hd` every `old * hd`).
        let regrow = |buf: &[f32], run: usize, old: usize, new: usize| {
            let mut out = vec![0f32; size];
            if len > 0 {
                for (dst, src) in out.chunks_mut(new).zip(buf.chunks(old)) {
                    dst[..run].copy_from_slice(&src[..run]);
                }
            }
            out
        };
        self.kt = regrow(&self.kt, len, old, cap);
        self.v = regrow(&self.v, len * hd, old * hd, cap * hd);
        self.cap = cap;
    }

    /// Sequences held.
    pub(super) fn batch(&self) -> usize {
        self.batch
    }

    /// Append `seq` positions of `[batch, nkv, seq, hd]` keys and values.
    pub(super) fn append(&mut self, k: &[f32], v: &[f32], seq: usize) {
        self.reserve(self.len + seq);
        let (hd, cap, len) = (self.hd, self.cap, self.len);
        for (dst, src) in self.kt.chunks_mut(cap * hd).zip(k.chunks(seq * hd)) {
            for (t, kt) in src.chunks(hd).enumerate() {
                for (d, &x) in kt.iter().enumerate() {
                    dst[d * cap + len + t] = x;
                }
            }
        }
        for (dst, src) in self.v.chunks_mut(cap * hd).zip(v.chunks(seq * hd)) {
            dst[len * hd..(len + seq) * hd].copy_from_slice(src);
        }
        self.len += seq;
    }

    /// Attention of one new position per sequence (the last one appended) over every cached
    /// position, read in place: `q` is `[batch, heads, hd]` (RoPE applied), `kv_of[h]` query
    /// head `h`'s KV head; returns `[batch, heads * hd]`.
    pub(super) fn attend(&self, q: &[f32], kv_of: &[usize]) -> Vec<f32> {
        crate::kernels::decode_attention(q, &self.kt, &self.v, kv_of, (self.cap, self.len, self.hd))
    }

    /// Every cached position as `[batch, nkv, len, hd]` tensors (a copy).
    fn tensors(&self, device: &Device) -> (Tensor<4>, Tensor<4>) {
        let (hd, len, cap) = (self.hd, self.len, self.cap);
        let n = self.batch * self.nkv * len * hd;
        let (mut k, mut v) = (Vec::with_capacity(n), Vec::with_capacity(n));
        for (kt, vs) in self.kt.chunks(cap * hd).zip(self.v.chunks(cap * hd)) {
            for t in 0..len {
                k.extend((0..hd).map(|d| kt[d * cap + t]));
            }
            v.extend_from_slice(&vs[..len * hd]);
        }
        let dims = [self.batch, self.nkv, len, hd];
        (
            Tensor::from_data(TensorData::new(k, dims), device),
            Tensor::from_data(TensorData::new(v, dims), device),
        )
    }
}

impl LayerKv {
    /// Append new positions' keys and values (`[batch, nkv, seq, hd]`, RoPE applied) and
    /// return the keys and values of every position for attention through tensors; `None` when
    /// the caller should take [`LayerKv::decode`] instead (host buffers and one new position).
    pub(crate) fn append(&mut self, k: Tensor<4>, v: Tensor<4>) -> Option<(Tensor<4>, Tensor<4>)> {
        let [batch, nkv, seq, hd] = k.dims();
        let device = k.device();
        match std::mem::take(self) {
            LayerKv::Empty if crate::backend::is_flex(&device) => {
                let mut h = HostKv {
                    kt: Vec::new(),
                    v: Vec::new(),
                    batch,
                    nkv,
                    hd,
                    cap: 0,
                    len: 0,
                };
                h.append(&host_values(k.clone()), &host_values(v.clone()), seq);
                *self = LayerKv::Host(h);
                (seq > 1).then_some((k, v))
            }
            LayerKv::Empty => {
                *self = LayerKv::Tensors(k.clone(), v.clone());
                Some((k, v))
            }
            LayerKv::Host(mut h) => {
                assert!(
                    (h.batch, h.nkv, h.hd) == (batch, nkv, hd),
                    "KV cache of [{}, {}, _, {}] appended [{batch}, {nkv}, {seq}, {hd}]",
                    h.batch,
                    h.nkv,
                    h.hd
                );
                h.append(&host_values(k), &host_values(v), seq);
                let full = (seq > 1).then(|| h.tensors(&device));
                *self = LayerKv::Host(h);
                full
            }
            LayerKv::Tensors(pk, pv) => {
                let (k, v) = (Tensor::cat(vec![pk, k], 2), Tensor::cat(vec![pv, v], 2));
                *self = LayerKv::Tensors(k.clone(), v.clone());
                Some((k, v))
            }
        }
    }

    /// Attention of one new position per sequence over the host buffers: `q` is `[batch,
    /// heads, 1, hd]` (RoPE applied), `kv_of[h]` query head `h`'s KV head; returns `[batch,
    /// heads * hd]`. Only after [`LayerKv::append`] returned `None`.
    pub(crate) fn decode(&self, q: Tensor<4>, kv_of: &[usize]) -> Tensor<2> {
        let LayerKv::Host(h) = self else {
            unreachable!("decode without host buffers: append returned the tensors")
        };
        let [batch, heads, seq, hd] = q.dims();
        assert_eq!(seq, 1, "decode attends one new position");
        let device = q.device();
        let out = h.attend(&host_values(q), kv_of);
        Tensor::from_data(TensorData::new(out, [batch, heads * hd]), &device)
    }
}
