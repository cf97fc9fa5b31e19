//! Hugging Face GPT-2 checkpoints (`model.safetensors` + `config.json`, as `transformers` saves
//! `GPT2LMHeadModel`) to and from llm.c's layout, and `wgpt convert`.
//!
//! The mapping (llm.c `ParamLayout` ⇄ HF names, written without the `transformer.` prefix as the
//! hub's `openai-community/gpt2` does; read with or without it):
//!
//! | llm.c | HF | note |
//! |---|---|---|
//! | wte (Vp, C) | `wte.weight` [V, C] | rows V..Vp are llm.c's zero padding (Vp = V rounded up to 128) |
//! | wpe (maxT, C) | `wpe.weight` [n_positions, C] | |
//! | ln1w/ln1b, ln2w/ln2b (L, C) | `h.N.ln_1.*`, `h.N.ln_2.*` [C] | |
//! | qkvw (L, 3C, C), qkvb | `h.N.attn.c_attn.{weight [C, 3C], bias}` | Conv1D: (in, out), transposed |
//! | attprojw (L, C, C), attprojb | `h.N.attn.c_proj.{weight [C, C], bias}` | transposed |
//! | fcw (L, 4C, C), fcb | `h.N.mlp.c_fc.{weight [C, 4C], bias}` | transposed |
//! | fcprojw (L, C, 4C), fcprojb | `h.N.mlp.c_proj.{weight [4C, C], bias}` | transposed |
//! | lnfw, lnfb (C) | `ln_f.weight`, `ln_f.bias` | |
//!
//! Decisions:
//! - the classifier is tied to `wte` in llm.c. A `lm_head.weight` in the input must equal
//!   `wte.weight` (else it is an error: an untied model cannot be held by llm.c's format, and
//!   converting it anyway would silently change the model); none is written, as on the hub
//!   (`transformers` ties it at load time, `tie_word_embeddings` is true).
//! - `h.N.attn.bias` / `h.N.attn.masked_bias` are the causal-mask buffers, not parameters: skipped
//!   on read, not written (`transformers` rebuilds them).
//! - F32, F16, BF16 (and F64) tensors are read and widened to f32 exactly; any other dtype is an
//!   error naming the tensor. HF output is always F32, so llm.c → HF → llm.c is byte-exact (the
//!   zero padding rows of wte are the only thing not stored in HF, and they come back as zeros).

use super::checkpoint::{self, Precision};
use super::params::{idx, ParamLayout};
use super::Config;
use crate::error::{Error, Result};
use safetensors::{Dtype, SafeTensorError, SafeTensors};
use serde_json::{json, Value};
use std::borrow::Cow;
use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};

/// The file name `transformers` uses for a single-file safetensors checkpoint.
pub const SAFETENSORS_FILE: &str = "model.safetensors";
/// llm.c pads the vocabulary to a multiple of this.
pub const VOCAB_PAD: usize = 128;
/// The prefix `GPT2LMHeadModel` puts before the transformer's own tensors in some files.
const PREFIX: &str = "transformer.";

/// What a model path holds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ModelFormat {
    /// an llm.c checkpoint (`.bin`, version 3 or 5)
    Llmc,
    /// a Hugging Face folder (config.json + model.safetensors)
    HfDir,
    /// a Hugging Face `model.safetensors` file (config.json beside it)
    HfFile,
}

/// Decide what `path` is: a folder is a Hugging Face model; a file is llm.c if it starts with the
/// llm.c model magic, Hugging Face if its name ends in `.safetensors` or it looks like one (an
/// 8-byte length then `{`). Anything else is handed to the llm.c reader, whose errors say what the
/// file is (a missing file included).
pub fn detect(path: &Path) -> ModelFormat {
    if path.is_dir() {
        return ModelFormat::HfDir;
    }
    let mut head = [0u8; 9];
    let n = std::fs::File::open(path).and_then(|mut f| read_up_to(&mut f, &mut head)).unwrap_or(0);
    if n >= 4 && i32::from_le_bytes([head[0], head[1], head[2], head[3]]) == checkpoint::MODEL_MAGIC {
        return ModelFormat::Llmc;
    }
    if path.extension().is_some_and(|e| e == "safetensors") || (n == 9 && head[8] == b'{') {
        return ModelFormat::HfFile;
    }
    ModelFormat::Llmc
}

