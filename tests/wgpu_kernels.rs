//! Every kernel on the wgpu backend against the cpu backend (the reference), on random data of
//! awkward sizes: B·T = 74 (no tile multiple), T = 37, C = 96, V = 1531 / Vp = 1536, head sizes 16
//! and 64, views at unaligned offsets inside larger buffers, matmuls that need the scalar fallback.
//! Each check is |gpu − cpu| ≤ atol + rtol·|cpu| over the whole output buffer (so writes outside a
//! view are caught too), with the tolerance stated per kernel.
//!
//! Without any wgpu adapter the tests print "skipped: no wgpu adapter" and pass, unless
//! WGPT_REQUIRE_ADAPTER=1 (CI), where that is a failure. Here lavapipe (Vulkan on the CPU) runs them.

mod common;
use common::Rng;
use std::io::Write;
use wgpt::backend::cpu::CpuBackend;
use wgpt::backend::wgpu::{MatmulMode, WgpuBackend};
use wgpt::backend::Backend;
use wgpt::error::Error;
use wgpt::graph::{BufId, BufferTable, DType, Kernel, Launch, Phase, Role, Scalars, View};

/// The adapter under test: the backend's default choice, or WGPT_TEST_ADAPTER=<index> (see
/// `wgpt info`), e.g. to run the suite on the GL adapter too.
fn gpu() -> Option<WgpuBackend> {
    let index = std::env::var("WGPT_TEST_ADAPTER").ok().map(|s| s.parse::<usize>().expect("WGPT_TEST_ADAPTER is an index"));
    match WgpuBackend::new(index) {
        Ok(b) => Some(b),
        Err(e @ Error::Unavailable(_)) => {
            if std::env::var("WGPT_REQUIRE_ADAPTER").as_deref() == Ok("1") {
                panic!("WGPT_REQUIRE_ADAPTER=1 but no wgpu adapter: {e}");
            }
            // straight to stderr: libtest's capture (print!/eprint!) would hide it
            let _ = writeln!(std::io::stderr().lock(), "skipped: no wgpu adapter ({e})");
            None
        }
        Err(e) => panic!("wgpu backend failed to start: {e}"),
    }
}

enum Data {
    F(Vec<f32>),
    I(Vec<i32>),
}

/// A kernel test: buffers with their initial contents, the launches, and which buffers to compare.
struct Case {
    name: String,
    table: BufferTable,
    data: Vec<Data>,
    launches: Vec<Launch>,
    /// (buffer, atol, rtol)
    checks: Vec<(BufId, f32, f32)>,
}

impl Case {
    fn new(name: &str) -> Case {
        Case { name: name.into(), table: BufferTable::default(), data: Vec::new(), launches: Vec::new(), checks: Vec::new() }
    }
    fn f32(&mut self, name: &str, data: Vec<f32>) -> BufId {
        let id = self.table.add(name, data.len(), DType::F32, Role::Activation);
        self.data.push(Data::F(data));
        id
    }
    fn i32(&mut self, name: &str, data: Vec<i32>) -> BufId {
        let id = self.table.add(name, data.len(), DType::I32, Role::Tokens);
        self.data.push(Data::I(data));
        id
    }
    fn launch(&mut self, k: Kernel) {
        let label = format!("{}.{}", self.name, self.launches.len());
        self.launches.push(Launch { label, kernel: k });
    }
    fn check(&mut self, id: BufId, atol: f32, rtol: f32) {
        self.checks.push((id, atol, rtol));
    }
}

fn v(buf: BufId, offset: usize, len: usize) -> View {
    View { buf, offset, len }
}

fn load(be: &mut dyn Backend, c: &Case) {
    be.alloc(&c.table).unwrap();
    for (i, d) in c.data.iter().enumerate() {
        let id = BufId(i as u32);
        match d {
            Data::F(x) => be.upload_f32(id, x).unwrap(),
            Data::I(x) => be.upload_i32(id, x).unwrap(),
        }
    }
}

/// Runs the case on both backends (`repeat` times) and compares; returns the worst error seen.
fn compare(g: &mut WgpuBackend, c: &Case, repeat: usize) -> f32 {
    let mut cpu = CpuBackend::new(Some(2)).unwrap();
    load(&mut cpu, c);
    load(g, c);
    for _ in 0..repeat {
        cpu.run(&c.launches).unwrap();
        g.run(&c.launches).unwrap_or_else(|e| panic!("{}: wgpu run failed: {e}", c.name));
    }
    g.sync().unwrap();
    let mut worst = 0f32;
    for &(id, atol, rtol) in &c.checks {
        let want = cpu.download_f32(id).unwrap();
        let got = g.download_f32(id).unwrap();
        assert_eq!(want.len(), got.len());
        let name = &c.table.get(id).name;
        for (i, (w, x)) in want.iter().zip(&got).enumerate() {
            let err = (w - x).abs();
            assert!(
                err <= atol + rtol * w.abs() && x.is_finite() == w.is_finite(),
                "{} ({:?}): {name}[{i}] = {x}, cpu {w} (|Δ| {err:e} > {atol:e} + {rtol:e}·|cpu|)",
                c.name,
                g.matmul_mode()
            );
            worst = worst.max(err);
        }
        if std::env::var("WGPT_TEST_VERBOSE").is_ok() {
            let e = want.iter().zip(&got).map(|(w, x)| (w - x).abs()).fold(0f32, f32::max);
            let m = want.iter().map(|w| w.abs()).fold(0f32, f32::max);
            println!("  {}: {name}: max |Δ| {e:e}, max |cpu| {m:e}", c.name);
        }
    }
    worst
}

