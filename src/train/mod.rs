//! `wgpt train`: the training loop — data, schedule, gradient accumulation, clipping, evaluation,
//! sampling, checkpoints, logging. The loop mirrors llm.c's train_gpt2.cu: for step = start..=N,
//! evaluate/sample/checkpoint where due, stop at N, otherwise do one optimiser step.

pub mod hellaswag;
pub mod interrupt;
pub mod log;
pub mod outlier;
pub mod sample;
pub mod scaler;
pub mod schedule;
pub mod session;
pub mod state;

use crate::backend::{Backend, BackendArgs, BackendKind};
use crate::data::shards::{DataLoader, LoaderOptions};
use crate::data::tokenizer::Tokenizer;
use crate::dist::comm::{self, Comm, MpiComm, Solo, ThreadComm};
use crate::dist::mpi::Mpi;
use crate::dist::nccl::{Nccl, NcclComm, NcclType};
use crate::dist::nccl_world::NcclWorld;
use crate::dist::rendezvous::DistInit;
use crate::dist::split::{self, BatchSplit};
use crate::error::{Error, Result};
use crate::graph::{build_train_step, DType, TrainOptions};
use crate::model::checkpoint::{read_checkpoint, write_checkpoint, Precision};
use crate::model::init::init_params;
use crate::model::{config, Config};
use schedule::{Schedule, ScheduleKind};
use session::{AdamConsts, Session};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Checkpoint precision on disk: llm.c version 3 (fp32) or 5 (bf16).
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum CkptPrecision {
    F32,
    Bf16,
}

impl From<CkptPrecision> for Precision {
    fn from(p: CkptPrecision) -> Precision {
        match p {
            CkptPrecision::F32 => Precision::F32,
            CkptPrecision::Bf16 => Precision::Bf16,
        }
    }
}

/// Flags of `wgpt train`. The defaults are the main job: a small GPT-2 trained from scratch on the
/// bundled Shakespeare in about three minutes on a 2-core CPU.
#[derive(Clone, Debug, clap::Args)]
pub struct TrainArgs {
    #[command(flatten)]
    pub backend: BackendArgs,
    /// model: an llm.c checkpoint (.bin) or a Hugging Face GPT-2 (folder or model.safetensors) to start
    /// from, or a descriptor for random init: dN (llm.c's d6, d12, d24, d36, d48...), or dN:cC (N
    /// layers, C channels, C/64 heads) for small models
    #[arg(long, default_value = "d4:c256")]
    pub init: String,
    /// training token shards (glob, llm.c format) [default: the bundled Shakespeare shards
    /// (data/shakespeare_train.bin, built into wgpt)]
    #[arg(long, value_name = "GLOB")]
    pub train: Option<String>,
    /// validation token shards (glob) [default: the bundled Shakespeare shards
    /// (data/shakespeare_val.bin, built into wgpt)]
    #[arg(long, value_name = "GLOB")]
    pub val: Option<String>,
    /// tokenizer for printing samples [default: with --train, gpt2_tokenizer.bin beside the train
    /// shards if there is one, else the built-in GPT-2 BPE; without --train, the bundled gpt2_tokenizer.bin]
    #[arg(long)]
    pub tokenizer: Option<PathBuf>,
    /// micro-batch size B (sequences per forward/backward), or auto: the largest B whose step fits
    /// the device (and --memory), with --total-batch reached by gradient accumulation
    #[arg(long, default_value_t = Batch::N(16), value_parser = Batch::parse, value_name = "N|auto")]
    pub batch: Batch,
    /// sequence length T (at most the model's max, 1024 for GPT-2)
    #[arg(long, default_value_t = 64)]
    pub seq_len: usize,
    /// tokens per optimiser step; a multiple of B·T, the rest is gradient accumulation (0 = B·T)
    #[arg(long, default_value_t = 0)]
    pub total_batch: usize,
    /// optimiser steps (the default is sized so that the main job takes about three minutes on a
    /// 2-core AVX2 CPU; see docs/BENCHMARKS.md)
    #[arg(long, default_value_t = 180)]
    pub steps: usize,
    /// peak learning rate
    #[arg(long, default_value_t = 2e-3)]
    pub lr: f32,
    /// linear warmup steps
    #[arg(long, default_value_t = 10)]
    pub warmup: usize,
    /// learning-rate schedule after warmup
    #[arg(long, value_enum, default_value_t = ScheduleKind::Cosine)]
    pub schedule: ScheduleKind,
    /// final learning rate as a fraction of --lr
    #[arg(long, default_value_t = 0.1)]
    pub final_lr_frac: f32,
    /// AdamW weight decay (2-D weights only, like llm.c's CUDA trainer)
    #[arg(long, default_value_t = 0.1)]
    pub weight_decay: f32,
    /// AdamW β1
    #[arg(long, default_value_t = 0.9)]
    pub beta1: f32,
    /// AdamW β2
    #[arg(long, default_value_t = 0.95)]
    pub beta2: f32,
    /// clip the global gradient norm to this (0 = no clipping)
    #[arg(long, default_value_t = 1.0)]
    pub grad_clip: f32,
    /// evaluate the validation loss every N steps and at the end (0 = never)
    #[arg(long, default_value_t = 50)]
    pub val_every: usize,
    /// batches per validation
    #[arg(long, default_value_t = 8)]
    pub val_batches: usize,
    /// print a generated sample every N steps (0 = only at the end)
    #[arg(long, default_value_t = 0)]
    pub sample_every: usize,
    /// tokens to generate per sample (at most --seq-len; 0 = no sampling)
    #[arg(long, default_value_t = 64)]
    pub gen_tokens: usize,
    /// output directory for checkpoints and main.log
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// write a checkpoint every N steps and at the end (needs --out; 0 = only at the end)
    #[arg(long, default_value_t = 0)]
    pub checkpoint_every: usize,
    /// keep only the newest K of the --checkpoint-every checkpoints, deleting older ones (0 = keep all; llm.c -nk)
    #[arg(long, default_value_t = 0)]
    pub keep_checkpoints: usize,
    /// with --keep-checkpoints: never delete the checkpoints at multiples of M steps (0 = none; llm.c -nm)
    #[arg(long, default_value_t = 0)]
    pub keep_every: usize,
    /// skip the update when the loss's z-score over the last 128 steps exceeds Z (0 = never; llm.c -sl)
    #[arg(long, default_value_t = 0.0)]
    pub skip_loss_z: f32,
    /// skip the update when the gradient norm's z-score over the last 128 steps exceeds Z (0 = never; llm.c -sg)
    #[arg(long, default_value_t = 0.0)]
    pub skip_grad_z: f32,
    /// multiple-choice eval file (llm.c format, e.g. hellaswag_val.bin) scored at the --val-every
    /// cadence after step 0 and at the end (llm.c -h 1; needs --batch ≥ 4 and a --seq-len that fits)
    #[arg(long)]
    pub hellaswag: Option<PathBuf>,
    /// checkpoint precision: f32 (llm.c version 3) or bf16 (version 5)
    #[arg(long, value_enum, default_value_t = CkptPrecision::F32)]
    pub checkpoint_precision: CkptPrecision,
    /// continue from the newest complete checkpoint in --out
    #[arg(long)]
    pub resume: bool,
    /// seed of the random init
    #[arg(long, default_value_t = 42)]
    pub seed: u32,
    /// shuffle the training data like llm.c (1) or read it in order (0)
    #[arg(long, default_value_t = 1)]
    pub shuffle: u8,
    /// append one JSON object per step to this file
    #[arg(long)]
    pub log_json: Option<PathBuf>,
    /// with several ranks (mpirun, srun, torchrun..., or --devices): how the global micro-batch is
    /// divided. even: --batch split evenly; auto: in proportion to each device's measured speed,
    /// within what fits it; a list b0,b1,… (one per rank): rank r's micro-batch, whose sum replaces
    /// --batch. Any split trains on the tokens one device would see at that batch.
    #[arg(long, value_name = "even|auto|LIST", default_value_t = BatchSplit::Even, value_parser = BatchSplit::parse)]
    pub batch_split: BatchSplit,
    /// train on several devices in this process, one rank (and thread) per device, gradients
    /// summed through host memory: a list of device indices of --backend (see `wgpt info`), or of
    /// cpu, wgpu:N, cuda:N to mix kinds, e.g. 0,1 or wgpu:0,cpu (the same index twice opens the
    /// adapter twice)
    #[arg(long, value_name = "LIST")]
    pub devices: Option<String>,
    /// with several ranks: seconds a collective may wait for the other ranks before the run is
    /// ended with an error (a peer died or hangs)
    #[arg(long, default_value_t = 600, value_name = "SECS")]
    pub dist_timeout: u64,
    /// with several ranks: every N steps, check that every rank holds bit-identical parameters
    /// (a checksum compared across ranks; 0 = never)
    #[arg(long, default_value_t = 0, value_name = "N")]
    pub check_sync: usize,
    /// with several ranks: where the gradients are summed. auto: NCCL on the GPUs when every rank
    /// is CUDA and libnccl.so.2 is found ($WGPT_NCCL_LIB, $NCCL_HOME, LD_LIBRARY_PATH, pip's
    /// nvidia-nccl), else through host memory; host: always through host memory (MPI, or the
    /// in-process sum with --devices); nccl: NCCL or an error saying why not
    #[arg(long, value_enum, default_value_t = ReduceMode::Auto)]
    pub reduce: ReduceMode,
    /// with several GPU ranks summing through host memory: sum each gradient bucket while the rest
    /// of backward runs. auto: on, except where the device's kernels run on this machine's CPU
    /// cores (cpu ranks, which sum in place anyway, and software adapters such as lavapipe),
    /// where the sum would slow backward down; on; off
    #[arg(long, value_enum, default_value_t = Overlap::Auto)]
    pub overlap: Overlap,
    /// with several ranks: 1 = ZeRO-1 (llm.c's -z 1), AdamW's m and v sharded over the ranks (each
    /// keeps and updates 1/N of them; gradients reduce-scattered, parameters all-gathered); 0 = off
    #[arg(long, default_value_t = 0, value_name = "0|1")]
    pub zero: u8,
    /// with several processes: how they find each other. auto: MPI, except for CUDA ranks started
    /// by torchrun or given MASTER_ADDR/MASTER_PORT by a non-MPI launcher (then tcp) and CUDA ranks
    /// with no MPI to be found (then fs: in wgpt's cache directory); mpi; and,
    /// for CUDA ranks without MPI (NCCL then carries everything): fs:DIR (a directory every rank
    /// sees; rank 0 writes NCCL's id there), tcp (rank 0 listens at MASTER_ADDR:MASTER_PORT) or
    /// tcp:HOST:PORT
    #[arg(long, value_name = "auto|mpi|fs:DIR|tcp[:HOST:PORT]", default_value_t = DistInit::Auto, value_parser = DistInit::parse)]
    pub dist_init: DistInit,
    /// device memory the step may use, e.g. 2GiB or 1536MiB (with --batch auto: the largest B
    /// whose buffers fit it; with a fixed --batch: an error if they do not)
    #[arg(long, value_name = "SIZE", value_parser = crate::plan::parse_size)]
    pub memory: Option<u64>,
    #[command(flatten)]
    pub modes: crate::plan::StepModes,
    /// fp16: the first loss scale (halved on each overflow, doubled after --loss-scale-window
    /// clean steps; PyTorch's GradScaler defaults)
    #[arg(long, default_value_t = 65536.0, value_name = "S")]
    pub loss_scale: f32,
    /// fp16: clean steps after which the loss scale doubles
    #[arg(long, default_value_t = 2000, value_name = "N")]
    pub loss_scale_window: usize,
}

