//! llm.c debug state (`gpt2_124M_debug_state.bin`, written by train_gpt2.py): header
//! [20240327, 2, B, T, 0...], then x (B·T i32), y (B·T i32), logits (B·T·V f32, unpadded rows),
//! loss (1 f32) and the gradients of every parameter (f32, checkpoint layout, wte padded to Vp).

use super::checkpoint::{
    bad_magic, checked_param_count, describe, open_with_header, read_f32s, read_i32s, HEADER_BYTES,
};
use super::Config;
use crate::error::{Error, Result};
use std::path::Path;

pub const DEBUG_STATE_MAGIC: i32 = 20240327;

/// One batch with the reference outputs of a forward/backward pass.
#[derive(Clone, Debug)]
pub struct DebugState {
    pub b: usize,
    pub t: usize,
    /// inputs, (B, T) row-major
    pub x: Vec<i32>,
    /// targets, (B, T) row-major
    pub y: Vec<i32>,
    /// B·T·V logits (row stride V, not Vp)
    pub logits: Vec<f32>,
    /// mean cross-entropy
    pub loss: f32,
    /// gradients, flat, checkpoint layout (wte with Vp rows)
    pub grads: Vec<f32>,
}

/// Read a debug state for a model of shape `cfg`.
pub fn read_debug_state(path: &Path, cfg: &Config) -> Result<DebugState> {
    let want = "an llm.c debug state";
    let (mut file, len, h) = open_with_header(path, want)?;
    if h[0] != DEBUG_STATE_MAGIC {
        return Err(bad_magic(path, h[0], DEBUG_STATE_MAGIC, "a debug state"));
    }
    match h[1] {
        2 => {}
        1 => {
            return Err(Error::format(
                path,
                "debug state version 1 is a legacy llm.c format (from before the padded vocabulary); \
                 regenerate it with llm.c's current train_gpt2.py (version 2)",
            ))
        }
        v => return Err(Error::format(path, format!("unsupported debug state version {v}; expected 2"))),
    }
    if h[2] <= 0 || h[3] <= 0 {
        return Err(Error::format(path, format!("invalid header: B = {}, T = {} (both must be > 0)", h[2], h[3])));
    }
    let (b, t) = (h[2] as usize, h[3] as usize);
    if t > cfg.max_t {
        return Err(Error::format(path, format!("T = {t} exceeds the model's maximum sequence length {}", cfg.max_t)));
    }
    let n = checked_param_count(cfg)
        .ok_or_else(|| Error::format(path, format!("model config {} is too large", describe(cfg))))?;
    let bt = b * t; // both < 2^31
    let logits_n = (bt as u128) * cfg.v as u128;
    let expected = HEADER_BYTES as u128 + 4 * (2 * bt as u128 + logits_n + 1 + n as u128);
    if (len as u128) < expected {
        return Err(Error::format(
            path,
            format!(
                "truncated debug state: B={b} T={t} for {} needs {expected} bytes, the file has {len} \
                 (is it for a different model?)",
                describe(cfg)
            ),
        ));
    }
    let mut x = vec![0i32; bt];
    let mut y = vec![0i32; bt];
    read_i32s(&mut file, path, &mut x)?;
    read_i32s(&mut file, path, &mut y)?;
    for (name, toks) in [("x", &x), ("y", &y)] {
        if let Some((i, &tok)) = toks.iter().enumerate().find(|(_, &tok)| tok < 0 || tok as usize >= cfg.v) {
            return Err(Error::format(
                path,
                format!("token id {tok} at {name}[{i}] is outside the vocabulary 0..{}", cfg.v),
            ));
        }
    }
    let mut logits = vec![0f32; logits_n as usize];
    read_f32s(&mut file, path, &mut logits)?;
    let mut loss = [0f32; 1];
    read_f32s(&mut file, path, &mut loss)?;
    let mut grads = vec![0f32; n];
    read_f32s(&mut file, path, &mut grads)?;
    Ok(DebugState { b, t, x, y, logits, loss: loss[0], grads })
}
