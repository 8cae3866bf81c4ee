//! The CPU the agent runs on: its model name and family/model numbers from `/proc/cpuinfo`, the
//! vector instruction set our own kernels take ([`Isa`]: AVX-512F, AVX2+FMA, NEON or portable)
//! and the int8 dot-product path of the quantized kernels ([`DotPath`]). Detected once per
//! process. `FEDSPINE_ISA=avx512|avx2|portable` caps what our kernels use (to measure and test
//! the AVX2 path on an AVX-512 host); any cap, `avx512` included, also keeps the bf16 products
//! off AMX tiles ([`crate::bf16::amx`]). It does not cap burn's own matmul, which picks its
//! instructions itself.

use std::fmt;
use std::sync::OnceLock;

/// The environment variable that caps the instruction set of our kernels.
pub const ISA_ENV: &str = "FEDSPINE_ISA";

/// A bad value of [`ISA_ENV`].
#[derive(Debug, thiserror::Error)]
pub enum CpuError {
    #[error("{ISA_ENV}={value}: not one of avx512, avx2, portable")]
    BadIsa { value: String },
}

/// The vector instruction set our f32 kernels are compiled for and dispatched to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Isa {
    Portable,
    /// aarch64 Advanced SIMD (always present there; the portable code is what it compiles to).
    Neon,
    /// AVX2 with FMA.
    Avx2Fma,
    /// AVX-512 Foundation.
    Avx512,
}

impl fmt::Display for Isa {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Isa::Portable => "portable",
            Isa::Neon => "NEON",
            Isa::Avx2Fma => "AVX2+FMA",
            Isa::Avx512 => "AVX-512F",
        })
    }
}

/// The int8 dot-product path of the Q8_0 kernels ([`crate::quant`]) and of `--precision int8`'s
/// row-wise products ([`crate::quant::rowwise`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum DotPath {
    Portable,
    /// aarch64 `sdot` (the dot-product extension, FEAT_DotProd: Armv8.2 cores such as the
    /// Cortex-A76 of the Raspberry Pi 5 and Jetson Orin's A78AE; not the Pi 4's A72).
    NeonDot,
    /// AVX2 `maddubs` + `madd`.
    Avx2,
    /// AVX-512 VNNI `vpdpbusd` (256-bit, with AVX-512VL).
    Avx512Vnni,
}

impl fmt::Display for DotPath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            DotPath::Portable => "portable",
            DotPath::NeonDot => "NEON sdot",
            DotPath::Avx2 => "AVX2 (maddubs+madd)",
            DotPath::Avx512Vnni => "AVX-512 VNNI (vpdpbusd)",
        })
    }
}

/// The cap from [`ISA_ENV`], `None` when unset or empty.
pub fn cap_from_env() -> Result<Option<Isa>, CpuError> {
    match std::env::var(ISA_ENV) {
        Err(_) => Ok(None),
        Ok(v) => match v.trim().to_ascii_lowercase().as_str() {
            "" => Ok(None),
            "avx512" | "avx-512" => Ok(Some(Isa::Avx512)),
            "avx2" => Ok(Some(Isa::Avx2Fma)),
            "portable" | "scalar" => Ok(Some(Isa::Portable)),
            _ => Err(CpuError::BadIsa { value: v }),
        },
    }
}

/// What the hardware offers, uncapped: `(isa, dot path)`.
pub fn hardware() -> (Isa, DotPath) {
    #[cfg(target_arch = "x86_64")]
    {
        use std::arch::is_x86_feature_detected as has;
        let isa = if has!("avx512f") {
            Isa::Avx512
        } else if has!("avx2") && has!("fma") {
            Isa::Avx2Fma
        } else {
            Isa::Portable
        };
        // The int8 row kernels convert the weights' f16 scales with F16C (every AVX2 CPU has
        // it; checked all the same).
        let f16c = has!("f16c");
        let dot = if f16c
            && has!("avx512f")
            && has!("avx512bw")
            && has!("avx512vl")
            && has!("avx512vnni")
        {
            DotPath::Avx512Vnni
        } else if f16c && has!("avx2") && has!("fma") {
            DotPath::Avx2
        } else {
            DotPath::Portable
        };
        (isa, dot)
    }
    #[cfg(target_arch = "aarch64")]
    {
        let dot = if std::arch::is_aarch64_feature_detected!("dotprod") {
            DotPath::NeonDot
        } else {
            DotPath::Portable
        };
        (Isa::Neon, dot)
    }
    #[cfg(not(any(target_arch = "x86_64", target_arch = "aarch64")))]
    {
        (Isa::Portable, DotPath::Portable)
    }
}