impl TrainArgs {
    /// The training graph's options for micro-batch `b` and `grad_accum` micro-steps.
    pub fn train_options(&self, b: usize, grad_accum: usize) -> TrainOptions {
        TrainOptions { grad_accum, weight_decay: self.weight_decay, grad_clip: self.grad_clip, ..self.modes.train_options(b, self.seq_len) }
    }
}

/// `--batch`: sequences per micro-step, or the largest that fits.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Batch {
    Auto,
    N(usize),
}

impl Batch {
    pub fn parse(s: &str) -> std::result::Result<Batch, String> {
        if s == "auto" {
            return Ok(Batch::Auto);
        }
        s.parse::<usize>().map(Batch::N).map_err(|_| format!("'{s}': give a number of sequences or auto"))
    }
    /// The number (0 for auto, which `run` resolves before anything else reads it).
    pub fn n(self) -> usize {
        match self {
            Batch::N(n) => n,
            Batch::Auto => 0,
        }
    }
}

impl std::fmt::Display for Batch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Batch::Auto => write!(f, "auto"),
            Batch::N(n) => write!(f, "{n}"),
        }
    }
}

/// `--reduce`: where a data-parallel run sums its gradients.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum ReduceMode {
    Auto,
    Host,
    Nccl,
}

/// `--overlap`: whether GPU ranks sum gradient buckets while backward runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Overlap {
    Auto,
    On,
    Off,
}

/// Parse `dN` (llm.c) or `dN:cC` (wgpt's small models: N layers, C channels, C/64 heads, at least 1).
pub fn config_from_descriptor(desc: &str) -> Result<Config> {
    if let Some((d, c)) = desc.split_once(':') {
        if d != "gpt2" {
            let bad = || Error::flag("--init", format!("'{desc}': expected dN or dN:cC, e.g. d4:c256"));
            let l: usize = d.strip_prefix('d').and_then(|x| x.parse().ok()).ok_or_else(bad)?;
            let c: usize = c.strip_prefix('c').and_then(|x| x.parse().ok()).ok_or_else(bad)?;
            if l == 0 || c == 0 || c % 64 != 0 && c > 64 {
                return Err(Error::flag("--init", format!("'{desc}': need L ≥ 1 and C a multiple of 64 (or ≤ 64)")));
            }
            let nh = (c / 64).max(1);
            return Ok(Config { max_t: 1024, v: config::GPT2_VOCAB, vp: config::GPT2_PADDED_VOCAB, l, nh, c });
        }
    }
    Config::from_descriptor(desc)
}

/// The model to start from: an llm.c checkpoint, a Hugging Face GPT-2 (folder or
/// model.safetensors), or a random init.
pub fn load_or_init(init: &str, seed: u32) -> Result<(Config, Vec<f32>)> {
    if init.ends_with(".bin") || init.ends_with(".safetensors") || Path::new(init).exists() {
        crate::model::hf::load_model(Path::new(init))
    } else {
        let cfg = config_from_descriptor(init)?;
        Ok((cfg, init_params(&cfg, seed)))
    }
}

/// What a finished run reports (also used by tests).
#[derive(Clone, Debug, Default)]
pub struct TrainSummary {
    pub train_losses: Vec<f32>,
    /// (step, val loss)
    pub val_losses: Vec<(usize, f32)>,
    pub sample: Option<String>,
    pub steps_done: usize,
    /// the signal (SIGINT = 2, SIGTERM = 15) that stopped the run early, after its checkpoint
    pub interrupted: Option<i32>,
    /// wall time of every optimiser step (ms)
    pub step_ms: Vec<f64>,
    /// with several ranks: the part of each step spent summing gradients (ms)
    pub reduce_ms: Vec<f64>,
    /// with several ranks: the part of `reduce_ms` that ran while backward was still running
    pub reduce_hidden_ms: Vec<f64>,
    /// with several ranks: how the gradients were summed (the header's words)
    pub reduce_engine: String,
    /// the micro-batch of each rank
    pub split: Vec<usize>,
    /// rank 0's backend
    pub backend: String,
    /// with several ranks: whether the gradients went through host copies (false: summed in
    /// place, in host memory on cpu or by NCCL on the GPUs)
    pub host_copies: bool,
}

/// Checks the flags against the model; returns the accumulation steps per optimiser step. `b` is
/// the global micro-batch (every rank's together).
fn check_args(a: &TrainArgs, cfg: &Config, b: usize) -> Result<usize> {
    if b == 0 {
        return Err(Error::flag("--batch", "must be at least 1"));
    }
    if a.seq_len == 0 {
        return Err(Error::flag("--seq-len", "must be at least 1"));
    }
    if a.seq_len > cfg.max_t {
        return Err(Error::flag("--seq-len", format!("{} exceeds the model's maximum sequence length {}", a.seq_len, cfg.max_t)));
    }
    let bt = b * a.seq_len;
    let total = if a.total_batch == 0 { bt } else { a.total_batch };
    if total % bt != 0 {
        let what = if matches!(a.batch_split, BatchSplit::List(_)) { "the --batch-split sum" } else { "--batch" };
        return Err(Error::flag("--total-batch", format!("{total} is not a multiple of {what} × --seq-len = {bt}")));
    }
    if a.resume && a.out.is_none() {
        return Err(Error::flag("--resume", "needs --out DIR (the directory holding the checkpoints)"));
    }
    if !(a.grad_clip >= 0.0) {
        return Err(Error::flag("--grad-clip", "must be >= 0"));
    }
    if a.modes.offload_optimizer && a.zero == 1 {
        return Err(Error::flag("--offload-optimizer", "cannot be combined with --zero 1 (each rank would offload its own shard; not built): use one of them"));
    }
    Ok(total / bt)
}

/// The global micro-batch: `--batch`, or the sum of a `--batch-split` list.
fn global_batch(a: &TrainArgs) -> usize {
    match &a.batch_split {
        BatchSplit::List(v) => v.iter().sum(),
        _ => a.batch.n(),
    }
}

/// Makes a rank's backend (called once, or twice with `--batch-split auto`).
type MakeBackend<'a> = dyn Fn() -> Result<Box<dyn Backend>> + Sync + 'a;

