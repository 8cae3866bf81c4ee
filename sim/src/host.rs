//! The CPU a run was computed on: its model name, family and model (from `/proc/cpuinfo` on
//! Linux, through [`device_agent::cpu::CpuInfo`]) and the paths the kernels took there (f32
//! vector set after any `FEDSPINE_ISA` cap, the int8 dot product, the bf16 kernel). Real-mode
//! results depend on those paths (their arithmetic differs), so every comparison names them in
//! its own `host.json`, kept apart from the seed-determined reports, which stay byte-identical
//! across hosts of one class; `sim pool` refuses to pool runs whose classes differ
//! ([`HostClass`]).

use std::collections::BTreeMap;

use device_agent::bf16::gemm::Kernel;
use device_agent::cpu::{CpuInfo, Isa};
use serde::{Deserialize, Serialize};

/// The file beside a comparison that names its CPU class.
pub const HOST_FILE: &str = "host.json";

/// The host's CPU class.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HostInfo {
    /// `model name` of the first processor, or `unknown CPU`. A VM may give only the vendor's
    /// line ("AMD EPYC"), the same for several generations: `family` and `model` tell them apart.
    pub cpu_model: String,
    /// x86 `cpu family` and `model` numbers, where `/proc/cpuinfo` gives them.
    pub family: Option<u32>,
    pub model: Option<u32>,
    pub arch: String,
    /// Logical processors the process may use.
    pub threads: usize,
    pub avx512f: bool,
    pub avx2: bool,
    pub fma: bool,
    /// The vector path the f32 kernels dispatch to on this host, after any `FEDSPINE_ISA` cap:
    /// `avx512`, `avx2`, `neon` or `scalar`.
    pub vector_path: String,
    /// The int8 dot-product path of the quantized-base kernels.
    pub int8_dot: String,
    /// The kernel of bf16 products (`precision = "bf16"` or `"auto"`), or `none`.
    pub bf16_kernel: String,
}

impl HostInfo {
    /// Reads the CPU's names and detects the kernels' paths.
    pub fn detect() -> HostInfo {
        let cpu = CpuInfo::detect();
        let (avx512f, avx2, fma) = x86_features();
        HostInfo {
            cpu_model: cpu.model_name,
            family: cpu.family,
            model: cpu.model,
            arch: std::env::consts::ARCH.to_string(),
            threads: std::thread::available_parallelism().map_or(1, |n| n.get()),
            avx512f,
            avx2,
            fma,
            vector_path: vector_path(cpu.isa).to_string(),
            int8_dot: cpu.dot.to_string(),
            bf16_kernel: Kernel::detect().map_or_else(|| "none".to_string(), |k| k.to_string()),
        }
    }

    /// `host.json` in `dir`.
    pub fn write_into(&self, dir: &std::path::Path) -> Result<(), crate::SimError> {
        let path = dir.join(HOST_FILE);
        std::fs::create_dir_all(dir).map_err(|e| crate::SimError::io(dir, e))?;
        let text = serde_json::to_string_pretty(self).unwrap_or_default() + "\n";
        std::fs::write(&path, text).map_err(|e| crate::SimError::io(&path, e))
    }

    /// That the runs already in `dir` (per its `host.json`, where it has one) were computed on
    /// this host's CPU class, before `compare --resume` adds to them: runs of another class
    /// are not draws of the same experiment (the kernels' arithmetic, and what `precision =
    /// "auto"` resolves to, differ between classes).
    pub fn check_resumable(&self, dir: &std::path::Path) -> Result<(), crate::SimError> {
        let path = dir.join(HOST_FILE);
        if !path.exists() {
            return Ok(());
        }
        let bad = |e: String| crate::SimError::Data(format!("{}: {e}", path.display()));
        let text = std::fs::read_to_string(&path).map_err(|e| crate::SimError::io(&path, e))?;
        let v: serde_json::Value = serde_json::from_str(&text).map_err(|e| bad(e.to_string()))?;
        let before = HostClass::from_json(&v).map_err(bad)?;
        let now = HostClass::from_json(&serde_json::to_value(self).unwrap_or_default())
            .map_err(|e| crate::SimError::Data(format!("this host: {e}")))?;
        match before.differs_from(&now) {
            None => Ok(()),
            Some((field, was, is)) => Err(crate::SimError::Config(format!(
                "{} holds runs from {field} {was}, and this host is {field} {is}: results \
                 differ between CPU classes, so they cannot be resumed here (resume on that \
                 class, or run the remaining seeds into another folder and `sim pool \
                 --across-classes` the two)",
                dir.display()
            ))),
        }
    }

    /// Before `compare --resume` into `dir`, whose runs leave `summaries` (one file each):
    /// `Ok(false)` when the folder's runs are of this host's class (or it has none yet);
    /// `Ok(true)` when another class wrote them but every run is on disk, so they are read back,
    /// none is run here and the folder keeps its `host.json`; else the refusal, with how many
    /// runs are missing.
    pub fn resume_foreign(
        &self,
        dir: &std::path::Path,
        summaries: &[std::path::PathBuf],
    ) -> Result<bool, crate::SimError> {
        // Only a class that differs may be read back; an unreadable `host.json` stays an error.
        let refused = match self.check_resumable(dir) {
            Ok(()) => return Ok(false),
            Err(crate::SimError::Config(why)) => why,
            Err(e) => return Err(e),
        };
        let missing = summaries.iter().filter(|f| !f.exists()).count();
        if missing == 0 {
            return Ok(true);
        }
        Err(crate::SimError::Config(format!(
            "{refused}; {missing} run(s) of this comparison are not on disk yet"
        )))
    }

