//! The backward half of `Train`: the classifier + loss chunks that form the logits gradient,
//! the final layernorm's backward, `block_backward` for each block in reverse, and the encoder's
//! backward; plus the activation-gradient buffers ([`ActGrads`]) every block reuses.

use super::{forward::Block, launch, Builder, Dims, LayerTensors, Net, TrainBufs};
use crate::graph::{Kernel, Launch, Role, View};
use crate::model::params::idx;

/// Activation gradients, one set shared by every block (the backward pass visits one block at a
/// time).
pub(super) struct ActGrads {
    /// the gradient of the residual stream, carried from block to block
    pub dres: View,
    /// (n, c) scratch: the gradient of a layernorm's output or an attention output
    pub dtmp: View,
    pub dqkv: View,
    pub dfch_gelu: View,
    pub dfch: View,
}

impl ActGrads {
    /// Adds the activation-gradient buffers to the table.
    pub fn new(g: &mut Builder, d: Dims) -> ActGrads {
        let Dims { n, c, .. } = d;
        ActGrads {
            dres: g.act("dres", n * c, Role::ActGrad),
            dtmp: g.act("dtmp", n * c, Role::ActGrad),
            dqkv: g.act("dqkv", n * 3 * c, Role::ActGrad),
            dfch_gelu: g.act("dfch_gelu", n * 4 * c, Role::ActGrad),
            dfch: g.act("dfch", n * 4 * c, Role::ActGrad),
        }
    }
}

/// Appends to `out` (which holds the forward pass) the classifier and loss with their gradient,
/// then the backward pass down to the encoder. Parameter gradients are accumulated.
/// Returns, for each block in the order backward finishes them, (the number of launches in `out`
/// once block l's backward is done, l): from there on layer l's weight gradients are final.
pub(super) fn backward(net: &Net, tb: &TrainBufs, out: &mut Vec<Launch>) -> Vec<(usize, usize)> {
    let Dims { b, t, n, c, .. } = net.d;
    let (a, p, dp, dg) = (&net.acts, &net.params, &tb.grads, &tb.dacts);
    classifier_and_loss(net, tb, out);
    // from here on dres carries the gradient of the residual stream
    launch(out, "lnf.bwd", Kernel::LayerNormBackward {
        dinp: dg.dres, dweight: dp.whole(idx::LNFW), dbias: dp.whole(idx::LNFB), dout: dg.dtmp, inp: a.last(),
        weight: p.whole(idx::LNFW), mean: a.lnf_mean, rstd: a.lnf_rstd, n, c, accumulate: false,
    });
    let mut done = Vec::new();
    for (l, blk) in a.blocks.iter().enumerate().rev() {
        block_backward(out, l, blk, &p.block(l), &dp.block(l), dg, net.d, a.recompute);
        done.push((out.len(), l));
    }
    launch(out, "encoder.bwd", Kernel::EncoderBackward {
        dwte: dp.whole(idx::WTE), dwpe: dp.whole(idx::WPE), dout: dg.dres, tokens: net.io.tokens, b, t, c,
    });
    done
}

/// Chunk by chunk: logits, loss (added to `losses`) with dlogits in place of the logits, and the
/// classifier's backward into dwte and `dtmp` (the gradient of lnf's output).
fn classifier_and_loss(net: &Net, tb: &TrainBufs, out: &mut Vec<Launch>) {
    let Dims { c, v, vp, .. } = net.d;
    let (io, lnf) = (&net.io, net.acts.lnf);
    for &(r0, rows) in &net.acts.chunks {
        let logits = super::forward::classifier_chunk(out, net, r0, rows);
        launch(out, format!("xent[{r0}]"), Kernel::CrossEntropy {
            logits, losses: io.losses.slice(r0, rows), targets: io.targets.slice(r0, rows), dloss: io.dloss, n: rows, v, vp,
            write_grad: true, accumulate: true,
        });
        launch(out, format!("classifier[{r0}].bwd"), Kernel::MatmulBackward {
            dinp: tb.dacts.dtmp.slice(r0 * c, rows * c), dweight: tb.grads.whole(idx::WTE), dbias: None, dout: logits,
            inp: lnf.slice(r0 * c, rows * c), weight: net.params.whole(idx::WTE), n: rows, c, oc: vp,
        });
    }
}

