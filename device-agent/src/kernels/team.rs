//! A decoding team: helper threads that wait for a decoded token's next parallel section by
//! spinning instead of sleeping, so the ~150 small sections of a token (each 20-100 µs of
//! work) do not each pay a thread's wake-up through the kernel, which rayon's idle workers
//! need once they have gone to sleep between sections.
//!
//! A [`Team`] is made for one decoding session ([`crate::model::HostDecoder`]) and entered for
//! each token ([`Team::enter`]); inside, [`for_each`] and [`map`] run their tasks on the
//! calling thread and the team's helpers. Called with no team entered on this thread (every
//! other caller: training, evaluation, the simulator's many agents) they are rayon's parallel
//! iterators. Tasks are claimed one index at a time from a shared counter, and each task's
//! result goes to its own place, so which thread ran a task never changes a value.
//!
//! A helper spins for at most [`SPIN`] after its last section, then parks until the next one:
//! a team left idle (between prompts, or while the caller samples and detokenizes for long)
//! costs no CPU. Dropping the team stops and joins its helpers.

use std::cell::{Cell, UnsafeCell};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use rayon::prelude::*;

/// How long an idle helper keeps spinning before it parks.
pub const SPIN: Duration = Duration::from_micros(300);

/// One parallel section: `n` tasks of `f`, claimed through `next`, counted in `done`.
struct Section {
    n: usize,
    next: AtomicUsize,
    done: AtomicUsize,
    panicked: AtomicBool,
    /// The caller's task function with its lifetime erased: called only for a claimed index
    /// below `n`, and the caller does not return before every such call has finished.
    f: *const (dyn Fn(usize) + Sync + 'static),
}

// SAFETY: `f` is `Sync` and is only called while the section's caller waits (see `Section`);
// the counters are atomics.
#[allow(unsafe_code)]
unsafe impl Send for Section {}
// SAFETY: as above.
#[allow(unsafe_code)]
unsafe impl Sync for Section {}

impl Section {
    /// Claim and run tasks until none is left; a task that panics is counted as done and
    /// flagged, so the caller never waits for it forever.
    fn work(&self) {
        loop {
            let i = self.next.fetch_add(1, Ordering::Relaxed);
            if i >= self.n {
                return;
            }
            // SAFETY: `i < n` was claimed here and only here, and the section's caller waits
            // for `done == n` before the borrow behind `f` ends.
            #[allow(unsafe_code)]
            let f = unsafe { &*self.f };
            if catch_unwind(AssertUnwindSafe(|| f(i))).is_err() {
                self.panicked.store(true, Ordering::Relaxed);
            }
            self.done.fetch_add(1, Ordering::Release);
        }
    }
}

/// What the caller and the helpers share.
struct Shared {
    /// Bumped once per published section; helpers watch it.
    epoch: AtomicUsize,
    section: Mutex<Option<Arc<Section>>>,
    /// Per helper: parked (or about to park), so the next section must unpark it.
    parked: Vec<AtomicBool>,
    quit: AtomicBool,
}

/// Helper threads for one decoding session (see the module's comment).
pub struct Team {
    shared: Arc<Shared>,
    helpers: Vec<JoinHandle<()>>,
}

thread_local! {
    /// The team entered on this thread, if any (null otherwise).
    static CURRENT: Cell<*const Team> = const { Cell::new(std::ptr::null()) };
}

impl Team {
    /// A team of `threads - 1` helpers beside its caller (none for `threads <= 1`: then
    /// every section runs on the caller alone).
    pub fn new(threads: usize) -> Team {
        let helpers = threads.saturating_sub(1);
        let shared = Arc::new(Shared {
            epoch: AtomicUsize::new(0),
            section: Mutex::new(None),
            parked: (0..helpers).map(|_| AtomicBool::new(false)).collect(),
            quit: AtomicBool::new(false),
        });
        let helpers = (0..helpers)
            .map(|h| {
                let s = Arc::clone(&shared);
                std::thread::Builder::new()
                    .name(format!("decode-helper-{h}"))
                    .spawn(move || helper(&s, h))
                    .expect("spawning a decode helper thread")
            })
            .collect();
        Team { shared, helpers }
    }

    /// The team for this process's rayon pool size.
    pub fn for_pool() -> Team {
        Team::new(rayon::current_num_threads())
    }

    /// Run `body` on this thread with the team entered: [`for_each`] and [`map`] called
    /// inside it (on this thread) use the team.
    pub fn enter<R>(&self, body: impl FnOnce() -> R) -> R {
        struct Restore(*const Team);
        impl Drop for Restore {
            fn drop(&mut self) {
                CURRENT.with(|c| c.set(self.0));
            }
        }
        let _restore = Restore(CURRENT.with(|c| c.replace(self as *const Team)));
        body()
    }