/// Run `wgpt train`: one process; or one rank of a multi-process launch (mpirun, srun,
/// torchrun...), joined by MPI; or, with `--devices`, one rank per device in this process.
pub fn run(a: &TrainArgs) -> Result<TrainSummary> {
    let env = crate::dist::env_map();
    let world = crate::dist::World::from_env_map(&env)?;
    let resolved;
    let a = if a.batch == Batch::Auto {
        if a.devices.is_some() || world.size > 1 {
            return Err(Error::flag("--batch", "auto is for one device; with several ranks give --batch and --batch-split auto"));
        }
        resolved = auto_batch(a)?;
        &resolved
    } else {
        a
    };
    let timeout = Duration::from_secs(a.dist_timeout.max(1));
    if let Some(list) = &a.devices {
        if world.size > 1 {
            return Err(Error::flag(
                "--devices",
                format!(
                    "several devices in one process cannot be combined with a launch of {} processes ({}); use one or the other",
                    world.size, world.launcher
                ),
            ));
        }
        let devices = crate::dist::local::parse_devices(list, a.backend.backend)?;
        return run_in_process(a, &devices, timeout);
    }
    if world.size == 1 {
        return run_rank(a, &Solo, &|| a.backend.create(), None);
    }
    // several processes: MPI joins them (no MPI is needed, or loaded, for one), or, for CUDA
    // ranks, NCCL alone. The flags and this rank's device (two local ranks on one GPU are
    // refused) are checked first.
    check_args(a, &config_only(a)?, global_batch(a))?;
    if a.backend.device.is_none() {
        a.backend.rank_device()?;
    }
    let cuda = match a.backend.backend {
        BackendKind::Cuda => true,
        BackendKind::Auto => matches!(crate::dist::probe_devices(BackendKind::Auto), crate::dist::Devices::Cuda { .. }),
        _ => false,
    };
    // Ok(MPI) or Err(the rendezvous of a world NCCL joins alone)
    let engine: std::result::Result<Mpi, DistInit> = match nccl_only_init(&a.dist_init, &world, &env, cuda)? {
        Some(init) => Err(init),
        None => match Mpi::init(&env) {
            Ok(m) => Ok(m),
            // CUDA ranks with no MPI to be found (auto): the NCCL id goes through a file in wgpt's
            // cache directory (shared by the ranks of one node; across nodes, where home is shared)
            Err(Error::Unavailable(m)) if cuda => match (a.dist_init == DistInit::Auto).then(|| crate::cache::cache_dir("rendezvous")).flatten() {
                Some(dir) => Err(DistInit::Fs(dir)),
                None => {
                    return Err(Error::Unavailable(format!(
                        "{m}; CUDA ranks can also be joined by NCCL alone: --dist-init tcp (with MASTER_ADDR/MASTER_PORT) or --dist-init fs:DIR"
                    )))
                }
            },
            Err(e) => return Err(e),
        },
    };
    let mpi = match engine {
        Ok(m) => m,
        Err(init) => {
            let device = match a.backend.device {
                Some(d) => d,
                None => a.backend.rank_device()?.unwrap_or(0),
            };
            let comm = NcclWorld::join(&env, world.rank, world.size, device, &init, timeout)?;
            let header = format!("{world} ({}); {}", world.launcher, comm.describe());
            let r = run_rank(a, &comm, &|| a.backend.create(), Some(header));
            if let Err(e) = &r {
                comm.fail(&e.to_string());
            }
            return r;
        }
    };
    if (mpi.rank(), mpi.size()) != (world.rank, world.size) {
        return Err(Error::Unavailable(format!(
            "MPI ({}) says rank {} of {}, but {} says rank {} of {}: that library is not the launcher's MPI; set WGPT_MPI_LIB to the libmpi of the mpirun/mpiexec used",
            mpi.describe(),
            mpi.rank(),
            mpi.size(),
            world.launcher,
            world.rank,
            world.size
        )));
    }
    let comm = MpiComm::new(mpi, timeout);
    let header = format!("{world} ({}); {}", world.launcher, comm.describe());
    let r = run_rank(a, &comm, &|| a.backend.create(), Some(header));
    if let Err(e) = &r {
        // the other ranks would wait for this one at the next collective: end the job
        comm.fail(&e.to_string());
    }
    r
}

/// The model configuration `--init` (or the checkpoint to resume) names, for checking flags
/// before MPI starts: an llm.c file's header only (the weights are read once, by the rank).
/// `--batch auto`: the largest B dividing --total-batch / T whose training step (with the
/// sampler's decoder when --gen-tokens > 0) fits the device (`Backend::check_fits`) and --memory.
/// The returned flags have that B and the accumulation that reaches --total-batch.
fn auto_batch(a: &TrainArgs) -> Result<TrainArgs> {
    if a.total_batch == 0 || a.seq_len == 0 || !a.total_batch.is_multiple_of(a.seq_len) {
        return Err(Error::flag("--batch", "auto needs --total-batch (tokens per optimiser step, a multiple of --seq-len) to reach by accumulation"));
    }
    let cfg = config_only(a)?;
    let rows = a.total_batch / a.seq_len;
    let backend = a.backend.create()?;
    let mut last = None;
    for b in (1..=rows).rev().filter(|b| rows.is_multiple_of(*b)) {
        let mut g = build_train_step(&cfg, &a.train_options(b, rows / b));
        if a.gen_tokens > 0 && a.modes.precision == DType::F32 {
            crate::graph::add_decoder(&mut g, sample::decode_options(&cfg, a.gen_tokens.min(a.seq_len)));
        }
        let bytes = g.total_bytes() as u64;
        if a.memory.is_some_and(|m| bytes > m) {
            last = Some(format!("B={b} needs {:.2} GiB", bytes as f64 / (1u64 << 30) as f64));
            continue;
        }
        let phases: Vec<&[crate::graph::Launch]> = g.iter_phases().map(|(_, l)| l).collect();
        match backend.check_fits(&g.buffers, &phases) {
            Ok(()) => {
                let cap = a.memory.map(|m| format!(" and --memory {:.2} GiB", m as f64 / (1u64 << 30) as f64)).unwrap_or_default();
                eprintln!(
                    "wgpt: --batch auto: B={b} ({:.2} GiB of buffers) fits {}{cap}; {} accumulation steps reach --total-batch {}",
                    bytes as f64 / (1u64 << 30) as f64,
                    backend.name(),
                    rows / b,
                    a.total_batch
                );
                return Ok(TrainArgs { batch: Batch::N(b), ..a.clone() });
            }
            Err(e) => last = Some(e.to_string()),
        }
    }
    Err(Error::OutOfMemory(format!(
        "--batch auto: not even B=1 at --seq-len {} fits ({}); lower --seq-len or use a smaller model",
        a.seq_len,
        last.unwrap_or_default()
    )))
}

/// `--dist-init`: the rendezvous of a world joined by NCCL alone (None: MPI joins it). `auto`
/// takes tcp for CUDA ranks that a non-MPI launcher started with MASTER_ADDR and MASTER_PORT set
/// (torchrun always sets them); everything else is MPI's.
fn nccl_only_init(init: &DistInit, world: &crate::dist::World, env: &HashMap<String, String>, cuda: bool) -> Result<Option<DistInit>> {
    use crate::dist::Launcher;
    match init {
        DistInit::Mpi => Ok(None),
        DistInit::Fs(_) | DistInit::Tcp(_) if !cuda => Err(Error::flag(
            "--dist-init",
            format!("{init} joins CUDA ranks through NCCL alone; cpu and wgpu ranks are joined by MPI (--dist-init auto or mpi)"),
        )),
        DistInit::Fs(_) | DistInit::Tcp(_) => Ok(Some(init.clone())),
        DistInit::Auto => {
            let mpi_launcher = matches!(world.launcher, Launcher::OpenMpi | Launcher::Pmi | Launcher::Mvapich | Launcher::Horovod);
            let master = ["MASTER_ADDR", "MASTER_PORT"].iter().all(|k| env.get(*k).is_some_and(|v| !v.is_empty()));
            Ok((cuda && !mpi_launcher && master).then_some(DistInit::Tcp(None)))
        }
    }
}

fn config_only(a: &TrainArgs) -> Result<Config> {
    let resume = a.out.as_ref().filter(|_| a.resume).and_then(|d| state::latest_done(d).map(|s| state::model_path(d, s)));
    match resume {
        Some(p) => crate::model::checkpoint::read_header(&p),
        None => model_config(&a.init),
    }
}

/// The configuration of `--init`/`--model` (a descriptor, an llm.c checkpoint whose header alone
/// is read, or a Hugging Face GPT-2), without making or reading the weights where it can.
pub fn model_config(init: &str) -> Result<Config> {
    use crate::model::hf::{detect, ModelFormat};
    if init.ends_with(".bin") || init.ends_with(".safetensors") || Path::new(init).exists() {
        let p = Path::new(init);
        match detect(p) {
            ModelFormat::Llmc => crate::model::checkpoint::read_header(p),
            _ => Ok(crate::model::hf::load_model(p)?.0),
        }
    } else {
        config_from_descriptor(init)
    }
}

