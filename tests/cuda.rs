//! The CUDA backend.
//! (a) every cuda/*.cu compiles with NVRTC for sm_70, sm_80 and sm_90 in every precision the
//!     architecture has (f32 and f16; bf16 from sm_80) — skipped, visibly, where NVRTC is absent,
//!     unless WGPT_REQUIRE_NVRTC=1 (CI), which makes that a failure;
//! (b) without a driver, `CudaBackend::new` is a one-line `Unavailable` error and `probe` does not panic;
//! (c) the kernel conformance suite (tests/common/conformance.rs: every kernel against the cpu
//!     backend on awkward sizes, in f32, f16 and bf16, with cuBLAS and with the built-in GEMM), the
//!     tiny fixture's ten steps, `wgpt verify`/`wgpt train --backend cuda` (also `--precision
//!     fp16` and `bf16` against the cpu reference) — skipped, visibly, without a CUDA
//!     device (tests/conformance.rs checks the suite's cases on the cpu against float64 references);
//! (d) the tests of (c) once more in a child process whose "device" is the CUDA emulator of
//!     tests/cuda_emu (the real cuda/*.cu compiled for the host, behind a stand-in libcuda): the
//!     whole backend runs — cudarc, NVRTC, module loading, every launch — with the kernels on the
//!     CPU. The emulator presents an sm_80, so bf16 runs there; an emulator-only test makes it an
//!     sm_70 to see bf16 refused. Skipped, visibly, without a C++ compiler or NVRTC, unless
//!     WGPT_REQUIRE_NVRTC=1 (CI).
//!     This is not a GPU: it proves the host code and the kernels' logic, not timing or the memory model.

mod common;
mod cuda_emu;
use common::conformance::{self, FLOAT_DTYPES};
use common::{assert_follows_cpu, verify_tiny_fixture, wgpt, wgpt_env};

use wgpt::backend::cuda::{self, compile, CudaBackend, CudaOptions};
use wgpt::backend::Backend;
use wgpt::error::Error;
use wgpt::graph::Phase;

// ---------------------------------------------------------------- (a) NVRTC

/// NVRTC's description, or None after printing why the test is skipped (panics under WGPT_REQUIRE_NVRTC=1).
fn nvrtc_or_skip() -> Option<String> {
    match compile::nvrtc_description() {
        Ok(d) => Some(d),
        Err(e) => {
            if std::env::var("WGPT_REQUIRE_NVRTC").map(|v| v == "1").unwrap_or(false) {
                panic!("WGPT_REQUIRE_NVRTC=1 but NVRTC is unusable: {e}");
            }
            skip_note(&format!("skipped: NVRTC not found ({e})"));
            None
        }
    }
}

#[test]
fn every_kernel_compiles_for_sm70_sm80_sm90() {
    let Some(desc) = nvrtc_or_skip() else { return };
    let archs: Vec<String> = ["sm_70", "sm_80", "sm_90"].iter().map(|s| s.to_string()).collect();
    let t0 = std::time::Instant::now();
    let reports = cuda::compile_all(&archs).unwrap_or_else(|e| panic!("{e}"));
    println!("NVRTC {desc}: {} compilations in {:.1} s", reports.len(), t0.elapsed().as_secs_f64());
    // f32 and f16 for sm_70; f32, f16 and bf16 for sm_80 and sm_90
    assert_eq!(reports.len(), 8 * cuda::SOURCES.len());
    for (arch, want) in [("sm_70", "f32 f16"), ("sm_80", "f32 f16 bf16"), ("sm_90", "f32 f16 bf16")] {
        let mut got: Vec<String> = reports.iter().filter(|r| r.arch == arch).map(|r| r.precision.to_string()).collect();
        got.dedup();
        assert_eq!(got.join(" "), want, "{arch}");
    }
    for r in &reports {
        assert_eq!(r.spill_bytes, 0, "{} {} spills", r.file, r.arch);
        assert!(!r.functions.is_empty(), "{} {}: no functions parsed from\n{}", r.file, r.arch, r.log);
        assert!(r.registers > 0 && r.registers <= 255, "{} {}: {} registers", r.file, r.arch, r.registers);
        let fns: Vec<String> = r.functions.iter().map(|f| format!("{}:{}r/{}B", f.name, f.registers, f.shared_bytes)).collect();
        println!("{} {} {}: max {} registers, {} B smem | {}", r.file, r.arch, r.precision, r.registers, r.shared_bytes, fns.join(" "));
    }
    // each kernel the backend loads is in its file's report
    let all: Vec<&str> = reports.iter().filter(|r| r.arch == "sm_80").flat_map(|r| r.functions.iter().map(|f| f.name.as_str())).collect();
    for k in ["encoder_forward", "layernorm_backward_dinp", "attention_backward_dkv", "crossentropy_forward_backward", "adamw_update", "sgemm_fallback", "clip_scale"] {
        assert!(all.contains(&k), "{k} missing from the compile reports");
    }
}

