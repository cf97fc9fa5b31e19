//! `wgpt bench --profile`: per-launch times of a training step with the FLOPs and bytes the graph
//! gives each launch, on cpu (wall clock) and on wgpu (timestamp queries where the adapter has
//! them: lavapipe does). The CUDA path (events) runs on the emulator in tests/cuda.rs.
//!
//! Checked: the JSON report's last line has `launches` (label, family, ms, flops, bytes); a matmul
//! and an attention launch carry the FLOPs and bytes of their shapes, computed here by hand; the
//! launches' total agrees with an untimed step within a factor of 3 (timing launches one by one
//! adds a little per launch, and a step's times vary on a shared machine); the families add up.

mod common;

use common::wgpt;

/// (model d2:c64: C=64, NH=1), B=2, T=32: n = 64 rows.
const ARGS: [&str; 12] = ["bench", "--profile", "--json", "--model", "d2:c64", "--batch", "2", "--seq-len", "32", "--steps", "2", "--warmup"];

fn profile(backend: &str) -> serde_json::Value {
    let mut args = ARGS.to_vec();
    args.extend(["1", "--backend", backend]);
    let o = wgpt(&args);
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(o.status.success(), "{out}\n{}", String::from_utf8_lossy(&o.stderr));
    assert!(out.contains("slowest launches:") && out.contains("roofline"), "{out}");
    serde_json::from_str(out.lines().last().unwrap()).unwrap()
}

fn launch<'a>(r: &'a serde_json::Value, label: &str) -> &'a serde_json::Value {
    r["launches"].as_array().unwrap().iter().find(|l| l["label"] == label).unwrap_or_else(|| panic!("no launch {label}"))
}

fn check(r: &serde_json::Value, backend: &str) {
    let (n, c, t, b, v) = (64.0, 64.0, 32.0, 2.0, 50304.0);
    let launches = r["launches"].as_array().unwrap();
    assert!(launches.len() > 40, "{backend}: {} launches", launches.len());
    for l in launches {
        for k in ["label", "family", "ms", "flops", "bytes"] {
            assert!(!l[k].is_null(), "{backend}: launch without {k}: {l}");
        }
        assert!(l["ms"].as_f64().unwrap() >= 0.0);
    }
    // the first block's qkv projection: (n, c) · (3c, c)ᵀ + bias
    let qkv = launch(r, "l0.qkv.fwd");
    assert_eq!(qkv["family"], "matmul");
    assert_eq!(qkv["flops"].as_f64().unwrap(), 2.0 * n * c * 3.0 * c + n * 3.0 * c);
    assert_eq!(qkv["bytes"].as_f64().unwrap(), 4.0 * (n * 3.0 * c + n * c + 3.0 * c * c + 3.0 * c));
    // attention over the causal triangle: B·NH·T(T+1)/2 pairs × (4·hs + 4), hs = 64
    let att = launch(r, "l0.attn.fwd");
    assert_eq!(att["family"], "attention");
    assert_eq!(att["flops"].as_f64().unwrap(), b * (t * (t + 1.0) / 2.0) * (4.0 * 64.0 + 4.0));
    assert_eq!(att["bytes"].as_f64().unwrap(), 4.0 * (n * c + b * t + n * 3.0 * c));
    // the classifier's matmul: (n, c) · (Vp, c)ᵀ, no bias
    let cls = launch(r, "classifier[0].fwd");
    assert_eq!(cls["flops"].as_f64().unwrap(), 2.0 * n * c * v);
    // totals: the families add up to the launches, the launches to about an untimed step
    let sum: f64 = launches.iter().map(|l| l["ms"].as_f64().unwrap()).sum();
    let fam: f64 = r["families"].as_array().unwrap().iter().map(|f| f["ms"].as_f64().unwrap()).sum();
    assert!((sum - fam).abs() <= 1e-6 * sum.max(1.0), "{backend}: families {fam} vs launches {sum}");
    let (profiled, step) = (r["profiled_ms"].as_f64().unwrap(), r["step_ms"].as_f64().unwrap());
    assert!((sum - profiled).abs() <= 1e-6 * sum.max(1.0));
    assert!(profiled < 3.0 * step && step < 3.0 * profiled, "{backend}: launches {profiled:.1} ms vs an untimed step {step:.1} ms");
    for f in ["matmul", "attention", "layernorm", "adamw", "classifier"] {
        assert!(r["families"].as_array().unwrap().iter().any(|x| x["family"] == f), "{backend}: no {f} family");
    }
    let p = &r["peaks"];
    assert!(p["fp32_gflops"].as_f64().unwrap() > 0.0 && p["gbs"].as_f64().unwrap() > 0.0, "{p}");
    eprintln!("{backend}: {} launches ({}), {profiled:.1} ms vs a step of {step:.1} ms", launches.len(), r["clock"]);
}

#[test]
fn profile_on_cpu() {
    let r = profile("cpu");
    assert_eq!(r["clock"], "wall clock");
    assert_eq!(r["peaks"]["source"], "measured");
    check(&r, "cpu");
}

#[test]
fn profile_on_wgpu() {
    if common::wgpu_adapter().is_none() {
        return;
    }
    let r = profile("wgpu");
    check(&r, "wgpu");
}

#[test]
fn peaks_given_and_unknown() {
    // given peaks replace the measurement; one of them alone is an error naming the other
    let mut args = ARGS.to_vec();
    args.extend(["1", "--backend", "cpu", "--peak-gflops", "1000", "--peak-gbs", "100"]);
    let o = wgpt(&args);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let r: serde_json::Value = serde_json::from_str(String::from_utf8_lossy(&o.stdout).lines().last().unwrap()).unwrap();
    assert_eq!((r["peaks"]["fp32_gflops"].as_f64(), r["peaks"]["gbs"].as_f64()), (Some(1000.0), Some(100.0)));
    let mut args = ARGS.to_vec();
    args.extend(["1", "--backend", "cpu", "--peak-gflops=-5"]);
    let o = wgpt(&args);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success() && err.lines().next().unwrap_or("").contains("--peak-gflops"), "{err}");
}
