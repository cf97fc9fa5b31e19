//! Builds GPT-2's training and inference graphs. The only module that knows the model.
//!
//! Phases of a graph (see [`Phase`]; each a launch list over the same buffer table, so one
//! allocation serves training, evaluation and sampling):
//! * `ZeroGrad` — zero the parameter gradients (once per optimiser step);
//! * `Train` — one micro-step: forward, loss, classifier gradient, backward; parameter gradients
//!   are accumulated, so running it k times sums k micro-batches;
//! * `ReduceGrads` — empty here (one device); a data-parallel run fills it;
//! * `GradNorm` — the global gradient norm and the clip scale, into the scalars;
//! * `Update` — AdamW, reading the per-step scalars;
//! * `Eval` — forward and loss only (logits are kept; `losses` are written);
//! * `Prefill`, `Decode` — generation with a KV cache, added by `decode.rs` ([`add_decoder`]) to
//!   any of these graphs or alone ([`build_decoder`]).
//!
//! The classifier (logits = lnf·wteᵀ, B·T × Vp) is processed in row chunks of at most
//! `LOGITS_CHUNK_ELEMS` elements: GPT-2 124M's logits at B=4, T=1024 are 824 MB in f32, over the
//! WebGPU default binding size and wasteful anywhere. Each chunk runs matmul → cross-entropy
//! (in place → dlogits) → matmul backward, so only one chunk of logits ever exists.
//!
//! This file lays out the buffer table and assembles the phases into a [`Graph`]; the launches
//! come from
//! * `forward.rs`  — the activations, `block_forward` and the forward pass (`Train` and `Eval`
//!   share it), and the classifier + loss chunks of `Eval`;
//! * `backward.rs` — the classifier + loss gradient chunks and the backward pass (`block_backward`);
//! * `optim.rs`    — `ZeroGrad`, `GradNorm` and `Update`.

mod backward;
mod decode;
mod forward;
mod optim;

pub use decode::{add_decoder, DecodeIo, DecodeOptions};


use super::{BufId, BufferTable, DType, Graph, Kernel, Launch, Phase, Role, Scalars, View};
use crate::model::params::idx;
use crate::model::{Config, ParamLayout, NUM_PARAM_TENSORS, PARAM_NAMES};
use backward::ActGrads;
use forward::Activations;
use std::collections::BTreeMap;

/// At most this many logits elements exist at once (32 Mi f32 = 128 MiB, the WebGPU default
/// max storage binding).
pub const LOGITS_CHUNK_ELEMS: usize = 32 << 20;

/// Options of a training graph.
#[derive(Clone, Debug)]
pub struct TrainOptions {
    /// micro-batch size B and sequence length T
    pub b: usize,
    pub t: usize,
    /// micro-steps per optimiser step; `Session` seeds the loss gradient with 1/(B·T·grad_accum)
    pub grad_accum: usize,
    pub weight_decay: f32,
    /// true: decay every tensor (llm.c's CPU trainer / test_gpt2); false: only 2-D weights (CUDA trainer)
    pub decay_all: bool,
    /// global gradient-norm clip; 0 disables clipping (the norm is still computed)
    pub grad_clip: f32,
    /// activations recomputed in backward instead of saved per layer (llm.c's `-r`): 0 none,
    /// 1 the GELU output, 2 the GELU and both layernorm outputs. The recomputation repeats the
    /// forward launch on the same input, so the step is bit-identical to 0.
    pub recompute: u8,
    /// AdamW runs on the host (`Session` keeps m and v there): the graph has no moment buffers
    /// and an empty `Update` phase; [`GraphIo::host_update`] says what the host must do.
    pub offload_optimizer: bool,
    /// storage of the parameters, gradients and activations (f32, f16 or bf16). With f16 or bf16
    /// the graph adds f32 master weights, which AdamW updates and rounds into the parameters;
    /// AdamW's m and v, layernorm statistics, the attention's log-sum-exp, the losses and the
    /// device scalars stay f32, and every kernel computes in f32.
    pub precision: DType,
}

impl Default for TrainOptions {
    /// B=1, T=1, no accumulation, no weight decay, no clipping, nothing recomputed or offloaded.
    fn default() -> Self {
        TrainOptions {
            b: 1,
            t: 1,
            grad_accum: 1,
            weight_decay: 0.0,
            decay_all: true,
            grad_clip: 0.0,
            recompute: 0,
            offload_optimizer: false,
            precision: DType::F32,
        }
    }
}

