//! CPU kernels: one plain function per [`crate::graph::Kernel`] variant, over slices. The contract
//! (what is written, what is accumulated) is the doc comment of each variant in
//! `src/graph/kernels.rs`. Every kernel is parallel with rayon over rows, (batch, head) pairs or
//! fixed-size chunks, and runs in whatever rayon pool is current (the backend installs its own).
//! Reductions use fixed chunk sizes and combine partial results in order, so results do not
//! depend on the thread count. Matmuls use the `gemm` crate with strides (no transposed copies),
//! see `matmul.rs`; attention runs its score tiles through the same gemm. Hot loops are compiled
//! for AVX-512, AVX2 and baseline x86-64 and picked at run time (`simd.rs`), with bit-identical
//! results; `exp` is a vectorisable polynomial (relative error ≲ 2e-7), not libm's.
//!
//! Sizes: a slice may be longer than the kernel needs; only the leading part is used.
//! Panics if a slice is shorter than its size arguments say, or a token/target id is out of
//! range: the backend (`super::CpuBackend`) checks both before calling and returns an error.

use super::simd::{self, multiversion};
use crate::graph::Scalars;
use rayon::prelude::*;

use super::matmul::{gemm_serial, Operand};
pub use super::matmul::{matmul_backward, matmul_forward};

/// LayerNorm epsilon (added to the biased variance).
pub const LN_EPS: f32 = 1e-5;
/// √(2/π), the GELU tanh-approximation constant.
const GELU_SCALE: f32 = 0.797_884_6;
/// Rows per LayerNorm-backward task (partial dweight/dbias are summed in order afterwards).
const LN_BWD_ROWS: usize = 32;
/// Elements per task for elementwise kernels and reductions.
const CHUNK: usize = 1 << 14;

/// Rows per rayon task for row-parallel kernels: about CHUNK elements per task.
#[inline]
pub(super) fn rows_per_task(c: usize) -> usize {
    (CHUNK / c.max(1)).max(1)
}

// ----------------------------------------------------------------------------------------------
// encoder

/// out[b,t,:] = wte[tokens[b,t],:] + wpe[t,:]   (writes out (b·t, c))
pub fn encoder_forward(out: &mut [f32], tokens: &[i32], wte: &[f32], wpe: &[f32], b: usize, t: usize, c: usize) {
    let n = b * t;
    if n == 0 || c == 0 {
        return;
    }
    assert!(tokens.len() >= n && wpe.len() >= t * c, "encoder_forward: short input");
    out[..n * c].par_chunks_mut(c).with_min_len(rows_per_task(c)).enumerate().for_each(|(r, o)| {
        let tok = tokens[r] as usize;
        let pos = r % t;
        let we = &wte[tok * c..tok * c + c];
        let pe = &wpe[pos * c..pos * c + c];
        for i in 0..c {
            o[i] = we[i] + pe[i];
        }
    });
}

/// dwte[tokens[b,t],:] += dout[b,t,:];  dwpe[t,:] += dout[b,t,:]   (both accumulate)
pub fn encoder_backward(dwte: &mut [f32], dwpe: &mut [f32], dout: &[f32], tokens: &[i32], b: usize, t: usize, c: usize) {
    let n = b * t;
    if n == 0 || c == 0 {
        return;
    }
    assert!(tokens.len() >= n && dout.len() >= n * c && dwpe.len() >= t * c, "encoder_backward: short input");
    // Group positions by token (ascending positions within a token: a deterministic order), then
    // hand each distinct token's dwte row to one task.
    let mut order: Vec<u32> = (0..n as u32).collect();
    order.sort_by_key(|&r| (tokens[r as usize], r));
    let mut tasks: Vec<(&mut [f32], &[u32])> = Vec::new();
    let mut rest: &mut [f32] = dwte;
    let mut base = 0usize; // row index of rest[0]
    let mut i = 0;
    while i < n {
        let tok = tokens[order[i] as usize] as usize;
        let mut j = i;
        while j < n && tokens[order[j] as usize] as usize == tok {
            j += 1;
        }
        let tail = std::mem::take(&mut rest);
        let (_, tail) = tail.split_at_mut((tok - base) * c);
        let (row, tail) = tail.split_at_mut(c);
        rest = tail;
        base = tok + 1;
        tasks.push((row, &order[i..j]));
        i = j;
    }
    tasks.into_par_iter().for_each(|(row, positions)| {
        for &r in positions {
            let r = r as usize;
            for (d, g) in row.iter_mut().zip(&dout[r * c..r * c + c]) {
                *d += g;
            }
        }
    });
    dwpe[..t * c].par_chunks_mut(c).with_min_len(rows_per_task(c)).enumerate().for_each(|(pos, row)| {
        for bb in 0..b {
            let r = bb * t + pos;
            for (d, g) in row.iter_mut().zip(&dout[r * c..r * c + c]) {
                *d += g;
            }
        }
    });
}

