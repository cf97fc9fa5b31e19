//! The cpu backend: executes launches with the plain kernels of `kernels.rs`, inside its own rayon
//! thread pool. It is the numerical reference for the other backends and the fallback when no GPU
//! is present.
//!
//! Each buffer of the [`BufferTable`] is one `Vec` (f32, or i32 for `DType::I32`). For a launch,
//! the buffers it writes are moved out of the table (`std::mem::take`) and split into disjoint
//! `&mut` output views and the read-only gaps between them. An input view that overlaps an output
//! is copied first (so it reads the values from before the launch); every other input is
//! borrowed. No unsafe aliasing. Views are bounds- and dtype-checked, sizes are checked against
//! the kernel's arguments, and token/target ids against the table they index, before any kernel
//! runs: a bad launch is an `Err`, never a panic.

pub mod kernels;
mod matmul;
pub mod simd;

use crate::backend::Backend;
use crate::error::{Error, Result};
use crate::graph::{BufId, BufferTable, DType, Hyper, Kernel, Launch, View};
use std::borrow::Cow;

/// One allocated buffer.
enum Buf {
    F32(Vec<f32>),
    I32(Vec<i32>),
}

impl Buf {
    fn len(&self) -> usize {
        match self {
            Buf::F32(v) => v.len(),
            Buf::I32(v) => v.len(),
        }
    }
}

/// A read-only view of a launch: borrowed from the table, or copied when it aliases an output.
enum In<'a> {
    F32(Cow<'a, [f32]>),
    I32(Cow<'a, [i32]>),
}

impl In<'_> {
    fn f32(&self) -> &[f32] {
        match self {
            In::F32(v) => v,
            In::I32(_) => &[],
        }
    }
    fn i32(&self) -> &[i32] {
        match self {
            In::I32(v) => v,
            In::F32(_) => &[],
        }
    }
}

/// The multithreaded CPU backend.
pub struct CpuBackend {
    pool: rayon::ThreadPool,
    bufs: Vec<Buf>,
    names: Vec<String>,
}

fn err(msg: impl Into<String>) -> Error {
    Error::backend("cpu", msg)
}

impl CpuBackend {
    /// A backend running its kernels on `threads` threads (`None`: one per core).
    pub fn new(threads: Option<usize>) -> Result<Self> {
        let mut b = rayon::ThreadPoolBuilder::new().thread_name(|i| format!("wgpt-cpu-{i}"));
        if let Some(t) = threads {
            if t == 0 {
                return Err(err("the thread count must be at least 1"));
            }
            b = b.num_threads(t);
        }
        let pool = b.build().map_err(|e| err(format!("cannot start the thread pool: {e}")))?;
        Ok(CpuBackend { pool, bufs: Vec::new(), names: Vec::new() })
    }

    /// Number of worker threads.
    pub fn threads(&self) -> usize {
        self.pool.current_num_threads()
    }

    /// Read a whole i32 buffer back.
    pub fn download_i32(&mut self, id: BufId) -> Result<Vec<i32>> {
        match self.buf(id)? {
            Buf::I32(v) => Ok(v.clone()),
            Buf::F32(_) => Err(err(format!("download_i32: buffer '{}' is f32", self.buf_name(id)))),
        }
    }

    /// Borrow a whole f32 buffer without copying.
    pub fn f32_buffer(&self, id: BufId) -> Result<&[f32]> {
        match self.buf(id)? {
            Buf::F32(v) => Ok(v),
            Buf::I32(_) => Err(err(format!("buffer '{}' is i32, not f32", self.buf_name(id)))),
        }
    }

    fn buf(&self, id: BufId) -> Result<&Buf> {
        self.bufs.get(id.0 as usize).ok_or_else(|| err(format!("unknown buffer id {} (alloc not called?)", id.0)))
    }

    fn buf_name(&self, id: BufId) -> &str {
        self.names.get(id.0 as usize).map(String::as_str).unwrap_or("?")
    }

