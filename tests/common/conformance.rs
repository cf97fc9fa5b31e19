//! The kernel conformance suite: ONE list of kernel cases ([`cases`]) that runs against any
//! `&mut dyn Backend`. The cpu backend is checked against the float64 references of
//! `reference.rs` ([`check_cpu_against_references`]); every other backend against the cpu
//! backend ([`check_against_cpu`]: `tests/conformance.rs` for wgpu, `tests/cuda.rs` for CUDA).
//!
//! A case is a buffer table with initial contents, a launch list (run `repeat` times from one
//! prepared phase), and the buffers to compare, each with |got − want| ≤ atol + rtol·|want| over
//! the WHOLE buffer, so writes outside a view are caught too. Every buffer a case does not check
//! must come back bit-identical to its initial contents (kernels never write their inputs), and
//! every buffer a launch writes must be checked.
//!
//! Sizes are awkward on purpose: T = 37, C = 96, B·T = 74 (no tile multiple), V = 1531 / Vp =
//! 1536, head sizes 8 to 128, rows of one, views at unaligned offsets inside larger buffers,
//! matmuls that take the scalar fallback, buffers larger than a 64 KiB binding.
//!
//! Each case is built for one float dtype (`cases(dtype)`): the "float" views of the kernel
//! signatures get that dtype, the f32-only ones (statistics, losses, scalars, moments) stay f32.
//! Only f32 kernels exist today; a backend (or the cpu reference) without a dtype, or a case
//! whose kernels do not exist in it, is reported as skipped — never passed.
//!
//! Adding a kernel: its `Kernel` variant and signature, the cpu kernel, the WGSL, the CUDA, its
//! f64 reference in `reference.rs` (`run_one`), and a case here.
#![allow(clippy::too_many_arguments)]

use super::reference;
use super::Rng;
use wgpt::backend::cpu::CpuBackend;
use wgpt::backend::Backend;
use wgpt::graph::signature::Class;
use wgpt::graph::{validate, BufId, BufferTable, DType, Kernel, Launch, Role, Scalars, View};

/// Tag: a matmul with k ≥ 1024, which a backend may split along k (wgpu's split-K).
pub const LONG_K: &str = "long-k";
/// Tag: buffers beyond 64 KiB, meant to run once more on a backend whose storage bindings are
/// limited to 64 KiB (wgpu's `limit_bindings_for_tests`), so that every kernel is chunked.
pub const SPLIT_BINDINGS: &str = "split-bindings";
/// Every float dtype of the graph, for the suites that run per dtype.
pub const FLOAT_DTYPES: [DType; 3] = [DType::F32, DType::F16, DType::BF16];

/// Initial contents of one buffer (floats are converted to the buffer's dtype on upload).
#[derive(Clone, Debug)]
pub enum Data {
    F(Vec<f32>),
    I(Vec<i32>),
}

/// One buffer compared over its whole length: |got − want| ≤ atol + rtol·|want|.
#[derive(Clone, Copy, Debug)]
pub struct Check {
    pub buf: BufId,
    pub atol: f32,
    pub rtol: f32,
}

/// The expected contents of every buffer of a case, computed in f64 from its initial data.
pub type Reference = fn(&Case) -> Vec<Vec<f64>>;

#[derive(Clone)]
pub struct Case {
    pub name: String,
    /// the float dtype the case was built for
    pub dtype: DType,
    pub table: BufferTable,
    /// initial contents, indexed by buffer id
    pub data: Vec<Data>,
    pub launches: Vec<Launch>,
    /// how many times the launches run (from one prepared phase)
    pub repeat: usize,
    pub checks: Vec<Check>,
    pub reference: Option<Reference>,
    pub tags: Vec<&'static str>,
}

/// The f64 interpreter of `reference.rs` over the case's launches.
pub fn f64_reference(c: &Case) -> Vec<Vec<f64>> {
    reference::run_launches(&c.table, &c.initial(), &c.launches, c.repeat)
}

impl Case {
    pub fn has_tag(&self, tag: &str) -> bool {
        self.tags.contains(&tag)
    }
    pub fn uses_matmul(&self) -> bool {
        self.launches.iter().any(|l| matches!(l.kernel, Kernel::MatmulForward { .. } | Kernel::MatmulBackward { .. }))
    }
    /// The kernel families of this case that do not exist in its dtype (empty: it can run).
    pub fn missing_kernels(&self) -> Vec<&'static str> {
        let mut m: Vec<&'static str> =
            self.launches.iter().filter(|l| !l.kernel.precisions().contains(&self.dtype)).map(|l| l.kernel.family()).collect();
        m.sort();
        m.dedup();
        m
    }
    /// The initial contents as stored (floats rounded to their buffer's dtype), in f64.
    pub fn initial(&self) -> Vec<Vec<f64>> {
        self.data
            .iter()
            .enumerate()
            .map(|(i, d)| {
                let dtype = self.table.get(BufId(i as u32)).dtype;
                match d {
                    Data::F(x) => x.iter().map(|&v| reference::round_to(dtype, v as f64)).collect(),
                    Data::I(x) => x.iter().map(|&v| v as f64).collect(),
                }
            })
            .collect()
    }
    /// Allocate, upload, run the launches `repeat` times, and read every buffer back.
    pub fn run_on(&self, be: &mut dyn Backend) -> wgpt::error::Result<Vec<Vec<f64>>> {
        be.alloc(&self.table)?;
        for (i, d) in self.data.iter().enumerate() {
            let id = BufId(i as u32);
            be.upload(id, &encode(d, self.table.get(id).dtype))?;
        }
        let p = be.prepare(&self.launches)?;
        let mut r = Ok(());
        for _ in 0..self.repeat {
            r = be.run_prepared(p);
            if r.is_err() {
                break;
            }
        }
        be.release(p);
        r?;
        be.sync()?;
        (0..self.table.len())
            .map(|i| {
                let id = BufId(i as u32);
                Ok(decode(&be.download(self.table.view(id))?, self.table.get(id).dtype))
            })
            .collect()
    }
}

/// Host data as the bytes of a `dtype` buffer.
pub fn encode(d: &Data, dtype: DType) -> Vec<u8> {
    match (d, dtype) {
        (Data::I(x), DType::I32) => bytemuck::cast_slice(x).to_vec(),
        (Data::F(x), DType::F32) => bytemuck::cast_slice(x).to_vec(),
        (Data::F(x), DType::F16) => x.iter().flat_map(|&v| half::f16::from_f32(v).to_le_bytes()).collect(),
        (Data::F(x), DType::BF16) => x.iter().flat_map(|&v| half::bf16::from_f32(v).to_le_bytes()).collect(),
        (d, t) => panic!("{} data for an {t} buffer", if matches!(d, Data::I(_)) { "i32" } else { "float" }),
    }
}

/// The bytes of a `dtype` buffer as f64 values.
pub fn decode(b: &[u8], dtype: DType) -> Vec<f64> {
    match dtype {
        DType::F32 => b.chunks_exact(4).map(|c| f32::from_le_bytes(c.try_into().unwrap()) as f64).collect(),
        DType::I32 => b.chunks_exact(4).map(|c| i32::from_le_bytes(c.try_into().unwrap()) as f64).collect(),
        DType::F16 => b.chunks_exact(2).map(|c| half::f16::from_le_bytes([c[0], c[1]]).to_f64()).collect(),
        DType::BF16 => b.chunks_exact(2).map(|c| half::bf16::from_le_bytes([c[0], c[1]]).to_f64()).collect(),
    }
}

// ---------------------------------------------------------------------------------------------
// building cases

fn v(buf: BufId, offset: usize, len: usize) -> View {
    View { buf, offset, len }
}

