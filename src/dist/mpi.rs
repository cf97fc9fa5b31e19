//! MPI, loaded at run time with `dlopen` (no MPI is needed to build wgpt): the few collectives
//! data-parallel training needs, on `MPI_COMM_WORLD`.
//!
//! The library is the first of (`candidates`): `$WGPT_MPI_LIB` alone when set; then
//! `libmpi.so.40` (Open MPI), `libmpi.so.12` (MPICH, Intel MPI, MVAPICH, Cray), `libmpi_abi.so.1`
//! (the MPI-5 standard ABI) and `libmpi.so` in each `$LD_LIBRARY_PATH` directory; in the `lib/`
//! beside the `mpirun`/`mpiexec` on `$PATH` (an MPI installed under a prefix); then by name on the
//! loader's path. The launcher's own install comes before the system's, which may be another MPI:
//! a library that sees another world size than the launcher started is refused.
//!
//! Handles differ in type and value between the three ABIs, recognised in this order:
//! - the MPI-5 standard ABI: `MPI_Abi_get_version` reports major ≥ 1 (MPICH 5's own ABI library
//!   exports it too, reporting -1); handles are pointer-sized constants from `mpi_abi.h`;
//! - Open MPI: `ompi_mpi_comm_world` is exported; handles are the addresses of its globals;
//! - otherwise the MPICH ABI: handles are `int` constants from MPICH's `mpi.h`.

use crate::dl::Lib;
use crate::error::{Error, Result};
use std::collections::HashMap;
use std::ffi::{c_char, c_int, c_void};
use std::path::{Path, PathBuf};
use std::sync::{Mutex, MutexGuard};

/// The library file names looked for, Open MPI's first.
pub const NAMES: [&str; 4] = ["libmpi.so.40", "libmpi.so.12", "libmpi_abi.so.1", "libmpi.so"];

/// The most elements one MPI call is given (counts are C `int`s).
const MAX_COUNT: usize = 1 << 30;

/// How the library's handles look.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Abi {
    OpenMpi,
    Mpich,
    Standard,
}

impl std::fmt::Display for Abi {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Abi::OpenMpi => "Open MPI ABI",
            Abi::Mpich => "MPICH ABI",
            Abi::Standard => "MPI-5 standard ABI",
        })
    }
}

/// The library files to try, in order (see the module comment). Entries with a `/` are files
/// that exist; the others are names for the loader to find.
pub fn candidates(env: &HashMap<String, String>) -> Vec<String> {
    let get = |k: &str| env.get(k).filter(|v| !v.is_empty());
    if let Some(p) = get("WGPT_MPI_LIB") {
        return vec![p.clone()];
    }
    // under a hydra (PMI) launcher, MPICH's names before Open MPI's
    let names: Vec<&str> = if get("OMPI_COMM_WORLD_SIZE").is_none() && (get("PMI_SIZE").is_some() || get("MV2_COMM_WORLD_SIZE").is_some()) {
        vec![NAMES[1], NAMES[2], NAMES[0], NAMES[3]]
    } else {
        NAMES.to_vec()
    };
    let mut dirs: Vec<PathBuf> = Vec::new();
    if let Some(lp) = get("LD_LIBRARY_PATH") {
        dirs.extend(std::env::split_paths(lp).filter(|d| d.is_absolute()));
    }
    if let Some(path) = get("PATH") {
        for exe in ["mpirun", "mpiexec"] {
            let Some(found) = std::env::split_paths(path).map(|d| d.join(exe)).find(|p| p.is_file()) else { continue };
            let real = std::fs::canonicalize(&found).unwrap_or(found);
            if let Some(prefix) = real.parent().and_then(Path::parent) {
                dirs.push(prefix.join("lib"));
            }
        }
    }
    let mut out: Vec<String> = Vec::new();
    for d in dirs {
        for n in &names {
            let p = d.join(n);
            if p.is_file() {
                out.push(p.display().to_string());
            }
        }
    }
    out.extend(names.iter().map(|n| n.to_string()));
    let mut seen = std::collections::HashSet::new();
    out.retain(|p| seen.insert(p.clone()));
    out
}

/// The library a GNU ld script (`INPUT(libmpi.so.12)`, what `libmpi.so` is in the pip wheels)
/// names, beside the script unless it names a path.
fn ld_script_target(path: &Path) -> Option<PathBuf> {
    if std::fs::metadata(path).ok()?.len() > 4096 {
        return None;
    }
    let text = std::fs::read_to_string(path).ok()?;
    let rest = text.trim_start().strip_prefix("INPUT(").or_else(|| text.trim_start().strip_prefix("GROUP("))?;
    let first = rest.split(|c: char| c == ')' || c.is_whitespace()).find(|s| !s.is_empty())?;
    Some(if first.contains('/') { PathBuf::from(first) } else { path.parent()?.join(first) })
}