/// Block `l` in reverse, from dres (the gradient of its output `res3`) back to dres (the gradient
/// of its input): the MLP branch, then the attention branch. Each layernorm's backward adds its
/// input gradient to dres, which already holds the residual path's; weight gradients go to `dw`.
/// With `recompute`, the shared GELU (≥ 1) and layernorm (2) outputs are recomputed from the
/// saved inputs right before the launch that reads them (the layernorms rewrite their saved
/// mean and rstd with the same values).
#[allow(clippy::too_many_arguments)]
fn block_backward(out: &mut Vec<Launch>, l: usize, blk: &Block, w: &LayerTensors, dw: &LayerTensors, dg: &ActGrads, d: Dims, recompute: u8) {
    let Dims { b, t, n, c, nh, .. } = d;
    if recompute >= 1 {
        launch(out, format!("l{l}.gelu.recompute"), Kernel::GeluForward { out: blk.fch_gelu, inp: blk.fch, n: n * 4 * c });
    }
    launch(out, format!("l{l}.fcproj.bwd"), Kernel::MatmulBackward {
        dinp: dg.dfch_gelu, dweight: dw.fcprojw, dbias: Some(dw.fcprojb), dout: dg.dres, inp: blk.fch_gelu,
        weight: w.fcprojw, n, c: 4 * c, oc: c,
    });
    launch(out, format!("l{l}.gelu.bwd"), Kernel::GeluBackward { dinp: dg.dfch, inp: blk.fch, dout: dg.dfch_gelu, n: n * 4 * c });
    if recompute >= 2 {
        launch(out, format!("l{l}.ln2.recompute"), Kernel::LayerNormForward {
            out: blk.ln2, mean: blk.ln2_mean, rstd: blk.ln2_rstd, inp: blk.res2, weight: w.ln2w, bias: w.ln2b, n, c,
        });
    }
    launch(out, format!("l{l}.fc.bwd"), Kernel::MatmulBackward {
        dinp: dg.dtmp, dweight: dw.fcw, dbias: Some(dw.fcb), dout: dg.dfch, inp: blk.ln2, weight: w.fcw, n, c, oc: 4 * c,
    });
    launch(out, format!("l{l}.ln2.bwd"), Kernel::LayerNormBackward {
        dinp: dg.dres, dweight: dw.ln2w, dbias: dw.ln2b, dout: dg.dtmp, inp: blk.res2, weight: w.ln2w,
        mean: blk.ln2_mean, rstd: blk.ln2_rstd, n, c, accumulate: true,
    });
    launch(out, format!("l{l}.attproj.bwd"), Kernel::MatmulBackward {
        dinp: dg.dtmp, dweight: dw.attprojw, dbias: Some(dw.attprojb), dout: dg.dres, inp: blk.atty,
        weight: w.attprojw, n, c, oc: c,
    });
    launch(out, format!("l{l}.attn.bwd"), Kernel::AttentionBackward {
        dqkv: dg.dqkv, dout: dg.dtmp, out: blk.atty, lse: blk.lse, qkv: blk.qkv, b, t, c, nh,
    });
    if recompute >= 2 {
        launch(out, format!("l{l}.ln1.recompute"), Kernel::LayerNormForward {
            out: blk.ln1, mean: blk.ln1_mean, rstd: blk.ln1_rstd, inp: blk.inp, weight: w.ln1w, bias: w.ln1b, n, c,
        });
    }
    launch(out, format!("l{l}.qkv.bwd"), Kernel::MatmulBackward {
        dinp: dg.dtmp, dweight: dw.qkvw, dbias: Some(dw.qkvb), dout: dg.dqkv, inp: blk.ln1, weight: w.qkvw, n, c, oc: 3 * c,
    });
    launch(out, format!("l{l}.ln1.bwd"), Kernel::LayerNormBackward {
        dinp: dg.dres, dweight: dw.ln1w, dbias: dw.ln1b, dout: dg.dtmp, inp: blk.inp, weight: w.ln1w,
        mean: blk.ln1_mean, rstd: blk.ln1_rstd, n, c, accumulate: true,
    });
}
