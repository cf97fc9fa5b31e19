//! NCCL, loaded at run time with `dlopen` and called through a handful of C entry points looked
//! up once with `dlsym` (no NCCL is needed to build wgpt), the same way `backend::cuda::nvrtc`
//! calls NVRTC.
//!
//! cudarc's NCCL loader is not used: it only tries names like `libnccl.so`, never `libnccl.so.2`,
//! which is NCCL's soname and the only file that pip's `nvidia-nccl-cu*` wheels and Debian's
//! `libnccl2` ship; since glibc matches a by-name `dlopen` against sonames, preloading the real
//! file does not help either. Here the file is found by `candidates` and opened by path.
//!
//! Every entry point is resolved when the library is loaded, so a library that lacks one (an NCCL
//! too old for wgpt) is refused then, with one line, rather than failing later.
//!
//! The C declarations below are wgpt's own, written from NVIDIA's API documentation
//! (docs.nvidia.com/deeplearning/nccl/user-guide/docs/api/{comms,colls,group,types}.html); only
//! the few used are declared. The constants, checked against that documentation and against the
//! `nccl.h` of the `nvidia-nccl-cu11==2.13.4` wheel:
//! - `ncclSuccess = 0` (ncclResult_t; types.html, nccl.h 2.13.4);
//! - `ncclInProgress = 7` (types.html: only nonblocking communicators, made with
//!   ncclCommInitRankConfig, return it; 2.13.4's nccl.h has no such value, 7 is its
//!   `ncclNumResults`). wgpt makes blocking communicators only, so it is never expected;
//! - `ncclUint8 = 1`, `ncclFloat32 = 7`, `ncclFloat64 = 8` (ncclDataType_t; nccl.h 2.13.4);
//! - `ncclSum = 0`, `ncclMax = 2` (ncclRedOp_t; nccl.h 2.13.4);
//! - `NCCL_UNIQUE_ID_BYTES = 128` (nccl.h 2.13.4; ncclUniqueId is a struct of that many chars,
//!   passed by value to ncclCommInitRank);
//! - the version code: `NCCL_VERSION(X,Y,Z)` is `X*1000 + Y*100 + Z` up to 2.8 and
//!   `X*10000 + Y*100 + Z` from 2.9 (nccl.h 2.13.4, whose own code is 21304).
//!
//! C enums are `int`-sized here (every value fits an `int`).

use crate::dl::Lib;
use crate::error::{Error, Result};
use std::collections::HashMap;
use std::ffi::{c_char, c_int, c_void, CStr};
use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// NCCL's soname, the file looked for.
pub const SONAME: &str = "libnccl.so.2";

/// The 128 bytes of a `ncclUniqueId` (`NCCL_UNIQUE_ID_BYTES`).
pub const UNIQUE_ID_BYTES: usize = 128;

const NCCL_SUCCESS: c_int = 0;
/// Newer NCCLs only, and only from nonblocking communicators (see the module comment).
const NCCL_IN_PROGRESS: c_int = 7;
const NCCL_SUM: c_int = 0;
const NCCL_MAX: c_int = 2;

/// The element types wgpt moves through NCCL (every one exists since NCCL 2.0; bf16 is never
/// used, so NCCL 2.9 works).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum NcclType {
    U8,
    F32,
    F64,
}

impl NcclType {
    fn code(self) -> c_int {
        match self {
            NcclType::U8 => 1,
            NcclType::F32 => 7,
            NcclType::F64 => 8,
        }
    }
    pub fn size(self) -> usize {
        match self {
            NcclType::U8 => 1,
            NcclType::F32 => 4,
            NcclType::F64 => 8,
        }
    }
}

/// The reductions used: sums (gradients, losses) and maxima (timeouts, flags).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum NcclOp {
    Sum,
    Max,
}

impl NcclOp {
    fn code(self) -> c_int {
        match self {
            NcclOp::Sum => NCCL_SUM,
            NcclOp::Max => NCCL_MAX,
        }
    }
}

/// NCCL's version, decoded from `ncclGetVersion`'s code.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct NcclVersion {
    pub major: u32,
    pub minor: u32,
    pub patch: u32,
}

