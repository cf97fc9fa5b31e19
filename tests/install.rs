//! wgpt as an installed tool (issue 13, items 1 and 6): the main job needs no files (the
//! Shakespeare shards and gpt2_tokenizer.bin are built into the binary), so it runs from any
//! directory, as after `cargo install`; and the CLI brings its shell completions and man pages.
//!
//! `cargo install --path .` is run too, into a temporary root, with this build's target directory
//! (`--target-dir`, `--locked --offline`): then it rebuilds nothing and takes about a second. (In
//! its own fresh target directory, as users run it, it compiles every dependency: minutes.)

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

const SUBCOMMANDS: &[&str] =
    &["train", "sample", "verify", "prepare", "eval", "bench", "info", "kernels", "convert", "completions", "man"];

fn wgpt(cwd: &Path, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_wgpt")).current_dir(cwd).args(args).output().unwrap()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn repo(p: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(p)
}

/// The losses of a `--log-json` file (train and val, in order), without the timings.
fn losses(log: &Path) -> Vec<(String, f64)> {
    std::fs::read_to_string(log)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
        .flat_map(|v| {
            ["train_loss", "val_loss"]
                .into_iter()
                .filter_map(|k| v.get(k).and_then(|x| x.as_f64()).map(|x| (format!("{}:{k}", v["step"]), x)))
                .collect::<Vec<_>>()
        })
        .collect()
}

/// A few steps of a small run (the main job's model, smaller batches).
const SMALL: &[&str] =
    &["train", "--backend", "cpu", "--steps", "3", "--batch", "2", "--seq-len", "32", "--val-every", "1", "--val-batches", "2", "--gen-tokens", "12"];

fn assert_trained_and_sampled(o: &Output, what: &str) {
    let err = stderr(o);
    assert!(o.status.success(), "{what}: exit {:?}\n{err}", o.status);
    let sample = err.split("--- sample at step 3 ---").nth(1).unwrap_or_else(|| panic!("{what}: no sample printed:\n{err}"));
    assert!(sample.lines().nth(1).map(|l| !l.trim().is_empty()).unwrap_or(false), "{what}: empty sample:\n{err}");
}

#[test]
fn main_job_runs_from_an_empty_directory_on_the_bundled_data() {
    let cwd = tempfile::tempdir().unwrap();
    let log = cwd.path().join("bundled.jsonl");
    let o = wgpt(cwd.path(), &[SMALL, &["--log-json", log.to_str().unwrap()]].concat());
    assert_trained_and_sampled(&o, "no --train/--val from an empty directory");
    let bundled = losses(&log);
    assert_eq!(bundled.iter().filter(|(k, _)| k.ends_with("val_loss")).count(), 4, "{bundled:?}");
    // nothing but what was asked for is written to the current directory (no temporary shards)
    let written: Vec<_> = std::fs::read_dir(cwd.path()).unwrap().map(|e| e.unwrap().file_name()).collect();
    assert_eq!(written, vec![std::ffi::OsString::from("bundled.jsonl")]);

    // the same shards named by --train/--val/--tokenizer (the repository's data/, absolute paths)
    // give the same run, loss for loss: the in-memory shards are read exactly like the files
    let flog = cwd.path().join("files.jsonl");
    let (train, val, tok) = (repo("data/shakespeare_train.bin"), repo("data/shakespeare_val.bin"), repo("data/gpt2_tokenizer.bin"));
    let explicit =
        ["--train", train.to_str().unwrap(), "--val", val.to_str().unwrap(), "--tokenizer", tok.to_str().unwrap()];
    let o2 = wgpt(cwd.path(), &[SMALL, &explicit, &["--log-json", flog.to_str().unwrap()]].concat());
    assert_trained_and_sampled(&o2, "explicit --train/--val");
    assert_eq!(losses(&flog), bundled, "bundled and file shards gave different runs");
    let sample = |o: &Output| stderr(o).split("--- sample at step 3 ---").nth(1).map(str::to_owned);
    assert_eq!(sample(&o2), sample(&o), "bundled and file tokenizers decoded the sample differently");
}

