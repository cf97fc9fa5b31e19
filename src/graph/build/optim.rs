//! The optimiser phases of a training graph: `ZeroGrad` (gradients and summed losses to zero),
//! `GradNorm` (the global gradient norm and clip scale) and `Update` (AdamW on every tensor).

use super::{launch, Net, TrainBufs, TrainOptions};
use crate::graph::{Kernel, Launch};
use crate::model::params::DECAYED_2D;
use crate::model::PARAM_NAMES;

/// Zero every parameter gradient, and the losses the `Train` micro-steps add up.
pub(super) fn zero_grad(net: &Net, tb: &TrainBufs) -> Vec<Launch> {
    let mut out = Vec::new();
    for (i, name) in PARAM_NAMES.iter().enumerate() {
        launch(&mut out, format!("zero.d{name}"), Kernel::Zero { out: tb.grads.whole(i) });
    }
    launch(&mut out, "zero.losses", Kernel::Zero { out: net.io.losses });
    out
}

/// Σ grad² of each tensor into its `norm_parts` slot, then the norm and the clip scale into the
/// scalars.
pub(super) fn grad_norm(net: &Net, tb: &TrainBufs, opts: &TrainOptions) -> Vec<Launch> {
    let mut out = Vec::new();
    for (i, name) in PARAM_NAMES.iter().enumerate() {
        launch(&mut out, format!("norm.d{name}"), Kernel::SumSquares { out: tb.norm_parts, inp: tb.grads.whole(i), slot: i });
    }
    launch(&mut out, "clip", Kernel::ClipScale { hyper: net.io.scalars, parts: tb.norm_parts, max_norm: opts.grad_clip });
    out
}

/// AdamW on each tensor; weight decay on every tensor with `decay_all`, else on the 2-D weights.
pub(super) fn update(net: &Net, tb: &TrainBufs, opts: &TrainOptions) -> Vec<Launch> {
    let mut out = Vec::new();
    for (i, name) in PARAM_NAMES.iter().enumerate() {
        let weight_decay = if opts.decay_all || DECAYED_2D.contains(&i) { opts.weight_decay } else { 0.0 };
        launch(&mut out, format!("adamw.{name}"), Kernel::AdamW {
            param: net.params.whole(i), grad: tb.grads.whole(i), m: tb.m.whole(i), v: tb.v.whole(i), hyper: net.io.scalars,
            weight_decay,
        });
    }
    out
}