const B: usize = 2;
const T: usize = 37;
const C: usize = 96;
const V: usize = 1531;
const VP: usize = 1536;
const N: usize = B * T;

#[test]
fn encoder_forward_and_backward() {
    let Some(mut g) = gpu() else { return };
    let mut r = Rng(1);
    let mut c = Case::new("encoder");
    // few distinct tokens so that repeats (the dwte chains) are common, plus rare ones
    let mut toks = r.ints(N, 40);
    toks[5] = (V - 1) as i32;
    toks[60] = 1000;
    let tok = c.i32("tokens", toks);
    let wte = c.f32("wte", r.vec(VP * C, -1.0, 1.0));
    let wpe = c.f32("wpe", r.vec(T * C + 7, -1.0, 1.0));
    let out = c.f32("out", r.vec(N * C + 5, -1.0, 1.0));
    let dwte = c.f32("dwte", r.vec(VP * C, -1.0, 1.0));
    let dwpe = c.f32("dwpe", r.vec(T * C + 3, -1.0, 1.0));
    let dout = c.f32("dout", r.vec(N * C + 9, -1.0, 1.0));
    c.launch(Kernel::EncoderForward { out: v(out, 5, N * C), tokens: v(tok, 0, N), wte: v(wte, 0, VP * C), wpe: v(wpe, 7, T * C), b: B, t: T, c: C });
    c.launch(Kernel::EncoderBackward {
        dwte: v(dwte, 0, VP * C),
        dwpe: v(dwpe, 3, T * C),
        dout: v(dout, 9, N * C),
        tokens: v(tok, 0, N),
        b: B,
        t: T,
        c: C,
    });
    c.check(out, 0.0, 0.0); // exact: one addition
    c.check(dwte, 1e-5, 1e-6); // sums of up to ~10 values, order may differ
    c.check(dwpe, 1e-5, 1e-6);
    let w = compare(&mut g, &c, 1);
    println!("encoder: max |Δ| {w:e}");
}

#[test]
fn layernorm_forward_and_backward() {
    let Some(mut g) = gpu() else { return };
    let mut r = Rng(2);
    for accumulate in [false, true] {
        let mut c = Case::new(&format!("layernorm(acc={accumulate})"));
        let inp = c.f32("inp", r.vec(N * C + 3, -2.0, 2.0));
        let w = c.f32("weight", r.vec(C + 1, 0.5, 1.5));
        let b = c.f32("bias", r.vec(C + 1, -0.5, 0.5));
        let out = c.f32("out", vec![0.0; N * C]);
        let mean = c.f32("mean", vec![0.0; N + 1]);
        let rstd = c.f32("rstd", vec![0.0; N + 1]);
        let dout = c.f32("dout", r.vec(N * C, -1.0, 1.0));
        let dinp = c.f32("dinp", r.vec(N * C + 2, -1.0, 1.0));
        let dw = c.f32("dweight", r.vec(C, -1.0, 1.0));
        let db = c.f32("dbias", r.vec(C, -1.0, 1.0));
        c.launch(Kernel::LayerNormForward {
            out: v(out, 0, N * C),
            mean: v(mean, 1, N),
            rstd: v(rstd, 1, N),
            inp: v(inp, 3, N * C),
            weight: v(w, 1, C),
            bias: v(b, 0, C),
            n: N,
            c: C,
        });
        c.launch(Kernel::LayerNormBackward {
            dinp: v(dinp, 2, N * C),
            dweight: v(dw, 0, C),
            dbias: v(db, 0, C),
            dout: v(dout, 0, N * C),
            inp: v(inp, 3, N * C),
            weight: v(w, 1, C),
            mean: v(mean, 1, N),
            rstd: v(rstd, 1, N),
            n: N,
            c: C,
            accumulate,
        });
        c.check(out, 1e-5, 1e-5);
        c.check(mean, 1e-6, 1e-5);
        c.check(rstd, 1e-5, 1e-5);
        c.check(dinp, 1e-4, 1e-4);
        c.check(dw, 1e-4, 1e-5);
        c.check(db, 1e-4, 1e-5);
        let e = compare(&mut g, &c, 1);
        println!("{}: max |Δ| {e:e}", c.name);
    }
}

/// One forward + backward matmul case; `off` shifts every view (0 keeps vec4 alignment).
fn matmul_case(r: &mut Rng, n: usize, cc: usize, oc: usize, bias: bool, off: usize) -> Case {
    let mut c = Case::new(&format!("matmul n={n} c={cc} oc={oc} bias={bias} off={off}"));
    let inp = c.f32("inp", r.vec(n * cc + off, -1.0, 1.0));
    let w = c.f32("weight", r.vec(oc * cc + off, -1.0, 1.0));
    let b = c.f32("bias", r.vec(oc + off, -1.0, 1.0));
    let out = c.f32("out", r.vec(n * oc + off, -1.0, 1.0));
    let dout = c.f32("dout", r.vec(n * oc + off, -1.0, 1.0));
    let dinp = c.f32("dinp", r.vec(n * cc + off, -1.0, 1.0));
    let dw = c.f32("dweight", r.vec(oc * cc + off, -1.0, 1.0));
    let db = c.f32("dbias", r.vec(oc + off, -1.0, 1.0));
    c.launch(Kernel::MatmulForward {
        out: v(out, off, n * oc),
        inp: v(inp, off, n * cc),
        weight: v(w, off, oc * cc),
        bias: bias.then(|| v(b, off, oc)),
        n,
        c: cc,
        oc,
    });
    c.launch(Kernel::MatmulBackward {
        dinp: v(dinp, off, n * cc),
        dweight: v(dw, off, oc * cc),
        dbias: bias.then(|| v(db, off, oc)),
        dout: v(dout, off, n * oc),
        inp: v(inp, off, n * cc),
        weight: v(w, off, oc * cc),
        n,
        c: cc,
        oc,
    });
    // sums of up to k ≈ 100–400 products of values in [-1, 1]
    c.check(out, 3e-5 * (cc as f32).sqrt(), 1e-5);
    c.check(dinp, 3e-5 * (oc as f32).sqrt(), 1e-5);
    c.check(dw, 3e-5 * (n as f32).sqrt(), 1e-5);
    c.check(db, 3e-5 * (n as f32).sqrt(), 1e-5);
    c
}

