//! NVRTC's C API, called directly through the library `dl` found (NVRTC 11.2 or newer).
//!
//! cudarc can only load NVRTC under a fixed list of names, which misses CUDA 11's
//! `libnvrtc.so.11.2`, and a CUDA 11 driver cannot load CUBINs from NVRTC 12: V100 nodes with
//! CUDA 11 drivers need NVRTC 11. The dozen functions used here have had the same C signatures
//! since 11.2, so they are looked up by name in whichever NVRTC was chosen.

use crate::backend::cuda::dl::CudaError;
use std::ffi::{c_char, c_int, c_void, CStr, CString};
use std::sync::OnceLock;

use super::dl::{self, Which};

type Prog = *mut c_void;
type R = c_int; // nvrtcResult; 0 = NVRTC_SUCCESS

type VersionFn = unsafe extern "C" fn(*mut c_int, *mut c_int) -> R;
type IntOutFn = unsafe extern "C" fn(*mut c_int) -> R;
type CreateFn = unsafe extern "C" fn(*mut Prog, *const c_char, *const c_char, c_int, *const *const c_char, *const *const c_char) -> R;
type CompileFn = unsafe extern "C" fn(Prog, c_int, *const *const c_char) -> R;
type DestroyFn = unsafe extern "C" fn(*mut Prog) -> R;
type SizeFn = unsafe extern "C" fn(Prog, *mut usize) -> R;
type GetFn = unsafe extern "C" fn(Prog, *mut c_char) -> R;
type ErrorStringFn = unsafe extern "C" fn(R) -> *const c_char;

/// The entry points, resolved once.
struct Api {
    version: VersionFn,
    num_archs: IntOutFn,
    archs: IntOutFn,
    create: CreateFn,
    compile: CompileFn,
    destroy: DestroyFn,
    log_size: SizeFn,
    log: GetFn,
    cubin_size: SizeFn,
    cubin: GetFn,
    ptx_size: SizeFn,
    ptx: GetFn,
    error_string: ErrorStringFn,
}

/// Every symbol `Api` needs (checked when a candidate library is chosen).
pub(crate) const SYMBOLS: &[&str] = &[
    "nvrtcVersion", "nvrtcGetNumSupportedArchs", "nvrtcGetSupportedArchs", "nvrtcCreateProgram",
    "nvrtcCompileProgram", "nvrtcDestroyProgram", "nvrtcGetProgramLogSize", "nvrtcGetProgramLog",
    "nvrtcGetCUBINSize", "nvrtcGetCUBIN", "nvrtcGetPTXSize", "nvrtcGetPTX", "nvrtcGetErrorString",
];

fn api() -> Result<&'static Api, CudaError> {
    static API: OnceLock<Result<Api, CudaError>> = OnceLock::new();
    API.get_or_init(|| {
        let lib = dl::lib(Which::Nvrtc)?;
        macro_rules! f {
            ($name:literal, $ty:ty) => {{
                let p = lib.sym($name).ok_or_else(|| format!("{} lacks {}", lib.path, $name))?;
                // SAFETY: the symbol is NVRTC's function of that name and $ty is its C signature
                unsafe { std::mem::transmute::<*mut c_void, $ty>(p) }
            }};
        }
        Ok(Api {
            version: f!("nvrtcVersion", VersionFn),
            num_archs: f!("nvrtcGetNumSupportedArchs", IntOutFn),
            archs: f!("nvrtcGetSupportedArchs", IntOutFn),
            create: f!("nvrtcCreateProgram", CreateFn),
            compile: f!("nvrtcCompileProgram", CompileFn),
            destroy: f!("nvrtcDestroyProgram", DestroyFn),
            log_size: f!("nvrtcGetProgramLogSize", SizeFn),
            log: f!("nvrtcGetProgramLog", GetFn),
            cubin_size: f!("nvrtcGetCUBINSize", SizeFn),
            cubin: f!("nvrtcGetCUBIN", GetFn),
            ptx_size: f!("nvrtcGetPTXSize", SizeFn),
            ptx: f!("nvrtcGetPTX", GetFn),
            error_string: f!("nvrtcGetErrorString", ErrorStringFn),
        })
    })
    .as_ref()
    .map_err(|e| e.clone())
}

