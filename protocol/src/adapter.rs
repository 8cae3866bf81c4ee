//! Adapter payloads on plain buffers: model dimensions, LoRA factors per projection, kept-index
//! maps of a pruned device, and the mapping from a device's local rows/columns to full coordinates.
//!
//! # Conventions
//! - A projection's weight is `W` in `[out, in]` orientation (as in the checkpoint).
//! - The LoRA delta is `dW = scale * B @ A` with `scale = alpha / rank`,
//!   `A` is `[rank, in]` and `B` is `[out, rank]`, both row-major.
//! - Under structured pruning exactly one side of each projection shrinks; the other side is
//!   always `d_model` (see [`Proj::pruned_side`]).

use std::fmt;

use bincode::{Decode, Encode};
use half::f16;
use serde::{Deserialize, Serialize};

/// Full (unpruned) dimensions of a LLaMA-family decoder, as far as adapters are concerned.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize, Encode, Decode)]
pub struct ModelDims {
    pub n_blocks: u32,
    pub d_model: u32,
    pub n_heads: u32,
    pub n_kv_heads: u32,
    pub head_dim: u32,
    pub ffn: u32,
}

impl ModelDims {
    /// SmolLM2-135M: 30 blocks, d_model 576, 9 query heads, 3 KV heads, head_dim 64, FFN 1536.
    pub const SMOLLM2_135M: ModelDims = ModelDims {
        n_blocks: 30,
        d_model: 576,
        n_heads: 9,
        n_kv_heads: 3,
        head_dim: 64,
        ffn: 1536,
    };

    /// Whether the dimensions are usable: all positive, query heads a multiple of KV heads, and
    /// the attention width `n_heads * head_dim` a `u32` (the type of a full-model index).
    // `u32::is_multiple_of` needs Rust 1.87; the workspace supports 1.85.
    #[allow(clippy::manual_is_multiple_of)]
    pub fn is_consistent(&self) -> bool {
        self.n_blocks > 0
            && self.d_model > 0
            && self.n_heads > 0
            && self.n_kv_heads > 0
            && self.head_dim > 0
            && self.ffn > 0
            && self.n_heads % self.n_kv_heads == 0
            && self.n_heads.checked_mul(self.head_dim).is_some()
    }

    /// Query heads that share one KV head.
    pub fn group_size(&self) -> u32 {
        self.n_heads / self.n_kv_heads.max(1)
    }

    /// The KV head that query head `query_head` reads.
    pub fn kv_head_of(&self, query_head: u32) -> u32 {
        query_head / self.group_size().max(1)
    }

    /// Full `(out, in)` of a projection's weight.
    pub fn full_shape(&self, proj: Proj) -> (usize, usize) {
        let d = self.d_model as usize;
        let q = self.n_heads as usize * self.head_dim as usize;
        let kv = self.n_kv_heads as usize * self.head_dim as usize;
        let f = self.ffn as usize;
        match proj {
            Proj::Q => (q, d),
            Proj::K | Proj::V => (kv, d),
            Proj::O => (d, q),
            Proj::Gate | Proj::Up => (f, d),
            Proj::Down => (d, f),
        }
    }

    /// Number of adapted layers of a full model (seven projections per block).
    pub fn n_layers(&self) -> usize {
        self.n_blocks as usize * Proj::ALL.len()
    }
}

/// The seven adapted projections of a LLaMA block.
#[derive(
    Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize, Encode, Decode,
)]
pub enum Proj {
    Q,
    K,
    V,
    O,
    Gate,
    Up,
    Down,
}

/// Which side of a projection's `[out, in]` weight structured pruning shrinks.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Side {
    /// Output rows (`B`'s rows) are pruned; `A`'s columns are the full `d_model`.
    Rows,
    /// Input columns (`A`'s columns) are pruned; `B`'s rows are the full `d_model`.
    Cols,
}

impl Proj {
    /// All projections in canonical order.
    pub const ALL: [Proj; 7] = [
        Proj::Q,
        Proj::K,
        Proj::V,
        Proj::O,
        Proj::Gate,
        Proj::Up,
        Proj::Down,
    ];

