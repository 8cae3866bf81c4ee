//! What a device keeps between rounds: its kept-index maps, the adapter it last trained and
//! its importance EMA. A session holds it and shares it with the job it starts.

use protocol::KeptIndices;

use crate::lora::HostFactors;
use crate::model::Llama;
use crate::prune::{Importance, KeptIndicesExt};

/// What a device remembers between rounds (persisted whole by `join --state`, see
/// [`crate::state_dir`]).
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct DeviceState {
    pub kept: KeptIndices,
    /// The adapter the device last trained (rank, alpha, factors in wire orientation).
    pub adapter: Option<(usize, f64, Vec<HostFactors>)>,
    /// The importance EMA over the kept units (sliced with `kept`), continued by every round.
    pub importance: Importance,
}

impl DeviceState {
    pub fn fresh(base: &Llama) -> Self {
        DeviceState {
            kept: KeptIndices::dense(&base.config),
            adapter: None,
            importance: Importance::default(),
        }
    }
}