impl NcclVersion {
    /// `v >= 10000 ? (v/10000, v/100%100, v%100) : (v/1000, v/100%10, v%100)`:
    /// 2.9.9 is 20909, 2.13.4 is 21304, 2.7.8 is 2708.
    pub fn from_code(code: i32) -> NcclVersion {
        let v = code.max(0) as u32;
        if v >= 10000 {
            NcclVersion { major: v / 10000, minor: v / 100 % 100, patch: v % 100 }
        } else {
            NcclVersion { major: v / 1000, minor: v / 100 % 10, patch: v % 100 }
        }
    }

    /// `ncclAvg` and `ncclBfloat16` exist from 2.10 (NCCL 2.10.3 release notes). wgpt never uses
    /// Avg: gradients are seeded with 1/N and summed.
    pub fn has_avg_and_bf16(&self) -> bool {
        *self >= NcclVersion { major: 2, minor: 10, patch: 0 }
    }
}

impl fmt::Display for NcclVersion {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{}.{}", self.major, self.minor, self.patch)
    }
}

// ---- the library files ----

fn get<'a>(env: &'a HashMap<String, String>, k: &str) -> Option<&'a String> {
    env.get(k).filter(|v| !v.is_empty())
}

/// The `python3*` directories in `lib_dir`, newest Python first (3.12 before 3.9).
fn python_dirs(lib_dir: &Path) -> Vec<PathBuf> {
    let Ok(rd) = std::fs::read_dir(lib_dir) else {
        return Vec::new();
    };
    let mut v: Vec<(u32, PathBuf)> = rd
        .flatten()
        .filter_map(|e| {
            let name = e.file_name().into_string().ok()?;
            let rest = name.strip_prefix("python3")?;
            let minor = if rest.is_empty() { 0 } else { rest.strip_prefix('.')?.parse::<u32>().ok()? };
            Some((minor, e.path()))
        })
        .collect();
    v.sort_by(|a, b| b.0.cmp(&a.0).then_with(|| a.1.cmp(&b.1)));
    v.into_iter().map(|(_, p)| p).collect()
}

/// Python package directories found without running Python: in virtualenv and conda prefixes,
/// the user's `~/.local`, the prefixes of the `$PATH` entries (`bin/..`, pyenv's
/// `shims/../versions/*`), and the system's.
fn site_packages(env: &HashMap<String, String>) -> Vec<PathBuf> {
    let mut prefixes: Vec<PathBuf> = Vec::new();
    for k in ["VIRTUAL_ENV", "CONDA_PREFIX"] {
        if let Some(p) = get(env, k) {
            prefixes.push(PathBuf::from(p));
        }
    }
    if let Some(h) = get(env, "HOME") {
        prefixes.push(Path::new(h).join(".local"));
    }
    if let Some(path) = get(env, "PATH") {
        for d in std::env::split_paths(path).filter(|d| d.is_absolute()) {
            if d.file_name().is_some_and(|n| n == "shims") {
                // pyenv: $PYENV_ROOT/shims is on $PATH, the interpreters are in $PYENV_ROOT/versions/*
                if let Some(root) = d.parent() {
                    if let Ok(rd) = std::fs::read_dir(root.join("versions")) {
                        let mut vs: Vec<PathBuf> = rd.flatten().map(|e| e.path()).collect();
                        vs.sort();
                        prefixes.extend(vs.into_iter().rev());
                    }
                }
            } else if let Some(prefix) = d.parent() {
                prefixes.push(prefix.to_path_buf());
            }
        }
    }
    let mut dirs: Vec<PathBuf> = Vec::new();
    for p in &prefixes {
        for lib in ["lib", "lib64"] {
            for py in python_dirs(&p.join(lib)) {
                dirs.push(py.join("site-packages"));
                dirs.push(py.join("dist-packages"));
            }
        }
    }
    dirs.push(PathBuf::from("/usr/lib/python3/dist-packages"));
    for p in ["/usr/local", "/usr"] {
        for lib in ["lib", "lib64"] {
            for py in python_dirs(&Path::new(p).join(lib)) {
                dirs.push(py.join("dist-packages"));
                dirs.push(py.join("site-packages"));
            }
        }
    }
    dirs
}

