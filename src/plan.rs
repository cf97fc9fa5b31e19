//! `wgpt plan`: what a training step needs before anything runs. The device memory of its
//! buffers by role (the buffer table every backend allocates, byte for byte), and with
//! `--roofline DEVICE`, the least time the step can take on that device: each launch's FLOPs and
//! bytes (`graph::cost`) against the device's peaks (`roofline`), summed.

use crate::error::{Error, Result};
use crate::graph::{build_train_step, build_train_step_sharded, Graph, Phase, Role, TrainOptions};
use crate::roofline::{self, Peaks};

#[derive(Clone, Debug, clap::Args)]
pub struct PlanArgs {
    /// model: dN (llm.c's GPT-2 sizes: d12 = 124M, d24, d36, d48), dN:cC, or a checkpoint
    #[arg(long, default_value = "d12")]
    pub model: String,
    /// sequences per micro-step (per rank with --world)
    #[arg(long, default_value_t = 4)]
    pub batch: usize,
    #[arg(long, default_value_t = 1024)]
    pub seq_len: usize,
    /// 1 = ZeRO-1 over --world ranks: the optimiser state of one rank's share
    #[arg(long, default_value_t = 0, value_name = "0|1")]
    pub zero: u8,
    /// ranks, for --zero 1
    #[arg(long, default_value_t = 1)]
    pub world: usize,
    /// device memory to fit, e.g. 2GiB, 4GB, 1536MiB: the plan says whether it fits
    #[arg(long, value_name = "SIZE")]
    pub memory: Option<String>,
    /// the least step time on DEVICE (a name from the table: h200, a100, v100, "rtx 3060",
    /// "apple m2"...; see --help), or with --peak-gflops and --peak-gbs any device
    #[arg(long, value_name = "DEVICE")]
    pub roofline: Option<String>,
    /// fp32 GFLOP/s for --roofline (over the table's)
    #[arg(long, value_name = "GFLOPS")]
    pub peak_gflops: Option<f64>,
    /// memory GB/s for --roofline (over the table's)
    #[arg(long, value_name = "GBS")]
    pub peak_gbs: Option<f64>,
    /// --roofline: matmuls at the device's TF32 tensor-core peak (`train --tf32` on CUDA sm_80+,
    /// and llm.c's default there)
    #[arg(long)]
    pub tf32: bool,
    #[command(flatten)]
    pub modes: StepModes,
    /// print one JSON object as the last line of stdout
    #[arg(long)]
    pub json: bool,
}

/// How a training step stores and keeps its buffers: the flags `train`, `bench` and `plan` share.
#[derive(Clone, Debug, clap::Args)]
pub struct StepModes {
    /// recompute activations in backward instead of keeping them per layer (llm.c's -r):
    /// 1 = the GELU outputs, 2 (the flag alone) = GELU and layernorm outputs; same results, less
    /// memory, a little more compute
    #[arg(long, value_name = "0|1|2", default_value_t = 0, num_args = 0..=1, default_missing_value = "2", value_parser = clap::value_parser!(u8).range(0..=2))]
    pub recompute: u8,
    /// keep AdamW's m and v (and fp32 master weights) in host memory and run AdamW on host
    /// threads: the device holds parameters, gradients and activations only
    #[arg(long)]
    pub offload_optimizer: bool,
    /// storage of parameters, gradients and activations: fp32, or mixed precision fp16 (with
    /// dynamic loss scaling in `train`) or bf16, with f32 master weights, AdamW state and arithmetic
    #[arg(long, default_value = "fp32", value_parser = crate::graph::parse_precision, value_name = "fp32|fp16|bf16")]
    pub precision: crate::graph::DType,
}

impl StepModes {
    /// A training step of micro-batch `b`, sequence `t` in these modes, with the CUDA trainer's
    /// optimiser settings (weight decay 0.1 on the 2-D weights, clip 1.0; `train` sets its own).
    pub fn train_options(&self, b: usize, t: usize) -> TrainOptions {
        TrainOptions {
            b,
            t,
            weight_decay: 0.1,
            decay_all: false,
            grad_clip: 1.0,
            recompute: self.recompute,
            offload_optimizer: self.offload_optimizer,
            precision: self.precision,
            ..Default::default()
        }
    }
}

/// Bytes by role, as `--json` names them.
#[derive(Clone, Debug, Default, serde::Serialize)]
pub struct ByRole {
    pub params: u64,
    /// fp32 master weights (only with a low-precision parameter copy; 0 in fp32)
    pub master: u64,
    pub grads: u64,
    /// AdamW's m and v
    pub optimizer: u64,
    /// activations saved for backward, their gradients, the batch and the per-position losses
    pub activations: u64,
    /// the classifier's logits chunk
    pub logits: u64,
    /// device scalars and reduction scratch
    pub scratch: u64,
}

