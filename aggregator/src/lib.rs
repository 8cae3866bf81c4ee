//! FedSpine aggregator library: aggregation math, checkpoints, the private CA and the QUIC
//! transport. The round coordinator builds on these.
//!
//! `aggregate` and `checkpoint` are pure (no sockets, no clock, no tokio); `pki` and
//! `transport` are the I/O edge.

pub mod aggregate;
pub mod checkpoint;
pub mod pki;
pub mod transport;

pub use protocol::ModelDims;
