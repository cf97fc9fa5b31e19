//! `wgpt bench --profile`: one training step with every launch timed on its own
//! (`Backend::profile`), each beside its FLOPs and bytes (`graph::cost`) and the device's
//! roofline bound (`roofline`): where the step's time goes, and how far each kernel is from the
//! hardware's limit.

use crate::backend::Backend;
use crate::bench::BenchArgs;
use crate::error::{Error, Result};
use crate::graph::Phase;
use crate::roofline::{self, Peaks};

/// One launch of the step.
#[derive(Clone, Debug, serde::Serialize)]
pub struct LaunchTime {
    pub label: String,
    /// the kernel family (the file under shaders/ and cuda/)
    pub family: &'static str,
    pub phase: String,
    pub ms: f64,
    pub flops: f64,
    pub bytes: f64,
    /// the roofline's least time for its FLOPs and bytes on this device
    pub bound_ms: f64,
}

/// A kernel family's launches together.
#[derive(Clone, Debug, serde::Serialize)]
pub struct FamilyTotal {
    pub family: &'static str,
    pub launches: usize,
    pub ms: f64,
    /// of the profiled step
    pub share: f64,
    pub gflops: f64,
    pub gbs: f64,
    /// bound_ms / ms: 1 is the hardware's limit
    pub roofline_fraction: f64,
    /// whether the family's bound is compute (else memory bandwidth)
    pub compute_bound: bool,
}

#[derive(Clone, Debug, serde::Serialize)]
pub struct ProfileReport {
    pub backend: String,
    pub model: String,
    pub batch: usize,
    pub seq_len: usize,
    /// how launches were timed: "timestamp queries", "CUDA events", "wall clock"
    pub clock: String,
    pub peaks: Peaks,
    /// a step run normally (median of --steps), for comparison with the profiled sum
    pub step_ms: f64,
    /// the sum of the launches' times
    pub profiled_ms: f64,
    /// the roofline's least time for the whole step
    pub bound_ms: f64,
    pub tokens_per_s: f64,
    pub families: Vec<FamilyTotal>,
    pub launches: Vec<LaunchTime>,
}

/// The peaks to judge `backend` by: measured for kernels on this machine's cores (cpu, a software
/// adapter), else the table's entry for its name; `--peak-gflops`/`--peak-gbs` override either.
pub fn peaks_for(backend: &dyn Backend, threads: Option<usize>, gflops: Option<f64>, gbs: Option<f64>) -> Result<Peaks> {
    let base = if backend.runs_on_host_cores() || backend.kind() == crate::backend::BackendKind::Cpu {
        if gflops.is_some() && gbs.is_some() {
            None
        } else {
            let threads = if backend.kind() == crate::backend::BackendKind::Cpu { threads } else { None };
            Some(roofline::measure_cpu(threads)?)
        }
    } else {
        roofline::lookup(&backend.name())
    };
    roofline::with_overrides(base, gflops, gbs).map_err(|e| match e {
        Error::Flag { flag, msg } => Error::Flag { flag, msg: format!("{msg} ({} is not one of: {})", backend.name(), roofline::known_names().join(", ")) },
        e => e,
    })
}

/// Profile one training step of `a.model` at (`a.batch`, `a.seq_len`).
pub fn run(a: &BenchArgs) -> Result<ProfileReport> {
    // untimed warm-up (shaders, kernels, first allocations), then steps as `wgpt bench` runs them
    let (mut sess, _, _, mut times) = crate::bench::time_train_steps(a, a.warmup.max(1))?;
    let peaks = peaks_for(sess.backend.as_ref(), a.backend.threads, a.peak_gflops, a.peak_gbs)?;
    times.sort_by(|p, q| p.total_cmp(q));
    let step_ms = times[times.len() / 2];
    let n = a.batch * a.seq_len;
    // the same step, launch by launch (the scalars and the batch are those of the last step)
    let mut launches = Vec::new();
    let mut clock = "";
    for phase in [Phase::ZeroGrad, Phase::Train, Phase::GradNorm, Phase::Update] {
        let list = sess.graph.phase(phase).to_vec();
        if list.is_empty() {
            continue;
        }
        let p = sess.backend.profile(&list)?;
        clock = p.clock;
        for (l, ms) in list.iter().zip(p.ms) {
            let c = l.kernel.cost(&sess.graph.buffers);
            launches.push(LaunchTime {
                label: l.label.clone(),
                family: l.kernel.family(),
                phase: format!("{phase:?}"),
                ms,
                flops: c.flops,
                bytes: c.bytes,
                bound_ms: roofline::launch_bound_ms(&l.kernel, c, &peaks, a.backend.tf32),
            });
        }
    }
    let profiled_ms: f64 = launches.iter().map(|l| l.ms).sum();
    let bound_ms: f64 = launches.iter().map(|l| l.bound_ms).sum();
    let families = family_totals(&launches, profiled_ms, &peaks);
    Ok(ProfileReport {
        backend: sess.backend.name(),
        model: a.model.clone(),
        batch: a.batch,
        seq_len: a.seq_len,
        clock: clock.to_string(),
        peaks,
        step_ms,
        profiled_ms,
        bound_ms,
        tokens_per_s: n as f64 / (step_ms / 1e3),
        families,
        launches,
    })
}

