//! Token shards, the data loader, the GPT-2 tokenizer, `prepare`, and the bundled corpus.
//! Expected values are written by construction (hand-made bytes, token arithmetic, ids from
//! GPT-2's published vocabulary, shuffle orders computed with an independent MT19937 in Python).

use std::path::{Path, PathBuf};
use wgpt::data::{prepare, write_shard, DataLoader, LoaderOptions, LoaderState, Tokenizer};

const V: usize = 50257;

fn opts(b: usize, t: usize, rank: usize, world: usize, shuffle: bool) -> LoaderOptions {
    LoaderOptions { b, t, rank, world, shuffle, vocab: V }
}

/// A shard's bytes written by hand: header words, then u16 tokens, all little-endian.
fn shard_bytes(magic: i32, version: i32, ntok: i32, tokens: &[u16]) -> Vec<u8> {
    let mut v = Vec::new();
    for k in 0..256 {
        let w = match k {
            0 => magic,
            1 => version,
            2 => ntok,
            _ => 0,
        };
        v.extend_from_slice(&w.to_le_bytes());
    }
    for t in tokens {
        v.extend_from_slice(&t.to_le_bytes());
    }
    v
}

fn put(dir: &Path, name: &str, bytes: &[u8]) -> PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, bytes).unwrap();
    p
}

/// Reads a shard's tokens independently of the crate.
fn raw_tokens(path: &Path) -> Vec<u16> {
    let b = std::fs::read(path).unwrap();
    assert_eq!(i32::from_le_bytes(b[0..4].try_into().unwrap()), 20240520);
    assert_eq!(i32::from_le_bytes(b[4..8].try_into().unwrap()), 1);
    let n = i32::from_le_bytes(b[8..12].try_into().unwrap()) as usize;
    assert_eq!(b.len(), 1024 + 2 * n);
    b[1024..].chunks_exact(2).map(|c| u16::from_le_bytes([c[0], c[1]])).collect()
}

fn seq(base: u16, n: usize) -> Vec<u16> {
    (0..n as u16).map(|i| base + i).collect()
}

fn expect_err<T>(r: wgpt::error::Result<T>, needles: &[&str]) -> String {
    let msg = match r {
        Ok(_) => panic!("expected an error containing {needles:?}"),
        Err(e) => e.to_string(),
    };
    assert!(!msg.contains('\n'), "error message must be one line: {msg}");
    for n in needles {
        assert!(msg.contains(n), "error {msg:?} does not mention {n:?}");
    }
    msg
}

// ---------------------------------------------------------------- shards

#[test]
fn write_shard_matches_llmc_layout() {
    let dir = tempfile::tempdir().unwrap();
    let toks = [50256u16, 0, 1, 65535, 15496, 995, 258];
    let p = dir.path().join("s.bin");
    write_shard(&p, &toks).unwrap();
    assert_eq!(std::fs::read(&p).unwrap(), shard_bytes(20240520, 1, 7, &toks));
    assert_eq!(std::fs::read(&p).unwrap().len(), 1024 + 14);
    // no temporary file left behind
    assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1);
    expect_err(write_shard(&dir.path().join("e.bin"), &[]), &["e.bin"]);
}

/// Three shards in sorted order: a (20 tokens), b (13), c (26); B=2, T=3 ⇒ 3, 2, 4 samples.
fn three_shards(dir: &Path) -> String {
    // created out of order: the loader must sort
    put(dir, "c.bin", &shard_bytes(20240520, 1, 26, &seq(3000, 26)));
    put(dir, "a.bin", &shard_bytes(20240520, 1, 20, &seq(1000, 20)));
    put(dir, "b.bin", &shard_bytes(20240520, 1, 13, &seq(2000, 13)));
    dir.join("*.bin").to_string_lossy().into_owned()
}

const BASES: [i32; 3] = [1000, 2000, 3000];

/// Batch of shard `f`, sample `s` for B·T = `bt`, `world` ranks, this `rank`.
fn expected_batch(f: usize, s: usize, bt: usize, world: usize, rank: usize) -> (Vec<i32>, Vec<i32>) {
    let start = BASES[f] + (s * world * bt + rank * bt) as i32;
    let x: Vec<i32> = (0..bt as i32).map(|i| start + i).collect();
    let y: Vec<i32> = (0..bt as i32).map(|i| start + i + 1).collect();
    (x, y)
}

