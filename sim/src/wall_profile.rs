//! Where a real-mode run's wall time goes: a ledger the real trainer fills around its compute
//! (local rounds, evaluations, bringing models to s*) with the binary's injected wall clock, so
//! the binary can print compute against everything else (aggregation, slicing, encoding,
//! bookkeeping) after a run. Wall times never enter a report: reports stay byte-identical for
//! one seed.

use std::collections::BTreeMap;
use std::sync::Mutex;

/// A wall clock in milliseconds since an arbitrary start (injected by the binary: the library
/// reads no clock).
pub type WallClock = fn() -> f64;

/// Milliseconds and calls per part.
#[derive(Debug, Default)]
pub struct WallLedger {
    parts: Mutex<BTreeMap<&'static str, (f64, u64)>>,
}

impl WallLedger {
    /// Adds `ms` to `part`.
    pub fn add(&self, part: &'static str, ms: f64) {
        if let Ok(mut p) = self.parts.lock() {
            let e = p.entry(part).or_insert((0.0, 0));
            e.0 += ms;
            e.1 += 1;
        }
    }

    /// Runs `f`, charging its wall time to `part` when a clock is given.
    pub fn time<T>(
        ledger: Option<&WallLedger>,
        clock: Option<WallClock>,
        part: &'static str,
        f: impl FnOnce() -> T,
    ) -> T {
        match (ledger, clock) {
            (Some(l), Some(c)) => {
                let t0 = c();
                let out = f();
                l.add(part, c() - t0);
                out
            }
            _ => f(),
        }
    }

    /// Every part: (name, ms, calls), by name.
    pub fn parts(&self) -> Vec<(&'static str, f64, u64)> {
        self.parts
            .lock()
            .map(|p| p.iter().map(|(k, (ms, n))| (*k, *ms, *n)).collect())
            .unwrap_or_default()
    }

    /// A table of every part's share of `total_ms`, and the rest ("everything else").
    pub fn table(&self, total_ms: f64) -> String {
        let mut s = String::from("| part | wall s | calls | share |\n|---|---|---|---|\n");
        let mut counted = 0.0;
        for (name, ms, n) in self.parts() {
            counted += ms;
            s.push_str(&format!(
                "| {name} | {:.1} | {n} | {:.1}% |\n",
                ms / 1000.0,
                100.0 * ms / total_ms.max(1e-9)
            ));
        }
        let rest = (total_ms - counted).max(0.0);
        s.push_str(&format!(
            "| everything else (aggregation, slicing for the driver, encoding, bookkeeping, reports) | {:.1} | | {:.1}% |\n",
            rest / 1000.0,
            100.0 * rest / total_ms.max(1e-9)
        ));
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fake_clock() -> f64 {
        use std::sync::atomic::{AtomicU64, Ordering};
        static T: AtomicU64 = AtomicU64::new(0);
        T.fetch_add(5, Ordering::SeqCst) as f64
    }

    #[test]
    fn parts_are_charged_and_the_rest_is_reported() {
        let l = WallLedger::default();
        let v = WallLedger::time(Some(&l), Some(fake_clock), "train", || 7);
        assert_eq!(v, 7);
        l.add("eval", 10.0);
        l.add("eval", 20.0);
        let parts = l.parts();
        assert_eq!(parts[0], ("eval", 30.0, 2));
        assert_eq!(parts[1], ("train", 5.0, 1));
        let t = l.table(100.0);
        assert!(t.contains("| eval | 0.0 | 2 | 30.0% |"), "{t}");
        assert!(t.contains("| 65.0% |"), "{t}");
        // Without a clock nothing is charged.
        let m = WallLedger::default();
        WallLedger::time(Some(&m), None, "train", || ());
        assert!(m.parts().is_empty());
    }
}
