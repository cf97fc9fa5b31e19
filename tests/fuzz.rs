//! Mutation fuzzing of every file parser: llm.c model checkpoints (v3, v5), training state
//! (+ the loader restore it feeds), token shards (+ the loader), gpt2_tokenizer.bin, the debug
//! state, the HellaSwag eval file, and Hugging Face model.safetensors + config.json.
//!
//! Each format starts from valid files made here (small synthetic models and data, plus the tiny
//! fixture), then flips bits, sets bytes, truncates, extends, deletes and duplicates ranges, edits
//! header fields to boundary values and, for the JSON parts, edits the parsed JSON (a value
//! replaced, a key dropped, an array grown) and writes it back. The property, checked for
//! thousands of cases per format within a fixed time budget, is that every case ends either in a
//! valid load (whose contents are then checked for consistency) or in a typed error
//! (`wgpt::error::Error` of the user kind) whose message is one line — never a panic (caught here
//! and reported with the case), and never an allocation larger than the file justifies: a global
//! allocator below records the largest single allocation of each case, which must stay under
//! 8 × the input size + 4 MiB (a header claiming 2^31 tokens must not get a 4 GiB buffer, which
//! Linux would hand out lazily without complaint). An absurd request (over 1 GiB) aborts at once
//! with the case named instead of swapping the machine.
//!
//! Seeded (the same cases every run); `WGPT_FUZZ_SECS` and `WGPT_FUZZ_CASES` raise the budget
//! per format for a longer local run, `WGPT_FUZZ_SEED` changes the cases. Inputs that fail are
//! saved under `target/tmp/fuzz-failures/`. Release builds do not check integer overflow; to find
//! overflows too, build with the checks on, in a target folder of its own:
//! `CARGO_PROFILE_RELEASE_OVERFLOW_CHECKS=true CARGO_TARGET_DIR=target/ovf cargo test --release --test fuzz`.

mod common;
use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::{Cell, RefCell};
use std::collections::HashSet;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use wgpt::data::evalset::{read_eval_file, write_eval_file, EvalExample};
use wgpt::data::{write_shard, DataLoader, LoaderOptions, MemoryShard, Tokenizer};
use wgpt::error::{Error, ErrorKind};
use wgpt::model::checkpoint::{read_checkpoint, read_header, write_checkpoint, Precision};
use wgpt::model::{Config, ParamLayout};
use wgpt::train::outlier::OutlierDetector;
use wgpt::train::state::{read_state, write_state, OutlierWindows, StateExtra, TrainState};

// ---------------------------------------------------------------------------------------------
// the allocation meter

struct Meter;

thread_local! {
    /// the largest single allocation (bytes) since the last reset, on this thread
    static LARGEST: Cell<usize> = const { Cell::new(0) };
    /// the case being run, for the abort message
    static CASE: RefCell<String> = const { RefCell::new(String::new()) };
    static IN_CASE: Cell<bool> = const { Cell::new(false) };
    /// where the last panic inside a case happened
    static PANIC_AT: RefCell<String> = const { RefCell::new(String::new()) };
}

/// Panics inside a case are reported with the case (their location kept here), not printed;
/// everything else goes to the default hook. Installed once: tests run on parallel threads.
fn quiet_panics_in_cases() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        let default = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            if IN_CASE.with(|c| c.get()) {
                let at = info.location().map(|l| l.to_string()).unwrap_or_default();
                PANIC_AT.with(|p| *p.borrow_mut() = at);
            } else {
                default(info)
            }
        }));
    });
}

const ABSURD: usize = 1 << 30;

fn note(size: usize) {
    let _ = LARGEST.try_with(|c| {
        if size > c.get() {
            c.set(size)
        }
    });
    if size > ABSURD && IN_CASE.try_with(|c| c.get()).unwrap_or(false) {
        use std::io::Write;
        let mut err = std::io::stderr().lock();
        let _ = write!(err, "\nfuzz: a parser asked for {size} bytes at once; case: ");
        let _ = CASE.try_with(|c| c.try_borrow().map(|s| err.write_all(s.as_bytes())));
        let _ = writeln!(err);
        std::process::abort();
    }
}

unsafe impl GlobalAlloc for Meter {
    unsafe fn alloc(&self, l: Layout) -> *mut u8 {
        note(l.size());
        System.alloc(l)
    }
    unsafe fn alloc_zeroed(&self, l: Layout) -> *mut u8 {
        note(l.size());
        System.alloc_zeroed(l)
    }
    unsafe fn realloc(&self, p: *mut u8, l: Layout, new: usize) -> *mut u8 {
        note(new);
        System.realloc(p, l, new)
    }
    unsafe fn dealloc(&self, p: *mut u8, l: Layout) {
        System.dealloc(p, l)
    }
}

#[global_allocator]
static METER: Meter = Meter;

// ---------------------------------------------------------------------------------------------
// seeded randomness and mutations

/// SplitMix64.
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        common::splitmix64(&mut self.0)
    }
    fn below(&mut self, n: usize) -> usize {
        if n == 0 {
            0
        } else {
            (self.next() % n as u64) as usize
        }
    }
    fn one_in(&mut self, n: usize) -> bool {
        self.below(n) == 0
    }
    fn pick<T: Copy>(&mut self, xs: &[T]) -> T {
        xs[self.below(xs.len())]
    }
    fn bytes(&mut self, n: usize) -> Vec<u8> {
        (0..n).map(|_| self.next() as u8).collect()
    }
}

