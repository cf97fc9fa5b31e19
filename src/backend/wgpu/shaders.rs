//! WGSL sources (`shaders/<family>.wgsl`, embedded at build time) and the small preprocessor that
//! turns a file into what is actually compiled:
//! * `//#if subgroup` … `//#endif` blocks are kept only for adapters with `SUBGROUP`;
//! * the read-write variant rewrites every `var<storage, read>` to `read_write`, used when one
//!   dispatch binds the same buffer as input and output (WebGPU forbids read-only + writable usage
//!   of one buffer within a dispatch);
//! * `const NAME: u32 = …;` lines can be specialised (attention's head size and tile sizes);
//! * `alias NAME = f32;` lines can be specialised to another element type (the weight element
//!   type of f16 inference: `WeightT` in matmul.wgsl, `WteT`/`WpeT` in encoder.wgsl); a variant
//!   with any `f16` type starts with `enable f16;` (it needs `wgpu::Features::SHADER_F16`). The
//!   shaders load such arrays through `f32(…)` / `vec4<f32>(…)`, the identity for f32;
//! * `//#include <lib> <type>` pastes `shaders/lib/<lib>.wgsl` with its `ELEM` set to that type
//!   (WGSL has neither includes nor generics; the workgroup reductions live there once).

use crate::error::{Error, Result};

/// Every kernel family, i.e. every file under `shaders/`.
pub const FAMILIES: [&str; 9] =
    ["encoder", "layernorm", "matmul", "attention", "gelu", "residual", "classifier", "adamw", "reduce"];

/// The embedded source of one family.
pub fn source(family: &str) -> Option<&'static str> {
    Some(match family {
        "encoder" => include_str!("../../../shaders/encoder.wgsl"),
        "layernorm" => include_str!("../../../shaders/layernorm.wgsl"),
        "matmul" => include_str!("../../../shaders/matmul.wgsl"),
        "attention" => include_str!("../../../shaders/attention.wgsl"),
        "gelu" => include_str!("../../../shaders/gelu.wgsl"),
        "residual" => include_str!("../../../shaders/residual.wgsl"),
        "classifier" => include_str!("../../../shaders/classifier.wgsl"),
        "adamw" => include_str!("../../../shaders/adamw.wgsl"),
        "reduce" => include_str!("../../../shaders/reduce.wgsl"),
        _ => return None,
    })
}

/// The shared pieces under `shaders/lib/`, by name.
pub const LIBS: &[(&str, &str)] = &[("block_reduce", include_str!("../../../shaders/lib/block_reduce.wgsl"))];

/// `src` with every `//#include <lib> <type>` line replaced by that library's text, `ELEM` → type.
/// `file` names the source in errors.
pub fn expand_includes(file: &str, src: &str) -> Result<String> {
    let mut out = String::with_capacity(src.len());
    for line in src.lines() {
        if let Some(rest) = line.trim().strip_prefix("//#include ") {
            let (lib, ty) = rest.trim().split_once(' ').unwrap_or((rest.trim(), ""));
            let text = LIBS
                .iter()
                .find(|(n, _)| *n == lib)
                .map(|(_, t)| *t)
                .ok_or_else(|| Error::backend("wgpu", format!("{file}: no shaders/lib/{lib}.wgsl to include")))?;
            if ty.trim().is_empty() {
                return Err(Error::backend("wgpu", format!("{file}: `//#include {lib}` needs an element type")));
            }
            out += &text.replace("ELEM", ty.trim());
        } else {
            out += line;
            out.push('\n');
        }
    }
    Ok(out)
}

/// What distinguishes one compiled module of a family from another.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Variant {
    pub family: &'static str,
    /// keep `//#if subgroup` blocks
    pub subgroup: bool,
    /// all storage bindings read_write
    pub rw: bool,
    /// specialised `const NAME: u32` values
    pub consts: Vec<(&'static str, u32)>,
    /// specialised `alias NAME = <type>;` element types (`"f16"`; f32 as written is never listed)
    pub types: Vec<(&'static str, &'static str)>,
}

impl Variant {
    pub fn plain(family: &'static str) -> Variant {
        Variant { family, subgroup: false, rw: false, consts: Vec::new(), types: Vec::new() }
    }
    /// This variant with `alias name` set to `ty` (f32, the type as written, leaves it unlisted).
    pub fn with_type(mut self, name: &'static str, ty: &'static str) -> Variant {
        self.types.retain(|(n, _)| *n != name);
        if ty != "f32" {
            self.types.push((name, ty));
            self.types.sort();
        }
        self
    }
    /// Whether the module needs `enable f16;` (and so the SHADER_F16 feature).
    pub fn uses_f16(&self) -> bool {
        self.types.iter().any(|(_, t)| *t == "f16")
    }
    pub fn describe(&self) -> String {
        let mut s = self.family.to_string();
        if self.subgroup {
            s += "+subgroup";
        }
        if self.rw {
            s += "+rw";
        }
        for (k, v) in &self.consts {
            s += &format!("+{k}={v}");
        }
        for (k, t) in &self.types {
            s += &format!("+{k}={t}");
        }
        s
    }
}

