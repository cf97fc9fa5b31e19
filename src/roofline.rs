//! The roofline: a device's peak FLOP/s and memory bandwidth, and the least time a launch of
//! known FLOPs and bytes (`graph::cost`) can take on it: max(flops / peak FLOP/s, bytes / peak
//! bandwidth). The profiler reports each launch's measured time as a fraction of that bound;
//! `wgpt plan --roofline DEVICE` sums it over a whole training step.
//!
//! Peaks come from a table of known GPUs, matched by adapter name, or from `--peak-gflops` /
//! `--peak-gbs`; on the cpu backend (and a software adapter such as lavapipe, which runs on the
//! same cores) from a short measurement of this machine.

use crate::error::{Error, Result};

/// A device's limits. FLOP/s are the fp32 vector peak (no tensor cores: wgpt's f32 kernels do
/// not use them) and, where the device has a faster half-precision path, its f16 peak.
#[derive(Clone, Debug, PartialEq, serde::Serialize)]
pub struct Peaks {
    pub name: String,
    pub fp32_gflops: f64,
    /// matmuls with TF32 inputs on tensor cores (sm_80+, `--tf32`; dense); the fp32 figure elsewhere
    pub tf32_gflops: f64,
    /// f16 with f32 accumulation on the device's fastest path (tensor cores where it has them)
    pub fp16_gflops: f64,
    pub gbs: f64,
    /// where the figures come from: "table", "measured", "--peak-gflops/--peak-gbs"
    pub source: String,
}

/// Known devices: (what the adapter name contains, lower-case; name, fp32 GFLOP/s, f16 GFLOP/s,
/// GB/s, TF32 GFLOP/s or 0 for none). Published peak figures (dense), rounded; the first match
/// wins, so longer names come first.
const KNOWN: &[(&str, &str, f64, f64, f64, f64)] = &[
    ("h200", "NVIDIA H200", 67_000.0, 989_000.0, 4_800.0, 494700.0),
    ("h100 pcie", "NVIDIA H100 PCIe", 51_000.0, 756_000.0, 2_000.0, 378000.0),
    ("h100", "NVIDIA H100 SXM", 67_000.0, 989_000.0, 3_350.0, 494700.0),
    ("a100-sxm4-80gb", "NVIDIA A100 80GB", 19_500.0, 312_000.0, 2_039.0, 156000.0),
    ("a100", "NVIDIA A100 40GB", 19_500.0, 312_000.0, 1_555.0, 156000.0),
    ("v100", "NVIDIA V100", 15_700.0, 125_000.0, 900.0, 0.0),
    ("rtx 4090", "GeForce RTX 4090", 82_600.0, 165_200.0, 1_008.0, 82600.0),
    ("rtx 4080", "GeForce RTX 4080", 48_700.0, 97_500.0, 717.0, 48700.0),
    ("rtx 4070", "GeForce RTX 4070", 29_100.0, 58_300.0, 504.0, 29100.0),
    ("rtx 4060", "GeForce RTX 4060", 15_100.0, 30_200.0, 272.0, 15100.0),
    ("rtx 3090", "GeForce RTX 3090", 35_600.0, 71_000.0, 936.0, 35600.0),
    ("rtx 3080", "GeForce RTX 3080", 29_800.0, 59_500.0, 760.0, 29800.0),
    ("rtx 3070", "GeForce RTX 3070", 20_300.0, 40_600.0, 448.0, 20300.0),
    ("rtx 3060", "GeForce RTX 3060", 12_700.0, 25_400.0, 360.0, 12700.0),
    ("rtx 2080 ti", "GeForce RTX 2080 Ti", 13_400.0, 53_800.0, 616.0, 0.0),
    ("rtx 2080", "GeForce RTX 2080", 10_100.0, 40_300.0, 448.0, 0.0),
    ("rtx 2070", "GeForce RTX 2070", 7_500.0, 29_900.0, 448.0, 0.0),
    ("rtx 2060", "GeForce RTX 2060", 6_500.0, 26_000.0, 336.0, 0.0),
    ("apple m4 max", "Apple M4 Max", 18_400.0, 18_400.0, 546.0, 0.0),
    ("apple m4 pro", "Apple M4 Pro", 9_200.0, 9_200.0, 273.0, 0.0),
    ("apple m4", "Apple M4", 4_300.0, 4_300.0, 120.0, 0.0),
    ("apple m3 max", "Apple M3 Max", 16_400.0, 16_400.0, 400.0, 0.0),
    ("apple m3 pro", "Apple M3 Pro", 7_400.0, 7_400.0, 150.0, 0.0),
    ("apple m3", "Apple M3", 4_100.0, 4_100.0, 100.0, 0.0),
    ("apple m2 max", "Apple M2 Max", 13_600.0, 13_600.0, 400.0, 0.0),
    ("apple m2 pro", "Apple M2 Pro", 6_800.0, 6_800.0, 200.0, 0.0),
    ("apple m2", "Apple M2", 3_600.0, 3_600.0, 100.0, 0.0),
    ("apple m1 max", "Apple M1 Max", 10_400.0, 10_400.0, 400.0, 0.0),
    ("apple m1 pro", "Apple M1 Pro", 5_200.0, 5_200.0, 200.0, 0.0),
    ("apple m1", "Apple M1", 2_600.0, 2_600.0, 68.0, 0.0),
    ("arc(tm) a770", "Intel Arc A770", 19_700.0, 39_300.0, 560.0, 0.0),
    ("iris(r) xe", "Intel Iris Xe (96 EU)", 2_200.0, 4_400.0, 68.0, 0.0),
    ("uhd graphics 620", "Intel UHD Graphics 620", 400.0, 800.0, 34.0, 0.0),
    ("radeon 780m", "AMD Radeon 780M", 4_100.0, 8_200.0, 120.0, 0.0),
    ("radeon 680m", "AMD Radeon 680M", 3_400.0, 6_800.0, 102.0, 0.0),
    ("rx 7900 xtx", "AMD Radeon RX 7900 XTX", 61_400.0, 122_800.0, 960.0, 0.0),
    ("rx 6600", "AMD Radeon RX 6600", 8_900.0, 17_900.0, 224.0, 0.0),
];

