//! Launches → dispatches, without a device: which entry point of which shader variant, which
//! buffer ranges are bound, the parameter words, the workgroup grid. Everything a step needs is
//! decided here once (then replayed), including the splitting of any binding larger than the
//! adapter's `max_storage_buffer_binding_size` into several dispatches, and the memory plan.
//!
//! Views are bound as 256-byte-aligned sub-ranges (`min_storage_buffer_offset_alignment`); the
//! remaining element offset (< 64 f32, < 128 f16 elements) travels in the parameter words (`o_*`
//! fields of the shaders). Element sizes, binding sizes and rows per binding come from each
//! buffer's dtype (f16 weights: 2 bytes, so a binding holds twice as many weight rows).

use super::shaders::{attention_tiles, attention_variant, weight_type, Variant};
use crate::error::{Error, Result};
use crate::graph::{BufId, BufferDesc, BufferTable, Kernel, Launch, Scalars, View};

/// What a binding points at.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Target {
    /// a buffer of the graph's table
    Table(BufId),
    /// the backend's per-graph scratch buffer (reduction partials, attention's D, token links)
    Scratch,
    /// a 16-byte placeholder for optional bindings (matmul without bias)
    Dummy,
}

/// One storage binding of a dispatch.
#[derive(Clone, Debug)]
pub struct Bind {
    pub slot: u32,
    pub target: Target,
    /// byte offset (a multiple of the storage offset alignment) and byte size of the bound range
    pub offset: u64,
    pub size: u64,
    /// declared `read_write` in the shader
    pub write: bool,
}

/// Number of 32-bit parameter words every dispatch gets (a 64-byte uniform binding).
pub const PARAM_WORDS: usize = 16;

/// One compute dispatch.
#[derive(Clone, Debug)]
pub struct DispatchDesc {
    pub variant: Variant,
    pub entry: &'static str,
    pub binds: Vec<Bind>,
    pub params: [u32; PARAM_WORDS],
    pub groups: [u32; 3],
    pub label: String,
    /// the index of its launch in the list compiled (a launch may take several dispatches)
    pub launch: usize,
}

/// How matmuls are done on this adapter.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MatmulMode {
    /// 64×64 workgroup tiles staged in workgroup memory, 8×8 per invocation (always available)
    Tiled,
    /// 128×128 tiles with 256 invocations, 8×8 each, for GPUs (64×64 where a matrix is smaller)
    TiledLarge,
    /// A rows shared across lanes with subgroupShuffle, B read directly; 8×8 per invocation
    Subgroup,
}

/// The adapter properties that shape a compiled graph.
#[derive(Clone, Debug)]
pub struct DeviceCaps {
    pub max_binding: u64,
    pub max_buffer: u64,
    pub storage_align: u64,
    pub uniform_align: u64,
    pub max_groups: u32,
    pub workgroup_bytes: u32,
    pub matmul: MatmulMode,
    /// matmuls with fewer output tiles than this (and a long k) are split along k
    pub split_k_target: u32,
}

impl DeviceCaps {
    pub fn from_limits(limits: &wgpu::Limits, matmul: MatmulMode) -> DeviceCaps {
        DeviceCaps {
            max_binding: limits.max_storage_buffer_binding_size.min(limits.max_buffer_size),
            max_buffer: limits.max_buffer_size,
            storage_align: limits.min_storage_buffer_offset_alignment.max(4) as u64,
            uniform_align: limits.min_uniform_buffer_offset_alignment.max(64) as u64,
            max_groups: limits.max_compute_workgroups_per_dimension.max(1),
            workgroup_bytes: limits.max_compute_workgroup_storage_size,
            matmul,
            split_k_target: 512,
        }
    }
}

/// The dispatches of one launch list and the scratch they need.
#[derive(Clone, Debug, Default)]
pub struct Compiled {
    pub dispatches: Vec<DispatchDesc>,
    pub scratch_bytes: u64,
}

/// Memory a graph needs on the device, in bytes.
#[derive(Clone, Debug)]
pub struct MemoryPlan {
    /// the table's buffers
    pub buffer_bytes: u64,
    /// the largest scratch buffer over the phases
    pub scratch_bytes: u64,
    /// parameter words of every dispatch
    pub params_bytes: u64,
    /// read-back staging for the largest buffer
    pub staging_bytes: u64,
    pub total_bytes: u64,
    /// the largest buffer: name and bytes
    pub largest_buffer: (String, u64),
    pub dispatches: usize,
}

impl MemoryPlan {
    /// Err(OutOfMemory) if the plan needs more than `budget` bytes.
    pub fn check_budget(&self, budget: u64) -> Result<()> {
        if self.total_bytes > budget {
            return Err(Error::OutOfMemory(format!(
                "the step needs {} of device memory but {} is available: lower --batch or --seq-len",
                mib(self.total_bytes),
                mib(budget)
            )));
        }
        Ok(())
    }
}

pub fn mib(bytes: u64) -> String {
    format!("{:.1} MiB", bytes as f64 / (1024.0 * 1024.0))
}

/// Device bytes of a table buffer: its dtype's bytes, rounded up to a 4-byte multiple, never 0.
pub fn buffer_bytes(d: &BufferDesc) -> u64 {
    (d.bytes() as u64).div_ceil(4).max(1) * 4
}

/// Checks every buffer against `max_buffer_size`, compiles every phase (which checks and splits
/// the bindings) and totals the memory, before anything is allocated.
pub fn plan_memory(table: &BufferTable, phases: &[&[Launch]], caps: &DeviceCaps) -> Result<MemoryPlan> {
    let mut buffer_total = 0u64;
    let mut largest = (String::new(), 0u64);
    for (_, b) in table.iter() {
        let bytes = buffer_bytes(b);
        if bytes > caps.max_buffer {
            return Err(Error::OutOfMemory(format!(
                "buffer '{}' needs {} but this adapter allows at most {} per buffer (max_buffer_size): \
                 lower --batch or --seq-len",
                b.name,
                mib(bytes),
                mib(caps.max_buffer)
            )));
        }
        buffer_total += bytes;
        if bytes > largest.1 {
            largest = (b.name.clone(), bytes);
        }
    }
    let mut scratch = 0u64;
    let mut params = 0u64;
    let mut dispatches = 0usize;
    for ph in phases {
        // before anything is prepared (this runs from check_fits): the compiler assumes the contract
        crate::graph::validate(table, ph)?;
        let c = compile(table, ph, caps)?;
        scratch = scratch.max(c.scratch_bytes);
        params += c.dispatches.len() as u64 * caps.uniform_align;
        dispatches += c.dispatches.len();
    }
    let staging = largest.1;
    Ok(MemoryPlan {
        buffer_bytes: buffer_total,
        scratch_bytes: scratch,
        params_bytes: params,
        staging_bytes: staging,
        total_bytes: buffer_total + scratch + params + staging,
        largest_buffer: largest,
        dispatches,
    })
}

