//! The `wgpt` command line.

use clap::{CommandFactory, Parser, Subcommand};
use std::path::PathBuf;
use std::process::ExitCode;
use wgpt::backend::BackendArgs;
use wgpt::bench::{BenchArgs, BenchKernel};
use wgpt::error::{Error, Result};
use wgpt::train::TrainArgs;
use wgpt::verify::VerifyArgs;

#[derive(Parser)]
#[command(name = "wgpt", version, propagate_version = true, about = "GPT-2 training on any GPU (wgpu), on CUDA, or on the CPU; llm.c-compatible files")]
struct Cli {
    #[command(subcommand)]
    cmd: Option<Cmd>,
}

#[derive(Subcommand)]
enum Cmd {
    /// Train a GPT-2 (with no flags: a small model on the bundled Shakespeare, ~3 min on 2 CPU cores)
    Train(TrainArgs),
    /// Generate text from a checkpoint
    Sample(SampleArgs),
    /// Check a backend against an llm.c debug state (the port of llm.c's test_gpt2)
    Verify(VerifyArgs),
    /// Encode text files with the GPT-2 BPE into llm.c token shards
    Prepare(PrepareArgs),
    /// Multiple-choice accuracy of a checkpoint on an llm.c eval file (HellaSwag)
    Eval(EvalArgs),
    /// Time training steps or a kernel
    Bench(BenchArgs),
    /// Plan a training step before running it: device memory by role (--memory SIZE: does it
    /// fit), and with --roofline DEVICE the least step time that device's peaks allow
    Plan(wgpt::plan::PlanArgs),
    /// Draw train and val loss against step (or tokens) for one or several runs into a PNG
    /// (inputs: --log-json files, main.log files, --out directories)
    Plot(wgpt::plot::PlotArgs),
    /// List the backends and devices available here, and why an absent one is absent
    Info,
    /// Compile the CUDA kernels with NVRTC for the given architectures (no GPU needed)
    Kernels(KernelsArgs),
    /// Serve a model over HTTP with the OpenAI completions API (/v1/completions, /v1/models, /health)
    Serve(wgpt::serve::ServeArgs),
    /// Convert between Hugging Face GPT-2 (folder or model.safetensors) and llm.c checkpoints
    Convert(ConvertArgs),
    /// Print a shell completion script (bash, zsh, fish, elvish, powershell)
    Completions(CompletionsArgs),
    /// Print the man page (roff), or write one per command with --out
    Man(ManArgs),
    /// Check MPI's collectives (under mpirun: each rank prints "ok rank R of N (library)")
    #[command(hide = true)]
    MpiSelftest,
    /// Pass rank 0's NCCL id to every rank through --dist-init (each prints its hash); with
    /// --join, also join on the GPU and check every collective
    #[command(hide = true)]
    NcclSelftest(NcclSelftestArgs),
}

#[derive(clap::Args)]
struct NcclSelftestArgs {
    /// fs:DIR or tcp[:HOST:PORT]
    #[arg(long, value_parser = wgpt::dist::rendezvous::DistInit::parse)]
    dist_init: wgpt::dist::rendezvous::DistInit,
    /// seconds any wait may take
    #[arg(long, default_value_t = 60)]
    dist_timeout: u64,
    /// also join on the GPU (--device) and check every collective
    #[arg(long)]
    join: bool,
    /// CUDA device for --join
    #[arg(long, default_value_t = 0)]
    device: usize,
}

#[derive(clap::Args)]
#[command(after_help = "Install it where the shell looks, e.g.:
  bash: wgpt completions bash > ~/.local/share/bash-completion/completions/wgpt
  zsh:  wgpt completions zsh > ~/.zfunc/_wgpt   (with fpath+=~/.zfunc before compinit in ~/.zshrc)
  fish: wgpt completions fish > ~/.config/fish/completions/wgpt.fish")]
struct CompletionsArgs {
    /// the shell to complete in
    #[arg(value_enum)]
    shell: clap_complete::Shell,
}

#[derive(clap::Args)]
#[command(after_help = "Read it with `wgpt man | man -l -`; `wgpt man --out DIR` writes wgpt.1 and wgpt-COMMAND.1 for \
every command (e.g. into ~/.local/share/man/man1).")]
struct ManArgs {
    /// the page of one command (e.g. train) instead of wgpt's own [default: wgpt's page]
    command: Option<String>,
    /// write every page (wgpt.1, wgpt-train.1, ...) into this directory instead of printing one
    #[arg(long, conflicts_with = "command")]
    out: Option<PathBuf>,
}