/// ZeRO-1's AdamW state: m and v for the flat parameter range `range` (checkpoint order), which
/// is all `Update` touches.
#[derive(Clone, Debug)]
pub struct OptShard {
    pub m: BufId,
    pub v: BufId,
    pub range: std::ops::Range<usize>,
}

/// Gradient views (with their tensor index, checkpoint order) that are final once the first `end`
/// launches of `Train` have run.
#[derive(Clone, Debug)]
pub struct GradBucket {
    pub end: usize,
    pub grads: Vec<(usize, View)>,
}

/// Buffers the host talks to.
#[derive(Clone, Debug)]
pub struct GraphIo {
    pub params: [BufId; NUM_PARAM_TENSORS],
    /// the f32 master weights, with low-precision parameters (what checkpoints save)
    pub masters: Option<[BufId; NUM_PARAM_TENSORS]>,
    pub grads: Option<[BufId; NUM_PARAM_TENSORS]>,
    pub m: Option<[BufId; NUM_PARAM_TENSORS]>,
    pub v: Option<[BufId; NUM_PARAM_TENSORS]>,
    /// ZeRO-1: the moments of this rank's parameter range only (then `m` and `v` are None)
    pub opt_shard: Option<OptShard>,
    /// `--offload-optimizer`: the graph has no AdamW moments and an empty `Update`; the host runs
    /// AdamW on every tensor with these weight decays (checkpoint order) and the clip scale
    /// `GradNorm` leaves in the scalars
    pub host_update: Option<[f32; NUM_PARAM_TENSORS]>,
    /// the parameter gradients in the order `Train` finishes them (empty without training), so a
    /// data-parallel step can sum each bucket while the rest of backward runs
    pub grad_buckets: Vec<GradBucket>,
    /// i32 (B·T) inputs and targets
    pub tokens: BufId,
    pub targets: BufId,
    /// f32 (B·T) per-position losses
    pub losses: BufId,
    /// f32 (logits_rows, Vp): after `eval`, the logits of rows [0, logits_rows) (row = b·T + t)
    pub logits: BufId,
    pub logits_rows: usize,
    /// the per-step device scalars (every graph), see `Scalars`
    pub scalars: BufId,
}

/// The training graph: every training phase, and `Eval`.
pub fn build_train_step(cfg: &Config, opts: &TrainOptions) -> Graph {
    build(cfg, opts.b, opts.t, Some(opts), None)
}

/// The training graph of one ZeRO-1 rank: AdamW's m and v exist only for the flat parameter range
/// `shard` (checkpoint order), and `Update` updates only those parameters.
pub fn build_train_step_sharded(cfg: &Config, opts: &TrainOptions, shard: std::ops::Range<usize>) -> Graph {
    build(cfg, opts.b, opts.t, Some(opts), Some(shard))
}

/// Inference only: the `Eval` phase (no gradients, no optimiser state).
pub fn build_forward(cfg: &Config, b: usize, t: usize) -> Graph {
    build(cfg, b, t, None, None)
}

/// Inference by KV cache only: the parameters and the `Prefill` and `Decode` phases (see
/// `decode.rs`). Its `io.targets`/`io.losses` are one-element buffers no phase uses.
pub fn build_decoder(cfg: &Config, opts: DecodeOptions) -> Graph {
    build_decoder_with(cfg, opts, DType::F32)
}

/// [`build_decoder`] with the weights in `weights`: with F16, the matmul weights and the embeddings (wte, wpe, qkvw, attprojw, fcw,
/// fcprojw: all but 0.1% of GPT-2's parameters) are f16; biases and layernorms stay f32.
pub fn build_decoder_with(cfg: &Config, opts: DecodeOptions, weights: DType) -> Graph {
    let mut g = build_params_only(cfg, weights);
    add_decoder(&mut g, opts);
    g
}

/// The parameter tensors stored in the weight dtype of inference (see [`build_decoder`]).
pub const WEIGHT_TENSORS: [usize; 6] = [idx::WTE, idx::WPE, idx::QKVW, idx::ATTPROJW, idx::FCW, idx::FCPROJW];

