//! Soak: `kill -9` at random moments, `--resume`, and the result is bit-exact.
//!
//! The tiny fixture model trains for 200 steps with a checkpoint every 5. The same run is started
//! with `--resume`, killed with SIGKILL at 10 seeded random moments (mid-step, mid-checkpoint,
//! during start-up: wherever the clock says) and resumed each time, then run to the end. Every
//! checkpoint it leaves, the final model and the final optimiser state included, must be
//! byte-identical to an uninterrupted run's. Three variants: plain, with gradient accumulation,
//! and with the z-score outlier skipping on (whose windows are part of the checkpoint, so a
//! resumed run skips exactly the updates the uninterrupted run skips).
//!
//! `WGPT_SOAK_SEED` changes the kill moments.

mod common;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const STEPS: usize = 200;
const EVERY: usize = 5;
const KILLS: usize = 10;
/// no single run may take longer than this (a hang fails the test instead of blocking CI)
const RUN_LIMIT: Duration = Duration::from_secs(60);

fn train_cmd(out: &Path, extra: &[&str], log: Option<&Path>) -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_wgpt"));
    let steps = STEPS.to_string();
    let every = EVERY.to_string();
    c.args([
        "train", "--backend", "cpu", "--threads", "1", "--init", "tests/data/tiny/model.bin", "--train",
        "tests/data/tiny/train.bin", "--batch", "4", "--seq-len", "16", "--steps", &steps, "--lr", "1e-3",
        "--val-every", "0", "--gen-tokens", "0", "--checkpoint-every", &every, "--out",
    ]);
    c.arg(out).args(extra).stdin(Stdio::null()).stdout(Stdio::null());
    match log {
        Some(p) => c.stderr(std::fs::File::create(p).unwrap()),
        None => c.stderr(Stdio::null()),
    };
    c
}

/// Wait for `child`, killing it (and failing) past `RUN_LIMIT`.
fn wait_bounded(child: &mut Child, what: &str) -> std::process::ExitStatus {
    common::wait_bounded(child, RUN_LIMIT, what)
}

/// SplitMix64.
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        common::splitmix64(&mut self.0)
    }
    /// uniform in [lo, hi)
    fn uniform(&mut self, lo: f64, hi: f64) -> f64 {
        lo + (hi - lo) * (self.next() >> 11) as f64 / (1u64 << 53) as f64
    }
}

fn latest_done(dir: &Path) -> Option<usize> {
    std::fs::read_dir(dir)
        .ok()?
        .filter_map(|e| e.ok()?.file_name().to_str()?.strip_prefix("DONE_")?.parse().ok())
        .max()
}

fn checkpoint_files(dir: &Path) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| {
            let n = p.file_name().unwrap().to_string_lossy();
            (n.starts_with("model_") || n.starts_with("state_")) && n.ends_with(".bin")
        })
        .collect();
    v.sort();
    v
}