/// One handle of each kind used, in the ABI's handle type.
#[derive(Clone, Copy)]
struct Handles<H> {
    world: H,
    float: H,
    double: H,
    byte: H,
    sum: H,
    max: H,
}

/// MPI_COMM_WORLD and friends in MPICH's `mpi.h` (MPICH 5.0.2).
const MPICH: Handles<c_int> = Handles {
    world: 0x44000000,
    float: 0x4c00040a,
    double: 0x4c00080b,
    byte: 0x4c00010d,
    sum: 0x58000003,
    max: 0x58000001,
};

/// ... and in the MPI-5 standard ABI's `mpi_abi.h` (from MPICH 5.0.2).
const STANDARD: Handles<usize> = Handles { world: 0x101, float: 0x210, double: 0x214, byte: 0x247, sum: 0x21, max: 0x23 };

#[derive(Clone, Copy)]
enum Ty {
    F32,
    F64,
    Byte,
}

#[derive(Clone, Copy)]
enum Op {
    Sum,
    Max,
}

/// The calls whose arguments include a handle, for handle type `H`.
struct Fns<H> {
    h: Handles<H>,
    in_place: usize,
    comm_rank: unsafe extern "C" fn(H, *mut c_int) -> c_int,
    comm_size: unsafe extern "C" fn(H, *mut c_int) -> c_int,
    allreduce: unsafe extern "C" fn(*const c_void, *mut c_void, c_int, H, H, H) -> c_int,
    bcast: unsafe extern "C" fn(*mut c_void, c_int, H, c_int, H) -> c_int,
    allgather: unsafe extern "C" fn(*const c_void, c_int, H, *mut c_void, c_int, H, H) -> c_int,
    reduce_scatter_block: unsafe extern "C" fn(*const c_void, *mut c_void, c_int, H, H, H) -> c_int,
    barrier: unsafe extern "C" fn(H) -> c_int,
    abort: unsafe extern "C" fn(H, c_int) -> c_int,
}

/// The address of `name` as a function pointer of type `F`.
unsafe fn sym<F: Copy>(lib: &Lib, name: &str) -> std::result::Result<F, String> {
    assert_eq!(std::mem::size_of::<F>(), std::mem::size_of::<*mut c_void>());
    let p = lib.sym(name).ok_or_else(|| format!("{} lacks {name}", lib.path))?;
    Ok(std::mem::transmute_copy(&p))
}

impl<H: Copy> Fns<H> {
    unsafe fn load(lib: &Lib, h: Handles<H>, in_place: usize) -> std::result::Result<Fns<H>, String> {
        Ok(Fns {
            h,
            in_place,
            comm_rank: sym(lib, "MPI_Comm_rank")?,
            comm_size: sym(lib, "MPI_Comm_size")?,
            allreduce: sym(lib, "MPI_Allreduce")?,
            bcast: sym(lib, "MPI_Bcast")?,
            allgather: sym(lib, "MPI_Allgather")?,
            reduce_scatter_block: sym(lib, "MPI_Reduce_scatter_block")?,
            barrier: sym(lib, "MPI_Barrier")?,
            abort: sym(lib, "MPI_Abort")?,
        })
    }
    fn ty(&self, t: Ty) -> H {
        match t {
            Ty::F32 => self.h.float,
            Ty::F64 => self.h.double,
            Ty::Byte => self.h.byte,
        }
    }
    fn op(&self, o: Op) -> H {
        match o {
            Op::Sum => self.h.sum,
            Op::Max => self.h.max,
        }
    }
}

enum Calls {
    Int(Fns<c_int>),
    Ptr(Fns<usize>),
}

/// `$body` with `$f` bound to whichever `Fns` the library has.
macro_rules! with_fns {
    ($calls:expr, $f:ident => $body:expr) => {
        match $calls {
            Calls::Int($f) => $body,
            Calls::Ptr($f) => $body,
        }
    };
}

/// The calls without handles.
struct Common {
    initialized: unsafe extern "C" fn(*mut c_int) -> c_int,
    finalized: unsafe extern "C" fn(*mut c_int) -> c_int,
    init_thread: unsafe extern "C" fn(*mut c_int, *mut *mut *mut c_char, c_int, *mut c_int) -> c_int,
    finalize: unsafe extern "C" fn() -> c_int,
    get_library_version: unsafe extern "C" fn(*mut c_char, *mut c_int) -> c_int,
    error_string: Option<unsafe extern "C" fn(c_int, *mut c_char, *mut c_int) -> c_int>,
}