    /// Checks that a view lies inside its buffer and has the dtype the kernel expects.
    fn check_view(&self, label: &str, what: &str, v: &View, dtype: DType) -> Result<()> {
        let b = self
            .bufs
            .get(v.buf.0 as usize)
            .ok_or_else(|| err(format!("launch '{label}': {what} names unknown buffer id {}", v.buf.0)))?;
        let end = v.offset.checked_add(v.len);
        if end.is_none_or(|e| e > b.len()) {
            return Err(err(format!(
                "launch '{label}': {what} view [{}, +{}) exceeds buffer '{}' of {} elements",
                v.offset,
                v.len,
                self.buf_name(v.buf),
                b.len()
            )));
        }
        let ok = matches!((b, dtype), (Buf::F32(_), DType::F32) | (Buf::I32(_), DType::I32));
        if !ok {
            return Err(err(format!(
                "launch '{label}': {what} must be {dtype:?} but buffer '{}' is not",
                self.buf_name(v.buf)
            )));
        }
        Ok(())
    }

    /// Executes one launch.
    fn run_one(&mut self, launch: &Launch) -> Result<()> {
        let label = launch.label.as_str();
        let k = &launch.kernel;
        let outs = k.outputs();
        let ins = k.inputs();
        let in_types = input_dtypes(k);
        debug_assert_eq!(in_types.len(), ins.len());
        for (i, v) in outs.iter().enumerate() {
            self.check_view(label, &format!("output {i}"), v, DType::F32)?;
        }
        for (i, (v, &t)) in ins.iter().zip(&in_types).enumerate() {
            self.check_view(label, &format!("input {i}"), v, t)?;
        }
        check_sizes(label, k)?;
        self.check_ids(label, k)?;

        // Move every written buffer out of the table (each once).
        let mut taken: Vec<(BufId, Vec<f32>)> = Vec::new();
        for v in &outs {
            if !taken.iter().any(|(id, _)| *id == v.buf) {
                let slot = &mut self.bufs[v.buf.0 as usize];
                let Buf::F32(vec) = slot else { unreachable!("checked f32") };
                taken.push((v.buf, std::mem::take(vec)));
            }
        }
        let result = self.exec_taken(label, k, &outs, &ins, &mut taken);
        for (id, vec) in taken {
            self.bufs[id.0 as usize] = Buf::F32(vec);
        }
        result
    }

