//! [`HeldModel`]: the model a device holds, its frozen base sliced to its kept maps. A round
//! takes it over and prunes it in place, so a device never keeps the dense base resident
//! beside its pruned model.

use protocol::KeptIndices;

use super::{block_within, narrow, slice_model, KeptIndicesExt, PruneError};
use crate::model::Llama;

/// A model together with the kept maps it is sliced to (read against the dense dims its config
/// carries). The constructors check that the two agree.
#[derive(Debug, Clone)]
pub struct HeldModel {
    model: Llama,
    kept: KeptIndices,
}

impl HeldModel {
    /// Take over `model`, which must already be sliced to `kept`.
    pub fn new(model: Llama, kept: KeptIndices) -> Result<Self, PruneError> {
        kept.validate(&model.config)?;
        if kept.shapes(&model.config) != model.config.blocks {
            return Err(PruneError::NotHeld);
        }
        Ok(HeldModel { model, kept })
    }

    /// Take over an unpruned model.
    pub fn dense(model: Llama) -> Result<Self, PruneError> {
        let kept = KeptIndices::dense(&model.config);
        Self::new(model, kept)
    }

    /// A copy of `base` (dense) sliced to `kept`; the base stays as it is.
    pub fn sliced(base: &Llama, kept: &KeptIndices) -> Result<Self, PruneError> {
        Ok(HeldModel {
            model: slice_model(base, kept)?,
            kept: kept.clone(),
        })
    }

    pub fn model(&self) -> &Llama {
        &self.model
    }

    pub fn kept(&self) -> &KeptIndices {
        &self.kept
    }

    /// Whether every unit `kept` names is still held (so [`HeldModel::narrow_to`] can reach it).
    pub fn covers(&self, kept: &KeptIndices) -> bool {
        kept.blocks.len() == self.kept.blocks.len()
            && kept
                .blocks
                .iter()
                .zip(&self.kept.blocks)
                .all(|(k, h)| block_within(k, h))
    }

    /// Prune the held model in place down to `kept` (a subset of what it holds).
    pub fn narrow_to(&mut self, kept: &KeptIndices) -> Result<(), PruneError> {
        narrow(&mut self.model, &self.kept, kept)?;
        self.kept = kept.clone();
        Ok(())
    }

    /// A model and kept maps whose agreement the caller keeps (a [`crate::train::Tuner`]).
    pub(crate) fn from_parts(model: Llama, kept: KeptIndices) -> Self {
        HeldModel { model, kept }
    }

    /// The model and its kept maps.
    pub fn into_parts(self) -> (Llama, KeptIndices) {
        (self.model, self.kept)
    }
}

#[cfg(test)]
mod tests {
    use burn::tensor::Device;
    use protocol::BlockKept;

    use super::*;
    use crate::model::{to_rows, ModelConfig};

    fn base() -> Llama {
        let mut c = ModelConfig::dense(50, 32, 3, 4, 2, 8, 64, true);
        c.max_seq_len = 32;
        Llama::random(c, 3, &Device::flex())
    }

    /// Kept maps that drop query heads `heads` (a KV head goes with both of its readers) and
    /// every `every`-th MLP channel, in block 1 only.
    fn pruned(base: &Llama, heads: &[u32], every: u32) -> KeptIndices {
        let mut kept = KeptIndices::dense(&base.config);
        let b: &mut BlockKept = &mut kept.blocks[1];
        b.query_heads.retain(|h| !heads.contains(h));
        b.kv_heads = b.query_heads.iter().map(|&h| h / 2).collect();
        b.kv_heads.dedup();
        b.mlp_channels.retain(|c| c % every != 0);
        kept
    }

    fn weights(m: &Llama) -> Vec<Vec<f32>> {
        m.blocks
            .iter()
            .flat_map(|b| [&b.wq, &b.wk, &b.wv, &b.wo, &b.w_gate, &b.w_up, &b.w_down])
            .map(|w| w.to_data().try_to_vec::<f32>().unwrap())
            .collect()
    }

    #[test]
    fn pruning_in_place_in_steps_equals_slicing_the_dense_base() {
        let base = base();
        let wide = pruned(&base, &[1], 3);
        let mut narrow = pruned(&base, &[0, 1], 3);
        narrow.blocks[1].mlp_channels.retain(|c| c % 2 != 0);
        let mut held = HeldModel::dense(base.clone()).unwrap();
        held.narrow_to(&wide).unwrap();
        held.narrow_to(&narrow).unwrap();
        let direct = slice_model(&base, &narrow).unwrap();
        assert_eq!(held.kept(), &narrow);
        assert_eq!(held.model().config, direct.config);
        assert_eq!(weights(held.model()), weights(&direct));
        let t = base.tokens_tensor(&[vec![1, 2, 3, 4, 5, 6]]);
        assert_eq!(
            to_rows(held.model().forward(t.clone(), None)),
            to_rows(direct.forward(t, None))
        );
    }

    #[test]
    fn a_unit_already_pruned_cannot_come_back_and_the_model_is_left_as_it_was() {
        let base = base();
        let wide = pruned(&base, &[1], 3);
        let mut held = HeldModel::sliced(&base, &wide).unwrap();
        let before = weights(held.model());
        // Channel 3 went in `wide`; asking for the dense maps names it again.
        let dense = KeptIndices::dense(&base.config);
        assert!(!held.covers(&dense));
        let err = held.narrow_to(&dense).unwrap_err();
        assert_eq!(
            err.to_string(),
            "block 1: head 1 is not among the units the model still holds"
        );
        assert_eq!(held.kept(), &wide);
        assert_eq!(weights(held.model()), before);
        // Maps that disagree with the model's shapes are refused outright.
        let err = HeldModel::new(base.clone(), wide.clone()).unwrap_err();
        assert!(matches!(err, PruneError::NotHeld), "{err}");
        assert!(held.covers(&pruned(&base, &[0, 1], 3)));
    }
}
