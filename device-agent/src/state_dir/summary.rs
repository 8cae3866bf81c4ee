//! A state directory's contents as JSON (`device-agent state`): no model needed.

use std::path::Path;

use super::{describe, inspect, kept_digest, state_file, StateError};
use crate::prune::KeptIndicesExt;

/// The state file in `dir` summarised: device, base model and its fingerprint, the kept maps'
/// digest, sparsity, adapter, last round (with `with_kept`, the kept maps themselves). Kept maps
/// that do not fit the model the file names are an error that says so.
pub fn summary(dir: &Path, with_kept: bool) -> Result<serde_json::Value, StateError> {
    let (fingerprint, saved) = inspect(dir)?;
    let kept = &saved.device.kept;
    let file = state_file(dir);
    kept.validate(&saved.model)
        .map_err(|e| StateError::Invalid {
            path: file.clone(),
            detail: format!("kept maps do not fit the model it names: {e}"),
        })?;
    let mut pruned = saved.model.clone();
    pruned.blocks = kept.shapes(&saved.model);
    let last = saved.last_round.as_ref().map(|l| {
        serde_json::json!({
            "round": l.round.0, "status": l.status.to_string(), "unacknowledged_update": l.unacked.is_some(),
            "loss_pre": l.stats.loss_pre, "loss_post": l.stats.loss_post, "sparsity": l.stats.sparsity,
        })
    });
    let adapter = saved.device.adapter.as_ref();
    let mut out = serde_json::json!({
        "file": file.display().to_string(),
        "device_id": saved.device_id,
        "model": describe(&saved.model),
        "model_fingerprint": fingerprint.hex(),
        "kept_digest": kept_digest(kept),
        "sparsity": pruned.sparsity(),
        "non_embedding_params": pruned.non_embedding_params(),
        "adapter": adapter.map(|(rank, alpha, _)| serde_json::json!({"rank": rank, "alpha": alpha})),
        "last_round": last,
    });
    if with_kept {
        out["kept"] = serde_json::to_value(kept).map_err(|e| StateError::Encode {
            path: file.clone(),
            detail: e.to_string(),
        })?;
    }
    Ok(out)
}
