//! `wgpt plot`: a valid PNG of the requested size with one curve (colour) per input, from
//! --log-json files, main.log files and --out directories; `--x tokens`; every bad input a
//! one-line error naming the file, with no PNG left behind; `wgpt train --log-json` step lines
//! carry `tokens`; `write_loss_png` (the checkpoint's DIR/loss.png).

mod common;

use common::wgpt;
use std::path::Path;
use wgpt::plot::PALETTE;

/// A --log-json file: val at 0, 10, 20; train steps 1..=20 falling from `start`.
fn write_json_log(path: &Path, start: f64, tokens: bool) {
    let mut s = format!("{{\"step\":0,\"val_loss\":{start}}}\n");
    for step in 1..=20u64 {
        let loss = start - 0.1 * step as f64 + if step % 2 == 0 { 0.05 } else { 0.0 };
        let tok = if tokens { format!(",\"tokens\":{}", step * 256) } else { String::new() };
        s += &format!("{{\"step\":{step},\"train_loss\":{loss},\"lr\":0.001,\"grad_norm\":1.0,\"ms\":5.0,\"tokens_per_s\":5e4{tok}}}\n");
        if step % 10 == 0 {
            s += &format!("{{\"step\":{step},\"val_loss\":{}}}\n", start - 0.09 * step as f64);
            s += &format!("{{\"step\":{step},\"eval_accuracy\":0.25,\"eval_correct\":1,\"eval_total\":4}}\n");
        }
    }
    std::fs::write(path, s).unwrap();
}

/// An llm.c-style main.log with the same shape.
fn write_main_log(path: &Path, start: f64) {
    let mut s = format!("s:0 tel:{start:.4}\n");
    for step in 1..=20u64 {
        s += &format!("s:{step} trl:{:.4} lr:0.001000 norm:1.00\n", start - 0.1 * step as f64);
        if step % 10 == 0 {
            s += &format!("s:{step} tel:{:.4}\ns:{step} eval:0.2500\n", start - 0.09 * step as f64);
        }
    }
    std::fs::write(path, s).unwrap();
}

/// Decode a PNG (checking its signature): (width, height, RGB bytes).
fn decode(path: &Path) -> (u32, u32, Vec<u8>) {
    let bytes = std::fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    assert_eq!(&bytes[..8], b"\x89PNG\r\n\x1a\n", "PNG signature");
    let mut r = png::Decoder::new(std::io::Cursor::new(bytes)).read_info().expect("a decodable PNG");
    let mut buf = vec![0; r.output_buffer_size().unwrap()];
    let info = r.next_frame(&mut buf).expect("a decodable PNG frame");
    assert_eq!(info.bit_depth, png::BitDepth::Eight);
    let rgb = match info.color_type {
        png::ColorType::Rgb => buf[..info.buffer_size()].to_vec(),
        png::ColorType::Rgba => buf[..info.buffer_size()].chunks(4).flat_map(|p| p[..3].to_vec()).collect(),
        c => panic!("unexpected colour type {c:?}"),
    };
    (info.width, info.height, rgb)
}

/// Pixels within 12 of `c` in every channel.
fn count_colour(rgb: &[u8], c: (u8, u8, u8)) -> usize {
    let near = |a: u8, b: u8| (a as i32 - b as i32).abs() <= 12;
    rgb.chunks(3).filter(|p| near(p[0], c.0) && near(p[1], c.1) && near(p[2], c.2)).count()
}

fn ok(args: &[&str]) -> String {
    let o = wgpt(args);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "wgpt {args:?} failed:\n{err}");
    assert!(!err.contains("internal error"), "{err}");
    String::from_utf8_lossy(&o.stdout).into_owned()
}

/// Fails with exactly one stderr line that contains `names` (the file) and `says`, writes no
/// PNG and leaves no temporary file in `dir`.
fn fails(dir: &Path, args: &[&str], names: &str, says: &str) {
    let before: Vec<_> = std::fs::read_dir(dir).unwrap().map(|e| e.unwrap().file_name()).collect();
    let o = wgpt(args);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success(), "wgpt {args:?} should fail");
    assert_eq!(err.trim_end().lines().count(), 1, "one line, got:\n{err}");
    assert!(err.starts_with("error: "), "{err}");
    assert!(err.contains(names), "the message should name {names}: {err}");
    assert!(err.contains(says), "the message should say {says:?}: {err}");
    assert!(!err.contains("panicked") && !err.contains("internal error"), "{err}");
    let after: Vec<_> = std::fs::read_dir(dir).unwrap().map(|e| e.unwrap().file_name()).collect();
    assert_eq!(before, after, "nothing written (no PNG, no temporary file)");
}