#[test]
fn loader_sequential_order_and_epoch_wrap() {
    let dir = tempfile::tempdir().unwrap();
    let pat = three_shards(dir.path());
    let mut dl = DataLoader::new(&pat, "--train", opts(2, 3, 0, 1, false)).unwrap();
    assert_eq!(dl.num_tokens(), 20 + 13 + 26);
    assert_eq!(dl.batches_per_epoch(), 3 + 2 + 4);
    let order = [(0, 0), (0, 1), (0, 2), (1, 0), (1, 1), (2, 0), (2, 1), (2, 2), (2, 3)];
    for epoch in 0..2 {
        for &(f, s) in &order {
            let got = dl.next_batch().unwrap();
            assert_eq!(got, expected_batch(f, s, 6, 1, 0), "epoch {epoch} shard {f} sample {s}");
        }
    }
    // a concrete one written out: shard a, sample 1 = tokens 1006..1012
    dl.reset();
    dl.next_batch().unwrap();
    let (x, y) = dl.next_batch().unwrap();
    assert_eq!(x, vec![1006, 1007, 1008, 1009, 1010, 1011]);
    assert_eq!(y, vec![1007, 1008, 1009, 1010, 1011, 1012]);
    // reset mid-epoch starts over
    dl.reset();
    assert_eq!(dl.next_batch().unwrap(), expected_batch(0, 0, 6, 1, 0));
}

#[test]
fn loader_ranks_read_their_slice() {
    let dir = tempfile::tempdir().unwrap();
    let p = put(dir.path(), "one.bin", &shard_bytes(20240520, 1, 20, &seq(1000, 20)));
    // world 2, B=1, T=3: a sample is 6 tokens, 3 samples; rank r starts at 6s + 3r
    for rank in 0..2 {
        let mut dl = DataLoader::new(p.to_str().unwrap(), "--train", opts(1, 3, rank, 2, false)).unwrap();
        assert_eq!(dl.batches_per_epoch(), 3);
        for s in [0, 1, 2, 0] {
            assert_eq!(dl.next_batch().unwrap(), expected_batch(0, s, 3, 2, rank));
        }
    }
}

#[test]
fn loader_shuffle_matches_llmc_order() {
    // (shard, sample) orders over two epochs, computed with Python's MT19937 set to
    // init_genrand(42 + rank) and llm.c's random_permutation: shard order permuted at each
    // reset, a fresh sample order drawn each time a shard is loaded.
    let rank0 = [(2, 2), (2, 3), (2, 1), (2, 0), (1, 0), (1, 1), (0, 2), (0, 0), (0, 1),
                 (2, 3), (2, 0), (2, 1), (2, 2), (0, 2), (0, 1), (0, 0), (1, 1), (1, 0)];
    let rank1 = [(2, 0), (2, 2), (2, 1), (2, 3), (0, 1), (0, 0), (0, 2), (1, 0), (1, 1),
                 (2, 2), (2, 0), (2, 1), (2, 3), (1, 1), (1, 0), (0, 2), (0, 0), (0, 1)];
    let dir = tempfile::tempdir().unwrap();
    let pat = three_shards(dir.path());
    let mut dl = DataLoader::new(&pat, "--train", opts(2, 3, 0, 1, true)).unwrap();
    for (i, &(f, s)) in rank0.iter().enumerate() {
        assert_eq!(dl.next_batch().unwrap(), expected_batch(f, s, 6, 1, 0), "batch {i}");
    }
    // rank 1 of 2 with B=1: same sample counts (6 tokens per sample), seed 43
    let mut dl = DataLoader::new(&pat, "--train", opts(1, 3, 1, 2, true)).unwrap();
    for (i, &(f, s)) in rank1.iter().enumerate() {
        assert_eq!(dl.next_batch().unwrap(), expected_batch(f, s, 3, 2, 1), "batch {i}");
    }
    // determinism: a second loader gives the same stream
    let mut a = DataLoader::new(&pat, "--train", opts(2, 3, 0, 1, true)).unwrap();
    let mut b = DataLoader::new(&pat, "--train", opts(2, 3, 0, 1, true)).unwrap();
    for _ in 0..40 {
        assert_eq!(a.next_batch().unwrap(), b.next_batch().unwrap());
    }
}

