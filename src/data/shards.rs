//! llm.c token shards (GPT-2 format) and the data loader of llm.c's `llmc/dataloader.h`.
//!
//! Shard format: a header of 256 little-endian i32 `[20240520, 1, ntok, 0, …]` (1024 bytes), then
//! `ntok` little-endian u16 token ids; the file size is exactly `1024 + 2·ntok`.
//!
//! Loader semantics (identical to llm.c): one *sample* is `world·B·T` consecutive tokens, a shard
//! holds `(ntok − 1) / (world·B·T)` samples; rank `r` reads `B·T + 1` tokens starting at token
//! `s·world·B·T + r·B·T` of the shard (`s` = sample index, possibly permuted); inputs are the
//! first `B·T`, targets the last `B·T`. With shuffling, an MT19937 seeded `42 + rank` permutes the
//! shard order at every reset (the permutation persists and is re-shuffled each epoch) and draws a
//! fresh permutation of the samples each time a shard is loaded.
//!
//! Shards come from files matching a glob ([`DataLoader::new`], memory-mapped one at a time) or
//! from memory ([`DataLoader::from_memory`]: the corpus built into the binary, see
//! [`crate::data::bundled`]); both are validated and read the same way.

use crate::error::{Error, Result};
use crate::rng::Mt19937;
use memmap2::Mmap;
use std::fs::File;
use std::io::Read;
use std::path::{Path, PathBuf};

pub const SHARD_MAGIC: i32 = 20240520;
pub const SHARD_VERSION: i32 = 1;
pub const HEADER_BYTES: usize = 1024;

/// Write `tokens` as an llm.c GPT-2 token shard (atomically).
pub fn write_shard(path: &Path, tokens: &[u16]) -> Result<()> {
    if tokens.is_empty() {
        return Err(Error::format(path, "refusing to write a token shard with no tokens"));
    }
    if tokens.len() >= (1usize << 31) {
        return Err(Error::format(
            path,
            format!("{} tokens do not fit one shard (at most 2^31 - 1); split the input", tokens.len()),
        ));
    }
    let mut header = [0i32; 256];
    header[0] = SHARD_MAGIC;
    header[1] = SHARD_VERSION;
    header[2] = tokens.len() as i32;
    crate::atomic::write_atomic_with(path, |w| {
        for h in header {
            w.write_all(&h.to_le_bytes())?;
        }
        let mut buf = Vec::with_capacity(tokens.len() * 2);
        for &t in tokens {
            buf.extend_from_slice(&t.to_le_bytes());
        }
        w.write_all(&buf)
    })
}

/// How a [`DataLoader`] cuts its shards into batches.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LoaderOptions {
    /// Micro-batch size B (rows).
    pub b: usize,
    /// Sequence length T.
    pub t: usize,
    /// This process's rank in `0..world`.
    pub rank: usize,
    /// Number of data-parallel processes.
    pub world: usize,
    /// Shuffle shards and samples like llm.c (MT19937 seeded 42 + rank).
    pub shuffle: bool,
    /// Every token must be `< vocab` (50257 for GPT-2).
    pub vocab: usize,
}

/// Everything needed to continue a loader bit-identically (for `--resume`).
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct LoaderState {
    pub b: usize,
    pub t: usize,
    pub rank: usize,
    pub world: usize,
    pub shuffle: bool,
    /// Number of tokens of every shard, in glob order (to catch a changed data set).
    pub shard_tokens: Vec<usize>,
    /// Position in the shard order (index into `shard_perm` when shuffling).
    pub shard_idx: usize,
    /// Index of the next sample to read in the current shard.
    pub sample_idx: usize,
    /// Shard order (empty when not shuffling).
    pub shard_perm: Vec<u32>,
    /// Sample order inside the current shard (empty when not shuffling).
    pub intra_perm: Vec<u32>,
    /// MT19937 state words (`Mt19937::to_words`; empty when not shuffling).
    pub rng: Vec<u32>,
}

