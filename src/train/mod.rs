//! `wgpt train`: the training loop — data, schedule, gradient accumulation, clipping, evaluation,
//! sampling, checkpoints, logging. The loop mirrors llm.c's train_gpt2.cu: for step = start..=N,
//! evaluate/sample/checkpoint where due, stop at N, otherwise do one optimiser step.

pub mod hellaswag;
pub mod interrupt;
pub mod log;
pub mod outlier;
pub mod sample;
pub mod schedule;
pub mod session;
pub mod state;

use crate::backend::BackendArgs;
use crate::data::shards::{DataLoader, LoaderOptions};
use crate::data::tokenizer::Tokenizer;
use crate::error::{Error, Result};
use crate::graph::{build_train_step, TrainOptions};
use crate::model::checkpoint::{read_checkpoint, write_checkpoint, Precision};
use crate::model::init::init_params;
use crate::model::{config, Config};
use schedule::{Schedule, ScheduleKind};
use session::{AdamConsts, Session};
use std::path::{Path, PathBuf};
use std::time::Instant;

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
    /// micro-batch size B (sequences per forward/backward)
    #[arg(long, default_value_t = 16)]
    pub batch: usize,
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
}

fn check_args(a: &TrainArgs, cfg: &Config) -> Result<usize> {
    if a.batch == 0 {
        return Err(Error::flag("--batch", "must be at least 1"));
    }
    if a.seq_len == 0 {
        return Err(Error::flag("--seq-len", "must be at least 1"));
    }
    if a.seq_len > cfg.max_t {
        return Err(Error::flag("--seq-len", format!("{} exceeds the model's maximum sequence length {}", a.seq_len, cfg.max_t)));
    }
    let bt = a.batch * a.seq_len;
    let total = if a.total_batch == 0 { bt } else { a.total_batch };
    if total % bt != 0 {
        return Err(Error::flag("--total-batch", format!("{total} is not a multiple of --batch × --seq-len = {bt}")));
    }
    if a.resume && a.out.is_none() {
        return Err(Error::flag("--resume", "needs --out DIR (the directory holding the checkpoints)"));
    }
    if !(a.grad_clip >= 0.0) {
        return Err(Error::flag("--grad-clip", "must be >= 0"));
    }
    Ok(total / bt)
}

