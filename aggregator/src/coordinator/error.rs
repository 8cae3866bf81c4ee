//! `CoordinatorError`: why a coordinator could not be built or restored. Nothing a peer sends
//! produces one (peer misbehaviour is a `Reject` command and a counter).

use protocol::ModelDims;

use crate::strategy::StrategyError;

/// Why a coordinator could not be built or restored. Nothing a peer sends produces one.
#[derive(Debug, thiserror::Error)]
pub enum CoordinatorError {
    #[error("invalid coordinator config: {0}")]
    InvalidConfig(String),
    /// The strategy refused its settings.
    #[error("invalid coordinator config: {0}")]
    Strategy(#[from] StrategyError),
    #[error("invalid model dimensions: {0:?}")]
    InvalidDims(ModelDims),
    #[error("saved state does not fit this run: {0}")]
    IncompatibleState(String),
}