#[test]
fn loader_state_restore_continues_identically() {
    let dir = tempfile::tempdir().unwrap();
    let pat = three_shards(dir.path());
    for shuffle in [true, false] {
        // k = 3 ends exactly at a shard's last sample (advance pending), 5 mid-shard, 11 in epoch 2
        for k in [0usize, 3, 4, 5, 11] {
            let mut a = DataLoader::new(&pat, "--train", opts(2, 3, 0, 1, shuffle)).unwrap();
            for _ in 0..k {
                a.next_batch().unwrap();
            }
            let st = a.state();
            let json = serde_json::to_string(&st).unwrap();
            let st2: LoaderState = serde_json::from_str(&json).unwrap();
            assert_eq!(st, st2);
            // a fresh loader that has already moved elsewhere
            let mut b = DataLoader::new(&pat, "--train", opts(2, 3, 0, 1, shuffle)).unwrap();
            for _ in 0..7 {
                b.next_batch().unwrap();
            }
            b.restore(&st2).unwrap();
            assert_eq!(b.state(), st);
            for i in 0..30 {
                assert_eq!(a.next_batch().unwrap(), b.next_batch().unwrap(), "shuffle {shuffle} k {k} batch {i}");
            }
        }
    }
    // a state from other options is refused, naming --resume and what changed
    let a = DataLoader::new(&pat, "--train", opts(2, 3, 0, 1, true)).unwrap();
    let mut c = DataLoader::new(&pat, "--train", opts(1, 3, 0, 1, true)).unwrap();
    expect_err(c.restore(&a.state()), &["--resume", "--batch"]);
    let mut st = a.state();
    st.shard_perm = vec![0, 0, 1];
    let mut d = DataLoader::new(&pat, "--train", opts(2, 3, 0, 1, true)).unwrap();
    expect_err(d.restore(&st), &["--resume"]);
}

#[test]
fn shuffled_epoch_is_a_permutation_of_the_sequential_one() {
    let dir = tempfile::tempdir().unwrap();
    let pat = three_shards(dir.path());
    let mut s = DataLoader::new(&pat, "--train", opts(2, 3, 0, 1, false)).unwrap();
    let mut r = DataLoader::new(&pat, "--train", opts(2, 3, 0, 1, true)).unwrap();
    let n = s.batches_per_epoch();
    let mut a: Vec<_> = (0..n).map(|_| s.next_batch().unwrap()).collect();
    let mut b: Vec<_> = (0..n).map(|_| r.next_batch().unwrap()).collect();
    assert_ne!(a, b);
    a.sort();
    b.sort();
    assert_eq!(a, b);
}

#[test]
fn literal_path_with_glob_characters() {
    let dir = tempfile::tempdir().unwrap();
    let p = put(dir.path(), "x[1].bin", &shard_bytes(20240520, 1, 20, &seq(1000, 20)));
    let mut dl = DataLoader::new(p.to_str().unwrap(), "--val", opts(2, 3, 0, 1, false)).unwrap();
    assert_eq!(dl.next_batch().unwrap(), expected_batch(0, 0, 6, 1, 0));
}

