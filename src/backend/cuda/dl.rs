//! Finding and loading NVIDIA's shared libraries (libcuda, libnvrtc, libcublas) at run time.
//!
//! cudarc loads its libraries lazily *by name* and panics when one is missing, so nothing here
//! touches a cudarc function before the library it lives in has been found. Where a library is
//! not on the loader path (a `pip install nvidia-cuda-nvrtc-cu12`, a toolkit in `$CUDA_HOME`), it
//! is opened here by absolute path with RTLD_GLOBAL; the dynamic loader then hands that same
//! object to cudarc's later by-name `dlopen`, because it matches the library's SONAME. Every
//! library is also checked for the symbols this backend uses, so an old driver gives an error
//! instead of a panic deep inside cudarc.
//!
//! NVRTC is different: it is called directly (`nvrtc.rs`), so any `libnvrtc.so.*` will do, and
//! where several are installed the newest one the driver can run code from is chosen (a CUDA 11
//! driver cannot load CUBINs from NVRTC 12).

/// Why a CUDA library call failed: a library (driver, NVRTC, cuBLAS, the headers) that cannot be
/// loaded or probed (dlopen's or our own one-line reason), or NVRTC's compile log. The backend
/// turns it into `Error::Unavailable` (with what to install) or `Error::Backend`.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{msg}")]
pub struct CudaError {
    pub msg: String,
    /// the library is absent (as opposed to present but unusable)
    pub not_found: bool,
}

impl CudaError {
    pub fn not_found(msg: impl Into<String>) -> Self {
        CudaError { msg: msg.into(), not_found: true }
    }
}

impl From<String> for CudaError {
    fn from(msg: String) -> Self {
        CudaError { msg, not_found: false }
    }
}

impl From<&str> for CudaError {
    fn from(s: &str) -> Self {
        s.to_string().into()
    }
}

impl From<CudaError> for crate::error::Error {
    fn from(e: CudaError) -> Self {
        crate::error::Error::Unavailable(e.msg)
    }
}

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

pub use crate::dl::Lib;

/// One of the libraries the backend needs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Which {
    Driver,
    Nvrtc,
    CublasLt,
    Cublas,
}

impl Which {
    /// The base name cudarc uses (`get_lib_name_candidates`).
    fn base(self) -> &'static str {
        match self {
            Which::Driver => "cuda",
            Which::Nvrtc => "nvrtc",
            Which::CublasLt => "cublasLt",
            Which::Cublas => "cublas",
        }
    }
    /// File names to look for in candidate directories, most wanted first.
    fn files(self) -> &'static [&'static str] {
        match self {
            Which::Driver => &["libcuda.so.1", "libcuda.so"],
            Which::Nvrtc => &["libnvrtc.so.12", "libnvrtc.so.11.2", "libnvrtc.so.13", "libnvrtc.so"],
            Which::CublasLt => &["libcublasLt.so.12", "libcublasLt.so.11", "libcublasLt.so"],
            Which::Cublas => &["libcublas.so.12", "libcublas.so.11", "libcublas.so"],
        }
    }
    /// The pip package directory under `site-packages/nvidia/`.
    fn pip_dir(self) -> Option<&'static str> {
        match self {
            Which::Driver => None,
            Which::Nvrtc => Some("cuda_nvrtc"),
            Which::CublasLt | Which::Cublas => Some("cublas"),
        }
    }
    /// Symbols this backend (through cudarc) calls; all must exist.
    fn symbols(self) -> &'static [&'static str] {
        match self {
            Which::Driver => &[
                "cuInit", "cuDriverGetVersion", "cuDeviceGetCount", "cuDeviceGet", "cuDeviceGetName",
                "cuDeviceGetAttribute", "cuDeviceTotalMem_v2", "cuDevicePrimaryCtxRetain",
                "cuDevicePrimaryCtxRelease_v2", "cuCtxGetCurrent", "cuCtxSetCurrent", "cuCtxSynchronize",
                "cuStreamCreate", "cuStreamDestroy_v2", "cuStreamSynchronize", "cuMemAlloc_v2", "cuMemFree_v2",
                "cuMemGetInfo_v2", "cuMemsetD8Async", "cuMemcpyHtoDAsync_v2", "cuMemcpyDtoHAsync_v2",
                "cuModuleLoadData", "cuModuleUnload", "cuModuleGetFunction", "cuFuncSetAttribute",
                "cuLaunchKernel", "cuGetErrorString", "cuGetErrorName",
            ],
            Which::Nvrtc => super::nvrtc::SYMBOLS,
            Which::CublasLt => &["cublasLtCreate"],
            Which::Cublas => &[
                "cublasCreate_v2", "cublasDestroy_v2", "cublasSetStream_v2", "cublasSgemm_v2", "cublasGemmEx", "cublasSetMathMode",
            ],
        }
    }
}