/// Where `libnccl.so.2` is looked for, in order:
/// 1. `$WGPT_NCCL_LIB` (a file; when it is set, `Nccl::load` tries it alone);
/// 2. `$NCCL_HOME/lib/libnccl.so.2`, `$NCCL_HOME/lib64/libnccl.so.2`;
/// 3. `libnccl.so.2` in each (absolute) `$LD_LIBRARY_PATH` directory;
/// 4. the soname `libnccl.so.2`, for the loader to find on its path;
/// 5. pip's `nvidia/nccl/lib/libnccl.so.2` in each Python package directory found without
///    running Python (`site_packages`), only those that exist.
///
/// 1–4 follow from `env` alone; 5 reads directories.
pub fn candidates(env: &HashMap<String, String>) -> Vec<PathBuf> {
    let mut out: Vec<PathBuf> = Vec::new();
    if let Some(p) = get(env, "WGPT_NCCL_LIB") {
        out.push(PathBuf::from(p));
    }
    if let Some(h) = get(env, "NCCL_HOME") {
        out.push(Path::new(h).join("lib").join(SONAME));
        out.push(Path::new(h).join("lib64").join(SONAME));
    }
    if let Some(lp) = get(env, "LD_LIBRARY_PATH") {
        out.extend(std::env::split_paths(lp).filter(|d| d.is_absolute()).map(|d| d.join(SONAME)));
    }
    out.push(PathBuf::from(SONAME));
    for sp in site_packages(env) {
        let f = sp.join("nvidia/nccl/lib").join(SONAME);
        if f.is_file() {
            out.push(f);
        }
    }
    let mut seen = std::collections::HashSet::new();
    out.retain(|p| seen.insert(p.clone()));
    out
}

// ---- the entry points ----

type Comm = *mut c_void;
type R = c_int; // ncclResult_t

/// `ncclUniqueId`: 128 chars, passed by value.
#[repr(C)]
#[derive(Clone, Copy)]
struct UniqueId {
    internal: [c_char; UNIQUE_ID_BYTES],
}

type GetVersionFn = unsafe extern "C" fn(*mut c_int) -> R;
type GetUniqueIdFn = unsafe extern "C" fn(*mut UniqueId) -> R;
type CommInitRankFn = unsafe extern "C" fn(*mut Comm, c_int, UniqueId, c_int) -> R;
// sendbuff, recvbuff, count, datatype, op, comm, stream
type AllReduceFn = unsafe extern "C" fn(*const c_void, *mut c_void, usize, c_int, c_int, Comm, *mut c_void) -> R;
// sendbuff, recvbuff, count, datatype, op, root, comm, stream
type ReduceFn = unsafe extern "C" fn(*const c_void, *mut c_void, usize, c_int, c_int, c_int, Comm, *mut c_void) -> R;
// sendbuff, recvbuff, count, datatype, root, comm, stream
type BroadcastFn = unsafe extern "C" fn(*const c_void, *mut c_void, usize, c_int, c_int, Comm, *mut c_void) -> R;
// sendbuff, recvbuff, sendcount, datatype, comm, stream
type AllGatherFn = unsafe extern "C" fn(*const c_void, *mut c_void, usize, c_int, Comm, *mut c_void) -> R;
type VoidFn = unsafe extern "C" fn() -> R;
type CommFn = unsafe extern "C" fn(Comm) -> R;
type AsyncErrorFn = unsafe extern "C" fn(Comm, *mut R) -> R;
type ErrorStringFn = unsafe extern "C" fn(R) -> *const c_char;
type LastErrorFn = unsafe extern "C" fn(Comm) -> *const c_char;

/// The entry points, resolved once when the library is loaded.
struct Api {
    get_version: GetVersionFn,
    get_unique_id: GetUniqueIdFn,
    comm_init_rank: CommInitRankFn,
    all_reduce: AllReduceFn,
    reduce: ReduceFn,
    broadcast: BroadcastFn,
    all_gather: AllGatherFn,
    group_start: VoidFn,
    group_end: VoidFn,
    comm_get_async_error: AsyncErrorFn,
    comm_abort: CommFn,
    comm_destroy: CommFn,
    get_error_string: ErrorStringFn,
    /// `ncclGetLastError` (newer NCCLs only: not required): the detail behind an error
    get_last_error: Option<LastErrorFn>,
}

/// Every symbol `Api` requires.
pub const SYMBOLS: &[&str] = &[
    "ncclGetVersion",
    "ncclGetUniqueId",
    "ncclCommInitRank",
    "ncclAllReduce",
    "ncclReduce",
    "ncclBroadcast",
    "ncclAllGather",
    "ncclGroupStart",
    "ncclGroupEnd",
    "ncclCommGetAsyncError",
    "ncclCommAbort",
    "ncclCommDestroy",
    "ncclGetErrorString",
];

