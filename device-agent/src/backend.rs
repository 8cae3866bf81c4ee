//! Choice of compute backend at run time. `flex` (pure-Rust SIMD CPU) is the default and always
//! built; `ndarray`, `wgpu`, `vulkan` and `metal` are compiled only with the cargo feature of the
//! same name. Asking for one that is not compiled in, or that cannot start on this machine, is a
//! clear error naming what is missing and how to fall back: never a panic, never a silent switch.
//!
//! GPU backends (`wgpu` picks the graphics API itself: Vulkan, then DirectX 12, then OpenGL on
//! Linux and Windows, Metal on macOS; `vulkan` and `metal` pin theirs) are started eagerly here,
//! through burn's fallible wgpu initialisation, so a missing adapter is reported before any model
//! is loaded. The started device is kept for the life of the process: burn registers one runtime
//! per adapter selector and refuses to initialise it twice.
//!
//! Software adapters are refused unless [`ALLOW_SOFTWARE_GPU_ENV`] is set. Mesa's software
//! Vulkan driver (lavapipe), as shipped with Debian 12, runs burn's elementwise kernels but
//! crashes inside the driver on matmul, which would take the process down from code we cannot
//! guard. Its OpenGL driver (llvmpipe) does run the model correctly (the reference logits and a
//! LoRA step match flex), but some 20 times slower than flex. Use `--backend flex` on a machine
//! without a GPU.

use std::fmt;
use std::str::FromStr;

use burn::tensor::Device;
use serde::{Deserialize, Serialize};

/// Set to `1` to let a GPU backend start on a software adapter (lavapipe, llvmpipe, SwiftShader,
/// WARP). Off by default: see the module documentation.
pub const ALLOW_SOFTWARE_GPU_ENV: &str = "FEDSPINE_ALLOW_SOFTWARE_GPU";

/// A compute backend a user can ask for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, Default)]
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
        f.write_str(self.name())
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
            _ => return Err(BackendError::Unknown(s.to_string())),
        })
    }
}

/// Why a backend cannot be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BackendError {
    #[error("unknown backend '{0}' (choose flex, ndarray, wgpu, vulkan or metal)")]
    Unknown(String),
    #[error(
        "backend '{backend}' is not compiled into this binary; rebuild with `--features {feature}` \
         (e.g. `cargo build --release -p device-agent --features {feature}`), or use \
         `--backend flex`, the default CPU backend"
    )]
    NotCompiled {
        backend: BackendKind,
        feature: &'static str,
    },
    #[error("backend '{backend}' cannot start on this machine: {why}. Use `--backend flex` to run on the CPU")]
    Unavailable { backend: BackendKind, why: String },
}

impl BackendKind {
    /// Every backend, in the order the CLI lists them.
    pub const ALL: [BackendKind; 5] = [
        BackendKind::Flex,
        BackendKind::Ndarray,
        BackendKind::Wgpu,
        BackendKind::Vulkan,
        BackendKind::Metal,
    ];

    /// The name `--backend` takes.
    pub fn name(self) -> &'static str {
        match self {
            BackendKind::Flex => "flex",
            BackendKind::Ndarray => "ndarray",
            BackendKind::Wgpu => "wgpu",
            BackendKind::Vulkan => "vulkan",
            BackendKind::Metal => "metal",
        }
    }

    /// The device-agent cargo feature that compiles this backend in (`None`: always built).
    pub fn feature(self) -> Option<&'static str> {
        match self {
            BackendKind::Flex => None,
            other => Some(other.name()),
        }
    }

    /// Whether this binary was built with the backend.
    pub fn is_compiled(self) -> bool {
        match self {
            BackendKind::Flex => true,
            BackendKind::Ndarray => cfg!(feature = "ndarray"),
            BackendKind::Wgpu => cfg!(feature = "wgpu"),
            BackendKind::Vulkan => cfg!(feature = "vulkan"),
            BackendKind::Metal => cfg!(feature = "metal"),
        }
    }

    /// Whether the backend runs on a GPU (through wgpu).
    pub fn is_gpu(self) -> bool {
        matches!(
            self,
            BackendKind::Wgpu | BackendKind::Vulkan | BackendKind::Metal
        )
    }

    /// The device for this backend, or why it cannot be had. A GPU backend is started here (its
    /// adapter chosen and opened) the first time it is asked for; later calls return the same
    /// device, or the same error.
    pub fn device(self) -> Result<Device, BackendError> {
        if !self.is_compiled() {
            return Err(BackendError::NotCompiled {
                backend: self,
                feature: self.feature().unwrap_or("flex"),
            });
        }
        match self {
            BackendKind::Flex => Ok(Device::flex()),
            BackendKind::Ndarray => ndarray_device(),
            BackendKind::Wgpu | BackendKind::Vulkan | BackendKind::Metal => gpu_device(self),
        }
    }
}

#[cfg(feature = "ndarray")]
#[allow(deprecated)] // burn 0.22 deprecates ndarray in favour of flex; we offer it on request.
fn ndarray_device() -> Result<Device, BackendError> {
    Ok(Device::ndarray())
}

