//! `wgpt train` under duress: Ctrl-C and SIGTERM (a checkpoint, then exit 130/143; a second
//! Ctrl-C exits at once), a disk that fills up during a checkpoint (a real size-limited tmpfs
//! where the machine lets us mount one, and /dev/full, which fails every write with ENOSPC,
//! everywhere on Linux), a read-only `--out`, and resume mistakes. Every failure must be a
//! one-line error naming the file, with a non-zero exit, and must leave the newest complete
//! checkpoint loadable.
//!
//! Tests run as root here, where permission bits do not stop writes: read-only means a file
//! system that refuses them (sysfs, or a tmpfs mounted read-only in a private mount namespace).
#![cfg(unix)]

mod common;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};
use wgpt::model::checkpoint::read_checkpoint;
use wgpt::train::state::{read_state, state_path};

const LIMIT: Duration = Duration::from_secs(60);

fn base_args(out: &Path, steps: usize, every: usize, extra: &[&str]) -> Vec<String> {
    let mut a: Vec<String> = [
        "train", "--backend", "cpu", "--threads", "1", "--init", "tests/data/tiny/model.bin", "--train",
        "tests/data/tiny/train.bin", "--batch", "4", "--seq-len", "16", "--lr", "1e-3", "--val-every", "0", "--gen-tokens",
        "0",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    a.extend(["--steps".into(), steps.to_string(), "--checkpoint-every".into(), every.to_string(), "--out".into()]);
    a.push(out.to_str().unwrap().into());
    a.extend(extra.iter().map(|s| s.to_string()));
    a
}

fn spawn(args: &[String], stderr: &Path) -> Child {
    Command::new(env!("CARGO_BIN_EXE_wgpt"))
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(stderr).unwrap())
        .spawn()
        .unwrap()
}

fn run(args: &[String]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_wgpt")).args(args).stdin(Stdio::null()).output().unwrap()
}

fn wait_bounded(child: &mut Child) -> std::process::ExitStatus {
    common::wait_bounded(child, LIMIT, "wgpt")
}

fn signal(child: &Child, sig: &str) {
    let ok = Command::new("kill").args([sig, &child.id().to_string()]).status().unwrap().success();
    assert!(ok, "kill {sig} failed");
}

/// The newest step in main.log (`s:N trl:...` lines).
fn logged_step(dir: &Path) -> usize {
    std::fs::read_to_string(dir.join("main.log"))
        .unwrap_or_default()
        .lines()
        .filter(|l| l.contains(" trl:"))
        .filter_map(|l| l.strip_prefix("s:")?.split_whitespace().next()?.parse().ok())
        .max()
        .unwrap_or(0)
}

fn wait_for(what: &str, child: &mut Child, mut cond: impl FnMut() -> bool) {
    let t0 = Instant::now();
    while !cond() {
        assert!(child.try_wait().unwrap().is_none(), "wgpt exited before {what}");
        assert!(t0.elapsed() < LIMIT, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(1));
    }
}

fn done_steps(dir: &Path) -> Vec<usize> {
    let Ok(entries) = std::fs::read_dir(dir) else { return Vec::new() };
    let mut v: Vec<usize> = entries
        .filter_map(|e| e.ok()?.file_name().to_str()?.strip_prefix("DONE_")?.parse().ok())
        .collect();
    v.sort();
    v
}

fn names(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect();
    v.sort();
    v
}

/// The checkpoint of `step` in `dir` loads: the model and its training state.
fn assert_loads(dir: &Path, step: usize) {
    let (_, params) = read_checkpoint(&dir.join(format!("model_{step:08}.bin"))).unwrap();
    let st = read_state(&state_path(dir, step), params.len()).unwrap();
    assert_eq!(st.step, step);
}

/// Exactly one `error: ...` line naming each of `needles`, and no panic.
fn assert_one_line_error(stderr: &str, needles: &[&str]) -> String {
    assert!(!stderr.contains("panicked") && !stderr.contains("internal error"), "{stderr}");
    let errors: Vec<&str> = stderr.lines().filter(|l| l.starts_with("error")).collect();
    assert_eq!(errors.len(), 1, "expected one error line:\n{stderr}");
    for n in needles {
        assert!(errors[0].contains(n), "{:?} does not mention {n:?}", errors[0]);
    }
    errors[0].to_string()
}

/// Steps long enough to signal in the middle of one: 256 micro-batches of the tiny model each
/// (a few hundred ms).
const LONG_STEPS: &[&str] = &["--total-batch", "16384"];