fn check(a: &Api, what: &str, r: R) -> Result<(), CudaError> {
    if r == 0 {
        return Ok(());
    }
    let s = unsafe { (a.error_string)(r) };
    let text = if s.is_null() { format!("error {r}") } else { unsafe { CStr::from_ptr(s) }.to_string_lossy().into_owned() };
    Err(format!("{what}: {text}").into())
}

/// (major, minor) of the NVRTC in use.
pub fn version() -> Result<(i32, i32), CudaError> {
    let a = api()?;
    let (mut major, mut minor) = (0, 0);
    check(a, "nvrtcVersion", unsafe { (a.version)(&mut major, &mut minor) })?;
    Ok((major, minor))
}

/// The SASS architectures this NVRTC can target (70, 75, 80, ...).
pub fn supported_archs() -> Result<Vec<u32>, CudaError> {
    let a = api()?;
    let mut n: c_int = 0;
    check(a, "nvrtcGetNumSupportedArchs", unsafe { (a.num_archs)(&mut n) })?;
    let mut v = vec![0 as c_int; n.max(0) as usize];
    check(a, "nvrtcGetSupportedArchs", unsafe { (a.archs)(v.as_mut_ptr()) })?;
    Ok(v.into_iter().map(|x| x as u32).collect())
}

/// Compile `src` (named `file` in messages) with `options`. Ok((image, log)) where the image is
/// the CUBIN, or for `ptx` the NUL-terminated PTX text; Err(log, or the reason when it is empty).
pub fn compile(file: &str, src: &str, options: &[String], ptx: bool) -> Result<(Vec<u8>, String), CudaError> {
    let a = api()?;
    let csrc = CString::new(src).map_err(|_| format!("{file}: NUL byte in source"))?;
    let cname = CString::new(file).map_err(|_| format!("{file}: bad name"))?;
    let copts: Vec<CString> = options.iter().map(|o| CString::new(o.as_str()).unwrap_or_default()).collect();
    let popts: Vec<*const c_char> = copts.iter().map(|c| c.as_ptr()).collect();
    let mut prog: Prog = std::ptr::null_mut();
    check(a, "nvrtcCreateProgram", unsafe {
        (a.create)(&mut prog, csrc.as_ptr(), cname.as_ptr(), 0, std::ptr::null(), std::ptr::null())
    })?;
    let compiled = check(a, "nvrtcCompileProgram", unsafe { (a.compile)(prog, popts.len() as c_int, popts.as_ptr()) });
    let log = unsafe { read(prog, a.log_size, a.log) }.map(|b| cstr_lossy(&b)).unwrap_or_default();
    let out = match compiled {
        Err(e) => Err(if log.trim().is_empty() { e } else { CudaError::from(log.clone()) }),
        Ok(()) => {
            let image = if ptx { unsafe { read(prog, a.ptx_size, a.ptx) } } else { unsafe { read(prog, a.cubin_size, a.cubin) } };
            match image {
                Ok(img) if !img.is_empty() => Ok((img, log.clone())),
                Ok(_) => Err(format!("{file}: NVRTC produced an empty image").into()),
                Err(r) => Err(check(a, if ptx { "nvrtcGetPTX" } else { "nvrtcGetCUBIN" }, r).unwrap_err()),
            }
        }
    };
    unsafe { (a.destroy)(&mut prog) };
    out
}

/// A size-then-contents NVRTC getter into a byte vector; Err(result code).
unsafe fn read(prog: Prog, size: SizeFn, get: GetFn) -> Result<Vec<u8>, R> {
    let mut n = 0usize;
    let r = size(prog, &mut n);
    if r != 0 {
        return Err(r);
    }
    let mut buf = vec![0u8; n];
    if n > 0 {
        let r = get(prog, buf.as_mut_ptr() as *mut c_char);
        if r != 0 {
            return Err(r);
        }
    }
    Ok(buf)
}

fn cstr_lossy(v: &[u8]) -> String {
    let end = v.iter().position(|&c| c == 0).unwrap_or(v.len());
    String::from_utf8_lossy(&v[..end]).into_owned()
}