fn matmul_modes(g: &WgpuBackend) -> Vec<MatmulMode> {
    let m = g.matmul_modes();
    if !g.subgroup_matmul_available() {
        println!("note: no subgroup matmul on {} (subgroups {:?})", g.adapter_info().name, (g.adapter_info().subgroup_min_size, g.adapter_info().subgroup_max_size));
    }
    m
}

#[test]
fn matmul_forward_and_backward() {
    let Some(mut g) = gpu() else { return };
    let mut r = Rng(3);
    let shapes = [
        (N, C, 3 * C, true, 0),   // qkv
        (N, C, 4 * C, true, 4),   // fc, view offset keeps vec4 alignment
        (N, 4 * C, C, true, 0),   // fc proj
        (N, C, VP, false, 0),     // classifier (tied wte, no bias)
        (N, C, 3 * C, true, 3),   // unaligned views: scalar fallback
        (N, 37, 53, true, 0),     // k, n not multiples of 4: fallback
        (5, 8, 4, true, 0),       // tiny
        (300, 136, 260, true, 0), // several 128×128 tiles with ragged edges
    ];
    for mode in matmul_modes(&g) {
        g.set_matmul_mode(mode).unwrap();
        for &(n, cc, oc, bias, off) in &shapes {
            let c = matmul_case(&mut r, n, cc, oc, bias, off);
            let e = compare(&mut g, &c, 1);
            println!("{:?} {}: max |Δ| {e:e}", mode, c.name);
        }
    }
}

/// Long-k matmuls split along k (partial tiles in scratch, then summed in order), in every mode.
#[test]
fn matmul_split_k() {
    let Some(mut g) = gpu() else { return };
    let mut r = Rng(12);
    g.set_split_k_target(100_000);
    for mode in matmul_modes(&g) {
        g.set_matmul_mode(mode).unwrap();
        // forward and dinp with k = 1100 / 1536; dW with k = n = 1030 (not a multiple of 4)
        for &(n, cc, oc, bias) in &[(74usize, 1100usize, 96usize, true), (1030, 64, 136, true), (74, 96, 1536, false), (300, 1100, 260, true)] {
            let c = matmul_case(&mut r, n, cc, oc, bias, 0);
            let e = compare(&mut g, &c, 1);
            println!("{mode:?} split-k {}: max |Δ| {e:e}", c.name);
        }
    }
}

fn attention_case(r: &mut Rng, b: usize, t: usize, c: usize, nh: usize) -> Case {
    let mut k = Case::new(&format!("attention b={b} t={t} c={c} nh={nh} hs={}", c / nh));
    let n = b * t;
    let qkv = k.f32("qkv", r.vec(n * 3 * c + 1, -2.0, 2.0));
    let out = k.f32("out", vec![0.0; n * c]);
    let lse = k.f32("lse", vec![0.0; b * nh * t]);
    let dout = k.f32("dout", r.vec(n * c, -1.0, 1.0));
    let dqkv = k.f32("dqkv", r.vec(n * 3 * c, -1.0, 1.0));
    k.launch(Kernel::AttentionForward { out: v(out, 0, n * c), lse: v(lse, 0, b * nh * t), qkv: v(qkv, 1, n * 3 * c), b, t, c, nh });
    k.launch(Kernel::AttentionBackward {
        dqkv: v(dqkv, 0, n * 3 * c),
        dout: v(dout, 0, n * c),
        out: v(out, 0, n * c),
        lse: v(lse, 0, b * nh * t),
        qkv: v(qkv, 1, n * 3 * c),
        b,
        t,
        c,
        nh,
    });
    k.check(out, 1e-5, 1e-4);
    k.check(lse, 1e-5, 1e-5);
    k.check(dqkv, 2e-5, 1e-4);
    k
}

#[test]
fn attention_forward_and_backward() {
    let Some(mut g) = gpu() else { return };
    let mut r = Rng(4);
    for (b, t, c, nh) in [(B, T, C, 6), (B, T, 128, 2), (1, 130, 64, 1), (3, 1, 32, 2), (2, 19, 50, 2)] {
        let k = attention_case(&mut r, b, t, c, nh);
        let e = compare(&mut g, &k, 1);
        println!("{}: max |Δ| {e:e}", k.name);
    }
}