/// A header field: byte offset and width (4 = i32/u32, 8 = u64), little-endian.
type Field = (usize, usize);

const MAGICS: [i64; 6] = [20240326, 20240327, 20240328, 20240520, 20240522, 20240527];

fn interesting(rng: &mut Rng, cur: i64, width: usize) -> u64 {
    let v: i64 = match rng.below(4) {
        0 => rng.pick(&[0, 1, -1, 2, 3, 4, 5, 7, 8, 16, 63, 64, 127, 128, 255, 256, 1023, 1024, 65535, 65536]),
        1 => rng.pick(&[i32::MAX as i64, i32::MIN as i64, i32::MAX as i64 - 1, 1 << 30, 1 << 24, 1 << 31, 1 << 32, -2, i64::MAX, -1 << 40]),
        2 => match rng.below(7) {
            0 => cur.wrapping_add(1),
            1 => cur.wrapping_sub(1),
            2 => cur.wrapping_mul(2),
            3 => cur / 2,
            4 => cur.wrapping_neg(),
            5 => cur ^ (1i64 << rng.below(8 * width)),
            _ => cur.wrapping_add(rng.below(17) as i64 - 8),
        },
        _ => {
            if rng.one_in(3) {
                rng.pick(&MAGICS)
            } else {
                rng.next() as i64
            }
        }
    };
    v as u64
}

fn read_field(b: &[u8], (off, w): Field) -> i64 {
    if w == 8 {
        u64::from_le_bytes(b[off..off + 8].try_into().unwrap()) as i64
    } else {
        i32::from_le_bytes(b[off..off + 4].try_into().unwrap()) as i64
    }
}

fn write_field(b: &mut [u8], (off, w): Field, v: u64) {
    b[off..off + w].copy_from_slice(&v.to_le_bytes()[..w]);
}

/// One to three byte-level mutations of `base`; returns the bytes and what was done.
fn mutate(rng: &mut Rng, base: &[u8], fields: &[Field]) -> (Vec<u8>, String) {
    let mut b = base.to_vec();
    let mut what = Vec::new();
    for _ in 0..1 + rng.below(3) {
        let len = b.len();
        // positions favour the header, where the lengths and counts are
        let pos = |rng: &mut Rng| if rng.one_in(2) { rng.below(len.min(1040)) } else { rng.below(len) };
        match rng.below(9) {
            0 if len > 0 => {
                let k = 1 + rng.below(8);
                for _ in 0..k {
                    let p = pos(rng);
                    b[p] ^= 1 << rng.below(8);
                }
                what.push(format!("flip {k} bits"));
            }
            1 if len > 0 => {
                let p = pos(rng);
                let r = rng.next() as u8;
                b[p] = rng.pick(&[0u8, 0xff, 0x7f, 0x80, 1, r]);
                what.push(format!("set byte {p} to {}", b[p]));
            }
            2 => {
                let n = match rng.below(6) {
                    0 => 0,
                    1 => len.saturating_sub(1 + rng.below(4)),
                    2 => (1020 + rng.below(12)).min(len),
                    3 => rng.below(16).min(len),
                    4 => len / 2,
                    _ => rng.below(len + 1),
                };
                b.truncate(n);
                what.push(format!("truncate to {n}"));
            }
            3 => {
                let k = 1 + rng.below(64);
                let tail = if rng.one_in(2) { vec![0u8; k] } else { rng.bytes(k) };
                b.extend_from_slice(&tail);
                what.push(format!("extend by {k}"));
            }
            4 | 5 | 6 if !fields.is_empty() || len >= 4 => {
                let f = if !fields.is_empty() && !rng.one_in(4) {
                    rng.pick(fields)
                } else {
                    (4 * rng.below(len.min(1024) / 4), 4)
                };
                if f.0 + f.1 <= len {
                    let v = interesting(rng, read_field(&b, f), f.1);
                    write_field(&mut b, f, v);
                    what.push(format!("field @{} = {}", f.0, read_field(&b, f)));
                }
            }
            7 if len > 1 => {
                let a = pos(rng);
                let k = 1 + rng.below((len - a).min(256));
                b.drain(a..a + k);
                what.push(format!("delete {a}..{}", a + k));
            }
            8 if len > 1 => {
                let a = rng.below(len);
                let k = 1 + rng.below((len - a).min(256));
                let chunk = b[a..a + k].to_vec();
                let at = rng.below(len + 1);
                b.splice(at..at, chunk);
                what.push(format!("copy {a}..{} to {at}", a + k));
            }
            _ => {}
        }
    }
    (b, what.join(", "))
}

