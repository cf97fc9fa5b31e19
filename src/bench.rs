//! `wgpt bench`: times full training steps (forward, backward, update) after warm-up, or one kernel.

use crate::backend::BackendArgs;
use crate::error::{Error, Result};
use crate::graph::build_train_step;
use crate::train::session::{AdamConsts, Session};
use crate::train::load_or_init;
use std::time::Instant;

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum BenchKernel {
    /// a full training step (default)
    Step,
    /// one matmul forward x·Wᵀ of shape (m × k)·(n × k)ᵀ
    Matmul,
}

#[derive(Clone, Debug, clap::Args)]
pub struct BenchArgs {
    #[command(flatten)]
    pub backend: BackendArgs,
    /// model descriptor (d12 = GPT-2 124M) or an llm.c checkpoint
    #[arg(long, default_value = "d12")]
    pub model: String,
    #[arg(long, default_value_t = 4)]
    pub batch: usize,
    #[arg(long, default_value_t = 64)]
    pub seq_len: usize,
    /// timed steps (after --warmup untimed ones); the median is reported
    #[arg(long, default_value_t = 5)]
    pub steps: usize,
    #[arg(long, default_value_t = 1)]
    pub warmup: usize,
    /// what to time
    #[arg(long, value_enum, default_value_t = BenchKernel::Step)]
    pub kernel: BenchKernel,
    /// matmul rows (B·T)
    #[arg(long, default_value_t = 4096)]
    pub m: usize,
    /// matmul inner dimension (input channels)
    #[arg(long, default_value_t = 768)]
    pub k: usize,
    /// matmul output channels
    #[arg(long, default_value_t = 2304)]
    pub n: usize,
    /// print one JSON object as the last line of stdout
    #[arg(long)]
    pub json: bool,
    /// time generation instead of training: prefill and decode through the KV cache, --batch
    /// sequences at once (tokens/s, ms per token at positions 16 and 1000, and the full-forward
    /// recompute that generation without a cache would cost per token at T=256)
    #[arg(long)]
    pub decode: bool,
    /// --decode: prompt tokens per sequence (the prefill that is timed)
    #[arg(long, default_value_t = 128)]
    pub prompt_len: usize,
    /// time data-parallel steps over several devices in this process (see `wgpt train --devices`);
    /// under a launcher (mpirun, srun...) the ranks are processes and this is not needed
    #[arg(long, value_name = "LIST")]
    pub devices: Option<String>,
    /// with several ranks: how --batch is divided (see `wgpt train --batch-split`)
    #[arg(long, value_name = "even|auto|LIST", default_value_t = crate::dist::split::BatchSplit::Even, value_parser = crate::dist::split::BatchSplit::parse)]
    pub batch_split: crate::dist::split::BatchSplit,
    /// with several ranks: ZeRO-1 (see `wgpt train --zero`)
    #[arg(long, default_value_t = 0, value_name = "0|1")]
    pub zero: u8,
    /// with several ranks: where gradients are summed (see `wgpt train --reduce`)
    #[arg(long, value_enum, default_value_t = crate::train::ReduceMode::Auto)]
    pub reduce: crate::train::ReduceMode,
    /// with several GPU ranks: sum gradient buckets while backward runs (see `wgpt train --overlap`)
    #[arg(long, value_enum, default_value_t = crate::train::Overlap::Auto)]
    pub overlap: crate::train::Overlap,
    /// --decode: weight storage (f16 where the backend has it)
    #[arg(long, value_enum, default_value_t = crate::infer::WeightDtype::F32)]
    pub dtype: crate::infer::WeightDtype,
    /// time every launch of one training step on its own (wgpu timestamp queries, CUDA events,
    /// the wall clock on cpu): totals per kernel family, the slowest launches, achieved GFLOP/s
    /// and GB/s, and each as a fraction of the device's roofline bound
    #[arg(long)]
    pub profile: bool,
    /// --profile: the device's fp32 GFLOP/s peak (default: the table of known GPUs by adapter
    /// name; measured on cpu and software adapters)
    #[arg(long, value_name = "GFLOPS")]
    pub peak_gflops: Option<f64>,
    /// --profile: the device's memory bandwidth in GB/s (default: as --peak-gflops)
    #[arg(long, value_name = "GBS")]
    pub peak_gbs: Option<f64>,
    #[command(flatten)]
    pub modes: crate::plan::StepModes,
}