// ----------------------------------------------------------------------------------------------
// layernorm

/// out = (x − mean)·rstd·weight + bias per row, rstd = 1/√(var + 1e-5); writes out, mean, rstd
#[allow(clippy::too_many_arguments)]
pub fn layernorm_forward(
    out: &mut [f32], mean: &mut [f32], rstd: &mut [f32], inp: &[f32], weight: &[f32], bias: &[f32], n: usize, c: usize,
) {
    if n == 0 || c == 0 {
        return;
    }
    assert!(inp.len() >= n * c && weight.len() >= c && bias.len() >= c, "layernorm_forward: short input");
    let (weight, bias) = (&weight[..c], &bias[..c]);
    out[..n * c]
        .par_chunks_mut(c)
        .zip(mean[..n].par_iter_mut())
        .zip(rstd[..n].par_iter_mut())
        .enumerate()
        .with_min_len(rows_per_task(c))
        .for_each(|(r, ((o, mu), rs))| {
            (*mu, *rs) = layernorm_row(o, &inp[r * c..r * c + c], weight, bias);
        });
}

multiversion! {
    /// One LayerNorm row (two-pass mean and variance); returns (mean, rstd).
    fn layernorm_row(o: &mut [f32], x: &[f32], weight: &[f32], bias: &[f32]) -> (f32, f32) {
        let c = x.len();
        let m = simd::sum(x) / c as f32;
        let mut acc = [0f32; 16];
        let mut cx = x.chunks_exact(16);
        for ch in &mut cx {
            for i in 0..16 {
                let d = ch[i] - m;
                acc[i] += d * d;
            }
        }
        let mut var = 0f32;
        for &v in cx.remainder() {
            var += (v - m) * (v - m);
        }
        var += simd::sum(&acc);
        let s = 1.0 / (var / c as f32 + LN_EPS).sqrt();
        for i in 0..c {
            o[i] = (x[i] - m) * s * weight[i] + bias[i];
        }
        (m, s)
    }
}

/// x̂ = (x−mean)·rstd, g = dout·w:  dinp = rstd·(g − mean(g) − x̂·mean(g·x̂)) (adds if `accumulate`,
/// else writes);  dweight += Σ_rows dout·x̂;  dbias += Σ_rows dout
#[allow(clippy::too_many_arguments)]
pub fn layernorm_backward(
    dinp: &mut [f32], dweight: &mut [f32], dbias: &mut [f32], dout: &[f32], inp: &[f32], weight: &[f32], mean: &[f32],
    rstd: &[f32], n: usize, c: usize, accumulate: bool,
) {
    if n == 0 || c == 0 {
        return;
    }
    assert!(
        dout.len() >= n * c && inp.len() >= n * c && weight.len() >= c && mean.len() >= n && rstd.len() >= n,
        "layernorm_backward: short input"
    );
    let weight = &weight[..c];
    let partials: Vec<Vec<f32>> = dinp[..n * c]
        .par_chunks_mut(LN_BWD_ROWS * c)
        .enumerate()
        .map(|(ci, dchunk)| {
            let r0 = ci * LN_BWD_ROWS;
            let rows = dchunk.len() / c;
            let mut acc = vec![0f32; 2 * c]; // [dweight | dbias] partial sums of this chunk
            layernorm_backward_rows(
                dchunk, &mut acc, &dout[r0 * c..(r0 + rows) * c], &inp[r0 * c..(r0 + rows) * c], weight,
                &mean[r0..r0 + rows], &rstd[r0..r0 + rows], accumulate,
            );
            acc
        })
        .collect();
    let (dweight, dbias) = (&mut dweight[..c], &mut dbias[..c]);
    for p in &partials {
        for i in 0..c {
            dweight[i] += p[i];
            dbias[i] += p[c + i];
        }
    }
}