#[test]
fn ctrl_c_finishes_the_step_writes_a_checkpoint_and_exits_130() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("run");
    let err = dir.path().join("stderr");
    // no checkpoint is due for 1000 steps: the one found afterwards is Ctrl-C's
    let mut child = spawn(&base_args(&out, 1000, 0, LONG_STEPS), &err);
    wait_for("step 1", &mut child, || logged_step(&out) >= 1);
    // now inside step 2 (or later): Ctrl-C
    std::thread::sleep(Duration::from_millis(30));
    let at = logged_step(&out);
    signal(&child, "-INT");
    let status = wait_bounded(&mut child);
    let stderr = std::fs::read_to_string(&err).unwrap();
    assert_eq!(status.code(), Some(130), "{stderr}");
    // the step in progress was finished, then checkpointed
    let stopped = logged_step(&out);
    assert!(stopped == at + 1 || stopped == at, "signalled after step {at}, stopped at {stopped}");
    assert_eq!(done_steps(&out), vec![stopped], "{stderr}");
    assert_loads(&out, stopped);
    assert!(stderr.contains(&format!("stopped by SIGINT (Ctrl-C) at step {stopped}")), "{stderr}");
    assert!(!stderr.lines().any(|l| l.starts_with("error")), "{stderr}");
    // and --resume continues from it
    let o = run(&base_args(&out, stopped + 1, 0, &[LONG_STEPS, &["--resume"]].concat()));
    let e = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "{e}");
    assert!(e.contains(&format!("resuming at step {stopped}")), "{e}");
}

#[test]
fn second_ctrl_c_exits_at_once_and_the_newest_checkpoint_loads() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("run");
    let err = dir.path().join("stderr");
    let mut child = spawn(&base_args(&out, 1000, 1, LONG_STEPS), &err);
    // a checkpoint every step; once one is complete, signal twice inside the next step
    wait_for("a checkpoint", &mut child, || !done_steps(&out).is_empty());
    std::thread::sleep(Duration::from_millis(30));
    let newest = *done_steps(&out).last().unwrap();
    signal(&child, "-INT");
    std::thread::sleep(Duration::from_millis(60));
    let t = Instant::now();
    signal(&child, "-INT");
    let status = wait_bounded(&mut child);
    let took = t.elapsed();
    let stderr = std::fs::read_to_string(&err).unwrap();
    assert_eq!(status.code(), Some(130), "{stderr}");
    // at once: the step in progress was abandoned, not finished (a step takes a few hundred ms)
    assert!(took < Duration::from_millis(300), "took {took:?} after the second Ctrl-C");
    assert!(!stderr.contains("stopped by SIGINT"), "the first Ctrl-C's orderly stop ran:\n{stderr}");
    let done = done_steps(&out);
    assert_eq!(*done.last().unwrap(), newest, "a checkpoint appeared after the signals: {done:?}");
    assert_loads(&out, newest);
    let o = run(&base_args(&out, newest + 1, 1, &[LONG_STEPS, &["--resume"]].concat()));
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
}

#[test]
fn sigterm_checkpoint_then_resume_is_bit_exact() {
    let dir = tempfile::tempdir().unwrap();
    let reference = dir.path().join("reference");
    let o = run(&base_args(&reference, 200, 0, &[]));
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let out = dir.path().join("run");
    let err = dir.path().join("stderr");
    let mut child = spawn(&base_args(&out, 200, 0, &[]), &err);
    wait_for("step 20", &mut child, || logged_step(&out) >= 20);
    signal(&child, "-TERM");
    let status = wait_bounded(&mut child);
    let stderr = std::fs::read_to_string(&err).unwrap();
    assert_eq!(status.code(), Some(143), "{stderr}");
    let done = done_steps(&out);
    assert_eq!(done.len(), 1, "{done:?}");
    assert!(done[0] >= 20 && done[0] < 200, "stopped at {}", done[0]);
    let o = run(&base_args(&out, 200, 0, &["--resume"]));
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let last = "model_00000200.bin";
    assert!(std::fs::read(out.join(last)).unwrap() == std::fs::read(reference.join(last)).unwrap(), "resumed model differs");
    let state = "state_00000200_00000.bin";
    assert!(std::fs::read(out.join(state)).unwrap() == std::fs::read(reference.join(state)).unwrap(), "resumed state differs");
}