#[derive(clap::Args)]
#[command(after_help = "Generation runs the model's KV-cache decode phases: the prompt is prefilled once, then each new \
token costs one decode step. Tokens are printed as they come (--json: one JSON line at the end).")]
struct SampleArgs {
    /// model: an llm.c checkpoint (.bin), or a Hugging Face GPT-2 folder or model.safetensors
    #[arg(long)]
    model: PathBuf,
    /// text to continue (default: start from <|endoftext|>)
    #[arg(long, default_value = "")]
    prompt: String,
    /// tokens to generate at most (max tokens)
    #[arg(long, default_value_t = 64)]
    tokens: usize,
    /// softmax temperature (0 = greedy)
    #[arg(long, default_value_t = 1.0)]
    temperature: f32,
    /// keep only the K most likely tokens (0 = all)
    #[arg(long, default_value_t = 0)]
    top_k: usize,
    /// nucleus sampling: keep the most likely tokens up to this total probability (1 = all)
    #[arg(long, default_value_t = 1.0)]
    top_p: f32,
    /// sampler seed (the same seed gives the same text on the same backend)
    #[arg(long, default_value_t = 1337)]
    seed: u64,
    /// stop before this text (repeatable)
    #[arg(long)]
    stop: Vec<String>,
    /// keep going after <|endoftext|> instead of stopping there
    #[arg(long)]
    ignore_eos: bool,
    /// context (KV-cache length) [default: min(maxT, prompt + tokens)]
    #[arg(long)]
    seq_len: Option<usize>,
    /// print one JSON line {prompt_token_ids, token_ids, text, finish_reason} instead of streaming
    #[arg(long)]
    json: bool,
    /// weight storage: f16 halves the memory and the bytes read per token (f32 accumulation);
    /// where the backend has no f16 it says so and uses f32
    #[arg(long, value_enum, default_value_t = wgpt::infer::WeightDtype::F32)]
    dtype: wgpt::infer::WeightDtype,
    /// tokenizer file (default: the built-in GPT-2 BPE)
    #[arg(long)]
    tokenizer: Option<PathBuf>,
    #[command(flatten)]
    backend: BackendArgs,
}

#[derive(clap::Args)]
struct EvalArgs {
    /// model: an llm.c checkpoint (.bin), or a Hugging Face GPT-2 folder or model.safetensors
    #[arg(long)]
    model: PathBuf,
    /// llm.c eval file, e.g. hellaswag_val.bin made by llm.c's dev/data/hellaswag.py
    #[arg(long)]
    data: PathBuf,
    /// rows per forward pass (4 per example, so B/4 examples at a time)
    #[arg(long, default_value_t = 16)]
    batch: usize,
    /// positions per row (default: the longest example)
    #[arg(long)]
    seq_len: Option<usize>,
    /// also print the result as one JSON line
    #[arg(long)]
    json: bool,
    #[command(flatten)]
    backend: BackendArgs,
}

#[derive(clap::Args)]
struct PrepareArgs {
    /// text files (UTF-8); documents are separated by blank lines
    #[arg(required = true)]
    text: Vec<PathBuf>,
    /// output directory for <name>_train.bin, <name>_val.bin and gpt2_tokenizer.bin
    #[arg(long)]
    out: PathBuf,
    /// tokens in the validation shard (the first ones, like llm.c's tinyshakespeare.py)
    #[arg(long, default_value_t = 32768)]
    val_tokens: usize,
}

#[derive(clap::Args)]
#[command(after_help = "The direction follows from IN: a Hugging Face folder (config.json + model.safetensors) or a \
model.safetensors file (config.json beside it) gives an llm.c checkpoint OUT; an llm.c checkpoint gives a Hugging Face \
folder OUT (created if missing) that transformers' GPT2LMHeadModel.from_pretrained loads.")]
struct ConvertArgs {
    /// a Hugging Face GPT-2 folder or model.safetensors, or an llm.c checkpoint (.bin, version 3 or 5)
    input: PathBuf,
    /// the llm.c checkpoint to write (from Hugging Face), or the Hugging Face folder to write (from llm.c)
    output: PathBuf,
    /// precision of a written llm.c checkpoint: f32 (llm.c version 3) or bf16 (version 5); Hugging Face output is always F32
    #[arg(long, value_enum, default_value_t = wgpt::train::CkptPrecision::F32)]
    checkpoint_precision: wgpt::train::CkptPrecision,
}

#[derive(clap::Args)]
struct KernelsArgs {
    /// compile the CUDA kernels
    #[arg(long)]
    cuda: bool,
    /// comma-separated architectures
    #[arg(long, default_value = "sm_70,sm_80,sm_90", value_delimiter = ',')]
    arch: Vec<String>,
}

