//! Data: llm.c token shards (`shards`), the GPT-2 tokenizer (`tokenizer`), `wgpt prepare`
//! (`prepare`), llm.c's multiple-choice eval files (`evalset`, HellaSwag) and the corpus built
//! into the binary (`bundled`).

pub mod bundled;
pub mod evalset;
pub mod prepare;
pub mod shards;
pub mod tokenizer;

pub use prepare::{prepare, PrepareSummary};
pub use shards::{write_shard, DataLoader, LoaderOptions, LoaderState, MemoryShard};
pub use tokenizer::Tokenizer;
