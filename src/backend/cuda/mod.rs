//! The CUDA backend: `cuda/*.cu` compiled by NVRTC for the exact GPU (CUBIN, cached on disk),
//! matmuls through cuBLAS (or a built-in GEMM kernel where libcublas is absent, and for every
//! matmul with an f16 weight in an f32 or bf16 launch: f16 inference converts each weight to
//! f32), all on one stream with no host synchronisation inside `run`. Every NVIDIA library is
//! loaded at run time through cudarc, so the binary builds and runs without a CUDA toolkit; see
//! `dl` for how the libraries are found and `probe` for `wgpt info`.
//!
//! Precisions (`Backend::precisions`): f32 and f16 on every GPU (sm_70+), bf16 from sm_80; bf16
//! on an older GPU is refused in one line naming `--precision fp16`. Each family is one source
//! specialised per precision (`floatX` of `cuda/common.cuh`, see `compile`): the f32 modules are
//! compiled at start-up, a 16-bit precision's the first time a phase using it is prepared, and
//! each launch runs the functions of its own precision (`Kernel::precision`). A 16-bit kernel
//! loads 16-bit values as f32, computes in f32 and rounds once on each store, which is what the
//! cpu reference computes; 16-bit matmuls are cuBLAS GemmEx (A, B and C 16-bit, f32 compute,
//! the default tensor-op algorithm; the bias is broadcast into C first and added with beta = 1,
//! so the output is rounded once) or the built-in GEMM in that precision.

pub mod compile;
pub mod dl;
pub mod nvrtc;
pub mod probe;

use crate::backend::cuda::dl::CudaError;
use std::ffi::c_void;
use std::sync::Arc;

use cudarc::cublas::{result as blas_result, sys as blas_sys, CudaBlas};
use cudarc::driver::{result as drv, sys as drv_sys, CudaContext, CudaFunction, CudaStream};

use crate::backend::{Backend, Prepared, RawBuffer};
use crate::error::{Error, Result};
use crate::graph::{BufId, BufferTable, DType, Kernel, Launch, View};

pub use compile::{compile_all, CompileReport, FunctionStats, Target, SOURCES};
pub use probe::{probe, CudaDeviceInfo, CudaProbe, DriverInfo};

/// Start-up choices for [`CudaBackend::with_options`].
#[derive(Clone, Debug, Default)]
pub struct CudaOptions {
    /// let cuBLAS use TF32 tensor cores (sm_80+; ~10 mantissa bits in the matmul inputs)
    pub tf32: bool,
    /// use the built-in GEMM kernel even where cuBLAS is present (also `WGPT_CUDA_NO_CUBLAS=1`)
    pub no_cublas: bool,
}

const BACKEND: &str = "cuda";
/// Threads per block of the attention kernels, and rows per tile (see cuda/attention.cu).
const ATTN_THREADS: u32 = 256;
const ATTN_TILE: usize = 32;
const ATTN_MAX_HS: usize = 128;
/// Threads per block of `attention_cached` (DEC_NT in cuda/attention.cu).
const DEC_THREADS: u32 = 256;
/// Blocks of the first sum-of-squares stage (fixed per size: deterministic).
const SUMSQ_MAX_BLOCKS: usize = 1024;

fn berr(msg: impl Into<String>) -> Error {
    Error::backend(BACKEND, msg)
}

fn drv_err(what: &str, e: drv::DriverError) -> Error {
    if e.0 == drv_sys::CUresult::CUDA_ERROR_OUT_OF_MEMORY {
        return Error::OutOfMemory(format!("cuda: out of device memory ({what}); reduce --batch or --seq-len"));
    }
    berr(format!("{what}: {}", probe::driver_error(e)))
}

/// Device memory owned by the backend (cuMemAlloc / cuMemFree).
struct DevMem {
    ptr: drv_sys::CUdeviceptr,
    bytes: usize,
    ctx: Arc<CudaContext>,
}

impl DevMem {
    fn new(ctx: &Arc<CudaContext>, bytes: usize, what: &str) -> Result<DevMem> {
        let ptr = unsafe { drv::malloc_sync(bytes.max(16)) }.map_err(|e| drv_err(what, e))?;
        Ok(DevMem { ptr, bytes, ctx: ctx.clone() })
    }
}

impl Drop for DevMem {
    fn drop(&mut self) {
        let _ = self.ctx.bind_to_thread();
        let _ = unsafe { drv::free_sync(self.ptr) };
    }
}

struct Buf {
    mem: DevMem,
    len: usize,
    dtype: DType,
}

/// Every kernel of every module, in one precision (the modules compiled with that `floatX`).
struct Funcs {
    encoder_forward: CudaFunction,
    encoder_backward_wpe: CudaFunction,
    /// f32 only (atomics)
    encoder_backward_wte: CudaFunction,
    /// the deterministic wte gradient of the 16-bit precisions (row chains, then one store per element)
    encoder_backward_wte_links: CudaFunction,
    encoder_backward_wte_chain: CudaFunction,
    /// `encoder_at` by (wte, wpe) dtype: [floatX floatX, f16 f16, f16 floatX, floatX f16]
    encoder_at: [CudaFunction; 4],
    layernorm_forward: CudaFunction,
    layernorm_backward_dinp: CudaFunction,
    layernorm_backward_params_partial: CudaFunction,
    layernorm_backward_params_finish: CudaFunction,
    add_bias: CudaFunction,
    bias_broadcast: CudaFunction,
    bias_grad_partial: CudaFunction,
    bias_grad_finish: CudaFunction,
    sgemm_fallback: CudaFunction,
    /// the built-in GEMM with an f16 B operand (an f16 weight of a matmul forward)
    sgemm_fallback_f16b: CudaFunction,
    attention_forward: CudaFunction,
    attention_backward_dq: CudaFunction,
    attention_backward_dkv: CudaFunction,
    kv_store: CudaFunction,
    attention_cached: CudaFunction,
    gelu_forward: CudaFunction,
    gelu_backward: CudaFunction,
    residual_forward: CudaFunction,
    crossentropy: CudaFunction,
    sum_squares_partial: CudaFunction,
    sum_squares_finish: CudaFunction,
    clip_scale: CudaFunction,
    adamw_update: CudaFunction,
}

/// A kernel argument (each is passed by pointer to an 8-byte slot; the driver reads its size).
#[derive(Clone, Copy)]
enum A {
    P(u64),
    I(i32),
    L(i64),
    F(f32),
}