    fn exec_taken(
        &self, label: &str, k: &Kernel, outs: &[View], ins: &[View], taken: &mut [(BufId, Vec<f32>)],
    ) -> Result<()> {
        let overlaps = |a: &View, b: &View| {
            a.buf == b.buf && a.len > 0 && b.len > 0 && a.offset < b.offset + b.len && b.offset < a.offset + a.len
        };
        for (x, a) in outs.iter().enumerate() {
            if outs[x + 1..].iter().any(|b| overlaps(a, b)) {
                return Err(err(format!("launch '{label}': two outputs overlap in buffer '{}'", self.buf_name(a.buf))));
            }
        }
        // An input that overlaps an output is copied first, so it reads the values from before the
        // launch; any other input is borrowed (from the table, or from a gap between the outputs
        // of a taken buffer).
        let mut copies: Vec<Option<Vec<f32>>> = ins
            .iter()
            .map(|v| {
                if !outs.iter().any(|o| overlaps(o, v)) {
                    return None;
                }
                let (_, vec) = taken.iter().find(|(id, _)| *id == v.buf).expect("output buffers are taken");
                Some(vec[v.offset..v.offset + v.len].to_vec())
            })
            .collect();
        // Split each taken buffer into its output slices and the read-only gaps between them.
        let mut slices: Vec<Option<&mut [f32]>> = (0..outs.len()).map(|_| None).collect();
        let mut gaps: Vec<(BufId, usize, &[f32])> = Vec::new();
        for (id, vec) in taken.iter_mut() {
            let mut mine: Vec<usize> = (0..outs.len()).filter(|&i| outs[i].buf == *id).collect();
            mine.sort_by_key(|&i| (outs[i].offset, outs[i].len));
            let mut rest: &mut [f32] = vec.as_mut_slice();
            let mut pos = 0usize;
            for &i in &mine {
                let v = outs[i];
                let (gap, tail) = std::mem::take(&mut rest).split_at_mut(v.offset - pos);
                gaps.push((*id, pos, freeze(gap)));
                let (s, tail) = tail.split_at_mut(v.len);
                rest = tail;
                pos = v.offset + v.len;
                slices[i] = Some(s);
            }
            gaps.push((*id, pos, freeze(rest)));
        }
        let mut inputs: Vec<In> = Vec::with_capacity(ins.len());
        for (j, v) in ins.iter().enumerate() {
            let r = v.offset..v.offset + v.len;
            if let Some(c) = copies[j].take() {
                inputs.push(In::F32(Cow::Owned(c)));
            } else if taken_has(&gaps, v.buf) {
                let (_, start, gap) = gaps
                    .iter()
                    .find(|(id, start, g)| *id == v.buf && *start <= v.offset && v.offset + v.len <= start + g.len())
                    .expect("an input not overlapping any output lies in a gap");
                inputs.push(In::F32(Cow::Borrowed(&gap[v.offset - start..v.offset - start + v.len])));
            } else {
                inputs.push(match &self.bufs[v.buf.0 as usize] {
                    Buf::F32(b) => In::F32(Cow::Borrowed(&b[r])),
                    Buf::I32(b) => In::I32(Cow::Borrowed(&b[r])),
                });
            }
        }
        let mut o: Vec<&mut [f32]> = slices.into_iter().map(|s| s.expect("every output sliced")).collect();
        let i = &inputs;
        self.pool.install(|| dispatch(k, &mut o, i));
        Ok(())
    }

    /// Token and target ids must index existing rows; anything else would read out of bounds.
    fn check_ids(&self, label: &str, k: &Kernel) -> Result<()> {
        let ids = |v: &View| -> &[i32] {
            match &self.bufs[v.buf.0 as usize] {
                Buf::I32(b) => &b[v.offset..v.offset + v.len],
                Buf::F32(_) => &[],
            }
        };
        let check = |v: &View, n: usize, limit: usize, what: &str| -> Result<()> {
            if let Some((i, &bad)) = ids(v)[..n].iter().enumerate().find(|(_, &x)| x < 0 || x as usize >= limit) {
                return Err(Error::Data(format!(
                    "launch '{label}': {what} id {bad} at position {i} of '{}' is outside [0, {limit})",
                    self.buf_name(v.buf)
                )));
            }
            Ok(())
        };
        match k {
            Kernel::EncoderForward { tokens, wte, b, t, c, .. } => check(tokens, b * t, wte.len / (*c).max(1), "token"),
            Kernel::EncoderBackward { tokens, dwte, b, t, c, .. } => {
                check(tokens, b * t, dwte.len / (*c).max(1), "token")
            }
            Kernel::CrossEntropy { targets, n, v, .. } => check(targets, *n, *v, "target"),
            _ => Ok(()),
        }
    }
}

/// A `&mut` slice given up as a shared one, keeping its lifetime.
fn freeze(s: &mut [f32]) -> &[f32] {
    s
}

fn taken_has(gaps: &[(BufId, usize, &[f32])], id: BufId) -> bool {
    gaps.iter().any(|(g, _, _)| *g == id)
}

