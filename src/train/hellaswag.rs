//! Multiple-choice evaluation (llm.c's HellaSwag `-h`): each example fills 4 rows of a (B, T)
//! batch, row c = context + completion c. A completion's score is its mean loss over the
//! positions that predict its tokens (ctx_len−1 … ctx_len+len−2); the prediction is the
//! completion with the lowest score; accuracy = correct / examples.

use std::path::Path;

use super::session::Session;
use crate::data::evalset::EvalExample;
use crate::error::{Error, Result};

/// How many examples were answered correctly.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct EvalScore {
    pub correct: usize,
    pub total: usize,
}

impl EvalScore {
    pub fn accuracy(&self) -> f64 {
        if self.total == 0 {
            0.0
        } else {
            self.correct as f64 / self.total as f64
        }
    }
}

/// Check, before any work, that `examples` (read from `file`) fit batches of (b, t) and a
/// vocabulary of `v`: four completions each, every row at most t tokens, every token below v.
pub fn check_examples(examples: &[EvalExample], file: &Path, b: usize, t: usize, v: usize) -> Result<()> {
    if b < 4 {
        return Err(Error::flag("--batch", format!("the eval puts 4 rows per example in a batch; {b} is fewer")));
    }
    for (i, e) in examples.iter().enumerate() {
        if e.completions.len() != 4 {
            return Err(Error::format(file, format!("example {i} has {} completions, not 4", e.completions.len())));
        }
        if e.context.is_empty() || e.completions.iter().any(|c| c.is_empty()) {
            return Err(Error::format(file, format!("example {i} has an empty context or completion")));
        }
        if e.longest_row() > t {
            return Err(Error::flag("--seq-len", format!("{} example {i} needs {} positions, more than {t}", file.display(), e.longest_row())));
        }
        let bad = e.context.iter().chain(e.completions.iter().flatten()).find(|&&tok| tok as usize >= v);
        if let Some(tok) = bad {
            return Err(Error::format(file, format!("example {i}: token {tok} is outside the model's vocabulary of {v}")));
        }
    }
    Ok(())
}

/// Score every example with the forward pass of `sess` (whose graph is (b, t)); `check_examples`
/// must have accepted them.
pub fn evaluate(sess: &mut Session, examples: &[EvalExample], b: usize, t: usize) -> Result<EvalScore> {
    let per_batch = b / 4;
    let mut score = EvalScore::default();
    for chunk in examples.chunks(per_batch) {
        let mut x = vec![0i32; b * t];
        let mut y = vec![0i32; b * t];
        // (row, first target position, number of target positions) per completion
        let mut spans = Vec::with_capacity(chunk.len() * 4);
        for (k, e) in chunk.iter().enumerate() {
            for (c, comp) in e.completions.iter().enumerate() {
                let row = 4 * k + c;
                let toks: Vec<i32> = e.context.iter().chain(comp).map(|&v| v as i32).collect();
                let r = &mut x[row * t..row * t + t];
                r[..toks.len()].copy_from_slice(&toks);
                let tr = &mut y[row * t..row * t + t];
                tr[..toks.len() - 1].copy_from_slice(&toks[1..]);
                spans.push((row, e.context.len() - 1, comp.len()));
            }
        }
        let losses = sess.eval_losses(&x, &y)?;
        for (k, e) in chunk.iter().enumerate() {
            let means: Vec<f64> = spans[4 * k..4 * k + 4]
                .iter()
                .map(|&(row, p0, n)| losses[row * t + p0..row * t + p0 + n].iter().map(|&l| l as f64).sum::<f64>() / n as f64)
                .collect();
            // the lowest mean loss wins; ties go to the first
            let pred = (1..4).fold(0, |best, c| if means[c] < means[best] { c } else { best });
            score.correct += (pred == e.label as usize) as usize;
            score.total += 1;
        }
    }
    Ok(score)
}