#[cfg(not(feature = "ndarray"))]
fn ndarray_device() -> Result<Device, BackendError> {
    unreachable!("BackendKind::device checks is_compiled first")
}

#[cfg(feature = "wgpu")]
fn gpu_device(kind: BackendKind) -> Result<Device, BackendError> {
    gpu::device(kind).map(|(device, _)| device)
}

#[cfg(not(feature = "wgpu"))]
fn gpu_device(_kind: BackendKind) -> Result<Device, BackendError> {
    unreachable!("BackendKind::device checks is_compiled first")
}

impl BackendKind {
    /// The adapter a GPU backend runs on, once [`BackendKind::device`] has started it; `None` for
    /// CPU backends and for GPU backends not started (or that could not start).
    pub fn adapter(self) -> Option<AdapterSummary> {
        #[cfg(feature = "wgpu")]
        if self.is_gpu() && self.is_compiled() {
            return gpu::started(self);
        }
        None
    }
}

/// What we know about a GPU adapter, in plain data (no wgpu types), so the admission policy can
/// be tested on any build.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AdapterSummary {
    /// The adapter's name, e.g. `NVIDIA GeForce RTX 3060` or `llvmpipe (LLVM 15.0.6, 256 bits)`.
    pub name: String,
    /// The graphics API it was opened on (`Vulkan`, `Metal`, `Dx12`, `Gl`).
    pub api: String,
    /// Driver name and version as the API reports them (may be empty).
    pub driver: String,
    /// The API reported the adapter as a CPU (software) device.
    pub reported_cpu: bool,
}

impl AdapterSummary {
    /// A software rasterizer: reported as a CPU device, or named like one of the known software
    /// drivers (some APIs, OpenGL in particular, report them as `Other`).
    pub fn is_software(&self) -> bool {
        const SOFTWARE: [&str; 6] = [
            "llvmpipe",
            "lavapipe",
            "softpipe",
            "swiftshader",
            "basic render driver",
            "warp",
        ];
        let name = self.name.to_ascii_lowercase();
        let driver = self.driver.to_ascii_lowercase();
        self.reported_cpu
            || SOFTWARE.iter().any(|s| {
                name.contains(s)
                    || driver
                        .split(|c: char| !c.is_alphanumeric())
                        .any(|w| w == *s)
            })
    }
}

impl fmt::Display for AdapterSummary {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "'{}' on {}", self.name, self.api)?;
        if !self.driver.trim().is_empty() {
            write!(f, " (driver {})", self.driver.trim())?;
        }
        Ok(())
    }
}

/// Whether a GPU backend may run on `adapter`: a hardware adapter always, a software one only
/// with `allow_software` (from [`ALLOW_SOFTWARE_GPU_ENV`]). The error is the reason, for
/// [`BackendError::Unavailable`].
pub fn admit_adapter(adapter: &AdapterSummary, allow_software: bool) -> Result<(), String> {
    if !adapter.is_software() || allow_software {
        return Ok(());
    }
    Err(format!(
        "the only adapter found is the software rasterizer {adapter}, not a GPU. Software \
         drivers are many times slower than the CPU backends, and Mesa's lavapipe (software \
         Vulkan, as in Debian 12) crashes inside the driver on matmul. Install the GPU's driver \
         (with the Vulkan loader, libvulkan1), or set {ALLOW_SOFTWARE_GPU_ENV}=1 to use the \
         software adapter anyway"
    ))
}

/// Run `f` on one of rayon's worker threads and return its result. The CPU kernels (flex's and
/// ours) split their work with rayon; called from a thread outside the pool, each parallel
/// operation is handed to the pool while the caller sleeps until a worker wakes it, which
/// costs a pair of thread wake-ups per operation (a quarter of Q8_0 decoding's time, where a
/// token runs about 150 of them). From a worker the caller takes part in its own operation and
/// only idle workers are woken. Nested calls run `f` in place.
pub fn on_pool<R: Send>(f: impl FnOnce() -> R + Send) -> R {
    rayon::scope(|_| f())
}

/// Is this device (with or without autodiff) the flex CPU backend?
pub fn is_flex(device: &Device) -> bool {
    matches!(
        device.clone().inner().as_dispatch(),
        burn::backend::DispatchDevice::Flex(_)
    )
}

/// Whether [`ALLOW_SOFTWARE_GPU_ENV`] is set to a true value.
pub fn software_gpu_allowed() -> bool {
    std::env::var(ALLOW_SOFTWARE_GPU_ENV).is_ok_and(|v| {
        let v = v.trim().to_ascii_lowercase();
        !v.is_empty() && v != "0" && v != "false" && v != "no"
    })
}

#[cfg(feature = "wgpu")]
mod gpu {
    //! Starting a GPU backend through burn's wgpu runtime, once per process and backend.

    use std::panic::{catch_unwind, AssertUnwindSafe};
    use std::sync::Mutex;

    use burn::tensor::wgpu::{WgpuBackend, WgpuInitError};
    use burn::tensor::Device;

    use super::{admit_adapter, software_gpu_allowed, AdapterSummary, BackendError, BackendKind};

