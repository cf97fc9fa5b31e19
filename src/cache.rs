//! Where wgpt keeps caches (today: the CUDA kernels NVRTC compiled, as CUBIN/PTX files). Every
//! cache goes through [`cache_dir`], so one variable moves them all:
//!
//! | | cache root |
//! |---|---|
//! | `$WGPT_CACHE_DIR` set (any platform) | `$WGPT_CACHE_DIR` |
//! | Linux and other Unix | `$XDG_CACHE_HOME/wgpt` (if absolute), else `~/.cache/wgpt` |
//! | macOS | `~/Library/Caches/wgpt` |
//! | Windows | `%LOCALAPPDATA%\wgpt\cache` |
//!
//! and each cache takes a folder of its own below the root (`cuda/`). A cache is only ever a
//! saving: when the folder cannot be created or a file cannot be written, wgpt prints one warning
//! (once per process) and carries on without it.

use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};

/// The platform conventions [`cache_root_for`] knows.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Platform {
    /// Linux and other Unix: the XDG base directories.
    Unix,
    MacOs,
    Windows,
}

impl Platform {
    /// The platform this binary was built for.
    pub fn current() -> Platform {
        if cfg!(target_os = "macos") {
            Platform::MacOs
        } else if cfg!(windows) {
            Platform::Windows
        } else {
            Platform::Unix
        }
    }
}

/// The cache root for `platform`, reading variables through `env` (unset and empty are alike).
/// `None` when no variable says where the home is.
pub fn cache_root_for(platform: Platform, env: &dyn Fn(&str) -> Option<OsString>) -> Option<PathBuf> {
    let var = |k: &str| env(k).filter(|v| !v.is_empty()).map(PathBuf::from);
    if let Some(d) = var("WGPT_CACHE_DIR") {
        return Some(d);
    }
    match platform {
        Platform::Unix => {
            // XDG: a relative $XDG_CACHE_HOME is invalid and ignored
            if let Some(d) = var("XDG_CACHE_HOME").filter(|d| d.is_absolute()) {
                return Some(d.join("wgpt"));
            }
            var("HOME").map(|h| h.join(".cache").join("wgpt"))
        }
        Platform::MacOs => var("HOME").map(|h| h.join("Library").join("Caches").join("wgpt")),
        Platform::Windows => var("LOCALAPPDATA")
            .or_else(|| var("USERPROFILE").map(|h| h.join("AppData").join("Local")))
            .map(|d| d.join("wgpt").join("cache")),
    }
}

/// The cache root of this process (see the module's table); not created.
pub fn cache_root() -> Option<PathBuf> {
    cache_root_for(Platform::current(), &|k| std::env::var_os(k))
}

/// The folder of the cache `sub` (e.g. "cuda") below the cache root, created if missing. `None`
/// (after a warning, once per process) when it cannot be created, or when there is no home to
/// put it in: the caller then works without its cache.
pub fn cache_dir(sub: &str) -> Option<PathBuf> {
    let dir = cache_root()?.join(sub);
    match std::fs::create_dir_all(&dir) {
        Ok(()) if dir.is_dir() => Some(dir),
        Ok(()) => {
            warn_unwritable(&dir, &"not a directory");
            None
        }
        Err(e) => {
            warn_unwritable(&dir, &e);
            None
        }
    }
}

/// Write a cache file atomically (temporary name, then rename). A failure is the warning of
/// [`warn_unwritable`], never an error; returns whether the file was written.
pub fn store(path: &Path, bytes: &[u8]) -> bool {
    match crate::atomic::write_atomic(path, bytes) {
        Ok(()) => true,
        Err(crate::error::Error::Io { source, .. }) => {
            warn_unwritable(path, &source);
            false
        }
        Err(e) => {
            eprintln_once(&format!("{e}"));
            false
        }
    }
}

static WARNED: AtomicBool = AtomicBool::new(false);

/// "warning: cannot write the cache (PATH: WHY); continuing without it …", printed on stderr the
/// first time only.
pub fn warn_unwritable(path: &Path, why: &dyn std::fmt::Display) {
    eprintln_once(&format!("{}: {why}", path.display()));
}

fn eprintln_once(what: &str) {
    if !WARNED.swap(true, Ordering::Relaxed) {
        eprintln!("warning: cannot write the cache ({what}); continuing without it (set WGPT_CACHE_DIR to a writable directory)");
    }
}
