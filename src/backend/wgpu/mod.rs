//! The wgpu backend: every kernel as a WGSL compute shader (`shaders/<family>.wgsl`) run through
//! wgpu on Vulkan, Metal, DX12 or GL.
//!
//! * One `wgpu::Buffer` per buffer of the graph's table; views are bound as aligned sub-ranges.
//! * Compile once, replay: `prepare` keeps a launch list; its first run compiles it (`compile.rs`:
//!   entry points, bindings, parameter words, workgroup grids, splitting of over-large bindings),
//!   creates the pipelines (cached across lists), the parameter buffer, the scratch buffer and one
//!   bind group per dispatch. Later runs of the phase only encode: one compute pass each, recorded into
//!   a pending command encoder that is submitted once, when the host next uploads, downloads or
//!   syncs — so a training step (zero_grad, forward, backward, update) is one encoder and one submit,
//!   with no waits between kernels. Only downloads wait.
//! * The adapter's own limits are requested; `plan` says before allocating whether a graph fits.
//! * f16 buffers (weights for inference) where the adapter has SHADER_F16: 2 bytes an element,
//!   allocations rounded up to 4 bytes; the matmul and encoder modules are specialised for an f16
//!   weight element type (`shaders.rs`, `alias WeightT`/`WteT`/`WpeT`), converting to f32.

pub mod autotune;
pub mod compile;
pub mod shaders;
#[cfg(test)]
mod tests;

pub use compile::{plan_memory, DeviceCaps, MatmulMode, MemoryPlan};

use crate::backend::{Backend, Prepared, RawBuffer};
use crate::error::{Error, Result};
use crate::graph::{BufId, BufferTable, DType, Kernel, Launch, View};
use compile::{buffer_bytes, compile_with, mib, Target, PARAM_WORDS};
use shaders::Variant;
use std::collections::HashMap;
use std::sync::{Arc, Mutex, OnceLock};

/// One adapter as `wgpt info` shows it.
#[derive(Clone, Debug, serde::Serialize)]
pub struct AdapterReport {
    /// the value to pass as `--device`
    pub index: usize,
    pub name: String,
    /// Vulkan, Metal, Dx12, Gl
    pub backend: String,
    /// DiscreteGpu, IntegratedGpu, VirtualGpu, Cpu, Other
    pub device_type: String,
    pub driver: String,
    pub max_storage_buffer_binding_size: u64,
    pub max_buffer_size: u64,
    pub max_compute_workgroup_storage_size: u32,
    pub f16: bool,
    pub subgroup: bool,
    /// (min, max) subgroup size
    pub subgroup_sizes: (u32, u32),
}

/// Process start-up settings for the graphics drivers; `main` calls this before any thread
/// starts (nothing in wgpt sets environment variables later). Mesa's implicit Vulkan layer
/// VK_LAYER_MESA_device_select only reorders devices for programs that take the first one (wgpt
/// lists them all) and, on headless machines, prints "XDG_RUNTIME_DIR is invalid" while probing
/// Wayland: leave it out unless the user set it.
pub fn init_process_env() {
    if std::env::var_os("NODEVICE_SELECT").is_none() {
        std::env::set_var("NODEVICE_SELECT", "1");
    }
}

/// The one wgpu instance of the process, shared by every adapter and backend (several devices in
/// one process enumerate and open through it).
fn instance() -> &'static wgpu::Instance {
    static INSTANCE: OnceLock<wgpu::Instance> = OnceLock::new();
    // WGPU_BACKEND=vulkan|gl|metal|dx12 restricts the back ends, as in every wgpu program
    INSTANCE.get_or_init(|| wgpu::Instance::new(wgpu::InstanceDescriptor::new_without_display_handle_from_env()))
}

/// wgpu's GL back end (EGL) panics (`make_current`: BadAccess) when two threads enumerate, open
/// or drop adapters at the same time through the shared instance; every function here that
/// touches adapters holds this lock until the adapters it does not keep are dropped.
static ADAPTERS: Mutex<()> = Mutex::new(());

fn adapters_lock() -> std::sync::MutexGuard<'static, ()> {
    ADAPTERS.lock().unwrap_or_else(|e| e.into_inner())
}

/// Every adapter (call with `adapters_lock` held) of the primary APIs (Vulkan, Metal, DX12); GL's
/// only where none of those has one (or `WGPU_BACKEND=gl` asks for it). GL is the fallback: a GPU
/// with Vulkan shows up again under GL, and GL's EGL adapters still raced when dropped while
/// other threads used wgpu (`make_current: BadAccess`, seen once in CI despite the lock).
fn enumerate() -> Vec<wgpu::Adapter> {
    let primary = pollster::block_on(instance().enumerate_adapters(wgpu::Backends::PRIMARY));
    if !primary.is_empty() {
        return primary;
    }
    pollster::block_on(instance().enumerate_adapters(wgpu::Backends::all()))
}

