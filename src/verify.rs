//! `wgpt verify`: the port of llm.c's test_gpt2. Step 0's logits, loss and all 16 gradients are
//! compared with an llm.c debug-state file, then N AdamW steps run on the same batch.

use crate::backend::BackendArgs;
use crate::error::{Error, Result};
use crate::graph::{build_train_step, DType, TrainOptions};
use crate::model::hf::load_model;
use crate::model::debug_state::read_debug_state;
use crate::model::{ParamLayout, NUM_PARAM_TENSORS, PARAM_NAMES};
use crate::train::session::{AdamConsts, Session};
use std::path::PathBuf;

#[derive(Clone, Debug, clap::Args)]
pub struct VerifyArgs {
    /// model: an llm.c checkpoint (version 3 or 5) or a Hugging Face GPT-2 (folder or model.safetensors)
    #[arg(long)]
    pub model: PathBuf,
    /// llm.c debug state (x, y, logits, loss, gradients)
    #[arg(long)]
    pub state: PathBuf,
    #[command(flatten)]
    pub backend: BackendArgs,
    /// AdamW steps after the step-0 comparison
    #[arg(long, default_value_t = 10)]
    pub steps: usize,
    #[arg(long, default_value_t = 1e-4)]
    pub lr: f32,
    /// weight decay, applied to every tensor like test_gpt2.c
    #[arg(long, default_value_t = 0.01)]
    pub weight_decay: f32,
    /// expected losses (a JSON file with a "losses" list, like the fixtures' expected.json); each
    /// step's loss must be within --loss-tol of it
    #[arg(long)]
    pub expected: Option<PathBuf>,
    /// tolerance for the loss (step 0 vs the state file, and per step vs --expected) [default:
    /// 1e-4 in fp32; see --precision]
    #[arg(long)]
    pub loss_tol: Option<f32>,
    /// tolerance for logits (absolute) [default: 1e-4 in fp32; see --precision]
    #[arg(long)]
    pub logits_tol: Option<f32>,
    /// tolerance for each gradient tensor, relative to its largest magnitude [default: 1e-4 in
    /// fp32; see --precision]
    #[arg(long)]
    pub grad_tol: Option<f32>,
    /// storage precision of the step (fp32, fp16, bf16); the tolerances' defaults become, for
    /// fp16: loss 2e-3, logits 2e-3, gradients 3.9e-3; bf16: 1.6e-2, 1.6e-2, 3.1e-2
    #[arg(long, default_value = "fp32", value_parser = crate::graph::parse_precision, value_name = "fp32|fp16|bf16")]
    pub precision: DType,
    /// fp16: the fixed loss scale of the verified steps (an overflow is reported as a failure)
    #[arg(long, default_value_t = 1024.0, value_name = "S")]
    pub loss_scale: f32,
    /// print one JSON object as the last line of stdout
    #[arg(long)]
    pub json: bool,
}

/// (loss, logits, gradient) tolerances of fp16 and bf16, in units of the format's rounding unit
/// u (half an ulp at 1: 2^-11 for f16, 2^-8 for bf16). Every stored value is off by at most u
/// relative; on the tiny fixture the logits came out 1.1u off and the worst gradient tensor 2.3u
/// (relative to its largest element), in both formats, and the losses of the ten steps within
/// 0.05u nats (they average 128 positions). The tolerances are 4u (loss in nats, logits
/// absolute) and 8u (gradients, relative): about 4× what was measured, so a kernel that rounds
/// twice or reads a wrong element fails while honest rounding passes. f16: 2e-3, 2e-3, 3.9e-3;
/// bf16: 1.6e-2, 1.6e-2, 3.1e-2 (a relative loss tolerance of about 3e-4 and 2.5e-3 at loss 6).
const F16_TOL: (f32, f32, f32) = (4.0 / 2048.0, 4.0 / 2048.0, 8.0 / 2048.0);
const BF16_TOL: (f32, f32, f32) = (4.0 / 256.0, 4.0 / 256.0, 8.0 / 256.0);