    /// Each GPU backend's outcome, kept for the life of the process: burn's runtime for an
    /// adapter selector can be initialised only once, and a second attempt after a failure would
    /// only fail the same way. The lock also keeps two threads from creating graphics instances
    /// at once, which the Vulkan loader does not survive.
    static STARTED: Mutex<Vec<(BackendKind, Outcome)>> = Mutex::new(Vec::new());

    type Outcome = Result<(Device, AdapterSummary), String>;

    pub(super) fn device(kind: BackendKind) -> Result<(Device, AdapterSummary), BackendError> {
        let mut started = STARTED
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        let outcome = match started.iter().find(|(k, _)| *k == kind) {
            Some((_, outcome)) => outcome.clone(),
            None => {
                let outcome = start(kind);
                started.push((kind, outcome.clone()));
                outcome
            }
        };
        outcome.map_err(|why| BackendError::Unavailable { backend: kind, why })
    }

    pub(super) fn started(kind: BackendKind) -> Option<AdapterSummary> {
        let started = STARTED
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        started
            .iter()
            .find(|(k, _)| *k == kind)
            .and_then(|(_, outcome)| outcome.as_ref().ok())
            .map(|(_, adapter)| adapter.clone())
    }

    /// The graphics API a backend asks wgpu for.
    fn api(kind: BackendKind) -> WgpuBackend {
        match kind {
            BackendKind::Vulkan => WgpuBackend::Vulkan,
            BackendKind::Metal => WgpuBackend::Metal,
            _ => WgpuBackend::Auto,
        }
    }

    /// What a backend needs from the machine, for messages.
    fn needs(kind: BackendKind) -> &'static str {
        match kind {
            BackendKind::Vulkan => {
                "a GPU with a Vulkan driver and the Vulkan loader (libvulkan.so.1)"
            }
            BackendKind::Metal => "a Metal GPU (macOS or iOS)",
            _ => {
                "a GPU reachable through Vulkan (driver plus the Vulkan loader, libvulkan.so.1), \
                 Metal, DirectX 12 or OpenGL ES 3.1"
            }
        }
    }

    fn start(kind: BackendKind) -> Outcome {
        // burn's `init_with_setup` reports a missing adapter as an error; the unwind guard is for
        // panics further down (wgpu, the driver's own checks), which must not escape as a crash.
        let attempt = catch_unwind(AssertUnwindSafe(|| {
            Device::wgpu_options()
                .graphics_api(api(kind))
                .init_with_setup()
        }));
        let (device, setup) = match attempt {
            Ok(Ok(started)) => started,
            Ok(Err(err)) => return Err(describe_init_error(kind, &err)),
            Err(payload) => {
                let what = payload
                    .downcast_ref::<String>()
                    .map(String::as_str)
                    .or_else(|| payload.downcast_ref::<&str>().copied())
                    .unwrap_or("no message");
                return Err(format!(
                    "the wgpu runtime panicked while starting ({what}); it needs {}",
                    needs(kind)
                ));
            }
        };
        let info = setup.adapter.get_info();
        let summary = AdapterSummary {
            name: info.name.clone(),
            api: format!("{:?}", info.backend),
            driver: format!("{} {}", info.driver, info.driver_info),
            reported_cpu: info.device_type == burn::tensor::wgpu::wgpu::DeviceType::Cpu,
        };
        admit_adapter(&summary, software_gpu_allowed())?;
        tracing::info!(
            backend = %kind,
            adapter = %summary.name,
            api = %summary.api,
            device_type = ?info.device_type,
            software = summary.is_software(),
            "GPU backend started"
        );
        Ok((device, summary))
    }

    fn describe_init_error(kind: BackendKind, err: &WgpuInitError) -> String {
        match err {
            WgpuInitError::AdapterUnavailable { .. } => format!(
                "no GPU adapter found (wgpu: {err}); it needs {}",
                needs(kind)
            ),
            WgpuInitError::UnsupportedGraphicsApi { .. } => format!(
                "this platform's wgpu has no such graphics API ({err}); it needs {}",
                needs(kind)
            ),
            WgpuInitError::RequestDevice { .. } => format!(
                "the GPU adapter was found but refused to open a device ({err}); check the GPU \
                 driver"
            ),
            _ => format!("the wgpu runtime did not start: {err}"),
        }
    }
}

/// Tune the C allocator for training on the CPU backend: the backend allocates and frees
/// tensors of many megabytes every operation, which glibc by default serves with fresh `mmap`s
/// and hands back at once, so every large temporary pays page faults and zeroing again. Serving
/// them from the heap and keeping freed memory for reuse makes a LoRA step 5-10% faster
/// (`cargo bench -p device-agent --bench speed`) at the same peak RSS; memory freed after a
/// peak stays with the process until it exits. Call once at start-up, before other threads
/// allocate. Does nothing on other C libraries.
pub fn tune_allocator() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    #[allow(unsafe_code)]
    // SAFETY: `mallopt` only changes allocator parameters; called before worker threads start.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 1 << 30);
        libc::mallopt(libc::M_TRIM_THRESHOLD, i32::MAX);
        libc::mallopt(libc::M_TOP_PAD, 256 << 20);
    }
}
