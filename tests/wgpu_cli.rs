//! The wgpu backend end to end through the CLI: `wgpt verify --backend wgpu` on the llm.c fixture,
//! and `wgpt train --backend wgpu` following the cpu backend's loss curve.
//! Without any adapter these tests print "skipped: no wgpu adapter" (straight to stderr, so
//! `cargo test` shows it) — except when WGPT_REQUIRE_ADAPTER=1 (CI), where that is a failure.

use std::process::{Command, Output};

const TINY: &str = "tests/data/tiny";

fn have_adapter() -> bool {
    if !wgpt::backend::wgpu::list_adapters().is_empty() {
        return true;
    }
    if std::env::var("WGPT_REQUIRE_ADAPTER").as_deref() == Ok("1") {
        panic!("no wgpu adapter found and WGPT_REQUIRE_ADAPTER=1 (install mesa-vulkan-drivers)");
    }
    use std::io::Write;
    let _ = writeln!(std::io::stderr().lock(), "skipped: no wgpu adapter");
    false
}

fn wgpt(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_wgpt")).args(args).output().expect("running wgpt")
}

#[test]
fn verify_tiny_fixture_on_wgpu() {
    if !have_adapter() {
        return;
    }
    let o = wgpt(&[
        "verify", "--model", &format!("{TINY}/model.bin"), "--state", &format!("{TINY}/debug_state.bin"),
        "--backend", "wgpu", "--steps", "10", "--json",
    ]);
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(o.status.success(), "verify --backend wgpu failed:\n{out}\n{}", String::from_utf8_lossy(&o.stderr));
    let r: serde_json::Value = serde_json::from_str(out.lines().last().unwrap()).unwrap();
    assert!(r["backend"].as_str().unwrap().starts_with("wgpu"), "{}", r["backend"]);
    let exp: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(format!("{TINY}/expected.json")).unwrap()).unwrap();
    assert!((r["loss"].as_f64().unwrap() - exp["loss"].as_f64().unwrap()).abs() < 1e-5);
    assert!(r["logits_max_abs_error"].as_f64().unwrap() < 1e-4);
    for g in r["grads"].as_array().unwrap() {
        assert!(g["rel_error"].as_f64().unwrap() < 1e-4, "{g}");
    }
    for (l, w) in r["losses"].as_array().unwrap().iter().zip(exp["losses"].as_array().unwrap()) {
        assert!((l.as_f64().unwrap() - w.as_f64().unwrap()).abs() < 1e-4, "{l} vs {w}");
    }
}

fn train_losses(backend: &str, log: &std::path::Path) -> Vec<f64> {
    let o = wgpt(&[
        "train", "--backend", backend, "--init", &format!("{TINY}/model.bin"), "--train", &format!("{TINY}/train.bin"),
        "--val", &format!("{TINY}/train.bin"), "--batch", "4", "--seq-len", "32", "--total-batch", "256", "--steps", "6",
        "--lr", "1e-3", "--val-every", "0", "--gen-tokens", "0", "--log-json", log.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "train --backend {backend}: {}", String::from_utf8_lossy(&o.stderr));
    std::fs::read_to_string(log)
        .unwrap()
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap()["train_loss"].as_f64())
        .collect()
}

#[test]
fn wgpu_training_follows_the_cpu_loss_curve() {
    if !have_adapter() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    // B=4, T=32 with --total-batch 256: two accumulated micro-steps per update, shuffled data
    let cpu = train_losses("cpu", &dir.path().join("cpu.jsonl"));
    let gpu = train_losses("wgpu", &dir.path().join("wgpu.jsonl"));
    assert_eq!(cpu.len(), 6);
    assert_eq!(gpu.len(), 6);
    assert!(cpu[5] < cpu[0], "the cpu run should learn: {cpu:?}");
    for (i, (c, g)) in cpu.iter().zip(&gpu).enumerate() {
        assert!((c - g).abs() < 2e-3, "step {}: cpu {c} vs wgpu {g}", i + 1);
    }
}

#[test]
fn a_step_too_big_for_the_adapter_is_refused_before_allocating() {
    if !have_adapter() {
        return;
    }
    // GPT-2 124M at B=64, T=1024 needs bindings and buffers beyond lavapipe's limits
    let o = wgpt(&["bench", "--backend", "wgpu", "--model", "d12", "--batch", "64", "--seq-len", "1024", "--steps", "1"]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success());
    assert!(!err.contains("panicked"), "{err}");
    let line = err.lines().find(|l| l.starts_with("error")).expect("an error line");
    assert!(line.contains("--batch") && line.contains("MiB"), "{line}");
}
