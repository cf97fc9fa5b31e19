//! llm.c model checkpoints (`gpt2_124M.bin`, `model_%08d.bin`): a 256-word int32 header
//! [20240326, version, maxT, V, L, NH, C, Vp, 0...] followed by the 16 parameter tensors in
//! `ParamLayout` order, fp32 (version 3) or bf16 (version 5). Trailing bytes are ignored, as in llm.c.

use super::{Config, ParamLayout};
use crate::error::{Error, Result};
use std::fs::File;
use std::io::{Read, Write};
use std::path::Path;

pub const MODEL_MAGIC: i32 = 20240326;
pub const HEADER_WORDS: usize = 256;
pub const HEADER_BYTES: usize = HEADER_WORDS * 4;

/// Element type of a checkpoint's payload.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Precision {
    /// version 3: every tensor fp32
    F32,
    /// version 5: every tensor bf16 (layernorm parameters included)
    Bf16,
}

impl Precision {
    pub fn version(self) -> i32 {
        match self {
            Precision::F32 => 3,
            Precision::Bf16 => 5,
        }
    }
    pub fn bytes_per_param(self) -> usize {
        match self {
            Precision::F32 => 4,
            Precision::Bf16 => 2,
        }
    }
}

/// Which llm.c file a magic number belongs to (for "this is not a checkpoint" messages).
pub(crate) fn magic_kind(magic: i32) -> Option<&'static str> {
    Some(match magic {
        20240326 => "an llm.c model checkpoint",
        20240327 => "an llm.c debug state (gpt2_124M_debug_state.bin)",
        20240328 => "an llm.c tokenizer (gpt2_tokenizer.bin)",
        20240520 => "a GPT-2 token data shard",
        20240522 => "an eval (HellaSwag/MMLU) file",
        20240527 => "an llm.c training-state file (state_*.bin)",
        20240801 => "a Llama-3 token data shard",
        _ => return None,
    })
}

/// Explain a wrong magic: what was found, what was expected, and which kind of file it is.
pub(crate) fn bad_magic(path: &Path, found: i32, expected: i32, want: &str) -> Error {
    let what = match magic_kind(found) {
        Some(kind) => format!(" (this is {kind}, not {want})"),
        None => format!(" (not {want})"),
    };
    Error::format(path, format!("bad magic number {found}, expected {expected}{what}"))
}

/// Open `path` and read its 256-word header, with typed errors for missing, empty and short files.
/// Returns the open file (positioned after the header), its length in bytes and the header.
pub(crate) fn open_with_header(path: &Path, want: &str) -> Result<(File, u64, [i32; HEADER_WORDS])> {
    let mut file = File::open(path).map_err(|e| Error::io(path, e))?;
    let len = file.metadata().map_err(|e| Error::io(path, e))?.len();
    if len == 0 {
        return Err(Error::format(path, format!("file is empty (0 bytes); expected {want}")));
    }
    if len < HEADER_BYTES as u64 {
        return Err(Error::format(
            path,
            format!("file is only {len} bytes, shorter than the {HEADER_BYTES}-byte header of {want}"),
        ));
    }
    let mut bytes = [0u8; HEADER_BYTES];
    file.read_exact(&mut bytes).map_err(|e| Error::io(path, e))?;
    let mut header = [0i32; HEADER_WORDS];
    for (h, w) in header.iter_mut().zip(bytes.chunks_exact(4)) {
        *h = i32::from_le_bytes([w[0], w[1], w[2], w[3]]);
    }
    Ok((file, len, header))
}

/// Read exactly `out.len()` little-endian f32 values.
pub(crate) fn read_f32s(file: &mut File, path: &Path, out: &mut [f32]) -> Result<()> {
    file.read_exact(bytemuck::cast_slice_mut::<f32, u8>(out)).map_err(|e| Error::io(path, e))?;
    if cfg!(target_endian = "big") {
        for x in out.iter_mut() {
            *x = f32::from_bits(x.to_bits().swap_bytes());
        }
    }
    Ok(())
}