fn read_up_to(f: &mut std::fs::File, buf: &mut [u8]) -> std::io::Result<usize> {
    use std::io::Read;
    let mut got = 0;
    while got < buf.len() {
        match f.read(&mut buf[got..])? {
            0 => break,
            k => got += k,
        }
    }
    Ok(got)
}

/// Load a model from an llm.c checkpoint or a Hugging Face GPT-2 (folder or model.safetensors),
/// whichever `path` is. Warnings about the conversion go to stderr.
pub fn load_model(path: &Path) -> Result<(Config, Vec<f32>)> {
    match detect(path) {
        ModelFormat::Llmc => checkpoint::read_checkpoint(path),
        ModelFormat::HfDir | ModelFormat::HfFile => {
            let m = read_hf(path)?;
            for w in &m.warnings {
                eprintln!("warning: {w}");
            }
            Ok((m.cfg, m.params))
        }
    }
}

/// `Vp` for a vocabulary of `v`: the next multiple of 128, as llm.c's train_gpt2.py pads.
pub fn padded_vocab(v: usize) -> usize {
    v.div_ceil(VOCAB_PAD) * VOCAB_PAD
}

/// One HF tensor and where it lives in llm.c's flat parameter vector.
#[derive(Clone, Debug)]
pub struct HfTensor {
    /// name without the `transformer.` prefix, e.g. `h.3.attn.c_attn.weight`
    pub name: String,
    /// shape in the HF file
    pub shape: Vec<usize>,
    /// offset in the llm.c parameter vector
    pub offset: usize,
    /// HF Conv1D weight [in, out] stored (out, in) by llm.c
    pub transposed: bool,
}