/// A run whose checkpoint of step 10 could not be written must have failed with one error line
/// naming the file, kept the checkpoint of step 5 and left nothing of step 10 behind.
fn check_failed_checkpoint(out: &Path, stderr: &str, status: std::process::ExitStatus, needles: &[&str]) {
    assert!(!status.success(), "{stderr}");
    assert_ne!(status.code(), Some(130));
    assert_one_line_error(stderr, needles);
    assert_eq!(done_steps(out), vec![5], "{:?}", names(out));
    assert_loads(out, 5);
    let left: Vec<String> = names(out).into_iter().filter(|n| n.contains("00000010") || n.contains(".tmp")).collect();
    assert!(left.is_empty(), "the failed checkpoint left {left:?}");
}

#[test]
fn checkpoint_write_failing_with_enospc_is_a_clean_error() {
    // /dev/full fails every write with ENOSPC. The state file of step 10 is written to
    // `state_00000010_00000.bin.tmp<pid>` first (src/atomic.rs): made a link to /dev/full right
    // after the start, that write hits a full device.
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("run");
    std::fs::create_dir_all(&out).unwrap();
    let err = dir.path().join("stderr");
    let mut child = spawn(&base_args(&out, 20, 5, &[]), &err);
    let tmp = out.join(format!("state_00000010_00000.bin.tmp{}", child.id()));
    std::os::unix::fs::symlink("/dev/full", &tmp).unwrap();
    let status = wait_bounded(&mut child);
    let stderr = std::fs::read_to_string(&err).unwrap();
    let target = out.join("state_00000010_00000.bin");
    check_failed_checkpoint(&out, &stderr, status, &[target.to_str().unwrap(), "No space left on device"]);
    assert!(std::fs::symlink_metadata(&tmp).is_err(), "the temporary file is still there");
    assert!(Path::new("/dev/full").exists());
}

/// Run `script` (sh) in a private mount namespace (mounts vanish with it), or None where this
/// machine does not allow one (not root, no unshare).
fn in_mount_namespace(script: &str, env: &[(&str, &Path)]) -> Option<Output> {
    let mut c = Command::new("unshare");
    c.args(["--mount", "--propagation", "private", "sh", "-c", script]).stdin(Stdio::null());
    for (k, v) in env {
        c.env(k, v);
    }
    let o = c.output().ok()?;
    // 200: the script's own "cannot mount" exit
    (o.status.code() != Some(200) && !String::from_utf8_lossy(&o.stderr).contains("unshare failed")).then_some(o)
}

#[test]
fn disk_full_during_a_checkpoint_is_a_clean_error() {
    // a 2600 KiB tmpfs: the first checkpoint (1.65 MB) fits, the second does not
    let dir = tempfile::tempdir().unwrap();
    let (mnt, save) = (dir.path().join("mnt"), dir.path().join("save"));
    std::fs::create_dir_all(&mnt).unwrap();
    std::fs::create_dir_all(save.join("out")).unwrap();
    let args: Vec<String> = base_args(&mnt, 20, 5, &[]);
    let quoted: Vec<String> = args.iter().map(|a| format!("'{a}'")).collect();
    let script = format!(
        "mount -t tmpfs -o size=2600k wgpt-test-full \"$MNT\" || exit 200\n\
         \"$WGPT\" {} 2> \"$SAVE/stderr\" > /dev/null\n\
         echo $? > \"$SAVE/rc\"\n\
         cp -a \"$MNT/.\" \"$SAVE/out/\"\n",
        quoted.join(" ")
    );
    let wgpt = PathBuf::from(env!("CARGO_BIN_EXE_wgpt"));
    let Some(o) = in_mount_namespace(&script, &[("MNT", &mnt), ("SAVE", &save), ("WGPT", &wgpt)]) else {
        eprintln!("skipped: cannot mount a tmpfs here (needs root and unshare); the /dev/full test covers ENOSPC");
        return;
    };
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let rc: i32 = std::fs::read_to_string(save.join("rc")).unwrap().trim().parse().unwrap();
    let stderr = std::fs::read_to_string(save.join("stderr")).unwrap();
    assert_eq!(rc, 1, "{stderr}");
    let copy = save.join("out");
    let line = assert_one_line_error(&stderr, &[mnt.to_str().unwrap(), "00000010", "No space left on device"]);
    eprintln!("disk full: {line}");
    assert_eq!(done_steps(&copy), vec![5], "{:?}", names(&copy));
    assert_loads(&copy, 5);
    let left: Vec<String> = names(&copy).into_iter().filter(|n| n.contains("00000010") || n.contains(".tmp")).collect();
    assert!(left.is_empty(), "the failed checkpoint left {left:?}");
    // with room again, --resume from it finishes as an uninterrupted run would
    let o = run(&base_args(&copy, 20, 5, &["--resume"]));
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let reference = dir.path().join("reference");
    assert!(run(&base_args(&reference, 20, 5, &[])).status.success());
    let last = "model_00000020.bin";
    assert!(std::fs::read(copy.join(last)).unwrap() == std::fs::read(reference.join(last)).unwrap(), "resumed model differs");
}

