//! NVRTC: compiling `cuda/*.cu` (embedded in the binary) to CUBIN, parsing ptxas' resource
//! report, and the on-disk CUBIN cache.
//!
//! Every family is one source specialised per precision at compile time: `cuda/common.cuh`
//! ([`COMMON`]) is prepended to it and defines `floatX` (the storage type of the launch's float
//! views) and its `load`/`store`, selected by `-DFLOATX_F16` / `-DFLOATX_BF16` (f32 without
//! either; [`precision_define`]). A family is compiled once per (architecture, precision), and
//! the cache key includes the precision.

use crate::backend::cuda::dl::CudaError;
use std::path::PathBuf;

use super::dl::{self, Which};
use super::nvrtc;
use crate::error::{Error, Result};
use crate::graph::DType;

/// `cuda/common.cuh`: `floatX`, the f16/bf16 conversions and `load`/`store`, prepended to every
/// family's source (by [`family_source`]; the CUDA emulator prepends it too).
pub const COMMON: &str = include_str!("../../../cuda/common.cuh");

/// The NVRTC option that selects a precision's `floatX` in `cuda/common.cuh` (None for f32).
pub fn precision_define(precision: DType) -> Option<&'static str> {
    match precision {
        DType::F16 => Some("-DFLOATX_F16"),
        DType::BF16 => Some("-DFLOATX_BF16"),
        _ => None,
    }
}

/// The precisions the kernels are built in for compute capability `cc` (70 = sm_70): f32 and
/// f16 everywhere, bf16 from sm_80 (Ampere), the first with bf16 arithmetic and tensor cores.
pub fn precisions_for_cc(cc: u32) -> &'static [DType] {
    if cc >= 80 {
        &[DType::F32, DType::F16, DType::BF16]
    } else {
        &[DType::F32, DType::F16]
    }
}

/// What NVRTC compiles for one family: `cuda/common.cuh`, then the family's source with its own
/// line numbers (so errors name `cuda/<family>.cu` and its lines).
pub fn family_source(file: &str, src: &str) -> String {
    format!("{COMMON}\n#line 1 \"{file}\"\n{src}")
}

/// Every kernel source file, by family name (`Kernel::family()`), embedded at build time.
pub const SOURCES: &[(&str, &str)] = &[
    ("adamw", include_str!("../../../cuda/adamw.cu")),
    ("attention", include_str!("../../../cuda/attention.cu")),
    ("classifier", include_str!("../../../cuda/classifier.cu")),
    ("encoder", include_str!("../../../cuda/encoder.cu")),
    ("gelu", include_str!("../../../cuda/gelu.cu")),
    ("layernorm", include_str!("../../../cuda/layernorm.cu")),
    ("matmul", include_str!("../../../cuda/matmul.cu")),
    ("reduce", include_str!("../../../cuda/reduce.cu")),
    ("residual", include_str!("../../../cuda/residual.cu")),
];

/// ptxas' report for one kernel function.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct FunctionStats {
    pub name: String,
    pub registers: u32,
    /// static shared memory (dynamic shared memory is sized at launch and not included)
    pub shared_bytes: u32,
    /// spill stores + spill loads
    pub spill_bytes: u32,
    pub stack_bytes: u32,
}

/// The result of compiling one `cuda/<family>.cu` for one architecture.
#[derive(Clone, Debug)]
pub struct CompileReport {
    /// e.g. "cuda/attention.cu"
    pub file: String,
    /// e.g. "sm_70"
    pub arch: String,
    /// the precision `floatX` was specialised to
    pub precision: DType,
    /// the most registers any kernel of the file uses
    pub registers: u32,
    /// the most static shared memory any kernel of the file uses
    pub shared_bytes: u32,
    /// total spill bytes (must be 0)
    pub spill_bytes: u32,
    /// NVRTC's log (ptxas -v output)
    pub log: String,
    pub functions: Vec<FunctionStats>,
}

