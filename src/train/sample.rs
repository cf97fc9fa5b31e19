//! The sample printed during training: `n` tokens from `<|endoftext|>` at temperature 1, no top-k,
//! through the decoding phases that the training graph carries (`graph::add_decoder` with one
//! cache slot of `n + 1` positions, see [`decode_options`]), so it costs one decode step a token.

use super::session::Session;
use crate::data::tokenizer::Tokenizer;
use crate::error::Result;
use crate::graph::DecodeOptions;
use crate::infer::{engine, Engine, GenRequest, SamplingParams};
use crate::model::Config;

/// The decoding phases a training run adds for its samples of `n` tokens.
pub fn decode_options(cfg: &Config, n: usize) -> DecodeOptions {
    DecodeOptions { slots: 1, max_t: (n + 1).min(cfg.max_t), prefill_rows: 1 }
}

/// Render generated ids as text (or ids when no tokenizer is available).
pub fn render(tok: &Option<Tokenizer>, ids: &[u32]) -> String {
    match tok {
        Some(t) => t.decode(ids),
        None => ids.iter().map(|i| i.to_string()).collect::<Vec<_>>().join(" "),
    }
}

/// `n` tokens (at most the decode context − 1) from `<|endoftext|>` at temperature 1, seeded.
pub fn sample_in_graph(sess: &mut Session, tok: &Option<Tokenizer>, n: usize, seed: u64) -> Result<String> {
    let cfg = sess.graph.cfg;
    let eot = crate::model::config::GPT2_EOT.min(cfg.v as u32 - 1);
    let mut eng = Engine::new(&mut *sess, None)?;
    let n = n.min(eng.max_t() - 1);
    let sampling = SamplingParams { temperature: 1.0, top_k: 0, top_p: 1.0, seed };
    let req = GenRequest { prompt: vec![eot], max_tokens: n, sampling, stop: vec![], stop_at_eot: false, logprobs: None };
    let (ids, _, _) = engine::generate(&mut eng, req, |_| {})?;
    Ok(render(tok, &ids))
}