#[test]
fn two_json_logs_give_a_png_with_one_curve_each() {
    let d = tempfile::tempdir().unwrap();
    let (a, b) = (d.path().join("fp32.jsonl"), d.path().join("fp16.jsonl"));
    write_json_log(&a, 10.0, true);
    write_json_log(&b, 8.0, true);
    let out = d.path().join("curves.png");
    let o = ok(&["plot", a.to_str().unwrap(), b.to_str().unwrap(), "--out", out.to_str().unwrap(), "--width", "800", "--height", "500"]);
    assert!(o.contains("fp32.jsonl (20 train, 3 val points)") && o.contains("fp16.jsonl (20 train, 3 val points)"), "{o}");
    let (w, h, rgb) = decode(&out);
    assert_eq!((w, h), (800, 500));
    let (c0, c1) = (count_colour(&rgb, PALETTE[0]), count_colour(&rgb, PALETTE[1]));
    assert!(c0 > 200 && c1 > 200, "both runs' colours should be drawn: {c0} and {c1} pixels");
    assert_eq!(count_colour(&rgb, PALETTE[2]), 0, "only two runs");

    // one input: one colour
    let one = d.path().join("one.png");
    ok(&["plot", a.to_str().unwrap(), "--out", one.to_str().unwrap()]);
    let (w, h, rgb) = decode(&one);
    assert_eq!((w, h), (1024, 640), "the default size");
    assert!(count_colour(&rgb, PALETTE[0]) > 200);
    assert_eq!(count_colour(&rgb, PALETTE[1]), 0, "one input, one curve");
}

#[test]
fn main_log_files_and_directories() {
    let d = tempfile::tempdir().unwrap();
    let (run_a, run_b) = (d.path().join("run_a"), d.path().join("run_b"));
    std::fs::create_dir(&run_a).unwrap();
    std::fs::create_dir(&run_b).unwrap();
    write_main_log(&run_a.join("main.log"), 10.0);
    write_main_log(&run_b.join("main.log"), 9.0);
    let j = d.path().join("c.jsonl");
    write_json_log(&j, 8.0, false);
    let out = d.path().join("p.png");
    // a directory, a main.log (named by its directory), and a JSON log without token counts (fine for --x step)
    let o = ok(&["plot", run_a.to_str().unwrap(), run_b.join("main.log").to_str().unwrap(), j.to_str().unwrap(), "--out", out.to_str().unwrap()]);
    for name in ["run_a", "run_b", "c.jsonl"] {
        assert!(o.contains(&format!("{name} (20 train, 3 val points)")), "{o}");
    }
    let (_, _, rgb) = decode(&out);
    for (i, c) in PALETTE[..3].iter().enumerate() {
        assert!(count_colour(&rgb, *c) > 200, "run {i}'s colour");
    }
    assert_eq!(count_colour(&rgb, PALETTE[3]), 0);
    // two inputs of the same name are labelled by their paths
    std::fs::copy(&j, run_a.join("c.jsonl")).unwrap();
    let o = ok(&["plot", j.to_str().unwrap(), run_a.join("c.jsonl").to_str().unwrap(), "--out", out.to_str().unwrap(), "--title", "same names"]);
    assert!(o.contains(&format!("{} (", j.display())) && o.contains(&format!("{} (", run_a.join("c.jsonl").display())), "{o}");
}

#[test]
fn x_tokens_on_json_logs() {
    let d = tempfile::tempdir().unwrap();
    let (a, b) = (d.path().join("a.jsonl"), d.path().join("b.jsonl"));
    write_json_log(&a, 10.0, true);
    write_json_log(&b, 9.5, true);
    let out = d.path().join("t.png");
    ok(&["plot", "--x", "tokens", a.to_str().unwrap(), b.to_str().unwrap(), "--out", out.to_str().unwrap(), "--width", "640", "--height", "480"]);
    let (w, h, rgb) = decode(&out);
    assert_eq!((w, h), (640, 480));
    assert!(count_colour(&rgb, PALETTE[0]) > 100 && count_colour(&rgb, PALETTE[1]) > 100);
}

