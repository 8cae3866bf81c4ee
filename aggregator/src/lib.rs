//! FedSpine aggregator library: the sans-IO round coordinator and its strategies, aggregation
//! math, checkpoints, the private CA, the QUIC transport and the server driver.
//!
//! `coordinator`, `strategy`, `aggregate` and `checkpoint` are pure (no sockets, no clock, no
//! tokio); `pki`, `transport` and `server` are the I/O edge.

pub mod aggregate;
pub mod checkpoint;
pub mod coordinator;
pub mod pki;
pub mod server;
pub mod strategy;
pub mod transport;

pub use coordinator::{
    Command, Coordinator, CoordinatorConfig, CoordinatorError, CoordinatorState, Event,
    RoundSummary,
};
pub use protocol::ModelDims;