/// A case under construction; `finish(dtype)` gives each buffer its dtype from the signatures.
struct Build {
    name: String,
    bufs: Vec<(String, Data)>,
    launches: Vec<Launch>,
    checks: Vec<Check>,
    repeat: usize,
    tags: Vec<&'static str>,
    /// the dtype of the weight views (`Class::Weight`); default: the case's dtype
    weights: Option<DType>,
}

impl Build {
    fn new(name: impl Into<String>) -> Build {
        Build { name: name.into(), bufs: Vec::new(), launches: Vec::new(), checks: Vec::new(), repeat: 1, tags: Vec::new(), weights: None }
    }
    fn weights(mut self, dtype: DType) -> Build {
        self.weights = Some(dtype);
        self
    }
    fn f(&mut self, name: &str, data: Vec<f32>) -> BufId {
        self.bufs.push((name.to_string(), Data::F(data)));
        BufId(self.bufs.len() as u32 - 1)
    }
    fn i(&mut self, name: &str, data: Vec<i32>) -> BufId {
        self.bufs.push((name.to_string(), Data::I(data)));
        BufId(self.bufs.len() as u32 - 1)
    }
    /// The whole buffer.
    fn all(&self, id: BufId) -> View {
        let len = match &self.bufs[id.0 as usize].1 {
            Data::F(x) => x.len(),
            Data::I(x) => x.len(),
        };
        v(id, 0, len)
    }
    fn launch(&mut self, kernel: Kernel) {
        let label = format!("{}.{}", self.name, self.launches.len());
        self.launches.push(Launch { label, kernel });
    }
    fn check(&mut self, buf: BufId, atol: f32, rtol: f32) {
        self.checks.push(Check { buf, atol, rtol });
    }
    fn tag(mut self, tag: &'static str) -> Build {
        self.tags.push(tag);
        self
    }
    fn repeat(mut self, n: usize) -> Build {
        self.repeat = n;
        self
    }

    fn finish(self, dtype: DType) -> Case {
        let name = self.name;
        // each buffer's dtype, from the class of every argument that names it
        let mut dt: Vec<Option<DType>> = vec![None; self.bufs.len()];
        for l in &self.launches {
            for a in l.kernel.args() {
                let want = match a.class {
                    Class::Float => dtype,
                    Class::Weight => self.weights.unwrap_or(dtype),
                    Class::F32 => DType::F32,
                    Class::I32 => DType::I32,
                    // `Zero` clears f32 and float buffers alike (losses, norm parts, gradients)
                    Class::Any => continue,
                };
                let slot = &mut dt[a.view.buf.0 as usize];
                match *slot {
                    Some(d) if d != want => panic!(
                        "case {name}: buffer '{}' is {d} for one argument and {want} for {} of {}",
                        self.bufs[a.view.buf.0 as usize].0,
                        a.name,
                        l.label
                    ),
                    _ => *slot = Some(want),
                }
            }
        }
        let mut table = BufferTable::default();
        for ((bname, d), t) in self.bufs.iter().zip(&dt) {
            let (len, dtype, role) = match d {
                Data::F(x) => (x.len(), t.unwrap_or(dtype), Role::Activation),
                Data::I(x) => (x.len(), t.unwrap_or(DType::I32), Role::Tokens),
            };
            assert_eq!(matches!(d, Data::I(_)), dtype == DType::I32, "case {name}: buffer '{bname}' data and dtype {dtype} disagree");
            table.add(bname.clone(), len, dtype, role);
        }
        for l in &self.launches {
            for o in l.kernel.outputs() {
                assert!(
                    self.checks.iter().any(|c| c.buf == o.buf),
                    "case {name}: '{}' writes buffer '{}', which the case does not check",
                    l.label,
                    table.get(o.buf).name
                );
            }
        }
        for c in &self.checks {
            assert!(table.get(c.buf).dtype.is_float(), "case {name}: checks the ids '{}'", table.get(c.buf).name);
        }
        let case = Case {
            name,
            dtype,
            table,
            data: self.bufs.into_iter().map(|b| b.1).collect(),
            launches: self.launches,
            repeat: self.repeat,
            checks: self.checks,
            reference: Some(f64_reference),
            tags: self.tags,
        };
        if case.missing_kernels().is_empty() {
            validate(&case.table, &case.launches).unwrap_or_else(|e| panic!("case {}: {e}", case.name));
        }
        case
    }
}

// ---------------------------------------------------------------------------------------------
// the cases

// the GPT-2-like awkward sizes
const B: usize = 2;
const T: usize = 37;
const C: usize = 96;
const V: usize = 1531;
const VP: usize = 1536;
const N: usize = B * T;

/// Every case, for float dtype `dtype`. The data of each case is fixed (seeded).
pub fn cases(dtype: DType) -> Vec<Case> {
    let mut all: Vec<Build> = Vec::new();
    encoder_cases(&mut all);
    layernorm_cases(&mut all);
    matmul_cases(&mut all);
    attention_cases(&mut all);
    decode_cases(&mut all);
    f16_weight_cases(&mut all);
    elementwise_cases(&mut all);
    cross_entropy_cases(&mut all);
    optimizer_cases(&mut all, dtype);
    all.push(chain_case(&mut Rng(8)).tag(SPLIT_BINDINGS));
    all.into_iter().map(|b| b.finish(dtype)).collect()
}

fn encoder_cases(all: &mut Vec<Build>) {
    // B=2, T=37, C=96 over the padded vocabulary; views at offsets; few distinct tokens, so that
    // repeats (the dwte chains) are common, plus rare ones (the last real id, and 1000)
    let mut r = Rng(1);
    let mut c = Build::new(format!("encoder b={B} t={T} c={C} vp={VP}"));
    let mut toks = r.ints(N, 40);
    toks[5] = (V - 1) as i32;
    toks[60] = 1000;
    let tok = c.i("tokens", toks);
    let wte = c.f("wte", r.vec(VP * C, -1.0, 1.0));
    let wpe = c.f("wpe", r.vec(T * C + 7, -1.0, 1.0));
    let out = c.f("out", r.vec(N * C + 5, -1.0, 1.0));
    let dwte = c.f("dwte", r.vec(VP * C, -1.0, 1.0));
    let dwpe = c.f("dwpe", r.vec(T * C + 3, -1.0, 1.0));
    let dout = c.f("dout", r.vec(N * C + 9, -1.0, 1.0));
    c.launch(Kernel::EncoderForward { out: v(out, 5, N * C), tokens: v(tok, 0, N), wte: v(wte, 0, VP * C), wpe: v(wpe, 7, T * C), b: B, t: T, c: C });
    c.launch(Kernel::EncoderBackward { dwte: v(dwte, 0, VP * C), dwpe: v(dwpe, 3, T * C), dout: v(dout, 9, N * C), tokens: v(tok, 0, N), b: B, t: T, c: C });
    c.check(out, 0.0, 0.0); // exact: one addition
    c.check(dwte, 1e-5, 1e-6); // sums of up to ~10 values, order may differ
    c.check(dwpe, 1e-5, 1e-6);
    all.push(c.tag(SPLIT_BINDINGS));

    // tiny and odd: B=3, T=7 of a 9-row wpe, C=13, vocabulary 11
    let mut r = Rng(11);
    let (b, t, cc, vocab, tmax) = (3, 7, 13, 11, 9);
    let mut k = Build::new(format!("encoder b={b} t={t} c={cc} vocab={vocab}"));
    let tokens = k.i("tokens", r.ints(b * t, vocab));
    let wte = k.f("wte", r.sym_vec(vocab * cc, 1.0));
    let wpe = k.f("wpe", r.sym_vec(tmax * cc, 1.0));
    let out = k.f("out", vec![0.0; b * t * cc]);
    let dout = k.f("dout", r.sym_vec(b * t * cc, 1.0));
    let dwte = k.f("dwte", r.sym_vec(vocab * cc, 0.5)); // accumulated into
    let dwpe = k.f("dwpe", r.sym_vec(tmax * cc, 0.5));
    let (vo, vt, vw, vp, vd, vdw, vdp) = (k.all(out), k.all(tokens), k.all(wte), k.all(wpe), k.all(dout), k.all(dwte), k.all(dwpe));
    k.launch(Kernel::EncoderForward { out: vo, tokens: vt, wte: vw, wpe: vp, b, t, c: cc });
    k.launch(Kernel::EncoderBackward { dwte: vdw, dwpe: vdp, dout: vd, tokens: vt, b, t, c: cc });
    for id in [out, dwte, dwpe] {
        k.check(id, 1e-5, 1e-5);
    }
    all.push(k);
}