/// The loaded library, found once per process.
pub fn lib(which: Which) -> Result<&'static Lib, CudaError> {
    static DRIVER: OnceLock<Result<Lib, CudaError>> = OnceLock::new();
    static NVRTC: OnceLock<Result<Lib, CudaError>> = OnceLock::new();
    static CUBLASLT: OnceLock<Result<Lib, CudaError>> = OnceLock::new();
    static CUBLAS: OnceLock<Result<Lib, CudaError>> = OnceLock::new();
    let cell = match which {
        Which::Driver => &DRIVER,
        Which::Nvrtc => &NVRTC,
        Which::CublasLt => &CUBLASLT,
        Which::Cublas => &CUBLAS,
    };
    cell.get_or_init(|| find(which)).as_ref().map_err(|e| e.clone())
}

/// Can cudarc load this library by one of its names now? (what `is_culib_present` checks)
fn by_name(which: Which) -> Option<Lib> {
    for name in cudarc::get_lib_name_candidates(which.base()) {
        if let Ok(l) = Lib::open(&name) {
            return Some(l);
        }
    }
    None
}

#[cfg(target_os = "linux")]
fn find(which: Which) -> Result<Lib, CudaError> {
    let check = |l: Lib| -> Result<Lib, CudaError> {
        let l = l.resolve_path(which.symbols()[0]);
        let missing: Vec<&str> = which.symbols().iter().copied().filter(|s| !l.has(s)).collect();
        if missing.is_empty() {
            Ok(l)
        } else {
            Err(format!("{} lacks {} (too old?)", l.path, missing.join(", ")).into())
        }
    };
    if which == Which::Nvrtc {
        return find_nvrtc(&check);
    }
    if which == Which::Cublas {
        // libcublas needs libcublasLt; preload it from wherever it is.
        lib(Which::CublasLt).map_err(|e| format!("libcublas needs libcublasLt: {e}"))?;
    }
    if let Some(l) = by_name(which) {
        return check(l);
    }
    let mut tried = Vec::new();
    let mut last_err = None;
    for dir in search_dirs(which) {
        for f in which.files() {
            let p = dir.join(f);
            if !p.is_file() {
                continue;
            }
            tried.push(p.display().to_string());
            match Lib::open(&p.display().to_string()) {
                Ok(_) => {
                    if let Some(l) = by_name(which) {
                        return check(l);
                    }
                    last_err = Some(format!("{} loads but its SONAME is not one cudarc looks for", p.display()));
                }
                Err(e) => last_err = Some(e),
            }
        }
    }
    let what = match which {
        Which::Driver => "no CUDA driver found (libcuda.so)".to_string(),
        _ => format!("lib{}.so not found", which.base()),
    };
    let not_found = last_err.is_none();
    let msg = match last_err {
        Some(e) => format!("{what}: {e}"),
        None if which == Which::Driver => what,
        None => format!(
            "{what} (searched the loader path, $CUDA_HOME, $CUDA_PATH, /usr/local/cuda and Python site-packages{})",
            match which {
                Which::Nvrtc => "; pip install nvidia-cuda-nvrtc-cu12, or -cu11 for a CUDA 11 driver",
                _ => "; pip install nvidia-cublas-cu12",
            }
        ),
    };
    Err(CudaError { msg, not_found })
}

#[cfg(not(target_os = "linux"))]
fn find(which: Which) -> Result<Lib, CudaError> {
    let present = unsafe {
        match which {
            Which::Driver => cudarc::driver::sys::is_culib_present(),
            Which::Nvrtc => cudarc::nvrtc::sys::is_culib_present(),
            Which::CublasLt => cudarc::cublaslt::sys::is_culib_present(),
            Which::Cublas => cudarc::cublas::sys::is_culib_present(),
        }
    };
    if present {
        Ok(Lib::named(which.base()))
    } else if which == Which::Driver {
        Err(CudaError::not_found("no CUDA driver found (nvcuda)"))
    } else {
        Err(CudaError::not_found(format!("{} not found on the library path", which.base())))
    }
}

/// The CUDA major version of a `libnvrtc.so.<major>[.<minor>...]` file, from its real name.
fn nvrtc_file_major(p: &Path) -> Option<i32> {
    let real = std::fs::canonicalize(p).unwrap_or_else(|_| p.to_path_buf());
    let name = real.file_name()?.to_str()?.to_string();
    name.strip_prefix("libnvrtc.so.")?.split('.').next()?.parse().ok()
}