/// The dtype of each entry of `k.inputs()`.
fn input_dtypes(k: &Kernel) -> Vec<DType> {
    use DType::*;
    match k {
        Kernel::EncoderForward { .. } => vec![I32, F32, F32],
        Kernel::EncoderBackward { .. } => vec![F32, I32],
        Kernel::CrossEntropy { write_grad: true, .. } => vec![I32],
        Kernel::CrossEntropy { write_grad: false, .. } => vec![F32, I32],
        other => vec![F32; other.inputs().len()],
    }
}

/// Checks every view is long enough for the kernel's size arguments.
fn check_sizes(label: &str, k: &Kernel) -> Result<()> {
    let need = |what: &str, v: &View, n: usize| -> Result<()> {
        if v.len < n {
            Err(err(format!("launch '{label}': {what} has {} elements, needs {n}", v.len)))
        } else {
            Ok(())
        }
    };
    match k {
        Kernel::EncoderForward { out, tokens, wte, wpe, b, t, c } => {
            need("out", out, b * t * c)?;
            need("tokens", tokens, b * t)?;
            need("wte", wte, *c)?;
            need("wpe", wpe, t * c)
        }
        Kernel::EncoderBackward { dwte, dwpe, dout, tokens, b, t, c } => {
            need("dwte", dwte, *c)?;
            need("dwpe", dwpe, t * c)?;
            need("dout", dout, b * t * c)?;
            need("tokens", tokens, b * t)
        }
        Kernel::LayerNormForward { out, mean, rstd, inp, weight, bias, n, c } => {
            need("out", out, n * c)?;
            need("mean", mean, *n)?;
            need("rstd", rstd, *n)?;
            need("inp", inp, n * c)?;
            need("weight", weight, *c)?;
            need("bias", bias, *c)
        }
        Kernel::LayerNormBackward { dinp, dweight, dbias, dout, inp, weight, mean, rstd, n, c, .. } => {
            need("dinp", dinp, n * c)?;
            need("dweight", dweight, *c)?;
            need("dbias", dbias, *c)?;
            need("dout", dout, n * c)?;
            need("inp", inp, n * c)?;
            need("weight", weight, *c)?;
            need("mean", mean, *n)?;
            need("rstd", rstd, *n)
        }
        Kernel::MatmulForward { out, inp, weight, bias, n, c, oc } => {
            need("out", out, n * oc)?;
            need("inp", inp, n * c)?;
            need("weight", weight, oc * c)?;
            if let Some(b) = bias {
                need("bias", b, *oc)?;
            }
            Ok(())
        }
        Kernel::MatmulBackward { dinp, dweight, dbias, dout, inp, weight, n, c, oc } => {
            need("dinp", dinp, n * c)?;
            need("dweight", dweight, oc * c)?;
            if let Some(b) = dbias {
                need("dbias", b, *oc)?;
            }
            need("dout", dout, n * oc)?;
            need("inp", inp, n * c)?;
            need("weight", weight, oc * c)
        }
        Kernel::AttentionForward { out, lse, qkv, b, t, c, nh } => {
            if *nh == 0 || !c.is_multiple_of(*nh) {
                return Err(err(format!("launch '{label}': channels {c} not a multiple of heads {nh}")));
            }
            need("out", out, b * t * c)?;
            need("lse", lse, b * nh * t)?;
            need("qkv", qkv, b * t * 3 * c)
        }
        Kernel::AttentionBackward { dqkv, dout, out, lse, qkv, b, t, c, nh } => {
            if *nh == 0 || !c.is_multiple_of(*nh) {
                return Err(err(format!("launch '{label}': channels {c} not a multiple of heads {nh}")));
            }
            need("dqkv", dqkv, b * t * 3 * c)?;
            need("dout", dout, b * t * c)?;
            need("out", out, b * t * c)?;
            need("lse", lse, b * nh * t)?;
            need("qkv", qkv, b * t * 3 * c)
        }
        Kernel::GeluForward { out, inp, n } => {
            need("out", out, *n)?;
            need("inp", inp, *n)
        }
        Kernel::GeluBackward { dinp, inp, dout, n } => {
            need("dinp", dinp, *n)?;
            need("inp", inp, *n)?;
            need("dout", dout, *n)
        }
        Kernel::ResidualForward { out, a, b, n } => {
            need("out", out, *n)?;
            need("a", a, *n)?;
            need("b", b, *n)
        }
        Kernel::CrossEntropy { logits, losses, targets, n, v, vp, .. } => {
            if *v == 0 || v > vp {
                return Err(err(format!("launch '{label}': vocab {v} must be in [1, padded vocab {vp}]")));
            }
            need("logits", logits, n * vp)?;
            need("losses", losses, *n)?;
            need("targets", targets, *n)
        }
        Kernel::Zero { .. } => Ok(()),
        Kernel::SumSquares { out, slot, .. } => need("out", out, slot + 1),
        Kernel::ClipScale { hyper, .. } => need("hyper", hyper, Hyper::LEN),
        Kernel::AdamW { param, grad, m, v, hyper, .. } => {
            need("grad", grad, param.len)?;
            need("m", m, param.len)?;
            need("v", v, param.len)?;
            need("hyper", hyper, Hyper::LEN)
        }
    }
}