fn layernorm_cases(all: &mut Vec<Build>) {
    // N=74 rows of C=96, views at offsets, dinp written and accumulated
    let mut r = Rng(2);
    for (n, accumulate) in [(N, false), (N, true), (1, true)] {
        let mut c = Build::new(format!("layernorm n={n} c={C} acc={accumulate} (offsets)"));
        let inp = c.f("inp", r.vec(n * C + 3, -2.0, 2.0));
        let w = c.f("weight", r.vec(C + 1, 0.5, 1.5));
        let b = c.f("bias", r.vec(C + 1, -0.5, 0.5));
        let out = c.f("out", vec![0.0; n * C]);
        let mean = c.f("mean", vec![0.0; n + 1]);
        let rstd = c.f("rstd", vec![0.0; n + 1]);
        let dout = c.f("dout", r.vec(n * C, -1.0, 1.0));
        let dinp = c.f("dinp", r.vec(n * C + 2, -1.0, 1.0));
        let dw = c.f("dweight", r.vec(C, -1.0, 1.0));
        let db = c.f("dbias", r.vec(C, -1.0, 1.0));
        c.launch(Kernel::LayerNormForward {
            out: v(out, 0, n * C), mean: v(mean, 1, n), rstd: v(rstd, 1, n), inp: v(inp, 3, n * C), weight: v(w, 1, C), bias: v(b, 0, C), n, c: C,
        });
        c.launch(Kernel::LayerNormBackward {
            dinp: v(dinp, 2, n * C), dweight: v(dw, 0, C), dbias: v(db, 0, C), dout: v(dout, 0, n * C), inp: v(inp, 3, n * C),
            weight: v(w, 1, C), mean: v(mean, 1, n), rstd: v(rstd, 1, n), n, c: C, accumulate,
        });
        c.check(out, 1e-5, 1e-5);
        c.check(mean, 1e-6, 1e-5);
        c.check(rstd, 1e-5, 1e-5);
        c.check(dinp, 1e-4, 1e-4);
        c.check(dw, 1e-4, 1e-5);
        c.check(db, 1e-4, 1e-5);
        all.push(c);
    }
    // odd shapes: tiny rows, many rows, long rows (whole buffers, nonzero mean)
    for (n, cc, accumulate) in [(37, 45, false), (5, 3, true), (600, 77, true), (9, 800, false)] {
        let mut r = Rng(3 + n as u64);
        let mut k = Build::new(format!("layernorm n={n} c={cc} acc={accumulate}"));
        let inp = k.f("inp", r.sym_vec(n * cc, 2.0).iter().map(|x| x + 0.5).collect());
        let w = k.f("w", r.sym_vec(cc, 1.0));
        let bias = k.f("b", r.sym_vec(cc, 1.0));
        let out = k.f("out", vec![0.0; n * cc]);
        let mean = k.f("mean", vec![0.0; n]);
        let rstd = k.f("rstd", vec![0.0; n]);
        let dout = k.f("dout", r.sym_vec(n * cc, 1.0));
        let dinp = k.f("dinp", r.sym_vec(n * cc, 1.0));
        let dw = k.f("dw", r.sym_vec(cc, 1.0));
        let db = k.f("db", r.sym_vec(cc, 1.0));
        let a = |id| k.all(id);
        let fwd = Kernel::LayerNormForward { out: a(out), mean: a(mean), rstd: a(rstd), inp: a(inp), weight: a(w), bias: a(bias), n, c: cc };
        let bwd = Kernel::LayerNormBackward {
            dinp: a(dinp), dweight: a(dw), dbias: a(db), dout: a(dout), inp: a(inp), weight: a(w), mean: a(mean), rstd: a(rstd),
            n, c: cc, accumulate,
        };
        k.launch(fwd);
        k.launch(bwd);
        for id in [out, mean, rstd, dinp, dw, db] {
            k.check(id, 2e-4, 2e-4);
        }
        all.push(k);
    }
}

/// Forward and backward matmul over views shifted by `off` (0 keeps vec4 alignment); every
/// buffer starts non-zero (outputs are overwritten, dweight/dbias accumulated into).
fn matmul_pair(r: &mut Rng, name: String, n: usize, cc: usize, oc: usize, bias: bool, off: usize) -> Build {
    let mut c = Build::new(name);
    let inp = c.f("inp", r.vec(n * cc + off, -1.0, 1.0));
    let w = c.f("weight", r.vec(oc * cc + off, -1.0, 1.0));
    let b = c.f("bias", r.vec(oc + off, -1.0, 1.0));
    let out = c.f("out", r.vec(n * oc + off, -1.0, 1.0));
    let dout = c.f("dout", r.vec(n * oc + off, -1.0, 1.0));
    let dinp = c.f("dinp", r.vec(n * cc + off, -1.0, 1.0));
    let dw = c.f("dweight", r.vec(oc * cc + off, -1.0, 1.0));
    let db = c.f("dbias", r.vec(oc + off, -1.0, 1.0));
    c.launch(Kernel::MatmulForward {
        out: v(out, off, n * oc), inp: v(inp, off, n * cc), weight: v(w, off, oc * cc), bias: bias.then(|| v(b, off, oc)), n, c: cc, oc,
    });
    c.launch(Kernel::MatmulBackward {
        dinp: v(dinp, off, n * cc), dweight: v(dw, off, oc * cc), dbias: bias.then(|| v(db, off, oc)), dout: v(dout, off, n * oc),
        inp: v(inp, off, n * cc), weight: v(w, off, oc * cc), n, c: cc, oc,
    });
    // sums of k ≈ 100–1500 products of values in [-1, 1]
    c.check(out, 3e-5 * (cc as f32).sqrt(), 1e-5);
    c.check(dinp, 3e-5 * (oc as f32).sqrt(), 1e-5);
    c.check(dw, 3e-5 * (n as f32).sqrt(), 1e-5);
    c.check(db, 3e-5 * (n as f32).sqrt(), 1e-5);
    c
}

