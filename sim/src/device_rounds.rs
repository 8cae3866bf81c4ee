//! The recorded device-round dataset (`device_rounds.jsonl`): every real-mode local round's
//! inputs (arm, sparsity, steps, local data size and skew) and outcomes (held-out loss and
//! accuracy before and after, update norm, measured compute), one JSON line each. `sim record`
//! appends designed grids of arms to it; `sim fit-surrogate` reads it, with each input file's
//! SHA-256 for the parameters' provenance.
//!
//! `measured_compute_ms` is the one wall-clock field, present when the binary gives the run a
//! clock (the library reads none): this file is a dataset, not a report, and the same seed gives
//! the same file except for it.

use std::io::Write as _;
use std::path::{Path, PathBuf};

use device_agent::job::LocalData;
use device_agent::lora::HostFactors;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::error::SimError;

/// File name of the dataset inside a run folder.
pub const FILE_NAME: &str = "device_rounds.jsonl";

/// One device's local round: what went in and what came out.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DeviceRound {
    /// Workload (`spam`, `sotu`, `synthetic`, ...).
    pub workload: String,
    /// Experiment seed and strategy of the run that recorded it.
    pub seed: u64,
    pub strategy: String,
    pub round: u64,
    /// Device index (0-based) and its hardware class.
    pub device: u64,
    pub class: String,
    /// The arm played.
    pub prune_ratio: f64,
    pub rank: u32,
    /// Non-embedding sparsity before and after the round.
    pub sparsity_before: f64,
    pub sparsity_after: f64,
    pub steps: u64,
    pub batch: u64,
    /// Training items (examples or windows) on the device, and their tokens.
    pub data_items: u64,
    pub data_tokens: u64,
    /// Classification: share of positive (spam) labels in the device's training items.
    pub label_share: Option<f64>,
    /// Held-out loss (nats) and accuracy on the device's own held-out items, before the round
    /// (starting adapter) and after it.
    #[serde(deserialize_with = "crate::nan_json::f64_or_nan")]
    pub loss_before: f64,
    #[serde(deserialize_with = "crate::nan_json::f64_or_nan")]
    pub loss_after: f64,
    #[serde(deserialize_with = "crate::nan_json::f64_or_nan")]
    pub accuracy_before: f64,
    #[serde(deserialize_with = "crate::nan_json::f64_or_nan")]
    pub accuracy_after: f64,
    /// `sqrt(sum over layers |(alpha / rank) B A|_F^2)` of the adapter the round produced.
    #[serde(deserialize_with = "crate::nan_json::f64_or_nan")]
    pub update_norm: f64,
    /// Wall-clock milliseconds of the local round (training and its two evaluations), when the
    /// binary gave the run a clock.
    pub measured_compute_ms: Option<f64>,
}

impl DeviceRound {
    /// Whether every number is finite and in range (a hostile or truncated line fails).
    pub fn check(&self) -> Result<(), String> {
        let nums = [
            self.prune_ratio,
            self.sparsity_before,
            self.sparsity_after,
            self.loss_before,
            self.loss_after,
            self.accuracy_before,
            self.accuracy_after,
            self.update_norm,
            self.measured_compute_ms.unwrap_or(0.0),
        ];
        if nums.iter().any(|x| !x.is_finite()) {
            return Err("a number is not finite".into());
        }
        let unit = 0.0..=1.0;
        if !unit.contains(&self.sparsity_before)
            || !unit.contains(&self.sparsity_after)
            || !unit.contains(&self.accuracy_before)
            || !unit.contains(&self.accuracy_after)
            || self.label_share.is_some_and(|x| !unit.contains(&x))
        {
            return Err("a sparsity, accuracy or label share is outside [0, 1]".into());
        }
        if self.loss_before < 0.0 || self.loss_after < 0.0 || self.update_norm < 0.0 {
            return Err("a loss or norm is negative".into());
        }
        if self.rank == 0 || self.steps == 0 {
            return Err("rank and steps must be positive".into());
        }
        Ok(())
    }
}