/// `--devices`: one thread per device, each a rank, gradients summed through host memory.
fn run_in_process(a: &TrainArgs, devices: &[(BackendKind, Option<usize>)], timeout: Duration) -> Result<TrainSummary> {
    let comms = ThreadComm::group(devices.len(), timeout);
    let list: Vec<String> = devices.iter().map(|(k, d)| d.map_or(k.to_string(), |d| format!("{k}:{d}"))).collect();
    let header = format!("{} devices in this process ({}); {}", devices.len(), list.join(", "), comms[0].describe());
    let results: Vec<Result<TrainSummary>> = std::thread::scope(|s| {
        let handles: Vec<_> = comms
            .iter()
            .zip(devices)
            .map(|(c, &(kind, device))| {
                let header = header.clone();
                s.spawn(move || {
                    let make = || a.backend.create_on(kind, device);
                    let r = run_rank(a, c, &make, (c.rank() == 0).then_some(header));
                    if let Err(e) = &r {
                        c.fail(&e.to_string());
                    }
                    r
                })
            })
            .collect();
        handles
            .into_iter()
            .enumerate()
            .map(|(r, h)| h.join().unwrap_or_else(|_| Err(Error::Internal(format!("rank {r}: its thread panicked")))))
            .collect()
    });
    // the error of the rank that failed first, not its peers' "stopped because rank r failed"
    let mut first_err = None;
    let mut summary = None;
    for (r, res) in results.into_iter().enumerate() {
        match res {
            Ok(s) if r == 0 => summary = Some(s),
            Ok(_) => {}
            Err(e) => {
                let own = !e.to_string().contains("stopped because");
                if first_err.as_ref().is_none_or(|(o, _)| !o && own) {
                    first_err = Some((own, e));
                }
            }
        }
    }
    match (first_err, summary) {
        (Some((_, e)), _) => Err(e),
        (None, Some(s)) => Ok(s),
        (None, None) => Err(Error::Internal("no rank returned a summary".into())),
    }
}

/// Rank `comm.rank()`'s rows of a batch of the global micro-batch: rows `row0..row0+b`.
fn rank_rows(x: &[i32], y: &[i32], row0: usize, b: usize, t: usize) -> (Vec<i32>, Vec<i32>) {
    let r = row0 * t..(row0 + b) * t;
    (x[r.clone()].to_vec(), y[r].to_vec())
}

/// `--batch-split auto`: time one micro-step at the even split on every rank, find the largest
/// micro-batch each device fits (the backend's own memory check, before allocating), and split
/// the global micro-batch in proportion to the measured tokens/s within those caps. When the
/// devices together do not fit B, the global micro-batch becomes the largest divisor of B they
/// fit and the rest becomes gradient accumulation (the returned factor).
fn calibrate_split(a: &TrainArgs, comm: &dyn Comm, cfg: &Config, make_backend: &MakeBackend, b: usize) -> Result<(Vec<usize>, Vec<f64>, usize)> {
    let even = split::even(b, comm.size())?;
    let backend = make_backend()?;
    let opts = |b: usize| a.train_options(b, 1);
    let fits = |b: usize| {
        let g = build_train_step(cfg, &opts(b));
        let phases: Vec<&[crate::graph::Launch]> = g.iter_phases().map(|(_, l)| l).collect();
        backend.check_fits(&g.buffers, &phases).is_ok()
    };
    // the largest micro-batch that fits this device, up to what is left when every other rank has one
    let most = b + 1 - comm.size();
    let (mut lo, mut hi) = (0usize, most);
    while lo < hi {
        let mid = (lo + hi).div_ceil(2);
        if fits(mid) {
            lo = mid;
        } else {
            hi = mid - 1;
        }
    }
    let cap = lo;
    let bt = even[comm.rank()].min(cap.max(1));
    let speed = if cap == 0 {
        0.0
    } else {
        let mut sess = Session::new(backend, build_train_step(cfg, &opts(bt)))?;
        let n = bt * a.seq_len;
        let x: Vec<i32> = (0..n).map(|i| ((i * 7919) % cfg.v) as i32).collect();
        sess.zero_grad()?;
        sess.train_micro(&x, &x)?; // warm-up: shader compilation, first allocations
        let t0 = Instant::now();
        for _ in 0..2 {
            sess.train_micro(&x, &x)?;
        }
        (2 * n) as f64 / t0.elapsed().as_secs_f64()
    };
    let speeds = comm::gather_f64(comm, speed)?;
    let caps: Vec<usize> = comm::gather_u64(comm, cap as u64)?.into_iter().map(|c| c as usize).collect();
    let Some((micro, factor)) = split::fit_by_accumulation(b, caps.iter().sum(), comm.size()) else {
        return Err(Error::flag(
            "--batch-split",
            format!(
                "auto: the ranks fit {} sequences per micro-step ({} per rank) and no divisor of --batch {b} from {} up fits",
                caps.iter().sum::<usize>(),
                split::join(&caps),
                comm.size()
            ),
        ));
    };
    Ok((split::proportional(micro, &speeds, &caps)?, speeds, factor))
}