fn report(index: usize, a: &wgpu::Adapter) -> AdapterReport {
    let info = a.get_info();
    let limits = a.limits();
    let feats = a.features();
    AdapterReport {
        index,
        name: info.name.clone(),
        backend: format!("{:?}", info.backend),
        device_type: format!("{:?}", info.device_type),
        driver: format!("{} {}", info.driver, info.driver_info).trim().to_string(),
        max_storage_buffer_binding_size: limits.max_storage_buffer_binding_size,
        max_buffer_size: limits.max_buffer_size,
        max_compute_workgroup_storage_size: limits.max_compute_workgroup_storage_size,
        f16: feats.contains(wgpu::Features::SHADER_F16),
        subgroup: feats.contains(wgpu::Features::SUBGROUP),
        subgroup_sizes: (info.subgroup_min_size, info.subgroup_max_size),
    }
}

/// Every adapter wgpu finds, in `--device` order.
pub fn list_adapters() -> Vec<AdapterReport> {
    let _one_thread = adapters_lock();
    enumerate().iter().enumerate().map(|(i, a)| report(i, a)).collect()
}

/// The adapter `--backend auto` should take: the best hardware GPU (discrete, integrated or
/// virtual), never a software rasteriser such as lavapipe (far slower than the cpu backend).
pub fn best_hardware_adapter() -> Option<usize> {
    let _one_thread = adapters_lock();
    let list = enumerate();
    (0..list.len())
        .filter(|&i| {
            !matches!(list[i].get_info().device_type, wgpu::DeviceType::Cpu | wgpu::DeviceType::Other)
        })
        .min_by_key(|&i| (rank(&list[i]), i))
}

/// Preference when no `--device` is given: real GPUs first, software last.
fn rank(a: &wgpu::Adapter) -> (u32, u32) {
    let info = a.get_info();
    let t = match info.device_type {
        wgpu::DeviceType::DiscreteGpu => 0,
        wgpu::DeviceType::IntegratedGpu => 1,
        wgpu::DeviceType::VirtualGpu => 2,
        wgpu::DeviceType::Other => 3,
        wgpu::DeviceType::Cpu => 4,
    };
    let b = match info.backend {
        wgpu::Backend::Vulkan | wgpu::Backend::Metal | wgpu::Backend::Dx12 => 0,
        _ => 1,
    };
    (t, b)
}

/// Whether the subgroup matmul can run on this adapter: SUBGROUP offered and subgroups of at least
/// 8 lanes (the kernel shares A rows across aligned groups of 8 lanes).
fn subgroup_matmul_ok(features: wgpu::Features, info: &wgpu::AdapterInfo) -> bool {
    features.contains(wgpu::Features::SUBGROUP) && info.subgroup_min_size >= 8 && info.subgroup_max_size <= 128
}

/// A compiled, replayable launch list.
struct Plan {
    label: String,
    dispatches: Vec<Ready>,
    _params: wgpu::Buffer,
    _scratch: wgpu::Buffer,
}

/// One compute pass of `dispatches` in `enc` (with `ts`: timestamps at its start and end).
fn encode_pass<'a>(enc: &mut wgpu::CommandEncoder, label: &str, dispatches: impl IntoIterator<Item = &'a Ready>, ts: Option<wgpu::ComputePassTimestampWrites<'_>>) {
    let mut pass = enc.begin_compute_pass(&wgpu::ComputePassDescriptor { label: Some(label), timestamp_writes: ts });
    for d in dispatches {
        pass.set_pipeline(&d.pipeline);
        pass.set_bind_group(0, &d.bind_group, &[]);
        pass.dispatch_workgroups(d.groups[0], d.groups[1], d.groups[2]);
    }
}

struct Ready {
    pipeline: wgpu::ComputePipeline,
    bind_group: wgpu::BindGroup,
    groups: [u32; 3],
    launch: usize,
}

/// Downloads up to this size keep their staging buffer.
const CACHED_STAGING_BYTES: u64 = 1 << 20;