/// Load and initialise the driver and check that `device` exists, with one-line errors ("no
/// CUDA driver found (libcuda.so); use --backend wgpu or cpu"): what must hold before cudarc
/// is called at all (it panics where there is no driver).
pub fn open_device(device: usize) -> Result<DriverInfo> {
    let driver = probe::init_driver().map_err(|e| {
        if e.not_found {
            Error::Unavailable(format!("{e}; use --backend wgpu or cpu"))
        } else {
            Error::Unavailable(format!("CUDA driver unusable: {e}; use --backend wgpu or cpu"))
        }
    })?;
    let count = drv::device::get_count().map_err(|e| drv_err("cuDeviceGetCount", e))?;
    if count <= 0 {
        return Err(Error::Unavailable("no CUDA device found; use --backend wgpu or cpu".into()));
    }
    if device >= count as usize {
        return Err(Error::flag("--device", format!("CUDA device {device} does not exist ({count} found; see wgpt info)")));
    }
    Ok(driver)
}

/// The CUDA backend. Create with [`CudaBackend::new`].
pub struct CudaBackend {
    bufs: Vec<Buf>,
    table: BufferTable,
    /// prepared phases (validated launches)
    phases: Vec<Option<Vec<Launch>>>,
    scratch: Option<DevMem>,
    /// scratch buffers replaced while work may still use them; freed at the next sync
    retired: Vec<DevMem>,
    blas: Option<CudaBlas>,
    /// the kernels by precision ([`pidx`]); f32 from the start, the others once a phase needs them
    funcs: [Option<Arc<Funcs>>; 3],
    /// dynamic shared memory each attention kernel (by precision) has been allowed so far (cuFuncSetAttribute)
    attn_smem_allowed: [[usize; 3]; 3],
    smem_optin: usize,
    info: CudaDeviceInfo,
    target: Target,
    tf32: bool,
    stream: Arc<CudaStream>,
    ctx: Arc<CudaContext>,
}

/// The index of a precision in the per-precision arrays: f32 0, f16 1, bf16 2.
fn pidx(p: DType) -> usize {
    match p {
        DType::F16 => 1,
        DType::BF16 => 2,
        _ => 0,
    }
}

/// Compile (or take from the cache) every family for `target` in `precision`, load the modules
/// and look up every kernel.
fn load_funcs(ctx: &Arc<CudaContext>, target: Target, precision: DType) -> Result<Funcs> {
    let mut modules = std::collections::HashMap::new();
    for (family, src) in SOURCES {
        let what = format!("loading cuda/{family}.cu ({} {precision})", target.arch_flag());
        let (image, cached) = compile::compile_cached(family, src, target, precision)?;
        let m = match ctx.load_module(cudarc::nvrtc::Ptx::from_binary(image)) {
            Ok(m) => m,
            Err(e) => match cached {
                // a damaged cache file: drop it and compile afresh
                Some(path) => {
                    let _ = std::fs::remove_file(&path);
                    let (image, _) = compile::compile_cached(family, src, target, precision)?;
                    ctx.load_module(cudarc::nvrtc::Ptx::from_binary(image)).map_err(|e| drv_err(&what, e))?
                }
                None => return Err(drv_err(&what, e)),
            },
        };
        modules.insert(*family, m);
    }
    let get = |family: &str, name: &str| -> Result<CudaFunction> {
        modules[family].load_function(name).map_err(|e| drv_err(&format!("cuda/{family}.cu ({precision}): kernel {name}"), e))
    };
    Ok(Funcs {
        encoder_forward: get("encoder", "encoder_forward")?,
        encoder_backward_wpe: get("encoder", "encoder_backward_wpe")?,
        encoder_backward_wte: get("encoder", "encoder_backward_wte")?,
        encoder_backward_wte_links: get("encoder", "encoder_backward_wte_links")?,
        encoder_backward_wte_chain: get("encoder", "encoder_backward_wte_chain")?,
        encoder_at: [
            get("encoder", "encoder_at")?,
            get("encoder", "encoder_at_f16")?,
            get("encoder", "encoder_at_f16_wte")?,
            get("encoder", "encoder_at_f16_wpe")?,
        ],
        layernorm_forward: get("layernorm", "layernorm_forward")?,
        layernorm_backward_dinp: get("layernorm", "layernorm_backward_dinp")?,
        layernorm_backward_params_partial: get("layernorm", "layernorm_backward_params_partial")?,
        layernorm_backward_params_finish: get("layernorm", "layernorm_backward_params_finish")?,
        add_bias: get("matmul", "add_bias")?,
        bias_broadcast: get("matmul", "bias_broadcast")?,
        bias_grad_partial: get("matmul", "bias_grad_partial")?,
        bias_grad_finish: get("matmul", "bias_grad_finish")?,
        sgemm_fallback: get("matmul", "sgemm_fallback")?,
        sgemm_fallback_f16b: get("matmul", "sgemm_fallback_f16b")?,
        attention_forward: get("attention", "attention_forward")?,
        attention_backward_dq: get("attention", "attention_backward_dq")?,
        attention_backward_dkv: get("attention", "attention_backward_dkv")?,
        kv_store: get("attention", "kv_store")?,
        attention_cached: get("attention", "attention_cached")?,
        gelu_forward: get("gelu", "gelu_forward")?,
        gelu_backward: get("gelu", "gelu_backward")?,
        residual_forward: get("residual", "residual_forward")?,
        crossentropy: get("classifier", "crossentropy_forward_backward")?,
        sum_squares_partial: get("reduce", "sum_squares_partial")?,
        sum_squares_finish: get("reduce", "sum_squares_finish")?,
        clip_scale: get("reduce", "clip_scale")?,
        adamw_update: get("adamw", "adamw_update")?,
    })
}

fn grid1(n: usize, block: u32) -> u32 {
    n.div_ceil(block as usize).clamp(1, 1 << 20) as u32
}

/// A cuBLAS handle on `stream` with TF32 tensor-op math if `tf32`, or why not.
fn open_cublas(stream: &Arc<CudaStream>, tf32: bool) -> std::result::Result<CudaBlas, CudaError> {
    let b = CudaBlas::new(stream.clone()).map_err(|e| format!("cublasCreate: {e:?}"))?;
    let mode = if tf32 { blas_sys::cublasMath_t::CUBLAS_TF32_TENSOR_OP_MATH } else { blas_sys::cublasMath_t::CUBLAS_DEFAULT_MATH };
    unsafe { blas_sys::cublasSetMathMode(*b.handle(), mode) }.result().map_err(|e| format!("cublasSetMathMode: {e:?}"))?;
    Ok(b)
}

impl CudaBackend {
    /// Open device `device`, compile (or load from the cache) every kernel for its exact compute
    /// capability, and prepare cuBLAS. Errors are one line, e.g. "no CUDA driver found
    /// (libcuda.so); use --backend wgpu or cpu".
    pub fn new(device: usize) -> Result<CudaBackend> {
        Self::with_options(device, CudaOptions::default())
    }

