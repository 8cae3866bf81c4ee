//! The evaluation panel: a fixed, seeded set of devices stratified by profile whose models
//! (their kept maps with the current global adapter) are evaluated every few rounds, and the
//! larger final set evaluated at the end.

use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;

use super::{ms_to_s, Simulation, VDev};
use crate::compute::Quality;
use crate::error::SimError;
use crate::hardware::DeviceProfile;
use crate::report::EvalRecord;

impl Simulation<'_> {
    /// Quality of each of `devices`' models (its kept maps) with the global adapter.
    pub(super) fn evaluate_devices(
        &mut self,
        devices: &[usize],
    ) -> Result<Vec<(usize, Quality)>, SimError> {
        let global = self.coordinator.global().clone();
        let alpha = self.cfg.coordinator.lora_alpha;
        let mut out = Vec::with_capacity(devices.len());
        for &i in devices {
            let state = self.devices[i].session.state().clone();
            let kept = state.kept.clone();
            let slice = global
                .global_slice(&kept, global.rank, alpha)
                .map_err(|e| {
                    SimError::Coordinator(format!("cannot slice the global adapter: {e}"))
                })?;
            let q = self
                .trainer
                .evaluate(i, &state, &slice)
                .map_err(SimError::Model)?;
            out.push((i, q));
        }
        Ok(out)
    }

    /// The panel's mean quality after `round`.
    pub(super) fn evaluate_panel(&mut self, round: u64) -> Result<EvalRecord, SimError> {
        let panel = self.panel.clone();
        let q = self.evaluate_devices(&panel)?;
        let n = q.len().max(1) as f64;
        let loss = q.iter().map(|(_, x)| x.loss).sum::<f64>() / n;
        let accuracy = q.iter().map(|(_, x)| x.accuracy).sum::<f64>() / n;
        let perplexity = q
            .iter()
            .all(|(_, x)| x.perplexity.is_some())
            .then(|| q.iter().filter_map(|(_, x)| x.perplexity).sum::<f64>() / n);
        Ok(EvalRecord {
            round,
            time_s: ms_to_s(self.now.0),
            loss,
            accuracy,
            perplexity,
            devices: q.len(),
        })
    }
}

/// `n` devices (all when `n == 0` or `n >= len`), stratified by profile and seeded.
pub(super) fn choose_devices(
    devices: &[VDev],
    profiles: &[DeviceProfile],
    n: usize,
    seed: u64,
) -> Vec<usize> {
    if n == 0 || n >= devices.len() {
        return (0..devices.len()).collect();
    }
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let mut groups: Vec<Vec<usize>> = vec![Vec::new(); profiles.len()];
    for (i, d) in devices.iter().enumerate() {
        groups[d.profile].push(i);
    }
    for g in &mut groups {
        rand::seq::SliceRandom::shuffle(g.as_mut_slice(), &mut rng);
    }
    // Round-robin over groups, so every class is represented.
    let mut out = Vec::with_capacity(n);
    let mut k = 0;
    while out.len() < n {
        for g in &groups {
            if out.len() < n && k < g.len() {
                out.push(g[k]);
            }
        }
        k += 1;
    }
    out.sort_unstable();
    out
}