impl std::fmt::Display for CompileReport {
    /// One line for `wgpt kernels --cuda`: "cuda/attention.cu sm_80 bf16: 128 registers, 256 B smem, 0 B spills (attention_forward 106, ...)".
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let fns: Vec<String> = self.functions.iter().map(|x| format!("{} {}", x.name, x.registers)).collect();
        write!(
            f,
            "{} {} {}: {} registers, {} B smem, {} B spills ({})",
            self.file,
            self.arch,
            self.precision,
            self.registers,
            self.shared_bytes,
            self.spill_bytes,
            fns.join(", ")
        )
    }
}

/// What NVRTC produces: SASS for one exact GPU, or PTX for the driver to JIT (a GPU newer than
/// this NVRTC knows).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Target {
    Cubin(u32),
    Ptx(u32),
}

impl Target {
    pub fn arch_flag(&self) -> String {
        match self {
            Target::Cubin(cc) => format!("sm_{cc}"),
            Target::Ptx(cc) => format!("compute_{cc}"),
        }
    }
}

/// NVRTC's (major, minor), or why NVRTC is unusable.
pub fn nvrtc_version() -> std::result::Result<(i32, i32), CudaError> {
    nvrtc::version()
}

/// NVRTC's version and where it was loaded from, e.g. "12.9 (/usr/local/cuda/lib64/libnvrtc.so.12)".
pub fn nvrtc_description() -> std::result::Result<String, CudaError> {
    let lib = dl::lib(Which::Nvrtc)?;
    let (major, minor) = nvrtc_version()?;
    Ok(format!("{major}.{minor} ({})", lib.path))
}

/// The architectures this NVRTC can generate SASS for (e.g. 70, 75, 80, ...).
pub fn supported_archs() -> std::result::Result<Vec<u32>, CudaError> {
    nvrtc::supported_archs()
}

fn unavailable(e: CudaError) -> Error {
    Error::Unavailable(format!("NVRTC unavailable: {e}"))
}

/// Parse an architecture as the user writes it: "sm_70", "70", "sm70", "compute_80" → 70/80.
pub fn parse_arch(s: &str) -> Option<u32> {
    let t = s.trim();
    let t = t.strip_prefix("sm_").or_else(|| t.strip_prefix("sm")).or_else(|| t.strip_prefix("compute_")).unwrap_or(t);
    let cc: u32 = t.parse().ok()?;
    (10..=200).contains(&cc).then_some(cc)
}

/// The NVRTC options used for every file (besides the architecture).
fn base_options() -> Vec<String> {
    let mut o = vec!["--std=c++17".to_string(), "-lineinfo".to_string(), "-Xptxas=-v".to_string()];
    if let Ok(inc) = dl::include_dir() {
        o.push(format!("-I{}", inc.display()));
    }
    o
}

/// Compile one source with NVRTC. Ok((image, log)); Err(log or reason).
pub fn compile_source(file: &str, src: &str, target: Target) -> std::result::Result<(Vec<u8>, String), CudaError> {
    compile_with(file, src, target, &[])
}

fn compile_with(file: &str, src: &str, target: Target, extra: &[String]) -> std::result::Result<(Vec<u8>, String), CudaError> {
    let mut opts = base_options();
    opts.extend_from_slice(extra);
    opts.push(format!("--gpu-architecture={}", target.arch_flag()));
    nvrtc::compile(file, src, &opts, matches!(target, Target::Ptx(_)))
}

/// Compile one family's source (`cuda/<family>.cu` with `cuda/common.cuh` before it) for
/// `target` with `floatX` = `precision`. Ok((image, log)); Err(log or reason).
pub fn compile_family(family: &str, src: &str, target: Target, precision: DType) -> std::result::Result<(Vec<u8>, String), CudaError> {
    let file = format!("cuda/{family}.cu");
    let extra: Vec<String> = precision_define(precision).into_iter().map(str::to_string).collect();
    compile_with(&file, &family_source(&file, src), target, &extra)
}

