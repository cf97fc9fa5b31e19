//! The kernel contract, written once: for every [`Kernel`] variant, which views it reads and which
//! it writes, each view's element class and the length its size arguments require. [`validate`]
//! checks a whole phase against a [`BufferTable`] when the phase is prepared, so backends execute
//! launches without re-checking them (and cannot disagree about what is legal).
//!
//! Token ids are data, not shape: they are checked when a batch is uploaded
//! ([`check_token_ids`], called by `train::Session`), and kernels may assume them valid.

use super::{BufferTable, DType, Kernel, Launch, Scalars, View};
use crate::error::{Error, Result};

/// How a kernel uses a view.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Access {
    /// only read
    Read,
    /// overwritten without being read
    Write,
    /// read and written: accumulated into (`+=`) or transformed in place
    ReadWrite,
}

/// What a view holds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Class {
    /// floating point, in the launch's precision (f32, f16 or bf16: [`Kernel::precision`]; every
    /// float view of a launch has the same)
    Float,
    /// f32 whatever the precision: device scalars, statistics the kernels keep in f32
    F32,
    /// a weight read by a forward kernel: f32, or f16 where [`Kernel::weight_dtypes`] has it
    /// (inference with f16 weights: the kernel converts each value to f32 and accumulates in f32)
    Weight,
    /// i32 token or target ids
    I32,
    /// any dtype (`Zero` clears f32 losses and low-precision gradients alike)
    Any,
}

/// One argument of a kernel.
#[derive(Clone, Copy, Debug)]
pub struct Arg {
    /// the field name in [`Kernel`] (used in error messages)
    pub name: &'static str,
    pub view: View,
    pub access: Access,
    pub class: Class,
    /// the fewest elements the view must have
    pub need: usize,
}

impl Arg {
    pub fn is_output(&self) -> bool {
        self.access != Access::Read
    }
}

fn r(name: &'static str, view: View, need: usize) -> Arg {
    Arg { name, view, access: Access::Read, class: Class::Float, need }
}
fn w(name: &'static str, view: View, need: usize) -> Arg {
    Arg { name, view, access: Access::Write, class: Class::Float, need }
}
fn rw(name: &'static str, view: View, need: usize) -> Arg {
    Arg { name, view, access: Access::ReadWrite, class: Class::Float, need }
}
fn wt(name: &'static str, view: View, need: usize) -> Arg {
    Arg { name, view, access: Access::Read, class: Class::Weight, need }
}
fn ids(name: &'static str, view: View, need: usize) -> Arg {
    Arg { name, view, access: Access::Read, class: Class::I32, need }
}
fn scalars(name: &'static str, view: View, access: Access, need: usize) -> Arg {
    Arg { name, view, access, class: Class::F32, need }
}

