//! The kernel vocabulary: every operation a backend must implement. A `Launch` is one kernel with
//! its buffer views and static scalars. Backends map each variant to an implementation
//! (`src/backend/cpu/kernels.rs`, `shaders/<family>.wgsl`, `cuda/<family>.cu`) and know nothing else.
//!
//! Conventions, for all backends:
//! * A `View` is `len` elements of buffer `buf` starting at element `offset` (f32 unless stated).
//! * Row-major activations: `(n, c)` means n rows of c contiguous values; n = B·T.
//! * Matrices are (out, in) like nn.Linear: y = x·Wᵀ + b.
//! * "writes" means the output is overwritten; "adds" means the kernel accumulates (+=) into it.
//!   Parameter gradients are always accumulated (so micro-batches add up); activation gradients are
//!   written, except where `accumulate` says otherwise.
//! * `hyper`/`dloss` views read the per-step device scalars, see [`Scalars`]; no per-step value is
//!   baked into a launch.
//! * What each kernel reads and writes, with dtypes and lengths, is declared once in
//!   `signature.rs`; `graph::validate` checks it when a phase is prepared.

/// Identifies one buffer in a [`crate::graph::BufferTable`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct BufId(pub u32);

/// `len` elements of buffer `buf` starting at element `offset`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct View {
    pub buf: BufId,
    pub offset: usize,
    pub len: usize,
}

impl View {
    /// The sub-view `[start, start+len)` of this view.
    pub fn slice(&self, start: usize, len: usize) -> View {
        assert!(start + len <= self.len, "view slice out of range");
        View { buf: self.buf, offset: self.offset + start, len }
    }
}

/// Slots of the per-step device scalars buffer (f32, `Scalars::LEN` slots; named `scalars` in a
/// graph). Everything that changes from step to step lives here, so a prepared phase replays
/// unchanged: the host writes the optimiser slots before `Update` and the loss seed when the
/// batch shape or world changes; `ClipScale` writes GRAD_SCALE and GRAD_NORM on the device.
/// Decoding needs no slot here: each sequence of a batch is at its own position, so positions
/// and cache slots are per-row i32 buffers (see [`Kernel::EncoderAt`]).
pub struct Scalars;
impl Scalars {
    pub const LR: usize = 0;
    pub const BETA1: usize = 1;
    pub const BETA2: usize = 2;
    pub const EPS: usize = 3;
    /// 1 − β1^t (t = 1-based step)
    pub const BC1: usize = 4;
    /// 1 − β2^t
    pub const BC2: usize = 5;
    /// multiplier applied to every gradient in AdamW (1/norm when clipping, else 1)
    pub const GRAD_SCALE: usize = 6;
    /// the global L2 norm of the gradients before clipping
    pub const GRAD_NORM: usize = 7;
    /// dL/dloss_r for every position: 1/N with N the tokens of the whole optimiser step
    /// (B·T·grad_accum on one device; across every rank and micro-step when data-parallel)
    pub const LOSS_SEED: usize = 8;
    /// the loss scale S the gradients carry (fp16 training: the host multiplies LOSS_SEED by it
    /// and `ClipScale` divides it out; 1 otherwise)
    pub const LOSS_SCALE: usize = 9;
    /// 1 when `ClipScale` found the gradient norm inf/NaN (then `AdamW` changes nothing), else 0
    pub const FOUND_INF: usize = 10;
    pub const LEN: usize = 16;
}

/// One operation. Sizes are element counts; `n` = rows (B·T), `c` = channels.
#[derive(Clone, Debug)]
pub enum Kernel {
    /// out[b,t,:] = wte[tokens[b,t],:] + wpe[t,:].  tokens: i32 (b·t); out: (b·t, c)
    EncoderForward { out: View, tokens: View, wte: View, wpe: View, b: usize, t: usize, c: usize },
    /// dwte[tokens[b,t],:] += dout[b,t,:];  dwpe[t,:] += dout[b,t,:]
    EncoderBackward { dwte: View, dwpe: View, dout: View, tokens: View, b: usize, t: usize, c: usize },