impl HfTensor {
    pub fn len(&self) -> usize {
        self.shape.iter().product()
    }
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// The HF tensors of a GPT-2 of shape `cfg`, in the order `transformers` lists them.
pub fn hf_tensors(cfg: &Config) -> Vec<HfTensor> {
    let lay = ParamLayout::new(cfg);
    let (c, l) = (cfg.c, cfg.l);
    let mut out = Vec::with_capacity(4 + 12 * l);
    let mut push = |name: String, shape: Vec<usize>, offset: usize, transposed: bool| {
        out.push(HfTensor { name, shape, offset, transposed })
    };
    push("wte.weight".into(), vec![cfg.v, c], lay.offsets[idx::WTE], false);
    push("wpe.weight".into(), vec![cfg.max_t, c], lay.offsets[idx::WPE], false);
    // (llm.c tensor, HF suffix, HF shape, transposed)
    let per_layer: [(usize, &str, Vec<usize>, bool); 12] = [
        (idx::LN1W, "ln_1.weight", vec![c], false),
        (idx::LN1B, "ln_1.bias", vec![c], false),
        (idx::QKVW, "attn.c_attn.weight", vec![c, 3 * c], true),
        (idx::QKVB, "attn.c_attn.bias", vec![3 * c], false),
        (idx::ATTPROJW, "attn.c_proj.weight", vec![c, c], true),
        (idx::ATTPROJB, "attn.c_proj.bias", vec![c], false),
        (idx::LN2W, "ln_2.weight", vec![c], false),
        (idx::LN2B, "ln_2.bias", vec![c], false),
        (idx::FCW, "mlp.c_fc.weight", vec![c, 4 * c], true),
        (idx::FCB, "mlp.c_fc.bias", vec![4 * c], false),
        (idx::FCPROJW, "mlp.c_proj.weight", vec![4 * c, c], true),
        (idx::FCPROJB, "mlp.c_proj.bias", vec![c], false),
    ];
    for layer in 0..l {
        for (t, suffix, shape, tr) in &per_layer {
            let per = lay.sizes[*t] / l;
            push(format!("h.{layer}.{suffix}"), shape.clone(), lay.offsets[*t] + layer * per, *tr);
        }
    }
    push("ln_f.weight".into(), vec![c], lay.offsets[idx::LNFW], false);
    push("ln_f.bias".into(), vec![c], lay.offsets[idx::LNFB], false);
    out
}

/// Transpose a row-major (rows, cols) matrix into `dst` as (cols, rows).
fn transpose_into(src: &[f32], rows: usize, cols: usize, dst: &mut [f32]) {
    const B: usize = 32;
    for r0 in (0..rows).step_by(B) {
        for c0 in (0..cols).step_by(B) {
            for r in r0..(r0 + B).min(rows) {
                for c in c0..(c0 + B).min(cols) {
                    dst[c * rows + r] = src[r * cols + c];
                }
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// reading

/// A Hugging Face GPT-2 read into llm.c's layout.
#[derive(Clone, Debug)]
pub struct HfModel {
    pub cfg: Config,
    pub params: Vec<f32>,
    /// the safetensors file and the config.json that were read
    pub safetensors: PathBuf,
    pub config: PathBuf,
    /// tensors read, by dtype (e.g. "F32" → 148)
    pub dtypes: Vec<(String, usize)>,
    /// causal-mask buffers skipped (`attn.bias`, `attn.masked_bias`)
    pub skipped_buffers: usize,
    /// things the user should know (ignored tensors, a GELU other than gelu_new...)
    pub warnings: Vec<String>,
}

/// Where the safetensors file and config.json of a HF model path are.
fn hf_paths(path: &Path) -> Result<(PathBuf, PathBuf)> {
    if path.is_dir() {
        let st = path.join(SAFETENSORS_FILE);
        if !st.exists() {
            let msg = if path.join("model.safetensors.index.json").exists() {
                "this is a sharded checkpoint (model.safetensors.index.json); only a single model.safetensors is read".to_string()
            } else if path.join("pytorch_model.bin").exists() {
                "has pytorch_model.bin but no model.safetensors; only safetensors files are read (download model.safetensors, \
                 or save the model again with transformers' save_pretrained)"
                    .to_string()
            } else {
                format!("no {SAFETENSORS_FILE} in this folder (expected a Hugging Face GPT-2 folder)")
            };
            return Err(Error::format(path, msg));
        }
        Ok((st, path.join("config.json")))
    } else {
        let dir = path.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
        Ok((path.to_path_buf(), dir.join("config.json")))
    }
}

/// The model shape from a GPT-2 config.json, with warnings for settings llm.c does not share.
fn read_config(path: &Path, warnings: &mut Vec<String>) -> Result<Config> {
    let text = std::fs::read_to_string(path).map_err(|e| {
        if e.kind() == std::io::ErrorKind::NotFound {
            Error::format(path, "not found; a Hugging Face model needs its config.json (n_layer, n_head, n_embd...) beside model.safetensors")
        } else {
            Error::io(path, e)
        }
    })?;
    let v: Value = serde_json::from_str(&text).map_err(|e| Error::format(path, format!("not valid JSON: {e}")))?;
    let obj = v.as_object().ok_or_else(|| Error::format(path, "not a JSON object"))?;
    if let Some(mt) = obj.get("model_type") {
        if mt.as_str() != Some("gpt2") {
            return Err(Error::format(path, format!("model_type is {mt}, not \"gpt2\"; only GPT-2 models can be converted")));
        }
    }
    let field = |name: &str| -> Result<Option<usize>> {
        match obj.get(name) {
            None | Some(Value::Null) => Ok(None),
            Some(x) => match x.as_u64() {
                Some(n) if n > 0 && n <= i32::MAX as u64 => Ok(Some(n as usize)),
                _ => Err(Error::format(path, format!("field \"{name}\" is {x}, expected a positive integer"))),
            },
        }
    };
    let need = |name: &str| -> Result<usize> {
        field(name)?.ok_or_else(|| Error::format(path, format!("missing field \"{name}\" (needed for a GPT-2 model)")))
    };
    let l = need("n_layer")?;
    let nh = need("n_head")?;
    let c = need("n_embd")?;
    let v = need("vocab_size")?;
    let max_t = match field("n_positions")? {
        Some(t) => t,
        None => field("n_ctx")?
            .ok_or_else(|| Error::format(path, "missing field \"n_positions\" (nor \"n_ctx\"): the model's context length"))?,
    };
    if let Some(inner) = field("n_inner")? {
        if inner != 4 * c {
            return Err(Error::format(path, format!("n_inner = {inner}, but llm.c's GPT-2 has an MLP of 4·n_embd = {}", 4 * c)));
        }
    }
    for (key, want) in [("scale_attn_weights", true), ("scale_attn_by_inverse_layer_idx", false)] {
        if let Some(b) = obj.get(key).and_then(Value::as_bool) {
            if b != want {
                return Err(Error::format(path, format!("{key} = {b}: llm.c's attention (scaled by 1/√head_size) cannot express it")));
            }
        }
    }
    if let Some(act) = obj.get("activation_function").and_then(Value::as_str) {
        if act != "gelu_new" && act != "gelu_pytorch_tanh" {
            warnings.push(format!(
                "{}: activation_function is \"{act}\"; llm.c and wgpt compute the tanh GELU (gelu_new), so outputs will differ slightly",
                path.display()
            ));
        }
    }
    if let Some(eps) = obj.get("layer_norm_epsilon").and_then(Value::as_f64) {
        if (eps - 1e-5).abs() > 1e-12 {
            warnings.push(format!("{}: layer_norm_epsilon is {eps}; llm.c and wgpt use 1e-5", path.display()));
        }
    }
    let cfg = Config { max_t, v, vp: padded_vocab(v), l, nh, c };
    cfg.validate().map_err(|m| Error::format(path, format!("invalid GPT-2 config: {m}")))?;
    if checkpoint::checked_param_count(&cfg).is_none() {
        return Err(Error::format(path, format!("invalid GPT-2 config: {} is too large", checkpoint::describe(&cfg))));
    }
    Ok(cfg)
}

/// Why a safetensors file could not be opened, in words that name the tensor where possible.
fn explain(bytes: &[u8], err: &SafeTensorError) -> String {
    let len = bytes.len();
    if len < 8 {
        return format!("file is only {len} bytes; a safetensors file starts with an 8-byte header length (truncated, or not a safetensors file)");
    }
    let n = u64::from_le_bytes(bytes[..8].try_into().unwrap());
    if n > (len - 8) as u64 {
        return format!("header length {n} does not fit in the {len}-byte file (truncated, or not a safetensors file)");
    }
    let header: Option<serde_json::Map<String, Value>> =
        std::str::from_utf8(&bytes[8..8 + n as usize]).ok().and_then(|s| serde_json::from_str(s).ok());
    let Some(header) = header else {
        return format!("not a safetensors file: its header is not a JSON object ({err})");
    };
    let data_len = (len - 8 - n as usize) as u64;
    let mut entries: Vec<(&String, &Value)> = header.iter().filter(|(k, _)| k.as_str() != "__metadata__").collect();
    // unknown dtypes first: the crate's own message does not say which tensor
    for (name, info) in &entries {
        let dt = &info["dtype"];
        if serde_json::from_value::<Dtype>(dt.clone()).is_err() {
            return format!("tensor \"{name}\" has unknown dtype {dt}");
        }
    }
    let offsets = |info: &Value| -> Option<(u64, u64)> {
        let o = info["data_offsets"].as_array()?;
        Some((o.first()?.as_u64()?, o.get(1)?.as_u64()?))
    };
    entries.sort_by_key(|(_, info)| offsets(info).unwrap_or((u64::MAX, u64::MAX)));
    for (name, info) in &entries {
        let Some((s, e)) = offsets(info) else {
            return format!("tensor \"{name}\" has no valid data_offsets");
        };
        if e > data_len {
            return format!(
                "truncated: tensor \"{name}\" needs bytes {s}..{e} of the data, the file holds only {data_len} ({len} bytes in all)"
            );
        }
        let dtype: Dtype = serde_json::from_value(info["dtype"].clone()).unwrap();
        let shape: Option<Vec<u64>> = info["shape"].as_array().and_then(|a| a.iter().map(Value::as_u64).collect());
        let bytes_needed = shape.as_ref().and_then(|sh| {
            sh.iter().try_fold(1u64, |a, &d| a.checked_mul(d)).and_then(|n| n.checked_mul(dtype.bitsize() as u64)).map(|b| b / 8)
        });
        match bytes_needed {
            Some(b) if e >= s && b == e - s => {}
            _ => {
                return format!(
                    "tensor \"{name}\": dtype {dtype} and shape {} do not match its {} data bytes",
                    info["shape"],
                    e.saturating_sub(s)
                )
            }
        }
    }
    match err {
        SafeTensorError::MetadataIncompleteBuffer => {
            format!("{data_len} data bytes but the tensors cover fewer: not a well-formed safetensors file")
        }
        SafeTensorError::InvalidOffset(name) => format!("tensor \"{name}\" has data offsets that overlap or leave a gap"),
        e => format!("not a valid safetensors file: {e}"),
    }
}

/// Widen one tensor's elements to f32 (exactly: f16, bf16 and f32 are subsets of f32; f64 rounds).
fn to_f32(dtype: Dtype, data: &[u8]) -> Option<Vec<f32>> {
    Some(match dtype {
        Dtype::F32 => data.chunks_exact(4).map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])).collect(),
        Dtype::F16 => data.chunks_exact(2).map(|b| half::f16::from_le_bytes([b[0], b[1]]).to_f32()).collect(),
        Dtype::BF16 => data.chunks_exact(2).map(|b| half::bf16::from_le_bytes([b[0], b[1]]).to_f32()).collect(),
        Dtype::F64 => data.chunks_exact(8).map(|b| f64::from_le_bytes(b.try_into().unwrap()) as f32).collect(),
        _ => return None,
    })
}

fn shape_str(s: &[usize]) -> String {
    format!("[{}]", s.iter().map(|d| d.to_string()).collect::<Vec<_>>().join(", "))
}

/// Read a Hugging Face GPT-2 (a folder with config.json and model.safetensors, or the
/// model.safetensors file itself) into llm.c's parameter layout.
pub fn read_hf(path: &Path) -> Result<HfModel> {
    // tensor names and strings from the files end up in messages: keep each on one line
    let one_line = |s: &str| s.replace('\n', "\\n").replace('\r', "\\r");
    match read_hf_files(path) {
        Ok(mut m) => {
            m.warnings = m.warnings.iter().map(|w| one_line(w)).collect();
            Ok(m)
        }
        Err(Error::Format { path, msg }) => Err(Error::Format { path, msg: one_line(&msg) }),
        Err(e) => Err(e),
    }
}

fn read_hf_files(path: &Path) -> Result<HfModel> {
    let (st_path, cfg_path) = hf_paths(path)?;
    let file = std::fs::File::open(&st_path).map_err(|e| Error::io(&st_path, e))?;
    let mut warnings = Vec::new();
    let cfg = read_config(&cfg_path, &mut warnings)?;
    // SAFETY: the map is read-only and dropped before returning; like the shard loader, wgpt
    // assumes no one truncates the file while it is being converted.
    let map = unsafe { memmap2::Mmap::map(&file) }.map_err(|e| Error::io(&st_path, e))?;
    let bytes: &[u8] = &map;
    let st = SafeTensors::deserialize(bytes).map_err(|e| Error::format(&st_path, explain(bytes, &e)))?;
    // config.json alone decides the shape: before allocating for it, check that the file can
    // hold that many weights (at least half a byte each, whatever the dtype)
    let weights = checkpoint::checked_param_count(&cfg).expect("checked in read_config") - (cfg.vp - cfg.v) * cfg.c;
    if weights / 2 > bytes.len() {
        return Err(Error::format(
            &st_path,
            format!(
                "{} bytes cannot hold the {weights} weights that {} describes ({}): they do not belong together",
                bytes.len(),
                cfg_path.display(),
                checkpoint::describe(&cfg)
            ),
        ));
    }

    // the tensors by name without the prefix; the mask buffers skipped
    let mut by_name: HashMap<String, (String, safetensors::tensor::TensorView<'_>)> = HashMap::new();
    let mut skipped_buffers = 0;
    for (full, view) in st.iter() {
        let name = full.strip_prefix(PREFIX).unwrap_or(full);
        if name.starts_with("h.") && (name.ends_with(".attn.bias") || name.ends_with(".attn.masked_bias")) {
            skipped_buffers += 1;
            continue;
        }
        if let Some((other, _)) = by_name.insert(name.to_string(), (full.to_string(), view)) {
            return Err(Error::format(&st_path, format!("tensor \"{name}\" appears twice (as \"{other}\" and \"{full}\")")));
        }
    }

    let want = hf_tensors(&cfg);
    let lay = ParamLayout::new(&cfg);
    let mut params = vec![0f32; lay.total];
    let mut dtypes: HashMap<String, usize> = HashMap::new();
    let cfg_note = format!("config.json: n_layer={} n_head={} n_embd={} vocab_size={} n_positions={}", cfg.l, cfg.nh, cfg.c, cfg.v, cfg.max_t);
    let mut widen = |full: &str, view: &safetensors::tensor::TensorView<'_>| -> Result<Vec<f32>> {
        let dt = view.dtype();
        let vals = to_f32(dt, view.data()).ok_or_else(|| {
            Error::format(&st_path, format!("tensor \"{full}\" has dtype {dt}; only F32, F16, BF16 (and F64) weights can be converted"))
        })?;
        *dtypes.entry(dt.to_string()).or_default() += 1;
        Ok(vals)
    };
    for t in &want {
        let Some((full, view)) = by_name.get(&t.name) else {
            return Err(Error::format(
                &st_path,
                format!("missing tensor \"{}\" (also looked for \"{PREFIX}{}\"; {cfg_note})", t.name, t.name),
            ));
        };
        if view.shape() != t.shape.as_slice() {
            return Err(Error::format(
                &st_path,
                format!("tensor \"{full}\" has shape {}, expected {} ({cfg_note})", shape_str(view.shape()), shape_str(&t.shape)),
            ));
        }
        let vals = widen(full, view)?;
        let dst = &mut params[t.offset..t.offset + vals.len()];
        if t.transposed {
            transpose_into(&vals, t.shape[0], t.shape[1], dst);
        } else {
            dst.copy_from_slice(&vals);
        }
    }
    let wanted: HashSet<&str> = want.iter().map(|t| t.name.as_str()).collect();

    // the classifier: tied to wte in llm.c
    if let Some((full, view)) = by_name.get("lm_head.weight") {
        let wte_shape = [cfg.v, cfg.c];
        if view.shape() != wte_shape {
            return Err(Error::format(
                &st_path,
                format!("tensor \"{full}\" has shape {}, expected {} like wte.weight", shape_str(view.shape()), shape_str(&wte_shape)),
            ));
        }
        let head = widen(full, view)?;
        let wte = &params[lay.offsets[idx::WTE]..lay.offsets[idx::WTE] + cfg.v * cfg.c];
        if let Some(i) = head.iter().zip(wte).position(|(a, b)| a.to_bits() != b.to_bits()) {
            return Err(Error::format(
                &st_path,
                format!(
                    "tensor \"{full}\" differs from wte.weight (first at row {}, column {}): the classifier is not tied to the \
                     token embedding, which llm.c's format (one wte for both) cannot hold",
                    i / cfg.c,
                    i % cfg.c
                ),
            ));
        }
    }

    // anything else: a layer past n_layer means config.json and the file disagree
    let mut ignored: Vec<&str> = Vec::new();
    for (name, (full, _)) in &by_name {
        if wanted.contains(name.as_str()) || name == "lm_head.weight" {
            continue;
        }
        if let Some(layer) = name.strip_prefix("h.").and_then(|r| r.split('.').next()).and_then(|n| n.parse::<usize>().ok()) {
            if layer >= cfg.l {
                return Err(Error::format(
                    &st_path,
                    format!("tensor \"{full}\" belongs to layer {layer}, but config.json says n_layer = {}", cfg.l),
                ));
            }
        }
        ignored.push(full);
    }
    if !ignored.is_empty() {
        ignored.sort();
        let shown: Vec<&str> = ignored.iter().take(5).copied().collect();
        warnings.push(format!(
            "{}: ignored {} tensor(s) that are not part of GPT2LMHeadModel: {}{}",
            st_path.display(),
            ignored.len(),
            shown.join(", "),
            if ignored.len() > shown.len() { ", ..." } else { "" }
        ));
    }
    let mut dtypes: Vec<(String, usize)> = dtypes.into_iter().collect();
    dtypes.sort();
    drop(by_name);
    Ok(HfModel { cfg, params, safetensors: st_path, config: cfg_path, dtypes, skipped_buffers, warnings })
}

// ---------------------------------------------------------------------------------------------
// writing

/// One output tensor: f32 values from the llm.c vector, transposed back for Conv1D weights,
/// turned into bytes only when the writer asks for them (one tensor in memory at a time).
struct OutTensor<'a> {
    shape: Vec<usize>,
    src: &'a [f32],
    transposed: bool,
}

impl safetensors::View for OutTensor<'_> {
    fn dtype(&self) -> Dtype {
        Dtype::F32
    }
    fn shape(&self) -> &[usize] {
        &self.shape
    }
    fn data(&self) -> Cow<'_, [u8]> {
        let vals: Cow<'_, [f32]> = if self.transposed {
            // llm.c (out, in) → HF (in, out) = shape
            let (rows_in, cols_out) = (self.shape[0], self.shape[1]);
            let mut t = vec![0f32; self.src.len()];
            transpose_into(self.src, cols_out, rows_in, &mut t);
            Cow::Owned(t)
        } else {
            Cow::Borrowed(self.src)
        };
        Cow::Owned(vals.iter().flat_map(|x| x.to_le_bytes()).collect())
    }
    fn data_len(&self) -> usize {
        self.src.len() * 4
    }
}

