//! The forward pass, shared by `Train` and `Eval`: the activations it saves ([`Activations`], one
//! [`Block`] per layer), `block_forward` for one transformer block, the encoder and final
//! layernorm around the blocks, and the classifier + loss chunks of `Eval`.

use super::{launch, Builder, Dims, LayerTensors, Net};
use crate::graph::{Kernel, Launch, Role, View};
use crate::model::params::idx;

/// Activations of one transformer block, saved for the backward pass.
pub(super) struct Block {
    /// the block's input: the encoder output or the previous block's `res3` (not a buffer of its own)
    pub inp: View,
    pub ln1: View,
    pub ln1_mean: View,
    pub ln1_rstd: View,
    pub qkv: View,
    pub atty: View,
    pub lse: View,
    pub attproj: View,
    pub res2: View,
    pub ln2: View,
    pub ln2_mean: View,
    pub ln2_rstd: View,
    pub fch: View,
    pub fch_gelu: View,
    pub fcproj: View,
    /// the block's output
    pub res3: View,
}

/// Every activation of the graph.
pub(super) struct Activations {
    /// what backward recomputes (`TrainOptions::recompute`)
    pub recompute: u8,
    /// the encoder output, input of block 0
    pub encoded: View,
    pub blocks: Vec<Block>,
    /// the final layernorm's output and statistics
    pub lnf: View,
    pub lnf_mean: View,
    pub lnf_rstd: View,
    /// one chunk of logits, `chunk_rows` × Vp
    pub logits: View,
    pub chunk_rows: usize,
    /// (first row, rows) of each classifier chunk
    pub chunks: Vec<(usize, usize)>,
}

impl Activations {
    /// Adds the activation buffers of `layers` blocks to the table. With `recompute` ≥ 1 every
    /// block writes its GELU output into one shared buffer, and with 2 its layernorm outputs too
    /// (backward recomputes them, see `backward::block_backward`).
    pub fn new(g: &mut Builder, d: Dims, layers: usize, recompute: u8) -> Activations {
        let Dims { b, t, n, c, nh, vp, .. } = d;
        let encoded = g.act("encoded", n * c, Role::Activation);
        let shared = |g: &mut Builder, level: u8, name: &str, len: usize| (recompute >= level).then(|| g.act(name.to_string(), len, Role::Activation));
        let (gelu_all, ln1_all, ln2_all) = (shared(g, 1, "fch_gelu", n * 4 * c), shared(g, 2, "ln1", n * c), shared(g, 2, "ln2", n * c));
        let mut blocks: Vec<Block> = Vec::with_capacity(layers);
        for l in 0..layers {
            let inp = blocks.last().map_or(encoded, |prev| prev.res3);
            // activations in the graph's precision; statistics (`stat`) in f32
            let mut act = |name: &str, len: usize| g.act(format!("l{l}.{name}"), len, Role::Activation);
            let ln1 = ln1_all.unwrap_or_else(|| act("ln1", n * c));
            let (qkv, atty) = (act("qkv", n * 3 * c), act("atty", n * c));
            let mut stat = |name: &str, len: usize| g.buf(format!("l{l}.{name}"), len, Role::Activation);
            let (ln1_mean, ln1_rstd, lse) = (stat("ln1_mean", n), stat("ln1_rstd", n), stat("att_lse", b * nh * t));
            let (ln2_mean, ln2_rstd) = (stat("ln2_mean", n), stat("ln2_rstd", n));
            let mut act = |name: &str, len: usize| g.act(format!("l{l}.{name}"), len, Role::Activation);
            blocks.push(Block {
                inp,
                ln1,
                ln1_mean,
                ln1_rstd,
                qkv,
                atty,
                lse,
                attproj: act("attproj", n * c),
                res2: act("res2", n * c),
                ln2: ln2_all.unwrap_or_else(|| act("ln2", n * c)),
                ln2_mean,
                ln2_rstd,
                fch: act("fch", n * 4 * c),
                fch_gelu: gelu_all.unwrap_or_else(|| act("fch_gelu", n * 4 * c)),
                fcproj: act("fcproj", n * c),
                res3: act("res3", n * c),
            });
        }
        let lnf = g.act("lnf", n * c, Role::Activation);
        let lnf_mean = g.buf("lnf_mean", n, Role::Activation);
        let lnf_rstd = g.buf("lnf_rstd", n, Role::Activation);
        let chunk_rows = super::classifier_chunk_rows(n, t, vp);
        let logits = g.act("logits", chunk_rows * vp, Role::Activation);
        let chunks = (0..n).step_by(chunk_rows).map(|r0| (r0, chunk_rows.min(n - r0))).collect();
        Activations { recompute, encoded, blocks, lnf, lnf_mean, lnf_rstd, logits, chunk_rows, chunks }
    }

    /// The input of the final layernorm: the last block's output (the encoder's with no blocks).
    pub fn last(&self) -> View {
        self.blocks.last().map_or(self.encoded, |blk| blk.res3)
    }
}

