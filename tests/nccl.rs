//! `dist::nccl` against a real NCCL: `$WGPT_TEST_NCCL_LIB` names its `libnccl.so.2` (for CI, pip's
//! wheel: `python3 -m pip install --target target/ci/nccl nvidia-nccl-cu11==2.13.4`, then
//! `WGPT_TEST_NCCL_LIB=target/ci/nccl/nvidia/nccl/lib/libnccl.so.2`). Without it these tests are
//! skipped, visibly, unless `WGPT_REQUIRE_NCCL=1` (CI), which makes that a failure.
//!
//! What needs no GPU is checked everywhere: loading by `$WGPT_NCCL_LIB`, the version, unique ids,
//! and that creating a communicator with no CUDA device fails with an error instead of
//! panicking or hanging. On a machine with a GPU (`/dev/nvidia0`) the communicator of one rank
//! is made and an all-reduce run through it.

use std::collections::HashMap;
use std::path::Path;
use std::sync::mpsc;
use std::time::Duration;
use wgpt::dist::nccl::{Nccl, NcclVersion};
use wgpt::error::Error;

const LIMIT: Duration = Duration::from_secs(60);

/// `$WGPT_TEST_NCCL_LIB`, or None after saying the test is skipped (a failure under
/// `WGPT_REQUIRE_NCCL=1`).
fn test_lib() -> Option<String> {
    match std::env::var("WGPT_TEST_NCCL_LIB") {
        Ok(p) if !p.is_empty() => {
            assert!(Path::new(&p).is_file(), "WGPT_TEST_NCCL_LIB={p} is not a file");
            Some(p)
        }
        _ => {
            assert!(
                std::env::var("WGPT_REQUIRE_NCCL").as_deref() != Ok("1"),
                "WGPT_REQUIRE_NCCL=1 but no NCCL library (set WGPT_TEST_NCCL_LIB)"
            );
            eprintln!("skipped: no NCCL library (set WGPT_TEST_NCCL_LIB)");
            None
        }
    }
}

fn env_with_lib(lib: &str) -> HashMap<String, String> {
    HashMap::from([("WGPT_NCCL_LIB".to_string(), lib.to_string())])
}

fn load(lib: &str) -> Nccl {
    Nccl::load(&env_with_lib(lib)).unwrap_or_else(|e| panic!("loading {lib}: {e}"))
}

/// The version of the pip wheel `lib` belongs to (`site-packages/nvidia/nccl/lib/libnccl.so.2`
/// beside `nvidia_nccl_cu*-X.Y.Z.dist-info`), if it is one.
fn wheel_version(lib: &str) -> Option<NcclVersion> {
    let real = std::fs::canonicalize(lib).ok()?;
    let site = real.parent()?.parent()?.parent()?.parent()?.to_path_buf();
    let mut found: Vec<NcclVersion> = std::fs::read_dir(&site)
        .ok()?
        .flatten()
        .filter_map(|e| {
            let name = e.file_name().into_string().ok()?;
            let rest = name.strip_prefix("nvidia_nccl_cu")?.strip_suffix(".dist-info")?;
            let ver = rest.split_once('-')?.1;
            let mut it = ver.split('.').map(|s| s.parse::<u32>().ok());
            let (major, minor, patch) = (it.next()??, it.next()??, it.next().flatten().unwrap_or(0));
            Some(NcclVersion { major, minor, patch })
        })
        .collect();
    found.dedup();
    (found.len() == 1).then(|| found[0])
}

/// `f` on its own thread, given `LIMIT` to finish (a hang fails the test instead of stalling it).
fn bounded<T: Send + 'static>(what: &str, f: impl FnOnce() -> T + Send + 'static) -> T {
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(f());
    });
    match rx.recv_timeout(LIMIT) {
        Ok(v) => v,
        Err(mpsc::RecvTimeoutError::Timeout) => panic!("{what} did not return within {LIMIT:?}"),
        Err(mpsc::RecvTimeoutError::Disconnected) => panic!("{what} panicked"),
    }
}

#[test]
fn missing_library_is_one_line_naming_the_variable_and_path() {
    let e = match Nccl::load(&env_with_lib("/no/such/libnccl.so.2")) {
        Err(e) => e,
        Ok(n) => panic!("loaded {} from a path that does not exist", n.path()),
    };
    assert!(matches!(e, Error::Unavailable(_)), "{e:?}");
    let s = e.to_string();
    assert!(!s.contains('\n'), "not one line: {s}");
    assert!(s.contains("WGPT_NCCL_LIB") && s.contains("/no/such/libnccl.so.2"), "{s}");
}

