//! The corpus built into the binary: the Shakespeare token shards and `gpt2_tokenizer.bin` from
//! `data/` (about 1 MB), so that `wgpt train` with no `--train`/`--val` works from any directory
//! and after `cargo install`, with nothing to find on disk.
//!
//! The loader reads them in place ([`DataLoader::from_memory`]): no temporary files. Their names
//! (`<bundled>/…`) stand where a path would in messages.

use super::shards::{DataLoader, LoaderOptions, MemoryShard};
use super::tokenizer::Tokenizer;
use crate::error::Result;
use std::path::Path;

/// `data/shakespeare_train.bin`, as built into the binary.
pub const TRAIN: MemoryShard =
    MemoryShard { name: "<bundled>/shakespeare_train.bin", bytes: include_bytes!("../../data/shakespeare_train.bin") };

/// `data/shakespeare_val.bin`, as built into the binary.
pub const VAL: MemoryShard =
    MemoryShard { name: "<bundled>/shakespeare_val.bin", bytes: include_bytes!("../../data/shakespeare_val.bin") };

/// Name of the built-in `data/gpt2_tokenizer.bin` in messages.
pub const TOKENIZER_NAME: &str = "<bundled>/gpt2_tokenizer.bin";

/// `data/gpt2_tokenizer.bin`, as built into the binary.
pub const TOKENIZER_BYTES: &[u8] = include_bytes!("../../data/gpt2_tokenizer.bin");

/// What `--train`/`--val` say in `--help` when not given.
pub const DEFAULT_HELP: &str = "the bundled Shakespeare shards, built into wgpt";

/// A loader over the built-in train shard.
pub fn train_loader(flag: &str, opts: LoaderOptions) -> Result<DataLoader> {
    DataLoader::from_memory(&[TRAIN], flag, opts)
}

/// A loader over the built-in validation shard.
pub fn val_loader(flag: &str, opts: LoaderOptions) -> Result<DataLoader> {
    DataLoader::from_memory(&[VAL], flag, opts)
}

/// The built-in `gpt2_tokenizer.bin`.
pub fn tokenizer() -> Result<Tokenizer> {
    Tokenizer::from_bytes(Path::new(TOKENIZER_NAME), TOKENIZER_BYTES)
}