/// A token shard held in memory: the file's bytes (header and tokens) and a name for messages.
#[derive(Clone, Copy, Debug)]
pub struct MemoryShard {
    /// Shown where a file path would be (e.g. `<bundled>/shakespeare_train.bin`).
    pub name: &'static str,
    /// The whole shard, exactly as it would be on disk.
    pub bytes: &'static [u8],
}

struct Shard {
    /// The file, or the in-memory shard's name.
    path: PathBuf,
    /// `Some` for an in-memory shard.
    memory: Option<&'static [u8]>,
    ntok: usize,
}

/// The bytes of the shard being read: a read-only file mapping, or an in-memory shard.
enum ShardBytes {
    Mapped(Mmap),
    Memory(&'static [u8]),
}

impl std::ops::Deref for ShardBytes {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        match self {
            ShardBytes::Mapped(m) => m,
            ShardBytes::Memory(b) => b,
        }
    }
}

/// llm.c's distributed, optionally shuffled data loader over a glob of token shards.
pub struct DataLoader {
    flag: String,
    opts: LoaderOptions,
    shards: Vec<Shard>,
    num_tokens: usize,
    /// Shard order; identity when not shuffling.
    shard_perm: Vec<u32>,
    intra_perm: Vec<u32>,
    rng: Option<Mt19937>,
    shard_idx: usize,
    sample_idx: usize,
    /// Samples of the currently loaded shard.
    shard_samples: usize,
    /// The currently loaded shard (index into `shards`) and its bytes.
    loaded: Option<(usize, ShardBytes)>,
}

impl DataLoader {
    /// Open every shard matching `pattern` (glob, sorted; a plain path works too), validate all
    /// headers, sizes and (for data sets up to 256M tokens) every token id, then reset.
    /// `flag` ("--train"/"--val") is named in error messages.
    pub fn new(pattern: &str, flag: &str, opts: LoaderOptions) -> Result<DataLoader> {
        check_options(flag, &opts)?;
        let mut shards = Vec::new();
        for path in expand_pattern(pattern, flag)? {
            let ntok = validate_shard(&path, flag)?;
            check_fits(&path, ntok, flag, &opts)?;
            shards.push(Shard { path, memory: None, ntok });
        }
        DataLoader::open(shards, flag, opts)
    }

    /// A loader over shards held in memory (in this order), with the same validation, batches,
    /// shuffling and saved state as [`DataLoader::new`] over the same bytes in files.
    pub fn from_memory(shards: &[MemoryShard], flag: &str, opts: LoaderOptions) -> Result<DataLoader> {
        check_options(flag, &opts)?;
        if shards.is_empty() {
            return Err(Error::flag(flag, "no token shards given"));
        }
        let mut list = Vec::with_capacity(shards.len());
        for m in shards {
            let path = PathBuf::from(m.name);
            let head = &m.bytes[..HEADER_BYTES.min(m.bytes.len())];
            let ntok = check_header(&path, flag, head, m.bytes.len() as u64)?;
            check_fits(&path, ntok, flag, &opts)?;
            list.push(Shard { path, memory: Some(m.bytes), ntok });
        }
        DataLoader::open(list, flag, opts)
    }

    /// The token scan over validated shards, then reset.
    fn open(shards: Vec<Shard>, flag: &str, opts: LoaderOptions) -> Result<DataLoader> {
        let num_tokens = shards.iter().map(|s| s.ntok).sum();
        // Scanning every token is cheap for data sets of ordinary size; huge ones are still
        // checked batch by batch in `next_batch`.
        if num_tokens <= (256usize << 20) {
            for s in &shards {
                match s.memory {
                    Some(bytes) => scan_data(&s.path, flag, &bytes[HEADER_BYTES..], opts.vocab)?,
                    None => scan_tokens(&s.path, flag, opts.vocab)?,
                }
            }
        }
        let n = shards.len();
        let mut dl = DataLoader {
            flag: flag.to_string(),
            rng: if opts.shuffle { Some(Mt19937::new(42 + opts.rank as u32)) } else { None },
            opts,
            shards,
            num_tokens,
            shard_perm: (0..n as u32).collect(),
            intra_perm: Vec::new(),
            shard_idx: 0,
            sample_idx: 0,
            shard_samples: 0,
            loaded: None,
        };
        dl.reset_inner()?;
        Ok(dl)
    }
}