fn interesting_json(rng: &mut Rng) -> Value {
    match rng.below(34) {
        0 => Value::Null,
        1 => json!(true),
        2 => json!(-1),
        3 => json!(0),
        4 => json!(1),
        5 => json!(2),
        6 => json!(4),
        7 => json!(127),
        8 => json!(128),
        9 => json!(65535),
        10 => json!(65536),
        11 => json!(i32::MAX),
        12 => json!(1u64 << 31),
        13 => json!(1u64 << 32),
        14 => json!(1u64 << 53),
        15 => json!(u64::MAX),
        16 => json!(i64::MIN),
        17 => json!(0.5),
        18 => json!(1e308),
        19 => json!(""),
        20 => json!("F16"),
        21 => json!("BF16"),
        22 => json!("F64"),
        23 => json!("I64"),
        24 => json!("BOOL"),
        25 => json!("F8_E4M3"),
        26 => json!("line\nbreak"),
        27 => json!("gpt2"),
        28 => json!([]),
        29 => json!({}),
        30 => json!([0]),
        31 => json!([1, 2]),
        32 => json!([0, u64::MAX]),
        _ => json!(rng.next() % 100_000),
    }
}

fn json_paths(v: &Value, at: String, out: &mut Vec<String>) {
    match v {
        Value::Object(m) => {
            for (k, x) in m {
                let p = format!("{at}/{}", k.replace('~', "~0").replace('/', "~1"));
                out.push(p.clone());
                json_paths(x, p, out);
            }
        }
        Value::Array(a) => {
            // a few elements of long arrays are enough
            for i in [0, a.len() / 2, a.len().saturating_sub(1)] {
                if i < a.len() {
                    let p = format!("{at}/{i}");
                    out.push(p.clone());
                    json_paths(&a[i], p, out);
                }
            }
        }
        _ => {}
    }
}

/// One to two structural edits of a JSON document.
fn mutate_json(rng: &mut Rng, doc: &mut Value) -> String {
    let mut what = Vec::new();
    for _ in 0..1 + rng.below(2) {
        let mut paths = vec![String::new()];
        json_paths(doc, String::new(), &mut paths);
        let p = paths[rng.below(paths.len())].clone();
        let node = doc.pointer_mut(&p).unwrap();
        match (rng.below(6), &mut *node) {
            (0, Value::Object(m)) if !m.is_empty() => {
                let k = m.keys().nth(rng.below(m.len())).unwrap().clone();
                m.remove(&k);
                what.push(format!("drop {p}/{k}"));
            }
            (1, Value::Object(m)) => {
                m.insert(rng.pick(&["x", "line\nkey", "h.99.attn.c_proj.weight", "__metadata__"]).to_string(), interesting_json(rng));
                what.push(format!("add a key to {p}"));
            }
            (0 | 1, Value::Array(a)) => {
                match rng.below(4) {
                    0 => a.clear(),
                    1 => {
                        a.pop();
                    }
                    2 => a.push(interesting_json(rng)),
                    _ => {
                        let x = a.first().cloned().unwrap_or(json!(0));
                        let n = rng.pick(&[2usize, 100, 5000]);
                        a.extend(std::iter::repeat_n(x, n));
                    }
                }
                what.push(format!("resize array {p}"));
            }
            (2, Value::Number(n)) => {
                let cur = n.as_i64().unwrap_or(0);
                *node = json!(interesting(rng, cur, 8) as i64);
                what.push(format!("{p} = {node}"));
            }
            _ => {
                *node = interesting_json(rng);
                what.push(format!("{p} = {node}"));
            }
        }
    }
    what.join(", ")
}

// ---------------------------------------------------------------------------------------------
// the harness

