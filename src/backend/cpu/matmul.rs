//! Matmuls with the `gemm` crate: arbitrary strides, so x·Wᵀ, dout·W and doutᵀ·x read the
//! row-major buffers in place (no transposed copies). The work is split into fixed blocks of
//! output rows or columns, one single-threaded gemm call per rayon task.
//! gemm uses its AVX-512 micro-kernels only when built with its `x86-v4` feature (~1.5× faster
//! than its AVX2 ones on AVX-512 CPUs; detected at run time, so safe elsewhere).

use super::kernels::rows_per_task;
use super::simd::multiversion;
use gemm::Parallelism;
use rayon::prelude::*;

/// Output rows or columns per gemm task. Fixed (not derived from the thread count), so every
/// task's gemm call, and hence every result bit, is the same whatever the pool size; 128 was the
/// fastest block on the GPT-2 shapes (see tests/cpu_kernels.rs, bench_matmul_d12_shapes).
const GEMM_BLOCK: usize = 128;

/// A matrix operand: element (i, j) is at `data[i·rs + j·cs]`.
#[derive(Clone, Copy)]
pub(super) struct Operand<'a> {
    pub data: &'a [f32],
    pub rs: usize,
    pub cs: usize,
}

/// Raw pointers moved into rayon tasks; each task touches a disjoint block of the destination.
#[derive(Clone, Copy)]
struct SendPtr(*mut f32);
// SAFETY: only used by `gemm_blocked`, whose tasks write disjoint elements.
unsafe impl Send for SendPtr {}
unsafe impl Sync for SendPtr {}
impl SendPtr {
    fn get(self) -> *mut f32 {
        self.0
    }
}

/// True if every element (i < rows, j < cols) of `o` lies inside its slice.
fn fits(o: &Operand, rows: usize, cols: usize) -> bool {
    rows == 0 || cols == 0 || (rows - 1) * o.rs + (cols - 1) * o.cs < o.data.len()
}

/// The checks both gemm entry points share; true when nothing is left to compute (an empty
/// product: with k = 0 the destination is zeroed unless `accumulate`).
#[allow(clippy::too_many_arguments)]
fn gemm_trivial(dst: &mut [f32], dst_rs: usize, m: usize, n: usize, k: usize, accumulate: bool, lhs: &Operand, rhs: &Operand) -> bool {
    if m == 0 || n == 0 {
        return true;
    }
    assert!((m - 1) * dst_rs + n <= dst.len() && n <= dst_rs, "gemm: destination out of range");
    assert!(fits(lhs, m, k) && fits(rhs, k, n), "gemm: operand out of range");
    if k == 0 {
        if !accumulate {
            for r in 0..m {
                dst[r * dst_rs..r * dst_rs + n].fill(0.0);
            }
        }
        return true;
    }
    false
}

/// dst (m×n, row-major with row stride `dst_rs`) = lhs (m×k) · rhs (k×n), or += when
/// `accumulate`; one single-threaded gemm call (for use inside a rayon task).
#[allow(clippy::too_many_arguments)]
pub(super) fn gemm_serial(
    dst: &mut [f32], dst_rs: usize, m: usize, n: usize, k: usize, accumulate: bool, lhs: Operand, rhs: Operand,
) {
    if gemm_trivial(dst, dst_rs, m, n, k, accumulate, &lhs, &rhs) {
        return;
    }
    // SAFETY: the asserts bound every element of dst, lhs and rhs inside their slices; dst (a
    // &mut) does not overlap lhs or rhs.
    unsafe {
        gemm::gemm(
            m, n, k,
            dst.as_mut_ptr(), 1, dst_rs as isize, accumulate,
            lhs.data.as_ptr(), lhs.cs as isize, lhs.rs as isize,
            rhs.data.as_ptr(), rhs.cs as isize, rhs.rs as isize,
            1.0f32, 1.0f32, false, false, false, Parallelism::None,
        );
    }
}

/// dst (m×n, row-major with row stride `dst_rs`) = lhs (m×k) · rhs (k×n), or += when
/// `accumulate`. Split into fixed blocks of GEMM_BLOCK rows or columns (whichever dimension is
/// larger), one single-threaded gemm call per rayon task.
#[allow(clippy::too_many_arguments)]
fn gemm_blocked(dst: &mut [f32], dst_rs: usize, m: usize, n: usize, k: usize, accumulate: bool, lhs: Operand, rhs: Operand) {
    if gemm_trivial(dst, dst_rs, m, n, k, accumulate, &lhs, &rhs) {
        return;
    }
    let by_cols = n >= m;
    let blocks = if by_cols { n } else { m }.div_ceil(GEMM_BLOCK);
    let dst_ptr = SendPtr(dst.as_mut_ptr());
    (0..blocks).into_par_iter().for_each(|blk| {
        let lo = blk * GEMM_BLOCK;
        let (bm, bn, d_off, l_off, r_off) = if by_cols {
            (m, GEMM_BLOCK.min(n - lo), lo, 0, lo * rhs.cs)
        } else {
            (GEMM_BLOCK.min(m - lo), n, lo * dst_rs, lo * lhs.rs, 0)
        };
        // SAFETY: the asserts above bound every element of dst, lhs and rhs inside their slices;
        // the blocks partition dst's rows (or columns), so no two tasks write the same element,
        // and dst (a &mut) does not overlap lhs or rhs.
        unsafe {
            gemm::gemm(
                bm, bn, k,
                dst_ptr.get().add(d_off), 1, dst_rs as isize, accumulate,
                lhs.data.as_ptr().add(l_off), lhs.cs as isize, lhs.rs as isize,
                rhs.data.as_ptr().add(r_off), rhs.cs as isize, rhs.rs as isize,
                1.0f32, 1.0f32, false, false, false, Parallelism::None,
            );
        }
    });
}

