//! `wgpt convert` between Hugging Face GPT-2 (model.safetensors + config.json) and llm.c
//! checkpoints, and HF models given straight to `sample` and `train --init`.
//!
//! The HF files here are written by this test's own small safetensors writer in the real HF names
//! and layouts (Conv1D weights (in, out), the `transformer.` prefix, the attention-mask buffers,
//! some tensors in F16/BF16), built from the tiny llm.c fixture's tensors.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use wgpt::model::checkpoint::{read_checkpoint, write_checkpoint, Precision};
use wgpt::model::params::idx;
use wgpt::model::{Config, ParamLayout};

const TINY: &str = "tests/data/tiny";

fn wgpt(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_wgpt")).args(args).output().expect("running wgpt")
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

fn ok(o: &Output) -> String {
    assert!(o.status.success(), "wgpt failed:\n{}\n{}", String::from_utf8_lossy(&o.stdout), stderr(o));
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// A bad input: non-zero exit, no panic, exactly one error line, and it contains every needle.
fn assert_clean_error(o: &Output, needles: &[&str]) {
    let err = stderr(o);
    assert!(!o.status.success(), "expected failure, got success; stderr:\n{err}");
    assert!(!err.contains("panicked") && !err.contains("internal error") && !err.contains("RUST_BACKTRACE"), "panic:\n{err}");
    let lines: Vec<&str> = err.lines().filter(|l| l.starts_with("error")).collect();
    assert_eq!(lines.len(), 1, "expected one error line in:\n{err}");
    eprintln!("{}", lines[0]);
    for n in needles {
        assert!(lines[0].contains(n), "error line {:?} does not mention {n:?}", lines[0]);
    }
}

fn fixture() -> (Config, Vec<f32>) {
    read_checkpoint(Path::new(&format!("{TINY}/model.bin"))).unwrap()
}

// ---- a minimal safetensors writer (8-byte header length, JSON header, raw little-endian data) ----

#[derive(Clone)]
struct St {
    name: String,
    dtype: String,
    shape: Vec<usize>,
    data: Vec<u8>,
}

fn write_safetensors(path: &Path, tensors: &[St]) {
    let mut header = serde_json::Map::new();
    header.insert("__metadata__".into(), serde_json::json!({ "format": "pt" }));
    let mut off = 0;
    for t in tensors {
        header.insert(
            t.name.clone(),
            serde_json::json!({ "dtype": t.dtype, "shape": t.shape, "data_offsets": [off, off + t.data.len()] }),
        );
        off += t.data.len();
    }
    let mut h = serde_json::to_string(&header).unwrap().into_bytes();
    while !h.len().is_multiple_of(8) {
        h.push(b' ');
    }
    let mut bytes = (h.len() as u64).to_le_bytes().to_vec();
    bytes.extend(h);
    for t in tensors {
        bytes.extend(&t.data);
    }
    std::fs::write(path, bytes).unwrap();
}

fn encode(v: &[f32], dtype: &str) -> Vec<u8> {
    match dtype {
        "F32" => v.iter().flat_map(|x| x.to_le_bytes()).collect(),
        "F16" => v.iter().flat_map(|&x| half::f16::from_f32(x).to_le_bytes()).collect(),
        "BF16" => v.iter().flat_map(|&x| half::bf16::from_f32(x).to_le_bytes()).collect(),
        d => panic!("{d}"),
    }
}

/// What a reader must get back from `encode(v, dtype)`.
fn widened(v: &[f32], dtype: &str) -> Vec<f32> {
    match dtype {
        "F32" => v.to_vec(),
        "F16" => v.iter().map(|&x| half::f16::from_f32(x).to_f32()).collect(),
        "BF16" => v.iter().map(|&x| half::bf16::from_f32(x).to_f32()).collect(),
        d => panic!("{d}"),
    }
}

/// (rows, cols) row-major → (cols, rows)
fn transpose(src: &[f32], rows: usize, cols: usize) -> Vec<f32> {
    let mut out = vec![0f32; src.len()];
    for r in 0..rows {
        for c in 0..cols {
            out[c * rows + r] = src[r * cols + c];
        }
    }
    out
}

/// The tensors of an HF GPT2LMHeadModel file for llm.c parameters `p`: names with `prefix`,
/// Conv1D weights (in, out), wte unpadded; the mask buffers when `buffers`; each tensor in
/// `dtype_of(name without prefix)`.
fn hf_file_tensors(cfg: &Config, p: &[f32], prefix: &str, buffers: bool, dtype_of: &dyn Fn(&str) -> &'static str) -> Vec<St> {
    let lay = ParamLayout::new(cfg);
    let t = lay.split(p);
    let (c, l, v, maxt) = (cfg.c, cfg.l, cfg.v, cfg.max_t);
    let mut out = Vec::new();
    let mut push = |name: String, shape: Vec<usize>, vals: Vec<f32>| {
        assert_eq!(shape.iter().product::<usize>(), vals.len(), "{name}");
        let dtype = dtype_of(&name);
        out.push(St { name: format!("{prefix}{name}"), dtype: dtype.into(), shape, data: encode(&vals, dtype) });
    };
    push("wte.weight".into(), vec![v, c], t[idx::WTE][..v * c].to_vec());
    push("wpe.weight".into(), vec![maxt, c], t[idx::WPE].to_vec());
    for i in 0..l {
        let layer = |k: usize| {
            let per = t[k].len() / l;
            t[k][i * per..(i + 1) * per].to_vec()
        };
        push(format!("h.{i}.ln_1.weight"), vec![c], layer(idx::LN1W));
        push(format!("h.{i}.ln_1.bias"), vec![c], layer(idx::LN1B));
        push(format!("h.{i}.attn.c_attn.weight"), vec![c, 3 * c], transpose(&layer(idx::QKVW), 3 * c, c));
        push(format!("h.{i}.attn.c_attn.bias"), vec![3 * c], layer(idx::QKVB));
        push(format!("h.{i}.attn.c_proj.weight"), vec![c, c], transpose(&layer(idx::ATTPROJW), c, c));
        push(format!("h.{i}.attn.c_proj.bias"), vec![c], layer(idx::ATTPROJB));
        push(format!("h.{i}.ln_2.weight"), vec![c], layer(idx::LN2W));
        push(format!("h.{i}.ln_2.bias"), vec![c], layer(idx::LN2B));
        push(format!("h.{i}.mlp.c_fc.weight"), vec![c, 4 * c], transpose(&layer(idx::FCW), 4 * c, c));
        push(format!("h.{i}.mlp.c_fc.bias"), vec![4 * c], layer(idx::FCB));
        push(format!("h.{i}.mlp.c_proj.weight"), vec![4 * c, c], transpose(&layer(idx::FCPROJW), c, 4 * c));
        push(format!("h.{i}.mlp.c_proj.bias"), vec![c], layer(idx::FCPROJB));
    }
    push("ln_f.weight".into(), vec![c], t[idx::LNFW].to_vec());
    push("ln_f.bias".into(), vec![c], t[idx::LNFB].to_vec());
    if buffers {
        // the causal-mask buffers as older transformers versions save them
        for i in 0..l {
            let mask: Vec<f32> = (0..maxt * maxt).map(|k| if k % maxt <= k / maxt { 1.0 } else { 0.0 }).collect();
            out.push(St { name: format!("{prefix}h.{i}.attn.bias"), dtype: "F32".into(), shape: vec![1, 1, maxt, maxt], data: encode(&mask, "F32") });
            out.push(St { name: format!("{prefix}h.{i}.attn.masked_bias"), dtype: "F32".into(), shape: vec![], data: encode(&[-1e4], "F32") });
        }
    }
    out
}

/// A GPT-2 config.json like the hub's, for `cfg`, without the field `omit`.
fn hf_config(cfg: &Config, omit: Option<&str>) -> String {
    let mut v = serde_json::json!({
        "activation_function": "gelu_new", "architectures": ["GPT2LMHeadModel"], "attn_pdrop": 0.1,
        "bos_token_id": 50256, "eos_token_id": 50256, "embd_pdrop": 0.1, "initializer_range": 0.02,
        "layer_norm_epsilon": 1e-05, "model_type": "gpt2", "n_ctx": cfg.max_t, "n_embd": cfg.c, "n_head": cfg.nh,
        "n_layer": cfg.l, "n_positions": cfg.max_t, "resid_pdrop": 0.1, "summary_activation": null,
        "summary_first_dropout": 0.1, "summary_proj_to_labels": true, "summary_type": "cls_index",
        "summary_use_proj": true, "task_specific_params": { "text-generation": { "do_sample": true, "max_length": 50 } },
        "vocab_size": cfg.v
    });
    if let Some(f) = omit {
        v.as_object_mut().unwrap().remove(f);
    }
    serde_json::to_string_pretty(&v).unwrap()
}

/// Write an HF folder (model.safetensors + config.json) and return its path.
fn write_hf_dir(dir: &Path, tensors: &[St], config: &str) -> PathBuf {
    std::fs::create_dir_all(dir).unwrap();
    write_safetensors(&dir.join("model.safetensors"), tensors);
    std::fs::write(dir.join("config.json"), config).unwrap();
    dir.to_path_buf()
}

/// The tensors of a safetensors file read with the `safetensors` crate: name → (dtype, shape, f32 values).
fn read_st(path: &Path) -> std::collections::BTreeMap<String, (String, Vec<usize>, Vec<f32>)> {
    let bytes = std::fs::read(path).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    st.iter()
        .map(|(n, v)| {
            assert_eq!(v.dtype(), safetensors::Dtype::F32, "{n}");
            let vals = v.data().chunks_exact(4).map(|b| f32::from_le_bytes(b.try_into().unwrap())).collect();
            (n.to_string(), (v.dtype().to_string(), v.shape().to_vec(), vals))
        })
        .collect()
}

#[test]
fn llmc_to_hf_to_llmc_is_byte_exact() {
    let dir = tempfile::tempdir().unwrap();
    let hf = dir.path().join("hf");
    let model = format!("{TINY}/model.bin");
    let out = ok(&wgpt(&["convert", &model, s(&hf)]));
    assert!(out.contains("converted"), "{out}");
    for f in ["config.json", "generation_config.json", "model.safetensors"] {
        assert!(hf.join(f).is_file(), "{f} missing");
    }
    let cfg: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(hf.join("config.json")).unwrap()).unwrap();
    assert_eq!(cfg["model_type"], "gpt2");
    assert_eq!(cfg["architectures"], serde_json::json!(["GPT2LMHeadModel"]));
    assert_eq!(cfg["activation_function"], "gelu_new");
    assert_eq!(cfg["layer_norm_epsilon"].as_f64().unwrap(), 1e-5);
    for (k, want) in [("n_layer", 2), ("n_head", 4), ("n_embd", 64), ("n_positions", 64), ("n_ctx", 64), ("vocab_size", 500)] {
        assert_eq!(cfg[k], want, "{k}");
    }
    // not GPT-2's vocabulary: no <|endoftext|> id
    assert!(cfg["eos_token_id"].is_null() && cfg["bos_token_id"].is_null());

    // the hub's layout: no prefix, no lm_head, no mask buffers, Conv1D (in, out), wte unpadded
    let t = read_st(&hf.join("model.safetensors"));
    assert_eq!(t.len(), 4 + 12 * 2);
    assert!(t.keys().all(|k| !k.starts_with("transformer.") && !k.starts_with("lm_head") && !k.ends_with(".attn.bias")));
    assert_eq!(t["wte.weight"].1, vec![500, 64]);
    assert_eq!(t["wpe.weight"].1, vec![64, 64]);
    assert_eq!(t["h.1.attn.c_attn.weight"].1, vec![64, 192]);
    assert_eq!(t["h.0.mlp.c_fc.weight"].1, vec![64, 256]);
    assert_eq!(t["h.0.mlp.c_proj.weight"].1, vec![256, 64]);
    // and the values are the fixture's in HF's layout
    let (fcfg, p) = fixture();
    for want in hf_file_tensors(&fcfg, &p, "", false, &|_| "F32") {
        let got = &t[&want.name];
        assert_eq!(got.1, want.shape, "{}", want.name);
        assert_eq!(encode(&got.2, "F32"), want.data, "{}", want.name);
    }

    // back: byte for byte
    let back = dir.path().join("back.bin");
    ok(&wgpt(&["convert", s(&hf), s(&back)]));
    assert_eq!(std::fs::read(&back).unwrap(), std::fs::read(&model).unwrap());

    // back as version 5: what wgpt's own bf16 writer gives for the fixture
    let v5 = dir.path().join("back_bf16.bin");
    ok(&wgpt(&["convert", s(&hf), s(&v5), "--checkpoint-precision", "bf16"]));
    let want = dir.path().join("want_bf16.bin");
    write_checkpoint(&want, &fcfg, &p, Precision::Bf16).unwrap();
    assert_eq!(std::fs::read(&v5).unwrap(), std::fs::read(&want).unwrap());
    assert_eq!(i32::from_le_bytes(std::fs::read(&v5).unwrap()[4..8].try_into().unwrap()), 5);

    // a v5 checkpoint converts too (widened exactly), and the HF folder can be overwritten
    ok(&wgpt(&["convert", s(&v5), s(&hf)]));
    let back5 = dir.path().join("back5.bin");
    ok(&wgpt(&["convert", s(&hf), s(&back5), "--checkpoint-precision", "bf16"]));
    assert_eq!(std::fs::read(&back5).unwrap(), std::fs::read(&want).unwrap());
}

#[test]
fn hf_to_llmc_to_hf_keeps_every_tensor() {
    let dir = tempfile::tempdir().unwrap();
    let (cfg, p) = fixture();
    let dtype_of = |n: &str| match n {
        "wpe.weight" | "h.0.ln_1.weight" | "h.1.attn.c_proj.weight" => "F16",
        "h.1.mlp.c_fc.weight" | "ln_f.bias" | "h.0.attn.c_attn.bias" => "BF16",
        _ => "F32",
    };
    let mut tensors = hf_file_tensors(&cfg, &p, "transformer.", true, &dtype_of);
    // a tied lm_head saved explicitly (equal to wte) is accepted
    let wte = tensors.iter().find(|t| t.name == "transformer.wte.weight").unwrap().clone();
    tensors.push(St { name: "lm_head.weight".into(), ..wte });
    let hf = write_hf_dir(&dir.path().join("hf"), &tensors, &hf_config(&cfg, None));

    let bin = dir.path().join("model.bin");
    let out = ok(&wgpt(&["convert", s(&hf), s(&bin)]));
    assert!(out.contains("mask buffers skipped"), "{out}");
    let hf2 = dir.path().join("hf2");
    ok(&wgpt(&["convert", s(&bin), s(&hf2)]));

    // every parameter tensor of the input, widened to f32, comes back under its unprefixed name
    let got = read_st(&hf2.join("model.safetensors"));
    let mut seen = 0;
    for t in &tensors {
        let name = t.name.strip_prefix("transformer.").unwrap_or(&t.name);
        if name.ends_with(".attn.bias") || name.ends_with(".attn.masked_bias") || name == "lm_head.weight" {
            continue;
        }
        let want: Vec<f32> = match t.dtype.as_str() {
            "F32" => t.data.chunks_exact(4).map(|b| f32::from_le_bytes(b.try_into().unwrap())).collect(),
            "F16" => t.data.chunks_exact(2).map(|b| half::f16::from_le_bytes([b[0], b[1]]).to_f32()).collect(),
            "BF16" => t.data.chunks_exact(2).map(|b| half::bf16::from_le_bytes([b[0], b[1]]).to_f32()).collect(),
            d => panic!("{d}"),
        };
        let (dt, shape, vals) = got.get(name).unwrap_or_else(|| panic!("{name} missing from the output"));
        assert_eq!(dt, "F32");
        assert_eq!(shape, &t.shape, "{name}");
        assert!(vals.iter().zip(&want).all(|(a, b)| a.to_bits() == b.to_bits()), "{name} differs");
        seen += 1;
    }
    assert_eq!(seen, 28);
    assert_eq!(got.len(), 28);

    // the llm.c file in between: the fixture, with the F16/BF16 tensors rounded, padding zero
    let (cfg2, q) = read_checkpoint(&bin).unwrap();
    assert_eq!(cfg2, cfg);
    let lay = ParamLayout::new(&cfg);
    let mut want = p.clone();
    let wpe = lay.offsets[idx::WPE]..lay.offsets[idx::WPE] + lay.sizes[idx::WPE];
    want.splice(wpe.clone(), widened(&p[wpe], "F16"));
    let ln1w0 = lay.offsets[idx::LN1W]..lay.offsets[idx::LN1W] + cfg.c;
    want.splice(ln1w0.clone(), widened(&p[ln1w0], "F16"));
    let fcw1 = lay.offsets[idx::FCW] + 4 * cfg.c * cfg.c..lay.offsets[idx::FCW] + 8 * cfg.c * cfg.c;
    want.splice(fcw1.clone(), widened(&p[fcw1], "BF16"));
    let lnfb = lay.offsets[idx::LNFB]..lay.offsets[idx::LNFB] + cfg.c;
    want.splice(lnfb.clone(), widened(&p[lnfb], "BF16"));
    let qkvb0 = lay.offsets[idx::QKVB]..lay.offsets[idx::QKVB] + 3 * cfg.c;
    want.splice(qkvb0.clone(), widened(&p[qkvb0], "BF16"));
    let ap1 = lay.offsets[idx::ATTPROJW] + cfg.c * cfg.c..lay.offsets[idx::ATTPROJW] + 2 * cfg.c * cfg.c;
    want.splice(ap1.clone(), widened(&p[ap1], "F16"));
    assert!(q.iter().zip(&want).all(|(a, b)| a.to_bits() == b.to_bits()));
    assert!(q[cfg.v * cfg.c..cfg.vp * cfg.c].iter().all(|&x| x == 0.0));
}

#[test]
fn a_converted_hf_file_passes_verify() {
    // real HF layout, F32, prefixed names, mask buffers; IN is the model.safetensors file itself
    let dir = tempfile::tempdir().unwrap();
    let (cfg, p) = fixture();
    let hf = write_hf_dir(&dir.path().join("hf"), &hf_file_tensors(&cfg, &p, "transformer.", true, &|_| "F32"), &hf_config(&cfg, None));
    let conv = dir.path().join("converted.bin");
    ok(&wgpt(&["convert", s(&hf.join("model.safetensors")), s(&conv)]));
    assert_eq!(std::fs::read(&conv).unwrap(), std::fs::read(format!("{TINY}/model.bin")).unwrap());
    let o = wgpt(&["verify", "--model", s(&conv), "--state", &format!("{TINY}/debug_state.bin"), "--backend", "cpu", "--json"]);
    let out = ok(&o);
    let r: serde_json::Value = serde_json::from_str(out.lines().last().unwrap()).unwrap();
    assert_eq!(r["ok"], true, "{out}");
    // verify also takes the HF folder itself
    let o = wgpt(&["verify", "--model", s(&hf), "--state", &format!("{TINY}/debug_state.bin"), "--backend", "cpu", "--json"]);
    let out = ok(&o);
    let r2: serde_json::Value = serde_json::from_str(out.lines().last().unwrap()).unwrap();
    assert_eq!(r2["ok"], true, "{out}");
    assert_eq!(r2["losses"], r["losses"], "the folder and its conversion verify alike");
}

#[test]
fn sample_and_train_take_a_hugging_face_model() {
    let dir = tempfile::tempdir().unwrap();
    let hf = dir.path().join("hf");
    let model = format!("{TINY}/model.bin");
    ok(&wgpt(&["convert", &model, s(&hf)]));
    let st = hf.join("model.safetensors");
    let sample = |m: &str, extra: &[&str]| {
        let mut a = vec!["sample", "--model", m, "--tokens", "6", "--backend", "cpu"];
        a.extend(extra);
        ok(&wgpt(&a))
    };
    let greedy = sample(&model, &["--temperature", "0"]);
    assert!(!greedy.trim().is_empty());
    assert_eq!(sample(s(&hf), &["--temperature", "0"]), greedy);
    assert_eq!(sample(s(&st), &["--temperature", "0"]), greedy);
    let seeded = sample(&model, &["--seed", "7"]);
    assert_eq!(sample(s(&hf), &["--seed", "7"]), seeded);

    let o = wgpt(&[
        "train", "--backend", "cpu", "--init", s(&hf), "--train", &format!("{TINY}/train.bin"), "--val",
        &format!("{TINY}/train.bin"), "--batch", "2", "--seq-len", "16", "--steps", "2", "--val-every", "0",
        "--gen-tokens", "0",
    ]);
    ok(&o);
}

#[test]
fn bad_hugging_face_inputs_give_one_line_errors() {
    let dir = tempfile::tempdir().unwrap();
    let (cfg, p) = fixture();
    let good = hf_file_tensors(&cfg, &p, "transformer.", true, &|_| "F32");
    let config = hf_config(&cfg, None);
    let out = dir.path().join("out.bin");
    let case = |name: &str, tensors: &[St], config: &str| -> PathBuf { write_hf_dir(&dir.path().join(name), tensors, config) };
    let convert = |input: &Path| wgpt(&["convert", s(input), s(&out)]);

    // a missing tensor
    let t: Vec<St> = good.iter().filter(|t| t.name != "transformer.h.1.mlp.c_proj.bias").cloned().collect();
    let d = case("missing", &t, &config);
    assert_clean_error(&convert(&d), &["model.safetensors", "missing tensor", "h.1.mlp.c_proj.bias"]);

    // a wrong shape: c_attn stored (out, in) as llm.c does, not HF's (in, out)
    let mut t = good.clone();
    let qkv = t.iter_mut().find(|t| t.name == "transformer.h.0.attn.c_attn.weight").unwrap();
    qkv.shape = vec![192, 64];
    let d = case("shape", &t, &config);
    assert_clean_error(&convert(&d), &["model.safetensors", "h.0.attn.c_attn.weight", "shape [192, 64]", "[64, 192]"]);

    // a truncated file: the last tensor's data is cut
    let d = case("truncated", &hf_file_tensors(&cfg, &p, "transformer.", false, &|_| "F32"), &config);
    let st = d.join("model.safetensors");
    let bytes = std::fs::read(&st).unwrap();
    std::fs::write(&st, &bytes[..bytes.len() - 100]).unwrap();
    assert_clean_error(&convert(&d), &["model.safetensors", "truncated", "ln_f.bias"]);
    // ...and one cut inside its header
    std::fs::write(&st, &bytes[..20]).unwrap();
    assert_clean_error(&convert(&d), &["model.safetensors", "header length", "truncated"]);

    // an unknown dtype
    let mut t = good.clone();
    t.iter_mut().find(|t| t.name == "transformer.h.0.mlp.c_fc.weight").unwrap().dtype = "Q4".into();
    let d = case("dtype", &t, &config);
    assert_clean_error(&convert(&d), &["model.safetensors", "h.0.mlp.c_fc.weight", "unknown dtype", "Q4"]);
    // a known dtype that is not a float
    let mut t = good.clone();
    let b = t.iter_mut().find(|t| t.name == "transformer.ln_f.bias").unwrap();
    b.dtype = "I64".into();
    b.data = vec![0u8; 64 * 8];
    let d = case("int", &t, &config);
    assert_clean_error(&convert(&d), &["model.safetensors", "ln_f.bias", "I64"]);

    // config.json: a missing field, a wrong value, absent, disagreeing with the tensors
    let d = case("no_n_head", &good, &hf_config(&cfg, Some("n_head")));
    assert_clean_error(&convert(&d), &["config.json", "missing field", "n_head"]);
    let d = case("no_vocab", &good, &hf_config(&cfg, Some("vocab_size")));
    assert_clean_error(&convert(&d), &["config.json", "vocab_size"]);
    let d = case("bad_layers", &good, &config.replace("\"n_layer\": 2", "\"n_layer\": \"two\""));
    assert_clean_error(&convert(&d), &["config.json", "n_layer"]);
    let d = case("one_layer", &good, &config.replace("\"n_layer\": 2", "\"n_layer\": 1"));
    assert_clean_error(&convert(&d), &["model.safetensors", "h.1.", "n_layer = 1"]);
    let d = case("three_layers", &good, &config.replace("\"n_layer\": 2", "\"n_layer\": 3"));
    assert_clean_error(&convert(&d), &["missing tensor", "h.2.ln_1.weight"]);
    let d = case("llama", &good, &config.replace("\"model_type\": \"gpt2\"", "\"model_type\": \"llama\""));
    assert_clean_error(&convert(&d), &["config.json", "model_type"]);
    let d = case("no_config", &good, &config);
    std::fs::remove_file(d.join("config.json")).unwrap();
    assert_clean_error(&convert(&d.join("model.safetensors")), &["config.json", "not found"]);

    // an untied classifier
    let mut t = good.clone();
    let mut head = t.iter().find(|t| t.name == "transformer.wte.weight").unwrap().clone();
    head.name = "lm_head.weight".into();
    head.data[0] ^= 1;
    t.push(head);
    let d = case("untied", &t, &config);
    assert_clean_error(&convert(&d), &["model.safetensors", "lm_head.weight", "tied"]);

    // a folder with no model.safetensors; not a model at all
    let empty = dir.path().join("empty");
    std::fs::create_dir(&empty).unwrap();
    assert_clean_error(&convert(&empty), &["empty", "no model.safetensors"]);
    assert_clean_error(&convert(Path::new(&format!("{TINY}/debug_state.bin"))), &["debug_state.bin", "magic"]);
    assert_clean_error(&convert(&dir.path().join("nope.safetensors")), &["nope.safetensors"]);

    // the same errors reach sample and train --init
    let d = dir.path().join("missing");
    assert_clean_error(&wgpt(&["sample", "--model", s(&d), "--backend", "cpu"]), &["missing tensor", "h.1.mlp.c_proj.bias"]);
    assert_clean_error(
        &wgpt(&["train", "--init", s(&d), "--backend", "cpu", "--train", &format!("{TINY}/train.bin")]),
        &["missing tensor", "h.1.mlp.c_proj.bias"],
    );
    assert!(!out.exists(), "no output is written for a bad input");
}

#[test]
fn convert_flags_and_directions() {
    let o = wgpt(&["convert", "--help"]);
    let help = ok(&o);
    assert!(help.contains("--checkpoint-precision") && help.contains("[default: f32]"), "{help}");
    assert!(help.contains("<INPUT>") && help.contains("<OUTPUT>"), "{help}");
    assert!(ok(&wgpt(&["--help"])).contains("convert"));

    let dir = tempfile::tempdir().unwrap();
    let model = format!("{TINY}/model.bin");
    // llm.c in gives a folder out, not another .bin
    assert_clean_error(&wgpt(&["convert", &model, s(&dir.path().join("x.bin"))]), &["x.bin", "folder"]);
    // the precision flag is for llm.c output only
    assert_clean_error(
        &wgpt(&["convert", &model, s(&dir.path().join("hf")), "--checkpoint-precision", "bf16"]),
        &["--checkpoint-precision"],
    );
    // HF in gives a file out, not into an existing folder
    let hf = dir.path().join("hf");
    ok(&wgpt(&["convert", &model, s(&hf)]));
    assert_clean_error(&wgpt(&["convert", s(&hf), s(dir.path())]), &["is a folder"]);
}
