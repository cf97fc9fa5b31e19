//! Data-parallel `wgpt train`: ranks with uneven micro-batches (`--batch-split 1,3`) follow one
//! device at the same global batch (`--batch 4`) — losses and final parameters within 1e-6
//! relative — whether the ranks are processes joined by MPI (Open MPI 4 from apt, MPICH 5's
//! MPI-5 standard ABI and Open MPI 5 from PyPI wheels) or devices in one process (`--devices`).
//! `--check-sync 1` makes every run prove, after every step, that all ranks hold bit-identical
//! parameters. Also: resuming with another world size, a dead peer, a hung peer.
//!
//! The MPI installs: `mpirun` on PATH (Open MPI), `WGPT_TEST_MPICH_PREFIX` and
//! `WGPT_TEST_OPENMPI5_PREFIX` (the venvs `.ci/run` makes). A missing one prints "skipped: …",
//! and fails under `WGPT_REQUIRE_MPI=1` (CI).

mod common;

use common::wait_bounded;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

const TINY: &str = "tests/data/tiny";

/// The flags every run here shares: the tiny fixture model and its tokens, T=32, 3 steps,
/// shuffled data, a checkpoint at the end, the per-step JSON log.
fn train_args(out: &Path, extra: &[&str]) -> Vec<String> {
    let mut v: Vec<String> = [
        "train", "--init", &format!("{TINY}/model.bin"), "--train", &format!("{TINY}/train.bin"), "--val",
        &format!("{TINY}/train.bin"), "--val-every", "3", "--val-batches", "2", "--seq-len", "32", "--steps", "3",
        "--lr", "1e-3", "--gen-tokens", "0", "--out", out.to_str().unwrap(), "--log-json",
        out.join("log.jsonl").to_str().unwrap(),
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    v.extend(extra.iter().map(|s| s.to_string()));
    v
}

/// Replace the value of `flag` in `args`.
fn set(args: &mut [String], flag: &str, value: &str) {
    let i = args.iter().position(|a| a == flag).unwrap();
    args[i + 1] = value.into();
}

/// A run's (train losses, val losses, final parameters).
struct Run {
    train: Vec<f64>,
    val: Vec<f64>,
    params: Vec<f32>,
}

fn read_run(out: &Path, steps: usize) -> Run {
    let log = std::fs::read_to_string(out.join("log.jsonl")).unwrap();
    let vals: Vec<serde_json::Value> = log.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    let train = vals.iter().filter_map(|v| v["train_loss"].as_f64()).collect();
    let val = vals.iter().filter_map(|v| v["val_loss"].as_f64()).collect();
    let (_, params) = wgpt::model::checkpoint::read_checkpoint(&out.join(format!("model_{steps:08}.bin"))).unwrap();
    Run { train, val, params }
}

fn check(o: &Output, what: &str) {
    assert!(
        o.status.success(),
        "{what} failed ({}):\nstdout:\n{}\nstderr:\n{}",
        o.status,
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
}

/// `wgpt train` as one process.
fn single(out: &Path, extra: &[&str]) -> Run {
    let o = Command::new(env!("CARGO_BIN_EXE_wgpt")).args(train_args(out, extra)).output().unwrap();
    check(&o, &format!("train {extra:?}"));
    read_run(out, 3)
}

fn max_rel(a: &[f32], b: &[f32]) -> f64 {
    assert_eq!(a.len(), b.len());
    let scale = a.iter().fold(0f32, |m, x| m.max(x.abs())) as f64;
    a.iter().zip(b).map(|(x, y)| (*x as f64 - *y as f64).abs()).fold(0.0, f64::max) / scale
}

/// Losses within 1e-6 relative; parameters within 1e-6 of the largest parameter.
fn assert_same_run(reference: &Run, got: &Run, what: &str) {
    assert_eq!(reference.train.len(), 3, "{what}");
    assert_eq!(got.train.len(), 3, "{what}: {:?}", got.train);
    assert!(reference.train[2] < reference.train[0], "the reference should learn: {:?}", reference.train);
    for (r, g) in reference.train.iter().zip(&got.train).chain(reference.val.iter().zip(&got.val)) {
        assert!(((r - g) / r).abs() < 1e-6, "{what}: loss {g} vs one device's {r}");
    }
    assert_eq!(reference.val.len(), got.val.len(), "{what}");
    let d = max_rel(&reference.params, &got.params);
    assert!(d < 1e-6, "{what}: parameters differ by {d:e} (relative to the largest)");
}

/// An MPI install to launch ranks with: the launcher command (up to the rank count) and env.
struct Mpi {
    name: &'static str,
    launch: Vec<String>,
    env: Vec<(String, String)>,
}

fn require_mpi() -> bool {
    std::env::var("WGPT_REQUIRE_MPI").as_deref() == Ok("1")
}

fn skip(what: &str) -> Option<Mpi> {
    assert!(!require_mpi(), "WGPT_REQUIRE_MPI=1 but {what}");
    let _ = writeln!(std::io::stderr().lock(), "skipped: {what}");
    None
}

fn on_path(cmd: &str) -> Option<PathBuf> {
    std::env::var_os("PATH").and_then(|p| std::env::split_paths(&p).map(|d| d.join(cmd)).find(|f| f.is_file()))
}

/// Open MPI's flags for a test: root is allowed (CI runs as root), more ranks than cores.
fn ompi(mpirun: &Path) -> Vec<String> {
    vec![mpirun.display().to_string(), "--allow-run-as-root".into(), "--oversubscribe".into(), "-np".into()]
}

/// Open MPI 4 from apt: `mpirun` on PATH; libmpi is found on the loader path.
fn openmpi4() -> Option<Mpi> {
    let Some(m) = on_path("mpirun") else { return skip("Open MPI 4 not installed (no mpirun on PATH)") };
    let v = Command::new(&m).arg("--version").output().ok()?;
    if !String::from_utf8_lossy(&v.stdout).contains("Open MPI") {
        return skip("the mpirun on PATH is not Open MPI");
    }
    Some(Mpi { name: "Open MPI 4 (apt)", launch: ompi(&m), env: vec![] })
}

fn prefix(var: &str, what: &str) -> Option<PathBuf> {
    match std::env::var_os(var).map(PathBuf::from).filter(|p| p.is_dir()) {
        Some(p) => Some(p),
        None => {
            skip(&format!("{what} not installed (set {var} to its venv)"));
            None
        }
    }
}

/// MPICH 5 (PyPI wheel), through its MPI-5 standard-ABI library `libmpi_abi.so.1`.
fn mpich_standard_abi() -> Option<Mpi> {
    let p = prefix("WGPT_TEST_MPICH_PREFIX", "MPICH 5")?;
    let lib = p.join("lib/libmpi_abi.so.1");
    if !lib.is_file() {
        return skip(&format!("{} missing", lib.display()));
    }
    let launch = vec![p.join("bin/mpiexec").display().to_string(), "-n".into()];
    Some(Mpi { name: "MPICH 5 (standard ABI)", launch, env: vec![("WGPT_MPI_LIB".into(), lib.display().to_string())] })
}

/// Open MPI 5 (PyPI wheel): libmpi is found beside its mpirun (`bin/../lib`).
fn openmpi5() -> Option<Mpi> {
    let p = prefix("WGPT_TEST_OPENMPI5_PREFIX", "Open MPI 5")?;
    Some(Mpi { name: "Open MPI 5 (wheel)", launch: ompi(&p.join("bin/mpirun")), env: vec![("PATH".into(), path_with(&p.join("bin")))] })
}

fn path_with(dir: &Path) -> String {
    format!("{}:{}", dir.display(), std::env::var("PATH").unwrap_or_default())
}

/// `launcher -np n wgpt args…`, bounded by `limit`.
fn mpi_run(m: &Mpi, n: usize, args: &[String], limit: Duration) -> Output {
    let mut c = Command::new(&m.launch[0]);
    c.args(&m.launch[1..]).arg(n.to_string()).arg(env!("CARGO_BIN_EXE_wgpt")).args(args);
    c.envs(m.env.iter().map(|(k, v)| (k, v)));
    let mut child = c.stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().unwrap();
    let out = std::thread::spawn({
        let mut so = child.stdout.take().unwrap();
        move || {
            let mut s = Vec::new();
            std::io::Read::read_to_end(&mut so, &mut s).unwrap();
            s
        }
    });
    let err = std::thread::spawn({
        let mut se = child.stderr.take().unwrap();
        move || {
            let mut s = Vec::new();
            std::io::Read::read_to_end(&mut se, &mut s).unwrap();
            s
        }
    });
    let status = wait_bounded(&mut child, limit, m.name);
    Output { status, stdout: out.join().unwrap(), stderr: err.join().unwrap() }
}

/// Two MPI ranks with micro-batches 1 and 3 follow one process at --batch 4, in sync.
fn uneven_mpi_ranks_follow_one_device(m: Option<Mpi>) {
    let Some(m) = m else { return };
    let dir = tempfile::tempdir().unwrap();
    let reference = single(&dir.path().join("one"), &["--backend", "cpu", "--batch", "4", "--threads", "1"]);
    let out = dir.path().join("mpi");
    let args = train_args(&out, &["--backend", "cpu", "--threads", "1", "--batch-split", "1,3", "--check-sync", "1"]);
    let o = mpi_run(&m, 2, &args, Duration::from_secs(120));
    check(&o, m.name);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("data-parallel: rank 0 of 2") && err.contains("micro-batch per rank 1,3, B=4"), "{err}");
    assert_same_run(&reference, &read_run(&out, 3), m.name);
    // every rank wrote its own state, rank 0 the model
    for r in 0..2 {
        assert!(out.join(format!("state_00000003_{r:05}.bin")).is_file(), "rank {r}'s state");
    }
    // ZeRO-1: the optimiser state sharded over the two ranks, the same run
    let out = dir.path().join("zero");
    let args = train_args(&out, &["--backend", "cpu", "--threads", "1", "--batch-split", "1,3", "--check-sync", "1", "--zero", "1"]);
    let o = mpi_run(&m, 2, &args, Duration::from_secs(120));
    check(&o, &format!("{} --zero 1", m.name));
    assert!(String::from_utf8_lossy(&o.stderr).contains("ZeRO-1: this rank's AdamW state covers"));
    assert_same_run(&reference, &read_run(&out, 3), &format!("{} --zero 1", m.name));
}

#[test]
fn uneven_ranks_under_open_mpi_4_follow_one_device() {
    uneven_mpi_ranks_follow_one_device(openmpi4());
}

#[test]
fn uneven_ranks_under_mpich_standard_abi_follow_one_device() {
    uneven_mpi_ranks_follow_one_device(mpich_standard_abi());
}

#[test]
fn uneven_ranks_under_open_mpi_5_follow_one_device() {
    uneven_mpi_ranks_follow_one_device(openmpi5());
}

#[test]
fn uneven_devices_in_one_process_follow_one_device() {
    let dir = tempfile::tempdir().unwrap();
    let reference = single(&dir.path().join("one"), &["--backend", "cpu", "--batch", "4", "--threads", "1"]);
    let out = dir.path().join("two");
    let got = single(&out, &["--devices", "cpu,cpu", "--threads", "1", "--batch-split", "1,3", "--check-sync", "1"]);
    assert_same_run(&reference, &got, "--devices cpu,cpu --batch-split 1,3");
    // auto: the split is measured (two equal cpu ranks), and the run is still the same run
    let out = dir.path().join("auto");
    let o = Command::new(env!("CARGO_BIN_EXE_wgpt"))
        .args(train_args(&out, &["--devices", "cpu,cpu", "--threads", "1", "--batch", "4", "--batch-split", "auto", "--check-sync", "1"]))
        .output()
        .unwrap();
    check(&o, "--batch-split auto");
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("(auto: measured "), "{err}");
    assert_same_run(&reference, &read_run(&out, 3), "--batch-split auto");
}