#[derive(Clone, Debug, serde::Serialize)]
pub struct BenchReport {
    pub backend: String,
    /// the step's precision (f32, f16, bf16)
    pub precision: String,
    pub model: String,
    pub batch: usize,
    pub seq_len: usize,
    pub params: usize,
    pub ms_per_step: f64,
    pub ms_all: Vec<f64>,
    pub tokens_per_s: f64,
    /// model FLOPs per second: (6·params + 6·L·C·T)·tokens / time, as llm.c counts them
    pub tflops: f64,
    /// the step's device buffers (what `wgpt plan` counts)
    pub device_bytes: u64,
}

fn median(xs: &mut [f64]) -> f64 {
    xs.sort_by(|a, b| a.total_cmp(b));
    xs[xs.len() / 2]
}

/// The benchmark's training step: a session of the model's training graph on the backend,
/// deterministic tokens, and the milliseconds of `steps` steps after `warmup` untimed ones.
/// Returns (session, configuration, parameter count, times).
pub(crate) fn time_train_steps(a: &BenchArgs, warmup: usize) -> Result<(Session, crate::model::Config, usize, Vec<f64>)> {
    if a.steps == 0 {
        return Err(Error::flag("--steps", "must be at least 1"));
    }
    if a.batch == 0 {
        return Err(Error::flag("--batch", "must be at least 1"));
    }
    // the same loader as `train --init`; here the flag is called --model
    let (cfg, params) = load_or_init(&a.model, 42).map_err(|e| match e {
        Error::Flag { msg, .. } => Error::flag("--model", msg),
        e => e,
    })?;
    if a.seq_len == 0 || a.seq_len > cfg.max_t {
        return Err(Error::flag("--seq-len", format!("must be in 1..={}", cfg.max_t)));
    }
    let backend = a.backend.create()?;
    let graph = build_train_step(&cfg, &a.modes.train_options(a.batch, a.seq_len));
    let mut sess = Session::new(backend, graph)?;
    sess.upload_params(&params)?;
    let n = a.batch * a.seq_len;
    // deterministic pseudo-random tokens
    let mut r = crate::rng::XorShift(12345);
    let x: Vec<i32> = (0..n).map(|_| (r.next_u32() % cfg.v as u32) as i32).collect();
    let y: Vec<i32> = (0..n).map(|_| (r.next_u32() % cfg.v as u32) as i32).collect();
    let mut times = Vec::new();
    for s in 0..(warmup + a.steps) {
        let t0 = Instant::now();
        sess.zero_grad()?;
        sess.train_micro_async(&x, &y)?;
        sess.update(1e-4, AdamConsts::default(), s + 1)?;
        sess.step_loss()?;
        sess.backend.sync()?;
        if s >= warmup {
            times.push(t0.elapsed().as_secs_f64() * 1e3);
        }
    }
    Ok((sess, cfg, params.len(), times))
}

pub fn run_step(a: &BenchArgs) -> Result<BenchReport> {
    let (sess, cfg, num_params, times) = time_train_steps(a, a.warmup)?;
    let n = a.batch * a.seq_len;
    let ms = median(&mut times.clone());
    let flops_per_token = 6.0 * num_params as f64 + 6.0 * (cfg.l * cfg.c * a.seq_len) as f64;
    Ok(BenchReport {
        backend: sess.backend.name(),
        model: a.model.clone(),
        batch: a.batch,
        seq_len: a.seq_len,
        params: num_params,
        ms_per_step: ms,
        ms_all: times,
        tokens_per_s: n as f64 / (ms / 1e3),
        tflops: flops_per_token * n as f64 / (ms / 1e3) / 1e12,
        device_bytes: sess.graph.total_bytes() as u64,
        precision: a.modes.precision.name().to_string(),
    })
}

