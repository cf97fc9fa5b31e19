//! The optimiser phases of a training graph: `ZeroGrad` (gradients and summed losses to zero),
//! `GradNorm` (the global gradient norm and clip scale) and `Update` (AdamW on every tensor).

use super::{launch, Moments, Net, TrainBufs, TrainOptions};
use crate::graph::{Kernel, Launch};
use crate::model::params::DECAYED_2D;
use crate::model::{ParamLayout, NUM_PARAM_TENSORS, PARAM_NAMES};

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

/// Each tensor's weight decay: `opts.weight_decay` on every tensor with `decay_all`, else on the
/// 2-D weights only.
pub(super) fn weight_decays(opts: &TrainOptions) -> [f32; NUM_PARAM_TENSORS] {
    std::array::from_fn(|i| if opts.decay_all || DECAYED_2D.contains(&i) { opts.weight_decay } else { 0.0 })
}

/// AdamW on each tensor; weight decay on every tensor with `decay_all`, else on the 2-D weights.
/// With ZeRO-1 moments, on the part of each tensor inside the rank's range only.
pub(super) fn update(net: &Net, tb: &TrainBufs, opts: &TrainOptions, layout: &ParamLayout) -> Vec<Launch> {
    let mut out = Vec::new();
    let decays = weight_decays(opts);
    for (i, name) in PARAM_NAMES.iter().enumerate() {
        let weight_decay = decays[i];
        let (param, grad) = (net.params.whole(i), tb.grads.whole(i));
        let hyper = net.io.scalars;
        match &tb.moments {
            Moments::Full { m, v } => {
                let master = tb.masters.map(|w| w.whole(i));
                launch(&mut out, format!("adamw.{name}"), Kernel::AdamW { param, master, grad, m: m.whole(i), v: v.whole(i), hyper, weight_decay });
            }
            Moments::Host => {}
            Moments::Shard { m, v, range } => {
                // tensor i holds flat parameters [o, o + size); this rank updates its overlap with `range`
                let (o, size) = (layout.offsets[i], layout.sizes[i]);
                let (lo, hi) = (range.start.max(o), range.end.min(o + size));
                if lo >= hi {
                    continue;
                }
                let (at, len, mo) = (lo - o, hi - lo, lo - range.start);
                launch(&mut out, format!("adamw.{name}"), Kernel::AdamW {
                    param: param.slice(at, len),
                    master: tb.masters.map(|w| w.whole(i).slice(at, len)),
                    grad: grad.slice(at, len),
                    m: m.slice(mo, len),
                    v: v.slice(mo, len),
                    hyper,
                    weight_decay,
                });
            }
        }
    }
    out
}