#[test]
fn bad_data_parallel_flags_are_one_line_errors() {
    let dir = tempfile::tempdir().unwrap();
    for (extra, want) in [
        (&["--devices", "cpu,cpu", "--reduce", "nccl"][..], "error: --reduce: nccl: not every rank is on the CUDA backend"),
        (&["--devices", "cpu,cpu", "--batch-split", "1,2,1"][..], "error: --batch-split: lists 3 micro-batches for 2 ranks"),
        (&["--devices", "cpu,cpu,cpu", "--batch", "2"][..], "error: --batch: 2 sequences cannot be split over 3 ranks"),
        (&["--devices", "cpu", "--batch", "2"][..], "error: --devices: 'cpu': list at least two devices"),
        (&["--devices", "cpu,cpu", "--zero", "2"][..], "error: --zero: 2: only 0 (off) and 1"),
        (&["--batch-split", "1,x"][..], "error: invalid value '1,x' for '--batch-split"),
    ] {
        let mut args = train_args(&dir.path().join("bad"), extra);
        if !extra.contains(&"--batch") {
            args.extend(["--batch".to_string(), "4".to_string()]);
        }
        let o = Command::new(env!("CARGO_BIN_EXE_wgpt")).args(&args).output().unwrap();
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(!o.status.success() && !err.contains("panicked"), "{extra:?}: {err}");
        assert!(err.lines().next().unwrap_or("").starts_with(want), "{extra:?}: {err}");
    }
}