#[derive(Clone, Debug, serde::Serialize)]
pub struct DecodeReport {
    pub backend: String,
    pub model: String,
    /// the weights' storage dtype
    pub dtype: String,
    pub batch: usize,
    pub prompt_len: usize,
    pub params: usize,
    /// prompt tokens per second (all sequences)
    pub prefill_tokens_per_s: f64,
    /// generated tokens per second (all sequences), decoding from position 16
    pub decode_tokens_per_s: f64,
    /// one decode step (every sequence one token) at position 16 and at `long_pos`
    pub ms_per_token_pos16: f64,
    pub ms_per_token_pos1000: f64,
    /// the position of the long-context figure (1000, or the model's maxT − 8 if shorter)
    pub long_pos: usize,
    /// without a cache, every new token is a forward pass over the whole window: this is one such
    /// pass at T = 256 (batch 1), what the sampler before the KV cache paid per token
    pub recompute_ms_per_token_t256: f64,
    /// weight bytes read per decode step / its time (batch 1 is bound by this)
    pub weight_gb_per_s: f64,
}

/// Median milliseconds of `steps` calls of `f` after `warmup` untimed ones.
fn time_ms(warmup: usize, steps: usize, mut f: impl FnMut(usize) -> Result<()>) -> Result<f64> {
    let mut times = Vec::new();
    for i in 0..warmup + steps {
        let t0 = Instant::now();
        f(i)?;
        if i >= warmup {
            times.push(t0.elapsed().as_secs_f64() * 1e3);
        }
    }
    Ok(median(&mut times))
}

/// `wgpt bench --decode`: prefill and decode speed through the KV cache.
pub fn run_decode(a: &BenchArgs) -> Result<DecodeReport> {
    use crate::graph::{build_decoder_with, build_forward, DecodeOptions};
    use crate::infer::{decode, prefill, Row};
    if a.batch == 0 || a.steps == 0 {
        return Err(Error::flag("--batch/--steps", "must be at least 1"));
    }
    let (cfg, params) = load_or_init(&a.model, 42).map_err(|e| match e {
        Error::Flag { msg, .. } => Error::flag("--model", msg),
        e => e,
    })?;
    let long_pos = 1000.min(cfg.max_t.saturating_sub(8));
    if a.prompt_len == 0 || a.prompt_len + 8 > cfg.max_t || long_pos <= 24 {
        return Err(Error::flag("--prompt-len", format!("must be in 1..={} (the model's context is {})", cfg.max_t.saturating_sub(8), cfg.max_t)));
    }
    let backend = a.backend.create()?;
    let opts = DecodeOptions { slots: a.batch, max_t: cfg.max_t, prefill_rows: 64.min(cfg.max_t) };
    let weights = crate::infer::weight_dtype(backend.as_ref(), a.dtype);
    let mut sess = Session::new(backend, build_decoder_with(&cfg, opts, weights))?;
    sess.upload_params(&params)?;
    let mut r = crate::rng::XorShift(12345);
    let mut tok = move || r.next_u32() % cfg.v as u32;
    let prompt: Vec<Row> = (0..a.batch).flat_map(|slot| (0..a.prompt_len).map(move |pos| (slot, pos))).map(|(slot, pos)| Row { slot, pos, token: tok() }).collect();
    let prefill_ms = time_ms(1, a.steps.min(3), |_| {
        prefill(&mut sess, &prompt)?;
        sess.backend.sync()
    })?;
    let step_at = |sess: &mut Session, pos: usize| -> Result<()> {
        let rows: Vec<Row> = (0..a.batch).map(|slot| Row { slot, pos, token: (pos * 7 + slot) as u32 % cfg.v as u32 }).collect();
        decode(sess, &rows).map(|_| ())
    };
    let steps = a.steps.max(5);
    let ms16 = time_ms(a.warmup.max(1), steps, |i| step_at(&mut sess, 16 + i))?;
    let ms_long = time_ms(a.warmup.max(1), steps, |i| step_at(&mut sess, long_pos - 2 * steps + i))?;
    let backend_name = sess.backend.name();
    let sess_weight_bytes: f64 = sess.graph.buffers.iter().filter(|(_, d)| matches!(d.role, crate::graph::Role::Param(_))).map(|(_, d)| d.bytes() as f64).sum();
    drop(sess);
    // the cacheless sampler's cost per token: one forward pass over a 256-token window
    let t = 256.min(cfg.max_t);
    let mut fwd = Session::new(a.backend.create()?, build_forward(&cfg, 1, t))?;
    fwd.upload_params(&params)?;
    let x: Vec<i32> = (0..t as i32).map(|i| i % cfg.v as i32).collect();
    let recompute = time_ms(1, 3.min(steps), |_| fwd.eval(&x, &x).map(|_| ()))?;
    // weights a decode step reads: every parameter once (the encoder reads a few rows of wte,
    // the classifier all of it)
    let weight_bytes = sess_weight_bytes;
    Ok(DecodeReport {
        backend: backend_name,
        model: a.model.clone(),
        dtype: weights.name().to_string(),
        batch: a.batch,
        prompt_len: a.prompt_len,
        params: params.len(),
        prefill_tokens_per_s: prompt.len() as f64 / (prefill_ms / 1e3),
        decode_tokens_per_s: a.batch as f64 / (ms16 / 1e3),
        ms_per_token_pos16: ms16,
        ms_per_token_pos1000: ms_long,
        long_pos,
        recompute_ms_per_token_t256: recompute,
        weight_gb_per_s: weight_bytes / (ms16 / 1e3) / 1e9,
    })
}