#[test]
fn bad_shards_are_reported_with_file_and_flag() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let o = || opts(2, 8, 0, 1, false);
    let open = |name: &str, flag: &str| DataLoader::new(d.join(name).to_str().unwrap(), flag, o());

    // no match: names the flag and the pattern
    expect_err(open("nothing_*.bin", "--train"), &["--train", "nothing_*.bin"]);
    expect_err(open("missing.bin", "--val"), &["--val", "missing.bin"]);

    put(d, "empty.bin", &[]);
    expect_err(open("empty.bin", "--train"), &["empty.bin", "--train", "empty"]);

    let mut short = shard_bytes(20240520, 1, 100, &[]);
    short.truncate(100);
    put(d, "short.bin", &short);
    expect_err(open("short.bin", "--train"), &["short.bin", "header"]);

    put(d, "model.bin", &shard_bytes(20240326, 3, 1024, &seq(0, 100)));
    expect_err(open("model.bin", "--train"), &["model.bin", "checkpoint"]);

    // legacy: raw int32 token ids, no header
    let legacy: Vec<u8> = (0..1000i32).flat_map(|i| (50256 - i).to_le_bytes()).collect();
    put(d, "legacy.bin", &legacy);
    expect_err(open("legacy.bin", "--val"), &["legacy.bin", "--val", "legacy", "headerless"]);

    put(d, "garbage.bin", &vec![0xffu8; 3000]);
    expect_err(open("garbage.bin", "--train"), &["garbage.bin", "magic"]);

    put(d, "v2.bin", &shard_bytes(20240520, 2, 100, &seq(0, 100)));
    expect_err(open("v2.bin", "--train"), &["v2.bin", "version 2"]);

    put(d, "trunc.bin", &shard_bytes(20240520, 1, 100, &seq(0, 99)));
    expect_err(open("trunc.bin", "--train"), &["trunc.bin", "size"]);
    put(d, "long.bin", &shard_bytes(20240520, 1, 100, &seq(0, 101)));
    expect_err(open("long.bin", "--train"), &["long.bin", "size"]);
    put(d, "zero.bin", &shard_bytes(20240520, 1, 0, &[]));
    expect_err(open("zero.bin", "--train"), &["zero.bin", "0 tokens"]);

    // B·T + 1 = 17 tokens needed
    put(d, "tiny.bin", &shard_bytes(20240520, 1, 16, &seq(0, 16)));
    expect_err(open("tiny.bin", "--val"), &["tiny.bin", "--batch", "--seq-len", "--val"]);
    put(d, "enough.bin", &shard_bytes(20240520, 1, 17, &seq(0, 17)));
    open("enough.bin", "--val").unwrap();

    let mut toks = seq(0, 100);
    toks[37] = 50257;
    put(d, "vocab.bin", &shard_bytes(20240520, 1, 100, &toks));
    expect_err(open("vocab.bin", "--train"), &["vocab.bin", "token 37", "50257", "--train"]);

    // one bad shard among good ones is still found
    let sub = d.join("mixed");
    std::fs::create_dir(&sub).unwrap();
    put(&sub, "a.bin", &shard_bytes(20240520, 1, 100, &seq(0, 100)));
    put(&sub, "b.bin", &shard_bytes(20240520, 1, 100, &seq(0, 99)));
    expect_err(DataLoader::new(sub.join("*.bin").to_str().unwrap(), "--train", o()), &["b.bin"]);

    // zero batch / sequence length name their flags
    put(d, "ok.bin", &shard_bytes(20240520, 1, 100, &seq(0, 100)));
    let p = d.join("ok.bin");
    expect_err(DataLoader::new(p.to_str().unwrap(), "--train", opts(0, 8, 0, 1, false)), &["--batch"]);
    expect_err(DataLoader::new(p.to_str().unwrap(), "--train", opts(2, 0, 0, 1, false)), &["--seq-len"]);
}

// ---------------------------------------------------------------- tokenizer

#[test]
fn gpt2_tokenizer_known_ids() {
    let tok = Tokenizer::gpt2().unwrap();
    assert_eq!(tok.vocab_size(), 50257);
    assert_eq!(tok.eot(), 50256);
    assert_eq!(tok.encode("Hello world"), vec![15496, 995]);
    assert_eq!(tok.decode_bytes(15496), Some(&b"Hello"[..]));
    assert_eq!(tok.decode_bytes(995), Some(&b" world"[..]));
    assert_eq!(tok.decode_bytes(0), Some(&b"!"[..]));
    assert_eq!(tok.decode_bytes(198), Some(&b"\n"[..]));
    assert_eq!(tok.decode_bytes(220), Some(&b" "[..]));
    assert_eq!(tok.decode_bytes(50256), Some(&b"<|endoftext|>"[..]));
    assert_eq!(tok.decode_bytes(50257), None);
    // special text is not the special token
    assert!(!tok.encode("<|endoftext|>").contains(&50256));
    assert_eq!(tok.decode(&[15496, 995, 50256, 99999]), "Hello world<|endoftext|>");
    let text = "Ça va? 日本語 — naïve\n\n   spaces\tand 123,456 'tis we'll";
    assert_eq!(tok.decode(&tok.encode(text)), text);
    // partial UTF-8 is decoded lossily, not dropped silently
    let ids = tok.encode("日");
    assert!(ids.len() > 1, "日 is several byte tokens in GPT-2");
    assert!(tok.decode(&ids[..1]).contains('\u{fffd}'));
}