/// The uninterrupted run, then the killed-and-resumed one; compares their checkpoints.
/// Returns how many updates the uninterrupted run skipped (outlier skipping).
fn soak(name: &str, extra: &[&str]) -> usize {
    let dir = tempfile::tempdir().unwrap();
    let reference = dir.path().join("reference");
    let log = dir.path().join("reference.log");
    let t0 = Instant::now();
    let mut child = train_cmd(&reference, extra, Some(&log)).spawn().unwrap();
    let status = wait_bounded(&mut child, "the uninterrupted run");
    let t_ref = t0.elapsed();
    let stderr = std::fs::read_to_string(&log).unwrap();
    assert!(status.success(), "{name}: the uninterrupted run failed:\n{stderr}");
    let skipped = stderr.lines().filter(|l| l.contains("update skipped")).count();

    let seed = std::env::var("WGPT_SOAK_SEED").ok().and_then(|s| s.parse().ok()).unwrap_or(0x5eed);
    let mut rng = Rng(seed ^ name.len() as u64);
    // the kill moments: each once the run has passed a random step (spread over the whole run,
    // sorted), plus a random part of two checkpoint intervals (mid-step or mid-write); a target
    // already behind the resume point makes a kill during start-up
    let mut targets: Vec<usize> = (0..KILLS).map(|_| rng.uniform(0.0, (STEPS - 2 * EVERY) as f64) as usize).collect();
    targets.sort();
    let interval = t_ref.mul_f64(EVERY as f64 / STEPS as f64);
    let resumed = dir.path().join("resumed");
    let (mut kills, mut resume_points) = (0, Vec::new());
    let mut attempts = 0;
    while kills < KILLS {
        attempts += 1;
        assert!(attempts < 3 * KILLS, "{name}: the run kept finishing before the kill");
        let before = latest_done(&resumed);
        let mut child = train_cmd(&resumed, &[extra, &["--resume"]].concat(), None).spawn().unwrap();
        let t = Instant::now();
        while latest_done(&resumed).unwrap_or(0) < targets[kills] && child.try_wait().unwrap().is_none() && t.elapsed() < RUN_LIMIT {
            std::thread::sleep(Duration::from_millis(1));
        }
        std::thread::sleep(interval.mul_f64(rng.uniform(0.0, 2.0)));
        if child.try_wait().unwrap().is_some() {
            // it finished (or failed) before the kill: the final run below tells which
            break;
        }
        child.kill().unwrap(); // SIGKILL
        let status = child.wait().unwrap();
        assert!(!status.success());
        kills += 1;
        resume_points.push(before.unwrap_or(0));
    }
    // each temporary file left behind is a kill that landed inside a checkpoint write
    let mid_write = match std::fs::read_dir(&resumed) {
        Ok(d) => d.filter(|e| e.as_ref().unwrap().file_name().to_string_lossy().contains(".tmp")).count(),
        Err(_) => 0,
    };
    let mut child = train_cmd(&resumed, &[extra, &["--resume"]].concat(), None).spawn().unwrap();
    let status = wait_bounded(&mut child, "the final resumed run");
    assert!(status.success(), "{name}: the final resumed run failed");
    assert_eq!(latest_done(&resumed), Some(STEPS));

    let files = checkpoint_files(&resumed);
    assert!(files.iter().any(|p| p.ends_with(format!("model_{STEPS:08}.bin"))));
    for p in &files {
        let twin = reference.join(p.file_name().unwrap());
        let (a, b) = (std::fs::read(p).unwrap(), std::fs::read(&twin).unwrap());
        assert!(a == b, "{name}: {} differs from the uninterrupted run's", p.file_name().unwrap().to_string_lossy());
    }
    resume_points.dedup();
    let report = format!(
        "soak {name}: {kills} kills (resumed from steps {resume_points:?}; {mid_write} temporary files left by kills \
         inside checkpoint writes), {} checkpoints identical to the uninterrupted run ({:.1} s; {skipped} updates skipped \
         by it), {:.1} s in all",
        files.len(),
        t_ref.as_secs_f64(),
        t0.elapsed().as_secs_f64()
    );
    eprintln!("{report}");
    assert_eq!(kills, KILLS, "{name}: only {kills} kills landed before the run finished ({report})");
    skipped
}

#[test]
fn soak_kill9_and_resume_is_bit_exact() {
    soak("plain", &[]);
}

#[test]
fn soak_kill9_and_resume_with_gradient_accumulation() {
    // 2 micro-batches of 4×16 per step
    soak("accumulation", &["--total-batch", "128"]);
}

#[test]
fn soak_kill9_and_resume_with_outlier_skipping() {
    // thresholds that skip updates once the 128-step window is full: a resumed run that had
    // lost the window would apply them, and its model would differ
    let skipped = soak("outliers", &["--skip-loss-z", "1.0", "--skip-grad-z", "0.5"]);
    assert!(skipped > 0, "no update was skipped: the windows were not tested");
}
