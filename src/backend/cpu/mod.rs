//! The cpu backend: executes launches with the plain kernels of `kernels.rs`, inside its own rayon
//! thread pool. It is the numerical reference for the other backends and the fallback when no GPU
//! is present.
//!
//! Each buffer of the [`BufferTable`] is one `Vec` (f32, or i32 for `DType::I32`). For a launch,
//! the buffers it writes are moved out of the table (`std::mem::take`) and split into disjoint
//! `&mut` output views and the read-only gaps between them. An input view that overlaps an output
//! is copied first (so it reads the values from before the launch); every other input is
//! borrowed. No unsafe aliasing. Views, dtypes and sizes were checked by `graph::validate` when
//! the phase was prepared; token/target ids, which are data on the host here, are checked
//! against the rows they index before a kernel runs, so even a batch uploaded around `Session`'s
//! check is an `Err`, never a panic.

pub mod kernels;
mod matmul;
pub mod simd;

use crate::backend::{Backend, Prepared, RawBuffer};
use crate::error::{Error, Result};
use crate::graph::{check_token_ids, signature::overlaps, BufId, BufferTable, DType, Kernel, Launch, View};
use std::borrow::Cow;

/// One allocated buffer.
enum Buf {
    F32(Vec<f32>),
    I32(Vec<i32>),
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
    table: BufferTable,
    /// prepared phases (their launches, already validated)
    phases: Vec<Option<Vec<Launch>>>,
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
        Ok(CpuBackend { pool, bufs: Vec::new(), table: BufferTable::default(), phases: Vec::new() })
    }

    /// Number of worker threads.
    pub fn threads(&self) -> usize {
        self.pool.current_num_threads()
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
        self.table.try_get(id).map(|d| d.name.as_str()).unwrap_or("?")
    }

    /// Executes one launch.
    fn run_one(&mut self, launch: &Launch) -> Result<()> {
        let label = launch.label.as_str();
        let k = &launch.kernel;
        let outs = k.outputs();
        let ins = k.inputs();
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
        let result = self.exec_taken(k, &outs, &ins, &mut taken);
        for (id, mut vec) in taken {
            let dtype = self.table.get(id).dtype;
            for v in outs.iter().filter(|v| v.buf == id) {
                round_to(dtype, &mut vec[v.offset..v.offset + v.len]);
            }
            self.bufs[id.0 as usize] = Buf::F32(vec);
        }
        result
    }

    fn exec_taken(
        &self, k: &Kernel, outs: &[View], ins: &[View], taken: &mut [(BufId, Vec<f32>)],
    ) -> Result<()> {
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
        for (v, n, bound, what) in k.id_bounds() {
            let Buf::I32(b) = &self.bufs[v.buf.0 as usize] else { continue };
            if let Err((i, bad)) = check_token_ids(&b[v.offset..v.offset + n], bound) {
                return Err(Error::Data(format!(
                    "launch '{label}': {what} id {bad} at position {i} of '{}' is outside [0, {bound})",
                    self.buf_name(v.buf)
                )));
            }
        }
        Ok(())
    }
}

/// Rounds f32 values to the nearest value of `dtype` (f16, bf16: round to nearest even, as
/// a GPU's conversion on store does; nothing for f32).
fn round_to(dtype: DType, x: &mut [f32]) {
    use rayon::prelude::*;
    match dtype {
        DType::F16 => x.par_chunks_mut(1 << 14).for_each(|c| c.iter_mut().for_each(|v| *v = half::f16::from_f32(*v).to_f32())),
        DType::BF16 => x.par_chunks_mut(1 << 14).for_each(|c| c.iter_mut().for_each(|v| *v = half::bf16::from_f32(*v).to_f32())),
        DType::F32 | DType::I32 => {}
    }
}

/// A `&mut` slice given up as a shared one, keeping its lifetime.
fn freeze(s: &mut [f32]) -> &[f32] {
    s
}

