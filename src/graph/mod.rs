//! The kernel graph: phases of kernel launches over one table of named, typed buffers.
//!
//! * `kernels.rs`  — the kernel vocabulary ([`Kernel`]) and its per-step device [`Scalars`];
//! * `signature.rs` — what every kernel reads and writes, with dtypes and lengths: the contract
//!   that [`validate`] checks once per phase, so backends never re-check it;
//! * `build/`      — the only code that knows GPT-2: the training and forward graphs.

pub mod build;
pub mod cost;
pub mod kernels;
pub mod signature;

pub use build::{
    add_decoder, build_decoder, build_decoder_with, build_forward, build_train_step, build_train_step_sharded, DecodeIo, DecodeOptions, GradBucket, GraphIo, OptShard,
    TrainOptions, WEIGHT_TENSORS,
};
pub use kernels::{BufId, Kernel, Launch, Scalars, View};
pub use signature::{check_token_ids, validate, Access, Arg};

use crate::model::Config;
use std::collections::BTreeMap;

/// Element type of a buffer, with its true size. A graph that asks a backend for a dtype it
/// lacks is refused when it is allocated ([`crate::backend::Backend::supports`]), and a launch in
/// a precision it has no kernels for when the phase is prepared
/// ([`crate::backend::Backend::precisions`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum DType {
    F32,
    F16,
    BF16,
    I32,
}

impl DType {
    /// Bytes per element.
    pub fn size(self) -> usize {
        match self {
            DType::F32 | DType::I32 => 4,
            DType::F16 | DType::BF16 => 2,
        }
    }
    /// Floating-point (a "float" view of a signature accepts any of these the kernel supports).
    pub fn is_float(self) -> bool {
        !matches!(self, DType::I32)
    }
    pub fn name(self) -> &'static str {
        match self {
            DType::F32 => "f32",
            DType::F16 => "f16",
            DType::BF16 => "bf16",
            DType::I32 => "i32",
        }
    }
}

/// `--precision fp32|fp16|bf16` (also f32, f16): the float dtype of a training step.
pub fn parse_precision(s: &str) -> std::result::Result<DType, String> {
    match s.to_ascii_lowercase().as_str() {
        "fp32" | "f32" => Ok(DType::F32),
        "fp16" | "f16" => Ok(DType::F16),
        "bf16" => Ok(DType::BF16),
        _ => Err(format!("'{s}': give fp32, fp16 or bf16")),
    }
}

impl std::fmt::Display for DType {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// What a buffer holds; used for memory accounting, checkpointing and planning.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Role {
    /// parameter tensor number `0..16` in llm.c checkpoint order
    Param(usize),
    /// gradient of parameter tensor `i`
    Grad(usize),
    /// the f32 master copy of parameter tensor `i` (mixed precision: the parameters the kernels
    /// read are its rounded copy)
    Master(usize),
    /// AdamW first moment of tensor `i`
    OptM(usize),
    /// AdamW second moment of tensor `i`
    OptV(usize),
    /// ZeRO-1: AdamW's m or v of one rank's flat parameter range (every tensor's part in it)
    OptShard,
    /// saved for the backward pass or passed between kernels
    Activation,
    /// gradient of an activation
    ActGrad,
    /// i32 input token ids
    Tokens,
    /// i32 target token ids
    Targets,
    /// per-position losses read back by the host
    Losses,
    /// the per-step device scalars (see [`Scalars`])
    Scalars,
    /// small reduction scratch (norm parts)
    Scratch,
    /// a layer's keys or values for every (cache slot, position) being decoded
    KvCache,
}

impl Role {
    /// A parameter gradient: what a gradient all-reduce (the `ReduceGrads` phase) sums.
    pub fn is_grad(self) -> bool {
        matches!(self, Role::Grad(_))
    }
}

#[derive(Clone, Debug)]
pub struct BufferDesc {
    pub name: String,
    /// number of elements
    pub len: usize,
    pub dtype: DType,
    pub role: Role,
}

impl BufferDesc {
    pub fn bytes(&self) -> usize {
        self.len * self.dtype.size()
    }
}

/// Every buffer a graph uses, indexed by `BufId`.
#[derive(Clone, Debug, Default)]
pub struct BufferTable {
    pub bufs: Vec<BufferDesc>,
}

