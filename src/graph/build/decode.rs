//! The decoding phases, `Prefill` and `Decode`, added to any graph that has the parameters
//! ([`add_decoder`]): a batched forward pass over rows that each name (cache slot, position,
//! token), with a KV cache per layer, and no saved activations (one set of buffers serves every
//! block).
//!
//! * `Decode` runs `slots` rows, row i = cache slot i, and ends in the logits of every row
//!   (`slots` × Vp). One prepared phase serves every position: positions are per-row data.
//! * `Prefill` runs `prefill_rows` rows and stops before the final layernorm: it only fills the
//!   caches. A prompt of P tokens is prefilled with its first P − 1 and its last token is the
//!   first `Decode` row, whose logits give the first new token.
//! * Rows with nothing to do point at the spare cache slot (index `slots`), position 0, so the
//!   kernels need no "inactive" case; that slot's contents are never read for a real row.

use super::forward::{block_forward, Block};
use super::{launch, Builder, Dims, Tensors};
use crate::graph::{BufId, DType, Graph, Kernel, Launch, Phase, Role, View};
use crate::model::params::idx;
use crate::model::Config;

/// Shape of the decoding phases.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DecodeOptions {
    /// sequences decoded together (rows of `Decode`, cache slots besides the spare one)
    pub slots: usize,
    /// positions per sequence (cache rows per slot), at most the model's maxT
    pub max_t: usize,
    /// rows of one `Prefill` launch list (a prompt chunk)
    pub prefill_rows: usize,
}

/// The buffers the host writes and reads to decode.
#[derive(Clone, Debug)]
pub struct DecodeIo {
    pub opts: DecodeOptions,
    /// i32 (max(slots, prefill_rows)) per row: token id, position, cache slot; `Decode` reads
    /// the first `slots` entries, `Prefill` the first `prefill_rows`
    pub tokens: BufId,
    pub pos: BufId,
    pub slots: BufId,
    /// f32 (slots, Vp): the logits of every `Decode` row
    pub logits: BufId,
    /// the spare cache slot that padding rows use (= opts.slots)
    pub spare_slot: usize,
}

/// Adds the caches, the row buffers, one set of activations and the `Prefill` and `Decode`
/// phases to `g` (which must have the parameters in `g.io.params`), and sets `g.decode`.
pub fn add_decoder(g: &mut Graph, opts: DecodeOptions) {
    let cfg: Config = g.cfg;
    assert!(opts.slots > 0 && opts.prefill_rows > 0 && opts.max_t > 0 && opts.max_t <= cfg.max_t, "bad decode options {opts:?}");
    let rows = opts.slots.max(opts.prefill_rows);
    let mut b = Builder { table: std::mem::take(&mut g.buffers), precision: DType::F32 };
    let params = Tensors { views: g.io.params.map(|id| b.table.view(id)), layers: cfg.l };
    let (c, cache_len) = (cfg.c, (opts.slots + 1) * opts.max_t * cfg.c);
    let mut cache = |name: String| {
        let id = b.table.add(name, cache_len, DType::F32, Role::KvCache);
        b.table.view(id)
    };
    let caches: Vec<(View, View)> = (0..cfg.l).map(|l| (cache(format!("l{l}.kcache")), cache(format!("l{l}.vcache")))).collect();
    let tokens = b.table.add("dec.tokens", rows, DType::I32, Role::Tokens);
    let pos = b.table.add("dec.pos", rows, DType::I32, Role::Tokens);
    let slots = b.table.add("dec.slots", rows, DType::I32, Role::Tokens);
    let mut act = |name: &str, len: usize| b.buf(format!("dec.{name}"), len, Role::Activation);
    let x0 = act("x0", rows * c);
    let x1 = act("x1", rows * c);
    let ln = act("ln", rows * c);
    let mean = act("ln_mean", rows);
    let rstd = act("ln_rstd", rows);
    let qkv = act("qkv", rows * 3 * c);
    let atty = act("atty", rows * c);
    let proj = act("proj", rows * c);
    let fch = act("fch", rows * 4 * c);
    let fch_gelu = act("fch_gelu", rows * 4 * c);
    let logits = b.table.add("dec.logits", opts.slots * cfg.vp, DType::F32, Role::Activation);
    let bufs = Bufs { x0, x1, ln, mean, rstd, qkv, atty, proj, fch, fch_gelu };
    let row_views = |n: usize| [tokens, pos, slots].map(|id| b.table.view(id).slice(0, n));

    let prefill = cached_forward(&cfg, &params, &bufs, &caches, row_views(opts.prefill_rows), opts.prefill_rows, opts.max_t, None);
    let logits_view = b.table.view(logits);
    let decode = cached_forward(&cfg, &params, &bufs, &caches, row_views(opts.slots), opts.slots, opts.max_t, Some(logits_view));
    g.buffers = b.table;
    g.phases.insert(Phase::Prefill, prefill);
    g.phases.insert(Phase::Decode, decode);
    g.decode = Some(DecodeIo { opts, tokens, pos, slots, logits, spare_slot: opts.slots });
}

