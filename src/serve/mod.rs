//! `wgpt serve`: an OpenAI-compatible HTTP server over the generation engine.
//!
//! * one engine thread owns the model (a [`Session`](crate::train::session::Session) with the
//!   decoding phases) and runs [`Engine`](crate::infer::engine::Engine)'s continuous batching:
//!   every request goes to it through one channel, and requests that arrive while others decode
//!   join them between decode steps, up to `--max-batch` sequences;
//! * the HTTP side is axum on a tokio runtime (`server.rs`): a handler checks a request
//!   (`api.rs`), submits one engine request per choice and awaits their events, then answers
//!   with the whole completion or streams it as server-sent events;
//! * a handler future or response stream that is dropped (the client disconnected) drops its
//!   receivers, and the engine frees those slots at its next step; a panicking handler answers
//!   500 and the server goes on.
//!
//! Endpoints: `POST /v1/completions`, `GET /v1/models`, `GET /v1/models/{id}`, `GET /health`,
//! `GET /metrics`; `POST /v1/chat/completions` is a 400 (GPT-2 has no chat template).
//!
//! The server needs the `serve` cargo feature (on by default); without it `wgpt serve` is an error.

pub mod api;
#[cfg(feature = "serve")]
mod server;

use crate::backend::BackendArgs;
use crate::error::Result;
use std::path::PathBuf;

#[derive(clap::Args, Debug)]
pub struct ServeArgs {
    /// model: an llm.c checkpoint (.bin), or a Hugging Face GPT-2 folder or model.safetensors
    #[arg(long)]
    pub model: PathBuf,
    /// address to listen on (0.0.0.0 or :: = every interface)
    #[arg(long, default_value = "127.0.0.1")]
    pub host: String,
    /// port to listen on; 0 picks a free one (the line printed at the start names it)
    #[arg(long, default_value_t = 8000)]
    pub port: u16,
    /// require `Authorization: Bearer KEY` on every /v1/ endpoint [default: no key]
    #[arg(long, value_name = "KEY")]
    pub api_key: Option<String>,
    /// sequences decoded together (KV-cache slots); further requests wait for a free slot
    #[arg(long, value_name = "N", default_value_t = 8)]
    pub max_batch: usize,
    /// positions per sequence, prompt + completion [default: the model's maxT]
    #[arg(long, value_name = "N")]
    pub max_seq_len: Option<usize>,
    /// the model's id in the API (`model` in requests, /v1/models) [default: --model as given]
    #[arg(long, value_name = "NAME")]
    pub served_model_name: Option<String>,
    /// weight storage: f16 halves the weights' memory and bytes read per token (f32
    /// accumulation); a backend without f16 says so and uses f32
    #[arg(long, value_enum, default_value_t = crate::infer::WeightDtype::F32)]
    pub dtype: crate::infer::WeightDtype,
    #[command(flatten)]
    pub backend: BackendArgs,
}

/// Runs the server until it fails (it does not return otherwise).
#[cfg(feature = "serve")]
pub fn run(a: &ServeArgs) -> Result<()> {
    server::run(a)
}

/// Without the `serve` feature there is no HTTP stack in the binary.
#[cfg(not(feature = "serve"))]
pub fn run(_: &ServeArgs) -> Result<()> {
    let msg = "this wgpt was built without the `serve` feature (the HTTP server): build it with the default features, or --features serve";
    Err(crate::error::Error::Unavailable(msg.into()))
}