#[test]
fn read_only_out_is_a_one_line_error_naming_the_path() {
    // sysfs refuses new files even to root
    let probe = Path::new("/sys/wgpt-write-probe");
    if std::fs::create_dir(probe).is_ok() {
        let _ = std::fs::remove_dir(probe);
        eprintln!("skipped /sys: it is writable here");
    } else {
        let out = Path::new("/sys/wgpt-test-out");
        let t = Instant::now();
        let o = run(&base_args(out, 5, 1, &[]));
        let stderr = String::from_utf8_lossy(&o.stderr);
        assert!(!o.status.success(), "{stderr}");
        assert_one_line_error(&stderr, &["/sys/wgpt-test-out"]);
        // refused before any training
        assert!(!stderr.contains("train loss"), "{stderr}");
        assert!(t.elapsed() < Duration::from_secs(20));
    }

    // a read-only file system holding a complete checkpoint: --resume fails naming the file it
    // could not open for writing, and the checkpoint stays as it was
    let dir = tempfile::tempdir().unwrap();
    let prepared = dir.path().join("prepared");
    assert!(run(&base_args(&prepared, 5, 5, &[])).status.success());
    let (mnt, save) = (dir.path().join("mnt"), dir.path().join("save"));
    std::fs::create_dir_all(&mnt).unwrap();
    std::fs::create_dir_all(save.join("out")).unwrap();
    let args = base_args(&mnt, 10, 5, &["--resume"]);
    let quoted: Vec<String> = args.iter().map(|a| format!("'{a}'")).collect();
    let script = format!(
        "mount -t tmpfs -o size=8m wgpt-test-ro \"$MNT\" || exit 200\n\
         cp -a \"$PREP/.\" \"$MNT/\" && mount -o remount,ro \"$MNT\" || exit 200\n\
         \"$WGPT\" {} 2> \"$SAVE/stderr\" > /dev/null\n\
         echo $? > \"$SAVE/rc\"\n\
         cp -a \"$MNT/.\" \"$SAVE/out/\"\n",
        quoted.join(" ")
    );
    let wgpt = PathBuf::from(env!("CARGO_BIN_EXE_wgpt"));
    let Some(o) = in_mount_namespace(&script, &[("MNT", &mnt), ("SAVE", &save), ("WGPT", &wgpt), ("PREP", &prepared)]) else {
        eprintln!("skipped the read-only mount: cannot mount a tmpfs here");
        return;
    };
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let rc: i32 = std::fs::read_to_string(save.join("rc")).unwrap().trim().parse().unwrap();
    let stderr = std::fs::read_to_string(save.join("stderr")).unwrap();
    assert_eq!(rc, 1, "{stderr}");
    assert_one_line_error(&stderr, &[mnt.to_str().unwrap(), "Read-only file system"]);
    let copy = save.join("out");
    assert_eq!(names(&copy), names(&prepared));
    for n in names(&prepared) {
        assert!(std::fs::read(copy.join(&n)).unwrap() == std::fs::read(prepared.join(&n)).unwrap(), "{n} changed");
    }
    assert_loads(&copy, 5);
}

#[test]
fn resume_mistakes_are_one_line_errors() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("run");
    assert!(run(&base_args(&out, 10, 5, &[])).status.success());
    // --steps before the newest checkpoint: an error, not a run that never reaches its last step
    let t = Instant::now();
    let o = run(&base_args(&out, 5, 5, &["--resume"]));
    assert!(!o.status.success());
    assert_one_line_error(&String::from_utf8_lossy(&o.stderr), &["--steps", "10"]);
    assert!(t.elapsed() < Duration::from_secs(20));
    // a state file that belongs to another step
    std::fs::copy(state_path(&out, 5), state_path(&out, 10)).unwrap();
    let o = run(&base_args(&out, 20, 5, &["--resume"]));
    assert!(!o.status.success());
    assert_one_line_error(&String::from_utf8_lossy(&o.stderr), &["state_00000010_00000.bin", "step 5"]);
}
