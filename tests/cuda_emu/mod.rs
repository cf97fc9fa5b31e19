//! Builds the CUDA emulator (tests only): the real `cuda/*.cu` sources compiled for the host with
//! `shim.h`, linked with `driver.cpp` into a stand-in `libcuda.so.1`, plus `cublas.cpp` as a
//! stand-in `libcublas.so.12`/`libcublasLt.so.12`. A test process started with the output
//! directory first on `LD_LIBRARY_PATH` then runs the whole CUDA backend — cudarc, the real NVRTC
//! (which must still compile every kernel for the emulated architecture), module loading, every
//! launch with its real arguments, cuBLAS calls — with the kernels executing on the CPU.

use std::path::{Path, PathBuf};
use std::process::Command;

/// The kernel entry points of one .cu source: `extern "C" __global__ void [__launch_bounds__(..)] name(`.
pub fn kernel_names(src: &str) -> Vec<String> {
    let mut out = Vec::new();
    let key = "extern \"C\" __global__ void";
    let mut rest = src;
    while let Some(i) = rest.find(key) {
        rest = &rest[i + key.len()..];
        let mut s = rest.trim_start();
        if let Some(t) = s.strip_prefix("__launch_bounds__") {
            let close = t.find(')').expect("unclosed __launch_bounds__");
            s = t[close + 1..].trim_start();
        }
        let name: String = s.chars().take_while(|c| c.is_alphanumeric() || *c == '_').collect();
        assert!(!name.is_empty(), "cannot parse a kernel name at: {}", &s[..s.len().min(60)]);
        out.push(name);
    }
    out
}

/// The precisions every family is built in: the name (the suffix of `wgpt_floatx_<p>` in
/// cuda/common.cuh) and the macro that selects it, the backend's own (`precision_define`).
fn precisions() -> Vec<(&'static str, &'static str)> {
    use wgpt::backend::cuda::compile::precision_define;
    use wgpt::graph::DType;
    [DType::F32, DType::F16, DType::BF16].into_iter().map(|p| (p.name(), precision_define(p).map_or("", |d| d.trim_start_matches("-D")))).collect()
}

/// The host translation unit for one family in one precision: shim, `cuda/common.cuh` with the
/// precision's define, the source (dynamic shared memory made thread-local like every other
/// `__shared__`; each kernel renamed `<name>__<p>` so the three builds link together), and the
/// registration of each kernel as `<name>@<p>` (the driver looks a module's functions up under its
/// precision).
fn host_source(family: &str, src: &str, common: &str, precision: &str, define: &str) -> String {
    let mut s = String::new();
    if !define.is_empty() {
        s.push_str(&format!("#define {define} 1\n"));
    }
    s.push_str("#include \"shim.h\"\n");
    s.push_str(common);
    let names = kernel_names(src);
    for k in &names {
        s.push_str(&format!("\n#define {k} {k}__{precision}"));
    }
    s.push('\n');
    s.push_str(&src.replace("extern __shared__", "extern thread_local"));
    s.push_str(&format!("\nstatic struct EmuRegister_{family}_{precision} {{\n    EmuRegister_{family}_{precision}() {{\n"));
    for k in &names {
        s.push_str(&format!("        emu_reg(\"{k}@{precision}\", &{k});\n"));
    }
    s.push_str(&format!("    }}\n}} emu_register_{family}_{precision};\n"));
    s
}

fn cxx() -> Option<String> {
    for c in [std::env::var("CXX").unwrap_or_default().as_str(), "c++", "g++", "clang++"] {
        if !c.is_empty() && Command::new(c).arg("--version").output().map(|o| o.status.success()).unwrap_or(false) {
            return Some(c.to_string());
        }
    }
    None
}

fn run(cmd: &mut Command) -> Result<(), String> {
    let out = cmd.output().map_err(|e| format!("{cmd:?}: {e}"))?;
    if !out.status.success() {
        return Err(format!("{cmd:?} failed:\n{}", String::from_utf8_lossy(&out.stderr)));
    }
    Ok(())
}

