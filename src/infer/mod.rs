//! Text generation with a KV cache, on any backend: the runtime of the `Prefill` and `Decode`
//! phases that `graph::add_decoder` builds.
//!
//! * this file — [`Row`]s in, logits out: [`prefill`] and [`decode`] over a [`Session`] whose
//!   graph has the decoding phases (one prepared phase each, replayed for every position);
//! * `sampler.rs` — temperature, top-k, top-p, seeds, log-probabilities;
//! * `engine.rs` — sequences with stop conditions and streamed text, and continuous batching:
//!   requests join the running batch between decode steps and leave it the moment they finish.

pub mod engine;
pub mod sampler;

use crate::error::{Error, Result};
use crate::graph::{DecodeIo, Phase};
use crate::train::session::Session;

pub use engine::{Engine, Event, FinishReason, GenRequest};
pub use sampler::{Sampler, SamplingParams};

/// One row of a cached forward pass: token `token` of the sequence in cache slot `slot`, at
/// position `pos`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Row {
    pub slot: usize,
    pub pos: usize,
    pub token: u32,
}

/// `--dtype` of generation: the weights' storage type (activations and accumulation are f32).
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum WeightDtype {
    F32,
    /// f16 matmul weights and embeddings (half the memory and bytes read per token)
    F16,
}

/// The weight dtype to build with on `backend`: f16 where it has f16 buffers, else f32 with a
/// note on stderr saying so (e.g. a wgpu adapter without SHADER_F16).
pub fn weight_dtype(backend: &dyn crate::backend::Backend, want: WeightDtype) -> crate::graph::DType {
    use crate::graph::DType;
    match want {
        WeightDtype::F32 => DType::F32,
        WeightDtype::F16 if backend.supports(DType::F16) => DType::F16,
        WeightDtype::F16 => {
            eprintln!("note: {} has no f16 buffers (on wgpu: the adapter lacks SHADER_F16); using f32 weights", backend.name());
            DType::F32
        }
    }
}

fn decode_io(sess: &Session) -> Result<DecodeIo> {
    sess.graph.decode.clone().ok_or_else(|| Error::Internal("the graph has no decoding phases (graph::add_decoder)".into()))
}

/// Checks the rows, pads them with spare-slot rows to the row buffers' length and uploads them.
fn upload_rows(sess: &mut Session, io: &DecodeIo, rows: &[Row]) -> Result<()> {
    let (v, o) = (sess.graph.cfg.v, io.opts);
    let n = o.slots.max(o.prefill_rows);
    let mut buf = [vec![0i32; n], vec![0i32; n], vec![io.spare_slot as i32; n]];
    for (i, r) in rows.iter().enumerate() {
        if r.token as usize >= v {
            return Err(Error::Data(format!("token id {} is outside the model's vocabulary of {v}", r.token)));
        }
        if r.pos >= o.max_t {
            return Err(Error::Data(format!("position {} is beyond the context of {} tokens", r.pos, o.max_t)));
        }
        if r.slot >= o.slots {
            return Err(Error::Internal(format!("cache slot {} of {}", r.slot, o.slots)));
        }
        buf[0][i] = r.token as i32;
        buf[1][i] = r.pos as i32;
        buf[2][i] = r.slot as i32;
    }
    for (id, data) in [io.tokens, io.pos, io.slots].into_iter().zip(&buf) {
        sess.backend.upload_i32(id, data)?;
    }
    Ok(())
}

/// Writes the keys and values of `rows` into the caches (no logits). Rows of one slot must come
/// in position order; a row may attend to any earlier position of its slot already written.
/// Chunks of the `Prefill` phase, and the `Decode` phase for a tail that fits it.
pub fn prefill(sess: &mut Session, rows: &[Row]) -> Result<()> {
    let io = decode_io(sess)?;
    let (chunk, small) = (io.opts.prefill_rows, io.opts.slots);
    let mut rest = rows;
    while !rest.is_empty() {
        if rest.len() <= small {
            upload_rows(sess, &io, rest)?;
            return sess.run_phase(Phase::Decode);
        }
        let (now, later) = rest.split_at(rest.len().min(chunk));
        upload_rows(sess, &io, now)?;
        sess.run_phase(Phase::Prefill)?;
        rest = later;
    }
    Ok(())
}

/// One decode step over at most `slots` rows: writes their keys and values into the caches and
/// returns each row's logits over the real vocabulary (`rows.len()` × V, row-major).
pub fn decode(sess: &mut Session, rows: &[Row]) -> Result<Vec<f32>> {
    let io = decode_io(sess)?;
    if rows.len() > io.opts.slots {
        return Err(Error::Internal(format!("{} decode rows for a graph of {} slots", rows.len(), io.opts.slots)));
    }
    upload_rows(sess, &io, rows)?;
    sess.run_phase(Phase::Decode)?;
    let (v, vp) = (sess.graph.cfg.v, sess.graph.cfg.vp);
    let all = sess.backend.download_view(sess.graph.buffers.view(io.logits).slice(0, rows.len() * vp))?;
    Ok(all.chunks(vp).flat_map(|row| row[..v].iter().copied()).collect())
}