/// Compiles a launch list into dispatches. The launches must satisfy the kernel contract
/// (`graph::validate`, done by `Backend::prepare` and `plan_memory`).
pub fn compile(table: &BufferTable, launches: &[Launch], caps: &DeviceCaps) -> Result<Compiled> {
    compile_with(table, launches, caps, &[])
}

/// `compile`, with launch i's matmuls in `modes[i]` where it is given (the autotuner's choice)
/// instead of `caps.matmul`.
pub fn compile_with(table: &BufferTable, launches: &[Launch], caps: &DeviceCaps, modes: &[Option<MatmulMode>]) -> Result<Compiled> {
    let mut c = Compiler { table, caps, out: Vec::new(), scratch: 0, label: String::new(), launch: 0, mode: caps.matmul };
    for (i, l) in launches.iter().enumerate() {
        c.label = l.label.clone();
        c.launch = i;
        c.mode = modes.get(i).copied().flatten().unwrap_or(caps.matmul);
        c.launch(&l.kernel).map_err(|e| match e {
            Error::Backend { backend, msg } => Error::Backend { backend, msg: format!("launch '{}': {msg}", l.label) },
            other => other,
        })?;
    }
    Ok(Compiled { dispatches: c.out, scratch_bytes: c.scratch.max(4) })
}

/// A dispatch being assembled.
struct Call {
    variant: Variant,
    entry: &'static str,
    binds: Vec<Bind>,
    params: [u32; PARAM_WORDS],
    groups: [u32; 3],
}

impl Call {
    fn new(family: &'static str, entry: &'static str) -> Call {
        Call { variant: Variant::plain(family), entry, binds: Vec::new(), params: [0; PARAM_WORDS], groups: [1, 1, 1] }
    }
    fn with_variant(variant: Variant, entry: &'static str) -> Call {
        Call { variant, entry, binds: Vec::new(), params: [0; PARAM_WORDS], groups: [1, 1, 1] }
    }
    fn params(&mut self, words: &[u32]) {
        assert!(words.len() <= PARAM_WORDS);
        self.params[..words.len()].copy_from_slice(words);
    }
}

const ELEMWISE_WG: u64 = 256;
/// Cap on grid-stride workgroups (each invocation loops over the rest).
const MAX_STRIDE_GROUPS: u64 = 8192;
/// Rows per block for the column-sum partials (layernorm dweight/dbias, matmul dbias).
const ROW_BLOCK: u64 = 64;

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Layout {
    /// C = A·Bᵀ, A (m,k) and B (n,k) row-major
    Nt,
    /// C = A·B, A (m,k), B (k,n)
    Nn,
    /// C = Aᵀ·B, A (k,m), B (k,n)
    Tn,
}

#[derive(Clone, Copy, Debug)]
struct Operand {
    buf: BufId,
    off: u64,
    ld: u64,
}

struct Compiler<'a> {
    table: &'a BufferTable,
    caps: &'a DeviceCaps,
    out: Vec<DispatchDesc>,
    scratch: u64,
    label: String,
    launch: usize,
    /// the matmul kernels of the launch being compiled
    mode: MatmulMode,
}

fn ceil_div(a: u64, b: u64) -> u64 {
    a.div_ceil(b)
}

fn f(x: f32) -> u32 {
    x.to_bits()
}

