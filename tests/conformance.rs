//! The kernel conformance suite of tests/common/conformance.rs — one list of kernel cases with
//! awkward sizes — on the cpu backend against its float64 references, and on the wgpu backend
//! against the cpu backend: in every matmul mode the adapter offers, with long-k matmuls split
//! along k, and with storage bindings limited to 64 KiB so that every kernel is chunked. (The
//! CUDA backend runs the same suite in tests/cuda.rs, on a device or on the CUDA emulator.)
//! Each suite runs per float dtype; a dtype a backend lacks is reported as skipped.
//!
//! Without any wgpu adapter the wgpu tests print "skipped: no wgpu adapter" and pass, unless
//! WGPT_REQUIRE_ADAPTER=1 (CI), where that is a failure. Here lavapipe (Vulkan on the CPU) runs
//! them; WGPT_TEST_ADAPTER=<index> picks another adapter.

mod common;
use common::conformance::{self, check_cases_against_cpu, Case, FLOAT_DTYPES, LONG_K, SPLIT_BINDINGS};
use common::wgpu_adapter;
use wgpt::backend::wgpu::{MatmulMode, WgpuBackend};
use wgpt::graph::DType;

fn selected(dtype: DType, keep: impl Fn(&Case) -> bool) -> Vec<Case> {
    conformance::cases(dtype).into_iter().filter(keep).collect()
}

#[test]
fn cpu_matches_the_float64_references() {
    for dtype in FLOAT_DTYPES {
        conformance::check_cpu_against_references(dtype);
    }
}

/// Every case, in the adapter's default matmul mode.
#[test]
fn wgpu_matches_cpu() {
    let Some(mut g) = wgpu_adapter() else { return };
    let mode = g.matmul_mode();
    for dtype in FLOAT_DTYPES {
        check_cases_against_cpu(&mut g, &conformance::cases(dtype), 1.0, &format!("{mode:?} matmul"));
    }
}

fn other_matmul_modes(g: &WgpuBackend) -> Vec<MatmulMode> {
    if !g.subgroup_matmul_available() {
        let i = g.adapter_info();
        println!("note: no subgroup matmul on {} (subgroups {:?})", i.name, (i.subgroup_min_size, i.subgroup_max_size));
    }
    g.matmul_modes().into_iter().filter(|&m| m != g.matmul_mode()).collect()
}

/// The cases with matmuls in each other matmul mode of the adapter, then the long-k ones split
/// along k in every mode.
#[test]
fn wgpu_matmuls_match_cpu_in_every_mode_and_split_along_k() {
    let Some(mut g) = wgpu_adapter() else { return };
    let (default, target) = (g.matmul_mode(), g.caps().split_k_target);
    // (mode, split long k): the other modes on every matmul case, then every mode split along k
    let runs: Vec<(MatmulMode, bool)> =
        other_matmul_modes(&g).into_iter().map(|m| (m, false)).chain(g.matmul_modes().into_iter().map(|m| (m, true))).collect();
    for dtype in FLOAT_DTYPES {
        let cases = selected(dtype, Case::uses_matmul);
        let long: Vec<Case> = cases.iter().filter(|c| c.has_tag(LONG_K)).cloned().collect();
        for &(mode, split_k) in &runs {
            g.set_matmul_mode(mode).unwrap();
            g.set_split_k_target(if split_k { 100_000 } else { target });
            let (what, list) = if split_k { (format!("{mode:?} matmul, split-K"), &long) } else { (format!("{mode:?} matmul"), &cases) };
            let o = check_cases_against_cpu(&mut g, list, 1.0, &what);
            if o.ran == 0 && !o.skipped.is_empty() {
                break; // a dtype that cannot run is reported once
            }
        }
        g.set_split_k_target(target);
        g.set_matmul_mode(default).unwrap();
    }
}

