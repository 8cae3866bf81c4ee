//! Frozen weights packed once and kept, for the bf16 kernel ([`packed`]) and as int8 rows for
//! [`crate::quant::rowwise`] ([`kept`], any [`Packing`]), so a training step's products stop
//! rounding and re-packing every weight they read: the forward pass reads each
//! weight as `[k][n]` ([`Layout::Plain`]), the input gradient as `[n][k]`
//! ([`Layout::Transposed`]), step after step, while the weight does not change. With a few
//! dozen rows per product (the simulator's batches of 2 short e-mails), packing took two thirds
//! as long as the products themselves (BENCHMARKS.md, "Packed bf16 weights kept").
//!
//! An entry is keyed by the weight's buffer (the address of flex's shared allocation, and the
//! address and length of the weight's contiguous values in it), its dimensions and the layout,
//! and holds a weak reference to that allocation. The weak reference keeps the key true without
//! keeping the weight alive: the allocation's address cannot be reused while it exists, and the
//! values cannot change under it, because Rust's `Arc` refuses in-place access while a weak
//! reference exists (`get_mut`) or moves the values to a new allocation (`make_mut`,
//! `try_unwrap`), which the weak reference sees as the old one's end. flex changes a buffer only
//! through those. An entry whose allocation has ended (the weight was dropped: pruned away, a
//! device's model finished, or changed) serves nothing and goes at the next [`sweep`].
//!
//! Memory is bounded by [`BUDGET_BYTES`] of packed words (one SmolLM2-135M's projections and tied
//! head in both layouts come to about 540 MB). Before a new packing is kept, the ended entries
//! go, then, while the new one does not fit, the least recently used entry idle for
//! [`IDLE_LOOKUPS`] lookups (a model still alive but no longer used: the simulator's dense base
//! while devices train pruned copies). An entry in use is never evicted for a newcomer: a model
//! too large for the budget keeps the weights it met first and packs the rest per product, as
//! before the cache, rather than evicting what the next product needs.

use std::any::{Any, TypeId};
use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard, Weak};

use burn::backend::flex::FlexTensor;

use super::gemm::{Layout, PackedB};

/// Most bytes of packed words kept: room for one SmolLM2-135M (about 540 MB) and most of a
/// second (the simulator's device models beside the dense base it slices them from).
pub const BUDGET_BYTES: usize = 1 << 30;

/// Lookups an entry must have gone unused before a newcomer may evict it: a training step of
/// SmolLM2-135M makes about 630 in int8 (210 projections, two layouts, and the input gradient's
/// outlier columns read from the forward's form), 420 in bf16, so about ten steps; an entry a
/// model uses every step is never this idle unless the model makes over 2,000 per step.
pub const IDLE_LOOKUPS: u64 = 4096;

/// Where a weight's values are: flex's shared allocation, and the address and length of the
/// weight's contiguous f32 values.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
struct Buffer {
    allocation: usize,
    addr: usize,
    len: usize,
}

/// A packing of a buffer: its dimensions as the product reads them, the layout, and the form
/// (the packing's type: bf16 panels, int8 rows).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Shape {
    rows: usize,
    cols: usize,
    transposed: bool,
    form: TypeId,
}

/// A form a frozen weight is kept in: bf16 panels ([`PackedB`]) or int8 rows
/// ([`crate::quant::rowwise::RowQuant`]).
pub trait Packing: Any + Send + Sync {
    /// Bytes it holds (what counts against [`BUDGET_BYTES`]).
    fn bytes(&self) -> usize;
}

impl Packing for PackedB {
    fn bytes(&self) -> usize {
        PackedB::bytes(self)
    }
}

impl Packing for crate::quant::rowwise::RowQuant {
    fn bytes(&self) -> usize {
        crate::quant::rowwise::RowQuant::bytes(self)
    }
}

/// One kept packing: its shape, the packing, its bytes.
type Kept = (Shape, Arc<dyn Any + Send + Sync>, usize);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Key {
    buffer: Buffer,
    shape: Shape,
}

/// The packings of one buffer.
struct Entry {
    /// The buffer's allocation (see the module's notes).
    owner: Weak<dyn Any + Send + Sync>,
    packs: Vec<Kept>,
    /// The lookup count at its last use.
    used: u64,
}

impl Entry {
    fn bytes(&self) -> usize {
        self.packs.iter().map(|(_, _, b)| b).sum()
    }
}

#[derive(Default)]
struct Cache {
    entries: HashMap<Buffer, Entry>,
    /// Bytes of the entries' packings.
    bytes: usize,
    /// Lookups so far.
    lookups: u64,
}

impl Cache {
    fn get<P: Packing>(&mut self, key: &Key) -> Option<Arc<P>> {
        self.lookups += 1;
        let e = self.entries.get_mut(&key.buffer)?;
        if e.owner.strong_count() == 0 {
            return None;
        }
        let (_, p, _) = e.packs.iter().find(|(s, _, _)| *s == key.shape)?;
        e.used = self.lookups;
        p.clone().downcast::<P>().ok()
    }

