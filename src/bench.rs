//! `wgpt bench`: times full training steps (forward, backward, update) after warm-up, or one kernel.

use crate::backend::BackendArgs;
use crate::error::{Error, Result};
use crate::graph::{build_train_step, TrainOptions};
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
}

#[derive(Clone, Debug, serde::Serialize)]
pub struct BenchReport {
    pub backend: String,
    pub model: String,
    pub batch: usize,
    pub seq_len: usize,
    pub params: usize,
    pub ms_per_step: f64,
    pub ms_all: Vec<f64>,
    pub tokens_per_s: f64,
    /// model FLOPs per second: (6·params + 6·L·C·T)·tokens / time, as llm.c counts them
    pub tflops: f64,
}

fn median(xs: &mut [f64]) -> f64 {
    xs.sort_by(|a, b| a.total_cmp(b));
    xs[xs.len() / 2]
}

pub fn run_step(a: &BenchArgs) -> Result<BenchReport> {
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
    let graph = build_train_step(
        &cfg,
        &TrainOptions { b: a.batch, t: a.seq_len, grad_accum: 1, weight_decay: 0.1, decay_all: false, grad_clip: 1.0 },
    );
    let mut sess = Session::new(backend, graph)?;
    sess.upload_params(&params)?;
    let n = a.batch * a.seq_len;
    // deterministic pseudo-random tokens
    let mut r = crate::rng::XorShift(12345);
    let x: Vec<i32> = (0..n).map(|_| (r.next_u32() % cfg.v as u32) as i32).collect();
    let y: Vec<i32> = (0..n).map(|_| (r.next_u32() % cfg.v as u32) as i32).collect();
    let mut times = Vec::new();
    for s in 0..(a.warmup + a.steps) {
        let t0 = Instant::now();
        sess.zero_grad()?;
        sess.train_micro_async(&x, &y)?;
        sess.update(1e-4, AdamConsts::default(), s + 1)?;
        sess.step_loss()?;
        sess.backend.sync()?;
        if s >= a.warmup {
            times.push(t0.elapsed().as_secs_f64() * 1e3);
        }
    }
    let ms = median(&mut times.clone());
    let flops_per_token = 6.0 * params.len() as f64 + 6.0 * (cfg.l * cfg.c * a.seq_len) as f64;
    Ok(BenchReport {
        backend: sess.backend.name(),
        model: a.model.clone(),
        batch: a.batch,
        seq_len: a.seq_len,
        params: params.len(),
        ms_per_step: ms,
        ms_all: times,
        tokens_per_s: n as f64 / (ms / 1e3),
        tflops: flops_per_token * n as f64 / (ms / 1e3) / 1e12,
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
