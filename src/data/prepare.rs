//! `wgpt prepare`: text files → llm.c token shards + `gpt2_tokenizer.bin`, the way llm.c's
//! `dev/data/tinyshakespeare.py` does it: every "\n\n"-separated section becomes EOT followed by
//! the GPT-2 encoding of the section (with its "\n\n" put back, except after a file's last
//! section); the first `val_tokens` tokens are the validation shard, the rest the training shard.

use super::shards::write_shard;
use super::tokenizer::Tokenizer;
use crate::error::{Error, Result};
use rayon::prelude::*;
use std::path::{Path, PathBuf};

/// What [`prepare`] wrote.
#[derive(Clone, Debug)]
pub struct PrepareSummary {
    pub train_path: PathBuf,
    pub val_path: PathBuf,
    pub tokenizer_path: PathBuf,
    pub train_tokens: usize,
    pub val_tokens: usize,
}

/// Encode `inputs` (UTF-8 text files) into `out_dir/<stem>_val.bin` (first `val_tokens` tokens),
/// `out_dir/<stem>_train.bin` (the rest) and `out_dir/gpt2_tokenizer.bin`; `stem` is the first
/// input's file stem. Creates `out_dir`.
pub fn prepare(inputs: &[PathBuf], out_dir: &Path, val_tokens: usize) -> Result<PrepareSummary> {
    let Some(first) = inputs.first() else {
        return Err(Error::flag("prepare", "no input text files given"));
    };
    if val_tokens == 0 {
        return Err(Error::flag("--val-tokens", "must be at least 1 (the validation shard cannot be empty)"));
    }
    let tok = Tokenizer::gpt2()?;
    let eot = tok.eot() as u16;
    let mut tokens: Vec<u16> = Vec::new();
    for path in inputs {
        let raw = std::fs::read(path).map_err(|e| Error::io(path, e))?;
        if raw.is_empty() {
            return Err(Error::format(path, "input text is empty"));
        }
        let text = String::from_utf8(raw)
            .map_err(|e| Error::format(path, format!("not UTF-8 text (invalid byte at offset {})", e.utf8_error().valid_up_to())))?;
        tokens.extend(encode_document(&tok, &text, eot));
    }
    let total = tokens.len();
    if val_tokens >= total {
        return Err(Error::flag(
            "--val-tokens",
            format!("{val_tokens} is not less than the {total} tokens of the input; lower it so training data remains"),
        ));
    }
    std::fs::create_dir_all(out_dir).map_err(|e| Error::io(out_dir, e))?;
    let stem = first.file_stem().map(|s| s.to_string_lossy().into_owned()).unwrap_or_else(|| "data".into());
    let val_path = out_dir.join(format!("{stem}_val.bin"));
    let train_path = out_dir.join(format!("{stem}_train.bin"));
    let tokenizer_path = out_dir.join("gpt2_tokenizer.bin");
    write_shard(&val_path, &tokens[..val_tokens])?;
    write_shard(&train_path, &tokens[val_tokens..])?;
    tok.write(&tokenizer_path)?;
    Ok(PrepareSummary { train_path, val_path, tokenizer_path, train_tokens: total - val_tokens, val_tokens })
}

/// EOT + encode(section + "\n\n") for every section but the last, which gets no "\n\n".
/// Sections are encoded independently (as in tinyshakespeare.py), so in parallel.
fn encode_document(tok: &Tokenizer, text: &str, eot: u16) -> Vec<u16> {
    let sections: Vec<&str> = text.split("\n\n").collect();
    let last = sections.len() - 1;
    let encoded: Vec<Vec<u16>> = sections
        .par_iter()
        .enumerate()
        .map(|(i, s)| {
            let ids = if i == last { tok.encode(s) } else { tok.encode(&format!("{s}\n\n")) };
            let mut out = Vec::with_capacity(ids.len() + 1);
            out.push(eot);
            // GPT-2 ids are < 50257, so they fit u16
            out.extend(ids.into_iter().map(|t| t as u16));
            out
        })
        .collect();
    encoded.concat()
}
