//! Random initialisation for training from scratch, as llm.c's CUDA trainer does it (`-e d12`):
//! zeros everywhere, layernorm weights 1, and normal draws from one torch-compatible MT19937.

use super::params::idx;
use super::{Config, ParamLayout};
use crate::rng::Mt19937;

/// Flat parameter vector (checkpoint order) initialised like llm.c's `gpt2_build_from_random`:
/// draw order wte (first V·C values only; padded rows stay 0, std 0.02), wpe (0.02), then per
/// layer qkvw (0.02), attprojw (0.02·s), fcw (0.02), fcprojw (0.02·s) with s = 1/sqrtf(2L).
pub fn init_params(cfg: &Config, seed: u32) -> Vec<f32> {
    let layout = ParamLayout::new(cfg);
    let mut p = vec![0f32; layout.total];
    for t in [idx::LN1W, idx::LN2W, idx::LNFW] {
        p[layout.offsets[t]..layout.offsets[t] + layout.sizes[t]].fill(1.0);
    }
    let (l, c) = (cfg.l, cfg.c);
    let std = 0.02f32;
    let residual_std = std * (1.0f32 / (2.0f32 * l as f32).sqrt());
    let mut rng = Mt19937::new(seed);
    let mut draw = |tensor: usize, start: usize, len: usize, std: f32| {
        let o = layout.offsets[tensor] + start;
        rng.normal_fill(&mut p[o..o + len], 0.0, std);
    };
    draw(idx::WTE, 0, cfg.v * c, std);
    draw(idx::WPE, 0, cfg.max_t * c, std);
    for layer in 0..l {
        draw(idx::QKVW, layer * 3 * c * c, 3 * c * c, std);
        draw(idx::ATTPROJW, layer * c * c, c * c, residual_std);
        draw(idx::FCW, layer * 4 * c * c, 4 * c * c, std);
        draw(idx::FCPROJW, layer * 4 * c * c, 4 * c * c, residual_std);
    }
    p
}