    /// Drop the entries whose allocation has ended.
    fn sweep(&mut self) {
        let mut freed = 0;
        self.entries.retain(|_, e| {
            let live = e.owner.strong_count() > 0;
            if !live {
                freed += e.bytes();
            }
            live
        });
        self.bytes -= freed;
    }

    /// Keep `packed` for `key` (a packing of `w`'s values) if it fits in `budget` bytes once the
    /// ended entries are gone and the idle ones evicted as needed; whether it was kept.
    fn keep<P: Packing>(
        &mut self,
        key: Key,
        w: &FlexTensor,
        packed: &Arc<P>,
        budget: usize,
    ) -> bool {
        self.sweep();
        let bytes = packed.bytes();
        if self
            .entries
            .get(&key.buffer)
            .is_some_and(|e| e.packs.iter().any(|(s, _, _)| *s == key.shape))
        {
            return false;
        }
        while self.bytes + bytes > budget {
            let idle = self
                .entries
                .iter()
                .filter(|(b, e)| **b != key.buffer && self.lookups - e.used > IDLE_LOOKUPS)
                .min_by_key(|(_, e)| e.used)
                .map(|(b, _)| *b);
            let Some(victim) = idle else {
                return false;
            };
            let e = self.entries.remove(&victim).expect("found above");
            self.bytes -= e.bytes();
        }
        self.bytes += bytes;
        let used = self.lookups;
        let e = self.entries.entry(key.buffer).or_insert_with(|| Entry {
            owner: owner(w),
            packs: Vec::new(),
            used,
        });
        e.used = used;
        let any: Arc<dyn Any + Send + Sync> = packed.clone();
        e.packs.push((key.shape, any, bytes));
        true
    }
}

fn owner(w: &FlexTensor) -> Weak<dyn Any + Send + Sync> {
    let arc: Arc<dyn Any + Send + Sync> = w.data_arc();
    Arc::downgrade(&arc)
}

fn key<P: Packing>(
    w: &FlexTensor,
    values: &[f32],
    rows: usize,
    cols: usize,
    layout: Layout,
) -> Key {
    Key {
        buffer: Buffer {
            allocation: Arc::as_ptr(&w.data_arc()) as *const () as usize,
            addr: values.as_ptr() as usize,
            len: values.len(),
        },
        shape: Shape {
            rows,
            cols,
            transposed: layout == Layout::Transposed,
            form: TypeId::of::<P>(),
        },
    }
}

static CACHE: Mutex<Option<Cache>> = Mutex::new(None);

fn lock() -> MutexGuard<'static, Option<Cache>> {
    // A panic while the lock was held left at most a half-made map change; the entries it holds
    // are each whole (inserted after packing), so the cache stays usable.
    CACHE
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// `w` (`rows x cols`, `values` its contiguous f32 values, `w` the tensor they belong to)
/// packed for the bf16 kernel in `layout`: [`kept`] with [`PackedB::pack`].
pub fn packed(
    w: &FlexTensor,
    values: &[f32],
    rows: usize,
    cols: usize,
    layout: Layout,
) -> Arc<PackedB> {
    kept(w, values, rows, cols, layout, || {
        PackedB::pack(values, rows, cols, layout)
    })
}

/// `w` (`rows x cols`, `values` its contiguous f32 values, `w` the tensor they belong to) in
/// the form `make` builds for `layout`: from the cache when built before, else built now and
/// kept when it fits the budget.
pub fn kept<P: Packing>(
    w: &FlexTensor,
    values: &[f32],
    rows: usize,
    cols: usize,
    layout: Layout,
    make: impl FnOnce() -> P,
) -> Arc<P> {
    let key = key::<P>(w, values, rows, cols, layout);
    if let Some(hit) = lock().get_or_insert_with(Cache::default).get::<P>(&key) {
        return hit;
    }
    // Built outside the lock (it is the slow part; other threads' products go on meanwhile).
    let packed = Arc::new(make());
    lock()
        .get_or_insert_with(Cache::default)
        .keep(key, w, &packed, BUDGET_BYTES);
    packed
}