impl Api {
    /// Resolve every entry point in `lib`; Err(the first missing one).
    fn resolve(lib: &Lib) -> std::result::Result<Api, String> {
        macro_rules! f {
            ($name:literal, $ty:ty) => {{
                let p = lib.sym($name).ok_or_else(|| format!("lacks {} (an NCCL too old for wgpt?)", $name))?;
                // SAFETY: the symbol is NCCL's function of that name and $ty is its C signature
                unsafe { std::mem::transmute::<*mut c_void, $ty>(p) }
            }};
        }
        Ok(Api {
            get_version: f!("ncclGetVersion", GetVersionFn),
            get_unique_id: f!("ncclGetUniqueId", GetUniqueIdFn),
            comm_init_rank: f!("ncclCommInitRank", CommInitRankFn),
            all_reduce: f!("ncclAllReduce", AllReduceFn),
            reduce: f!("ncclReduce", ReduceFn),
            broadcast: f!("ncclBroadcast", BroadcastFn),
            all_gather: f!("ncclAllGather", AllGatherFn),
            group_start: f!("ncclGroupStart", VoidFn),
            group_end: f!("ncclGroupEnd", VoidFn),
            comm_get_async_error: f!("ncclCommGetAsyncError", AsyncErrorFn),
            comm_abort: f!("ncclCommAbort", CommFn),
            comm_destroy: f!("ncclCommDestroy", CommFn),
            get_error_string: f!("ncclGetErrorString", ErrorStringFn),
            // SAFETY: as above
            get_last_error: lib.sym("ncclGetLastError").map(|p| unsafe { std::mem::transmute::<*mut c_void, LastErrorFn>(p) }),
        })
    }

    /// ncclGetErrorString's text for `r`.
    fn error_text(&self, r: R) -> String {
        let s = unsafe { (self.get_error_string)(r) };
        if s.is_null() {
            format!("NCCL error {r}")
        } else {
            unsafe { CStr::from_ptr(s) }.to_string_lossy().into_owned()
        }
    }

    /// `call` returned `r`: Ok on ncclSuccess, else Error::Dist naming the call, with
    /// ncclGetErrorString's text and, where the library has it, ncclGetLastError's (on one line).
    fn check(&self, call: &str, r: R) -> Result<()> {
        self.check_on(std::ptr::null_mut(), call, r)
    }

    /// `check` for a call on `comm` (given to ncclGetLastError, which older NCCLs ignore).
    fn check_on(&self, comm: Comm, call: &str, r: R) -> Result<()> {
        if r == NCCL_SUCCESS {
            return Ok(());
        }
        let mut msg = format!("{call} failed: {} (NCCL error {r})", self.error_text(r));
        if let Some(last) = self.get_last_error {
            let s = unsafe { last(comm) };
            if !s.is_null() {
                let detail = unsafe { CStr::from_ptr(s) }.to_string_lossy();
                let detail = detail.split_whitespace().collect::<Vec<_>>().join(" ");
                if !detail.is_empty() {
                    // NCCL's last message, which its documentation warns may concern an earlier call
                    msg += &format!(" (NCCL's last error: {detail})");
                }
            }
        }
        Err(Error::Dist(msg))
    }
}

/// The loaded library.
pub struct Nccl {
    api: Arc<Api>,
    path: String,
    version: NcclVersion,
}

const _: fn() = || {
    fn send_sync<T: Send + Sync>() {}
    fn send<T: Send>() {}
    send_sync::<Nccl>();
    send::<NcclComm>();
};

/// dlopen one candidate and resolve everything; Err(why, on one line, without the path).
fn open(cand: &Path) -> std::result::Result<Nccl, String> {
    let name = cand.display().to_string();
    let one_line = |e: String| {
        let e = e.replace('\n', " ");
        // dlerror's text starts with the file's name, which the caller already gives
        e.strip_prefix(&format!("{name}: ")).map(str::to_string).unwrap_or(e)
    };
    let lib = Lib::open(&name).map_err(one_line)?;
    let api = Api::resolve(&lib)?;
    let mut code: c_int = 0;
    api.check("ncclGetVersion", unsafe { (api.get_version)(&mut code) }).map_err(|e| e.to_string())?;
    let lib = lib.resolve_path("ncclGetVersion");
    Ok(Nccl { api: Arc::new(api), path: lib.path, version: NcclVersion::from_code(code) })
}

