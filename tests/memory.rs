//! The memory-saving modes of a training step: `--recompute` (activations recomputed in backward)
//! and `--offload-optimizer` (AdamW on the host). Neither may change what training computes:
//! the cpu backend gives bit-identical parameters with and without them, wgpu the same within
//! 1e-6; and the bytes they save are the buffers they remove.

mod common;

use common::{train_losses, wgpt};
use std::path::Path;
use wgpt::backend::cpu::CpuBackend;
use wgpt::backend::Backend;
use wgpt::graph::{build_train_step, TrainOptions};
use wgpt::model::checkpoint::read_checkpoint;
use wgpt::model::debug_state::read_debug_state;
use wgpt::train::session::{AdamConsts, Session};

const TINY: &str = "tests/data/tiny";

fn opts(recompute: u8, offload_optimizer: bool) -> TrainOptions {
    TrainOptions { b: 4, t: 32, weight_decay: 0.1, decay_all: false, grad_clip: 1.0, recompute, offload_optimizer, ..Default::default() }
}

/// Four AdamW steps on the fixture's batch: (losses, final parameters, final m, final v).
fn run(backend: Box<dyn Backend>, o: &TrainOptions) -> (Vec<f32>, Vec<f32>, Vec<f32>, Vec<f32>) {
    let (cfg, params) = read_checkpoint(Path::new(&format!("{TINY}/model.bin"))).unwrap();
    let st = read_debug_state(Path::new(&format!("{TINY}/debug_state.bin")), &cfg).unwrap();
    let mut s = Session::new(backend, build_train_step(&cfg, o)).unwrap();
    s.upload_params(&params).unwrap();
    let mut losses = Vec::new();
    for step in 1..=4 {
        s.zero_grad().unwrap();
        losses.push(s.train_micro(&st.x, &st.y).unwrap());
        s.update(3e-3, AdamConsts::default(), step).unwrap();
    }
    let (m, v) = s.download_opt_state().unwrap();
    (losses, s.download_params().unwrap(), m, v)
}

fn cpu() -> Box<dyn Backend> {
    Box::new(CpuBackend::new(None).unwrap())
}

#[test]
fn recompute_saves_the_per_layer_activations_it_recomputes() {
    let (cfg, _) = read_checkpoint(Path::new(&format!("{TINY}/model.bin"))).unwrap();
    let bytes = |r| build_train_step(&cfg, &opts(r, false)).total_bytes();
    let (n, c, l) = (4 * 32, cfg.c, cfg.l);
    // level 1: L per-layer GELU outputs (n × 4C f32) become one shared buffer; level 2: the two
    // layernorm outputs (n × C each) as well
    assert_eq!(bytes(0) - bytes(1), (l - 1) * n * 4 * c * 4);
    assert_eq!(bytes(1) - bytes(2), 2 * (l - 1) * n * c * 4);
    let g = build_train_step(&cfg, &opts(2, false));
    let recomputes = g.phase(wgpt::graph::Phase::Train).iter().filter(|x| x.label.ends_with(".recompute")).count();
    assert_eq!(recomputes, 3 * l, "one GELU and two layernorms recomputed per layer");
}

#[test]
fn recompute_trains_bit_identically_on_cpu() {
    let base = run(cpu(), &opts(0, false));
    assert!(base.0[3] < base.0[0], "the run should learn: {:?}", base.0);
    for level in [1, 2] {
        let r = run(cpu(), &opts(level, false));
        assert_eq!(r.0, base.0, "--recompute {level}: losses");
        assert!(r.1 == base.1, "--recompute {level}: parameters differ");
    }
}

#[test]
fn offload_optimizer_gives_the_on_device_parameters_on_cpu() {
    let (cfg, _) = read_checkpoint(Path::new(&format!("{TINY}/model.bin"))).unwrap();
    let on = build_train_step(&cfg, &opts(0, false));
    let off = build_train_step(&cfg, &opts(0, true));
    let n = wgpt::model::ParamLayout::new(&cfg).total;
    assert_eq!(on.total_bytes() - off.total_bytes(), 2 * n * 4, "m and v leave the device");
    assert!(off.phase(wgpt::graph::Phase::Update).is_empty());
    let base = run(cpu(), &opts(0, false));
    let r = run(cpu(), &opts(0, true));
    assert_eq!(r.0, base.0, "losses");
    assert!(r.1 == base.1 && r.2 == base.2 && r.3 == base.3, "parameters or AdamW state differ");
    // and with both modes at once
    let both = run(cpu(), &opts(2, true));
    assert!(both.1 == base.1, "--recompute --offload-optimizer: parameters differ");
}

#[test]
fn recompute_and_offload_on_wgpu_match_the_plain_step() {
    let Some(_) = common::wgpu_adapter() else { return };
    let gpu = || -> Box<dyn Backend> { Box::new(common::wgpu_adapter().unwrap()) };
    let base = run(gpu(), &opts(0, false));
    let r = run(gpu(), &opts(2, true));
    let cpu_ref = run(cpu(), &opts(0, true));
    for (name, x, y) in [("parameters", &r.1, &base.1), ("m", &r.2, &base.2), ("v", &r.3, &base.3)] {
        let err = x.iter().zip(y).fold(0f32, |e, (a, b)| e.max((a - b).abs()));
        assert!(err <= 1e-6, "{name}: max difference {err} between --recompute --offload-optimizer and the plain wgpu step");
    }
    for (a, b) in r.0.iter().zip(&cpu_ref.0) {
        assert!((a - b).abs() < 1e-3, "wgpu loss {a} vs cpu {b}");
    }
}