pub struct WgpuBackend {
    info: wgpu::AdapterInfo,
    features: wgpu::Features,
    limits: wgpu::Limits,
    device: wgpu::Device,
    queue: wgpu::Queue,
    caps: DeviceCaps,
    table: BufferTable,
    buffers: Vec<wgpu::Buffer>,
    staging: HashMap<u32, wgpu::Buffer>,
    dummy: wgpu::Buffer,
    modules: HashMap<Variant, wgpu::ShaderModule>,
    pipelines: HashMap<(Variant, &'static str), wgpu::ComputePipeline>,
    /// prepared phases: the launches, and their compiled plan once built (dropped when the
    /// matmul mode or the binding limit changes, rebuilt on the next run)
    plans: Vec<Option<(Vec<Launch>, Option<Plan>)>>,
    pending: Option<wgpu::CommandEncoder>,
    /// the matmul autotuner (None: off; see `autotune`)
    tuner: Option<autotune::Tuner>,
    errors: Arc<Mutex<Vec<String>>>,
}

impl WgpuBackend {
    /// Opens adapter `adapter_index` (as numbered by [`list_adapters`]), or with `None` the best one:
    /// a discrete GPU, else an integrated one, else whatever exists (e.g. lavapipe). The device gets
    /// the adapter's own limits.
    pub fn new(adapter_index: Option<usize>) -> Result<WgpuBackend> {
        // held until the other adapters are dropped at the end (declared first, dropped last)
        let _one_thread = adapters_lock();
        let mut list = enumerate();
        if list.is_empty() {
            return Err(Error::Unavailable(
                "wgpu: no adapter found (no Vulkan, Metal, DX12 or GL driver): install one (e.g. Debian's \
                 mesa-vulkan-drivers) or use --backend cpu"
                    .into(),
            ));
        }
        let idx = match adapter_index {
            Some(i) if i < list.len() => i,
            Some(i) => {
                return Err(Error::flag(
                    "--device",
                    format!("adapter {i} does not exist: there are {} (0..{}), see `wgpt info`", list.len(), list.len() - 1),
                ))
            }
            None => (0..list.len()).min_by_key(|&i| (rank(&list[i]), i)).unwrap(),
        };
        let adapter = list.swap_remove(idx);
        let info = adapter.get_info();
        let limits = adapter.limits();
        // SHADER_F16: f16 weights (inference), read by the f16-specialised matmul and encoder
        // TIMESTAMP_QUERY: per-launch device times for `wgpt bench --profile`
        let features = adapter.features() & (wgpu::Features::SUBGROUP | wgpu::Features::SHADER_F16 | wgpu::Features::TIMESTAMP_QUERY);
        let (device, queue) = pollster::block_on(adapter.request_device(&wgpu::DeviceDescriptor {
            label: Some("wgpt"),
            required_features: features,
            required_limits: limits.clone(),
            experimental_features: Default::default(),
            memory_hints: wgpu::MemoryHints::Performance,
            trace: Default::default(),
        }))
        .map_err(|e| Error::Unavailable(format!("wgpu: cannot open {} ({:?}): {e}", info.name, info.backend)))?;
        let errors: Arc<Mutex<Vec<String>>> = Arc::default();
        let sink = errors.clone();
        device.on_uncaptured_error(Arc::new(move |e: wgpu::Error| {
            sink.lock().unwrap().push(e.to_string());
        }));
        // software adapters: the subgroup kernel (fastest on lavapipe); GPUs: 128×128 tiles
        let large_ok = limits.max_compute_invocations_per_workgroup >= 256 && limits.max_compute_workgroup_size_x >= 256;
        let mode = match std::env::var("WGPT_WGPU_MATMUL").ok().as_deref() {
            Some("tiled") => MatmulMode::Tiled,
            Some("tiled-large") if large_ok => MatmulMode::TiledLarge,
            Some("subgroup") if subgroup_matmul_ok(features, &info) => MatmulMode::Subgroup,
            _ => {
                if info.device_type == wgpu::DeviceType::Cpu {
                    if subgroup_matmul_ok(features, &info) {
                        MatmulMode::Subgroup
                    } else {
                        MatmulMode::Tiled
                    }
                } else if large_ok {
                    MatmulMode::TiledLarge
                } else {
                    MatmulMode::Tiled
                }
            }
        };
        let mut caps = DeviceCaps::from_limits(&limits, mode);
        if info.device_type == wgpu::DeviceType::Cpu {
            // a few cores: only split when a matmul could not keep them busy
            caps.split_k_target = 16;
        }
        let dummy = device.create_buffer(&wgpu::BufferDescriptor {
            label: Some("dummy"),
            size: 256,
            usage: wgpu::BufferUsages::STORAGE,
            mapped_at_creation: false,
        });
        let mut b = WgpuBackend {
            info,
            features,
            limits,
            device,
            queue,
            caps,
            table: BufferTable::default(),
            buffers: Vec::new(),
            staging: HashMap::new(),
            dummy,
            modules: HashMap::new(),
            pipelines: HashMap::new(),
            plans: Vec::new(),
            pending: None,
            tuner: None,
            errors,
        };
        if autotune::enabled(&b.info) {
            let path = crate::cache::cache_dir("wgpu-autotune").map(|d| d.join(autotune::cache_name(&b.info)));
            b.tuner = Some(autotune::Tuner::load(path, &b.matmul_modes()));
        }
        Ok(b)
    }

    pub fn adapter_info(&self) -> &wgpu::AdapterInfo {
        &self.info
    }

    /// The device's limits (the adapter's own).
    pub fn limits(&self) -> &wgpu::Limits {
        &self.limits
    }

    pub fn caps(&self) -> &DeviceCaps {
        &self.caps
    }

    pub fn matmul_mode(&self) -> MatmulMode {
        self.caps.matmul
    }

    /// Whether [`MatmulMode::Subgroup`] is possible here.
    pub fn subgroup_matmul_available(&self) -> bool {
        subgroup_matmul_ok(self.features, &self.info)
    }

    /// The matmul modes this adapter can run (for tests and benchmarks).
    pub fn matmul_modes(&self) -> Vec<MatmulMode> {
        let mut m = vec![MatmulMode::Tiled];
        if self.limits.max_compute_invocations_per_workgroup >= 256 && self.limits.max_compute_workgroup_size_x >= 256 {
            m.push(MatmulMode::TiledLarge);
        }
        if self.subgroup_matmul_available() {
            m.push(MatmulMode::Subgroup);
        }
        m
    }