/// Run `wgpt train`.
pub fn run(a: &TrainArgs) -> Result<TrainSummary> {
    // several ranks would each train their own copy: refused until data-parallel training exists
    crate::dist::World::from_env()?.refuse_data_parallel()?;
    let resume_step = match (&a.out, a.resume) {
        (Some(dir), true) => {
            let s = state::latest_done(dir);
            if s.is_none() {
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
    let grad_accum = check_args(a, &cfg)?;
    let opts = LoaderOptions { b: a.batch, t: a.seq_len, rank: 0, world: 1, shuffle: a.shuffle != 0, vocab: cfg.v };
    let mut train_loader = open_loader(a.train.as_deref(), "--train", opts.clone())?;
    let mut val_loader = if a.val_every > 0 && a.val_batches > 0 {
        Some(open_loader(a.val.as_deref(), "--val", LoaderOptions { shuffle: false, ..opts.clone() })?)
    } else {
        None
    };
    let tokenizer = load_tokenizer(a.tokenizer.as_deref(), a.train.as_deref());
    let eval_set = match &a.hellaswag {
        Some(p) => {
            let ex = crate::data::evalset::read_eval_file(p)?;
            hellaswag::check_examples(&ex, p, a.batch, a.seq_len, cfg.v)?;
            Some(ex)
        }
        None => None,
    };

    let backend = a.backend.create()?;
    let mut graph = build_train_step(
        &cfg,
        &TrainOptions { b: a.batch, t: a.seq_len, grad_accum, weight_decay: a.weight_decay, decay_all: false, grad_clip: a.grad_clip },
    );
    if a.gen_tokens > 0 {
        crate::graph::add_decoder(&mut graph, sample::decode_options(&cfg, a.gen_tokens.min(a.seq_len)));
    }
    let mut sess = Session::new(backend, graph)?;
    sess.upload_params(&params)?;
    let num_params = params.len();
    drop(params);

    let mut start = 0;
    let mut saved_outliers = None;
    if let (Some(s), Some(dir)) = (resume_step, &a.out) {
        let st = state::read_state(&state::state_path(dir, s), num_params)?;
        if st.step != s {
            return Err(Error::format(
                state::state_path(dir, s),
                format!("says step {}, but it belongs to the checkpoint of step {s}", st.step),
            ));
        }
        if s > a.steps {
            return Err(Error::flag(
                "--steps",
                format!("{} is before the newest checkpoint in {} (step {s}); give at least --steps {s}", a.steps, dir.display()),
            ));
        }
        if (st.extra.b, st.extra.t, st.extra.grad_accum) != (a.batch, a.seq_len, grad_accum) {
            return Err(Error::flag(
                "--resume",
                format!(
                    "checkpoint was made with --batch {} --seq-len {} and {} accumulation steps; use the same shape",
                    st.extra.b, st.extra.t, st.extra.grad_accum
                ),
            ));
        }
        sess.upload_opt_state(&st.m, &st.v)?;
        train_loader.restore(&st.extra.loader)?;
        start = st.step;
        saved_outliers = st.extra.outliers;
    }
    if let Some(dir) = &a.out {
        std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    }

    let sched = Schedule::new(a.schedule, a.lr, a.warmup, a.steps, a.final_lr_frac)?;
    let adam = AdamConsts { beta1: a.beta1, beta2: a.beta2, eps: 1e-8 };
    let tokens_per_step = a.batch * a.seq_len * grad_accum;
    let mem = sess.graph.buffers.total_bytes();
    let mut logger = log::Logger::new(a, &cfg, num_params, sess.backend.name(), start, tokens_per_step, mem)?;
    let mut summary = TrainSummary::default();

    // from here on, Ctrl-C / SIGTERM stop after the current step with a checkpoint (a second one
    // exits at once); before, there is nothing to save and they end the process as usual
    interrupt::install();
    let mut step = start;
    // llm.c's outlier windows; saved in checkpoints (llm.c does not), so a resumed run skips
    // exactly the updates an uninterrupted one skips
    let (mut loss_outliers, mut norm_outliers) = saved_outliers.and_then(|w| w.restore()).unwrap_or_default();
    // the newest checkpoint of this run (the resumed one counts)
    let mut saved_at = resume_step;
    loop {
        let last = step == a.steps;
        // a Ctrl-C/SIGTERM: no eval or sample, the checkpoint, then stop
        let stop = interrupt::requested();
        if let Some(vl) = val_loader.as_mut().filter(|_| stop.is_none()) {
            if step % a.val_every == 0 || last {
                let loss = evaluate(&mut sess, vl, a.val_batches)?;
                summary.val_losses.push((step, loss));
                logger.val(step, loss)?;
            }
        }
        if let Some(ex) = eval_set.as_ref().filter(|_| stop.is_none()) {
            if step > 0 && ((a.val_every > 0 && step % a.val_every == 0) || last) {
                let score = hellaswag::evaluate(&mut sess, ex, a.batch, a.seq_len)?;
                logger.eval(step, score)?;
            }
        }
        let want_sample = stop.is_none() && a.gen_tokens > 0 && ((a.sample_every > 0 && step > 0 && step % a.sample_every == 0) || last);
        if want_sample {
            let text = sample::sample_in_graph(&mut sess, &tokenizer, a.gen_tokens.min(a.seq_len), 1337)?;
            logger.sample(step, &text);
            summary.sample = Some(text);
        }
        // (a signal during the eval or sample above stops here, before the next step)
        let stop = stop.or_else(interrupt::requested);
        if let Some(dir) = &a.out {
            let due = (a.checkpoint_every > 0 && step > 0 && step % a.checkpoint_every == 0) || last;
            // stopped by a signal: a checkpoint of the steps taken since the start, if any
            let due = due || (stop.is_some() && step > start);
            if due && saved_at != Some(step) {
                let outliers = state::OutlierWindows::save(&loss_outliers, &norm_outliers);
                save_checkpoint(&mut sess, dir, step, a, &train_loader, grad_accum, outliers)?;
                saved_at = Some(step);
                logger.note(&format!("checkpoint written: {}", state::model_path(dir, step).display()));
                if let Some(old) = state::checkpoint_to_prune(step, a.checkpoint_every, a.keep_checkpoints, a.keep_every) {
                    state::remove_checkpoint(dir, old)?;
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

        let t0 = Instant::now();
        sess.zero_grad()?;
        for _ in 0..grad_accum {
            let (x, y) = train_loader.next_batch()?;
            // the micro-steps' losses add up on the device: no host wait until the step's end
            sess.train_micro_async(&x, &y)?;
        }
        let lr = sched.lr_at(step);
        let (loss, norm);
        if a.skip_loss_z == 0.0 && a.skip_grad_z == 0.0 {
            norm = sess.update(lr, adam, step + 1)?;
            loss = sess.step_loss()?;
        } else {
            // outlier skipping needs the loss and the norm on the host before AdamW runs
            loss = sess.step_loss()?;
            norm = sess.grad_norm(lr, adam, step + 1)?;
            let (zl, zg) = (loss_outliers.update(loss as f64), norm_outliers.update(norm as f64));
            if outlier::exceeds(zl, a.skip_loss_z) {
                logger.note(&format!("step {}: update skipped (loss z-score {zl:.2} > {})", step + 1, a.skip_loss_z));
            } else if outlier::exceeds(zg, a.skip_grad_z) {
                logger.note(&format!("step {}: update skipped (grad norm z-score {zg:.2} > {})", step + 1, a.skip_grad_z));
            } else {
                sess.apply_update()?;
            }
        }
        let ms = t0.elapsed().as_secs_f64() * 1e3;
        if !loss.is_finite() {
            return Err(Error::Data(format!("training diverged at step {}: loss is {loss}; try a lower --lr", step + 1)));
        }
        summary.train_losses.push(loss);
        logger.step(step + 1, loss, lr, norm, ms)?;
        step += 1;
        summary.steps_done = step;
    }
    logger.finish(&summary);
    Ok(summary)
}

/// Mean validation loss over up to `batches` batches from the start of the val split.
pub fn evaluate(sess: &mut Session, loader: &mut DataLoader, batches: usize) -> Result<f32> {
    loader.reset();
    let n = batches.min(loader.batches_per_epoch()).max(1);
    let mut sum = 0.0f64;
    for _ in 0..n {
        let (x, y) = loader.next_batch()?;
        sum += sess.eval(&x, &y)? as f64;
    }
    Ok((sum / n as f64) as f32)
}

/// Write the checkpoint of `step`: model, state, then `DONE_` (what makes it complete). A failed
/// write (disk full, read-only folder) is an error naming the file; the files of this incomplete
/// checkpoint are removed (giving the space back), older checkpoints are untouched.
fn save_checkpoint(
    sess: &mut Session,
    dir: &Path,
    step: usize,
    a: &TrainArgs,
    loader: &DataLoader,
    grad_accum: usize,
    outliers: state::OutlierWindows,
) -> Result<()> {
    let params = sess.download_params()?;
    let (m, v) = sess.download_opt_state()?;
    let st = state::TrainState {
        step,
        m,
        v,
        extra: state::StateExtra {
            loader: loader.state(),
            b: a.batch,
            t: a.seq_len,
            grad_accum,
            num_params: params.len(),
            outliers: Some(outliers),
        },
    };
    // a DONE_ marker left by an earlier run in this folder goes first: while its files are
    // overwritten, the checkpoint must not look complete
    let done = state::done_path(dir, step);
    let res = match std::fs::remove_file(&done) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(Error::io(&done, e)),
        _ => write_checkpoint(&state::model_path(dir, step), &sess.graph.cfg, &params, a.checkpoint_precision.into())
            .and_then(|()| state::write_state(&state::state_path(dir, step), &st, a.shuffle != 0))
            .and_then(|()| crate::atomic::write_atomic(&done, b"")),
    };
    if res.is_err() {
        let _ = state::remove_checkpoint(dir, step);
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