fn main() -> ExitCode {
    // environment settings for the drivers, before any thread exists (never changed later)
    wgpt::backend::wgpu::init_process_env();
    std::panic::set_hook(Box::new(|info| {
        eprintln!("wgpt: internal error: {info}");
    }));
    let cli = Cli::parse();
    match run(cli) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> Result<ExitCode> {
    let cmd = cli.cmd.unwrap_or_else(|| {
        eprintln!("wgpt: no command given; running `wgpt train` with its defaults (see `wgpt --help`)");
        Cmd::Train(TrainArgs::parse_from_defaults())
    });
    match cmd {
        Cmd::Train(a) => match wgpt::train::run(&a)?.interrupted {
            // stopped by Ctrl-C/SIGTERM after its checkpoint: 130/143, as the shell expects
            Some(sig) => Ok(ExitCode::from(wgpt::train::interrupt::exit_status(sig) as u8)),
            None => Ok(ExitCode::SUCCESS),
        },
        Cmd::Sample(a) => sample(&a),
        Cmd::Serve(a) => wgpt::serve::run(&a).map(|()| ExitCode::SUCCESS),
        Cmd::Eval(a) => eval(&a),
        Cmd::Verify(mut a) => {
            if a.expected.is_none() {
                let beside = a.state.with_file_name("expected.json");
                if beside.exists() {
                    a.expected = Some(beside);
                }
            }
            let r = wgpt::verify::run(&a)?;
            wgpt::verify::print(&r);
            if a.json {
                println!("{}", serde_json::to_string(&r).unwrap());
            }
            Ok(if r.ok { ExitCode::SUCCESS } else { ExitCode::FAILURE })
        }
        Cmd::Prepare(a) => {
            let s = wgpt::data::prepare::prepare(&a.text, &a.out, a.val_tokens)?;
            println!("train: {} ({} tokens)", s.train_path.display(), s.train_tokens);
            println!("val:   {} ({} tokens)", s.val_path.display(), s.val_tokens);
            println!("tokenizer: {}", s.tokenizer_path.display());
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Plan(a) => {
            let p = wgpt::plan::plan(&a)?;
            wgpt::plan::print(&p);
            if a.json {
                println!("{}", serde_json::to_string(&p).unwrap());
            }
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Plot(a) => {
            let s = wgpt::plot::plot(&a)?;
            let runs: Vec<String> = s.runs.iter().map(|(l, t, v)| format!("{l} ({t} train, {v} val points)")).collect();
            println!("wrote {}: {}", s.out.display(), runs.join(", "));
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Bench(a) => {
            match a.kernel {
                BenchKernel::Step if a.profile => {
                    let r = wgpt::profile::run(&a)?;
                    wgpt::profile::print(&r);
                    if a.json {
                        println!("{}", serde_json::to_string(&r).unwrap());
                    }
                }
                BenchKernel::Step if a.decode => {
                    let r = wgpt::bench::run_decode(&a)?;
                    println!(
                        "{} | {} {} weights, batch={} prompt={} | prefill {:.0} tokens/s | decode {:.1} tokens/s | {:.1} ms/token at position 16, \
{:.1} at {} | a full forward at T=256 (no cache): {:.1} ms/token | weights read at {:.1} GB/s",
                        r.backend, r.model, r.dtype, r.batch, r.prompt_len, r.prefill_tokens_per_s, r.decode_tokens_per_s, r.ms_per_token_pos16,
                        r.ms_per_token_pos1000, r.long_pos, r.recompute_ms_per_token_t256, r.weight_gb_per_s
                    );
                    if a.json {
                        println!("{}", serde_json::to_string(&r).unwrap());
                    }
                }
                BenchKernel::Step if wgpt::bench::is_data_parallel(&a)? => {
                    if let Some(r) = wgpt::bench::run_data_parallel(&a)? {
                        println!(
                            "{} x{} ranks (micro-batches {}) | {} B={} T={} | {:.1} ms/step | {:.0} tokens/s | reduce {:.1} ms/step ({:.0} hidden behind backward), {:.1} MB per rank, gradients summed {}",
                            r.backend,
                            r.ranks,
                            wgpt::dist::split::join(&r.split),
                            r.model,
                            r.batch,
                            r.seq_len,
                            r.ms_per_step,
                            r.tokens_per_s,
                            r.reduce_ms,
                            r.reduce_hidden_ms,
                            r.reduce_bytes_per_rank as f64 / 1e6,
                            r.engine
                        );
                        if a.json {
                            println!("{}", serde_json::to_string(&r).unwrap());
                        }
                    }
                }
                BenchKernel::Step => {
                    let r = wgpt::bench::run_step(&a)?;
                    println!(
                        "{} | {} {} B={} T={} | {:.1} ms/step (median of {}) | {:.0} tokens/s | {:.2} TFLOP/s | {:.3} GiB of device buffers",
                        r.backend,
                        r.precision,
                        r.model,
                        r.batch,
                        r.seq_len,
                        r.ms_per_step,
                        r.ms_all.len(),
                        r.tokens_per_s,
                        r.tflops,
                        r.device_bytes as f64 / (1u64 << 30) as f64
                    );
                    if a.json {
                        println!("{}", serde_json::to_string(&r).unwrap());
                    }
                }
                BenchKernel::Matmul => {
                    let r = wgpt::bench::run_matmul(&a)?;
                    println!("{} | matmul {}x{}x{} | {:.3} ms | {:.1} GFLOP/s", r.backend, a.m, a.k, a.n, r.ms, r.gflops);
                    if a.json {
                        println!("{}", serde_json::to_string(&r).unwrap());
                    }
                }
            }
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Info => {
            print!("{}", wgpt::info::report());
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Kernels(a) => {
            if !a.cuda {
                return Err(Error::flag("--cuda", "say which kernels to compile (only --cuda exists)"));
            }
            wgpt::info::compile_cuda(&a.arch)?;
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Completions(a) => {
            let mut script = Vec::new();
            clap_complete::generate(a.shell, &mut Cli::command(), "wgpt", &mut script);
            print_bytes(&script)
        }
        Cmd::Man(a) => man(&a),
        Cmd::Convert(a) => {
            let r = wgpt::model::hf::convert(&a.input, &a.output, a.checkpoint_precision.into())?;
            for w in &r.warnings {
                eprintln!("warning: {w}");
            }
            println!("converted {} ({} parameters)", r.summary, r.params);
            Ok(ExitCode::SUCCESS)
        }
        Cmd::MpiSelftest => {
            println!("{}", wgpt::dist::mpi::self_test()?);
            Ok(ExitCode::SUCCESS)
        }
        Cmd::NcclSelftest(a) => {
            let t = std::time::Duration::from_secs(a.dist_timeout.max(1));
            println!("{}", wgpt::dist::nccl_world::self_test(&a.dist_init, t, a.join, a.device)?);
            Ok(ExitCode::SUCCESS)
        }
    }
}

/// Write to stdout; a closed pipe (`wgpt man | head`) is not an error.
fn print_bytes(bytes: &[u8]) -> Result<ExitCode> {
    use std::io::Write;
    let mut out = std::io::stdout().lock();
    match out.write_all(bytes).and_then(|()| out.flush()) {
        Err(e) if e.kind() != std::io::ErrorKind::BrokenPipe => Err(Error::io("stdout", e)),
        _ => Ok(ExitCode::SUCCESS),
    }
}

/// `wgpt man [COMMAND] [--out DIR]`.
fn man(a: &ManArgs) -> Result<ExitCode> {
    let mut cmd = Cli::command().disable_help_subcommand(true);
    cmd.build();
    if let Some(dir) = &a.out {
        std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
        clap_mangen::generate_to(cmd, dir).map_err(|e| Error::io(dir, e))?;
        println!("man pages written to {}", dir.display());
        return Ok(ExitCode::SUCCESS);
    }
    let page = match &a.command {
        None => cmd,
        Some(name) => match cmd.find_subcommand(name) {
            Some(sub) => sub.clone(),
            None => {
                let names: Vec<&str> = cmd.get_subcommands().map(|s| s.get_name()).collect();
                return Err(Error::flag("man", format!("no command '{name}' (commands: {})", names.join(", "))));
            }
        },
    };
    let mut roff = Vec::new();
    clap_mangen::Man::new(page).render(&mut roff).map_err(|e| Error::io("stdout", e))?;
    print_bytes(&roff)
}

trait ParseDefaults {
    fn parse_from_defaults() -> Self;
}
impl ParseDefaults for TrainArgs {
    fn parse_from_defaults() -> Self {
        #[derive(Parser)]
        struct W {
            #[command(flatten)]
            a: TrainArgs,
        }
        W::parse_from(["wgpt"]).a
    }
}

fn eval(a: &EvalArgs) -> Result<ExitCode> {
    use wgpt::train::{hellaswag, session::Session};
    let (cfg, params) = wgpt::model::hf::load_model(&a.model)?;
    let examples = wgpt::data::evalset::read_eval_file(&a.data)?;
    let longest = examples.iter().map(|e| e.longest_row()).max().unwrap_or(1);
    let t = a.seq_len.unwrap_or(longest);
    if t == 0 || t > cfg.max_t {
        return Err(Error::flag("--seq-len", format!("{t} is outside 1..={} (the model's context)", cfg.max_t)));
    }
    hellaswag::check_examples(&examples, &a.data, a.batch, t, cfg.v)?;
    let backend = a.backend.create()?;
    let mut sess = Session::new(backend, wgpt::graph::build_forward(&cfg, a.batch, t))?;
    sess.upload_params(&params)?;
    let t0 = std::time::Instant::now();
    let score = hellaswag::evaluate(&mut sess, &examples, a.batch, t)?;
    println!(
        "{}: {}/{} correct, accuracy {:.4} ({:.1} s on {})",
        a.data.display(),
        score.correct,
        score.total,
        score.accuracy(),
        t0.elapsed().as_secs_f64(),
        sess.backend.name()
    );
    if a.json {
        println!("{}", serde_json::json!({ "correct": score.correct, "total": score.total, "accuracy": score.accuracy() }));
    }
    Ok(ExitCode::SUCCESS)
}

fn sample(a: &SampleArgs) -> Result<ExitCode> {
    use std::io::Write;
    use wgpt::data::tokenizer::Tokenizer;
    use wgpt::infer::{engine, Engine, GenRequest, SamplingParams};
    let (cfg, params) = wgpt::model::hf::load_model(&a.model)?;
    let tok = match &a.tokenizer {
        Some(p) => Tokenizer::read(p)?,
        None => Tokenizer::gpt2()?,
    };
    let mut prompt = if a.prompt.is_empty() { vec![] } else { tok.encode(&a.prompt) };
    if let Some(&bad) = prompt.iter().find(|&&id| id as usize >= cfg.v) {
        return Err(Error::flag("--prompt", format!("token id {bad} is outside the model's vocabulary of {}", cfg.v)));
    }
    if prompt.is_empty() {
        prompt.push(tok.eot().min(cfg.v as u32 - 1));
    }
    if a.temperature < 0.0 || !a.temperature.is_finite() {
        return Err(Error::flag("--temperature", format!("{} must be 0 (greedy) or positive", a.temperature)));
    }
    if !(a.top_p > 0.0 && a.top_p <= 1.0) {
        return Err(Error::flag("--top-p", format!("{} must be in (0, 1]", a.top_p)));
    }
    let want = prompt.len() + a.tokens;
    let t = a.seq_len.unwrap_or(want.min(cfg.max_t));
    if t == 0 || t > cfg.max_t {
        return Err(Error::flag("--seq-len", format!("must be in 1..={}", cfg.max_t)));
    }
    if want > t {
        return Err(Error::flag(
            "--tokens",
            format!("{} prompt tokens + {} new tokens exceed the context of {t} (--seq-len, at most the model's {})", prompt.len(), a.tokens, cfg.max_t),
        ));
    }
    let backend = a.backend.create()?;
    let opts = wgpt::graph::DecodeOptions { slots: 1, max_t: t, prefill_rows: t.min(64) };
    let weights = wgpt::infer::weight_dtype(backend.as_ref(), a.dtype);
    let mut sess = wgpt::train::session::Session::new(backend, wgpt::graph::build_decoder_with(&cfg, opts, weights))?;
    sess.upload_params(&params)?;
    let mut eng = Engine::new(sess, Some(tok))?;
    let sampling = SamplingParams { temperature: a.temperature, top_k: a.top_k, top_p: a.top_p, seed: a.seed };
    let req = GenRequest { prompt: prompt.clone(), max_tokens: a.tokens, sampling, stop: a.stop.clone(), stop_at_eot: !a.ignore_eos, logprobs: None };
    let mut out = std::io::stdout().lock();
    if !a.json {
        let _ = write!(out, "{}", a.prompt);
        let _ = out.flush();
    }
    let mut streamed = 0;
    let (ids, text, reason) = engine::generate(&mut eng, req, |t| {
        if !a.json && !t.text.is_empty() {
            streamed += t.text.len();
            let _ = write!(out, "{}", t.text);
            let _ = out.flush();
        }
    })?;
    if a.json {
        let j = serde_json::json!({ "prompt_token_ids": prompt, "token_ids": ids, "text": text, "finish_reason": reason.as_str() });
        let _ = writeln!(out, "{j}");
    } else {
        // the text held back (a possible stop string, a partial UTF-8 character) comes at the end
        let _ = writeln!(out, "{}", &text[streamed..]);
    }
    Ok(ExitCode::SUCCESS)
}