    /// Chooses the matmul kernels (compiled plans are dropped and rebuilt on their next run).
    pub fn set_matmul_mode(&mut self, mode: MatmulMode) -> Result<()> {
        if !self.matmul_modes().contains(&mode) {
            return Err(Error::Unavailable(format!("wgpu: {} cannot run the {mode:?} matmul", self.info.name)));
        }
        self.flush();
        self.caps.matmul = mode;
        // a mode asked for is the mode used: no tuning from here on
        self.tuner = None;
        self.drop_compiled();
        Ok(())
    }

    /// Pretends the adapter binds at most `bytes` per storage binding, so that tests exercise the
    /// splitting of large bindings on any adapter. Compiled plans are rebuilt.
    #[doc(hidden)]
    pub fn limit_bindings_for_tests(&mut self, bytes: u64) {
        self.flush();
        self.caps.max_binding = bytes.min(self.caps.max_binding);
        self.drop_compiled();
    }

    /// Sets the output-tile count under which long-k matmuls are split along k (tests, tuning).
    #[doc(hidden)]
    pub fn set_split_k_target(&mut self, tiles: u32) {
        self.flush();
        self.caps.split_k_target = tiles;
        self.drop_compiled();
    }

    /// Forget every compiled plan (prepared phases recompile on their next run).
    fn drop_compiled(&mut self) {
        for (_, plan) in self.plans.iter_mut().flatten() {
            *plan = None;
        }
    }

    /// Memory the graph (its buffer table and these launch phases) needs on this device; an
    /// `Error::OutOfMemory` naming what to change if a buffer or a binding cannot fit.
    pub fn plan(&self, table: &BufferTable, phases: &[&[Launch]]) -> Result<MemoryPlan> {
        plan_memory(table, phases, &self.caps)
    }

    fn take_errors(&self) -> Result<()> {
        let mut e = self.errors.lock().unwrap();
        if e.is_empty() {
            return Ok(());
        }
        let msg = e.join("; ");
        e.clear();
        Err(Error::backend("wgpu", msg))
    }

    /// Submits the pending encoder, if any.
    fn flush(&mut self) {
        if let Some(enc) = self.pending.take() {
            self.queue.submit([enc.finish()]);
        }
    }

    fn wait(&self) -> Result<()> {
        self.device
            .poll(wgpu::PollType::wait_indefinitely())
            .map_err(|e| Error::backend("wgpu", format!("waiting for the device: {e}")))?;
        Ok(())
    }

    fn buffer(&self, id: BufId) -> Result<&wgpu::Buffer> {
        self.buffers.get(id.0 as usize).ok_or_else(|| {
            Error::backend("wgpu", format!("buffer id {} is not allocated (alloc has {} buffers)", id.0, self.buffers.len()))
        })
    }

    fn pipeline(&mut self, variant: &Variant, entry: &'static str) -> Result<wgpu::ComputePipeline> {
        let key = (variant.clone(), entry);
        if let Some(p) = self.pipelines.get(&key) {
            return Ok(p.clone());
        }
        let scope = self.device.push_error_scope(wgpu::ErrorFilter::Validation);
        if !self.modules.contains_key(variant) {
            let src = shaders::preprocess(variant)?;
            let m = self.device.create_shader_module(wgpu::ShaderModuleDescriptor {
                label: Some(&variant.describe()),
                source: wgpu::ShaderSource::Wgsl(src.into()),
            });
            self.modules.insert(variant.clone(), m);
        }
        let module = &self.modules[variant];
        let p = self.device.create_compute_pipeline(&wgpu::ComputePipelineDescriptor {
            label: Some(entry),
            layout: None,
            module,
            entry_point: Some(entry),
            compilation_options: Default::default(),
            cache: None,
        });
        if let Some(e) = pollster::block_on(scope.pop()) {
            self.modules.remove(variant);
            return Err(Error::backend("wgpu", format!("shaders/{}.wgsl ({}), {entry}: {e}", variant.family, variant.describe())));
        }
        self.pipelines.insert(key, p.clone());
        Ok(p)
    }

    fn build_plan(&mut self, launches: &[Launch]) -> Result<Plan> {
        let modes = self.tuned_modes(launches)?;
        self.build_plan_with(launches, &modes)
    }

    /// The autotuner's mode for each launch (tuning the matmul shapes it has not seen); empty
    /// when it is off.
    fn tuned_modes(&mut self, launches: &[Launch]) -> Result<Vec<Option<MatmulMode>>> {
        if self.tuner.is_none() {
            return Ok(Vec::new());
        }
        let mut out = Vec::with_capacity(launches.len());
        let mut changed = false;
        for l in launches {
            let Some(shape) = autotune::shape_of(&l.kernel) else {
                out.push(None);
                continue;
            };
            if let Some(&m) = self.tuner.as_ref().and_then(|t| t.modes.get(&shape)) {
                out.push(Some(m));
                continue;
            }
            let m = self.tune(l)?;
            self.tuner.as_mut().expect("on").modes.insert(shape, m);
            changed = true;
            out.push(Some(m));
        }
        if changed {
            self.tuner.as_ref().expect("on").save();
        }
        Ok(out)
    }