/// `--dist-init` for a world of processes: fs and tcp join CUDA ranks through NCCL alone, so cpu
/// ranks asking for them are refused (one line, before anything waits); a malformed value too.
#[test]
fn dist_init_for_cpu_ranks_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    for (init, want) in [
        ("tcp", "error: --dist-init: tcp joins CUDA ranks through NCCL alone; cpu and wgpu ranks are joined by MPI"),
        ("fs:/tmp", "error: --dist-init: fs:/tmp joins CUDA ranks through NCCL alone"),
        ("tcp:host", "error: invalid value 'tcp:host' for '--dist-init"),
    ] {
        let mut args = train_args(&dir.path().join("bad"), &["--backend", "cpu", "--dist-init", init]);
        args.extend(["--batch".to_string(), "4".to_string()]);
        let o = Command::new(env!("CARGO_BIN_EXE_wgpt")).args(&args).env("WGPT_RANK", "0").env("WGPT_WORLD_SIZE", "2").output().unwrap();
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(!o.status.success() && !err.contains("panicked"), "{init}: {err}");
        assert!(err.lines().next().unwrap_or("").starts_with(want), "{init}: {err}");
    }
}

#[test]
fn two_wgpu_devices_in_one_process_follow_one_device() {
    if common::wgpu_adapter().is_none() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let reference = single(&dir.path().join("one"), &["--backend", "wgpu", "--batch", "4"]);
    // summed after backward (auto on a software adapter), and bucket by bucket while backward runs
    let got = single(&dir.path().join("after"), &["--backend", "wgpu", "--devices", "0,0", "--batch-split", "3,1", "--check-sync", "1"]);
    assert_same_run(&reference, &got, "--devices 0,0 (lavapipe twice)");
    let args = ["--backend", "wgpu", "--devices", "0,0", "--batch-split", "3,1", "--check-sync", "1", "--overlap", "on"];
    assert_same_run(&reference, &single(&dir.path().join("two"), &args), "--devices 0,0 --overlap on");
    // every step logs the reduce and the part of it that overlapped backward (how much overlaps
    // is timing, measured by `wgpt bench`)
    let log = std::fs::read_to_string(dir.path().join("two/log.jsonl")).unwrap();
    let steps: Vec<serde_json::Value> = log.lines().map(|l| serde_json::from_str(l).unwrap()).filter(|v: &serde_json::Value| v["train_loss"].is_f64()).collect();
    for v in &steps {
        let (r, h) = (v["reduce_ms"].as_f64().unwrap(), v["reduce_hidden_ms"].as_f64().unwrap());
        assert!(r > 0.0 && (0.0..=r).contains(&h), "{v}");
    }
    // a cpu rank and a wgpu rank: they stay in sync (rank 0's parameters are copied) and follow the cpu
    let cpu = single(&dir.path().join("cpu"), &["--backend", "cpu", "--batch", "4"]);
    let mixed = single(&dir.path().join("mixed"), &["--devices", "cpu,wgpu:0", "--batch-split", "2,2", "--check-sync", "1"]);
    for (c, m) in cpu.train.iter().zip(&mixed.train) {
        assert!((c - m).abs() < 1e-4, "cpu+wgpu {m} vs cpu {c}");
    }
}