/// One rank's training run (the whole run when `comm` is `Solo`). Every rank follows the same
/// loop in lockstep: it reads the batch a single device would read and trains on its own rows
/// of it; the loss gradient is seeded with 1/N_global and the gradients are summed over ranks
/// before clipping and AdamW, so every rank applies the same update. Rank 0 logs, samples and
/// writes the model; every rank writes its own optimiser state.
fn run_rank(a: &TrainArgs, comm: &dyn Comm, make_backend: &MakeBackend, dist_header: Option<String>) -> Result<TrainSummary> {
    let (rank, world) = (comm.rank(), comm.size());
    let lead = rank == 0;
    if a.modes.precision != DType::F32 && world > 1 {
        return Err(Error::flag("--precision", format!("{} trains on one device so far (the gradient sums over ranks are f32 paths); use fp32 with several ranks", a.modes.precision)));
    }
    let resume_step = match (&a.out, a.resume) {
        (Some(dir), true) => {
            let s = state::latest_done(dir);
            if s.is_none() && lead {
                eprintln!("wgpt: no complete checkpoint (DONE_*) in {}; starting from --init", dir.display());
            }
            s
        }
        _ => None,
    };
    let (cfg, params) = match (resume_step, &a.out) {
        (Some(s), Some(dir)) => read_checkpoint(&state::model_path(dir, s))?,
        _ => load_or_init(&a.init, a.seed)?,
    };
    let asked_b = global_batch(a);
    let asked_accum = check_args(a, &cfg, asked_b)?;
    if let BatchSplit::List(v) = &a.batch_split {
        if v.len() != world {
            return Err(Error::flag("--batch-split", format!("lists {} micro-batches for {world} ranks", v.len())));
        }
    }
    if a.zero > 1 {
        return Err(Error::flag("--zero", format!("{}: only 0 (off) and 1 (shard the optimiser state) exist", a.zero)));
    }
    let (split, speeds, factor) = match &a.batch_split {
        _ if world == 1 => (vec![asked_b], Vec::new(), 1),
        BatchSplit::Even => (split::even(asked_b, world)?, Vec::new(), 1),
        BatchSplit::List(v) => (v.clone(), Vec::new(), 1),
        BatchSplit::Auto => calibrate_split(a, comm, &cfg, make_backend, asked_b)?,
    };
    // (auto, when the devices do not fit B: a smaller micro-batch, more accumulation)
    let (global_b, grad_accum) = (asked_b / factor, asked_accum * factor);
    if factor > 1 && lead {
        eprintln!("wgpt: --batch-split auto: the devices fit {global_b} of --batch {asked_b} sequences per micro-step; {grad_accum} accumulation steps keep the tokens per step");
    }
    // every rank reads the batches one device would (rank 0 of 1, global B) and takes its rows:
    // any split then sees the same tokens, and the loader state does not depend on the world
    let opts = LoaderOptions { b: global_b, t: a.seq_len, rank: 0, world: 1, shuffle: a.shuffle != 0, vocab: cfg.v };
    let mut train_loader = open_loader(a.train.as_deref(), "--train", opts.clone())?;
    let mut val_loader = if a.val_every > 0 && a.val_batches > 0 {
        Some(open_loader(a.val.as_deref(), "--val", LoaderOptions { shuffle: false, ..opts.clone() })?)
    } else {
        None
    };
    let tokenizer = if lead { load_tokenizer(a.tokenizer.as_deref(), a.train.as_deref()) } else { None };
    let eval_set = match &a.hellaswag {
        Some(p) => {
            let ex = crate::data::evalset::read_eval_file(p)?;
            // with several ranks, each scores its share of the examples in its own micro-batch
            let b = if world > 1 { split.iter().copied().min().unwrap_or(0) } else { a.batch.n() };
            if world > 1 && b < 4 {
                return Err(Error::flag(
                    "--hellaswag",
                    format!("each rank scores its share of the examples, 4 rows per example, in its own micro-batch, and the split {} gives a rank fewer than 4; use a larger --batch or --batch-split", split::join(&split)),
                ));
            }
            hellaswag::check_examples(&ex, p, b, a.seq_len, cfg.v)?;
            Some(ex)
        }
        None => None,
    };

    let (my_b, row0) = (split[rank], split::offset(&split, rank));
    let backend = make_backend()?;
    let num_params = params.len();
    // ZeRO-1: this rank keeps and updates the optimiser state of 1/world of the parameters
    let chunk = num_params.div_ceil(world);
    let shard = (a.zero == 1 && world > 1).then(|| (rank * chunk).min(num_params)..((rank + 1) * chunk).min(num_params));
    let topts = a.train_options(my_b, grad_accum);
    let mut graph = match &shard {
        Some(r) => crate::graph::build_train_step_sharded(&cfg, &topts, r.clone()),
        None => build_train_step(&cfg, &topts),
    };
    // the sample during training decodes in the training graph, whose decode phases read f32
    // parameters; a low-precision run samples with a decoder of its own instead (below)
    if lead && a.gen_tokens > 0 && a.modes.precision == DType::F32 {
        crate::graph::add_decoder(&mut graph, sample::decode_options(&cfg, a.gen_tokens.min(a.seq_len)));
    }
    if let Some(m) = a.memory.filter(|&m| graph.total_bytes() as u64 > m) {
        let gib = |b: u64| b as f64 / (1u64 << 30) as f64;
        return Err(Error::OutOfMemory(format!(
            "the step's buffers need {:.2} GiB, more than --memory {:.2} GiB: lower --batch or --seq-len, or use --batch auto --total-batch N",
            gib(graph.total_bytes() as u64),
            gib(m)
        )));
    }
    let mut sess = Session::new(backend, graph)?;
    // the one gradient rule: dL/dloss = 1/N_global at every position of every rank
    let n_global = global_b * a.seq_len * grad_accum;
    sess.set_loss_seed(1.0 / n_global as f32)?;
    sess.upload_params(&params)?;
    drop(params);
    // ranks on different kinds of backend (cpu and wgpu) may round AdamW differently in the last
    // bit: rank 0's parameters are then copied to the others after every update (ZeRO-1's
    // all-gather does that anyway)
    let kinds = comm.allgather(&[sess.backend.kind() as u8])?;
    let copy_params = shard.is_none() && kinds.iter().any(|&k| k != kinds[0]);
    let (nccl, nccl_note) = if world > 1 { nccl_setup(a, comm, &mut sess, &kinds)? } else { (None, String::new()) };
    // GPU ranks summing through host memory: each gradient bucket is downloaded as soon as
    // backward has finished it and summed on another thread while the rest of backward runs (the
    // cpu backend's buffers are summed in place instead: its cores are the ones backward uses)
    // (every rank must make the same collective calls: overlap only when no rank sums in place)
    let host_memory = in_host_memory(&mut sess)?;
    let mine = match a.overlap {
        Overlap::Off => false,
        Overlap::On => !host_memory,
        Overlap::Auto => !host_memory && !sess.backend.runs_on_host_cores(),
    };
    let all = comm.allgather(&[mine as u8])?;
    let overlap = world > 1 && nccl.is_none() && shard.is_none() && all.iter().all(|&f| f == 1);

    let mut start = 0;
    let mut saved_outliers = None;
    // fp16: dynamic loss scaling (bf16 has f32's exponent range and needs none)
    let mut scaler = (a.modes.precision == DType::F16).then(|| scaler::LossScaler::new(a.loss_scale, a.loss_scale_window));
    if let (Some(s), Some(dir)) = (resume_step, &a.out) {
        // the whole optimiser state, whatever the saved run's world and sharding (a rank that did
        // not exist in it takes rank 0's: without ZeRO every rank's state is the same)
        let st = state::read_full_state(dir, s, rank, num_params)?;
        if st.step != s {
            return Err(Error::format(state::state_path(dir, s), format!("says step {}, but it belongs to the checkpoint of step {s}", st.step)));
        }
        if s > a.steps {
            return Err(Error::flag(
                "--steps",
                format!("{} is before the newest checkpoint in {} (step {s}); give at least --steps {s}", a.steps, dir.display()),
            ));
        }
        if (st.extra.b, st.extra.t, st.extra.grad_accum) != (global_b, a.seq_len, grad_accum) {
            return Err(Error::flag(
                "--resume",
                format!(
                    "checkpoint was made with --batch {} --seq-len {} and {} accumulation steps; use the same shape",
                    st.extra.b, st.extra.t, st.extra.grad_accum
                ),
            ));
        }
        match &shard {
            Some(r) => sess.upload_opt_state(&st.m[r.clone()], &st.v[r.clone()])?,
            None => sess.upload_opt_state(&st.m, &st.v)?,
        }
        train_loader.restore(&st.extra.loader)?;
        start = st.step;
        saved_outliers = st.extra.outliers;
        let saved = st.extra.precision.clone().unwrap_or_else(|| "f32".into());
        if saved != a.modes.precision.name() {
            return Err(Error::flag("--precision", format!("the checkpoint was trained in {saved}; resume it with that precision")));
        }
        if scaler.is_some() {
            scaler = st.extra.loss_scaler.clone().or(scaler);
        }
    }
    if let Some(dir) = &a.out {
        std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    }

    let sched = Schedule::new(a.schedule, a.lr, a.warmup, a.steps, a.final_lr_frac)?;
    let adam = AdamConsts { beta1: a.beta1, beta2: a.beta2, eps: 1e-8 };
    let mem = sess.graph.buffers.total_bytes();
    let mut logger = log::Logger::new(a, &cfg, num_params, sess.backend.name(), start, n_global, mem, global_b, !lead)?;
    if let Some(h) = &dist_header {
        let auto = if speeds.is_empty() {
            String::new()
        } else {
            format!(" (auto: measured {} tokens/s)", speeds.iter().map(|s| format!("{s:.0}")).collect::<Vec<_>>().join(", "))
        };
        let zero = match &shard {
            Some(r) => format!(
                " | ZeRO-1: this rank's AdamW state covers {} of {num_params} parameters ({:.1} MiB instead of {:.1} MiB)",
                r.len(),
                (r.len() * 8) as f64 / (1u64 << 20) as f64,
                (num_params * 8) as f64 / (1u64 << 20) as f64
            ),
            None => String::new(),
        };
        logger.note(&format!(
            "wgpt: data-parallel: {h} | micro-batch per rank {}{auto}, B={global_b} | gradients summed over ranks (seed 1/{n_global}) {nccl_note}{}{zero}",
            split::join(&split),
            if copy_params { " | ranks on different backends: rank 0's parameters copied after each update" } else { "" }
        ));
    }
    let mut summary = TrainSummary {
        reduce_engine: nccl_note.clone(),
        split: split.clone(),
        backend: sess.backend.name(),
        host_copies: world > 1 && nccl.is_none() && (shard.is_some() || !host_memory),
        ..TrainSummary::default()
    };

    // from here on, Ctrl-C / SIGTERM stop after the current step with a checkpoint (a second one
    // exits at once); before, there is nothing to save and they end the process as usual
    interrupt::install();
    let mut step = start;
    // llm.c's outlier windows; saved in checkpoints (llm.c does not), so a resumed run skips
    // exactly the updates an uninterrupted one skips
    let (mut loss_outliers, mut norm_outliers) = saved_outliers.and_then(|w| w.restore()).unwrap_or_default();
    // the newest checkpoint of this run (the resumed one counts)
    let mut saved_at = resume_step;
    // a stop seen by any rank stops every rank at the same step (SIGTERM's status where this
    // rank saw no signal itself)
    let agreed_stop = |own: Option<i32>| -> Result<Option<i32>> { Ok(if comm::any(comm, own.is_some())? { Some(own.unwrap_or(15)) } else { None }) };
    loop {
        let last = step == a.steps;
        // a Ctrl-C/SIGTERM: no eval or sample, the checkpoint, then stop
        let stop = agreed_stop(interrupt::requested())?;
        if let Some(vl) = val_loader.as_mut().filter(|_| stop.is_none()) {
            if step % a.val_every == 0 || last {
                let loss = evaluate_rows(&mut sess, vl, a.val_batches, comm, row0, my_b)?;
                summary.val_losses.push((step, loss));
                logger.val(step, loss)?;
            }
        }
        if let Some(ex) = eval_set.as_ref().filter(|_| stop.is_none()) {
            if step > 0 && ((a.val_every > 0 && step % a.val_every == 0) || last) {
                let score = evaluate_choices(&mut sess, ex, comm, my_b, a.seq_len)?;
                logger.eval(step, score)?;
            }
        }
        let want_sample = stop.is_none() && a.gen_tokens > 0 && ((a.sample_every > 0 && step > 0 && step % a.sample_every == 0) || last);
        if want_sample && lead {
            let n = a.gen_tokens.min(a.seq_len);
            let text = if a.modes.precision == DType::F32 {
                sample::sample_in_graph(&mut sess, &tokenizer, n, 1337)?
            } else {
                // an f32 decoder on a backend of its own, given the f32 master weights, for the
                // time of the sample
                let mut dec = Session::new(make_backend()?, crate::graph::build_decoder(&cfg, sample::decode_options(&cfg, n)))?;
                dec.upload_params(&sess.download_params()?)?;
                sample::sample_in_graph(&mut dec, &tokenizer, n, 1337)?
            };
            logger.sample(step, &text);
            summary.sample = Some(text);
        }
        // (a signal during the eval or sample above stops here, before the next step)
        let stop = match stop {
            Some(s) => Some(s),
            None => agreed_stop(interrupt::requested())?,
        };
        if let Some(dir) = &a.out {
            let due = (a.checkpoint_every > 0 && step > 0 && step % a.checkpoint_every == 0) || last;
            // stopped by a signal: a checkpoint of the steps taken since the start, if any
            let due = due || (stop.is_some() && step > start);
            if due && saved_at != Some(step) {
                let outliers = state::OutlierWindows::save(&loss_outliers, &norm_outliers);
                let shape = (global_b, grad_accum);
                let zs = shard.as_ref().map(|r| state::ZeroShard { world, start: r.start, end: r.end });
                save_checkpoint(&mut sess, comm, dir, step, a, &train_loader, shape, outliers, zs, scaler.clone())?;
                saved_at = Some(step);
                logger.note(&format!("checkpoint written: {}", state::model_path(dir, step).display()));
                // the curves so far beside the checkpoint; a plot that fails never stops training
                if lead {
                    if let Err(e) = crate::plot::write_loss_png(dir) {
                        logger.note(&format!("warning: {} not drawn: {e}", dir.join("loss.png").display()));
                    }
                }
                if lead {
                    if let Some(old) = state::checkpoint_to_prune(step, a.checkpoint_every, a.keep_checkpoints, a.keep_every) {
                        state::remove_checkpoint(dir, old)?;
                    }
                }
            }
        }
        if let Some(sig) = stop {
            let saved = match (&a.out, saved_at) {
                (Some(dir), Some(s)) => format!("the newest checkpoint is step {s} in {}; continue with --resume", dir.display()),
                (Some(_), None) => "no step was taken, nothing to save".to_string(),
                (None, _) => "nothing saved (no --out)".to_string(),
            };
            logger.note(&format!("wgpt: stopped by {} at step {step}; {saved}", interrupt::name(sig)));
            summary.interrupted = Some(sig);
            break;
        }
        if last {
            break;
        }

        fault_hook(rank, step + 1);
        let t0 = Instant::now();
        if let Some(sc) = &scaler {
            sess.set_loss_scale(sc.scale)?;
        }
        sess.zero_grad()?;
        let mut overlapped = None;
        for micro in 0..grad_accum {
            let (x, y) = train_loader.next_batch()?;
            let (x, y) = if world == 1 { (x, y) } else { rank_rows(&x, &y, row0, my_b, a.seq_len) };
            if overlap && micro + 1 == grad_accum {
                overlapped = Some(train_overlapped(&mut sess, comm, &x, &y)?);
            } else {
                // the micro-steps' losses add up on the device: no host wait until the step's end
                sess.train_micro_async(&x, &y)?;
            }
        }
        // several ranks: sum the gradients (host staging) and the per-position losses
        let mut reduce_ms = None;
        let mut hidden_ms = None;
        let mut global_loss = None;
        // ZeRO-1: the global gradient norm (every rank's range's part), computed on the host
        let mut zero_norm = None;
        if world > 1 {
            sess.backend.sync()?;
            let tr = Instant::now();
            let mut g = if shard.is_some() && nccl.is_none() { sess.download_grads()? } else { Vec::new() };
            let mut before = 0.0;
            match &shard {
                None if nccl.is_some() => comm.watched("ncclAllReduce", &mut || nccl_allreduce(nccl.as_ref().unwrap(), &mut sess))?,
                None if overlapped.is_some() => {
                    let o = overlapped.take().expect("checked");
                    sess.upload_grad_buckets(&o.sums)?;
                    hidden_ms = Some(o.hidden_ms);
                    before = o.busy_ms;
                }
                None => host_allreduce(comm, &mut sess)?,
                Some(r) if nccl.is_some() => {
                    let nc = nccl.as_ref().expect("checked");
                    let ids = sess.graph.io.grads.expect("a training graph");
                    comm.watched("ncclReduce", &mut || nccl_zero(nc, &mut sess, ids, chunk, true))?;
                    // the norm from every rank's range (each rank holds its range's sum; only
                    // that range is read back)
                    let mine = sess.download_grads_range(r.clone())?;
                    let mut sq = [mine.iter().map(|&x| x as f64 * x as f64).sum::<f64>()];
                    comm.allreduce_sum_f64(&mut sq)?;
                    zero_norm = Some(sq[0].sqrt() as f32);
                }
                Some(r) => {
                    g.resize(chunk * world, 0.0);
                    let mine = comm.reduce_scatter_sum_f32(&g)?;
                    let mine = &mine[..r.len()];
                    let mut sq = [mine.iter().map(|&x| x as f64 * x as f64).sum::<f64>()];
                    comm.allreduce_sum_f64(&mut sq)?;
                    zero_norm = Some(sq[0].sqrt() as f32);
                    // AdamW reads this rank's range only; the rest of the gradients is stale
                    g[r.clone()].copy_from_slice(mine);
                    g.truncate(num_params);
                    sess.upload_grads(&g)?;
                }
            }
            let mut l = [sess.loss_sum()?];
            comm.allreduce_sum_f64(&mut l)?;
            global_loss = Some((l[0] / n_global as f64) as f32);
            reduce_ms = Some(before + tr.elapsed().as_secs_f64() * 1e3);
        }
        let lr = sched.lr_at(step);
        // AdamW's t counts the updates applied: a step the loss scaler skipped (its gradients
        // overflowed) does not advance it, as PyTorch's GradScaler skips optimizer.step()
        let adam_t = (step + 1).saturating_sub(scaler.as_ref().map_or(0, |sc| sc.skipped)).max(1);
        let (loss, norm);
        if let Some(zn) = zero_norm {
            loss = global_loss.expect("several ranks");
            norm = zn;
            let (zl, zg) = (loss_outliers.update(loss as f64), norm_outliers.update(norm as f64));
            if outlier::exceeds(zl, a.skip_loss_z) {
                logger.note(&format!("step {}: update skipped (loss z-score {zl:.2} > {})", step + 1, a.skip_loss_z));
            } else if outlier::exceeds(zg, a.skip_grad_z) {
                logger.note(&format!("step {}: update skipped (grad norm z-score {zg:.2} > {})", step + 1, a.skip_grad_z));
            } else {
                sess.update_with_norm(lr, adam, adam_t, norm, a.grad_clip)?;
                // every rank's updated range, to every rank
                let r = shard.clone().expect("ZeRO-1");
                if let Some(nc) = nccl.as_ref() {
                    let ids = sess.graph.io.params;
                    comm.watched("ncclBroadcast", &mut || nccl_zero(nc, &mut sess, ids, chunk, false))?;
                } else {
                    let p = sess.download_params()?;
                    let mut mine = p[r].to_vec();
                    mine.resize(chunk, 0.0);
                    let mut all = comm.allgather_f32(&mine)?;
                    all.truncate(num_params);
                    sess.upload_params(&all)?;
                }
            }
        } else if a.skip_loss_z == 0.0 && a.skip_grad_z == 0.0 {
            norm = sess.update(lr, adam, adam_t)?;
            loss = match global_loss {
                Some(l) => l,
                None => sess.step_loss()?,
            };
        } else {
            // outlier skipping needs the loss and the norm on the host before AdamW runs
            loss = match global_loss {
                Some(l) => l,
                None => sess.step_loss()?,
            };
            norm = sess.grad_norm(lr, adam, adam_t)?;
            let (zl, zg) = (loss_outliers.update(loss as f64), norm_outliers.update(norm as f64));
            // rank 0 decides, so ranks whose norms differ in the last bit still agree
            let mut skip = [if outlier::exceeds(zl, a.skip_loss_z) {
                1u8
            } else if outlier::exceeds(zg, a.skip_grad_z) {
                2
            } else {
                0
            }];
            comm.bcast(&mut skip, 0)?;
            match skip[0] {
                1 => logger.note(&format!("step {}: update skipped (loss z-score {zl:.2} > {})", step + 1, a.skip_loss_z)),
                2 => logger.note(&format!("step {}: update skipped (grad norm z-score {zg:.2} > {})", step + 1, a.skip_grad_z)),
                _ => sess.apply_update()?,
            }
        }
        if sess.found_inf() {
            // the device skipped AdamW (ClipScale found the norm inf/NaN)
            match scaler.as_mut() {
                Some(sc) => {
                    let was = sc.scale;
                    sc.update(true);
                    logger.note(&format!("step {}: update skipped (gradients overflowed at loss scale {}); loss scale now {}", step + 1, was as f64, sc.scale as f64));
                }
                None => logger.note(&format!("step {}: update skipped (gradient norm {norm})", step + 1)),
            }
        } else if let Some(sc) = scaler.as_mut() {
            if sc.update(false) == scaler::ScaleChange::Grew {
                logger.note(&format!("step {}: loss scale now {} after {} clean steps", step + 1, sc.scale as f64, sc.window));
            }
        }
        if copy_params {
            let mut p = if lead { sess.download_params()? } else { vec![0f32; num_params] };
            comm::bcast_f32(comm, &mut p, 0)?;
            if !lead {
                sess.upload_params(&p)?;
            }
        }
        if world > 1 && a.check_sync > 0 && (step + 1) % a.check_sync == 0 {
            check_in_sync(&mut sess, comm, step + 1)?;
        }
        let ms = t0.elapsed().as_secs_f64() * 1e3;
        if !loss.is_finite() {
            return Err(Error::Data(format!("training diverged at step {}: loss is {loss}; try a lower --lr", step + 1)));
        }
        summary.train_losses.push(loss);
        summary.step_ms.push(ms);
        summary.reduce_ms.extend(reduce_ms);
        summary.reduce_hidden_ms.extend(hidden_ms.or(reduce_ms.map(|_| 0.0)));
        logger.step(step + 1, loss, lr, norm, ms, reduce_ms.map(|r| (r, hidden_ms.unwrap_or(0.0))))?;
        step += 1;
        summary.steps_done = step;
    }
    logger.finish(&summary);
    Ok(summary)
}