fn env_or(name: &str, default: f64) -> f64 {
    std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

/// Per format: stop after this many cases or this long, whichever comes first.
fn budget() -> (usize, Duration) {
    (env_or("WGPT_FUZZ_CASES", 10000.0) as usize, Duration::from_secs_f64(env_or("WGPT_FUZZ_SECS", 2.0)))
}

/// A temporary folder, in memory where the system has one (thousands of small writes per test).
fn scratch() -> tempfile::TempDir {
    let shm = Path::new("/dev/shm");
    if shm.is_dir() {
        if let Ok(d) = tempfile::tempdir_in(shm) {
            return d;
        }
    }
    tempfile::tempdir().unwrap()
}

struct Case {
    files: Vec<(PathBuf, Vec<u8>)>,
    what: String,
}

/// The checks every error must pass (also for the errors a valid-looking load meets along the way).
fn check_error(e: &Error) {
    let msg = e.to_string();
    assert!(!msg.contains('\n') && !msg.contains('\r'), "error message is not one line: {msg:?}");
    assert!(!msg.is_empty(), "empty error message");
    assert_eq!(e.kind(), ErrorKind::User, "a bad file must be a user error, not {:?}: {msg}", e.kind());
}

/// Run `check` on cases made by `gen`; panics listing the failing cases.
fn fuzz(name: &str, mut gen: impl FnMut(&mut Rng) -> Case, check: impl Fn() -> Result<(), Error>) {
    let seed = env_or("WGPT_FUZZ_SEED", 13.0) as u64;
    let mut rng = Rng(seed ^ name.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| (h ^ b as u64).wrapping_mul(0x100_0000_01b3)));
    let (max_cases, max_time) = budget();
    let t0 = Instant::now();
    let (mut cases, mut loaded) = (0usize, 0usize);
    let mut kinds: HashSet<String> = HashSet::new();
    let mut failures: Vec<String> = Vec::new();
    let mut largest_seen = (0usize, 0usize);
    let fail_dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join("fuzz-failures");
    quiet_panics_in_cases();
    while cases < max_cases && t0.elapsed() < max_time {
        let case = gen(&mut rng);
        let total: usize = case.files.iter().map(|(_, b)| b.len()).sum();
        for (p, b) in &case.files {
            std::fs::write(p, b).unwrap();
        }
        CASE.with(|c| *c.borrow_mut() = format!("{name} #{cases}: {}", case.what));
        LARGEST.with(|c| c.set(0));
        IN_CASE.with(|c| c.set(true));
        let t = Instant::now();
        let res = catch_unwind(AssertUnwindSafe(|| {
            let r = check();
            if let Err(e) = &r {
                check_error(e);
            }
            r.err().map(|e| e.to_string())
        }));
        IN_CASE.with(|c| c.set(false));
        let dt = t.elapsed();
        let largest = LARGEST.with(|c| c.get());
        let limit = 8 * total + (4 << 20);
        if largest > largest_seen.0 {
            largest_seen = (largest, total);
        }
        let problem = match res {
            Err(p) => {
                let msg = p.downcast_ref::<String>().cloned().or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()));
                Some(format!("panicked at {}: {}", PANIC_AT.with(|p| p.borrow().clone()), msg.unwrap_or_default()))
            }
            Ok(_) if largest > limit => Some(format!("allocated {largest} bytes at once for {total} bytes of input")),
            Ok(_) if dt > Duration::from_secs(2) => Some(format!("took {:.1} s", dt.as_secs_f64())),
            Ok(None) => {
                loaded += 1;
                None
            }
            Ok(Some(msg)) => {
                // the kind of error, without the numbers, to show what the cases reached
                let cut: String = msg.chars().filter(|c| !c.is_ascii_digit()).collect();
                kinds.insert(cut.chars().take(70).collect());
                None
            }
        };
        if let Some(p) = problem {
            if failures.len() < 20 {
                std::fs::create_dir_all(&fail_dir).unwrap();
                for (i, (_, b)) in case.files.iter().enumerate() {
                    std::fs::write(fail_dir.join(format!("{name}-{cases}-{i}.bin")), b).unwrap();
                }
                failures.push(format!("case {cases} ({}): {p}", case.what));
            }
        }
        cases += 1;
    }
    let secs = t0.elapsed().as_secs_f64();
    eprintln!(
        "fuzz {name}: {cases} cases in {secs:.1} s: {loaded} loaded, {} failed with {} kinds of error; \
         largest allocation {} bytes (for an input of {})",
        cases - loaded,
        kinds.len(),
        largest_seen.0,
        largest_seen.1
    );
    assert!(failures.is_empty(), "{name}: {} failing cases (inputs in {}):\n{}", failures.len(), fail_dir.display(), failures.join("\n"));
    assert!(cases >= 500, "{name}: only {cases} cases ran in {secs:.1} s");
}

/// The input is `base` with one of its files mutated (bytes only).
fn simple_case(rng: &mut Rng, path: &Path, base: &[u8], fields: &[Field]) -> Case {
    let (b, what) = mutate(rng, base, fields);
    Case { files: vec![(path.to_path_buf(), b)], what }
}

fn words(offsets: std::ops::Range<usize>) -> Vec<Field> {
    offsets.map(|i| (4 * i, 4)).collect()
}

// ---------------------------------------------------------------------------------------------
// valid inputs

/// A small GPT-2: 1 layer, 2 heads, 8 channels, V=40 padded to 128, maxT=8 (1976 parameters).
const CFG: Config = Config { max_t: 8, v: 40, vp: 128, l: 1, nh: 2, c: 8 };

fn params(cfg: &Config, rng: &mut Rng) -> Vec<f32> {
    let n = ParamLayout::new(cfg).total;
    (0..n).map(|_| (rng.next() >> 40) as f32 / (1u64 << 24) as f32 - 0.5).collect()
}

fn checkpoint_bytes(dir: &Path, cfg: &Config, precision: Precision, rng: &mut Rng) -> Vec<u8> {
    let p = dir.join("base.bin");
    write_checkpoint(&p, cfg, &params(cfg, rng), precision).unwrap();
    std::fs::read(p).unwrap()
}

fn check_model(path: &Path) -> Result<(), Error> {
    let header = read_header(path);
    if let Err(e) = &header {
        check_error(e);
    }
    let (cfg, params) = read_checkpoint(path)?;
    assert_eq!(params.len(), ParamLayout::new(&cfg).total, "parameter count");
    assert_eq!(header.expect("read_checkpoint loaded what read_header refused"), cfg);
    // the format detection of --init/--model takes the same path
    let (cfg2, p2) = wgpt::model::hf::load_model(path)?;
    assert_eq!((cfg2, p2.len()), (cfg, params.len()));
    Ok(())
}