multiversion! {
    /// LayerNorm backward over a block of rows; acc = [dweight | dbias] partial sums.
    fn layernorm_backward_rows(
        dinp: &mut [f32], acc: &mut [f32], dout: &[f32], inp: &[f32], weight: &[f32], mean: &[f32], rstd: &[f32],
        accumulate: bool,
    ) {
        let c = weight.len();
        let (dw, db) = acc.split_at_mut(c);
        for (j, drow) in dinp.chunks_mut(c).enumerate() {
            let x = &inp[j * c..j * c + c];
            let d = &dout[j * c..j * c + c];
            let (mu, rs) = (mean[j], rstd[j]);
            // lane-wise partial sums of g and g·x̂ (16 lanes, folded in a fixed order)
            let mut sg = [0f32; 16];
            let mut sgx = [0f32; 16];
            for i in 0..c {
                let xh = (x[i] - mu) * rs;
                let g = d[i] * weight[i];
                sg[i % 16] += g;
                sgx[i % 16] += g * xh;
                dw[i] += d[i] * xh;
                db[i] += d[i];
            }
            let mg = simd::sum(&sg) / c as f32;
            let mgx = simd::sum(&sgx) / c as f32;
            if accumulate {
                for i in 0..c {
                    let xh = (x[i] - mu) * rs;
                    drow[i] += rs * (d[i] * weight[i] - mg - xh * mgx);
                }
            } else {
                for i in 0..c {
                    let xh = (x[i] - mu) * rs;
                    drow[i] = rs * (d[i] * weight[i] - mg - xh * mgx);
                }
            }
        }
    }
}

// ----------------------------------------------------------------------------------------------
// attention
//
// One rayon task per (batch, head). Rows are processed in blocks of ATT_ROWS queries; a block
// [r0, r1) needs keys [0, r1) only (causal), so the score tile is (r1−r0)×r1 and the work is the
// lower triangle, as small gemm calls. Only lse is kept between forward and backward.

/// Query rows per attention tile.
const ATT_ROWS: usize = 64;

/// Copies head `h` of `part` (0 = q, 1 = k, 2 = v) of batch `bb` from qkv (b,t,3c) into dst (t, hs).
#[inline]
#[allow(clippy::too_many_arguments)]
fn gather_head(dst: &mut [f32], qkv: &[f32], bb: usize, h: usize, part: usize, t: usize, c: usize, hs: usize) {
    for u in 0..t {
        let src = (bb * t + u) * 3 * c + part * c + h * hs;
        dst[u * hs..(u + 1) * hs].copy_from_slice(&qkv[src..src + hs]);
    }
}

/// Head `h` of batch `bb`'s q, k and v, each (t, hs).
fn gather_qkv(qkv: &[f32], bb: usize, h: usize, t: usize, c: usize, hs: usize) -> [Vec<f32>; 3] {
    std::array::from_fn(|part| {
        let mut dst = vec![0f32; t * hs];
        gather_head(&mut dst, qkv, bb, h, part, t, c, hs);
        dst
    })
}

/// A row-major (rows, cols) operand, or its transpose.
fn rm(data: &[f32], cols: usize) -> Operand<'_> {
    Operand { data, rs: cols, cs: 1 }
}
fn tr(data: &[f32], cols: usize) -> Operand<'_> {
    Operand { data, rs: 1, cs: cols }
}