/// The one line for "nothing usable found", with why each library found could not be used.
fn not_found(errs: &[String]) -> Error {
    let mut msg =
        format!("no NCCL library ({SONAME}) found in $WGPT_NCCL_LIB, $NCCL_HOME/lib, LD_LIBRARY_PATH, the loader path or pip's nvidia/nccl/lib");
    if !errs.is_empty() {
        msg += &format!(" that wgpt can use ({})", errs.join("; "));
    }
    msg += &format!(": install NCCL (pip install nvidia-nccl-cu12) or set WGPT_NCCL_LIB=/path/to/{SONAME}");
    Error::Unavailable(msg)
}

impl Nccl {
    /// Find (`candidates`) and load the library. With `$WGPT_NCCL_LIB` set, that file alone is
    /// tried, and its failure is the error. Errors are one line.
    pub fn load(env: &HashMap<String, String>) -> Result<Nccl> {
        let cands = candidates(env);
        if let Some(p) = get(env, "WGPT_NCCL_LIB") {
            return open(Path::new(p)).map_err(|e| Error::Unavailable(format!("$WGPT_NCCL_LIB={p}: {e}")));
        }
        let mut errs = Vec::new();
        for c in &cands {
            let by_name = c.as_os_str() == SONAME;
            if !by_name && !c.exists() {
                continue;
            }
            match open(c) {
                Ok(n) => return Ok(n),
                // not on the loader's path: simply absent
                Err(e) if by_name && e.contains("cannot open shared object file") => {}
                Err(e) => errs.push(format!("{}: {e}", c.display())),
            }
        }
        Err(not_found(&errs))
    }

    /// The file the library was loaded from.
    pub fn path(&self) -> &str {
        &self.path
    }

    /// The library's version (ncclGetVersion, called once when loading).
    pub fn version(&self) -> NcclVersion {
        self.version
    }

    /// A new `ncclUniqueId` (ncclGetUniqueId), for rank 0 to send to the others; needs no GPU.
    pub fn unique_id(&self) -> Result<[u8; UNIQUE_ID_BYTES]> {
        let mut id = UniqueId { internal: [0; UNIQUE_ID_BYTES] };
        self.api.check("ncclGetUniqueId", unsafe { (self.api.get_unique_id)(&mut id) })?;
        Ok(id.internal.map(|c| c as u8))
    }

    /// This rank's communicator in a world of `size` (ncclCommInitRank, blocking: it returns once
    /// every rank has joined). The caller has made the right CUDA context current on this thread.
    pub fn init_rank(&self, size: usize, id: &[u8; UNIQUE_ID_BYTES], rank: usize) -> Result<NcclComm> {
        if size == 0 || rank >= size || size > c_int::MAX as usize {
            return Err(Error::Dist(format!("ncclCommInitRank: rank {rank} of {size} is not a rank of the world")));
        }
        let uid = UniqueId { internal: id.map(|b| b as c_char) };
        let mut comm: Comm = std::ptr::null_mut();
        self.api.check("ncclCommInitRank", unsafe { (self.api.comm_init_rank)(&mut comm, size as c_int, uid, rank as c_int) })?;
        if comm.is_null() {
            return Err(Error::Dist("ncclCommInitRank returned no communicator".into()));
        }
        Ok(NcclComm { api: self.api.clone(), comm: comm as usize, live: true })
    }
}

/// One rank's communicator. Dropping it calls ncclCommDestroy, or ncclCommAbort when it has
/// failed (ncclCommGetAsyncError reports an error) or the thread is panicking.
pub struct NcclComm {
    api: Arc<Api>,
    /// the ncclComm_t
    comm: usize,
    /// not yet destroyed or aborted
    live: bool,
}

impl NcclComm {
    fn handle(&self) -> Result<Comm> {
        if self.live {
            Ok(self.comm as Comm)
        } else {
            Err(Error::Dist("NCCL communicator already aborted".into()))
        }
    }