/// Free the packings of weights that have been dropped (the next kept packing does this too):
/// for a caller that drops a model and builds another before its next product.
pub fn sweep() {
    if let Some(c) = lock().as_mut() {
        c.sweep();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::tensor::TensorData;

    fn weight(rows: usize, cols: usize, seed: u32) -> FlexTensor {
        let v: Vec<f32> = (0..rows * cols)
            .map(|i| ((i as u32).wrapping_mul(2_654_435_761) ^ seed) as f32 / u32::MAX as f32 - 0.5)
            .collect();
        FlexTensor::from_data(TensorData::new(v, [rows, cols]))
    }

    fn values(w: &FlexTensor) -> &[f32] {
        w.as_slice::<f32>().unwrap()
    }

    fn k_buffer(w: &FlexTensor) -> Buffer {
        key::<PackedB>(w, values(w), 0, 0, Layout::Plain).buffer
    }

    /// A weight met again is served from the cache, one packing per layout, and nothing is
    /// served for it once its last holder drops it.
    #[test]
    fn serves_a_kept_weight_and_forgets_a_dropped_one() {
        let mut c = Cache::default();
        let w = weight(96, 64, 1);
        for layout in [Layout::Plain, Layout::Transposed] {
            let k = key::<PackedB>(&w, values(&w), 96, 64, layout);
            assert!(c.get::<PackedB>(&k).is_none());
            let p = Arc::new(PackedB::pack(values(&w), 96, 64, layout));
            assert!(c.keep(k, &w, &p, usize::MAX));
            assert!(Arc::ptr_eq(&c.get::<PackedB>(&k).unwrap(), &p));
        }
        assert_eq!(
            (c.entries.len(), c.entries[&k_buffer(&w)].packs.len()),
            (1, 2)
        );
        // A view of the same buffer with other dimensions is another key.
        let k = key::<PackedB>(&w, values(&w), 64, 96, Layout::Plain);
        assert!(c.get::<PackedB>(&k).is_none());
        let held = c.bytes;
        assert!(held > 0);
        // The model lets the weight go: the cache does not keep it alive, serves nothing for
        // it (a new weight could not take its address while the entry lives), and the next
        // sweep frees its packings.
        let k = key::<PackedB>(&w, values(&w), 96, 64, Layout::Plain);
        drop(w);
        assert!(c.get::<PackedB>(&k).is_none());
        assert_eq!(c.entries.len(), 1);
        c.sweep();
        assert_eq!((c.entries.len(), c.bytes), (0, 0));
    }

    /// Past the budget a weight is packed but not kept, and what is kept is never evicted for it.
    #[test]
    fn keeps_nothing_past_the_budget() {
        let mut c = Cache::default();
        let (a, b) = (weight(64, 64, 2), weight(64, 64, 3));
        let pa = Arc::new(PackedB::pack(values(&a), 64, 64, Layout::Plain));
        let pb = Arc::new(PackedB::pack(values(&b), 64, 64, Layout::Plain));
        let budget = pa.bytes() + pb.bytes() / 2;
        assert!(c.keep(
            key::<PackedB>(&a, values(&a), 64, 64, Layout::Plain),
            &a,
            &pa,
            budget
        ));
        assert!(!c.keep(
            key::<PackedB>(&b, values(&b), 64, 64, Layout::Plain),
            &b,
            &pb,
            budget
        ));
        assert_eq!(c.entries.len(), 1);
        assert!(c
            .get::<PackedB>(&key::<PackedB>(&a, values(&a), 64, 64, Layout::Plain))
            .is_some());
        // Once `a` is dropped its room goes to `b`.
        drop(a);
        assert!(c.keep(
            key::<PackedB>(&b, values(&b), 64, 64, Layout::Plain),
            &b,
            &pb,
            budget
        ));
        assert_eq!(c.bytes, pb.bytes());
    }

    /// A live entry idle for [`IDLE_LOOKUPS`] lookups makes room for a newcomer; one in use does
    /// not.
    #[test]
    fn evicts_only_an_idle_entry() {
        let mut c = Cache::default();
        let (a, b, d) = (weight(64, 64, 4), weight(64, 64, 5), weight(64, 64, 6));
        let pack = |w: &FlexTensor| Arc::new(PackedB::pack(values(w), 64, 64, Layout::Plain));
        let (pa, pb, pd) = (pack(&a), pack(&b), pack(&d));
        let (ka, kb, kd) = [&a, &b, &d]
            .map(|w| key::<PackedB>(w, values(w), 64, 64, Layout::Plain))
            .into();
        let budget = pa.bytes() + pb.bytes();
        assert!(c.keep(ka, &a, &pa, budget) && c.keep(kb, &b, &pb, budget));
        // Both in use: `d` is packed for its product but not kept.
        assert!(c.get::<PackedB>(&ka).is_some() && c.get::<PackedB>(&kb).is_some());
        assert!(!c.keep(kd, &d, &pd, budget));
        // `b` keeps being used, `a` goes idle (its model alive: `a` is still held).
        for _ in 0..=IDLE_LOOKUPS {
            assert!(c.get::<PackedB>(&kb).is_some());
        }
        assert!(c.keep(kd, &d, &pd, budget));
        assert!(
            c.get::<PackedB>(&ka).is_none()
                && c.get::<PackedB>(&kb).is_some()
                && c.get::<PackedB>(&kd).is_some()
        );
        assert_eq!(c.bytes, pb.bytes() + pd.bytes());
        drop(a);
    }
}