/// Causal softmax attention per (batch, head): out_t = Σ_{u≤t} softmax_u(q_t·k_u/√hs)·v_u;
/// writes out (b·t, c) and lse (b, nh, t) = logsumexp_u of the scaled scores
#[allow(clippy::too_many_arguments)]
pub fn attention_forward(out: &mut [f32], lse: &mut [f32], qkv: &[f32], b: usize, t: usize, c: usize, nh: usize) {
    if b == 0 || t == 0 || c == 0 {
        return;
    }
    assert!(nh > 0 && c.is_multiple_of(nh), "attention_forward: c must be a multiple of nh");
    assert!(qkv.len() >= b * t * 3 * c, "attention_forward: short qkv");
    let hs = c / nh;
    let scale = 1.0 / (hs as f32).sqrt();
    // per (b,h) results in a (b, nh, t, hs) scratch, then permuted into (b, t, c)
    let mut tmp = vec![0f32; b * nh * t * hs];
    tmp.par_chunks_mut(t * hs).zip(lse[..b * nh * t].par_chunks_mut(t)).enumerate().for_each(|(bh, (o, l))| {
        let (bb, h) = (bh / nh, bh % nh);
        let [q, k, v] = gather_qkv(qkv, bb, h, t, c, hs);
        let mut s = vec![0f32; ATT_ROWS.min(t) * t];
        for r0 in (0..t).step_by(ATT_ROWS) {
            let r1 = (r0 + ATT_ROWS).min(t);
            let (rows, s) = (r1 - r0, &mut s[..(r1 - r0) * r1]);
            // S = Q[r0..r1]·K[..r1]ᵀ, then P = softmax of the causal part (zero elsewhere)
            gemm_serial(s, r1, rows, r1, hs, false, rm(&q[r0 * hs..r1 * hs], hs), tr(&k[..r1 * hs], hs));
            softmax_rows(s, &mut l[r0..r1], r0, r1, scale);
            // O[r0..r1] = P·V[..r1]
            gemm_serial(&mut o[r0 * hs..r1 * hs], hs, rows, hs, r1, false, rm(s, r1), rm(&v[..r1 * hs], hs));
        }
    });
    out[..b * t * c].par_chunks_mut(c).with_min_len(rows_per_task(c)).enumerate().for_each(|(r, orow)| {
        let (bb, tt) = (r / t, r % t);
        for h in 0..nh {
            let src = ((bb * nh + h) * t + tt) * hs;
            orow[h * hs..(h + 1) * hs].copy_from_slice(&tmp[src..src + hs]);
        }
    });
}

multiversion! {
    /// Rows r0.. of a score tile s (rows, r1): row j (query r0+j) becomes softmax(scale·s[..=r0+j])
    /// with zeros after it; l[j] = logsumexp of the scaled scores.
    fn softmax_rows(s: &mut [f32], l: &mut [f32], r0: usize, r1: usize, scale: f32) {
        for (j, row) in s.chunks_mut(r1).enumerate() {
            let (live, masked) = row.split_at_mut(r0 + j + 1);
            for x in live.iter_mut() {
                *x *= scale;
            }
            let mx = simd::max(live);
            for x in live.iter_mut() {
                *x = simd::exp(*x - mx);
            }
            let z = simd::sum(live);
            let inv = 1.0 / z;
            for x in live.iter_mut() {
                *x *= inv;
            }
            masked.fill(0.0);
            l[j] = mx + z.ln();
        }
    }
}

