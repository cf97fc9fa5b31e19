//! Backends execute kernel graphs. They know kernels and buffers, never GPT-2.
//!
//! * `cpu`  — plain Rust, multithreaded; the numerical reference and the fallback.
//! * `wgpu` — WGSL compute shaders (`shaders/`), Vulkan/Metal/DX12/GL.
//! * `cuda` — CUDA C (`cuda/`) compiled with NVRTC at run time, cuBLAS for matmuls.

pub mod cpu;
pub mod cuda;
pub mod wgpu;

use crate::error::Result;
use crate::graph::{BufId, BufferTable, Launch};

/// What every backend implements. A typical life: `alloc` once with the graph's buffer table,
/// `upload` parameters, then per step `upload` tokens/targets/hyper, `run` the phases, and
/// `download` the losses. `run` may return before the device finishes; `download` and `sync` wait.
pub trait Backend {
    /// Short name and device, e.g. "cpu (2 threads)" or "wgpu: NVIDIA H100 (Vulkan)".
    fn name(&self) -> String;
    /// Check, before anything is allocated, that the buffers and launches fit this device (sizes,
    /// binding limits); the error says what to lower. Backends without limits accept everything.
    fn check_fits(&self, _table: &BufferTable, _phases: &[&[Launch]]) -> Result<()> {
        Ok(())
    }
    /// Allocate every buffer of the table (zero-filled). Called once; buffer ids index the table.
    fn alloc(&mut self, table: &BufferTable) -> Result<()>;
    /// Copy host f32 data into a whole f32 buffer (`data.len()` must equal its length).
    fn upload_f32(&mut self, id: BufId, data: &[f32]) -> Result<()>;
    /// Copy host i32 data into a whole i32 buffer.
    fn upload_i32(&mut self, id: BufId, data: &[i32]) -> Result<()>;
    /// Read a whole f32 buffer back (waits for pending work).
    fn download_f32(&mut self, id: BufId) -> Result<Vec<f32>>;
    /// Read part of an f32 buffer back (waits for pending work). Backends may override this to
    /// copy only the range.
    fn download_view(&mut self, view: crate::graph::View) -> Result<Vec<f32>> {
        let all = self.download_f32(view.buf)?;
        Ok(all[view.offset..view.offset + view.len].to_vec())
    }
    /// Execute launches in order.
    fn run(&mut self, launches: &[Launch]) -> Result<()>;
    /// Wait until all submitted work has finished.
    fn sync(&mut self) -> Result<()>;
}

/// The device-choice flags every command that runs a graph shares (flattened into its clap args).
#[derive(Clone, Debug, clap::Args)]
pub struct BackendArgs {
    /// backend: auto picks a real GPU (CUDA, then wgpu) and falls back to cpu
    #[arg(long, value_enum, default_value_t = BackendKind::Auto)]
    pub backend: BackendKind,
    /// device index for wgpu/cuda (see `wgpt info`)
    #[arg(long)]
    pub device: Option<usize>,
    /// cpu backend threads (default: all cores)
    #[arg(long)]
    pub threads: Option<usize>,
    /// cuda: let cuBLAS use TF32 tensor cores on sm_80+ (faster, ~10-bit matmul inputs; llm.c's -f 1)
    #[arg(long)]
    pub tf32: bool,
}

impl BackendArgs {
    /// The backend these flags ask for.
    pub fn create(&self) -> Result<Box<dyn Backend>> {
        let cuda_opts = cuda::CudaOptions { tf32: self.tf32, ..Default::default() };
        create(self.backend, self.device, self.threads, cuda_opts)
    }
}

/// Which backend the user asked for (`--backend`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum BackendKind {
    /// the best available: a real GPU through CUDA or wgpu, else cpu
    Auto,
    Cpu,
    Wgpu,
    Cuda,
}

impl std::fmt::Display for BackendKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let s = match self {
            BackendKind::Auto => "auto",
            BackendKind::Cpu => "cpu",
            BackendKind::Wgpu => "wgpu",
            BackendKind::Cuda => "cuda",
        };
        f.write_str(s)
    }
}

/// Create the backend the user asked for. `auto` takes a real GPU when one is usable (CUDA, then a
/// hardware wgpu adapter) and otherwise the cpu backend — never a software adapter, which is far
/// slower than the cpu backend.
pub fn create(
    kind: BackendKind,
    device: Option<usize>,
    threads: Option<usize>,
    cuda_opts: cuda::CudaOptions,
) -> Result<Box<dyn Backend>> {
    match kind {
        BackendKind::Cpu => Ok(Box::new(cpu::CpuBackend::new(threads)?)),
        BackendKind::Wgpu => Ok(Box::new(wgpu::WgpuBackend::new(device)?)),
        BackendKind::Cuda => Ok(Box::new(cuda::CudaBackend::with_options(device.unwrap_or(0), cuda_opts)?)),
        BackendKind::Auto => {
            if !cuda::probe().devices.is_empty() {
                match cuda::CudaBackend::with_options(device.unwrap_or(0), cuda_opts) {
                    Ok(b) => return Ok(Box::new(b)),
                    Err(e) => eprintln!("wgpt: CUDA device present but unusable ({e}); trying wgpu"),
                }
            }
            let adapter = match device {
                Some(d) => Some(d),
                None => wgpu::best_hardware_adapter(),
            };
            if let Some(i) = adapter {
                match wgpu::WgpuBackend::new(Some(i)) {
                    Ok(b) => return Ok(Box::new(b)),
                    Err(e) => eprintln!("wgpt: GPU adapter {i} unusable ({e}); using the cpu backend"),
                }
            }
            Ok(Box::new(cpu::CpuBackend::new(threads)?))
        }
    }
}
