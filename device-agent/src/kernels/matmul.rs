//! fp32 matrix products of flex tensors straight into their output buffer.
//!
//! Flex's matmul (burn-flex 0.22.1) calls the same `gemm` crate, but its output comes from
//! `FlexTensor::empty`, which zeroes a byte vector and then copies it into a new aligned
//! allocation: two extra passes over every product's output (memset and memcpy were 8-13% of a
//! LoRA step's samples in `perf record`, most of it in attention's and the LoRA terms'
//! products). Here the output is an fp32 vector that `gemm` writes once (it does not read the
//! destination), handed to flex without a copy. Same kernel, same operand strides and the same
//! split of work across threads as flex uses, so the same sums in the same order: the results
//! are equal bit for bit (the tests check it).
//!
//! Ranks 2 to 4 with equal batch dimensions are served; anything else (broadcast batches, other
//! dtypes) goes to flex's own matmul.

use burn::backend::flex::FlexTensor;
use burn::backend::Flex;
use burn::tensor::{DType, TensorData};
use rayon::prelude::*;

use burn::backend::ops::FloatTensorOps;

/// Multiply-adds of one product above which `gemm` splits it across threads (flex's rule).
const PARALLEL_MACS: usize = 192 * 192 * 192;
/// Multiply-adds of a whole batch above which its products run on separate threads (flex's
/// rule).
const BATCH_PARALLEL_MACS: usize = 128 * 128 * 128;

/// `lhs @ rhs` over the last two dimensions (`[.., m, k] x [.., k, n]`), any strides.
pub fn flex_matmul(lhs: FlexTensor, rhs: FlexTensor) -> FlexTensor {
    match product(&lhs, &rhs) {
        Some(out) => out,
        None => Flex::float_matmul(lhs, rhs),
    }
}

/// `acc + lhs @ rhs` for matrices (`acc` `[m, n]`), the product added into `acc`'s buffer by
/// `gemm` as it is formed (no `[m, n]` product of its own, no separate add); `acc` is taken
/// over, copied first only if something else holds it.
pub fn flex_matmul_add(acc: FlexTensor, lhs: FlexTensor, rhs: FlexTensor) -> FlexTensor {
    let two_d = |t: &FlexTensor| t.dtype() == DType::F32 && t.layout().shape().num_dims() == 2;
    let (ls, rs, accs) = (
        lhs.layout().shape(),
        rhs.layout().shape(),
        acc.layout().shape(),
    );
    if !(two_d(&acc) && two_d(&lhs) && two_d(&rhs))
        || ls[1] != rs[0]
        || accs[0] != ls[0]
        || accs[1] != rs[1]
        || ls[1] == 0
    {
        return Flex::float_add(acc, flex_matmul(lhs, rhs));
    }
    let (m, k, n) = (ls[0], ls[1], rs[1]);
    let mut acc = if acc.is_contiguous() && acc.layout().start_offset() == 0 {
        acc
    } else {
        acc.to_contiguous()
    };
    let (l_rs, l_cs) = strides_2d(&lhs);
    let (r_rs, r_cs) = strides_2d(&rhs);
    let (ld, rd): (&[f32], &[f32]) = (lhs.storage(), rhs.storage());
    let (lo, ro) = (lhs.layout().start_offset(), rhs.layout().start_offset());
    let par = if m * n * k >= PARALLEL_MACS {
        gemm::Parallelism::Rayon(0)
    } else {
        gemm::Parallelism::None
    };
    let dst: &mut [f32] = acc.storage_mut();
    assert!(
        dst.len() >= m * n,
        "accumulator of {} values for {m} x {n}",
        dst.len()
    );
    // SAFETY: the operands are `m x k` and `k x n` matrices at their start offsets with their
    // strides, inside their buffers (flex's layout of a valid tensor); `dst` is the contiguous
    // `m x n` accumulator (checked above), read and written by `gemm` alone.
    #[allow(unsafe_code)]
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            dst.as_mut_ptr(),
            1,
            n as isize,
            true,
            ld.as_ptr().add(lo),
            l_cs,
            l_rs,
            rd.as_ptr().add(ro),
            r_cs,
            r_rs,
            1.0,
            1.0,
            false,
            false,
            false,
            par,
        );
    }
    acc
}