impl Kernel {
    /// Every argument, outputs first (in a fixed order), then inputs. The cpu executor hands
    /// kernels their views in this order.
    pub fn args(&self) -> Vec<Arg> {
        use Kernel::*;
        match *self {
            EncoderForward { out, tokens, wte, wpe, b, t, c } => {
                vec![w("out", out, b * t * c), ids("tokens", tokens, b * t), r("wte", wte, c), r("wpe", wpe, t * c)]
            }
            EncoderBackward { dwte, dwpe, dout, tokens, b, t, c } => vec![
                rw("dwte", dwte, c),
                rw("dwpe", dwpe, t * c),
                r("dout", dout, b * t * c),
                ids("tokens", tokens, b * t),
            ],
            LayerNormForward { out, mean, rstd, inp, weight, bias, n, c } => vec![
                w("out", out, n * c),
                Arg { class: Class::F32, ..w("mean", mean, n) },
                Arg { class: Class::F32, ..w("rstd", rstd, n) },
                r("inp", inp, n * c),
                r("weight", weight, c),
                r("bias", bias, c),
            ],
            LayerNormBackward { dinp, dweight, dbias, dout, inp, weight, mean, rstd, n, c, accumulate } => vec![
                if accumulate { rw("dinp", dinp, n * c) } else { w("dinp", dinp, n * c) },
                rw("dweight", dweight, c),
                rw("dbias", dbias, c),
                r("dout", dout, n * c),
                r("inp", inp, n * c),
                r("weight", weight, c),
                Arg { class: Class::F32, ..r("mean", mean, n) },
                Arg { class: Class::F32, ..r("rstd", rstd, n) },
            ],
            MatmulForward { out, inp, weight, bias, n, c, oc } => {
                let mut v = vec![w("out", out, n * oc), r("inp", inp, n * c), wt("weight", weight, oc * c)];
                v.extend(bias.map(|b| r("bias", b, oc)));
                v
            }
            MatmulBackward { dinp, dweight, dbias, dout, inp, weight, n, c, oc } => {
                let mut v = vec![w("dinp", dinp, n * c), rw("dweight", dweight, oc * c)];
                v.extend(dbias.map(|b| rw("dbias", b, oc)));
                v.extend([r("dout", dout, n * oc), r("inp", inp, n * c), r("weight", weight, oc * c)]);
                v
            }
            AttentionForward { out, lse, qkv, b, t, c, nh } => vec![
                w("out", out, b * t * c),
                Arg { class: Class::F32, ..w("lse", lse, b * nh * t) },
                r("qkv", qkv, b * t * 3 * c),
            ],
            AttentionBackward { dqkv, dout, out, lse, qkv, b, t, c, nh } => vec![
                w("dqkv", dqkv, b * t * 3 * c),
                r("dout", dout, b * t * c),
                r("out", out, b * t * c),
                Arg { class: Class::F32, ..r("lse", lse, b * nh * t) },
                r("qkv", qkv, b * t * 3 * c),
            ],
            EncoderAt { out, tokens, pos, wte, wpe, n, c } => vec![
                w("out", out, n * c),
                ids("tokens", tokens, n),
                ids("pos", pos, n),
                wt("wte", wte, c),
                wt("wpe", wpe, c),
            ],
            KvStore { kcache, vcache, qkv, slots, pos, n, c, tmax } => vec![
                rw("kcache", kcache, tmax * c),
                rw("vcache", vcache, tmax * c),
                r("qkv", qkv, n * 3 * c),
                ids("slots", slots, n),
                ids("pos", pos, n),
            ],
            AttentionCached { out, qkv, kcache, vcache, slots, pos, n, c, tmax, .. } => vec![
                w("out", out, n * c),
                r("qkv", qkv, n * 3 * c),
                r("kcache", kcache, tmax * c),
                r("vcache", vcache, tmax * c),
                ids("slots", slots, n),
                ids("pos", pos, n),
            ],
            GeluForward { out, inp, n } => vec![w("out", out, n), r("inp", inp, n)],
            GeluBackward { dinp, inp, dout, n } => vec![w("dinp", dinp, n), r("inp", inp, n), r("dout", dout, n)],
            ResidualForward { out, a, b, n } => vec![w("out", out, n), r("a", a, n), r("b", b, n)],
            CrossEntropy { logits, losses, targets, dloss, n, vp, write_grad, accumulate, .. } => {
                let loss_access = if accumulate { Access::ReadWrite } else { Access::Write };
                let losses = Arg { class: Class::F32, access: loss_access, ..w("losses", losses, n) };
                let (targets, dloss) = (ids("targets", targets, n), scalars("dloss", dloss, Access::Read, 1));
                if write_grad {
                    vec![rw("logits", logits, n * vp), losses, targets, dloss]
                } else {
                    vec![losses, r("logits", logits, n * vp), targets, dloss]
                }
            }
            Zero { out } => vec![Arg { class: Class::Any, ..w("out", out, 0) }],
            SumSquares { out, inp, slot } => {
                vec![Arg { class: Class::F32, ..rw("out", out, slot + 1) }, r("inp", inp, 0)]
            }
            ClipScale { hyper, parts, .. } => vec![
                scalars("hyper", hyper, Access::ReadWrite, Scalars::LEN),
                Arg { class: Class::F32, ..r("parts", parts, 0) },
            ],
            AdamW { param, master, grad, m, v, hyper, .. } => {
                let n = param.len;
                let mut a = vec![rw("param", param, n)];
                a.extend(master.map(|w| Arg { class: Class::F32, ..rw("master", w, n) }));
                a.extend([
                    Arg { class: Class::F32, ..rw("m", m, n) },
                    Arg { class: Class::F32, ..rw("v", v, n) },
                    r("grad", grad, n),
                    scalars("hyper", hyper, Access::Read, Scalars::LEN),
                ]);
                a
            }
        }
    }