/// The config.json `transformers` needs to build `GPT2LMHeadModel` for `cfg` (the hub's gpt2
/// fields; bos/eos are GPT-2's <|endoftext|> when the vocabulary is GPT-2's, else null).
pub fn hf_config_json(cfg: &Config) -> Value {
    let eot = if cfg.v == super::config::GPT2_VOCAB { json!(super::config::GPT2_EOT) } else { Value::Null };
    json!({
        "activation_function": "gelu_new",
        "architectures": ["GPT2LMHeadModel"],
        "attn_pdrop": 0.1,
        "bos_token_id": eot,
        "embd_pdrop": 0.1,
        "eos_token_id": eot,
        "initializer_range": 0.02,
        "layer_norm_epsilon": 1e-5,
        "model_type": "gpt2",
        "n_ctx": cfg.max_t,
        "n_embd": cfg.c,
        "n_head": cfg.nh,
        "n_inner": null,
        "n_layer": cfg.l,
        "n_positions": cfg.max_t,
        "reorder_and_upcast_attn": false,
        "resid_pdrop": 0.1,
        "scale_attn_by_inverse_layer_idx": false,
        "scale_attn_weights": true,
        "summary_activation": null,
        "summary_first_dropout": 0.1,
        "summary_proj_to_labels": true,
        "summary_type": "cls_index",
        "summary_use_proj": true,
        "tie_word_embeddings": true,
        "torch_dtype": "float32",
        "use_cache": true,
        "vocab_size": cfg.v,
    })
}