/// A graph with the parameters, the scalars and 1-element host buffers, and no phases.
fn build_params_only(cfg: &Config, weights: DType) -> Graph {
    let layout = ParamLayout::new(cfg);
    let mut g = Builder { table: BufferTable::default(), precision: DType::F32 };
    let dtype = |i| if WEIGHT_TENSORS.contains(&i) { weights } else { DType::F32 };
    let params = Tensors::add_typed(&mut g, &layout, cfg.l, "", Role::Param, &dtype);
    let tokens = g.table.add("tokens", 1, DType::I32, Role::Tokens);
    let targets = g.table.add("targets", 1, DType::I32, Role::Targets);
    let losses = g.table.add("losses", 1, DType::F32, Role::Losses);
    let logits = g.table.add("logits", 1, DType::F32, Role::Activation);
    let scalars = g.table.add("scalars", Scalars::LEN, DType::F32, Role::Scalars);
    let io = GraphIo { params: params.ids(), masters: None, grads: None, m: None, v: None, opt_shard: None, host_update: None, grad_buckets: Vec::new(), tokens, targets, losses, logits, logits_rows: 0, scalars };
    Graph { cfg: *cfg, b: 1, t: 1, grad_accum: 1, buffers: g.table, io, phases: BTreeMap::new(), decode: None }
}

/// Rows of logits per classifier chunk: all rows when they fit in `LOGITS_CHUNK_ELEMS`, else the
/// largest multiple of T that does (so chunk 0 holds whole sequences), else as many rows as fit.
pub fn classifier_chunk_rows(n: usize, t: usize, vp: usize) -> usize {
    let max_rows = (LOGITS_CHUNK_ELEMS / vp).max(1);
    if n <= max_rows {
        n
    } else if t <= max_rows {
        (max_rows / t) * t
    } else {
        max_rows
    }
}

/// The sizes the launches need: batch `b`, sequence `t`, rows `n` = b·t, channels `c`, heads
/// `nh`, vocabulary `v` and padded vocabulary `vp`.
#[derive(Clone, Copy, Debug)]
struct Dims {
    b: usize,
    t: usize,
    n: usize,
    c: usize,
    nh: usize,
    v: usize,
    vp: usize,
}

/// The buffer table while it is laid out.
struct Builder {
    table: BufferTable,
    /// the dtype of parameters, gradients and activations (`TrainOptions::precision`)
    precision: DType,
}

impl Builder {
    /// Adds an f32 buffer and returns a view of all of it.
    fn buf(&mut self, name: impl Into<String>, len: usize, role: Role) -> View {
        let id = self.table.add(name, len, DType::F32, role);
        self.table.view(id)
    }
    /// Adds a buffer in the graph's precision (an activation or its gradient).
    fn act(&mut self, name: impl Into<String>, len: usize, role: Role) -> View {
        let id = self.table.add(name, len, self.precision, role);
        self.table.view(id)
    }
}

/// One kind of parameter-shaped tensor, all 16 of them in llm.c order (`idx::*`): the parameters,
/// their gradients, or an AdamW moment. The per-layer tensors stack the L layers.
#[derive(Clone, Copy)]
struct Tensors {
    views: [View; NUM_PARAM_TENSORS],
    layers: usize,
}

