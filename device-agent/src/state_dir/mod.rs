//! The device's state on disk: `device-agent join --state DIR` keeps `DIR/device-state.bin`, and
//! `generate`, `eval` and `export --state DIR` use the model it describes.
//!
//! The file holds a [`SavedState`]: the session's whole [`DeviceState`] (kept-index maps,
//! adapter, and whatever else a device carries between rounds: it is written by its serde
//! derive, so a field added to it travels without a change here; bump [`SCHEMA_VERSION`] when
//! it changes), the device id, the base model's dense config, and the last round's result
//! ([`LastRound`]: round, the statistics the update reported, whether it was uploaded,
//! acknowledged or refused, and while unacknowledged the update itself, so a restarted agent
//! answers a configuration re-sent for that round with it instead of training the round twice).
//! The container ([`file`]) has a versioned header, the base model's [`Fingerprint`] and a
//! SHA-256 checksum, and is replaced atomically.
//!
//! A file that is corrupt, truncated, of another format or schema version, written for another
//! base model or another device is an error naming the file and what is wrong; nothing here
//! replaces it with a dense start. [`keeper::StateKeeper::open`] moves it aside only when the
//! user asks for a fresh start.
//!
//! The model of a state directory ([`tuned_model`]) is the base sliced to the kept maps plus
//! the device's own last-trained adapter: the adapter trained while the device pruned to
//! exactly those maps (a global slice was cut for the aggregator's older record of them, and
//! the slice of the last round's aggregate never reaches the device), which started that round
//! from the federation's global slice and is what the device uploaded.

pub mod file;
pub mod keeper;
pub mod summary;

use std::fmt;
use std::path::{Path, PathBuf};

use burn::tensor::Tensor;
use protocol::{RoundId, UpdateStats};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::lora::Adapter;
use crate::model::{Llama, ModelConfig};
use crate::prune::{self, KeptIndicesExt};
use crate::session::{DeviceState, UnackedUpdate};

/// The state file inside a state directory.
pub const STATE_FILE: &str = "device-state.bin";
/// Version of [`SavedState`]'s encoding; bump it whenever `SavedState`, [`DeviceState`] or a
/// type they hold changes (bincode is not self-describing). 2: `DeviceState` carries the
/// importance EMA.
pub const SCHEMA_VERSION: u32 = 2;

/// Why a state directory could not be read, written or used. Every variant names the file.
#[derive(Debug, thiserror::Error)]
pub enum StateError {
    #[error("device state {path}: {op} failed: {source}")]
    Io {
        path: PathBuf,
        op: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error("device state {path} is not a FedSpine device state file (bad magic)")]
    NotAStateFile { path: PathBuf },
    #[error("device state {path} has container format version {found}; this build reads version {expected}")]
    FormatVersion {
        path: PathBuf,
        found: u32,
        expected: u32,
    },
    #[error("device state {path} holds state schema {found}; this build reads schema {expected} (written by another version of the agent)")]
    Schema {
        path: PathBuf,
        found: u32,
        expected: u32,
    },
    #[error("device state {path} is truncated: {expected} bytes expected, {actual} present")]
    Truncated {
        path: PathBuf,
        expected: u64,
        actual: u64,
    },
    #[error("device state {path} has {extra} unexpected bytes after its body")]
    TrailingBytes { path: PathBuf, extra: u64 },
    #[error("device state {path} declares a {len}-byte body, over the {max}-byte limit")]
    TooLarge { path: PathBuf, len: u64, max: u64 },
    #[error("device state {path} is corrupt: checksum mismatch")]
    Checksum { path: PathBuf },
    #[error("device state {path}: cannot decode the state: {detail}")]
    Decode { path: PathBuf, detail: String },
    #[error("device state {path}: cannot encode the state: {detail}")]
    Encode { path: PathBuf, detail: String },
    #[error("device state {path} belongs to another base model: it was written for {saved} (fingerprint {saved_fingerprint}), this model is {held} (fingerprint {held_fingerprint})")]
    WrongModel {
        path: PathBuf,
        saved: String,
        saved_fingerprint: String,
        held: String,
        held_fingerprint: String,
    },
    #[error("device state {path} belongs to device {found}, not to device {expected}")]
    WrongDevice {
        path: PathBuf,
        found: u64,
        expected: u64,
    },
    #[error("device state {path} is invalid: {detail}")]
    Invalid { path: PathBuf, detail: String },
    #[error(
        "device state {path}: no state file (has `device-agent join --state` written one there?)"
    )]
    Missing { path: PathBuf },
    #[error("device state directory {path} is not a directory")]
    NotADirectory { path: PathBuf },
    #[error("device state directory is in use: {path} is locked by another running agent")]
    InUse { path: PathBuf },
    #[error("device state {path} is not a regular file but {kind}: refusing to read it")]
    NotAFile { path: PathBuf, kind: &'static str },
    #[error("device state directory {path} is writable by every user (mode {mode:o}): anyone could plant a state in it; make it the owner's alone (chmod 700)")]
    OpenDirectory { path: PathBuf, mode: u32 },
}

