//! Text generation: softmax with temperature, optional top-k, and llm.c's xorshift sampler.

use super::session::Session;
use crate::data::tokenizer::Tokenizer;
use crate::error::Result;
use crate::rng::XorShift;

/// Draw a token id from `logits` (only the real vocabulary) at `temperature`, keeping the `top_k`
/// most likely ids when top_k > 0. temperature 0 = greedy.
pub fn sample_logits(logits: &[f32], temperature: f32, top_k: usize, rng: &mut XorShift) -> u32 {
    if temperature <= 0.0 {
        return argmax(logits);
    }
    let mut idx: Vec<u32> = (0..logits.len() as u32).collect();
    if top_k > 0 && top_k < logits.len() {
        idx.select_nth_unstable_by(top_k - 1, |&a, &b| logits[b as usize].total_cmp(&logits[a as usize]));
        idx.truncate(top_k);
    }
    let max = idx.iter().map(|&i| logits[i as usize]).fold(f32::NEG_INFINITY, f32::max);
    let probs: Vec<f64> = idx.iter().map(|&i| (((logits[i as usize] - max) / temperature) as f64).exp()).collect();
    let total: f64 = probs.iter().sum();
    let coin = rng.next_f32() as f64 * total;
    let mut cdf = 0.0;
    for (k, p) in probs.iter().enumerate() {
        cdf += p;
        if coin < cdf {
            return idx[k];
        }
    }
    *idx.last().unwrap()
}

fn argmax(x: &[f32]) -> u32 {
    let mut best = 0;
    for (i, v) in x.iter().enumerate() {
        if *v > x[best] {
            best = i;
        }
    }
    best as u32
}

/// Render generated ids as text (or ids when no tokenizer is available).
pub fn render(tok: &Option<Tokenizer>, ids: &[u32]) -> String {
    match tok {
        Some(t) => t.decode(ids),
        None => ids.iter().map(|i| i.to_string()).collect::<Vec<_>>().join(" "),
    }
}

/// Generate with the `eval` phase of an allocated graph: sequence 0 starts with `prompt`
/// (EOT if empty); every new token is one forward pass over the graph's fixed (B, T), and the
/// logits of the last real position pick the next token. The window slides when T is full.
pub fn generate(
    sess: &mut Session,
    prompt: &[u32],
    new_tokens: usize,
    temperature: f32,
    top_k: usize,
    seed: u64,
) -> Result<Vec<u32>> {
    let (b, t, eot) = (sess.graph.b, sess.graph.t, crate::model::config::GPT2_EOT.min(sess.graph.cfg.v as u32 - 1));
    let mut seq: Vec<u32> = if prompt.is_empty() { vec![eot] } else { prompt.to_vec() };
    let start = seq.len();
    let mut rng = XorShift(seed.max(1));
    let zeros = vec![0i32; b * t];
    for _ in 0..new_tokens {
        let window_start = seq.len().saturating_sub(t);
        let window = &seq[window_start..];
        let mut x = vec![eot as i32; b * t];
        for (i, &id) in window.iter().enumerate() {
            x[i] = id as i32;
        }
        sess.eval(&x, &zeros)?;
        let logits = sess.logits_row(window.len() - 1)?;
        seq.push(sample_logits(&logits, temperature, top_k, &mut rng));
    }
    Ok(seq[start..].to_vec())
}

/// The sample printed during training: from EOT, `n` tokens at temperature 1, no top-k.
pub fn sample_in_graph(sess: &mut Session, tok: &Option<Tokenizer>, n: usize, seed: u64) -> Result<String> {
    let ids = generate(sess, &[], n, 1.0, 0, seed)?;
    Ok(render(tok, &ids))
}

#[cfg(test)]
mod tests {
    use super::*;
    #[test]
    fn greedy_and_top1_pick_the_max() {
        let l = [0.1, 3.0, -1.0, 2.9];
        let mut r = XorShift(7);
        assert_eq!(sample_logits(&l, 0.0, 0, &mut r), 1);
        for _ in 0..20 {
            assert_eq!(sample_logits(&l, 1.0, 1, &mut r), 1);
        }
    }
    #[test]
    fn sampling_follows_the_distribution() {
        // p = softmax([0, ln 3]) = [0.25, 0.75]
        let l = [0.0, 3f32.ln()];
        let mut r = XorShift(1337);
        let ones = (0..20000).filter(|_| sample_logits(&l, 1.0, 0, &mut r) == 1).count();
        let frac = ones as f64 / 20000.0;
        assert!((frac - 0.75).abs() < 0.02, "{frac}");
    }
}