#[test]
fn loads_by_wgpt_nccl_lib_and_reports_the_version() {
    let Some(lib) = test_lib() else { return };
    let n = load(&lib);
    let v = n.version();
    eprintln!("loaded NCCL {v} from {}", n.path());
    assert_eq!(v.major, 2, "NCCL {v}");
    assert!(v >= NcclVersion { major: 2, minor: 4, patch: 0 }, "NCCL {v}");
    assert_eq!(Path::new(n.path()), std::fs::canonicalize(&lib).unwrap(), "path() is the file loaded");
    assert_eq!(v.has_avg_and_bf16(), v.minor >= 10);
    if let Some(w) = wheel_version(&lib) {
        assert_eq!(v, w, "ncclGetVersion disagrees with the wheel's metadata");
    }
}

#[test]
fn unique_ids_are_fresh() {
    let Some(lib) = test_lib() else { return };
    let n = load(&lib);
    let a = bounded("ncclGetUniqueId", move || {
        let a = n.unique_id();
        let b = n.unique_id();
        (a, b)
    });
    let (a, b) = (a.0.expect("ncclGetUniqueId"), a.1.expect("ncclGetUniqueId"));
    assert_eq!(a.len(), 128);
    assert!(a.iter().any(|&x| x != 0), "an all-zero id");
    assert_ne!(a, b, "two ids are the same");
}

/// With no GPU, creating a communicator fails (no CUDA device) with an error naming the call;
/// with one, a communicator of one rank is made and an all-reduce of 3 floats leaves them as
/// they were.
#[test]
fn init_rank_fails_cleanly_without_a_gpu() {
    let Some(lib) = test_lib() else { return };
    let gpu = Path::new("/dev/nvidia0").exists();
    let result = bounded("ncclCommInitRank", move || {
        let n = load(&lib);
        if gpu {
            return on_gpu(&n);
        }
        let id = n.unique_id().map_err(|e| e.to_string())?;
        match n.init_rank(1, &id, 0) {
            Ok(_) => Ok("ncclCommInitRank succeeded".to_string()),
            Err(e) => Err(e.to_string()),
        }
    });
    match (gpu, result) {
        (false, Err(e)) => {
            eprintln!("no GPU: {e}");
            assert!(e.starts_with("ncclCommInitRank failed: "), "{e}");
            assert!(!e.contains('\n'), "{e}");
        }
        (false, Ok(s)) => panic!("{s} on a machine without /dev/nvidia0"),
        (true, Ok(s)) => eprintln!("GPU: {s}"),
        (true, Err(e)) => eprintln!("GPU present but NCCL failed (accepted: the wheel may not suit this GPU or driver): {e}"),
    }
}

/// One rank on device 0: all-reduce `[1, 2, 3]` in place on a stream, and read it back.
fn on_gpu(n: &Nccl) -> Result<String, String> {
    use cudarc::driver::{result as drv, CudaContext};
    let s = |e: cudarc::driver::DriverError| e.to_string();
    let ctx = CudaContext::new(0).map_err(s)?;
    ctx.bind_to_thread().map_err(s)?;
    let stream = ctx.new_stream().map_err(s)?;
    let id = n.unique_id().map_err(|e| e.to_string())?;
    let mut comm = n.init_rank(1, &id, 0).map_err(|e| e.to_string())?;
    let host = [1.0f32, 2.0, 3.0];
    let mut back = [0.0f32; 3];
    unsafe {
        let p = drv::malloc_sync(std::mem::size_of_val(&host)).map_err(s)?;
        drv::memcpy_htod_async(p, &host[..], stream.cu_stream()).map_err(s)?;
        comm.group_start().map_err(|e| e.to_string())?;
        comm.allreduce_sum_f32(p, host.len(), stream.cu_stream() as usize).map_err(|e| e.to_string())?;
        comm.group_end().map_err(|e| e.to_string())?;
        drv::memcpy_dtoh_async(&mut back[..], p, stream.cu_stream()).map_err(s)?;
        stream.synchronize().map_err(s)?;
        drv::free_sync(p).map_err(s)?;
    }
    comm.async_error().map_err(|e| e.to_string())?;
    assert_eq!(back, host, "the sum over one rank is the input");
    comm.abort();
    assert!(comm.async_error().is_err(), "an aborted communicator is not usable");
    Ok(format!("NCCL {} all-reduce over one rank correct", n.version()))
}