/// SHA-256 identity of a base model: its dense config and a sample of every weight tensor (the
/// first and last row of each matrix, every norm vector), so another checkpoint, another
/// precision of the same one, or another architecture all differ.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Fingerprint(pub [u8; 32]);

impl Fingerprint {
    /// The fingerprint of a dense base model.
    pub fn of(base: &Llama) -> Fingerprint {
        let mut h = Sha256::new();
        h.update(b"fedspine base model v1\n");
        h.update(
            serde_json::to_vec(&base.config)
                .expect("a model config is plain numbers and serialises"),
        );
        let mut rows = |t: &Tensor<2>| {
            let [n, cols] = t.dims();
            h.update((n as u64).to_le_bytes());
            h.update((cols as u64).to_le_bytes());
            for r in [0, n.saturating_sub(1)] {
                if n > 0 {
                    for v in host(t.clone().narrow(0, r, 1).reshape([cols])) {
                        h.update(v.to_bits().to_le_bytes());
                    }
                }
            }
        };
        rows(&base.embed);
        for b in &base.blocks {
            for w in [&b.wq, &b.wk, &b.wv, &b.wo, &b.w_gate, &b.w_up, &b.w_down] {
                rows(w);
            }
        }
        if let Some(head) = &base.lm_head {
            rows(head);
        }
        let mut vector = |t: &Tensor<1>| {
            for v in host(t.clone()) {
                h.update(v.to_bits().to_le_bytes());
            }
        };
        for b in &base.blocks {
            vector(&b.attn_norm);
            vector(&b.ffn_norm);
        }
        vector(&base.norm);
        Fingerprint(h.finalize().into())
    }

    /// Lower-case hex of all 32 bytes.
    pub fn hex(&self) -> String {
        self.0.iter().map(|b| format!("{b:02x}")).collect()
    }
}

impl fmt::Display for Fingerprint {
    /// The first 16 hex digits.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.hex()[..16])
    }
}

fn host(t: Tensor<1>) -> Vec<f32> {
    t.into_data()
        .convert::<f32>()
        .try_to_vec()
        .expect("converted to f32 on the line above")
}

/// A model config in a few words, for error messages.
pub fn describe(c: &ModelConfig) -> String {
    format!(
        "{} blocks, d_model {}, {}/{} heads of {}, FFN {}, vocabulary {}",
        c.n_layers(),
        c.d_model,
        c.n_heads,
        c.n_kv_heads,
        c.head_dim,
        c.ffn_dim,
        c.vocab_size
    )
}

/// How the last round ended, as far as the device knows.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum RoundStatus {
    /// Trained and saved; the update was not yet handed to the transport.
    Trained,
    /// The update was written to the aggregator's stream (not yet acknowledged).
    Uploaded,
    /// The aggregator acknowledged the update.
    Acknowledged,
    /// The aggregator refused the update (the reason it gave).
    Refused(String),
}

impl fmt::Display for RoundStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            RoundStatus::Trained => f.write_str("trained"),
            RoundStatus::Uploaded => f.write_str("uploaded"),
            RoundStatus::Acknowledged => f.write_str("acknowledged"),
            RoundStatus::Refused(why) => write!(f, "refused: {why}"),
        }
    }
}

/// The last round the device trained.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct LastRound {
    pub round: RoundId,
    /// What the update reported.
    pub stats: UpdateStats,
    pub status: RoundStatus,
    /// The update while the aggregator has neither acknowledged nor refused it.
    pub unacked: Option<UnackedUpdate>,
}

/// Everything in a state file's body.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct SavedState {
    pub device_id: u64,
    /// The dense base model's config (the fingerprint in the header identifies its weights).
    pub model: ModelConfig,
    pub device: DeviceState,
    pub last_round: Option<LastRound>,
}

/// The state file of directory `dir`.
pub fn state_file(dir: &Path) -> PathBuf {
    dir.join(STATE_FILE)
}