    pub fn with_options(device: usize, opts: CudaOptions) -> Result<CudaBackend> {
        let driver = open_device(device)?;
        let info = probe::device_info(device).map_err(|e| berr(format!("device {device}: {e}")))?;
        dl::lib(dl::Which::Nvrtc).map_err(|e| {
            Error::Unavailable(format!("{e}; the CUDA backend compiles its kernels with NVRTC (or use --backend wgpu or cpu)"))
        })?;
        if let Some(e) = probe::nvrtc_too_new(&driver) {
            return Err(Error::Unavailable(e));
        }
        let cc = (info.cc_major * 10 + info.cc_minor) as u32;
        let supported = compile::supported_archs().map_err(|e| Error::Unavailable(format!("NVRTC unusable: {e}")))?;
        let target = if supported.contains(&cc) {
            Target::Cubin(cc)
        } else if let Some(&best) = supported.iter().filter(|&&a| a < cc).max() {
            // a GPU newer than this NVRTC: PTX for the newest architecture it knows, JIT-ed by the driver
            Target::Ptx(best)
        } else {
            return Err(Error::Unavailable(format!(
                "{} is sm_{cc}, older than this NVRTC supports (sm_{}+); use --backend wgpu or cpu",
                info.name,
                supported.iter().min().copied().unwrap_or(0)
            )));
        };

        let ctx = CudaContext::new(device).map_err(|e| drv_err("creating the CUDA context", e))?;
        // one stream, ordered: cudarc's per-buffer events are not needed
        unsafe { ctx.disable_event_tracking() };
        let stream = ctx.new_stream().map_err(|e| drv_err("creating a stream", e))?;

        let f32_funcs = load_funcs(&ctx, target, DType::F32)?;

        let env_no_blas = std::env::var("WGPT_CUDA_NO_CUBLAS").map(|v| !v.is_empty() && v != "0").unwrap_or(false);
        let blas = if opts.no_cublas || env_no_blas || dl::lib(dl::Which::Cublas).is_err() {
            None
        } else {
            // a cuBLAS that cannot start here (e.g. a CUDA 12 cuBLAS on a CUDA 11 driver) costs
            // speed, not the run: the built-in GEMM takes over
            match open_cublas(&stream, opts.tf32 && info.cc_major >= 8) {
                Ok(b) => Some(b),
                Err(e) => {
                    eprintln!("warning: cuBLAS unusable ({e}); matmuls use the built-in GEMM kernel");
                    None
                }
            }
        };
        let smem_optin = ctx
            .attribute(drv_sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MAX_SHARED_MEMORY_PER_BLOCK_OPTIN)
            .map(|v| v.max(0) as usize)
            .unwrap_or(48 * 1024);
        Ok(CudaBackend {
            bufs: Vec::new(),
            scratch: None,
            table: BufferTable::default(),
            phases: Vec::new(),
            retired: Vec::new(),
            tf32: opts.tf32 && blas.is_some() && info.cc_major >= 8,
            blas,
            funcs: [Some(Arc::new(f32_funcs)), None, None],
            attn_smem_allowed: [[48 * 1024; 3]; 3],
            smem_optin,
            info,
            target,
            stream,
            ctx,
        })
    }

    /// The GPU in use.
    pub fn device(&self) -> &CudaDeviceInfo {
        &self.info
    }

    /// Whether matmuls go through cuBLAS (else the built-in GEMM kernel).
    pub fn uses_cublas(&self) -> bool {
        self.blas.is_some()
    }

    /// The compute capability as one number (sm_86 → 86).
    fn cc(&self) -> u32 {
        (self.info.cc_major * 10 + self.info.cc_minor) as u32
    }

    /// The kernels of precision `p` (loaded by `load_precisions` when the phase was prepared).
    fn funcs(&self, p: DType) -> Result<Arc<Funcs>> {
        self.funcs[pidx(p)].clone().ok_or_else(|| Error::Internal(format!("cuda: no {p} kernels were loaded for a prepared launch")))
    }

    /// Compile and load the modules of every precision `launches` use that is not loaded yet
    /// (at prepare time: a run never compiles).
    fn load_precisions(&mut self, launches: &[Launch]) -> Result<()> {
        for l in launches {
            let p = l.kernel.precision(&self.table);
            if self.funcs[pidx(p)].is_none() {
                self.bind()?;
                self.funcs[pidx(p)] = Some(Arc::new(load_funcs(&self.ctx, self.target, p)?));
            }
        }
        Ok(())
    }

    /// The dtype of a view's buffer.
    fn dtype(&self, v: &View) -> DType {
        self.bufs[v.buf.0 as usize].dtype
    }

    /// Read a whole i32 buffer back (waits for pending work).
    fn bind(&self) -> Result<()> {
        self.ctx.bind_to_thread().map_err(|e| drv_err("binding the CUDA context", e))
    }

    /// Device address of a view (validated by `graph::validate` when its phase was prepared):
    /// the element offset times its buffer's element size (2 bytes for f16).
    fn dp(&self, v: &View) -> u64 {
        let b = &self.bufs[v.buf.0 as usize];
        b.mem.ptr + (v.offset * b.dtype.size()) as u64
    }

    /// Whether a view's buffer holds f16 (a weight of f16 inference; `validate` allows it only
    /// where `Kernel::weight_dtypes` does).
    fn is_f16(&self, v: &View) -> bool {
        self.bufs[v.buf.0 as usize].dtype == DType::F16
    }

    /// The scratch area for a launch that needs `floats` f32s. `prepare` sized it for every
    /// launch of every phase (see `scratch_floats`), so a run never allocates.
    fn scratch(&self, floats: usize) -> Result<u64> {
        match &self.scratch {
            Some(s) if s.bytes >= floats * 4 => Ok(s.ptr),
            _ => Err(Error::Internal(format!("cuda: a launch needs {floats} scratch floats that prepare did not reserve"))),
        }
    }

    /// Grow the scratch area to `floats` f32s if it is smaller (at prepare time; an area that
    /// queued work may still use retires until the next sync).
    fn reserve_scratch(&mut self, floats: usize) -> Result<()> {
        let bytes = floats.max(1) * 4;
        if self.scratch.as_ref().map(|s| s.bytes < bytes).unwrap_or(true) {
            self.bind()?;
            let grown = DevMem::new(&self.ctx, bytes.next_power_of_two().max(1 << 16), "scratch")?;
            if let Some(old) = self.scratch.replace(grown) {
                self.retired.push(old);
            }
        }
        Ok(())
    }

    fn launch(&self, f: &CudaFunction, grid: (u32, u32, u32), block: (u32, u32, u32), smem: u32, args: &[A], label: &str) -> Result<()> {
        let mut slots: Vec<u64> = args
            .iter()
            .map(|a| match *a {
                A::P(p) => p,
                A::I(i) => i as u32 as u64,
                A::L(l) => l as u64,
                A::F(x) => x.to_bits() as u64,
            })
            .collect();
        let mut params: Vec<*mut c_void> = slots.iter_mut().map(|s| s as *mut u64 as *mut c_void).collect();
        unsafe { drv::launch_kernel(f.cu_function(), grid, block, smem, self.stream.cu_stream(), &mut params) }
            .map_err(|e| drv_err(label, e))
    }

