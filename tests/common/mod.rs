//! Helpers shared by the test files: running the `wgpt` binary, the fixture checks, the
//! generator of test data, the wgpu adapter under test, the float64 kernel references
//! (`reference`) and the kernel conformance suite (`conformance`). (Not every file uses every
//! helper.)
#![allow(dead_code)]

pub mod conformance;
pub mod decode;
pub mod reference;

use std::process::{Child, Command, ExitStatus, Output};
use std::time::{Duration, Instant};
use wgpt::graph::Scalars;

/// One step of SplitMix64 (the generator of the fuzz, soak and cpu-kernel tests).
pub fn splitmix64(state: &mut u64) -> u64 {
    *state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
    let mut z = *state;
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// Wait for a child `wgpt`, killing it (and failing, naming `what`) past `limit`.
pub fn wait_bounded(child: &mut Child, limit: Duration, what: &str) -> ExitStatus {
    let t0 = Instant::now();
    loop {
        if let Some(s) = child.try_wait().unwrap() {
            return s;
        }
        if t0.elapsed() > limit {
            let _ = child.kill();
            let _ = child.wait();
            panic!("{what}: still running after {limit:?}");
        }
        std::thread::sleep(Duration::from_millis(2));
    }
}

/// The device scalars AdamW reads at 1-based `step` (ε = 1e-8).
pub fn adam_scalars(lr: f32, b1: f32, b2: f32, step: i32, grad_scale: f32) -> Vec<f32> {
    let mut h = vec![0f32; Scalars::LEN];
    h[Scalars::LR] = lr;
    h[Scalars::BETA1] = b1;
    h[Scalars::BETA2] = b2;
    h[Scalars::EPS] = 1e-8;
    h[Scalars::BC1] = 1.0 - b1.powi(step);
    h[Scalars::BC2] = 1.0 - b2.powi(step);
    h[Scalars::GRAD_SCALE] = grad_scale;
    h[Scalars::LOSS_SCALE] = 1.0;
    h
}

/// xorshift64: deterministic test data.
pub struct Rng(pub u64);
impl Rng {
    pub fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    /// uniform in [lo, hi)
    pub fn uniform(&mut self, lo: f32, hi: f32) -> f32 {
        lo + (hi - lo) * ((self.next() >> 40) as f32 / (1u64 << 24) as f32)
    }
    pub fn vec(&mut self, n: usize, lo: f32, hi: f32) -> Vec<f32> {
        (0..n).map(|_| self.uniform(lo, hi)).collect()
    }
    /// n values uniform in [-scale, scale)
    pub fn sym_vec(&mut self, n: usize, scale: f32) -> Vec<f32> {
        (0..n).map(|_| ((self.next() >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0) * scale).collect()
    }
    pub fn ints(&mut self, n: usize, below: usize) -> Vec<i32> {
        (0..n).map(|_| (self.next() % below as u64) as i32).collect()
    }
}

pub const TINY: &str = "tests/data/tiny";

pub fn wgpt(args: &[&str]) -> Output {
    wgpt_env::<&str, &str>(args, &[])
}

/// `wgpt args…` with extra environment variables.
pub fn wgpt_env<K: AsRef<std::ffi::OsStr>, V: AsRef<std::ffi::OsStr>>(args: &[&str], env: &[(K, V)]) -> Output {
    let mut c = Command::new(env!("CARGO_BIN_EXE_wgpt"));
    c.args(args);
    for (k, v) in env {
        c.env(k, v);
    }
    c.output().expect("running wgpt")
}

/// `wgpt verify --backend <backend> --json` on the tiny fixture, checked against expected.json:
/// loss within 1e-5, logits within 1e-4, each gradient within 1e-4 relative, the 10 losses within
/// 1e-4. Returns the backend's description from the report.
pub fn verify_tiny_fixture(backend: &str) -> String {
    let o = wgpt(&[
        "verify", "--model", &format!("{TINY}/model.bin"), "--state", &format!("{TINY}/debug_state.bin"),
        "--backend", backend, "--steps", "10", "--json",
    ]);
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(o.status.success(), "verify --backend {backend} failed:\n{out}\n{}", String::from_utf8_lossy(&o.stderr));
    let r: serde_json::Value = serde_json::from_str(out.lines().last().unwrap()).unwrap();
    let name = r["backend"].as_str().unwrap().to_string();
    assert!(name.starts_with(backend), "{name}");
    let exp: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(format!("{TINY}/expected.json")).unwrap()).unwrap();
    assert!((r["loss"].as_f64().unwrap() - exp["loss"].as_f64().unwrap()).abs() < 1e-5);
    assert!(r["logits_max_abs_error"].as_f64().unwrap() < 1e-4);
    for g in r["grads"].as_array().unwrap() {
        assert!(g["rel_error"].as_f64().unwrap() < 1e-4, "{g}");
    }
    for (l, w) in r["losses"].as_array().unwrap().iter().zip(exp["losses"].as_array().unwrap()) {
        assert!((l.as_f64().unwrap() - w.as_f64().unwrap()).abs() < 1e-4, "{l} vs {w}");
    }
    name
}

/// The per-step train losses of 6 steps on the fixture's tokens (B=4, T=32, --total-batch 256:
/// two accumulated micro-steps per update, shuffled data), with `extra` flags appended.
pub fn train_losses(backend: &str, log: &std::path::Path, extra: &[&str]) -> Vec<f64> {
    let mut args = vec![
        "train", "--backend", backend, "--init", "tests/data/tiny/model.bin", "--train", "tests/data/tiny/train.bin",
        "--val", "tests/data/tiny/train.bin", "--batch", "4", "--seq-len", "32", "--total-batch", "256", "--steps", "6",
        "--lr", "1e-3", "--gen-tokens", "0", "--log-json", log.to_str().unwrap(),
    ];
    args.extend_from_slice(extra);
    let o = wgpt(&args);
    assert!(o.status.success(), "train --backend {backend}: {}", String::from_utf8_lossy(&o.stderr));
    std::fs::read_to_string(log)
        .unwrap()
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap()["train_loss"].as_f64())
        .collect()
}