/// NVRTC: `$WGPT_NVRTC` if set; otherwise every libnvrtc on the loader path, in the toolkit
/// roots and in Python's `nvidia/cuda_nvrtc`, preferring (in that order) the first whose CUDA
/// major version the driver can run, when the driver is present.
#[cfg(target_os = "linux")]
fn find_nvrtc(check: &dyn Fn(Lib) -> Result<Lib, CudaError>) -> Result<Lib, CudaError> {
    if let Some(p) = std::env::var_os("WGPT_NVRTC").filter(|p| !p.is_empty()) {
        let p = PathBuf::from(p).display().to_string();
        let l = Lib::open_local(&p).map_err(|e| format!("$WGPT_NVRTC: {e}"))?;
        return check(l).map_err(|e| format!("$WGPT_NVRTC: {e}").into());
    }
    let mut cands: Vec<PathBuf> = Vec::new();
    // the loader path first: $LD_LIBRARY_PATH (environment modules), then ld.so's cache
    if let Some(lp) = std::env::var_os("LD_LIBRARY_PATH") {
        for d in std::env::split_paths(&lp) {
            for f in Which::Nvrtc.files() {
                if d.join(f).is_file() {
                    cands.push(d.join(f));
                }
            }
        }
    }
    for f in Which::Nvrtc.files() {
        if let Ok(l) = Lib::open_local(f) {
            let l = l.resolve_path("nvrtcVersion");
            cands.push(PathBuf::from(&l.path));
        }
    }
    for dir in search_dirs(Which::Nvrtc) {
        for f in Which::Nvrtc.files() {
            if dir.join(f).is_file() {
                cands.push(dir.join(f));
            }
        }
    }
    let mut seen = Vec::new();
    cands.retain(|p| {
        let c = std::fs::canonicalize(p).unwrap_or_else(|_| p.clone());
        let new = !seen.contains(&c);
        seen.push(c);
        new
    });
    // the driver's CUDA version, when there is a driver (no cuInit needed to ask)
    let driver_major = lib(Which::Driver).ok().and_then(|_| {
        let mut v = 0i32;
        let r = unsafe { cudarc::driver::sys::cuDriverGetVersion(&mut v) };
        (r == cudarc::driver::sys::CUresult::CUDA_SUCCESS && v > 0).then_some(v / 1000)
    });
    if let Some(dm) = driver_major {
        // stable: keeps the search order within each group
        cands.sort_by_key(|p| nvrtc_file_major(p).map(|m| m > dm).unwrap_or(false));
    }
    let mut errs = Vec::new();
    for p in &cands {
        match Lib::open_local(&p.display().to_string()).map_err(CudaError::from).and_then(check) {
            Ok(l) => return Ok(l),
            Err(e) => errs.push(e.msg),
        }
    }
    if errs.is_empty() {
        return Err(CudaError::not_found("libnvrtc.so not found (searched $LD_LIBRARY_PATH, the loader's cache, $CUDA_HOME, $CUDA_PATH, /usr/local/cuda* and Python site-packages; pip install nvidia-cuda-nvrtc-cu12, or -cu11 for a CUDA 11 driver, or set $WGPT_NVRTC)"));
    }
    Err(format!("no usable NVRTC (11.2 or newer): {}", errs.join("; ")).into())
}

#[cfg(not(target_os = "linux"))]
#[allow(dead_code)]
fn find_nvrtc(_check: &dyn Fn(Lib) -> Result<Lib, CudaError>) -> Result<Lib, CudaError> {
    Err("NVRTC discovery is only implemented on Linux".into())
}

/// Toolkit roots from the environment, then the usual places.
fn toolkit_roots() -> Vec<PathBuf> {
    let mut v = Vec::new();
    for var in ["CUDA_HOME", "CUDA_PATH", "CUDA_ROOT", "CUDA_TOOLKIT_ROOT_DIR"] {
        if let Some(p) = std::env::var_os(var).filter(|p| !p.is_empty()) {
            v.push(PathBuf::from(p));
        }
    }
    v.push(PathBuf::from("/usr/local/cuda"));
    let mut versioned: Vec<PathBuf> = glob_paths("/usr/local/cuda-1[1-9]*");
    versioned.sort();
    versioned.reverse();
    v.extend(versioned);
    v.push(PathBuf::from("/opt/cuda"));
    v
}

fn glob_paths(pattern: &str) -> Vec<PathBuf> {
    glob::glob(pattern).map(|g| g.filter_map(|p| p.ok()).collect()).unwrap_or_default()
}