#[derive(Clone, Debug, serde::Serialize)]
pub struct MatmulReport {
    pub backend: String,
    pub m: usize,
    pub k: usize,
    pub n: usize,
    pub ms: f64,
    pub gflops: f64,
}

/// Time one matmul forward through the backend's kernel (a one-launch graph).
pub fn run_matmul(a: &BenchArgs) -> Result<MatmulReport> {
    use crate::graph::{BufferTable, DType, Kernel, Launch, Role};
    let (m, k, n) = (a.m, a.k, a.n);
    if m == 0 || k == 0 || n == 0 {
        return Err(Error::flag("--m/--k/--n", "matmul sizes must be at least 1"));
    }
    let mut t = BufferTable::default();
    let out = t.add("out", m * n, DType::F32, Role::Activation);
    let inp = t.add("inp", m * k, DType::F32, Role::Activation);
    let w = t.add("w", n * k, DType::F32, Role::Param(0));
    let launch = vec![Launch {
        label: "matmul".into(),
        kernel: Kernel::MatmulForward { out: t.view(out), inp: t.view(inp), weight: t.view(w), bias: None, n: m, c: k, oc: n },
    }];
    let mut be = a.backend.create()?;
    be.alloc(&t)?;
    let mut r = crate::rng::XorShift(7);
    let xs: Vec<f32> = (0..m * k).map(|_| r.next_f32() - 0.5).collect();
    let ws: Vec<f32> = (0..n * k).map(|_| r.next_f32() - 0.5).collect();
    be.upload_f32(inp, &xs)?;
    be.upload_f32(w, &ws)?;
    let mut times = Vec::new();
    for i in 0..(a.warmup + a.steps.max(1)) {
        let t0 = Instant::now();
        be.run(&launch)?;
        be.sync()?;
        if i >= a.warmup {
            times.push(t0.elapsed().as_secs_f64() * 1e3);
        }
    }
    let ms = median(&mut times);
    Ok(MatmulReport { backend: be.name(), m, k, n, ms, gflops: 2.0 * (m * k * n) as f64 / (ms / 1e3) / 1e9 })
}

