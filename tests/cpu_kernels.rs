//! The cpu kernels checked on their own: forward kernels against the naive f64 loops of
//! tests/common/reference.rs,
//! every backward against central finite differences of the f32 forward, the optimiser kernels
//! against hand-computed updates, and the `CpuBackend` executor on small hand-built graphs.
//! Awkward sizes throughout: B=3, T=37, C=96, NH=6 (hs 16) and NH=2 (hs 48), V=1531, Vp=1536.
//!
//! `cargo test --release --test cpu_kernels -- --ignored --nocapture` runs the GPT-2 124M
//! (d12, B=4, T=64) benchmarks instead.

mod common;
use common::reference::{attn_ref, ce_ref, f64s, gelu_grad_ref, gelu_ref, ln_ref, matmul_ref};
use wgpt::backend::cpu::kernels as k;
use wgpt::backend::cpu::CpuBackend;
use wgpt::backend::Backend;
use wgpt::graph::{BufferTable, DType, Scalars, Kernel, Launch, Role, View};

const B: usize = 3;
const T: usize = 37;
const C: usize = 96;
const N: usize = B * T; // 111 rows
const V: usize = 1531;
const VP: usize = 1536;

// ---------------------------------------------------------------------------------------------
// helpers

/// SplitMix64: a tiny deterministic generator for test data.
struct Rng(u64);
impl Rng {
    fn next_u64(&mut self) -> u64 {
        common::splitmix64(&mut self.0)
    }
    /// uniform in [-1, 1)
    fn uni(&mut self) -> f32 {
        ((self.next_u64() >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
    }
    fn vec(&mut self, n: usize, scale: f32) -> Vec<f32> {
        (0..n).map(|_| self.uni() * scale).collect()
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next_u64() % n as u64) as usize
    }
    fn ids(&mut self, n: usize, limit: usize) -> Vec<i32> {
        (0..n).map(|_| self.below(limit) as i32).collect()
    }
    /// `k` indices in [0, n) (with repeats possible), plus the first and last.
    fn sample(&mut self, n: usize, k: usize) -> Vec<usize> {
        let mut v: Vec<usize> = (0..k).map(|_| self.below(n)).collect();
        v.push(0);
        v.push(n - 1);
        v
    }
}

/// Σ r·x accumulated in f64: the scalar whose gradient w.r.t. x is r.
fn proj(r: &[f32], x: &[f32]) -> f64 {
    r.iter().zip(x).map(|(&a, &b)| a as f64 * b as f64).sum()
}

/// Max |got − want| must be ≤ atol + rtol·|want| elementwise.
fn assert_close(name: &str, got: &[f32], want: &[f64], atol: f64, rtol: f64) {
    assert_eq!(got.len(), want.len(), "{name}: length");
    let mut worst = (0.0f64, 0usize);
    for (i, (&g, &w)) in got.iter().zip(want).enumerate() {
        let e = (g as f64 - w).abs() - rtol * w.abs();
        if e.is_nan() || e > atol {
            panic!("{name}[{i}]: got {g}, want {w} (|diff| {:.3e}, atol {atol:e}, rtol {rtol:e})", (g as f64 - w).abs());
        }
        if e > worst.0 {
            worst = (e, i);
        }
    }
}

/// Central finite differences of `loss` at the entries `idx` of `x` (perturbation ±h·max(1,|x|)).
fn fd_grad(x: &[f32], idx: &[usize], h: f32, mut loss: impl FnMut(&[f32]) -> f64) -> Vec<f64> {
    let mut xp = x.to_vec();
    idx.iter()
        .map(|&i| {
            let x0 = xp[i];
            let step = h * x0.abs().max(1.0);
            xp[i] = x0 + step;
            let lp = loss(&xp);
            let hi = xp[i] as f64;
            xp[i] = x0 - step;
            let lm = loss(&xp);
            let lo = xp[i] as f64;
            xp[i] = x0;
            (lp - lm) / (hi - lo)
        })
        .collect()
}

/// |analytic − fd| ≤ rtol·max|analytic| at every sampled index (the criterion).
fn check_grad(name: &str, analytic: &[f32], idx: &[usize], fd: &[f64], rtol: f64) {
    let scale = analytic.iter().fold(0f64, |m, &a| m.max(a.abs() as f64));
    assert!(scale > 0.0, "{name}: analytic gradient is all zero");
    let mut worst = 0f64;
    for (&i, &f) in idx.iter().zip(fd) {
        let e = (analytic[i] as f64 - f).abs();
        assert!(
            e <= rtol * scale,
            "{name}[{i}]: analytic {} vs finite difference {f} (|diff| {e:.3e} > {rtol}·max|grad| {scale:.3e})",
            analytic[i]
        );
        worst = worst.max(e / scale);
    }
    eprintln!("{name}: {} FD samples, worst |diff|/max|grad| = {worst:.2e}", idx.len());
}

// ---------------------------------------------------------------------------------------------
// encoder

#[test]
fn encoder_forward_matches_reference() {
    let mut g = Rng(1);
    let vocab = 50;
    let (wte, wpe) = (g.vec(vocab * C, 1.0), g.vec(T * C, 1.0));
    let tokens = g.ids(N, vocab);
    let mut out = vec![f32::NAN; N * C];
    k::encoder_forward(&mut out, &tokens, &wte, &wpe, B, T, C);
    let mut want = vec![0.0; N * C];
    for bb in 0..B {
        for tt in 0..T {
            let r = bb * T + tt;
            let tok = tokens[r] as usize;
            for i in 0..C {
                want[r * C + i] = wte[tok * C + i] as f64 + wpe[tt * C + i] as f64;
            }
        }
    }
    // one f32 rounding of an exact sum
    assert_close("encoder out", &out, &want, 0.0, 1e-7);
}

#[test]
fn encoder_backward_is_a_scatter_add() {
    let mut g = Rng(2);
    let vocab = 20; // few ids: many repeats
    let tokens = g.ids(N, vocab);
    let dout = g.vec(N * C, 1.0);
    let (dwte0, dwpe0) = (g.vec(vocab * C, 1.0), g.vec(T * C, 1.0));
    let (mut dwte, mut dwpe) = (dwte0.clone(), dwpe0.clone());
    k::encoder_backward(&mut dwte, &mut dwpe, &dout, &tokens, B, T, C);
    let (mut want_te, mut want_pe) = (f64s(&dwte0), f64s(&dwpe0));
    for r in 0..N {
        for i in 0..C {
            want_te[tokens[r] as usize * C + i] += dout[r * C + i] as f64;
            want_pe[(r % T) * C + i] += dout[r * C + i] as f64;
        }
    }
    // sums of ≤ 12 terms of size ≤ 1 in f32
    assert_close("dwte", &dwte, &want_te, 1e-5, 0.0);
    assert_close("dwpe", &dwpe, &want_pe, 1e-6, 0.0);
    // an unused id's row is untouched
    let unused = (0..vocab).find(|id| !tokens.contains(&(*id as i32)));
    if let Some(id) = unused {
        assert_eq!(&dwte[id * C..(id + 1) * C], &dwte0[id * C..(id + 1) * C]);
    }
}

// ---------------------------------------------------------------------------------------------
// layernorm

fn ln_fwd(x: &[f32], w: &[f32], b: &[f32]) -> (Vec<f32>, Vec<f32>, Vec<f32>) {
    let (mut out, mut mean, mut rstd) = (vec![0.0; N * C], vec![0.0; N], vec![0.0; N]);
    k::layernorm_forward(&mut out, &mut mean, &mut rstd, x, w, b, N, C);
    (out, mean, rstd)
}

#[test]
fn layernorm_forward_matches_reference() {
    let mut g = Rng(3);
    let x: Vec<f32> = g.vec(N * C, 2.0).iter().map(|v| v + 0.7).collect(); // nonzero mean
    let (w, b) = (g.vec(C, 1.5), g.vec(C, 0.5));
    let (out, mean, rstd) = ln_fwd(&x, &w, &b);
    let (wo, wm, wr) = ln_ref(&x, &w, &b, N, C);
    assert_close("ln out", &out, &wo, 2e-6, 2e-6);
    assert_close("ln mean", &mean, &wm, 1e-6, 1e-6);
    assert_close("ln rstd", &rstd, &wr, 0.0, 2e-6);
}

#[test]
fn layernorm_backward_matches_finite_differences() {
    let mut g = Rng(4);
    let x = g.vec(N * C, 1.0);
    let (w, b) = (g.vec(C, 1.5), g.vec(C, 0.5));
    let r = g.vec(N * C, 1.0);
    let (_, mean, rstd) = ln_fwd(&x, &w, &b);
    let prefill = g.vec(N * C, 1.0);
    let (dw0, db0) = (g.vec(C, 1.0), g.vec(C, 1.0));

    // accumulate = false: dinp written; dweight/dbias accumulate onto dw0/db0
    let mut dinp = prefill.clone();
    let (mut dw, mut db) = (dw0.clone(), db0.clone());
    k::layernorm_backward(&mut dinp, &mut dw, &mut db, &r, &x, &w, &mean, &rstd, N, C, false);
    let gw: Vec<f32> = dw.iter().zip(&dw0).map(|(a, b)| a - b).collect();
    let gb: Vec<f32> = db.iter().zip(&db0).map(|(a, b)| a - b).collect();

    let idx = g.sample(N * C, 60);
    let fd = fd_grad(&x, &idx, 1e-2, |xp| proj(&r, &ln_fwd(xp, &w, &b).0));
    check_grad("layernorm dinp", &dinp, &idx, &fd, 1e-2);
    let all_c: Vec<usize> = (0..C).collect();
    let fd = fd_grad(&w, &all_c, 1e-2, |wp| proj(&r, &ln_fwd(&x, wp, &b).0));
    check_grad("layernorm dweight", &gw, &all_c, &fd, 1e-2);
    let fd = fd_grad(&b, &all_c, 1e-2, |bp| proj(&r, &ln_fwd(&x, &w, bp).0));
    check_grad("layernorm dbias", &gb, &all_c, &fd, 1e-2);

    // accumulate = true: dinp = prefill + the same gradient; parameter grads add again
    let mut dinp2 = prefill.clone();
    k::layernorm_backward(&mut dinp2, &mut dw, &mut db, &r, &x, &w, &mean, &rstd, N, C, true);
    let want: Vec<f64> = prefill.iter().zip(&dinp).map(|(&p, &d)| p as f64 + d as f64).collect();
    assert_close("layernorm dinp (accumulate)", &dinp2, &want, 1e-6, 1e-6);
    let want: Vec<f64> = dw0.iter().zip(&gw).map(|(&a, &g)| a as f64 + 2.0 * g as f64).collect();
    assert_close("layernorm dweight (twice)", &dw, &want, 1e-4, 1e-5);
    let want: Vec<f64> = db0.iter().zip(&gb).map(|(&a, &g)| a as f64 + 2.0 * g as f64).collect();
    assert_close("layernorm dbias (twice)", &db, &want, 1e-4, 1e-5);
}

// ---------------------------------------------------------------------------------------------
// matmul

#[test]
fn matmul_forward_matches_reference() {
    let mut g = Rng(5);
    for &(n, c, oc) in &[(N, C, 77), (N, 3 * C, 4 * C + 5), (1, 7, 3), (N, C, VP)] {
        let x = g.vec(n * c, 1.0);
        let w = g.vec(oc * c, 1.0);
        let bias = g.vec(oc, 1.0);
        let mut out = vec![f32::NAN; n * oc];
        k::matmul_forward(&mut out, &x, &w, Some(&bias), n, c, oc);
        // f32 dot products of length c, terms ≤ 1: error ≲ c·2⁻²⁴·few
        let tol = 2e-6 * c as f64;
        assert_close(&format!("matmul {n}x{c}->{oc} +bias"), &out, &matmul_ref(&x, &w, Some(&bias), n, c, oc), tol, 0.0);
        let mut out = vec![f32::NAN; n * oc];
        k::matmul_forward(&mut out, &x, &w, None, n, c, oc);
        assert_close(&format!("matmul {n}x{c}->{oc}"), &out, &matmul_ref(&x, &w, None, n, c, oc), tol, 0.0);
    }
}

#[test]
fn matmul_backward_matches_finite_differences() {
    let mut g = Rng(6);
    let (n, c, oc) = (N, C, 77);
    let x = g.vec(n * c, 1.0);
    let w = g.vec(oc * c, 1.0);
    let bias = g.vec(oc, 1.0);
    let r = g.vec(n * oc, 1.0);
    let fwd = |x: &[f32], w: &[f32], b: &[f32]| {
        let mut out = vec![0.0; n * oc];
        k::matmul_forward(&mut out, x, w, Some(b), n, c, oc);
        out
    };
    let (dw0, db0) = (g.vec(oc * c, 1.0), g.vec(oc, 1.0));
    let mut dinp = vec![f32::NAN; n * c]; // written, so garbage must vanish
    let (mut dw, mut db) = (dw0.clone(), db0.clone());
    k::matmul_backward(&mut dinp, &mut dw, Some(&mut db), &r, &x, &w, n, c, oc);
    let gw: Vec<f32> = dw.iter().zip(&dw0).map(|(a, b)| a - b).collect();
    let gb: Vec<f32> = db.iter().zip(&db0).map(|(a, b)| a - b).collect();

    let idx = g.sample(n * c, 60);
    let fd = fd_grad(&x, &idx, 1e-2, |xp| proj(&r, &fwd(xp, &w, &bias)));
    check_grad("matmul dinp", &dinp, &idx, &fd, 1e-2);
    let idx = g.sample(oc * c, 60);
    let fd = fd_grad(&w, &idx, 1e-2, |wp| proj(&r, &fwd(&x, wp, &bias)));
    check_grad("matmul dweight", &gw, &idx, &fd, 1e-2);
    let all: Vec<usize> = (0..oc).collect();
    let fd = fd_grad(&bias, &all, 1e-2, |bp| proj(&r, &fwd(&x, &w, bp)));
    check_grad("matmul dbias", &gb, &all, &fd, 1e-2);

    // the same products exactly, against f64 loops
    let mut want_dinp = vec![0.0; n * c];
    let mut want_dw = f64s(&dw0);
    let mut want_db = f64s(&db0);
    for row in 0..n {
        for o in 0..oc {
            let d = r[row * oc + o] as f64;
            want_db[o] += d;
            for i in 0..c {
                want_dinp[row * c + i] += d * w[o * c + i] as f64;
                want_dw[o * c + i] += d * x[row * c + i] as f64;
            }
        }
    }
    assert_close("matmul dinp (exact)", &dinp, &want_dinp, 1e-4, 0.0);
    assert_close("matmul dweight (accumulated)", &dw, &want_dw, 2e-4, 0.0);
    assert_close("matmul dbias (accumulated)", &db, &want_db, 2e-4, 0.0);

    // no bias: dinp and dweight unchanged in meaning, dweight accumulates a second time
    let mut dinp2 = vec![f32::NAN; n * c];
    k::matmul_backward(&mut dinp2, &mut dw, None, &r, &x, &w, n, c, oc);
    assert_close("matmul dinp (no bias)", &dinp2, &f64s(&dinp), 1e-6, 0.0);
    let want: Vec<f64> = dw0.iter().zip(&gw).map(|(&a, &g)| a as f64 + 2.0 * g as f64).collect();
    assert_close("matmul dweight (twice)", &dw, &want, 2e-4, 0.0);
}

// ---------------------------------------------------------------------------------------------
// attention

fn attn_fwd(qkv: &[f32], nh: usize) -> (Vec<f32>, Vec<f32>) {
    let (mut out, mut lse) = (vec![f32::NAN; N * C], vec![f32::NAN; B * nh * T]);
    k::attention_forward(&mut out, &mut lse, qkv, B, T, C, nh);
    (out, lse)
}

#[test]
fn attention_forward_matches_reference() {
    let mut g = Rng(7);
    for nh in [6, 2] {
        let qkv = g.vec(N * 3 * C, 1.5);
        let (out, lse) = attn_fwd(&qkv, nh);
        let (wo, wl) = attn_ref(&qkv, B, T, C, nh);
        assert_close(&format!("attention out nh={nh}"), &out, &wo, 2e-6, 1e-5);
        assert_close(&format!("attention lse nh={nh}"), &lse, &wl, 2e-6, 1e-6);
    }
}

#[test]
fn attention_backward_matches_finite_differences() {
    let mut g = Rng(8);
    for nh in [6, 2] {
        let qkv = g.vec(N * 3 * C, 1.5);
        let r = g.vec(N * C, 1.0);
        let (out, lse) = attn_fwd(&qkv, nh);
        let mut dqkv = vec![f32::NAN; N * 3 * C];
        k::attention_backward(&mut dqkv, &r, &out, &lse, &qkv, B, T, C, nh);
        // split dqkv into its q, k, v parts and check each against FD at sampled entries
        for (part, name) in ["dq", "dk", "dv"].iter().enumerate() {
            let cols: Vec<usize> = (0..N * 3 * C).filter(|i| (i % (3 * C)) / C == part).collect();
            let analytic: Vec<f32> = cols.iter().map(|&i| dqkv[i]).collect();
            let pick: Vec<usize> = g.sample(cols.len(), 40);
            let idx: Vec<usize> = pick.iter().map(|&p| cols[p]).collect();
            let fd = fd_grad(&qkv, &idx, 1e-2, |xp| proj(&r, &attn_fwd(xp, nh).0));
            check_grad(&format!("attention {name} nh={nh}"), &analytic, &pick, &fd, 1e-2);
        }
    }
}

/// T = 150 spans several query tiles of the kernel (64 rows each, the last one partial).
#[test]
fn attention_across_row_tiles() {
    let (b, t, c, nh) = (2usize, 150usize, 32usize, 2usize);
    let mut g = Rng(21);
    let qkv = g.vec(b * t * 3 * c, 2.0);
    let fwd = |x: &[f32]| {
        let (mut out, mut lse) = (vec![f32::NAN; b * t * c], vec![f32::NAN; b * nh * t]);
        k::attention_forward(&mut out, &mut lse, x, b, t, c, nh);
        (out, lse)
    };
    let (out, lse) = fwd(&qkv);
    let (wo, wl) = attn_ref(&qkv, b, t, c, nh);
    assert_close("attention out (T=150)", &out, &wo, 2e-6, 1e-5);
    assert_close("attention lse (T=150)", &lse, &wl, 2e-6, 1e-6);
    let r = g.vec(b * t * c, 1.0);
    let mut dqkv = vec![f32::NAN; b * t * 3 * c];
    k::attention_backward(&mut dqkv, &r, &out, &lse, &qkv, b, t, c, nh);
    // sample q, k and v entries at positions in every tile
    let mut idx = Vec::new();
    for pos in [0usize, 5, 63, 64, 100, 127, 128, 149] {
        for part in 0..3 {
            let bb = g.below(b);
            idx.push((bb * t + pos) * 3 * c + part * c + g.below(c));
        }
    }
    let fd = fd_grad(&qkv, &idx, 1e-2, |xp| proj(&r, &fwd(xp).0));
    check_grad("attention dqkv (T=150)", &dqkv, &idx, &fd, 1e-2);
}

// ---------------------------------------------------------------------------------------------
// gelu, residual

#[test]
fn gelu_forward_and_backward() {
    let mut g = Rng(9);
    let n = 10_007 + (1 << 14); // more than one parallel chunk
    let x = g.vec(n, 6.0);
    let mut out = vec![f32::NAN; n];
    k::gelu_forward(&mut out, &x);
    let want: Vec<f64> = x.iter().map(|&v| gelu_ref(v as f64)).collect();
    assert_close("gelu", &out, &want, 1e-6, 1e-6);

    let dout = g.vec(n, 1.0);
    let mut dinp = vec![f32::NAN; n];
    k::gelu_backward(&mut dinp, &x, &dout);
    // elementwise, so one FD pass over all elements: (gelu(x+h) − gelu(x−h))/2h · dout
    let h = 1e-2f32;
    let (xp, xm): (Vec<f32>, Vec<f32>) = x.iter().map(|&v| (v + h, v - h)).unzip();
    let (mut op, mut om) = (vec![0.0; n], vec![0.0; n]);
    k::gelu_forward(&mut op, &xp);
    k::gelu_forward(&mut om, &xm);
    let fd: Vec<f64> =
        (0..n).map(|i| (op[i] as f64 - om[i] as f64) / (xp[i] as f64 - xm[i] as f64) * dout[i] as f64).collect();
    let all: Vec<usize> = (0..n).collect();
    check_grad("gelu dinp", &dinp, &all, &fd, 3e-4);
    // and tightly against the derivative of the tanh form in f64
    let want: Vec<f64> = x.iter().zip(&dout).map(|(&xi, &d)| d as f64 * gelu_grad_ref(xi as f64)).collect();
    assert_close("gelu dinp (f64 derivative)", &dinp, &want, 1e-6, 1e-5);
}

#[test]
fn residual_forward_adds() {
    let mut g = Rng(10);
    let n = 3 * (1 << 14) + 11;
    let (a, b) = (g.vec(n, 1.0), g.vec(n, 1.0));
    let mut out = vec![f32::NAN; n];
    k::residual_forward(&mut out, &a, &b);
    let want: Vec<f64> = a.iter().zip(&b).map(|(&x, &y)| x as f64 + y as f64).collect();
    assert_close("residual", &out, &want, 0.0, 1e-7);
}

// ---------------------------------------------------------------------------------------------
// cross-entropy

#[test]
fn cross_entropy_losses_and_gradient() {
    let mut g = Rng(11);
    let n = 29;
    let mut logits = g.vec(n * VP, 4.0);
    for r in 0..n {
        for j in V..VP {
            logits[r * VP + j] = 100.0; // padding must not enter the softmax
        }
    }
    let targets = g.ids(n, V);
    let dloss = 0.37f32;
    let want = ce_ref(&logits, &targets, n, V, VP);

    // write_grad = false: losses only, logits bit-identical
    let mut l2 = logits.clone();
    let mut losses = vec![f32::NAN; n];
    k::cross_entropy(&mut l2, &mut losses, &targets, n, V, VP, dloss, false, false);
    assert!(l2.iter().zip(&logits).all(|(a, b)| a.to_bits() == b.to_bits()), "logits changed without write_grad");
    assert_close("ce losses", &losses, &want, 1e-5, 1e-6);

    // write_grad = true: losses again, and dlogits in place
    let mut dl = logits.clone();
    let mut losses2 = vec![f32::NAN; n];
    k::cross_entropy(&mut dl, &mut losses2, &targets, n, V, VP, dloss, true, false);
    assert_close("ce losses (write_grad)", &losses2, &want, 1e-5, 1e-6);
    // accumulate = true: the losses are added to what the buffer holds, with and without the gradient
    for write_grad in [false, true] {
        let mut acc: Vec<f32> = (0..n).map(|r| r as f32 * 0.25).collect();
        let mut lg = logits.clone();
        k::cross_entropy(&mut lg, &mut acc, &targets, n, V, VP, dloss, write_grad, true);
        let want_acc: Vec<f64> = want.iter().enumerate().map(|(r, &w)| w + r as f64 * 0.25).collect();
        assert_close(&format!("ce accumulated losses (write_grad={write_grad})"), &acc, &want_acc, 1e-5, 1e-6);
    }
    for r in 0..n {
        assert!(dl[r * VP + V..(r + 1) * VP].iter().all(|&x| x == 0.0), "row {r}: padded gradient not zero");
        // softmax − onehot sums to zero over a row
        let s: f64 = dl[r * VP..r * VP + V].iter().map(|&x| x as f64).sum();
        assert!(s.abs() < 1e-6, "row {r}: gradient sums to {s}");
    }
    // FD of dloss·Σ losses over sampled logits (targets included)
    let loss_of = |lp: &[f32]| {
        let mut ls = vec![0.0; n];
        k::cross_entropy_loss(lp, &mut ls, &targets, n, V, VP, false);
        ls.iter().map(|&x| x as f64 * dloss as f64).sum::<f64>()
    };
    let mut idx: Vec<usize> = (0..n).map(|r| r * VP + targets[r] as usize).collect();
    for _ in 0..60 {
        let r = g.below(n);
        idx.push(r * VP + g.below(V));
    }
    // large logits of the row maximum give the biggest probabilities: include each row's argmax
    for r in 0..n {
        let row = &logits[r * VP..r * VP + V];
        let am = (0..V).max_by(|&a, &b| row[a].total_cmp(&row[b])).unwrap();
        idx.push(r * VP + am);
    }
    let fd = fd_grad(&logits, &idx, 1e-3, loss_of);
    check_grad("ce dlogits", &dl, &idx, &fd, 1e-2);
    // and exactly against the f64 softmax at all real columns
    let mut want_dl = vec![0.0f64; n * VP];
    for r in 0..n {
        let row = &logits[r * VP..r * VP + V];
        let lse = want[r] + row[targets[r] as usize] as f64;
        for j in 0..V {
            want_dl[r * VP + j] = ((row[j] as f64 - lse).exp() - (j == targets[r] as usize) as i32 as f64) * dloss as f64;
        }
    }
    assert_close("ce dlogits (exact)", &dl, &want_dl, 1e-7, 1e-5);
}

// ---------------------------------------------------------------------------------------------
// reductions, clipping, AdamW

#[test]
fn sum_squares_in_f64() {
    let mut g = Rng(12);
    let x = g.vec(5 * (1 << 14) + 3, 3.0);
    let want: f64 = x.iter().map(|&v| (v as f64).powi(2)).sum();
    let got = k::sum_squares(&x);
    assert!(((got as f64) - want).abs() <= 1e-7 * want, "sum_squares {got} vs {want}");
    assert_eq!(k::sum_squares(&[]), 0.0);
}

#[test]
fn clip_scale_clips_only_above_max() {
    let parts = [9.0f32, 16.0, 0.0]; // norm 5
    let mut h = vec![0.0f32; Scalars::LEN];
    h[Scalars::LOSS_SCALE] = 1.0;
    k::clip_scale(&mut h, &parts, 1.0);
    assert_eq!(h[Scalars::GRAD_NORM], 5.0);
    assert!((h[Scalars::GRAD_SCALE] - 0.2).abs() < 1e-7, "{}", h[Scalars::GRAD_SCALE]);
    k::clip_scale(&mut h, &parts, 5.0); // norm == max: no clipping
    assert_eq!(h[Scalars::GRAD_SCALE], 1.0);
    k::clip_scale(&mut h, &parts, 7.0);
    assert_eq!(h[Scalars::GRAD_SCALE], 1.0);
    k::clip_scale(&mut h, &parts, 0.0); // disabled
    assert_eq!((h[Scalars::GRAD_SCALE], h[Scalars::GRAD_NORM]), (1.0, 5.0));
    // other slots untouched
    assert!(h[..Scalars::GRAD_SCALE].iter().all(|&x| x == 0.0));
    assert_eq!(h[Scalars::FOUND_INF], 0.0);
}

#[test]
fn clip_scale_divides_out_the_loss_scale_and_flags_overflow() {
    // gradients carrying a loss scale of 4: parts of the scaled gradients, norm 20 → true norm 5
    let parts = [144.0f32, 256.0];
    let mut h = vec![0.0f32; Scalars::LEN];
    h[Scalars::LOSS_SCALE] = 4.0;
    k::clip_scale(&mut h, &parts, 1.0);
    assert_eq!(h[Scalars::GRAD_NORM], 5.0);
    // clip 1/5, and the 1/4 that unscales: AdamW's g = grad·0.05
    assert!((h[Scalars::GRAD_SCALE] - 0.05).abs() < 1e-8, "{}", h[Scalars::GRAD_SCALE]);
    assert_eq!(h[Scalars::FOUND_INF], 0.0);
    k::clip_scale(&mut h, &parts, 0.0);
    assert_eq!(h[Scalars::GRAD_SCALE], 0.25);
    for bad in [f32::INFINITY, f32::NAN] {
        k::clip_scale(&mut h, &[1.0, bad], 1.0);
        assert_eq!(h[Scalars::FOUND_INF], 1.0, "{bad} in the parts");
    }
    // an overflowed step changes nothing; the next clean one clears the flag
    let (mut p, mut m, mut v) = (vec![1.0f32], vec![0.5f32], vec![0.25f32]);
    assert!(!k::adamw(&mut p, &[f32::INFINITY], &mut m, &mut v, &h, 0.1));
    assert_eq!((p[0], m[0], v[0]), (1.0, 0.5, 0.25));
    k::clip_scale(&mut h, &parts, 1.0);
    assert_eq!(h[Scalars::FOUND_INF], 0.0);
}

fn hyper(step: i32, lr: f32, scale: f32) -> Vec<f32> {
    common::adam_scalars(lr, 0.9, 0.999, step, scale)
}

#[test]
fn adamw_two_steps_by_hand() {
    // one element by hand: p=1, g=0.5, scale 0.5 (g'=0.25), lr 0.1, wd 0.1
    // step 1: m=0.025 v=6.25e-5 m̂=0.25 v̂=0.0625 → update 0.25/0.25=1 (+1e-8 eps), decay 0.1·1
    //         p = 1 − 0.1·(1 + 0.1) = 0.89 (to ~4e-8)
    let (mut p, mut m, mut v) = (vec![1.0f32], vec![0.0f32], vec![0.0f32]);
    k::adamw(&mut p, &[0.5], &mut m, &mut v, &hyper(1, 0.1, 0.5), 0.1);
    assert!((p[0] - 0.89).abs() < 1e-6, "{}", p[0]);
    // (1−β2 in f32 is 0.000999987: 1.3e-5 relative)
    assert!((m[0] - 0.025).abs() < 1e-8 && (v[0] / 6.25e-5 - 1.0).abs() < 2e-5, "m {} v {}", m[0], v[0]);

    // many elements, two steps, against the formula in f64
    let mut g = Rng(13);
    let n = 2 * (1 << 14) + 77;
    let p0 = g.vec(n, 1.0);
    let grads = [g.vec(n, 0.1), g.vec(n, 0.1)];
    let (mut p, mut m, mut v) = (p0.clone(), vec![0.0f32; n], vec![0.0f32; n]);
    let (mut pr, mut mr, mut vr) = (f64s(&p0), vec![0.0f64; n], vec![0.0f64; n]);
    let (lr, wd, scale) = (3e-3f32, 0.05f32, 0.7f32);
    for step in 1..=2 {
        let h = hyper(step, lr, scale);
        k::adamw(&mut p, &grads[step as usize - 1], &mut m, &mut v, &h, wd);
        let (b1, b2) = (0.9f64, 0.999f64);
        for i in 0..n {
            let gi = grads[step as usize - 1][i] as f64 * scale as f64;
            mr[i] = b1 * mr[i] + (1.0 - b1) * gi;
            vr[i] = b2 * vr[i] + (1.0 - b2) * gi * gi;
            let mh = mr[i] / (1.0 - b1.powi(step));
            let vh = vr[i] / (1.0 - b2.powi(step));
            pr[i] -= lr as f64 * (mh / (vh.sqrt() + 1e-8) + wd as f64 * pr[i]);
        }
    }
    assert_close("adamw m", &m, &mr, 1e-9, 1e-5);
    assert_close("adamw v", &v, &vr, 1e-12, 3e-5); // 1−β2 rounds to f32 (1.3e-5)
    // the update is lr·O(1): compare the change, not just the value
    let dp: Vec<f32> = p.iter().zip(&p0).map(|(a, b)| a - b).collect();
    let dr: Vec<f64> = pr.iter().zip(&p0).map(|(a, &b)| a - b as f64).collect();
    assert_close("adamw Δparam", &dp, &dr, 2e-7, 1e-3);
}

// ---------------------------------------------------------------------------------------------
// the executor

#[test]
fn backend_runs_a_small_graph() {
    let (vocab, c, oc) = (40, C, 53);
    let mut g = Rng(14);
    let mut tab = BufferTable::default();
    let tokens = tab.add("tokens", N, DType::I32, Role::Tokens);
    let wte = tab.add("wte", vocab * c, DType::F32, Role::Param(0));
    let wpe = tab.add("wpe", T * c, DType::F32, Role::Param(1));
    let enc = tab.add("encoded", N * c, DType::F32, Role::Activation);
    // weight and bias of the matmul packed in one buffer (views at offsets)
    let wb = tab.add("w_and_b", oc * c + oc, DType::F32, Role::Param(2));
    let out = tab.add("out", N * oc + 5, DType::F32, Role::Activation);
    let act = tab.add("act", N * oc, DType::F32, Role::Activation);
    let stats = tab.add("stats", 2 * N, DType::F32, Role::Activation);
    let lno = tab.add("ln_out", N * c, DType::F32, Role::Activation);

    let (tok, te, pe, wbv) = (g.ids(N, vocab), g.vec(vocab * c, 1.0), g.vec(T * c, 1.0), g.vec(oc * c + oc, 0.3));
    let mut be = CpuBackend::new(Some(2)).unwrap();
    assert!(be.name().contains("cpu"));
    be.alloc(&tab).unwrap();
    be.upload_i32(tokens, &tok).unwrap();
    be.upload_f32(wte, &te).unwrap();
    be.upload_f32(wpe, &pe).unwrap();
    be.upload_f32(wb, &wbv).unwrap();
    assert_eq!(be.download_i32(tokens).unwrap(), tok);

    let wv = tab.view(wb);
    let launches = vec![
        Launch {
            label: "enc".into(),
            kernel: Kernel::EncoderForward {
                out: tab.view(enc), tokens: tab.view(tokens), wte: tab.view(wte), wpe: tab.view(wpe), b: B, t: T, c,
            },
        },
        Launch {
            label: "mm".into(),
            kernel: Kernel::MatmulForward {
                out: tab.view(out).slice(5, N * oc), inp: tab.view(enc), weight: wv.slice(0, oc * c),
                bias: Some(wv.slice(oc * c, oc)), n: N, c, oc,
            },
        },
        Launch {
            label: "gelu".into(),
            kernel: Kernel::GeluForward { out: tab.view(act), inp: tab.view(out).slice(5, N * oc), n: N * oc },
        },
    ];
    be.run(&launches).unwrap();
    be.sync().unwrap();

    // reference: encoder, matmul with bias, gelu, in f64
    let mut x = vec![0f32; N * c];
    for r in 0..N {
        for i in 0..c {
            x[r * c + i] = te[tok[r] as usize * c + i] + pe[(r % T) * c + i];
        }
    }
    let mm = matmul_ref(&x, &wbv[..oc * c], Some(&wbv[oc * c..]), N, c, oc);
    let o = be.download_f32(out).unwrap();
    assert_eq!(&o[..5], &[0.0; 5], "bytes before the view untouched");
    assert_close("graph matmul", &o[5..], &mm, 1e-4, 0.0);
    let want: Vec<f64> = mm.iter().map(|&v| gelu_ref(v)).collect();
    assert_close("graph gelu", &be.download_f32(act).unwrap(), &want, 1e-4, 0.0);

    // in place (output view == input view) reads the old values: act = act + act
    let a = be.download_f32(act).unwrap();
    let inplace = Kernel::ResidualForward { out: tab.view(act), a: tab.view(act), b: tab.view(act), n: N * oc };
    be.run(&[Launch { label: "res".into(), kernel: inplace }]).unwrap();
    let want: Vec<f64> = a.iter().map(|&v| 2.0 * v as f64).collect();
    assert_close("in-place residual", &be.download_f32(act).unwrap(), &want, 0.0, 0.0);

    // output and inputs in one buffer, disjoint: [out | a | b] (borrowed, not copied) and
    // overlapping by half (copied): out = [a.. shifted]
    let m = N * oc / 3;
    let pre = be.download_f32(act).unwrap();
    let v = tab.view(act);
    be.run(&[Launch {
        label: "packed".into(),
        kernel: Kernel::ResidualForward { out: v.slice(0, m), a: v.slice(m, m), b: v.slice(2 * m, m), n: m },
    }])
    .unwrap();
    let got = be.download_f32(act).unwrap();
    let want: Vec<f64> = (0..m).map(|i| pre[m + i] as f64 + pre[2 * m + i] as f64).collect();
    assert_close("packed residual", &got[..m], &want, 0.0, 1e-7);
    assert_eq!(&got[m..], &pre[m..], "inputs untouched");
    be.run(&[Launch {
        label: "shifted".into(),
        kernel: Kernel::ResidualForward { out: v.slice(m / 2, m), a: v.slice(0, m), b: v.slice(m, m), n: m },
    }])
    .unwrap();
    let got2 = be.download_f32(act).unwrap();
    let want: Vec<f64> = (0..m).map(|i| got[i] as f64 + got[m + i] as f64).collect();
    assert_close("overlapping residual", &got2[m / 2..m / 2 + m], &want, 0.0, 1e-7);

    // two outputs in one buffer (mean and rstd side by side)
    let ln = Kernel::LayerNormForward {
        out: tab.view(lno), mean: tab.view(stats).slice(0, N), rstd: tab.view(stats).slice(N, N),
        inp: tab.view(enc), weight: wv.slice(0, c), bias: wv.slice(c, c), n: N, c,
    };
    be.run(&[Launch { label: "ln".into(), kernel: ln }]).unwrap();
    let (wo, wm, wr) = ln_ref(&be.download_f32(enc).unwrap(), &wbv[..c], &wbv[c..2 * c], N, c);
    assert_close("graph ln out", &be.download_f32(lno).unwrap(), &wo, 1e-5, 1e-5);
    let st = be.download_f32(stats).unwrap();
    assert_close("graph ln mean", &st[..N], &wm, 1e-5, 1e-5);
    assert_close("graph ln rstd", &st[N..], &wr, 0.0, 1e-5);

    let bad = |kernel: Kernel| vec![Launch { label: "bad".into(), kernel }];
    // a view past the end of its buffer
    let e = be
        .run(&bad(Kernel::Zero { out: View { buf: out, offset: N * oc, len: 6 } }))
        .unwrap_err()
        .to_string();
    assert!(e.contains("bad") && e.contains("out"), "{e}");
    // a token id out of range
    be.upload_i32(tokens, &vec![vocab as i32; N]).unwrap();
    let e = be.run(&launches[..1]).unwrap_err().to_string();
    assert!(e.contains("token") && e.contains("40"), "{e}");
    // overlapping outputs
    let e = be
        .run(&bad(Kernel::LayerNormForward {
            out: tab.view(lno), mean: tab.view(stats).slice(0, N), rstd: tab.view(stats).slice(1, N),
            inp: tab.view(enc), weight: wv.slice(0, c), bias: wv.slice(c, c), n: N, c,
        }))
        .unwrap_err()
        .to_string();
    assert!(e.contains("overlap"), "{e}");
    // a view too short for the sizes, the wrong dtype, a wrong upload length
    assert!(be.run(&bad(Kernel::GeluForward { out: tab.view(act), inp: tab.view(stats), n: N * oc })).is_err());
    assert!(be.run(&bad(Kernel::GeluForward { out: tab.view(tokens), inp: tab.view(act), n: N })).is_err());
    assert!(be.upload_f32(act, &[1.0; 3]).is_err());
    assert!(be.upload_f32(tokens, &vec![0.0; N]).is_err());
    assert!(be.download_f32(tokens).is_err());
    // the failed launches left the buffers in place
    assert_eq!(be.download_f32(stats).unwrap(), st);
}

#[test]
fn backend_optimizer_chain_and_thread_independence() {
    let n = 3 * (1 << 14) + 5;
    let mut g = Rng(15);
    let (p0, gr) = (g.vec(n, 1.0), g.vec(n, 2.0));
    let run = |threads: usize| {
        let mut tab = BufferTable::default();
        let p = tab.add("p", n, DType::F32, Role::Param(0));
        let gb = tab.add("g", n, DType::F32, Role::Grad(0));
        let m = tab.add("m", n, DType::F32, Role::OptM(0));
        let v = tab.add("v", n, DType::F32, Role::OptV(0));
        let parts = tab.add("parts", 3, DType::F32, Role::Scratch);
        let h = tab.add("hyper", Scalars::LEN, DType::F32, Role::Scalars);
        let mut be = CpuBackend::new(Some(threads)).unwrap();
        be.alloc(&tab).unwrap();
        be.upload_f32(p, &p0).unwrap();
        be.upload_f32(gb, &gr).unwrap();
        be.upload_f32(parts, &[5.0, 5.0, 5.0]).unwrap();
        be.upload_f32(h, &hyper(1, 1e-2, 123.0)).unwrap();
        let l = |kernel| Launch { label: "opt".into(), kernel };
        be.run(&[
            l(Kernel::Zero { out: tab.view(parts) }),
            l(Kernel::SumSquares { out: tab.view(parts), inp: tab.view(gb).slice(0, n / 2), slot: 0 }),
            l(Kernel::SumSquares { out: tab.view(parts), inp: tab.view(gb).slice(n / 2, n - n / 2), slot: 2 }),
            l(Kernel::ClipScale { hyper: tab.view(h), parts: tab.view(parts), max_norm: 1.0 }),
            l(Kernel::AdamW {
                param: tab.view(p), master: None, grad: tab.view(gb), m: tab.view(m), v: tab.view(v), hyper: tab.view(h),
                weight_decay: 0.1,
            }),
        ])
        .unwrap();
        (be.download_f32(h).unwrap(), be.download_f32(p).unwrap(), be.download_f32(m).unwrap())
    };
    let (h1, p1, m1) = run(1);
    let norm = gr.iter().map(|&x| (x as f64).powi(2)).sum::<f64>().sqrt();
    assert!((h1[Scalars::GRAD_NORM] as f64 - norm).abs() < 1e-6 * norm, "{} vs {norm}", h1[Scalars::GRAD_NORM]);
    assert!((h1[Scalars::GRAD_SCALE] as f64 - 1.0 / norm).abs() < 1e-6 / norm);
    // m after one step = (1−β1)·g·scale
    let want: Vec<f64> = gr.iter().map(|&x| 0.1 * x as f64 / norm).collect();
    assert_close("chain m", &m1, &want, 1e-10, 1e-5);
    let (h2, p2, m2) = run(2);
    assert_eq!((h1, p1, m1), (h2, p2, m2), "results depend on the thread count");
}

#[test]
fn kernels_do_not_depend_on_thread_count() {
    let mut g = Rng(16);
    let qkv = g.vec(N * 3 * C, 1.5);
    let x = g.vec(N * C, 1.0);
    let w = g.vec(4 * C * C, 0.2);
    let r = g.vec(N * 4 * C, 1.0);
    let run = |threads: usize| {
        let pool = rayon::ThreadPoolBuilder::new().num_threads(threads).build().unwrap();
        pool.install(|| {
            let (out, lse) = attn_fwd(&qkv, 6);
            let mut dqkv = vec![0.0; N * 3 * C];
            k::attention_backward(&mut dqkv, &x, &out, &lse, &qkv, B, T, C, 6);
            let mut mo = vec![0.0; N * 4 * C];
            k::matmul_forward(&mut mo, &x, &w, None, N, C, 4 * C);
            let (mut di, mut dw, mut db) = (vec![0.0; N * C], vec![0.0; 4 * C * C], vec![0.0; 4 * C]);
            k::matmul_backward(&mut di, &mut dw, Some(&mut db), &r, &x, &w, N, C, 4 * C);
            let (_, mean, rstd) = ln_fwd(&x, &w[..C], &w[C..2 * C]);
            let (mut li, mut lw, mut lb) = (vec![0.0; N * C], vec![0.0; C], vec![0.0; C]);
            k::layernorm_backward(&mut li, &mut lw, &mut lb, &x, &x, &w[..C], &mean, &rstd, N, C, false);
            (out, dqkv, mo, di, dw, db, li, lw, lb, k::sum_squares(&r))
        })
    };
    assert!(run(1) == run(3), "results depend on the thread count");
}

#[test]
fn fast_exp_is_accurate() {
    use wgpt::backend::cpu::simd;
    let mut worst = 0f64;
    let mut x = -87.0f32;
    while x <= 88.0 {
        let want = (x as f64).exp();
        let rel = ((simd::exp(x) as f64) - want).abs() / want;
        worst = worst.max(rel);
        x += 0.001_37;
    }
    assert!(worst < 3e-7, "exp: worst relative error {worst:e}");
    assert_eq!(simd::exp(0.0), 1.0);
    assert_eq!(simd::exp(-100.0), 0.0);
    assert_eq!(simd::exp(f32::NEG_INFINITY), 0.0);
    assert!(simd::exp(f32::NAN).is_nan());
    assert!(simd::exp(1000.0) > 1e38);
}

/// The AVX-512, AVX2 and baseline builds of the kernels agree bit for bit (matmul aside: gemm
/// picks its own micro-kernels).
#[test]
fn simd_levels_agree_bitwise() {
    use wgpt::backend::cpu::simd;
    let mut g = Rng(19);
    let qkv = g.vec(N * 3 * C, 1.5);
    let x = g.vec(N * C, 1.0);
    let w = g.vec(2 * C, 1.0);
    let mut logits = g.vec(7 * VP, 3.0);
    let targets = g.ids(7, V);
    let big = g.vec(40_000, 3.0);
    let run = || {
        let (out, lse) = attn_fwd(&qkv, 6);
        let mut dqkv = vec![0.0; N * 3 * C];
        k::attention_backward(&mut dqkv, &x, &out, &lse, &qkv, B, T, C, 6);
        let (lo, mean, rstd) = ln_fwd(&x, &w[..C], &w[C..]);
        let (mut li, mut lw, mut lb) = (vec![0.0; N * C], vec![0.0; C], vec![0.0; C]);
        k::layernorm_backward(&mut li, &mut lw, &mut lb, &x, &x, &w[..C], &mean, &rstd, N, C, false);
        let mut ge = vec![0.0; big.len()];
        k::gelu_forward(&mut ge, &big);
        let mut gb = vec![0.0; big.len()];
        k::gelu_backward(&mut gb, &big, &big);
        let mut losses = vec![0.0; 7];
        let mut dl = logits.clone();
        k::cross_entropy(&mut dl, &mut losses, &targets, 7, V, VP, 0.5, true, false);
        let mut losses2 = vec![0.0; 7];
        k::cross_entropy_loss(&logits, &mut losses2, &targets, 7, V, VP, false);
        let (mut p, mut m, mut v) = (big.clone(), big.clone(), vec![1.0; big.len()]);
        k::adamw(&mut p, &big, &mut m, &mut v, &hyper(3, 1e-3, 0.5), 0.1);
        let (mut db, mut dw, mut di) = (vec![0.0; 77], vec![0.0; 77 * C], vec![0.0; N * C]);
        let r = &big[..N * 77];
        k::matmul_backward(&mut di, &mut dw, Some(&mut db), r, &x, &big[..77 * C], N, C, 77);
        let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<u32>>();
        [
            bits(&out), bits(&lse), bits(&dqkv), bits(&lo), bits(&mean), bits(&rstd), bits(&li), bits(&lw),
            bits(&lb), bits(&ge), bits(&gb), bits(&losses), bits(&dl), bits(&losses2), bits(&p), bits(&m), bits(&v),
            bits(&db), vec![k::sum_squares(&big).to_bits()],
        ]
    };
    let native = simd::simd_level();
    let reference = run();
    for level in 0..native {
        simd::set_max_simd_level(level);
        let got = run();
        simd::set_max_simd_level(u8::MAX);
        for (i, (a, b)) in got.iter().zip(&reference).enumerate() {
            assert!(a == b, "output {i} differs between SIMD level {level} and {native}");
        }
    }
    logits.clear();
}

// ---------------------------------------------------------------------------------------------
// benchmarks (ignored): GPT-2 124M shapes at B=4, T=64

/// (&mut v[i], &mut v[i+1])
fn pair(v: &mut [Vec<f32>], i: usize) -> (&mut Vec<f32>, &mut Vec<f32>) {
    let (a, b) = v.split_at_mut(i + 1);
    (&mut a[i], &mut b[0])
}

/// User+system CPU seconds of this process (all threads), from /proc (0 elsewhere).
fn process_cpu_s() -> f64 {
    let Ok(stat) = std::fs::read_to_string("/proc/self/stat") else { return 0.0 };
    let after = &stat[stat.rfind(')').map_or(0, |i| i + 2)..];
    let f: Vec<&str> = after.split_whitespace().collect();
    // fields 14 and 15 of stat (utime, stime) are at 11 and 12 after the command name
    let ticks: f64 = f.get(11).and_then(|x| x.parse().ok()).unwrap_or(0.0) + f.get(12).and_then(|x| x.parse().ok()).unwrap_or(0.0);
    ticks / 100.0
}

fn gflops(flop: f64, secs: f64) -> f64 {
    flop / secs / 1e9
}

fn time<R>(reps: usize, mut f: impl FnMut() -> R) -> f64 {
    f(); // warm up
    let t0 = std::time::Instant::now();
    for _ in 0..reps {
        std::hint::black_box(f());
    }
    t0.elapsed().as_secs_f64() / reps as f64
}

#[test]
#[ignore]
fn bench_matmul_d12_shapes() {
    let n = 4 * 64;
    let mut g = Rng(17);
    eprintln!("threads: {}", rayon::current_num_threads());
    for &(c, oc, name) in &[(768, 2304, "qkv"), (768, 768, "attproj"), (768, 3072, "fc"), (3072, 768, "fcproj"), (768, 50304, "classifier")] {
        let x = g.vec(n * c, 1.0);
        let w = g.vec(oc * c, 0.02);
        let bias = g.vec(oc, 0.1);
        let dout = g.vec(n * oc, 1.0);
        let mut out = vec![0.0; n * oc];
        let (mut dinp, mut dw, mut db) = (vec![0.0; n * c], vec![0.0; oc * c], vec![0.0; oc]);
        let flop = 2.0 * (n * c * oc) as f64;
        let reps = if oc > 10000 { 3 } else { 10 };
        let tf = time(reps, || k::matmul_forward(&mut out, &x, &w, Some(&bias), n, c, oc));
        let tb = time(reps, || k::matmul_backward(&mut dinp, &mut dw, Some(&mut db), &dout, &x, &w, n, c, oc));
        eprintln!(
            "{name:>10} {n}x{c}->{oc}: fwd {:7.2} ms ({:6.1} GFLOP/s)  bwd {:7.2} ms ({:6.1} GFLOP/s)",
            tf * 1e3,
            gflops(flop, tf),
            tb * 1e3,
            gflops(2.0 * flop, tb)
        );
    }
}

/// Every kernel of one d12 training step (B=4, T=64) through the kernel functions, timed by family.
#[test]
#[ignore]
fn bench_d12_step() {
    let (b, t, c, l, nh, v, vp) = (4usize, 64usize, 768usize, 12usize, 12usize, 50257usize, 50304usize);
    let n = b * t;
    let mut g = Rng(18);
    let times = std::cell::RefCell::new(std::collections::BTreeMap::<&str, f64>::new());
    macro_rules! timed {
        ($name:expr, $e:expr) => {{
            let t0 = std::time::Instant::now();
            let r = $e;
            *times.borrow_mut().entry($name).or_default() += t0.elapsed().as_secs_f64();
            r
        }};
    }
    // parameters (and grads, m, v) as 16 tensors in the llm.c layout
    let sizes = [vp * c, 1024 * c, l * c, l * c, l * 3 * c * c, l * 3 * c, l * c * c, l * c, l * c, l * c, l * 4 * c * c,
        l * 4 * c, l * c * 4 * c, l * c, c, c];
    let mut p: Vec<Vec<f32>> = sizes.iter().map(|&s| g.vec(s, 0.02)).collect();
    for w in [2usize, 8, 14] {
        p[w].iter_mut().for_each(|x| *x += 1.0);
    }
    let mut gr: Vec<Vec<f32>> = sizes.iter().map(|&s| vec![0.0; s]).collect();
    let mut m: Vec<Vec<f32>> = sizes.iter().map(|&s| vec![0.0; s]).collect();
    let mut vv: Vec<Vec<f32>> = sizes.iter().map(|&s| vec![0.0; s]).collect();
    let tokens = g.ids(n, v);
    let targets = g.ids(n, v);
    // activations per layer
    let z = |s: usize| vec![0.0f32; s];
    let mut res: Vec<Vec<f32>> = (0..=2 * l).map(|_| z(n * c)).collect(); // residual stream points
    let (mut ln1, mut ln1m, mut ln1r) = ((0..l).map(|_| z(n * c)).collect::<Vec<_>>(), vec![z(n); l], vec![z(n); l]);
    let (mut ln2, mut ln2m, mut ln2r) = ((0..l).map(|_| z(n * c)).collect::<Vec<_>>(), vec![z(n); l], vec![z(n); l]);
    let mut qkv: Vec<Vec<f32>> = (0..l).map(|_| z(n * 3 * c)).collect();
    let mut att: Vec<Vec<f32>> = (0..l).map(|_| z(n * c)).collect();
    let mut lse: Vec<Vec<f32>> = (0..l).map(|_| z(b * nh * t)).collect();
    let mut fch: Vec<Vec<f32>> = (0..l).map(|_| z(n * 4 * c)).collect();
    let mut fcg: Vec<Vec<f32>> = (0..l).map(|_| z(n * 4 * c)).collect();
    let (mut lnf, mut lnfm, mut lnfr) = (z(n * c), z(n), z(n));
    let mut logits = z(n * vp);
    let mut losses = z(n);
    let mut tmp = z(n * c);
    let (mut d_res, mut d_a, mut d_big, mut d_big2, mut d_qkv) = (z(n * c), z(n * c), z(n * 4 * c), z(n * 4 * c), z(n * 3 * c));
    let mut parts = vec![0.0f32; 16];
    let mut hyp = hyper(1, 1e-4, 1.0);
    let sl = |i: usize, s: usize| i * s..(i + 1) * s;

    let mut step = || {
        // forward
        timed!("encoder", k::encoder_forward(&mut res[0], &tokens, &p[0], &p[1], b, t, c));
        for li in 0..l {
            let rc = sl(li, c);
            timed!("layernorm", k::layernorm_forward(&mut ln1[li], &mut ln1m[li], &mut ln1r[li], &res[2 * li], &p[2][rc.clone()], &p[3][rc.clone()], n, c));
            timed!("matmul", k::matmul_forward(&mut qkv[li], &ln1[li], &p[4][sl(li, 3 * c * c)], Some(&p[5][sl(li, 3 * c)]), n, c, 3 * c));
            timed!("attention", k::attention_forward(&mut att[li], &mut lse[li], &qkv[li], b, t, c, nh));
            timed!("matmul", k::matmul_forward(&mut tmp, &att[li], &p[6][sl(li, c * c)], Some(&p[7][rc.clone()]), n, c, c));
            let (lo, hi) = res.split_at_mut(2 * li + 1);
            timed!("residual", k::residual_forward(&mut hi[0], &lo[2 * li], &tmp));
            timed!("layernorm", k::layernorm_forward(&mut ln2[li], &mut ln2m[li], &mut ln2r[li], &res[2 * li + 1], &p[8][rc.clone()], &p[9][rc.clone()], n, c));
            timed!("matmul", k::matmul_forward(&mut fch[li], &ln2[li], &p[10][sl(li, 4 * c * c)], Some(&p[11][sl(li, 4 * c)]), n, c, 4 * c));
            timed!("gelu", k::gelu_forward(&mut fcg[li], &fch[li]));
            timed!("matmul", k::matmul_forward(&mut tmp, &fcg[li], &p[12][sl(li, 4 * c * c)], Some(&p[13][rc.clone()]), n, 4 * c, c));
            let (lo, hi) = res.split_at_mut(2 * li + 2);
            timed!("residual", k::residual_forward(&mut hi[0], &lo[2 * li + 1], &tmp));
        }
        timed!("layernorm", k::layernorm_forward(&mut lnf, &mut lnfm, &mut lnfr, &res[2 * l], &p[14], &p[15], n, c));
        timed!("classifier matmul", k::matmul_forward(&mut logits, &lnf, &p[0], None, n, c, vp));
        timed!("cross_entropy", k::cross_entropy(&mut logits, &mut losses, &targets, n, v, vp, 1.0 / n as f32, true, false));
        // backward
        timed!("zero grads", gr.iter_mut().for_each(|x| k::zero(x)));
        timed!("classifier matmul", k::matmul_backward(&mut d_a, &mut gr[0], None, &logits, &lnf, &p[0], n, c, vp));
        let (ga, gb) = pair(&mut gr, 14);
        timed!("layernorm", k::layernorm_backward(&mut d_res, ga, gb, &d_a, &res[2 * l], &p[14], &lnfm, &lnfr, n, c, false));
        for li in (0..l).rev() {
            let rc = sl(li, c);
            // through the second residual branch
            let (ga, gb) = pair(&mut gr, 12);
            timed!("matmul", k::matmul_backward(&mut d_big, &mut ga[sl(li, 4 * c * c)], Some(&mut gb[rc.clone()]), &d_res, &fcg[li], &p[12][sl(li, 4 * c * c)], n, 4 * c, c));
            timed!("gelu", k::gelu_backward(&mut d_big2, &fch[li], &d_big));
            let (ga, gb) = pair(&mut gr, 10);
            timed!("matmul", k::matmul_backward(&mut d_a, &mut ga[sl(li, 4 * c * c)], Some(&mut gb[sl(li, 4 * c)]), &d_big2, &ln2[li], &p[10][sl(li, 4 * c * c)], n, c, 4 * c));
            let (ga, gb) = pair(&mut gr, 8);
            timed!("layernorm", k::layernorm_backward(&mut d_res, &mut ga[rc.clone()], &mut gb[rc.clone()], &d_a, &res[2 * li + 1], &p[8][rc.clone()], &ln2m[li], &ln2r[li], n, c, true));
            let (ga, gb) = pair(&mut gr, 6);
            timed!("matmul", k::matmul_backward(&mut d_a, &mut ga[sl(li, c * c)], Some(&mut gb[rc.clone()]), &d_res, &att[li], &p[6][sl(li, c * c)], n, c, c));
            timed!("attention", k::attention_backward(&mut d_qkv, &d_a, &att[li], &lse[li], &qkv[li], b, t, c, nh));
            let (ga, gb) = pair(&mut gr, 4);
            timed!("matmul", k::matmul_backward(&mut d_a, &mut ga[sl(li, 3 * c * c)], Some(&mut gb[sl(li, 3 * c)]), &d_qkv, &ln1[li], &p[4][sl(li, 3 * c * c)], n, c, 3 * c));
            let (ga, gb) = pair(&mut gr, 2);
            timed!("layernorm", k::layernorm_backward(&mut d_res, &mut ga[rc.clone()], &mut gb[rc.clone()], &d_a, &res[2 * li], &p[2][rc.clone()], &ln1m[li], &ln1r[li], n, c, true));
        }
        let (g0, g1) = gr.split_at_mut(1);
        timed!("encoder", k::encoder_backward(&mut g0[0], &mut g1[0], &d_res, &tokens, b, t, c));
        // norm, clip, update
        timed!("sum_squares+clip", {
            for (i, gi) in gr.iter().enumerate() {
                parts[i] = k::sum_squares(gi);
            }
            k::clip_scale(&mut hyp, &parts, 1.0)
        });
        timed!("adamw", for i in 0..16 {
            k::adamw(&mut p[i], &gr[i], &mut m[i], &mut vv[i], &hyp, 0.1);
        });
    };
    eprintln!("threads: {}", rayon::current_num_threads());
    step(); // warm up
    times.borrow_mut().clear();
    let reps = 3;
    let mut best = f64::INFINITY;
    let mut best_cpu = f64::INFINITY;
    for _ in 0..reps {
        let (t0, c0) = (std::time::Instant::now(), process_cpu_s());
        step();
        best = best.min(t0.elapsed().as_secs_f64());
        best_cpu = best_cpu.min(process_cpu_s() - c0);
    }
    for (name, s) in times.borrow().iter() {
        eprintln!("{name:>18}: {:8.1} ms", s / reps as f64 * 1e3);
    }
    eprintln!(
        "d12 B=4 T=64 step: best of {reps}: {best:.3} s wall, {best_cpu:.2} s CPU over {} threads (kernel times above: mean per step)",
        rayon::current_num_threads()
    );
}


/// The non-matmul kernels at d12 B=4 T=64 shapes, at each SIMD level (per-layer, ms).
#[test]
#[ignore]
fn bench_kernels_d12_simd_levels() {
    use wgpt::backend::cpu::simd;
    let (b, t, c, nh, v, vp) = (4usize, 64usize, 768usize, 12usize, 50257usize, 50304usize);
    let n = b * t;
    let mut g = Rng(20);
    let qkv = g.vec(n * 3 * c, 1.0);
    let x = g.vec(n * c, 1.0);
    let w = g.vec(c, 1.0);
    let h4 = g.vec(n * 4 * c, 2.0);
    let logits = g.vec(n * vp, 3.0);
    let targets = g.ids(n, v);
    let params = g.vec(7 << 20, 0.02);
    let (mut out, mut lse, mut dqkv) = (vec![0.0; n * c], vec![0.0; b * nh * t], vec![0.0; n * 3 * c]);
    let (mut mean, mut rstd, mut lo) = (vec![0.0; n], vec![0.0; n], vec![0.0; n * c]);
    let (mut dw, mut db, mut o4) = (vec![0.0; c], vec![0.0; c], vec![0.0; n * 4 * c]);
    let (mut p, mut m, mut vv) = (params.clone(), vec![0.0; params.len()], vec![0.0; params.len()]);
    let mut losses = vec![0.0; n];
    for level in (0..=simd::simd_level()).rev() {
        simd::set_max_simd_level(level);
        let reps = 20;
        let ms = |s: f64| s * 1e3;
        let af = time(reps, || k::attention_forward(&mut out, &mut lse, &qkv, b, t, c, nh));
        let ab = time(reps, || k::attention_backward(&mut dqkv, &x, &out, &lse, &qkv, b, t, c, nh));
        let lf = time(reps, || k::layernorm_forward(&mut lo, &mut mean, &mut rstd, &x, &w, &w, n, c));
        let lb = time(reps, || k::layernorm_backward(&mut lo, &mut dw, &mut db, &x, &x, &w, &mean, &rstd, n, c, true));
        let gf = time(reps, || k::gelu_forward(&mut o4, &h4));
        let gb = time(reps, || k::gelu_backward(&mut o4, &h4, &h4));
        let mut lg = logits.clone();
        let ce = time(5, || {
            lg.copy_from_slice(&logits);
            k::cross_entropy(&mut lg, &mut losses, &targets, n, v, vp, 1.0 / n as f32, true, false)
        });
        let cp = time(5, || lg.copy_from_slice(&logits));
        let ad = time(5, || k::adamw(&mut p, &params, &mut m, &mut vv, &hyper(1, 1e-4, 1.0), 0.1));
        let ss = time(5, || k::sum_squares(&params));
        eprintln!(
            "simd level {level}: attention fwd {:.2} bwd {:.2} | layernorm fwd {:.2} bwd {:.2} | gelu fwd {:.2} bwd {:.2} | \
             cross-entropy {:.1} | adamw 7M {:.2} | sum_squares 7M {:.2}  (ms)",
            ms(af), ms(ab), ms(lf), ms(lb), ms(gf), ms(gb), ms(ce - cp), ms(ad), ms(ss)
        );
    }
    simd::set_max_simd_level(u8::MAX);
}

