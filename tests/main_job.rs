//! The main job: `wgpt train` with its defaults trains a small GPT-2 from scratch on the bundled
//! corpus, lowers the validation loss by at least 3 nats and prints a sample. It runs on the cpu
//! backend explicitly so a GPU on the test machine does not change what is tested, and from an
//! empty directory, as an installed `wgpt` would (the corpus is built into the binary).
//!
//! Budget: the 180 default steps take 2 min 44 s on 2 quiet AVX2 cores (AMD EPYC) and about
//! 1 min 40 s on 2 AVX-512 cores (Sapphire Rapids); up to twice that while other jobs share the cores.
//! See docs/BENCHMARKS.md, "The main job on both CPU kinds".

use std::process::Command;

#[test]
fn default_training_run_learns_and_samples() {
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("log.jsonl");
    let t0 = std::time::Instant::now();
    let o = Command::new(env!("CARGO_BIN_EXE_wgpt"))
        .current_dir(dir.path())
        .args(["train", "--backend", "cpu", "--log-json", log.to_str().unwrap()])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "{err}");
    eprintln!("main job took {:.0} s", t0.elapsed().as_secs_f64());
    let vals: Vec<f64> = std::fs::read_to_string(&log)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
        .filter_map(|v| v.get("val_loss").and_then(|x| x.as_f64()))
        .collect();
    assert!(vals.len() >= 2, "expected several validation losses, got {vals:?}");
    let (first, last) = (vals[0], *vals.last().unwrap());
    eprintln!("val loss {first:.3} -> {last:.3}");
    assert!(first > 10.0, "a fresh model should start near ln(50257) = 10.8, got {first}");
    assert!(first - last >= 3.0, "val loss fell only {:.3} nats ({first:.3} -> {last:.3})", first - last);
    let sample = err.split("--- sample at step").nth(1).expect("no sample printed");
    assert!(sample.lines().nth(1).map(|l| !l.trim().is_empty()).unwrap_or(false), "empty sample:\n{sample}");
}