fn model_fuzz(precision: Precision, name: &str) {
    let dir = scratch();
    let mut rng = Rng(1);
    let small = checkpoint_bytes(dir.path(), &CFG, precision, &mut rng);
    let wide = checkpoint_bytes(dir.path(), &Config { max_t: 16, v: 100, vp: 100, l: 2, nh: 4, c: 16 }, precision, &mut rng);
    let tiny = std::fs::read("tests/data/tiny/model.bin").unwrap();
    let path = dir.path().join("model.bin");
    std::fs::write(&path, &small).unwrap();
    check_model(&path).unwrap();
    let fields = words(0..8);
    fuzz(
        name,
        |rng| {
            let base = match rng.below(40) {
                0 if precision == Precision::F32 => &tiny,
                1..=9 => &wide,
                _ => &small,
            };
            simple_case(rng, &path, base, &fields)
        },
        || check_model(&path),
    );
}

#[test]
fn fuzz_model_v3() {
    model_fuzz(Precision::F32, "model-v3");
}

#[test]
fn fuzz_model_v5() {
    model_fuzz(Precision::Bf16, "model-v5");
}

/// Two shards of 401 and 321 tokens (ids below 40) matching `dir/shard_*.bin`.
fn two_shards(dir: &Path) -> String {
    write_shard(&dir.join("shard_0.bin"), &(0..401).map(|i| (i * 7 % 40) as u16).collect::<Vec<_>>()).unwrap();
    write_shard(&dir.join("shard_1.bin"), &(0..321).map(|i| (i * 3 % 40) as u16).collect::<Vec<_>>()).unwrap();
    format!("{}/shard_*.bin", dir.display())
}

fn loader_opts(shuffle: bool, vocab: usize) -> LoaderOptions {
    LoaderOptions { b: 2, t: 4, rank: 0, world: 1, shuffle, vocab }
}

/// Batches must be full and inside the vocabulary, targets the inputs shifted by one.
fn check_batches(dl: &mut DataLoader, n: usize, vocab: usize) -> Result<(), Error> {
    for _ in 0..n {
        let (x, y) = dl.next_batch()?;
        assert_eq!((x.len(), y.len()), (8, 8));
        assert!(x.iter().chain(&y).all(|&t| t >= 0 && (t as usize) < vocab), "token outside the vocabulary");
        assert_eq!(&x[1..4], &y[..3], "targets are not the inputs shifted");
    }
    Ok(())
}

#[test]
fn fuzz_training_state() {
    let dir = scratch();
    let pattern = two_shards(dir.path());
    let n = ParamLayout::new(&CFG).total;
    let mut rng = Rng(2);
    // valid state files, with the shuffled and the sequential loader at various positions
    let mut bases = Vec::new();
    for (shuffle, batches) in [(true, 7usize), (false, 3), (true, 60), (false, 95)] {
        let mut dl = DataLoader::new(&pattern, "--train", loader_opts(shuffle, 40)).unwrap();
        check_batches(&mut dl, batches, 40).unwrap();
        let (mut loss, mut norm) = (OutlierDetector::default(), OutlierDetector::default());
        for i in 0..130 + batches {
            loss.update((rng.next() % 1000) as f64 / 100.0);
            if i % 2 == 0 {
                norm.update(f64::from_bits(rng.next() >> 2));
            }
        }
        let m: Vec<f32> = params(&CFG, &mut rng);
        let v: Vec<f32> = params(&CFG, &mut rng).iter().map(|x| x * x).collect();
        let extra = StateExtra {
            loader: dl.state(),
            b: 2,
            t: 4,
            grad_accum: 1,
            num_params: n,
            outliers: Some(OutlierWindows::save(&loss, &norm)),
            zero: None,
            precision: shuffle.then(|| "f16".to_string()),
            loss_scaler: shuffle.then(|| wgpt::train::scaler::LossScaler::new(65536.0, 2000)),
        };
        let p = dir.path().join("base_state.bin");
        write_state(&p, &TrainState { step: batches, m, v, extra }, shuffle).unwrap();
        bases.push((shuffle, std::fs::read(&p).unwrap()));
    }
    let path = dir.path().join("state.bin");
    let shuffled = std::cell::Cell::new(true);
    let check = || -> Result<(), Error> {
        let st = read_state(&path, n)?;
        assert_eq!((st.m.len(), st.v.len()), (n, n));
        if let Some(w) = &st.extra.outliers {
            let (mut a, mut b) = w.restore().expect("read_state accepted a malformed window");
            a.update(1.0);
            b.update(2.0);
        }
        let mut dl = DataLoader::new(&pattern, "--train", loader_opts(shuffled.get(), 40)).unwrap();
        dl.restore(&st.extra.loader)?;
        // a restored loader reads on, across shard and epoch ends
        check_batches(&mut dl, 100, 40)
    };
    fuzz(
        "state",
        |rng| {
            let (shuffle, base) = &bases[rng.below(bases.len())];
            shuffled.set(*shuffle);
            let p = 1024 + 8 * n;
            if rng.one_in(2) {
                // edit the JSON (loader position, permutations, RNG words, windows), length kept right
                let mut doc: Value = serde_json::from_slice(&base[p + 8..]).unwrap();
                let what = mutate_json(rng, &mut doc);
                let js = serde_json::to_vec(&doc).unwrap();
                let mut b = base[..p].to_vec();
                b.extend_from_slice(&(js.len() as u64).to_le_bytes());
                b.extend_from_slice(&js);
                Case { files: vec![(path.clone(), b)], what: format!("json: {what}") }
            } else {
                let fields = [(0, 4), (4, 4), (8, 4), (20, 4), (40, 4), (p, 8)];
                simple_case(rng, &path, base, &fields)
            }
        },
        check,
    );
}