#[test]
fn tokenizer_file_round_trip() {
    let dir = tempfile::tempdir().unwrap();
    let tok = Tokenizer::gpt2().unwrap();
    let p = dir.path().join("gpt2_tokenizer.bin");
    tok.write(&p).unwrap();
    let bytes = std::fs::read(&p).unwrap();
    assert_eq!(bytes.len(), 372_108);
    let words: Vec<u32> = bytes[..16].chunks_exact(4).map(|c| u32::from_le_bytes(c.try_into().unwrap())).collect();
    assert_eq!(words, vec![20240328, 2, 50257, 50256]);
    // first record: token 0 = "!"
    assert_eq!(&bytes[1024..1026], &[1, b'!']);
    // last record: EOT
    assert_eq!(&bytes[bytes.len() - 14..], b"\x0d<|endoftext|>");
    let back = Tokenizer::read(&p).unwrap();
    assert_eq!(back, tok);
    for id in [0u32, 198, 15496, 50255, 50256] {
        assert_eq!(back.decode_bytes(id), tok.decode_bytes(id));
    }
    // version 1: no EOT word
    let mut v1 = bytes.clone();
    v1[4..8].copy_from_slice(&1u32.to_le_bytes());
    v1[12..16].copy_from_slice(&0u32.to_le_bytes());
    put(dir.path(), "v1.bin", &v1);
    let t1 = Tokenizer::read(&dir.path().join("v1.bin")).unwrap();
    assert_eq!(t1, tok);
    assert_eq!(t1.eot(), 50256);

    // a small hand-made vocabulary
    let small = Tokenizer::from_tokens(&[b"a".to_vec(), b"bc".to_vec(), vec![0xff, 0x00], b"<eot>".to_vec()], 3).unwrap();
    let ps = dir.path().join("small.bin");
    small.write(&ps).unwrap();
    let sb = std::fs::read(&ps).unwrap();
    let mut expect = Vec::new();
    for w in [20240328u32, 2, 4, 3].into_iter().chain(std::iter::repeat_n(0, 252)) {
        expect.extend_from_slice(&w.to_le_bytes());
    }
    expect.extend_from_slice(b"\x01a\x02bc\x02\xff\x00\x05<eot>");
    assert_eq!(sb, expect);
    let sr = Tokenizer::read(&ps).unwrap();
    assert_eq!(sr, small);
    assert_eq!(sr.decode(&[1, 0, 3]), "bca<eot>");
}

#[test]
fn bad_tokenizer_files() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let tok = Tokenizer::gpt2().unwrap();
    let good = d.join("good.bin");
    tok.write(&good).unwrap();
    let bytes = std::fs::read(&good).unwrap();
    let read = |name: &str| Tokenizer::read(&d.join(name));

    expect_err(read("missing.bin"), &["missing.bin"]);
    put(d, "empty.bin", &[]);
    expect_err(read("empty.bin"), &["empty.bin", "empty"]);
    put(d, "short.bin", &bytes[..500]);
    expect_err(read("short.bin"), &["short.bin", "header"]);
    put(d, "shard.bin", &shard_bytes(20240520, 1, 10, &seq(0, 10)));
    expect_err(read("shard.bin"), &["shard.bin", "token shard"]);
    let mut v3 = bytes.clone();
    v3[4..8].copy_from_slice(&3u32.to_le_bytes());
    put(d, "v3.bin", &v3);
    expect_err(read("v3.bin"), &["v3.bin", "version 3"]);
    put(d, "trunc.bin", &bytes[..bytes.len() - 5]);
    expect_err(read("trunc.bin"), &["trunc.bin", "token 50256"]);
    let mut zero = bytes.clone();
    zero[1024] = 0;
    put(d, "zero.bin", &zero);
    expect_err(read("zero.bin"), &["zero.bin", "length 0"]);
    let mut v1 = bytes.clone();
    v1[4..8].copy_from_slice(&1u32.to_le_bytes());
    v1[8..12].copy_from_slice(&50000u32.to_le_bytes());
    put(d, "v1.bin", &v1);
    expect_err(read("v1.bin"), &["v1.bin", "50257"]);
    let mut eot = bytes.clone();
    eot[12..16].copy_from_slice(&60000u32.to_le_bytes());
    put(d, "eot.bin", &eot);
    expect_err(read("eot.bin"), &["eot.bin", "60000"]);
}