#[test]
fn gelu_residual_elementwise() {
    let Some(mut g) = gpu() else { return };
    let mut r = Rng(5);
    let n = N * 4 * C + 3;
    let mut c = Case::new("gelu+residual");
    let mut xs = r.vec(n + 1, -6.0, 6.0);
    xs[7] = 30.0; // tanh saturation
    xs[8] = -30.0;
    let x = c.f32("x", xs);
    let out = c.f32("out", vec![0.0; n]);
    let dout = c.f32("dout", r.vec(n, -1.0, 1.0));
    let dinp = c.f32("dinp", vec![0.0; n + 2]);
    let a = c.f32("a", r.vec(n, -1.0, 1.0));
    let s = c.f32("sum", vec![0.0; n]);
    c.launch(Kernel::GeluForward { out: v(out, 0, n), inp: v(x, 1, n), n });
    c.launch(Kernel::GeluBackward { dinp: v(dinp, 2, n), inp: v(x, 1, n), dout: v(dout, 0, n), n });
    c.launch(Kernel::ResidualForward { out: v(s, 0, n), a: v(a, 0, n), b: v(out, 0, n), n });
    // in place: a = a + dout (same buffer read and written in one dispatch)
    c.launch(Kernel::ResidualForward { out: v(a, 0, n), a: v(a, 0, n), b: v(dout, 0, n), n });
    c.check(out, 1e-6, 1e-5);
    c.check(dinp, 1e-6, 1e-5);
    c.check(s, 1e-6, 1e-6);
    c.check(a, 0.0, 0.0);
    let e = compare(&mut g, &c, 1);
    println!("gelu/residual: max |Δ| {e:e}");
}

#[test]
fn cross_entropy_loss_and_grad() {
    let Some(mut g) = gpu() else { return };
    let mut r = Rng(6);
    let mut c = Case::new("crossentropy");
    let logits = c.f32("logits", r.vec(N * VP + 1, -8.0, 8.0));
    let logits2 = c.f32("logits_eval", r.vec(N * VP, -8.0, 8.0));
    // the first launch adds its losses to these, the second overwrites its own
    let losses = c.f32("losses", r.vec(N + 1, 0.0, 3.0));
    let losses2 = c.f32("losses_eval", r.vec(N, 5.0, 9.0));
    let mut tg = r.ints(N, V);
    tg[0] = (V - 1) as i32;
    tg[1] = 0;
    let targets = c.i32("targets", tg);
    // the seed sits at an unaligned offset of a scalars-like buffer, as in a graph
    let seeds = c.f32("seeds", vec![0.25, 1.0 / N as f32, 1.0]);
    c.launch(Kernel::CrossEntropy {
        logits: v(logits, 1, N * VP),
        losses: v(losses, 1, N),
        targets: v(targets, 0, N),
        dloss: v(seeds, 1, 1),
        n: N,
        v: V,
        vp: VP,
        write_grad: true,
        accumulate: true,
    });
    c.launch(Kernel::CrossEntropy {
        logits: v(logits2, 0, N * VP),
        losses: v(losses2, 0, N),
        targets: v(targets, 0, N),
        dloss: v(seeds, 2, 1),
        n: N,
        v: V,
        vp: VP,
        write_grad: false,
        accumulate: false,
    });
    c.check(losses, 2e-5, 1e-5);
    c.check(losses2, 2e-5, 1e-5);
    c.check(logits, 1e-8, 1e-4); // dlogits, incl. the zeroed padding
    c.check(logits2, 0.0, 0.0); // untouched
    let e = compare(&mut g, &c, 1);
    println!("crossentropy: max |Δ| {e:e}");
}

#[test]
fn zero_norm_clip_adamw() {
    let Some(mut g) = gpu() else { return };
    let mut r = Rng(7);
    for max_norm in [0.0f32, 1.0] {
        let mut c = Case::new(&format!("optimizer(max_norm={max_norm})"));
        let sizes = [VP * C, 3 * C, 1, 7];
        let mut params = Vec::new();
        let mut grads = Vec::new();
        let mut ms = Vec::new();
        let mut vs = Vec::new();
        for (i, &s) in sizes.iter().enumerate() {
            params.push(c.f32(&format!("p{i}"), r.vec(s, -1.0, 1.0)));
            grads.push(c.f32(&format!("g{i}"), r.vec(s, -0.05, 0.05)));
            ms.push(c.f32(&format!("m{i}"), r.vec(s, -0.01, 0.01)));
            vs.push(c.f32(&format!("v{i}"), r.vec(s, 0.0, 1e-4)));
        }
        let junk = c.f32("junk", r.vec(1000, -1.0, 1.0));
        let parts = c.f32("parts", vec![5.0; sizes.len() + 1]);
        let (b1, b2, step) = (0.9f32, 0.999f32, 3);
        let mut h = vec![0f32; Scalars::LEN];
        h[Scalars::LR] = 1e-3;
        h[Scalars::BETA1] = b1;
        h[Scalars::BETA2] = b2;
        h[Scalars::EPS] = 1e-8;
        h[Scalars::BC1] = 1.0 - b1.powi(step);
        h[Scalars::BC2] = 1.0 - b2.powi(step);
        h[Scalars::GRAD_SCALE] = 123.0; // overwritten by ClipScale
        let hyper = c.f32("hyper", h);
        c.launch(Kernel::Zero { out: v(junk, 3, 900) });
        for (i, &s) in sizes.iter().enumerate() {
            c.launch(Kernel::SumSquares { out: v(parts, 1, sizes.len()), inp: v(grads[i], 0, s), slot: i });
        }
        c.launch(Kernel::ClipScale { hyper: v(hyper, 0, Scalars::LEN), parts: v(parts, 1, sizes.len()), max_norm });
        for i in 0..sizes.len() {
            let s = sizes[i];
            c.launch(Kernel::AdamW {
                param: v(params[i], 0, s),
                grad: v(grads[i], 0, s),
                m: v(ms[i], 0, s),
                v: v(vs[i], 0, s),
                hyper: v(hyper, 0, Scalars::LEN),
                weight_decay: if i == 0 { 0.1 } else { 0.0 },
            });
        }
        c.check(junk, 0.0, 0.0);
        c.check(parts, 1e-6, 2e-5);
        c.check(hyper, 1e-7, 2e-5);
        for i in 0..sizes.len() {
            c.check(params[i], 1e-6, 1e-5);
            c.check(ms[i], 1e-9, 1e-5);
            c.check(vs[i], 1e-12, 1e-5);
        }
        // twice: the second AdamW step starts from the first one's state
        let e = compare(&mut g, &c, 2);
        println!("{}: max |Δ| {e:e}", c.name);
    }
}

