//! Backends execute kernel graphs. They know kernels and buffers, never GPT-2.
//!
//! * `cpu`  — plain Rust, multithreaded; the numerical reference and the fallback.
//! * `wgpu` — WGSL compute shaders (`shaders/`), Vulkan/Metal/DX12/GL.
//! * `cuda` — CUDA C (`cuda/`) compiled with NVRTC at run time, cuBLAS for matmuls.

pub mod cpu;
pub mod cuda;
pub mod wgpu;

use crate::error::{Error, Result};
use crate::graph::{validate, BufId, BufferTable, DType, Launch, View};

/// A phase prepared on a backend by [`Backend::prepare`]: replay it with [`Backend::run_prepared`].
/// Valid until the next `alloc` (which drops every prepared phase).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Prepared(pub usize);

/// How a collective (a gradient all-reduce) reaches one buffer of a backend. The narrow door
/// through which NCCL, MPI or an in-process reduction touch device memory; nothing else does.
pub enum RawBuffer<'a> {
    /// cpu: the buffer's bytes in host memory
    Host(&'a mut [u8]),
    /// cuda: the device pointer and byte size, and the `CUstream` (as an integer) on which the
    /// backend queues all its work; a collective enqueued there is ordered with the kernels
    Cuda { ptr: u64, bytes: usize, stream: usize },
    /// wgpu: no pointer is shared; copy through the host with `download` and `upload`
    Staged,
}

/// Per-launch times from [`Backend::profile`].
#[derive(Clone, Debug)]
pub struct Profile {
    /// milliseconds of each launch, in order
    pub ms: Vec<f64>,
    /// how they were measured: "timestamp queries", "CUDA events" or "wall clock"
    pub clock: &'static str,
}

/// What every backend implements. A typical life: `alloc` once with the graph's buffer table,
/// `prepare` each phase once, `upload` parameters, then per step `upload` tokens/targets/scalars,
/// `run_prepared` the phases and `download` the losses. Running may return before the device
/// finishes; `download` and `sync` wait.
///
/// Launches are validated against the kernel contract (`graph::validate`) in `prepare`, so
/// implementations of `prepare_valid` and the typed transfers never re-check sizes or dtypes.
pub trait Backend: Send {
    /// Short name and device, e.g. "cpu (2 threads)" or "wgpu: NVIDIA H100 (Vulkan)".
    fn name(&self) -> String;
    /// Which implementation this is (never `Auto`): backends of one kind run the same kernels.
    fn kind(&self) -> BackendKind;
    /// Whether its kernels run on this machine's CPU cores (the cpu backend, a software adapter
    /// such as lavapipe): work overlapped with them on the host competes for the same cores.
    fn runs_on_host_cores(&self) -> bool {
        false
    }
    /// Whether this backend has kernels and storage for `dtype`.
    fn supports(&self, dtype: DType) -> bool;
    /// Check, before anything is allocated, that the buffers and launches fit this device (sizes,
    /// binding limits); the error says what to lower. Backends without limits accept everything.
    fn check_fits(&self, _table: &BufferTable, _phases: &[&[Launch]]) -> Result<()> {
        Ok(())
    }
    /// Allocate every buffer of the table (zero-filled), after [`Backend::check_dtypes`]. Called
    /// once; buffer ids index the table. Drops every prepared phase.
    fn alloc(&mut self, table: &BufferTable) -> Result<()>;
    /// The table given to `alloc` (empty before).
    fn table(&self) -> &BufferTable;
    /// The bytes `alloc` took for the table's buffers, where the backend knows them (what
    /// `wgpt plan` predicts; per-phase scratch that `prepare` adds is not included).
    fn allocated_bytes(&self) -> Option<u64> {
        None
    }
    /// Copy `bytes` into the whole buffer `id` (already checked: the id exists and the byte count
    /// is the buffer's).
    fn upload_bytes(&mut self, id: BufId, bytes: &[u8]) -> Result<()>;
    /// Read the elements of `view` back as bytes (already checked to lie in its buffer; waits for
    /// pending work).
    fn download_bytes(&mut self, view: View) -> Result<Vec<u8>>;
    /// Prepare launches already checked by `graph::validate`.
    fn prepare_valid(&mut self, launches: &[Launch]) -> Result<Prepared>;
    /// Queue a prepared phase.
    fn run_prepared(&mut self, phase: Prepared) -> Result<()>;
    /// Forget a prepared phase (its handle becomes invalid).
    fn release(&mut self, _phase: Prepared) {}
    /// Wait until all submitted work has finished.
    fn sync(&mut self) -> Result<()>;
    /// The door for collectives, see [`RawBuffer`]. Pending work is flushed first.
    fn raw_buffer(&mut self, id: BufId) -> Result<RawBuffer<'_>>;
    /// Run launches already checked by `graph::validate` once, each timed on its own, and wait
    /// for them (see [`Backend::profile`]).
    fn profile_valid(&mut self, launches: &[Launch]) -> Result<Profile>;