/// The loaded library, its ABI and calls.
struct Loaded {
    lib: Lib,
    abi: Abi,
    common: Common,
    calls: Calls,
}

/// Recognise the ABI of an opened library and look up every call.
fn recognise(lib: Lib) -> std::result::Result<Loaded, String> {
    if !lib.has("MPI_Init_thread") {
        return Err(format!("{} is not an MPI library (no MPI_Init_thread)", lib.path));
    }
    unsafe {
        let mut abi = None;
        if let Ok(f) = sym::<unsafe extern "C" fn(*mut c_int, *mut c_int) -> c_int>(&lib, "MPI_Abi_get_version") {
            let (mut major, mut minor) = (-1, -1);
            if f(&mut major, &mut minor) == 0 && major >= 1 {
                abi = Some(Abi::Standard);
            }
        }
        let abi = abi.unwrap_or(if lib.has("ompi_mpi_comm_world") { Abi::OpenMpi } else { Abi::Mpich });
        let calls = match abi {
            // MPI_IN_PLACE: (void *) -1 in MPICH's mpi.h, (void *) 1 in Open MPI's and mpi_abi.h
            Abi::Mpich => Calls::Int(Fns::load(&lib, MPICH, usize::MAX)?),
            Abi::Standard => Calls::Ptr(Fns::load(&lib, STANDARD, 1)?),
            Abi::OpenMpi => {
                let g = |name: &str| lib.sym(name).map(|p| p as usize).ok_or_else(|| format!("{} lacks {name}", lib.path));
                let h = Handles {
                    world: g("ompi_mpi_comm_world")?,
                    float: g("ompi_mpi_float")?,
                    double: g("ompi_mpi_double")?,
                    byte: g("ompi_mpi_byte")?,
                    sum: g("ompi_mpi_op_sum")?,
                    max: g("ompi_mpi_op_max")?,
                };
                Calls::Ptr(Fns::load(&lib, h, 1)?)
            }
        };
        let common = Common {
            initialized: sym(&lib, "MPI_Initialized")?,
            finalized: sym(&lib, "MPI_Finalized")?,
            init_thread: sym(&lib, "MPI_Init_thread")?,
            finalize: sym(&lib, "MPI_Finalize")?,
            get_library_version: sym(&lib, "MPI_Get_library_version")?,
            error_string: sym(&lib, "MPI_Error_string").ok(),
        };
        Ok(Loaded { lib, abi, common, calls })
    }
}

/// dlopen one candidate (following an ld script) and recognise it.
fn open(cand: &str) -> std::result::Result<Loaded, String> {
    let one_line = |e: String| e.replace('\n', " ");
    let lib = match Lib::open(cand) {
        Ok(l) => l,
        Err(e) => match ld_script_target(Path::new(cand)) {
            Some(t) => Lib::open(&t.display().to_string()).map_err(one_line)?,
            None => return Err(one_line(e)),
        },
    };
    recognise(lib)
}

/// Find and load the library.
fn load(env: &HashMap<String, String>) -> Result<Loaded> {
    let cands = candidates(env);
    if env.get("WGPT_MPI_LIB").is_some_and(|v| !v.is_empty()) {
        return open(&cands[0]).map_err(|e| Error::Unavailable(format!("$WGPT_MPI_LIB={}: {e}", cands[0])));
    }
    let mut errs = Vec::new();
    for c in &cands {
        match open(c) {
            Ok(l) => return Ok(l),
            // a name the loader does not find is simply absent
            Err(e) if !c.contains('/') && e.contains("cannot open shared object file") => {}
            Err(e) => errs.push(e),
        }
    }
    Err(not_found(&errs))
}

/// "no MPI library found (...)", with why each library found could not be used.
fn not_found(errs: &[String]) -> Error {
    let mut msg = format!(
        "no MPI library found (looked for $WGPT_MPI_LIB, {} in $LD_LIBRARY_PATH, beside mpirun/mpiexec on $PATH and on the loader path)",
        NAMES.join(", ")
    );
    for e in errs {
        msg += &format!("; {}", e.replace('\n', " "));
    }
    msg += ": set WGPT_MPI_LIB=/path/to/libmpi.so";
    Error::Unavailable(msg)
}