/// NCCL's communicator for the gradients (shared with a world NCCL joins alone).
type Nc = Arc<Mutex<NcclComm>>;

/// `--reduce`: NCCL for the gradient sum when every rank is CUDA and the library loads (auto),
/// or as asked. Every rank decides the same way (the reasons are gathered). Returns the
/// communicator (None: through host memory) and the header's words for it.
fn nccl_setup(a: &TrainArgs, comm: &dyn Comm, sess: &mut Session, kinds: &[u8]) -> Result<(Option<Nc>, String)> {
    let host = |why: &str| format!("through host memory ({why})");
    let zero = if a.zero == 1 { "; ZeRO-1 by ncclReduce and ncclBroadcast of each rank's range" } else { "" };
    if let Some(nc) = comm.nccl() {
        // NCCL joins the ranks: it sums the gradients too, whatever --reduce says
        return Ok((Some(nc.clone()), format!("by NCCL on the GPUs, fp32 Sum{zero}")));
    }
    if a.reduce == ReduceMode::Host {
        return Ok((None, host("--reduce host")));
    }
    let why_not = kinds.iter().any(|&k| k != BackendKind::Cuda as u8).then(|| "not every rank is on the CUDA backend".to_string());
    let lib = match &why_not {
        Some(_) => None,
        None => match Nccl::load(&crate::dist::env_map()) {
            Ok(l) => Some(l),
            Err(e) if a.reduce == ReduceMode::Nccl => return Err(e),
            Err(_) => None,
        },
    };
    // every rank must agree: NCCL only if every rank loaded it
    let all = comm.allgather(&[lib.is_some() as u8])?;
    if all.iter().any(|&f| f == 0) {
        let cuda = kinds.iter().all(|&k| k == BackendKind::Cuda as u8);
        let why = why_not.unwrap_or_else(|| "no NCCL library on some rank (see --reduce)".into());
        if a.reduce == ReduceMode::Nccl {
            return Err(Error::flag("--reduce", format!("nccl: {why}")));
        }
        // for cpu and wgpu ranks host memory is simply the way; for CUDA ranks, say why
        return Ok((None, if cuda { host(&why) } else { "through host memory".into() }));
    }
    let lib = lib.expect("loaded on every rank");
    let mut id = [0u8; crate::dist::nccl::UNIQUE_ID_BYTES];
    if comm.rank() == 0 {
        id = lib.unique_id()?;
    }
    comm.bcast(&mut id, 0)?;
    // binds this rank's CUDA context to the thread for ncclCommInitRank
    let first = sess.graph.io.grads.expect("a training graph")[0];
    sess.backend.raw_buffer(first)?;
    let nc = lib.init_rank(comm.size(), &id, comm.rank())?;
    let v = lib.version();
    let old = if v.has_avg_and_bf16() { "" } else { "; < 2.10: no Avg or bf16, neither is used" };
    Ok((Some(Arc::new(Mutex::new(nc))), format!("by NCCL {v} ({}) on the GPUs, fp32 Sum{old}{zero}", lib.path())))
}