/// A shard must hold at least one batch (`world·B·T + 1` tokens).
fn check_fits(path: &Path, ntok: usize, flag: &str, opts: &LoaderOptions) -> Result<()> {
    let per_sample = opts.world * opts.b * opts.t;
    if ntok < per_sample + 1 {
        return Err(Error::format(
            path,
            format!(
                "shard has {ntok} tokens, fewer than one batch needs ({}·{}{} + 1 = {}); lower --batch or --seq-len ({flag})",
                opts.b,
                opts.t,
                if opts.world > 1 { format!("·{}", opts.world) } else { String::new() },
                per_sample + 1
            ),
        ));
    }
    Ok(())
}

/// The checks on B, T, rank and vocab that do not depend on the shards.
fn check_options(flag: &str, opts: &LoaderOptions) -> Result<()> {
    if opts.b == 0 {
        return Err(Error::flag("--batch", "must be at least 1"));
    }
    if opts.t == 0 {
        return Err(Error::flag("--seq-len", "must be at least 1"));
    }
    if opts.world == 0 || opts.rank >= opts.world {
        return Err(Error::flag(flag, format!("rank {} is not in 0..{} processes", opts.rank, opts.world)));
    }
    if opts.vocab == 0 || opts.vocab > 65536 {
        return Err(Error::flag(flag, format!("vocab size {} cannot be stored in u16 token shards", opts.vocab)));
    }
    Ok(())
}

impl DataLoader {
    /// Total tokens over all shards.
    pub fn num_tokens(&self) -> usize {
        self.num_tokens
    }

    /// Batches in one pass over the data (Σ over shards of the shard's samples).
    /// B·T: the tokens of one batch's inputs.
    pub fn batch_tokens(&self) -> usize {
        self.opts.b * self.opts.t
    }

    pub fn batches_per_epoch(&self) -> usize {
        self.shards.iter().map(|s| self.samples_of(s.ntok)).sum()
    }

    /// The shard files, in glob (sorted) order (in-memory shards: their names).
    pub fn files(&self) -> Vec<&Path> {
        self.shards.iter().map(|s| s.path.as_path()).collect()
    }

    /// Back to the first shard, sample 0 (with shuffling: a new shard order and sample order).
    pub fn reset(&mut self) {
        // Shards were validated and mapped at construction; a failure here means a file changed
        // underneath us, which `next_batch` reports when it reads.
        if self.reset_inner().is_err() {
            self.loaded = None;
        }
    }

    /// The next (inputs, targets), each `B·T` token ids row-major (B, T); targets are the inputs
    /// shifted by one token.
    pub fn next_batch(&mut self) -> Result<(Vec<i32>, Vec<i32>)> {
        if self.loaded.is_none() {
            // a previous reload failed (file changed underneath us): retry so the error is reported
            self.load_shard(self.shard_idx)?;
        }
        if self.sample_idx >= self.shard_samples {
            self.advance()?;
        }
        let (inputs, targets) = self.read_batch()?;
        self.sample_idx += 1;
        Ok((inputs, targets))
    }

    /// The loader's position, shard order, sample order and RNG.
    pub fn state(&self) -> LoaderState {
        let shuffle = self.opts.shuffle;
        LoaderState {
            b: self.opts.b,
            t: self.opts.t,
            rank: self.opts.rank,
            world: self.opts.world,
            shuffle,
            shard_tokens: self.shards.iter().map(|s| s.ntok).collect(),
            shard_idx: self.shard_idx,
            sample_idx: self.sample_idx,
            shard_perm: if shuffle { self.shard_perm.clone() } else { Vec::new() },
            intra_perm: if shuffle { self.intra_perm.clone() } else { Vec::new() },
            rng: self.rng.as_ref().map(|r| r.to_words()).unwrap_or_default(),
        }
    }