    /// Time `l` (a matmul) in every mode this adapter has, on scratch buffers of its buffers'
    /// sizes (the real ones are not touched: a backward accumulates into its gradients), best of
    /// 3 after a warm-up; the fastest mode.
    fn tune(&mut self, l: &Launch) -> Result<MatmulMode> {
        let modes = self.matmul_modes();
        if modes.len() == 1 {
            return Ok(modes[0]);
        }
        self.flush();
        self.wait()?;
        let used: std::collections::HashSet<u32> = l.kernel.args().iter().map(|a| a.view.buf.0).collect();
        let scratch: Vec<wgpu::Buffer> = self
            .table
            .iter()
            .map(|(id, d)| {
                if used.contains(&id.0) {
                    self.device.create_buffer(&wgpu::BufferDescriptor {
                        label: Some("autotune scratch"),
                        size: buffer_bytes(d),
                        usage: wgpu::BufferUsages::STORAGE,
                        mapped_at_creation: false,
                    })
                } else {
                    self.dummy.clone()
                }
            })
            .collect();
        let real = std::mem::replace(&mut self.buffers, scratch);
        let mut times = Vec::new();
        let r = (|| -> Result<()> {
            for &m in &modes {
                let plan = self.build_plan_with(std::slice::from_ref(l), &[Some(m)])?;
                let mut best = f64::MAX;
                for i in 0..4 {
                    let t0 = std::time::Instant::now();
                    let mut enc = self.device.create_command_encoder(&wgpu::CommandEncoderDescriptor { label: Some("autotune") });
                    encode_pass(&mut enc, "autotune", &plan.dispatches, None);
                    self.queue.submit([enc.finish()]);
                    self.wait()?;
                    if i > 0 {
                        best = best.min(t0.elapsed().as_secs_f64() * 1e3);
                    }
                }
                times.push((m, best));
            }
            self.take_errors()
        })();
        self.buffers = real;
        r?;
        let (best, _) = times.iter().copied().min_by(|a, b| a.1.total_cmp(&b.1)).expect("at least one mode");
        let (bwd, n, c, oc) = autotune::shape_of(&l.kernel).expect("a matmul");
        let all: Vec<String> = times.iter().map(|(m, t)| format!("{} {t:.3} ms", autotune::mode_name(*m))).collect();
        eprintln!(
            "wgpt: wgpu autotune: matmul {} n={n} c={c} oc={oc}: {} -> {}",
            if bwd { "bwd" } else { "fwd" },
            all.join(", "),
            autotune::mode_name(best)
        );
        Ok(best)
    }

    fn build_plan_with(&mut self, launches: &[Launch], modes: &[Option<MatmulMode>]) -> Result<Plan> {
        let compiled = compile_with(&self.table, launches, &self.caps, modes)?;
        let stride = self.caps.uniform_align;
        let n = compiled.dispatches.len().max(1) as u64;
        let params = self.device.create_buffer(&wgpu::BufferDescriptor {
            label: Some("params"),
            size: n * stride,
            usage: wgpu::BufferUsages::UNIFORM | wgpu::BufferUsages::COPY_DST,
            mapped_at_creation: false,
        });
        let mut words = vec![0u32; (n * stride / 4) as usize];
        for (i, d) in compiled.dispatches.iter().enumerate() {
            let at = i * (stride / 4) as usize;
            words[at..at + PARAM_WORDS].copy_from_slice(&d.params);
        }
        self.queue.write_buffer(&params, 0, bytemuck::cast_slice(&words));
        let scratch = self.device.create_buffer(&wgpu::BufferDescriptor {
            label: Some("scratch"),
            size: compiled.scratch_bytes.div_ceil(16) * 16,
            usage: wgpu::BufferUsages::STORAGE,
            mapped_at_creation: false,
        });
        let mut ready = Vec::with_capacity(compiled.dispatches.len());
        for (i, d) in compiled.dispatches.iter().enumerate() {
            let pipeline = self.pipeline(&d.variant, d.entry)?;
            let layout = pipeline.get_bind_group_layout(0);
            let scope = self.device.push_error_scope(wgpu::ErrorFilter::Validation);
            let mut entries = vec![wgpu::BindGroupEntry {
                binding: 0,
                resource: wgpu::BindingResource::Buffer(wgpu::BufferBinding {
                    buffer: &params,
                    offset: i as u64 * stride,
                    size: wgpu::BufferSize::new((PARAM_WORDS * 4) as u64),
                }),
            }];
            for b in &d.binds {
                let buffer = match b.target {
                    Target::Table(id) => self.buffer(id)?,
                    Target::Scratch => &scratch,
                    Target::Dummy => &self.dummy,
                };
                entries.push(wgpu::BindGroupEntry {
                    binding: b.slot,
                    resource: wgpu::BindingResource::Buffer(wgpu::BufferBinding {
                        buffer,
                        offset: b.offset,
                        size: wgpu::BufferSize::new(b.size),
                    }),
                });
            }
            let bind_group = self.device.create_bind_group(&wgpu::BindGroupDescriptor {
                label: Some(&d.label),
                layout: &layout,
                entries: &entries,
            });
            if let Some(e) = pollster::block_on(scope.pop()) {
                return Err(Error::backend("wgpu", format!("launch '{}' ({}): {e}", d.label, d.entry)));
            }
            ready.push(Ready { pipeline, bind_group, groups: d.groups, launch: d.launch });
        }
        let label = launches.first().map(|l| l.label.clone()).unwrap_or_default();
        Ok(Plan { label, dispatches: ready, _params: params, _scratch: scratch })
    }

