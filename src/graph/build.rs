//! Builds GPT-2's training and inference graphs. The only module that knows the model.
//!
//! Phases of a graph (each a `Vec<Launch>` over the same buffer table, so one allocation serves
//! training, evaluation and sampling):
//! * `zero_grad` — zero the parameter gradients (once per optimiser step);
//! * `train` — one micro-step: forward, loss, classifier gradient, backward; parameter gradients
//!   are accumulated, so running it k times sums k micro-batches;
//! * `eval` — forward and loss only (logits are kept; `losses` are written);
//! * `update` — gradient norm, clip scale and AdamW, reading the per-step scalars from `hyper`.
//!
//! The classifier (logits = lnf·wteᵀ, B·T × Vp) is processed in row chunks of at most
//! `LOGITS_CHUNK_ELEMS` elements: GPT-2 124M's logits at B=4, T=1024 are 824 MB in f32, over the
//! WebGPU default binding size and wasteful anywhere. Each chunk runs matmul → cross-entropy
//! (in place → dlogits) → matmul backward, so only one chunk of logits ever exists.

use super::{BufId, BufferTable, DType, Hyper, Kernel, Launch, Role, View};
use crate::model::params::{idx, DECAYED_2D};
use crate::model::{Config, ParamLayout, NUM_PARAM_TENSORS, PARAM_NAMES};

/// At most this many logits elements exist at once (32 Mi f32 = 128 MiB, the WebGPU default
/// max storage binding).
pub const LOGITS_CHUNK_ELEMS: usize = 32 << 20;

/// Options of a training graph.
#[derive(Clone, Debug)]
pub struct TrainOptions {
    /// micro-batch size B and sequence length T
    pub b: usize,
    pub t: usize,
    /// micro-steps per optimiser step; the loss gradient is seeded with 1/(B·T·grad_accum)
    pub grad_accum: usize,
    pub weight_decay: f32,
    /// true: decay every tensor (llm.c's CPU trainer / test_gpt2); false: only 2-D weights (CUDA trainer)
    pub decay_all: bool,
    /// global gradient-norm clip; 0 disables clipping (the norm is still computed)
    pub grad_clip: f32,
}

/// Buffers the host talks to.
#[derive(Clone, Debug)]
pub struct GraphIo {
    pub params: [BufId; NUM_PARAM_TENSORS],
    pub grads: Option<[BufId; NUM_PARAM_TENSORS]>,
    pub m: Option<[BufId; NUM_PARAM_TENSORS]>,
    pub v: Option<[BufId; NUM_PARAM_TENSORS]>,
    /// i32 (B·T) inputs and targets
    pub tokens: BufId,
    pub targets: BufId,
    /// f32 (B·T) per-position losses
    pub losses: BufId,
    /// f32 (logits_rows, Vp): after `eval`, the logits of rows [0, logits_rows) (row = b·T + t)
    pub logits: BufId,
    pub logits_rows: usize,
    /// optimiser scalars (train graph only), see `Hyper`
    pub hyper: Option<BufId>,
}

/// A built graph: its buffers and its launches in phases.
#[derive(Clone, Debug)]
pub struct Graph {
    pub cfg: Config,
    pub b: usize,
    pub t: usize,
    pub buffers: BufferTable,
    pub io: GraphIo,
    pub zero_grad: Vec<Launch>,
    pub train: Vec<Launch>,
    pub eval: Vec<Launch>,
    pub update: Vec<Launch>,
}

impl Graph {
    /// Bytes of every buffer of the graph (what a backend allocates).
    pub fn total_bytes(&self) -> usize {
        self.buffers.total_bytes()
    }
}

/// The training graph: all four phases.
pub fn build_train_step(cfg: &Config, opts: &TrainOptions) -> Graph {
    build(cfg, opts.b, opts.t, Some(opts))
}

/// Inference only: the `eval` phase (no gradients, no optimiser state).
pub fn build_forward(cfg: &Config, b: usize, t: usize) -> Graph {
    build(cfg, b, t, None)
}

