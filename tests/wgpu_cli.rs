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

/// Matmul autotuning (`WGPT_WGPU_AUTOTUNE=1`; off by default on lavapipe): the first run times
/// every mode for the shape and writes the cache; a restart reads it and tunes nothing; a corrupt
/// cache is one warning, then the shape is tuned again and the file rewritten; a forced
/// `WGPT_WGPU_MATMUL` tunes nothing. The modes' results are the conformance suite's concern.
#[test]
fn autotune_cache_survives_a_restart_and_a_corrupt_entry() {
    if !have_adapter() {
        return;
    }
    let cache = tempfile::tempdir().unwrap();
    let run = |extra: &[(&str, &str)]| {
        let mut c = std::process::Command::new(env!("CARGO_BIN_EXE_wgpt"));
        c.args(["bench", "--backend", "wgpu", "--kernel", "matmul", "--m", "64", "--k", "96", "--n", "128", "--steps", "1", "--warmup", "0"]);
        c.env("WGPT_CACHE_DIR", cache.path()).env("WGPT_WGPU_AUTOTUNE", "1").env_remove("WGPT_WGPU_MATMUL");
        for (k, v) in extra {
            c.env(k, v);
        }
        let o = c.output().unwrap();
        let err = String::from_utf8_lossy(&o.stderr).to_string();
        assert!(o.status.success(), "{err}");
        err
    };
    let file = || {
        let dir = cache.path().join("wgpu-autotune");
        let f: Vec<_> = std::fs::read_dir(&dir).unwrap().flatten().map(|e| e.path()).collect();
        assert_eq!(f.len(), 1, "{f:?}");
        f[0].clone()
    };
    let first = run(&[]);
    assert!(first.contains("wgpu autotune: matmul fwd n=64 c=96 oc=128: tiled "), "{first}");
    let text = std::fs::read_to_string(file()).unwrap();
    assert!(text.starts_with("fwd 64 96 128 ") && text.lines().count() == 1, "{text}");
    let again = run(&[]);
    assert!(!again.contains("autotune"), "tuned again after a restart: {again}");
    assert_eq!(std::fs::read_to_string(file()).unwrap(), text);
    std::fs::write(file(), "fwd 64 96 128 warp-speed\n\u{1}garbage\n").unwrap();
    let fixed = run(&[]);
    assert!(fixed.contains("2 unreadable line(s) ignored") && fixed.contains("wgpu autotune: matmul fwd"), "{fixed}");
    assert!(std::fs::read_to_string(file()).unwrap().starts_with("fwd 64 96 128 "));
    std::fs::remove_file(file()).unwrap();
    let forced = run(&[("WGPT_WGPU_MATMUL", "tiled")]);
    assert!(!forced.contains("autotune"), "{forced}");
    eprintln!("autotune: {}", first.lines().find(|l| l.contains("autotune")).unwrap_or(""));
}