fn matmul_cases(all: &mut Vec<Build>) {
    let mut r = Rng(3);
    let shapes = [
        (N, C, 3 * C, true, 0, "qkv"),
        (N, C, 4 * C, true, 4, "fc, vec4-aligned offset"),
        (N, 4 * C, C, true, 0, "fc proj"),
        (N, C, VP, false, 0, "classifier: tied wte, no bias"),
        (N, C, 3 * C, true, 3, "unaligned views: scalar fallback"),
        (N, 37, 53, true, 0, "k, n not multiples of 4"),
        (5, 8, 4, true, 0, "tiny"),
        (300, 136, 260, true, 0, "several 128×128 tiles with ragged edges"),
    ];
    for (n, cc, oc, bias, off, what) in shapes {
        let c = matmul_pair(&mut r, format!("matmul n={n} c={cc} oc={oc} bias={bias} off={off} ({what})"), n, cc, oc, bias, off);
        // the classifier's weight (590 KB) and fc proj's are chunked under 64 KiB bindings
        all.push(if (cc, oc) == (C, VP) || (cc, oc) == (4 * C, C) { c.tag(SPLIT_BINDINGS) } else { c });
    }
    // long k: forward and dinp with k = 1100 / 1536, dweight with k = n = 1030 (not a multiple of 4)
    let mut r = Rng(12);
    for (n, cc, oc, bias) in [(74usize, 1100usize, 96usize, true), (1030, 64, 136, true), (74, 96, 1536, false), (300, 1100, 260, true)] {
        all.push(matmul_pair(&mut r, format!("matmul n={n} c={cc} oc={oc} bias={bias} (long k)"), n, cc, oc, bias, 0).tag(LONG_K));
    }
    // odd shapes, the input at an offset of 5, whole outputs (one row of one column included)
    for (n, cc, oc, bias) in [(37, 45, 29, true), (130, 70, 67, false), (1, 1, 1, true), (300, 96, 200, true)] {
        let mut r = Rng(7 + n as u64);
        let mut k = Build::new(format!("matmul n={n} c={cc} oc={oc} bias={bias} (input at offset 5)"));
        let inp_buf = k.f("inp", r.sym_vec(n * cc + 5, 1.0));
        let w = k.f("w", r.sym_vec(oc * cc, 1.0));
        let b = k.f("b", r.sym_vec(oc, 1.0));
        let out = k.f("out", r.sym_vec(n * oc, 1.0)); // overwritten
        let dout = k.f("dout", r.sym_vec(n * oc, 1.0));
        let dinp = k.f("dinp", r.sym_vec(n * cc, 1.0)); // overwritten
        let dw = k.f("dw", r.sym_vec(oc * cc, 1.0)); // accumulated
        let db = k.f("db", r.sym_vec(oc, 1.0)); // accumulated
        let inp = v(inp_buf, 5, n * cc);
        let a = |id| k.all(id);
        let (vb, vdb) = if bias { (Some(a(b)), Some(a(db))) } else { (None, None) };
        let fwd = Kernel::MatmulForward { out: a(out), inp, weight: a(w), bias: vb, n, c: cc, oc };
        let bwd = Kernel::MatmulBackward { dinp: a(dinp), dweight: a(dw), dbias: vdb, dout: a(dout), inp, weight: a(w), n, c: cc, oc };
        k.launch(fwd);
        k.launch(bwd);
        let tol = 1e-5 * (n.max(cc).max(oc) as f32).sqrt() * 4.0;
        for id in [out, dinp, dw, db] {
            k.check(id, tol, 1e-4);
        }
        all.push(k);
    }
}

/// Attention forward + backward on qkv at offset 1 (out/lse zeroed, dqkv overwritten).
fn attention_offset(r: &mut Rng, b: usize, t: usize, c: usize, nh: usize) -> Build {
    let mut k = Build::new(format!("attention b={b} t={t} c={c} nh={nh} hs={} (qkv at offset 1)", c / nh));
    let n = b * t;
    let qkv = k.f("qkv", r.vec(n * 3 * c + 1, -2.0, 2.0));
    let out = k.f("out", vec![0.0; n * c]);
    let lse = k.f("lse", vec![0.0; b * nh * t]);
    let dout = k.f("dout", r.vec(n * c, -1.0, 1.0));
    let dqkv = k.f("dqkv", r.vec(n * 3 * c, -1.0, 1.0));
    k.launch(Kernel::AttentionForward { out: v(out, 0, n * c), lse: v(lse, 0, b * nh * t), qkv: v(qkv, 1, n * 3 * c), b, t, c, nh });
    k.launch(Kernel::AttentionBackward {
        dqkv: v(dqkv, 0, n * 3 * c), dout: v(dout, 0, n * c), out: v(out, 0, n * c), lse: v(lse, 0, b * nh * t), qkv: v(qkv, 1, n * 3 * c),
        b, t, c, nh,
    });
    k.check(out, 1e-5, 1e-4);
    k.check(lse, 1e-5, 1e-5);
    k.check(dqkv, 2e-5, 1e-4);
    k
}

fn attention_cases(all: &mut Vec<Build>) {
    let mut r = Rng(4);
    for (b, t, c, nh) in [(B, T, C, 6), (B, T, 128, 2), (1, 130, 64, 1), (3, 1, 32, 2), (2, 19, 50, 2)] {
        all.push(attention_offset(&mut r, b, t, c, nh));
    }
    // the qkv of one sequence is 43 KB: chunked by batch under 64 KiB bindings
    all.push(attention_offset(&mut Rng(8), 4, 37, 96, 6).tag(SPLIT_BINDINGS));
    // head sizes 8, 64, 96 and 128 (the largest, over 48 KiB of CUDA shared memory), one token
    for (b, t, c, nh) in [(2, 37, 24, 3), (1, 70, 128, 2), (2, 33, 192, 2), (1, 65, 256, 2), (1, 1, 16, 1)] {
        let mut r = Rng(100 + t as u64);
        let mut k = Build::new(format!("attention b={b} t={t} c={c} nh={nh} hs={}", c / nh));
        let qkv = k.f("qkv", r.sym_vec(b * t * 3 * c, 1.5));
        let out = k.f("out", vec![0.0; b * t * c]);
        let lse = k.f("lse", vec![0.0; b * nh * t]);
        let dout = k.f("dout", r.sym_vec(b * t * c, 1.0));
        let dqkv = k.f("dqkv", r.sym_vec(b * t * 3 * c, 1.0)); // overwritten
        let a = |id| k.all(id);
        let fwd = Kernel::AttentionForward { out: a(out), lse: a(lse), qkv: a(qkv), b, t, c, nh };
        let bwd = Kernel::AttentionBackward { dqkv: a(dqkv), dout: a(dout), out: a(out), lse: a(lse), qkv: a(qkv), b, t, c, nh };
        k.launch(fwd);
        k.launch(bwd);
        for id in [out, lse, dqkv] {
            k.check(id, 2e-5, 2e-4);
        }
        all.push(k);
    }
}

/// One cached (decoding) forward step over `rows` = (slot, pos, token): the encoder at those
/// positions, the KV append and attention over the cache. The caches start full of values (earlier
/// positions), two rows of one slot at consecutive positions check that a row sees the row
/// appended beside it (prefill), and the last slot is the spare that padding rows write into.
fn decode_case(r: &mut Rng, name: &str, slots: usize, tmax: usize, c: usize, nh: usize, rows: &[(i32, i32, i32)]) -> Build {
    let n = rows.len();
    let vocab = 300;
    let mut k = Build::new(format!("decode {name}: slots={slots} tmax={tmax} c={c} nh={nh} hs={} rows={n}", c / nh));
    let tok = k.i("tokens", rows.iter().map(|r| r.2).collect());
    let pos = k.i("pos", rows.iter().map(|r| r.1).collect());
    let slot = k.i("slots", rows.iter().map(|r| r.0).collect());
    let wte = k.f("wte", r.sym_vec(vocab * c, 1.0));
    let wpe = k.f("wpe", r.sym_vec(tmax * c + 3, 0.5));
    let x = k.f("x", vec![0.0; n * c + 5]);
    let qkv = k.f("qkv", r.sym_vec(n * 3 * c + 1, 1.5));
    let kc = k.f("kcache", r.sym_vec(slots * tmax * c, 1.5));
    let vc = k.f("vcache", r.sym_vec(slots * tmax * c, 1.5));
    let out = k.f("out", r.sym_vec(n * c, 1.0)); // overwritten
    let (vt, vpos, vs) = (k.all(tok), k.all(pos), k.all(slot));
    let (vkc, vvc) = (k.all(kc), k.all(vc));
    k.launch(Kernel::EncoderAt { out: v(x, 5, n * c), tokens: vt, pos: vpos, wte: k.all(wte), wpe: v(wpe, 3, tmax * c), n, c });
    let vq = v(qkv, 1, n * 3 * c);
    k.launch(Kernel::KvStore { kcache: vkc, vcache: vvc, qkv: vq, slots: vs, pos: vpos, n, c, tmax });
    k.launch(Kernel::AttentionCached { out: k.all(out), qkv: vq, kcache: vkc, vcache: vvc, slots: vs, pos: vpos, n, c, nh, tmax });
    k.check(x, 1e-7, 1e-6);
    k.check(kc, 0.0, 0.0);
    k.check(vc, 0.0, 0.0);
    k.check(out, 2e-5, 2e-4);
    k
}