fn hf_generation_config_json(cfg: &Config) -> Value {
    let eot = if cfg.v == super::config::GPT2_VOCAB { json!(super::config::GPT2_EOT) } else { Value::Null };
    json!({ "_from_model_config": true, "bos_token_id": eot, "eos_token_id": eot })
}

fn write_json(path: &Path, v: &Value) -> Result<()> {
    let mut text = serde_json::to_string_pretty(v).expect("JSON of plain values");
    text.push('\n');
    crate::atomic::write_atomic(path, text.as_bytes())
}

/// Write `params` (llm.c layout) as a Hugging Face GPT-2 folder: config.json,
/// generation_config.json and model.safetensors (F32, no prefix, no lm_head, no mask buffers).
/// Returns warnings (nonzero padding rows, a Vp that a round trip will not restore).
pub fn write_hf(dir: &Path, cfg: &Config, params: &[f32]) -> Result<Vec<String>> {
    cfg.validate().map_err(|m| Error::format(dir, format!("refusing to write invalid config: {m}")))?;
    let lay = ParamLayout::new(cfg);
    if params.len() != lay.total {
        return Err(Error::Internal(format!("write_hf: {} parameters for a model of {}", params.len(), lay.total)));
    }
    let mut warnings = Vec::new();
    let pad = &params[lay.offsets[idx::WTE] + cfg.v * cfg.c..lay.offsets[idx::WTE] + lay.sizes[idx::WTE]];
    if pad.iter().any(|&x| x != 0.0) {
        warnings.push(format!(
            "rows {}..{} of wte (llm.c's vocabulary padding) are not zero; Hugging Face has no place for them, they are dropped",
            cfg.v, cfg.vp
        ));
    }
    if cfg.vp != padded_vocab(cfg.v) {
        warnings.push(format!(
            "the checkpoint pads its vocabulary to Vp={}; converting back gives llm.c's usual Vp={}",
            cfg.vp,
            padded_vocab(cfg.v)
        ));
    }
    if dir.exists() && !dir.is_dir() {
        return Err(Error::format(dir, "exists and is not a folder; a Hugging Face model is written as a folder"));
    }
    std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    let tensors: Vec<(String, OutTensor<'_>)> = hf_tensors(cfg)
        .into_iter()
        .map(|t| {
            let n = t.len();
            (t.name, OutTensor { shape: t.shape, src: &params[t.offset..t.offset + n], transposed: t.transposed })
        })
        .collect();
    let st_path = dir.join(SAFETENSORS_FILE);
    let meta: HashMap<String, String> = [("format".to_string(), "pt".to_string())].into();
    safetensors::serialize_to_file(tensors, Some(meta), &st_path).map_err(|e| match e {
        SafeTensorError::IoError(io) => Error::io(&st_path, io),
        e => Error::format(&st_path, format!("cannot write: {e}")),
    })?;
    let cfg_path = dir.join("config.json");
    write_json(&cfg_path, &hf_config_json(cfg))?;
    write_json(&dir.join("generation_config.json"), &hf_generation_config_json(cfg))?;
    // the crate's temporary file is private (0600); give model.safetensors the permissions any
    // other new file gets here (config.json's, umask applied)
    let perm = std::fs::metadata(&cfg_path).map_err(|e| Error::io(&cfg_path, e))?.permissions();
    std::fs::set_permissions(&st_path, perm).map_err(|e| Error::io(&st_path, e))?;
    Ok(warnings)
}

// ---------------------------------------------------------------------------------------------
// wgpt convert

/// What `convert` did, for the one-line report.
#[derive(Clone, Debug)]
pub struct ConvertReport {
    pub cfg: Config,
    pub params: usize,
    /// a sentence: from what to what
    pub summary: String,
    pub warnings: Vec<String>,
}

/// `wgpt convert IN OUT`: an HF folder or model.safetensors → an llm.c checkpoint in `precision`;
/// an llm.c checkpoint → an HF folder (`precision` must then be F32: HF output is F32).
pub fn convert(input: &Path, output: &Path, precision: Precision) -> Result<ConvertReport> {
    match detect(input) {
        ModelFormat::HfDir | ModelFormat::HfFile => {
            if output.is_dir() {
                return Err(Error::format(
                    output,
                    "is a folder; converting a Hugging Face model writes an llm.c checkpoint file (e.g. OUT.bin)",
                ));
            }
            let m = read_hf(input)?;
            checkpoint::write_checkpoint(output, &m.cfg, &m.params, precision)?;
            let dtypes: Vec<String> = m.dtypes.iter().map(|(d, n)| format!("{n} {d}")).collect();
            let summary = format!(
                "{} ({} tensors, {} mask buffers skipped) → {}: llm.c version {} ({}), {}",
                m.safetensors.display(),
                dtypes.join(" + "),
                m.skipped_buffers,
                output.display(),
                precision.version(),
                if precision == Precision::F32 { "fp32" } else { "bf16" },
                checkpoint::describe(&m.cfg)
            );
            Ok(ConvertReport { cfg: m.cfg, params: m.params.len(), summary, warnings: m.warnings })
        }
        ModelFormat::Llmc => {
            // first say whether IN is an llm.c checkpoint at all (its header), then check OUT
            checkpoint::read_header(input)?;
            if precision != Precision::F32 {
                return Err(Error::flag(
                    "--checkpoint-precision",
                    "only applies when OUT is an llm.c checkpoint; a Hugging Face folder is written in F32",
                ));
            }
            if output.extension().is_some_and(|e| e == "bin" || e == "safetensors") && !output.is_dir() {
                return Err(Error::format(
                    output,
                    "converting an llm.c checkpoint writes a Hugging Face folder (config.json, model.safetensors); give a folder name",
                ));
            }
            let (cfg, params) = checkpoint::read_checkpoint(input)?;
            let warnings = write_hf(output, &cfg, &params)?;
            let summary = format!(
                "{} → {}/{{config.json, generation_config.json, {SAFETENSORS_FILE}}}: {} F32 tensors, {}",
                input.display(),
                output.display(),
                hf_tensors(&cfg).len(),
                checkpoint::describe(&cfg)
            );
            Ok(ConvertReport { cfg, params: params.len(), summary, warnings })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn transpose_round_trips() {
        let src: Vec<f32> = (0..35 * 70).map(|i| i as f32).collect();
        let mut t = vec![0f32; src.len()];
        transpose_into(&src, 35, 70, &mut t);
        assert_eq!(t[3 * 35 + 2], src[2 * 70 + 3]);
        let mut back = vec![0f32; src.len()];
        transpose_into(&t, 70, 35, &mut back);
        assert_eq!(back, src);
    }

    #[test]
    fn the_tensors_cover_the_layout_once() {
        let cfg = Config { max_t: 16, v: 300, vp: 384, l: 3, nh: 2, c: 8 };
        let lay = ParamLayout::new(&cfg);
        let mut hit = vec![0u8; lay.total];
        for t in hf_tensors(&cfg) {
            for h in &mut hit[t.offset..t.offset + t.len()] {
                *h += 1;
            }
        }
        // everything once, except wte's padding rows
        let pad = cfg.v * cfg.c..cfg.vp * cfg.c;
        for (i, h) in hit.iter().enumerate() {
            assert_eq!(*h, if pad.contains(&i) { 0 } else { 1 }, "element {i}");
        }
        assert_eq!(padded_vocab(50257), 50304);
        assert_eq!(padded_vocab(512), 512);
    }
}
