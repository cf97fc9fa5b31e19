//! The wgpu backend end to end through the CLI: `wgpt verify --backend wgpu` on the llm.c fixture,
//! and `wgpt train --backend wgpu` following the cpu backend's loss curve.
//! Without any adapter these tests print "skipped: no wgpu adapter" (straight to stderr, so
//! `cargo test` shows it) — except when WGPT_REQUIRE_ADAPTER=1 (CI), where that is a failure.

mod common;
use common::{assert_follows_cpu, verify_tiny_fixture, wgpt};

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

#[test]
fn verify_tiny_fixture_on_wgpu() {
    if !have_adapter() {
        return;
    }
    verify_tiny_fixture("wgpu");
}

#[test]
fn wgpu_training_follows_the_cpu_loss_curve() {
    if !have_adapter() {
        return;
    }
    assert_follows_cpu("wgpu", &["--val-every", "0"]);
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