/// Read exactly `out.len()` little-endian i32 values.
pub(crate) fn read_i32s(file: &mut File, path: &Path, out: &mut [i32]) -> Result<()> {
    file.read_exact(bytemuck::cast_slice_mut::<i32, u8>(out)).map_err(|e| Error::io(path, e))?;
    if cfg!(target_endian = "big") {
        for x in out.iter_mut() {
            *x = x.swap_bytes();
        }
    }
    Ok(())
}

/// Read exactly `out.len()` little-endian bf16 values, widened (exactly) to f32.
fn read_bf16s(file: &mut File, path: &Path, out: &mut [f32]) -> Result<()> {
    let mut buf = vec![0u8; (2 * out.len()).clamp(2, 1 << 20)];
    for chunk in out.chunks_mut(buf.len() / 2) {
        let bytes = &mut buf[..chunk.len() * 2];
        file.read_exact(bytes).map_err(|e| Error::io(path, e))?;
        for (x, b) in chunk.iter_mut().zip(bytes.chunks_exact(2)) {
            // bf16 is the top half of an f32
            *x = f32::from_bits((u16::from_le_bytes([b[0], b[1]]) as u32) << 16);
        }
    }
    Ok(())
}

/// `L=2 NH=4 C=64 V=500 Vp=512 maxT=64`, for messages.
pub(crate) fn describe(cfg: &Config) -> String {
    format!("L={} NH={} C={} V={} Vp={} maxT={}", cfg.l, cfg.nh, cfg.c, cfg.v, cfg.vp, cfg.max_t)
}

/// Number of parameters of `cfg`, or None if it overflows (absurd header values).
pub(crate) fn checked_param_count(cfg: &Config) -> Option<usize> {
    let (l, c, vp, t) = (cfg.l, cfg.c, cfg.vp, cfg.max_t);
    let cc = c.checked_mul(c)?;
    // wte + wpe + per layer (12 C² + 13 C) + 2 C
    let per_layer = cc.checked_mul(12)?.checked_add(c.checked_mul(13)?)?;
    vp.checked_mul(c)?
        .checked_add(t.checked_mul(c)?)?
        .checked_add(l.checked_mul(per_layer)?)?
        .checked_add(c.checked_mul(2)?)
}

/// Parse and validate a model header; returns the config and the payload precision.
fn parse_model_header(path: &Path, h: &[i32; HEADER_WORDS]) -> Result<(Config, Precision)> {
    if h[0] != MODEL_MAGIC {
        return Err(bad_magic(path, h[0], MODEL_MAGIC, "a model checkpoint"));
    }
    let precision = match h[1] {
        3 => Precision::F32,
        5 => Precision::Bf16,
        1 | 2 => {
            return Err(Error::format(
                path,
                format!(
                    "checkpoint version {} is a legacy llm.c format with an unpadded vocabulary ({}); \
                     re-export it with llm.c's current train_gpt2.py (version 3 fp32 or 5 bf16)",
                    h[1],
                    if h[1] == 1 { "fp32" } else { "bf16" }
                ),
            ))
        }
        4 => {
            return Err(Error::format(
                path,
                "checkpoint version 4 is a legacy llm.c bf16 format that kept the layernorm parameters in fp32; \
                 re-export it with llm.c's current train_gpt2.py (version 3 fp32 or 5 bf16)",
            ))
        }
        v => {
            return Err(Error::format(
                path,
                format!("unsupported checkpoint version {v}; expected 3 (fp32) or 5 (bf16)"),
            ))
        }
    };
    let names = ["maxT", "V", "L", "NH", "C", "Vp"];
    for (i, name) in names.iter().enumerate() {
        if h[2 + i] <= 0 {
            return Err(Error::format(path, format!("invalid header: {name} = {} (must be > 0)", h[2 + i])));
        }
    }
    let cfg = Config {
        max_t: h[2] as usize,
        v: h[3] as usize,
        l: h[4] as usize,
        nh: h[5] as usize,
        c: h[6] as usize,
        vp: h[7] as usize,
    };
    cfg.validate().map_err(|m| Error::format(path, format!("invalid model config in header: {m}")))?;
    if checked_param_count(&cfg).is_none() {
        return Err(Error::format(path, format!("invalid model config in header: {} is too large", describe(&cfg))));
    }
    Ok((cfg, precision))
}