/// What a device's local data looks like, for the dataset.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct DataStats {
    pub items: u64,
    pub tokens: u64,
    pub label_share: Option<f64>,
}

/// Size and skew of `data`'s training part.
pub fn data_stats(data: &LocalData) -> DataStats {
    match data {
        LocalData::Lm(s) => DataStats {
            items: s.train.len() as u64,
            tokens: s.train.iter().map(|w| w.len() as u64).sum(),
            label_share: None,
        },
        LocalData::Masked(s) => DataStats {
            items: s.train.len() as u64,
            tokens: (s.train.len() * s.seq_len) as u64,
            label_share: None,
        },
        LocalData::Cls { shard, .. } => {
            let n = shard.train.len();
            let pos = shard.train.iter().filter(|e| e.label).count();
            DataStats {
                items: n as u64,
                tokens: shard.train.iter().map(|e| e.prompt.len() as u64).sum(),
                label_share: (n > 0).then(|| pos as f64 / n as f64),
            }
        }
    }
}

/// `sqrt(sum |scale B A|_F^2)` over `factors`, with `|B A|_F^2 = tr((B^T B)(A A^T))` so no
/// `dout x din` product is formed. `A` is `rank x cols_in`, `B` is `rows_out x rank`, row-major.
pub fn update_norm(factors: &[HostFactors], rank: usize, alpha: f64) -> f64 {
    if rank == 0 {
        return 0.0;
    }
    let scale = alpha / rank as f64;
    let mut total = 0.0f64;
    for f in factors {
        let (din, dout) = (f.cols_in, f.rows_out);
        if f.a.len() != rank * din || f.b.len() != dout * rank {
            continue;
        }
        // G_a = A A^T (rank x rank), G_b = B^T B (rank x rank).
        let mut ga = vec![0.0f64; rank * rank];
        let mut gb = vec![0.0f64; rank * rank];
        for i in 0..rank {
            for j in i..rank {
                let ai = &f.a[i * din..(i + 1) * din];
                let aj = &f.a[j * din..(j + 1) * din];
                let v: f64 = ai.iter().zip(aj).map(|(x, y)| *x as f64 * *y as f64).sum();
                ga[i * rank + j] = v;
                ga[j * rank + i] = v;
                let v: f64 = (0..dout)
                    .map(|o| f.b[o * rank + i] as f64 * f.b[o * rank + j] as f64)
                    .sum();
                gb[i * rank + j] = v;
                gb[j * rank + i] = v;
            }
        }
        let tr: f64 = ga.iter().zip(&gb).map(|(x, y)| x * y).sum();
        total += scale * scale * tr.max(0.0);
    }
    total.sqrt()
}

/// Append `rounds` to the dataset at `path` (created with its folder if missing).
pub fn append(path: &Path, rounds: &[DeviceRound]) -> Result<(), SimError> {
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).map_err(|e| SimError::io(dir, e))?;
    }
    let mut text = String::new();
    for r in rounds {
        text.push_str(&serde_json::to_string(r).unwrap_or_default());
        text.push('\n');
    }
    let mut f = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .map_err(|e| SimError::io(path, e))?;
    f.write_all(text.as_bytes())
        .map_err(|e| SimError::io(path, e))
}

/// The text of [`DeviceRound`]s as JSON lines.
pub fn to_jsonl(rounds: &[DeviceRound]) -> String {
    rounds
        .iter()
        .map(|r| serde_json::to_string(r).unwrap_or_default() + "\n")
        .collect()
}

/// One input file of a fit: where, its SHA-256 and how many device-rounds it held.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct InputFile {
    pub path: String,
    pub sha256: String,
    pub device_rounds: u64,
}