/// MPI on `MPI_COMM_WORLD`, initialised for this process. Calls are serialised by a lock (MPI is
/// initialised with MPI_THREAD_SERIALIZED), so it may be shared between threads.
pub struct Mpi {
    lib: Lib,
    abi: Abi,
    common: Common,
    calls: Calls,
    rank: usize,
    size: usize,
    version: String,
    /// MPI_Init_thread was called here (so MPI_Finalize is called on drop)
    owns_init: bool,
    /// the most elements given to one call (lowered by the self-test to exercise the splitting)
    max_count: usize,
    lock: Mutex<()>,
}

const _: fn() = || {
    fn send_sync<T: Send + Sync>() {}
    send_sync::<Mpi>();
};

impl Mpi {
    /// Find and dlopen the library, recognise its ABI and call MPI_Init_thread (unless MPI is
    /// already initialised in this process).
    pub fn init(env: &HashMap<String, String>) -> Result<Mpi> {
        let Loaded { lib, abi, common, calls } = load(env)?;
        let mut lib = lib;
        if let Some(f) = lib.file_of("MPI_Init_thread") {
            lib.path = f;
        }
        let mut m = Mpi { lib, abi, common, calls, rank: 0, size: 1, version: String::new(), owns_init: false, max_count: MAX_COUNT, lock: Mutex::new(()) };
        unsafe {
            let (mut init, mut fin) = (0, 0);
            m.check("MPI_Initialized", (m.common.initialized)(&mut init))?;
            m.check("MPI_Finalized", (m.common.finalized)(&mut fin))?;
            if fin != 0 {
                return Err(Error::backend("mpi", "MPI was already finalized in this process (it cannot be initialised twice)"));
            }
            if init == 0 {
                // MPI_THREAD_SERIALIZED: 2 in Open MPI's and MPICH's mpi.h, 2048 in mpi_abi.h
                let serialized = if abi == Abi::Standard { 2048 } else { 2 };
                let mut provided = 0;
                let rc = (m.common.init_thread)(std::ptr::null_mut(), std::ptr::null_mut(), serialized, &mut provided);
                m.check("MPI_Init_thread", rc)?;
                m.owns_init = true;
            }
            let (mut rank, mut size) = (0, 0);
            let rc = with_fns!(&m.calls, f => (f.comm_rank)(f.h.world, &mut rank));
            m.check("MPI_Comm_rank", rc)?;
            let rc = with_fns!(&m.calls, f => (f.comm_size)(f.h.world, &mut size));
            m.check("MPI_Comm_size", rc)?;
            m.rank = rank as usize;
            m.size = size as usize;
            let mut buf = vec![0 as c_char; 8192];
            let mut len: c_int = 0;
            if (m.common.get_library_version)(buf.as_mut_ptr(), &mut len) == 0 {
                let bytes: Vec<u8> = buf[..(len.max(0) as usize).min(buf.len())].iter().map(|&c| c as u8).collect();
                let text = String::from_utf8_lossy(&bytes);
                let first = text.split(['\n', '\0']).next().unwrap_or("");
                m.version = first.split_whitespace().collect::<Vec<_>>().join(" ");
            }
        }
        // a library of another MPI than the launcher's runs every rank as a world of one
        use super::world::{Launcher, World};
        if let Ok(w) = World::from_env_map(env) {
            let mpi_launched = matches!(w.launcher, Launcher::OpenMpi | Launcher::Pmi | Launcher::Mvapich | Launcher::Slurm);
            if mpi_launched && w.size != m.size {
                return Err(Error::Unavailable(format!(
                    "{} ({}) sees a world of {} but {} started {} ranks: not the launcher's MPI; set WGPT_MPI_LIB to the libmpi of the MPI whose launcher started the job",
                    m.lib.path, m.abi, m.size, w.launcher, w.size
                )));
            }
        }
        Ok(m)
    }

    pub fn rank(&self) -> usize {
        self.rank
    }

    pub fn size(&self) -> usize {
        self.size
    }

    pub fn abi(&self) -> Abi {
        self.abi
    }

    /// The file loaded, the first line of MPI_Get_library_version and the ABI:
    /// "/usr/lib/x86_64-linux-gnu/libmpi.so.40 (Open MPI v4.1.4, ..., Open MPI ABI)".
    pub fn describe(&self) -> String {
        if self.version.is_empty() {
            format!("{} ({})", self.lib.path, self.abi)
        } else {
            format!("{} ({}, {})", self.lib.path, self.version, self.abi)
        }
    }

