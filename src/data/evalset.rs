//! llm.c's multiple-choice eval files (HellaSwag, MMLU: `dev/data/hellaswag/hellaswag_val.bin`).
//!
//! Header: 256 little-endian i32 `[20240522, 1, num_examples, longest_example_bytes, 0…]`. Then per
//! example a run of little-endian u16: 65535 (start marker), the example's size in bytes (these
//! words included), its index, the label (0..4), the number of completions (4), the context length
//! and tokens, then for each completion its length and tokens.

use crate::error::{Error, Result};
use std::path::Path;

pub const EVAL_MAGIC: i32 = 20240522;
pub const EVAL_VERSION: i32 = 1;
const HEADER_BYTES: usize = 1024;
const START: u16 = 65535;

/// One multiple-choice example.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EvalExample {
    pub index: u16,
    /// the correct completion
    pub label: u16,
    pub context: Vec<u16>,
    /// four completions
    pub completions: Vec<Vec<u16>>,
}

impl EvalExample {
    /// Tokens of the longest row (context + completion) this example puts in a batch.
    pub fn longest_row(&self) -> usize {
        self.context.len() + self.completions.iter().map(|c| c.len()).max().unwrap_or(0)
    }

    fn to_words(&self) -> Vec<u16> {
        let mut w = vec![START, 0, self.index, self.label, self.completions.len() as u16, self.context.len() as u16];
        w.extend_from_slice(&self.context);
        for c in &self.completions {
            w.push(c.len() as u16);
            w.extend_from_slice(c);
        }
        w[1] = (w.len() * 2) as u16;
        w
    }
}

/// Read an eval file; every structural problem is an error naming the file and the example.
pub fn read_eval_file(path: &Path) -> Result<Vec<EvalExample>> {
    let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
    if bytes.len() < HEADER_BYTES {
        return Err(Error::format(path, format!("{} bytes is shorter than the 1024-byte header", bytes.len())));
    }
    let hdr = |i: usize| i32::from_le_bytes(bytes[4 * i..4 * i + 4].try_into().unwrap());
    if hdr(0) != EVAL_MAGIC {
        return Err(Error::format(path, format!("bad magic {} (an llm.c eval file has {EVAL_MAGIC})", hdr(0))));
    }
    if hdr(1) != EVAL_VERSION {
        return Err(Error::format(path, format!("unsupported eval file version {} (expected {EVAL_VERSION})", hdr(1))));
    }
    let n = usize::try_from(hdr(2)).map_err(|_| Error::format(path, "negative example count"))?;
    let body = &bytes[HEADER_BYTES..];
    if body.len() % 2 != 0 {
        return Err(Error::format(path, "truncated: odd number of bytes after the header"));
    }
    let words: Vec<u16> = body.chunks_exact(2).map(|c| u16::from_le_bytes([c[0], c[1]])).collect();
    // an example takes at least 6 words: a count beyond that is refused before allocating for it
    if n > words.len() / 6 {
        return Err(Error::format(
            path,
            format!("header says {n} examples, but the {} bytes after the header hold at most {}", body.len(), words.len() / 6),
        ));
    }
    let mut out = Vec::with_capacity(n);
    let mut i = 0usize;
    for e in 0..n {
        let bad = |msg: &str| Error::format(path, format!("example {e}: {msg}"));
        if i + 6 > words.len() {
            return Err(bad("truncated (the header says more examples)"));
        }
        if words[i] != START {
            return Err(bad(&format!("expected the start marker 65535, found {}", words[i])));
        }
        let size_words = words[i + 1] as usize / 2;
        if size_words < 6 || i + size_words > words.len() {
            return Err(bad("truncated or bad example size"));
        }
        let w = &words[i..i + size_words];
        let (index, label, ncomp, ctx_len) = (w[2], w[3], w[4] as usize, w[5] as usize);
        if ncomp == 0 || label as usize >= ncomp {
            return Err(bad(&format!("label {label} with {ncomp} completions")));
        }
        let mut j = 6 + ctx_len;
        if j > w.len() {
            return Err(bad("context runs past the example"));
        }
        let context = w[6..j].to_vec();
        let mut completions = Vec::with_capacity(ncomp.min(w.len()));
        for _ in 0..ncomp {
            let len = *w.get(j).ok_or_else(|| bad("completion runs past the example"))? as usize;
            if j + 1 + len > w.len() {
                return Err(bad("completion runs past the example"));
            }
            completions.push(w[j + 1..j + 1 + len].to_vec());
            j += 1 + len;
        }
        if j != w.len() {
            return Err(bad("size does not match its contents"));
        }
        out.push(EvalExample { index, label, context, completions });
        i += size_words;
    }
    if i != words.len() {
        return Err(Error::format(path, format!("{} bytes after the last of {n} examples", 2 * (words.len() - i))));
    }
    Ok(out)
}

/// Write examples in llm.c's eval format (atomically).
pub fn write_eval_file(path: &Path, examples: &[EvalExample]) -> Result<()> {
    let words: Vec<Vec<u16>> = examples.iter().map(|e| e.to_words()).collect();
    let mut header = [0i32; 256];
    header[0] = EVAL_MAGIC;
    header[1] = EVAL_VERSION;
    header[2] = examples.len() as i32;
    header[3] = words.iter().map(|w| w.len() * 2).max().unwrap_or(0) as i32;
    let mut bytes = Vec::with_capacity(HEADER_BYTES + words.iter().map(|w| w.len() * 2).sum::<usize>());
    for h in header {
        bytes.extend_from_slice(&h.to_le_bytes());
    }
    for w in words.iter().flatten() {
        bytes.extend_from_slice(&w.to_le_bytes());
    }
    crate::atomic::write_atomic(path, &bytes)
}
