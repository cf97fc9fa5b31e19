//! Where wgpt writes its caches (issue 13, item 2): under `$WGPT_CACHE_DIR`, else the platform's
//! cache directory; a cache that cannot be written is one warning, never a failure.
//!
//! The checks that need the process environment run in child processes (this test binary run
//! again with `WGPT_CACHE_CHILD` set), so no test changes the environment of another.

use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::process::Command;
use wgpt::backend::cuda::compile::{compile_cached, nvrtc_version, Target};
use wgpt::cache::{cache_root_for, Platform};

fn root(platform: Platform, vars: &[(&str, &str)]) -> Option<PathBuf> {
    let vars: Vec<(String, String)> = vars.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
    cache_root_for(platform, &move |k: &str| vars.iter().find(|(n, _)| n == k).map(|(_, v)| OsString::from(v)))
}

#[test]
fn cache_root_follows_each_platform_convention() {
    let p = |s: &str| Some(PathBuf::from(s));
    // $WGPT_CACHE_DIR wins everywhere
    for platform in [Platform::Unix, Platform::MacOs, Platform::Windows] {
        assert_eq!(root(platform, &[("WGPT_CACHE_DIR", "/scratch/c"), ("HOME", "/home/u"), ("LOCALAPPDATA", "C:\\L")]), p("/scratch/c"));
    }
    // Linux/Unix: XDG, then ~/.cache; a relative XDG_CACHE_HOME is ignored (XDG spec), empty is unset
    assert_eq!(root(Platform::Unix, &[("XDG_CACHE_HOME", "/xdg"), ("HOME", "/home/u")]), p("/xdg/wgpt"));
    assert_eq!(root(Platform::Unix, &[("XDG_CACHE_HOME", "rel"), ("HOME", "/home/u")]), p("/home/u/.cache/wgpt"));
    assert_eq!(root(Platform::Unix, &[("WGPT_CACHE_DIR", ""), ("HOME", "/home/u")]), p("/home/u/.cache/wgpt"));
    assert_eq!(root(Platform::Unix, &[]), None);
    // macOS: ~/Library/Caches (XDG is not macOS's convention)
    assert_eq!(root(Platform::MacOs, &[("XDG_CACHE_HOME", "/xdg"), ("HOME", "/Users/u")]), p("/Users/u/Library/Caches/wgpt"));
    // Windows: %LOCALAPPDATA%, else %USERPROFILE%\AppData\Local
    let win = root(Platform::Windows, &[("LOCALAPPDATA", "C:/Users/u/AppData/Local"), ("HOME", "/home/u")]).unwrap();
    assert_eq!(win, Path::new("C:/Users/u/AppData/Local").join("wgpt").join("cache"));
    let win = root(Platform::Windows, &[("USERPROFILE", "C:/Users/u")]).unwrap();
    assert_eq!(win, Path::new("C:/Users/u").join("AppData").join("Local").join("wgpt").join("cache"));
    // this build's platform
    assert_eq!(Platform::current(), if cfg!(target_os = "macos") { Platform::MacOs } else if cfg!(windows) { Platform::Windows } else { Platform::Unix });
}

const WARNING: &str = "warning: cannot write the cache";

/// Runs this binary's `child_uses_the_cache` with `WGPT_CACHE_DIR=dir`; returns its stderr.
fn run_child(dir: &Path, expect_writable: bool) -> String {
    let o = Command::new(std::env::current_exe().unwrap())
        .args(["child_uses_the_cache", "--exact", "--nocapture", "--test-threads=1"])
        .env("WGPT_CACHE_CHILD", if expect_writable { "writable" } else { "unwritable" })
        .env("WGPT_CACHE_DIR", dir)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&o.stderr).into_owned();
    assert!(o.status.success(), "WGPT_CACHE_DIR={}: the child failed:\n{err}\n{}", dir.display(), String::from_utf8_lossy(&o.stdout));
    assert!(err.contains("child: done"), "the child did not run:\n{err}");
    err
}