    fn write_bytes(&mut self, id: BufId, bytes: &[u8]) -> Result<()> {
        // earlier recorded work may read this buffer: submit it before the write is queued
        self.flush();
        if !bytes.is_empty() {
            let buf = self.buffer(id)?.clone();
            self.queue.write_buffer(&buf, 0, bytes);
        }
        self.take_errors()
    }

    /// Reads elements [offset, offset+len) of a buffer as bytes; `cache` keeps a small staging
    /// buffer for the next read of the same buffer.
    fn read_bytes(&mut self, id: BufId, offset: usize, len: usize, cache: bool) -> Result<Vec<u8>> {
        let src = self.buffer(id)?.clone();
        if len == 0 {
            return Ok(Vec::new());
        }
        let elem = self.table.get(id).dtype.size() as u64;
        // copies move multiples of 4 bytes: round a 2-byte view out to whole words
        let (first, last) = (offset as u64 * elem, (offset + len) as u64 * elem);
        let (start, end) = (first / 4 * 4, last.div_ceil(4) * 4);
        let size = end - start;
        let cached = if cache { self.staging.get(&id.0).filter(|s| s.size() == size).cloned() } else { None };
        let staging = match cached {
            Some(s) => s,
            None => {
                let s = self.device.create_buffer(&wgpu::BufferDescriptor {
                    label: Some("staging"),
                    size,
                    usage: wgpu::BufferUsages::MAP_READ | wgpu::BufferUsages::COPY_DST,
                    mapped_at_creation: false,
                });
                if cache && size <= CACHED_STAGING_BYTES {
                    self.staging.insert(id.0, s.clone());
                }
                s
            }
        };
        let mut enc = self
            .pending
            .take()
            .unwrap_or_else(|| self.device.create_command_encoder(&wgpu::CommandEncoderDescriptor { label: Some("download") }));
        enc.copy_buffer_to_buffer(&src, start, &staging, 0, size);
        self.queue.submit([enc.finish()]);
        let (tx, rx) = std::sync::mpsc::channel();
        staging.map_async(wgpu::MapMode::Read, .., move |r| {
            let _ = tx.send(r);
        });
        self.wait()?;
        self.take_errors()?;
        rx.recv()
            .map_err(|_| Error::backend("wgpu", "buffer mapping was dropped"))?
            .map_err(|e| Error::backend("wgpu", format!("mapping a buffer for reading: {e}")))?;
        let out = {
            let view = staging
                .get_mapped_range(..)
                .map_err(|e| Error::backend("wgpu", format!("reading a mapped buffer: {e}")))?;
            view[(first - start) as usize..(last - start) as usize].to_vec()
        };
        staging.unmap();
        Ok(out)
    }
}

impl Backend for WgpuBackend {
    fn name(&self) -> String {
        format!("wgpu: {} ({:?})", self.info.name, self.info.backend)
    }

    fn kind(&self) -> crate::backend::BackendKind {
        crate::backend::BackendKind::Wgpu
    }

    fn runs_on_host_cores(&self) -> bool {
        self.info.device_type == wgpu::DeviceType::Cpu
    }

    /// f16 buffers (the weights of f16 inference: `Class::Weight` views of the matmul forward
    /// and the cached encoder, read by shaders specialised for f16 and converted to f32) where
    /// the adapter has SHADER_F16; no bf16.
    fn supports(&self, dtype: DType) -> bool {
        match dtype {
            DType::F32 | DType::I32 => true,
            DType::F16 => self.features.contains(wgpu::Features::SHADER_F16),
            DType::BF16 => false,
        }
    }

    fn check_fits(&self, table: &BufferTable, phases: &[&[Launch]]) -> Result<()> {
        self.plan(table, phases).map(|_| ())
    }

    fn alloc(&mut self, table: &BufferTable) -> Result<()> {
        self.check_dtypes(table)?;
        // sizes first: say what does not fit before allocating anything
        plan_memory(table, &[], &self.caps)?;
        self.flush();
        self.plans.clear();
        self.staging.clear();
        self.buffers.clear();
        let scope = self.device.push_error_scope(wgpu::ErrorFilter::OutOfMemory);
        let mut total = 0u64;
        for (_, d) in table.iter() {
            let size = buffer_bytes(d);
            total += size;
            self.buffers.push(self.device.create_buffer(&wgpu::BufferDescriptor {
                label: Some(&d.name),
                size,
                usage: wgpu::BufferUsages::STORAGE | wgpu::BufferUsages::COPY_SRC | wgpu::BufferUsages::COPY_DST,
                mapped_at_creation: false,
            }));
        }
        if let Some(e) = pollster::block_on(scope.pop()) {
            self.buffers.clear();
            return Err(Error::OutOfMemory(format!(
                "wgpu: {} cannot hold the step's {} of buffers ({e}): lower --batch or --seq-len",
                self.info.name,
                mib(total)
            )));
        }
        self.table = table.clone();
        self.take_errors()
    }

