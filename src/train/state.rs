//! Training checkpoints in `--out DIR`, laid out like llm.c's train_gpt2.cu:
//! `model_%08d.bin` (llm.c model file), `state_%08d_%05d.bin` (optimiser + data position, one per rank) and an
//! empty `DONE_%08d` written last, which marks the checkpoint complete. Every file is written to a
//! temporary name and renamed, so a crash never leaves a half-written checkpoint that `--resume`
//! would pick.
//!
//! State file: a 256 × i32 header with llm.c's magic 20240527, version 1, num_processes, rank,
//! use_master_weights 0, should_shuffle, step at word 10 (as llm.c); then AdamW m and v (f32, in
//! checkpoint-parameter order, as llm.c); then — where llm.c stores its shuffle RNG structs — a
//! u64 length and a JSON object with wgpt's loader state, run shape and the outlier windows of
//! `--skip-loss-z`/`--skip-grad-z` (llm.c keeps those only in memory; saving them makes a resumed
//! run skip exactly the updates the uninterrupted run skips).
//!
//! `read_state` trusts nothing in the file: every length is checked against the file size before
//! anything is allocated, and a malformed loader state or window is a one-line error.

use super::outlier::OutlierDetector;
use crate::atomic::write_atomic_with;
use crate::data::shards::LoaderState;
use crate::error::{Error, Result};
use std::path::{Path, PathBuf};

pub const STATE_MAGIC: i32 = 20240527;
pub const STATE_VERSION: i32 = 1;

/// What the state file carries besides m and v.
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct StateExtra {
    pub loader: LoaderState,
    pub b: usize,
    pub t: usize,
    pub grad_accum: usize,
    pub num_params: usize,
    /// The outlier windows (absent in state files of older wgpt versions: the windows restart).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub outliers: Option<OutlierWindows>,
    /// ZeRO-1: this file's m and v are those of the flat parameter range `start..end` only, one
    /// of `world` ranks' (absent: the whole model's)
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub zero: Option<ZeroShard>,
    /// the precision the run trains in ("f32", "f16", "bf16"; absent: f32)
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub precision: Option<String>,
    /// fp16: the loss scaler (scale, clean steps, skipped steps)
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub loss_scaler: Option<super::scaler::LossScaler>,
}

/// Which part of the optimiser state a ZeRO-1 rank's state file holds.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ZeroShard {
    pub world: usize,
    pub start: usize,
    pub end: usize,
}

/// Header words (beyond llm.c's) of a ZeRO-1 state file: 1, then its range's start and end, so
/// that the m and v lengths are known before the JSON that follows them is read.
const ZERO_WORDS: [usize; 3] = [20, 21, 22];

/// The loss and grad-norm windows of the outlier detectors, as exact f64 bit patterns (JSON
/// numbers would not round-trip every f64, nor NaN).
#[derive(Clone, Debug, Default, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct OutlierWindows {
    pub loss: Vec<u64>,
    pub loss_next: usize,
    pub norm: Vec<u64>,
    pub norm_next: usize,
}

impl OutlierWindows {
    pub fn save(loss: &OutlierDetector, norm: &OutlierDetector) -> OutlierWindows {
        let bits = |d: &OutlierDetector| -> (Vec<u64>, usize) {
            let (vals, next) = d.to_parts();
            (vals.iter().map(|x| x.to_bits()).collect(), next)
        };
        let ((loss, loss_next), (norm, norm_next)) = (bits(loss), bits(norm));
        OutlierWindows { loss, loss_next, norm, norm_next }
    }

    /// The (loss, grad norm) detectors; None if a window is malformed.
    pub fn restore(&self) -> Option<(OutlierDetector, OutlierDetector)> {
        let det = |bits: &[u64], next: usize| {
            let vals: Vec<f64> = bits.iter().map(|&b| f64::from_bits(b)).collect();
            OutlierDetector::from_parts(&vals, next)
        };
        Some((det(&self.loss, self.loss_next)?, det(&self.norm, self.norm_next)?))
    }
}

#[derive(Clone, Debug)]
pub struct TrainState {
    /// optimiser steps already taken
    pub step: usize,
    pub m: Vec<f32>,
    pub v: Vec<f32>,
    pub extra: StateExtra,
}