/// The same with NVRTC 11 (what a CUDA 11 driver needs), through `wgpt kernels --cuda`:
/// $WGPT_TEST_NVRTC11_DIR holds libnvrtc.so.11.2 (CI installs 11.8 there).
#[test]
fn every_kernel_compiles_with_nvrtc11_too() {
    let Some(dir) = std::env::var_os("WGPT_TEST_NVRTC11_DIR").filter(|d| !d.is_empty()) else {
        assert!(std::env::var("WGPT_REQUIRE_NVRTC").as_deref() != Ok("1"), "WGPT_REQUIRE_NVRTC=1 but WGPT_TEST_NVRTC11_DIR is not set");
        skip_note("skipped: NVRTC 11 compile check (set WGPT_TEST_NVRTC11_DIR to a directory with libnvrtc.so.11.2)");
        return;
    };
    let lib = std::path::Path::new(&dir).join("libnvrtc.so.11.2");
    let o = wgpt_env(&["kernels", "--cuda", "--arch", "sm_70,sm_80,sm_90"], &[("WGPT_NVRTC", &lib)]);
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(o.status.success(), "{out}\n{}", String::from_utf8_lossy(&o.stderr));
    let mut lines = out.lines();
    let first = lines.next().unwrap_or_default();
    assert!(first.starts_with("nvrtc: 11."), "{first}");
    assert_eq!(lines.filter(|l| l.contains(" 0 B spills")).count(), 8 * cuda::SOURCES.len(), "{out}");
    println!("{first}: every kernel for sm_70/80/90 in every precision, no spills");
}

#[test]
fn a_broken_kernel_is_an_error_with_the_log() {
    let Some(_) = nvrtc_or_skip() else { return };
    let bad = "extern \"C\" __global__ void k(float* x) { x[0] = undefined_name; }";
    let e = compile::compile_source("cuda/bad.cu", bad, compile::Target::Cubin(80)).unwrap_err();
    assert!(e.msg.contains("undefined_name"), "log does not name the error: {e}");
    let e = cuda::compile_all(&["sm_8x".to_string()]).unwrap_err();
    assert!(matches!(e, Error::Flag { .. }), "{e}");
}

#[test]
fn embedded_sources_match_the_cuda_directory() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("cuda");
    let mut on_disk: Vec<String> = std::fs::read_dir(&dir)
        .unwrap()
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.ends_with(".cu"))
        .map(|n| n.trim_end_matches(".cu").to_string())
        .collect();
    on_disk.sort();
    let mut embedded: Vec<String> = cuda::SOURCES.iter().map(|(f, _)| f.to_string()).collect();
    embedded.sort();
    assert_eq!(on_disk, embedded);
    for (f, src) in cuda::SOURCES {
        assert_eq!(*src, std::fs::read_to_string(dir.join(format!("{f}.cu"))).unwrap(), "{f}.cu");
        // NVIDIA's headers must never be needed (or committed): the kernels include nothing
        assert!(!src.contains("#include"), "{f}.cu includes a header");
    }
    // every family the graph uses has a file (matmul holds the bias / fallback GEMM kernels)
    for fam in ["encoder", "layernorm", "matmul", "attention", "gelu", "residual", "classifier", "adamw", "reduce"] {
        assert!(embedded.iter().any(|e| e == fam), "no cuda/{fam}.cu");
    }
}

#[test]
fn ptxas_log_is_parsed() {
    let log = "\
ptxas info    : 0 bytes gmem
ptxas info    : Compiling entry function 'fwd' for 'sm_70'
ptxas info    : Function properties for fwd
ptxas         .     24 bytes stack frame, 20 bytes spill stores, 96 bytes spill loads
ptxas info    : Used 64 registers, used 1 barriers, 24 bytes cumulative stack size, 2112 bytes smem, 392 bytes cmem[0]
ptxas info    : Compiling entry function 'bwd' for 'sm_70'
ptxas info    : Function properties for bwd
ptxas         .     0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads
ptxas info    : Used 8 registers, used 0 barriers, 360 bytes cmem[0]
";
    let f = compile::parse_ptxas_log(log);
    assert_eq!(f.len(), 2);
    assert_eq!((f[0].name.as_str(), f[0].registers, f[0].shared_bytes, f[0].spill_bytes, f[0].stack_bytes), ("fwd", 64, 2112, 116, 24));
    assert_eq!((f[1].name.as_str(), f[1].registers, f[1].shared_bytes, f[1].spill_bytes), ("bwd", 8, 0, 0));
    assert_eq!(compile::parse_arch("sm_90"), Some(90));
    assert_eq!(compile::parse_arch("70"), Some(70));
    assert_eq!(compile::parse_arch("sm_x"), None);
}

// ---------------------------------------------------------------- (b) no driver

#[test]
fn without_a_driver_new_is_a_one_line_error_and_probe_does_not_panic() {
    let p = cuda::probe();
    let shown = p.to_string();
    println!("{shown}");
    assert!(shown.contains("nvrtc:"));
    if p.driver.is_ok() && !p.devices.is_empty() {
        // a GPU is here: at least a missing device must be a one-line flag error
        let e = CudaBackend::new(p.devices.len() + 7).err().expect("device index past the end must fail");
        assert!(matches!(e, Error::Flag { .. }), "{e}");
        skip_note(&format!("skipped the no-driver half: a CUDA driver and {} device(s) are present", p.devices.len()));
        return;
    }
    assert!(p.devices.is_empty());
    let e = CudaBackend::new(0).err().expect("CudaBackend::new(0) without a device must fail");
    let msg = e.to_string();
    println!("CudaBackend::new(0): {msg}");
    assert!(matches!(e, Error::Unavailable(_)), "{e:?}");
    assert!(!msg.contains('\n'), "not one line: {msg:?}");
    assert!(msg.contains("use --backend wgpu or cpu"), "{msg}");
    if let Err(d) = &p.driver {
        if d.not_found {
            assert!(msg.starts_with("no CUDA driver found (libcuda"), "{msg}");
        }
    }
    // twice: the cached discovery result gives the same answer, still without panicking
    assert_eq!(CudaBackend::new(0).err().unwrap().to_string(), msg);
}