    fn table(&self) -> &BufferTable {
        &self.table
    }

    /// The storage buffers' sizes: the table's bytes, each rounded up to whole 4-byte words.
    fn allocated_bytes(&self) -> Option<u64> {
        Some(self.buffers.iter().map(|b| b.size()).sum())
    }

    fn upload_bytes(&mut self, id: BufId, bytes: &[u8]) -> Result<()> {
        if bytes.len() % 4 != 0 {
            // queue writes move whole words; pad a 2-byte buffer of odd length (its allocation is
            // rounded up to 4 bytes, see compile::buffer_bytes)
            let mut padded = bytes.to_vec();
            padded.resize(bytes.len().div_ceil(4) * 4, 0);
            return self.write_bytes(id, &padded);
        }
        self.write_bytes(id, bytes)
    }

    fn download_bytes(&mut self, view: View) -> Result<Vec<u8>> {
        let whole = view.offset == 0 && view.len == self.table.get(view.buf).len;
        self.read_bytes(view.buf, view.offset, view.len, whole)
    }

    fn prepare_valid(&mut self, launches: &[Launch]) -> Result<Prepared> {
        self.plans.push(Some((launches.to_vec(), None)));
        Ok(Prepared(self.plans.len() - 1))
    }

    fn run_prepared(&mut self, phase: Prepared) -> Result<()> {
        let Some(Some((launches, plan))) = self.plans.get_mut(phase.0).map(Option::take) else {
            return Err(Error::Internal(format!("prepared phase #{} is not on this backend", phase.0)));
        };
        if launches.is_empty() {
            self.plans[phase.0] = Some((launches, None));
            return Ok(());
        }
        let plan = match plan {
            Some(p) => p,
            None => match self.build_plan(&launches) {
                Ok(p) => p,
                Err(e) => {
                    self.plans[phase.0] = Some((launches, None));
                    return Err(e);
                }
            },
        };
        {
            let device = &self.device;
            let enc = self
                .pending
                .get_or_insert_with(|| device.create_command_encoder(&wgpu::CommandEncoderDescriptor { label: Some("step") }));
            encode_pass(enc, &plan.label, &plan.dispatches, None);
        }
        self.plans[phase.0] = Some((launches, Some(plan)));
        self.take_errors()
    }

    fn release(&mut self, phase: Prepared) {
        if let Some(p) = self.plans.get_mut(phase.0) {
            *p = None;
        }
    }

    fn sync(&mut self) -> Result<()> {
        self.flush();
        self.wait()?;
        self.take_errors()
    }

    fn raw_buffer(&mut self, _id: BufId) -> Result<RawBuffer<'_>> {
        self.flush();
        Ok(RawBuffer::Staged)
    }

    /// Each dispatch in a compute pass of its own with a timestamp at its start and end (where
    /// the adapter has TIMESTAMP_QUERY), summed per launch; else each launch's dispatches are
    /// submitted alone and the device waited for, on the wall clock.
    fn profile_valid(&mut self, launches: &[Launch]) -> Result<crate::backend::Profile> {
        let plan = self.build_plan(launches)?;
        let mut ms = vec![0f64; launches.len()];
        let encode = |enc: &mut wgpu::CommandEncoder, d: &Ready, ts: Option<wgpu::ComputePassTimestampWrites<'_>>| encode_pass(enc, "profile", [d], ts);
        if !self.features.contains(wgpu::Features::TIMESTAMP_QUERY) {
            for (i, slot) in ms.iter_mut().enumerate() {
                let t0 = std::time::Instant::now();
                let mut enc = self.device.create_command_encoder(&wgpu::CommandEncoderDescriptor { label: Some("profile") });
                for d in plan.dispatches.iter().filter(|d| d.launch == i) {
                    encode(&mut enc, d, None);
                }
                self.queue.submit([enc.finish()]);
                self.wait()?;
                *slot = t0.elapsed().as_secs_f64() * 1e3;
            }
            self.take_errors()?;
            return Ok(crate::backend::Profile { ms, clock: "wall clock" });
        }
        let period_ns = self.queue.get_timestamp_period() as f64;
        // two timestamps per dispatch, at most QUERY_SET_MAX_QUERIES per set
        for chunk in plan.dispatches.chunks((wgpu::QUERY_SET_MAX_QUERIES / 2) as usize) {
            let n = 2 * chunk.len() as u32;
            let set = self.device.create_query_set(&wgpu::QuerySetDescriptor { label: Some("profile"), ty: wgpu::QueryType::Timestamp, count: n });
            let bytes = n as u64 * 8;
            let resolve = self.device.create_buffer(&wgpu::BufferDescriptor {
                label: Some("profile resolve"),
                size: bytes,
                usage: wgpu::BufferUsages::QUERY_RESOLVE | wgpu::BufferUsages::COPY_SRC,
                mapped_at_creation: false,
            });
            let read = self.device.create_buffer(&wgpu::BufferDescriptor {
                label: Some("profile read"),
                size: bytes,
                usage: wgpu::BufferUsages::MAP_READ | wgpu::BufferUsages::COPY_DST,
                mapped_at_creation: false,
            });
            let mut enc = self.device.create_command_encoder(&wgpu::CommandEncoderDescriptor { label: Some("profile") });
            for (k, d) in chunk.iter().enumerate() {
                let ts = wgpu::ComputePassTimestampWrites {
                    query_set: &set,
                    beginning_of_pass_write_index: Some(2 * k as u32),
                    end_of_pass_write_index: Some(2 * k as u32 + 1),
                };
                encode(&mut enc, d, Some(ts));
            }
            enc.resolve_query_set(&set, 0..n, &resolve, 0);
            enc.copy_buffer_to_buffer(&resolve, 0, &read, 0, bytes);
            self.queue.submit([enc.finish()]);
            let slice = read.slice(..);
            slice.map_async(wgpu::MapMode::Read, |_| {});
            self.wait()?;
            let stamps: Vec<u64> = {
                let view = slice.get_mapped_range().map_err(|e| Error::backend("wgpu", format!("reading the timestamps: {e}")))?;
                bytemuck::pod_collect_to_vec(&view[..])
            };
            read.unmap();
            for (k, d) in chunk.iter().enumerate() {
                let ticks = stamps[2 * k + 1].saturating_sub(stamps[2 * k]);
                ms[d.launch] += ticks as f64 * period_ns / 1e6;
            }
        }
        self.take_errors()?;
        Ok(crate::backend::Profile { ms, clock: "timestamp queries" })
    }
}

