//! Data: llm.c token shards (`shards`), the GPT-2 tokenizer (`tokenizer`), `wgpt prepare`
//! (`prepare`) and llm.c's multiple-choice eval files (`evalset`, HellaSwag).

pub mod evalset;
pub mod prepare;
pub mod shards;
pub mod tokenizer;

pub use prepare::{prepare, PrepareSummary};
pub use shards::{write_shard, DataLoader, LoaderOptions, LoaderState};
pub use tokenizer::Tokenizer;
