//! Portability proof: every `shaders/*.wgsl`, as written and as the wgpu backend compiles it
//! (subgroup / read-write / head-size / f16-weight variants), is parsed and validated by naga and
//! translated to SPIR-V (Vulkan), MSL (Metal) and HLSL (DX12). Any error fails the test, so a shader
//! that would break on Metal or DX12 shows up on machines that have neither. The f16-weight
//! variants (`enable f16;`) are validated with naga's SHADER_FLOAT16 capability, as wgpu does on
//! an adapter with SHADER_F16, and translated to HLSL shader model 6.2 (16-bit types); every
//! other shader must validate without it and translate to shader model 6.0.

use naga::back::{hlsl, msl, spv};
use naga::valid::{Capabilities, ValidationFlags, Validator};
use std::path::Path;
use wgpt::backend::wgpu::shaders::{all_variants, expand_includes, preprocess, FAMILIES, LIBS};

/// Parse, validate and translate one WGSL text; returns a description of every failure.
fn check(name: &str, src: &str) -> Vec<String> {
    let mut errs = Vec::new();
    let module = match naga::front::wgsl::parse_str(src) {
        Ok(m) => m,
        Err(e) => return vec![format!("{name}: WGSL parse error:\n{}", e.emit_to_string(src))],
    };
    if module.entry_points.is_empty() {
        errs.push(format!("{name}: no entry points"));
    }
    // f16 only where the module enables it (so no f32 shader needs SHADER_F16)
    let f16 = module.types.iter().any(|(_, t)| {
        matches!(t.inner, naga::TypeInner::Scalar(s) | naga::TypeInner::Vector { scalar: s, .. } if s == naga::Scalar::F16)
    });
    let caps = if f16 { Capabilities::SUBGROUP | Capabilities::SHADER_FLOAT16 } else { Capabilities::SUBGROUP };
    let info = match Validator::new(ValidationFlags::all(), caps).validate(&module) {
        Ok(i) => i,
        Err(e) => return vec![format!("{name}: validation error:\n{}", e.emit_to_string(src))],
    };

    // SPIR-V (Vulkan 1.1 for subgroup operations), whole module and each entry point
    let mut spv_opts = spv::Options { lang_version: (1, 3), ..Default::default() };
    spv_opts.flags.remove(spv::WriterFlags::DEBUG);
    if let Err(e) = spv::write_vec(&module, &info, &spv_opts, None) {
        errs.push(format!("{name}: SPIR-V: {e}"));
    }
    for ep in &module.entry_points {
        let po = spv::PipelineOptions { shader_stage: ep.stage, entry_point: ep.name.clone() };
        if let Err(e) = spv::write_vec(&module, &info, &spv_opts, Some(&po)) {
            errs.push(format!("{name}::{}: SPIR-V: {e}", ep.name));
        }
    }

    // MSL (Metal 2.4: simdgroup shuffles), per entry point as wgpu's Metal back end does
    for ep in &module.entry_points {
        let opts = msl::Options { lang_version: (2, 4), fake_missing_bindings: true, ..Default::default() };
        let po = msl::PipelineOptions { entry_point: Some((ep.stage, ep.name.clone())), ..Default::default() };
        match msl::write_string(&module, &info, &opts, &po) {
            Ok((_, tinfo)) => {
                for r in tinfo.entry_point_names {
                    if let Err(e) = r {
                        errs.push(format!("{name}::{}: MSL entry point: {e}", ep.name));
                    }
                }
            }
            Err(e) => errs.push(format!("{name}::{}: MSL: {e}", ep.name)),
        }
    }

    // HLSL shader model 6.0 (wave intrinsics), per entry point as wgpu's DX12 back end does
    for ep in &module.entry_points {
        let shader_model = if f16 { hlsl::ShaderModel::V6_2 } else { hlsl::ShaderModel::V6_0 };
        let opts = hlsl::Options { shader_model, fake_missing_bindings: true, ..Default::default() };
        let po = hlsl::PipelineOptions { entry_point: Some((ep.stage, ep.name.clone())) };
        let mut out = String::new();
        let mut w = hlsl::Writer::new(&mut out, &opts, &po);
        if let Err(e) = w.write(&module, &info, None) {
            errs.push(format!("{name}::{}: HLSL: {e}", ep.name));
        }
    }
    errs
}