/// The number just before `key` in `line` ("Used 40 registers" → 40 for "registers").
fn num_before(line: &str, key: &str) -> Option<u32> {
    let i = line.find(key)?;
    line[..i].split(|c: char| c == ',' || c == ':' || c.is_whitespace()).rfind(|s| !s.is_empty())?.parse().ok()
}

/// Per-function statistics from ptxas' verbose output.
pub fn parse_ptxas_log(log: &str) -> Vec<FunctionStats> {
    let mut out: Vec<FunctionStats> = Vec::new();
    let mut cur: Option<usize> = None;
    let quoted = |line: &str| -> Option<String> {
        let a = line.find('\'')?;
        let b = line[a + 1..].find('\'')?;
        Some(line[a + 1..a + 1 + b].to_string())
    };
    let select = |out: &mut Vec<FunctionStats>, name: String| -> usize {
        if let Some(i) = out.iter().position(|f| f.name == name) {
            i
        } else {
            out.push(FunctionStats { name, ..Default::default() });
            out.len() - 1
        }
    };
    for line in log.lines() {
        if line.contains("Compiling entry function") {
            if let Some(n) = quoted(line) {
                cur = Some(select(&mut out, n));
            }
        } else if let Some(rest) = line.split("Function properties for ").nth(1) {
            let n = rest.trim().to_string();
            cur = Some(select(&mut out, n));
        } else if let Some(i) = cur {
            let f = &mut out[i];
            if line.contains("spill stores") || line.contains("stack frame") {
                f.spill_bytes = num_before(line, "bytes spill stores").unwrap_or(0) + num_before(line, "bytes spill loads").unwrap_or(0);
                f.stack_bytes = num_before(line, "bytes stack frame").unwrap_or(0);
            }
            if line.contains("registers") {
                f.registers = num_before(line, "registers").unwrap_or(0);
                f.shared_bytes = num_before(line, "bytes smem").unwrap_or(0);
            }
        }
    }
    out
}

/// The error lines of a log joined into one line (for one-line error messages).
fn summarize(log: &str) -> String {
    let errs: Vec<&str> = log.lines().map(str::trim).filter(|l| l.contains("error")).collect();
    let pick = if errs.is_empty() { log.lines().map(str::trim).filter(|l| !l.is_empty()).collect() } else { errs };
    let s = pick.into_iter().take(6).collect::<Vec<_>>().join("; ");
    if s.is_empty() {
        "failed with an empty log".to_string()
    } else {
        s
    }
}

/// `wgpt kernels --cuda --arch sm_70,sm_80,sm_90`: compile every `cuda/*.cu` to CUBIN for each
/// architecture and each precision it has ([`precisions_for_cc`]: bf16 from sm_80) with NVRTC
/// (no GPU needed). Spills count as failures; any failure is an Err naming each file, arch,
/// precision and the compiler's error lines.
pub fn compile_all(archs: &[String]) -> Result<Vec<CompileReport>> {
    let mut ccs = Vec::new();
    for a in archs.iter().flat_map(|a| a.split(',')).filter(|a| !a.trim().is_empty()) {
        let cc = parse_arch(a).ok_or_else(|| Error::flag("--arch", format!("'{a}' is not an architecture like sm_80")))?;
        ccs.push(cc);
    }
    if ccs.is_empty() {
        return Err(Error::flag("--arch", "no architecture given (e.g. --arch sm_70,sm_80,sm_90)"));
    }
    dl::lib(Which::Nvrtc).map_err(unavailable)?;
    let supported = supported_archs().map_err(unavailable)?;
    let (major, minor) = nvrtc_version().map_err(unavailable)?;
    let mut reports = Vec::new();
    let mut failures = Vec::new();
    for &cc in &ccs {
        if !supported.contains(&cc) {
            failures.push(format!("sm_{cc}: NVRTC {major}.{minor} cannot compile for it (supports {:?})", supported));
            continue;
        }
        for (&precision, (family, src)) in precisions_for_cc(cc).iter().flat_map(|p| SOURCES.iter().map(move |s| (p, s))) {
            let file = format!("cuda/{family}.cu");
            let at = format!("{file} (sm_{cc} {precision})");
            match compile_family(family, src, Target::Cubin(cc), precision) {
                Err(log) => failures.push(format!("{at}: {}", summarize(&log.msg))),
                Ok((_, log)) => {
                    let functions = parse_ptxas_log(&log);
                    let spilling: Vec<String> = functions
                        .iter()
                        .filter(|f| f.spill_bytes > 0)
                        .map(|f| format!("{} spills {} bytes", f.name, f.spill_bytes))
                        .collect();
                    if !spilling.is_empty() {
                        failures.push(format!("{at}: {}", spilling.join(", ")));
                    }
                    if functions.is_empty() {
                        failures.push(format!("{at}: no kernel in the ptxas report"));
                    }
                    reports.push(CompileReport {
                        file: file.clone(),
                        arch: format!("sm_{cc}"),
                        precision,
                        registers: functions.iter().map(|f| f.registers).max().unwrap_or(0),
                        shared_bytes: functions.iter().map(|f| f.shared_bytes).max().unwrap_or(0),
                        spill_bytes: functions.iter().map(|f| f.spill_bytes).sum(),
                        log,
                        functions,
                    });
                }
            }
        }
    }
    if failures.is_empty() {
        Ok(reports)
    } else {
        Err(Error::backend("cuda kernels", failures.join(" | ")))
    }
}