/// Every kernel again with bindings limited to 64 KiB, so that each one is split into several
/// dispatches (row/column/vocabulary/batch chunks) exactly as on an adapter with small limits.
#[test]
fn split_bindings_match() {
    let Some(mut g) = gpu() else { return };
    g.limit_bindings_for_tests(64 * 1024);
    let mut r = Rng(8);
    let c = matmul_case(&mut r, N, C, VP, false, 0); // classifier: weight 590 KB
    compare(&mut g, &c, 1);
    let c = matmul_case(&mut r, N, 4 * C, C, true, 0);
    compare(&mut g, &c, 1);
    let c = attention_case(&mut r, 4, 37, 96, 6); // qkv of one sequence is 43 KB: batch chunks
    compare(&mut g, &c, 1);
    // encoder over a chunked wte, layernorm and cross-entropy over row chunks
    let mut c = Case::new("split encoder/layernorm/crossentropy");
    let tok = c.i32("tokens", r.ints(N, 300));
    let wte = c.f32("wte", r.vec(VP * C, -1.0, 1.0));
    let wpe = c.f32("wpe", r.vec(T * C, -1.0, 1.0));
    let x = c.f32("x", vec![0.0; N * C]);
    let dwte = c.f32("dwte", vec![0.0; VP * C]);
    let dwpe = c.f32("dwpe", vec![0.0; T * C]);
    let y = c.f32("y", vec![0.0; N * C]);
    let mean = c.f32("mean", vec![0.0; N]);
    let rstd = c.f32("rstd", vec![0.0; N]);
    let w = c.f32("w", r.vec(C, 0.5, 1.5));
    let b = c.f32("b", r.vec(C, -0.5, 0.5));
    let dw = c.f32("dw", vec![0.0; C]);
    let db = c.f32("db", vec![0.0; C]);
    let dx = c.f32("dx", vec![0.0; N * C]);
    let logits = c.f32("logits", r.vec(N * VP, -4.0, 4.0));
    let losses = c.f32("losses", vec![0.0; N]);
    let norm = c.f32("norm", vec![0.0; 1]);
    c.launch(Kernel::EncoderForward { out: v(x, 0, N * C), tokens: v(tok, 0, N), wte: v(wte, 0, VP * C), wpe: v(wpe, 0, T * C), b: B, t: T, c: C });
    c.launch(Kernel::LayerNormForward { out: v(y, 0, N * C), mean: v(mean, 0, N), rstd: v(rstd, 0, N), inp: v(x, 0, N * C), weight: v(w, 0, C), bias: v(b, 0, C), n: N, c: C });
    c.launch(Kernel::LayerNormBackward {
        dinp: v(dx, 0, N * C),
        dweight: v(dw, 0, C),
        dbias: v(db, 0, C),
        dout: v(y, 0, N * C),
        inp: v(x, 0, N * C),
        weight: v(w, 0, C),
        mean: v(mean, 0, N),
        rstd: v(rstd, 0, N),
        n: N,
        c: C,
        accumulate: false,
    });
    c.launch(Kernel::EncoderBackward { dwte: v(dwte, 0, VP * C), dwpe: v(dwpe, 0, T * C), dout: v(dx, 0, N * C), tokens: v(tok, 0, N), b: B, t: T, c: C });
    let seed = c.f32("seed", vec![0.5]);
    c.launch(Kernel::CrossEntropy { logits: v(logits, 0, N * VP), losses: v(losses, 0, N), targets: v(tok, 0, N), dloss: v(seed, 0, 1), n: N, v: V, vp: VP, write_grad: true, accumulate: false });
    c.launch(Kernel::SumSquares { out: v(norm, 0, 1), inp: v(wte, 0, VP * C), slot: 0 });
    c.check(x, 0.0, 0.0);
    c.check(y, 1e-5, 1e-5);
    c.check(dx, 1e-4, 1e-4);
    c.check(dw, 1e-4, 1e-5);
    c.check(db, 1e-4, 1e-5);
    c.check(dwte, 1e-4, 1e-5);
    c.check(dwpe, 1e-4, 1e-5);
    c.check(losses, 2e-5, 1e-5);
    c.check(logits, 1e-8, 1e-4);
    c.check(norm, 0.0, 2e-5);
    compare(&mut g, &c, 1);
}

/// A launch list runs many times from its cached plan (and two lists interleave).
#[test]
fn replay_is_stable() {
    let Some(mut g) = gpu() else { return };
    let mut r = Rng(9);
    let mut c = Case::new("replay");
    let a = c.f32("a", r.vec(1000, -1.0, 1.0));
    let b = c.f32("b", r.vec(1000, -1.0, 1.0));
    c.launch(Kernel::ResidualForward { out: v(a, 0, 1000), a: v(a, 0, 1000), b: v(b, 0, 1000), n: 1000 });
    c.check(a, 1e-5, 1e-6);
    compare(&mut g, &c, 5);
}