// ---------------------------------------------------------------- (c) kernels vs cpu

/// A CUDA backend on device 0, or None (printing "skipped: no CUDA device") where there is none.
/// Where the driver reports a device, failing to open it is a test failure, not a skip.
fn gpu(opts: CudaOptions) -> Option<CudaBackend> {
    let p = cuda::probe();
    if p.driver.is_err() || p.devices.is_empty() {
        skip_note(&format!("skipped: no CUDA device ({})", p.driver.err().unwrap_or_else(|| "driver present, no GPU".into())));
        return None;
    }
    Some(CudaBackend::with_options(0, opts).unwrap_or_else(|e| panic!("a CUDA device is present but: {e}")))
}

fn dflt() -> CudaOptions {
    CudaOptions::default()
}

/// The kernel conformance suite (tests/common/conformance.rs: every kernel on awkward sizes)
/// against the cpu backend, per float dtype, with cuBLAS where it is present.
#[test]
fn every_kernel_matches_cpu() {
    let Some(mut g) = gpu(dflt()) else { return };
    for dtype in FLOAT_DTYPES {
        conformance::check_against_cpu(&mut g, dtype, 1.0);
    }
}

/// The suite's cases with matmuls once more on the built-in GEMM kernel instead of cuBLAS.
#[test]
fn matmuls_match_cpu_with_the_builtin_gemm() {
    let Some(mut g) = gpu(CudaOptions { no_cublas: true, ..Default::default() }) else { return };
    for dtype in FLOAT_DTYPES {
        let cases: Vec<conformance::Case> = conformance::cases(dtype).into_iter().filter(|c| c.uses_matmul()).collect();
        conformance::check_cases_against_cpu(&mut g, &cases, 1.0, "");
    }
}

// ---------------------------------------------------------------- generation

/// KV-cache decoding on the device: 200 greedy tokens after three prompts of different lengths,
/// decoded in one batch, pick the full forward pass's tokens with logits within 1e-4.
#[test]
fn greedy_decode_matches_the_full_forward_pass() {
    if gpu(dflt()).is_none() {
        return;
    }
    let make = || -> Box<dyn wgpt::backend::Backend> { Box::new(gpu(dflt()).unwrap()) };
    common::decode::check_greedy_matches_full_forward(&make, 200, 1e-4);
    println!("decode on cuda: 200 greedy tokens match the full forward pass");
}

// ---------------------------------------------------------------- the whole training step

/// The tiny fixture (L=2, C=64, NH=4, V=500; B=4, T=32): 10 AdamW steps on one batch, every kernel
/// of the graph on the device, within 1e-4 of the float64 reference losses in expected.json.
#[test]
fn tiny_fixture_ten_steps_match_the_reference_losses() {
    use wgpt::graph::{build_train_step, TrainOptions};
    use wgpt::train::session::{AdamConsts, Session};
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/tiny");
    let (cfg, params) = wgpt::model::checkpoint::read_checkpoint(&dir.join("model.bin")).unwrap();
    let st = wgpt::model::debug_state::read_debug_state(&dir.join("debug_state.bin"), &cfg).unwrap();
    let exp: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(dir.join("expected.json")).unwrap()).unwrap();
    let want: Vec<f64> = exp["losses"].as_array().unwrap().iter().map(|x| x.as_f64().unwrap()).collect();
    assert_eq!(want.len(), 10);
    let Some(g) = gpu(dflt()) else { return };
    let name = g.name();
    let graph = build_train_step(&cfg, &TrainOptions { b: st.b, t: st.t, grad_accum: 1, weight_decay: 0.01, decay_all: true, grad_clip: 0.0, ..Default::default() });
    let mut sess = Session::new(Box::new(g), graph).unwrap();
    sess.upload_params(&params).unwrap();
    let adam = AdamConsts { beta1: 0.9, beta2: 0.999, eps: 1e-8 };
    let t0 = std::time::Instant::now();
    let mut worst = 0f64;
    for (s, &w) in want.iter().enumerate() {
        sess.zero_grad().unwrap();
        let loss = sess.train_micro(&st.x, &st.y).unwrap();
        sess.update(1e-4, adam, s + 1).unwrap();
        let err = (loss as f64 - w).abs();
        worst = worst.max(err);
        assert!(err <= 1e-4, "step {s}: loss {loss}, reference {w} (|diff| {err:e})");
    }
    println!("tiny fixture on {name}: 10 losses within {worst:.2e} of the reference ({:.0} ms)", t0.elapsed().as_secs_f64() * 1e3);
}

// ---------------------------------------------------------------- the CLI on the device

/// `wgpt verify --backend cuda` on the fixture: loss, logits, every gradient and the 10 losses.
#[test]
fn verify_cli_on_the_tiny_fixture() {
    if gpu(dflt()).is_none() {
        return;
    }
    let name = verify_tiny_fixture("cuda");
    println!("verify --backend cuda: {name}");
}