    // ---- provided: everything below is written once for every backend ----

    /// Refuses a table with a dtype this backend lacks, naming the buffer.
    fn check_dtypes(&self, table: &BufferTable) -> Result<()> {
        match table.iter().find(|(_, d)| !self.supports(d.dtype)) {
            None => Ok(()),
            Some((_, d)) => Err(Error::Unsupported {
                backend: self.name(),
                msg: format!("no {} storage or kernels (buffer '{}'); use an f32 graph or another backend", d.dtype, d.name),
            }),
        }
    }
    /// The precisions (float dtypes of a launch's activations, see `Kernel::precision`) this
    /// backend has kernels for. f16 weights of an f32 launch are a storage matter (`supports`).
    fn precisions(&self) -> &'static [DType] {
        &[DType::F32]
    }
    /// Every launch's precision is one this backend has (after `validate`).
    fn check_precisions(&self, launches: &[Launch]) -> Result<()> {
        for l in launches {
            let p = l.kernel.precision(self.table());
            if !self.precisions().contains(&p) {
                let have: Vec<&str> = self.precisions().iter().map(|d| d.name()).collect();
                return Err(Error::Unsupported {
                    backend: self.name(),
                    msg: format!(
                        "no {p} kernels (launch '{}'; this backend has {}): use --precision fp32, or --backend cpu or cuda for {p}",
                        l.label,
                        have.join("/")
                    ),
                });
            }
        }
        Ok(())
    }
    /// Validate `launches` against the kernel contract and prepare them for replay.
    fn prepare(&mut self, launches: &[Launch]) -> Result<Prepared> {
        validate(self.table(), launches)?;
        self.check_precisions(launches)?;
        self.prepare_valid(launches)
    }
    /// Run `launches` once with every launch timed on its own: device timestamps on wgpu where
    /// the adapter has them, CUDA events, the wall clock on cpu (and on wgpu without timestamps,
    /// waiting for the device after each launch). Pending work finishes first, so it is not
    /// counted. Timing each launch alone costs a little: compare totals with an untimed step.
    fn profile(&mut self, launches: &[Launch]) -> Result<Profile> {
        validate(self.table(), launches)?;
        self.check_precisions(launches)?;
        self.sync()?;
        let p = self.profile_valid(launches)?;
        debug_assert_eq!(p.ms.len(), launches.len());
        Ok(p)
    }
    /// Execute launches once (prepare, run, release): for tests and one-off work. Steps replay
    /// prepared phases instead.
    fn run(&mut self, launches: &[Launch]) -> Result<()> {
        if launches.is_empty() {
            return Ok(());
        }
        let p = self.prepare(launches)?;
        let r = self.run_prepared(p);
        self.release(p);
        r
    }
    /// Copy host bytes into a whole buffer; the byte count must be the buffer's.
    fn upload(&mut self, id: BufId, bytes: &[u8]) -> Result<()> {
        let d = buffer_desc(self.table(), id, "upload")?;
        if bytes.len() != d.bytes() {
            return Err(Error::Internal(format!(
                "upload to '{}': {} bytes for {} {} elements ({} bytes)",
                d.name,
                bytes.len(),
                d.len,
                d.dtype,
                d.bytes()
            )));
        }
        self.upload_bytes(id, bytes)
    }
    /// Read a view back as bytes (waits for pending work).
    fn download(&mut self, view: View) -> Result<Vec<u8>> {
        let d = buffer_desc(self.table(), view.buf, "download")?;
        if view.offset.checked_add(view.len).is_none_or(|e| e > d.len) {
            return Err(Error::Internal(format!(
                "download of [{}, +{}) from '{}' of {} elements",
                view.offset, view.len, d.name, d.len
            )));
        }
        self.download_bytes(view)
    }
    /// Copy host f32 data into a whole f32 buffer (`data.len()` must equal its length), or into
    /// an f16 or bf16 buffer, rounding each value to the nearest value of that format.
    fn upload_f32(&mut self, id: BufId, data: &[f32]) -> Result<()> {
        match buffer_desc(self.table(), id, "upload_f32")?.dtype {
            DType::F16 => return self.upload(id, &data.iter().flat_map(|&x| half::f16::from_f32(x).to_le_bytes()).collect::<Vec<u8>>()),
            DType::BF16 => return self.upload(id, &data.iter().flat_map(|&x| half::bf16::from_f32(x).to_le_bytes()).collect::<Vec<u8>>()),
            _ => {}
        }
        expect_dtype(self.table(), id, DType::F32, "upload_f32")?;
        self.upload(id, bytemuck::cast_slice(data))
    }
    /// Copy host i32 data into a whole i32 buffer.
    fn upload_i32(&mut self, id: BufId, data: &[i32]) -> Result<()> {
        expect_dtype(self.table(), id, DType::I32, "upload_i32")?;
        self.upload(id, bytemuck::cast_slice(data))
    }
    /// Read a whole f32 (or f16/bf16) buffer back as f32 (waits for pending work).
    fn download_f32(&mut self, id: BufId) -> Result<Vec<f32>> {
        let view = buffer_desc(self.table(), id, "download_f32").map(|_| self.table().view(id))?;
        self.download_view(view)
    }
    /// Read part of an f32 (or f16/bf16) buffer back as f32 (waits for pending work).
    fn download_view(&mut self, view: View) -> Result<Vec<f32>> {
        match buffer_desc(self.table(), view.buf, "download_view")?.dtype {
            DType::F16 => return Ok(self.download(view)?.chunks_exact(2).map(|h| half::f16::from_le_bytes([h[0], h[1]]).to_f32()).collect()),
            DType::BF16 => return Ok(self.download(view)?.chunks_exact(2).map(|h| half::bf16::from_le_bytes([h[0], h[1]]).to_f32()).collect()),
            _ => {}
        }
        expect_dtype(self.table(), view.buf, DType::F32, "download_view")?;
        Ok(bytemuck::pod_collect_to_vec(&self.download(view)?))
    }
    /// Read a whole i32 buffer back (waits for pending work).
    fn download_i32(&mut self, id: BufId) -> Result<Vec<i32>> {
        expect_dtype(self.table(), id, DType::I32, "download_i32")?;
        let view = self.table().view(id);
        Ok(bytemuck::pod_collect_to_vec(&self.download(view)?))
    }
}