    fn guard(&self) -> MutexGuard<'_, ()> {
        self.lock.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn check(&self, call: &str, rc: c_int) -> Result<()> {
        if rc == 0 {
            return Ok(());
        }
        let mut text = String::new();
        if let Some(f) = self.common.error_string {
            let mut buf = vec![0 as c_char; 8192];
            let mut len: c_int = 0;
            if unsafe { f(rc, buf.as_mut_ptr(), &mut len) } == 0 {
                let bytes: Vec<u8> = buf[..(len.max(0) as usize).min(buf.len())].iter().map(|&c| c as u8).collect();
                text = format!(": {}", String::from_utf8_lossy(&bytes).split_whitespace().collect::<Vec<_>>().join(" "));
            }
        }
        Err(Error::backend("mpi", format!("{call} failed with error {rc}{text}")))
    }

    /// In-place allreduce of `len` elements of `t` at `buf`, split into calls of ≤ max_count.
    fn allreduce(&self, buf: *mut u8, len: usize, t: Ty, o: Op, size: usize) -> Result<()> {
        let _g = self.guard();
        let mut off = 0;
        while off < len {
            let n = (len - off).min(self.max_count);
            let rc = with_fns!(&self.calls, f => unsafe {
                (f.allreduce)(f.in_place as *const c_void, buf.add(off * size) as *mut c_void, n as c_int, f.ty(t), f.op(o), f.h.world)
            });
            self.check("MPI_Allreduce", rc)?;
            off += n;
        }
        Ok(())
    }

    pub fn allreduce_sum_f32(&self, buf: &mut [f32]) -> Result<()> {
        self.allreduce(buf.as_mut_ptr() as *mut u8, buf.len(), Ty::F32, Op::Sum, 4)
    }

    pub fn allreduce_sum_f64(&self, buf: &mut [f64]) -> Result<()> {
        self.allreduce(buf.as_mut_ptr() as *mut u8, buf.len(), Ty::F64, Op::Sum, 8)
    }

    pub fn allreduce_max_f64(&self, buf: &mut [f64]) -> Result<()> {
        self.allreduce(buf.as_mut_ptr() as *mut u8, buf.len(), Ty::F64, Op::Max, 8)
    }

    /// Elements per call for the collectives whose receive buffer holds every rank's share.
    fn per_rank_count(&self) -> usize {
        (self.max_count / self.size.max(1)).max(1)
    }

    fn allgather_of<T: Copy + Default>(&self, mine: &[T], t: Ty) -> Result<Vec<T>> {
        let (n, p) = (mine.len(), self.size);
        let mut out = vec![T::default(); n * p];
        let k = self.per_rank_count();
        let _g = self.guard();
        let gather = |send: &[T], recv: &mut [T]| {
            let rc = with_fns!(&self.calls, f => unsafe {
                (f.allgather)(send.as_ptr() as *const c_void, send.len() as c_int, f.ty(t), recv.as_mut_ptr() as *mut c_void, send.len() as c_int, f.ty(t), f.h.world)
            });
            self.check("MPI_Allgather", rc)
        };
        if n <= k {
            gather(mine, &mut out)?;
            return Ok(out);
        }
        let mut tmp = vec![T::default(); k * p];
        for off in (0..n).step_by(k) {
            let m = (n - off).min(k);
            gather(&mine[off..off + m], &mut tmp[..m * p])?;
            for r in 0..p {
                out[r * n + off..r * n + off + m].copy_from_slice(&tmp[r * m..(r + 1) * m]);
            }
        }
        Ok(out)
    }

    /// Every rank's `mine` (equal lengths on all ranks), concatenated in rank order.
    pub fn allgather(&self, mine: &[u8]) -> Result<Vec<u8>> {
        self.allgather_of(mine, Ty::Byte)
    }

    /// MPI_Allgather of f32 chunks (equal length on all ranks), concatenated in rank order.
    pub fn allgather_f32(&self, mine: &[f32]) -> Result<Vec<f32>> {
        self.allgather_of(mine, Ty::F32)
    }

    /// `buf` on every rank becomes rank `root`'s.
    pub fn bcast(&self, buf: &mut [u8], root: usize) -> Result<()> {
        if root >= self.size {
            return Err(Error::Internal(format!("bcast from rank {root} in a world of {}", self.size)));
        }
        let _g = self.guard();
        for piece in buf.chunks_mut(self.max_count) {
            let rc = with_fns!(&self.calls, f => unsafe {
                (f.bcast)(piece.as_mut_ptr() as *mut c_void, piece.len() as c_int, f.h.byte, root as c_int, f.h.world)
            });
            self.check("MPI_Bcast", rc)?;
        }
        Ok(())
    }