/// What a data-parallel `wgpt bench` reports (rank 0; medians over the timed steps).
#[derive(Clone, Debug, serde::Serialize)]
pub struct DataParallelReport {
    pub backend: String,
    pub model: String,
    /// the global micro-batch and each rank's part of it
    pub batch: usize,
    pub split: Vec<usize>,
    pub seq_len: usize,
    pub ranks: usize,
    pub params: usize,
    pub ms_per_step: f64,
    pub tokens_per_s: f64,
    /// the part of the step spent summing gradients (download, collective, upload)
    pub reduce_ms: f64,
    /// the part of `reduce_ms` hidden behind backward (GPU ranks summing through host memory sum
    /// each bucket while backward runs; cpu ranks sum in place after it: 0)
    pub reduce_hidden_ms: f64,
    /// gradient bytes each rank contributes to the sum per step (fp32)
    pub reduce_bytes_per_rank: usize,
    /// bytes each rank copies between device and host per step for it (0 with NCCL, and on cpu,
    /// whose buffers are summed in place)
    pub host_copy_bytes_per_rank: usize,
    pub engine: String,
}

/// Whether `wgpt bench` should time data-parallel steps: `--devices`, or a launcher's world of
/// several ranks.
pub fn is_data_parallel(a: &BenchArgs) -> Result<bool> {
    Ok(a.devices.is_some() || crate::dist::World::from_env()?.size > 1)
}

/// Data-parallel training steps, timed by the training loop itself (on the bundled Shakespeare
/// tokens, no evaluation or sampling). Returns the report on rank 0, None on the others.
pub fn run_data_parallel(a: &BenchArgs) -> Result<Option<DataParallelReport>> {
    if a.steps == 0 {
        return Err(Error::flag("--steps", "must be at least 1"));
    }
    #[derive(clap::Parser)]
    struct Wrap {
        #[command(flatten)]
        t: crate::train::TrainArgs,
    }
    let steps = (a.warmup + a.steps).to_string();
    let (b, t) = (a.batch.to_string(), a.seq_len.to_string());
    let mut argv = vec!["wgpt", "--init", &a.model, "--batch", &b, "--seq-len", &t, "--steps", &steps, "--val-every", "0", "--gen-tokens", "0"];
    argv.extend(["--lr", "1e-4", "--warmup", "0"]);
    let mut ta = <Wrap as clap::Parser>::try_parse_from(argv).map_err(|e| Error::Internal(format!("bench's train flags: {e}")))?.t;
    ta.backend = a.backend.clone();
    ta.devices = a.devices.clone();
    ta.batch_split = a.batch_split.clone();
    ta.zero = a.zero;
    ta.reduce = a.reduce;
    ta.overlap = a.overlap;
    ta.modes = a.modes.clone();
    let world = crate::dist::World::from_env()?;
    let s = crate::train::run(&ta)?;
    if world.rank != 0 {
        return Ok(None);
    }
    let timed = |v: &[f64]| -> f64 {
        let mut t: Vec<f64> = v.iter().skip(a.warmup).copied().collect();
        if t.is_empty() {
            0.0
        } else {
            median(&mut t)
        }
    };
    let ms = timed(&s.step_ms);
    let (cfg, _) = load_or_init(&a.model, 42)?;
    let params = crate::model::ParamLayout::new(&cfg).total;
    Ok(Some(DataParallelReport {
        backend: match &a.devices {
            Some(d) => format!("{d} (rank 0: {})", s.backend),
            None => s.backend.clone(),
        },
        model: a.model.clone(),
        batch: s.split.iter().sum(),
        split: s.split.clone(),
        seq_len: a.seq_len,
        ranks: s.split.len(),
        params,
        ms_per_step: ms,
        tokens_per_s: (s.split.iter().sum::<usize>() * a.seq_len) as f64 / (ms / 1e3),
        reduce_ms: timed(&s.reduce_ms),
        reduce_hidden_ms: timed(&s.reduce_hidden_ms),
        reduce_bytes_per_rank: 4 * params,
        host_copy_bytes_per_rank: if s.host_copies { 8 * params } else { 0 },
        engine: s.reduce_engine,
    }))
}