impl Tensors {
    /// Adds the 16 buffers, named `{prefix}{PARAM_NAMES[i]}` with role `role(i)`.
    fn add(g: &mut Builder, layout: &ParamLayout, layers: usize, prefix: &str, role: fn(usize) -> Role) -> Tensors {
        Tensors::add_typed(g, layout, layers, prefix, role, &|_| DType::F32)
    }
    /// The same with tensor `i` in `dtype(i)`.
    fn add_typed(
        g: &mut Builder, layout: &ParamLayout, layers: usize, prefix: &str, role: fn(usize) -> Role, dtype: &dyn Fn(usize) -> DType,
    ) -> Tensors {
        let views = std::array::from_fn(|i| {
            let id = g.table.add(format!("{prefix}{}", PARAM_NAMES[i]), layout.sizes[i], dtype(i), role(i));
            g.table.view(id)
        });
        Tensors { views, layers }
    }
    /// The buffer ids, for [`GraphIo`].
    fn ids(&self) -> [BufId; NUM_PARAM_TENSORS] {
        self.views.map(|v| v.buf)
    }
    /// Tensor `i`, whole.
    fn whole(&self, i: usize) -> View {
        self.views[i]
    }
    /// Layer `l`'s slice of the stacked per-layer tensor `i`.
    fn layer(&self, i: usize, l: usize) -> View {
        let per = self.views[i].len / self.layers;
        self.views[i].slice(l * per, per)
    }
    /// Every per-layer tensor of layer `l`.
    fn block(&self, l: usize) -> LayerTensors {
        let p = |i| self.layer(i, l);
        LayerTensors {
            ln1w: p(idx::LN1W),
            ln1b: p(idx::LN1B),
            qkvw: p(idx::QKVW),
            qkvb: p(idx::QKVB),
            attprojw: p(idx::ATTPROJW),
            attprojb: p(idx::ATTPROJB),
            ln2w: p(idx::LN2W),
            ln2b: p(idx::LN2B),
            fcw: p(idx::FCW),
            fcb: p(idx::FCB),
            fcprojw: p(idx::FCPROJW),
            fcprojb: p(idx::FCPROJB),
        }
    }
}

/// One layer's slices of the per-layer tensors (its weights, or their gradients).
struct LayerTensors {
    ln1w: View,
    ln1b: View,
    qkvw: View,
    qkvb: View,
    attprojw: View,
    attprojb: View,
    ln2w: View,
    ln2b: View,
    fcw: View,
    fcb: View,
    fcprojw: View,
    fcprojb: View,
}

/// The host-facing buffers as views.
struct IoViews {
    /// i32 (n) input and target ids
    tokens: View,
    targets: View,
    /// f32 (n) per-position losses
    losses: View,
    /// the whole scalars buffer, and its loss-seed slot
    scalars: View,
    dloss: View,
}

/// What every phase reads: the sizes, the parameters, the host buffers and the activations.
struct Net {
    d: Dims,
    params: Tensors,
    io: IoViews,
    acts: Activations,
}

/// AdamW's moments: one buffer per tensor, or (ZeRO-1) one buffer each for the flat parameter
/// range this rank updates.
enum Moments {
    Full { m: Tensors, v: Tensors },
    Shard { m: View, v: View, range: std::ops::Range<usize> },
    /// `--offload-optimizer`: m and v live on the host and `Update` is empty
    Host,
}

/// The buffers only a training graph has.
struct TrainBufs {
    grads: Tensors,
    /// f32 master weights (low-precision parameters only)
    masters: Option<Tensors>,
    moments: Moments,
    /// activation gradients, reused by every block
    dacts: ActGrads,
    /// one partial sum of squares per gradient tensor
    norm_parts: View,
}

fn launch(out: &mut Vec<Launch>, label: impl Into<String>, kernel: Kernel) {
    out.push(Launch { label: label.into(), kernel });
}