    fn launch1(&self, f: &CudaFunction, n: usize, args: &[A], label: &str) -> Result<()> {
        self.launch(f, (grid1(n, 256), 1, 1), (256, 1, 1), 0, args, label)
    }

    /// An elementwise kernel `f(views…, long long n)` over n f32s of each view.
    fn elementwise(&self, f: &CudaFunction, views: &[(&View, &str)], n: usize, label: &str) -> Result<()> {
        let mut args = Vec::with_capacity(views.len() + 1);
        for (v, _) in views {
            args.push(A::P(self.dp(v)));
        }
        args.push(A::L(n as i64));
        self.launch1(f, n, &args, label)
    }

    /// Allow `bytes` of dynamic shared memory for attention kernel `which` (0 fwd, 1 dq, 2 dkv) of
    /// the precision `p` (whose kernels are `f`).
    fn attn_smem(&mut self, f: &Funcs, p: DType, which: usize, bytes: usize, label: &str) -> Result<()> {
        if bytes > self.smem_optin {
            return Err(berr(format!(
                "{label}: attention needs {bytes} bytes of shared memory per block, the GPU allows {}",
                self.smem_optin
            )));
        }
        if bytes > self.attn_smem_allowed[pidx(p)][which] {
            let f = match which {
                0 => &f.attention_forward,
                1 => &f.attention_backward_dq,
                _ => &f.attention_backward_dkv,
            };
            unsafe {
                drv::function::set_function_attribute(
                    f.cu_function(),
                    drv_sys::CUfunction_attribute::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
                    bytes as i32,
                )
            }
            .map_err(|e| drv_err(label, e))?;
            self.attn_smem_allowed[pidx(p)][which] = bytes;
        }
        Ok(())
    }

    /// Row-major C(m×n) = α·op(A)·op(B) + β·C through cuBLAS (column-major, so the operands
    /// swap) or the fallback kernel, every operand in precision `p` (f32: Sgemm; f16/bf16: GemmEx
    /// with f32 compute, one rounding of C). `kind` picks one of the three matmul shapes:
    /// 0: out(n,oc) = inp(n,c)·Wᵀ (+ β·out);  1: dinp(n,c) = dout(n,oc)·W;  2: dW(oc,c) += doutᵀ·inp.
    #[allow(clippy::too_many_arguments)]
    fn gemm(&self, f: &Funcs, p: DType, kind: u8, c_ptr: u64, x: u64, w: u64, n: usize, c: usize, oc: usize, beta: f32, label: &str) -> Result<()> {
        if n == 0 || c == 0 || oc == 0 {
            return Ok(());
        }
        if n.max(c).max(oc) > i32::MAX as usize {
            return Err(berr(format!("{label}: matmul dimension too large")));
        }
        let (ni, ci, oi) = (n as i32, c as i32, oc as i32);
        let alpha: f32 = 1.0;
        if let Some(b) = &self.blas {
            use blas_sys::cublasOperation_t::{CUBLAS_OP_N as N, CUBLAS_OP_T as T};
            let h = *b.handle();
            // (transa, transb, m, n, k, A, lda, B, ldb, ldc) in cuBLAS' column-major terms
            let (ta, tb, m, nn, k, a, lda, bb, ldb, ldc) = match kind {
                // outᶜ(oc×n) = Wᶜᵀ · inpᶜ : A = W (c×oc), B = inp (c×n)
                0 => (T, N, oi, ni, ci, w, ci, x, ci, oi),
                // dinpᶜ(c×n) = Wᶜ · doutᶜ : A = W (c×oc), B = dout (oc×n)
                1 => (N, N, ci, ni, oi, w, ci, x, oi, ci),
                // dWᶜ(c×oc) += inpᶜ · doutᶜᵀ : A = inp (c×n) [here `w` carries inp], B = dout (oc×n)
                _ => (N, T, ci, oi, ni, w, ci, x, oi, ci),
            };
            let dt = match p {
                DType::F16 => blas_sys::cudaDataType::CUDA_R_16F,
                DType::BF16 => blas_sys::cudaDataType::CUDA_R_16BF,
                _ => {
                    return unsafe {
                        blas_result::sgemm(
                            h, ta, tb, m, nn, k, &alpha, a as *const f32, lda, bb as *const f32, ldb, &beta, c_ptr as *mut f32, ldc,
                        )
                    }
                    .map_err(|e| berr(format!("{label}: cublasSgemm: {e:?}")));
                }
            };
            // 16-bit A, B and C, f32 accumulation and epilogue (alpha, beta are f32): tensor cores
            let st = unsafe {
                blas_sys::cublasGemmEx(
                    h,
                    ta,
                    tb,
                    m,
                    nn,
                    k,
                    &alpha as *const f32 as *const c_void,
                    a as *const c_void,
                    dt,
                    lda,
                    bb as *const c_void,
                    dt,
                    ldb,
                    &beta as *const f32 as *const c_void,
                    c_ptr as *mut c_void,
                    dt,
                    ldc,
                    blas_sys::cublasComputeType_t::CUBLAS_COMPUTE_32F,
                    blas_sys::cublasGemmAlgo_t::CUBLAS_GEMM_DEFAULT_TENSOR_OP,
                )
            };
            st.result().map_err(|e| berr(format!("{label}: cublasGemmEx ({p}): {e:?}")))
        } else {
            self.builtin_gemm(&f.sgemm_fallback, kind, c_ptr, x, w, n, c, oc, beta, label)
        }
    }

    /// out(n,oc) = inp(n,c)·Wᵀ (+ β·out) with W f16 and inp, out f32 or bf16 (`f`'s precision):
    /// always the built-in GEMM, which converts each weight to f32 as it stages it, the sums f32.
    /// cuBLAS has no GemmEx with an f16 B and an f32 or bf16 A, and converting the input to f16
    /// for an f16×f16 GemmEx would round the activations, which the contract does not allow.
    #[allow(clippy::too_many_arguments)]
    fn gemm_f16_weight(&self, f: &Funcs, out: u64, x: u64, w: u64, n: usize, c: usize, oc: usize, beta: f32, label: &str) -> Result<()> {
        if n == 0 || c == 0 || oc == 0 {
            return Ok(());
        }
        if n.max(c).max(oc) > i32::MAX as usize {
            return Err(berr(format!("{label}: matmul dimension too large")));
        }
        self.builtin_gemm(&f.sgemm_fallback_f16b, 0, out, x, w, n, c, oc, beta, label)
    }