/// p = exp(q·k/√hs − lse), dP = dout·vᵀ, D_t = dout_t·out_t, dS = p∘(dP − D):
/// dq = dS·k/√hs, dk = dSᵀ·q/√hs, dv = pᵀ·dout; writes dqkv (b·t, 3c)
#[allow(clippy::too_many_arguments)]
pub fn attention_backward(
    dqkv: &mut [f32], dout: &[f32], out: &[f32], lse: &[f32], qkv: &[f32], b: usize, t: usize, c: usize, nh: usize,
) {
    if b == 0 || t == 0 || c == 0 {
        return;
    }
    assert!(nh > 0 && c.is_multiple_of(nh), "attention_backward: c must be a multiple of nh");
    assert!(
        qkv.len() >= b * t * 3 * c && dout.len() >= b * t * c && out.len() >= b * t * c && lse.len() >= b * nh * t,
        "attention_backward: short input"
    );
    let hs = c / nh;
    let scale = 1.0 / (hs as f32).sqrt();
    // per (b,h): [dq (t,hs) | dk (t,hs) | dv (t,hs)]
    let mut tmp = vec![0f32; b * nh * 3 * t * hs];
    tmp.par_chunks_mut(3 * t * hs).enumerate().for_each(|(bh, g)| {
        let (bb, h) = (bh / nh, bh % nh);
        let (dq, rest) = g.split_at_mut(t * hs);
        let (dk, dv) = rest.split_at_mut(t * hs);
        let [q, k, v] = gather_qkv(qkv, bb, h, t, c, hs);
        // dout of this head, and D_t = dout_t·out_t
        let mut d_o = vec![0f32; t * hs];
        let mut dd = vec![0f32; t];
        for tt in 0..t {
            let row = (bb * t + tt) * c + h * hs;
            d_o[tt * hs..(tt + 1) * hs].copy_from_slice(&dout[row..row + hs]);
            dd[tt] = head_dot(&dout[row..row + hs], &out[row..row + hs]);
        }
        let l = &lse[bh * t..(bh + 1) * t];
        let mut p = vec![0f32; ATT_ROWS.min(t) * t];
        let mut ds = vec![0f32; ATT_ROWS.min(t) * t];
        for r0 in (0..t).step_by(ATT_ROWS) {
            let r1 = (r0 + ATT_ROWS).min(t);
            let rows = r1 - r0;
            let (p, ds) = (&mut p[..rows * r1], &mut ds[..rows * r1]);
            let (qb, dob) = (&q[r0 * hs..r1 * hs], &d_o[r0 * hs..r1 * hs]);
            // S = Q·Kᵀ and dP = dO·Vᵀ over keys [0, r1)
            gemm_serial(p, r1, rows, r1, hs, false, rm(qb, hs), tr(&k[..r1 * hs], hs));
            gemm_serial(ds, r1, rows, r1, hs, false, rm(dob, hs), tr(&v[..r1 * hs], hs));
            // P = exp(scale·S − lse), dS = P∘(dP − D)·scale (zero above the diagonal)
            attention_ds_rows(p, ds, &l[r0..r1], &dd[r0..r1], r0, r1, scale);
            // dQ = dS·K, dK += dSᵀ·Q, dV += Pᵀ·dO
            gemm_serial(&mut dq[r0 * hs..r1 * hs], hs, rows, hs, r1, false, rm(ds, r1), rm(&k[..r1 * hs], hs));
            gemm_serial(&mut dk[..r1 * hs], hs, r1, hs, rows, true, tr(ds, r1), rm(qb, hs));
            gemm_serial(&mut dv[..r1 * hs], hs, r1, hs, rows, true, tr(p, r1), rm(dob, hs));
        }
    });
    dqkv[..b * t * 3 * c].par_chunks_mut(3 * c).with_min_len(rows_per_task(3 * c)).enumerate().for_each(|(r, grow)| {
        let (bb, tt) = (r / t, r % t);
        for h in 0..nh {
            let base = (bb * nh + h) * 3 * t * hs + tt * hs;
            for part in 0..3 {
                let src = base + part * t * hs;
                let dst = part * c + h * hs;
                grow[dst..dst + hs].copy_from_slice(&tmp[src..src + hs]);
            }
        }
    });
}

multiversion! {
    /// a·b for one head's features.
    fn head_dot(a: &[f32], b: &[f32]) -> f32 {
        simd::dot(a, b)
    }
}

multiversion! {
    /// Score tile rows r0..: p = exp(scale·s − l) for keys ≤ the query, else 0 (s in, p out);
    /// ds = p∘(dP − D)·scale (dP in, dS out).
    fn attention_ds_rows(p: &mut [f32], ds: &mut [f32], l: &[f32], dd: &[f32], r0: usize, r1: usize, scale: f32) {
        for (j, (prow, drow)) in p.chunks_mut(r1).zip(ds.chunks_mut(r1)).enumerate() {
            let live = r0 + j + 1;
            let (lj, dj) = (l[j], dd[j]);
            for (x, d) in prow[..live].iter_mut().zip(drow[..live].iter_mut()) {
                let pe = simd::exp(*x * scale - lj);
                *x = pe;
                *d = pe * (*d - dj) * scale;
            }
            prow[live..].fill(0.0);
            drow[live..].fill(0.0);
        }
    }
}

// ----------------------------------------------------------------------------------------------
// gelu, residual

/// out = 0.5·x·(1 + tanh(√(2/π)·(x + 0.044715·x³)))
pub fn gelu_forward(out: &mut [f32], inp: &[f32]) {
    let n = out.len().min(inp.len());
    out[..n].par_chunks_mut(CHUNK).zip(inp[..n].par_chunks(CHUNK)).for_each(|(o, x)| gelu_forward_chunk(o, x));
}

multiversion! {
    /// gelu(x) = x·σ(2u), u = √(2/π)·(x + 0.044715·x³)  (the same as 0.5·x·(1 + tanh u), without
    /// tanh's cancellation)
    fn gelu_forward_chunk(o: &mut [f32], x: &[f32]) {
        for (oi, &xi) in o.iter_mut().zip(x) {
            let u = GELU_SCALE * (xi + 0.044715 * xi * xi * xi);
            *oi = xi / (1.0 + simd::exp(-2.0 * u));
        }
    }
}