/// Inference with f16 weights: the matmul forward and the cached encoder reading f16 weights
/// (f32 activations, bias and accumulation). The data are rounded to f16 when stored, so the
/// float64 reference sees the same weights.
fn f16_weight_cases(all: &mut Vec<Build>) {
    let mut r = Rng(91);
    // (n, c, oc, bias, offset of inp and weight): unaligned views take a backend's scalar path,
    // aligned ones its tiled kernels; the long-k and the large one also run split along k and
    // under 64 KiB bindings
    let shapes = [
        (1, 768, 2304, true, 1, ""), (8, 96, 1536, false, 1, ""), (5, 37, 131, true, 1, ""), (33, 64, 256, true, 1, ""),
        (74, 96, 384, true, 1, ""), (8, 768, 2304, true, 0, SPLIT_BINDINGS), (74, 96, 384, true, 0, ""),
        (40, 1100, 136, true, 0, LONG_K),
    ];
    for (n, cc, oc, bias, off, tag) in shapes {
        let mut k = Build::new(format!("f16 weights: matmul n={n} c={cc} oc={oc} bias={bias} offset={off}"));
        let out = k.f("out", vec![0.0; n * oc]);
        let inp = k.f("inp", r.sym_vec(n * cc + 3 * off, 1.0));
        let w = k.f("weight", r.sym_vec(oc * cc + off, 0.5));
        let b = k.f("bias", r.sym_vec(oc, 0.5));
        k.launch(Kernel::MatmulForward {
            out: k.all(out), inp: v(inp, 3 * off, n * cc), weight: v(w, off, oc * cc), bias: bias.then(|| k.all(b)), n, c: cc, oc,
        });
        k.check(out, 1e-5, 1e-4);
        let k = k.weights(DType::F16);
        all.push(if tag.is_empty() { k } else { k.tag(tag) });
    }
    let mut d = decode_case(&mut r, "f16 weights", 3, 29, 96, 6, &[(0, 0, 5), (1, 28, 299), (2, 3, 17)]);
    d.name = "f16 weights: decode step".into();
    all.push(d.weights(DType::F16));
}

fn decode_cases(all: &mut Vec<Build>) {
    let mut r = Rng(77);
    // batch decode: slots at positions 0, 17 and the last; a prefill pair in slot 1; padding (slot 3)
    let rows = [(0, 0, 5), (1, 7, 299), (1, 8, 0), (2, 40, 17), (3, 0, 1)];
    all.push(decode_case(&mut r, "mixed", 4, 41, 96, 6, &rows));
    // head sizes 8 and 128, one row; a long cache read (position 199 of 200)
    all.push(decode_case(&mut r, "hs8", 2, 23, 24, 3, &[(1, 22, 3)]));
    all.push(decode_case(&mut r, "hs128", 3, 200, 256, 2, &[(2, 199, 7), (0, 3, 8)]));
    // several 256-position tiles (positions 255, 256, 699), an odd C and head size (45, hs 15)
    all.push(decode_case(&mut r, "long", 3, 700, 45, 3, &[(0, 699, 1), (1, 256, 2), (0, 255, 3)]));
    // a whole prefill chunk of one sequence: positions 0..33 of slot 0
    let prefill: Vec<(i32, i32, i32)> = (0..33).map(|p| (0, p, p * 7 % 300)).collect();
    all.push(decode_case(&mut r, "prefill", 2, 37, 64, 4, &prefill));
}

fn elementwise_cases(all: &mut Vec<Build>) {
    // gelu over N·4C + 3 values at offsets, tanh saturation, residual into a new buffer and in place
    let mut r = Rng(5);
    let n = N * 4 * C + 3;
    let mut c = Build::new(format!("gelu+residual n={n} (offsets, in place)"));
    let mut xs = r.vec(n + 1, -6.0, 6.0);
    xs[7] = 30.0; // tanh saturation
    xs[8] = -30.0;
    let x = c.f("x", xs);
    let out = c.f("out", vec![0.0; n]);
    let dout = c.f("dout", r.vec(n, -1.0, 1.0));
    let dinp = c.f("dinp", vec![0.0; n + 2]);
    let a = c.f("a", r.vec(n, -1.0, 1.0));
    let s = c.f("sum", vec![0.0; n]);
    c.launch(Kernel::GeluForward { out: v(out, 0, n), inp: v(x, 1, n), n });
    c.launch(Kernel::GeluBackward { dinp: v(dinp, 2, n), inp: v(x, 1, n), dout: v(dout, 0, n), n });
    c.launch(Kernel::ResidualForward { out: v(s, 0, n), a: v(a, 0, n), b: v(out, 0, n), n });
    // in place: a = a + dout (the same buffer read and written in one launch)
    c.launch(Kernel::ResidualForward { out: v(a, 0, n), a: v(a, 0, n), b: v(dout, 0, n), n });
    c.check(out, 1e-6, 1e-5);
    c.check(dinp, 1e-6, 1e-5);
    c.check(s, 1e-6, 1e-6);
    c.check(a, 0.0, 0.0);
    all.push(c);

    let mut r = Rng(5);
    let n = 1003;
    let mut k = Build::new(format!("gelu+residual n={n}"));
    let x = k.f("x", r.sym_vec(n, 4.0));
    let y = k.f("y", r.sym_vec(n + 2, 1.0));
    let out = k.f("out", vec![0.0; n]);
    let dout = k.f("dout", r.sym_vec(n, 1.0));
    let dinp = k.f("dinp", r.sym_vec(n, 1.0));
    let sum = k.f("sum", vec![0.0; n]);
    let (vx, vy, vout, vdout, vdinp, vsum) = (k.all(x), v(y, 2, n), k.all(out), k.all(dout), k.all(dinp), k.all(sum));
    k.launch(Kernel::GeluForward { out: vout, inp: vx, n });
    k.launch(Kernel::GeluBackward { dinp: vdinp, inp: vx, dout: vdout, n });
    k.launch(Kernel::ResidualForward { out: vsum, a: vx, b: vy, n });
    for id in [out, dinp, sum] {
        k.check(id, 1e-6, 1e-5);
    }
    all.push(k);

    // one launch list replayed five times from its prepared phase: a += b in place
    let mut r = Rng(9);
    let mut c = Build::new("residual in place, replayed ×5").repeat(5);
    let a = c.f("a", r.vec(1000, -1.0, 1.0));
    let b = c.f("b", r.vec(1000, -1.0, 1.0));
    c.launch(Kernel::ResidualForward { out: v(a, 0, 1000), a: v(a, 0, 1000), b: v(b, 0, 1000), n: 1000 });
    c.check(a, 1e-5, 1e-6);
    all.push(c);
}