/// `wgpt train --backend cuda` follows the cpu backend's loss curve (gradient accumulation,
/// shuffled data, validation in between).
#[test]
fn training_follows_the_cpu_loss_curve() {
    if gpu(dflt()).is_none() {
        return;
    }
    assert_follows_cpu("cuda", &["--val-every", "3", "--val-batches", "1"]);
}

/// `wgpt train --backend cuda --precision fp16` (dynamic loss scaling) and `bf16` follow the cpu
/// reference in the same precision: six steps, every loss within 1e-2 of the cpu's. Both sides
/// store every value in the 16-bit format; they differ only where an f32 sum, added in another
/// order, rounds to a neighbouring 16-bit value (2^-11 relative for f16, 2^-8 for bf16, at the
/// loss of ~6 about 3e-3 and 2.3e-2 for one unit of the stored logits; the mean over 128
/// positions averages such flips out, so 1e-2 holds with a wide margin for both).
#[test]
fn low_precision_training_follows_the_cpu_in_the_same_precision() {
    let Some(g) = gpu(dflt()) else { return };
    if !g.precisions().contains(&wgpt::graph::DType::F16) {
        panic!("{} has no f16 kernels", g.name());
    }
    let has_bf16 = g.precisions().contains(&wgpt::graph::DType::BF16);
    drop(g);
    let dir = tempfile::tempdir().unwrap();
    for p in ["fp16", "bf16"] {
        if p == "bf16" && !has_bf16 {
            skip_note("skipped: train --precision bf16 on cuda (the GPU is older than sm_80)");
            continue;
        }
        let extra = ["--val-every", "3", "--val-batches", "1", "--precision", p];
        let cpu = common::train_losses("cpu", &dir.path().join(format!("cpu-{p}.jsonl")), &extra);
        let dev = common::train_losses("cuda", &dir.path().join(format!("cuda-{p}.jsonl")), &extra);
        assert_eq!((cpu.len(), dev.len()), (6, 6), "{p}: {cpu:?} {dev:?}");
        assert!(cpu[5] < cpu[0], "the cpu {p} run should learn: {cpu:?}");
        let worst = cpu.iter().zip(&dev).map(|(c, g)| (c - g).abs()).fold(0.0, f64::max);
        assert!(worst < 1e-2, "{p}: cpu {cpu:?} vs cuda {dev:?}");
        println!("train --precision {p} on cuda: 6 losses within {worst:.1e} of the cpu's ({dev:?})");
    }
}

/// Checkpoints and `--resume` on the device: a run stopped after its step-2 checkpoint and resumed
/// gives the uninterrupted run's step 3 and 4 losses (within 1e-4: the wte gradient's atomics make
/// CUDA runs not bit-reproducible).
#[test]
fn resume_on_the_device_continues_the_run() {
    if gpu(dflt()).is_none() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let run = |out: &std::path::Path, log: &std::path::Path, steps: &str, resume: bool| {
        let mut args = vec![
            "train", "--backend", "cuda", "--init", "tests/data/tiny/model.bin", "--train", "tests/data/tiny/train.bin",
            "--val-every", "0", "--gen-tokens", "0", "--batch", "4", "--seq-len", "32", "--steps", "4",
            "--checkpoint-every", "2", "--out", out.to_str().unwrap(), "--log-json", log.to_str().unwrap(),
        ];
        if resume {
            args.push("--resume");
        }
        let o = wgpt(&args);
        assert!(o.status.success(), "train ({steps}): {}", String::from_utf8_lossy(&o.stderr));
        std::fs::read_to_string(log)
            .unwrap()
            .lines()
            .filter_map(|l| {
                let v: serde_json::Value = serde_json::from_str(l).unwrap();
                Some((v["step"].as_u64()?, v["train_loss"].as_f64()?))
            })
            .collect::<Vec<_>>()
    };
    let full = run(&dir.path().join("full"), &dir.path().join("full.jsonl"), "uninterrupted", false);
    let part = dir.path().join("part");
    run(&part, &dir.path().join("a.jsonl"), "first part", false);
    // keep only the step-2 checkpoint, as if the run had stopped before step 4's
    for e in std::fs::read_dir(&part).unwrap() {
        let p = e.unwrap().path();
        if p.file_name().unwrap().to_string_lossy().contains("00000004") {
            std::fs::remove_file(p).unwrap();
        }
    }
    let resumed = run(&part, &dir.path().join("b.jsonl"), "resumed", true);
    assert_eq!(resumed.iter().map(|r| r.0).collect::<Vec<_>>(), vec![3, 4], "{resumed:?}");
    for (s, l) in &resumed {
        let want = full.iter().find(|f| f.0 == *s).unwrap().1;
        assert!((l - want).abs() < 1e-4, "step {s}: resumed {l} vs uninterrupted {want}");
    }
    println!("resume on cuda: steps 3-4 {resumed:?} vs {full:?}");
}

// ---------------------------------------------------------------- (d) the emulator

/// Set in the child process that runs the device tests on the emulator.
const EMU_ENV: &str = "WGPT_CUDA_EMULATED";

/// Whether this process is that child (for the emulator-only tests, which are #[ignore]d and
/// run there with --include-ignored); elsewhere they say so and return.
fn on_emulator() -> bool {
    let yes = std::env::var_os(EMU_ENV).is_some();
    if !yes {
        skip_note("skipped: an emulator-only test (it sets the driver version or GPU memory, or counts driver calls)");
    }
    yes
}