    /// Position in [`Proj::ALL`].
    pub fn index(self) -> usize {
        match self {
            Proj::Q => 0,
            Proj::K => 1,
            Proj::V => 2,
            Proj::O => 3,
            Proj::Gate => 4,
            Proj::Up => 5,
            Proj::Down => 6,
        }
    }

    /// The checkpoint-style short name (`q`, `k`, `v`, `o`, `gate`, `up`, `down`).
    pub fn name(self) -> &'static str {
        match self {
            Proj::Q => "q",
            Proj::K => "k",
            Proj::V => "v",
            Proj::O => "o",
            Proj::Gate => "gate",
            Proj::Up => "up",
            Proj::Down => "down",
        }
    }

    /// The side that pruning shrinks: q, k, v, gate and up lose output rows; o and down lose
    /// input columns.
    pub fn pruned_side(self) -> Side {
        match self {
            Proj::O | Proj::Down => Side::Cols,
            _ => Side::Rows,
        }
    }
}

impl fmt::Display for Proj {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// A flat row-major buffer, either `f32` or IEEE half precision stored as raw `u16` bits. Its
/// wire form is written and read in bulk (`buffer_codec.rs`), byte-identical to the derive's.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum Buffer {
    F32(Vec<f32>),
    F16(Vec<u16>),
}

impl Buffer {
    /// Number of elements.
    pub fn len(&self) -> usize {
        match self {
            Buffer::F32(v) => v.len(),
            Buffer::F16(v) => v.len(),
        }
    }

    /// Whether the buffer holds no element.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The values as `f32` (a copy for `F16`, a clone for `F32`).
    pub fn to_f32_vec(&self) -> Vec<f32> {
        match self {
            Buffer::F32(v) => v.clone(),
            Buffer::F16(v) => v
                .iter()
                .map(|&bits| f16::from_bits(bits).to_f32())
                .collect(),
        }
    }

    /// The values as `f32`, consuming the buffer (no copy for `F32`).
    pub fn into_f32_vec(self) -> Vec<f32> {
        match self {
            Buffer::F32(v) => v,
            other => other.to_f32_vec(),
        }
    }

    /// Element `i` as `f32`.
    pub fn get_f32(&self, i: usize) -> f32 {
        match self {
            Buffer::F32(v) => v[i],
            Buffer::F16(v) => f16::from_bits(v[i]).to_f32(),
        }
    }

    /// The same values rounded to half precision (values beyond the f16 range become infinite,
    /// which validation then refuses).
    pub fn to_f16(&self) -> Buffer {
        match self {
            Buffer::F32(v) => Buffer::F16(v.iter().map(|&x| f16::from_f32(x).to_bits()).collect()),
            Buffer::F16(v) => Buffer::F16(v.clone()),
        }
    }

    /// Whether every element is finite (neither NaN nor infinite).
    pub fn all_finite(&self) -> bool {
        match self {
            Buffer::F32(v) => v.iter().all(|x| x.is_finite()),
            // An f16 is non-finite exactly when its five exponent bits are all ones.
            Buffer::F16(v) => v.iter().all(|&bits| bits & 0x7C00 != 0x7C00),
        }
    }

    /// Sum of squares in `f64`.
    pub fn sum_sq(&self) -> f64 {
        match self {
            Buffer::F32(v) => v.iter().map(|&x| (x as f64) * (x as f64)).sum(),
            Buffer::F16(v) => v
                .iter()
                .map(|&bits| {
                    let x = f16::from_bits(bits).to_f64();
                    x * x
                })
                .sum(),
        }
    }

    /// Bytes the values occupy (not counting framing).
    pub fn byte_len(&self) -> usize {
        match self {
            Buffer::F32(v) => v.len() * 4,
            Buffer::F16(v) => v.len() * 2,
        }
    }
}

/// A row-major matrix on a plain buffer.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, Encode, Decode)]
pub struct Tensor2 {
    pub rows: u32,
    pub cols: u32,
    pub data: Buffer,
}

impl Tensor2 {
    /// A matrix of `f32` values; `data.len()` should be `rows * cols` (validation checks it).
    pub fn f32(rows: u32, cols: u32, data: Vec<f32>) -> Tensor2 {
        Tensor2 {
            rows,
            cols,
            data: Buffer::F32(data),
        }
    }

