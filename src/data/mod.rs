//! Data: llm.c token shards, the GPT-2 tokenizer, and `wgpt prepare`.