    /// Continue exactly where `st` (from [`DataLoader::state`]) left off. The loader must have
    /// been opened on the same shards with the same options.
    pub fn restore(&mut self, st: &LoaderState) -> Result<()> {
        let flag = self.flag.clone();
        let bad = |msg: String| Err(Error::flag("--resume", format!("saved data position for {flag}: {msg}")));
        let o = self.opts.clone();
        if st.b != o.b {
            return bad(format!("it was saved with --batch {}, now {}", st.b, o.b));
        }
        if st.t != o.t {
            return bad(format!("it was saved with --seq-len {}, now {}", st.t, o.t));
        }
        if st.rank != o.rank || st.world != o.world {
            return bad(format!("it was saved by rank {} of {}, this is rank {} of {}", st.rank, st.world, o.rank, o.world));
        }
        if st.shuffle != o.shuffle {
            return bad(format!("it was saved with shuffling {}, now {}", onoff(st.shuffle), onoff(o.shuffle)));
        }
        let toks: Vec<usize> = self.shards.iter().map(|s| s.ntok).collect();
        if st.shard_tokens != toks {
            return bad(format!(
                "the shards differ (saved: {} shards, {} tokens; now: {} shards, {} tokens)",
                st.shard_tokens.len(),
                st.shard_tokens.iter().fold(0usize, |a, &n| a.saturating_add(n)),
                toks.len(),
                self.num_tokens
            ));
        }
        let n = self.shards.len();
        if st.shard_idx >= n {
            return bad(format!("shard index {} is out of range (0..{n})", st.shard_idx));
        }
        let (perm, rng) = if o.shuffle {
            if !is_permutation(&st.shard_perm, n) {
                return bad("the shard order is not a permutation of the shards".into());
            }
            match Mt19937::from_words(&st.rng) {
                Some(r) => (st.shard_perm.clone(), Some(r)),
                None => return bad("the random generator state is malformed".into()),
            }
        } else {
            ((0..n as u32).collect(), None)
        };
        let file = perm[st.shard_idx] as usize;
        let samples = self.samples_of(self.shards[file].ntok);
        if st.sample_idx > samples {
            return bad(format!("sample index {} is past the shard's {samples} samples", st.sample_idx));
        }
        if o.shuffle && !is_permutation(&st.intra_perm, samples) {
            return bad("the sample order is not a permutation of the shard's samples".into());
        }
        self.shard_perm = perm;
        self.rng = rng;
        self.shard_idx = st.shard_idx;
        self.load_shard(st.shard_idx)?;
        self.sample_idx = st.sample_idx;
        self.intra_perm = if o.shuffle { st.intra_perm.clone() } else { Vec::new() };
        Ok(())
    }

    fn samples_of(&self, ntok: usize) -> usize {
        (ntok - 1) / (self.opts.world * self.opts.b * self.opts.t)
    }

    /// llm.c `dataloader_reset`: shard 0, sample 0; shuffling permutes the shard order (in
    /// place, so it compounds over epochs) and then draws a new sample order.
    fn reset_inner(&mut self) -> Result<()> {
        self.shard_idx = 0;
        self.sample_idx = 0;
        if let Some(rng) = self.rng.as_mut() {
            rng.shuffle(&mut self.shard_perm);
        }
        let loaded = self.load_shard(0);
        self.draw_intra_perm();
        loaded
    }

    /// llm.c `dataloader_advance_`: next shard, or a full reset after the last one.
    fn advance(&mut self) -> Result<()> {
        if self.shard_idx + 1 >= self.shards.len() {
            return self.reset_inner();
        }
        self.shard_idx += 1;
        self.sample_idx = 0;
        let loaded = self.load_shard(self.shard_idx);
        self.draw_intra_perm();
        loaded
    }

    fn draw_intra_perm(&mut self) {
        if let Some(rng) = self.rng.as_mut() {
            let mut p: Vec<u32> = (0..self.shard_samples as u32).collect();
            rng.shuffle(&mut p);
            self.intra_perm = p;
        }
    }