/// out (n,oc) = inp (n,c) · weightᵀ (weight (oc,c)) + bias (oc, optional); writes out
pub fn matmul_forward(out: &mut [f32], inp: &[f32], weight: &[f32], bias: Option<&[f32]>, n: usize, c: usize, oc: usize) {
    if n == 0 || oc == 0 {
        return;
    }
    let out = &mut out[..n * oc];
    if n <= FEW_ROWS {
        // outᵀ (oc×n) = W (oc×c) · inpᵀ (c×n): blocks of weight rows, so each task reads its part
        // of W once for every input row
        let mut t = vec![0f32; oc * n];
        let w = Operand { data: &weight[..oc * c], rs: c, cs: 1 };
        let xt = Operand { data: &inp[..n * c], rs: 1, cs: c };
        gemm_blocked(&mut t, n, oc, n, c, false, w, xt);
        out.par_chunks_mut(oc).enumerate().for_each(|(i, row)| {
            for (j, o) in row.iter_mut().enumerate() {
                *o = t[j * n + i] + bias.map_or(0.0, |b| b[j]);
            }
        });
        return;
    }
    if let Some(bias) = bias {
        let bias = &bias[..oc];
        out.par_chunks_mut(oc).with_min_len(rows_per_task(oc)).for_each(|r| r.copy_from_slice(bias));
    }
    // weightᵀ as a c×oc operand: element (i, j) = weight[j·c + i]
    let x = Operand { data: &inp[..n * c], rs: c, cs: 1 };
    let wt = Operand { data: &weight[..oc * c], rs: 1, cs: c };
    gemm_blocked(out, oc, n, oc, c, bias.is_some(), x, wt);
}

/// At most this many rows (decoding: one per sequence) take the transposed product.
const FEW_ROWS: usize = 16;

/// dinp (n,c) = dout (n,oc) · weight (writes);  dweight (oc,c) += doutᵀ·inp;  dbias (oc) += Σ_rows dout
#[allow(clippy::too_many_arguments)]
pub fn matmul_backward(
    dinp: &mut [f32], dweight: &mut [f32], dbias: Option<&mut [f32]>, dout: &[f32], inp: &[f32], weight: &[f32],
    n: usize, c: usize, oc: usize,
) {
    if n == 0 {
        return;
    }
    let dout = &dout[..n * oc];
    let dinp = &mut dinp[..n * c];
    // dinp (n×c) = dout (n×oc) · W (oc×c)
    let d = Operand { data: dout, rs: oc, cs: 1 };
    gemm_blocked(dinp, c, n, c, oc, false, d, Operand { data: &weight[..oc * c], rs: c, cs: 1 });
    // dweight (oc×c) += doutᵀ (oc×n: element (i, r) = dout[r·oc + i]) · inp (n×c)
    let dt = Operand { data: dout, rs: 1, cs: oc };
    gemm_blocked(&mut dweight[..oc * c], c, oc, c, n, true, dt, Operand { data: &inp[..n * c], rs: c, cs: 1 });
    if let Some(dbias) = dbias {
        // column sums, parallel over column blocks; rows summed in order
        dbias[..oc].par_chunks_mut(BIAS_COLS).enumerate().for_each(|(bi, db)| column_sums(db, dout, bi * BIAS_COLS, n, oc));
    }
}

/// Columns per dbias task.
const BIAS_COLS: usize = 64;

multiversion! {
    /// db[j] += Σ_r dout[r·oc + j0 + j] for j < db.len() (≤ BIAS_COLS), rows in order.
    fn column_sums(db: &mut [f32], dout: &[f32], j0: usize, n: usize, oc: usize) {
        let w = db.len();
        let mut acc = [0f32; BIAS_COLS];
        for r in 0..n {
            let row = &dout[r * oc + j0..r * oc + j0 + w];
            for (a, x) in acc.iter_mut().zip(row) {
                *a += x;
            }
        }
        for (d, a) in db.iter_mut().zip(&acc) {
            *d += a;
        }
    }
}
