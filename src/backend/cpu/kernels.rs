//! CPU kernels: one plain function per [`crate::graph::Kernel`] variant, over slices. The contract
//! (what is written, what is accumulated) is the doc comment of each variant in
//! `src/graph/kernels.rs`. Every kernel is parallel with rayon over rows, (batch, head) pairs or
//! fixed-size chunks, and runs in whatever rayon pool is current (the backend installs its own).
//! Reductions use fixed chunk sizes and combine partial results in order, so results do not
//! depend on the thread count. Matmuls use the `gemm` crate with strides (no transposed copies).
//!
//! Sizes: a slice may be longer than the kernel needs; only the leading part is used.
//! Panics if a slice is shorter than its size arguments say, or a token/target id is out of
//! range: the backend (`super::CpuBackend`) checks both before calling and returns an error.

use crate::graph::Hyper;
use gemm::Parallelism;
use rayon::prelude::*;

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
fn rows_per_task(c: usize) -> usize {
    (CHUNK / c.max(1)).max(1)
}

/// Σ a[i]·b[i] with 8 independent lanes (vectorises without fast-math).
#[inline]
fn dot(a: &[f32], b: &[f32]) -> f32 {
    let b = &b[..a.len()];
    let mut acc = [0f32; 8];
    let mut ca = a.chunks_exact(8);
    let mut cb = b.chunks_exact(8);
    for (x, y) in (&mut ca).zip(&mut cb) {
        for i in 0..8 {
            acc[i] += x[i] * y[i];
        }
    }
    let mut s = 0f32;
    for (x, y) in ca.remainder().iter().zip(cb.remainder()) {
        s += x * y;
    }
    ((acc[0] + acc[4]) + (acc[1] + acc[5])) + ((acc[2] + acc[6]) + (acc[3] + acc[7])) + s
}

/// y += a·x
#[inline]
fn axpy(y: &mut [f32], a: f32, x: &[f32]) {
    for (yi, xi) in y.iter_mut().zip(x) {
        *yi += a * xi;
    }
}

