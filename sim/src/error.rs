//! The simulator's error type: bad configurations, unreadable files, data that cannot be
//! partitioned, and failures of the model or of the cores it drives.

use std::path::PathBuf;

/// Why a simulation could not be set up or run.
#[derive(Debug, thiserror::Error)]
pub enum SimError {
    #[error("configuration: {0}")]
    Config(String),
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("data: {0}")]
    Data(String),
    #[error("model: {0}")]
    Model(String),
    #[error("coordinator: {0}")]
    Coordinator(String),
    #[error("surrogate: {0}")]
    Surrogate(String),
}

impl SimError {
    pub fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        SimError::Io {
            path: path.into(),
            source,
        }
    }
}
