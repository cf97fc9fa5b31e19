//! End-to-end tests of the `wgpt` binary: verify on the llm.c fixture, training with resume,
//! and every bad input ending in a one-line error and a non-zero exit.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

const TINY: &str = "tests/data/tiny";

fn wgpt(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_wgpt")).args(args).output().expect("running wgpt")
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

fn expected() -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(format!("{TINY}/expected.json")).unwrap()).unwrap()
}

/// A bad input: non-zero exit, no panic, and an error line on stderr that contains `needle`.
fn assert_clean_error(o: &Output, needle: &str) {
    let err = stderr(o);
    assert!(!o.status.success(), "expected failure, got success; stderr:\n{err}");
    assert!(!err.contains("panicked") && !err.contains("internal error") && !err.contains("RUST_BACKTRACE"), "panic:\n{err}");
    let line = err.lines().find(|l| l.starts_with("error")).unwrap_or_else(|| panic!("no error line in:\n{err}"));
    assert!(line.contains(needle), "error line {line:?} does not mention {needle:?}");
}

#[test]
fn verify_tiny_fixture_on_cpu_matches_reference() {
    let o = wgpt(&[
        "verify", "--model", &format!("{TINY}/model.bin"), "--state", &format!("{TINY}/debug_state.bin"),
        "--backend", "cpu", "--steps", "10", "--json", "--loss-tol", "5e-5",
    ]);
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(o.status.success(), "verify failed:\n{out}\n{}", stderr(&o));
    let r: serde_json::Value = serde_json::from_str(out.lines().last().unwrap()).unwrap();
    let exp = expected();
    assert_eq!(r["ok"], true);
    assert!((r["loss"].as_f64().unwrap() - exp["loss"].as_f64().unwrap()).abs() < 1e-5);
    assert!(r["logits_max_abs_error"].as_f64().unwrap() < 1e-4);
    let grads = r["grads"].as_array().unwrap();
    assert_eq!(grads.len(), 16);
    for g in grads {
        assert!(g["rel_error"].as_f64().unwrap() < 1e-4, "{g}");
    }
    let losses = r["losses"].as_array().unwrap();
    let want = exp["losses"].as_array().unwrap();
    assert_eq!(losses.len(), 10);
    for (l, w) in losses.iter().zip(want) {
        assert!((l.as_f64().unwrap() - w.as_f64().unwrap()).abs() < 5e-5, "{l} vs {w}");
    }
}

#[test]
fn verify_fails_on_a_wrong_reference() {
    // a debug state whose loss is shifted must be reported as not ok, with a non-zero exit
    let dir = tempfile::tempdir().unwrap();
    let mut bytes = std::fs::read(format!("{TINY}/debug_state.bin")).unwrap();
    let (b, t, v) = (4usize, 32usize, 500usize);
    let loss_at = 1024 + 2 * b * t * 4 + b * t * v * 4;
    let loss = f32::from_le_bytes(bytes[loss_at..loss_at + 4].try_into().unwrap()) + 0.01;
    bytes[loss_at..loss_at + 4].copy_from_slice(&loss.to_le_bytes());
    let state = dir.path().join("state.bin");
    std::fs::write(&state, bytes).unwrap();
    let o = wgpt(&["verify", "--model", &format!("{TINY}/model.bin"), "--state", state.to_str().unwrap(), "--backend", "cpu", "--steps", "1", "--json"]);
    assert!(!o.status.success());
    let out = String::from_utf8_lossy(&o.stdout);
    let r: serde_json::Value = serde_json::from_str(out.lines().last().unwrap()).unwrap();
    assert_eq!(r["ok"], false);
}

fn read_json_lines(p: &Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(p).unwrap().lines().map(|l| serde_json::from_str(l).unwrap()).collect()
}

fn train_losses(p: &Path) -> Vec<(u64, f64)> {
    read_json_lines(p)
        .iter()
        .filter(|v| v.get("train_loss").is_some())
        .map(|v| (v["step"].as_u64().unwrap(), v["train_loss"].as_f64().unwrap()))
        .collect()
}

fn tiny_train_args<'a>(out: &'a str, log: &'a str, steps: &'a str) -> Vec<&'a str> {
    vec![
        "train", "--backend", "cpu", "--init", "tests/data/tiny/model.bin", "--train", "tests/data/tiny/train.bin",
        "--val", "tests/data/tiny/train.bin", "--batch", "4", "--seq-len", "16", "--steps", steps, "--lr", "1e-3",
        "--val-every", "4", "--val-batches", "2", "--gen-tokens", "8", "--out", out, "--checkpoint-every", "4",
        "--log-json", log,
    ]
}