#[test]
fn fuzz_token_shards() {
    let dir = scratch();
    let path = dir.path().join("shard.bin");
    let base_path = dir.path().join("base.bin");
    write_shard(&base_path, &(0..401).map(|i| (i * 11 % 40) as u16).collect::<Vec<_>>()).unwrap();
    let base = std::fs::read(&base_path).unwrap();
    let fields = words(0..4);
    // (shuffle, vocab, in memory) of the current case
    let mode = std::cell::Cell::new((false, 40usize, false));
    let memory: RefCell<Option<&'static [u8]>> = RefCell::new(None);
    let check = || -> Result<(), Error> {
        let (shuffle, vocab, in_memory) = mode.get();
        let mut dl = if in_memory {
            let bytes = memory.borrow().unwrap();
            DataLoader::from_memory(&[MemoryShard { name: "<memory>/shard.bin", bytes }], "--train", loader_opts(shuffle, vocab))?
        } else {
            DataLoader::new(path.to_str().unwrap(), "--train", loader_opts(shuffle, vocab))?
        };
        assert!(dl.batches_per_epoch() >= 1);
        let st = dl.state();
        let epoch = dl.batches_per_epoch();
        check_batches(&mut dl, epoch + 3, vocab)?;
        dl.restore(&st)?;
        dl.reset();
        check_batches(&mut dl, 2, vocab)
    };
    fuzz(
        "shard",
        |rng| {
            let case = simple_case(rng, &path, &base, &fields);
            let in_memory = rng.one_in(4);
            if in_memory {
                // the loader over the corpus built into the binary parses the same bytes
                *memory.borrow_mut() = Some(Box::leak(case.files[0].1.clone().into_boxed_slice()));
            }
            mode.set((rng.one_in(2), rng.pick(&[40, 65536]), in_memory));
            case
        },
        check,
    );
}

#[test]
fn fuzz_tokenizer() {
    let dir = scratch();
    let mut rng = Rng(4);
    let tokens: Vec<Vec<u8>> = (0..300)
        .map(|_| {
            let n = 1 + rng.below(12);
            rng.bytes(n)
        })
        .collect();
    let base_path = dir.path().join("base.bin");
    Tokenizer::from_tokens(&tokens, 299).unwrap().write(&base_path).unwrap();
    let base = std::fs::read(&base_path).unwrap();
    let path = dir.path().join("gpt2_tokenizer.bin");
    let fields = words(0..4);
    let check = || -> Result<(), Error> {
        let t = Tokenizer::read(&path)?;
        let n = t.vocab_size();
        assert!(n >= 1 && (t.eot() as usize) < n);
        let ids: Vec<u32> = (0..n as u32 + 2).collect();
        let _ = t.decode(&ids);
        assert!(t.decode_bytes(n as u32).is_none());
        assert!((0..n as u32).all(|i| t.decode_bytes(i).is_some_and(|b| !b.is_empty())));
        Ok(())
    };
    fuzz("tokenizer", |rng| simple_case(rng, &path, &base, &fields), check);
}

/// A debug state for `cfg` with B=2, T=4, written as llm.c's train_gpt2.py does.
fn debug_state_bytes(cfg: &Config, rng: &mut Rng) -> Vec<u8> {
    let (b, t) = (2usize, 4usize);
    let mut out = Vec::new();
    for k in 0..256 {
        let w: i32 = match k {
            0 => 20240327,
            1 => 2,
            2 => b as i32,
            3 => t as i32,
            _ => 0,
        };
        out.extend_from_slice(&w.to_le_bytes());
    }
    for _ in 0..2 * b * t {
        out.extend_from_slice(&(rng.below(cfg.v) as i32).to_le_bytes());
    }
    let floats = b * t * cfg.v + 1 + ParamLayout::new(cfg).total;
    for x in params(cfg, rng).iter().cycle().take(floats) {
        out.extend_from_slice(&x.to_le_bytes());
    }
    out
}

#[test]
fn fuzz_debug_state() {
    use wgpt::model::debug_state::read_debug_state;
    let dir = scratch();
    let base = debug_state_bytes(&CFG, &mut Rng(5));
    let path = dir.path().join("debug_state.bin");
    let fields = words(0..5);
    let check = || -> Result<(), Error> {
        let d = read_debug_state(&path, &CFG)?;
        let bt = d.b * d.t;
        assert!(d.t <= CFG.max_t);
        assert_eq!((d.x.len(), d.y.len(), d.logits.len()), (bt, bt, bt * CFG.v));
        assert_eq!(d.grads.len(), ParamLayout::new(&CFG).total);
        assert!(d.x.iter().chain(&d.y).all(|&t| t >= 0 && (t as usize) < CFG.v));
        Ok(())
    };
    fuzz("debug-state", |rng| simple_case(rng, &path, &base, &fields), check);
}