/// dinp = dout·gelu'(x), gelu'(x) = 0.5·(1+tanh u) + 0.5·x·(1−tanh²u)·√(2/π)·(1 + 3·0.044715·x²)  (writes)
pub fn gelu_backward(dinp: &mut [f32], inp: &[f32], dout: &[f32]) {
    let n = dinp.len().min(inp.len()).min(dout.len());
    dinp[..n]
        .par_chunks_mut(CHUNK)
        .zip(inp[..n].par_chunks(CHUNK))
        .zip(dout[..n].par_chunks(CHUNK))
        .for_each(|((di, x), d)| gelu_backward_chunk(di, x, d));
}

multiversion! {
    /// With σ = σ(2u) = 0.5·(1+tanh u): gelu'(x) = σ + 2·x·σ·(1−σ)·u'(x)
    fn gelu_backward_chunk(di: &mut [f32], x: &[f32], d: &[f32]) {
        for ((o, &xi), &gi) in di.iter_mut().zip(x).zip(d) {
            let x2 = xi * xi;
            let u = GELU_SCALE * (xi + 0.044715 * x2 * xi);
            let sg = 1.0 / (1.0 + simd::exp(-2.0 * u));
            let du = GELU_SCALE * (1.0 + 3.0 * 0.044715 * x2);
            *o = gi * (sg + 2.0 * xi * sg * (1.0 - sg) * du);
        }
    }
}

/// out = a + b (elementwise)
pub fn residual_forward(out: &mut [f32], a: &[f32], b: &[f32]) {
    let n = out.len().min(a.len()).min(b.len());
    out[..n].par_chunks_mut(CHUNK).zip(a[..n].par_chunks(CHUNK)).zip(b[..n].par_chunks(CHUNK)).for_each(
        |((o, x), y)| {
            for ((oi, xi), yi) in o.iter_mut().zip(x).zip(y) {
                *oi = xi + yi;
            }
        },
    );
}

// ----------------------------------------------------------------------------------------------
// classifier

/// losses[r] = logsumexp(logits[r,:v]) − logits[r,targets[r]] (writes losses only)
/// losses[r] (+)= logsumexp(logits[r,:v]) − logits[r,target]  (added if `accumulate`)
pub fn cross_entropy_loss(logits: &[f32], losses: &mut [f32], targets: &[i32], n: usize, v: usize, vp: usize, accumulate: bool) {
    if n == 0 {
        return;
    }
    assert!(v > 0 && v <= vp && logits.len() >= n * vp && targets.len() >= n, "cross_entropy: bad sizes");
    losses[..n].par_iter_mut().enumerate().with_min_len(rows_per_task(vp)).for_each(|(r, loss)| {
        let row = &logits[r * vp..r * vp + v];
        let l = cross_entropy_row_loss(row, targets[r] as usize);
        *loss = if accumulate { *loss + l } else { l };
    });
}

multiversion! {
    /// logsumexp(row) − row[target]; the sum of exponentials is accumulated in f64.
    fn cross_entropy_row_loss(row: &[f32], target: usize) -> f32 {
        let mx = simd::max(row);
        let mut buf = [0f32; 256];
        let mut z = 0f64;
        for ch in row.chunks(256) {
            let e = &mut buf[..ch.len()];
            for (ei, &x) in e.iter_mut().zip(ch) {
                *ei = simd::exp(x - mx);
            }
            z += simd::sum_f64(e);
        }
        (z.ln() as f32) + (mx - row[target])
    }
}

/// losses[r] (+)= logsumexp(logits[r,:v]) − logits[r,target] (added if `accumulate`); if
/// `write_grad`, the logits row becomes (softmax(logits[r,:v]) − onehot(target))·dloss with 0 in
/// [v, vp), else it is left untouched
#[allow(clippy::too_many_arguments)]
pub fn cross_entropy(
    logits: &mut [f32], losses: &mut [f32], targets: &[i32], n: usize, v: usize, vp: usize, dloss: f32,
    write_grad: bool, accumulate: bool,
) {
    if !write_grad {
        return cross_entropy_loss(logits, losses, targets, n, v, vp, accumulate);
    }
    if n == 0 {
        return;
    }
    assert!(v > 0 && v <= vp && logits.len() >= n * vp && targets.len() >= n, "cross_entropy: bad sizes");
    logits[..n * vp]
        .par_chunks_mut(vp)
        .zip(losses[..n].par_iter_mut())
        .enumerate()
        .with_min_len(rows_per_task(vp))
        .for_each(|(r, (row, loss))| {
            let l = cross_entropy_row_grad(row, targets[r] as usize, v, dloss);
            *loss = if accumulate { *loss + l } else { l };
        });
}

