//! Shared libraries opened at run time (`dlopen`): NVIDIA's (CUDA backend) and MPI's, neither of
//! which is needed to build wgpt. A library, once opened, is never unloaded.

/// A loaded shared library (never unloaded).
#[derive(Clone, Debug)]
pub struct Lib {
    /// where it was loaded from
    pub path: String,
    #[allow(dead_code)]
    handle: usize,
}

#[cfg(target_os = "linux")]
mod sys {
    use std::ffi::{c_char, c_int, c_void};
    pub const RTLD_NOW: c_int = 2;
    pub const RTLD_GLOBAL: c_int = 0x100;
    #[repr(C)]
    pub struct DlInfo {
        pub dli_fname: *const c_char,
        pub dli_fbase: *mut c_void,
        pub dli_sname: *const c_char,
        pub dli_saddr: *mut c_void,
    }
    extern "C" {
        pub fn dlopen(filename: *const c_char, flag: c_int) -> *mut c_void;
        pub fn dlsym(handle: *mut c_void, symbol: *const c_char) -> *mut c_void;
        pub fn dlerror() -> *mut c_char;
        pub fn dladdr(addr: *const c_void, info: *mut DlInfo) -> c_int;
    }
}

impl Lib {
    /// A library known only by name, not opened here (off Linux, where loading is left to the
    /// crate that calls it).
    #[allow(dead_code)]
    pub(crate) fn named(path: &str) -> Lib {
        Lib { path: path.to_string(), handle: 0 }
    }
}

#[cfg(target_os = "linux")]
impl Lib {
    /// `dlopen(name_or_path, RTLD_NOW | RTLD_GLOBAL)`; the error is dlerror()'s text.
    pub fn open(name: &str) -> Result<Lib, String> {
        Self::open_with(name, sys::RTLD_NOW | sys::RTLD_GLOBAL)
    }

    /// `dlopen(path, RTLD_NOW | RTLD_LOCAL)`: for a library whose symbols are looked up here
    /// only (two NVRTC versions may be opened while choosing, and must not interpose on each other).
    pub fn open_local(name: &str) -> Result<Lib, String> {
        Self::open_with(name, sys::RTLD_NOW)
    }

    fn open_with(name: &str, flags: std::ffi::c_int) -> Result<Lib, String> {
        use std::ffi::{CStr, CString};
        let c = CString::new(name).map_err(|_| format!("{name}: bad library name"))?;
        unsafe {
            let h = sys::dlopen(c.as_ptr(), flags);
            if h.is_null() {
                let e = sys::dlerror();
                let msg = if e.is_null() { "dlopen failed".to_string() } else { CStr::from_ptr(e).to_string_lossy().into_owned() };
                return Err(msg);
            }
            Ok(Lib { path: name.to_string(), handle: h as usize })
        }
    }

    /// Whether the library exports `sym`.
    pub fn has(&self, sym: &str) -> bool {
        self.sym(sym).is_some()
    }

    /// The address of `sym`, if the library exports it.
    pub fn sym(&self, sym: &str) -> Option<*mut std::ffi::c_void> {
        let c = std::ffi::CString::new(sym).ok()?;
        let p = unsafe { sys::dlsym(self.handle as *mut _, c.as_ptr()) };
        (!p.is_null()).then_some(p)
    }

    /// The file the loader took `sym` from, as the loader names it (not canonicalised).
    pub fn file_of(&self, sym: &str) -> Option<String> {
        let p = self.sym(sym)?;
        let mut info = sys::DlInfo {
            dli_fname: std::ptr::null(),
            dli_fbase: std::ptr::null_mut(),
            dli_sname: std::ptr::null(),
            dli_saddr: std::ptr::null_mut(),
        };
        if unsafe { sys::dladdr(p, &mut info) } == 0 || info.dli_fname.is_null() {
            return None;
        }
        Some(unsafe { std::ffi::CStr::from_ptr(info.dli_fname) }.to_string_lossy().into_owned())
    }

    /// The file the library was actually loaded from (resolved through one of its symbols).
    pub(crate) fn resolve_path(mut self, sym: &str) -> Lib {
        if let Some(f) = self.file_of(sym) {
            self.path = std::fs::canonicalize(&f).map(|p| p.display().to_string()).unwrap_or(f);
        }
        self
    }
}

#[cfg(not(target_os = "linux"))]
impl Lib {
    /// Off Linux, libraries are not opened explicitly.
    pub fn open(name: &str) -> Result<Lib, String> {
        Err(format!("{name}: explicit loading is only implemented on Linux"))
    }
    pub fn open_local(name: &str) -> Result<Lib, String> {
        Self::open(name)
    }
    pub fn has(&self, _sym: &str) -> bool {
        true
    }
    pub fn sym(&self, _sym: &str) -> Option<*mut std::ffi::c_void> {
        None
    }
    pub fn file_of(&self, _sym: &str) -> Option<String> {
        None
    }
    pub(crate) fn resolve_path(self, _sym: &str) -> Lib {
        self
    }
}