#[test]
fn fuzz_eval_file() {
    let dir = scratch();
    let mut rng = Rng(6);
    let mut toks = |n: usize| -> Vec<u16> { (0..n).map(|_| rng.below(40) as u16).collect() };
    let examples: Vec<EvalExample> = (0..6)
        .map(|i| EvalExample {
            index: i,
            label: i % 4,
            context: toks(1 + i as usize),
            completions: (0..4).map(|c| toks(1 + (c + i as usize) % 3)).collect(),
        })
        .collect();
    let base_path = dir.path().join("base.bin");
    write_eval_file(&base_path, &examples).unwrap();
    let base = std::fs::read(&base_path).unwrap();
    let path = dir.path().join("hellaswag.bin");
    let fields = words(0..4);
    let check = || -> Result<(), Error> {
        let ex = read_eval_file(&path)?;
        for e in &ex {
            assert!((e.label as usize) < e.completions.len());
            let _ = e.longest_row();
        }
        // what `wgpt eval` and `train --hellaswag` check next
        if let Err(e) = wgpt::train::hellaswag::check_examples(&ex, &path, 4, 64, 40) {
            check_error(&e);
        }
        Ok(())
    };
    fuzz(
        "eval",
        |rng| {
            let mut case = simple_case(rng, &path, &base, &fields);
            // the body is u16 words: sizes, counts, lengths and markers
            let b = &mut case.files[0].1;
            if rng.one_in(2) && b.len() > 1026 {
                let at = 1024 + 2 * rng.below((b.len() - 1024) / 2);
                let r = rng.next() as u16;
                let v: u16 = rng.pick(&[0, 1, 2, 3, 4, 5, 6, 12, 65535, 65534, 32768, r]);
                b[at..at + 2].copy_from_slice(&v.to_le_bytes());
                case.what += &format!(", word @{at} = {v}");
            }
            case
        },
        check,
    );
}

#[test]
fn fuzz_hf_safetensors_and_config() {
    use wgpt::model::hf::{read_hf, write_hf};
    let dir = scratch();
    let base_dir = dir.path().join("base");
    let mut rng = Rng(7);
    let mut p = params(&CFG, &mut rng);
    p[CFG.v * CFG.c..CFG.vp * CFG.c].fill(0.0); // llm.c's zero padding rows of wte
    assert_eq!(write_hf(&base_dir, &CFG, &p).unwrap(), Vec::<String>::new());
    let st_base = std::fs::read(base_dir.join("model.safetensors")).unwrap();
    let cfg_base = std::fs::read(base_dir.join("config.json")).unwrap();
    let hdr_len = u64::from_le_bytes(st_base[..8].try_into().unwrap()) as usize;
    let st_header: Value = serde_json::from_slice(&st_base[8..8 + hdr_len]).unwrap();
    let st_data = st_base[8 + hdr_len..].to_vec();
    let cfg_doc: Value = serde_json::from_slice(&cfg_base).unwrap();
    let model = dir.path().join("model");
    std::fs::create_dir_all(&model).unwrap();
    let (st_path, cfg_path) = (model.join("model.safetensors"), model.join("config.json"));
    let check = || -> Result<(), Error> {
        let m = read_hf(&model)?;
        assert_eq!(m.params.len(), ParamLayout::new(&m.cfg).total);
        assert!(m.warnings.iter().all(|w| !w.contains('\n')), "multi-line warning");
        Ok(())
    };
    fuzz(
        "safetensors",
        |rng| {
            let (st, cfg, what) = match rng.below(10) {
                0..=3 => {
                    let (b, what) = mutate(rng, &st_base, &[(0, 8)]);
                    (b, cfg_base.clone(), format!("safetensors bytes: {what}"))
                }
                4..=6 => {
                    // the safetensors header: dtypes, shapes, offsets, names
                    let mut h = st_header.clone();
                    let what = mutate_json(rng, &mut h);
                    let js = serde_json::to_vec(&h).unwrap();
                    let mut len = js.len() as u64;
                    if rng.one_in(5) {
                        len = interesting(rng, len as i64, 8);
                    }
                    let mut b = len.to_le_bytes().to_vec();
                    b.extend_from_slice(&js);
                    let data_len = if rng.one_in(4) { rng.below(st_data.len() + 1) } else { st_data.len() };
                    b.extend_from_slice(&st_data[..data_len]);
                    (b, cfg_base.clone(), format!("safetensors header: {what}, len {len}, data {data_len}"))
                }
                7 | 8 => {
                    let mut c = cfg_doc.clone();
                    let what = mutate_json(rng, &mut c);
                    (st_base.clone(), serde_json::to_vec(&c).unwrap(), format!("config.json: {what}"))
                }
                _ => {
                    let (b, what) = mutate(rng, &cfg_base, &[]);
                    (st_base.clone(), b, format!("config.json bytes: {what}"))
                }
            };
            Case { files: vec![(st_path.clone(), st), (cfg_path.clone(), cfg)], what }
        },
        check,
    );
}

// ---------------------------------------------------------------------------------------------
// headers that claim huge sizes: a quick error, no allocation for the claim