/// Σ x with 8 independent lanes.
#[inline]
fn sum(x: &[f32]) -> f32 {
    let mut acc = [0f32; 8];
    let mut cx = x.chunks_exact(8);
    for ch in &mut cx {
        for i in 0..8 {
            acc[i] += ch[i];
        }
    }
    let s: f32 = cx.remainder().iter().sum();
    ((acc[0] + acc[4]) + (acc[1] + acc[5])) + ((acc[2] + acc[6]) + (acc[3] + acc[7])) + s
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
            let x = &inp[r * c..r * c + c];
            let m = sum(x) / c as f32;
            let mut acc = [0f32; 8];
            let mut cx = x.chunks_exact(8);
            for ch in &mut cx {
                for i in 0..8 {
                    let d = ch[i] - m;
                    acc[i] += d * d;
                }
            }
            let mut var: f32 = cx.remainder().iter().map(|&v| (v - m) * (v - m)).sum();
            var += ((acc[0] + acc[4]) + (acc[1] + acc[5])) + ((acc[2] + acc[6]) + (acc[3] + acc[7]));
            let s = 1.0 / (var / c as f32 + LN_EPS).sqrt();
            for i in 0..c {
                o[i] = (x[i] - m) * s * weight[i] + bias[i];
            }
            *mu = m;
            *rs = s;
        });
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
            let mut acc = vec![0f32; 2 * c]; // [dweight | dbias] partial sums of this chunk
            let (dw, db) = acc.split_at_mut(c);
            for (j, drow) in dchunk.chunks_mut(c).enumerate() {
                let r = ci * LN_BWD_ROWS + j;
                let x = &inp[r * c..r * c + c];
                let d = &dout[r * c..r * c + c];
                let (mu, rs) = (mean[r], rstd[r]);
                let mut sg = 0f32;
                let mut sgx = 0f32;
                for i in 0..c {
                    let xh = (x[i] - mu) * rs;
                    let g = d[i] * weight[i];
                    sg += g;
                    sgx += g * xh;
                    dw[i] += d[i] * xh;
                    db[i] += d[i];
                }
                let mg = sg / c as f32;
                let mgx = sgx / c as f32;
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

// ----------------------------------------------------------------------------------------------
// matmul

/// out (n,oc) = inp (n,c) · weightᵀ (weight (oc,c)) + bias (oc, optional); writes out
pub fn matmul_forward(out: &mut [f32], inp: &[f32], weight: &[f32], bias: Option<&[f32]>, n: usize, c: usize, oc: usize) {
    if n == 0 || oc == 0 {
        return;
    }
    let out = &mut out[..n * oc];
    assert!(inp.len() >= n * c && weight.len() >= oc * c, "matmul_forward: short input");
    match bias {
        Some(bias) => {
            let bias = &bias[..oc];
            out.par_chunks_mut(oc).with_min_len(rows_per_task(oc)).for_each(|r| r.copy_from_slice(bias));
        }
        None if c == 0 => out.fill(0.0),
        None => {}
    }
    if c == 0 {
        return;
    }
    // SAFETY: out is n×oc (row stride oc), inp is n×c (row stride c) and weight is oc×c, all
    // checked above; the rhs k×n = weightᵀ is read with row stride 1 and column stride c. out
    // does not alias the inputs (it is a &mut).
    unsafe {
        gemm::gemm(
            n, oc, c,
            out.as_mut_ptr(), 1, oc as isize, bias.is_some(),
            inp.as_ptr(), 1, c as isize,
            weight.as_ptr(), c as isize, 1,
            1.0f32, 1.0f32, false, false, false, Parallelism::Rayon(0),
        );
    }
}

/// dinp (n,c) = dout (n,oc) · weight (writes);  dweight (oc,c) += doutᵀ·inp;  dbias (oc) += Σ_rows dout
#[allow(clippy::too_many_arguments)]
pub fn matmul_backward(
    dinp: &mut [f32], dweight: &mut [f32], dbias: Option<&mut [f32]>, dout: &[f32], inp: &[f32], weight: &[f32],
    n: usize, c: usize, oc: usize,
) {
    let dinp = &mut dinp[..n * c];
    if n == 0 {
        return;
    }
    if oc == 0 {
        dinp.fill(0.0);
        return;
    }
    assert!(
        dout.len() >= n * oc && inp.len() >= n * c && weight.len() >= oc * c && dweight.len() >= oc * c,
        "matmul_backward: short input"
    );
    if c > 0 {
        // SAFETY (both calls): every matrix lies inside its slice (lengths checked above); the
        // destinations are &mut slices distinct from the sources.
        unsafe {
            // dinp (n×c) = dout (n×oc) · W (oc×c, row stride c)
            gemm::gemm(
                n, c, oc,
                dinp.as_mut_ptr(), 1, c as isize, false,
                dout.as_ptr(), 1, oc as isize,
                weight.as_ptr(), 1, c as isize,
                1.0f32, 1.0f32, false, false, false, Parallelism::Rayon(0),
            );
            // dweight (oc×c) += doutᵀ (oc×n: element (i,k) at dout[k·oc + i]) · inp (n×c)
            gemm::gemm(
                oc, c, n,
                dweight.as_mut_ptr(), 1, c as isize, true,
                dout.as_ptr(), oc as isize, 1,
                inp.as_ptr(), 1, c as isize,
                1.0f32, 1.0f32, false, false, false, Parallelism::Rayon(0),
            );
        }
    }
    if let Some(dbias) = dbias {
        // column sums, parallel over column blocks; rows summed in order
        const COLS: usize = 64;
        dbias[..oc].par_chunks_mut(COLS).enumerate().for_each(|(bi, db)| {
            let j0 = bi * COLS;
            let w = db.len();
            let mut acc = [0f32; COLS];
            for r in 0..n {
                let row = &dout[r * oc + j0..r * oc + j0 + w];
                for (a, x) in acc.iter_mut().zip(row) {
                    *a += x;
                }
            }
            for (d, a) in db.iter_mut().zip(&acc) {
                *d += a;
            }
        });
    }
}

// ----------------------------------------------------------------------------------------------
// attention

/// Copies head `h` of `part` (0 = q, 1 = k, 2 = v) of batch `bb` from qkv (b,t,3c) into dst (t, hs).
#[inline]
fn gather_head(dst: &mut [f32], qkv: &[f32], bb: usize, h: usize, part: usize, t: usize, c: usize, hs: usize) {
    for u in 0..t {
        let src = (bb * t + u) * 3 * c + part * c + h * hs;
        dst[u * hs..(u + 1) * hs].copy_from_slice(&qkv[src..src + hs]);
    }
}

/// Causal softmax attention per (batch, head): out_t = Σ_{u≤t} softmax_u(q_t·k_u/√hs)·v_u;
/// writes out (b·t, c) and lse (b, nh, t) = logsumexp_u of the scaled scores
#[allow(clippy::too_many_arguments)]
pub fn attention_forward(out: &mut [f32], lse: &mut [f32], qkv: &[f32], b: usize, t: usize, c: usize, nh: usize) {
    if b == 0 || t == 0 || c == 0 {
        return;
    }
    assert!(nh > 0 && c % nh == 0, "attention_forward: c must be a multiple of nh");
    assert!(qkv.len() >= b * t * 3 * c, "attention_forward: short qkv");
    let hs = c / nh;
    let scale = 1.0 / (hs as f32).sqrt();
    // per (b,h) results in a (b, nh, t, hs) scratch, then permuted into (b, t, c)
    let mut tmp = vec![0f32; b * nh * t * hs];
    tmp.par_chunks_mut(t * hs).zip(lse[..b * nh * t].par_chunks_mut(t)).enumerate().for_each(|(bh, (o, l))| {
        let (bb, h) = (bh / nh, bh % nh);
        let mut q = vec![0f32; t * hs];
        let mut k = vec![0f32; t * hs];
        let mut v = vec![0f32; t * hs];
        gather_head(&mut q, qkv, bb, h, 0, t, c, hs);
        gather_head(&mut k, qkv, bb, h, 1, t, c, hs);
        gather_head(&mut v, qkv, bb, h, 2, t, c, hs);
        let mut s = vec![0f32; t];
        for tt in 0..t {
            let qt = &q[tt * hs..(tt + 1) * hs];
            let mut mx = f32::NEG_INFINITY;
            for u in 0..=tt {
                let x = dot(qt, &k[u * hs..(u + 1) * hs]) * scale;
                s[u] = x;
                mx = mx.max(x);
            }
            let mut z = 0f32;
            for su in s[..=tt].iter_mut() {
                let e = (*su - mx).exp();
                *su = e;
                z += e;
            }
            let inv = 1.0 / z;
            let ot = &mut o[tt * hs..(tt + 1) * hs];
            for u in 0..=tt {
                axpy(ot, s[u] * inv, &v[u * hs..(u + 1) * hs]);
            }
            l[tt] = mx + z.ln();
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

/// p = exp(q·k/√hs − lse), dP = dout·vᵀ, D_t = dout_t·out_t, dS = p∘(dP − D):
/// dq = dS·k/√hs, dk = dSᵀ·q/√hs, dv = pᵀ·dout; writes dqkv (b·t, 3c)
#[allow(clippy::too_many_arguments)]
pub fn attention_backward(
    dqkv: &mut [f32], dout: &[f32], out: &[f32], lse: &[f32], qkv: &[f32], b: usize, t: usize, c: usize, nh: usize,
) {
    if b == 0 || t == 0 || c == 0 {
        return;
    }
    assert!(nh > 0 && c % nh == 0, "attention_backward: c must be a multiple of nh");
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
        let mut q = vec![0f32; t * hs];
        let mut k = vec![0f32; t * hs];
        let mut v = vec![0f32; t * hs];
        gather_head(&mut q, qkv, bb, h, 0, t, c, hs);
        gather_head(&mut k, qkv, bb, h, 1, t, c, hs);
        gather_head(&mut v, qkv, bb, h, 2, t, c, hs);
        for tt in 0..t {
            let row = (bb * t + tt) * c + h * hs;
            let dot_t = &dout[row..row + hs];
            let d = dot(dot_t, &out[row..row + hs]);
            let l = lse[bh * t + tt];
            let qt = &q[tt * hs..(tt + 1) * hs];
            let dqt = &mut dq[tt * hs..(tt + 1) * hs];
            for u in 0..=tt {
                let ku = &k[u * hs..(u + 1) * hs];
                let vu = &v[u * hs..(u + 1) * hs];
                let p = (dot(qt, ku) * scale - l).exp();
                let ds = p * (dot(dot_t, vu) - d) * scale;
                axpy(dqt, ds, ku);
                axpy(&mut dk[u * hs..(u + 1) * hs], ds, qt);
                axpy(&mut dv[u * hs..(u + 1) * hs], p, dot_t);
            }
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

// ----------------------------------------------------------------------------------------------
// gelu, residual

/// out = 0.5·x·(1 + tanh(√(2/π)·(x + 0.044715·x³)))
pub fn gelu_forward(out: &mut [f32], inp: &[f32]) {
    let n = out.len().min(inp.len());
    out[..n].par_chunks_mut(CHUNK).zip(inp[..n].par_chunks(CHUNK)).for_each(|(o, x)| {
        for (oi, &xi) in o.iter_mut().zip(x) {
            let u = GELU_SCALE * (xi + 0.044715 * xi * xi * xi);
            *oi = 0.5 * xi * (1.0 + u.tanh());
        }
    });
}

/// dinp = dout·gelu'(x), gelu'(x) = 0.5·(1+tanh u) + 0.5·x·(1−tanh²u)·√(2/π)·(1 + 3·0.044715·x²)  (writes)
pub fn gelu_backward(dinp: &mut [f32], inp: &[f32], dout: &[f32]) {
    let n = dinp.len().min(inp.len()).min(dout.len());
    dinp[..n].par_chunks_mut(CHUNK).zip(inp[..n].par_chunks(CHUNK)).zip(dout[..n].par_chunks(CHUNK)).for_each(
        |((di, x), d)| {
            for ((o, &xi), &gi) in di.iter_mut().zip(x).zip(d) {
                let x2 = xi * xi;
                let u = GELU_SCALE * (xi + 0.044715 * x2 * xi);
                let th = u.tanh();
                let du = GELU_SCALE * (1.0 + 3.0 * 0.044715 * x2);
                *o = gi * (0.5 * (1.0 + th) + 0.5 * xi * (1.0 - th * th) * du);
            }
        },
    );
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
pub fn cross_entropy_loss(logits: &[f32], losses: &mut [f32], targets: &[i32], n: usize, v: usize, vp: usize) {
    if n == 0 {
        return;
    }
    assert!(v > 0 && v <= vp && logits.len() >= n * vp && targets.len() >= n, "cross_entropy: bad sizes");
    losses[..n].par_iter_mut().enumerate().with_min_len(rows_per_task(vp)).for_each(|(r, loss)| {
        let row = &logits[r * vp..r * vp + v];
        let mx = row.iter().fold(f32::NEG_INFINITY, |m, &x| m.max(x));
        let mut z = 0f64;
        for &x in row {
            z += (x - mx).exp() as f64;
        }
        *loss = (z.ln() as f32) + (mx - row[targets[r] as usize]);
    });
}

/// losses[r] = logsumexp(logits[r,:v]) − logits[r,target]; if `write_grad`, the logits row becomes
/// (softmax(logits[r,:v]) − onehot(target))·dloss with 0 in [v, vp), else it is left untouched
#[allow(clippy::too_many_arguments)]
pub fn cross_entropy(
    logits: &mut [f32], losses: &mut [f32], targets: &[i32], n: usize, v: usize, vp: usize, dloss: f32,
    write_grad: bool,
) {
    if !write_grad {
        return cross_entropy_loss(logits, losses, targets, n, v, vp);
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
            let tgt = targets[r] as usize;
            let xt = row[tgt];
            let (real, pad) = row.split_at_mut(v);
            let mx = real.iter().fold(f32::NEG_INFINITY, |m, &x| m.max(x));
            let mut z = 0f64;
            for x in real.iter_mut() {
                let e = (*x - mx).exp();
                *x = e;
                z += e as f64;
            }
            *loss = (z.ln() as f32) + (mx - xt);
            let k = (dloss as f64 / z) as f32;
            for x in real.iter_mut() {
                *x *= k;
            }
            real[tgt] -= dloss;
            pad.fill(0.0);
        });
}

// ----------------------------------------------------------------------------------------------
// reductions and the optimiser

/// out = 0
pub fn zero(out: &mut [f32]) {
    out.par_chunks_mut(CHUNK).for_each(|o| o.fill(0.0));
}

/// Σ inp², accumulated in f64 (fixed-size chunks summed in order)
pub fn sum_squares(inp: &[f32]) -> f32 {
    let parts: Vec<f64> = inp
        .par_chunks(CHUNK)
        .map(|ch| {
            let mut acc = [0f64; 4];
            let mut cx = ch.chunks_exact(4);
            for q in &mut cx {
                for i in 0..4 {
                    acc[i] += (q[i] as f64) * (q[i] as f64);
                }
            }
            let r: f64 = cx.remainder().iter().map(|&x| (x as f64) * (x as f64)).sum();
            (acc[0] + acc[1]) + (acc[2] + acc[3]) + r
        })
        .collect();
    parts.iter().sum::<f64>() as f32
}

/// norm = √(Σ parts); hyper[GRAD_NORM] = norm; hyper[GRAD_SCALE] = max_norm/norm if
/// 0 < max_norm < norm, else 1
pub fn clip_scale(hyper: &mut [f32], parts: &[f32], max_norm: f32) {
    let norm = parts.iter().map(|&p| p as f64).sum::<f64>().sqrt() as f32;
    hyper[Hyper::GRAD_NORM] = norm;
    hyper[Hyper::GRAD_SCALE] = if max_norm > 0.0 && norm > max_norm { max_norm / norm } else { 1.0 };
}

/// g = grad·scale; m = β1·m + (1−β1)·g; v = β2·v + (1−β2)·g²;
/// param −= lr·((m/bc1) / (√(v/bc2) + eps) + weight_decay·param)
pub fn adamw(param: &mut [f32], grad: &[f32], m: &mut [f32], v: &mut [f32], hyper: &[f32], weight_decay: f32) {
    let lr = hyper[Hyper::LR];
    let (b1, b2, eps) = (hyper[Hyper::BETA1], hyper[Hyper::BETA2], hyper[Hyper::EPS]);
    let (bc1, bc2, gs) = (hyper[Hyper::BC1], hyper[Hyper::BC2], hyper[Hyper::GRAD_SCALE]);
    let n = param.len();
    assert!(grad.len() >= n && m.len() >= n && v.len() >= n, "adamw: short input");
    param
        .par_chunks_mut(CHUNK)
        .zip(m[..n].par_chunks_mut(CHUNK))
        .zip(v[..n].par_chunks_mut(CHUNK))
        .zip(grad[..n].par_chunks(CHUNK))
        .for_each(|(((p, m), v), g)| {
            for i in 0..p.len() {
                let gi = g[i] * gs;
                let mi = b1 * m[i] + (1.0 - b1) * gi;
                let vi = b2 * v[i] + (1.0 - b2) * gi * gi;
                m[i] = mi;
                v[i] = vi;
                p[i] -= lr * ((mi / bc1) / ((vi / bc2).sqrt() + eps) + weight_decay * p[i]);
            }
        });
}
