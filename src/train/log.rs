//! Training output: a progress bar on a terminal (indicatif) or plain lines otherwise, llm.c's
//! `main.log` in `--out`, and `--log-json` (one JSON object per line).

use super::{TrainArgs, TrainSummary};
use crate::error::{Error, Result};
use crate::model::Config;
use indicatif::{ProgressBar, ProgressStyle};
use std::fs::{File, OpenOptions};
use std::io::{IsTerminal, Write};
use std::path::PathBuf;

pub struct Logger {
    bar: Option<ProgressBar>,
    main_log: Option<(PathBuf, File)>,
    json: Option<(PathBuf, File)>,
    total_steps: usize,
    tokens_per_step: usize,
    last_val: Option<f32>,
    quiet: bool,
}

fn open_append(path: &PathBuf, truncate: bool) -> Result<File> {
    let mut o = OpenOptions::new();
    o.create(true);
    if truncate {
        o.write(true).truncate(true);
    } else {
        o.append(true);
    }
    o.open(path).map_err(|e| Error::io(path, e))
}

impl Logger {
    /// `mem_bytes`: the device memory the step's buffers take (printed in the header line); `b`:
    /// the global micro-batch. A `quiet` logger (ranks other than 0) prints and writes nothing.
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        a: &TrainArgs,
        cfg: &Config,
        num_params: usize,
        backend: String,
        start: usize,
        tokens_per_step: usize,
        mem_bytes: usize,
        b: usize,
        quiet: bool,
    ) -> Result<Logger> {
        if quiet {
            return Ok(Logger { bar: None, main_log: None, json: None, total_steps: a.steps, tokens_per_step, last_val: None, quiet });
        }
        let resuming = start > 0;
        eprintln!(
            "wgpt: model L={} NH={} C={} V={} ({:.1}M parameters) | backend {backend} | B={} T={} tokens/step={} | {:.2} GiB of buffers | {} steps{}",
            cfg.l,
            cfg.nh,
            cfg.c,
            cfg.v,
            num_params as f64 / 1e6,
            b,
            a.seq_len,
            tokens_per_step,
            mem_bytes as f64 / (1u64 << 30) as f64,
            a.steps,
            if resuming { format!(" (resuming at step {start})") } else { String::new() }
        );
        let main_log = match &a.out {
            Some(dir) => {
                std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
                let p = dir.join("main.log");
                let f = open_append(&p, !resuming)?;
                Some((p, f))
            }
            None => None,
        };
        let json = match &a.log_json {
            Some(p) => Some((p.clone(), open_append(p, !resuming)?)),
            None => None,
        };
        let bar = if std::io::stderr().is_terminal() {
            let b = ProgressBar::new(a.steps as u64);
            b.set_style(
                ProgressStyle::with_template("{bar:30} {pos}/{len} | {msg} | ETA {eta}")
                    .unwrap_or_else(|_| ProgressStyle::default_bar()),
            );
            b.set_position(start as u64);
            Some(b)
        } else {
            None
        };
        Ok(Logger { bar, main_log, json, total_steps: a.steps, tokens_per_step, last_val: None, quiet })
    }

    fn line(&self, s: &str) {
        if self.quiet {
            return;
        }
        match &self.bar {
            Some(b) => b.println(s),
            None => eprintln!("{s}"),
        }
    }

    pub fn note(&self, s: &str) {
        self.line(s);
    }

    fn write_log(&mut self, s: &str) -> Result<()> {
        if let Some((p, f)) = &mut self.main_log {
            writeln!(f, "{s}").map_err(|e| Error::io(p.clone(), e))?;
        }
        Ok(())
    }

    fn write_json(&mut self, v: serde_json::Value) -> Result<()> {
        if let Some((p, f)) = &mut self.json {
            writeln!(f, "{v}").map_err(|e| Error::io(p.clone(), e))?;
        }
        Ok(())
    }

    pub fn val(&mut self, step: usize, loss: f32) -> Result<()> {
        self.line(&format!("step {step:5}/{} | val loss {loss:.4}", self.total_steps));
        self.last_val = Some(loss);
        self.write_log(&format!("s:{step} tel:{loss:.4}"))?;
        self.write_json(serde_json::json!({ "step": step, "val_loss": loss }))
    }

    /// A multiple-choice eval result (llm.c's HellaSwag line `s:%d eval:%.4f` in main.log).
    pub fn eval(&mut self, step: usize, score: crate::train::hellaswag::EvalScore) -> Result<()> {
        let acc = score.accuracy();
        self.line(&format!("step {step:5}/{} | eval accuracy {acc:.4} ({}/{})", self.total_steps, score.correct, score.total));
        self.write_log(&format!("s:{step} eval:{acc:.4}"))?;
        self.write_json(serde_json::json!({ "step": step, "eval_accuracy": acc, "eval_correct": score.correct, "eval_total": score.total }))
    }

    pub fn sample(&self, step: usize, text: &str) {
        self.line(&format!("--- sample at step {step} ---\n{text}\n---"));
    }

    /// `reduce`: with several ranks, the time the gradient sum took (host staging included) and
    /// the part of it that ran while backward was still running.
    pub fn step(&mut self, step: usize, loss: f32, lr: f32, norm: f32, ms: f64, reduce: Option<(f64, f64)>) -> Result<()> {
        if self.quiet {
            return Ok(());
        }
        let tps = self.tokens_per_step as f64 / (ms / 1e3);
        let red = reduce.map_or(String::new(), |(r, h)| if h > 0.0 { format!(" | reduce {r:.0} ms ({h:.0} hidden)") } else { format!(" | reduce {r:.0} ms") });
        match &self.bar {
            Some(b) => {
                b.set_position(step as u64);
                b.set_message(format!("loss {loss:.4} | {:.0} tok/s | {ms:.0} ms{red}", tps));
            }
            None => eprintln!(
                "step {step:5}/{} | train loss {loss:.4} | lr {lr:.2e} | norm {norm:.3} | {ms:.0} ms | {tps:.0} tok/s{red}",
                self.total_steps
            ),
        }
        self.write_log(&format!("s:{step} trl:{loss:.4} lr:{lr:.6} norm:{norm:.2}"))?;
        let mut v = serde_json::json!({
            "step": step, "train_loss": loss, "lr": lr, "grad_norm": norm, "ms": ms, "tokens_per_s": tps,
            // tokens processed so far (`wgpt plot --x tokens`)
            "tokens": step as u64 * self.tokens_per_step as u64,
        });
        if let Some((r, h)) = reduce {
            v["reduce_ms"] = r.into();
            v["reduce_hidden_ms"] = h.into();
        }
        self.write_json(v)
    }

    pub fn finish(&mut self, s: &TrainSummary) {
        if self.quiet {
            return;
        }
        if let Some(b) = &self.bar {
            b.finish_and_clear();
        }
        if let (Some(first), Some(last)) = (s.val_losses.first(), s.val_losses.last()) {
            if first.0 != last.0 {
                eprintln!(
                    "val loss: {:.4} at step {} -> {:.4} at step {} ({:+.3} nats)",
                    first.1,
                    first.0,
                    last.1,
                    last.0,
                    last.1 - first.1
                );
            }
        }
    }
}
