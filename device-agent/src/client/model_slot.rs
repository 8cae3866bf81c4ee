//! The one model a `join` agent holds between rounds: its base sliced to its kept maps
//! ([`HeldModel`]). A round borrows it ([`ModelSlot::lease`]), prunes it in place and hands it
//! back, so the dense base is resident only while the agent starts. When a round failed after
//! pruning (a cancelled round keeps the state's older, wider maps), the slot no longer covers
//! the state and the dense base is read again from its file, checked to be the same model.

use std::sync::{Condvar, Mutex, MutexGuard};

use protocol::KeptIndices;

use crate::model::Llama;
use crate::prune::HeldModel;
use crate::state_dir::Fingerprint;

/// Reads the dense base again from where the agent first loaded it.
pub(super) type Reload = Box<dyn Fn() -> Result<Llama, String> + Send + Sync>;

/// The agent's model, shared between the driver and the thread that runs its rounds.
pub(super) struct ModelSlot {
    inner: Mutex<Slot>,
    returned: Condvar,
    reload: Reload,
    /// The dense base's identity, checked on every reload.
    fingerprint: Fingerprint,
}

struct Slot {
    model: Option<HeldModel>,
    /// A round holds the model (an earlier, cancelled round may still be finishing its step).
    leased: bool,
}

/// The model lent to one round; back in the slot when dropped, whatever happened.
pub(super) struct Lease<'a> {
    slot: &'a ModelSlot,
    model: Option<HeldModel>,
}

impl ModelSlot {
    /// Hold `base` (dense, the model `reload` reads) sliced to `kept`: the dense blocks are
    /// replaced in place, and freed, as they are sliced.
    pub(super) fn new(base: Llama, kept: &KeptIndices, reload: Reload) -> Result<Self, String> {
        let fingerprint = Fingerprint::of(&base);
        let held = hold(base, kept)?;
        let c = &held.model().config;
        tracing::info!(
            sparsity = c.sparsity(),
            params = c.total_params(),
            weights_mib = (c.total_params() * 4) >> 20,
            "holding the device's model (the dense base is not kept)"
        );
        Ok(ModelSlot {
            inner: Mutex::new(Slot {
                model: Some(held),
                leased: false,
            }),
            returned: Condvar::new(),
            reload,
            fingerprint,
        })
    }

    fn lock(&self) -> MutexGuard<'_, Slot> {
        // A round that panicked leaves the slot as its lease's drop put it: usable.
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Borrow the model, sliced to `kept`, for one round; waits for a round still holding it.
    pub(super) fn lease(&self, kept: &KeptIndices) -> Result<Lease<'_>, String> {
        let mut slot = self.lock();
        while slot.leased {
            slot = self.returned.wait(slot).unwrap_or_else(|p| p.into_inner());
        }
        slot.leased = true;
        let model = slot.model.take();
        drop(slot);
        // From here on the lease hands back whatever it holds, reload failure or not.
        let mut lease = Lease { slot: self, model };
        if !lease.model.as_ref().is_some_and(|m| m.covers(kept)) {
            // Free the narrower model before the dense base comes in.
            lease.model = None;
            tracing::warn!(
                "the held model was pruned past the device's saved kept maps (a round failed after pruning): reading the base again"
            );
            let base = (self.reload)()?;
            if Fingerprint::of(&base) != self.fingerprint {
                return Err(
                    "the base model file changed since the agent started: restart the agent".into(),
                );
            }
            lease.model = Some(hold(base, kept)?);
        }
        lease
            .model
            .as_mut()
            .expect("a lease holds a model here")
            .narrow_to(kept)
            .map_err(|e| format!("slicing the held model to the device's kept maps: {e}"))?;
        Ok(lease)
    }
}

impl Lease<'_> {
    /// The model, for [`crate::job::run_job`].
    pub(super) fn take(&mut self) -> HeldModel {
        self.model.take().expect("a lease is taken once")
    }

    /// Give back the model the round left.
    pub(super) fn put(&mut self, model: HeldModel) {
        self.model = Some(model);
    }
}