fn buffer_desc<'a>(table: &'a BufferTable, id: BufId, what: &str) -> Result<&'a crate::graph::BufferDesc> {
    table.try_get(id).ok_or_else(|| Error::Internal(format!("{what}: unknown buffer id {} (alloc not called?)", id.0)))
}

fn expect_dtype(table: &BufferTable, id: BufId, dtype: DType, what: &str) -> Result<()> {
    let d = buffer_desc(table, id, what)?;
    if d.dtype != dtype {
        return Err(Error::Internal(format!("{what}: buffer '{}' is {}, not {dtype}", d.name, d.dtype)));
    }
    Ok(())
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
    /// with several ranks on a node (mpirun, srun, torchrun...) and no --device: each local rank's
    /// device, e.g. 0,1,2,3 (indexed by local rank); auto = local rank i takes visible device i
    #[arg(long, value_name = "auto|LIST", default_value_t = crate::dist::DevicePerRank::Auto, value_parser = crate::dist::DevicePerRank::parse)]
    pub device_per_rank: crate::dist::DevicePerRank,
}

impl BackendArgs {
    /// The backend these flags ask for. Without --device, a rank of a multi-rank launch takes its
    /// local rank's device (refused before anything is allocated when two local ranks would share one).
    pub fn create(&self) -> Result<Box<dyn Backend>> {
        let cuda_opts = cuda::CudaOptions { tf32: self.tf32, ..Default::default() };
        let device = match self.device {
            Some(d) => Some(d),
            None => self.rank_device()?,
        };
        create(self.backend, device, self.threads, cuda_opts)
    }

    /// A backend of `kind` on `device` with these flags' other options (`--devices`' ranks).
    pub fn create_on(&self, kind: BackendKind, device: Option<usize>) -> Result<Box<dyn Backend>> {
        let cuda_opts = cuda::CudaOptions { tf32: self.tf32, ..Default::default() };
        create(kind, device, self.threads, cuda_opts)
    }

    /// The device of this process's local rank (`dist::place`) when a launcher started more than
    /// one rank on this node; `None` otherwise (the backend's own default).
    pub fn rank_device(&self) -> Result<Option<usize>> {
        let env = crate::dist::env_map();
        let world = crate::dist::World::from_env_map(&env)?;
        if world.local_size <= 1 {
            return Ok(None);
        }
        let devices = crate::dist::probe_devices(self.backend);
        match crate::dist::place(&world, &devices, &env, &self.device_per_rank)? {
            crate::dist::Placement::Device { index, .. } => Ok(Some(index)),
            crate::dist::Placement::Default | crate::dist::Placement::Host => Ok(None),
        }
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