/// What the last micro-step's overlapped reduce left: every bucket summed over ranks, the
/// reduce thread's busy time, and the part of it before backward ended.
struct Overlapped {
    sums: Vec<Vec<f32>>,
    busy_ms: f64,
    hidden_ms: f64,
}

/// One micro-step with its gradient buckets summed over ranks on a second thread as backward
/// finishes them (`Session::train_micro_overlapped`).
fn train_overlapped(sess: &mut Session, comm: &dyn Comm, x: &[i32], y: &[i32]) -> Result<Overlapped> {
    let (tx, rx) = std::sync::mpsc::channel::<Vec<f32>>();
    std::thread::scope(|s| {
        let reducer = s.spawn(move || -> Result<(Vec<Vec<f32>>, Vec<(Instant, Instant)>)> {
            let mut sums = Vec::new();
            let mut spans = Vec::new();
            for mut bucket in rx {
                let t0 = Instant::now();
                comm.allreduce_sum_f32(&mut bucket)?;
                spans.push((t0, Instant::now()));
                sums.push(bucket);
            }
            Ok((sums, spans))
        });
        let ran =
            sess.train_micro_overlapped(x, y, &mut |_, values| tx.send(values).map_err(|_| Error::Dist("the gradient reduce thread stopped".into())));
        let backward_done = Instant::now();
        drop(tx);
        let joined = reducer.join().unwrap_or_else(|_| Err(Error::Internal("the gradient reduce thread panicked".into())));
        // the micro-step's own error first (the reducer's would only say the channel closed)
        ran?;
        let (sums, spans) = joined?;
        let ms = |d: std::time::Duration| d.as_secs_f64() * 1e3;
        let busy_ms = spans.iter().map(|(a, b)| ms(*b - *a)).sum();
        let hidden_ms = spans.iter().map(|(a, b)| ms((*b).min(backward_done).saturating_duration_since(*a))).sum();
        Ok(Overlapped { sums, busy_ms, hidden_ms })
    })
}

/// The multiple-choice eval over the ranks: rank r scores examples [r·n/N, (r+1)·n/N) in its own
/// micro-batch of `b` rows, and the counts are summed (every rank gets the whole score).
fn evaluate_choices(sess: &mut Session, ex: &[crate::data::evalset::EvalExample], comm: &dyn Comm, b: usize, t: usize) -> Result<hellaswag::EvalScore> {
    let (r, n) = (comm.rank(), comm.size());
    let mine = &ex[r * ex.len() / n..(r + 1) * ex.len() / n];
    let s = hellaswag::evaluate(sess, mine, b, t)?;
    let mut counts = [s.correct as f64, s.total as f64];
    comm.allreduce_sum_f64(&mut counts)?;
    Ok(hellaswag::EvalScore { correct: counts[0] as usize, total: counts[1] as usize })
}

/// Whether the backend's gradient buffers are host memory (the cpu backend).
fn in_host_memory(sess: &mut Session) -> Result<bool> {
    let first = sess.graph.io.grads.expect("a training graph")[0];
    if sess.graph.buffers.get(first).dtype != DType::F32 {
        return Ok(false); // low-precision gradients never meet a collective (one device only)
    }
    Ok(matches!(sess.backend.raw_buffer(first)?, crate::backend::RawBuffer::Host(_)))
}

/// Sum every gradient buffer over the ranks through host memory, one buffer at a time: in place
/// where the backend's buffers are host memory (cpu: no copy at all), else downloaded, summed and
/// uploaded.
fn host_allreduce(comm: &dyn Comm, sess: &mut Session) -> Result<()> {
    for id in sess.graph.io.grads.expect("a training graph") {
        if let crate::backend::RawBuffer::Host(bytes) = sess.backend.raw_buffer(id)? {
            comm.allreduce_sum_f32(bytemuck::cast_slice_mut(bytes))?;
            continue;
        }
        let mut g = sess.backend.download_f32(id)?;
        comm.allreduce_sum_f32(&mut g)?;
        sess.backend.upload_f32(id, &g)?;
    }
    Ok(())
}

/// One NCCL group over the CUDA buffers `ids` (flat in checkpoint order), queued on the stream the
/// backend runs everything on (ordered after backward, before `GradNorm`): `each(comm, first
/// flat element, device pointer, elements, stream)` per buffer; then the device is waited for.
fn nccl_group(
    nc: &Nc,
    sess: &mut Session,
    ids: [crate::graph::BufId; crate::model::NUM_PARAM_TENSORS],
    mut each: impl FnMut(&NcclComm, usize, u64, usize, usize) -> Result<()>,
) -> Result<()> {
    let nc = nc.lock().unwrap_or_else(|e| e.into_inner());
    let mut offset = 0usize;
    nc.group_start()?;
    for id in ids {
        let (ptr, bytes, stream) = match sess.backend.raw_buffer(id)? {
            crate::backend::RawBuffer::Cuda { ptr, bytes, stream } => (ptr, bytes, stream),
            _ => return Err(Error::Internal("NCCL on a backend that is not CUDA".into())),
        };
        each(&nc, offset, ptr, bytes / 4, stream)?;
        offset += bytes / 4;
    }
    nc.group_end()?;
    sess.backend.sync()?;
    nc.async_error()
}