    /// ncclAllReduce in place: the sum over ranks of `count` f32 at device pointer `ptr`
    /// (ncclFloat32, ncclSum), enqueued on `stream` (a CUstream; 0 is the legacy default stream).
    pub fn allreduce_sum_f32(&self, ptr: u64, count: usize, stream: usize) -> Result<()> {
        self.allreduce(ptr, ptr, count, NcclType::F32, NcclOp::Sum, stream)
    }

    /// ncclAllReduce from `send` into `recv` (device pointers; equal is in place) of `count`
    /// elements, enqueued on `stream`.
    pub fn allreduce(&self, send: u64, recv: u64, count: usize, ty: NcclType, op: NcclOp, stream: usize) -> Result<()> {
        let comm = self.handle()?;
        let r = unsafe {
            (self.api.all_reduce)(
                send as usize as *const c_void,
                recv as usize as *mut c_void,
                count,
                ty.code(),
                op.code(),
                comm,
                stream as *mut c_void,
            )
        };
        self.api.check_on(comm, "ncclAllReduce", r)
    }

    /// ncclReduce: the sum over ranks of `count` elements at `send`, into `recv` on `root` only
    /// (ZeRO-1 sums each piece of the gradients onto the rank that owns its optimiser state).
    pub fn reduce_sum(&self, send: u64, recv: u64, count: usize, ty: NcclType, root: usize, stream: usize) -> Result<()> {
        let comm = self.handle()?;
        let r = unsafe {
            (self.api.reduce)(
                send as usize as *const c_void,
                recv as usize as *mut c_void,
                count,
                ty.code(),
                NCCL_SUM,
                root as c_int,
                comm,
                stream as *mut c_void,
            )
        };
        self.api.check_on(comm, "ncclReduce", r)
    }

    /// ncclBroadcast: `count` elements at `root`'s `send` into every rank's `recv`.
    pub fn broadcast(&self, send: u64, recv: u64, count: usize, ty: NcclType, root: usize, stream: usize) -> Result<()> {
        let comm = self.handle()?;
        let r = unsafe {
            (self.api.broadcast)(
                send as usize as *const c_void,
                recv as usize as *mut c_void,
                count,
                ty.code(),
                root as c_int,
                comm,
                stream as *mut c_void,
            )
        };
        self.api.check_on(comm, "ncclBroadcast", r)
    }

    /// ncclAllGather: every rank's `count` elements at `send`, into `recv` (count × ranks), in
    /// rank order.
    pub fn allgather(&self, send: u64, recv: u64, count: usize, ty: NcclType, stream: usize) -> Result<()> {
        let comm = self.handle()?;
        let r = unsafe {
            (self.api.all_gather)(send as usize as *const c_void, recv as usize as *mut c_void, count, ty.code(), comm, stream as *mut c_void)
        };
        self.api.check_on(comm, "ncclAllGather", r)
    }

    /// ncclGroupStart: the calls until `group_end` are launched together.
    pub fn group_start(&self) -> Result<()> {
        self.api.check("ncclGroupStart", unsafe { (self.api.group_start)() })
    }

    /// ncclGroupEnd.
    pub fn group_end(&self) -> Result<()> {
        self.api.check("ncclGroupEnd", unsafe { (self.api.group_end)() })
    }

    /// ncclCommGetAsyncError: Ok while the communicator is healthy, else Error::Dist with the
    /// error's text (a peer died, a network error...).
    pub fn async_error(&self) -> Result<()> {
        let comm = self.handle()?;
        let mut state: R = NCCL_SUCCESS;
        self.api.check_on(comm, "ncclCommGetAsyncError", unsafe { (self.api.comm_get_async_error)(comm, &mut state) })?;
        if state == NCCL_SUCCESS {
            return Ok(());
        }
        let what = if state == NCCL_IN_PROGRESS { " (an operation still in progress)" } else { "" };
        Err(Error::Dist(format!("NCCL communicator failed: {}{what} (ncclCommGetAsyncError: NCCL error {state})", self.api.error_text(state))))
    }

    /// ncclCommAbort: frees the communicator without waiting for its operations (what to do
    /// when a peer failed). Later calls on it fail; dropping it does nothing more.
    pub fn abort(&mut self) {
        if self.live {
            self.live = false;
            unsafe { (self.api.comm_abort)(self.comm as Comm) };
        }
    }
}

// SAFETY: an NCCL communicator may be used from any one thread at a time (NCCL's thread-safety
// rule is one thread per communicator at a time, which `&mut`/no-Sync keeps).
unsafe impl Send for NcclComm {}