fn cross_entropy_cases(all: &mut Vec<Build>) {
    // V=1531 of Vp=1536 at offsets; the first launch adds its losses (write_grad), the second
    // overwrites its own and leaves its logits untouched; the seeds sit at unaligned offsets of a
    // scalars-like buffer, as in a graph
    let mut r = Rng(6);
    let mut c = Build::new(format!("crossentropy n={N} v={V} vp={VP} grad+acc and eval (offsets)"));
    let logits = c.f("logits", r.vec(N * VP + 1, -8.0, 8.0));
    let logits2 = c.f("logits_eval", r.vec(N * VP, -8.0, 8.0));
    let losses = c.f("losses", r.vec(N + 1, 0.0, 3.0));
    let losses2 = c.f("losses_eval", r.vec(N, 5.0, 9.0));
    let mut tg = r.ints(N, V);
    tg[0] = (V - 1) as i32;
    tg[1] = 0;
    let targets = c.i("targets", tg);
    let seeds = c.f("seeds", vec![0.25, 1.0 / N as f32, 1.0]);
    c.launch(Kernel::CrossEntropy {
        logits: v(logits, 1, N * VP), losses: v(losses, 1, N), targets: v(targets, 0, N), dloss: v(seeds, 1, 1),
        n: N, v: V, vp: VP, write_grad: true, accumulate: true,
    });
    c.launch(Kernel::CrossEntropy {
        logits: v(logits2, 0, N * VP), losses: v(losses2, 0, N), targets: v(targets, 0, N), dloss: v(seeds, 2, 1),
        n: N, v: V, vp: VP, write_grad: false, accumulate: false,
    });
    c.check(losses, 2e-5, 1e-5);
    c.check(losses2, 2e-5, 1e-5);
    c.check(logits, 1e-8, 1e-4); // dlogits, incl. the zeroed padding
    c.check(logits2, 0.0, 0.0); // untouched
    all.push(c);

    // every write_grad/accumulate combination, a vocabulary of one, a row of one
    let shapes = [
        (5, 37, 40, true, false),
        (5, 37, 40, false, true),
        (3, 5000, 5008, true, true),
        (2, 1, 1, true, false),
        (1, V, VP, false, false),
    ];
    for (n, vv, vp, write_grad, accumulate) in shapes {
        let mut r = Rng(9 + vv as u64);
        let mut k = Build::new(format!("crossentropy n={n} v={vv} vp={vp} grad={write_grad} acc={accumulate}"));
        let logits = k.f("logits", r.sym_vec(n * vp, 3.0));
        // non-zero to start with: accumulate adds to it, otherwise it is overwritten
        let losses = k.f("losses", r.sym_vec(n, 2.0));
        let targets = k.i("targets", r.ints(n, vv));
        let seed = k.f("seed", vec![1.0 / n as f32]);
        let (vl, vls, vt, vd) = (k.all(logits), k.all(losses), k.all(targets), k.all(seed));
        k.launch(Kernel::CrossEntropy { logits: vl, losses: vls, targets: vt, dloss: vd, n, v: vv, vp, write_grad, accumulate });
        k.check(losses, 1e-5, 1e-4);
        k.check(logits, 1e-5, 1e-4);
        all.push(k);
    }
}

use super::adam_scalars as hyper;

/// With a low-precision `dtype`, AdamW updates f32 master weights and rounds them into the
/// parameters, as mixed-precision training does.
fn optimizer_cases(all: &mut Vec<Build>, dtype: DType) {
    let low = dtype != DType::F32;
    // four tensors (the largest 590 KB, one of a single element), norm parts at offset 1, a Zero
    // of part of a buffer; run twice: the second AdamW step starts from the first one's state
    let mut r = Rng(7);
    for max_norm in [0.0f32, 1.0] {
        let mut c = Build::new(format!("norm/clip/adamw 4 tensors max_norm={max_norm} (twice)")).repeat(2);
        let sizes = [VP * C, 3 * C, 1, 7];
        let (mut params, mut grads, mut ms, mut vs, mut masters) = (Vec::new(), Vec::new(), Vec::new(), Vec::new(), Vec::new());
        for (i, &s) in sizes.iter().enumerate() {
            let p = r.vec(s, -1.0, 1.0);
            if low {
                masters.push(c.f(&format!("master{i}"), p.clone()));
            }
            params.push(c.f(&format!("p{i}"), p));
            grads.push(c.f(&format!("g{i}"), r.vec(s, -0.05, 0.05)));
            ms.push(c.f(&format!("m{i}"), r.vec(s, -0.01, 0.01)));
            vs.push(c.f(&format!("v{i}"), r.vec(s, 0.0, 1e-4)));
        }
        let junk = c.f("junk", r.vec(1000, -1.0, 1.0));
        let parts = c.f("parts", vec![5.0; sizes.len() + 1]);
        let hy = c.f("hyper", hyper(1e-3, 0.9, 0.999, 3, 123.0)); // GRAD_SCALE is overwritten by ClipScale
        c.launch(Kernel::Zero { out: v(junk, 3, 900) });
        for (i, &s) in sizes.iter().enumerate() {
            c.launch(Kernel::SumSquares { out: v(parts, 1, sizes.len()), inp: v(grads[i], 0, s), slot: i });
        }
        c.launch(Kernel::ClipScale { hyper: v(hy, 0, Scalars::LEN), parts: v(parts, 1, sizes.len()), max_norm });
        for (i, &s) in sizes.iter().enumerate() {
            c.launch(Kernel::AdamW {
                param: v(params[i], 0, s), master: masters.get(i).map(|&w| v(w, 0, s)), grad: v(grads[i], 0, s), m: v(ms[i], 0, s),
                v: v(vs[i], 0, s), hyper: v(hy, 0, Scalars::LEN), weight_decay: if i == 0 { 0.1 } else { 0.0 },
            });
        }
        for &w in &masters {
            c.check(w, 1e-6, 1e-5);
        }
        c.check(junk, 0.0, 0.0);
        c.check(parts, 1e-6, 2e-5);
        c.check(hy, 1e-7, 2e-5);
        for i in 0..sizes.len() {
            c.check(params[i], 1e-6, 1e-5);
            c.check(ms[i], 1e-9, 1e-5);
            c.check(vs[i], 1e-12, 1e-5);
        }
        all.push(if max_norm > 0.0 { c.tag(SPLIT_BINDINGS) } else { c });
    }
    // one tensor of 100 003, parts with unused slots, clipping off / on / not reached
    for max_norm in [0.0f32, 1.0, 1e6] {
        let mut r = Rng(21);
        let mut k = Build::new(format!("norm/clip/adamw n=100003 max_norm={max_norm}"));
        let n = 100_003;
        let g1 = k.f("g1", r.sym_vec(n, 0.1));
        let g2 = k.f("g2", r.sym_vec(77, 1.0));
        let parts = k.f("parts", vec![9.0; 4]);
        let hy = k.f("hyper", hyper(1e-3, 0.9, 0.95, 3, 0.0));
        let p = k.f("param", r.sym_vec(n, 1.0));
        let m = k.f("m", r.sym_vec(n, 0.01));
        let vv = k.f("v", r.sym_vec(n, 1e-4).iter().map(|x| x.abs()).collect());
        let junk = k.f("junk", r.sym_vec(50, 1.0));
        let a = |id| k.all(id);
        let (vg1, vg2, vparts, vhy, vp, vm, vvv, vjunk) = (a(g1), a(g2), a(parts), a(hy), a(p), a(m), a(vv), a(junk));
        k.launch(Kernel::Zero { out: vparts });
        k.launch(Kernel::Zero { out: vjunk.slice(10, 30) });
        k.launch(Kernel::SumSquares { out: vparts, inp: vg1, slot: 0 });
        k.launch(Kernel::SumSquares { out: vparts, inp: vg2, slot: 2 });
        k.launch(Kernel::ClipScale { hyper: vhy, parts: vparts, max_norm });
        k.launch(Kernel::AdamW { param: vp, master: None, grad: vg1, m: vm, v: vvv, hyper: vhy, weight_decay: 0.1 });
        for id in [parts, hy, junk, p, m, vv] {
            k.check(id, 1e-6, 1e-4);
        }
        all.push(k);
    }
    // fp16 loss scaling: gradients carrying a scale of 1024 are unscaled by ClipScale; then an
    // overflowed gradient (inf) flags FOUND_INF and AdamW leaves everything as it was
    for overflow in [false, true] {
        let mut r = Rng(33);
        let mut k = Build::new(format!("norm/clip/adamw loss scale 1024{}", if overflow { ", overflowed" } else { "" }));
        let n = 1000;
        let mut g = r.sym_vec(n, 0.05 * 1024.0);
        if overflow {
            g[417] = f32::INFINITY;
        }
        let g = k.f("g", g);
        let parts = k.f("parts", vec![0.0; 2]);
        let mut h = hyper(1e-3, 0.9, 0.95, 2, 0.0);
        h[Scalars::LOSS_SCALE] = 1024.0;
        let hy = k.f("hyper", h);
        let p = k.f("param", r.sym_vec(n, 1.0));
        let m = k.f("m", r.sym_vec(n, 0.01));
        let vv = k.f("v", r.sym_vec(n, 1e-4).iter().map(|x| x.abs()).collect());
        let a = |id| k.all(id);
        let (vg, vparts, vhy, vp, vm, vvv) = (a(g), a(parts), a(hy), a(p), a(m), a(vv));
        k.launch(Kernel::SumSquares { out: vparts, inp: vg, slot: 1 });
        k.launch(Kernel::ClipScale { hyper: vhy, parts: vparts, max_norm: 1.0 });
        k.launch(Kernel::AdamW { param: vp, master: None, grad: vg, m: vm, v: vvv, hyper: vhy, weight_decay: 0.1 });
        for id in [parts, hy, p, m, vv] {
            k.check(id, 1e-6, 1e-4);
        }
        all.push(k);
    }
}