/// One set of activation buffers (max rows), reused by every block.
struct Bufs {
    x0: View,
    x1: View,
    ln: View,
    mean: View,
    rstd: View,
    qkv: View,
    atty: View,
    proj: View,
    fch: View,
    fch_gelu: View,
}

/// The cached forward over `n` rows: encoder at the rows' positions, every block with KV append
/// and cached attention, and, with `logits`, the final layernorm and the classifier.
#[allow(clippy::too_many_arguments)]
fn cached_forward(
    cfg: &Config, p: &Tensors, a: &Bufs, caches: &[(View, View)], [tokens, pos, slots]: [View; 3], n: usize, tmax: usize,
    logits: Option<View>,
) -> Vec<Launch> {
    let (c, nh) = (cfg.c, cfg.nh);
    let d = Dims { b: 1, t: n, n, c, nh, v: cfg.v, vp: cfg.vp };
    let rows = |v: View, per: usize| v.slice(0, n * per);
    let mut out = Vec::new();
    launch(&mut out, "dec.encoder.fwd", Kernel::EncoderAt {
        out: rows(a.x0, c), tokens, pos, wte: p.whole(idx::WTE), wpe: p.whole(idx::WPE), n, c,
    });
    for (l, &(kcache, vcache)) in caches.iter().enumerate() {
        // the residual stream ping-pongs: x0 → (res2) x1 → (res3) x0
        let blk = Block {
            inp: rows(a.x0, c),
            ln1: rows(a.ln, c),
            ln1_mean: rows(a.mean, 1),
            ln1_rstd: rows(a.rstd, 1),
            qkv: rows(a.qkv, 3 * c),
            atty: rows(a.atty, c),
            lse: rows(a.mean, 1), // unused by cached attention
            attproj: rows(a.proj, c),
            res2: rows(a.x1, c),
            ln2: rows(a.ln, c),
            ln2_mean: rows(a.mean, 1),
            ln2_rstd: rows(a.rstd, 1),
            fch: rows(a.fch, 4 * c),
            fch_gelu: rows(a.fch_gelu, 4 * c),
            fcproj: rows(a.proj, c),
            res3: rows(a.x0, c),
        };
        let attention = vec![
            ("kv", Kernel::KvStore { kcache, vcache, qkv: blk.qkv, slots, pos, n, c, tmax }),
            ("attn", Kernel::AttentionCached { out: blk.atty, qkv: blk.qkv, kcache, vcache, slots, pos, n, c, nh, tmax }),
        ];
        block_forward(&mut out, l, &blk, &p.block(l), d, attention);
    }
    if let Some(logits) = logits {
        let lnf = rows(a.ln, c);
        launch(&mut out, "dec.lnf.fwd", Kernel::LayerNormForward {
            out: lnf, mean: rows(a.mean, 1), rstd: rows(a.rstd, 1), inp: rows(a.x0, c), weight: p.whole(idx::LNFW),
            bias: p.whole(idx::LNFB), n, c,
        });
        launch(&mut out, "dec.classifier.fwd", Kernel::MatmulForward {
            out: logits.slice(0, n * d.vp), inp: lnf, weight: p.whole(idx::WTE), bias: None, n, c, oc: d.vp,
        });
    }
    out
}