#[test]
fn device_tests_on_the_cuda_emulator() {
    if std::env::var_os(EMU_ENV).is_some() {
        return; // we are the child
    }
    let required = std::env::var("WGPT_REQUIRE_NVRTC").map(|v| v == "1").unwrap_or(false);
    if let Err(e) = compile::nvrtc_description() {
        assert!(!required, "WGPT_REQUIRE_NVRTC=1 but NVRTC is unusable: {e}");
        skip_note(&format!("skipped: the CUDA emulator needs NVRTC ({e})"));
        return;
    }
    let out = std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join("cuda-emu");
    let t0 = std::time::Instant::now();
    let dirs = match cuda_emu::build(&out, cuda::SOURCES, compile::COMMON) {
        Ok(d) => d,
        Err(e) => {
            assert!(!required, "WGPT_REQUIRE_NVRTC=1 but the CUDA emulator did not build: {e}");
            skip_note(&format!("skipped: the CUDA emulator did not build ({e})"));
            return;
        }
    };
    let built = t0.elapsed().as_secs_f64();
    let mut path: Vec<std::path::PathBuf> = dirs;
    if let Some(old) = std::env::var_os("LD_LIBRARY_PATH") {
        path.extend(std::env::split_paths(&old));
    }
    let cache = tempfile::tempdir().unwrap();
    let o = std::process::Command::new(std::env::current_exe().unwrap())
        // the compile-only tests already ran in this process
        .args(["--test-threads", "1", "--nocapture", "--include-ignored", "--skip", "device_tests_on_the_cuda_emulator", "--skip", "compiles", "--skip", "broken_kernel"])
        .env(EMU_ENV, "1")
        .env("LD_LIBRARY_PATH", std::env::join_paths(&path).unwrap())
        .env("WGPT_CACHE_DIR", cache.path())
        // sm_80: every precision (bf16 included) runs; a_bf16_launch_on_sm70_names_fp16 makes it an sm_70
        .env("WGPT_CUDA_EMU_CC", "80")
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&o.stdout);
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "the device tests failed on the CUDA emulator:\n{stdout}\n{stderr}");
    // every device test really ran there: no skips, and the backend named the emulator
    assert!(!stderr.contains("skipped: no CUDA device"), "a device test skipped on the emulator:\n{stderr}");
    for l in stderr.lines().filter(|l| l.starts_with("skipped")) {
        skip_note(&format!("(on the emulator) {l}"));
    }
    assert!(stdout.contains("CUDA emulator"), "the child did not run on the emulator:\n{stdout}");
    for must in [
        "tiny fixture on", "decode on cuda", "verify --backend cuda", "attention", "matmul", "norm/clip/adamw", "CUDA 11.4 driver + NVRTC 12",
        "host wait", "1 GiB GPU", "resume on cuda", "cuBLAS failing", "two ranks on one GPU", "profile on cuda", "train --precision fp16 on cuda",
        "train --precision bf16 on cuda", "bf16 on an sm_70",
    ] {
        assert!(stdout.contains(must), "`{must}` missing from the emulated run:\n{stdout}");
    }
    if std::env::var("WGPT_TEST_NCCL_LIB").is_ok_and(|v| !v.is_empty()) {
        for must in ["CUDA ranks without MPI, --dist-init tcp", "CUDA ranks without MPI, --dist-init fs", "CUDA ranks without MPI, --dist-init auto"] {
            assert!(stdout.contains(must), "`{must}` missing from the emulated run:\n{stdout}");
        }
    }
    // the conformance suite ran twice per precision there: every case with cuBLAS, the matmuls on
    // the built-in GEMM; no precision was skipped
    for p in ["f32", "f16", "bf16"] {
        let suites: Vec<&str> = stdout.lines().filter(|l| l.contains(&format!(" {p} cases on cuda: "))).collect();
        assert!(suites.len() == 2 && suites[1].contains("built-in GEMM"), "the {p} conformance suites did not both run:\n{stdout}");
    }
    assert!(!stderr.contains("kernel conformance on cuda"), "a precision was skipped on the emulator:\n{stderr}");
    println!("{stdout}");
    println!("CUDA emulator: built in {built:.1} s, device tests in {:.1} s", t0.elapsed().as_secs_f64() - built);
}