fn taken_has(gaps: &[(BufId, usize, &[f32])], id: BufId) -> bool {
    gaps.iter().any(|(g, _, _)| *g == id)
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
        Kernel::EncoderAt { n, c, .. } => kn::encoder_at(o[0], i[0].i32(), i[1].i32(), i[2].f32(), i[3].f32(), *n, *c),
        Kernel::KvStore { n, c, tmax, .. } => {
            let [kc, vc] = o else { unreachable!() };
            kn::kv_store(kc, vc, i[0].f32(), i[1].i32(), i[2].i32(), *n, *c, *tmax)
        }
        Kernel::AttentionCached { n, c, nh, tmax, .. } => {
            kn::attention_cached(o[0], i[0].f32(), i[1].f32(), i[2].f32(), i[3].i32(), i[4].i32(), *n, *c, *nh, *tmax)
        }
        Kernel::GeluForward { n, .. } => kn::gelu_forward(&mut o[0][..*n], &i[0].f32()[..*n]),
        Kernel::GeluBackward { n, .. } => kn::gelu_backward(&mut o[0][..*n], &i[0].f32()[..*n], &i[1].f32()[..*n]),
        Kernel::ResidualForward { n, .. } => kn::residual_forward(&mut o[0][..*n], &i[0].f32()[..*n], &i[1].f32()[..*n]),
        Kernel::CrossEntropy { n, v, vp, write_grad: true, accumulate, .. } => {
            let [logits, losses] = o else { unreachable!() };
            kn::cross_entropy(logits, losses, i[0].i32(), *n, *v, *vp, i[1].f32()[0], true, *accumulate)
        }
        Kernel::CrossEntropy { n, v, vp, accumulate, .. } => {
            kn::cross_entropy_loss(i[0].f32(), o[0], i[1].i32(), *n, *v, *vp, *accumulate)
        }
        Kernel::Zero { .. } => kn::zero(o[0]),
        Kernel::SumSquares { slot, .. } => o[0][*slot] = kn::sum_squares(i[0].f32()),
        Kernel::ClipScale { max_norm, .. } => kn::clip_scale(o[0], i[0].f32(), *max_norm),
        Kernel::AdamW { weight_decay, master: None, .. } => {
            let [param, m, v] = o else { unreachable!() };
            kn::adamw(param, i[0].f32(), m, v, i[1].f32(), *weight_decay);
        }
        Kernel::AdamW { weight_decay, master: Some(_), .. } => {
            // the update on the f32 master; the parameters get its values (rounded on store)
            let [param, master, m, v] = o else { unreachable!() };
            if kn::adamw(master, i[0].f32(), m, v, i[1].f32(), *weight_decay) {
                param.copy_from_slice(master);
            }
        }
    }
}

impl Backend for CpuBackend {
    fn name(&self) -> String {
        format!("cpu ({} threads, {})", self.threads(), simd::simd_name())
    }

    fn kind(&self) -> crate::backend::BackendKind {
        crate::backend::BackendKind::Cpu
    }

    fn runs_on_host_cores(&self) -> bool {
        true
    }

    /// f16 and bf16 buffers are kept as f32 holding exactly the values of that format: rounded
    /// on upload and after every launch that writes them (`round_outputs`), so a kernel reading
    /// them computes what a GPU kernel that loads 16-bit values, computes in f32 and stores 16
    /// bits computes: the reference for every precision, not a faster path.
    fn supports(&self, dtype: DType) -> bool {
        matches!(dtype, DType::F32 | DType::F16 | DType::BF16 | DType::I32)
    }