/// The WGSL text compiled for `variant`.
pub fn preprocess(variant: &Variant) -> Result<String> {
    let src = source(variant.family)
        .ok_or_else(|| Error::backend("wgpu", format!("no shader family '{}'", variant.family)))?;
    let src = expand_includes(&format!("shaders/{}.wgsl", variant.family), src)?;
    let mut out = String::with_capacity(src.len() + 16);
    if variant.uses_f16() {
        // before any declaration (the comment block at the top may stay after it)
        out += "enable f16;\n";
    }
    let mut skipping = false;
    let mut seen = vec![false; variant.consts.len()];
    let mut seen_types = vec![false; variant.types.len()];
    for line in src.lines() {
        let t = line.trim();
        if t == "//#if subgroup" {
            skipping = !variant.subgroup;
            continue;
        }
        if t == "//#endif" {
            skipping = false;
            continue;
        }
        if skipping {
            continue;
        }
        if let Some(rest) = t.strip_prefix("const ") {
            if let Some((i, (name, val))) =
                variant.consts.iter().enumerate().find(|(_, (name, _))| rest.starts_with(&format!("{name}:")))
            {
                out += &format!("const {name}: u32 = {val}u;\n");
                seen[i] = true;
                continue;
            }
        }
        if let Some(rest) = t.strip_prefix("alias ") {
            let name = rest.split(|c: char| c == '=' || c.is_whitespace()).next().unwrap_or("");
            if let Some(i) = variant.types.iter().position(|(n, _)| *n == name) {
                out += &format!("alias {name} = {};\n", variant.types[i].1);
                seen_types[i] = true;
                continue;
            }
        }
        if variant.rw {
            out += &line.replace("var<storage, read>", "var<storage, read_write>");
        } else {
            out += line;
        }
        out.push('\n');
    }
    if let Some(i) = seen.iter().position(|s| !s) {
        return Err(Error::backend(
            "wgpu",
            format!("shaders/{}.wgsl has no `const {}` to specialise", variant.family, variant.consts[i].0),
        ));
    }
    if let Some(i) = seen_types.iter().position(|s| !s) {
        return Err(Error::backend(
            "wgpu",
            format!("shaders/{}.wgsl has no `alias {}` to specialise", variant.family, variant.types[i].0),
        ));
    }
    Ok(out)
}

/// Attention tile sizes for head size `hs` within `workgroup_bytes` of workgroup memory:
/// (BK keys staged by the forward/dq kernels, BQT queries staged by the dk/dv kernel).
pub fn attention_tiles(hs: u32, workgroup_bytes: u32) -> (u32, u32) {
    // at most WebGPU's default 16 KiB: bigger tiles gain little and make some shader compilers
    // (Mesa's GL path) unroll for minutes
    let floats = workgroup_bytes.min(16384) / 4;
    let hs = attention_hs(hs);
    let pow2_floor = |x: u32| if x == 0 { 0 } else { 1u32 << (31 - x.leading_zeros()) };
    let bk = pow2_floor(floats / (2 * hs)).min(64);
    let bqt = pow2_floor(floats / (2 * hs + 2)).min(64);
    (bk, bqt)
}

/// The specialised head size: hs rounded up to a multiple of 4 (head vectors are vec4s).
pub fn attention_hs(hs: u32) -> u32 {
    hs.div_ceil(4) * 4
}

/// The attention variant for head size `hs`.
pub fn attention_variant(hs: u32, workgroup_bytes: u32, rw: bool) -> Variant {
    let (bk, bqt) = attention_tiles(hs, workgroup_bytes);
    Variant {
        family: "attention",
        subgroup: false,
        rw,
        consts: vec![("HS", attention_hs(hs)), ("BK", bk), ("BQT", bqt)],
        types: Vec::new(),
    }
}

/// The matmul module specialised for 128×128 tiles (256 invocations, k-slices of 8).
pub fn matmul_large_variant(rw: bool) -> Variant {
    Variant {
        family: "matmul",
        subgroup: false,
        rw,
        consts: vec![("BM", 128), ("BN", 128), ("BK", 8), ("WG", 256)],
        types: Vec::new(),
    }
}

/// The WGSL element type of a buffer of `dtype` as the weight-specialised shaders read it:
/// `Some("f32")` / `Some("f16")`, `None` for a dtype no shader reads as a weight.
pub fn weight_type(dtype: crate::graph::DType) -> Option<&'static str> {
    match dtype {
        crate::graph::DType::F32 => Some("f32"),
        crate::graph::DType::F16 => Some("f16"),
        _ => None,
    }
}

/// Every variant the backend may compile for the usual shapes (head sizes of the GPT-2 family and
/// the tests, WebGPU's default and a larger workgroup memory), for the portability test.
pub fn all_variants() -> Vec<Variant> {
    let mut v = Vec::new();
    for fam in FAMILIES {
        for rw in [false, true] {
            if fam == "attention" {
                for hs in [16, 25, 32, 64, 80, 96, 128] {
                    for wg in [16384, 32768] {
                        v.push(attention_variant(hs, wg, rw));
                    }
                }
            } else {
                for sg in [false, true] {
                    if sg && fam != "matmul" {
                        continue;
                    }
                    v.push(Variant { subgroup: sg, rw, ..Variant::plain(fam) });
                }
                if fam == "matmul" {
                    v.push(matmul_large_variant(rw));
                    // f16 weights (inference): every matmul variant with an f16 B operand
                    for sg in [false, true] {
                        v.push(Variant { subgroup: sg, rw, ..Variant::plain(fam) }.with_type("WeightT", "f16"));
                    }
                    v.push(matmul_large_variant(rw).with_type("WeightT", "f16"));
                }
                if fam == "encoder" {
                    // f16 token and/or position embeddings (decoding with f16 weights)
                    for (wte, wpe) in [("f16", "f16"), ("f16", "f32"), ("f32", "f16")] {
                        v.push(Variant { rw, ..Variant::plain(fam) }.with_type("WteT", wte).with_type("WpeT", wpe));
                    }
                }
            }
        }
    }
    v
}