/// Activations of one transformer block, saved for the backward pass.
struct Block {
    ln1: View,
    ln1_mean: View,
    ln1_rstd: View,
    qkv: View,
    atty: View,
    lse: View,
    attproj: View,
    res2: View,
    ln2: View,
    ln2_mean: View,
    ln2_rstd: View,
    fch: View,
    fch_gelu: View,
    fcproj: View,
    res3: View,
}

struct Builder {
    table: BufferTable,
}

impl Builder {
    fn buf(&mut self, name: String, len: usize, role: Role) -> View {
        let id = self.table.add(name, len, DType::F32, role);
        self.table.view(id)
    }
}

fn launch(out: &mut Vec<Launch>, label: impl Into<String>, kernel: Kernel) {
    out.push(Launch { label: label.into(), kernel });
}

fn build(cfg: &Config, b: usize, t: usize, train: Option<&TrainOptions>) -> Graph {
    let (c, l_count, nh, v, vp) = (cfg.c, cfg.l, cfg.nh, cfg.v, cfg.vp);
    let n = b * t;
    let layout = ParamLayout::new(cfg);
    let mut g = Builder { table: BufferTable::default() };

    let params: [BufId; NUM_PARAM_TENSORS] =
        std::array::from_fn(|i| g.table.add(PARAM_NAMES[i], layout.sizes[i], DType::F32, Role::Param(i)));
    let (grads, ms, vs) = if train.is_some() {
        let gr: [BufId; NUM_PARAM_TENSORS] =
            std::array::from_fn(|i| g.table.add(format!("d{}", PARAM_NAMES[i]), layout.sizes[i], DType::F32, Role::Grad(i)));
        let m: [BufId; NUM_PARAM_TENSORS] =
            std::array::from_fn(|i| g.table.add(format!("m.{}", PARAM_NAMES[i]), layout.sizes[i], DType::F32, Role::OptM(i)));
        let vv: [BufId; NUM_PARAM_TENSORS] =
            std::array::from_fn(|i| g.table.add(format!("v.{}", PARAM_NAMES[i]), layout.sizes[i], DType::F32, Role::OptV(i)));
        (Some(gr), Some(m), Some(vv))
    } else {
        (None, None, None)
    };
    let tokens = g.table.add("tokens", n, DType::I32, Role::Tokens);
    let targets = g.table.add("targets", n, DType::I32, Role::Targets);
    let losses = g.table.add("losses", n, DType::F32, Role::Losses);

    // parameter views: whole tensor, or layer l's slice of a stacked tensor
    let pv = |tbl: &BufferTable, ids: &[BufId; NUM_PARAM_TENSORS], i: usize| tbl.view(ids[i]);
    let pl = |tbl: &BufferTable, ids: &[BufId; NUM_PARAM_TENSORS], i: usize, l: usize| {
        let per = layout.sizes[i] / l_count;
        tbl.view(ids[i]).slice(l * per, per)
    };

    // ---- activations ----
    let encoded = g.buf("encoded".into(), n * c, Role::Activation);
    let blocks: Vec<Block> = (0..l_count)
        .map(|l| Block {
            ln1: g.buf(format!("l{l}.ln1"), n * c, Role::Activation),
            ln1_mean: g.buf(format!("l{l}.ln1_mean"), n, Role::Activation),
            ln1_rstd: g.buf(format!("l{l}.ln1_rstd"), n, Role::Activation),
            qkv: g.buf(format!("l{l}.qkv"), n * 3 * c, Role::Activation),
            atty: g.buf(format!("l{l}.atty"), n * c, Role::Activation),
            lse: g.buf(format!("l{l}.att_lse"), b * nh * t, Role::Activation),
            attproj: g.buf(format!("l{l}.attproj"), n * c, Role::Activation),
            res2: g.buf(format!("l{l}.res2"), n * c, Role::Activation),
            ln2: g.buf(format!("l{l}.ln2"), n * c, Role::Activation),
            ln2_mean: g.buf(format!("l{l}.ln2_mean"), n, Role::Activation),
            ln2_rstd: g.buf(format!("l{l}.ln2_rstd"), n, Role::Activation),
            fch: g.buf(format!("l{l}.fch"), n * 4 * c, Role::Activation),
            fch_gelu: g.buf(format!("l{l}.fch_gelu"), n * 4 * c, Role::Activation),
            fcproj: g.buf(format!("l{l}.fcproj"), n * c, Role::Activation),
            res3: g.buf(format!("l{l}.res3"), n * c, Role::Activation),
        })
        .collect();
    let lnf = g.buf("lnf".into(), n * c, Role::Activation);
    let lnf_mean = g.buf("lnf_mean".into(), n, Role::Activation);
    let lnf_rstd = g.buf("lnf_rstd".into(), n, Role::Activation);
    let chunk_rows = classifier_chunk_rows(n, t, vp);
    let logits_id = g.table.add("logits", chunk_rows * vp, DType::F32, Role::Activation);
    let logits = g.table.view(logits_id);
    let chunks: Vec<(usize, usize)> = (0..n).step_by(chunk_rows).map(|r0| (r0, chunk_rows.min(n - r0))).collect();

    // ---- forward body, shared by `train` and `eval` ----
    let tbl = &g.table;
    let tok_v = tbl.view(tokens);
    let tgt_v = tbl.view(targets);
    let loss_v = tbl.view(losses);
    let mut fwd = Vec::new();
    launch(&mut fwd, "encoder.fwd", Kernel::EncoderForward {
        out: encoded, tokens: tok_v, wte: pv(tbl, &params, idx::WTE), wpe: pv(tbl, &params, idx::WPE), b, t, c,
    });
    for (l, blk) in blocks.iter().enumerate() {
        let x = if l == 0 { encoded } else { blocks[l - 1].res3 };
        let p = |i| pl(tbl, &params, i, l);
        launch(&mut fwd, format!("l{l}.ln1.fwd"), Kernel::LayerNormForward {
            out: blk.ln1, mean: blk.ln1_mean, rstd: blk.ln1_rstd, inp: x, weight: p(idx::LN1W), bias: p(idx::LN1B), n, c,
        });
        launch(&mut fwd, format!("l{l}.qkv.fwd"), Kernel::MatmulForward {
            out: blk.qkv, inp: blk.ln1, weight: p(idx::QKVW), bias: Some(p(idx::QKVB)), n, c, oc: 3 * c,
        });
        launch(&mut fwd, format!("l{l}.attn.fwd"), Kernel::AttentionForward { out: blk.atty, lse: blk.lse, qkv: blk.qkv, b, t, c, nh });
        launch(&mut fwd, format!("l{l}.attproj.fwd"), Kernel::MatmulForward {
            out: blk.attproj, inp: blk.atty, weight: p(idx::ATTPROJW), bias: Some(p(idx::ATTPROJB)), n, c, oc: c,
        });
        launch(&mut fwd, format!("l{l}.res2.fwd"), Kernel::ResidualForward { out: blk.res2, a: x, b: blk.attproj, n: n * c });
        launch(&mut fwd, format!("l{l}.ln2.fwd"), Kernel::LayerNormForward {
            out: blk.ln2, mean: blk.ln2_mean, rstd: blk.ln2_rstd, inp: blk.res2, weight: p(idx::LN2W), bias: p(idx::LN2B), n, c,
        });
        launch(&mut fwd, format!("l{l}.fc.fwd"), Kernel::MatmulForward {
            out: blk.fch, inp: blk.ln2, weight: p(idx::FCW), bias: Some(p(idx::FCB)), n, c, oc: 4 * c,
        });
        launch(&mut fwd, format!("l{l}.gelu.fwd"), Kernel::GeluForward { out: blk.fch_gelu, inp: blk.fch, n: n * 4 * c });
        launch(&mut fwd, format!("l{l}.fcproj.fwd"), Kernel::MatmulForward {
            out: blk.fcproj, inp: blk.fch_gelu, weight: p(idx::FCPROJW), bias: Some(p(idx::FCPROJB)), n, c: 4 * c, oc: c,
        });
        launch(&mut fwd, format!("l{l}.res3.fwd"), Kernel::ResidualForward { out: blk.res3, a: blk.res2, b: blk.fcproj, n: n * c });
    }
    let x_last = if l_count == 0 { encoded } else { blocks[l_count - 1].res3 };
    launch(&mut fwd, "lnf.fwd", Kernel::LayerNormForward {
        out: lnf, mean: lnf_mean, rstd: lnf_rstd, inp: x_last, weight: pv(tbl, &params, idx::LNFW), bias: pv(tbl, &params, idx::LNFB), n, c,
    });
    let wte = pv(tbl, &params, idx::WTE);

    // ---- eval: logits chunk by chunk, in reverse so rows [0, chunk_rows) stay in `logits` ----
    let mut eval = fwd.clone();
    for &(r0, rows) in chunks.iter().rev() {
        let lg = logits.slice(0, rows * vp);
        launch(&mut eval, format!("classifier[{r0}].fwd"), Kernel::MatmulForward {
            out: lg, inp: lnf.slice(r0 * c, rows * c), weight: wte, bias: None, n: rows, c, oc: vp,
        });
        launch(&mut eval, format!("xent[{r0}].fwd"), Kernel::CrossEntropy {
            logits: lg, losses: loss_v.slice(r0, rows), targets: tgt_v.slice(r0, rows), n: rows, v, vp, dloss: 0.0, write_grad: false,
            accumulate: false,
        });
    }

    let (mut train_l, mut zero_grad, mut update, mut hyper) = (Vec::new(), Vec::new(), Vec::new(), None);
    if let (Some(opts), Some(grads), Some(ms), Some(vs)) = (train, grads, ms, vs) {
        let dres = g.buf("dres".into(), n * c, Role::ActGrad);
        let dtmp = g.buf("dtmp".into(), n * c, Role::ActGrad);
        let dqkv = g.buf("dqkv".into(), n * 3 * c, Role::ActGrad);
        let dfch_gelu = g.buf("dfch_gelu".into(), n * 4 * c, Role::ActGrad);
        let dfch = g.buf("dfch".into(), n * 4 * c, Role::ActGrad);
        let hyper_id = g.table.add("hyper", Hyper::LEN, DType::F32, Role::Hyper);
        let parts = g.buf("norm_parts".into(), NUM_PARAM_TENSORS, Role::Scratch);
        let tbl = &g.table;
        let hyper_v = tbl.view(hyper_id);
        hyper = Some(hyper_id);
        let dloss = 1.0 / (n * opts.grad_accum.max(1)) as f32;

        // forward + classifier with its gradient, chunk by chunk
        train_l = fwd;
        for &(r0, rows) in &chunks {
            let lg = logits.slice(0, rows * vp);
            launch(&mut train_l, format!("classifier[{r0}].fwd"), Kernel::MatmulForward {
                out: lg, inp: lnf.slice(r0 * c, rows * c), weight: wte, bias: None, n: rows, c, oc: vp,
            });
            launch(&mut train_l, format!("xent[{r0}]"), Kernel::CrossEntropy {
                logits: lg, losses: loss_v.slice(r0, rows), targets: tgt_v.slice(r0, rows), n: rows, v, vp, dloss, write_grad: true,
                accumulate: true,
            });
            launch(&mut train_l, format!("classifier[{r0}].bwd"), Kernel::MatmulBackward {
                dinp: dtmp.slice(r0 * c, rows * c), dweight: pv(tbl, &grads, idx::WTE), dbias: None, dout: lg,
                inp: lnf.slice(r0 * c, rows * c), weight: wte, n: rows, c, oc: vp,
            });
        }
        // backward: dres carries the gradient of the residual stream
        launch(&mut train_l, "lnf.bwd", Kernel::LayerNormBackward {
            dinp: dres, dweight: pv(tbl, &grads, idx::LNFW), dbias: pv(tbl, &grads, idx::LNFB), dout: dtmp, inp: x_last,
            weight: pv(tbl, &params, idx::LNFW), mean: lnf_mean, rstd: lnf_rstd, n, c, accumulate: false,
        });
        for (l, blk) in blocks.iter().enumerate().rev() {
            let x = if l == 0 { encoded } else { blocks[l - 1].res3 };
            let p = |i| pl(tbl, &params, i, l);
            let d = |i| pl(tbl, &grads, i, l);
            launch(&mut train_l, format!("l{l}.fcproj.bwd"), Kernel::MatmulBackward {
                dinp: dfch_gelu, dweight: d(idx::FCPROJW), dbias: Some(d(idx::FCPROJB)), dout: dres, inp: blk.fch_gelu,
                weight: p(idx::FCPROJW), n, c: 4 * c, oc: c,
            });
            launch(&mut train_l, format!("l{l}.gelu.bwd"), Kernel::GeluBackward { dinp: dfch, inp: blk.fch, dout: dfch_gelu, n: n * 4 * c });
            launch(&mut train_l, format!("l{l}.fc.bwd"), Kernel::MatmulBackward {
                dinp: dtmp, dweight: d(idx::FCW), dbias: Some(d(idx::FCB)), dout: dfch, inp: blk.ln2, weight: p(idx::FCW), n, c, oc: 4 * c,
            });
            launch(&mut train_l, format!("l{l}.ln2.bwd"), Kernel::LayerNormBackward {
                dinp: dres, dweight: d(idx::LN2W), dbias: d(idx::LN2B), dout: dtmp, inp: blk.res2, weight: p(idx::LN2W),
                mean: blk.ln2_mean, rstd: blk.ln2_rstd, n, c, accumulate: true,
            });
            launch(&mut train_l, format!("l{l}.attproj.bwd"), Kernel::MatmulBackward {
                dinp: dtmp, dweight: d(idx::ATTPROJW), dbias: Some(d(idx::ATTPROJB)), dout: dres, inp: blk.atty,
                weight: p(idx::ATTPROJW), n, c, oc: c,
            });
            launch(&mut train_l, format!("l{l}.attn.bwd"), Kernel::AttentionBackward {
                dqkv, dout: dtmp, out: blk.atty, lse: blk.lse, qkv: blk.qkv, b, t, c, nh,
            });
            launch(&mut train_l, format!("l{l}.qkv.bwd"), Kernel::MatmulBackward {
                dinp: dtmp, dweight: d(idx::QKVW), dbias: Some(d(idx::QKVB)), dout: dqkv, inp: blk.ln1, weight: p(idx::QKVW), n, c, oc: 3 * c,
            });
            launch(&mut train_l, format!("l{l}.ln1.bwd"), Kernel::LayerNormBackward {
                dinp: dres, dweight: d(idx::LN1W), dbias: d(idx::LN1B), dout: dtmp, inp: x, weight: p(idx::LN1W),
                mean: blk.ln1_mean, rstd: blk.ln1_rstd, n, c, accumulate: true,
            });
        }
        launch(&mut train_l, "encoder.bwd", Kernel::EncoderBackward {
            dwte: pv(tbl, &grads, idx::WTE), dwpe: pv(tbl, &grads, idx::WPE), dout: dres, tokens: tok_v, b, t, c,
        });

        for i in 0..NUM_PARAM_TENSORS {
            launch(&mut zero_grad, format!("zero.d{}", PARAM_NAMES[i]), Kernel::Zero { out: pv(tbl, &grads, i) });
        }
        // the train phase adds each micro-step's per-position losses here
        launch(&mut zero_grad, "zero.losses", Kernel::Zero { out: loss_v });
        for i in 0..NUM_PARAM_TENSORS {
            launch(&mut update, format!("norm.d{}", PARAM_NAMES[i]), Kernel::SumSquares { out: parts, inp: pv(tbl, &grads, i), slot: i });
        }
        launch(&mut update, "clip", Kernel::ClipScale { hyper: hyper_v, parts, max_norm: opts.grad_clip });
        for i in 0..NUM_PARAM_TENSORS {
            let wd = if opts.decay_all || DECAYED_2D.contains(&i) { opts.weight_decay } else { 0.0 };
            launch(&mut update, format!("adamw.{}", PARAM_NAMES[i]), Kernel::AdamW {
                param: pv(tbl, &params, i), grad: pv(tbl, &grads, i), m: pv(tbl, &ms, i), v: pv(tbl, &vs, i), hyper: hyper_v,
                weight_decay: wd,
            });
        }
    }

    Graph {
        cfg: *cfg,
        b,
        t,
        buffers: g.table,
        io: GraphIo { params, grads, m: ms, v: vs, tokens, targets, losses, logits: logits_id, logits_rows: chunk_rows, hyper },
        zero_grad,
        train: train_l,
        eval,
        update,
    }
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