/// Sum every gradient buffer over the ranks in place on the GPUs (ncclAllReduce).
fn nccl_allreduce(nc: &Nc, sess: &mut Session) -> Result<()> {
    let ids = sess.graph.io.grads.expect("a training graph");
    nccl_group(nc, sess, ids, |nc, _, ptr, n, stream| nc.allreduce_sum_f32(ptr, n, stream))
}

/// ZeRO-1 on NCCL: every piece of `ids` (parameters or gradients) that falls in rank r's range
/// [r·chunk, (r+1)·chunk) goes to or from rank r, in place on the GPUs: `reduce` sums the
/// gradients onto their owner (ncclReduce), else the owners' updated parameters reach every rank
/// (ncclBroadcast).
fn nccl_zero(nc: &Nc, sess: &mut Session, ids: [crate::graph::BufId; crate::model::NUM_PARAM_TENSORS], chunk: usize, reduce: bool) -> Result<()> {
    nccl_group(nc, sess, ids, |nc, start, ptr, n, stream| {
        let (mut at, end) = (start, start + n);
        while at < end {
            let owner = at / chunk;
            let stop = ((owner + 1) * chunk).min(end);
            let p = ptr + ((at - start) * 4) as u64;
            if reduce {
                nc.reduce_sum(p, p, stop - at, NcclType::F32, owner, stream)?;
            } else {
                nc.broadcast(p, p, stop - at, NcclType::F32, owner, stream)?;
            }
            at = stop;
        }
        Ok(())
    })
}

/// A test hook for the failure paths of several ranks: `WGPT_FAULT=hang:R:S` makes rank R stop
/// answering (sleep for good) before its step S, as a hung peer does.
fn fault_hook(rank: usize, step: usize) {
    static FAULT: std::sync::OnceLock<Option<(usize, usize)>> = std::sync::OnceLock::new();
    let f = FAULT.get_or_init(|| {
        let v = std::env::var("WGPT_FAULT").ok()?;
        let mut it = v.strip_prefix("hang:")?.split(':').map(|x| x.parse::<usize>().ok());
        Some((it.next()??, it.next()??))
    });
    if *f == Some((rank, step)) {
        loop {
            std::thread::sleep(Duration::from_secs(3600));
        }
    }
}

/// `--check-sync`: every rank's parameter checksum (FNV-1a of the bits) must equal rank 0's.
fn check_in_sync(sess: &mut Session, comm: &dyn Comm, step: usize) -> Result<()> {
    let sums = comm::gather_u64(comm, crate::dist::local::checksum(&sess.download_params()?))?;
    match sums.iter().position(|&c| c != sums[0]) {
        None => Ok(()),
        Some(r) => Err(Error::Dist(format!(
            "data-parallel ranks out of sync after step {step}: rank {r} parameters checksum {:016x}, rank 0 {:016x}",
            sums[r], sums[0]
        ))),
    }
}

/// Mean validation loss over up to `batches` batches from the start of the val split.
pub fn evaluate(sess: &mut Session, loader: &mut DataLoader, batches: usize) -> Result<f32> {
    let b = sess.graph.b;
    evaluate_rows(sess, loader, batches, &Solo, 0, b)
}

/// `evaluate` over ranks: each rank scores its rows `row0..row0+b` of every batch, and the loss
/// sums are added over ranks, so the mean is the one a single device computes.
fn evaluate_rows(sess: &mut Session, loader: &mut DataLoader, batches: usize, comm: &dyn Comm, row0: usize, b: usize) -> Result<f32> {
    loader.reset();
    let t = sess.graph.t;
    let n = batches.min(loader.batches_per_epoch()).max(1);
    let mut sum = 0.0f64;
    for _ in 0..n {
        let (x, y) = loader.next_batch()?;
        if comm.size() == 1 {
            sum += sess.eval(&x, &y)? as f64;
        } else {
            let (x, y) = rank_rows(&x, &y, row0, b, t);
            let losses = sess.eval_losses(&x, &y)?;
            sum += losses.iter().map(|&l| l as f64).sum::<f64>();
        }
    }
    if comm.size() == 1 {
        return Ok((sum / n as f64) as f32);
    }
    let mut s = [sum];
    comm.allreduce_sum_f64(&mut s)?;
    Ok((s[0] / (n * loader.batch_tokens()) as f64) as f32)
}

/// Ok on every rank when every rank's `res` is Ok; else this rank's own error, or one naming
/// the first rank that failed (`what` says at what).
fn all_ok(comm: &dyn Comm, res: Result<()>, what: &str) -> Result<()> {
    if comm.size() == 1 {
        return res;
    }
    let flags = comm.allgather(&[res.is_ok() as u8])?;
    res?;
    match flags.iter().position(|&f| f == 0) {
        None => Ok(()),
        Some(r) => Err(Error::Dist(format!("rank {r} failed {what}"))),
    }
}

/// Write the checkpoint of `step`: the model (rank 0), every rank's state, then `DONE_` (rank 0,
/// once every rank's files are written: what makes it complete). A failed write (disk full,
/// read-only folder) is an error naming the file; the files of this incomplete checkpoint are
/// removed (giving the space back), older checkpoints are untouched. `shape` is (global B,
/// accumulation steps).
#[allow(clippy::too_many_arguments)]
fn save_checkpoint(
    sess: &mut Session,
    comm: &dyn Comm,
    dir: &Path,
    step: usize,
    a: &TrainArgs,
    loader: &DataLoader,
    shape: (usize, usize),
    outliers: state::OutlierWindows,
    zero: Option<state::ZeroShard>,
    loss_scaler: Option<scaler::LossScaler>,
) -> Result<()> {
    let (rank, world) = (comm.rank(), comm.size());
    let lead = rank == 0;
    // a DONE_ marker left by an earlier run in this folder goes first: while its files are
    // overwritten, the checkpoint must not look complete
    let done = state::done_path(dir, step);
    let removed = match std::fs::remove_file(&done) {
        Err(e) if lead && e.kind() != std::io::ErrorKind::NotFound => Err(Error::io(&done, e)),
        _ => Ok(()),
    };
    all_ok(comm, removed, &format!("to remove {}", done.display()))?;
    let (m, v) = sess.download_opt_state()?;
    let num_params = sess.layout.total;
    let st = state::TrainState {
        step,
        m,
        v,
        extra: state::StateExtra {
            loader: loader.state(),
            b: shape.0,
            t: a.seq_len,
            grad_accum: shape.1,
            num_params,
            outliers: Some(outliers),
            zero,
            precision: (a.modes.precision != DType::F32).then(|| a.modes.precision.name().to_string()),
            loss_scaler,
        },
    };
    let own_state = state::rank_state_path(dir, step, rank);
    let mut res = state::write_rank_state(&own_state, &st, a.shuffle != 0, rank, world);
    drop(st);
    if lead && res.is_ok() {
        let params = sess.download_params()?;
        res = write_checkpoint(&state::model_path(dir, step), &sess.graph.cfg, &params, a.checkpoint_precision.into());
    }
    let mut res = all_ok(comm, res, &format!("to write its part of the checkpoint of step {step}"));
    if lead && res.is_ok() {
        res = crate::atomic::write_atomic(&done, b"");
    }
    if res.is_err() {
        let _ = if lead { state::remove_checkpoint(dir, step) } else { std::fs::remove_file(&own_state).map_err(|e| Error::io(&own_state, e)) };
    }
    res
}

/// The shards of `--train`/`--val` (`flag`): the files matching `pattern`, else (flag not given)
/// the bundled Shakespeare shard built into the binary.
pub fn open_loader(pattern: Option<&str>, flag: &str, opts: LoaderOptions) -> Result<DataLoader> {
    match (pattern, flag) {
        (Some(p), _) => DataLoader::new(p, flag, opts),
        (None, "--val") => crate::data::bundled::val_loader(flag, opts),
        (None, _) => crate::data::bundled::train_loader(flag, opts),
    }
}

/// The tokenizer for printing samples: an explicit file; else, with `--train` given,
/// gpt2_tokenizer.bin beside the train shards, else the built-in GPT-2 BPE; without `--train`,
/// the bundled gpt2_tokenizer.bin (the bundled shards' own).
pub fn load_tokenizer(explicit: Option<&Path>, train_glob: Option<&str>) -> Option<Tokenizer> {
    if let Some(p) = explicit {
        return Tokenizer::read(p).map_err(|e| eprintln!("warning: {e}; samples will be printed as token ids")).ok();
    }
    let Some(train_glob) = train_glob else {
        return crate::data::bundled::tokenizer().or_else(|_| Tokenizer::gpt2()).ok();
    };
    let beside = Path::new(train_glob).parent().map(|d| d.join("gpt2_tokenizer.bin"));
    if let Some(p) = beside.filter(|p| p.exists()) {
        if let Ok(t) = Tokenizer::read(&p) {
            return Some(t);
        }
    }
    Tokenizer::gpt2().ok()
}