#[test]
fn every_shader_file_validates_and_translates() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("shaders");
    let mut files: Vec<_> = std::fs::read_dir(&dir)
        .expect("shaders/ exists")
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "wgsl"))
        .collect();
    files.sort();
    let names: Vec<String> = files.iter().map(|p| p.file_stem().unwrap().to_string_lossy().into_owned()).collect();
    for fam in FAMILIES {
        assert!(names.iter().any(|n| n == fam), "shaders/{fam}.wgsl is missing");
    }
    let mut errs = Vec::new();
    for f in &files {
        let src = std::fs::read_to_string(f).unwrap();
        // the file starts with comments stating the maths
        assert!(src.trim_start().starts_with("//"), "{} must start with a comment block", f.display());
        let name = f.display().to_string();
        let src = expand_includes(&name, &src).unwrap_or_else(|e| panic!("{e}"));
        errs.extend(check(&name, &src));
    }
    assert!(errs.is_empty(), "{} shader error(s):\n{}", errs.len(), errs.join("\n"));
    // every shared piece under shaders/lib/ is used (and so validated) somewhere
    for (lib, _) in LIBS {
        let used = files.iter().any(|f| std::fs::read_to_string(f).unwrap().contains(&format!("//#include {lib} ")));
        assert!(used, "shaders/lib/{lib}.wgsl is included by no shader");
    }
}

#[test]
fn every_compiled_variant_validates_and_translates() {
    let mut errs = Vec::new();
    let variants = all_variants();
    assert!(variants.len() > FAMILIES.len());
    for v in &variants {
        let src = match preprocess(v) {
            Ok(s) => s,
            Err(e) => {
                errs.push(format!("{}: {e}", v.describe()));
                continue;
            }
        };
        if !v.subgroup {
            let code: String = src.lines().map(|l| l.split("//").next().unwrap()).collect();
            assert!(!code.contains("subgroup"), "{}: subgroup code left in a non-subgroup variant", v.describe());
        }
        if v.uses_f16() {
            assert!(src.starts_with("enable f16;"), "{}: an f16 variant must enable f16", v.describe());
        } else {
            assert!(!src.lines().any(|l| l.trim().starts_with("enable f16")), "{}: f16 enabled in an f32 variant", v.describe());
        }
        errs.extend(check(&v.describe(), &src));
    }
    assert!(errs.is_empty(), "{} shader error(s):\n{}", errs.len(), errs.join("\n"));
}

/// The f16-weight modules the backend compiles for inference are among the variants checked
/// above: the matmul (tiled, 128×128, subgroup) with an f16 B operand and the encoder with f16
/// embeddings; and specialising reads them as f16 (the alias lines are replaced, not left f32).
#[test]
fn f16_weight_variants_are_checked() {
    let variants = all_variants();
    let f16: Vec<_> = variants.iter().filter(|v| v.uses_f16()).collect();
    for (family, subgroup, large) in [("matmul", false, false), ("matmul", true, false), ("matmul", false, true), ("encoder", false, false)] {
        assert!(
            f16.iter().any(|v| v.family == family && v.subgroup == subgroup && v.consts.is_empty() != large),
            "no f16-weight {family} variant (subgroup {subgroup}, large tiles {large}) is validated"
        );
    }
    for v in f16 {
        let src = preprocess(v).unwrap();
        for (name, ty) in &v.types {
            assert!(src.contains(&format!("alias {name} = {ty};")), "{}: alias {name} not specialised", v.describe());
        }
    }
}