/// Emulator only (the one driver whose CUDA version a test can choose): a CUDA 11 driver with
/// only NVRTC 12 is a one-line error naming what to install; with NVRTC 11 on LD_LIBRARY_PATH
/// ($WGPT_TEST_NVRTC11_DIR, e.g. from `pip install --target D nvidia-cuda-nvrtc-cu11`) that one
/// is chosen over the NVRTC 12 in site-packages, and the fixture verifies through it.
#[test]
#[ignore = "emulator only: device_tests_on_the_cuda_emulator runs it"]
fn a_cuda11_driver_gets_nvrtc11() {
    if !on_emulator() {
        return;
    }
    let nvrtc = wgpt::backend::cuda::dl::lib(wgpt::backend::cuda::dl::Which::Nvrtc).unwrap().path.clone();
    let verify = ["verify", "--model", "tests/data/tiny/model.bin", "--state", "tests/data/tiny/debug_state.bin", "--backend", "cuda", "--steps", "2"];
    let run = |envs: &[(&str, &str)]| {
        let mut all = vec![("WGPT_CUDA_EMU_DRIVER", "11040")];
        all.extend_from_slice(envs);
        wgpt_env(&verify, &all)
    };
    // (a) NVRTC 12 with a CUDA 11.4 driver
    let o = run(&[("WGPT_NVRTC", nvrtc.as_str())]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success());
    assert!(!err.contains("panicked"), "{err}");
    let line = err.lines().find(|l| l.starts_with("error")).expect("an error line");
    assert!(line.contains("CUDA 11.4 driver") && line.contains("nvidia-cuda-nvrtc-cu11"), "{line}");
    println!("CUDA 11.4 driver + NVRTC 12: {line}");
    // (b) NVRTC 11 on LD_LIBRARY_PATH is preferred for that driver
    let Some(dir) = std::env::var_os("WGPT_TEST_NVRTC11_DIR").filter(|d| !d.is_empty()) else {
        assert!(std::env::var("WGPT_REQUIRE_NVRTC").as_deref() != Ok("1"), "WGPT_REQUIRE_NVRTC=1 but WGPT_TEST_NVRTC11_DIR is not set");
        skip_note("skipped: the NVRTC 11 half (set WGPT_TEST_NVRTC11_DIR to a directory with libnvrtc.so.11.2)");
        return;
    };
    let mut lp: Vec<std::path::PathBuf> = std::env::split_paths(&std::env::var_os("LD_LIBRARY_PATH").unwrap_or_default()).collect();
    lp.push(std::path::PathBuf::from(&dir));
    let lp = std::env::join_paths(lp).unwrap();
    let env = [("LD_LIBRARY_PATH", lp.to_str().unwrap()), ("WGPT_NVRTC", "")];
    let o = run(&env);
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(o.status.success(), "verify with NVRTC 11 failed:\n{out}\n{}", String::from_utf8_lossy(&o.stderr));
    let info = wgpt_env(&["info"], &[("WGPT_CUDA_EMU_DRIVER", "11040"), env[0], env[1]]);
    let info = String::from_utf8_lossy(&info.stdout);
    let line = info.lines().find(|l| l.starts_with("nvrtc: 11.")).unwrap_or_else(|| panic!("NVRTC 11 not chosen:\n{info}"));
    assert!(!info.contains("warning"), "{info}");
    println!("CUDA 11.4 driver: chose {line}; verify passed");
}

/// Emulator only (it counts what the host asks of the driver): one training step — zero_grad,
/// forward, loss, backward, gradient norm and clip, AdamW — is launches on one stream with a
/// single host wait, at the end (reading the gradient norm back).
#[test]
#[ignore = "emulator only: device_tests_on_the_cuda_emulator runs it"]
fn a_training_step_waits_on_the_host_once() {
    if !on_emulator() {
        return;
    }
    use wgpt::graph::{build_train_step, TrainOptions};
    use wgpt::train::session::{AdamConsts, Session};
    let driver = wgpt::backend::cuda::dl::lib(wgpt::backend::cuda::dl::Which::Driver).unwrap();
    let p = driver.sym("wgpt_emu_counters").expect("the emulator's libcuda exports wgpt_emu_counters");
    let counters: extern "C" fn(*mut i64) = unsafe { std::mem::transmute(p) };
    let read = || {
        let mut c = [0i64; 3];
        counters(c.as_mut_ptr());
        c
    };
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/tiny");
    let (cfg, params) = wgpt::model::checkpoint::read_checkpoint(&dir.join("model.bin")).unwrap();
    let st = wgpt::model::debug_state::read_debug_state(&dir.join("debug_state.bin"), &cfg).unwrap();
    let graph = build_train_step(&cfg, &TrainOptions { b: st.b, t: st.t, grad_accum: 1, weight_decay: 0.0, decay_all: true, grad_clip: 1.0, ..Default::default() });
    let n_launches: usize =
        [Phase::Train, Phase::ZeroGrad, Phase::GradNorm, Phase::Update].iter().map(|&p| graph.phase(p).len()).sum();
    let mut sess = Session::new(Box::new(gpu(dflt()).unwrap()), graph).unwrap();
    sess.upload_params(&params).unwrap();
    let adam = AdamConsts { beta1: 0.9, beta2: 0.95, eps: 1e-8 };
    // as the training loop does it: queue the micro-step, queue the update, which reads the
    // gradient norm back (the one wait), then read the loss (nothing left to wait for)
    sess.zero_grad().unwrap();
    sess.train_micro_async(&st.x, &st.y).unwrap();
    sess.update(1e-4, adam, 1).unwrap();
    sess.mean_loss().unwrap();
    let c0 = read();
    sess.zero_grad().unwrap();
    // two micro-steps (gradient accumulation): their losses add up on the device, no wait between
    sess.train_micro_async(&st.x, &st.y).unwrap();
    sess.train_micro_async(&st.x, &st.y).unwrap();
    let c1 = read();
    let norm = sess.update(1e-4, adam, 2).unwrap();
    let c2 = read();
    let loss = sess.step_loss().unwrap();
    let c3 = read();
    assert_eq!(c3[1] - c2[1], 1, "reading the step's loss: one wait (with nothing left to run)");
    let launches = c2[0] - c0[0];
    println!(
        "one step (grad clip on, 2 micro-steps): {launches} launches for {n_launches} graph launches; host waits: {} before the update, {} at its end; loss {loss}, norm {norm}",
        c1[1] - c0[1],
        c2[1] - c1[1]
    );
    assert!(launches as usize >= n_launches, "{launches} kernel launches for {n_launches} graph launches");
    assert_eq!(c1[1] - c0[1], 0, "the host waited during zero_grad/forward/backward");
    assert_eq!(c1[2] - c0[2], 0, "a device→host copy during zero_grad/forward/backward");
    assert_eq!(c2[1] - c1[1], 1, "host waits in the update");
    assert!(loss.is_finite() && norm.is_finite() && norm > 0.0);
}

