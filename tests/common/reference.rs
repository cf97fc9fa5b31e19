//! Float64 references of every kernel, written as plain loops from the contract in
//! `src/graph/kernels.rs` (never from a backend's code), and [`run_launches`]: an f64 interpreter
//! of a launch list over a buffer table, which gives the conformance suite the expected contents
//! of every buffer. The tests of `cpu_kernels.rs` use the single-kernel functions directly.
//!
//! Inputs are generic over `f32`/`f64` (`Into<f64>`), so the same function serves data straight
//! from an f32 buffer and the interpreter's f64 state.

use wgpt::graph::{BufferTable, DType, Kernel, Launch, Scalars, View};

/// The values as f64.
pub fn f64s<T: Copy + Into<f64>>(x: &[T]) -> Vec<f64> {
    x.iter().map(|&v| v.into()).collect()
}

// ---------------------------------------------------------------------------------------------
// single kernels

/// out[b,t,:] = wte[tokens[b,t],:] + wpe[t,:]
pub fn encoder_ref<T: Copy + Into<f64>>(tokens: &[i32], wte: &[T], wpe: &[T], b: usize, t: usize, c: usize) -> Vec<f64> {
    let mut out = vec![0.0; b * t * c];
    for r in 0..b * t {
        let tok = tokens[r] as usize;
        for i in 0..c {
            out[r * c + i] = wte[tok * c + i].into() + wpe[(r % t) * c + i].into();
        }
    }
    out
}

/// Attention of each row over its cache slot, rows 0..=pos (two-pass softmax in f64).
#[allow(clippy::too_many_arguments)]
pub fn attn_cached_ref(
    qkv: &[f64], kc: &[f64], vc: &[f64], slots: &[i32], pos: &[i32], n: usize, c: usize, nh: usize, tmax: usize,
) -> Vec<f64> {
    let hs = c / nh;
    let mut out = vec![0.0; n * c];
    for r in 0..n {
        let (sl, p) = (slots[r] as usize, pos[r] as usize);
        for h in 0..nh {
            let q = &qkv[r * 3 * c + h * hs..r * 3 * c + (h + 1) * hs];
            let row = |u: usize| (sl * tmax + u) * c + h * hs;
            let sc: Vec<f64> =
                (0..=p).map(|u| q.iter().zip(&kc[row(u)..row(u) + hs]).map(|(a, b)| a * b).sum::<f64>() / (hs as f64).sqrt()).collect();
            let mx = sc.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
            let e: Vec<f64> = sc.iter().map(|x| (x - mx).exp()).collect();
            let z: f64 = e.iter().sum();
            for (u, w) in e.iter().enumerate() {
                for i in 0..hs {
                    out[r * c + h * hs + i] += w / z * vc[row(u) + i];
                }
            }
        }
    }
    out
}

/// dwte[tokens[r],:] += dout[r,:];  dwpe[r mod t,:] += dout[r,:]  (in place)
pub fn encoder_backward_ref<T: Copy + Into<f64>>(
    dwte: &mut [f64], dwpe: &mut [f64], dout: &[T], tokens: &[i32], b: usize, t: usize, c: usize,
) {
    for r in 0..b * t {
        let tok = tokens[r] as usize;
        for i in 0..c {
            let d = dout[r * c + i].into();
            dwte[tok * c + i] += d;
            dwpe[(r % t) * c + i] += d;
        }
    }
}

/// (out, mean, rstd) of layernorm with the biased variance and eps 1e-5.
pub fn ln_ref<T: Copy + Into<f64>>(x: &[T], w: &[T], b: &[T], n: usize, c: usize) -> (Vec<f64>, Vec<f64>, Vec<f64>) {
    let (mut out, mut mean, mut rstd) = (vec![0.0; n * c], vec![0.0; n], vec![0.0; n]);
    for r in 0..n {
        let row = &x[r * c..(r + 1) * c];
        let m = row.iter().map(|&v| v.into()).sum::<f64>() / c as f64;
        let var = row.iter().map(|&v| (v.into() - m).powi(2)).sum::<f64>() / c as f64;
        let s = 1.0 / (var + 1e-5).sqrt();
        for i in 0..c {
            out[r * c + i] = (row[i].into() - m) * s * w[i].into() + b[i].into();
        }
        mean[r] = m;
        rstd[r] = s;
    }
    (out, mean, rstd)
}