#[test]
fn bad_inputs_are_one_line_errors_naming_the_file() {
    let d = tempfile::tempdir().unwrap();
    let p = |n: &str| d.path().join(n).to_str().unwrap().to_string();
    let out = p("out.png");
    let good = p("good.jsonl");
    write_json_log(Path::new(&good), 10.0, true);

    // a missing file, alone and beside a good one
    fails(d.path(), &["plot", &p("missing.jsonl"), "--out", &out], "missing.jsonl", "No such file");
    fails(d.path(), &["plot", &good, &p("missing.jsonl"), "--out", &out], "missing.jsonl", "No such file");
    // a directory without a main.log
    std::fs::create_dir(d.path().join("empty_dir")).unwrap();
    fails(d.path(), &["plot", &p("empty_dir"), "--out", &out], "main.log", "No such file");
    // an empty file; a log with no loss lines
    std::fs::write(p("empty.jsonl"), "").unwrap();
    fails(d.path(), &["plot", &p("empty.jsonl"), "--out", &out], "empty.jsonl", "no loss lines");
    std::fs::write(p("noloss.jsonl"), "{\"step\":1,\"eval_accuracy\":0.3}\n").unwrap();
    fails(d.path(), &["plot", &p("noloss.jsonl"), "--out", &out], "noloss.jsonl", "no loss lines");
    // malformed lines, named by number
    std::fs::write(p("bad.jsonl"), "{\"step\":1,\"train_loss\":5.0}\n{\"step\":2,\"train_lo\n").unwrap();
    fails(d.path(), &["plot", &good, &p("bad.jsonl"), "--out", &out], "bad.jsonl", "line 2");
    std::fs::write(p("badloss.jsonl"), "{\"step\":1,\"train_loss\":\"high\"}\n").unwrap();
    fails(d.path(), &["plot", &p("badloss.jsonl"), "--out", &out], "badloss.jsonl", "line 1");
    std::fs::write(p("nostep.jsonl"), "{\"val_loss\":5.0}\n").unwrap();
    fails(d.path(), &["plot", &p("nostep.jsonl"), "--out", &out], "nostep.jsonl", "line 1");
    std::fs::write(p("main.log"), "s:0 tel:10.0\ns:1 trl:9.5\nstep 2 loss 9\n").unwrap();
    fails(d.path(), &["plot", &p("main.log"), "--out", &out], "main.log", "line 3");
    std::fs::write(p("main2.log"), "s:1 trl:abc\n").unwrap();
    fails(d.path(), &["plot", &p("main2.log"), "--out", &out], "main2.log", "line 1");
    // --x tokens: main.log has no token counts, nor an older JSON log
    write_main_log(&d.path().join("ok_main.log"), 10.0);
    fails(d.path(), &["plot", "--x", "tokens", &good, &p("ok_main.log"), "--out", &out], "ok_main.log", "token");
    let old = p("old.jsonl");
    write_json_log(Path::new(&old), 10.0, false);
    fails(d.path(), &["plot", "--x", "tokens", &old, "--out", &out], "old.jsonl", "tokens");
    // an --out whose folder does not exist
    fails(d.path(), &["plot", &good, "--out", &p("no/such/dir/x.png")], "x.png", "No such file");
    // sizes out of range
    fails(d.path(), &["plot", &good, "--out", &out, "--width", "10"], "--width", "outside");
}

#[test]
fn train_log_json_has_tokens_and_plots_by_tokens() {
    let d = tempfile::tempdir().unwrap();
    let log = d.path().join("train.jsonl");
    // B=4, T=32, --total-batch 256: 256 tokens per step
    ok(&[
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
        "32",
        "--total-batch",
        "256",
        "--steps",
        "3",
        "--val-every",
        "2",
        "--gen-tokens",
        "0",
        "--log-json",
        log.to_str().unwrap(),
        "--out",
        d.path().join("run").to_str().unwrap(),
    ]);
    let steps: Vec<serde_json::Value> = std::fs::read_to_string(&log)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
        .filter(|v| v.get("train_loss").is_some())
        .collect();
    assert_eq!(steps.len(), 3);
    for v in &steps {
        assert_eq!(v["tokens"].as_u64(), Some(v["step"].as_u64().unwrap() * 256), "{v}");
    }
    let out = d.path().join("t.png");
    let o = ok(&["plot", "--x", "tokens", log.to_str().unwrap(), "--out", out.to_str().unwrap()]);
    assert!(o.contains("train.jsonl (3 train, 3 val points)"), "{o}");
    // by step, the log and the --out directory's main.log are the same run
    ok(&["plot", log.to_str().unwrap(), d.path().join("run").to_str().unwrap(), "--out", out.to_str().unwrap()]);
    let (_, _, rgb) = decode(&out);
    assert!(count_colour(&rgb, PALETTE[0]) > 50 && count_colour(&rgb, PALETTE[1]) > 50);
}

#[test]
fn write_loss_png_draws_a_run_directory() {
    let d = tempfile::tempdir().unwrap();
    write_main_log(&d.path().join("main.log"), 10.0);
    wgpt::plot::write_loss_png(d.path()).unwrap();
    let (w, h, rgb) = decode(&d.path().join("loss.png"));
    assert_eq!((w, h), (1024, 640));
    assert!(count_colour(&rgb, PALETTE[0]) > 200);
    let e = wgpt::plot::write_loss_png(&d.path().join("nothing")).unwrap_err().to_string();
    assert!(e.contains("main.log") && !e.contains('\n'), "{e}");
}