    /// Map the shard at position `pos` of the shard order.
    fn load_shard(&mut self, pos: usize) -> Result<()> {
        let file = self.shard_perm[pos] as usize;
        self.shard_samples = self.samples_of(self.shards[file].ntok);
        if matches!(&self.loaded, Some((f, _)) if *f == file) {
            return Ok(());
        }
        self.loaded = None;
        let shard = &self.shards[file];
        if let Some(bytes) = shard.memory {
            self.loaded = Some((file, ShardBytes::Memory(bytes)));
            return Ok(());
        }
        let f = File::open(&shard.path).map_err(|e| Error::io(&shard.path, e))?;
        // SAFETY: the mapping is read-only; a shard modified while training is a user error that
        // at worst yields wrong tokens (caught by the vocab check) or the size check below.
        let map = unsafe { Mmap::map(&f) }.map_err(|e| Error::io(&shard.path, e))?;
        if map.len() != HEADER_BYTES + 2 * shard.ntok {
            return Err(Error::format(&shard.path, format!("file changed while in use ({}); size is now {} bytes", self.flag, map.len())));
        }
        self.loaded = Some((file, ShardBytes::Mapped(map)));
        Ok(())
    }

    /// llm.c `dataloader_load_batch`.
    fn read_batch(&self) -> Result<(Vec<i32>, Vec<i32>)> {
        let (file, map) = self.loaded.as_ref().expect("a shard is loaded");
        let o = &self.opts;
        let bt = o.b * o.t;
        let sample = if o.shuffle { self.intra_perm[self.sample_idx] as usize } else { self.sample_idx };
        let start = sample * o.world * bt + o.rank * bt;
        let bytes = &map[HEADER_BYTES + 2 * start..HEADER_BYTES + 2 * (start + bt + 1)];
        let mut toks = Vec::with_capacity(bt + 1);
        for (k, c) in bytes.chunks_exact(2).enumerate() {
            let tok = u16::from_le_bytes([c[0], c[1]]) as usize;
            if tok >= o.vocab {
                return Err(bad_token(&self.shards[*file].path, &self.flag, start + k, tok, o.vocab));
            }
            toks.push(tok as i32);
        }
        Ok((toks[..bt].to_vec(), toks[1..].to_vec()))
    }
}

fn onoff(b: bool) -> &'static str {
    if b {
        "on"
    } else {
        "off"
    }
}

fn is_permutation(p: &[u32], n: usize) -> bool {
    if p.len() != n {
        return false;
    }
    let mut seen = vec![false; n];
    for &x in p {
        let x = x as usize;
        if x >= n || seen[x] {
            return false;
        }
        seen[x] = true;
    }
    true
}

fn bad_token(path: &Path, flag: &str, index: usize, tok: usize, vocab: usize) -> Error {
    Error::format(path, format!("token {index} is {tok}, not below the vocabulary size {vocab} ({flag}); was the shard made for another tokenizer?"))
}

/// Glob `pattern` (sorted). A path that exists as written is accepted even if it contains glob
/// metacharacters.
fn expand_pattern(pattern: &str, flag: &str) -> Result<Vec<PathBuf>> {
    if pattern.is_empty() {
        return Err(Error::flag(flag, "empty file pattern"));
    }
    let literal = Path::new(pattern);
    let mut paths = Vec::new();
    match glob::glob(pattern) {
        Ok(iter) => {
            for entry in iter {
                match entry {
                    Ok(p) => {
                        if !p.is_dir() {
                            paths.push(p)
                        }
                    }
                    Err(e) => {
                        let path = e.path().to_path_buf();
                        return Err(Error::io(path, e.into()));
                    }
                }
            }
        }
        Err(e) => {
            if !literal.exists() {
                return Err(Error::flag(flag, format!("'{pattern}' is not a valid file pattern: {e}")));
            }
        }
    }
    if paths.is_empty() && literal.is_file() {
        paths.push(literal.to_path_buf());
    }
    if paths.is_empty() {
        return Err(Error::flag(flag, format!("no token shard matches '{pattern}' (make some with `wgpt prepare TEXT --out DIR`)")));
    }
    paths.sort();
    Ok(paths)
}