    /// The built-in GEMM kernel `f` (`sgemm_fallback` or its f16-B twin) for matmul shape `kind`
    /// (as in [`Self::gemm`]); the sizes are nonzero and fit in i32.
    #[allow(clippy::too_many_arguments)]
    fn builtin_gemm(&self, f: &CudaFunction, kind: u8, c_ptr: u64, x: u64, w: u64, n: usize, c: usize, oc: usize, beta: f32, label: &str) -> Result<()> {
        let alpha: f32 = 1.0;
        // Cm[i,j] = Σ_k A[i·sam + k·sak]·B[k·sbk + j·sbn]
        let (mm, nn, kk, a, sam, sak, bb, sbk, sbn, ldc) = match kind {
            0 => (n, oc, c, x, c, 1, w, 1, c, oc),
            1 => (n, c, oc, x, oc, 1, w, c, 1, c),
            _ => (oc, c, n, x, 1, oc, w, c, 1, c),
        };
        let grid = (nn.div_ceil(64) as u32, mm.div_ceil(64) as u32, 1);
        self.launch(
            f,
            grid,
            (256, 1, 1),
            0,
            &[
                A::P(c_ptr),
                A::P(a),
                A::P(bb),
                A::I(mm as i32),
                A::I(nn as i32),
                A::I(kk as i32),
                A::L(sam as i64),
                A::L(sak as i64),
                A::L(sbk as i64),
                A::L(sbn as i64),
                A::L(ldc as i64),
                A::F(alpha),
                A::F(beta),
            ],
            label,
        )
    }

    /// Rows per chunk for the two-stage column reductions (≤ 256 chunks).
    fn chunking(n: usize) -> (usize, usize) {
        let rpc = n.div_ceil(256).max(32);
        (rpc, n.div_ceil(rpc).max(1))
    }

    /// Scratch f32s a launch uses: the same sizes `exec` asks `scratch` for.
    fn scratch_floats(k: &Kernel) -> usize {
        match *k {
            Kernel::LayerNormBackward { n, c, .. } => Self::chunking(n).1 * 2 * c,
            Kernel::MatmulBackward { dbias: Some(_), n, oc, .. } if n > 0 && oc > 0 => Self::chunking(n).1 * oc,
            Kernel::AttentionBackward { b, t, nh, .. } => b * nh * t,
            // the row chains of the 16-bit wte gradient (2·B·T ints)
            Kernel::EncoderBackward { b, t, .. } => 2 * b * t,
            Kernel::SumSquares { inp, .. } => inp.len.div_ceil(256 * 8).clamp(1, SUMSQ_MAX_BLOCKS),
            _ => 0,
        }
    }