#[derive(Clone, Debug, serde::Serialize)]
pub struct RooflinePlan {
    pub peaks: Peaks,
    /// matmuls bounded by the TF32 peak
    pub tf32: bool,
    pub flops: f64,
    pub bytes: f64,
    pub bound_ms: f64,
    /// the most tokens per second the bound allows
    pub tokens_per_s: f64,
    /// per kernel family: (family, bound ms)
    pub families: Vec<(String, f64)>,
}

#[derive(Clone, Debug, serde::Serialize)]
pub struct Plan {
    pub model: String,
    /// the step's precision (f32, f16, bf16)
    pub precision: String,
    pub batch: usize,
    pub seq_len: usize,
    pub params: usize,
    pub total_bytes: u64,
    pub by_role: ByRole,
    /// host memory the step needs beyond the process's own (`--offload-optimizer`: the fp32 master
    /// weights, m and v)
    pub host_bytes: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub memory_bytes: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub fits: Option<bool>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub roofline: Option<RooflinePlan>,
}

/// The bytes of `graph`'s buffers by role.
pub fn by_role(graph: &Graph) -> ByRole {
    let mut r = ByRole::default();
    for (id, d) in graph.buffers.iter() {
        let b = d.bytes() as u64;
        let slot = match d.role {
            _ if id == graph.io.logits => &mut r.logits,
            Role::Param(_) => &mut r.params,
            Role::Grad(_) => &mut r.grads,
            Role::Master(_) => &mut r.master,
            Role::OptM(_) | Role::OptV(_) | Role::OptShard => &mut r.optimizer,
            Role::Activation | Role::ActGrad | Role::Tokens | Role::Targets | Role::Losses | Role::KvCache => &mut r.activations,
            Role::Scalars | Role::Scratch => &mut r.scratch,
        };
        *slot += b;
    }
    r
}

/// The training step's graph for these flags.
pub fn step_graph(a: &PlanArgs) -> Result<(Graph, usize)> {
    let cfg = crate::train::model_config(&a.model).map_err(|e| match e {
        Error::Flag { msg, .. } => Error::flag("--model", msg),
        e => e,
    })?;
    let n = crate::model::ParamLayout::new(&cfg).total;
    if a.batch == 0 {
        return Err(Error::flag("--batch", "must be at least 1"));
    }
    if a.seq_len == 0 || a.seq_len > cfg.max_t {
        return Err(Error::flag("--seq-len", format!("must be in 1..={}", cfg.max_t)));
    }
    if a.zero > 1 || (a.zero == 1 && a.world < 2) || a.world == 0 {
        return Err(Error::flag("--zero", "1 needs --world of at least 2 (and --zero is 0 or 1)"));
    }
    if a.modes.offload_optimizer && a.zero == 1 {
        return Err(Error::flag("--offload-optimizer", "cannot be combined with --zero 1"));
    }
    let opts = a.modes.train_options(a.batch, a.seq_len);
    let g = if a.zero == 1 {
        // rank 0's share: ranks differ by at most one element
        build_train_step_sharded(&cfg, &opts, 0..n.div_ceil(a.world))
    } else {
        build_train_step(&cfg, &opts)
    };
    Ok((g, n))
}

pub fn plan(a: &PlanArgs) -> Result<Plan> {
    let (graph, params) = step_graph(a)?;
    let by = by_role(&graph);
    let total = graph.total_bytes() as u64;
    let memory = a.memory.as_deref().map(|m| parse_size(m).map_err(|e| Error::flag("--memory", e))).transpose()?;
    let roofline = match &a.roofline {
        None if a.peak_gflops.is_some() || a.peak_gbs.is_some() => return Err(Error::flag("--peak-gflops", "goes with --roofline DEVICE")),
        None => None,
        Some(dev) => {
            let base = roofline::lookup(dev);
            if base.is_none() && (a.peak_gflops.is_none() || a.peak_gbs.is_none()) {
                return Err(Error::flag(
                    "--roofline",
                    format!("'{dev}' is not in the table ({}); give --peak-gflops and --peak-gbs for another device", roofline::known_names().join(", ")),
                ));
            }
            let peaks = roofline::with_overrides(base, a.peak_gflops, a.peak_gbs)?;
            Some(bound(&graph, peaks, a.batch * a.seq_len, a.tf32))
        }
    };
    Ok(Plan {
        model: a.model.clone(),
        precision: a.modes.precision.name().to_string(),
        batch: a.batch,
        seq_len: a.seq_len,
        params,
        total_bytes: total,
        host_bytes: if graph.io.host_update.is_some() { 3 * 4 * params as u64 } else { 0 },
        by_role: by,
        memory_bytes: memory,
        fits: memory.map(|m| total <= m),
        roofline,
    })
}