/// What `--loss-tol`, `--logits-tol` and `--grad-tol` default to at `precision`.
pub fn default_tolerances(precision: DType) -> (f32, f32, f32) {
    match precision {
        DType::F16 => (F16_TOL.0, F16_TOL.1, F16_TOL.2),
        DType::BF16 => (BF16_TOL.0, BF16_TOL.1, BF16_TOL.2),
        _ => (1e-4, 1e-4, 1e-4),
    }
}

#[derive(Clone, Debug, serde::Serialize)]
pub struct GradError {
    pub name: &'static str,
    pub max_abs_error: f32,
    pub max_abs_ref: f32,
    /// max_abs_error / max_abs_ref
    pub rel_error: f32,
    pub ok: bool,
}

#[derive(Clone, Debug, serde::Serialize)]
pub struct VerifyReport {
    pub ok: bool,
    pub backend: String,
    pub loss: f32,
    pub expected_loss: f32,
    pub logits_max_abs_error: f32,
    pub grads: Vec<GradError>,
    pub losses: Vec<f32>,
    pub expected_losses: Option<Vec<f64>>,
    pub max_loss_error: Option<f32>,
    /// the step's precision and the tolerances applied
    pub precision: String,
    pub loss_tol: f32,
    pub logits_tol: f32,
    pub grad_tol: f32,
}

pub fn run(a: &VerifyArgs) -> Result<VerifyReport> {
    let (cfg, params) = load_model(&a.model)?;
    let st = read_debug_state(&a.state, &cfg)?;
    let expected: Option<Vec<f64>> = match &a.expected {
        Some(p) => {
            let text = std::fs::read_to_string(p).map_err(|e| Error::io(p, e))?;
            let v: serde_json::Value = serde_json::from_str(&text).map_err(|e| Error::format(p, format!("not JSON: {e}")))?;
            let list = v["losses"].as_array().ok_or_else(|| Error::format(p, "no \"losses\" list"))?;
            Some(list.iter().filter_map(|x| x.as_f64()).collect())
        }
        None => None,
    };
    let (b, t) = (st.b, st.t);
    if t > cfg.max_t {
        return Err(Error::format(&a.state, format!("T={t} exceeds the model's maxT={}", cfg.max_t)));
    }
    let (dt_loss, dt_logits, dt_grad) = default_tolerances(a.precision);
    let (loss_tol, logits_tol, grad_tol) = (a.loss_tol.unwrap_or(dt_loss), a.logits_tol.unwrap_or(dt_logits), a.grad_tol.unwrap_or(dt_grad));
    let backend = a.backend.create()?;
    let opts = TrainOptions { b, t, weight_decay: a.weight_decay, decay_all: true, precision: a.precision, ..Default::default() };
    let graph = build_train_step(&cfg, &opts);
    let mut sess = Session::new(backend, graph)?;
    sess.upload_params(&params)?;
    // fp16: gradients carry a fixed loss scale (divided out of the comparison)
    let loss_scale = if a.precision == DType::F16 { a.loss_scale } else { 1.0 };
    sess.set_loss_scale(loss_scale)?;
    let adam = AdamConsts { beta1: 0.9, beta2: 0.999, eps: 1e-8 };
    let v = cfg.v;

    // step 0: logits from a forward pass, then loss and gradients from a training micro-step
    let mut logits_err = 0f32;
    sess.eval(&st.x, &st.y)?;
    let rows = sess.graph.io.logits_rows.min(b * t);
    // one read-back of all kept rows (row stride Vp), compared over the first V columns
    let vp = cfg.vp;
    let kept = sess.graph.buffers.view(sess.graph.io.logits).slice(0, rows * vp);
    let got = sess.backend.download_view(kept)?;
    for r in 0..rows {
        for (g, e) in got[r * vp..r * vp + v].iter().zip(&st.logits[r * v..(r + 1) * v]) {
            logits_err = logits_err.max((g - e).abs());
        }
    }
    sess.zero_grad()?;
    let loss0 = sess.train_micro(&st.x, &st.y)?;
    let grads: Vec<f32> = sess.download_grads()?.iter().map(|g| g / loss_scale).collect();
    let layout = ParamLayout::new(&cfg);
    let mut gerrs = Vec::new();
    for i in 0..NUM_PARAM_TENSORS {
        let o = layout.offsets[i];
        // wte's padded rows are compared too: both must be zero there
        let (g, e) = (&grads[o..o + layout.sizes[i]], &st.grads[o..o + layout.sizes[i]]);
        let max_ref = e.iter().fold(0f32, |m, x| m.max(x.abs()));
        let max_err = g.iter().zip(e).fold(0f32, |m, (x, y)| m.max((x - y).abs()));
        let rel = if max_ref > 0.0 { max_err / max_ref } else { max_err };
        gerrs.push(GradError { name: PARAM_NAMES[i], max_abs_error: max_err, max_abs_ref: max_ref, rel_error: rel, ok: rel <= grad_tol });
    }
    // the update of step 0 and the following steps
    let mut losses = vec![loss0];
    sess.update(a.lr, adam, 1)?;
    let mut overflowed = sess.found_inf();
    for s in 1..a.steps {
        sess.zero_grad()?;
        losses.push(sess.train_micro(&st.x, &st.y)?);
        sess.update(a.lr, adam, s + 1)?;
        overflowed |= sess.found_inf();
    }
    if overflowed {
        return Err(Error::flag("--loss-scale", format!("{loss_scale}: the gradients overflowed f16 (a step was skipped); give a smaller scale")));
    }
    losses.truncate(a.steps.max(1));
    let max_loss_error = expected.as_ref().map(|e| {
        losses.iter().zip(e).fold(0f32, |m, (l, x)| m.max((*l as f64 - x).abs() as f32))
    });
    let steps_ok = match (&expected, max_loss_error) {
        (Some(e), Some(err)) => e.len() >= losses.len() && err <= loss_tol,
        _ => true,
    };
    let ok = logits_err <= logits_tol
        && (loss0 - st.loss).abs() <= loss_tol
        && gerrs.iter().all(|g| g.ok)
        && steps_ok
        && losses.iter().all(|l| l.is_finite());
    Ok(VerifyReport {
        ok,
        backend: sess.backend.name(),
        loss: loss0,
        expected_loss: st.loss,
        logits_max_abs_error: logits_err,
        grads: gerrs,
        losses,
        expected_losses: expected,
        max_loss_error,
        precision: a.precision.name().to_string(),
        loss_tol,
        logits_tol,
        grad_tol,
    })
}