/// Emulator only (its memory size can be chosen): a step larger than the GPU's free memory is
/// refused before allocating, with one line naming the flags to lower.
#[test]
#[ignore = "emulator only: device_tests_on_the_cuda_emulator runs it"]
fn a_step_too_big_for_the_gpu_is_a_one_line_error() {
    if !on_emulator() {
        return;
    }
    let o = wgpt_env(
        &["bench", "--backend", "cuda", "--model", "d12", "--batch", "8", "--seq-len", "1024", "--steps", "1"],
        &[("WGPT_CUDA_EMU_MEM_MIB", "1024")],
    );
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success());
    assert!(!err.contains("panicked"), "{err}");
    let line = err.lines().find(|l| l.starts_with("error")).expect("an error line");
    assert!(line.contains("--batch") && line.contains("GiB"), "{line}");
    println!("d12 B=8 T=1024 on a 1 GiB GPU: {line}");
}

/// Emulator only (it presents one GPU): two local ranks that would share it are refused before
/// anything is allocated or MPI is looked for, with what to change.
#[test]
#[ignore = "emulator only: device_tests_on_the_cuda_emulator runs it"]
fn two_ranks_on_the_one_gpu_are_refused() {
    if !on_emulator() {
        return;
    }
    let env = [("WGPT_RANK", "1"), ("WGPT_WORLD_SIZE", "2"), ("WGPT_LOCAL_RANK", "1"), ("WGPT_LOCAL_SIZE", "2"), ("WGPT_MPI_LIB", "/no/such/libmpi.so")];
    let o = wgpt_env(&["train", "--backend", "cuda", "--init", "tests/data/tiny/model.bin", "--steps", "1"], &env);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success() && !err.contains("panicked"), "{err}");
    let line = err.lines().next().unwrap_or("");
    assert!(line.contains("would both use CUDA device 0") && line.contains("--device-per-rank"), "{line}");
    println!("two ranks on one GPU: {line}");
}

/// `wgpt bench --profile` on CUDA: every launch timed between two events on the backend's stream
/// (the emulator records its clock when a launch has run). Its name is in no table of GPUs, so
/// the peaks are given.
#[test]
#[ignore = "emulator only: device_tests_on_the_cuda_emulator runs it"]
fn profile_on_cuda() {
    if !on_emulator() {
        return;
    }
    let args = [
        "bench", "--profile", "--json", "--backend", "cuda", "--model", "d2:c64", "--batch", "2", "--seq-len", "32", "--steps", "1",
        "--peak-gflops", "1000", "--peak-gbs", "100",
    ];
    let o = wgpt(&args);
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(o.status.success(), "{out}\n{}", String::from_utf8_lossy(&o.stderr));
    let r: serde_json::Value = serde_json::from_str(out.lines().last().unwrap()).unwrap();
    assert_eq!(r["clock"], "CUDA events");
    let launches = r["launches"].as_array().unwrap();
    assert!(launches.len() > 40 && launches.iter().all(|l| l["ms"].as_f64().unwrap() >= 0.0));
    let sum: f64 = launches.iter().map(|l| l["ms"].as_f64().unwrap()).sum();
    assert!(sum > 0.0, "{out}");
    // without given peaks, a GPU missing from the table is a one-line error naming the flags
    let o = wgpt(&args[..13]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success() && err.lines().next().unwrap_or("").contains("--peak-gflops"), "{err}");
    println!("profile on cuda: {} launches timed by CUDA events, {sum:.1} ms", launches.len());
}

