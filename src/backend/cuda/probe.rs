//! `wgpt info`: what CUDA pieces this machine has. Never panics, whatever is missing.

use crate::backend::cuda::dl::CudaError;
use std::path::PathBuf;

use cudarc::driver::{result as drv, sys as drv_sys};

use super::compile;
use super::dl::{self, Which};

/// The CUDA driver found.
#[derive(Clone, Debug)]
pub struct DriverInfo {
    /// CUDA version the driver supports, as cuDriverGetVersion reports it (e.g. 12040)
    pub version: i32,
    /// the library loaded
    pub path: String,
}

impl DriverInfo {
    /// "12.4"
    pub fn version_string(&self) -> String {
        format!("{}.{}", self.version / 1000, (self.version % 1000) / 10)
    }
}

/// One GPU as the driver reports it.
#[derive(Clone, Debug)]
pub struct CudaDeviceInfo {
    pub ordinal: usize,
    pub name: String,
    pub cc_major: i32,
    pub cc_minor: i32,
    /// bytes
    pub total_memory: usize,
}

/// Everything `wgpt info` shows about CUDA.
#[derive(Clone, Debug)]
pub struct CudaProbe {
    pub driver: Result<DriverInfo, CudaError>,
    /// NVRTC's version and path, e.g. "12.9 (/usr/local/cuda/lib64/libnvrtc.so.12)"
    pub nvrtc: Result<String, CudaError>,
    pub cublas: Result<(), CudaError>,
    /// the directory with cuda_fp16.h (not needed by the fp32 kernels)
    pub headers: Result<PathBuf, CudaError>,
    pub devices: Vec<CudaDeviceInfo>,
}

pub(crate) fn driver_error(e: drv::DriverError) -> String {
    let name = e.error_name().map(|s| s.to_string_lossy().into_owned()).unwrap_or_else(|_| format!("{:?}", e.0));
    let text = e.error_string().map(|s| s.to_string_lossy().into_owned()).unwrap_or_default();
    if text.is_empty() {
        name
    } else {
        format!("{name} ({text})")
    }
}

/// Load the driver and cuInit it; the one-line reason when that fails.
pub(crate) fn init_driver() -> Result<DriverInfo, CudaError> {
    let lib = dl::lib(Which::Driver)?;
    drv::init().map_err(|e| format!("cuInit failed: {}", driver_error(e)))?;
    let mut version = 0i32;
    unsafe { drv_sys::cuDriverGetVersion(&mut version) }
        .result()
        .map_err(|e| format!("cuDriverGetVersion failed: {}", driver_error(e)))?;
    Ok(DriverInfo { version, path: lib.path.clone() })
}

pub(crate) fn device_info(ordinal: usize) -> Result<CudaDeviceInfo, CudaError> {
    let dev = drv::device::get(ordinal as i32).map_err(driver_error)?;
    let name = drv::device::get_name(dev).map_err(driver_error)?;
    let attr = |a| unsafe { drv::device::get_attribute(dev, a) }.map_err(driver_error);
    let cc_major = attr(drv_sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR)?;
    let cc_minor = attr(drv_sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MINOR)?;
    let total_memory = unsafe { drv::device::total_mem(dev) }.map_err(driver_error)?;
    Ok(CudaDeviceInfo { ordinal, name, cc_major, cc_minor, total_memory })
}

/// Where the NVRTC found is newer (CUDA major version) than the driver, which then cannot load
/// its CUBINs: the one-line error that says what to install instead.
pub(crate) fn nvrtc_too_new(driver: &DriverInfo) -> Option<String> {
    let (major, minor) = compile::nvrtc_version().ok()?;
    let dm = driver.version / 1000;
    (major > dm).then(|| {
        let path = dl::lib(Which::Nvrtc).map(|l| l.path.clone()).unwrap_or_default();
        format!(
            "NVRTC {major}.{minor} ({path}) makes code the CUDA {} driver cannot load; use an NVRTC {dm}.x \
             (pip install nvidia-cuda-nvrtc-cu{dm}, a CUDA {dm} toolkit on LD_LIBRARY_PATH, or $WGPT_NVRTC)",
            driver.version_string()
        )
    })
}

/// Look for the driver, its GPUs, NVRTC, cuBLAS and the headers.
pub fn probe() -> CudaProbe {
    let driver = init_driver();
    let mut devices = Vec::new();
    if driver.is_ok() {
        if let Ok(n) = drv::device::get_count() {
            for i in 0..n.max(0) as usize {
                if let Ok(d) = device_info(i) {
                    devices.push(d);
                }
            }
        }
    }
    CudaProbe {
        driver,
        nvrtc: compile::nvrtc_description(),
        cublas: dl::lib(Which::Cublas).map(|_| ()),
        headers: dl::include_dir(),
        devices,
    }
}

impl std::fmt::Display for CudaProbe {
    /// Several lines for `wgpt info`.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.driver {
            Ok(d) => writeln!(f, "cuda driver: CUDA {} ({})", d.version_string(), d.path)?,
            Err(e) => writeln!(f, "cuda driver: {e}")?,
        }
        for d in &self.devices {
            writeln!(
                f,
                "cuda device {}: {} (sm_{}{}, {:.1} GiB)",
                d.ordinal,
                d.name,
                d.cc_major,
                d.cc_minor,
                d.total_memory as f64 / (1u64 << 30) as f64
            )?;
        }
        match &self.nvrtc {
            Ok(s) => {
                writeln!(f, "nvrtc: {s}")?;
                if let Some(e) = self.driver.as_ref().ok().and_then(nvrtc_too_new) {
                    writeln!(f, "nvrtc: warning: {e}")?;
                }
            }
            Err(e) => writeln!(f, "nvrtc: {e}")?,
        }
        match &self.cublas {
            Ok(()) => writeln!(
                f,
                "cublas: {}",
                dl::lib(Which::Cublas).map(|l| l.path.clone()).unwrap_or_else(|e| e.msg)
            )?,
            Err(e) => writeln!(f, "cublas: {e} (matmuls fall back to the built-in kernel)")?,
        }
        match &self.headers {
            Ok(p) => write!(f, "cuda headers: {}", p.display()),
            Err(e) => write!(f, "cuda headers: {e}"),
        }
    }
}
