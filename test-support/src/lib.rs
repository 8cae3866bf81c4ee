//! Support shared by tests and benches: [`CountingAllocator`], a global allocator that counts
//! live heap bytes and their peak, both process-wide and per thread.
//!
//! Install it in a test or bench binary (it is a plain static, no unsafe code at the use site):
//!
//! ```text
//! #[global_allocator]
//! static GLOBAL: test_support::CountingAllocator = test_support::CountingAllocator;
//! ```
//!
//! Then measure with [`thread_peak_during`] (this thread only: parallel tests do not disturb
//! each other) or [`reset_peak`] and [`peak_bytes`] (every thread: benches that fan out).
//!
//! [`seeded_noise`] is the deterministic test input the kernel tests share.

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::sync::atomic::{AtomicUsize, Ordering};

/// Forwards every call to [`System`] and counts the bytes it hands out and takes back.
pub struct CountingAllocator;

static LIVE: AtomicUsize = AtomicUsize::new(0);
static PEAK: AtomicUsize = AtomicUsize::new(0);

thread_local! {
    static THREAD_LIVE: Cell<usize> = const { Cell::new(0) };
    static THREAD_PEAK: Cell<usize> = const { Cell::new(0) };
}

/// Bookkeeping for `size` more bytes. Touches only atomics and const-initialised thread-locals
/// without destructors, so it never allocates (no recursion into the allocator) and never
/// panics (`try_with` skips a thread-local that is already torn down).
fn grew(size: usize) {
    let now = LIVE.fetch_add(size, Ordering::Relaxed) + size;
    PEAK.fetch_max(now, Ordering::Relaxed);
    let _ = THREAD_LIVE.try_with(|live| {
        let now = live.get() + size;
        live.set(now);
        let _ = THREAD_PEAK.try_with(|peak| peak.set(peak.get().max(now)));
    });
}

/// Bookkeeping for `size` fewer bytes (same guarantees as [`grew`]). A block freed on another
/// thread than the one that allocated it can take a thread's count below zero: it saturates.
fn shrank(size: usize) {
    LIVE.fetch_sub(size, Ordering::Relaxed);
    let _ = THREAD_LIVE.try_with(|live| live.set(live.get().saturating_sub(size)));
}

// SAFETY: every method passes its arguments unchanged to `System`, whose implementation meets
// `GlobalAlloc`'s contract, and returns its result unchanged; the caller's obligations (a
// non-zero size, a pointer that came from this allocator with the same layout) are therefore
// exactly `System`'s. The bookkeeping around each call neither allocates nor panics (see
// `grew`), so it cannot re-enter the allocator or unwind out of it.
#[allow(unsafe_code)]
unsafe impl GlobalAlloc for CountingAllocator {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        grew(layout.size());
        // SAFETY: the caller's `layout` meets `alloc`'s contract; forwarded unchanged.
        unsafe { System.alloc(layout) }
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        grew(layout.size());
        // SAFETY: as in `alloc`.
        unsafe { System.alloc_zeroed(layout) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        shrank(layout.size());
        // SAFETY: `ptr` came from `System` through this allocator with this `layout`.
        unsafe { System.dealloc(ptr, layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        if new_size >= layout.size() {
            grew(new_size - layout.size());
        } else {
            shrank(layout.size() - new_size);
        }
        // SAFETY: `ptr` came from `System` with `layout`; `new_size` meets `realloc`'s contract
        // as the caller promised.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

/// Heap bytes live now, all threads together.
pub fn live_bytes() -> usize {
    LIVE.load(Ordering::Relaxed)
}

/// Starts a new process-wide peak at the bytes live now, and returns them (the base to
/// subtract from [`peak_bytes`]).
pub fn reset_peak() -> usize {
    let now = LIVE.load(Ordering::Relaxed);
    PEAK.store(now, Ordering::Relaxed);
    now
}

/// The most heap bytes live at once, all threads together, since the last [`reset_peak`].
pub fn peak_bytes() -> usize {
    PEAK.load(Ordering::Relaxed)
}

/// Runs `f` and returns its result with the peak bytes this thread allocated while it ran,
/// above what this thread had live before.
pub fn thread_peak_during<T>(f: impl FnOnce() -> T) -> (T, usize) {
    let base = THREAD_LIVE.with(|l| l.get());
    THREAD_PEAK.with(|p| p.set(base));
    let out = f();
    (out, THREAD_PEAK.with(|p| p.get()) - base)
}

/// `n` values uniform in `[-scale, scale)` from a 32-bit linear congruential generator seeded
/// with `seed`: the same numbers on every platform, no RNG crate needed.
pub fn seeded_noise(n: usize, seed: u32, scale: f32) -> Vec<f32> {
    let mut state = seed;
    (0..n)
        .map(|_| {
            state = state.wrapping_mul(1_664_525).wrapping_add(1_013_904_223);
            ((state >> 8) as f32 / (1u32 << 24) as f32 * 2.0 - 1.0) * scale
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[global_allocator]
    static GLOBAL: CountingAllocator = CountingAllocator;

    #[test]
    fn counts_this_threads_and_the_process_peak() {
        let base = reset_peak();
        let (buffer, peak) = thread_peak_during(|| vec![1u8; 1 << 20]);
        assert!(peak >= 1 << 20, "thread peak {peak}");
        assert!(peak_bytes().saturating_sub(base) >= 1 << 20);
        drop(buffer);
        let (_, peak) = thread_peak_during(|| ());
        assert!(peak < 1 << 20, "nothing allocated, peak {peak}");
    }
}