/// The layernorm backward with the given statistics: returns (dinp, dweight, dbias), the
/// gradient alone (the caller adds or writes it).
#[allow(clippy::too_many_arguments)]
pub fn ln_backward_ref<T: Copy + Into<f64>>(
    dout: &[T], x: &[T], w: &[T], mean: &[T], rstd: &[T], n: usize, c: usize,
) -> (Vec<f64>, Vec<f64>, Vec<f64>) {
    let (mut dinp, mut dw, mut db) = (vec![0.0; n * c], vec![0.0; c], vec![0.0; c]);
    for r in 0..n {
        let (m, s) = (mean[r].into(), rstd[r].into());
        let xhat: Vec<f64> = (0..c).map(|i| (x[r * c + i].into() - m) * s).collect();
        let g: Vec<f64> = (0..c).map(|i| dout[r * c + i].into() * w[i].into()).collect();
        let mg = g.iter().sum::<f64>() / c as f64;
        let mgx = g.iter().zip(&xhat).map(|(a, b)| a * b).sum::<f64>() / c as f64;
        for i in 0..c {
            dinp[r * c + i] = s * (g[i] - mg - xhat[i] * mgx);
            dw[i] += dout[r * c + i].into() * xhat[i];
            db[i] += dout[r * c + i].into();
        }
    }
    (dinp, dw, db)
}

/// out (n,oc) = x (n,c) · wᵀ + bias
pub fn matmul_ref<T: Copy + Into<f64>>(x: &[T], w: &[T], bias: Option<&[T]>, n: usize, c: usize, oc: usize) -> Vec<f64> {
    let mut out = vec![0.0; n * oc];
    for r in 0..n {
        for o in 0..oc {
            let mut s = bias.map_or(0.0, |b| b[o].into());
            for i in 0..c {
                s += x[r * c + i].into() * w[o * c + i].into();
            }
            out[r * oc + o] = s;
        }
    }
    out
}

/// The matmul backward: returns (dinp = dout·w, dweight = doutᵀ·x, dbias = Σ_rows dout), the
/// gradients alone.
pub fn matmul_backward_ref<T: Copy + Into<f64>>(
    dout: &[T], x: &[T], w: &[T], n: usize, c: usize, oc: usize,
) -> (Vec<f64>, Vec<f64>, Vec<f64>) {
    let (mut dinp, mut dw, mut db) = (vec![0.0; n * c], vec![0.0; oc * c], vec![0.0; oc]);
    for r in 0..n {
        for o in 0..oc {
            let d = dout[r * oc + o].into();
            db[o] += d;
            for i in 0..c {
                dinp[r * c + i] += d * w[o * c + i].into();
                dw[o * c + i] += d * x[r * c + i].into();
            }
        }
    }
    (dinp, dw, db)
}