#[test]
fn train_writes_checkpoints_and_resume_reproduces_the_losses() {
    let dir = tempfile::tempdir().unwrap();
    let full = dir.path().join("full");
    let full_log = dir.path().join("full.jsonl");
    let o = wgpt(&tiny_train_args(full.to_str().unwrap(), full_log.to_str().unwrap(), "10"));
    assert!(o.status.success(), "{}", stderr(&o));
    for s in [4, 8, 10] {
        assert!(full.join(format!("model_{s:08}.bin")).exists());
        assert!(full.join(format!("state_{s:08}_00000.bin")).exists());
        assert!(full.join(format!("DONE_{s:08}")).exists());
    }
    assert!(std::fs::read_to_string(full.join("main.log")).unwrap().contains("s:10 trl:"));
    let rows = read_json_lines(&full_log);
    let step_row = rows.iter().find(|r| r.get("train_loss").is_some()).unwrap();
    for key in ["step", "train_loss", "lr", "grad_norm", "ms", "tokens_per_s"] {
        assert!(step_row.get(key).is_some(), "missing {key} in {step_row}");
    }
    assert!(rows.iter().any(|r| r.get("val_loss").is_some()));
    let full_losses = train_losses(&full_log);
    assert_eq!(full_losses.len(), 10);
    // the saved model is a valid llm.c checkpoint that verify/sample can read
    let o = wgpt(&["sample", "--model", full.join("model_00000010.bin").to_str().unwrap(), "--tokens", "4", "--backend", "cpu"]);
    assert!(o.status.success(), "{}", stderr(&o));

    // interrupted run: stop at step 5 (checkpoint at 4), then resume to 10
    let part = dir.path().join("part");
    let part_log = dir.path().join("part.jsonl");
    let o = wgpt(&tiny_train_args(part.to_str().unwrap(), part_log.to_str().unwrap(), "10"));
    assert!(o.status.success());
    // simulate a crash after step 4's checkpoint: drop the later checkpoints
    for s in [8, 10] {
        std::fs::remove_file(part.join(format!("DONE_{s:08}"))).unwrap();
    }
    let resume_log = dir.path().join("resume.jsonl");
    let mut args = tiny_train_args(part.to_str().unwrap(), resume_log.to_str().unwrap(), "10");
    args.push("--resume");
    let o = wgpt(&args);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(stderr(&o).contains("resuming at step 4"), "{}", stderr(&o));
    let resumed: Vec<(u64, f64)> = train_losses(&resume_log).into_iter().filter(|(s, _)| *s > 4).collect();
    let reference: Vec<(u64, f64)> = full_losses.into_iter().filter(|(s, _)| *s > 4).collect();
    assert_eq!(resumed.len(), 6);
    assert_eq!(resumed, reference, "resumed losses differ from the uninterrupted run");
}

fn tmp_copy(dir: &Path, name: &str, bytes: &[u8]) -> PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, bytes).unwrap();
    p
}

