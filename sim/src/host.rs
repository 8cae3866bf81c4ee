//! The CPU a run was computed on: its model name (from `/proc/cpuinfo` on Linux) and which
//! vector extensions the kernels could use (detected at run time). Real-mode results depend on
//! the CPU class (the kernels' arithmetic differs between AVX-512 and AVX2 code paths), so
//! every comparison names it, in its own `host.json`: the seed-determined reports stay
//! byte-identical across hosts of one class.

use serde::Serialize;

/// The host's CPU class.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct HostInfo {
    /// `model name` of the first processor, or `unknown`.
    pub cpu_model: String,
    pub arch: String,
    /// Logical processors the process may use.
    pub threads: usize,
    pub avx512f: bool,
    pub avx2: bool,
    pub fma: bool,
    /// The widest vector path the kernels dispatch to on this host: `avx512`, `avx2`, `neon`
    /// or `scalar`.
    pub vector_path: String,
}

impl HostInfo {
    /// Reads the CPU model and detects the vector extensions.
    pub fn detect() -> HostInfo {
        let cpu_model = std::fs::read_to_string("/proc/cpuinfo")
            .ok()
            .and_then(|t| model_name(&t))
            .unwrap_or_else(|| "unknown".into());
        let (avx512f, avx2, fma) = x86_features();
        let arch = std::env::consts::ARCH.to_string();
        let vector_path = if avx512f {
            "avx512"
        } else if avx2 {
            "avx2"
        } else if arch == "aarch64" {
            "neon"
        } else {
            "scalar"
        }
        .to_string();
        HostInfo {
            cpu_model,
            arch,
            threads: std::thread::available_parallelism().map_or(1, |n| n.get()),
            avx512f,
            avx2,
            fma,
            vector_path,
        }
    }

    /// One line for terminals and Markdown.
    pub fn line(&self) -> String {
        format!(
            "{} ({}, {} threads; vector path {}: AVX-512F {}, AVX2 {}, FMA {})",
            self.cpu_model,
            self.arch,
            self.threads,
            self.vector_path,
            yes(self.avx512f),
            yes(self.avx2),
            yes(self.fma)
        )
    }
}

fn yes(b: bool) -> &'static str {
    if b {
        "yes"
    } else {
        "no"
    }
}

/// The first `model name` value of a `/proc/cpuinfo` text.
fn model_name(cpuinfo: &str) -> Option<String> {
    cpuinfo.lines().find_map(|l| {
        let (k, v) = l.split_once(':')?;
        (k.trim() == "model name").then(|| v.trim().to_string())
    })
}

#[cfg(target_arch = "x86_64")]
fn x86_features() -> (bool, bool, bool) {
    (
        std::arch::is_x86_feature_detected!("avx512f"),
        std::arch::is_x86_feature_detected!("avx2"),
        std::arch::is_x86_feature_detected!("fma"),
    )
}

#[cfg(not(target_arch = "x86_64"))]
fn x86_features() -> (bool, bool, bool) {
    (false, false, false)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_the_model_name() {
        let t = "processor\t: 0\nvendor_id\t: AuthenticAMD\nmodel name\t: AMD EPYC 7B13 64-Core Processor\nflags\t\t: fpu avx2\n";
        assert_eq!(
            model_name(t).as_deref(),
            Some("AMD EPYC 7B13 64-Core Processor")
        );
        assert_eq!(model_name("flags: avx2\n"), None);
        let h = HostInfo::detect();
        assert!(h.threads >= 1);
        assert!(h.line().contains(&h.vector_path));
    }
}