    /// MPI_Reduce_scatter_block with MPI_SUM on f32: `buf.len()` = size·chunk; returns the sum
    /// over ranks of this rank's chunk.
    pub fn reduce_scatter_sum_f32(&self, buf: &[f32]) -> Result<Vec<f32>> {
        let p = self.size;
        if buf.len() % p != 0 {
            return Err(Error::Internal(format!("reduce-scatter of {} elements over {p} ranks", buf.len())));
        }
        let chunk = buf.len() / p;
        let mut out = vec![0f32; chunk];
        let k = self.per_rank_count();
        let _g = self.guard();
        let reduce = |send: &[f32], recv: &mut [f32]| {
            let rc = with_fns!(&self.calls, f => unsafe {
                (f.reduce_scatter_block)(send.as_ptr() as *const c_void, recv.as_mut_ptr() as *mut c_void, recv.len() as c_int, f.h.float, f.h.sum, f.h.world)
            });
            self.check("MPI_Reduce_scatter_block", rc)
        };
        if chunk <= k {
            if chunk > 0 {
                reduce(buf, &mut out)?;
            }
            return Ok(out);
        }
        let mut tmp = vec![0f32; k * p];
        for off in (0..chunk).step_by(k) {
            let m = (chunk - off).min(k);
            for r in 0..p {
                tmp[r * m..(r + 1) * m].copy_from_slice(&buf[r * chunk + off..r * chunk + off + m]);
            }
            reduce(&tmp[..m * p], &mut out[off..off + m])?;
        }
        Ok(out)
    }

    pub fn barrier(&self) -> Result<()> {
        let _g = self.guard();
        let rc = with_fns!(&self.calls, f => unsafe { (f.barrier)(f.h.world) });
        self.check("MPI_Barrier", rc)
    }

    /// MPI_Abort(MPI_COMM_WORLD, code): ends every rank. (Takes no lock: another thread may be
    /// stuck in a collective.)
    pub fn abort(&self, code: i32) -> ! {
        with_fns!(&self.calls, f => unsafe { (f.abort)(f.h.world, code) });
        std::process::exit(if code == 0 { 1 } else { code })
    }
}

impl Drop for Mpi {
    fn drop(&mut self) {
        if !self.owns_init {
            return;
        }
        let _g = self.guard();
        let mut fin = 0;
        unsafe {
            if (self.common.finalized)(&mut fin) == 0 && fin == 0 {
                (self.common.finalize)();
            }
        }
    }
}

/// `wgpt mpi-selftest`: every collective on known data, checked against values computed from the
/// rank and the size alone; as is, then with every call split into pieces of 1000 and of 7
/// elements. Returns "ok rank R of N (describe)". A mismatch in a world of several ranks is
/// printed and ends the job (MPI_Abort), so that no rank waits forever for the one that stopped.
#[doc(hidden)]
pub fn self_test() -> Result<String> {
    let mut m = Mpi::init(&super::env_map())?;
    let mut all = || -> Result<()> {
        checks(&m, 3 * (1 << 20) + 5, 4099)?;
        m.max_count = 1000;
        checks(&m, 5 * 1000 + 7, 2 * 1000 + 3)?;
        m.max_count = 7;
        checks(&m, 37, 29)?;
        m.max_count = MAX_COUNT;
        m.barrier()
    };
    if let Err(e) = all() {
        if m.size > 1 {
            eprintln!("error: {e}");
            m.abort(1);
        }
        return Err(e);
    }
    Ok(format!("ok rank {} of {} ({})", m.rank, m.size, m.describe()))
}