    /// Run `f(0..n)` on this thread and the helpers; returns when every task has finished.
    fn run(&self, n: usize, f: &(dyn Fn(usize) + Sync)) {
        if self.helpers.is_empty() || n <= 1 {
            (0..n).for_each(f);
            return;
        }
        // SAFETY: only the lifetime is erased; this function does not return (nor unwind:
        // every task runs under `catch_unwind`) before `done == n`, after which no thread
        // calls `f` again (every index below `n` has been claimed and run).
        #[allow(unsafe_code)]
        let f: *const (dyn Fn(usize) + Sync + 'static) = unsafe { std::mem::transmute(f) };
        let section = Arc::new(Section {
            n,
            next: AtomicUsize::new(0),
            done: AtomicUsize::new(0),
            panicked: AtomicBool::new(false),
            f,
        });
        *self
            .shared
            .section
            .lock()
            .unwrap_or_else(|e| e.into_inner()) = Some(Arc::clone(&section));
        self.shared.epoch.fetch_add(1, Ordering::SeqCst);
        for (p, h) in self.shared.parked.iter().zip(&self.helpers) {
            if p.load(Ordering::SeqCst) {
                h.thread().unpark();
            }
        }
        section.work();
        while section.done.load(Ordering::Acquire) < n {
            std::hint::spin_loop();
        }
        if section.panicked.load(Ordering::Relaxed) {
            panic!("a task of a parallel decoding section panicked");
        }
    }
}

impl Drop for Team {
    fn drop(&mut self) {
        self.shared.quit.store(true, Ordering::SeqCst);
        for h in &self.helpers {
            h.thread().unpark();
        }
        for h in self.helpers.drain(..) {
            // A helper only runs tasks under `catch_unwind`: joining cannot fail but for a
            // bug, which is not worth a second panic while dropping.
            let _ = h.join();
        }
    }
}

/// A helper's loop: wait for a new epoch (spinning, then parked), run the section, repeat.
fn helper(s: &Shared, me: usize) {
    let mut seen = 0;
    loop {
        let start = Instant::now();
        let mut spins = 0u32;
        loop {
            if s.quit.load(Ordering::SeqCst) {
                return;
            }
            if s.epoch.load(Ordering::Acquire) != seen {
                break;
            }
            spins = spins.wrapping_add(1);
            if spins.is_multiple_of(256) && start.elapsed() > SPIN {
                // Announce the park, then look once more: the caller bumps the epoch before
                // it reads `parked`, so one of the two sees the other.
                s.parked[me].store(true, Ordering::SeqCst);
                if s.epoch.load(Ordering::SeqCst) == seen && !s.quit.load(Ordering::SeqCst) {
                    std::thread::park();
                }
                s.parked[me].store(false, Ordering::SeqCst);
            } else {
                std::hint::spin_loop();
            }
        }
        seen = s.epoch.load(Ordering::Acquire);
        let section = s.section.lock().unwrap_or_else(|e| e.into_inner()).clone();
        if let Some(section) = section {
            section.work();
        }
    }
}

/// The team entered on this thread, taken out for the duration of `with` (a task that calls
/// [`for_each`] again runs that inner section on rayon, not on the busy team).
fn with_team<R>(with: impl FnOnce(Option<&Team>) -> R) -> R {
    let t = CURRENT.with(|c| c.replace(std::ptr::null()));
    struct Put(*const Team);
    impl Drop for Put {
        fn drop(&mut self) {
            CURRENT.with(|c| c.set(self.0));
        }
    }
    let _put = Put(t);
    // SAFETY: `CURRENT` is non-null only inside `Team::enter` on this thread, which borrows
    // the team for its whole duration; this call runs within it.
    #[allow(unsafe_code)]
    let team = unsafe { t.as_ref() };
    with(team)
}

/// Whether a team is entered on this thread (and not busy with the section this call is in):
/// a section costs its threads a few microseconds there (2.7 µs for 16 empty tasks on the Intel
/// AMX host), against a rayon worker's wake-up elsewhere, so callers may split smaller work on
/// a team.
pub fn entered() -> bool {
    CURRENT.with(|c| !c.get().is_null())
}

/// Slots written by exactly one task each (the task that claimed the index).
struct Slots<T>(Vec<UnsafeCell<Option<T>>>);

// SAFETY: each slot is touched by one task only (indices are claimed once), and `T` is `Send`.
#[allow(unsafe_code)]
unsafe impl<T: Send> Sync for Slots<T> {}

impl<T> Slots<T> {
    fn new(items: impl Iterator<Item = Option<T>>) -> Slots<T> {
        Slots(items.map(UnsafeCell::new).collect())
    }