/// The cases with buffers beyond 64 KiB again with bindings limited to 64 KiB, so that each
/// kernel is split into several dispatches (row/column/vocabulary/batch chunks) exactly as on
/// an adapter with small limits.
#[test]
fn wgpu_matches_cpu_with_bindings_split() {
    let Some(mut g) = wgpu_adapter() else { return };
    g.limit_bindings_for_tests(64 * 1024);
    for dtype in FLOAT_DTYPES {
        let cases = selected(dtype, |c| c.has_tag(SPLIT_BINDINGS));
        check_cases_against_cpu(&mut g, &cases, 1.0, "64 KiB bindings");
    }
}

/// The suite catches a broken kernel: a cpu backend whose GeluBackward leaves the last element
/// unwritten and whose CrossEntropy ignores `accumulate` fails exactly those cases, naming them,
/// the buffer and the index.
#[test]
fn a_broken_kernel_fails_the_suite() {
    use wgpt::backend::cpu::CpuBackend;
    use wgpt::backend::{Backend, Prepared, RawBuffer};
    use wgpt::error::Result;
    use wgpt::graph::{BufId, BufferTable, Kernel, Launch, View};

    struct Broken(CpuBackend);
    impl Backend for Broken {
        fn name(&self) -> String {
            "broken cpu".into()
        }
        fn kind(&self) -> wgpt::backend::BackendKind {
            self.0.kind()
        }
        fn supports(&self, dtype: DType) -> bool {
            self.0.supports(dtype)
        }
        fn alloc(&mut self, table: &BufferTable) -> Result<()> {
            self.0.alloc(table)
        }
        fn table(&self) -> &BufferTable {
            self.0.table()
        }
        fn upload_bytes(&mut self, id: BufId, bytes: &[u8]) -> Result<()> {
            self.0.upload_bytes(id, bytes)
        }
        fn download_bytes(&mut self, view: View) -> Result<Vec<u8>> {
            self.0.download_bytes(view)
        }
        fn prepare_valid(&mut self, launches: &[Launch]) -> Result<Prepared> {
            let mut l = launches.to_vec();
            for x in &mut l {
                match &mut x.kernel {
                    Kernel::GeluBackward { n, .. } => *n -= 1,
                    Kernel::CrossEntropy { accumulate, .. } => *accumulate = false,
                    _ => {}
                }
            }
            self.0.prepare_valid(&l)
        }
        fn run_prepared(&mut self, phase: Prepared) -> Result<()> {
            self.0.run_prepared(phase)
        }
        fn release(&mut self, phase: Prepared) {
            self.0.release(phase)
        }
        fn sync(&mut self) -> Result<()> {
            self.0.sync()
        }
        fn raw_buffer(&mut self, id: BufId) -> Result<RawBuffer<'_>> {
            self.0.raw_buffer(id)
        }
        fn profile_valid(&mut self, launches: &[Launch]) -> Result<wgpt::backend::Profile> {
            self.0.profile_valid(launches)
        }
    }

    let cases = selected(DType::F32, |c| c.name.starts_with("gelu") || c.name.starts_with("crossentropy") || c.name.starts_with("encoder"));
    let mut b = Broken(CpuBackend::new(Some(2)).unwrap());
    let err = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| check_cases_against_cpu(&mut b, &cases, 1.0, "")))
        .expect_err("a broken backend passed the suite");
    let msg = err.downcast_ref::<String>().cloned().unwrap_or_default();
    println!("{msg}");
    let lines: Vec<&str> = msg.lines().skip(1).collect();
    let gelu = cases.iter().filter(|c| c.name.starts_with("gelu")).count();
    let acc = cases.iter().filter(|c| c.launches.iter().any(|l| matches!(l.kernel, Kernel::CrossEntropy { accumulate: true, .. }))).count();
    assert_eq!(lines.len(), gelu + acc, "one failure per broken case:\n{msg}");
    assert!(lines.iter().filter(|l| l.contains(": dinp: 1 of ")).count() == gelu, "{msg}");
    assert!(msg.contains("crossentropy n=3 v=5000 vp=5008 grad=true acc=true [broken cpu]: losses: 3 of 3 elements fail"), "{msg}");
    assert!(!msg.contains("encoder"), "{msg}");
}
