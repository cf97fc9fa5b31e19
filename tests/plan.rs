//! `wgpt plan`: the training step's device memory by role and its roofline bound.

mod common;

use common::wgpt;

fn plan(args: &[&str]) -> serde_json::Value {
    let mut all = vec!["plan", "--json"];
    all.extend_from_slice(args);
    let o = wgpt(&all);
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(o.status.success(), "{args:?}: {out}{}", String::from_utf8_lossy(&o.stderr));
    serde_json::from_str(out.lines().last().unwrap()).unwrap()
}

fn u(v: &serde_json::Value) -> u64 {
    v.as_u64().unwrap()
}

#[test]
fn memory_by_role_adds_up_and_matches_the_model() {
    // GPT-2 124M at B=1, T=1024: parameters, gradients and AdamW's two moments, fp32
    let r = plan(&["--model", "d12", "--batch", "1", "--seq-len", "1024", "--memory", "2GiB"]);
    let n = u(&r["params"]);
    assert_eq!(n, 124_475_904);
    let by = &r["by_role"];
    assert_eq!(u(&by["params"]), 4 * n);
    assert_eq!(u(&by["grads"]), 4 * n);
    assert_eq!(u(&by["optimizer"]), 8 * n);
    assert_eq!(u(&by["master"]), 0);
    // the logits chunk: rows of Vp = 50304 columns, at most 32 Mi floats (a WebGPU binding)
    let logits = u(&by["logits"]);
    assert!(logits % (50304 * 4) == 0 && logits <= 4 << 25 && logits > 0, "{logits}");
    let sum: u64 = ["params", "master", "grads", "optimizer", "activations", "logits", "scratch"].iter().map(|k| u(&by[*k])).sum();
    assert_eq!(sum, u(&r["total_bytes"]));
    assert!(u(&r["total_bytes"]) > 2 << 30);
    assert_eq!(r["fits"], false, "fp32 124M training does not fit 2 GiB");
    assert_eq!(plan(&["--model", "d12", "--batch", "1", "--seq-len", "1024", "--memory", "4GiB"])["fits"], true);
    // ZeRO-1 over 4 ranks: a quarter of the optimiser state per rank, the rest unchanged
    let z = plan(&["--model", "d12", "--batch", "1", "--seq-len", "1024", "--zero", "1", "--world", "4"]);
    assert_eq!(u(&z["by_role"]["optimizer"]), 8 * n.div_ceil(4));
    assert_eq!(u(&z["by_role"]["params"]), 4 * n);
}

#[test]
fn roofline_bound() {
    let base = ["--model", "d2:c64", "--batch", "2", "--seq-len", "32"];
    let at = |g: &str, b: &str| {
        let mut a = base.to_vec();
        a.extend(["--roofline", "any", "--peak-gflops", g, "--peak-gbs", b]);
        plan(&a)["roofline"].clone()
    };
    let r = at("1000", "100");
    let (flops, bytes, ms) = (r["flops"].as_f64().unwrap(), r["bytes"].as_f64().unwrap(), r["bound_ms"].as_f64().unwrap());
    // the sum of per-launch maxima is at least each resource's total time, at most their sum
    let (tc, tm) = (flops / 1e12 * 1e3, bytes / 100e9 * 1e3);
    assert!(ms >= tc.max(tm) * (1.0 - 1e-9) && ms <= (tc + tm) * (1.0 + 1e-9), "{ms} vs compute {tc}, memory {tm}");
    // twice the device is half the bound
    let r2 = at("2000", "200");
    assert!((r2["bound_ms"].as_f64().unwrap() * 2.0 - ms).abs() < 1e-9 * ms);
    assert!((r["tokens_per_s"].as_f64().unwrap() - 64.0 / (ms / 1e3)).abs() < 1e-6 * r["tokens_per_s"].as_f64().unwrap());
    // a device from the table; TF32 only speeds up matmuls on sm_80+
    let mut a = base.to_vec();
    a.extend(["--roofline", "v100"]);
    let v = plan(&a)["roofline"].clone();
    assert_eq!(v["peaks"]["name"], "NVIDIA V100");
    a.push("--tf32");
    assert_eq!(plan(&a)["roofline"]["bound_ms"], v["bound_ms"], "V100 has no TF32");
    let mut a = base.to_vec();
    a.extend(["--roofline", "a100"]);
    let fp32 = plan(&a)["roofline"]["bound_ms"].as_f64().unwrap();
    a.push("--tf32");
    assert!(plan(&a)["roofline"]["bound_ms"].as_f64().unwrap() < fp32);
}