pub fn model_path(dir: &Path, step: usize) -> PathBuf {
    dir.join(format!("model_{step:08}.bin"))
}
/// Rank 0's state file (the only one of a single-process run).
pub fn state_path(dir: &Path, step: usize) -> PathBuf {
    rank_state_path(dir, step, 0)
}
/// Each rank writes its own state, named as llm.c names it: `state_%08d_%05d.bin`.
pub fn rank_state_path(dir: &Path, step: usize, rank: usize) -> PathBuf {
    dir.join(format!("state_{step:08}_{rank:05}.bin"))
}
pub fn done_path(dir: &Path, step: usize) -> PathBuf {
    dir.join(format!("DONE_{step:08}"))
}

/// Delete the checkpoint of `step` (DONE marker first, so a half-deleted checkpoint is never
/// taken for a complete one), with every rank's state file. Files already gone are fine.
pub fn remove_checkpoint(dir: &Path, step: usize) -> Result<()> {
    let prefix = format!("state_{step:08}_");
    let mut states: Vec<PathBuf> = std::fs::read_dir(dir)
        .map(|rd| {
            rd.filter_map(|e| e.ok())
                .map(|e| e.path())
                .filter(|p| p.file_name().and_then(|n| n.to_str()).is_some_and(|n| n.starts_with(&prefix) && n.ends_with(".bin")))
                .collect()
        })
        .unwrap_or_default();
    states.sort();
    for p in [done_path(dir, step), model_path(dir, step)].into_iter().chain(states) {
        match std::fs::remove_file(&p) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(crate::error::Error::io(&p, e)),
        }
    }
    Ok(())
}

/// The checkpoint that falls out of the window after writing `step` (llm.c's -nk/-nm): the one
/// `keep`·`every` steps back, unless it is a multiple of `major` (0 = none) or does not exist.
pub fn checkpoint_to_prune(step: usize, every: usize, keep: usize, major: usize) -> Option<usize> {
    if keep == 0 || every == 0 {
        return None;
    }
    let old = step.checked_sub(keep * every).filter(|&s| s > 0)?;
    (major == 0 || old % major != 0).then_some(old)
}

/// The newest step with a DONE marker in `dir`.
pub fn latest_done(dir: &Path) -> Option<usize> {
    std::fs::read_dir(dir)
        .ok()?
        .filter_map(|e| e.ok())
        .filter_map(|e| e.file_name().to_str()?.strip_prefix("DONE_")?.parse::<usize>().ok())
        .max()
}

pub fn write_state(path: &Path, st: &TrainState, shuffle: bool) -> Result<()> {
    write_rank_state(path, st, shuffle, 0, 1)
}

/// The state file of `rank` of `world` (header words 2 and 3, as llm.c).
pub fn write_rank_state(path: &Path, st: &TrainState, shuffle: bool, rank: usize, world: usize) -> Result<()> {
    let json = serde_json::to_vec(&st.extra).map_err(|e| Error::Data(format!("serialising state: {e}")))?;
    write_atomic_with(path, |w| {
        let mut header = [0i32; 256];
        header[0] = STATE_MAGIC;
        header[1] = STATE_VERSION;
        header[2] = world as i32;
        header[3] = rank as i32;
        header[5] = shuffle as i32;
        header[10] = st.step as i32;
        if let Some(z) = &st.extra.zero {
            header[ZERO_WORDS[0]] = 1;
            header[ZERO_WORDS[1]] = z.start as i32;
            header[ZERO_WORDS[2]] = z.end as i32;
        }
        w.write_all(bytemuck::cast_slice(&header))?;
        w.write_all(bytemuck::cast_slice(&st.m))?;
        w.write_all(bytemuck::cast_slice(&st.v))?;
        w.write_all(&(json.len() as u64).to_le_bytes())?;
        w.write_all(&json)
    })
}

