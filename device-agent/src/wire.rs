//! Conversions between the device agent's types and the wire vocabulary of the `protocol`
//! crate: adapter factors (PyTorch orientation on the wire) and model dims. Projections and
//! kept-index maps need none: the agent uses [`protocol::Proj`] and [`protocol::KeptIndices`].

use protocol::{AdapterPayload, LayerAdapter, ModelDims, Tensor2};

use crate::lora::HostFactors;
use crate::model::ModelConfig;

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

/// Host factors -> wire payload (optionally half precision).
pub fn adapter_to_wire(
    rank: usize,
    alpha: f64,
    factors: Vec<HostFactors>,
    f16: bool,
) -> AdapterPayload {
    let p = AdapterPayload {
        rank: rank as u32,
        alpha: alpha as f32,
        layers: factors
            .into_iter()
            .map(|f| LayerAdapter {
                block: f.block as u32,
                proj: f.proj,
                a: Tensor2::f32(rank as u32, f.cols_in as u32, f.a),
                b: Tensor2::f32(f.rows_out as u32, rank as u32, f.b),
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
            proj: l.proj,
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
    use crate::prune::KeptIndicesExt;
    use burn::tensor::Device;
    use protocol::{BlockKept, KeptIndices};

    #[test]
    fn adapters_round_trip_and_kept_maps_validate_on_both_sides() {
        let c = ModelConfig::dense(30, 16, 2, 4, 2, 4, 24, true);
        let mut k = KeptIndices::dense(&c);
        k.blocks[1] = BlockKept {
            query_heads: vec![2, 3],
            kv_heads: vec![1],
            mlp_channels: vec![0, 5, 7],
        };
        k.validate(&c).unwrap();
        let ad = Adapter::new(&c, 3, 6.0, 1, &Device::flex());
        let host = ad.to_host();
        let back = adapter_from_wire(&adapter_to_wire(3, 6.0, host.clone(), false));
        assert_eq!(back, host);
        let dims = dims_of(&c);
        protocol::validate_kept(&dims, &k).unwrap();
    }
}