#[test]
fn zero_1_devices_follow_one_device_and_resume_on_one_process() {
    let dir = tempfile::tempdir().unwrap();
    let reference = single(&dir.path().join("one"), &["--backend", "cpu", "--batch", "4", "--threads", "1"]);
    let z = ["--devices", "cpu,cpu,cpu", "--threads", "1", "--batch-split", "2,1,1", "--zero", "1", "--check-sync", "1"];
    assert_same_run(&reference, &single(&dir.path().join("zero"), &z), "--zero 1 over three devices");
    // two sharded steps on three ranks, the third on one process: the shards are put together
    let out = dir.path().join("resumed");
    let mut two = train_args(&out, &z);
    set(&mut two, "--steps", "2");
    check(&Command::new(env!("CARGO_BIN_EXE_wgpt")).args(&two).output().unwrap(), "ZeRO-1, 2 steps");
    let o = Command::new(env!("CARGO_BIN_EXE_wgpt"))
        .args(train_args(&out, &["--backend", "cpu", "--batch", "4", "--threads", "1", "--resume"]))
        .output()
        .unwrap();
    check(&o, "one process resuming a ZeRO-1 checkpoint");
    let got = read_run(&out, 3);
    let d = max_rel(&reference.params, &got.params);
    assert!(d < 1e-6, "resumed parameters differ by {d:e}");
}