impl Drop for Lease<'_> {
    fn drop(&mut self) {
        let mut slot = self.slot.lock();
        slot.model = self.model.take();
        slot.leased = false;
        drop(slot);
        self.slot.returned.notify_all();
    }
}

/// `base` (dense) narrowed in place to `kept`.
fn hold(base: Llama, kept: &KeptIndices) -> Result<HeldModel, String> {
    let mut held = HeldModel::dense(base).map_err(|e| format!("the base model: {e}"))?;
    held.narrow_to(kept)
        .map_err(|e| format!("slicing the base to the device's kept maps: {e}"))?;
    Ok(held)
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;

    use burn::tensor::Device;

    use super::*;
    use crate::client::tiny_model;
    use crate::prune::KeptIndicesExt;

    /// Kept maps without MLP channels below `cut` in block 0.
    fn kept_from(base: &Llama, cut: u32) -> KeptIndices {
        let mut k = KeptIndices::dense(&base.config);
        k.blocks[0].mlp_channels.retain(|&c| c >= cut);
        k
    }

    /// A slot over the tiny model whose reload reads `reloaded(seed)` and counts its calls.
    fn slot(
        kept: &KeptIndices,
        reload_seed: Arc<AtomicUsize>,
        reloads: Arc<AtomicUsize>,
    ) -> ModelSlot {
        let base = tiny_model(&Device::flex());
        let reload: Reload = Box::new(move || {
            reloads.fetch_add(1, Ordering::SeqCst);
            let mut m = tiny_model(&Device::flex());
            if reload_seed.load(Ordering::SeqCst) != 7 {
                m = Llama::random(m.config.clone(), 8, &Device::flex());
            }
            Ok(m)
        });
        ModelSlot::new(base, kept, reload).unwrap()
    }

    #[test]
    fn a_round_narrows_the_held_model_and_only_a_model_pruned_too_far_is_read_again() {
        let base = tiny_model(&Device::flex());
        let (seed, reloads) = (Arc::new(AtomicUsize::new(7)), Arc::new(AtomicUsize::new(0)));
        let s = slot(&kept_from(&base, 8), seed.clone(), reloads.clone());
        // Narrower maps than held: sliced in place, nothing read.
        let mut lease = s.lease(&kept_from(&base, 16)).unwrap();
        let m = lease.take();
        assert_eq!(m.kept(), &kept_from(&base, 16));
        // The round pruned further, then failed: the state still says channels 16.. .
        let mut m = m;
        m.narrow_to(&kept_from(&base, 24)).unwrap();
        lease.put(m);
        drop(lease);
        assert_eq!(reloads.load(Ordering::SeqCst), 0);
        let mut lease = s.lease(&kept_from(&base, 16)).unwrap();
        assert_eq!(reloads.load(Ordering::SeqCst), 1);
        let m = lease.take();
        assert_eq!(m.kept(), &kept_from(&base, 16));
        let want = crate::prune::slice_model(&base, &kept_from(&base, 16)).unwrap();
        let w = |m: &Llama| m.blocks[0].w_up.to_data().try_to_vec::<f32>().unwrap();
        assert_eq!(w(m.model()), w(&want));
        lease.put(m);
    }

    #[test]
    fn another_base_file_is_refused_and_the_slot_stays_usable() {
        let base = tiny_model(&Device::flex());
        let (seed, reloads) = (Arc::new(AtomicUsize::new(7)), Arc::new(AtomicUsize::new(0)));
        let s = slot(&kept_from(&base, 8), seed.clone(), reloads.clone());
        // Wider maps than held need the base again; the file now holds other weights.
        seed.store(8, Ordering::SeqCst);
        let err = s.lease(&kept_from(&base, 0)).err().unwrap();
        assert!(err.contains("the base model file changed"), "{err}");
        // The failed lease handed the slot back: the next one reads the right base again.
        seed.store(7, Ordering::SeqCst);
        let mut lease = s.lease(&kept_from(&base, 0)).unwrap();
        assert_eq!(lease.take().kept(), &kept_from(&base, 0));
        assert_eq!(reloads.load(Ordering::SeqCst), 2);
    }
}