multiversion! {
    /// Replaces row[..v] by (softmax − onehot)·dloss and row[v..] by 0; returns the loss.
    fn cross_entropy_row_grad(row: &mut [f32], target: usize, v: usize, dloss: f32) -> f32 {
        let xt = row[target];
        let (real, pad) = row.split_at_mut(v);
        let mx = simd::max(real);
        for x in real.iter_mut() {
            *x = simd::exp(*x - mx);
        }
        let z = simd::sum_f64(real);
        let k = (dloss as f64 / z) as f32;
        for x in real.iter_mut() {
            *x *= k;
        }
        real[target] -= dloss;
        pad.fill(0.0);
        (z.ln() as f32) + (mx - xt)
    }
}

// ----------------------------------------------------------------------------------------------
// reductions and the optimiser

/// out = 0
pub fn zero(out: &mut [f32]) {
    out.par_chunks_mut(CHUNK).for_each(|o| o.fill(0.0));
}

/// Σ inp², accumulated in f64 (fixed-size chunks summed in order)
pub fn sum_squares(inp: &[f32]) -> f32 {
    let parts: Vec<f64> = inp.par_chunks(CHUNK).map(sum_squares_chunk).collect();
    parts.iter().sum::<f64>() as f32
}

multiversion! {
    /// Σ x² in f64 with 8 independent lanes.
    fn sum_squares_chunk(x: &[f32]) -> f64 {
        let mut acc = [0f64; 8];
        let mut cx = x.chunks_exact(8);
        for q in &mut cx {
            for i in 0..8 {
                acc[i] += (q[i] as f64) * (q[i] as f64);
            }
        }
        let mut r = 0f64;
        for &v in cx.remainder() {
            r += (v as f64) * (v as f64);
        }
        ((acc[0] + acc[4]) + (acc[1] + acc[5])) + ((acc[2] + acc[6]) + (acc[3] + acc[7])) + r
    }
}

/// s = hyper[LOSS_SCALE]; norm = √(Σ parts) / s; hyper[GRAD_NORM] = norm;
/// hyper[FOUND_INF] = 1 if norm is inf/NaN else 0; hyper[GRAD_SCALE] = (max_norm/norm if
/// 0 < max_norm < norm, else 1) / s
pub fn clip_scale(hyper: &mut [f32], parts: &[f32], max_norm: f32) {
    let s = hyper[Scalars::LOSS_SCALE];
    let norm = (parts.iter().map(|&p| p as f64).sum::<f64>().sqrt() as f32) / s;
    hyper[Scalars::GRAD_NORM] = norm;
    hyper[Scalars::FOUND_INF] = if norm.is_finite() { 0.0 } else { 1.0 };
    hyper[Scalars::GRAD_SCALE] = (if max_norm > 0.0 && norm > max_norm { max_norm / norm } else { 1.0 }) / s;
}

/// Unless hyper[FOUND_INF] ≠ 0 (then nothing changes and false is returned):
/// g = grad·scale; m = β1·m + (1−β1)·g; v = β2·v + (1−β2)·g²;
/// param −= lr·((m/bc1) / (√(v/bc2) + eps) + weight_decay·param)
pub fn adamw(param: &mut [f32], grad: &[f32], m: &mut [f32], v: &mut [f32], hyper: &[f32], weight_decay: f32) -> bool {
    let h = &hyper[..Scalars::LEN];
    if h[Scalars::FOUND_INF] != 0.0 {
        return false;
    }
    let n = param.len();
    assert!(grad.len() >= n && m.len() >= n && v.len() >= n, "adamw: short input");
    param
        .par_chunks_mut(CHUNK)
        .zip(m[..n].par_chunks_mut(CHUNK))
        .zip(v[..n].par_chunks_mut(CHUNK))
        .zip(grad[..n].par_chunks(CHUNK))
        .for_each(|(((p, m), v), g)| adamw_chunk(p, g, m, v, h, weight_decay));
    true
}