/// Human-readable report on stdout (test_gpt2's style).
pub fn print(r: &VerifyReport) {
    let (loss_tol, logits_tol) = (r.loss_tol, r.logits_tol);
    println!("backend: {} ({})", r.backend, r.precision);
    println!("logits: max abs error {:.3e} (tol {:.0e}) {}", r.logits_max_abs_error, logits_tol, okstr(r.logits_max_abs_error <= logits_tol));
    println!(
        "loss: {:.6} expected {:.6} error {:.3e} {}",
        r.loss,
        r.expected_loss,
        (r.loss - r.expected_loss).abs(),
        okstr((r.loss - r.expected_loss).abs() <= loss_tol)
    );
    for g in &r.grads {
        println!("grad {:9}: max abs error {:.3e}, relative to max |ref| {:.3e} {}", g.name, g.max_abs_error, g.rel_error, okstr(g.ok));
    }
    for (i, l) in r.losses.iter().enumerate() {
        match r.expected_losses.as_ref().and_then(|e| e.get(i)) {
            Some(e) => println!("step {i}: loss {l:.6} (expected {e:.6}, error {:.2e})", (*l as f64 - e).abs()),
            None => println!("step {i}: loss {l:.6}"),
        }
    }
    println!("overall okay: {}", r.ok as i32);
}

fn okstr(ok: bool) -> &'static str {
    if ok {
        "OK"
    } else {
        "FAIL"
    }
}