// ---------------------------------------------------------------- prepare

#[test]
fn prepare_small_by_construction() {
    let dir = tempfile::tempdir().unwrap();
    let a = put(dir.path(), "hello.txt", b"Hello world");
    let out = dir.path().join("out/nested");
    let s = prepare(&[a], &out, 1).unwrap();
    assert_eq!(s.val_path, out.join("hello_val.bin"));
    assert_eq!(s.train_path, out.join("hello_train.bin"));
    assert_eq!(s.tokenizer_path, out.join("gpt2_tokenizer.bin"));
    assert_eq!((s.val_tokens, s.train_tokens), (1, 2));
    assert_eq!(raw_tokens(&s.val_path), vec![50256]);
    assert_eq!(raw_tokens(&s.train_path), vec![15496, 995]);
    assert_eq!(std::fs::metadata(&s.tokenizer_path).unwrap().len(), 372_108);

    // sections: "Hello\n\n" + "world" → EOT Hello \n\n EOT world ("\n\n" is GPT-2 token 628)
    let b = put(dir.path(), "two.txt", b"Hello\n\nworld");
    let s = prepare(&[b], &out, 2).unwrap();
    assert_eq!(raw_tokens(&s.val_path), vec![50256, 15496]);
    assert_eq!(raw_tokens(&s.train_path), vec![628, 50256, 6894]);
}

#[test]
fn prepare_then_decode_gives_the_text_back() {
    let dir = tempfile::tempdir().unwrap();
    let t1 = "First file.\n\nA second paragraph,\nwith two lines.\n\n\n\nAfter a gap; Ünïcödé ✓ 日本\n";
    let t2 = "Other text\n\n\nthree newlines\n\nend without newline";
    let a = put(dir.path(), "one.txt", t1.as_bytes());
    let b = put(dir.path(), "two.txt", t2.as_bytes());
    let out = dir.path().join("o");
    let s = prepare(&[a, b], &out, 5).unwrap();
    let val = raw_tokens(&s.val_path);
    let train = raw_tokens(&s.train_path);
    assert_eq!(val.len(), 5);
    assert_eq!(train.len(), s.train_tokens);
    let all: Vec<u32> = val.iter().chain(train.iter()).map(|&t| t as u32).collect();
    // one EOT per "\n\n"-section of each file
    let sections = t1.split("\n\n").count() + t2.split("\n\n").count();
    assert_eq!(all.iter().filter(|&&t| t == 50256).count(), sections);
    assert_eq!(all[0], 50256);
    let tok = Tokenizer::read(&s.tokenizer_path).unwrap();
    let text: Vec<u32> = all.iter().copied().filter(|&t| t != 50256).collect();
    assert_eq!(tok.decode(&text), format!("{t1}{t2}"));
}

#[test]
fn prepare_bad_inputs() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let out = d.join("out");
    let ok = put(d, "ok.txt", b"Some text here.");
    expect_err(prepare(&[d.join("nope.txt")], &out, 1), &["nope.txt"]);
    let e = put(d, "empty.txt", b"");
    expect_err(prepare(&[ok.clone(), e], &out, 1), &["empty.txt", "empty"]);
    let bin = put(d, "latin1.txt", b"caf\xe9 au lait");
    expect_err(prepare(&[bin], &out, 1), &["latin1.txt", "UTF-8"]);
    expect_err(prepare(std::slice::from_ref(&ok), &out, 5), &["--val-tokens", "5"]);
    expect_err(prepare(std::slice::from_ref(&ok), &out, 100), &["--val-tokens"]);
    expect_err(prepare(std::slice::from_ref(&ok), &out, 0), &["--val-tokens"]);
    // out dir under a regular file
    expect_err(prepare(std::slice::from_ref(&ok), &ok.join("sub"), 1), &["ok.txt"]);
    assert!(prepare(&[ok], &out, 4).is_ok());
}