/// Read datasets (files, or run folders holding `device_rounds.jsonl`); every line is checked.
pub fn read(paths: &[PathBuf]) -> Result<(Vec<DeviceRound>, Vec<InputFile>), SimError> {
    let mut all = Vec::new();
    let mut inputs = Vec::new();
    for p in paths {
        let path = if p.is_dir() {
            p.join(FILE_NAME)
        } else {
            p.clone()
        };
        let bytes = std::fs::read(&path).map_err(|e| SimError::io(&path, e))?;
        let text = std::str::from_utf8(&bytes)
            .map_err(|e| SimError::Surrogate(format!("{}: not UTF-8: {e}", path.display())))?;
        let mut n = 0u64;
        for (k, line) in text.lines().enumerate() {
            if line.trim().is_empty() {
                continue;
            }
            let r: DeviceRound = serde_json::from_str(line)
                .map_err(|e| SimError::Surrogate(format!("{}:{}: {e}", path.display(), k + 1)))?;
            r.check()
                .map_err(|e| SimError::Surrogate(format!("{}:{}: {e}", path.display(), k + 1)))?;
            all.push(r);
            n += 1;
        }
        inputs.push(InputFile {
            path: path.display().to_string(),
            sha256: hex(&Sha256::digest(&bytes)),
            device_rounds: n,
        });
    }
    Ok((all, inputs))
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use protocol::Proj;

    #[test]
    fn the_update_norm_matches_the_explicit_product() {
        let (rank, din, dout) = (2, 3, 2);
        let a = vec![1.0, 2.0, 0.0, -1.0, 0.5, 1.0];
        let b = vec![1.0, 0.0, 2.0, -1.0];
        let f = HostFactors {
            block: 0,
            proj: Proj::ALL[0],
            a: a.clone(),
            b: b.clone(),
            rows_out: dout,
            cols_in: din,
        };
        let mut want = 0.0f64;
        for o in 0..dout {
            for i in 0..din {
                let v: f32 = (0..rank).map(|k| b[o * rank + k] * a[k * din + i]).sum();
                want += (v as f64 * 4.0).powi(2);
            }
        }
        let got = update_norm(&[f], rank, 8.0);
        assert!((got - want.sqrt()).abs() < 1e-9, "{got} vs {}", want.sqrt());
    }

    #[test]
    fn a_line_out_of_range_is_refused_with_its_file_and_line() {
        let tmp = tempfile::Builder::new()
            .prefix("fedspine-dr-")
            .tempdir()
            .unwrap();
        let dir = tmp.path().to_path_buf();
        let good = DeviceRound {
            workload: "spam".into(),
            seed: 1,
            strategy: "fixed-prune".into(),
            round: 1,
            device: 0,
            class: "c".into(),
            prune_ratio: 0.2,
            rank: 4,
            sparsity_before: 0.0,
            sparsity_after: 0.2,
            steps: 6,
            batch: 2,
            data_items: 10,
            data_tokens: 500,
            label_share: Some(0.3),
            loss_before: 1.0,
            loss_after: 0.5,
            accuracy_before: 0.5,
            accuracy_after: 0.8,
            update_norm: 1.0,
            measured_compute_ms: Some(10.0),
        };
        let bad = DeviceRound {
            accuracy_after: 2.0,
            ..good.clone()
        };
        let path = dir.join(FILE_NAME);
        std::fs::remove_file(&path).ok();
        append(&path, &[good.clone(), bad]).unwrap();
        let err = read(std::slice::from_ref(&dir)).unwrap_err().to_string();
        assert!(err.contains("device_rounds.jsonl:2"), "{err}");
        assert!(err.contains("outside [0, 1]"), "{err}");
        std::fs::write(&path, to_jsonl(std::slice::from_ref(&good))).unwrap();
        let (rounds, inputs) = read(std::slice::from_ref(&path)).unwrap();
        assert_eq!(rounds, vec![good]);
        assert_eq!(inputs[0].device_rounds, 1);
    }
}