/// Per family, slowest first.
fn family_totals(launches: &[LaunchTime], total_ms: f64, peaks: &Peaks) -> Vec<FamilyTotal> {
    let mut by: std::collections::BTreeMap<&'static str, (usize, f64, f64, f64, f64)> = Default::default();
    for l in launches {
        let e = by.entry(l.family).or_default();
        *e = (e.0 + 1, e.1 + l.ms, e.2 + l.flops, e.3 + l.bytes, e.4 + l.bound_ms);
    }
    let mut out: Vec<FamilyTotal> = by
        .into_iter()
        .map(|(family, (k, ms, flops, bytes, bound))| {
            let secs = (ms / 1e3).max(1e-12);
            FamilyTotal {
                family,
                launches: k,
                ms,
                share: ms / total_ms.max(1e-12),
                gflops: flops / secs / 1e9,
                gbs: bytes / secs / 1e9,
                roofline_fraction: bound / ms.max(1e-12),
                compute_bound: roofline::compute_bound(flops, bytes, peaks.fp32_gflops, peaks.gbs),
            }
        })
        .collect();
    out.sort_by(|p, q| q.ms.total_cmp(&p.ms));
    out
}

/// The report as the terminal shows it.
pub fn print(r: &ProfileReport) {
    let p = &r.peaks;
    println!(
        "{} | {} B={} T={} | step {:.1} ms ({:.0} tokens/s), launches timed alone ({}) {:.1} ms in {} launches",
        r.backend,
        r.model,
        r.batch,
        r.seq_len,
        r.step_ms,
        r.tokens_per_s,
        r.clock,
        r.profiled_ms,
        r.launches.len()
    );
    println!(
        "roofline: {} ({}): {:.0} GFLOP/s fp32, {:.0} GB/s | the step's bound {:.2} ms = {:.1}% of the profiled time",
        p.name,
        p.source,
        p.fp32_gflops,
        p.gbs,
        r.bound_ms,
        100.0 * r.bound_ms / r.profiled_ms.max(1e-12)
    );
    println!("{:<12} {:>8} {:>10} {:>7} {:>10} {:>9} {:>10}  bound", "family", "launches", "ms", "share", "GFLOP/s", "GB/s", "roofline");
    for f in &r.families {
        println!(
            "{:<12} {:>8} {:>10.2} {:>6.1}% {:>10.1} {:>9.1} {:>9.1}%  {}",
            f.family,
            f.launches,
            f.ms,
            100.0 * f.share,
            f.gflops,
            f.gbs,
            100.0 * f.roofline_fraction,
            if f.compute_bound { "compute" } else { "memory" }
        );
    }
    let mut slow: Vec<&LaunchTime> = r.launches.iter().collect();
    slow.sort_by(|p, q| q.ms.total_cmp(&p.ms));
    println!("slowest launches:");
    for l in slow.iter().take(10) {
        let secs = (l.ms / 1e3).max(1e-12);
        println!(
            "  {:<28} {:>9.3} ms {:>9.1} GFLOP/s {:>8.1} GB/s {:>6.1}% of roofline",
            l.label,
            l.ms,
            l.flops / secs / 1e9,
            l.bytes / secs / 1e9,
            100.0 * l.bound_ms / l.ms.max(1e-12)
        );
    }
}
