//! Independent pieces of real-mode compute run side by side: each worker thread has its own
//! rayon pool, so a piece's products split over that pool's threads only, and the pieces (the
//! devices of a panel or final evaluation) share the host's cores instead of taking turns on
//! all of them. On two cores the `gemm` crate and our kernels keep two threads busy only about
//! 1.55 times as well as one (a real-mode run at `RAYON_NUM_THREADS=1` took 1.55x as long as
//! at 2, BENCHMARKS.md), and burn's element-wise operations run on one thread, so two
//! evaluations on one thread each finish sooner than one after the other on two.
//!
//! A piece's arithmetic does not depend on how many threads its pool has: our kernels and the
//! `gemm` crate split a product's rows and columns over threads, not its reduced dimension, so
//! each output cell is summed by one thread in the same order, and a piece gives the same bits
//! alone on all cores or beside others on fewer (the simulator's test
//! `side_by_side_evaluations_keep_reports` holds whole reports to this on the tiny model; a
//! spam run on the real model gave the same reports at one and two threads). The results come
//! back in the order of the pieces.
//!
//! The library reads no clock: wall times, when a clock is injected, are measured per piece
//! for the binary's wall-time ledger.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;

use crate::wall_profile::WallClock;

/// Most pieces run at once by default: each holds a device's model, its tuner and its
/// activations (about 1 to 1.5 GB for SmolLM2-135M in fp32: the simulator's default preset cut
/// to 3 rounds peaked at 3.0 GiB with two workers, 1.5 GiB with one), so this bounds the extra
/// memory; a host with more cores gives each worker more threads.
pub const MAX_DEFAULT_WORKERS: usize = 2;

/// How many pieces run at once, on how many hardware threads in all.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Workers {
    pub workers: usize,
    pub cores: usize,
}

impl Default for Workers {
    /// One piece at a time (the library's default; the binary sizes it to the host).
    fn default() -> Self {
        Workers {
            workers: 1,
            cores: 1,
        }
    }
}

/// Memory one more evaluation in flight takes, about: a device's model, its tuner and its
/// activations (the 3-round default preset peaked 1.5 GiB higher with two workers than with
/// one, BENCHMARKS.md).
pub const BYTES_PER_EXTRA_WORKER: u64 = 3 << 29;

/// Memory left to the rest of a run (the base model, every device's data, one evaluation: the
/// default preset peaks at about 2 GiB) and to the system before a second worker is allowed.
pub const RESERVED_BYTES: u64 = 6 << 30;

impl Workers {
    /// For a host with `cores` hardware threads and `ram_bytes` of memory: one worker per core
    /// up to [`MAX_DEFAULT_WORKERS`], and no more than the memory above [`RESERVED_BYTES`] holds
    /// at [`BYTES_PER_EXTRA_WORKER`] each beyond the first.
    pub fn for_host(cores: usize, ram_bytes: u64) -> Self {
        let by_memory = 1 + (ram_bytes.saturating_sub(RESERVED_BYTES) / BYTES_PER_EXTRA_WORKER);
        Workers {
            workers: cores
                .clamp(1, MAX_DEFAULT_WORKERS)
                .min(usize::try_from(by_memory).unwrap_or(usize::MAX)),
            cores: cores.max(1),
        }
    }

    /// For this host ([`std::thread::available_parallelism`], the machine's memory).
    pub fn for_this_host() -> Self {
        Self::for_host(
            std::thread::available_parallelism().map_or(1, |n| n.get()),
            device_agent::client::machine_ram_bytes(),
        )
    }
}

/// Each piece's result and its wall milliseconds (0 without a clock), in the order of
/// `pieces`, and the wall milliseconds of the whole batch.
pub struct Ran<R> {
    pub results: Vec<(R, f64)>,
    pub elapsed_ms: f64,
}