/// Calls the kernel function; `o` is in the order of `k.outputs()`, `i` of `k.inputs()`.
fn dispatch(k: &Kernel, o: &mut [&mut [f32]], i: &[In]) {
    use kernels as kn;
    match k {
        Kernel::EncoderForward { b, t, c, .. } => kn::encoder_forward(o[0], i[0].i32(), i[1].f32(), i[2].f32(), *b, *t, *c),
        Kernel::EncoderBackward { b, t, c, .. } => {
            let [dwte, dwpe] = o else { unreachable!() };
            kn::encoder_backward(dwte, dwpe, i[0].f32(), i[1].i32(), *b, *t, *c)
        }
        Kernel::LayerNormForward { n, c, .. } => {
            let [out, mean, rstd] = o else { unreachable!() };
            kn::layernorm_forward(out, mean, rstd, i[0].f32(), i[1].f32(), i[2].f32(), *n, *c)
        }
        Kernel::LayerNormBackward { n, c, accumulate, .. } => {
            let [dinp, dw, db] = o else { unreachable!() };
            kn::layernorm_backward(
                dinp, dw, db, i[0].f32(), i[1].f32(), i[2].f32(), i[3].f32(), i[4].f32(), *n, *c, *accumulate,
            )
        }
        Kernel::MatmulForward { n, c, oc, bias, .. } => {
            let b = bias.map(|_| i[2].f32());
            kn::matmul_forward(o[0], i[0].f32(), i[1].f32(), b, *n, *c, *oc)
        }
        Kernel::MatmulBackward { n, c, oc, .. } => match o {
            [dinp, dw, db] => kn::matmul_backward(dinp, dw, Some(db), i[0].f32(), i[1].f32(), i[2].f32(), *n, *c, *oc),
            [dinp, dw] => kn::matmul_backward(dinp, dw, None, i[0].f32(), i[1].f32(), i[2].f32(), *n, *c, *oc),
            _ => unreachable!(),
        },
        Kernel::AttentionForward { b, t, c, nh, .. } => {
            let [out, lse] = o else { unreachable!() };
            kn::attention_forward(out, lse, i[0].f32(), *b, *t, *c, *nh)
        }
        Kernel::AttentionBackward { b, t, c, nh, .. } => {
            kn::attention_backward(o[0], i[0].f32(), i[1].f32(), i[2].f32(), i[3].f32(), *b, *t, *c, *nh)
        }
        Kernel::GeluForward { n, .. } => kn::gelu_forward(&mut o[0][..*n], &i[0].f32()[..*n]),
        Kernel::GeluBackward { n, .. } => kn::gelu_backward(&mut o[0][..*n], &i[0].f32()[..*n], &i[1].f32()[..*n]),
        Kernel::ResidualForward { n, .. } => kn::residual_forward(&mut o[0][..*n], &i[0].f32()[..*n], &i[1].f32()[..*n]),
        Kernel::CrossEntropy { n, v, vp, dloss, write_grad: true, accumulate, .. } => {
            let [logits, losses] = o else { unreachable!() };
            kn::cross_entropy(logits, losses, i[0].i32(), *n, *v, *vp, *dloss, true, *accumulate)
        }
        Kernel::CrossEntropy { n, v, vp, accumulate, .. } => {
            kn::cross_entropy_loss(i[0].f32(), o[0], i[1].i32(), *n, *v, *vp, *accumulate)
        }
        Kernel::Zero { .. } => kn::zero(o[0]),
        Kernel::SumSquares { slot, .. } => o[0][*slot] = kn::sum_squares(i[0].f32()),
        Kernel::ClipScale { max_norm, .. } => kn::clip_scale(o[0], i[0].f32(), *max_norm),
        Kernel::AdamW { weight_decay, .. } => {
            let [param, m, v] = o else { unreachable!() };
            kn::adamw(param, i[0].f32(), m, v, i[1].f32(), *weight_decay)
        }
    }
}

