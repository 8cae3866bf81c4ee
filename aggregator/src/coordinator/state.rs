//! The coordinator's persistent state: what a checkpoint holds and `restore` resumes from.
//!
//! Everything learned lives here: the global adapter, one bandit per device (policy and
//! feasibility filter), each device's last reported kept-index maps and sparsity, the round
//! counter, the generator's exact position and the run's counters. Connections and an open
//! round are not part of it: a restored coordinator has no device connected and starts the
//! round after the last closed one when devices join again.
//!
//! Bandit states are stored as JSON text inside the state (the bandit crate's policies use
//! internally tagged enums, which only self-describing formats can read back); JSON with
//! `float_roundtrip` restores them bit-identically whatever the outer encoding.
//!
//! Schemas: 3 (this build) added the `updates_screened_out` counter; 2 added each device's class
//! to its capabilities and its self-pruned rank limit (`rank_limit`, HetLoRA). A schema-2
//! checkpoint ([`CoordinatorStateV2`]) resumes with no update screened out so far; a schema-1
//! one ([`CoordinatorStateV1`]) too, every device in it of class `unknown` until it joins
//! again.

use std::collections::BTreeMap;

use protocol::{Capabilities, DeviceId, KeptIndices, ModelDims, RoundId};
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

use super::summary::Counters;
use crate::aggregate::GlobalAdapter;
use crate::strategy::DeviceBandit;

/// Schema version of [`CoordinatorState`] in checkpoints; bump it on any change to the
/// state's shape (and keep reading the previous ones, see [`CoordinatorStateV2`]).
pub const STATE_SCHEMA: u32 = 3;
/// The schema before the `updates_screened_out` counter: [`CoordinatorStateV2`].
pub const STATE_SCHEMA_V2: u32 = 2;
/// The schema before device classes: [`CoordinatorStateV1`].
pub const STATE_SCHEMA_V1: u32 = 1;

/// A registered device as the coordinator remembers it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct DeviceRecord {
    pub id: DeviceId,
    /// What the device said in its last join, its class included (`Capabilities::class`).
    pub capabilities: Capabilities,
    /// The device's bandit: its policy and what its feasibility filter learned.
    #[serde(with = "json_text")]
    pub bandit: DeviceBandit,
    /// Kept-index maps of the device's last accepted update (`None`: unpruned so far).
    pub kept: Option<KeptIndices>,
    /// Sparsity of the device's last accepted update.
    pub sparsity: f64,
    /// The rank the device last self-pruned to (an accepted update below the rank it was
    /// sent), under a strategy with rank self-pruning (`hetlora`): its later rounds are sent
    /// at most this rank. `None`: it never self-pruned.
    pub rank_limit: Option<u32>,
    pub rounds_selected: u64,
    pub rounds_completed: u64,
    pub rounds_failed: u64,
    pub rounds_missed: u64,
}

/// Everything a restarted coordinator needs.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct CoordinatorState {
    /// The model the run is for.
    pub dims: ModelDims,
    /// Strategy name of the run (a checkpoint is refused by another strategy).
    pub strategy: String,
    /// The last round that closed (0 before the first).
    pub round: RoundId,
    pub global: GlobalAdapter,
    /// Registered devices by ascending id.
    pub devices: Vec<DeviceRecord>,
    /// The bandits' generator (the `policy` stream) exactly where the run left it; the other
    /// streams are read by position from the config's seed and need no saving.
    pub rng: ChaCha8Rng,
    pub counters: Counters,
}

impl CoordinatorState {
    /// SHA-256 (hex) of the devices' bandit states in JSON: equal digests mean equal learned
    /// arm choices. Used to show which state a resumed run continues from.
    pub fn bandit_digest(&self) -> String {
        use sha2::{Digest, Sha256};
        let mut hasher = Sha256::new();
        for d in &self.devices {
            hasher.update(d.id.0.to_le_bytes());
            // Serialising plain data to a string cannot fail.
            let text = serde_json::to_string(&d.bandit).unwrap_or_default();
            hasher.update((text.len() as u64).to_le_bytes());
            hasher.update(text.as_bytes());
        }
        hasher
            .finalize()
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect()
    }
}

/// A schema-2 checkpoint: [`CoordinatorState`] before the `updates_screened_out` counter
/// (bincode is not self-describing, so the old shape is spelled out to read old files).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct CoordinatorStateV2 {
    pub dims: ModelDims,
    pub strategy: String,
    pub round: RoundId,
    pub global: GlobalAdapter,
    pub devices: Vec<DeviceRecord>,
    pub rng: ChaCha8Rng,
    pub counters: CountersV2,
}