#[test]
fn explicit_data_flags_still_resolve_from_the_current_directory() {
    let cwd = tempfile::tempdir().unwrap();
    // a relative --train is looked up where wgpt runs, as before: not found in an empty directory
    let o = wgpt(cwd.path(), &[SMALL, &["--train", "data/shakespeare_train.bin"]].concat());
    let err = stderr(&o);
    assert!(!o.status.success(), "{err}");
    assert_eq!(err.trim().lines().count(), 1, "not a one-line error:\n{err}");
    assert!(err.contains("--train") && err.contains("data/shakespeare_train.bin"), "{err}");
    let o = wgpt(cwd.path(), &[SMALL, &["--val", "nothing_here_*.bin"]].concat());
    let err = stderr(&o);
    assert!(!o.status.success() && err.trim().lines().count() == 1 && err.contains("--val"), "{err}");
    // and from the repository root the relative paths work
    let o = wgpt(Path::new(env!("CARGO_MANIFEST_DIR")), &[SMALL, &["--train", "data/shakespeare_train.bin", "--val", "data/shakespeare_val.bin"]].concat());
    assert_trained_and_sampled(&o, "relative --train/--val from the repository root");
}

#[test]
fn help_says_what_the_data_defaults_are() {
    let cwd = tempfile::tempdir().unwrap();
    let o = wgpt(cwd.path(), &["train", "--help"]);
    let help = stdout(&o);
    assert!(o.status.success());
    for flag in ["--train", "--val"] {
        let text = help.split(&format!("      {flag} <GLOB>")).nth(1).unwrap_or_else(|| panic!("{flag} missing:\n{help}"));
        let text: String = text.split("\n\n").next().unwrap().split_whitespace().collect::<Vec<_>>().join(" ");
        assert!(text.contains("[default: the bundled Shakespeare shards"), "{flag}: {text}");
    }
    assert!(help.contains("the bundled gpt2_tokenizer.bin"), "{help}");
}

#[test]
fn completions_name_every_subcommand() {
    let cwd = tempfile::tempdir().unwrap();
    for shell in ["bash", "zsh", "fish", "elvish", "powershell"] {
        let o = wgpt(cwd.path(), &["completions", shell]);
        let script = stdout(&o);
        assert!(o.status.success(), "{shell}: {}", stderr(&o));
        assert!(script.len() > 500, "{shell}: script of {} bytes", script.len());
        for sub in SUBCOMMANDS {
            assert!(script.contains(sub), "{shell} completions do not name '{sub}'");
        }
        // the train flags are completed too
        assert!(script.contains("checkpoint-every"), "{shell}: no train flags");
        // the script parses in its shell, where that shell is installed (bash always is here)
        let check: Option<(&str, Vec<&str>)> = match shell {
            "bash" => Some(("bash", vec!["-n"])),
            "zsh" => Some(("zsh", vec!["-n"])),
            "fish" => Some(("fish", vec!["--no-execute"])),
            _ => None,
        };
        if let Some((prog, args)) = check {
            let path = cwd.path().join(format!("wgpt.{shell}"));
            std::fs::write(&path, &script).unwrap();
            match Command::new(prog).args(&args).arg(&path).output() {
                Ok(r) => assert!(r.status.success(), "{prog} -n rejects the script: {}", String::from_utf8_lossy(&r.stderr)),
                Err(e) => {
                    assert!(shell != "bash", "bash is needed to check the bash completions: {e}");
                    eprintln!("{prog} not installed: {shell} completions not parsed ({e})");
                }
            }
        }
    }
    let o = wgpt(cwd.path(), &["completions", "tcsh"]);
    assert!(!o.status.success() && stderr(&o).contains("tcsh"), "{}", stderr(&o));
    assert!(!String::from_utf8_lossy(&o.stderr).contains("panicked"));
}