/// Kernels feeding each other as in a graph: encoder → layernorm → its backward → encoder
/// backward, cross-entropy over the tokens, the norm of the (590 KB) wte.
fn chain_case(r: &mut Rng) -> Build {
    let mut c = Build::new("encoder→layernorm→backward chain, crossentropy, sum of squares");
    let tok = c.i("tokens", r.ints(N, 300));
    let wte = c.f("wte", r.vec(VP * C, -1.0, 1.0));
    let wpe = c.f("wpe", r.vec(T * C, -1.0, 1.0));
    let x = c.f("x", vec![0.0; N * C]);
    let dwte = c.f("dwte", vec![0.0; VP * C]);
    let dwpe = c.f("dwpe", vec![0.0; T * C]);
    let y = c.f("y", vec![0.0; N * C]);
    let mean = c.f("mean", vec![0.0; N]);
    let rstd = c.f("rstd", vec![0.0; N]);
    let w = c.f("w", r.vec(C, 0.5, 1.5));
    let b = c.f("b", r.vec(C, -0.5, 0.5));
    let dw = c.f("dw", vec![0.0; C]);
    let db = c.f("db", vec![0.0; C]);
    let dx = c.f("dx", vec![0.0; N * C]);
    let logits = c.f("logits", r.vec(N * VP, -4.0, 4.0));
    let losses = c.f("losses", vec![0.0; N]);
    let norm = c.f("norm", vec![0.0; 1]);
    let seed = c.f("seed", vec![0.5]);
    c.launch(Kernel::EncoderForward { out: v(x, 0, N * C), tokens: v(tok, 0, N), wte: v(wte, 0, VP * C), wpe: v(wpe, 0, T * C), b: B, t: T, c: C });
    c.launch(Kernel::LayerNormForward { out: v(y, 0, N * C), mean: v(mean, 0, N), rstd: v(rstd, 0, N), inp: v(x, 0, N * C), weight: v(w, 0, C), bias: v(b, 0, C), n: N, c: C });
    c.launch(Kernel::LayerNormBackward {
        dinp: v(dx, 0, N * C), dweight: v(dw, 0, C), dbias: v(db, 0, C), dout: v(y, 0, N * C), inp: v(x, 0, N * C), weight: v(w, 0, C),
        mean: v(mean, 0, N), rstd: v(rstd, 0, N), n: N, c: C, accumulate: false,
    });
    c.launch(Kernel::EncoderBackward { dwte: v(dwte, 0, VP * C), dwpe: v(dwpe, 0, T * C), dout: v(dx, 0, N * C), tokens: v(tok, 0, N), b: B, t: T, c: C });
    c.launch(Kernel::CrossEntropy {
        logits: v(logits, 0, N * VP), losses: v(losses, 0, N), targets: v(tok, 0, N), dloss: v(seed, 0, 1), n: N, v: V, vp: VP,
        write_grad: true, accumulate: false,
    });
    c.launch(Kernel::SumSquares { out: v(norm, 0, 1), inp: v(wte, 0, VP * C), slot: 0 });
    c.check(x, 0.0, 0.0);
    c.check(y, 1e-5, 1e-5);
    c.check(mean, 1e-6, 1e-5); // (as in the layernorm cases)
    c.check(rstd, 1e-5, 1e-5);
    c.check(dx, 1e-4, 1e-4);
    c.check(dw, 1e-4, 1e-5);
    c.check(db, 1e-4, 1e-5);
    c.check(dwte, 1e-4, 1e-5);
    c.check(dwpe, 1e-4, 1e-5);
    c.check(losses, 2e-5, 1e-5);
    c.check(logits, 1e-8, 1e-4);
    c.check(norm, 0.0, 2e-5);
    c
}

// ---------------------------------------------------------------------------------------------
// running and comparing

/// What a run of the suite did: cases compared, and the reasons cases were not run.
#[derive(Debug, Default)]
pub struct Outcome {
    pub ran: usize,
    pub skipped: Vec<String>,
}

/// Written straight to stderr: libtest's capture (print!/eprint!) would hide it.
fn note(msg: &str) {
    use std::io::Write;
    let _ = writeln!(std::io::stderr().lock(), "{msg}");
}

fn cpu() -> CpuBackend {
    CpuBackend::new(Some(2)).expect("cpu backend")
}