/// Runs `f` on every piece, `workers` at a time, sharing `cores` hardware threads between them
/// (at least one each), the pieces of larger `size` first (so no long piece starts last and
/// runs alone while the other workers idle). With one worker, or one piece, the pieces run in
/// order on the calling thread and its pool, as any other compute does.
pub fn run<T: Sync, R: Send>(
    pieces: &[T],
    workers: usize,
    cores: usize,
    clock: Option<WallClock>,
    size: impl Fn(&T) -> u64,
    f: impl Fn(&T) -> R + Sync,
) -> Ran<R> {
    let timed = |piece: &T| -> (R, f64) {
        let t0 = clock.map(|c| c());
        let r = f(piece);
        let ms = clock.zip(t0).map_or(0.0, |(c, t0)| c() - t0);
        (r, ms)
    };
    let t0 = clock.map(|c| c());
    let workers = workers.min(pieces.len());
    let results = if workers <= 1 {
        pieces.iter().map(timed).collect()
    } else {
        let threads = (cores / workers).max(1);
        let mut order: Vec<usize> = (0..pieces.len()).collect();
        order.sort_by_key(|&k| std::cmp::Reverse(size(&pieces[k])));
        let next = AtomicUsize::new(0);
        let slots: Vec<Mutex<Option<(R, f64)>>> = pieces.iter().map(|_| Mutex::new(None)).collect();
        std::thread::scope(|s| {
            for _ in 0..workers {
                s.spawn(|| {
                    // Without a pool of its own (the OS refused a thread) a worker's products
                    // use the global pool: slower, the same bits.
                    let pool = rayon::ThreadPoolBuilder::new().num_threads(threads).build();
                    while let Some(&k) = order.get(next.fetch_add(1, Ordering::Relaxed)) {
                        let piece = &pieces[k];
                        let out = match &pool {
                            Ok(p) => p.install(|| timed(piece)),
                            Err(_) => timed(piece),
                        };
                        *slots[k].lock().unwrap_or_else(|e| e.into_inner()) = Some(out);
                    }
                });
            }
        });
        // A worker that panicked has made `scope` panic above, so every slot is filled.
        slots
            .into_iter()
            .map(|m| {
                m.into_inner()
                    .unwrap_or_else(|e| e.into_inner())
                    .expect("every piece ran")
            })
            .collect()
    };
    let elapsed_ms = clock.zip(t0).map_or(0.0, |(c, t0)| c() - t0);
    Ran {
        results,
        elapsed_ms,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A clock that only moves forward, one millisecond a reading (the library reads no
    /// clock, nor do its tests).
    fn ms() -> f64 {
        static TICKS: AtomicUsize = AtomicUsize::new(0);
        TICKS.fetch_add(1, Ordering::Relaxed) as f64
    }

    #[test]
    fn results_come_back_in_order_whatever_the_workers() {
        let pieces: Vec<u64> = (0..23).collect();
        // Uneven work, so pieces finish out of order.
        let f = |&p: &u64| -> u64 { (0..(23 - p) * 20_000).fold(p, |a, x| a.wrapping_mul(31) ^ x) };
        let serial: Vec<u64> = pieces.iter().map(f).collect();
        for workers in [1, 2, 3, 8, 40] {
            let ran = run(&pieces, workers, 2, Some(ms), |&p| p % 5, f);
            let got: Vec<u64> = ran.results.iter().map(|(r, _)| *r).collect();
            assert_eq!(got, serial, "{workers} workers");
            assert!(ran.results.iter().all(|(_, t)| *t >= 0.0));
            assert!(ran.elapsed_ms >= 0.0);
        }
    }

    #[test]
    fn each_worker_has_its_own_pool_of_the_cores_share() {
        let pieces = [(); 6];
        let ran = run(&pieces, 2, 4, None, |_| 0, |_| rayon::current_num_threads());
        assert!(ran.results.iter().all(|(n, _)| *n == 2));
        let ran = run(&pieces, 3, 2, None, |_| 0, |_| rayon::current_num_threads());
        assert!(ran.results.iter().all(|(n, _)| *n == 1));
        // One worker: the caller's pool.
        let ran = run(&pieces, 1, 2, None, |_| 0, |_| rayon::current_num_threads());
        assert!(ran
            .results
            .iter()
            .all(|(n, _)| *n == rayon::current_num_threads()));
        assert_eq!(ran.elapsed_ms, 0.0);
    }

    #[test]
    fn host_workers_are_bounded_by_cores_and_memory() {
        const GIB: u64 = 1 << 30;
        assert_eq!(Workers::for_host(0, 24 * GIB), Workers::default());
        assert_eq!(Workers::for_host(2, 24 * GIB).workers, 2);
        assert_eq!(
            Workers::for_host(64, 512 * GIB).workers,
            MAX_DEFAULT_WORKERS
        );
        assert_eq!(Workers::for_host(64, 512 * GIB).cores, 64);
        // Too little memory for a second model in flight: one at a time, on every core.
        assert_eq!(Workers::for_host(8, 4 * GIB).workers, 1);
        assert_eq!(Workers::for_host(8, 7 * GIB).workers, 1);
        assert_eq!(Workers::for_host(8, 4 * GIB).cores, 8);
        assert_eq!(Workers::for_host(8, 8 * GIB).workers, 2);
        assert_eq!(Workers::for_host(2, u64::MAX).workers, 2);
    }
}