#[test]
fn bad_plan_flags_are_one_line_errors() {
    for (args, want) in [
        (&["--roofline", "toaster"][..], "error: --roofline: 'toaster' is not in the table"),
        (&["--memory", "2 parsecs"][..], "error: --memory:"),
        (&["--seq-len", "5000"][..], "error: --seq-len: must be in 1..=1024"),
        (&["--zero", "1"][..], "error: --zero: 1 needs --world"),
        (&["--peak-gflops", "10"][..], "error: --peak-gflops: goes with --roofline"),
    ] {
        let mut all = vec!["plan"];
        all.extend_from_slice(args);
        let o = wgpt(&all);
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(!o.status.success() && !err.contains("panicked"), "{args:?}: {err}");
        assert!(err.lines().next().unwrap_or("").starts_with(want), "{args:?}: {err}");
    }
}

/// `train --batch auto`: the largest B dividing --total-batch / T whose step fits --memory (the
/// budget is set between the plans of B=4 and B=8, so B=4 must be chosen), and the run is the
/// fixed `--batch 4` run with the same accumulation; a budget below B=1 is a one-line error.
#[test]
fn batch_auto_takes_the_largest_batch_that_fits() {
    let model = "tests/data/tiny/model.bin";
    let bytes = |b: &str| u(&plan(&["--model", model, "--batch", b, "--seq-len", "32"])["total_bytes"]);
    let (b4, b8) = (bytes("4"), bytes("8"));
    assert!(b4 < b8);
    let budget = ((b4 + b8) / 2).to_string();
    let dir = tempfile::tempdir().unwrap();
    let run = |batch: &str, name: &str| {
        let log = dir.path().join(format!("{name}.jsonl"));
        let o = wgpt(&[
            "train", "--backend", "cpu", "--init", model, "--train", "tests/data/tiny/train.bin", "--seq-len", "32", "--total-batch", "512",
            "--batch", batch, "--memory", &budget, "--steps", "2", "--val-every", "0", "--gen-tokens", "0", "--log-json", log.to_str().unwrap(),
        ]);
        let err = String::from_utf8_lossy(&o.stderr).to_string();
        assert!(o.status.success(), "{batch}: {err}");
        let losses: Vec<f64> = std::fs::read_to_string(&log)
            .unwrap()
            .lines()
            .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap()["train_loss"].as_f64())
            .collect();
        (err, losses)
    };
    let (err, auto) = run("auto", "auto");
    assert!(err.contains("--batch auto: B=4 ") && err.contains("4 accumulation steps"), "{err}");
    let (_, fixed) = run("4", "fixed");
    assert_eq!(auto, fixed);
    assert_eq!(auto.len(), 2);
    // nothing fits, and a fixed batch over the budget
    for (batch, mem, want) in [("auto", "1MiB", "error: --batch auto: not even B=1"), ("8", budget.as_str(), "error: the step's buffers need")] {
        let o = wgpt(&["train", "--backend", "cpu", "--init", model, "--train", "tests/data/tiny/train.bin", "--val-every", "0", "--gen-tokens", "0", "--seq-len", "32", "--total-batch", "512", "--batch", batch, "--memory", mem, "--steps", "1"]);
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(!o.status.success() && err.lines().next().unwrap_or("").starts_with(want), "{batch} {mem}: {err}");
    }
}

#[test]
fn the_plan_is_what_the_backends_allocate() {
    // three shapes (one with an odd T, one with recompute and offload): the plan's total is the
    // bytes the cpu and the wgpu backend allocate for the step's buffers, to the byte
    #[derive(clap::Parser)]
    struct W {
        #[command(flatten)]
        a: wgpt::plan::PlanArgs,
    }
    let shapes: [&[&str]; 3] = [
        &["--model", "d2:c64", "--batch", "2", "--seq-len", "32"],
        &["--model", "d3:c48", "--batch", "3", "--seq-len", "17"],
        &["--model", "d4:c128", "--batch", "1", "--seq-len", "100", "--recompute", "--offload-optimizer"],
    ];
    for shape in shapes {
        let a = <W as clap::Parser>::try_parse_from(std::iter::once("plan").chain(shape.iter().copied())).unwrap().a;
        let planned = wgpt::plan::plan(&a).unwrap().total_bytes;
        let (graph, _) = wgpt::plan::step_graph(&a).unwrap();
        let cpu = wgpt::train::session::Session::new(Box::new(wgpt::backend::cpu::CpuBackend::new(Some(1)).unwrap()), graph.clone()).unwrap();
        assert_eq!(cpu.backend.allocated_bytes(), Some(planned), "{shape:?}: cpu");
        if let Some(g) = common::wgpu_adapter() {
            let s = wgpt::train::session::Session::new(Box::new(g), graph).unwrap();
            assert_eq!(s.backend.allocated_bytes(), Some(planned), "{shape:?}: wgpu");
        }
    }
}