#[test]
fn train_flags_give_the_same_losses_and_a_bad_combination_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let plain = train_losses("cpu", &dir.path().join("plain.jsonl"), &[]);
    let saved = train_losses("cpu", &dir.path().join("saved.jsonl"), &["--recompute", "--offload-optimizer"]);
    assert_eq!(plain.len(), 6);
    assert_eq!(saved, plain, "--recompute --offload-optimizer changed the losses");
    let o = wgpt(&["train", "--offload-optimizer", "--zero", "1", "--steps", "1"]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success() && err.contains("--offload-optimizer") && err.trim().lines().count() == 1, "{err}");
    let o = wgpt(&["train", "--recompute", "3", "--steps", "1"]);
    assert!(!o.status.success() && String::from_utf8_lossy(&o.stderr).contains("--recompute"));
}

#[test]
fn offload_optimizer_resumes_bit_exactly() {
    // the host's m and v go into the checkpoint's state file and come back on --resume
    let dir = tempfile::tempdir().unwrap();
    let args = |out: &Path, log: &Path, steps: &'static str| -> Vec<String> {
        [
            "train",
            "--backend",
            "cpu",
            "--init",
            "tests/data/tiny/model.bin",
            "--train",
            "tests/data/tiny/train.bin",
            "--val",
            "tests/data/tiny/train.bin",
            "--batch",
            "4",
            "--seq-len",
            "16",
            "--steps",
            steps,
            "--lr",
            "1e-3",
            "--val-every",
            "0",
            "--gen-tokens",
            "0",
            "--checkpoint-every",
            "3",
            "--offload-optimizer",
            "--out",
        ]
        .iter()
        .map(|s| s.to_string())
        .chain([out.display().to_string(), "--log-json".into(), log.display().to_string()])
        .collect()
    };
    let losses = |p: &Path| -> Vec<(u64, f64)> {
        std::fs::read_to_string(p)
            .unwrap()
            .lines()
            .filter_map(|l| {
                let v: serde_json::Value = serde_json::from_str(l).unwrap();
                Some((v["step"].as_u64()?, v["train_loss"].as_f64()?))
            })
            .collect()
    };
    let run = |a: Vec<String>| {
        let a: Vec<&str> = a.iter().map(String::as_str).collect();
        let o = wgpt(&a);
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    };
    let (full, part) = (dir.path().join("full"), dir.path().join("part"));
    run(args(&full, &dir.path().join("full.jsonl"), "6"));
    run(args(&part, &dir.path().join("part.jsonl"), "6"));
    // as if it had stopped after step 3's checkpoint
    std::fs::remove_file(part.join("DONE_00000006")).unwrap();
    let mut a = args(&part, &dir.path().join("resume.jsonl"), "6");
    a.push("--resume".into());
    run(a);
    let want: Vec<_> = losses(&dir.path().join("full.jsonl")).into_iter().filter(|(s, _)| *s > 3).collect();
    assert_eq!(want.len(), 3);
    assert_eq!(losses(&dir.path().join("resume.jsonl")), want);
}

#[test]
fn gpt2_124m_at_t1024_trains_in_2gib() {
    // the plan: over 2 GiB as it is, under it with both modes
    let plan = |extra: &[&str]| -> serde_json::Value {
        let mut a = vec!["plan", "--model", "d12", "--batch", "1", "--seq-len", "1024", "--memory", "2GiB", "--json"];
        a.extend_from_slice(extra);
        let o = wgpt(&a);
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        serde_json::from_str(String::from_utf8_lossy(&o.stdout).lines().last().unwrap()).unwrap()
    };
    let (full, small) = (plan(&[]), plan(&["--recompute", "--offload-optimizer"]));
    assert_eq!(full["fits"], false);
    assert_eq!(small["fits"], true, "{small}");
    assert_eq!(small["by_role"]["optimizer"], 0);
    assert_eq!(small["host_bytes"].as_u64().unwrap(), 3 * 4 * small["params"].as_u64().unwrap());
    // and the cpu backend, held to 2 GiB, trains it (one step: about 20 s on 2 cores)
    let args = [
        "train",
        "--backend",
        "cpu",
        "--init",
        "d12",
        "--batch",
        "1",
        "--seq-len",
        "1024",
        "--steps",
        "1",
        "--val-every",
        "0",
        "--gen-tokens",
        "0",
        "--memory",
        "2GiB",
    ];
    let o = wgpt(&args);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success() && err.contains("--memory") && err.trim().lines().count() == 1, "without the modes: {err}");
    let mut a = args.to_vec();
    a.extend(["--recompute", "--offload-optimizer"]);
    let o = wgpt(&a);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success() && err.contains("1.54 GiB of buffers") && err.contains("step     1/1 | train loss"), "{err}");
}

#[test]
fn offload_optimizer_in_fp16_keeps_the_master_weights_on_the_host_bit_exactly() {
    // mixed precision with the optimiser offloaded: the device holds f16 parameters and no master
    // weights; the host's f32 masters get exactly the on-device mixed-precision update
    let (cfg, _) = read_checkpoint(Path::new(&format!("{TINY}/model.bin"))).unwrap();
    let f16 = |offload| TrainOptions { precision: wgpt::graph::DType::F16, ..opts(0, offload) };
    let g = build_train_step(&cfg, &f16(true));
    assert!(g.io.masters.is_none() && g.io.m.is_none(), "no master weights or moments on the device");
    let base = run(cpu(), &f16(false));
    let off = run(cpu(), &f16(true));
    assert_eq!(off.0, base.0, "losses");
    assert!(off.1 == base.1 && off.2 == base.2 && off.3 == base.3, "master weights or AdamW state differ");
}