/// The child's side: the cache functions, and the CUDA kernel cache when NVRTC is here.
#[test]
fn child_uses_the_cache() {
    let Ok(mode) = std::env::var("WGPT_CACHE_CHILD") else { return };
    let writable = mode == "writable";
    let base = PathBuf::from(std::env::var_os("WGPT_CACHE_DIR").unwrap());
    let dir = wgpt::cache::cache_dir("test");
    assert_eq!(dir.is_some(), writable, "cache_dir under {}: {dir:?}", base.display());
    let file = base.join("test").join("entry.bin");
    for _ in 0..2 {
        assert_eq!(wgpt::cache::store(&file, b"cached bytes"), writable);
    }
    if writable {
        assert_eq!(std::fs::read(&file).unwrap(), b"cached bytes");
    }
    if nvrtc_version().is_ok() {
        let src = wgpt::backend::cuda::SOURCES.iter().find(|(f, _)| *f == "adamw").unwrap().1;
        // compiled afresh, then (when the cache is writable) taken from $WGPT_CACHE_DIR/cuda
        let (first, from) = compile_cached("adamw", src, Target::Cubin(70), wgpt::graph::DType::F32).expect("compiles with an unwritable cache");
        assert!(from.is_none() && !first.is_empty());
        let (second, from) = compile_cached("adamw", src, Target::Cubin(70), wgpt::graph::DType::F32).expect("compiles again");
        assert_eq!(first, second);
        match from {
            Some(p) => {
                assert!(writable, "an unwritable cache gave a file: {}", p.display());
                assert!(p.starts_with(base.join("cuda")), "{} is not under $WGPT_CACHE_DIR/cuda", p.display());
            }
            None => assert!(!writable, "a writable cache was not used"),
        }
        eprintln!("child: nvrtc checked");
    } else {
        eprintln!("child: no NVRTC here, CUDA kernel cache not checked");
    }
    eprintln!("child: done");
}

#[test]
fn unwritable_cache_is_one_warning_not_a_failure() {
    let tmp = tempfile::tempdir().unwrap();

    // a writable $WGPT_CACHE_DIR is used, without a warning
    let ok = tmp.path().join("ok");
    let err = run_child(&ok, true);
    assert!(!err.contains(WARNING), "{err}");
    assert!(ok.join("test").join("entry.bin").is_file());

    // $WGPT_CACHE_DIR is a file, or below one: nothing can be created there (even as root)
    let file = tmp.path().join("a_file");
    std::fs::write(&file, b"not a directory").unwrap();
    let mut cases = vec![file.clone(), file.join("below")];
    // a read-only directory: only meaningful when permissions apply to us (not as root)
    let ro = tmp.path().join("read_only");
    std::fs::create_dir(&ro).unwrap();
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&ro, std::fs::Permissions::from_mode(0o555)).unwrap();
        if std::fs::write(ro.join("probe"), b"").is_err() {
            cases.push(ro.clone());
        } else {
            eprintln!("permissions do not apply to this user (root?): read-only directory case skipped");
        }
    }
    for dir in &cases {
        let err = run_child(dir, false);
        let warnings: Vec<&str> = err.lines().filter(|l| l.contains(WARNING)).collect();
        assert_eq!(warnings.len(), 1, "WGPT_CACHE_DIR={}: expected one warning, got:\n{err}", dir.display());
        assert!(warnings[0].contains(&*dir.to_string_lossy()), "the warning does not name the path: {}", warnings[0]);
        assert!(warnings[0].contains("WGPT_CACHE_DIR"), "the warning does not say what to set: {}", warnings[0]);
        eprintln!("WGPT_CACHE_DIR={}: {}", dir.display(), warnings[0]);
        for l in err.lines().filter(|l| l.starts_with("child: ")) {
            eprintln!("  {l}");
        }
    }
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let _ = std::fs::set_permissions(&ro, std::fs::Permissions::from_mode(0o755));
    }
}