pub fn read_state(path: &Path, num_params: usize) -> Result<TrainState> {
    let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
    let fail = |msg: String| Error::format(path, msg);
    if bytes.len() < 1024 {
        return Err(fail(format!("truncated state file ({} bytes, header alone is 1024)", bytes.len())));
    }
    let word = |i: usize| i32::from_le_bytes(bytes[4 * i..4 * i + 4].try_into().unwrap());
    if word(0) != STATE_MAGIC {
        return Err(fail(format!("bad magic {} (expected training-state magic {STATE_MAGIC})", word(0))));
    }
    if word(1) != STATE_VERSION {
        return Err(fail(format!("unsupported state version {} (expected {STATE_VERSION})", word(1))));
    }
    let step = usize::try_from(word(10)).map_err(|_| fail(format!("invalid step {} in the header", word(10))))?;
    // a ZeRO-1 shard holds the moments of its range only
    let shard = if word(ZERO_WORDS[0]) == 1 {
        let (a, b) = (word(ZERO_WORDS[1]), word(ZERO_WORDS[2]));
        if a < 0 || b < a || b as usize > num_params {
            return Err(fail(format!("invalid ZeRO-1 range {a}..{b} in the header for {num_params} parameters")));
        }
        Some(a as usize..b as usize)
    } else {
        None
    };
    let full = num_params;
    let num_params = shard.as_ref().map_or(full, |r| r.len());
    let mv_bytes = 2 * num_params * 4;
    if bytes.len() < 1024 + mv_bytes + 8 {
        return Err(fail(format!(
            "truncated state file: {} bytes, expected at least {} for {num_params} parameters",
            bytes.len(),
            1024 + mv_bytes + 8
        )));
    }
    let to_f32 = |b: &[u8]| -> Vec<f32> { b.chunks_exact(4).map(|c| f32::from_le_bytes(c.try_into().unwrap())).collect() };
    let m = to_f32(&bytes[1024..1024 + num_params * 4]);
    let v = to_f32(&bytes[1024 + num_params * 4..1024 + mv_bytes]);
    let p = 1024 + mv_bytes;
    let len = u64::from_le_bytes(bytes[p..p + 8].try_into().unwrap());
    let rest = (bytes.len() - p - 8) as u64;
    if len > rest {
        return Err(fail(format!("truncated state file: the loader state needs {len} bytes, {rest} are left")));
    }
    let js = &bytes[p + 8..p + 8 + len as usize];
    let extra: StateExtra = serde_json::from_slice(js).map_err(|e| fail(format!("corrupt loader state: {e}")))?;
    if extra.num_params != full {
        return Err(fail(format!("state is for {} parameters, the model has {full}", extra.num_params)));
    }
    if extra.zero.as_ref().map(|z| z.start..z.end) != shard {
        return Err(fail("the ZeRO-1 range in the header and in the loader state disagree".into()));
    }
    if extra.outliers.as_ref().is_some_and(|w| w.restore().is_none()) {
        return Err(fail("corrupt outlier windows (--skip-loss-z/--skip-grad-z state)".into()));
    }
    if let Some(p) = extra.precision.as_deref().filter(|p| !["f32", "f16", "bf16"].contains(p)) {
        return Err(fail(format!("unknown precision {p:?} in the state (f32, f16 or bf16)")));
    }
    if let Some(s) = extra.loss_scaler.as_ref().filter(|s| !(s.scale.is_finite() && s.scale > 0.0) || s.window == 0) {
        return Err(fail(format!("corrupt loss scaler (scale {}, window {}): the scale must be finite and positive", s.scale, s.window)));
    }
    Ok(TrainState { step, m, v, extra })
}

/// The whole optimiser state of the checkpoint of `step` in `dir`, as one process would hold it:
/// rank `rank`'s file (rank 0's when the saved run had fewer ranks); when the run was sharded
/// (ZeRO-1), every rank's file, their ranges put together. So a run resumes on any world size,
/// sharded or not, at the same global batch.
pub fn read_full_state(dir: &Path, step: usize, rank: usize, num_params: usize) -> Result<TrainState> {
    let own = rank_state_path(dir, step, rank);
    let path = if own.exists() { own } else { state_path(dir, step) };
    let mut st = read_state(&path, num_params)?;
    let Some(z) = st.extra.zero.clone() else { return Ok(st) };
    let (mut m, mut v) = (vec![0f32; num_params], vec![0f32; num_params]);
    let mut covered = 0;
    for r in 0..z.world {
        let p = rank_state_path(dir, step, r);
        let part = read_state(&p, num_params)?;
        let Some(pz) = part.extra.zero.as_ref().filter(|pz| pz.world == z.world) else {
            return Err(Error::format(p, format!("not a ZeRO-1 state of a {}-rank run like {}", z.world, path.display())));
        };
        m[pz.start..pz.end].copy_from_slice(&part.m);
        v[pz.start..pz.end].copy_from_slice(&part.v);
        covered += pz.end - pz.start;
    }
    if covered != num_params {
        return Err(Error::format(path, format!("the {} ZeRO-1 state files cover {covered} of {num_params} parameters", z.world)));
    }
    st.m = m;
    st.v = v;
    st.extra.zero = None;
    Ok(st)
}