impl BufferTable {
    pub fn add(&mut self, name: impl Into<String>, len: usize, dtype: DType, role: Role) -> BufId {
        let id = BufId(self.bufs.len() as u32);
        self.bufs.push(BufferDesc { name: name.into(), len, dtype, role });
        id
    }
    pub fn get(&self, id: BufId) -> &BufferDesc {
        &self.bufs[id.0 as usize]
    }
    /// The buffer, or `None` for an id outside the table.
    pub fn try_get(&self, id: BufId) -> Option<&BufferDesc> {
        self.bufs.get(id.0 as usize)
    }
    /// The whole buffer as a view.
    pub fn view(&self, id: BufId) -> View {
        View { buf: id, offset: 0, len: self.get(id).len }
    }
    pub fn len(&self) -> usize {
        self.bufs.len()
    }
    pub fn is_empty(&self) -> bool {
        self.bufs.is_empty()
    }
    pub fn total_bytes(&self) -> usize {
        self.bufs.iter().map(|b| b.bytes()).sum()
    }
    pub fn iter(&self) -> impl Iterator<Item = (BufId, &BufferDesc)> {
        self.bufs.iter().enumerate().map(|(i, b)| (BufId(i as u32), b))
    }
    /// Every dtype the table uses, once each.
    pub fn dtypes(&self) -> Vec<DType> {
        let mut d: Vec<DType> = self.bufs.iter().map(|b| b.dtype).collect();
        d.sort();
        d.dedup();
        d
    }
}

/// A named list of launches. A backend prepares each phase once ([`crate::backend::Backend::prepare`])
/// and replays it every step; per-step values reach the kernels through the [`Scalars`] buffer,
/// never through the launch list, so a prepared phase never needs rebuilding.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Phase {
    /// zero the parameter gradients and the summed losses (once per optimiser step)
    ZeroGrad,
    /// one micro-step: forward, loss, classifier gradient, backward (gradients accumulate)
    Train,
    /// sum the gradients across devices (empty with one device; filled by a collective)
    ReduceGrads,
    /// the global gradient norm and the clip scale (written to the scalars on the device)
    GradNorm,
    /// AdamW over every parameter, with the clip scale `GradNorm` left
    Update,
    /// forward and loss only (logits kept, losses written)
    Eval,
    /// inference: a chunk of prompt rows (slot, position, token) into the KV caches, no logits
    Prefill,
    /// inference: one row per cache slot at its own position; the logits of every row
    Decode,
}

impl Phase {
    pub const ALL: [Phase; 8] =
        [Phase::ZeroGrad, Phase::Train, Phase::ReduceGrads, Phase::GradNorm, Phase::Update, Phase::Eval, Phase::Prefill, Phase::Decode];
}

/// A built graph: its buffers and its launches in named phases.
#[derive(Clone, Debug)]
pub struct Graph {
    pub cfg: Config,
    pub b: usize,
    pub t: usize,
    /// micro-steps per optimiser step the graph was built for (the default loss-gradient seed is
    /// 1/(B·T·grad_accum); a data-parallel run seeds 1/N_global instead)
    pub grad_accum: usize,
    pub buffers: BufferTable,
    pub io: GraphIo,
    pub phases: BTreeMap<Phase, Vec<Launch>>,
    /// the decoding buffers, when the graph has `Prefill`/`Decode` ([`add_decoder`])
    pub decode: Option<DecodeIo>,
}

impl Graph {
    /// Bytes of every buffer of the graph (what a backend allocates).
    pub fn total_bytes(&self) -> usize {
        self.buffers.total_bytes()
    }
    /// The launches of `phase` (empty when the graph has none).
    pub fn phase(&self, phase: Phase) -> &[Launch] {
        self.phases.get(&phase).map(Vec::as_slice).unwrap_or(&[])
    }
    /// Every non-empty phase with its launches, in `Phase` order.
    pub fn iter_phases(&self) -> impl Iterator<Item = (Phase, &[Launch])> {
        self.phases.iter().filter(|(_, l)| !l.is_empty()).map(|(p, l)| (*p, l.as_slice()))
    }
}
