//! Picking the next token from logits: temperature, top-k, top-p (nucleus), a seeded generator;
//! temperature 0 is greedy. Also the log-probabilities the server reports.

use crate::rng::XorShift;

/// How a sequence samples. The same parameters and seed give the same tokens from the same logits.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct SamplingParams {
    /// softmax temperature; 0 = greedy (argmax)
    pub temperature: f32,
    /// keep the k most likely tokens (0 = all)
    pub top_k: usize,
    /// keep the smallest set of most likely tokens whose probability reaches top_p (1 = all)
    pub top_p: f32,
    pub seed: u64,
}

impl Default for SamplingParams {
    fn default() -> Self {
        SamplingParams { temperature: 1.0, top_k: 0, top_p: 1.0, seed: 1337 }
    }
}

impl SamplingParams {
    pub fn greedy() -> Self {
        SamplingParams { temperature: 0.0, ..Default::default() }
    }
}

/// One sequence's sampler: its parameters and its own random stream.
#[derive(Clone, Debug)]
pub struct Sampler {
    pub params: SamplingParams,
    rng: XorShift,
}

impl Sampler {
    pub fn new(params: SamplingParams) -> Sampler {
        // splitmix64 of the seed: any seed (0 included) gives a well-mixed, non-zero xorshift state
        let mut z = params.seed.wrapping_add(0x9E37_79B9_7F4A_7C15);
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        Sampler { params, rng: XorShift((z ^ (z >> 31)) | 1) }
    }

    /// The next token from `logits` (the real vocabulary only).
    pub fn sample(&mut self, logits: &[f32]) -> u32 {
        let p = self.params;
        if p.temperature <= 0.0 || p.top_k == 1 {
            return argmax(logits);
        }
        // candidates, most likely first (only the top k when top_k is set)
        let mut idx: Vec<u32> = (0..logits.len() as u32).collect();
        let by_logit = |a: &u32, b: &u32| logits[*b as usize].total_cmp(&logits[*a as usize]).then(a.cmp(b));
        if p.top_k > 0 && p.top_k < idx.len() {
            idx.select_nth_unstable_by(p.top_k - 1, by_logit);
            idx.truncate(p.top_k);
        }
        idx.sort_unstable_by(by_logit);
        let max = logits[idx[0] as usize];
        let mut probs: Vec<f64> = idx.iter().map(|&i| (((logits[i as usize] - max) / p.temperature) as f64).exp()).collect();
        let total: f64 = probs.iter().sum();
        if p.top_p < 1.0 {
            let mut cum = 0.0;
            let keep = probs.iter().position(|&q| {
                cum += q / total;
                cum >= p.top_p as f64
            });
            probs.truncate(keep.map_or(probs.len(), |k| k + 1));
        }
        let total: f64 = probs.iter().sum();
        let coin = self.rng.next_f32() as f64 * total;
        let mut cdf = 0.0;
        for (k, q) in probs.iter().enumerate() {
            cdf += q;
            if coin < cdf {
                return idx[k];
            }
        }
        idx[probs.len() - 1]
    }
}

/// The index of the largest value (the first one on ties).
pub fn argmax(x: &[f32]) -> u32 {
    let mut best = 0;
    for (i, v) in x.iter().enumerate() {
        if *v > x[best] {
            best = i;
        }
    }
    best as u32
}