#[test]
fn bad_inputs_are_errors() {
    let Some(mut g) = gpu() else { return };
    let mut t = BufferTable::default();
    let a = t.add("a", 10, DType::F32, Role::Activation);
    let tok = t.add("tok", 4, DType::I32, Role::Tokens);
    g.alloc(&t).unwrap();
    assert!(g.upload_f32(a, &[0.0; 9]).is_err(), "wrong length");
    assert!(g.upload_f32(tok, &[0.0; 4]).is_err(), "wrong dtype");
    assert!(g.download_f32(BufId(7)).is_err(), "unknown buffer");
    let bad = vec![Launch {
        label: "too.long".into(),
        kernel: Kernel::GeluForward { out: v(a, 5, 10), inp: v(a, 0, 10), n: 10 },
    }];
    let e = g.run(&bad).unwrap_err().to_string();
    assert!(e.contains("too.long"), "{e}");
    assert!(WgpuBackend::new(Some(999)).is_err());
}

// ------------------------------------------------------------------------------------------------
// whole graphs

use std::path::Path;
use wgpt::backend::wgpu::{plan_memory, DeviceCaps};
use wgpt::graph::{build_train_step, TrainOptions};
use wgpt::model::checkpoint::read_checkpoint;
use wgpt::model::debug_state::read_debug_state;
use wgpt::model::{Config, ParamLayout, NUM_PARAM_TENSORS, PARAM_NAMES};
use wgpt::train::session::{AdamConsts, Session};

const TINY: &str = "tests/data/tiny";

/// test_gpt2 on the wgpu backend: step-0 gradients and the 10 AdamW steps' losses of the fixture
/// (an independent float64 implementation) within 1e-4 (lr 1e-4, wd 0.01 on every tensor, no clip).
#[test]
fn tiny_fixture_trains_like_the_reference() {
    let Some(g) = gpu() else { return };
    let (cfg, params) = read_checkpoint(Path::new(&format!("{TINY}/model.bin"))).unwrap();
    let st = read_debug_state(Path::new(&format!("{TINY}/debug_state.bin")), &cfg).unwrap();
    let exp: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(format!("{TINY}/expected.json")).unwrap()).unwrap();
    let want: Vec<f64> = exp["losses"].as_array().unwrap().iter().map(|x| x.as_f64().unwrap()).collect();
    assert_eq!(want.len(), 10);
    let opts = TrainOptions { b: st.b, t: st.t, grad_accum: 1, weight_decay: 0.01, decay_all: true, grad_clip: 0.0 };
    let graph = build_train_step(&cfg, &opts);
    let plan = g.plan(&graph.buffers, &[graph.phase(Phase::ZeroGrad), graph.phase(Phase::Train), graph.phase(Phase::GradNorm), graph.phase(Phase::Update)]).unwrap();
    println!("tiny: {} dispatches, {} bytes on {}", plan.dispatches, plan.total_bytes, g.name());
    let mut s = Session::new(Box::new(g), graph).unwrap();
    s.upload_params(&params).unwrap();
    let adam = AdamConsts { beta1: 0.9, beta2: 0.999, eps: 1e-8 };
    let layout = ParamLayout::new(&cfg);
    for (step, w) in want.iter().enumerate() {
        s.zero_grad().unwrap();
        let loss = s.train_micro(&st.x, &st.y).unwrap();
        println!("step {step}: loss {loss:.6} (reference {w:.6})");
        assert!((loss as f64 - w).abs() < 1e-4, "step {step}: loss {loss} vs reference {w}");
        if step == 0 {
            let grads = s.download_grads().unwrap();
            for (i, name) in PARAM_NAMES.iter().enumerate().take(NUM_PARAM_TENSORS) {
                let (o, n) = (layout.offsets[i], layout.sizes[i]);
                let reference = &st.grads[o..o + n];
                let scale = reference.iter().fold(0f32, |m, x| m.max(x.abs()));
                let err = grads[o..o + n].iter().zip(reference).fold(0f32, |m, (a, b)| m.max((a - b).abs()));
                assert!(err <= 1e-4 * scale, "{name}: gradient max error {err} vs max |ref| {scale}");
            }
        }
        s.update(1e-4, adam, step + 1).unwrap();
    }
}

/// The inference graph on wgpu: logits (read back per row) and loss of the fixture's batch.
#[test]
fn tiny_fixture_forward_logits() {
    let Some(g) = gpu() else { return };
    let (cfg, params) = read_checkpoint(Path::new(&format!("{TINY}/model.bin"))).unwrap();
    let st = read_debug_state(Path::new(&format!("{TINY}/debug_state.bin")), &cfg).unwrap();
    let mut s = Session::new(Box::new(g), wgpt::graph::build_forward(&cfg, st.b, st.t)).unwrap();
    s.upload_params(&params).unwrap();
    let loss = s.eval(&st.x, &st.y).unwrap();
    assert!((loss - st.loss).abs() < 1e-5, "eval loss {loss} vs {}", st.loss);
    let mut max_err = 0f32;
    for r in 0..st.b * st.t {
        let row = s.logits_row(r).unwrap();
        assert_eq!(row.len(), cfg.v);
        for (a, b) in row.iter().zip(&st.logits[r * cfg.v..(r + 1) * cfg.v]) {
            max_err = max_err.max((a - b).abs());
        }
    }
    assert!(max_err < 1e-4, "logits max error {max_err}");
}