/// The table's entry for an adapter or GPU name ("NVIDIA H200", "NVIDIA GeForce RTX 3060 Laptop
/// GPU", "Apple M2 Pro"), or for a name given on the command line ("v100", "rtx 3060").
pub fn lookup(name: &str) -> Option<Peaks> {
    let lower = name.to_lowercase();
    // a short name on the command line ("m2 pro", "4090") matches the table's key too
    KNOWN.iter().find(|(key, ..)| lower.contains(key) || (lower.len() >= 3 && key.ends_with(&lower))).map(|&(_, n, f32g, f16g, gbs, tf32)| Peaks {
        name: n.to_string(),
        fp32_gflops: f32g,
        tf32_gflops: if tf32 > 0.0 { tf32 } else { f32g },
        fp16_gflops: f16g,
        gbs,
        source: "table".into(),
    })
}

/// The table's device names, for an error message and `--help`.
pub fn known_names() -> Vec<&'static str> {
    KNOWN.iter().map(|k| k.1).collect()
}

/// `--peak-gflops`/`--peak-gbs` over the table's (or a measurement's) figures; without a base,
/// both must be given.
pub fn with_overrides(base: Option<Peaks>, gflops: Option<f64>, gbs: Option<f64>) -> Result<Peaks> {
    for (flag, v) in [("--peak-gflops", gflops), ("--peak-gbs", gbs)] {
        if let Some(v) = v {
            if !(v.is_finite() && v > 0.0) {
                return Err(Error::flag(flag, format!("{v} is not a positive number")));
            }
        }
    }
    match (base, gflops, gbs) {
        (Some(mut p), g, b) => {
            if g.is_some() || b.is_some() {
                p.source = format!("{} with --peak-gflops/--peak-gbs", p.source);
            }
            if let Some(g) = g {
                p.fp32_gflops = g;
                p.tf32_gflops = p.tf32_gflops.max(g);
                p.fp16_gflops = p.fp16_gflops.max(g);
            }
            if let Some(b) = b {
                p.gbs = b;
            }
            Ok(p)
        }
        (None, Some(g), Some(b)) => Ok(Peaks { name: "given".into(), fp32_gflops: g, tf32_gflops: g, fp16_gflops: g, gbs: b, source: "--peak-gflops/--peak-gbs".into() }),
        (None, ..) => Err(Error::flag(
            "--peak-gflops",
            "this device is not in the table of known GPUs: give both --peak-gflops and --peak-gbs (its fp32 GFLOP/s and memory GB/s)",
        )),
    }
}

/// The least milliseconds `flops` and `bytes` can take at `gflops` and `gbs`.
pub fn bound_ms(flops: f64, bytes: f64, gflops: f64, gbs: f64) -> f64 {
    (flops / (gflops * 1e9)).max(bytes / (gbs * 1e9)) * 1e3
}

/// The least milliseconds of a launch of `kernel` costing `c` on `peaks`: matmuls at the TF32
/// peak when `tf32` (cuBLAS with `--tf32`), everything else at the fp32 vector peak.
pub fn launch_bound_ms(kernel: &crate::graph::Kernel, c: crate::graph::cost::Cost, peaks: &Peaks, tf32: bool) -> f64 {
    let matmul = matches!(kernel, crate::graph::Kernel::MatmulForward { .. } | crate::graph::Kernel::MatmulBackward { .. });
    let gflops = if tf32 && matmul { peaks.tf32_gflops } else { peaks.fp32_gflops };
    bound_ms(c.flops, c.bytes, gflops, peaks.gbs)
}

/// Whether the bound of (flops, bytes) is compute (true) or memory.
pub fn compute_bound(flops: f64, bytes: f64, gflops: f64, gbs: f64) -> bool {
    flops / (gflops * 1e9) >= bytes / (gbs * 1e9)
}