    /// out = (x − mean)·rstd·weight + bias per row, rstd = 1/√(var + 1e-5) (biased var);
    /// writes out (n,c), mean (n), rstd (n)
    LayerNormForward { out: View, mean: View, rstd: View, inp: View, weight: View, bias: View, n: usize, c: usize },
    /// x̂ = (x−mean)·rstd, g = dout·weight:  dinp = rstd·(g − mean(g) − x̂·mean(g·x̂)) (adds if
    /// `accumulate`, else writes);  dweight += Σ_rows dout·x̂;  dbias += Σ_rows dout
    LayerNormBackward {
        dinp: View, dweight: View, dbias: View, dout: View, inp: View, weight: View, mean: View, rstd: View,
        n: usize, c: usize, accumulate: bool,
    },

    /// out (n,oc) = inp (n,c) · weightᵀ (weight is (oc,c)) + bias (oc, optional). Writes out.
    MatmulForward { out: View, inp: View, weight: View, bias: Option<View>, n: usize, c: usize, oc: usize },
    /// dinp (n,c) = dout (n,oc) · weight (writes);  dweight (oc,c) += doutᵀ·inp;  dbias (oc) += Σ_rows dout
    MatmulBackward {
        dinp: View, dweight: View, dbias: Option<View>, dout: View, inp: View, weight: View,
        n: usize, c: usize, oc: usize,
    },

    /// Causal self-attention. qkv: (b,t,3c) = [q | k | v], head h uses features [h·hs, (h+1)·hs),
    /// hs = c/nh.  s[u] = q_t·k_u/√hs for u ≤ t, p = softmax(s), out[b,t,h·hs..] = Σ_u p[u]·v_u.
    /// Writes out (b·t, c) and lse (b, nh, t) = max + ln Σ exp(s − max), the softmax statistics
    /// that the backward uses to recompute p (no (t,t) matrix is stored).
    AttentionForward { out: View, lse: View, qkv: View, b: usize, t: usize, c: usize, nh: usize },
    /// Recomputes p = exp(s − lse); with dP = dout·vᵀ, D_t = Σ dout_t·out_t, dS = p∘(dP − D):
    /// dq = dS·k/√hs, dk = dSᵀ·q/√hs, dv = pᵀ·dout.  Writes dqkv (b·t, 3c).
    AttentionBackward { dqkv: View, dout: View, out: View, lse: View, qkv: View, b: usize, t: usize, c: usize, nh: usize },

    /// out = 0.5·x·(1 + tanh(√(2/π)·(x + 0.044715·x³)))
    GeluForward { out: View, inp: View, n: usize },
    /// dinp = dout·gelu'(x) (writes)
    GeluBackward { dinp: View, inp: View, dout: View, n: usize },

    /// Cached (decoding) forward, row r = token `tokens[r]` of the sequence in cache slot
    /// `slots[r]` at position `pos[r]` (all i32, n rows; rows need not be contiguous in time):
    /// out[r,:] = wte[tokens[r],:] + wpe[pos[r],:].
    EncoderAt { out: View, tokens: View, pos: View, wte: View, wpe: View, n: usize, c: usize },
    /// Appends row r's key and value to its sequence's cache: kcache[slots[r], pos[r], :] =
    /// qkv[r, c..2c], vcache[slots[r], pos[r], :] = qkv[r, 2c..3c]. The caches are
    /// (cache slots, tmax, c); no other row of them changes. Two rows never name the same
    /// (slot, pos) unless both are padding whose cache row is never read (the builder's spare slot).
    KvStore { kcache: View, vcache: View, qkv: View, slots: View, pos: View, n: usize, c: usize, tmax: usize },
    /// Causal attention of row r over its cache: with s = slots[r], p = pos[r], head h (hs = c/nh):
    /// sc[u] = q_r·kcache[s,u]/√hs for u ≤ p (q_r = qkv[r, h·hs..] of the first c),
    /// out[r, h·hs..] = Σ_u softmax(sc)[u]·vcache[s,u]. Reads cache rows 0..=p only, so a
    /// decode step costs O(p) in attention and nothing else grows with position.
    AttentionCached {
        out: View, qkv: View, kcache: View, vcache: View, slots: View, pos: View,
        n: usize, c: usize, nh: usize, tmax: usize,
    },