multiversion! {
    /// The AdamW update of one chunk.
    fn adamw_chunk(p: &mut [f32], g: &[f32], m: &mut [f32], v: &mut [f32], h: &[f32], weight_decay: f32) {
        let lr = h[Scalars::LR];
        let (b1, b2, eps) = (h[Scalars::BETA1], h[Scalars::BETA2], h[Scalars::EPS]);
        let (bc1, bc2, gs) = (h[Scalars::BC1], h[Scalars::BC2], h[Scalars::GRAD_SCALE]);
        let n = p.len();
        let (g, m, v) = (&g[..n], &mut m[..n], &mut v[..n]);
        for i in 0..n {
            let gi = g[i] * gs;
            let mi = b1 * m[i] + (1.0 - b1) * gi;
            let vi = b2 * v[i] + (1.0 - b2) * gi * gi;
            m[i] = mi;
            v[i] = vi;
            p[i] -= lr * ((mi / bc1) / ((vi / bc2).sqrt() + eps) + weight_decay * p[i]);
        }
    }
}

// ----------------------------------------------------------------------------------------------
// cached (decoding) forward: encoder at given positions, KV-cache append, attention over the cache

/// out[r,:] = wte[tokens[r],:] + wpe[pos[r],:]   (writes out (n, c))
#[allow(clippy::too_many_arguments)]
pub fn encoder_at(out: &mut [f32], tokens: &[i32], pos: &[i32], wte: &[f32], wpe: &[f32], n: usize, c: usize) {
    if n == 0 || c == 0 {
        return;
    }
    out[..n * c].par_chunks_mut(c).with_min_len(rows_per_task(c)).enumerate().for_each(|(r, o)| {
        let (tok, p) = (tokens[r] as usize, pos[r] as usize);
        let (we, pe) = (&wte[tok * c..tok * c + c], &wpe[p * c..p * c + c]);
        for i in 0..c {
            o[i] = we[i] + pe[i];
        }
    });
}

/// kcache[slots[r], pos[r], :] = qkv[r, c..2c];  vcache[slots[r], pos[r], :] = qkv[r, 2c..3c]
#[allow(clippy::too_many_arguments)]
pub fn kv_store(kcache: &mut [f32], vcache: &mut [f32], qkv: &[f32], slots: &[i32], pos: &[i32], n: usize, c: usize, tmax: usize) {
    // serial: n·2c copies per layer, and padding rows may share a (slot, pos)
    for r in 0..n {
        let dst = (slots[r] as usize * tmax + pos[r] as usize) * c;
        let row = &qkv[r * 3 * c..(r + 1) * 3 * c];
        kcache[dst..dst + c].copy_from_slice(&row[c..2 * c]);
        vcache[dst..dst + c].copy_from_slice(&row[2 * c..3 * c]);
    }
}

/// Row r, head h: softmax over u ≤ pos[r] of q_r·k[slots[r],u]/√hs, times v[slots[r],u]
/// (writes out (n, c)).
#[allow(clippy::too_many_arguments)]
pub fn attention_cached(
    out: &mut [f32], qkv: &[f32], kcache: &[f32], vcache: &[f32], slots: &[i32], pos: &[i32],
    n: usize, c: usize, nh: usize, tmax: usize,
) {
    if n == 0 || c == 0 {
        return;
    }
    let hs = c / nh;
    let scale = 1.0 / (hs as f32).sqrt();
    out[..n * c].par_chunks_mut(hs).enumerate().for_each(|(rh, o)| {
        let (r, h) = (rh / nh, rh % nh);
        let (s, p) = (slots[r] as usize, pos[r] as usize);
        let q = &qkv[r * 3 * c + h * hs..r * 3 * c + (h + 1) * hs];
        let base = s * tmax * c + h * hs;
        let mut sc: Vec<f32> = (0..=p).map(|u| simd::dot(q, &kcache[base + u * c..base + u * c + hs]) * scale).collect();
        let mx = simd::max(&sc);
        for x in sc.iter_mut() {
            *x = simd::exp(*x - mx);
        }
        let inv = 1.0 / simd::sum(&sc);
        o.fill(0.0);
        for (u, &e) in sc.iter().enumerate() {
            simd::axpy(o, e * inv, &vcache[base + u * c..base + u * c + hs]);
        }
    });
}