impl Backend for CpuBackend {
    fn name(&self) -> String {
        format!("cpu ({} threads, {})", self.threads(), simd::simd_name())
    }

    fn alloc(&mut self, table: &BufferTable) -> Result<()> {
        self.bufs = table
            .iter()
            .map(|(_, d)| match d.dtype {
                DType::F32 => Buf::F32(vec![0.0; d.len]),
                DType::I32 => Buf::I32(vec![0; d.len]),
            })
            .collect();
        self.names = table.iter().map(|(_, d)| d.name.clone()).collect();
        Ok(())
    }

    fn upload_f32(&mut self, id: BufId, data: &[f32]) -> Result<()> {
        let name = self.buf_name(id).to_string();
        match self.bufs.get_mut(id.0 as usize) {
            Some(Buf::F32(v)) if v.len() == data.len() => {
                v.copy_from_slice(data);
                Ok(())
            }
            Some(Buf::F32(v)) => Err(err(format!("upload to '{name}': {} values for {} elements", data.len(), v.len()))),
            Some(Buf::I32(_)) => Err(err(format!("upload_f32 to '{name}': the buffer is i32"))),
            None => Err(err(format!("upload: unknown buffer id {}", id.0))),
        }
    }

    fn upload_i32(&mut self, id: BufId, data: &[i32]) -> Result<()> {
        let name = self.buf_name(id).to_string();
        match self.bufs.get_mut(id.0 as usize) {
            Some(Buf::I32(v)) if v.len() == data.len() => {
                v.copy_from_slice(data);
                Ok(())
            }
            Some(Buf::I32(v)) => Err(err(format!("upload to '{name}': {} values for {} elements", data.len(), v.len()))),
            Some(Buf::F32(_)) => Err(err(format!("upload_i32 to '{name}': the buffer is f32"))),
            None => Err(err(format!("upload: unknown buffer id {}", id.0))),
        }
    }

    fn download_f32(&mut self, id: BufId) -> Result<Vec<f32>> {
        self.f32_buffer(id).map(|b| b.to_vec())
    }

    fn download_view(&mut self, view: View) -> Result<Vec<f32>> {
        let b = self.f32_buffer(view.buf)?;
        b.get(view.offset..view.offset + view.len)
            .map(|s| s.to_vec())
            .ok_or_else(|| Error::backend("cpu", format!("view {view:?} is outside its buffer of {} elements", b.len())))
    }

    fn run(&mut self, launches: &[Launch]) -> Result<()> {
        for l in launches {
            self.run_one(l)?;
        }
        Ok(())
    }

    fn sync(&mut self) -> Result<()> {
        Ok(())
    }
}
