//! The corpus built into the binary (issue 13, item 1): `wgpt::data::bundled` holds the bytes of
//! data/, and the in-memory loader reads them exactly as the file loader reads the files —
//! same batches, same shuffles, same saved state (a run can resume across the two), same errors.

use std::path::Path;
use wgpt::data::{bundled, DataLoader, LoaderOptions, MemoryShard, Tokenizer};

const V: usize = 50257;

fn opts(b: usize, t: usize, shuffle: bool) -> LoaderOptions {
    LoaderOptions { b, t, rank: 0, world: 1, shuffle, vocab: V }
}

fn data(name: &str) -> std::path::PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("data").join(name)
}

#[test]
fn bundled_bytes_are_the_data_files() {
    assert_eq!(bundled::TRAIN.bytes, &std::fs::read(data("shakespeare_train.bin")).unwrap()[..]);
    assert_eq!(bundled::VAL.bytes, &std::fs::read(data("shakespeare_val.bin")).unwrap()[..]);
    assert_eq!(bundled::TOKENIZER_BYTES, &std::fs::read(data("gpt2_tokenizer.bin")).unwrap()[..]);
    let tok = bundled::tokenizer().unwrap();
    assert_eq!(tok, Tokenizer::read(&data("gpt2_tokenizer.bin")).unwrap());
    assert_eq!(tok, Tokenizer::gpt2().unwrap());
    // about 1 MB built into the binary
    let total = bundled::TRAIN.bytes.len() + bundled::VAL.bytes.len() + bundled::TOKENIZER_BYTES.len();
    assert!(total < 1_000_000, "{total} bytes bundled");
}

#[test]
fn memory_loader_reads_like_the_file_loader() {
    for shuffle in [false, true] {
        let path = data("shakespeare_train.bin");
        let mut file = DataLoader::new(path.to_str().unwrap(), "--train", opts(4, 64, shuffle)).unwrap();
        let mut mem = bundled::train_loader("--train", opts(4, 64, shuffle)).unwrap();
        assert_eq!(mem.num_tokens(), file.num_tokens());
        assert_eq!(mem.batches_per_epoch(), file.batches_per_epoch());
        assert_eq!(mem.files(), vec![Path::new("<bundled>/shakespeare_train.bin")]);
        // more than one epoch: the wrap and (shuffling) the reshuffle agree too
        for i in 0..file.batches_per_epoch() + 5 {
            assert_eq!(mem.next_batch().unwrap(), file.next_batch().unwrap(), "batch {i}, shuffle {shuffle}");
        }
        // the saved state is interchangeable: resume a file run from a bundled one and back
        let st = mem.state();
        assert_eq!(st, file.state());
        let mut file2 = DataLoader::new(path.to_str().unwrap(), "--train", opts(4, 64, shuffle)).unwrap();
        file2.restore(&st).unwrap();
        let mut mem2 = bundled::train_loader("--train", opts(4, 64, shuffle)).unwrap();
        mem2.restore(&file.state()).unwrap();
        for _ in 0..3 {
            let want = file.next_batch().unwrap();
            assert_eq!(file2.next_batch().unwrap(), want);
            assert_eq!(mem2.next_batch().unwrap(), want);
        }
        mem.reset();
        file.reset();
        assert_eq!(mem.next_batch().unwrap(), file.next_batch().unwrap());
    }
    let mut val = bundled::val_loader("--val", opts(16, 64, false)).unwrap();
    let mut vfile = DataLoader::new(data("shakespeare_val.bin").to_str().unwrap(), "--val", opts(16, 64, false)).unwrap();
    assert_eq!(val.next_batch().unwrap(), vfile.next_batch().unwrap());
}

fn leak(v: Vec<u8>) -> &'static [u8] {
    Box::leak(v.into_boxed_slice())
}

fn shard(ntok: i32, tokens: &[u16]) -> Vec<u8> {
    let mut v = Vec::new();
    for w in [20240520i32, 1, ntok].into_iter().chain(std::iter::repeat(0).take(253)) {
        v.extend_from_slice(&w.to_le_bytes());
    }
    for t in tokens {
        v.extend_from_slice(&t.to_le_bytes());
    }
    v
}

fn err(r: wgpt::error::Result<DataLoader>) -> String {
    match r {
        Ok(_) => panic!("expected an error"),
        Err(e) => {
            let m = e.to_string();
            assert!(!m.contains('\n'), "not one line: {m}");
            m
        }
    }
}

#[test]
fn bad_memory_shards_are_one_line_errors_naming_them() {
    let good = leak(shard(20, &(0..20).collect::<Vec<u16>>()));
    let m = |name: &'static str, bytes: &'static [u8]| MemoryShard { name, bytes };
    // several in-memory shards are read in the order given
    let mut dl = DataLoader::from_memory(&[m("a", good), m("b", good)], "--train", opts(1, 3, false)).unwrap();
    assert_eq!(dl.batches_per_epoch(), 12);
    assert_eq!(dl.next_batch().unwrap(), (vec![0, 1, 2], vec![1, 2, 3]));

    let cases: Vec<(&'static [u8], &[&str])> = vec![
        (leak(vec![]), &["empty"]),
        (leak(vec![1, 2]), &["shorter than the 1024-byte shard header"]),
        (leak(shard(20, &[0; 19])), &["file size is 1062 bytes but the header's 20 tokens need"]),
        (leak(shard(-3, &[])), &["header says -3 tokens"]),
        (leak(shard(4, &[0, 1, 50257, 3])), &["token 2 is 50257"]),
        (leak(shard(3, &[0, 1, 2])), &["fewer than one batch needs"]),
        (leak(bundled::TOKENIZER_BYTES.to_vec()), &["tokenizer file"]),
    ];
    for (bytes, needles) in cases {
        let msg = err(DataLoader::from_memory(&[m("<test>/bad.bin", bytes)], "--val", opts(1, 3, false)));
        assert!(msg.contains("<test>/bad.bin") && msg.contains("--val"), "{msg}");
        for n in needles {
            assert!(msg.contains(n), "{msg:?} does not say {n:?}");
        }
    }
    assert!(err(DataLoader::from_memory(&[], "--train", opts(1, 3, false))).contains("--train"));
    assert!(err(DataLoader::from_memory(&[m("a", good)], "--train", opts(0, 3, false))).contains("--batch"));
    // the tokenizer parser names the in-memory source as well
    let bad = Tokenizer::from_bytes(Path::new("<bundled>/gpt2_tokenizer.bin"), &bundled::TOKENIZER_BYTES[..2000]).unwrap_err();
    assert!(bad.to_string().contains("<bundled>/gpt2_tokenizer.bin"), "{bad}");
}