/// Read and validate only the header of a checkpoint (the payload is not checked).
pub fn read_header(path: &Path) -> Result<Config> {
    let (_, _, h) = open_with_header(path, "an llm.c model checkpoint")?;
    Ok(parse_model_header(path, &h)?.0)
}

/// Read a version 3 (fp32) or 5 (bf16, widened to f32) checkpoint: its config and the flat
/// parameter vector in `ParamLayout` order.
pub fn read_checkpoint(path: &Path) -> Result<(Config, Vec<f32>)> {
    let (mut file, len, h) = open_with_header(path, "an llm.c model checkpoint")?;
    let (cfg, precision) = parse_model_header(path, &h)?;
    let n = checked_param_count(&cfg).expect("checked in parse_model_header");
    let expected = (n as u128) * precision.bytes_per_param() as u128 + HEADER_BYTES as u128;
    if (len as u128) < expected {
        return Err(Error::format(
            path,
            format!(
                "truncated checkpoint: {} with {n} {} parameters needs {expected} bytes, the file has {len}",
                describe(&cfg),
                if precision == Precision::F32 { "fp32" } else { "bf16" }
            ),
        ));
    }
    let mut params = vec![0f32; n];
    match precision {
        Precision::F32 => read_f32s(&mut file, path, &mut params)?,
        Precision::Bf16 => read_bf16s(&mut file, path, &mut params)?,
    }
    Ok((cfg, params))
}

/// Build the 1024-byte header of a checkpoint.
fn header_bytes(path: &Path, cfg: &Config, precision: Precision) -> Result<Vec<u8>> {
    let mut h = [0i32; HEADER_WORDS];
    h[0] = MODEL_MAGIC;
    h[1] = precision.version();
    let vals = [cfg.max_t, cfg.v, cfg.l, cfg.nh, cfg.c, cfg.vp];
    for (i, &v) in vals.iter().enumerate() {
        h[2 + i] = i32::try_from(v).map_err(|_| {
            Error::format(path, format!("cannot write config {}: {v} does not fit in int32", describe(cfg)))
        })?;
    }
    Ok(h.iter().flat_map(|w| w.to_le_bytes()).collect())
}

/// Write a checkpoint atomically: version 3 (fp32) or 5 (bf16, round-to-nearest-even).
pub fn write_checkpoint(path: &Path, cfg: &Config, params: &[f32], precision: Precision) -> Result<()> {
    cfg.validate().map_err(|m| Error::format(path, format!("refusing to write invalid config: {m}")))?;
    let n = ParamLayout::new(cfg).total;
    if params.len() != n {
        return Err(Error::format(
            path,
            format!("refusing to write {} parameters for {}, which has {n}", params.len(), describe(cfg)),
        ));
    }
    let header = header_bytes(path, cfg, precision)?;
    crate::atomic::write_atomic_with(path, |w: &mut dyn Write| {
        w.write_all(&header)?;
        const CHUNK: usize = 1 << 18;
        match precision {
            Precision::F32 if cfg!(target_endian = "little") => w.write_all(bytemuck::cast_slice(params)),
            Precision::F32 => {
                let mut buf = Vec::with_capacity(CHUNK * 4);
                for chunk in params.chunks(CHUNK) {
                    buf.clear();
                    buf.extend(chunk.iter().flat_map(|x| x.to_le_bytes()));
                    w.write_all(&buf)?;
                }
                Ok(())
            }
            Precision::Bf16 => {
                let mut buf = Vec::with_capacity(CHUNK * 2);
                for chunk in params.chunks(CHUNK) {
                    buf.clear();
                    // f32 -> bf16 rounding to nearest, ties to even
                    buf.extend(chunk.iter().flat_map(|&x| half::bf16::from_f32(x).to_bits().to_le_bytes()));
                    w.write_all(&buf)?;
                }
                Ok(())
            }
        }
    })
}