    /// Views the kernel writes or accumulates into, in `args` order.
    pub fn outputs(&self) -> Vec<View> {
        self.args().iter().filter(|a| a.is_output()).map(|a| a.view).collect()
    }

    /// Views the kernel only reads, in `args` order.
    pub fn inputs(&self) -> Vec<View> {
        self.args().iter().filter(|a| !a.is_output()).map(|a| a.view).collect()
    }

    /// The float dtypes this kernel is defined in: every `Class::Float` view of one launch has
    /// the same one, the launch's precision ([`Kernel::precision`]). Every kernel exists in
    /// f32, f16 and bf16 (storage in that format, arithmetic in f32); which a backend has kernels
    /// for is [`crate::backend::Backend::precisions`].
    pub fn precisions(&self) -> &'static [DType] {
        &[DType::F32, DType::F16, DType::BF16]
    }

    /// The launch's precision: the dtype of its float views (f32 when it has none, like
    /// `ClipScale`), in `table`.
    pub fn precision(&self, table: &super::BufferTable) -> DType {
        self.args()
            .iter()
            .find(|a| a.class == Class::Float)
            .and_then(|a| table.try_get(a.view.buf))
            .map_or(DType::F32, |b| b.dtype)
    }

    /// The dtypes a [`Class::Weight`] view may have: f16 weights exist for the forward kernels
    /// that inference runs (the matmul and the cached encoder), every backend having f16.
    pub fn weight_dtypes(&self) -> &'static [DType] {
        match self {
            Kernel::MatmulForward { .. } | Kernel::EncoderAt { .. } => &[DType::F32, DType::F16],
            _ => &[DType::F32],
        }
    }

    /// Constraints between size arguments that no view length expresses.
    fn check_sizes(&self) -> std::result::Result<(), String> {
        use Kernel::*;
        match *self {
            AttentionForward { c, nh, .. } | AttentionBackward { c, nh, .. } | AttentionCached { c, nh, .. } if nh == 0 || !c.is_multiple_of(nh) => {
                Err(format!("channels {c} are not a multiple of heads {nh}"))
            }
            KvStore { kcache, vcache, c, tmax, .. } | AttentionCached { kcache, vcache, c, tmax, .. }
                if kcache.len != vcache.len || !kcache.len.is_multiple_of((tmax * c).max(1)) =>
            {
                Err(format!("caches of {} and {} elements are not both (slots, tmax {tmax}, c {c})", kcache.len, vcache.len))
            }
            CrossEntropy { v, vp, .. } if v == 0 || v > vp => Err(format!("vocab {v} must be in [1, padded vocab {vp}]")),
            _ => Ok(()),
        }
    }

    /// The id views and the exclusive bound of their values: (view, count, bound, what).
    pub fn id_bounds(&self) -> Vec<(View, usize, usize, &'static str)> {
        match *self {
            Kernel::EncoderForward { tokens, wte, b, t, c, .. } => vec![(tokens, b * t, wte.len / c.max(1), "token")],
            Kernel::EncoderBackward { tokens, dwte, b, t, c, .. } => vec![(tokens, b * t, dwte.len / c.max(1), "token")],
            Kernel::CrossEntropy { targets, n, v, .. } => vec![(targets, n, v, "target")],
            Kernel::EncoderAt { tokens, pos, wte, wpe, n, c, .. } => {
                vec![(tokens, n, wte.len / c.max(1), "token"), (pos, n, wpe.len / c.max(1), "position")]
            }
            Kernel::KvStore { kcache, slots, pos, n, c, tmax, .. } | Kernel::AttentionCached { kcache, slots, pos, n, c, tmax, .. } => {
                vec![(slots, n, kcache.len / (tmax * c).max(1), "cache slot"), (pos, n, tmax, "position")]
            }
            _ => vec![],
        }
    }
}