    fn exec(&mut self, l: &Launch) -> Result<()> {
        use Kernel::*;
        let label = l.label.as_str();
        let i32_ = |v: usize| v as i32;
        let p = l.kernel.precision(&self.table);
        let f = self.funcs(p)?;
        match &l.kernel {
            EncoderAt { out, tokens, pos, wte, wpe, n, c } => {
                let (n, c) = (*n, *c);
                if n == 0 || c == 0 {
                    return Ok(());
                }
                let args = [
                    A::P(self.dp(out)),
                    A::P(self.dp(tokens)),
                    A::P(self.dp(pos)),
                    A::P(self.dp(wte)),
                    A::P(self.dp(wpe)),
                    A::I(i32_(n)),
                    A::I(i32_(c)),
                    A::I(i32_(wte.len / c)),
                    A::I(i32_(wpe.len / c)),
                ];
                if let Some(d) = [self.dtype(wte), self.dtype(wpe)].into_iter().find(|&d| d != p && d != DType::F16) {
                    return Err(berr(format!("{label}: a {d} embedding in a {p} launch has no CUDA kernel (embeddings are {p} or f16)")));
                }
                let k = match (self.is_f16(wte), self.is_f16(wpe)) {
                    (false, false) => &f.encoder_at[0],
                    (true, true) => &f.encoder_at[1],
                    (true, false) => &f.encoder_at[2],
                    (false, true) => &f.encoder_at[3],
                };
                self.launch1(k, n * c, &args, label)
            }
            KvStore { kcache, vcache, qkv, slots, pos, n, c, tmax } => {
                let (n, c, tmax) = (*n, *c, *tmax);
                if n == 0 || c == 0 || tmax == 0 {
                    return Ok(());
                }
                let args = [
                    A::P(self.dp(kcache)),
                    A::P(self.dp(vcache)),
                    A::P(self.dp(qkv)),
                    A::P(self.dp(slots)),
                    A::P(self.dp(pos)),
                    A::I(i32_(n)),
                    A::I(i32_(c)),
                    A::I(i32_(tmax)),
                    A::I(i32_(kcache.len / (tmax * c))),
                ];
                self.launch1(&f.kv_store, n * c, &args, label)
            }
            AttentionCached { out, qkv, kcache, vcache, slots, pos, n, c, nh, tmax } => {
                let (n, c, nh, tmax) = (*n, *c, *nh, *tmax);
                Self::head_size(c, nh, label)?;
                if n == 0 || tmax == 0 {
                    return Ok(());
                }
                if n * nh > i32::MAX as usize {
                    return Err(berr(format!("{label}: {n} rows × {nh} heads is too many blocks")));
                }
                let args = [
                    A::P(self.dp(out)),
                    A::P(self.dp(qkv)),
                    A::P(self.dp(kcache)),
                    A::P(self.dp(vcache)),
                    A::P(self.dp(slots)),
                    A::P(self.dp(pos)),
                    A::I(i32_(n)),
                    A::I(i32_(c)),
                    A::I(i32_(nh)),
                    A::I(i32_(tmax)),
                    A::I(i32_(kcache.len / (tmax * c))),
                ];
                // one block per (row, head); the cache streams through in tiles (static shared memory only)
                self.launch(&f.attention_cached, ((n * nh) as u32, 1, 1), (DEC_THREADS, 1, 1), 0, &args, label)
            }
            EncoderForward { out, tokens, wte, wpe, b, t, c } => {
                let (b, t, c) = (*b, *t, *c);
                let n = b * t;
                if c == 0 || n == 0 {
                    return Ok(());
                }
                let o = self.dp(out);
                let tk = self.dp(tokens);
                let we = self.dp(wte);
                let wp = self.dp(wpe);
                let vocab = wte.len / c;
                self.launch1(
                    &f.encoder_forward,
                    n * c,
                    &[A::P(o), A::P(tk), A::P(we), A::P(wp), A::I(i32_(n)), A::I(i32_(t)), A::I(i32_(c)), A::I(i32_(vocab))],
                    label,
                )
            }
            EncoderBackward { dwte, dwpe, dout, tokens, b, t, c } => {
                let (b, t, c) = (*b, *t, *c);
                let n = b * t;
                if c == 0 || n == 0 {
                    return Ok(());
                }
                let dwt = self.dp(dwte);
                let dwp = self.dp(dwpe);
                let d = self.dp(dout);
                let tk = self.dp(tokens);
                let vocab = dwte.len / c;
                self.launch1(
                    &f.encoder_backward_wpe,
                    t * c,
                    &[A::P(dwp), A::P(d), A::I(i32_(b)), A::I(i32_(t)), A::I(i32_(c))],
                    label,
                )?;
                if p == DType::F32 {
                    return self.launch1(
                        &f.encoder_backward_wte,
                        n * c,
                        &[A::P(dwt), A::P(d), A::P(tk), A::I(i32_(n)), A::I(i32_(c)), A::I(i32_(vocab))],
                        label,
                    );
                }
                // 16 bits: each token's rows summed in order in f32 and stored once, no atomics
                let links = self.scratch(2 * n)?;
                self.launch1(&f.encoder_backward_wte_links, n, &[A::P(links), A::P(tk), A::I(i32_(n))], label)?;
                self.launch1(
                    &f.encoder_backward_wte_chain,
                    n * c,
                    &[A::P(dwt), A::P(d), A::P(tk), A::P(links), A::I(i32_(n)), A::I(i32_(c)), A::I(i32_(vocab))],
                    label,
                )
            }
            LayerNormForward { out, mean, rstd, inp, weight, bias, n, c } => {
                let (n, c) = (*n, *c);
                if n == 0 {
                    return Ok(());
                }
                let args = [
                    A::P(self.dp(out)),
                    A::P(self.dp(mean)),
                    A::P(self.dp(rstd)),
                    A::P(self.dp(inp)),
                    A::P(self.dp(weight)),
                    A::P(self.dp(bias)),
                    A::I(i32_(n)),
                    A::I(i32_(c)),
                ];
                self.launch(&f.layernorm_forward, (n.div_ceil(8) as u32, 1, 1), (256, 1, 1), 0, &args, label)
            }
            LayerNormBackward { dinp, dweight, dbias, dout, inp, weight, mean, rstd, n, c, accumulate } => {
                let (n, c) = (*n, *c);
                if n == 0 || c == 0 {
                    return Ok(());
                }
                let di = self.dp(dinp);
                let dw = self.dp(dweight);
                let db = self.dp(dbias);
                let d = self.dp(dout);
                let x = self.dp(inp);
                let w = self.dp(weight);
                let m = self.dp(mean);
                let r = self.dp(rstd);
                self.launch(
                    &f.layernorm_backward_dinp,
                    (n.div_ceil(8) as u32, 1, 1),
                    (256, 1, 1),
                    0,
                    &[A::P(di), A::P(d), A::P(x), A::P(w), A::P(m), A::P(r), A::I(i32_(n)), A::I(i32_(c)), A::I(*accumulate as i32)],
                    label,
                )?;
                let (rpc, chunks) = Self::chunking(n);
                let s = self.scratch(chunks * 2 * c)?;
                self.launch(
                    &f.layernorm_backward_params_partial,
                    (c.div_ceil(32) as u32, chunks as u32, 1),
                    (32, 8, 1),
                    0,
                    &[A::P(s), A::P(d), A::P(x), A::P(m), A::P(r), A::I(i32_(n)), A::I(i32_(c)), A::I(i32_(rpc))],
                    label,
                )?;
                self.launch(
                    &f.layernorm_backward_params_finish,
                    (c.div_ceil(256) as u32, 1, 1),
                    (256, 1, 1),
                    0,
                    &[A::P(dw), A::P(db), A::P(s), A::I(i32_(chunks)), A::I(i32_(c))],
                    label,
                )
            }
            MatmulForward { out, inp, weight, bias, n, c, oc } => {
                let (n, c, oc) = (*n, *c, *oc);
                let o = self.dp(out);
                let x = self.dp(inp);
                let w = self.dp(weight);
                let wd = self.dtype(weight);
                if wd != p && wd != DType::F16 {
                    return Err(berr(format!("{label}: a {wd} weight in a {p} matmul has no CUDA kernel (weights are {p} or f16)")));
                }
                // 16 bits: out = bias first, then the GEMM adds inp·Wᵀ with beta = 1 (one rounding)
                let mut beta = 0.0;
                if let (Some(bias), true) = (bias, p != DType::F32) {
                    if n * oc > 0 && c > 0 {
                        let bp = self.dp(bias);
                        self.launch1(&f.bias_broadcast, n * oc, &[A::P(o), A::P(bp), A::I(i32_(n)), A::I(i32_(oc))], label)?;
                        beta = 1.0;
                    }
                }
                if wd == DType::F16 && p != DType::F16 {
                    self.gemm_f16_weight(&f, o, x, w, n, c, oc, beta, label)?;
                } else {
                    self.gemm(&f, p, 0, o, x, w, n, c, oc, beta, label)?;
                }
                if let (Some(bias), false) = (bias, beta == 1.0) {
                    if n * oc > 0 {
                        let bp = self.dp(bias);
                        self.launch1(&f.add_bias, n * oc, &[A::P(o), A::P(bp), A::I(i32_(n)), A::I(i32_(oc))], label)?;
                    }
                }
                Ok(())
            }
            MatmulBackward { dinp, dweight, dbias, dout, inp, weight, n, c, oc } => {
                let (n, c, oc) = (*n, *c, *oc);
                let di = self.dp(dinp);
                let dw = self.dp(dweight);
                let d = self.dp(dout);
                let x = self.dp(inp);
                let w = self.dp(weight);
                self.gemm(&f, p, 1, di, d, w, n, c, oc, 0.0, label)?;
                self.gemm(&f, p, 2, dw, d, x, n, c, oc, 1.0, label)?;
                if let Some(dbias) = dbias {
                    if n > 0 && oc > 0 {
                        let db = self.dp(dbias);
                        let (rpc, chunks) = Self::chunking(n);
                        let s = self.scratch(chunks * oc)?;
                        self.launch(
                            &f.bias_grad_partial,
                            (oc.div_ceil(32) as u32, chunks as u32, 1),
                            (32, 8, 1),
                            0,
                            &[A::P(s), A::P(d), A::I(i32_(n)), A::I(i32_(oc)), A::I(i32_(rpc))],
                            label,
                        )?;
                        self.launch(
                            &f.bias_grad_finish,
                            (oc.div_ceil(256) as u32, 1, 1),
                            (256, 1, 1),
                            0,
                            &[A::P(db), A::P(s), A::I(i32_(chunks)), A::I(i32_(oc))],
                            label,
                        )?;
                    }
                }
                Ok(())
            }
            AttentionForward { out, lse, qkv, b, t, c, nh } => {
                let (b, t, c, nh) = (*b, *t, *c, *nh);
                let hs = Self::head_size(c, nh, label)?;
                if b * t == 0 {
                    return Ok(());
                }
                let o = self.dp(out);
                let ls = self.dp(lse);
                let q = self.dp(qkv);
                let smem = (ATTN_TILE * hs + 2 * ATTN_TILE * (hs + 1)) * 4;
                self.attn_smem(&f, p, 0, smem, label)?;
                self.launch(
                    &f.attention_forward,
                    (t.div_ceil(ATTN_TILE) as u32, (b * nh) as u32, 1),
                    (ATTN_THREADS, 1, 1),
                    smem as u32,
                    &[A::P(o), A::P(ls), A::P(q), A::I(i32_(b)), A::I(i32_(t)), A::I(i32_(c)), A::I(i32_(nh))],
                    label,
                )
            }
            AttentionBackward { dqkv, dout, out, lse, qkv, b, t, c, nh } => {
                let (b, t, c, nh) = (*b, *t, *c, *nh);
                let hs = Self::head_size(c, nh, label)?;
                if b * t == 0 {
                    return Ok(());
                }
                let dq = self.dp(dqkv);
                let d = self.dp(dout);
                let o = self.dp(out);
                let ls = self.dp(lse);
                let q = self.dp(qkv);
                let dbuf = self.scratch(b * nh * t)?;
                let smem = (2 * ATTN_TILE * hs + 2 * ATTN_TILE * (hs + 1)) * 4;
                self.attn_smem(&f, p, 1, smem, label)?;
                self.attn_smem(&f, p, 2, smem, label)?;
                let grid = (t.div_ceil(ATTN_TILE) as u32, (b * nh) as u32, 1);
                let dims = [A::I(i32_(b)), A::I(i32_(t)), A::I(i32_(c)), A::I(i32_(nh))];
                let mut a1 = vec![A::P(dq), A::P(dbuf), A::P(d), A::P(o), A::P(ls), A::P(q)];
                a1.extend_from_slice(&dims);
                self.launch(&f.attention_backward_dq, grid, (ATTN_THREADS, 1, 1), smem as u32, &a1, label)?;
                let mut a2 = vec![A::P(dq), A::P(dbuf), A::P(d), A::P(ls), A::P(q)];
                a2.extend_from_slice(&dims);
                self.launch(&f.attention_backward_dkv, grid, (ATTN_THREADS, 1, 1), smem as u32, &a2, label)
            }
            GeluForward { out, inp, n } => {
                self.elementwise(&f.gelu_forward, &[(out, "out"), (inp, "inp")], *n, label)
            }
            GeluBackward { dinp, inp, dout, n } => {
                self.elementwise(&f.gelu_backward, &[(dinp, "dinp"), (inp, "inp"), (dout, "dout")], *n, label)
            }
            ResidualForward { out, a, b, n } => {
                self.elementwise(&f.residual_forward, &[(out, "out"), (a, "a"), (b, "b")], *n, label)
            }
            CrossEntropy { logits, losses, targets, dloss, n, v, vp, write_grad, accumulate } => {
                let (n, v, vp) = (*n, *v, *vp);
                if n == 0 {
                    return Ok(());
                }
                let args = [
                    A::P(self.dp(logits)),
                    A::P(self.dp(losses)),
                    A::P(self.dp(targets)),
                    A::P(self.dp(dloss)),
                    A::I(i32_(n)),
                    A::I(i32_(v)),
                    A::I(i32_(vp)),
                    A::I(*write_grad as i32),
                    A::I(*accumulate as i32),
                ];
                let threads = if v >= 4096 { 1024 } else { 256 };
                self.launch(&f.crossentropy, (n as u32, 1, 1), (threads, 1, 1), 0, &args, label)
            }
            Zero { out } => {
                if out.len == 0 {
                    return Ok(());
                }
                let p = self.dp(out);
                let bytes = out.len * self.bufs[out.buf.0 as usize].dtype.size();
                unsafe { drv::memset_d8_async(p, 0, bytes, self.stream.cu_stream()) }.map_err(|e| drv_err(label, e))
            }
            SumSquares { out, inp, slot } => {
                let slot = *slot;
                let o = self.dp(out);
                let x = self.dp(inp);
                let n = inp.len;
                let blocks = n.div_ceil(256 * 8).clamp(1, SUMSQ_MAX_BLOCKS);
                let s = self.scratch(blocks)?;
                self.launch(&f.sum_squares_partial, (blocks as u32, 1, 1), (256, 1, 1), 0, &[A::P(s), A::P(x), A::L(n as i64)], label)?;
                self.launch(
                    &f.sum_squares_finish,
                    (1, 1, 1),
                    (256, 1, 1),
                    0,
                    &[A::P(o), A::I(i32_(slot)), A::P(s), A::I(i32_(blocks))],
                    label,
                )
            }
            ClipScale { hyper, parts, max_norm } => {
                let h = self.dp(hyper);
                let p = self.dp(parts);
                self.launch(
                    &f.clip_scale,
                    (1, 1, 1),
                    (256, 1, 1),
                    0,
                    &[A::P(h), A::P(p), A::I(i32_(parts.len)), A::F(*max_norm)],
                    label,
                )
            }
            // `master`: the f32 master weights of 16-bit parameters (null pointer: none)
            AdamW { param, master, grad, m, v, hyper, weight_decay } => {
                let n = param.len;
                let args = [
                    A::P(self.dp(param)),
                    A::P(master.as_ref().map_or(0, |w| self.dp(w))),
                    A::P(self.dp(grad)),
                    A::P(self.dp(m)),
                    A::P(self.dp(v)),
                    A::P(self.dp(hyper)),
                    A::L(n as i64),
                    A::F(*weight_decay),
                ];
                if n == 0 {
                    return Ok(());
                }
                self.launch1(&f.adamw_update, n, &args, label)
            }
        }
    }

