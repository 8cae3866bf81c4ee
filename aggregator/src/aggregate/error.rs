//! `AggregateError`: why an update was refused or an aggregation could not finish, and the
//! reject reason a device is told.

use protocol::{ModelDims, Proj, RejectReason, ValidationError};

/// Why an update was refused or an aggregation could not finish.
#[derive(Debug, thiserror::Error)]
pub enum AggregateError {
    #[error("invalid update: {0}")]
    Invalid(#[from] ValidationError),
    #[error("layer {block}.{proj}: delta norm {norm} exceeds the limit {limit}")]
    DeltaNormTooLarge {
        block: u32,
        proj: Proj,
        norm: f64,
        limit: f64,
    },
    #[error("the previous global adapter is for {got:?}, this aggregation for {expected:?}")]
    DimsMismatch { expected: ModelDims, got: ModelDims },
    #[error("invalid aggregation config: {0}")]
    Config(String),
    #[error("the previous global adapter is malformed (layers or buffers do not match its dims and rank)")]
    MalformedGlobal,
    #[error("SVD of layer {block}.{proj} failed: {detail}")]
    Svd {
        block: u32,
        proj: Proj,
        detail: String,
    },
}

impl AggregateError {
    /// The reason to send back to a device whose update caused this error.
    pub fn reject_reason(&self) -> RejectReason {
        match self {
            AggregateError::Invalid(e) => e.reject_reason(),
            AggregateError::DeltaNormTooLarge { norm, limit, .. } => RejectReason::NormTooLarge {
                norm: *norm,
                limit: *limit,
            },
            other => RejectReason::Malformed(other.to_string()),
        }
    }
}