/// Compares `got` with `want` (every checked buffer, tolerances × `tol_scale`) and every other
/// buffer with the initial contents (bit for bit). Appends a report per bad buffer to
/// `failures`; returns the largest |Δ| seen in a checked buffer.
fn compare(case: &Case, who: &str, got: &[Vec<f64>], want: &[Vec<f64>], tol_scale: f64, failures: &mut Vec<String>) -> f64 {
    let init = case.initial();
    let mut worst = 0f64;
    for (i, desc) in case.table.bufs.iter().enumerate() {
        let check = case.checks.iter().find(|c| c.buf.0 as usize == i);
        let (want, rule) = match check {
            Some(c) => (&want[i], Some((c.atol as f64 * tol_scale, c.rtol as f64 * tol_scale))),
            None => (&init[i], None),
        };
        // a 16-bit buffer: both sides round each stored value to the format, and an f32 result
        // and an f64 one near a rounding boundary round to neighbours; so add two units in the
        // last place, relative to the element and (for values that came from cancellation or
        // from rounded intermediates) to the buffer's largest magnitude
        let rule = rule.map(|(atol, rtol)| match low_eps(desc.dtype) {
            Some(eps) => {
                let scale = want.iter().filter(|x| x.is_finite()).fold(0f64, |m, x| m.max(x.abs()));
                (atol + 2.0 * eps * scale, rtol + 2.0 * eps)
            }
            None => (atol, rtol),
        });
        let got = &got[i];
        assert_eq!(got.len(), want.len(), "{}: {} length", case.name, desc.name);
        // how far outside its bound an element is (> 0: it fails)
        let excess = |g: f64, w: f64| -> f64 {
            match rule {
                Some((atol, rtol)) if g.is_finite() && w.is_finite() => (g - w).abs() - (atol + rtol * w.abs()),
                Some(_) if g.is_finite() != w.is_finite() => f64::INFINITY,
                Some(_) => 0.0,
                None if g.to_bits() == w.to_bits() || (g.is_nan() && w.is_nan()) => 0.0,
                None => f64::INFINITY,
            }
        };
        let mut bad = Vec::new();
        let mut count = 0usize;
        let mut worst_bad = (0usize, 0f64);
        for (j, (&g, &w)) in got.iter().zip(want).enumerate() {
            if rule.is_some() && g.is_finite() && w.is_finite() {
                worst = worst.max((g - w).abs());
            }
            let e = excess(g, w);
            if e > 0.0 || e.is_nan() {
                count += 1;
                if bad.len() < 3 {
                    bad.push(j);
                }
                if count == 1 || e > worst_bad.1 {
                    worst_bad = (j, e);
                }
            }
        }
        if count > 0 {
            let rule = match rule {
                Some((atol, rtol)) => format!("|Δ| ≤ {atol:.1e} + {rtol:.1e}·|want|"),
                None => "not an output: must be unchanged".to_string(),
            };
            let show = |j: usize| format!("[{j}] got {} want {} (|Δ| {:.2e})", got[j], want[j], (got[j] - want[j]).abs());
            let first: Vec<String> = bad.iter().map(|&j| show(j)).collect();
            failures.push(format!(
                "{} [{who}]: {}: {count} of {} elements fail ({rule}); worst {}; first {}",
                case.name,
                desc.name,
                got.len(),
                show(worst_bad.0),
                first.join(", ")
            ));
        }
    }
    worst
}

/// The relative rounding step (2^-mantissa bits) of a 16-bit float format; None for f32.
fn low_eps(dtype: DType) -> Option<f64> {
    match dtype {
        DType::F16 => Some(2f64.powi(-10)),
        DType::BF16 => Some(2f64.powi(-7)),
        _ => None,
    }
}

fn summary(what: &str, failures: &[String]) {
    if !failures.is_empty() {
        panic!("{what}: {} failure(s):\n  {}", failures.len(), failures.join("\n  "));
    }
}

/// Which cases can run: both backends have the dtype, and every kernel exists in it. The others
/// are reported (on stderr, "skipped: …") and listed in the outcome.
fn runnable<'a>(cases: &'a [Case], names: &[(&str, &dyn Backend)], out: &mut Outcome) -> Vec<&'a Case> {
    let mut run = Vec::new();
    for dtype in cases.iter().map(|c| c.dtype).collect::<std::collections::BTreeSet<_>>() {
        let of: Vec<&Case> = cases.iter().filter(|c| c.dtype == dtype).collect();
        if let Some((who, _)) = names.iter().find(|(_, b)| !b.precisions().contains(&dtype)) {
            let m = format!("skipped: {dtype} kernel conformance on {}: {who} has no {dtype} kernels ({} cases not run)", names.last().unwrap().1.name(), of.len());
            note(&m);
            out.skipped.push(m);
            continue;
        }
        let mut missing: Vec<&'static str> = Vec::new();
        let mut n_missing = 0;
        for c in of {
            let m = c.missing_kernels();
            // a case with buffers of another dtype (f16 weights in an f32 case)
            let lacking = c.table.dtypes().into_iter().find(|d| names.iter().any(|(_, b)| !b.supports(*d)));
            if let Some(d) = lacking.filter(|_| m.is_empty()) {
                let who = names.iter().find(|(_, b)| !b.supports(d)).map_or("", |n| n.0);
                let m = format!("skipped: conformance case '{}': {who} has no {d} buffers", c.name);
                note(&m);
                out.skipped.push(m);
            } else if m.is_empty() {
                run.push(c);
            } else {
                n_missing += 1;
                missing.extend(m);
            }
        }
        if n_missing > 0 {
            missing.sort();
            missing.dedup();
            let m = format!("skipped: {n_missing} {dtype} conformance cases: no {dtype} {} kernels", missing.join("/"));
            note(&m);
            out.skipped.push(m);
        }
    }
    run
}

/// The cpu backend against the float64 references, for every case of `cases(dtype)`.
pub fn check_cpu_against_references(dtype: DType) -> Outcome {
    check_cases_against_references(&cases(dtype))
}

/// The cpu backend against the float64 reference of each of `cases`; panics after all of them,
/// listing every buffer outside its tolerance.
pub fn check_cases_against_references(cases: &[Case]) -> Outcome {
    let mut cpu = cpu();
    let mut out = Outcome::default();
    let mut failures = Vec::new();
    let run = runnable(cases, &[("cpu", &cpu as &dyn Backend)], &mut out);
    for case in run {
        let Some(reference) = case.reference else {
            let m = format!("skipped: {}: no float64 reference", case.name);
            note(&m);
            out.skipped.push(m);
            continue;
        };
        let t0 = std::time::Instant::now();
        let got = match case.run_on(&mut cpu) {
            Ok(g) => g,
            Err(e) => {
                failures.push(format!("{} [cpu]: {e}", case.name));
                continue;
            }
        };
        let want = reference(case);
        let worst = compare(case, "cpu vs f64", &got, &want, 1.0, &mut failures);
        out.ran += 1;
        println!("{} ({}): cpu matches the f64 reference (max |Δ| {worst:.1e}, {:.0} ms)", case.name, case.dtype, t0.elapsed().as_secs_f64() * 1e3);
    }
    summary("cpu against the float64 references", &failures);
    out
}

/// `backend` against a fresh cpu backend on every case of `cases(dtype)`, tolerances ×
/// `tol_scale`; panics after all cases, listing every buffer outside its tolerance.
pub fn check_against_cpu(backend: &mut dyn Backend, dtype: DType, tol_scale: f32) -> Outcome {
    check_cases_against_cpu(backend, &cases(dtype), tol_scale, "")
}

/// `backend` against a fresh cpu backend on each of `cases` (a selection of [`cases`]);
/// `what` is added to the report (a backend mode, say).
pub fn check_cases_against_cpu(backend: &mut dyn Backend, cases: &[Case], tol_scale: f32, what: &str) -> Outcome {
    let mut cpu = cpu();
    let mut out = Outcome::default();
    let mut failures = Vec::new();
    let name = backend.name();
    let who = if what.is_empty() { name.clone() } else { format!("{name}, {what}") };
    let run = runnable(cases, &[("cpu", &cpu as &dyn Backend), ("the backend under test", &*backend)], &mut out);
    let t_all = std::time::Instant::now();
    for case in run {
        let want = case.run_on(&mut cpu).unwrap_or_else(|e| panic!("{}: the cpu backend failed: {e}", case.name));
        let t0 = std::time::Instant::now();
        let got = match case.run_on(backend) {
            Ok(g) => g,
            Err(e) => {
                failures.push(format!("{} [{who}]: {e}", case.name));
                continue;
            }
        };
        let ms = t0.elapsed().as_secs_f64() * 1e3;
        let before = failures.len();
        let worst = compare(case, &who, &got, &want, tol_scale as f64, &mut failures);
        out.ran += 1;
        if failures.len() == before {
            println!("{} ({}): {who} matches cpu (max |Δ| {worst:.1e}, {ms:.0} ms)", case.name, case.dtype);
        }
    }
    if out.ran > 0 {
        println!("{} {} cases on {who} in {:.1} s", out.ran, cases[0].dtype, t_all.elapsed().as_secs_f64());
    }
    summary(&format!("{who} against cpu"), &failures);
    out
}
