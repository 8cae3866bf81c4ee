//! A terminal progress bar for simulation runs (indicatif, rounds done with an ETA from wall
//! time); hidden when stderr is not a terminal, where round lines go to the log instead. Also the
//! throughput lines printed after a run.

use std::io::IsTerminal;

use indicatif::{ProgressBar, ProgressStyle};

use crate::driver::Observer;
use crate::report::{Report, RoundRecord};

/// Draws one bar per run.
pub struct Progress {
    bar: ProgressBar,
    label: String,
    jobs: u64,
}

impl Progress {
    pub fn new(label: &str, rounds: u64) -> Self {
        let bar = if std::io::stderr().is_terminal() {
            ProgressBar::new(rounds)
        } else {
            ProgressBar::hidden()
        };
        let style = ProgressStyle::with_template(
            "{prefix:>12} [{bar:30}] {pos}/{len} rounds, {elapsed} elapsed, ETA {eta} {msg}",
        )
        .unwrap_or_else(|_| ProgressStyle::default_bar())
        .progress_chars("=> ");
        bar.set_style(style);
        bar.set_prefix(label.to_string());
        Progress {
            bar,
            label: label.to_string(),
            jobs: 0,
        }
    }

    /// Start a new run's bar (for `compare`).
    pub fn restart(&mut self, label: &str, rounds: u64) {
        self.bar.finish_and_clear();
        *self = Progress::new(label, rounds);
    }

    pub fn finish(&self) {
        self.bar.finish_and_clear();
    }
}

impl Observer for Progress {
    fn round_closed(&mut self, r: &RoundRecord, total: u64) {
        self.bar.set_length(total);
        self.bar.set_position(r.round);
        let eval = r
            .eval
            .as_ref()
            .map(|e| format!(", panel accuracy {:.4}", e.accuracy))
            .unwrap_or_default();
        let line = format!("{}: round {}/{total} at {:.1} virtual min: {} of {} answered, {} missed, {} dropped, {} failed{eval}", self.label, r.round, r.closed_s / 60.0, r.accepted, r.selected, r.missed, r.dropped, r.failed);
        self.bar
            .set_message(format!("{} local rounds trained", self.jobs));
        if self.bar.is_hidden() {
            tracing::info!("{line}");
        } else {
            self.bar.println(line);
        }
    }

    fn job_started(&mut self) {
        self.jobs += 1;
        if self.jobs.is_multiple_of(4) {
            self.bar
                .set_message(format!("{} local rounds trained", self.jobs));
        }
    }

    fn note(&mut self, line: &str) {
        if self.bar.is_hidden() {
            tracing::info!("{line}");
        } else {
            self.bar.println(line);
        }
    }
}

/// The bar restarted at each run of a comparison over seeds: a note (the seed and entry that
/// start) becomes the new bar's label.
pub struct SeedProgress<'a> {
    pub inner: &'a mut Progress,
    pub rounds: u64,
}

impl Observer for SeedProgress<'_> {
    fn round_closed(&mut self, record: &RoundRecord, total: u64) {
        self.inner.round_closed(record, total);
    }
    fn job_started(&mut self) {
        self.inner.job_started();
    }
    fn note(&mut self, line: &str) {
        self.inner.restart(line, self.rounds);
    }
}

/// Peak resident set size of this process, from the kernel (Linux), in MiB.
fn peak_rss_mib() -> Option<f64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kb: f64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb / 1024.0)
}

/// After a run or comparison, on stderr: wall time loading and simulating, device-rounds
/// trained and their rate, and the process's peak resident memory.
pub fn print_throughput(reports: &[Report], load_s: f64, run_s: f64) {
    let jobs: u64 = reports.iter().map(|r| r.summary.jobs_trained).sum();
    let mode = reports
        .first()
        .map(|r| r.summary.mode.as_str())
        .unwrap_or("real");
    eprintln!(
        "wall clock: {load_s:.1} s loading, {run_s:.1} s simulating; {jobs} device-rounds trained"
    );
    if run_s > 0.0 {
        if mode == "surrogate" {
            eprintln!(
                "throughput: {:.1} device-rounds per second (surrogate mode)",
                jobs as f64 / run_s
            );
        } else {
            eprintln!(
                "throughput: {:.0} device-rounds per hour (real mode)",
                jobs as f64 / run_s * 3600.0
            );
        }
    }
    if let Some(m) = peak_rss_mib() {
        eprintln!("peak resident memory: {m:.0} MiB");
    }
}