#[test]
fn resuming_with_another_world_size_continues_the_same_run() {
    let dir = tempfile::tempdir().unwrap();
    let straight = single(&dir.path().join("straight"), &["--backend", "cpu", "--batch", "4", "--threads", "1", "--checkpoint-every", "2"]);
    // steps 1-2 on two ranks, step 3 on one process
    let out = dir.path().join("resumed");
    let mut two = train_args(&out, &["--devices", "cpu,cpu", "--threads", "1", "--batch-split", "3,1"]);
    set(&mut two, "--steps", "2");
    let o = Command::new(env!("CARGO_BIN_EXE_wgpt")).args(&two).output().unwrap();
    check(&o, "two ranks, 2 steps");
    let o = Command::new(env!("CARGO_BIN_EXE_wgpt"))
        .args(train_args(&out, &["--backend", "cpu", "--batch", "4", "--threads", "1", "--resume"]))
        .output()
        .unwrap();
    check(&o, "one process, resumed");
    let got = read_run(&out, 3);
    let d = max_rel(&straight.params, &got.params);
    assert!(d < 1e-6, "resumed run's parameters differ by {d:e}");
    let last = got.train.last().unwrap();
    assert!(((last - straight.train[2]) / straight.train[2]).abs() < 1e-6, "step 3: {last} vs {}", straight.train[2]);
}

#[test]
fn a_killed_rank_ends_the_job_in_bounded_time() {
    let Some(m) = openmpi4() else { return };
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("killed");
    let mut args = train_args(&out, &["--backend", "cpu", "--threads", "1", "--batch", "2"]);
    set(&mut args, "--val-every", "0");
    set(&mut args, "--steps", "100000");
    let mut c = Command::new(&m.launch[0]);
    // stderr to a file: a pipe nobody reads would fill and block the ranks
    let errf = std::fs::File::create(dir.path().join("stderr.txt")).unwrap();
    c.args(&m.launch[1..]).arg("2").arg(env!("CARGO_BIN_EXE_wgpt")).args(&args).stdout(Stdio::null()).stderr(errf);
    let mut child = c.spawn().unwrap();
    // wait for the first logged step, then SIGKILL rank 1 (found by its environment)
    let t0 = Instant::now();
    let log = out.join("log.jsonl");
    while std::fs::read_to_string(&log).map_or(true, |s| s.lines().count() < 1) {
        if let Some(st) = child.try_wait().unwrap() {
            let e = std::fs::read_to_string(dir.path().join("stderr.txt")).unwrap_or_default();
            panic!("the job ended before its first step ({st}):\n{e}");
        }
        assert!(t0.elapsed() < Duration::from_secs(60), "no step logged");
        std::thread::sleep(Duration::from_millis(50));
    }
    let rank1 = rank_pid(&out, 1).expect("rank 1's process");
    assert!(Command::new("kill").args(["-9", &rank1.to_string()]).status().unwrap().success());
    let t1 = Instant::now();
    let status = wait_bounded(&mut child, Duration::from_secs(60), "mpirun after a rank was killed");
    assert!(!status.success());
    eprintln!("the job ended {:.1} s after rank 1 was killed", t1.elapsed().as_secs_f64());
}

/// The pid of the `wgpt train` of rank `rank` writing to `out` (Linux: /proc).
fn rank_pid(out: &Path, rank: usize) -> Option<u32> {
    let want = format!("OMPI_COMM_WORLD_RANK={rank}");
    let marker = out.to_str().unwrap();
    for e in std::fs::read_dir("/proc").ok()?.flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<u32>() else { continue };
        let cmd = std::fs::read(e.path().join("cmdline")).unwrap_or_default();
        let cmd = String::from_utf8_lossy(&cmd);
        if !cmd.starts_with(env!("CARGO_BIN_EXE_wgpt")) || !cmd.contains(marker) {
            continue;
        }
        let env = std::fs::read(e.path().join("environ")).unwrap_or_default();
        if env.split(|&b| b == 0).any(|v| v == want.as_bytes()) {
            return Some(pid);
        }
    }
    None
}

#[test]
fn a_hung_rank_ends_the_job_with_an_error_after_dist_timeout() {
    let Some(m) = openmpi4() else { return };
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("hung");
    let mut m = m;
    // rank 1 stops answering before step 2 (a test hook: it sleeps instead of training)
    m.env.push(("WGPT_FAULT".into(), "hang:1:2".into()));
    let args = train_args(&out, &["--backend", "cpu", "--threads", "1", "--batch", "2", "--dist-timeout", "3"]);
    let t0 = Instant::now();
    let o = mpi_run(&m, 2, &args, Duration::from_secs(90));
    assert!(!o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("rank 0 of 2: MPI_") && err.contains("a peer died or hangs"), "{err}");
    assert!(t0.elapsed() < Duration::from_secs(60));
}