    /// The head size (heads divide channels: `graph::validate`), if the attention kernels take it.
    fn head_size(c: usize, nh: usize, label: &str) -> Result<usize> {
        let hs = c / nh;
        if hs == 0 || hs > ATTN_MAX_HS {
            return Err(berr(format!("{label}: head size {hs} unsupported by the CUDA attention kernels (1..={ATTN_MAX_HS})")));
        }
        Ok(hs)
    }
}

impl Backend for CudaBackend {
    fn name(&self) -> String {
        let jit = match self.target {
            Target::Cubin(_) => String::new(),
            Target::Ptx(cc) => format!(", PTX {cc} JIT"),
        };
        let mm = match (&self.blas, self.tf32) {
            (Some(_), true) => "cuBLAS TF32",
            (Some(_), false) => "cuBLAS",
            (None, _) => "built-in GEMM",
        };
        format!("cuda: {} (sm_{}{}, {mm}{jit})", self.info.name, self.info.cc_major, self.info.cc_minor)
    }

    fn kind(&self) -> crate::backend::BackendKind {
        crate::backend::BackendKind::Cuda
    }

    fn supports(&self, dtype: DType) -> bool {
        // storage: every GPU (sm_70+) loads and stores 16-bit values; which precisions have
        // kernels is `precisions` (bf16 from sm_80), checked when a phase is prepared
        matches!(dtype, DType::F32 | DType::F16 | DType::BF16 | DType::I32)
    }