/// Build (or reuse) the emulator under `out` from the families' `sources` and `common` (the text
/// of cuda/common.cuh), every family once per precision; returns the directories to put on
/// LD_LIBRARY_PATH. Err(reason) where no C++20 compiler is available.
pub fn build(out: &Path, sources: &[(&str, &str)], common: &str) -> Result<Vec<PathBuf>, String> {
    let cxx = cxx().ok_or("no C++ compiler (c++, g++ or clang++)")?;
    let here = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/cuda_emu");
    std::fs::create_dir_all(out).map_err(|e| e.to_string())?;
    let shim = std::fs::read_to_string(here.join("shim.h")).map_err(|e| e.to_string())?;
    let driver = std::fs::read_to_string(here.join("driver.cpp")).map_err(|e| e.to_string())?;
    let blas = std::fs::read_to_string(here.join("cublas.cpp")).map_err(|e| e.to_string())?;
    // rebuild only when an input changed
    let mut key = format!("{cxx}\n{shim}\n{driver}\n{blas}\n{common}\n");
    for (f, s) in sources {
        key.push_str(f);
        key.push_str(s);
    }
    let stamp = out.join("inputs.txt");
    let lib = out.join("libcuda.so.1");
    let blas_dir = out.join("blas");
    if std::fs::read_to_string(&stamp).ok().as_deref() == Some(key.as_str()) && lib.is_file() {
        return Ok(vec![out.to_path_buf(), blas_dir]);
    }
    let _ = std::fs::remove_file(&stamp);
    std::fs::write(out.join("shim.h"), &shim).map_err(|e| e.to_string())?;
    std::fs::write(out.join("driver.cpp"), &driver).map_err(|e| e.to_string())?;
    let flags = ["-std=c++20", "-O2", "-g0", "-fPIC", "-fvisibility=hidden", "-fvisibility-inlines-hidden", "-Wno-unknown-pragmas"];
    let mut units = vec![out.join("driver.cpp")];
    for (family, src) in sources {
        for (precision, define) in precisions() {
            let p = out.join(format!("k_{family}_{precision}.cpp"));
            std::fs::write(&p, host_source(family, src, common, precision, define)).map_err(|e| e.to_string())?;
            units.push(p);
        }
    }
    // compile the units two at a time (the CI machine has 2 cores)
    let mut objs = Vec::new();
    for pair in units.chunks(2) {
        let mut kids = Vec::new();
        for u in pair {
            let o = u.with_extension("o");
            let child = Command::new(&cxx)
                .args(flags)
                .arg("-I")
                .arg(out)
                .arg("-c")
                .arg(u)
                .arg("-o")
                .arg(&o)
                .stderr(std::process::Stdio::piped())
                .spawn()
                .map_err(|e| format!("{cxx}: {e}"))?;
            kids.push((u.clone(), child));
            objs.push(o);
        }
        for (u, k) in kids {
            let r = k.wait_with_output().map_err(|e| e.to_string())?;
            if !r.status.success() {
                return Err(format!("compiling {} for the host failed:\n{}", u.display(), String::from_utf8_lossy(&r.stderr)));
            }
        }
    }
    run(Command::new(&cxx).arg("-shared").arg("-Wl,-soname,libcuda.so.1").arg("-o").arg(&lib).args(&objs).arg("-pthread"))?;
    let _ = std::fs::remove_file(out.join("libcuda.so"));
    std::os::unix::fs::symlink("libcuda.so.1", out.join("libcuda.so")).map_err(|e| e.to_string())?;
    std::fs::create_dir_all(&blas_dir).map_err(|e| e.to_string())?;
    for (name, soname) in [("libcublas.so.12", "libcublas.so.12"), ("libcublasLt.so.12", "libcublasLt.so.12")] {
        run(Command::new(&cxx)
            .args(["-std=c++20", "-O2", "-fPIC", "-shared"])
            .arg(format!("-Wl,-soname,{soname}"))
            .arg("-o")
            .arg(blas_dir.join(name))
            .arg(here.join("cublas.cpp")))?;
    }
    for (link, target) in [("libcublas.so", "libcublas.so.12"), ("libcublasLt.so", "libcublasLt.so.12")] {
        let _ = std::fs::remove_file(blas_dir.join(link));
        std::os::unix::fs::symlink(target, blas_dir.join(link)).map_err(|e| e.to_string())?;
    }
    std::fs::write(&stamp, key).map_err(|e| e.to_string())?;
    Ok(vec![out.to_path_buf(), blas_dir])
}