    /// Takes what slot `i` holds, leaving it empty.
    ///
    /// SAFETY (caller): no other thread touches slot `i` meanwhile.
    #[allow(unsafe_code)]
    unsafe fn take(&self, i: usize) -> Option<T> {
        // SAFETY: exclusive per the caller's promise; the borrow ends within this call.
        unsafe { (*self.0[i].get()).take() }
    }

    /// Puts `value` in slot `i`.
    ///
    /// SAFETY (caller): no other thread touches slot `i` meanwhile.
    #[allow(unsafe_code)]
    unsafe fn put(&self, i: usize, value: T) {
        // SAFETY: exclusive per the caller's promise; the borrow ends within this call.
        unsafe { *self.0[i].get() = Some(value) }
    }
}

/// `f` over every item: on the entered team, else on rayon's pool.
pub fn for_each<T: Send>(items: Vec<T>, f: impl Fn(T) + Sync) {
    with_team(|team| match team {
        Some(team) => {
            let n = items.len();
            let slots = Slots::new(items.into_iter().map(Some));
            // SAFETY: the team runs each index once, so slot `i` is this task's alone.
            #[allow(unsafe_code)]
            let task = |i: usize| {
                if let Some(item) = unsafe { slots.take(i) } {
                    f(item);
                }
            };
            team.run(n, &task);
        }
        None => items.into_par_iter().for_each(&f),
    })
}

/// `f(i)` for `i` in `0..n`, in order: on the entered team, else on rayon's pool.
pub fn map<R: Send>(n: usize, f: impl Fn(usize) -> R + Sync) -> Vec<R> {
    with_team(|team| match team {
        Some(team) => {
            let slots = Slots::new((0..n).map(|_| None));
            // SAFETY: the team runs each index once, so slot `i` is this task's alone.
            #[allow(unsafe_code)]
            let task = |i: usize| {
                let value = f(i);
                unsafe { slots.put(i, value) }
            };
            team.run(n, &task);
            slots
                .0
                .into_iter()
                .map(|s| s.into_inner().expect("every task ran"))
                .collect()
        }
        None => (0..n).into_par_iter().map(&f).collect(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sections_on_a_team_give_what_rayon_gives_in_order() {
        let team = Team::new(3);
        let square = |i: usize| (i * i) as u64;
        let alone = map(1000, square);
        let (on_team, summed) = team.enter(|| {
            let m = map(1000, square);
            let mut out = vec![0u64; 100];
            for_each(out.chunks_mut(10).enumerate().collect(), |(c, o)| {
                for (k, v) in o.iter_mut().enumerate() {
                    *v = (c * 10 + k) as u64;
                }
            });
            (m, out)
        });
        assert_eq!(on_team, alone);
        assert_eq!(summed, (0..100).collect::<Vec<u64>>());
        // Many short sections back to back, and again after the helpers have parked.
        for round in 0..2 {
            let total: u64 = team.enter(|| {
                (0..200)
                    .map(|r| map(7, |i| (i + r) as u64).iter().sum::<u64>())
                    .sum()
            });
            assert_eq!(
                total,
                (0..200u64).map(|r| 21 + 7 * r).sum::<u64>(),
                "round {round}"
            );
            std::thread::sleep(SPIN * 4);
        }
    }

    #[test]
    fn a_panicking_task_reaches_the_caller_and_the_team_still_works() {
        let team = Team::new(2);
        let hit = std::panic::catch_unwind(AssertUnwindSafe(|| {
            team.enter(|| map(64, |i| if i == 33 { panic!("task 33") } else { i }))
        }));
        assert!(hit.is_err());
        assert_eq!(team.enter(|| map(5, |i| i + 1)), vec![1, 2, 3, 4, 5]);
        // Nested sections run on rayon: no deadlock on the busy team.
        let nested = team.enter(|| map(4, |i| map(3, |j| i * j).iter().sum::<usize>()));
        assert_eq!(nested, vec![0, 3, 6, 9]);
    }

    #[test]
    fn two_callers_on_one_team_each_get_their_sections() {
        let team = Team::new(2);
        let sums: Vec<u64> = std::thread::scope(|sc| {
            let runs: Vec<_> = (0..2u64)
                .map(|t| {
                    let team = &team;
                    sc.spawn(move || {
                        team.enter(|| {
                            (0..500u64)
                                .map(|r| map(9, |i| i as u64 + r + t).iter().sum::<u64>())
                                .sum()
                        })
                    })
                })
                .collect();
            runs.into_iter().map(|h| h.join().unwrap()).collect()
        });
        let expect = |t: u64| (0..500u64).map(|r| 36 + 9 * (r + t)).sum::<u64>();
        assert_eq!(sums, vec![expect(0), expect(1)]);
    }
}