    /// out = a + b (elementwise, n elements)
    ResidualForward { out: View, a: View, b: View, n: usize },

    /// Per row r < n: logits row (vp wide, only the first v are real). loss_r =
    /// logsumexp(logits[r,:v]) − logits[r,targets[r]] is written to losses[r], or added to it if
    /// `accumulate` (the train phase sums the micro-steps of one step; zero_grad zeroes it).
    /// If `write_grad`, overwrites the logits row
    /// in place with dlogits = (softmax(logits[r,:v]) − onehot(target))·dloss and 0 in [v, vp);
    /// otherwise leaves the logits untouched. targets: i32 (n); dloss: 1 f32 (the
    /// `Scalars::LOSS_SEED` slot, read only when `write_grad`).
    CrossEntropy {
        logits: View,
        losses: View,
        targets: View,
        dloss: View,
        n: usize,
        v: usize,
        vp: usize,
        write_grad: bool,
        accumulate: bool,
    },

    /// out = 0
    Zero { out: View },

    /// out[slot] = Σ inp²  (one launch per gradient tensor; `out` is the norm-parts buffer)
    SumSquares { out: View, inp: View, slot: usize },
    /// s = hyper[LOSS_SCALE] (the gradients carry it); norm = √(Σ parts) / s;
    /// hyper[GRAD_NORM] = norm; hyper[FOUND_INF] = 1 if norm is inf/NaN else 0;
    /// hyper[GRAD_SCALE] = (if max_norm > 0 && norm > max_norm { max_norm / norm } else { 1 }) / s
    ClipScale { hyper: View, parts: View, max_norm: f32 },

    /// Nothing when hyper[FOUND_INF] ≠ 0 (the step is skipped). Else, with w = master (mixed
    /// precision: the f32 master weights) or param:
    /// g = grad·hyper[GRAD_SCALE]; m = β1·m + (1−β1)·g; v = β2·v + (1−β2)·g²;
    /// w −= lr·((m/bc1) / (√(v/bc2) + eps) + weight_decay·w)   (decoupled decay, old w);
    /// with a master, param = w rounded to param's precision.
    AdamW { param: View, master: Option<View>, grad: View, m: View, v: View, hyper: View, weight_decay: f32 },
}

impl Kernel {
    /// The kernel family: the file name (without extension) under `shaders/` and `cuda/`.
    pub fn family(&self) -> &'static str {
        use Kernel::*;
        match self {
            EncoderForward { .. } | EncoderBackward { .. } | EncoderAt { .. } => "encoder",
            LayerNormForward { .. } | LayerNormBackward { .. } => "layernorm",
            MatmulForward { .. } | MatmulBackward { .. } => "matmul",
            AttentionForward { .. } | AttentionBackward { .. } | KvStore { .. } | AttentionCached { .. } => "attention",
            GeluForward { .. } | GeluBackward { .. } => "gelu",
            ResidualForward { .. } => "residual",
            CrossEntropy { .. } => "classifier",
            AdamW { .. } => "adamw",
            Zero { .. } | SumSquares { .. } | ClipScale { .. } => "reduce",
        }
    }
}

/// One kernel launch in a graph, with a label for profiling and error messages ("l3.ln1.fwd").
#[derive(Clone, Debug)]
pub struct Launch {
    pub label: String,
    pub kernel: Kernel,
}