#[test]
fn bad_inputs_give_one_line_errors() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let model = std::fs::read(format!("{TINY}/model.bin")).unwrap();
    let state = format!("{TINY}/debug_state.bin");
    let verify = |m: &str| wgpt(&["verify", "--model", m, "--state", &state, "--backend", "cpu", "--steps", "1"]);

    let missing = d.join("nope.bin");
    assert_clean_error(&verify(missing.to_str().unwrap()), "nope.bin");
    let truncated = tmp_copy(d, "trunc.bin", &model[..model.len() / 2]);
    assert_clean_error(&verify(truncated.to_str().unwrap()), "trunc.bin");
    let empty = tmp_copy(d, "empty.bin", &[]);
    assert_clean_error(&verify(empty.to_str().unwrap()), "empty.bin");
    let mut bad_magic = model.clone();
    bad_magic[0] ^= 0xff;
    let bad_magic = tmp_copy(d, "magic.bin", &bad_magic);
    assert_clean_error(&verify(bad_magic.to_str().unwrap()), "magic.bin");
    let mut bad_version = model.clone();
    bad_version[4..8].copy_from_slice(&7i32.to_le_bytes());
    let bad_version = tmp_copy(d, "version.bin", &bad_version);
    assert_clean_error(&verify(bad_version.to_str().unwrap()), "version.bin");

    let train = |extra: &[&str]| {
        let mut a = vec![
            "train", "--backend", "cpu", "--init", "tests/data/tiny/model.bin", "--train", "tests/data/tiny/train.bin",
            "--val", "tests/data/tiny/train.bin", "--batch", "2", "--seq-len", "8", "--steps", "1", "--gen-tokens", "0",
        ];
        // an extra "--flag value" replaces the default one
        for pair in extra.chunks(2) {
            match a.iter().position(|x| *x == pair[0]) {
                Some(i) if pair.len() == 2 => a[i + 1] = pair[1],
                _ => a.extend_from_slice(pair),
            }
        }
        wgpt(&a)
    };
    // the bundled GPT-2 shards hold ids up to 50256, beyond the tiny model's vocabulary of 500
    assert_clean_error(&train(&["--train", "data/shakespeare_train.bin"]), "shakespeare_train.bin");
    // 4096 tokens cannot feed a 64×64 batch
    assert_clean_error(&train(&["--batch", "64", "--seq-len", "64"]), "--seq-len");
    assert_clean_error(&train(&["--seq-len", "65"]), "--seq-len");
    assert_clean_error(&train(&["--batch", "0"]), "--batch");
    assert_clean_error(&train(&["--total-batch", "100"]), "--total-batch");
    assert_clean_error(&train(&["--train", "no/such/*.bin"]), "--train");
    let shard = tmp_copy(d, "shard.bin", &std::fs::read(format!("{TINY}/train.bin")).unwrap()[..600]);
    assert_clean_error(&train(&["--train", shard.to_str().unwrap()]), "shard.bin");
    assert_clean_error(&train(&["--init", "d7"]), "--init");
    assert_clean_error(&train(&["--resume"]), "--resume");
    // an unknown backend is rejected by the argument parser
    let o = train(&["--backend", "metal"]);
    assert!(!o.status.success());
    assert!(stderr(&o).contains("--backend"));
}