// ---------------------------------------------------------------- bundled corpus

fn data_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("data")
}

#[test]
fn bundled_data_is_valid() {
    let d = data_dir();
    let val = raw_tokens(&d.join("shakespeare_val.bin"));
    let train = raw_tokens(&d.join("shakespeare_train.bin"));
    assert_eq!(val.len(), 32768);
    assert!(train.len() > 200_000, "train has {} tokens", train.len());
    assert!(val.iter().chain(train.iter()).all(|&t| (t as usize) < V));
    assert_eq!(val[0], 50256);
    let tok = Tokenizer::read(&d.join("gpt2_tokenizer.bin")).unwrap();
    assert_eq!(tok, Tokenizer::gpt2().unwrap());
    assert_eq!(std::fs::metadata(d.join("gpt2_tokenizer.bin")).unwrap().len(), 372_108);
    // the loader accepts them at the default-ish shapes
    for (p, flag) in [("shakespeare_val.bin", "--val"), ("shakespeare_train.bin", "--train")] {
        let mut dl = DataLoader::new(d.join(p).to_str().unwrap(), flag, opts(4, 64, 0, 1, true)).unwrap();
        dl.next_batch().unwrap();
    }
    // decoded, the shards are the text
    let all: Vec<u32> = val.iter().chain(train.iter()).map(|&t| t as u32).filter(|&t| t != 50256).collect();
    let text = std::fs::read_to_string(d.join("shakespeare.txt")).unwrap();
    assert_eq!(tok.decode(&all), text);
}

#[test]
fn bundled_shards_are_what_prepare_makes() {
    let dir = tempfile::tempdir().unwrap();
    let d = data_dir();
    let t0 = std::time::Instant::now();
    let s = prepare(&[d.join("shakespeare.txt")], dir.path(), 32768).unwrap();
    eprintln!("prepare of the bundled corpus: {:.2} s", t0.elapsed().as_secs_f64());
    for name in ["shakespeare_val.bin", "shakespeare_train.bin", "gpt2_tokenizer.bin"] {
        assert!(std::fs::read(dir.path().join(name)).unwrap() == std::fs::read(d.join(name)).unwrap(), "{name} differs");
    }
    assert_eq!(s.val_tokens, 32768);
}

/// Regenerates data/ from data/shakespeare.txt: `cargo test --release --test data_formats -- --ignored`.
#[test]
#[ignore]
fn regenerate_bundled_data() {
    let d = data_dir();
    let s = prepare(&[d.join("shakespeare.txt")], &d, 32768).unwrap();
    eprintln!("{s:?}");
}

/// llm.c eval files (HellaSwag): a round trip, and every damaged form an error naming the file.
#[test]
fn eval_files_round_trip_and_bad_ones_are_errors() {
    use wgpt::data::evalset::{read_eval_file, write_eval_file, EvalExample};
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("hs.bin");
    let ex = vec![
        EvalExample { index: 0, label: 2, context: vec![1, 2, 3], completions: vec![vec![4], vec![5, 6], vec![7], vec![8, 9, 10]] },
        EvalExample { index: 1, label: 0, context: vec![11], completions: vec![vec![12], vec![13], vec![14], vec![15]] },
    ];
    write_eval_file(&p, &ex).unwrap();
    assert_eq!(read_eval_file(&p).unwrap(), ex);
    let good = std::fs::read(&p).unwrap();
    let check = |bytes: &[u8], want: &str| {
        let q = dir.path().join("bad.bin");
        std::fs::write(&q, bytes).unwrap();
        let e = read_eval_file(&q).unwrap_err().to_string();
        assert!(e.contains("bad.bin") && e.contains(want) && !e.contains('\n'), "{e}");
    };
    let mut magic = good.clone();
    magic[0] ^= 1;
    check(&magic, "magic");
    check(&good[..good.len() - 2], "example 1");
    check(&good[..500], "header");
    let mut label = good.clone();
    label[1024 + 6] = 9; // example 0's label
    check(&label, "label 9");
    let mut extra = good.clone();
    extra.extend_from_slice(&[0, 0]);
    check(&extra, "after the last");
}