/// The forward pass up to the final layernorm: encoder, every block, lnf.
pub(super) fn forward(net: &Net) -> Vec<Launch> {
    let Dims { b, t, n, c, .. } = net.d;
    let (a, p) = (&net.acts, &net.params);
    let mut out = Vec::new();
    launch(&mut out, "encoder.fwd", Kernel::EncoderForward {
        out: a.encoded, tokens: net.io.tokens, wte: p.whole(idx::WTE), wpe: p.whole(idx::WPE), b, t, c,
    });
    for (l, blk) in a.blocks.iter().enumerate() {
        let attn = Kernel::AttentionForward { out: blk.atty, lse: blk.lse, qkv: blk.qkv, b, t, c, nh: net.d.nh };
        block_forward(&mut out, l, blk, &p.block(l), net.d, vec![("attn", attn)]);
    }
    launch(&mut out, "lnf.fwd", Kernel::LayerNormForward {
        out: a.lnf, mean: a.lnf_mean, rstd: a.lnf_rstd, inp: a.last(), weight: p.whole(idx::LNFW), bias: p.whole(idx::LNFB), n, c,
    });
    out
}

/// Block `l`: x → ln1 → qkv → attention → attproj → res2 = x + attproj → ln2 → fc → gelu → fcproj
/// → res3 = res2 + fcproj, with weights `w`, over `d.n` rows. `attention` is the attention launch
/// (causal over whole sequences when training; over the KV cache when decoding), which reads
/// `blk.qkv` and writes `blk.atty`: (label suffix, kernel) launches run between the two.
pub(super) fn block_forward(out: &mut Vec<Launch>, l: usize, blk: &Block, w: &LayerTensors, d: Dims, attention: Vec<(&str, Kernel)>) {
    let Dims { n, c, .. } = d;
    launch(out, format!("l{l}.ln1.fwd"), Kernel::LayerNormForward {
        out: blk.ln1, mean: blk.ln1_mean, rstd: blk.ln1_rstd, inp: blk.inp, weight: w.ln1w, bias: w.ln1b, n, c,
    });
    launch(out, format!("l{l}.qkv.fwd"), Kernel::MatmulForward {
        out: blk.qkv, inp: blk.ln1, weight: w.qkvw, bias: Some(w.qkvb), n, c, oc: 3 * c,
    });
    for (name, k) in attention {
        launch(out, format!("l{l}.{name}.fwd"), k);
    }
    launch(out, format!("l{l}.attproj.fwd"), Kernel::MatmulForward {
        out: blk.attproj, inp: blk.atty, weight: w.attprojw, bias: Some(w.attprojb), n, c, oc: c,
    });
    launch(out, format!("l{l}.res2.fwd"), Kernel::ResidualForward { out: blk.res2, a: blk.inp, b: blk.attproj, n: n * c });
    launch(out, format!("l{l}.ln2.fwd"), Kernel::LayerNormForward {
        out: blk.ln2, mean: blk.ln2_mean, rstd: blk.ln2_rstd, inp: blk.res2, weight: w.ln2w, bias: w.ln2b, n, c,
    });
    launch(out, format!("l{l}.fc.fwd"), Kernel::MatmulForward {
        out: blk.fch, inp: blk.ln2, weight: w.fcw, bias: Some(w.fcb), n, c, oc: 4 * c,
    });
    launch(out, format!("l{l}.gelu.fwd"), Kernel::GeluForward { out: blk.fch_gelu, inp: blk.fch, n: n * 4 * c });
    launch(out, format!("l{l}.fcproj.fwd"), Kernel::MatmulForward {
        out: blk.fcproj, inp: blk.fch_gelu, weight: w.fcprojw, bias: Some(w.fcprojb), n, c: 4 * c, oc: c,
    });
    launch(out, format!("l{l}.res3.fwd"), Kernel::ResidualForward { out: blk.res3, a: blk.res2, b: blk.fcproj, n: n * c });
}

/// The logits of rows [r0, r0 + rows) into the start of the `logits` buffer: lnf · wteᵀ.
/// Returns the view of them.
pub(super) fn classifier_chunk(out: &mut Vec<Launch>, net: &Net, r0: usize, rows: usize) -> View {
    let Dims { c, vp, .. } = net.d;
    let logits = net.acts.logits.slice(0, rows * vp);
    launch(out, format!("classifier[{r0}].fwd"), Kernel::MatmulForward {
        out: logits, inp: net.acts.lnf.slice(r0 * c, rows * c), weight: net.params.whole(idx::WTE), bias: None, n: rows, c, oc: vp,
    });
    logits
}

/// `Eval`'s classifier and loss, chunk by chunk, in reverse so rows [0, chunk_rows) stay in
/// `logits`; losses are written (not accumulated) and no gradient is formed.
pub(super) fn eval_loss(net: &Net, out: &mut Vec<Launch>) {
    let Dims { v, vp, .. } = net.d;
    let io = &net.io;
    for &(r0, rows) in net.acts.chunks.iter().rev() {
        let logits = classifier_chunk(out, net, r0, rows);
        launch(out, format!("xent[{r0}].fwd"), Kernel::CrossEntropy {
            logits, losses: io.losses.slice(r0, rows), targets: io.targets.slice(r0, rows), dloss: io.dloss, n: rows, v, vp,
            write_grad: false, accumulate: false,
        });
    }
}