fn checks(m: &Mpi, big: usize, small: usize) -> Result<()> {
    let (r, p) = (m.rank, m.size);
    let fail = |what: &str, i: usize, got: String, want: String| {
        Err(Error::backend("mpi", format!("self-test: {what}[{i}] = {got} on rank {r} of {p}, expected {want}")))
    };
    // sums of small multiples of 1/2 and 1/1024 are exact in any order
    let mut a: Vec<f32> = (0..big).map(|i| (r + 1) as f32 + (i % 1024) as f32 * 0.5).collect();
    m.allreduce_sum_f32(&mut a)?;
    for (i, &v) in a.iter().enumerate() {
        let want = (p * (p + 1) / 2) as f32 + (p * (i % 1024)) as f32 * 0.5;
        if v != want {
            return fail("allreduce_sum_f32", i, v.to_string(), want.to_string());
        }
    }
    let mut b: Vec<f64> = (0..small).map(|i| (r + 1) as f64 / 1024.0 + i as f64).collect();
    m.allreduce_sum_f64(&mut b)?;
    for (i, &v) in b.iter().enumerate() {
        let want = (p * (p + 1) / 2) as f64 / 1024.0 + (p * i) as f64;
        if v != want {
            return fail("allreduce_sum_f64", i, v.to_string(), want.to_string());
        }
    }
    // even indices: the largest rank wins; odd: rank 0
    let mut c: Vec<f64> = (0..small).map(|i| if i % 2 == 0 { r as f64 } else { -(r as f64) } + i as f64).collect();
    m.allreduce_max_f64(&mut c)?;
    for (i, &v) in c.iter().enumerate() {
        let want = if i % 2 == 0 { (p - 1) as f64 } else { 0.0 } + i as f64;
        if v != want {
            return fail("allreduce_max_f64", i, v.to_string(), want.to_string());
        }
    }
    let byte = |rank: usize, j: usize| (rank * 7 + j * 13) as u8;
    let mine: Vec<u8> = (0..small).map(|j| byte(r, j)).collect();
    let all = m.allgather(&mine)?;
    if all.len() != small * p {
        return fail("allgather.len", 0, all.len().to_string(), (small * p).to_string());
    }
    for (i, &v) in all.iter().enumerate() {
        if v != byte(i / small, i % small) {
            return fail("allgather", i, v.to_string(), byte(i / small, i % small).to_string());
        }
    }
    let root = p - 1;
    let mut d: Vec<u8> = (0..small).map(|j| if r == root { (j * 3 + 1) as u8 } else { 0 }).collect();
    m.bcast(&mut d, root)?;
    for (j, &v) in d.iter().enumerate() {
        if v != (j * 3 + 1) as u8 {
            return fail("bcast", j, v.to_string(), ((j * 3 + 1) as u8).to_string());
        }
    }
    let send: Vec<f32> = (0..small * p).map(|k| (r + 1) as f32 + (k % 97) as f32).collect();
    let got = m.reduce_scatter_sum_f32(&send)?;
    if got.len() != small {
        return fail("reduce_scatter.len", 0, got.len().to_string(), small.to_string());
    }
    for (j, &v) in got.iter().enumerate() {
        let want = (p * (p + 1) / 2) as f32 + (p * ((r * small + j) % 97)) as f32;
        if v != want {
            return fail("reduce_scatter_sum_f32", j, v.to_string(), want.to_string());
        }
    }
    let mine: Vec<f32> = (0..small).map(|j| (r * 100_000 + j) as f32).collect();
    let all = m.allgather_f32(&mine)?;
    for (i, &v) in all.iter().enumerate() {
        let want = ((i / small) * 100_000 + i % small) as f32;
        if v != want {
            return fail("allgather_f32", i, v.to_string(), want.to_string());
        }
    }
    m.barrier()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(pairs: &[(&str, &str)]) -> HashMap<String, String> {
        pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
    }

    fn tmp(name: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("wgpt-mpi-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    #[test]
    fn wgpt_mpi_lib_alone() {
        let e = env(&[("WGPT_MPI_LIB", "/opt/x/libmpi.so.12"), ("PATH", "/usr/bin"), ("LD_LIBRARY_PATH", "/usr/lib")]);
        assert_eq!(candidates(&e), vec!["/opt/x/libmpi.so.12".to_string()]);
        // empty counts as unset
        let e = env(&[("WGPT_MPI_LIB", "")]);
        assert_eq!(candidates(&e), NAMES.to_vec());
    }

    #[test]
    fn loader_names_last_and_in_order() {
        assert_eq!(candidates(&env(&[])), NAMES.to_vec());
        // under hydra, MPICH's names first
        let c = candidates(&env(&[("PMI_RANK", "0"), ("PMI_SIZE", "2")]));
        assert_eq!(c, vec!["libmpi.so.12", "libmpi_abi.so.1", "libmpi.so.40", "libmpi.so"]);
        // Open MPI's variables win over PMI's
        let c = candidates(&env(&[("PMI_SIZE", "2"), ("OMPI_COMM_WORLD_SIZE", "2")]));
        assert_eq!(c, NAMES.to_vec());
    }

    #[test]
    fn ld_library_path_then_beside_the_launcher() {
        let root = tmp("beside");
        // an MPI under a prefix: bin/mpirun (a link to bin/prterun, as Open MPI installs it)
        let prefix = root.join("ompi");
        std::fs::create_dir_all(prefix.join("bin")).unwrap();
        std::fs::create_dir_all(prefix.join("lib")).unwrap();
        std::fs::write(prefix.join("bin/prterun"), "").unwrap();
        std::os::unix::fs::symlink(prefix.join("bin/prterun"), prefix.join("bin/mpirun")).unwrap();
        std::fs::write(prefix.join("lib/libmpi.so.40"), "").unwrap();
        std::fs::write(prefix.join("lib/libmpi.so"), "").unwrap();
        // mpiexec found through a link from another directory: its real prefix counts
        let mpich = root.join("mpich");
        std::fs::create_dir_all(mpich.join("bin")).unwrap();
        std::fs::create_dir_all(mpich.join("lib")).unwrap();
        std::fs::write(mpich.join("bin/mpiexec.hydra"), "").unwrap();
        std::fs::write(mpich.join("lib/libmpi.so.12"), "").unwrap();
        std::fs::write(mpich.join("lib/libmpi_abi.so.1"), "").unwrap();
        let links = root.join("links");
        std::fs::create_dir_all(&links).unwrap();
        std::os::unix::fs::symlink(mpich.join("bin/mpiexec.hydra"), links.join("mpiexec")).unwrap();
        // a directory of $LD_LIBRARY_PATH
        let ld = root.join("ld");
        std::fs::create_dir_all(&ld).unwrap();
        std::fs::write(ld.join("libmpi.so.12"), "").unwrap();
        let real = |p: PathBuf| std::fs::canonicalize(p).unwrap().display().to_string();
        let path = format!("{}:/nonexistent:{}:{}", root.join("empty").display(), prefix.join("bin").display(), links.display());
        let c = candidates(&env(&[("PATH", &path), ("LD_LIBRARY_PATH", &format!("{}:relative/dir", ld.display()))]));
        let mut want = vec![
            ld.join("libmpi.so.12").display().to_string(),
            real(prefix.join("lib/libmpi.so.40")),
            real(prefix.join("lib/libmpi.so")),
            real(mpich.join("lib/libmpi.so.12")),
            real(mpich.join("lib/libmpi_abi.so.1")),
        ];
        want.extend(NAMES.iter().map(|s| s.to_string()));
        assert_eq!(c, want);
        // the same directory twice is listed once
        let c2 = candidates(&env(&[("PATH", &path), ("LD_LIBRARY_PATH", &prefix.join("lib").display().to_string())]));
        assert_eq!(c2.iter().filter(|s| s.ends_with("ompi/lib/libmpi.so.40")).count(), 1, "{c2:?}");
        std::fs::remove_dir_all(&root).unwrap();
    }

    #[test]
    fn ld_scripts_are_followed() {
        let d = tmp("ldscript");
        std::fs::write(d.join("libmpi.so"), "INPUT(libmpi.so.12)\n").unwrap();
        assert_eq!(ld_script_target(&d.join("libmpi.so")), Some(d.join("libmpi.so.12")));
        std::fs::write(d.join("abs.so"), "/* GNU ld script */\nGROUP ( /usr/lib/libfoo.so.1 )\n").unwrap();
        assert_eq!(ld_script_target(&d.join("abs.so")), None, "a comment first is not parsed");
        std::fs::write(d.join("g.so"), "GROUP(/usr/lib/libfoo.so.1 AS_NEEDED(x))").unwrap();
        assert_eq!(ld_script_target(&d.join("g.so")), Some(PathBuf::from("/usr/lib/libfoo.so.1")));
        std::fs::write(d.join("elf.so"), b"\x7fELF\x02\x01").unwrap();
        assert_eq!(ld_script_target(&d.join("elf.so")), None);
        std::fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn missing_library_is_one_line_naming_the_variable() {
        let e = match load(&env(&[("WGPT_MPI_LIB", "/nonexistent/libmpi.so.40")])) {
            Err(e) => e.to_string(),
            Ok(_) => panic!("loaded a library that does not exist"),
        };
        assert!(e.starts_with("$WGPT_MPI_LIB=/nonexistent/libmpi.so.40: "), "{e}");
        assert!(!e.contains('\n'), "{e}");
    }

    #[test]
    fn not_found_is_one_line() {
        let e = not_found(&[]).to_string();
        assert_eq!(e, "no MPI library found (looked for $WGPT_MPI_LIB, libmpi.so.40, libmpi.so.12, libmpi_abi.so.1, libmpi.so in $LD_LIBRARY_PATH, beside mpirun/mpiexec on $PATH and on the loader path): set WGPT_MPI_LIB=/path/to/libmpi.so");
        let e = not_found(&["/x/libmpi.so.40: undefined symbol: foo\nmore".to_string()]).to_string();
        assert!(e.contains("; /x/libmpi.so.40: undefined symbol: foo more: set WGPT_MPI_LIB="), "{e}");
        assert!(!e.contains('\n'));
    }

    #[test]
    fn abi_names() {
        assert_eq!(Abi::OpenMpi.to_string(), "Open MPI ABI");
        assert_eq!(Abi::Mpich.to_string(), "MPICH ABI");
        assert_eq!(Abi::Standard.to_string(), "MPI-5 standard ABI");
    }
}
