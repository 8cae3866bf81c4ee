//! FedSpine aggregator library: the sans-IO round coordinator and its strategies, aggregation
//! math, checkpoints, the private CA and the QUIC server driver.
//!
//! `coordinator`, `strategy`, `aggregate`, `checkpoint` and `prometheus` are pure (no sockets, no clock, no
//! tokio); `pki` and `server` are the I/O edge, on top of the `transport` crate.

pub mod aggregate;
pub mod checkpoint;
pub mod coordinator;
#[cfg(feature = "fuzzing")]
pub mod fuzzing;
pub mod pki;
pub mod prometheus;
pub mod server;
pub mod strategy;

pub use coordinator::{
    Command, Coordinator, CoordinatorConfig, CoordinatorError, CoordinatorState, Event,
    RoundSummary,
};
pub use protocol::ModelDims;
