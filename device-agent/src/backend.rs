//! Choice of compute backend at run time. `flex` (pure-Rust SIMD CPU) is the default and always
//! built; other backends are compiled only with their cargo feature, and asking for one that is
//! not compiled in, or cannot start here, is a clear error: never a silent switch.

use std::fmt;
use std::str::FromStr;

use burn::tensor::Device;
use serde::{Deserialize, Serialize};

/// A compute backend a user can ask for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum BackendKind {
    #[default]
    Flex,
    Ndarray,
    Wgpu,
    Vulkan,
    Metal,
}

impl fmt::Display for BackendKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            BackendKind::Flex => "flex",
            BackendKind::Ndarray => "ndarray",
            BackendKind::Wgpu => "wgpu",
            BackendKind::Vulkan => "vulkan",
            BackendKind::Metal => "metal",
        })
    }
}

impl FromStr for BackendKind {
    type Err = BackendError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Ok(match s.to_ascii_lowercase().as_str() {
            "flex" | "cpu" => BackendKind::Flex,
            "ndarray" => BackendKind::Ndarray,
            "wgpu" | "gpu" => BackendKind::Wgpu,
            "vulkan" => BackendKind::Vulkan,
            "metal" => BackendKind::Metal,
            other => return Err(BackendError::Unknown(other.to_string())),
        })
    }
}

/// Why a backend cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum BackendError {
    #[error("unknown backend '{0}' (choose flex, ndarray, wgpu, vulkan or metal)")]
    Unknown(String),
    #[error("backend '{backend}' is not compiled into this binary; rebuild with `--features {feature}`, or use `--backend flex` (the default CPU backend)")]
    NotCompiled {
        backend: BackendKind,
        feature: &'static str,
    },
    #[error("backend '{backend}' cannot start on this machine: {why}. Use `--backend flex` to run on the CPU")]
    Unavailable { backend: BackendKind, why: String },
}

impl BackendKind {
    /// The device for this backend, or why it cannot be had.
    pub fn device(self) -> Result<Device, BackendError> {
        match self {
            BackendKind::Flex => Ok(Device::flex()),
            BackendKind::Ndarray => Err(BackendError::NotCompiled {
                backend: self,
                feature: "ndarray",
            }),
            BackendKind::Wgpu | BackendKind::Vulkan | BackendKind::Metal => {
                Err(BackendError::NotCompiled {
                    backend: self,
                    feature: "wgpu",
                })
            }
        }
    }
}