/// The hardware's paths capped by `cap`.
pub fn capped(cap: Option<Isa>) -> (Isa, DotPath) {
    let (isa, dot) = hardware();
    match cap {
        None => (isa, dot),
        Some(c) => {
            let isa = isa.min(c);
            let dot = match c {
                Isa::Avx512 => dot,
                Isa::Avx2Fma => dot.min(DotPath::Avx2),
                Isa::Neon | Isa::Portable => DotPath::Portable,
            };
            (isa, dot)
        }
    }
}

fn paths() -> (Isa, DotPath) {
    static PATHS: OnceLock<(Isa, DotPath)> = OnceLock::new();
    *PATHS.get_or_init(|| match cap_from_env() {
        Ok(cap) => capped(cap),
        Err(e) => {
            eprintln!("warning: {e}; using what the CPU offers");
            hardware()
        }
    })
}

impl Isa {
    /// The instruction set our kernels use in this process (hardware, capped by [`ISA_ENV`]).
    pub fn detect() -> Isa {
        paths().0
    }
}

impl DotPath {
    /// The int8 dot-product path the Q8_0 kernels use in this process.
    pub fn detect() -> DotPath {
        paths().1
    }

    /// Whether this path runs its own kernel on this CPU, uncapped (a path it lacks falls back
    /// to the portable kernel). The order of the variants ranks paths within one architecture
    /// only: `NeonDot` sorts below the x86 paths but never runs beside them.
    pub fn runs_here(self) -> bool {
        let hw = hardware().1;
        match self {
            DotPath::Portable => true,
            DotPath::NeonDot => hw == DotPath::NeonDot,
            DotPath::Avx2 | DotPath::Avx512Vnni => hw >= self,
        }
    }
}

/// The CPU as `/proc/cpuinfo` names it, and the paths our kernels take on it.
#[derive(Debug, Clone)]
pub struct CpuInfo {
    pub model_name: String,
    pub family: Option<u32>,
    pub model: Option<u32>,
    pub isa: Isa,
    pub dot: DotPath,
    /// The cap from [`ISA_ENV`], when set.
    pub cap: Option<Isa>,
}

impl CpuInfo {
    pub fn detect() -> CpuInfo {
        let text = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
        let mut info = parse_cpuinfo(&text);
        info.isa = Isa::detect();
        info.dot = DotPath::detect();
        info.cap = cap_from_env().ok().flatten();
        info
    }
}

/// The first processor's model name, family and model from `/proc/cpuinfo` text (unknown
/// fields stay empty); the paths are left portable for the caller to fill.
pub fn parse_cpuinfo(text: &str) -> CpuInfo {
    let field = |key: &str| {
        text.lines()
            .filter_map(|l| l.split_once(':'))
            .find(|(k, _)| k.trim() == key)
            .map(|(_, v)| v.trim().to_string())
    };
    CpuInfo {
        model_name: field("model name")
            .or_else(|| field("Model"))
            .unwrap_or_else(|| "unknown CPU".into()),
        family: field("cpu family").and_then(|v| v.parse().ok()),
        model: field("model").and_then(|v| v.parse().ok()),
        isa: Isa::Portable,
        dot: DotPath::Portable,
        cap: None,
    }
}

impl fmt::Display for CpuInfo {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.model_name)?;
        if let (Some(fa), Some(m)) = (self.family, self.model) {
            write!(f, " (family {fa} model {m})")?;
        }
        write!(
            f,
            "; our f32 kernels: {}; int8 dot (Q8_0, --precision int8): {}",
            self.isa, self.dot
        )?;
        if let Some(c) = self.cap {
            write!(
                f,
                " (capped by {ISA_ENV} at {c}; burn's own matmul is not capped)"
            )?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_cpuinfo_and_caps_paths() {
        let text = "processor\t: 0\nvendor_id\t: AuthenticAMD\ncpu family\t: 25\nmodel\t\t: 17\nmodel name\t: AMD EPYC 9R14\n";
        let c = parse_cpuinfo(text);
        assert_eq!(c.model_name, "AMD EPYC 9R14");
        assert_eq!((c.family, c.model), (Some(25), Some(17)));
        let (isa, dot) = capped(Some(Isa::Portable));
        assert_eq!((isa, dot), (Isa::Portable, DotPath::Portable));
        let (isa, dot) = capped(Some(Isa::Avx2Fma));
        assert!(isa <= Isa::Avx2Fma && dot <= DotPath::Avx2);
        assert_eq!(capped(None), hardware());
        assert!(DotPath::Portable.runs_here() && hardware().1.runs_here());
        #[cfg(target_arch = "x86_64")]
        assert!(!DotPath::NeonDot.runs_here());
    }
}
