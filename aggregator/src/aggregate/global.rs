//! The global adapter: effective LoRA factors of every layer in full model coordinates, its
//! LoRA initialisation, and the slice cut from it for one device (kept maps, rank, scale).

use protocol::{
    validate_kept, AdapterPayload, GlobalSlice, KeptIndices, LayerAdapter, LayerIndexMap,
    ModelDims, Proj, Tensor2, ValidationError,
};
use rand::Rng;
use serde::{Deserialize, Serialize};

use super::error::AggregateError;

/// Full-coordinate effective factors of one layer (`dW = b @ a`, scale folded in).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct GlobalLayer {
    pub block: u32,
    pub proj: Proj,
    /// `[rank, in_full]`, row-major.
    pub a: Vec<f32>,
    /// `[out_full, rank]`, row-major.
    pub b: Vec<f32>,
}

/// The global adapter: effective factors of every layer in full coordinates, in canonical order
/// (block-major, then [`Proj::ALL`]).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct GlobalAdapter {
    pub dims: ModelDims,
    pub rank: u32,
    pub layers: Vec<GlobalLayer>,
}

/// Index of layer `(block, proj)` in canonical order.
pub(super) fn layer_slot(block: u32, proj: Proj) -> usize {
    block as usize * Proj::ALL.len() + proj.index()
}

pub(super) fn slot_layer(slot: usize) -> (u32, Proj) {
    (
        (slot / Proj::ALL.len()) as u32,
        Proj::ALL[slot % Proj::ALL.len()],
    )
}

impl GlobalAdapter {
    /// An all-zero adapter of `rank`.
    pub fn zeros(dims: ModelDims, rank: u32) -> GlobalAdapter {
        let r = rank as usize;
        let layers = (0..dims.n_layers())
            .map(|slot| {
                let (block, proj) = slot_layer(slot);
                let (out, inp) = dims.full_shape(proj);
                GlobalLayer {
                    block,
                    proj,
                    a: vec![0.0; r * inp],
                    b: vec![0.0; out * r],
                }
            })
            .collect();
        GlobalAdapter { dims, rank, layers }
    }

    /// The standard LoRA start: `A` uniform in `±1/sqrt(in)` (Kaiming-uniform with `a = √5`),
    /// `B = 0`, stored as effective factors for `alpha`, so a device of rank `rank` receives
    /// exactly the drawn `A`.
    pub fn init_lora(dims: ModelDims, rank: u32, alpha: f32, rng: &mut impl Rng) -> GlobalAdapter {
        let mut g = GlobalAdapter::zeros(dims, rank);
        let sqrt_s = (alpha as f64 / rank.max(1) as f64).sqrt();
        for layer in &mut g.layers {
            let (_, inp) = dims.full_shape(layer.proj);
            let bound = 1.0 / (inp as f64).sqrt();
            for x in &mut layer.a {
                *x = (rng.random_range(-bound..bound) * sqrt_s) as f32;
            }
        }
        g
    }

    /// The layer `(block, proj)`. Panics if `block` is outside the model.
    pub fn layer(&self, block: u32, proj: Proj) -> &GlobalLayer {
        &self.layers[layer_slot(block, proj)]
    }

    /// The dense delta `b @ a` of a layer, `[out_full, in_full]` row-major. Panics if `block` is
    /// outside the model or the adapter is not well formed.
    pub fn delta(&self, block: u32, proj: Proj) -> Vec<f32> {
        let l = self.layer(block, proj);
        let (out, inp) = self.dims.full_shape(proj);
        let r = self.rank as usize;
        let mut d = vec![0.0f32; out * inp];
        for o in 0..out {
            for i in 0..r {
                let bo = l.b[o * r + i];
                if bo != 0.0 {
                    let row = &mut d[o * inp..(o + 1) * inp];
                    for (x, &av) in row.iter_mut().zip(&l.a[i * inp..(i + 1) * inp]) {
                        *x += bo * av;
                    }
                }
            }
        }
        d
    }

    /// The same adapter at another rank: truncated, or zero-padded.
    pub fn with_rank(&self, rank: u32) -> GlobalAdapter {
        if rank == self.rank {
            return self.clone();
        }
        let (r0, r1) = (self.rank as usize, rank as usize);
        let keep = r0.min(r1);
        let layers = self
            .layers
            .iter()
            .map(|l| {
                let (out, inp) = self.dims.full_shape(l.proj);
                let mut a = vec![0.0; r1 * inp];
                a[..keep * inp].copy_from_slice(&l.a[..keep * inp]);
                let mut b = vec![0.0; out * r1];
                for o in 0..out {
                    b[o * r1..o * r1 + keep].copy_from_slice(&l.b[o * r0..o * r0 + keep]);
                }
                GlobalLayer {
                    block: l.block,
                    proj: l.proj,
                    a,
                    b,
                }
            })
            .collect();
        GlobalAdapter {
            dims: self.dims,
            rank,
            layers,
        }
    }

