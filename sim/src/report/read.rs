//! Reading a finished run folder back (`sim compare --resume`): a comparison over several
//! seeds in real mode runs for many hours, so a run already on disk is taken as it was
//! written instead of being run again. [`Report::write_to`] writes `summary.json` last and
//! removes an older one first, so a folder whose `summary.json` reads back whole holds every
//! file of one finished run; anything that does not read back is an error naming the file and
//! line, and the caller runs that seed and entry again.

use std::path::Path;

use serde::de::DeserializeOwned;
use serde::{Deserialize, Deserializer};

use super::{DeviceFinal, History, Report, RoundRecord, Summary, SUMMARY_FILE};
use crate::device_rounds::DeviceRound;
use crate::error::SimError;

/// [`DeviceFinal::history`], whose ratios may be NaN (`null`).
pub(super) fn history<'de, D: Deserializer<'de>>(d: D) -> Result<History, D::Error> {
    let v: Vec<(u64, Option<f64>, u32, String)> = Deserialize::deserialize(d)?;
    Ok(v.into_iter()
        .map(|(round, ratio, rank, outcome)| (round, ratio.unwrap_or(f64::NAN), rank, outcome))
        .collect())
}

fn bad(path: &Path, what: impl std::fmt::Display) -> SimError {
    SimError::Data(format!("{}: {what}", path.display()))
}

fn read_text(path: &Path) -> Result<String, SimError> {
    std::fs::read_to_string(path).map_err(|e| SimError::io(path, e))
}

/// One value per non-empty line.
fn read_lines<T: DeserializeOwned>(path: &Path) -> Result<Vec<T>, SimError> {
    let text = read_text(path)?;
    text.lines()
        .enumerate()
        .filter(|(_, line)| !line.trim().is_empty())
        .map(|(k, line)| {
            serde_json::from_str(line).map_err(|e| bad(path, format_args!("line {}: {e}", k + 1)))
        })
        .collect()
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct SummaryFile {
    summary: Summary,
    config: serde_json::Value,
}

impl Report {
    /// The report [`Report::write_to`] wrote into `dir`; an error names the file that is
    /// missing, does not parse, or disagrees with the summary.
    pub fn read_from(dir: &Path) -> Result<Report, SimError> {
        let path = dir.join(SUMMARY_FILE);
        let s: SummaryFile = serde_json::from_str(&read_text(&path)?).map_err(|e| bad(&path, e))?;
        let rounds: Vec<RoundRecord> = read_lines(&dir.join("rounds.jsonl"))?;
        let devices: Vec<DeviceFinal> = read_lines(&dir.join("devices.jsonl"))?;
        let dr_path = dir.join(crate::device_rounds::FILE_NAME);
        // As written, non-finite losses of a diverged round included (the dataset's own reader,
        // for fitting, refuses those lines).
        let device_rounds: Vec<DeviceRound> = if dr_path.exists() {
            read_lines(&dr_path)?
        } else {
            Vec::new()
        };
        if devices.len() != s.summary.devices {
            return Err(bad(
                &dir.join("devices.jsonl"),
                format_args!(
                    "{} devices where {} says {}",
                    devices.len(),
                    SUMMARY_FILE,
                    s.summary.devices
                ),
            ));
        }
        if rounds.len() as u64 != s.summary.rounds_closed {
            return Err(bad(
                &dir.join("rounds.jsonl"),
                format_args!(
                    "{} rounds where {} says {} closed",
                    rounds.len(),
                    SUMMARY_FILE,
                    s.summary.rounds_closed
                ),
            ));
        }
        Ok(Report {
            summary: s.summary,
            rounds,
            devices,
            config: s.config,
            device_rounds,
        })
    }
}