/// `f` must fail fast with a one-line user error, allocating at most 16 MiB at once.
fn refused_quickly<T>(what: &str, f: impl FnOnce() -> Result<T, Error>) -> String {
    LARGEST.with(|c| c.set(0));
    IN_CASE.with(|c| c.set(true));
    CASE.with(|c| *c.borrow_mut() = what.to_string());
    let t = Instant::now();
    let r = f();
    IN_CASE.with(|c| c.set(false));
    let (dt, largest) = (t.elapsed(), LARGEST.with(|c| c.get()));
    let e = match r {
        Ok(_) => panic!("{what}: loaded"),
        Err(e) => e,
    };
    check_error(&e);
    assert!(dt < Duration::from_secs(1), "{what}: took {dt:?}");
    assert!(largest < 16 << 20, "{what}: allocated {largest} bytes at once");
    e.to_string()
}

fn header(words: &[(usize, i32)]) -> Vec<u8> {
    let mut h = vec![0u8; 1024];
    for &(i, v) in words {
        h[4 * i..4 * i + 4].copy_from_slice(&v.to_le_bytes());
    }
    h
}

#[test]
fn huge_claims_are_refused_without_allocating_for_them() {
    let dir = scratch();
    let d = dir.path();
    let put = |name: &str, bytes: &[u8]| {
        let p = d.join(name);
        std::fs::write(&p, bytes).unwrap();
        p
    };
    let big = i32::MAX;
    // model: 2^31 − 1 layers (2·10^12 parameters) in a 1 KiB file
    for version in [3, 5] {
        let p = put("model.bin", &header(&[(0, 20240326), (1, version), (2, 8), (3, 40), (4, big), (5, 2), (6, 8), (7, 128)]));
        let e = refused_quickly("model L=2^31-1", || read_checkpoint(&p));
        assert!(e.contains("truncated"), "{e}");
        let p = put("model.bin", &header(&[(0, 20240326), (1, version), (2, big), (3, big), (4, big), (5, 1), (6, big), (7, big)]));
        refused_quickly("model: every size 2^31-1", || read_checkpoint(&p));
    }
    // shard: 2^31 − 1 tokens claimed, 2 present
    let mut s = header(&[(0, 20240520), (1, 1), (2, big)]);
    s.extend_from_slice(&[1, 0]);
    let p = put("shard.bin", &s);
    refused_quickly("shard ntok=2^31-1", || DataLoader::new(p.to_str().unwrap(), "--train", loader_opts(true, 40)));
    // tokenizer: 2^32 − 1 tokens claimed
    let mut t = header(&[(0, 20240328), (1, 2), (2, -1), (3, 0)]);
    t.extend_from_slice(&[1, b'a']);
    let p = put("tok.bin", &t);
    let e = refused_quickly("tokenizer vocab=2^32-1", || Tokenizer::read(&p));
    assert!(e.contains("4294967295"), "{e}");
    // eval file: 2^31 − 1 examples claimed
    let mut ev = header(&[(0, 20240522), (1, 1), (2, big), (3, 100)]);
    ev.extend_from_slice(&[0xff, 0xff, 12, 0, 0, 0, 0, 0, 1, 0, 0, 0]);
    let p = put("eval.bin", &ev);
    let e = refused_quickly("eval n=2^31-1", || read_eval_file(&p));
    assert!(e.contains("2147483647"), "{e}");
    // debug state: B = T = 2^31 − 1 (T beyond maxT) and B = 2^31 − 1, T = 8
    for (b, t) in [(big, big), (big, 8), (1 << 20, 8)] {
        let p = put("debug.bin", &header(&[(0, 20240327), (1, 2), (2, b), (3, t)]));
        refused_quickly("debug state B, T huge", || wgpt::model::debug_state::read_debug_state(&p, &CFG));
    }
    // training state: a JSON length of 2^64 − 1
    let n = ParamLayout::new(&CFG).total;
    let mut st = header(&[(0, 20240527), (1, 1), (2, 1), (10, 5)]);
    st.extend(std::iter::repeat_n(0u8, 8 * n));
    st.extend_from_slice(&u64::MAX.to_le_bytes());
    st.extend_from_slice(b"{}");
    let p = put("state.bin", &st);
    refused_quickly("state json len=2^64-1", || read_state(&p, n));
    // Hugging Face: config.json with 2^31 − 1 layers beside a small model.safetensors, and a
    // safetensors header length of 2^64 − 1
    let hf = d.join("hf");
    wgpt::model::hf::write_hf(&hf, &CFG, &params(&CFG, &mut Rng(9))).unwrap();
    let mut cfg: Value = serde_json::from_slice(&std::fs::read(hf.join("config.json")).unwrap()).unwrap();
    cfg["n_layer"] = json!(i32::MAX);
    std::fs::write(hf.join("config.json"), serde_json::to_vec(&cfg).unwrap()).unwrap();
    let e = refused_quickly("config.json n_layer=2^31-1", || wgpt::model::hf::read_hf(&hf));
    assert!(e.contains("config.json"), "{e}");
    cfg["n_layer"] = json!(1);
    std::fs::write(hf.join("config.json"), serde_json::to_vec(&cfg).unwrap()).unwrap();
    let mut stb = std::fs::read(hf.join("model.safetensors")).unwrap();
    stb[..8].copy_from_slice(&u64::MAX.to_le_bytes());
    std::fs::write(hf.join("model.safetensors"), &stb).unwrap();
    refused_quickly("safetensors header len=2^64-1", || wgpt::model::hf::read_hf(&hf));
}