/// Emulator only: CUDA ranks with no MPI (`--dist-init tcp`, then `fs:DIR`) find each other, pass
/// rank 0's real NCCL id and reach ncclCommInitRank, which the emulated driver cannot serve: every
/// rank then stops with NCCL's reason on one line, within bounded time, instead of hanging. (On a
/// GPU, `wgpt nccl-selftest --join` checks the collectives themselves; see tests/nccl.rs.)
#[test]
#[ignore = "emulator only: device_tests_on_the_cuda_emulator runs it"]
fn cuda_ranks_without_mpi_reach_nccl() {
    if !on_emulator() {
        return;
    }
    let Some(nccl) = std::env::var("WGPT_TEST_NCCL_LIB").ok().filter(|p| !p.is_empty()) else {
        assert!(std::env::var("WGPT_REQUIRE_NCCL").as_deref() != Ok("1"), "WGPT_REQUIRE_NCCL=1 but WGPT_TEST_NCCL_LIB is not set");
        skip_note("skipped: CUDA ranks without MPI (set WGPT_TEST_NCCL_LIB)");
        return;
    };
    let port = std::net::TcpListener::bind(("127.0.0.1", 0)).unwrap().local_addr().unwrap().port().to_string();
    let dir = tempfile::tempdir().unwrap();
    let fs = format!("fs:{}", dir.path().display());
    // auto: no MPI and no MASTER_ADDR, so the id goes through a file in the cache directory
    for init in ["tcp", fs.as_str(), "auto"] {
        let t0 = std::time::Instant::now();
        let ranks: Vec<_> = (0..2)
            .map(|r| {
                let (nccl, port, init) = (nccl.clone(), port.clone(), init.to_string());
                std::thread::spawn(move || {
                    let r = r.to_string();
                    // one rank per node (each has its own GPU 0); no MPI to be found
                    let mut env = vec![
                        ("WGPT_RANK", r.as_str()), ("WGPT_WORLD_SIZE", "2"), ("WGPT_LOCAL_RANK", "0"), ("WGPT_LOCAL_SIZE", "1"),
                        ("WGPT_NCCL_LIB", nccl.as_str()), ("WGPT_MPI_LIB", "/no/such/libmpi.so"), ("WGPT_RUN_ID", "emu"),
                    ];
                    if init != "auto" {
                        env.extend([("MASTER_ADDR", "127.0.0.1"), ("MASTER_PORT", port.as_str())]);
                    }
                    let args = ["train", "--backend", "cuda", "--init", "tests/data/tiny/model.bin", "--steps", "1", "--dist-init", init.as_str(), "--dist-timeout", "30"];
                    wgpt_env(&args, &env)
                })
            })
            .collect();
        for (r, h) in ranks.into_iter().enumerate() {
            let o = h.join().unwrap();
            let err = String::from_utf8_lossy(&o.stderr);
            assert!(!o.status.success() && !err.contains("panicked"), "rank {r}: {err}");
            let line = err.lines().find(|l| l.starts_with("error")).expect("an error line");
            assert!(line.contains("ncclCommInitRank"), "rank {r} ({init}) did not reach NCCL: {err}");
            if init == "auto" {
                let dir = std::path::Path::new(&std::env::var("WGPT_CACHE_DIR").unwrap()).join("rendezvous/wgpt-rendezvous-emu.bin");
                assert!(dir.exists(), "auto did not go through {}", dir.display());
            }
        }
        assert!(t0.elapsed().as_secs() < 60, "{init}: took {:?}", t0.elapsed());
        println!("CUDA ranks without MPI, --dist-init {}: both reached ncclCommInitRank in {:.1} s", init.split(':').next().unwrap(), t0.elapsed().as_secs_f64());
    }
}

/// Emulator only (its cuBLAS can be made to fail): a cuBLAS that cannot start is a warning, and
/// the run goes on with the built-in GEMM.
#[test]
#[ignore = "emulator only: device_tests_on_the_cuda_emulator runs it"]
fn a_failing_cublas_falls_back_to_the_builtin_gemm() {
    if !on_emulator() {
        return;
    }
    let o = wgpt_env(
        &["verify", "--model", "tests/data/tiny/model.bin", "--state", "tests/data/tiny/debug_state.bin", "--backend", "cuda", "--steps", "2", "--json"],
        &[("WGPT_CUDA_EMU_CUBLAS_FAIL", "1")],
    );
    let out = String::from_utf8_lossy(&o.stdout);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "{out}\n{err}");
    let warning = err.lines().find(|l| l.starts_with("warning: cuBLAS unusable")).unwrap_or_else(|| panic!("no warning:\n{err}"));
    let r: serde_json::Value = serde_json::from_str(out.lines().last().unwrap()).unwrap();
    assert!(r["backend"].as_str().unwrap().contains("built-in GEMM"), "{}", r["backend"]);
    println!("cuBLAS failing: {warning}; verify passed on {}", r["backend"]);
}

/// Emulator only (its compute capability can be chosen): on an sm_70 (V100) a bf16 graph is
/// refused when it is prepared, in one line that names `--precision fp16`, and fp16 runs.
#[test]
#[ignore = "emulator only: device_tests_on_the_cuda_emulator runs it"]
fn a_bf16_launch_on_sm70_names_fp16() {
    if !on_emulator() {
        return;
    }
    let args = |p: &'static str| {
        [
            "train", "--backend", "cuda", "--init", "tests/data/tiny/model.bin", "--train", "tests/data/tiny/train.bin", "--val-every", "0",
            "--gen-tokens", "0", "--batch", "2", "--seq-len", "32", "--steps", "1", "--precision", p,
        ]
    };
    let o = wgpt_env(&args("bf16"), &[("WGPT_CUDA_EMU_CC", "70")]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success() && !err.contains("panicked"), "{err}");
    let line = err.lines().find(|l| l.starts_with("error")).expect("an error line");
    assert!(line.contains("bf16 needs sm_80 (this GPU is sm_70") && line.contains("use --precision fp16"), "{line}");
    let o = wgpt_env(&args("fp16"), &[("WGPT_CUDA_EMU_CC", "70")]);
    assert!(o.status.success(), "fp16 on an sm_70: {}", String::from_utf8_lossy(&o.stderr));
    println!("bf16 on an sm_70: {line}; fp16 trains");
}

/// Say why a test is skipped where the person running `cargo test` sees it: written straight to
/// the process's stderr, which libtest's output capture (print!/eprint! only) does not swallow.
fn skip_note(msg: &str) {
    use std::io::Write;
    let _ = writeln!(std::io::stderr().lock(), "{msg}");
}