#[test]
fn prepare_then_train_on_your_own_text() {
    let dir = tempfile::tempdir().unwrap();
    let text = dir.path().join("poems.txt");
    let body: String = (0..60)
        .map(|i| format!("Stanza {i}: the quick brown fox jumps over the lazy dog.\nAnd then it rests.\n\n"))
        .collect();
    std::fs::write(&text, body).unwrap();
    let out = dir.path().join("data");
    let o = wgpt(&["prepare", text.to_str().unwrap(), "--out", out.to_str().unwrap(), "--val-tokens", "300"]);
    assert!(o.status.success(), "{}", stderr(&o));
    for f in ["poems_train.bin", "poems_val.bin", "gpt2_tokenizer.bin"] {
        assert!(out.join(f).exists(), "{f} missing");
    }
    let train_glob = format!("{}/*_train.bin", out.display());
    let val_glob = format!("{}/*_val.bin", out.display());
    let o = wgpt(&[
        "train", "--backend", "cpu", "--init", "d1:c64", "--train", &train_glob, "--val", &val_glob, "--batch", "2",
        "--seq-len", "16", "--steps", "3", "--val-every", "3", "--val-batches", "2", "--gen-tokens", "4",
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(stderr(&o).contains("--- sample at step 3 ---"));
    // a missing input names the file
    assert_clean_error(&wgpt(&["prepare", "no_such.txt", "--out", out.to_str().unwrap()]), "no_such.txt");
}

/// `--keep-checkpoints 2 --keep-every 3` with a checkpoint every step (llm.c's -nk 2 -nm 3):
/// after step s the checkpoint of s−2 goes unless it is a multiple of 3; 6 steps leave 3, 5, 6,
/// each complete (model, state and DONE) and nothing of the others, beside main.log and loss.png.
#[test]
fn checkpoint_pruning_keeps_the_newest_and_the_major_ones() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("run");
    let o = wgpt(&[
        "train", "--backend", "cpu", "--init", "tests/data/tiny/model.bin", "--train", "tests/data/tiny/train.bin",
        "--batch", "2", "--seq-len", "16", "--steps", "6", "--val-every", "0", "--gen-tokens", "0",
        "--out", out.to_str().unwrap(), "--checkpoint-every", "1", "--keep-checkpoints", "2", "--keep-every", "3",
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let mut names: Vec<String> = std::fs::read_dir(&out).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect();
    names.sort();
    // and the loss curves, redrawn at every checkpoint
    let mut want = vec!["main.log".to_string(), "loss.png".to_string()];
    for s in [3, 5, 6] {
        want.push(format!("DONE_{s:08}"));
        want.push(format!("model_{s:08}.bin"));
        want.push(format!("state_{s:08}_00000.bin"));
    }
    want.sort();
    assert_eq!(names, want);
}

/// llm.c's outlier skipping (`--skip-loss-z`/`--skip-grad-z`, -sl/-sg): with a threshold no step
/// reaches, the split update path gives the plain run's losses exactly; with a tiny one, updates
/// are skipped, but only once the 128-step window is full.
#[test]
fn outlier_skipping() {
    let dir = tempfile::tempdir().unwrap();
    let run = |steps: &str, extra: &[&str], log: &str| {
        let log = dir.path().join(log);
        let mut args = vec![
            "train", "--backend", "cpu", "--init", "tests/data/tiny/model.bin", "--train", "tests/data/tiny/train.bin",
            "--batch", "2", "--seq-len", "16", "--steps", steps, "--val-every", "0", "--gen-tokens", "0",
            "--log-json", log.to_str().unwrap(),
        ];
        args.extend_from_slice(extra);
        let o = wgpt(&args);
        assert!(o.status.success(), "{}", stderr(&o));
        let losses: Vec<f64> = std::fs::read_to_string(&log)
            .unwrap()
            .lines()
            .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap()["train_loss"].as_f64())
            .collect();
        (losses, format!("{}{}", String::from_utf8_lossy(&o.stdout), stderr(&o)))
    };
    let (plain, _) = run("8", &[], "plain.jsonl");
    let (never, out) = run("8", &["--skip-loss-z", "1e9", "--skip-grad-z", "1e9"], "never.jsonl");
    assert_eq!(plain, never);
    assert!(!out.contains("skipped"), "{out}");
    let (_, out) = run("140", &["--skip-grad-z", "1e-6"], "tiny.jsonl");
    let skipped: Vec<usize> = out
        .lines()
        .filter(|l| l.contains("update skipped (grad norm z-score"))
        .map(|l| l.split_whitespace().nth(1).unwrap().trim_end_matches(':').parse().unwrap())
        .collect();
    assert!(!skipped.is_empty(), "nothing skipped:\n{out}");
    assert!(skipped.iter().all(|&s| s > 128), "skipped before the window was full: {skipped:?}");
}

/// `wgpt eval` (llm.c's HellaSwag scoring) on a synthetic eval file for the tiny model. Each
/// completion's mean loss is first computed here one row at a time (B=1), independently of the
/// eval's batching; labels are set so that exactly the even-numbered examples are right. Five
/// examples at --batch 8 (two per batch) also exercise a partial last batch.
#[test]
fn eval_scores_multiple_choice_like_llmc() {
    use wgpt::data::evalset::{read_eval_file, write_eval_file, EvalExample};
    use wgpt::train::session::Session;
    let (cfg, params) = wgpt::model::checkpoint::read_checkpoint(std::path::Path::new("tests/data/tiny/model.bin")).unwrap();
    let mut seed = 12345u64;
    let mut tok = |n: usize| -> Vec<u16> {
        (0..n)
            .map(|_| {
                seed = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                ((seed >> 33) % cfg.v as u64) as u16
            })
            .collect()
    };
    let mut examples: Vec<EvalExample> = (0..5)
        .map(|i| EvalExample {
            index: i,
            label: 0,
            context: tok(3 + i as usize),
            completions: (0..4).map(|c| tok(1 + (c + i as usize) % 4)).collect(),
        })
        .collect();
    let t = examples.iter().map(|e| e.longest_row()).max().unwrap();
    let backend: Box<dyn wgpt::backend::Backend> = Box::new(wgpt::backend::cpu::CpuBackend::new(Some(2)).unwrap());
    let mut sess = Session::new(backend, wgpt::graph::build_forward(&cfg, 1, t)).unwrap();
    sess.upload_params(&params).unwrap();
    for (i, e) in examples.iter_mut().enumerate() {
        let means: Vec<f64> = e
            .completions
            .iter()
            .map(|c| {
                let row: Vec<i32> = e.context.iter().chain(c).map(|&v| v as i32).collect();
                let mut x = vec![0i32; t];
                let mut y = vec![0i32; t];
                x[..row.len()].copy_from_slice(&row);
                y[..row.len() - 1].copy_from_slice(&row[1..]);
                let l = sess.eval_losses(&x, &y).unwrap();
                let p0 = e.context.len() - 1;
                l[p0..p0 + c.len()].iter().map(|&v| v as f64).sum::<f64>() / c.len() as f64
            })
            .collect();
        let best = (0..4).min_by(|&a, &b| means[a].partial_cmp(&means[b]).unwrap()).unwrap();
        e.label = if i % 2 == 0 { best as u16 } else { ((best + 1) % 4) as u16 };
    }
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("mc.bin");
    write_eval_file(&file, &examples).unwrap();
    assert_eq!(read_eval_file(&file).unwrap(), examples);
    let o = wgpt(&[
        "eval", "--model", "tests/data/tiny/model.bin", "--data", file.to_str().unwrap(), "--batch", "8", "--backend", "cpu", "--json",
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let out = String::from_utf8_lossy(&o.stdout);
    let r: serde_json::Value = serde_json::from_str(out.lines().last().unwrap()).unwrap();
    assert_eq!((r["correct"].as_u64(), r["total"].as_u64()), (Some(3), Some(5)), "{out}");
    // during training (llm.c -h 1): scored after steps 1 and 2 (not at step 0), logged to JSON and main.log
    let log = dir.path().join("train.jsonl");
    let out_dir = dir.path().join("run");
    let o = wgpt(&[
        "train", "--backend", "cpu", "--init", "tests/data/tiny/model.bin", "--train", "tests/data/tiny/train.bin",
        "--val", "tests/data/tiny/train.bin", "--batch", "8", "--seq-len", "16", "--steps", "2", "--val-every", "1",
        "--val-batches", "1", "--gen-tokens", "0", "--hellaswag", file.to_str().unwrap(), "--log-json", log.to_str().unwrap(),
        "--out", out_dir.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let evals: Vec<(u64, u64)> = std::fs::read_to_string(&log)
        .unwrap()
        .lines()
        .filter_map(|l| {
            let v: serde_json::Value = serde_json::from_str(l).unwrap();
            Some((v["step"].as_u64()?, v["eval_total"].as_u64()?))
        })
        .collect();
    assert_eq!(evals, vec![(1, 5), (2, 5)]);
    let main_log = std::fs::read_to_string(out_dir.join("main.log")).unwrap();
    assert!(main_log.lines().any(|l| l.starts_with("s:2 eval:")), "{main_log}");
    // two ranks (in one process) score 3 and 2 of the examples, each in its micro-batch of 4,
    // and log the same counts as one rank; a split that leaves a rank fewer than 4 rows is refused
    let counts = |log: &std::path::Path| -> Vec<(u64, u64, u64)> {
        std::fs::read_to_string(log)
            .unwrap()
            .lines()
            .filter_map(|l| {
                let v: serde_json::Value = serde_json::from_str(l).unwrap();
                Some((v["step"].as_u64()?, v["eval_correct"].as_u64()?, v["eval_total"].as_u64()?))
            })
            .collect()
    };
    let one = counts(&log);
    for (split, ok) in [("4,4", true), ("5,3", false)] {
        let log2 = dir.path().join(format!("train-{split}.jsonl"));
        let o = wgpt(&[
            "train", "--devices", "cpu,cpu", "--batch-split", split, "--init", "tests/data/tiny/model.bin", "--train", "tests/data/tiny/train.bin",
            "--val", "tests/data/tiny/train.bin", "--batch", "8", "--seq-len", "16", "--steps", "2", "--val-every", "1",
            "--val-batches", "1", "--gen-tokens", "0", "--hellaswag", file.to_str().unwrap(), "--log-json", log2.to_str().unwrap(),
        ]);
        if ok {
            assert!(o.status.success(), "{}", stderr(&o));
            assert_eq!(counts(&log2), one, "two ranks' eval differs from one rank's");
        } else {
            let err = stderr(&o);
            assert!(!o.status.success() && err.lines().next().unwrap_or("").starts_with("error: --hellaswag: each rank scores"), "{err}");
        }
    }
    // too few rows for one example, and a row longer than --seq-len: one-line errors naming the flag
    for (flag, args) in [("--batch", vec!["--batch", "2"]), ("--seq-len", vec!["--seq-len", "4"])] {
        let mut a = vec!["eval", "--model", "tests/data/tiny/model.bin", "--data", file.to_str().unwrap(), "--backend", "cpu"];
        a.extend(args);
        let o = wgpt(&a);
        assert!(!o.status.success());
        let err = stderr(&o);
        assert!(err.lines().any(|l| l.starts_with("error") && l.contains(flag)), "{err}");
    }
}