    /// An all-zero `f32` matrix.
    pub fn zeros(rows: u32, cols: u32) -> Tensor2 {
        Tensor2::f32(rows, cols, vec![0.0; rows as usize * cols as usize])
    }

    /// `rows * cols` as `usize`.
    pub fn numel(&self) -> usize {
        self.rows as usize * self.cols as usize
    }

    /// Element `(r, c)` as `f32`.
    pub fn get(&self, r: usize, c: usize) -> f32 {
        self.data.get_f32(r * self.cols as usize + c)
    }

    /// Frobenius norm.
    pub fn frobenius(&self) -> f64 {
        self.data.sum_sq().sqrt()
    }

    /// The same matrix with half-precision storage.
    pub fn to_f16(&self) -> Tensor2 {
        Tensor2 {
            rows: self.rows,
            cols: self.cols,
            data: self.data.to_f16(),
        }
    }

    /// The same matrix with `f32` storage.
    pub fn to_f32(&self) -> Tensor2 {
        Tensor2::f32(self.rows, self.cols, self.data.to_f32_vec())
    }
}

/// LoRA factors of one projection of one block, in the device's local (pruned) coordinates.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, Encode, Decode)]
pub struct LayerAdapter {
    pub block: u32,
    pub proj: Proj,
    /// `[rank, in_kept]`.
    pub a: Tensor2,
    /// `[out_kept, rank]`.
    pub b: Tensor2,
}

/// A whole LoRA adapter: one [`LayerAdapter`] per adapted projection, shared rank and alpha.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, Encode, Decode)]
pub struct AdapterPayload {
    pub rank: u32,
    pub alpha: f32,
    pub layers: Vec<LayerAdapter>,
}

impl AdapterPayload {
    /// `alpha / rank` (0 for rank 0).
    pub fn scale(&self) -> f64 {
        if self.rank == 0 {
            0.0
        } else {
            self.alpha as f64 / self.rank as f64
        }
    }

    /// The same adapter with half-precision buffers (optional wire encoding).
    pub fn to_f16(&self) -> AdapterPayload {
        self.map_tensors(Tensor2::to_f16)
    }

    /// The same adapter with `f32` buffers.
    pub fn to_f32(&self) -> AdapterPayload {
        self.map_tensors(Tensor2::to_f32)
    }

    /// Number of adapter parameters (elements of all factors).
    pub fn param_count(&self) -> usize {
        self.layers.iter().map(|l| l.a.numel() + l.b.numel()).sum()
    }

    /// Bytes of factor data (not counting framing).
    pub fn byte_len(&self) -> usize {
        self.layers
            .iter()
            .map(|l| l.a.data.byte_len() + l.b.data.byte_len())
            .sum()
    }

    fn map_tensors(&self, f: impl Fn(&Tensor2) -> Tensor2) -> AdapterPayload {
        AdapterPayload {
            rank: self.rank,
            alpha: self.alpha,
            layers: self
                .layers
                .iter()
                .map(|l| LayerAdapter {
                    block: l.block,
                    proj: l.proj,
                    a: f(&l.a),
                    b: f(&l.b),
                })
                .collect(),
        }
    }
}

/// What a device kept of one block, as sorted indices into the full model. The device agent
/// uses this type for its own kept maps too (there is one vocabulary for kept units).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, Encode, Decode)]
pub struct BlockKept {
    /// Kept query heads, strictly increasing, each `< n_heads`.
    // The alias reads the device agent's `adapter.json` files written before the agent used
    // this type (serde only; the bincode wire format has no field names).
    #[serde(alias = "heads")]
    pub query_heads: Vec<u32>,
    /// Kept KV heads: exactly the KV heads read by a kept query head, strictly increasing.
    pub kv_heads: Vec<u32>,
    /// Kept MLP intermediate channels, strictly increasing, each `< ffn`.
    #[serde(alias = "channels")]
    pub mlp_channels: Vec<u32>,
}