/// A short SHA-256 digest of kept-index maps (of their JSON form), for logs and comparisons.
pub fn kept_digest(kept: &protocol::KeptIndices) -> String {
    let json = serde_json::to_vec(kept).expect("kept maps are plain integers and serialise");
    Sha256::digest(json)[..8]
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// The state file at `path`, its model config checked ([`ModelConfig::check`]: what describes
/// and sizes it before any model is compared).
fn read_saved(path: &Path) -> Result<(Fingerprint, SavedState), StateError> {
    let (fingerprint, saved): (Fingerprint, SavedState) = file::read(path, SCHEMA_VERSION)?;
    saved.model.check().map_err(|e| StateError::Invalid {
        path: path.to_path_buf(),
        detail: format!("model config: {e}"),
    })?;
    Ok((fingerprint, saved))
}

/// Reads and verifies `dir`'s state file without a model: its fingerprint and body (for
/// `device-agent state`). The body's maps are not checked against a model.
pub fn inspect(dir: &Path) -> Result<(Fingerprint, SavedState), StateError> {
    let path = state_file(dir);
    match std::fs::symlink_metadata(&path) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Err(StateError::Missing { path })
        }
        Err(e) => return Err(file::io_err(&path, "stat")(e)),
        Ok(_) => {}
    }
    read_saved(&path)
}

/// Reads `dir`'s state file for `base`: `Ok(None)` when there is none; an error when it cannot
/// be read, belongs to another model, or its maps or adapter do not fit `base`.
pub fn load(dir: &Path, base: &Llama) -> Result<Option<SavedState>, StateError> {
    let path = state_file(dir);
    match std::fs::symlink_metadata(&path) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(file::io_err(&path, "stat")(e)),
        Ok(_) => {}
    }
    let (fingerprint, saved) = read_saved(&path)?;
    let held = Fingerprint::of(base);
    if fingerprint != held {
        return Err(StateError::WrongModel {
            path,
            saved: describe(&saved.model),
            saved_fingerprint: fingerprint.to_string(),
            held: describe(&base.config),
            held_fingerprint: held.to_string(),
        });
    }
    check(&path, &saved, base)?;
    Ok(Some(saved))
}

/// The saved maps, adapter and importance history against the base, and the unacknowledged
/// update against them (the checksum guards against corruption; this guards against a file
/// that is well-formed but does not fit).
fn check(path: &Path, saved: &SavedState, base: &Llama) -> Result<(), StateError> {
    let invalid = |detail: String| StateError::Invalid {
        path: path.to_path_buf(),
        detail,
    };
    let kept = &saved.device.kept;
    kept.validate(&base.config)
        .map_err(|e| invalid(format!("kept maps: {e}")))?;
    adapter_of(&saved.device, base).map_err(invalid)?;
    saved
        .device
        .importance
        .check(kept)
        .map_err(|e| invalid(format!("importance history: {e}")))?;
    if let Some(last) = &saved.last_round {
        if let Some(u) = &last.unacked {
            if u.update.round != last.round {
                return Err(invalid(format!(
                    "the unacknowledged update is for {}, the last round is {}",
                    u.update.round, last.round
                )));
            }
            // It was sent with the maps the device then kept, which are the saved ones: a
            // resent update must not report maps the device does not hold.
            if u.update.kept != *kept {
                return Err(invalid(
                    "the unacknowledged update's kept maps differ from the device's".into(),
                ));
            }
        }
    }
    Ok(())
}

/// The device's adapter on the pruned shape of its kept maps, checked (shapes, finiteness,
/// rank and alpha); `None` before its first round.
fn adapter_of(state: &DeviceState, base: &Llama) -> Result<Option<Adapter>, String> {
    let Some((rank, alpha, factors)) = &state.adapter else {
        return Ok(None);
    };
    if *rank == 0 || *rank > 4096 {
        return Err(format!("adapter rank {rank} is not in [1, 4096]"));
    }
    if !(alpha.is_finite() && *alpha > 0.0) {
        return Err(format!("adapter alpha {alpha} is not finite and positive"));
    }
    let mut cfg = base.config.clone();
    cfg.blocks = state.kept.shapes(&base.config);
    Adapter::from_host(&cfg, *rank, *alpha, factors, &base.device)
        .map(Some)
        .map_err(|e| format!("adapter: {e}"))
}

/// What federation produced on this device, from `dir` and the dense `base` it was written for:
/// the base pruned in place to the saved kept maps (no dense copy stays resident) and the
/// device's last-trained adapter (`None` before its first round), with the saved state.
pub fn tuned_model(
    dir: &Path,
    base: Llama,
) -> Result<(Llama, Option<Adapter>, SavedState), StateError> {
    let path = state_file(dir);
    let saved = load(dir, &base)?.ok_or(StateError::Missing { path: path.clone() })?;
    let adapter = adapter_of(&saved.device, &base).map_err(|detail| StateError::Invalid {
        path: path.clone(),
        detail,
    })?;
    let held = prune::HeldModel::dense(base)
        .and_then(|mut held| held.narrow_to(&saved.device.kept).map(|()| held))
        .map_err(|e| StateError::Invalid {
            path,
            detail: format!("kept maps: {e}"),
        })?;
    let (model, _) = held.into_parts();
    Ok((model, adapter, saved))
}

#[cfg(test)]
mod tests;