/// Schema-1 and schema-2 [`Counters`]: every field but `updates_screened_out`, in order.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct CountersV2 {
    pub connections: u64,
    pub disconnects: u64,
    pub joins: u64,
    pub rounds_started: u64,
    pub rounds_aggregated: u64,
    pub rounds_abandoned: u64,
    pub updates_accepted: u64,
    pub round_failures: u64,
    pub out_of_memory: u64,
    pub missed: u64,
    pub no_feasible_arm: u64,
    pub heartbeats: u64,
    pub bytes_received: u64,
    pub bandit_errors: u64,
    pub aggregation_errors: u64,
    pub rejects: BTreeMap<String, u64>,
    pub non_finite_aggregates: u64,
    pub samples_clipped: u64,
}

/// Moves the counters between the schemas: forward with no update screened out; back (what a
/// schema-2 build wrote, for migration tests) dropping the screening count.
macro_rules! counters_between {
    ($from:ty => $to:ident { $($extra:ident: $value:expr),* }) => {
        impl From<$from> for $to {
            fn from(c: $from) -> $to {
                $to {
                    connections: c.connections,
                    disconnects: c.disconnects,
                    joins: c.joins,
                    rounds_started: c.rounds_started,
                    rounds_aggregated: c.rounds_aggregated,
                    rounds_abandoned: c.rounds_abandoned,
                    updates_accepted: c.updates_accepted,
                    round_failures: c.round_failures,
                    out_of_memory: c.out_of_memory,
                    missed: c.missed,
                    no_feasible_arm: c.no_feasible_arm,
                    heartbeats: c.heartbeats,
                    bytes_received: c.bytes_received,
                    bandit_errors: c.bandit_errors,
                    aggregation_errors: c.aggregation_errors,
                    rejects: c.rejects,
                    non_finite_aggregates: c.non_finite_aggregates,
                    samples_clipped: c.samples_clipped,
                    $($extra: $value,)*
                }
            }
        }
    };
}
counters_between!(CountersV2 => Counters { updates_screened_out: 0 });
counters_between!(Counters => CountersV2 {});

impl From<CoordinatorStateV2> for CoordinatorState {
    fn from(old: CoordinatorStateV2) -> CoordinatorState {
        CoordinatorState {
            dims: old.dims,
            strategy: old.strategy,
            round: old.round,
            global: old.global,
            devices: old.devices,
            rng: old.rng,
            counters: old.counters.into(),
        }
    }
}

/// A schema-1 checkpoint: [`CoordinatorState`] as it was before `Capabilities::device_class`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct CoordinatorStateV1 {
    pub dims: ModelDims,
    pub strategy: String,
    pub round: RoundId,
    pub global: GlobalAdapter,
    pub devices: Vec<DeviceRecordV1>,
    pub rng: ChaCha8Rng,
    pub counters: CountersV2,
}

/// A schema-1 [`DeviceRecord`].
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct DeviceRecordV1 {
    pub id: DeviceId,
    pub capabilities: CapabilitiesV1,
    #[serde(with = "json_text")]
    pub bandit: DeviceBandit,
    pub kept: Option<KeptIndices>,
    pub sparsity: f64,
    pub rounds_selected: u64,
    pub rounds_completed: u64,
    pub rounds_failed: u64,
    pub rounds_missed: u64,
}

/// Protocol-1 [`Capabilities`] (no device class).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct CapabilitiesV1 {
    pub ram_bytes: u64,
    pub backend: String,
    pub bench_score: Option<f32>,
}

impl From<CoordinatorStateV1> for CoordinatorState {
    /// Every device of a schema-1 state is of class `unknown` (its next Join tells its class).
    fn from(old: CoordinatorStateV1) -> CoordinatorState {
        CoordinatorState {
            dims: old.dims,
            strategy: old.strategy,
            round: old.round,
            global: old.global,
            devices: old
                .devices
                .into_iter()
                .map(|d| DeviceRecord {
                    id: d.id,
                    capabilities: Capabilities {
                        ram_bytes: d.capabilities.ram_bytes,
                        backend: d.capabilities.backend,
                        bench_score: d.capabilities.bench_score,
                        device_class: None,
                    },
                    bandit: d.bandit,
                    kept: d.kept,
                    sparsity: d.sparsity,
                    rank_limit: None,
                    rounds_selected: d.rounds_selected,
                    rounds_completed: d.rounds_completed,
                    rounds_failed: d.rounds_failed,
                    rounds_missed: d.rounds_missed,
                })
                .collect(),
            rng: old.rng,
            counters: old.counters.into(),
        }
    }
}

/// Serde adapter: a value stored as its JSON text.
mod json_text {
    use serde::de::{DeserializeOwned, Error as _};
    use serde::ser::Error as _;
    use serde::{Deserialize, Deserializer, Serialize, Serializer};

    pub fn serialize<T: Serialize, S: Serializer>(value: &T, s: S) -> Result<S::Ok, S::Error> {
        let text = serde_json::to_string(value).map_err(S::Error::custom)?;
        s.serialize_str(&text)
    }

    pub fn deserialize<'de, T: DeserializeOwned, D: Deserializer<'de>>(
        d: D,
    ) -> Result<T, D::Error> {
        let text = String::deserialize(d)?;
        serde_json::from_str(&text).map_err(D::Error::custom)
    }
}