#[test]
fn adapters_are_listed() {
    let Some(g) = gpu() else { return };
    let list = wgpt::backend::wgpu::list_adapters();
    assert!(!list.is_empty());
    for a in &list {
        println!("{a:?}");
        assert!(a.max_storage_buffer_binding_size > 0 && a.max_buffer_size > 0 && !a.name.is_empty());
    }
    assert!(list.iter().any(|a| a.name == g.adapter_info().name));
}

fn gpt2_124m() -> Config {
    Config::from_descriptor("d12").unwrap()
}

/// GPT-2 124M at B=4, T=1024 fits an adapter with WebGPU's default limits (128 MiB bindings,
/// 256 MiB buffers); at B=64 a buffer does not, and the error says what to change. No adapter needed.
#[test]
fn gpt2_124m_plans_within_webgpu_default_limits() {
    let caps = DeviceCaps::from_limits(&wgpu::Limits::default(), wgpt::backend::wgpu::MatmulMode::Tiled);
    let opts = TrainOptions { b: 4, t: 1024, grad_accum: 1, weight_decay: 0.1, decay_all: false, grad_clip: 1.0 };
    let g = build_train_step(&gpt2_124m(), &opts);
    let plan = plan_memory(&g.buffers, &[g.phase(Phase::ZeroGrad), g.phase(Phase::Train), g.phase(Phase::Eval), g.phase(Phase::GradNorm), g.phase(Phase::Update)], &caps).unwrap();
    println!(
        "GPT-2 124M B=4 T=1024: {:.2} GiB ({} dispatches; largest buffer {} {:.1} MiB)",
        plan.total_bytes as f64 / (1u64 << 30) as f64,
        plan.dispatches,
        plan.largest_buffer.0,
        plan.largest_buffer.1 as f64 / (1 << 20) as f64
    );
    assert!(plan.total_bytes > g.total_bytes() as u64);
    println!("train phase: {} launches", g.phase(Phase::Train).len());
    assert!(plan.check_budget(1 << 30).is_err(), "1 GiB is not enough for GPT-2 124M training");
    let big = TrainOptions { b: 64, ..opts };
    let g = build_train_step(&gpt2_124m(), &big);
    match plan_memory(&g.buffers, &[g.phase(Phase::ZeroGrad), g.phase(Phase::Train), g.phase(Phase::GradNorm), g.phase(Phase::Update)], &caps) {
        Err(Error::OutOfMemory(msg)) => {
            println!("B=64: {msg}");
            assert!(msg.contains("--batch") && msg.contains("--seq-len"), "{msg}");
        }
        other => panic!("B=64 T=1024 should not fit WebGPU default limits: {other:?}"),
    }
}

/// Matmul throughput on this adapter (both kernel families where available):
/// `cargo test --release --test wgpu_kernels matmul_gflops -- --ignored --nocapture`
#[test]
#[ignore]
fn matmul_gflops() {
    use wgpt::backend::wgpu::{bench_matmul_backward_on, bench_matmul_on};
    let Some(mut g) = gpu() else { return };
    let shapes: Vec<(usize, usize, usize)> = match std::env::var("WGPT_BENCH_SHAPES") {
        Ok(s) => s.split(',').map(|t| {
            let d: Vec<usize> = t.split('x').map(|x| x.parse().unwrap()).collect();
            (d[0], d[1], d[2])
        }).collect(),
        Err(_) => vec![(1024, 768, 2304), (1024, 768, 3072), (1024, 3072, 768), (1024, 768, 768)],
    };
    let iters: usize = std::env::var("WGPT_BENCH_ITERS").ok().and_then(|s| s.parse().ok()).unwrap_or(3);
    for mode in matmul_modes(&g) {
        g.set_matmul_mode(mode).unwrap();
        for &(m, k, n) in &shapes {
            let f = bench_matmul_on(&mut g, m, k, n, iters).unwrap();
            let b = bench_matmul_backward_on(&mut g, m, k, n, iters).unwrap();
            println!("{} {:?} {m}x{k}x{n}: forward {f:.1} GFLOP/s, backward {b:.1} GFLOP/s", g.adapter_info().name, mode);
        }
    }
}

