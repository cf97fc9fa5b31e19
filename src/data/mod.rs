//! Data: llm.c token shards (`shards`), the GPT-2 tokenizer (`tokenizer`) and `wgpt prepare`
//! (`prepare`).

pub mod prepare;
pub mod shards;
pub mod tokenizer;

pub use prepare::{prepare, PrepareSummary};
pub use shards::{write_shard, DataLoader, LoaderOptions, LoaderState};
pub use tokenizer::Tokenizer;