impl Compiler<'_> {
    /// 4-byte elements one binding may hold (leaving room for the alignment residual).
    fn max_elems(&self) -> u64 {
        self.max_elems_of(4)
    }

    /// Elements of `elem` bytes one binding may hold (leaving room for the alignment residual).
    fn max_elems_of(&self, elem: u64) -> u64 {
        (self.caps.max_binding / elem).saturating_sub(self.caps.storage_align / elem + 16)
    }

    /// Bytes per element of a table buffer.
    fn elem_bytes(&self, id: BufId) -> u64 {
        self.table.get(id).dtype.size() as u64
    }

    fn oom(&self, what: &str, elems: u64) -> Error {
        self.oom_bytes(what, elems * 4)
    }

    fn oom_bytes(&self, what: &str, bytes: u64) -> Error {
        Error::OutOfMemory(format!(
            "launch '{}': {what} needs a {} binding but this adapter binds at most {} \
             (max_storage_buffer_binding_size): lower --batch or --seq-len",
            self.label,
            mib(bytes),
            mib(self.caps.max_binding)
        ))
    }

    /// Most rows of `row_elems` 4-byte elements one binding holds; an error if not even one.
    fn rows_per_binding(&self, what: &str, row_elems: u64) -> Result<u64> {
        self.rows_per_binding_of(what, row_elems, 4)
    }

    /// Most rows of `row_elems` elements of `elem` bytes one binding holds; an error if not even one.
    fn rows_per_binding_of(&self, what: &str, row_elems: u64, elem: u64) -> Result<u64> {
        let r = self.max_elems_of(elem) / row_elems.max(1);
        if r == 0 {
            return Err(self.oom_bytes(what, row_elems * elem));
        }
        Ok(r)
    }

    /// The element type (`alias` specialisation) a weight-reading shader needs for `v`: an error,
    /// never a misread, for a dtype it cannot read.
    fn weight_type_of(&self, what: &str, v: BufId) -> Result<&'static str> {
        let d = self.table.get(v);
        weight_type(d.dtype).ok_or_else(|| {
            Error::Internal(format!("wgpu compile: {what} '{}' is {}, which no wgpu kernel reads", d.name, d.dtype))
        })
    }

    /// The encoder module for these embedding tables' element types.
    fn encoder_variant(&self, wte: &View, wpe: &View) -> Result<Variant> {
        Ok(Variant::plain("encoder")
            .with_type("WteT", self.weight_type_of("wte", wte.buf)?)
            .with_type("WpeT", self.weight_type_of("wpe", wpe.buf)?))
    }

    /// Bind elements [off, off+len) of `target` at `slot`; returns the residual element offset.
    /// Element sizes come from the table's dtypes (scratch is 4-byte words). Views were checked
    /// by `graph::validate`; the range check here guards this compiler's own chunking.
    fn bind(&self, call: &mut Call, slot: u32, target: Target, off: u64, len: u64, write: bool) -> Result<u32> {
        let align = self.caps.storage_align;
        let elem = match target {
            Target::Table(id) => self.table.get(id).dtype.size() as u64,
            Target::Scratch | Target::Dummy => 4,
        };
        let byte = off * elem;
        let base = byte / align * align;
        let resid = (byte - base) / elem;
        let size = ((resid + len.max(1)) * elem).div_ceil(4).max(4) * 4;
        if let Target::Table(id) = target {
            let d = self.table.get(id);
            let avail = buffer_bytes(d);
            if off + len > d.len as u64 {
                return Err(Error::Internal(format!(
                    "wgpu compile: range [{off}, {}) is outside buffer '{}' of {} elements",
                    off + len,
                    d.name,
                    d.len
                )));
            }
            if size > self.caps.max_binding {
                return Err(self.oom_bytes(&format!("buffer '{}'", d.name), len * elem));
            }
            // the range may extend past the view (to 16 bytes) but never past the buffer
            let size = size.min(avail - base);
            call.binds.push(Bind { slot, target, offset: base, size, write });
        } else {
            call.binds.push(Bind { slot, target, offset: base, size, write });
        }
        Ok(resid as u32)
    }

    /// Bind a whole view.
    fn bind_view(&self, call: &mut Call, slot: u32, v: &View, start: u64, len: u64, write: bool) -> Result<u32> {
        if start + len > v.len as u64 {
            return Err(Error::Internal(format!(
                "wgpu compile: a view of {} elements is too short for [{start}, {})",
                v.len,
                start + len
            )));
        }
        self.bind(call, slot, Target::Table(v.buf), v.offset as u64 + start, len, write)
    }

    /// Bind `elems` 4-byte words of scratch from offset 0.
    fn bind_scratch(&mut self, call: &mut Call, slot: u32, elems: u64, write: bool) -> Result<()> {
        let bytes = (elems.max(4)) * 4;
        if bytes > self.caps.max_binding {
            return Err(self.oom("scratch", elems));
        }
        self.scratch = self.scratch.max(bytes);
        self.bind(call, slot, Target::Scratch, 0, elems.max(4), write)?;
        Ok(())
    }

    fn stride_groups(&self, n: u64, wg: u64) -> [u32; 3] {
        let g = ceil_div(n, wg).clamp(1, MAX_STRIDE_GROUPS.min(self.caps.max_groups as u64));
        [g as u32, 1, 1]
    }

    /// One workgroup per row, folded into 2-D when rows exceed the per-dimension limit.
    fn row_groups(&self, rows: u64) -> [u32; 3] {
        let mx = self.caps.max_groups as u64;
        if rows <= mx {
            [rows.max(1) as u32, 1, 1]
        } else {
            [mx as u32, ceil_div(rows, mx) as u32, 1]
        }
    }

    fn push(&mut self, mut call: Call) {
        // a buffer bound both read-only and writable in one dispatch is a usage conflict in
        // WebGPU: such dispatches use the variant whose storage bindings are all read_write
        let conflict = call.binds.iter().any(|a| {
            a.write && call.binds.iter().any(|b| !b.write && b.target == a.target && matches!(a.target, Target::Table(_)))
        });
        if conflict {
            call.variant.rw = true;
        }
        self.out.push(DispatchDesc {
            variant: call.variant,
            entry: call.entry,
            binds: call.binds,
            params: call.params,
            groups: call.groups,
            label: self.label.clone(),
            launch: self.launch,
        });
    }

    /// Elementwise chunk length: a multiple of 256 that fits a binding.
    fn elem_chunk(&self) -> u64 {
        (self.max_elems() / 256 * 256).max(256)
    }

    /// (start, len) of the elementwise chunks covering `n` elements.
    fn elem_blocks(&self, n: u64) -> impl Iterator<Item = (u64, u64)> {
        let chunk = self.elem_chunk();
        (0..n).step_by(chunk as usize).map(move |s| (s, chunk.min(n - s)))
    }

    /// (first row, rows) of the row blocks covering `n` rows of `row_elems` elements, each block
    /// small enough for one binding; an error naming `what` if not even one row fits.
    fn row_blocks(&self, what: &str, n: u64, row_elems: u64) -> Result<impl Iterator<Item = (u64, u64)>> {
        self.row_blocks_of(what, n, row_elems, 4)
    }

    /// As `row_blocks`, for elements of `elem` bytes.
    fn row_blocks_of(&self, what: &str, n: u64, row_elems: u64, elem: u64) -> Result<impl Iterator<Item = (u64, u64)>> {
        let rows = self.rows_per_binding_of(what, row_elems, elem)?;
        Ok((0..n).step_by(rows as usize).map(move |r0| (r0, rows.min(n - r0))))
    }

    fn launch(&mut self, k: &Kernel) -> Result<()> {
        use Kernel::*;
        match k {
            EncoderAt { out, tokens, pos, wte, wpe, n, c } => self.encoder_at(out, tokens, pos, wte, wpe, *n as u64, *c as u64),
            KvStore { kcache, vcache, qkv, slots, pos, n, c, tmax } => {
                self.kv_store(kcache, vcache, qkv, slots, pos, *n as u64, *c as u64, *tmax as u64)
            }
            AttentionCached { out, qkv, kcache, vcache, slots, pos, n, c, nh, tmax } => {
                self.attention_cached(out, qkv, kcache, vcache, slots, pos, *n as u64, *c as u64, *nh as u64, *tmax as u64)
            }
            EncoderForward { out, tokens, wte, wpe, b, t, c } => self.encoder_forward(out, tokens, wte, wpe, *b, *t, *c),
            EncoderBackward { dwte, dwpe, dout, tokens, b, t, c } => {
                self.encoder_backward(dwte, dwpe, dout, tokens, *b, *t, *c)
            }
            LayerNormForward { out, mean, rstd, inp, weight, bias, n, c } => {
                self.layernorm_forward(out, mean, rstd, inp, weight, bias, *n as u64, *c as u64)
            }
            LayerNormBackward { dinp, dweight, dbias, dout, inp, weight, mean, rstd, n, c, accumulate } => self
                .layernorm_backward(dinp, dweight, dbias, dout, inp, weight, mean, rstd, *n as u64, *c as u64, *accumulate),
            MatmulForward { out, inp, weight, bias, n, c, oc } => {
                let (n, c, oc) = (*n as u64, *c as u64, *oc as u64);
                self.gemm(
                    Layout::Nt,
                    n,
                    oc,
                    c,
                    op(inp, c),
                    op(weight, c),
                    op(out, oc),
                    bias.map(|b| (b.buf, b.offset as u64)),
                    false,
                )
            }
            MatmulBackward { dinp, dweight, dbias, dout, inp, weight, n, c, oc } => {
                let (n, c, oc) = (*n as u64, *c as u64, *oc as u64);
                if n == 0 {
                    return Ok(());
                }
                if oc == 0 {
                    return self.zero_view(dinp, n * c);
                }
                // dinp (n,c) = dout (n,oc) · W (oc,c)
                self.gemm(Layout::Nn, n, c, oc, op(dout, oc), op(weight, c), op(dinp, c), None, false)?;
                // dW (oc,c) += doutᵀ · inp
                self.gemm(Layout::Tn, oc, c, n, op(dout, oc), op(inp, c), op(dweight, c), None, true)?;
                if let Some(db) = dbias {
                    self.colsum(dout, n, oc, db)?;
                }
                Ok(())
            }
            AttentionForward { out, lse, qkv, b, t, c, nh } => self.attention(None, out, lse, qkv, None, *b, *t, *c, *nh),
            AttentionBackward { dqkv, dout, out, lse, qkv, b, t, c, nh } => {
                self.attention(Some(dqkv), out, lse, qkv, Some(dout), *b, *t, *c, *nh)
            }
            GeluForward { out, inp, n } => self.elementwise("gelu", "gelu_forward", *n as u64, &[(1, out, true), (2, inp, false)], &[]),
            GeluBackward { dinp, inp, dout, n } => self.elementwise(
                "gelu",
                "gelu_backward",
                *n as u64,
                &[(1, dinp, true), (2, inp, false), (3, dout, false)],
                &[],
            ),
            ResidualForward { out, a, b, n } => self.elementwise(
                "residual",
                "residual_forward",
                *n as u64,
                &[(1, out, true), (2, a, false), (3, b, false)],
                &[],
            ),
            CrossEntropy { logits, losses, targets, dloss, n, v, vp, write_grad, accumulate } => {
                let flags = *write_grad as u32 | (*accumulate as u32) << 1;
                self.cross_entropy(logits, losses, targets, dloss, *n as u64, *v as u64, *vp as u64, flags)
            }
            Zero { out } => self.zero_view(out, out.len as u64),
            SumSquares { out, inp, slot } => self.sum_squares(out, inp, *slot as u64),
            ClipScale { hyper, parts, max_norm } => {
                let mut call = Call::new("reduce", "clip_scale");
                let o_parts = self.bind_view(&mut call, 4, parts, 0, parts.len as u64, false)?;
                let o_h = self.bind_view(&mut call, 5, hyper, 0, Scalars::LEN as u64, true)?;
                call.params(&[0, 0, 0, o_parts, parts.len as u32, 0, o_h, f(*max_norm)]);
                self.push(call);
                Ok(())
            }
            // `master` comes with low-precision parameters, which `precisions` refuses first
            AdamW { param, grad, m, v, hyper, weight_decay, .. } => {
                let n = param.len as u64;
                for (s, len) in self.elem_blocks(n) {
                    let mut call = Call::new("adamw", "adamw");
                    let o_p = self.bind_view(&mut call, 1, param, s, len, true)?;
                    let o_g = self.bind_view(&mut call, 2, grad, s, len, false)?;
                    let o_m = self.bind_view(&mut call, 3, m, s, len, true)?;
                    let o_v = self.bind_view(&mut call, 4, v, s, len, true)?;
                    let o_h = self.bind_view(&mut call, 5, hyper, 0, Scalars::LEN as u64, false)?;
                    call.params(&[len as u32, o_p, o_g, o_m, o_v, o_h, f(*weight_decay)]);
                    call.groups = self.stride_groups(len, ELEMWISE_WG);
                    self.push(call);
                }
                Ok(())
            }
        }
    }

    /// Elementwise kernels over n elements of each view; the first param word is n, then the
    /// residual offsets in binding order, then `extra`.
    fn elementwise(
        &mut self,
        family: &'static str,
        entry: &'static str,
        n: u64,
        views: &[(u32, &View, bool)],
        extra: &[u32],
    ) -> Result<()> {
        for (s, len) in self.elem_blocks(n) {
            let mut call = Call::new(family, entry);
            let mut words = vec![len as u32];
            for (slot, v, w) in views {
                words.push(self.bind_view(&mut call, *slot, v, s, len, *w)?);
            }
            words.extend_from_slice(extra);
            call.params(&words);
            call.groups = self.stride_groups(len, ELEMWISE_WG);
            self.push(call);
        }
        Ok(())
    }

    fn zero_view(&mut self, v: &View, n: u64) -> Result<()> {
        self.elementwise("reduce", "zero", n, &[(1, v, true)], &[])
    }

    #[allow(clippy::too_many_arguments)]
    fn encoder_forward(&mut self, out: &View, tokens: &View, wte: &View, wpe: &View, b: usize, t: usize, c: usize) -> Result<()> {
        let (b, t, c) = (b as u64, t as u64, c as u64);
        let n = b * t;
        if n == 0 || c == 0 {
            return Ok(());
        }
        let vocab = wte.len as u64 / c;
        let variant = self.encoder_variant(wte, wpe)?;
        let wte_elem = self.elem_bytes(wte.buf);
        for (r0, rs) in self.row_blocks_of("wte", vocab, c, wte_elem)? {
            let mut call = Call::with_variant(variant.clone(), "encoder_forward");
            let o_out = self.bind_view(&mut call, 1, out, 0, n * c, true)?;
            let o_tok = self.bind_view(&mut call, 2, tokens, 0, n, false)?;
            let o_wte = self.bind_view(&mut call, 3, wte, r0 * c, rs * c, false)?;
            let o_wpe = self.bind_view(&mut call, 4, wpe, 0, t * c, false)?;
            call.params(&[n as u32, c as u32, t as u32, b as u32, r0 as u32, rs as u32, o_out, o_tok, o_wte, o_wpe, 0]);
            call.groups = self.stride_groups(n * c, ELEMWISE_WG);
            self.push(call);
        }
        Ok(())
    }

    #[allow(clippy::too_many_arguments)]
    fn encoder_backward(
        &mut self, dwte: &View, dwpe: &View, dout: &View, tokens: &View, b: usize, t: usize, c: usize,
    ) -> Result<()> {
        let (b, t, c) = (b as u64, t as u64, c as u64);
        let n = b * t;
        if n == 0 || c == 0 {
            return Ok(());
        }
        // links: next occurrence of each token, first-occurrence flags
        let mut call = Call::new("encoder", "encoder_links");
        let o_tok = self.bind_view(&mut call, 2, tokens, 0, n, false)?;
        self.bind_scratch(&mut call, 6, 2 * n, true)?;
        call.params(&[n as u32, c as u32, t as u32, b as u32, 0, 0, 0, o_tok, 0, 0, 0]);
        call.groups = self.row_groups(ceil_div(n, 256));
        self.push(call);
        let vocab = dwte.len as u64 / c;
        for (r0, rs) in self.row_blocks("dwte", vocab, c)? {
            let mut call = Call::new("encoder", "encoder_backward_wte");
            let o_out = self.bind_view(&mut call, 1, dwte, r0 * c, rs * c, true)?;
            let o_tok = self.bind_view(&mut call, 2, tokens, 0, n, false)?;
            let o_dout = self.bind_view(&mut call, 5, dout, 0, n * c, false)?;
            self.bind_scratch(&mut call, 7, 2 * n, false)?;
            call.params(&[n as u32, c as u32, t as u32, b as u32, r0 as u32, rs as u32, o_out, o_tok, 0, 0, o_dout]);
            call.groups = self.stride_groups(n * c, ELEMWISE_WG);
            self.push(call);
        }
        let mut call = Call::new("encoder", "encoder_backward_wpe");
        let o_out = self.bind_view(&mut call, 1, dwpe, 0, t * c, true)?;
        let o_dout = self.bind_view(&mut call, 5, dout, 0, n * c, false)?;
        call.params(&[n as u32, c as u32, t as u32, b as u32, 0, 0, o_out, 0, 0, 0, o_dout]);
        call.groups = self.stride_groups(t * c, ELEMWISE_WG);
        self.push(call);
        Ok(())
    }

    #[allow(clippy::too_many_arguments)]
    fn layernorm_forward(
        &mut self, out: &View, mean: &View, rstd: &View, inp: &View, weight: &View, bias: &View, n: u64, c: u64,
    ) -> Result<()> {
        if n == 0 || c == 0 {
            return Ok(());
        }
        for (r0, rs) in self.row_blocks("a layernorm row block", n, c)? {
            let mut call = Call::new("layernorm", "ln_forward");
            let o_out = self.bind_view(&mut call, 1, out, r0 * c, rs * c, true)?;
            let o_mean = self.bind_view(&mut call, 2, mean, r0, rs, true)?;
            let o_rstd = self.bind_view(&mut call, 3, rstd, r0, rs, true)?;
            let o_inp = self.bind_view(&mut call, 4, inp, r0 * c, rs * c, false)?;
            let o_w = self.bind_view(&mut call, 5, weight, 0, c, false)?;
            let o_b = self.bind_view(&mut call, 6, bias, 0, c, false)?;
            call.params(&[rs as u32, c as u32, o_out, o_mean, o_rstd, o_inp, o_w, o_b]);
            call.groups = self.row_groups(rs);
            self.push(call);
        }
        Ok(())
    }

    #[allow(clippy::too_many_arguments)]
    fn layernorm_backward(
        &mut self, dinp: &View, dweight: &View, dbias: &View, dout: &View, inp: &View, weight: &View, mean: &View,
        rstd: &View, n: u64, c: u64, accumulate: bool,
    ) -> Result<()> {
        if n == 0 || c == 0 {
            return Ok(());
        }
        for (r0, rs) in self.row_blocks("a layernorm row block", n, c)? {
            // dinp
            let mut call = Call::new("layernorm", "ln_backward_dinp");
            let o_out = self.bind_view(&mut call, 1, dinp, r0 * c, rs * c, true)?;
            let o_inp = self.bind_view(&mut call, 4, inp, r0 * c, rs * c, false)?;
            let o_w = self.bind_view(&mut call, 5, weight, 0, c, false)?;
            let o_dout = self.bind_view(&mut call, 7, dout, r0 * c, rs * c, false)?;
            let o_mean = self.bind_view(&mut call, 8, mean, r0, rs, false)?;
            let o_rstd = self.bind_view(&mut call, 9, rstd, r0, rs, false)?;
            call.params(&[rs as u32, c as u32, o_out, o_mean, o_rstd, o_inp, o_w, 0, o_dout, accumulate as u32]);
            call.groups = self.row_groups(rs);
            self.push(call);
            // dweight, dbias: partial column sums per row block, then summed in order
            let rb = ROW_BLOCK.max(ceil_div(rs, self.caps.max_groups as u64));
            let nblocks = ceil_div(rs, rb);
            let mut call = Call::new("layernorm", "ln_backward_partials");
            let o_inp = self.bind_view(&mut call, 4, inp, r0 * c, rs * c, false)?;
            let o_dout = self.bind_view(&mut call, 7, dout, r0 * c, rs * c, false)?;
            let o_mean = self.bind_view(&mut call, 8, mean, r0, rs, false)?;
            let o_rstd = self.bind_view(&mut call, 9, rstd, r0, rs, false)?;
            self.bind_scratch(&mut call, 10, nblocks * 2 * c, true)?;
            call.params(&[rs as u32, c as u32, 0, o_mean, o_rstd, o_inp, 0, 0, o_dout, 0, rb as u32, nblocks as u32]);
            call.groups = [ceil_div(c, 64) as u32, nblocks as u32, 1];
            self.push(call);
            let mut call = Call::new("layernorm", "ln_backward_finalize");
            self.bind_scratch(&mut call, 11, nblocks * 2 * c, false)?;
            let o_dw = self.bind_view(&mut call, 12, dweight, 0, c, true)?;
            let o_db = self.bind_view(&mut call, 13, dbias, 0, c, true)?;
            call.params(&[rs as u32, c as u32, 0, 0, 0, 0, 0, 0, 0, 0, rb as u32, nblocks as u32, o_dw, o_db]);
            call.groups = [ceil_div(c, 64) as u32, 1, 1];
            self.push(call);
        }
        Ok(())
    }

    /// C (m,n) (= | +=) op(A)·op(B) (+ bias), split so that every binding fits.
    #[allow(clippy::too_many_arguments)]
    fn gemm(
        &mut self, layout: Layout, m: u64, n: u64, k: u64, a: Operand, b: Operand, c: Operand, bias: Option<(BufId, u64)>,
        accum: bool,
    ) -> Result<()> {
        if m == 0 || n == 0 {
            return Ok(());
        }
        if k == 0 {
            if !accum {
                // C = bias or 0: a K of zero would leave C unwritten
                let zero = View { buf: c.buf, offset: c.off as usize, len: ((m - 1) * c.ld + n) as usize };
                return self.zero_view(&zero, zero.len as u64);
            }
            return Ok(());
        }
        // A, C (and bias) are f32 (graph::validate); B (the forward weight) may be f16, read
        // by the WeightT-specialised module
        let eb = self.elem_bytes(b.buf);
        // rows of ld elements (of `elem` bytes) one binding holds
        let lim = |ld: u64, elem: u64, what: &str| self.rows_per_binding_of(what, ld, elem);
        let round = |x: u64, full: u64, q: u64| if x >= full { full } else { (x / q * q).max(q.min(x)) };
        let mut ms = lim(c.ld, 4, "a matmul output row")?;
        let mut ns = u64::MAX;
        let mut ks = u64::MAX;
        match layout {
            Layout::Nt => {
                ms = ms.min(lim(a.ld, 4, "a matmul input row")?);
                ns = lim(b.ld, eb, "a weight row")?;
            }
            Layout::Nn => {
                ms = ms.min(lim(a.ld, 4, "a matmul input row")?);
                ks = lim(b.ld, eb, "a weight row")?;
            }
            Layout::Tn => {
                ks = lim(a.ld, 4, "a matmul input row")?.min(lim(b.ld, eb, "a matmul input row")?);
            }
        }
        // rows of the grid are limited per dimension too
        ms = ms.min(self.caps.max_groups as u64 * 16);
        ns = ns.min(self.caps.max_groups as u64 * 16);
        let ms = round(ms, m, 64);
        let ns = round(ns, n, 64);
        let ks = round(ks, k, 16);
        let mut m0 = 0;
        while m0 < m {
            let mc = ms.min(m - m0);
            let mut n0 = 0;
            while n0 < n {
                let nc = ns.min(n - n0);
                let mut k0 = 0;
                while k0 < k {
                    let kc = ks.min(k - k0);
                    let first_k = k0 == 0;
                    self.gemm_chunk(layout, (m0, mc), (n0, nc), (k0, kc), a, b, c, if first_k { bias } else { None }, accum || !first_k)?;
                    k0 += kc;
                }
                n0 += nc;
            }
            m0 += mc;
        }
        Ok(())
    }

    #[allow(clippy::too_many_arguments)]
    fn gemm_chunk(
        &mut self, layout: Layout, (m0, mc): (u64, u64), (n0, nc): (u64, u64), (k0, kc): (u64, u64), a: Operand,
        b: Operand, c: Operand, bias: Option<(BufId, u64)>, accum: bool,
    ) -> Result<()> {
        // element start and extent of each operand's chunk
        let (a_start, a_ext) = match layout {
            Layout::Nt | Layout::Nn => (a.off + m0 * a.ld + k0, (mc - 1) * a.ld + kc),
            Layout::Tn => (a.off + k0 * a.ld + m0, (kc - 1) * a.ld + mc),
        };
        let (b_start, b_ext) = match layout {
            Layout::Nt => (b.off + n0 * b.ld + k0, (nc - 1) * b.ld + kc),
            Layout::Nn | Layout::Tn => (b.off + k0 * b.ld + n0, (kc - 1) * b.ld + nc),
        };
        let (c_start, c_ext) = (c.off + m0 * c.ld + n0, (mc - 1) * c.ld + nc);
        let contiguous_ok = match layout {
            Layout::Nt => kc.is_multiple_of(4),
            Layout::Nn => kc.is_multiple_of(4) && nc.is_multiple_of(4),
            Layout::Tn => mc.is_multiple_of(4) && nc.is_multiple_of(4),
        };
        let vec4 = contiguous_ok
            && a.ld.is_multiple_of(4)
            && b.ld.is_multiple_of(4)
            && a_start.is_multiple_of(4)
            && b_start.is_multiple_of(4);
        let has_bias = bias.is_some() as u32;
        // B's element type: every matmul module (tiled, large, subgroup, naive) has an f16-B form
        let wt = self.weight_type_of("a matmul weight", b.buf)?;
        if vec4 {
            let large = self.mode == MatmulMode::TiledLarge && mc >= 128 && nc >= 128;
            let tile = if large { 128 } else { 64 };
            let base = if large { super::shaders::matmul_large_variant(false) } else { Variant::plain("matmul") };
            let base = base.with_type("WeightT", wt);
            let sgv = Variant { subgroup: true, ..Variant::plain("matmul") }.with_type("WeightT", wt);
            let (variant, entry) = match (layout, self.mode == MatmulMode::Subgroup) {
                (Layout::Nt, false) => (base, "mm_nt"),
                (Layout::Nn, false) => (base, "mm_nn"),
                (Layout::Tn, false) => (base, "mm_tn"),
                (Layout::Nt, true) => (sgv, "mm_nt_sg"),
                (Layout::Nn, true) => (sgv, "mm_nn_sg"),
                (Layout::Tn, true) => (sgv, "mm_tn_sg"),
            };
            // split-K when the output has too few tiles to fill the device and k is long
            let tiles = ceil_div(mc, tile) * ceil_div(nc, tile);
            let bk = if large { 8 } else { 16 };
            let mut slices = 1u64;
            if tiles < self.caps.split_k_target as u64 && kc >= 1024 {
                let cap = (self.caps.max_binding.min(256 << 20) / 4) / (mc * nc);
                slices = ceil_div(self.caps.split_k_target as u64, tiles).min(kc / 256).min(64).min(cap).max(1);
            }
            let kslice = if slices > 1 { ceil_div(ceil_div(kc, slices), bk) * bk } else { 0 };
            if slices > 1 {
                slices = ceil_div(kc, kslice);
            }
            let mut call = Call::with_variant(variant.clone(), entry);
            let ra = self.bind(&mut call, 1, Target::Table(a.buf), a_start, a_ext, false)?;
            let rb = self.bind(&mut call, 2, Target::Table(b.buf), b_start, b_ext, false)?;
            let rc = self.bind(&mut call, 3, Target::Table(c.buf), c_start, c_ext, true)?;
            let rbias = match bias {
                Some((buf, off)) => self.bind(&mut call, 4, Target::Table(buf), off + n0, nc, false)?,
                None => self.bind(&mut call, 4, Target::Dummy, 0, 4, false)?,
            };
            debug_assert!(ra % 4 == 0 && rb % 4 == 0);
            let split = slices > 1;
            self.bind_scratch(&mut call, 7, if split { slices * mc * nc } else { 4 }, true)?;
            call.params(&[
                mc as u32, nc as u32, kc as u32, a.ld as u32, b.ld as u32, c.ld as u32, ra / 4, rb / 4, rc, rbias,
                has_bias, accum as u32, kslice as u32, if split { slices as u32 } else { 0 },
            ]);
            call.groups = [ceil_div(nc, tile) as u32, ceil_div(mc, tile) as u32, slices as u32];
            self.push(call);
            if split {
                let mut call = Call::with_variant(variant, "mm_splitk_reduce");
                let rc = self.bind(&mut call, 3, Target::Table(c.buf), c_start, c_ext, true)?;
                let rbias = match bias {
                    Some((buf, off)) => self.bind(&mut call, 4, Target::Table(buf), off + n0, nc, false)?,
                    None => self.bind(&mut call, 4, Target::Dummy, 0, 4, false)?,
                };
                self.bind_scratch(&mut call, 8, slices * mc * nc, false)?;
                call.params(&[
                    mc as u32, nc as u32, kc as u32, 0, 0, c.ld as u32, 0, 0, rc, rbias, has_bias, accum as u32, 0,
                    slices as u32,
                ]);
                call.groups = self.stride_groups(mc * nc, ELEMWISE_WG);
                self.push(call);
            }
        } else {
            let (sam, sak, sbk, sbn) = match layout {
                Layout::Nt => (a.ld, 1, 1, b.ld),
                Layout::Nn => (a.ld, 1, b.ld, 1),
                Layout::Tn => (1, a.ld, b.ld, 1),
            };
            let mut call = Call::with_variant(Variant::plain("matmul").with_type("WeightT", wt), "mm_naive");
            let ra = self.bind(&mut call, 5, Target::Table(a.buf), a_start, a_ext, false)?;
            let rb = self.bind(&mut call, 6, Target::Table(b.buf), b_start, b_ext, false)?;
            let rc = self.bind(&mut call, 3, Target::Table(c.buf), c_start, c_ext, true)?;
            let rbias = match bias {
                Some((buf, off)) => self.bind(&mut call, 4, Target::Table(buf), off + n0, nc, false)?,
                None => self.bind(&mut call, 4, Target::Dummy, 0, 4, false)?,
            };
            call.params(&[
                mc as u32, nc as u32, kc as u32, a.ld as u32, b.ld as u32, c.ld as u32, ra, rb, rc, rbias, has_bias,
                accum as u32, sam as u32, sak as u32, sbk as u32, sbn as u32,
            ]);
            call.groups = [ceil_div(nc, 16) as u32, ceil_div(mc, 16) as u32, 1];
            self.push(call);
        }
        Ok(())
    }

    /// dbias (oc) += Σ_rows dout (n, oc)
    fn colsum(&mut self, dout: &View, n: u64, oc: u64, dbias: &View) -> Result<()> {
        for (r0, rs) in self.row_blocks("a dbias row block", n, oc)? {
            let rb = ROW_BLOCK.max(ceil_div(rs, self.caps.max_groups as u64));
            let nblocks = ceil_div(rs, rb);
            let mut call = Call::new("matmul", "colsum_partial");
            let o_a = self.bind_view(&mut call, 5, dout, r0 * oc, rs * oc, false)?;
            self.bind_scratch(&mut call, 7, nblocks * oc, true)?;
            call.params(&[rs as u32, oc as u32, rb as u32, oc as u32, 0, 0, o_a]);
            call.groups = [ceil_div(oc, 64) as u32, nblocks as u32, 1];
            self.push(call);
            let mut call = Call::new("matmul", "colsum_finalize");
            self.bind_scratch(&mut call, 8, nblocks * oc, false)?;
            let o_b = self.bind_view(&mut call, 9, dbias, 0, oc, true)?;
            call.params(&[rs as u32, oc as u32, rb as u32, oc as u32, 0, nblocks as u32, 0, 0, 0, o_b]);
            call.groups = [ceil_div(oc, 64) as u32, 1, 1];
            self.push(call);
        }
        Ok(())
    }

    /// Forward (dqkv None) or backward attention, in batch chunks that fit the bindings.
    #[allow(clippy::too_many_arguments)]
    fn attention(
        &mut self, dqkv: Option<&View>, out: &View, lse: &View, qkv: &View, dout: Option<&View>, b: usize, t: usize,
        c: usize, nh: usize,
    ) -> Result<()> {
        let (b, t, c, nh) = (b as u64, t as u64, c as u64, nh as u64);
        if b == 0 || t == 0 || c == 0 {
            return Ok(());
        }
        // heads divide channels (graph::validate); what this adapter limits is the head size
        let hs = c / nh;
        let (bk, bqt) = attention_tiles(hs as u32, self.caps.workgroup_bytes);
        if bk == 0 || bqt == 0 {
            return Err(Error::backend(
                "wgpu",
                format!("attention: head size {hs} does not fit this adapter's workgroup memory ({} bytes)", self.caps.workgroup_bytes),
            ));
        }
        let per_b = (t * 3 * c).max(nh * t);
        let bs_max = self.rows_per_binding("one sequence of qkv", per_b)?.min(self.caps.max_groups as u64);
        let scale = 1.0 / (hs as f32).sqrt();
        let qgroups = ceil_div(t, 64);
        let mut b0 = 0;
        while b0 < b {
            let bs = bs_max.min(b - b0);
            let mut words = [0u32; 11];
            words[0] = bs as u32;
            words[1] = t as u32;
            words[2] = c as u32;
            words[3] = nh as u32;
            words[9] = f(scale);
            words[10] = hs as u32;
            match dqkv {
                None => {
                    let mut call = Call::with_variant(attention_variant(hs as u32, self.caps.workgroup_bytes, false), "attn_forward");
                    words[4] = self.bind_view(&mut call, 1, qkv, b0 * t * 3 * c, bs * t * 3 * c, false)?;
                    words[5] = self.bind_view(&mut call, 2, out, b0 * t * c, bs * t * c, true)?;
                    words[6] = self.bind_view(&mut call, 3, lse, b0 * nh * t, bs * nh * t, true)?;
                    call.params(&words);
                    call.groups = [qgroups as u32, nh as u32, bs as u32];
                    self.push(call);
                }
                Some(dqkv) => {
                    let dout = dout.expect("backward has dout");
                    let var = attention_variant(hs as u32, self.caps.workgroup_bytes, false);
                    // D = rowsum(dout ∘ out)
                    let mut call = Call::with_variant(var.clone(), "attn_backward_d");
                    let mut w = words;
                    w[5] = self.bind_view(&mut call, 4, out, b0 * t * c, bs * t * c, false)?;
                    w[7] = self.bind_view(&mut call, 6, dout, b0 * t * c, bs * t * c, false)?;
                    self.bind_scratch(&mut call, 8, bs * nh * t, true)?;
                    call.params(&w);
                    call.groups = self.stride_groups(bs * nh * t, 64);
                    self.push(call);
                    for entry in ["attn_backward_dq", "attn_backward_dkv"] {
                        let mut call = Call::with_variant(var.clone(), entry);
                        let mut w = words;
                        w[4] = self.bind_view(&mut call, 1, qkv, b0 * t * 3 * c, bs * t * 3 * c, false)?;
                        w[6] = self.bind_view(&mut call, 5, lse, b0 * nh * t, bs * nh * t, false)?;
                        w[7] = self.bind_view(&mut call, 6, dout, b0 * t * c, bs * t * c, false)?;
                        w[8] = self.bind_view(&mut call, 7, dqkv, b0 * t * 3 * c, bs * t * 3 * c, true)?;
                        self.bind_scratch(&mut call, 9, bs * nh * t, false)?;
                        call.params(&w);
                        call.groups = [qgroups as u32, nh as u32, bs as u32];
                        self.push(call);
                    }
                }
            }
            b0 += bs;
        }
        Ok(())
    }

    /// out[r,:] = wte[tokens[r],:] + wpe[pos[r],:], in row blocks of out and wte row chunks.
    #[allow(clippy::too_many_arguments)]
    fn encoder_at(&mut self, out: &View, tokens: &View, pos: &View, wte: &View, wpe: &View, n: u64, c: u64) -> Result<()> {
        if n == 0 || c == 0 {
            return Ok(());
        }
        let vocab = wte.len as u64 / c;
        let wpe_len = wpe.len as u64 / c * c;
        let variant = self.encoder_variant(wte, wpe)?;
        let row_blocks: Vec<_> = self.row_blocks("an encoder output row", n, c)?.collect();
        let wte_blocks: Vec<_> = self.row_blocks_of("wte", vocab, c, self.elem_bytes(wte.buf))?.collect();
        for &(r0, rs) in &row_blocks {
            for &(w0, ws) in &wte_blocks {
                let mut call = Call::with_variant(variant.clone(), "encoder_at");
                let o_out = self.bind_view(&mut call, 1, out, r0 * c, rs * c, true)?;
                let o_tok = self.bind_view(&mut call, 2, tokens, r0, rs, false)?;
                let o_wte = self.bind_view(&mut call, 3, wte, w0 * c, ws * c, false)?;
                let o_wpe = self.bind_view(&mut call, 4, wpe, 0, wpe_len, false)?;
                let o_pos = self.bind_view(&mut call, 8, pos, r0, rs, false)?;
                call.params(&[rs as u32, c as u32, 0, 0, w0 as u32, ws as u32, o_out, o_tok, o_wte, o_wpe, 0, o_pos]);
                call.groups = self.stride_groups(rs * c, ELEMWISE_WG);
                self.push(call);
            }
        }
        Ok(())
    }

    /// A KV cache is bound whole (rows are addressed by slot and position): a clear error if it
    /// cannot be.
    fn whole_cache(&self, what: &str, v: &View) -> Result<()> {
        if v.len as u64 > self.max_elems() {
            let name = &self.table.get(v.buf).name;
            return Err(Error::OutOfMemory(format!(
                "launch '{}': {what} '{name}' ({}) must fit one storage binding but this adapter binds at most {} \
                 (max_storage_buffer_binding_size): lower the cache slots (batch) or the maximum sequence length",
                self.label,
                mib(v.len as u64 * 4),
                mib(self.caps.max_binding)
            )));
        }
        Ok(())
    }

    /// Rows per decoding dispatch: qkv rows that fit one binding, and at most one grid dimension.
    fn decode_rows(&self, c: u64) -> Result<u64> {
        Ok(self.rows_per_binding("a qkv row", 3 * c)?.min(self.caps.max_groups as u64))
    }

    /// kcache/vcache[slots[r], pos[r], :] = the k/v parts of qkv row r, in row blocks.
    #[allow(clippy::too_many_arguments)]
    fn kv_store(
        &mut self, kcache: &View, vcache: &View, qkv: &View, slots: &View, pos: &View, n: u64, c: u64, tmax: u64,
    ) -> Result<()> {
        if n == 0 || c == 0 {
            return Ok(());
        }
        self.whole_cache("the key cache", kcache)?;
        self.whole_cache("the value cache", vcache)?;
        let rows = self.decode_rows(c)?;
        for r0 in (0..n).step_by(rows as usize) {
            let rs = rows.min(n - r0);
            let mut call = Call::new("attention", "kv_store");
            let mut w = [0u32; 15];
            w[0] = rs as u32;
            w[1] = tmax as u32;
            w[2] = c as u32;
            w[4] = self.bind_view(&mut call, 1, qkv, r0 * 3 * c, rs * 3 * c, false)?;
            w[11] = self.bind_view(&mut call, 10, kcache, 0, kcache.len as u64, true)?;
            w[12] = self.bind_view(&mut call, 11, vcache, 0, vcache.len as u64, true)?;
            w[13] = self.bind_view(&mut call, 14, slots, r0, rs, false)?;
            w[14] = self.bind_view(&mut call, 15, pos, r0, rs, false)?;
            call.params(&w);
            call.groups = self.stride_groups(rs * c, ELEMWISE_WG);
            self.push(call);
        }
        Ok(())
    }

    /// Each row attends over its cache slot's positions 0..=pos[r]: one workgroup per (row, head).
    #[allow(clippy::too_many_arguments)]
    fn attention_cached(
        &mut self, out: &View, qkv: &View, kcache: &View, vcache: &View, slots: &View, pos: &View, n: u64, c: u64,
        nh: u64, tmax: u64,
    ) -> Result<()> {
        if n == 0 || c == 0 {
            return Ok(());
        }
        // heads divide channels (graph::validate)
        let hs = c / nh;
        const MAX_HS: u64 = 1024; // DMAXHS in shaders/attention.wgsl
        if hs > MAX_HS {
            return Err(Error::backend("wgpu", format!("cached attention: head size {hs} is over the {MAX_HS} supported")));
        }
        if nh > self.caps.max_groups as u64 {
            return Err(Error::backend("wgpu", format!("cached attention: {nh} heads exceed this adapter's grid dimension")));
        }
        self.whole_cache("the key cache", kcache)?;
        self.whole_cache("the value cache", vcache)?;
        let scale = 1.0 / (hs as f32).sqrt();
        let rows = self.decode_rows(c)?;
        for r0 in (0..n).step_by(rows as usize) {
            let rs = rows.min(n - r0);
            let mut call = Call::new("attention", "attn_cached");
            let mut w = [0u32; 15];
            w[0] = rs as u32;
            w[1] = tmax as u32;
            w[2] = c as u32;
            w[3] = nh as u32;
            w[4] = self.bind_view(&mut call, 1, qkv, r0 * 3 * c, rs * 3 * c, false)?;
            w[5] = self.bind_view(&mut call, 2, out, r0 * c, rs * c, true)?;
            w[9] = f(scale);
            w[10] = hs as u32;
            w[11] = self.bind_view(&mut call, 12, kcache, 0, kcache.len as u64, false)?;
            w[12] = self.bind_view(&mut call, 13, vcache, 0, vcache.len as u64, false)?;
            w[13] = self.bind_view(&mut call, 14, slots, r0, rs, false)?;
            w[14] = self.bind_view(&mut call, 15, pos, r0, rs, false)?;
            call.params(&w);
            call.groups = [nh as u32, rs as u32, 1];
            self.push(call);
        }
        Ok(())
    }

    #[allow(clippy::too_many_arguments)]
    fn cross_entropy(
        &mut self, logits: &View, losses: &View, targets: &View, dloss: &View, n: u64, v: u64, vp: u64, flags: u32,
    ) -> Result<()> {
        if n == 0 {
            return Ok(());
        }
        for (r0, rs) in self.row_blocks("a logits row", n, vp)? {
            let mut call = Call::new("classifier", "crossentropy");
            let o_l = self.bind_view(&mut call, 1, logits, r0 * vp, rs * vp, true)?;
            let o_loss = self.bind_view(&mut call, 2, losses, r0, rs, true)?;
            let o_t = self.bind_view(&mut call, 3, targets, r0, rs, false)?;
            let o_d = self.bind_view(&mut call, 4, dloss, 0, 1, false)?;
            call.params(&[rs as u32, v as u32, vp as u32, o_l, o_loss, o_t, flags, o_d]);
            call.groups = self.row_groups(rs);
            self.push(call);
        }
        Ok(())
    }

    fn sum_squares(&mut self, out: &View, inp: &View, slot: u64) -> Result<()> {
        let n = inp.len as u64;
        // fixed partial counts per chunk → a deterministic summation order
        let groups_for = |len: u64| ceil_div(len, 256 * 8).clamp(1, 1024);
        let total = self.elem_blocks(n).map(|(_, len)| groups_for(len)).sum::<u64>().max(1);
        let mut part0 = 0u64;
        for (s, len) in self.elem_blocks(n) {
            let g = groups_for(len);
            let mut call = Call::new("reduce", "sumsq_partial");
            let o_inp = self.bind_view(&mut call, 2, inp, s, len, false)?;
            self.bind_scratch(&mut call, 3, total, true)?;
            call.params(&[len as u32, 0, o_inp, part0 as u32, 0, 0, 0, 0]);
            call.groups = [g as u32, 1, 1];
            self.push(call);
            part0 += g;
        }
        let mut call = Call::new("reduce", "sumsq_finalize");
        if n == 0 {
            // an empty tensor: Σ = 0 (the partials are not written, so sum none)
            part0 = 0;
        }
        self.bind_scratch(&mut call, 4, total, false)?;
        let o_out = self.bind_view(&mut call, 1, out, 0, slot + 1, true)?;
        call.params(&[0, o_out, 0, 0, part0 as u32, slot as u32, 0, 0]);
        self.push(call);
        Ok(())
    }
}

fn op(v: &View, ld: u64) -> Operand {
    Operand { buf: v.buf, off: v.offset as u64, ld }
}