impl Drop for NcclComm {
    fn drop(&mut self) {
        if !self.live {
            return;
        }
        if std::thread::panicking() || self.async_error().is_err() {
            self.abort();
        } else {
            self.live = false;
            unsafe { (self.api.comm_destroy)(self.comm as Comm) };
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(pairs: &[(&str, &str)]) -> HashMap<String, String> {
        pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
    }

    fn v(major: u32, minor: u32, patch: u32) -> NcclVersion {
        NcclVersion { major, minor, patch }
    }

    fn tmp(name: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("wgpt-nccl-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    #[test]
    fn version_codes_decode() {
        assert_eq!(NcclVersion::from_code(20909), v(2, 9, 9));
        assert_eq!(NcclVersion::from_code(21304), v(2, 13, 4));
        assert_eq!(NcclVersion::from_code(22105), v(2, 21, 5));
        assert_eq!(NcclVersion::from_code(2708), v(2, 7, 8));
        assert_eq!(NcclVersion::from_code(2406), v(2, 4, 6));
        assert_eq!(NcclVersion::from_code(21304).to_string(), "2.13.4");
        assert_eq!(NcclVersion::from_code(2708).to_string(), "2.7.8");
        assert!(v(2, 9, 9) < v(2, 10, 3) && v(2, 10, 3) < v(2, 13, 4) && v(2, 13, 4) < v(3, 0, 0));
    }

    #[test]
    fn avg_and_bf16_from_2_10() {
        assert!(!v(2, 7, 8).has_avg_and_bf16());
        assert!(!v(2, 9, 9).has_avg_and_bf16());
        assert!(!NcclVersion::from_code(20999).has_avg_and_bf16());
        assert!(v(2, 10, 0).has_avg_and_bf16());
        assert!(v(2, 10, 3).has_avg_and_bf16());
        assert!(NcclVersion::from_code(21304).has_avg_and_bf16());
        assert!(v(3, 0, 0).has_avg_and_bf16());
    }

    /// The candidates up to the soname (the pip ones after it depend on the machine).
    fn up_to_soname(e: &HashMap<String, String>) -> Vec<PathBuf> {
        let c = candidates(e);
        let n = c.iter().position(|p| p.as_os_str() == SONAME).expect("the soname is always a candidate");
        c[..=n].to_vec()
    }

    #[test]
    fn candidates_in_order() {
        let p = PathBuf::from;
        assert_eq!(up_to_soname(&env(&[])), vec![p(SONAME)]);
        let e = env(&[("WGPT_NCCL_LIB", "/opt/x/libnccl.so.2"), ("NCCL_HOME", "/opt/nccl"), ("LD_LIBRARY_PATH", "/a/lib::relative/lib:/b/lib64")]);
        assert_eq!(
            up_to_soname(&e),
            vec![
                p("/opt/x/libnccl.so.2"),
                p("/opt/nccl/lib/libnccl.so.2"),
                p("/opt/nccl/lib64/libnccl.so.2"),
                p("/a/lib/libnccl.so.2"),
                p("/b/lib64/libnccl.so.2"),
                p(SONAME),
            ]
        );
        // empty values count as unset; a directory named twice is tried once
        let e = env(&[("WGPT_NCCL_LIB", ""), ("NCCL_HOME", "/opt/nccl"), ("LD_LIBRARY_PATH", "/opt/nccl/lib:/c")]);
        assert_eq!(up_to_soname(&e), vec![p("/opt/nccl/lib/libnccl.so.2"), p("/opt/nccl/lib64/libnccl.so.2"), p("/c/libnccl.so.2"), p(SONAME)]);
    }

    #[test]
    fn pip_wheels_in_python_prefixes() {
        let root = tmp("pip");
        let wheel = |prefix: &Path, py: &str| {
            let d = prefix.join("lib").join(py).join("site-packages/nvidia/nccl/lib");
            std::fs::create_dir_all(&d).unwrap();
            std::fs::write(d.join(SONAME), "").unwrap();
            d.join(SONAME)
        };
        let venv = root.join("venv");
        let in_venv = wheel(&venv, "python3.11");
        // a prefix on $PATH (bin/..): two Pythons, the newer first
        let prefix = root.join("prefix");
        std::fs::create_dir_all(prefix.join("bin")).unwrap();
        let py39 = wheel(&prefix, "python3.9");
        let py312 = wheel(&prefix, "python3.12");
        // pyenv: shims on $PATH, interpreters under versions/
        let pyenv = root.join("pyenv");
        std::fs::create_dir_all(pyenv.join("shims")).unwrap();
        let in_pyenv = wheel(&pyenv.join("versions/3.10.4"), "python3.10");
        // the user's ~/.local
        let home = root.join("home");
        let in_home = wheel(&home.join(".local"), "python3.11");
        // a python dir without the wheel, and a non-python one
        std::fs::create_dir_all(venv.join("lib/python3.8/site-packages")).unwrap();
        std::fs::create_dir_all(venv.join("lib/perl5/site-packages/nvidia/nccl/lib")).unwrap();
        let path = format!("{}:{}:/nonexistent/bin", prefix.join("bin").display(), pyenv.join("shims").display());
        let e = env(&[("VIRTUAL_ENV", venv.to_str().unwrap()), ("HOME", home.to_str().unwrap()), ("PATH", &path)]);
        let c = candidates(&e);
        let n = c.iter().position(|p| p.as_os_str() == SONAME).unwrap();
        let mine: Vec<PathBuf> = c[n + 1..].iter().filter(|p| p.starts_with(&root)).cloned().collect();
        assert_eq!(mine, vec![in_venv, in_home, py312, py39, in_pyenv]);
        std::fs::remove_dir_all(&root).unwrap();
    }

    #[test]
    fn wgpt_nccl_lib_failure_is_the_error() {
        let e = match Nccl::load(&env(&[("WGPT_NCCL_LIB", "/no/such/libnccl.so.2")])) {
            Err(e) => e,
            Ok(_) => panic!("loaded a library that does not exist"),
        };
        assert!(matches!(e, Error::Unavailable(_)), "{e:?}");
        let s = e.to_string();
        assert!(s.starts_with("$WGPT_NCCL_LIB=/no/such/libnccl.so.2: "), "{s}");
        assert!(s.contains("No such file"), "{s}");
        assert!(!s.contains('\n'), "{s}");
    }

    #[test]
    fn not_a_library_and_not_nccl_are_one_line_errors() {
        let d = tmp("bad");
        let f = d.join(SONAME);
        std::fs::write(&f, "not an ELF file\n").unwrap();
        let e = Nccl::load(&env(&[("WGPT_NCCL_LIB", f.to_str().unwrap())])).err().expect("a text file loaded").to_string();
        assert!(e.starts_with(&format!("$WGPT_NCCL_LIB={}: ", f.display())) && !e.contains('\n'), "{e}");
        // a real library without NCCL's symbols
        #[cfg(target_os = "linux")]
        {
            let e = Nccl::load(&env(&[("WGPT_NCCL_LIB", "libm.so.6")])).err().expect("libm is not NCCL").to_string();
            assert_eq!(e, "$WGPT_NCCL_LIB=libm.so.6: lacks ncclGetVersion (an NCCL too old for wgpt?)");
        }
        // found by search but unusable: named in the one line, with the advice
        let e = Nccl::load(&env(&[("NCCL_HOME", d.to_str().unwrap()), ("LD_LIBRARY_PATH", d.to_str().unwrap())]));
        if let Err(e) = e {
            let s = e.to_string();
            assert!(!s.contains('\n'), "{s}");
            assert!(s.starts_with("no NCCL library (libnccl.so.2) found in $WGPT_NCCL_LIB, $NCCL_HOME/lib, "), "{s}");
            assert_eq!(s.matches(&f.display().to_string()).count(), 1, "{s}");
            assert!(s.ends_with("or set WGPT_NCCL_LIB=/path/to/libnccl.so.2"), "{s}");
        } // else this machine has a usable NCCL on the loader path or in a pip dir
        std::fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn nothing_found_message() {
        assert_eq!(
            not_found(&[]).to_string(),
            "no NCCL library (libnccl.so.2) found in $WGPT_NCCL_LIB, $NCCL_HOME/lib, LD_LIBRARY_PATH, the loader path or pip's nvidia/nccl/lib: install NCCL (pip install nvidia-nccl-cu12) or set WGPT_NCCL_LIB=/path/to/libnccl.so.2"
        );
    }
}
