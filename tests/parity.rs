//! Parity with the llm.c-format fixture (an independent float64 GPT-2), through the library:
//! graph builder + cpu backend + session, without the CLI.

use wgpt::backend::cpu::CpuBackend;
use wgpt::graph::{build_forward, build_train_step, TrainOptions};
use wgpt::model::checkpoint::read_checkpoint;
use wgpt::model::debug_state::read_debug_state;
use wgpt::model::{ParamLayout, NUM_PARAM_TENSORS, PARAM_NAMES};
use wgpt::train::session::{AdamConsts, Session};
use std::path::Path;

const TINY: &str = "tests/data/tiny";

fn expected_losses() -> (f64, Vec<f64>) {
    let v: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(format!("{TINY}/expected.json")).unwrap()).unwrap();
    (v["loss"].as_f64().unwrap(), v["losses"].as_array().unwrap().iter().map(|x| x.as_f64().unwrap()).collect())
}

#[test]
fn step0_logits_loss_and_gradients_match_the_fixture() {
    let (cfg, params) = read_checkpoint(Path::new(&format!("{TINY}/model.bin"))).unwrap();
    let st = read_debug_state(Path::new(&format!("{TINY}/debug_state.bin")), &cfg).unwrap();
    let (exp_loss, _) = expected_losses();

    // logits from the inference-only graph
    let mut fwd = Session::new(Box::new(CpuBackend::new(None).unwrap()), build_forward(&cfg, st.b, st.t)).unwrap();
    fwd.upload_params(&params).unwrap();
    let loss = fwd.eval(&st.x, &st.y).unwrap();
    assert!((loss as f64 - exp_loss).abs() < 1e-5, "eval loss {loss} vs {exp_loss}");
    let mut max_err = 0f32;
    for r in 0..st.b * st.t {
        let row = fwd.logits_row(r).unwrap();
        for (a, b) in row.iter().zip(&st.logits[r * cfg.v..(r + 1) * cfg.v]) {
            max_err = max_err.max((a - b).abs());
        }
    }
    assert!(max_err < 1e-4, "logits max error {max_err}");

    // loss and gradients from the training graph
    let opts = TrainOptions { b: st.b, t: st.t, grad_accum: 1, weight_decay: 0.01, decay_all: true, grad_clip: 0.0, ..Default::default() };
    let mut s = Session::new(Box::new(CpuBackend::new(None).unwrap()), build_train_step(&cfg, &opts)).unwrap();
    s.upload_params(&params).unwrap();
    s.zero_grad().unwrap();
    let loss = s.train_micro(&st.x, &st.y).unwrap();
    assert!((loss - st.loss).abs() < 1e-5 && (loss as f64 - exp_loss).abs() < 1e-5);
    let grads = s.download_grads().unwrap();
    let layout = ParamLayout::new(&cfg);
    for i in 0..NUM_PARAM_TENSORS {
        let (o, n) = (layout.offsets[i], layout.sizes[i]);
        let reference = &st.grads[o..o + n];
        let scale = reference.iter().fold(0f32, |m, x| m.max(x.abs()));
        let err = grads[o..o + n].iter().zip(reference).fold(0f32, |m, (a, b)| m.max((a - b).abs()));
        assert!(scale > 0.0, "{} gradient is all zero in the fixture", PARAM_NAMES[i]);
        assert!(err <= 1e-4 * scale, "{}: max error {err} vs max |ref| {scale}", PARAM_NAMES[i]);
    }
    // padded vocabulary rows of wte get no gradient
    assert!(grads[cfg.v * cfg.c..cfg.vp * cfg.c].iter().all(|&g| g == 0.0));
}

#[test]
fn ten_adamw_steps_match_the_fixture_losses() {
    let (cfg, params) = read_checkpoint(Path::new(&format!("{TINY}/model.bin"))).unwrap();
    let st = read_debug_state(Path::new(&format!("{TINY}/debug_state.bin")), &cfg).unwrap();
    let (_, want) = expected_losses();
    let opts = TrainOptions { b: st.b, t: st.t, grad_accum: 1, weight_decay: 0.01, decay_all: true, grad_clip: 0.0, ..Default::default() };
    let mut s = Session::new(Box::new(CpuBackend::new(None).unwrap()), build_train_step(&cfg, &opts)).unwrap();
    s.upload_params(&params).unwrap();
    let adam = AdamConsts { beta1: 0.9, beta2: 0.999, eps: 1e-8 };
    for (step, w) in want.iter().enumerate() {
        s.zero_grad().unwrap();
        let loss = s.train_micro(&st.x, &st.y).unwrap();
        assert!((loss as f64 - w).abs() < 5e-5, "step {step}: loss {loss} vs {w}");
        s.update(1e-4, adam, step + 1).unwrap();
    }
}

#[test]
fn gradient_accumulation_equals_one_big_batch() {
    // two micro-batches of B=2 accumulate to the gradient of the B=4 batch
    let (cfg, params) = read_checkpoint(Path::new(&format!("{TINY}/model.bin"))).unwrap();
    let st = read_debug_state(Path::new(&format!("{TINY}/debug_state.bin")), &cfg).unwrap();
    let half = st.b / 2 * st.t;
    let opts = TrainOptions { b: st.b / 2, t: st.t, grad_accum: 2, weight_decay: 0.0, decay_all: true, grad_clip: 0.0, ..Default::default() };
    let mut s = Session::new(Box::new(CpuBackend::new(None).unwrap()), build_train_step(&cfg, &opts)).unwrap();
    s.upload_params(&params).unwrap();
    s.zero_grad().unwrap();
    // train_micro returns the mean over the micro-steps so far: the first half's loss, then the
    // whole batch's (the losses add up on the device)
    let l1 = s.train_micro(&st.x[..half], &st.y[..half]).unwrap();
    let both = s.train_micro(&st.x[half..], &st.y[half..]).unwrap();
    assert!((both - st.loss).abs() < 1e-5, "{both} vs {}", st.loss);
    assert!((l1 - st.loss).abs() > 1e-4, "the halves should differ from the whole: {l1}");
    assert!((s.step_loss().unwrap() - both).abs() == 0.0);
    let grads = s.download_grads().unwrap();
    let scale = st.grads.iter().fold(0f32, |m, x| m.max(x.abs()));
    let err = grads.iter().zip(&st.grads).fold(0f32, |m, (a, b)| m.max((a - b).abs()));
    assert!(err < 1e-4 * scale, "accumulated gradient error {err}");
}