/// `train_losses` on the cpu backend and on `backend`: both have 6 steps, the cpu run learns, and
/// every step's loss agrees within 2e-3.
pub fn assert_follows_cpu(backend: &str, extra: &[&str]) {
    let dir = tempfile::tempdir().unwrap();
    let cpu = train_losses("cpu", &dir.path().join("cpu.jsonl"), extra);
    let dev = train_losses(backend, &dir.path().join("dev.jsonl"), extra);
    assert_eq!(cpu.len(), 6);
    assert_eq!(dev.len(), 6);
    assert!(cpu[5] < cpu[0], "the cpu run should learn: {cpu:?}");
    for (i, (c, g)) in cpu.iter().zip(&dev).enumerate() {
        assert!((c - g).abs() < 2e-3, "step {}: cpu {c} vs {backend} {g}", i + 1);
    }
}

/// The wgpu adapter under test: the backend's default choice, or WGPT_TEST_ADAPTER=<index> (see
/// `wgpt info`), e.g. to run the suites on the GL adapter too. Without any adapter: prints
/// "skipped: no wgpu adapter" and returns None, unless WGPT_REQUIRE_ADAPTER=1 (CI), where that
/// is a failure.
pub fn wgpu_adapter() -> Option<wgpt::backend::wgpu::WgpuBackend> {
    use std::io::Write;
    let index = std::env::var("WGPT_TEST_ADAPTER").ok().map(|s| s.parse::<usize>().expect("WGPT_TEST_ADAPTER is an index"));
    match wgpt::backend::wgpu::WgpuBackend::new(index) {
        Ok(b) => Some(b),
        Err(e @ wgpt::error::Error::Unavailable(_)) => {
            if std::env::var("WGPT_REQUIRE_ADAPTER").as_deref() == Ok("1") {
                panic!("WGPT_REQUIRE_ADAPTER=1 but no wgpu adapter: {e}");
            }
            // straight to stderr: libtest's capture (print!/eprint!) would hide it
            let _ = writeln!(std::io::stderr().lock(), "skipped: no wgpu adapter ({e})");
            None
        }
        Err(e) => panic!("wgpu backend failed to start: {e}"),
    }
}