fn build(cfg: &Config, b: usize, t: usize, train: Option<&TrainOptions>, shard: Option<std::ops::Range<usize>>) -> Graph {
    let d = Dims { b, t, n: b * t, c: cfg.c, nh: cfg.nh, v: cfg.v, vp: cfg.vp };
    let layout = ParamLayout::new(cfg);
    let precision = train.map_or(DType::F32, |o| o.precision);
    let mut g = Builder { table: BufferTable::default(), precision };

    // ---- the buffer table, in this order: parameters; gradients and AdamW moments (training);
    // host buffers; activations; activation gradients and norm scratch (training) ----
    let params = Tensors::add_typed(&mut g, &layout, cfg.l, "", Role::Param, &|_| precision);
    // f32 master weights beside low-precision parameters, unless the host keeps them (offload)
    let on_device_optimizer = train.is_some_and(|o| !o.offload_optimizer);
    let masters = (precision != DType::F32 && on_device_optimizer).then(|| Tensors::add(&mut g, &layout, cfg.l, "master.", Role::Master));
    let optim = train.map(|opts| {
        let grads = Tensors::add_typed(&mut g, &layout, cfg.l, "d", Role::Grad, &|_| precision);
        let moments = match shard {
            None if opts.offload_optimizer => Moments::Host,
            None => Moments::Full {
                m: Tensors::add(&mut g, &layout, cfg.l, "m.", Role::OptM),
                v: Tensors::add(&mut g, &layout, cfg.l, "v.", Role::OptV),
            },
            Some(range) => {
                // at least one element, so that a rank whose shard is empty still has buffers
                let n = range.len().max(1);
                Moments::Shard { m: g.buf("m.shard", n, Role::OptShard), v: g.buf("v.shard", n, Role::OptShard), range }
            }
        };
        (grads, moments)
    });
    let tokens = g.table.add("tokens", d.n, DType::I32, Role::Tokens);
    let targets = g.table.add("targets", d.n, DType::I32, Role::Targets);
    let losses = g.table.add("losses", d.n, DType::F32, Role::Losses);
    let scalars = g.table.add("scalars", Scalars::LEN, DType::F32, Role::Scalars);
    let io = IoViews {
        tokens: g.table.view(tokens),
        targets: g.table.view(targets),
        losses: g.table.view(losses),
        scalars: g.table.view(scalars),
        dloss: g.table.view(scalars).slice(Scalars::LOSS_SEED, 1),
    };
    let acts = Activations::new(&mut g, d, cfg.l, train.map_or(0, |o| o.recompute));
    let train_bufs = optim.map(|(grads, moments)| TrainBufs {
        grads,
        masters,
        moments,
        dacts: ActGrads::new(&mut g, d),
        norm_parts: g.buf("norm_parts", NUM_PARAM_TENSORS, Role::Scratch),
    });
    let net = Net { d, params, io, acts };

    // ---- the phases: `Train` and `Eval` share the forward pass ----
    let fwd = forward::forward(&net);
    let mut eval = fwd.clone();
    forward::eval_loss(&net, &mut eval);
    let (mut train_l, mut zero_grad, mut norm, mut update) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    let mut grad_buckets = Vec::new();
    if let (Some(opts), Some(tb)) = (train, &train_bufs) {
        train_l = fwd;
        // gradient buckets: each block's weight gradients once its backward is done, then the
        // embeddings' and the final layernorm's at the end (wte takes the classifier's and the
        // encoder's parts)
        for (end, l) in backward::backward(&net, tb, &mut train_l) {
            let grads = (idx::LN1W..=idx::FCPROJB).map(|i| (i, tb.grads.layer(i, l))).collect();
            grad_buckets.push(GradBucket { end, grads });
        }
        let tail = [idx::WTE, idx::WPE, idx::LNFW, idx::LNFB].map(|i| (i, tb.grads.whole(i))).to_vec();
        grad_buckets.push(GradBucket { end: train_l.len(), grads: tail });
        zero_grad = optim::zero_grad(&net, tb);
        norm = optim::grad_norm(&net, tb, opts);
        update = optim::update(&net, tb, opts, &layout);
    }

    let phases = BTreeMap::from([
        (Phase::ZeroGrad, zero_grad),
        (Phase::Train, train_l),
        (Phase::ReduceGrads, Vec::new()),
        (Phase::GradNorm, norm),
        (Phase::Update, update),
        (Phase::Eval, eval),
    ]);
    let io = GraphIo {
        params: net.params.ids(),
        masters: masters.map(|m| m.ids()),
        grads: train_bufs.as_ref().map(|tb| tb.grads.ids()),
        m: train_bufs.as_ref().and_then(|tb| if let Moments::Full { m, .. } = &tb.moments { Some(m.ids()) } else { None }),
        v: train_bufs.as_ref().and_then(|tb| if let Moments::Full { v, .. } = &tb.moments { Some(v.ids()) } else { None }),
        opt_shard: train_bufs.as_ref().and_then(|tb| match &tb.moments {
            Moments::Shard { m, v, range } => Some(OptShard { m: m.buf, v: v.buf, range: range.clone() }),
            Moments::Full { .. } | Moments::Host => None,
        }),
        host_update: match (train, train_bufs.as_ref().map(|tb| &tb.moments)) {
            (Some(opts), Some(Moments::Host)) => Some(optim::weight_decays(opts)),
            _ => None,
        },
        grad_buckets,
        tokens,
        targets,
        losses,
        logits: net.acts.logits.buf,
        logits_rows: net.acts.chunk_rows,
        scalars,
    };
    Graph { cfg: *cfg, b, t, grad_accum: train.map(|o| o.grad_accum.max(1)).unwrap_or(1), buffers: g.table, io, phases, decode: None }
}