/// The element strides of a tensor's last two dimensions: (row, column).
fn strides_2d(t: &FlexTensor) -> (isize, isize) {
    let s = t.layout().strides();
    (s[s.len() - 2], s[s.len() - 1])
}

fn product(lhs: &FlexTensor, rhs: &FlexTensor) -> Option<FlexTensor> {
    if lhs.dtype() != DType::F32 || rhs.dtype() != DType::F32 {
        return None;
    }
    let (ls, rs) = (lhs.layout().shape(), rhs.layout().shape());
    let rank = ls.num_dims();
    if !(2..=4).contains(&rank) || rs.num_dims() != rank {
        return None;
    }
    let (m, k, n) = (ls[rank - 2], ls[rank - 1], rs[rank - 1]);
    let batch: Vec<usize> = (0..rank - 2).map(|d| ls[d]).collect();
    if rs[rank - 2] != k || (0..rank - 2).any(|d| rs[d] != ls[d]) {
        return None;
    }
    let count: usize = batch.iter().product();
    let size = m.checked_mul(n)?;
    let len = size.checked_mul(count)?;
    let mut dims = batch.clone();
    dims.extend([m, n]);
    if len == 0 || k == 0 {
        return Some(FlexTensor::from_data(TensorData::new(
            vec![0f32; len],
            dims,
        )));
    }
    // Element offset of batch `b`'s matrix in a tensor with these strides.
    let offset = |t: &FlexTensor, b: usize| -> isize {
        let strides = t.layout().strides();
        let mut rest = b;
        let mut off = t.layout().start_offset() as isize;
        for d in (0..batch.len()).rev() {
            off += (rest % batch[d]) as isize * strides[d];
            rest /= batch[d];
        }
        off
    };
    let (l_rs, l_cs) = strides_2d(lhs);
    let (r_rs, r_cs) = strides_2d(rhs);
    let (ld, rd): (&[f32], &[f32]) = (lhs.storage(), rhs.storage());
    let mut out: Vec<f32> = Vec::with_capacity(len);
    let dst = OutPtr::new(out.as_mut_ptr());
    let one = |b: usize, par: gemm::Parallelism| {
        // SAFETY: the operand pointers are the matrices of batch `b` inside their buffers (flex's
        // layout: start offset plus strides, all within the storage for a valid tensor); the
        // destination is batch `b`'s `m x n` cells of `out`, row stride `n`, which only this
        // call writes; `gemm` with `read_dst` false writes every cell and reads none.
        #[allow(unsafe_code)]
        unsafe {
            gemm::gemm(
                m,
                n,
                k,
                dst.at(b * size),
                1,
                n as isize,
                false,
                ld.as_ptr().offset(offset(lhs, b)),
                l_cs,
                l_rs,
                rd.as_ptr().offset(offset(rhs, b)),
                r_cs,
                r_rs,
                0.0,
                1.0,
                false,
                false,
                false,
                par,
            );
        }
    };
    let per = m * n * k;
    let total = per.saturating_mul(count);
    let batch_parallel = count >= 4 && total >= BATCH_PARALLEL_MACS;
    if per >= PARALLEL_MACS && !batch_parallel {
        (0..count).for_each(|b| one(b, gemm::Parallelism::Rayon(0)));
    } else if total >= BATCH_PARALLEL_MACS && count > 1 {
        (0..count)
            .into_par_iter()
            .for_each(|b| one(b, gemm::Parallelism::None));
    } else {
        (0..count).for_each(|b| one(b, gemm::Parallelism::None));
    }
    // SAFETY: every batch's `m x n` cells were written above (the batches cover `len`), and
    // `len` is the capacity asked for.
    #[allow(unsafe_code)]
    unsafe {
        out.set_len(len);
    }
    Some(FlexTensor::from_data(TensorData::new(out, dims)))
}

/// An output buffer's pointer, shared by parallel tasks that each write their own disjoint cells
/// of it (here a batch's matrix; in the bf16 products a block of rows times a run of panels).
/// Whoever makes one keeps the buffer alive across the parallel loop and hands out disjoint cells.
#[derive(Clone, Copy)]
pub(crate) struct OutPtr(*mut f32);

impl OutPtr {
    /// The buffer's first cell.
    pub(crate) fn new(first: *mut f32) -> Self {
        OutPtr(first)
    }