/// Check a shard's header and size; returns its token count.
fn validate_shard(path: &Path, flag: &str) -> Result<usize> {
    let mut f = File::open(path).map_err(|e| Error::io(path, e))?;
    let size = f.metadata().map_err(|e| Error::io(path, e))?.len();
    let mut head = vec![0u8; HEADER_BYTES.min(size as usize)];
    f.read_exact(&mut head).map_err(|e| Error::io(path, e))?;
    check_header(path, flag, &head, size)
}

/// Check a shard's header (`head`: its first `min(1024, size)` bytes) against its size
/// (`size` bytes in all); returns its token count.
fn check_header(path: &Path, flag: &str, head: &[u8], size: u64) -> Result<usize> {
    let fmt = |msg: String| Err(Error::format(path, format!("{msg} ({flag})")));
    if size == 0 {
        return fmt("file is empty, not a token shard".into());
    }
    if size < 4 {
        return fmt(format!("file is {size} bytes, shorter than the 1024-byte shard header"));
    }
    let word = |i: usize| i32::from_le_bytes([head[4 * i], head[4 * i + 1], head[4 * i + 2], head[4 * i + 3]]);
    let magic = word(0);
    if magic != SHARD_MAGIC {
        let what = match magic {
            20240326 => "this is an llm.c model checkpoint, not a token shard".to_string(),
            20240327 => "this is an llm.c debug-state file, not a token shard".to_string(),
            20240328 => "this is a tokenizer file (gpt2_tokenizer.bin), not a token shard".to_string(),
            20240522 => "this is an llm.c eval (HellaSwag/MMLU) file, not a token shard".to_string(),
            20240527 => "this is an llm.c training-state file, not a token shard".to_string(),
            20240801 => "this is a Llama-3 token shard (u32 tokens), not a GPT-2 one".to_string(),
            m if size % 4 == 0 && (0..65536).contains(&m) => format!(
                "bad magic {m} (expected {SHARD_MAGIC}); it looks like a legacy headerless int32 token file (llm.c before May 2024): re-create it with `wgpt prepare`"
            ),
            m => format!("bad magic {m} (expected {SHARD_MAGIC}); not an llm.c token shard"),
        };
        return fmt(what);
    }
    if size < HEADER_BYTES as u64 {
        return fmt(format!("file is {size} bytes, shorter than the 1024-byte shard header (truncated?)"));
    }
    let version = word(1);
    if version != SHARD_VERSION {
        return fmt(format!("unsupported token shard version {version} (expected {SHARD_VERSION})"));
    }
    let ntok = word(2);
    if ntok <= 0 {
        return fmt(format!("header says {ntok} tokens; a shard needs at least one"));
    }
    let expected = HEADER_BYTES as u64 + 2 * ntok as u64;
    if size != expected {
        return fmt(format!(
            "file size is {size} bytes but the header's {ntok} tokens need 1024 + 2·{ntok} = {expected} (truncated or corrupt)"
        ));
    }
    Ok(ntok as usize)
}

/// Check every token of a (validated) shard against `vocab`.
fn scan_tokens(path: &Path, flag: &str, vocab: usize) -> Result<()> {
    let f = File::open(path).map_err(|e| Error::io(path, e))?;
    // SAFETY: read-only mapping of a file we just validated.
    let map = unsafe { Mmap::map(&f) }.map_err(|e| Error::io(path, e))?;
    scan_data(path, flag, &map[HEADER_BYTES.min(map.len())..], vocab)
}

/// Check every token of a shard's data (the bytes after the header) against `vocab`.
fn scan_data(path: &Path, flag: &str, data: &[u8], vocab: usize) -> Result<()> {
    if let Some(k) = data.chunks_exact(2).position(|c| u16::from_le_bytes([c[0], c[1]]) as usize >= vocab) {
        let tok = u16::from_le_bytes([data[2 * k], data[2 * k + 1]]) as usize;
        return Err(bad_token(path, flag, k, tok, vocab));
    }
    Ok(())
}