/// Without `$WGPT_NCCL_LIB`, the same file is found through `$NCCL_HOME` (pip's
/// `nvidia/nccl` has the `lib/` layout) and through `$LD_LIBRARY_PATH`.
#[test]
fn found_by_nccl_home_and_ld_library_path() {
    let Some(lib) = test_lib() else { return };
    let real = std::fs::canonicalize(&lib).unwrap();
    let dir = real.parent().unwrap();
    for (k, v) in [("NCCL_HOME", dir.parent().unwrap()), ("LD_LIBRARY_PATH", dir)] {
        let env = HashMap::from([(k.to_string(), v.display().to_string())]);
        let n = Nccl::load(&env).unwrap_or_else(|e| panic!("{k}={}: {e}", v.display()));
        assert_eq!(Path::new(n.path()), real, "found through {k}");
    }
}

/// `wgpt nccl-selftest` as rank `rank` of 2 (explicit `WGPT_RANK`, no MPI), with `args`.
fn selftest(rank: usize, lib: &str, port: &str, args: &[&str]) -> std::process::Child {
    std::process::Command::new(env!("CARGO_BIN_EXE_wgpt"))
        .arg("nccl-selftest")
        .args(args)
        .args(["--dist-timeout", "30"])
        .env("WGPT_RANK", rank.to_string())
        .env("WGPT_WORLD_SIZE", "2")
        .env("WGPT_NCCL_LIB", lib)
        .env("MASTER_ADDR", "127.0.0.1")
        .env("MASTER_PORT", port)
        .env("WGPT_RUN_ID", format!("selftest-{}", std::process::id()))
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("running wgpt nccl-selftest")
}

/// Two processes with no MPI: rank 0's real NCCL unique id reaches rank 1 through a shared
/// directory (`--dist-init fs:DIR`) and through rank 0's TCP port (`--dist-init tcp`, from
/// MASTER_ADDR/MASTER_PORT), whichever rank starts first; both print the same id hash.
#[test]
fn rank0_nccl_id_reaches_every_process_through_fs_and_tcp() {
    let Some(lib) = test_lib() else { return };
    let dir = tempfile::tempdir().unwrap();
    let fs = format!("fs:{}", dir.path().display());
    for (init, rank1_first) in [(fs.as_str(), true), (fs.as_str(), false), ("tcp", true), ("tcp", false)] {
        let port = std::net::TcpListener::bind(("127.0.0.1", 0)).unwrap().local_addr().unwrap().port().to_string();
        let order: [usize; 2] = if rank1_first { [1, 0] } else { [0, 1] };
        let mut children = Vec::new();
        for r in order {
            children.push((r, selftest(r, &lib, &port, &["--dist-init", init])));
            std::thread::sleep(Duration::from_millis(300));
        }
        let mut hashes = Vec::new();
        for (r, c) in children {
            let o = c.wait_with_output().unwrap();
            let out = String::from_utf8_lossy(&o.stdout);
            assert!(o.status.success(), "{init}: rank {r}: {out}{}", String::from_utf8_lossy(&o.stderr));
            assert!(out.starts_with(&format!("rank {r} of 2: NCCL ")), "{out}");
            let h = out.split("id fnv1a=").nth(1).and_then(|s| s.split_whitespace().next()).expect("a hash").to_string();
            hashes.push(h);
        }
        assert_eq!(hashes[0], hashes[1], "{init}: the ranks hold different ids");
        eprintln!("--dist-init {init} (rank {} first): both ranks hold id {}", order[0], hashes[0]);
    }
    // rank 0's file is left for the ranks to read (the self-test makes no communicator)
    assert!(std::fs::read_dir(dir.path()).unwrap().count() == 1);
}

/// A world joined by NCCL alone (`NcclWorld`): every collective of `Comm` on known values, on a
/// machine with a GPU (one rank, through `fs`). Elsewhere: skipped, visibly.
#[test]
fn nccl_world_collectives_on_a_gpu() {
    let Some(lib) = test_lib() else { return };
    if !Path::new("/dev/nvidia0").exists() {
        // straight to stderr: libtest's capture would hide it
        use std::io::Write;
        let _ = writeln!(std::io::stderr().lock(), "skipped: no CUDA device (the collectives of a world NCCL joins alone)");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let o = std::process::Command::new(env!("CARGO_BIN_EXE_wgpt"))
        .args(["nccl-selftest", "--join", "--dist-timeout", "60", "--dist-init", &format!("fs:{}", dir.path().display())])
        .env("WGPT_NCCL_LIB", &lib)
        .output()
        .unwrap();
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(o.status.success() && out.starts_with("ok rank 0 of 1"), "{out}{}", String::from_utf8_lossy(&o.stderr));
    eprintln!("{out}");
}