/// Causal attention: (out (b·t, c), lse (b, nh, t)).
pub fn attn_ref<T: Copy + Into<f64>>(qkv: &[T], b: usize, t: usize, c: usize, nh: usize) -> (Vec<f64>, Vec<f64>) {
    let hs = c / nh;
    let mut out = vec![0.0; b * t * c];
    let mut lse = vec![0.0; b * nh * t];
    for bb in 0..b {
        for h in 0..nh {
            for tt in 0..t {
                let q = |i: usize| qkv[(bb * t + tt) * 3 * c + h * hs + i].into();
                let kk = |u: usize, i: usize| qkv[(bb * t + u) * 3 * c + c + h * hs + i].into();
                let vv = |u: usize, i: usize| qkv[(bb * t + u) * 3 * c + 2 * c + h * hs + i].into();
                let s: Vec<f64> =
                    (0..=tt).map(|u| (0..hs).map(|i| q(i) * kk(u, i)).sum::<f64>() / (hs as f64).sqrt()).collect();
                let mx = s.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                let z: f64 = s.iter().map(|x| (x - mx).exp()).sum();
                for i in 0..hs {
                    out[(bb * t + tt) * c + h * hs + i] = (0..=tt).map(|u| (s[u] - mx).exp() / z * vv(u, i)).sum();
                }
                lse[(bb * nh + h) * t + tt] = mx + z.ln();
            }
        }
    }
    (out, lse)
}

/// The attention backward as the contract states it, from the given `out` and `lse`:
/// p = exp(s − lse), dP = dout·vᵀ, D_t = Σ dout_t·out_t, dS = p∘(dP − D), dq = dS·k/√hs,
/// dk = dSᵀ·q/√hs, dv = pᵀ·dout.  Returns dqkv (b·t, 3c).
#[allow(clippy::too_many_arguments)]
pub fn attn_backward_ref<T: Copy + Into<f64>>(
    dout: &[T], out: &[T], lse: &[T], qkv: &[T], b: usize, t: usize, c: usize, nh: usize,
) -> Vec<f64> {
    let hs = c / nh;
    let sc = 1.0 / (hs as f64).sqrt();
    let mut dqkv = vec![0.0; b * t * 3 * c];
    let at = |bb: usize, u: usize, part: usize, h: usize, i: usize| (bb * t + u) * 3 * c + part * c + h * hs + i;
    for bb in 0..b {
        for h in 0..nh {
            for tt in 0..t {
                let row = (bb * t + tt) * c + h * hs;
                let d: f64 = (0..hs).map(|i| dout[row + i].into() * out[row + i].into()).sum();
                let l = lse[(bb * nh + h) * t + tt].into();
                for u in 0..=tt {
                    let s = (0..hs).map(|i| qkv[at(bb, tt, 0, h, i)].into() * qkv[at(bb, u, 1, h, i)].into()).sum::<f64>() * sc;
                    let p = (s - l).exp();
                    let dp: f64 = (0..hs).map(|i| dout[row + i].into() * qkv[at(bb, u, 2, h, i)].into()).sum();
                    let ds = p * (dp - d);
                    for i in 0..hs {
                        dqkv[at(bb, tt, 0, h, i)] += ds * qkv[at(bb, u, 1, h, i)].into() * sc;
                        dqkv[at(bb, u, 1, h, i)] += ds * qkv[at(bb, tt, 0, h, i)].into() * sc;
                        dqkv[at(bb, u, 2, h, i)] += p * dout[row + i].into();
                    }
                }
            }
        }
    }
    dqkv
}

/// gelu with the tanh approximation.
pub fn gelu_ref(x: f64) -> f64 {
    0.5 * x * (1.0 + ((2.0 / std::f64::consts::PI).sqrt() * (x + 0.044715 * x * x * x)).tanh())
}

/// d gelu(x) / dx of the tanh form.
pub fn gelu_grad_ref(x: f64) -> f64 {
    let s = (2.0 / std::f64::consts::PI).sqrt();
    let th = (s * (x + 0.044715 * x * x * x)).tanh();
    0.5 * (1.0 + th) + 0.5 * x * (1.0 - th * th) * s * (1.0 + 3.0 * 0.044715 * x * x)
}

/// Per-row losses logsumexp(logits[r,:v]) − logits[r,target].
pub fn ce_ref<T: Copy + Into<f64>>(logits: &[T], targets: &[i32], n: usize, v: usize, vp: usize) -> Vec<f64> {
    (0..n)
        .map(|r| {
            let row = &logits[r * vp..r * vp + v];
            let mx = row.iter().fold(f64::NEG_INFINITY, |m, &x| m.max(x.into()));
            let z: f64 = row.iter().map(|&x| (x.into() - mx).exp()).sum();
            mx + z.ln() - row[targets[r] as usize].into()
        })
        .collect()
}

