//! Conversions between the device agent's types and the wire vocabulary of the `protocol`
//! crate: kept-index maps, adapter factors (PyTorch orientation on the wire) and model dims.

use protocol::{AdapterPayload, KeptIndices, LayerAdapter, ModelDims, Tensor2};

use crate::lora::HostFactors;
use crate::model::{ModelConfig, Proj};
use crate::prune::{BlockKept, KeptMaps};

/// Wire projection for a model projection (same order).
pub fn proj_to_wire(p: Proj) -> protocol::Proj {
    protocol::Proj::ALL[p.index()]
}

/// Model projection for a wire projection.
pub fn proj_from_wire(p: protocol::Proj) -> Proj {
    Proj::ALL[p.index()]
}

/// Dims of the dense model.
pub fn dims_of(cfg: &ModelConfig) -> ModelDims {
    ModelDims {
        n_blocks: cfg.n_layers() as u32,
        d_model: cfg.d_model as u32,
        n_heads: cfg.n_heads as u32,
        n_kv_heads: cfg.n_kv_heads as u32,
        head_dim: cfg.head_dim as u32,
        ffn: cfg.ffn_dim as u32,
    }
}

pub fn kept_to_wire(k: &KeptMaps) -> KeptIndices {
    let v = |x: &[usize]| x.iter().map(|&i| i as u32).collect();
    KeptIndices {
        blocks: k
            .blocks
            .iter()
            .map(|b| protocol::BlockKept {
                query_heads: v(&b.heads),
                kv_heads: v(&b.kv_heads),
                mlp_channels: v(&b.channels),
            })
            .collect(),
    }
}

pub fn kept_from_wire(k: &KeptIndices) -> KeptMaps {
    let v = |x: &[u32]| x.iter().map(|&i| i as usize).collect();
    KeptMaps {
        blocks: k
            .blocks
            .iter()
            .map(|b| BlockKept {
                heads: v(&b.query_heads),
                kv_heads: v(&b.kv_heads),
                channels: v(&b.mlp_channels),
            })
            .collect(),
    }
}

/// Host factors -> wire payload (optionally half precision).
pub fn adapter_to_wire(
    rank: usize,
    alpha: f64,
    factors: &[HostFactors],
    f16: bool,
) -> AdapterPayload {
    let p = AdapterPayload {
        rank: rank as u32,
        alpha: alpha as f32,
        layers: factors
            .iter()
            .map(|f| LayerAdapter {
                block: f.block as u32,
                proj: proj_to_wire(f.proj),
                a: Tensor2::f32(rank as u32, f.cols_in as u32, f.a.clone()),
                b: Tensor2::f32(f.rows_out as u32, rank as u32, f.b.clone()),
            })
            .collect(),
    };
    if f16 {
        p.to_f16()
    } else {
        p
    }
}

/// Wire payload -> host factors (f16 buffers are widened).
pub fn adapter_from_wire(p: &AdapterPayload) -> Vec<HostFactors> {
    p.layers
        .iter()
        .map(|l| HostFactors {
            block: l.block as usize,
            proj: proj_from_wire(l.proj),
            a: l.a.data.to_f32_vec(),
            b: l.b.data.to_f32_vec(),
            rows_out: l.b.rows as usize,
            cols_in: l.a.cols as usize,
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::lora::Adapter;
    use burn::tensor::Device;

    #[test]
    fn kept_maps_and_adapters_round_trip_through_the_wire() {
        let c = ModelConfig::dense(30, 16, 2, 4, 2, 4, 24, true);
        let mut k = KeptMaps::dense(&c);
        k.blocks[1] = BlockKept {
            heads: vec![2, 3],
            kv_heads: vec![1],
            channels: vec![0, 5, 7],
        };
        assert_eq!(kept_from_wire(&kept_to_wire(&k)), k);
        let ad = Adapter::new(&c, 3, 6.0, 1, &Device::flex());
        let host = ad.to_host();
        let back = adapter_from_wire(&adapter_to_wire(3, 6.0, &host, false));
        assert_eq!(back, host);
        let dims = dims_of(&c);
        protocol::validate_kept(&dims, &kept_to_wire(&k)).unwrap();
    }
}