/// 64-bit FNV-1a (stable across builds and platforms, unlike std's hasher).
fn fnv1a(parts: &[&[u8]]) -> u64 {
    let mut h: u64 = 0xcbf29ce484222325;
    for p in parts {
        for &b in *p {
            h ^= b as u64;
            h = h.wrapping_mul(0x100000001b3);
        }
        h ^= 0xff;
        h = h.wrapping_mul(0x100000001b3);
    }
    h
}

/// The CUBIN cache: `cuda/` in the cache root of [`crate::cache`] (`$WGPT_CACHE_DIR/cuda`, else
/// e.g. `~/.cache/wgpt/cuda`); `None` (after one warning) when it cannot be created.
pub fn cache_dir() -> Option<PathBuf> {
    crate::cache::cache_dir("cuda")
}

/// Compile (or fetch from the disk cache) one family for `target` in `precision`. The cache key
/// covers the source text (with `cuda/common.cuh`), the target, the precision, NVRTC's version
/// and the options. Returns the image and, when it came from the cache, the cache file (so a
/// caller that cannot load it can delete it and recompile).
pub fn compile_cached(family: &str, src: &str, target: Target, precision: DType) -> Result<(Vec<u8>, Option<PathBuf>)> {
    let (major, minor) = nvrtc_version().map_err(unavailable)?;
    let opts = base_options().join(" ");
    let ver = format!("{major}.{minor}");
    let pflag = precision_define(precision).unwrap_or("");
    let key = fnv1a(&[COMMON.as_bytes(), src.as_bytes(), target.arch_flag().as_bytes(), pflag.as_bytes(), ver.as_bytes(), opts.as_bytes()]);
    let ext = match target {
        Target::Cubin(_) => "cubin",
        Target::Ptx(_) => "ptx",
    };
    let path = cache_dir().map(|d| d.join(format!("{family}-{}-{precision}-{key:016x}.{ext}", target.arch_flag())));
    if let Some(p) = &path {
        if let Ok(bytes) = std::fs::read(p) {
            if !bytes.is_empty() {
                return Ok((bytes, Some(p.clone())));
            }
        }
    }
    let file = format!("cuda/{family}.cu");
    let (image, _log) = compile_family(family, src, target, precision)
        .map_err(|log| Error::backend("cuda", format!("{file} ({} {precision}): {}", target.arch_flag(), summarize(&log.msg))))?;
    if let Some(p) = &path {
        // a cache that cannot be written only costs a recompile next time (and one warning)
        crate::cache::store(p, &image);
    }
    Ok((image, None))
}