/// dlogits (n, vp) = (softmax(logits[r,:v]) − onehot(target))·dloss, and 0 in [v, vp).
pub fn ce_grad_ref<T: Copy + Into<f64>>(logits: &[T], targets: &[i32], n: usize, v: usize, vp: usize, dloss: f64) -> Vec<f64> {
    let losses = ce_ref(logits, targets, n, v, vp);
    let mut d = vec![0.0; n * vp];
    for r in 0..n {
        let tgt = targets[r] as usize;
        let lse = losses[r] + logits[r * vp + tgt].into();
        for j in 0..v {
            d[r * vp + j] = ((logits[r * vp + j].into() - lse).exp() - (j == tgt) as i32 as f64) * dloss;
        }
    }
    d
}

/// (GRAD_NORM, GRAD_SCALE, FOUND_INF) of ClipScale over the norm parts, for gradients carrying
/// the loss scale `loss_scale`.
pub fn clip_scale_ref<T: Copy + Into<f64>>(parts: &[T], max_norm: f64, loss_scale: f64) -> (f64, f64, f64) {
    let norm = parts.iter().map(|&p| p.into()).sum::<f64>().sqrt() / loss_scale;
    let clip = if max_norm > 0.0 && norm > max_norm { max_norm / norm } else { 1.0 };
    (norm, clip / loss_scale, if norm.is_finite() { 0.0 } else { 1.0 })
}

/// One AdamW step in place with the scalars of `hyper` (`Scalars` slots).
pub fn adamw_ref<T: Copy + Into<f64>>(p: &mut [f64], g: &[T], m: &mut [f64], v: &mut [f64], hyper: &[T], wd: f64) {
    let h = |i: usize| hyper[i].into();
    let (lr, b1, b2, eps, bc1, bc2, scale) =
        (h(Scalars::LR), h(Scalars::BETA1), h(Scalars::BETA2), h(Scalars::EPS), h(Scalars::BC1), h(Scalars::BC2), h(Scalars::GRAD_SCALE));
    for i in 0..p.len() {
        let gi = g[i].into() * scale;
        m[i] = b1 * m[i] + (1.0 - b1) * gi;
        v[i] = b2 * v[i] + (1.0 - b2) * gi * gi;
        p[i] -= lr * ((m[i] / bc1) / ((v[i] / bc2).sqrt() + eps) + wd * p[i]);
    }
}

// ---------------------------------------------------------------------------------------------
// the interpreter

/// A value rounded to what a buffer of `dtype` stores.
pub fn round_to(dtype: DType, x: f64) -> f64 {
    match dtype {
        DType::F32 => x as f32 as f64,
        DType::F16 => half::f16::from_f64(x).to_f64(),
        // through f32: half's bf16::from_f64 does not round to nearest (it gives the value below
        // for some f32 inputs, where bf16::from_f32 and a GPU's conversion round up)
        DType::BF16 => half::bf16::from_f32(x as f32).to_f64(),
        DType::I32 => x,
    }
}

struct State<'a> {
    table: &'a BufferTable,
    bufs: Vec<Vec<f64>>,
}

impl State<'_> {
    fn get(&self, v: View) -> Vec<f64> {
        self.bufs[v.buf.0 as usize][v.offset..v.offset + v.len].to_vec()
    }
    fn ids(&self, v: View) -> Vec<i32> {
        self.get(v).iter().map(|&x| x as i32).collect()
    }
    /// Store `x` at the start of view `v`, rounded to the buffer's dtype.
    fn put(&mut self, v: View, x: &[f64]) {
        assert!(x.len() <= v.len, "reference: {} values for a view of {}", x.len(), v.len);
        let dtype = self.table.get(v.buf).dtype;
        let dst = &mut self.bufs[v.buf.0 as usize][v.offset..v.offset + x.len()];
        for (d, &s) in dst.iter_mut().zip(x) {
            *d = round_to(dtype, s);
        }
    }
    fn add(&mut self, v: View, x: &[f64]) {
        let sum: Vec<f64> = self.get(v).iter().zip(x).map(|(a, b)| a + b).collect();
        self.put(v, &sum);
    }
}