    fn precisions(&self) -> &'static [DType] {
        &[DType::F32, DType::F16, DType::BF16]
    }

    fn alloc(&mut self, table: &BufferTable) -> Result<()> {
        self.check_dtypes(table)?;
        self.bufs = table
            .iter()
            .map(|(_, d)| match d.dtype {
                DType::I32 => Buf::I32(vec![0; d.len]),
                _ => Buf::F32(vec![0.0; d.len]),
            })
            .collect();
        self.table = table.clone();
        self.phases.clear();
        Ok(())
    }

    fn table(&self) -> &BufferTable {
        &self.table
    }

    /// Host bytes of the buffers: 4 per element, since f16 and bf16 are held as rounded f32
    /// (so a 16-bit buffer takes twice what the plan, which counts device bytes, says).
    fn allocated_bytes(&self) -> Option<u64> {
        Some(self.bufs.iter().map(|b| 4 * match b { Buf::F32(v) => v.len(), Buf::I32(v) => v.len() } as u64).sum())
    }

    fn upload_bytes(&mut self, id: BufId, bytes: &[u8]) -> Result<()> {
        let dtype = self.table.get(id).dtype;
        match &mut self.bufs[id.0 as usize] {
            Buf::F32(v) if dtype == DType::F16 => {
                for (x, h) in v.iter_mut().zip(bytes.chunks_exact(2)) {
                    *x = half::f16::from_le_bytes([h[0], h[1]]).to_f32();
                }
            }
            Buf::F32(v) if dtype == DType::BF16 => {
                for (x, h) in v.iter_mut().zip(bytes.chunks_exact(2)) {
                    *x = half::bf16::from_le_bytes([h[0], h[1]]).to_f32();
                }
            }
            Buf::F32(v) => bytemuck::cast_slice_mut(v).copy_from_slice(bytes),
            Buf::I32(v) => bytemuck::cast_slice_mut(v).copy_from_slice(bytes),
        }
        Ok(())
    }

    fn download_bytes(&mut self, view: View) -> Result<Vec<u8>> {
        let r = view.offset..view.offset + view.len;
        let dtype = self.table.get(view.buf).dtype;
        Ok(match &self.bufs[view.buf.0 as usize] {
            Buf::F32(v) if dtype == DType::F16 => v[r].iter().flat_map(|&x| half::f16::from_f32(x).to_le_bytes()).collect(),
            Buf::F32(v) if dtype == DType::BF16 => v[r].iter().flat_map(|&x| half::bf16::from_f32(x).to_le_bytes()).collect(),
            Buf::F32(v) => bytemuck::cast_slice(&v[r]).to_vec(),
            Buf::I32(v) => bytemuck::cast_slice(&v[r]).to_vec(),
        })
    }

    fn prepare_valid(&mut self, launches: &[Launch]) -> Result<Prepared> {
        self.phases.push(Some(launches.to_vec()));
        Ok(Prepared(self.phases.len() - 1))
    }

    fn run_prepared(&mut self, phase: Prepared) -> Result<()> {
        let launches = self.phases.get_mut(phase.0).and_then(Option::take).ok_or_else(|| stale(phase))?;
        let r = launches.iter().try_for_each(|l| self.run_one(l));
        self.phases[phase.0] = Some(launches);
        r
    }

    fn release(&mut self, phase: Prepared) {
        if let Some(p) = self.phases.get_mut(phase.0) {
            *p = None;
        }
    }

    fn sync(&mut self) -> Result<()> {
        Ok(())
    }

    fn profile_valid(&mut self, launches: &[Launch]) -> Result<crate::backend::Profile> {
        let mut ms = Vec::with_capacity(launches.len());
        for l in launches {
            let t0 = std::time::Instant::now();
            self.run_one(l)?;
            ms.push(t0.elapsed().as_secs_f64() * 1e3);
        }
        Ok(crate::backend::Profile { ms, clock: "wall clock" })
    }

    fn raw_buffer(&mut self, id: BufId) -> Result<RawBuffer<'_>> {
        if let Some(d) = self.table.try_get(id).filter(|d| matches!(d.dtype, DType::F16 | DType::BF16)) {
            return Err(Error::Internal(format!("raw_buffer: the cpu backend keeps {} buffers as f32", d.dtype)));
        }
        let b = self.bufs.get_mut(id.0 as usize).ok_or_else(|| Error::Internal(format!("raw_buffer: unknown buffer id {}", id.0)))?;
        Ok(RawBuffer::Host(match b {
            Buf::F32(v) => bytemuck::cast_slice_mut(v),
            Buf::I32(v) => bytemuck::cast_slice_mut(v),
        }))
    }
}

fn stale(phase: Prepared) -> Error {
    Error::Internal(format!("prepared phase #{} is not on this backend (released, or before the last alloc)", phase.0))
}