/// log softmax(logits)[id], and the `top` most likely (id, log-probability), most likely first.
pub fn logprobs(logits: &[f32], id: u32, top: usize) -> (f32, Vec<(u32, f32)>) {
    let max = logits.iter().cloned().fold(f32::NEG_INFINITY, f32::max);
    let lse = max + logits.iter().map(|&x| ((x - max) as f64).exp()).sum::<f64>().ln() as f32;
    let mut best: Vec<u32> = (0..logits.len() as u32).collect();
    let top = top.min(best.len());
    if top > 0 {
        let by = |a: &u32, b: &u32| logits[*b as usize].total_cmp(&logits[*a as usize]).then(a.cmp(b));
        best.select_nth_unstable_by(top - 1, by);
        best.truncate(top);
        best.sort_unstable_by(by);
    } else {
        best.clear();
    }
    (logits[id as usize] - lse, best.into_iter().map(|i| (i, logits[i as usize] - lse)).collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sampler(temperature: f32, top_k: usize, top_p: f32, seed: u64) -> Sampler {
        Sampler::new(SamplingParams { temperature, top_k, top_p, seed })
    }

    #[test]
    fn greedy_and_top1_pick_the_max() {
        let l = [0.1, 3.0, -1.0, 2.9];
        assert_eq!(sampler(0.0, 0, 1.0, 1).sample(&l), 1);
        let mut s = sampler(1.0, 1, 1.0, 7);
        assert!((0..20).all(|_| s.sample(&l) == 1));
    }

    #[test]
    fn sampling_follows_the_distribution() {
        // p = softmax([0, ln 3]) = [0.25, 0.75]
        let l = [0.0, 3f32.ln()];
        let mut s = sampler(1.0, 0, 1.0, 1337);
        let ones = (0..20000).filter(|_| s.sample(&l) == 1).count();
        assert!((ones as f64 / 20000.0 - 0.75).abs() < 0.02, "{ones}");
        // temperature 2 flattens it: p ∝ [1, √3] → 0.634
        let mut s = sampler(2.0, 0, 1.0, 5);
        let ones = (0..20000).filter(|_| s.sample(&l) == 1).count();
        assert!((ones as f64 / 20000.0 - 3f64.sqrt() / (1.0 + 3f64.sqrt())).abs() < 0.02, "{ones}");
    }

    #[test]
    fn top_k_and_top_p_cut_the_tail() {
        // p = [0.5, 0.3, 0.15, 0.05]
        let l: Vec<f32> = [0.5f32, 0.3, 0.15, 0.05].iter().map(|p| p.ln()).collect();
        let mut s = sampler(1.0, 2, 1.0, 3);
        let draws: Vec<u32> = (0..5000).map(|_| s.sample(&l)).collect();
        assert!(draws.iter().all(|&d| d < 2));
        let zeros = draws.iter().filter(|&&d| d == 0).count() as f64 / 5000.0;
        assert!((zeros - 0.625).abs() < 0.03, "{zeros}");
        // top_p 0.79 keeps {0, 1} (0.5 + 0.3 reaches it); 0.81 keeps three (not 0.8 itself:
        // whether 0.5 + 0.3 computed in floats reaches exactly 0.8 is up to rounding)
        let mut s = sampler(1.0, 0, 0.79, 4);
        assert!((0..5000).all(|_| s.sample(&l) < 2));
        let mut s = sampler(1.0, 0, 0.81, 4);
        let d: Vec<u32> = (0..5000).map(|_| s.sample(&l)).collect();
        assert!(d.contains(&2) && !d.contains(&3));
    }

    #[test]
    fn a_seed_gives_the_same_draws() {
        let l: Vec<f32> = (0..100).map(|i| (i as f32 * 0.37).sin()).collect();
        let a: Vec<u32> = { let mut s = sampler(1.0, 0, 0.9, 42); (0..50).map(|_| s.sample(&l)).collect() };
        let b: Vec<u32> = { let mut s = sampler(1.0, 0, 0.9, 42); (0..50).map(|_| s.sample(&l)).collect() };
        let c: Vec<u32> = { let mut s = sampler(1.0, 0, 0.9, 43); (0..50).map(|_| s.sample(&l)).collect() };
        assert_eq!(a, b);
        assert_ne!(a, c);
    }

    #[test]
    fn logprobs_are_log_softmax() {
        let l = [1.0f32, 2.0, 3.0];
        let z: f32 = l.iter().map(|x| x.exp()).sum();
        let (lp, top) = logprobs(&l, 0, 2);
        assert!((lp - (1f32.exp() / z).ln()).abs() < 1e-6);
        assert_eq!(top.iter().map(|t| t.0).collect::<Vec<_>>(), vec![2, 1]);
        assert!((top[0].1 - (3f32.exp() / z).ln()).abs() < 1e-6);
    }
}