#[test]
fn man_pages_name_every_subcommand() {
    let cwd = tempfile::tempdir().unwrap();
    let o = wgpt(cwd.path(), &["man"]);
    let page = stdout(&o);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(page.contains(".TH wgpt 1"), "not a roff man page:\n{page}");
    for sub in SUBCOMMANDS {
        assert!(page.contains(&format!("wgpt\\-{sub}")), "the man page does not name '{sub}'");
    }
    // one command's page lists its flags with their defaults
    let o = wgpt(cwd.path(), &["man", "train"]);
    let train = stdout(&o);
    assert!(o.status.success() && train.contains(".TH wgpt-train 1") && train.contains(env!("CARGO_PKG_VERSION")), "{train}");
    assert!(train.contains("\\-\\-checkpoint\\-every") && train.contains("the bundled Shakespeare shards"), "{train}");
    // every page into a directory
    let dir = cwd.path().join("man1");
    let o = wgpt(cwd.path(), &["man", "--out", dir.to_str().unwrap()]);
    assert!(o.status.success(), "{}", stderr(&o));
    for name in std::iter::once("wgpt.1".to_string()).chain(SUBCOMMANDS.iter().map(|s| format!("wgpt-{s}.1"))) {
        let p = dir.join(&name);
        assert!(std::fs::metadata(&p).map(|m| m.len() > 100).unwrap_or(false), "{} missing or empty", p.display());
    }
    // bad input: one line, non-zero
    let o = wgpt(cwd.path(), &["man", "nosuch"]);
    let err = stderr(&o);
    assert!(!o.status.success() && err.trim().lines().count() == 1 && err.contains("nosuch"), "{err}");
    let blocker = cwd.path().join("a_file");
    std::fs::write(&blocker, b"").unwrap();
    let o = wgpt(cwd.path(), &["man", "--out", blocker.join("x").to_str().unwrap()]);
    let err = stderr(&o);
    assert!(!o.status.success() && err.trim().lines().count() == 1 && err.contains("a_file"), "{err}");
}

/// `cargo install --path .`, then `wgpt train` (small flags) in an empty directory: trains and samples.
#[test]
fn cargo_install_then_train_in_an_empty_directory() {
    let built = PathBuf::from(env!("CARGO_BIN_EXE_wgpt"));
    // <target>/release/wgpt: reuse that target directory so nothing is recompiled. A debug-profile
    // test run has no release build to reuse (installing would compile everything): skip then.
    let profile_dir = built.parent().unwrap();
    if profile_dir.file_name() != Some(std::ffi::OsStr::new("release")) {
        eprintln!("skipped: the binary under test is not a release build ({}); run `cargo test --release`", built.display());
        return;
    }
    let target_dir = profile_dir.parent().unwrap();
    let root = tempfile::tempdir().unwrap();
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let t0 = std::time::Instant::now();
    let mut child = Command::new(cargo)
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .args(["install", "--offline", "--locked", "--path", "."])
        .arg("--root")
        .arg(root.path())
        .arg("--target-dir")
        .arg(target_dir)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    // (it may wait for the build-directory lock while another cargo builds)
    while child.try_wait().unwrap().is_none() {
        if t0.elapsed().as_secs() > 600 {
            let _ = child.kill();
            panic!("cargo install did not finish within 10 minutes");
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    let o = child.wait_with_output().unwrap();
    assert!(o.status.success(), "cargo install failed:\n{}", stderr(&o));
    eprintln!("cargo install took {:.1} s", t0.elapsed().as_secs_f64());
    let installed = root.path().join("bin").join(format!("wgpt{}", std::env::consts::EXE_SUFFIX));
    assert!(installed.is_file(), "{} missing", installed.display());

    let cwd = tempfile::tempdir().unwrap();
    let o = Command::new(&installed).current_dir(cwd.path()).args(SMALL).output().unwrap();
    assert_trained_and_sampled(&o, "the installed wgpt in an empty directory");
    assert_eq!(std::fs::read_dir(cwd.path()).unwrap().count(), 0, "it wrote into the current directory");
}