/// The roofline bound of one optimiser step (every launch of ZeroGrad, Train, GradNorm, Update).
pub fn bound(graph: &Graph, peaks: Peaks, tokens: usize, tf32: bool) -> RooflinePlan {
    let (mut flops, mut bytes, mut ms) = (0.0, 0.0, 0.0);
    let mut fam: std::collections::BTreeMap<&'static str, f64> = Default::default();
    for phase in [Phase::ZeroGrad, Phase::Train, Phase::GradNorm, Phase::Update] {
        for l in graph.phase(phase) {
            let c = l.kernel.cost(&graph.buffers);
            let b = roofline::launch_bound_ms(&l.kernel, c, &peaks, tf32);
            flops += c.flops;
            bytes += c.bytes;
            ms += b;
            *fam.entry(l.kernel.family()).or_default() += b;
        }
    }
    let mut families: Vec<(String, f64)> = fam.into_iter().map(|(k, v)| (k.to_string(), v)).collect();
    families.sort_by(|p, q| q.1.total_cmp(&p.1));
    RooflinePlan { peaks, tf32, flops, bytes, bound_ms: ms, tokens_per_s: tokens as f64 / (ms / 1e3), families }
}

/// "2GiB", "4GB", "1536MiB", "512M", or bytes.
pub fn parse_size(s: &str) -> std::result::Result<u64, String> {
    let t = s.trim();
    let split = t.find(|c: char| !(c.is_ascii_digit() || c == '.')).unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let x: f64 = num.parse().map_err(|_| format!("'{s}': give a size such as 2GiB, 4GB or 1536MiB"))?;
    let mult = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1.0,
        "k" | "kib" => 1024.0,
        "kb" => 1e3,
        "m" | "mib" => (1u64 << 20) as f64,
        "mb" => 1e6,
        "g" | "gib" => (1u64 << 30) as f64,
        "gb" => 1e9,
        "t" | "tib" => (1u64 << 40) as f64,
        "tb" => 1e12,
        u => return Err(format!("'{s}': unknown unit '{u}' (B, KiB, MiB, GiB, TiB, KB, MB, GB, TB)")),
    };
    Ok((x * mult) as u64)
}

fn gib(b: u64) -> String {
    format!("{:.3} GiB", b as f64 / (1u64 << 30) as f64)
}

pub fn print(p: &Plan) {
    println!("{} ({} parameters), B={} T={}: {} of device buffers for a training step ({})", p.model, p.params, p.batch, p.seq_len, gib(p.total_bytes), p.precision);
    let r = &p.by_role;
    for (name, b) in [
        ("params", r.params),
        ("master", r.master),
        ("grads", r.grads),
        ("optimizer", r.optimizer),
        ("activations", r.activations),
        ("logits", r.logits),
        ("scratch", r.scratch),
    ] {
        println!("  {name:<12} {:>12}  {:5.1}%", gib(b), 100.0 * b as f64 / p.total_bytes.max(1) as f64);
    }
    if p.host_bytes > 0 {
        println!("  host         {:>12}  (AdamW's m and v and the fp32 master weights, --offload-optimizer)", gib(p.host_bytes));
    }
    if let (Some(m), Some(fits)) = (p.memory_bytes, p.fits) {
        println!("--memory {}: {}", gib(m), if fits { "fits" } else { "does not fit" });
    }
    if let Some(rf) = &p.roofline {
        println!(
            "roofline on {} ({:.0} GFLOP/s fp32{}, {:.0} GB/s; {}): {:.1} GFLOP and {:.2} GB per step, at least {:.2} ms = at most {:.0} tokens/s",
            rf.peaks.name,
            rf.peaks.fp32_gflops,
            if rf.tf32 { format!(", matmuls {:.0} TF32", rf.peaks.tf32_gflops) } else { String::new() },
            rf.peaks.gbs,
            rf.peaks.source,
            rf.flops / 1e9,
            rf.bytes / 1e9,
            rf.bound_ms,
            rf.tokens_per_s
        );
        for (f, ms) in &rf.families {
            println!("  {f:<12} {ms:>9.3} ms");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes() {
        assert_eq!(parse_size("2GiB"), Ok(2 << 30));
        assert_eq!(parse_size("4GB"), Ok(4_000_000_000));
        assert_eq!(parse_size("1536MiB"), Ok(1536 << 20));
        assert_eq!(parse_size("1.5G"), Ok(3 << 29));
        assert_eq!(parse_size("100"), Ok(100));
        assert!(parse_size("2 parsecs").is_err() && parse_size("GiB").is_err());
    }
}