/// GPT-2 124M (random init) for two steps at B=1, T=32 on wgpu and cpu: the real shapes, with wte
/// (154 MB) above the 128 MiB default binding so the encoder, classifier, norm and AdamW launches
/// are split. Slow on lavapipe (~1 min):
/// `cargo test --release --test wgpu_kernels gpt2_124m_steps -- --ignored --nocapture`
#[test]
#[ignore]
fn gpt2_124m_steps_match_cpu() {
    let Some(mut g) = gpu() else { return };
    g.limit_bindings_for_tests(128 << 20);
    let (cfg, params) = wgpt::train::load_or_init("d12", 1337).unwrap();
    let (b, t) = (1, 32);
    let opts = TrainOptions { b, t, grad_accum: 1, weight_decay: 0.1, decay_all: false, grad_clip: 1.0 };
    let mut r = Rng(11);
    let x = r.ints(b * t, cfg.v);
    let y = r.ints(b * t, cfg.v);
    let adam = AdamConsts { beta1: 0.9, beta2: 0.95, eps: 1e-8 };
    let mut results = Vec::new();
    for backend in ["cpu", "wgpu"] {
        let be: Box<dyn Backend> = if backend == "cpu" {
            Box::new(CpuBackend::new(None).unwrap())
        } else {
            Box::new(std::mem::replace(&mut g, gpu().unwrap()))
        };
        let mut s = Session::new(be, build_train_step(&cfg, &opts)).unwrap();
        s.upload_params(&params).unwrap();
        let mut losses = Vec::new();
        let t0 = std::time::Instant::now();
        for step in 0..2 {
            s.zero_grad().unwrap();
            let loss = s.train_micro(&x, &y).unwrap();
            let norm = s.update(6e-4, adam, step + 1).unwrap();
            losses.push((loss, norm));
        }
        println!("{backend}: {losses:?} in {:?}", t0.elapsed());
        let p = s.download_params().unwrap();
        results.push((losses, p));
    }
    let (lc, pc) = &results[0];
    let (lg, pg) = &results[1];
    for ((a, na), (b, nb)) in lc.iter().zip(lg) {
        assert!((a - b).abs() < 2e-4, "loss cpu {a} wgpu {b}");
        assert!((na - nb).abs() < 1e-3 * na.abs().max(1.0), "grad norm cpu {na} wgpu {nb}");
    }
    let err = pc.iter().zip(pg).fold(0f32, |m, (a, b)| m.max((a - b).abs()));
    println!("params after 2 steps: max |Δ| {err:e}");
    // AdamW moves each weight by about lr·m̂/√v̂ (≤ ~lr): weights with near-zero gradients may step
    // differently on rounding-level gradient differences, so the bound is a fraction of lr
    assert!(err < 0.25 * 6e-4, "parameters differ by {err}");
}

/// Where a training step's time goes on this adapter, per kernel family:
/// `cargo test --release --test wgpu_kernels step_profile -- --ignored --nocapture`
/// (WGPT_PROFILE_MODEL=d6, WGPT_PROFILE_BT=1x64 by default).
#[test]
#[ignore]
fn step_profile() {
    let Some(g) = gpu() else { return };
    let model = std::env::var("WGPT_PROFILE_MODEL").unwrap_or_else(|_| "d6".into());
    let bt = std::env::var("WGPT_PROFILE_BT").unwrap_or_else(|_| "1x64".into());
    let (b, t) = bt.split_once('x').map(|(b, t)| (b.parse().unwrap(), t.parse().unwrap())).unwrap();
    let (cfg, params) = wgpt::train::load_or_init(&model, 1).unwrap();
    let opts = TrainOptions { b, t, grad_accum: 1, weight_decay: 0.1, decay_all: false, grad_clip: 1.0 };
    let graph = build_train_step(&cfg, &opts);
    let mut g = g;
    g.alloc(&graph.buffers).unwrap();
    let layout = ParamLayout::new(&cfg);
    for (i, id) in graph.io.params.iter().enumerate() {
        g.upload_f32(*id, &params[layout.offsets[i]..layout.offsets[i] + layout.sizes[i]]).unwrap();
    }
    let mut r = Rng(5);
    let x = r.ints(b * t, cfg.v);
    g.upload_i32(graph.io.tokens, &x).unwrap();
    g.upload_i32(graph.io.targets, &x).unwrap();
    let mut h = vec![0f32; Scalars::LEN];
    h[Scalars::LR] = 1e-4;
    h[Scalars::BETA1] = 0.9;
    h[Scalars::BETA2] = 0.95;
    h[Scalars::EPS] = 1e-8;
    h[Scalars::BC1] = 0.1;
    h[Scalars::BC2] = 0.05;
    h[Scalars::GRAD_SCALE] = 1.0;
    h[Scalars::LOSS_SEED] = 1.0 / (b * t) as f32;
    g.upload_f32(graph.io.scalars, &h).unwrap();
    let names = [Phase::ZeroGrad, Phase::Train, Phase::GradNorm, Phase::Update];
    let prepared: Vec<_> = names.iter().map(|&p| g.prepare(graph.phase(p)).unwrap()).collect();
    for &p in &prepared {
        g.run_prepared(p).unwrap(); // compile
    }
    g.sync().unwrap();
    let t0 = std::time::Instant::now();
    for &p in &prepared {
        g.run_prepared(p).unwrap();
    }
    g.download_f32(graph.io.losses).unwrap();
    println!("{model} B={b} T={t}: step {:.1} ms (one submit)", t0.elapsed().as_secs_f64() * 1e3);
    // per launch, grouped by kernel family
    let be = &mut g;
    let mut fam: std::collections::BTreeMap<&str, f64> = Default::default();
    let mut all = Vec::new();
    for phase in names.map(|p| graph.phase(p)) {
        let times = be.profile(phase).unwrap();
        for (l, (_, ms)) in phase.iter().zip(times) {
            all.push((ms, l.label.clone()));
            let key = match &l.kernel {
                Kernel::MatmulForward { .. } => "matmul fwd",
                Kernel::MatmulBackward { .. } => "matmul bwd",
                Kernel::AttentionForward { .. } => "attention fwd",
                Kernel::AttentionBackward { .. } => "attention bwd",
                k => k.family(),
            };
            *fam.entry(key).or_default() += ms;
        }
    }
    let total: f64 = fam.values().sum();
    for (k, ms) in &fam {
        println!("  {k:14} {ms:9.1} ms  {:5.1}%", 100.0 * ms / total);
    }
    all.sort_by(|a, b| b.0.total_cmp(&a.0));
    for (ms, l) in all.iter().take(8) {
        println!("  slowest: {l} {ms:.1} ms");
    }
}