/// The contents of every buffer of `table` after running `launches` `repeat` times on buffers
/// holding `init` (one vector per buffer, ids included): each kernel computed in f64 from the
/// stored values, its outputs rounded to their buffer's dtype, as a device would store them.
pub fn run_launches(table: &BufferTable, init: &[Vec<f64>], launches: &[Launch], repeat: usize) -> Vec<Vec<f64>> {
    let mut s = State { table, bufs: init.to_vec() };
    for _ in 0..repeat {
        for l in launches {
            run_one(&mut s, &l.kernel);
        }
    }
    s.bufs
}

fn run_one(s: &mut State, k: &Kernel) {
    use Kernel::*;
    match *k {
        EncoderForward { out, tokens, wte, wpe, b, t, c } => {
            let o = encoder_ref(&s.ids(tokens), &s.get(wte), &s.get(wpe), b, t, c);
            s.put(out, &o);
        }
        EncoderBackward { dwte, dwpe, dout, tokens, b, t, c } => {
            let (mut te, mut pe) = (s.get(dwte), s.get(dwpe));
            encoder_backward_ref(&mut te, &mut pe, &s.get(dout), &s.ids(tokens), b, t, c);
            s.put(dwte, &te);
            s.put(dwpe, &pe);
        }
        LayerNormForward { out, mean, rstd, inp, weight, bias, n, c } => {
            let (o, m, r) = ln_ref(&s.get(inp), &s.get(weight), &s.get(bias), n, c);
            s.put(out, &o);
            s.put(mean, &m);
            s.put(rstd, &r);
        }
        LayerNormBackward { dinp, dweight, dbias, dout, inp, weight, mean, rstd, n, c, accumulate } => {
            let (di, dw, db) = ln_backward_ref(&s.get(dout), &s.get(inp), &s.get(weight), &s.get(mean), &s.get(rstd), n, c);
            if accumulate {
                s.add(dinp, &di);
            } else {
                s.put(dinp, &di);
            }
            s.add(dweight, &dw);
            s.add(dbias, &db);
        }
        MatmulForward { out, inp, weight, bias, n, c, oc } => {
            let b = bias.map(|b| s.get(b));
            let o = matmul_ref(&s.get(inp), &s.get(weight), b.as_deref(), n, c, oc);
            s.put(out, &o);
        }
        MatmulBackward { dinp, dweight, dbias, dout, inp, weight, n, c, oc } => {
            let (di, dw, db) = matmul_backward_ref(&s.get(dout), &s.get(inp), &s.get(weight), n, c, oc);
            s.put(dinp, &di);
            s.add(dweight, &dw);
            if let Some(dbias) = dbias {
                s.add(dbias, &db);
            }
        }
        AttentionForward { out, lse, qkv, b, t, c, nh } => {
            let (o, l) = attn_ref(&s.get(qkv), b, t, c, nh);
            s.put(out, &o);
            s.put(lse, &l);
        }
        AttentionBackward { dqkv, dout, out, lse, qkv, b, t, c, nh } => {
            let d = attn_backward_ref(&s.get(dout), &s.get(out), &s.get(lse), &s.get(qkv), b, t, c, nh);
            s.put(dqkv, &d);
        }
        EncoderAt { out, tokens, pos, wte, wpe, n, c } => {
            let (tk, ps, te, pe) = (s.ids(tokens), s.ids(pos), s.get(wte), s.get(wpe));
            let o: Vec<f64> = (0..n * c).map(|i| te[tk[i / c] as usize * c + i % c] + pe[ps[i / c] as usize * c + i % c]).collect();
            s.put(out, &o);
        }
        KvStore { kcache, vcache, qkv, slots, pos, n, c, tmax } => {
            let (q, sl, ps, mut kc, mut vc) = (s.get(qkv), s.ids(slots), s.ids(pos), s.get(kcache), s.get(vcache));
            for r in 0..n {
                let dst = (sl[r] as usize * tmax + ps[r] as usize) * c;
                kc[dst..dst + c].copy_from_slice(&q[r * 3 * c + c..r * 3 * c + 2 * c]);
                vc[dst..dst + c].copy_from_slice(&q[r * 3 * c + 2 * c..r * 3 * c + 3 * c]);
            }
            s.put(kcache, &kc);
            s.put(vcache, &vc);
        }
        AttentionCached { out, qkv, kcache, vcache, slots, pos, n, c, nh, tmax } => {
            let o = attn_cached_ref(&s.get(qkv), &s.get(kcache), &s.get(vcache), &s.ids(slots), &s.ids(pos), n, c, nh, tmax);
            s.put(out, &o);
        }
        GeluForward { out, inp, n } => {
            let o: Vec<f64> = s.get(inp)[..n].iter().map(|&x| gelu_ref(x)).collect();
            s.put(out, &o);
        }
        GeluBackward { dinp, inp, dout, n } => {
            let (x, d) = (s.get(inp), s.get(dout));
            let o: Vec<f64> = (0..n).map(|i| d[i] * gelu_grad_ref(x[i])).collect();
            s.put(dinp, &o);
        }
        ResidualForward { out, a, b, n } => {
            let (x, y) = (s.get(a), s.get(b));
            let o: Vec<f64> = (0..n).map(|i| x[i] + y[i]).collect();
            s.put(out, &o);
        }
        CrossEntropy { logits, losses, targets, dloss, n, v, vp, write_grad, accumulate } => {
            let (lg, tg) = (s.get(logits), s.ids(targets));
            let l = ce_ref(&lg, &tg, n, v, vp);
            if accumulate {
                s.add(losses, &l);
            } else {
                s.put(losses, &l);
            }
            if write_grad {
                let d = ce_grad_ref(&lg, &tg, n, v, vp, s.get(dloss)[0]);
                s.put(logits, &d);
            }
        }
        Zero { out } => s.put(out, &vec![0.0; out.len]),
        SumSquares { out, inp, slot } => {
            let ss: f64 = s.get(inp).iter().map(|x| x * x).sum();
            s.put(out.slice(slot, 1), &[ss]);
        }
        ClipScale { hyper, parts, max_norm } => {
            let loss_scale = s.get(hyper)[Scalars::LOSS_SCALE];
            let (norm, scale, found) = clip_scale_ref(&s.get(parts), max_norm as f64, loss_scale);
            s.put(hyper.slice(Scalars::GRAD_NORM, 1), &[norm]);
            s.put(hyper.slice(Scalars::GRAD_SCALE, 1), &[scale]);
            s.put(hyper.slice(Scalars::FOUND_INF, 1), &[found]);
        }
        AdamW { param, master, grad, m, v, hyper, weight_decay } => {
            let h = s.get(hyper);
            if h[Scalars::FOUND_INF] == 0.0 {
                // the update runs on the f32 master when there is one; param gets it rounded
                let w = master.unwrap_or(param);
                let (mut p, mut mm, mut vv) = (s.get(w), s.get(m), s.get(v));
                adamw_ref(&mut p, &s.get(grad), &mut mm, &mut vv, &h, weight_decay as f64);
                s.put(w, &p);
                if master.is_some() {
                    s.put(param, &p);
                }
                s.put(m, &mm);
                s.put(v, &vv);
            }
        }
    }
}