/// This machine's CPU, measured: the cpu backend's own matmul at a GPT-2 shape (what its
/// kernels can reach, not the silicon's theoretical peak) and an in-place scale of 256 MiB on as
/// many threads (bandwidth). About a second.
pub fn measure_cpu(threads: Option<usize>) -> Result<Peaks> {
    use crate::graph::{BufferTable, DType, Kernel, Launch, Role};
    let mut be = crate::backend::create(crate::backend::BackendKind::Cpu, None, threads, Default::default())?;
    let (n, c, oc) = (256, 768, 768);
    let mut t = BufferTable::default();
    let out = t.add("out", n * oc, DType::F32, Role::Activation);
    let inp = t.add("inp", n * c, DType::F32, Role::Activation);
    let w = t.add("w", oc * c, DType::F32, Role::Activation);
    be.alloc(&t)?;
    be.upload_f32(inp, &vec![0.5; n * c])?;
    be.upload_f32(w, &vec![0.25; oc * c])?;
    let mm = [Launch {
        label: "peak matmul".into(),
        kernel: Kernel::MatmulForward { out: t.view(out), inp: t.view(inp), weight: t.view(w), bias: None, n, c, oc },
    }];
    let p = be.prepare(&mm)?;
    be.run_prepared(p)?;
    let mut best = f64::MAX;
    for _ in 0..5 {
        let t0 = std::time::Instant::now();
        be.run_prepared(p)?;
        best = best.min(t0.elapsed().as_secs_f64());
    }
    let gflops = 2.0 * (n * c * oc) as f64 / best / 1e9;
    // bandwidth: scale a 256 MiB array in place (each element read and written once, as the
    // kernels' read-modify-write counts it, with no write-allocate traffic), split over the
    // backend's threads, the pages touched first; best of 3
    let workers = threads.unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get())).max(1);
    let len = 64 << 20;
    let mut data = vec![1.0f32; len];
    let part = len.div_ceil(workers);
    let mut best = f64::MAX;
    for _ in 0..3 {
        let t0 = std::time::Instant::now();
        std::thread::scope(|s| {
            for d in data.chunks_mut(part) {
                s.spawn(move || d.iter_mut().for_each(|x| *x *= 1.000_001));
            }
        });
        std::hint::black_box(&mut data);
        best = best.min(t0.elapsed().as_secs_f64());
    }
    let gbs = (2 * len * 4) as f64 / best / 1e9;
    Ok(Peaks { name: be.name(), fp32_gflops: gflops, tf32_gflops: gflops, fp16_gflops: gflops, gbs, source: "measured".into() })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn adapter_names_match_the_table() {
        assert_eq!(lookup("NVIDIA H200").unwrap().gbs, 4_800.0);
        assert_eq!(lookup("NVIDIA H100 PCIe").unwrap().name, "NVIDIA H100 PCIe");
        assert_eq!(lookup("NVIDIA H100 80GB HBM3").unwrap().name, "NVIDIA H100 SXM");
        assert_eq!(lookup("Tesla V100-SXM2-32GB").unwrap().name, "NVIDIA V100");
        assert_eq!(lookup("NVIDIA A100-SXM4-80GB").unwrap().gbs, 2_039.0);
        assert_eq!(lookup("NVIDIA GeForce RTX 2080 Ti").unwrap().name, "GeForce RTX 2080 Ti");
        assert_eq!(lookup("NVIDIA GeForce RTX 3060 Laptop GPU").unwrap().name, "GeForce RTX 3060");
        assert_eq!(lookup("Apple M2 Pro").unwrap().name, "Apple M2 Pro");
        assert_eq!(lookup("Apple M2").unwrap().name, "Apple M2");
        assert_eq!(lookup("v100").unwrap().name, "NVIDIA V100");
        assert!(lookup("llvmpipe (LLVM 15.0.6, 256 bits)").is_none());
    }

    #[test]
    fn bound_is_the_slower_of_compute_and_memory() {
        // 1 GFLOP at 1000 GFLOP/s = 1 ms; 2 GB at 1000 GB/s = 2 ms
        assert_eq!(bound_ms(1e9, 2e9, 1000.0, 1000.0), 2.0);
        assert!(!compute_bound(1e9, 2e9, 1000.0, 1000.0));
        assert!(compute_bound(4e9, 2e9, 1000.0, 1000.0));
    }

    #[test]
    fn overrides_and_unknown_devices() {
        let p = with_overrides(lookup("v100"), Some(14_000.0), None).unwrap();
        assert_eq!((p.fp32_gflops, p.gbs), (14_000.0, 900.0));
        assert!(with_overrides(None, Some(1.0), None).unwrap_err().to_string().contains("--peak-gbs"));
        assert!(with_overrides(None, Some(-1.0), Some(1.0)).is_err());
        assert_eq!(with_overrides(None, Some(10.0), Some(20.0)).unwrap().gbs, 20.0);
    }
}