impl BlockKept {
    /// An unpruned block.
    pub fn full(dims: &ModelDims) -> BlockKept {
        BlockKept {
            query_heads: (0..dims.n_heads).collect(),
            kv_heads: (0..dims.n_kv_heads).collect(),
            mlp_channels: (0..dims.ffn).collect(),
        }
    }
}

/// Kept-index maps of a (possibly pruned) device model, one entry per block.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, Encode, Decode)]
pub struct KeptIndices {
    pub blocks: Vec<BlockKept>,
}

impl KeptIndices {
    /// Non-embedding sparsity of the model these maps keep: one minus its parameters (each
    /// block's two norms, four attention and three MLP projections at the kept head and channel
    /// counts, plus the final norm) over the dense model's. The same integers and the same
    /// division as the device agent's `ModelConfig::sparsity` of the pruned config, so the
    /// same bits: the aggregator derives a device's sparsity from the maps it sends instead of
    /// taking the figure it reports.
    pub fn non_embedding_sparsity(&self, dims: &ModelDims) -> f64 {
        let (d, hd) = (dims.d_model as u64, dims.head_dim as u64);
        let block = |h: u64, kv: u64, f: u64| 2 * d + d * h * hd * 2 + d * kv * hd * 2 + 3 * d * f;
        let kept: u64 = self
            .blocks
            .iter()
            .map(|b| {
                block(
                    b.query_heads.len() as u64,
                    b.kv_heads.len() as u64,
                    b.mlp_channels.len() as u64,
                )
            })
            .sum::<u64>()
            + d;
        let dense = self.blocks.len() as u64
            * block(dims.n_heads as u64, dims.n_kv_heads as u64, dims.ffn as u64)
            + d;
        1.0 - kept as f64 / dense as f64
    }

    /// An unpruned model.
    pub fn full(dims: &ModelDims) -> KeptIndices {
        KeptIndices {
            blocks: (0..dims.n_blocks).map(|_| BlockKept::full(dims)).collect(),
        }
    }
}

/// Full-model coordinates of a pruned layer's local rows and columns.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct LayerIndexMap {
    /// `rows[i]` is the full output row of local row `i`.
    pub rows: Vec<u32>,
    /// `cols[j]` is the full input column of local column `j`.
    pub cols: Vec<u32>,
}

/// Where a pruned projection's local rows (`B`'s rows) and columns (`A`'s columns) sit in the
/// full model: q rows = kept query heads x head_dim, k/v rows = kept KV heads x head_dim,
/// o columns = kept query heads x head_dim, gate/up rows and down columns = kept channels;
/// the other side is the full `d_model`.
pub fn layer_index_map(dims: &ModelDims, proj: Proj, kept: &BlockKept) -> LayerIndexMap {
    let mut map = LayerIndexMap::default();
    map.fill(dims, proj, kept);
    map
}

impl LayerIndexMap {
    /// Make this [`layer_index_map`]`(dims, proj, kept)`, reusing its buffers: a caller that
    /// maps every layer of an adapter allocates once, not twice per layer.
    pub fn fill(&mut self, dims: &ModelDims, proj: Proj, kept: &BlockKept) {
        fn full(v: &mut Vec<u32>, dims: &ModelDims) {
            v.extend(0..dims.d_model);
        }
        fn heads(v: &mut Vec<u32>, heads: &[u32], head_dim: u32) {
            v.extend(heads.iter().flat_map(|&h| h * head_dim..(h + 1) * head_dim));
        }
        self.rows.clear();
        self.cols.clear();
        let hd = dims.head_dim;
        match proj {
            Proj::Q => {
                heads(&mut self.rows, &kept.query_heads, hd);
                full(&mut self.cols, dims);
            }
            Proj::K | Proj::V => {
                heads(&mut self.rows, &kept.kv_heads, hd);
                full(&mut self.cols, dims);
            }
            Proj::O => {
                full(&mut self.rows, dims);
                heads(&mut self.cols, &kept.query_heads, hd);
            }
            Proj::Gate | Proj::Up => {
                self.rows.extend_from_slice(&kept.mlp_channels);
                full(&mut self.cols, dims);
            }
            Proj::Down => {
                full(&mut self.rows, dims);
                self.cols.extend_from_slice(&kept.mlp_channels);
            }
        }
    }
}