    /// The address of cell `offset` (computed, not dereferenced: the caller's unsafe write says
    /// why the cell is its own). Taking `self`, a call inside a task's closure moves the whole
    /// `OutPtr` into it, which is Send and Sync, where its raw field alone would be neither.
    pub(crate) fn at(self, offset: usize) -> *mut f32 {
        self.0.wrapping_add(offset)
    }
}
// SAFETY: the tasks holding copies write disjoint cells of a buffer that outlives them (the
// maker's contract above).
#[allow(unsafe_code)]
unsafe impl Send for OutPtr {}
// SAFETY: as for `Send`: shared only to hand each task its own cells.
#[allow(unsafe_code)]
unsafe impl Sync for OutPtr {}

#[cfg(test)]
mod tests {
    use super::*;

    fn tensor(dims: &[usize], seed: u32) -> FlexTensor {
        let len: usize = dims.iter().product();
        let mut s = seed.wrapping_mul(2_654_435_761).max(1);
        let v: Vec<f32> = (0..len)
            .map(|_| {
                s ^= s << 13;
                s ^= s >> 17;
                s ^= s << 5;
                (s as f32 / u32::MAX as f32) - 0.5
            })
            .collect();
        FlexTensor::from_data(TensorData::new(v, dims.to_vec()))
    }

    fn values(t: FlexTensor) -> (Vec<usize>, Vec<f32>) {
        let dims = t.layout().shape().to_vec();
        let d = t.into_data();
        (dims, d.try_to_vec::<f32>().unwrap())
    }

    /// Ours against flex's on the shapes the step uses (a projection, a transposed operand as
    /// in a backward pass, attention's batched products with swapped dimensions, small and
    /// large enough to take each of the three thread strategies): equal bit for bit.
    #[test]
    fn equals_flex_matmul_bit_for_bit() {
        let cases: Vec<(FlexTensor, FlexTensor)> = vec![
            (tensor(&[300, 64], 1), tensor(&[64, 200], 2)),
            (tensor(&[7, 5], 3), tensor(&[5, 3], 4)),
            (
                tensor(&[260, 96], 5),
                Flex::float_swap_dims(tensor(&[130, 96], 6), 0, 1),
            ),
            (
                tensor(&[2, 3, 64, 32], 7),
                Flex::float_swap_dims(tensor(&[2, 3, 64, 32], 8), 2, 3),
            ),
            (tensor(&[4, 9, 128, 64], 9), tensor(&[4, 9, 64, 128], 10)),
            (tensor(&[2, 40, 12], 11), tensor(&[2, 12, 30], 12)),
        ];
        for (i, (a, b)) in cases.into_iter().enumerate() {
            let want = values(Flex::float_matmul(a.clone(), b.clone()));
            let got = values(product(&a, &b).expect("served"));
            assert_eq!(got.0, want.0, "case {i}: shape");
            assert!(
                got.1
                    .iter()
                    .zip(&want.1)
                    .all(|(x, y)| x.to_bits() == y.to_bits()),
                "case {i}: values differ"
            );
        }
        // Broadcast batches are left to flex.
        assert!(product(&tensor(&[1, 4, 5], 1), &tensor(&[3, 5, 2], 2)).is_none());
    }

    /// The product added into the accumulator equals the product added after it, within one
    /// rounding of the sum (the same products; `gemm` adds the accumulator at the end of each
    /// output cell's sum), with a transposed operand and an accumulator that others hold
    /// (which is then copied, not written under them).
    #[test]
    fn accumulating_equals_adding_after() {
        let acc = tensor(&[300, 200], 1);
        let lhs = tensor(&[300, 16], 2);
        let rhs = Flex::float_swap_dims(tensor(&[200, 16], 3), 0, 1);
        let want = values(Flex::float_add(
            acc.clone(),
            Flex::float_matmul(lhs.clone(), rhs.clone()),
        ));
        let held = acc.clone();
        let got = values(flex_matmul_add(acc, lhs, rhs));
        assert_eq!(got.0, want.0);
        for (i, (x, y)) in got.1.iter().zip(&want.1).enumerate() {
            assert!(
                (x - y).abs() <= 1e-6 * (1.0 + y.abs()),
                "cell {i}: {x} vs {y}"
            );
        }
        assert_eq!(
            values(held),
            values(tensor(&[300, 200], 1)),
            "the held copy is untouched"
        );
    }
}