    /// One line for terminals and Markdown.
    pub fn line(&self) -> String {
        let numbers = match (self.family, self.model) {
            (Some(f), Some(m)) => format!(" family {f} model {m}"),
            _ => String::new(),
        };
        format!(
            "{}{numbers} ({}, {} threads; vector path {}: AVX-512F {}, AVX2 {}, FMA {}; int8 dot {}; bf16 {})",
            self.cpu_model,
            self.arch,
            self.threads,
            self.vector_path,
            yes(self.avx512f),
            yes(self.avx2),
            yes(self.fma),
            self.int8_dot,
            self.bf16_kernel
        )
    }
}

fn vector_path(isa: Isa) -> &'static str {
    match isa {
        Isa::Avx512 => "avx512",
        Isa::Avx2Fma => "avx2",
        Isa::Neon => "neon",
        Isa::Portable => "scalar",
    }
}

fn yes(b: bool) -> &'static str {
    if b {
        "yes"
    } else {
        "no"
    }
}

/// The fields of a `host.json` that name a CPU class: the model name and vector path (always
/// written), and the family, model, int8 and bf16 paths (written since 2026-12-04; a file from
/// before leaves them out).
const CLASS_FIELDS: [&str; 6] = [
    "cpu_model",
    "vector_path",
    "family",
    "model",
    "int8_dot",
    "bf16_kernel",
];
/// Of [`CLASS_FIELDS`], those every `host.json` has.
const REQUIRED: [&str; 2] = ["cpu_model", "vector_path"];

/// A run's CPU class as its `host.json` recorded it: field name to value, as text.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostClass(pub BTreeMap<String, String>);

impl HostClass {
    /// The class fields of a `host.json` value; `Err` names a missing required field.
    pub fn from_json(host: &serde_json::Value) -> Result<HostClass, String> {
        let mut fields = BTreeMap::new();
        for k in CLASS_FIELDS {
            let v = match host.get(k) {
                Some(serde_json::Value::String(s)) => s.clone(),
                Some(serde_json::Value::Number(n)) => n.to_string(),
                _ if REQUIRED.contains(&k) => return Err(format!("no `{k}`")),
                _ => continue,
            };
            fields.insert(k.to_string(), v);
        }
        Ok(HostClass(fields))
    }

    /// The fields as `name value` pairs, for a report line.
    pub fn describe(&self) -> String {
        let fields: Vec<String> = self.0.iter().map(|(k, v)| format!("{k} {v}")).collect();
        fields.join(", ")
    }

    /// The first field both recorded with different values, with the two values; `None` when
    /// every field both recorded agrees (a field one of them predates is not compared).
    pub fn differs_from(&self, other: &HostClass) -> Option<(String, String, String)> {
        self.0.iter().find_map(|(k, v)| {
            let w = other.0.get(k)?;
            (v != w).then(|| (k.clone(), v.clone(), w.clone()))
        })
    }
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
    fn host_json_names_the_class_and_pooling_compares_what_both_recorded() {
        let h = HostInfo::detect();
        assert!(h.threads >= 1);
        for part in [&h.cpu_model, &h.vector_path, &h.int8_dot, &h.bf16_kernel] {
            assert!(h.line().contains(part.as_str()), "{}", h.line());
        }
        let json = serde_json::to_value(&h).unwrap();
        let class = HostClass::from_json(&json).unwrap();
        assert_eq!(class.differs_from(&class), None);
        // Two generations of one vendor line: same name and vector path, other model numbers.
        let zen = |model: u32, bf16: &str| {
            serde_json::json!({"cpu_model": "AMD EPYC", "vector_path": "avx512", "family": 26,
                "model": model, "int8_dot": "AVX-512 VNNI (vpdpbusd)", "bf16_kernel": bf16})
        };
        let (a, b) = (
            HostClass::from_json(&zen(2, "AVX-512-BF16 (vdpbf16ps)")).unwrap(),
            HostClass::from_json(&zen(17, "AVX-512-BF16 (vdpbf16ps)")).unwrap(),
        );
        assert_eq!(
            a.differs_from(&b),
            Some(("model".into(), "2".into(), "17".into()))
        );
        let no_bf16 = HostClass::from_json(&zen(2, "none")).unwrap();
        assert_eq!(a.differs_from(&no_bf16).unwrap().0, "bf16_kernel");
        // A file written before the numbers and paths were recorded is compared on what it has.
        let old = HostClass::from_json(
            &serde_json::json!({"cpu_model": "AMD EPYC", "vector_path": "avx512", "threads": 2}),
        )
        .unwrap();
        assert_eq!(old.differs_from(&a), None);
        assert_eq!(a.differs_from(&old), None);
        let avx2 = serde_json::json!({"cpu_model": "AMD EPYC", "vector_path": "avx2"});
        assert_eq!(
            old.differs_from(&HostClass::from_json(&avx2).unwrap()),
            Some(("vector_path".into(), "avx512".into(), "avx2".into()))
        );
        let err = HostClass::from_json(&serde_json::json!({"vector_path": "avx2"})).unwrap_err();
        assert!(err.contains("cpu_model"), "{err}");
    }
}