/// Local `(out, in)` of a pruned projection.
pub fn kept_shape(dims: &ModelDims, proj: Proj, kept: &BlockKept) -> (usize, usize) {
    let d = dims.d_model as usize;
    let hd = dims.head_dim as usize;
    match proj {
        Proj::Q => (kept.query_heads.len() * hd, d),
        Proj::K | Proj::V => (kept.kv_heads.len() * hd, d),
        Proj::O => (d, kept.query_heads.len() * hd),
        Proj::Gate | Proj::Up => (kept.mlp_channels.len(), d),
        Proj::Down => (d, kept.mlp_channels.len()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn smollm2_full_shapes() {
        let d = ModelDims::SMOLLM2_135M;
        let shapes: Vec<_> = Proj::ALL.iter().map(|&p| d.full_shape(p)).collect();
        assert_eq!(
            shapes,
            vec![
                (576, 576),
                (192, 576),
                (192, 576),
                (576, 576),
                (1536, 576),
                (1536, 576),
                (576, 1536)
            ]
        );
        assert_eq!(d.kv_head_of(2), 0);
        assert_eq!(d.kv_head_of(3), 1);
        assert_eq!(d.kv_head_of(8), 2);
    }

    #[test]
    fn dims_whose_attention_width_overflows_u32_are_inconsistent() {
        // Found by the decode_validate fuzz target: a welcome whose head_dim times n_heads
        // overflows u32 passed validation, then computing a shape overflowed.
        let dims = ModelDims {
            n_blocks: 1,
            d_model: 8,
            n_heads: 2,
            n_kv_heads: 2,
            head_dim: 0x8000_0002,
            ffn: 6,
        };
        assert!(!dims.is_consistent());
        assert_eq!(dims.full_shape(Proj::Q), (0x1_0000_0004, 8));
        let widest = ModelDims {
            n_heads: 1,
            n_kv_heads: 1,
            head_dim: u32::MAX,
            ..dims
        };
        assert!(widest.is_consistent());
        assert_eq!(widest.full_shape(Proj::O), (8, u32::MAX as usize));
    }

    #[test]
    fn index_map_follows_kept_heads_and_channels() {
        let dims = ModelDims {
            n_blocks: 1,
            d_model: 4,
            n_heads: 4,
            n_kv_heads: 2,
            head_dim: 2,
            ffn: 6,
        };
        let kept = BlockKept {
            query_heads: vec![1, 3],
            kv_heads: vec![0, 1],
            mlp_channels: vec![0, 4, 5],
        };
        let q = layer_index_map(&dims, Proj::Q, &kept);
        assert_eq!(q.rows, vec![2, 3, 6, 7]);
        assert_eq!(q.cols, vec![0, 1, 2, 3]);
        let o = layer_index_map(&dims, Proj::O, &kept);
        assert_eq!(o.cols, vec![2, 3, 6, 7]);
        assert_eq!(o.rows.len(), 4);
        let down = layer_index_map(&dims, Proj::Down, &kept);
        assert_eq!(down.cols, vec![0, 4, 5]);
        let mut reused = layer_index_map(&dims, Proj::Down, &kept);
        for p in Proj::ALL {
            let m = layer_index_map(&dims, p, &kept);
            assert_eq!(kept_shape(&dims, p, &kept), (m.rows.len(), m.cols.len()));
            // A map refilled for another projection is that projection's map.
            reused.fill(&dims, p, &kept);
            assert_eq!(reused, m);
        }
    }

    #[test]
    fn f16_round_trip_and_finiteness() {
        let b = Buffer::F32(vec![1.0, -0.5, 0.099975586, 65504.0]);
        let h = b.to_f16();
        assert_eq!(h.to_f32_vec(), vec![1.0, -0.5, 0.099975586, 65504.0]);
        assert!(h.all_finite());
        let overflow = Buffer::F32(vec![1.0e6]).to_f16();
        assert!(!overflow.all_finite());
        assert!(!Buffer::F32(vec![f32::NAN]).all_finite());
    }
}