    /// f32 and f16 on every GPU, bf16 from sm_80 ([`compile::precisions_for_cc`]).
    fn precisions(&self) -> &'static [DType] {
        compile::precisions_for_cc(self.cc())
    }

    /// As every backend, but bf16 before sm_80 names the precision this GPU has.
    fn check_precisions(&self, launches: &[Launch]) -> Result<()> {
        for l in launches {
            let p = l.kernel.precision(&self.table);
            if self.precisions().contains(&p) {
                continue;
            }
            let msg = if p == DType::BF16 {
                format!("bf16 needs sm_80 (this GPU is sm_{}; launch '{}'); use --precision fp16", self.cc(), l.label)
            } else {
                format!("no {p} kernels (launch '{}'); use --precision fp32", l.label)
            };
            return Err(Error::Unsupported { backend: self.name(), msg });
        }
        Ok(())
    }

    fn alloc(&mut self, table: &BufferTable) -> Result<()> {
        self.check_dtypes(table)?;
        self.bind()?;
        let total: usize = table.bufs.iter().map(|b| b.bytes().max(16).next_multiple_of(256)).sum();
        if let Ok((free, _total)) = drv::mem_get_info() {
            if total > free {
                return Err(Error::OutOfMemory(format!(
                    "cuda: the step needs {:.2} GiB of device memory, {} has {:.2} GiB free; reduce --batch or --seq-len",
                    total as f64 / (1u64 << 30) as f64,
                    self.info.name,
                    free as f64 / (1u64 << 30) as f64
                )));
            }
        }
        self.bufs.clear();
        for d in &table.bufs {
            let mem = DevMem::new(&self.ctx, d.bytes(), &format!("allocating {}", d.name))?;
            unsafe { drv::memset_d8_async(mem.ptr, 0, mem.bytes.max(16), self.stream.cu_stream()) }
                .map_err(|e| drv_err(&format!("zeroing {}", d.name), e))?;
            self.bufs.push(Buf { mem, len: d.len, dtype: d.dtype });
        }
        self.table = table.clone();
        self.phases.clear();
        self.sync()
    }

    fn table(&self) -> &BufferTable {
        &self.table
    }

    fn upload_bytes(&mut self, id: BufId, bytes: &[u8]) -> Result<()> {
        let ptr = self.bufs[id.0 as usize].mem.ptr;
        self.bind()?;
        // from pageable memory: returns once `bytes` has been staged, so it may be dropped after
        unsafe { drv::memcpy_htod_async(ptr, bytes, self.stream.cu_stream()) }.map_err(|e| drv_err("upload", e))
    }

    fn download_bytes(&mut self, view: View) -> Result<Vec<u8>> {
        let b = &self.bufs[view.buf.0 as usize];
        let mut out = vec![0u8; view.len * b.dtype.size()];
        if out.is_empty() {
            return Ok(out);
        }
        let ptr = self.dp(&view);
        self.bind()?;
        unsafe { drv::memcpy_dtoh_async(&mut out[..], ptr, self.stream.cu_stream()) }.map_err(|e| drv_err("download", e))?;
        self.sync()?;
        Ok(out)
    }

    fn prepare_valid(&mut self, launches: &[Launch]) -> Result<Prepared> {
        self.load_precisions(launches)?;
        let need = launches.iter().map(|l| Self::scratch_floats(&l.kernel)).max().unwrap_or(0);
        self.reserve_scratch(need)?;
        self.phases.push(Some(launches.to_vec()));
        Ok(Prepared(self.phases.len() - 1))
    }

    fn run_prepared(&mut self, phase: Prepared) -> Result<()> {
        let launches = self
            .phases
            .get_mut(phase.0)
            .and_then(Option::take)
            .ok_or_else(|| Error::Internal(format!("prepared phase #{} is not on this backend", phase.0)))?;
        let r = self.bind().and_then(|_| launches.iter().try_for_each(|l| self.exec(l)));
        self.phases[phase.0] = Some(launches);
        r
    }

    fn release(&mut self, phase: Prepared) {
        if let Some(p) = self.phases.get_mut(phase.0) {
            *p = None;
        }
    }

    fn raw_buffer(&mut self, id: BufId) -> Result<RawBuffer<'_>> {
        // a collective (NCCL) called next runs in this context
        self.bind()?;
        let b = self.bufs.get(id.0 as usize).ok_or_else(|| Error::Internal(format!("raw_buffer: unknown buffer id {}", id.0)))?;
        Ok(RawBuffer::Cuda { ptr: b.mem.ptr, bytes: b.len * b.dtype.size(), stream: self.stream.cu_stream() as usize })
    }

    fn sync(&mut self) -> Result<()> {
        self.bind()?;
        self.stream.synchronize().map_err(|e| drv_err("cuda stream", e))?;
        self.retired.clear();
        Ok(())
    }

    /// An event before the first launch and after each one, on the backend's stream.
    fn profile_valid(&mut self, launches: &[Launch]) -> Result<crate::backend::Profile> {
        self.load_precisions(launches)?;
        let need = launches.iter().map(|l| Self::scratch_floats(&l.kernel)).max().unwrap_or(0);
        self.reserve_scratch(need)?;
        self.bind()?;
        let mut events = Vec::with_capacity(launches.len() + 1);
        let stream = self.stream.cu_stream();
        let r = (|| -> Result<Vec<f64>> {
            for i in 0..=launches.len() {
                let e = drv::event::create(drv_sys::CUevent_flags::CU_EVENT_DEFAULT).map_err(|e| drv_err("cuEventCreate", e))?;
                events.push(e);
                unsafe { drv::event::record(e, stream) }.map_err(|e| drv_err("cuEventRecord", e))?;
                if let Some(l) = launches.get(i) {
                    self.exec(l)?;
                }
            }
            self.sync()?;
            let mut ms = Vec::with_capacity(launches.len());
            for w in events.windows(2) {
                ms.push(unsafe { drv::event::elapsed(w[0], w[1]) }.map_err(|e| drv_err("cuEventElapsedTime", e))? as f64);
            }
            Ok(ms)
        })();
        for e in events {
            let _ = unsafe { drv::event::destroy(e) };
        }
        Ok(crate::backend::Profile { ms: r?, clock: "CUDA events" })
    }
}