    /// Whether every value of every layer is finite (checked before an aggregate replaces the
    /// global adapter, and on restore).
    pub fn is_finite(&self) -> bool {
        self.layers
            .iter()
            .all(|l| l.a.iter().chain(&l.b).all(|x| x.is_finite()))
    }

    /// Checks that the adapter's layers and buffers match its dimensions and rank (for state
    /// restored from disk).
    pub fn is_well_formed(&self) -> bool {
        let r = self.rank as usize;
        self.dims.is_consistent()
            && self.layers.len() == self.dims.n_layers()
            && self.layers.iter().enumerate().all(|(slot, l)| {
                let (out, inp) = self.dims.full_shape(l.proj);
                (l.block, l.proj) == slot_layer(slot)
                    && l.a.len() == r * inp
                    && l.b.len() == out * r
            })
    }

    /// Cuts the adapter for a device: its kept indices, its `rank` (truncating, or zero-padding
    /// components the global adapter does not have) and its scale `alpha / rank`. Returns the
    /// payload and the number of filled (non-padding) components.
    pub fn slice_for(
        &self,
        kept: &KeptIndices,
        rank: u32,
        alpha: f32,
    ) -> Result<(AdapterPayload, u32), AggregateError> {
        if !self.is_well_formed() {
            return Err(AggregateError::MalformedGlobal);
        }
        validate_kept(&self.dims, kept)?;
        if rank == 0 {
            return Err(ValidationError::Rank {
                rank,
                max: u32::MAX,
            }
            .into());
        }
        if !(alpha.is_finite() && alpha > 0.0) {
            return Err(ValidationError::Alpha(alpha).into());
        }
        let r = rank as usize;
        let rg = self.rank as usize;
        let filled = r.min(rg);
        let inv_sqrt_s = (rank as f64 / alpha as f64).sqrt() as f32;
        let mut map = LayerIndexMap::default();
        let layers = self
            .layers
            .iter()
            .map(|l| {
                let (_, in_full) = self.dims.full_shape(l.proj);
                map.fill(&self.dims, l.proj, &kept.blocks[l.block as usize]);
                let (out_k, in_k) = (map.rows.len(), map.cols.len());
                let mut a = vec![0.0f32; r * in_k];
                for i in 0..filled {
                    let src = &l.a[i * in_full..(i + 1) * in_full];
                    for (dst, &c) in a[i * in_k..(i + 1) * in_k].iter_mut().zip(&map.cols) {
                        *dst = src[c as usize] * inv_sqrt_s;
                    }
                }
                let mut b = vec![0.0f32; out_k * r];
                for (ol, &o) in map.rows.iter().enumerate() {
                    let src = &l.b[o as usize * rg..o as usize * rg + filled];
                    for (dst, &v) in b[ol * r..ol * r + filled].iter_mut().zip(src) {
                        *dst = v * inv_sqrt_s;
                    }
                }
                LayerAdapter {
                    block: l.block,
                    proj: l.proj,
                    a: Tensor2::f32(rank, in_k as u32, a),
                    b: Tensor2::f32(out_k as u32, rank, b),
                }
            })
            .collect();
        Ok((
            AdapterPayload {
                rank,
                alpha,
                layers,
            },
            filled as u32,
        ))
    }
}

impl GlobalAdapter {
    /// [`GlobalAdapter::slice_for`] packaged as the [`GlobalSlice`] of a round configuration.
    pub fn global_slice(
        &self,
        kept: &KeptIndices,
        rank: u32,
        alpha: f32,
    ) -> Result<GlobalSlice, AggregateError> {
        let (adapter, filled_rank) = self.slice_for(kept, rank, alpha)?;
        Ok(GlobalSlice {
            adapter,
            kept: kept.clone(),
            filled_rank,
        })
    }
}

/// An all-zero layer at `slot` of rank `rank` (the previous value of a layer without one).
pub(super) fn zero_layer(dims: &ModelDims, slot: usize, rank: u32) -> GlobalLayer {
    let (block, proj) = slot_layer(slot);
    let (out, inp) = dims.full_shape(proj);
    GlobalLayer {
        block,
        proj,
        a: vec![0.0; rank as usize * inp],
        b: vec![0.0; out * rank as usize],
    }
}