fn bad(label: &str, msg: impl std::fmt::Display) -> Error {
    Error::Internal(format!("launch '{label}': {msg}"))
}

/// Checks every launch against the buffer table: each view lies inside its buffer, has the
/// element class and length the kernel's signature requires, the outputs of one launch do not
/// overlap, the size arguments agree, and every float view is in a precision the kernel has.
/// Called once when a phase is prepared; a failure is a bug in whoever built the graph.
pub fn validate(table: &BufferTable, launches: &[Launch]) -> Result<()> {
    for l in launches {
        validate_one(table, l)?;
    }
    Ok(())
}

fn validate_one(table: &BufferTable, l: &Launch) -> Result<()> {
    let label = l.label.as_str();
    let k = &l.kernel;
    k.check_sizes().map_err(|m| bad(label, m))?;
    let args = k.args();
    let precision = k.precision(table);
    for a in &args {
        let Some(buf) = table.try_get(a.view.buf) else {
            return Err(bad(label, format!("{} names unknown buffer id {}", a.name, a.view.buf.0)));
        };
        let end = a.view.offset.checked_add(a.view.len);
        if end.is_none_or(|e| e > buf.len) {
            return Err(bad(
                label,
                format!("{} view [{}, +{}) exceeds buffer '{}' of {} elements", a.name, a.view.offset, a.view.len, buf.name, buf.len),
            ));
        }
        if a.view.len < a.need {
            return Err(bad(label, format!("{} ('{}') has {} elements, needs {}", a.name, buf.name, a.view.len, a.need)));
        }
        let ok = match a.class {
            Class::I32 => buf.dtype == DType::I32,
            Class::F32 => buf.dtype == DType::F32,
            Class::Weight => k.weight_dtypes().contains(&buf.dtype) || buf.dtype == precision,
            Class::Float => k.precisions().contains(&buf.dtype),
            Class::Any => true,
        };
        if !ok {
            let want = match a.class {
                Class::I32 => "i32".to_string(),
                Class::F32 => "f32".to_string(),
                Class::Weight => k.weight_dtypes().iter().map(|d| d.name()).collect::<Vec<_>>().join("/"),
                Class::Float => k.precisions().iter().map(|d| d.name()).collect::<Vec<_>>().join("/"),
                Class::Any => unreachable!("any dtype is accepted"),
            };
            return Err(bad(
                label,
                format!("{} must be {want} but buffer '{}' is {} (no {} kernel for it exists)", a.name, buf.name, buf.dtype, k.family()),
            ));
        }
    }
    if let Some(a) = args.iter().find(|a| a.class == Class::Float && table.get(a.view.buf).dtype != precision) {
        return Err(bad(
            label,
            format!("{} ('{}') is {} but the launch's precision is {precision}: one launch has one precision", a.name, table.get(a.view.buf).name, table.get(a.view.buf).dtype),
        ));
    }
    if let Kernel::AdamW { master: Some(_), .. } = k {
        if precision == DType::F32 {
            return Err(bad(label, "f32 master weights are for low-precision parameters; an f32 param is its own master"));
        }
    }
    let outs: Vec<&Arg> = args.iter().filter(|a| a.is_output()).collect();
    for (x, a) in outs.iter().enumerate() {
        if let Some(b) = outs[x + 1..].iter().find(|b| overlaps(&a.view, &b.view)) {
            return Err(bad(label, format!("outputs {} and {} overlap in buffer '{}'", a.name, b.name, table.get(a.view.buf).name)));
        }
    }
    Ok(())
}

/// Two views share at least one element.
pub fn overlaps(a: &View, b: &View) -> bool {
    a.buf == b.buf && a.len > 0 && b.len > 0 && a.offset < b.offset + b.len && b.offset < a.offset + a.len
}

/// The first id outside `[0, bound)`, as (position, id).
pub fn check_token_ids(ids: &[i32], bound: usize) -> std::result::Result<(), (usize, i32)> {
    match ids.iter().position(|&x| x < 0 || x as usize >= bound) {
        Some(i) => Err((i, ids[i])),
        None => Ok(()),
    }
}