impl Drop for WgpuBackend {
    fn drop(&mut self) {
        self.flush();
    }
}

/// Simple deterministic fill for benchmarks: uniform in [-1, 1).
fn bench_fill(n: usize, seed: u64) -> Vec<f32> {
    let mut s = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
    (0..n)
        .map(|_| {
            s = s.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            ((s >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
        })
        .collect()
}

/// GFLOP/s of the forward matmul out (m,n) = inp (m,k) · W (n,k)ᵀ on an adapter, with the
/// adapter's default matmul kernels; `iters` timed runs after one warm-up, one submit in all.
pub fn bench_matmul(adapter: Option<usize>, m: usize, k: usize, n: usize, iters: usize) -> Result<f64> {
    let mut be = WgpuBackend::new(adapter)?;
    bench_matmul_on(&mut be, m, k, n, iters)
}

/// As [`bench_matmul`], on an open backend (whose matmul mode the caller may have set).
pub fn bench_matmul_on(be: &mut WgpuBackend, m: usize, k: usize, n: usize, iters: usize) -> Result<f64> {
    bench_matmul_kind(be, m, k, n, iters, false)
}

/// GFLOP/s of the matmul backward (dinp = dout·W and dW += doutᵀ·inp: 4·m·k·n flops) for the
/// forward shape (m,k)·(n,k)ᵀ.
pub fn bench_matmul_backward_on(be: &mut WgpuBackend, m: usize, k: usize, n: usize, iters: usize) -> Result<f64> {
    bench_matmul_kind(be, m, k, n, iters, true)
}

fn bench_matmul_kind(be: &mut WgpuBackend, m: usize, k: usize, n: usize, iters: usize, backward: bool) -> Result<f64> {
    use crate::graph::Role;
    if m == 0 || k == 0 || n == 0 || iters == 0 {
        return Err(Error::flag("--iters", "matmul sizes and the iteration count must be positive"));
    }
    let mut t = BufferTable::default();
    let inp = t.add("inp", m * k, DType::F32, Role::Activation);
    let w = t.add("weight", n * k, DType::F32, Role::Param(0));
    let out = t.add("out", m * n, DType::F32, Role::Activation);
    let dinp = t.add("dinp", if backward { m * k } else { 0 }, DType::F32, Role::ActGrad);
    let dw = t.add("dweight", if backward { n * k } else { 0 }, DType::F32, Role::Grad(0));
    be.plan(&t, &[])?;
    be.alloc(&t)?;
    be.upload_f32(inp, &bench_fill(m * k, 1))?;
    be.upload_f32(w, &bench_fill(n * k, 2))?;
    be.upload_f32(out, &bench_fill(m * n, 3))?;
    let view = |b: BufId, len: usize| View { buf: b, offset: 0, len };
    let kernel = if backward {
        Kernel::MatmulBackward {
            dinp: view(dinp, m * k),
            dweight: view(dw, n * k),
            dbias: None,
            dout: view(out, m * n),
            inp: view(inp, m * k),
            weight: view(w, n * k),
            n: m,
            c: k,
            oc: n,
        }
    } else {
        Kernel::MatmulForward { out: view(out, m * n), inp: view(inp, m * k), weight: view(w, n * k), bias: None, n: m, c: k, oc: n }
    };
    let launch = vec![Launch { label: "bench.matmul".into(), kernel }];
    let phase = be.prepare(&launch)?;
    be.run_prepared(phase)?;
    be.sync()?;
    let t0 = std::time::Instant::now();
    for _ in 0..iters {
        be.run_prepared(phase)?;
    }
    be.sync()?;
    let secs = t0.elapsed().as_secs_f64();
    let flops = if backward { 4.0 } else { 2.0 } * m as f64 * k as f64 * n as f64;
    Ok(flops * iters as f64 / secs / 1e9)
}