/// Directories that may hold the library, in order.
fn search_dirs(which: Which) -> Vec<PathBuf> {
    let mut v = Vec::new();
    if which == Which::Driver {
        for d in ["/usr/lib/wsl/lib", "/usr/local/nvidia/lib64", "/usr/lib64/nvidia", "/usr/lib/x86_64-linux-gnu", "/usr/lib64"] {
            v.push(PathBuf::from(d));
        }
        return v;
    }
    for root in toolkit_roots() {
        for sub in ["lib64", "lib", "targets/x86_64-linux/lib", "targets/sbsa-linux/lib"] {
            v.push(root.join(sub));
        }
    }
    if let Some(pkg) = which.pip_dir() {
        for sp in site_packages() {
            v.push(sp.join("nvidia").join(pkg).join("lib"));
        }
    }
    dedup(v)
}

fn dedup(v: Vec<PathBuf>) -> Vec<PathBuf> {
    let mut out: Vec<PathBuf> = Vec::new();
    for p in v {
        if !out.contains(&p) {
            out.push(p);
        }
    }
    out
}

/// Python package directories: virtualenv/conda/user/system ones, then whatever `python3` reports.
pub fn site_packages() -> &'static [PathBuf] {
    static SP: OnceLock<Vec<PathBuf>> = OnceLock::new();
    SP.get_or_init(|| {
        let mut v = Vec::new();
        let mut prefixes = Vec::new();
        for var in ["VIRTUAL_ENV", "CONDA_PREFIX"] {
            if let Some(p) = std::env::var_os(var).filter(|p| !p.is_empty()) {
                prefixes.push(PathBuf::from(p));
            }
        }
        if let Some(h) = std::env::var_os("HOME") {
            prefixes.push(PathBuf::from(h).join(".local"));
        }
        prefixes.push(PathBuf::from("/usr/local"));
        prefixes.push(PathBuf::from("/usr"));
        for p in prefixes {
            for kind in ["site-packages", "dist-packages"] {
                let pat = format!("{}/lib/python3*/{kind}", p.display());
                v.extend(glob_paths(&pat));
            }
        }
        v.push(PathBuf::from("/usr/lib/python3/dist-packages"));
        // the interpreter knows best (pyenv, custom prefixes); a missing python3 is fine
        for exe in ["python3", "python"] {
            if let Ok(out) = std::process::Command::new(exe)
                .args(["-c", "import sys\nfor p in sys.path:\n    print(p)"])
                .stdin(std::process::Stdio::null())
                .stderr(std::process::Stdio::null())
                .output()
            {
                if out.status.success() {
                    for line in String::from_utf8_lossy(&out.stdout).lines() {
                        if !line.trim().is_empty() {
                            v.push(PathBuf::from(line.trim()));
                        }
                    }
                    break;
                }
            }
        }
        dedup(v.into_iter().filter(|p| p.is_dir()).collect())
    })
}

/// Directory holding NVIDIA's CUDA headers (`cuda_fp16.h`): `$WGPT_CUDA_INCLUDE`, the toolkit
/// roots, pip's `nvidia-cuda-runtime-cu12`, or next to the NVRTC found.
pub fn include_dir() -> Result<PathBuf, CudaError> {
    static INC: OnceLock<Result<PathBuf, CudaError>> = OnceLock::new();
    INC.get_or_init(|| {
        let has = |d: &Path| d.join("cuda_fp16.h").is_file();
        if let Some(p) = std::env::var_os("WGPT_CUDA_INCLUDE").filter(|p| !p.is_empty()) {
            let p = PathBuf::from(p);
            return if has(&p) { Ok(p) } else { Err(format!("$WGPT_CUDA_INCLUDE: no cuda_fp16.h in {}", p.display()).into()) };
        }
        let mut cands = Vec::new();
        for root in toolkit_roots() {
            cands.push(root.join("include"));
            cands.push(root.join("targets/x86_64-linux/include"));
        }
        for sp in site_packages() {
            cands.push(sp.join("nvidia/cuda_runtime/include"));
        }
        if let Ok(l) = lib(Which::Nvrtc) {
            if let Some(libdir) = Path::new(&l.path).parent() {
                cands.push(libdir.join("../include"));
                cands.push(libdir.join("../../cuda_runtime/include"));
            }
        }
        for c in dedup(cands) {
            if has(&c) {
                return Ok(std::fs::canonicalize(&c).unwrap_or(c));
            }
        }
        Err("CUDA headers (cuda_fp16.h) not found; set $WGPT_CUDA_INCLUDE or pip install nvidia-cuda-runtime-cu12".into())
    })
    .clone()
}
