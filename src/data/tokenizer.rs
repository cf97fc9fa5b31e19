//! The GPT-2 tokenizer: byte-level BPE encoding through tiktoken-rs's bundled `r50k_base` (no
//! network), and llm.c's `gpt2_tokenizer.bin` (a decoder table) read/write.
//!
//! `gpt2_tokenizer.bin`: 256 little-endian u32 header words `[20240328, version, vocab_size,
//! eot (v2 only), 0, …]`, then per token id one length byte (1..=255) and that many raw bytes.
//! Version 1 has no EOT word and implies vocab 50257, EOT 50256.

use crate::error::{Error, Result};
use std::path::Path;
use std::sync::{Arc, OnceLock};
use tiktoken_rs::CoreBPE;

pub const TOKENIZER_MAGIC: u32 = 20240328;
/// GPT-2's end-of-text token id.
pub const GPT2_EOT: u32 = 50256;
/// GPT-2's vocabulary size (50256 BPE tokens + EOT).
pub const GPT2_VOCAB: usize = 50257;

/// Token id → bytes table: token `i` is `bytes[offsets[i]..offsets[i+1]]`.
struct Table {
    bytes: Vec<u8>,
    offsets: Vec<u32>,
    eot: u32,
}

/// A decoder table (token id → bytes) plus GPT-2 BPE encoding.
#[derive(Clone)]
pub struct Tokenizer {
    table: Arc<Table>,
}

impl std::fmt::Debug for Tokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tokenizer").field("vocab_size", &self.vocab_size()).field("eot", &self.eot()).finish()
    }
}

impl PartialEq for Tokenizer {
    fn eq(&self, other: &Self) -> bool {
        self.table.eot == other.table.eot && self.table.offsets == other.table.offsets && self.table.bytes == other.table.bytes
    }
}

/// tiktoken-rs's r50k_base, built once (parsing its 50k ranks and compiling its regex).
fn gpt2_bpe() -> Result<&'static CoreBPE> {
    static BPE: OnceLock<std::result::Result<CoreBPE, String>> = OnceLock::new();
    BPE.get_or_init(|| tiktoken_rs::r50k_base().map_err(|e| e.to_string()))
        .as_ref()
        .map_err(|e| Error::Unavailable(format!("GPT-2 tokenizer (tiktoken-rs r50k_base) failed to load: {e}")))
}

impl Tokenizer {
    /// The real GPT-2 vocabulary (tiktoken-rs's bundled r50k_base + `<|endoftext|>` = 50256).
    /// Built once per process, then shared.
    pub fn gpt2() -> Result<Tokenizer> {
        static TABLE: OnceLock<std::result::Result<Arc<Table>, String>> = OnceLock::new();
        let table = TABLE.get_or_init(|| {
            let bpe = gpt2_bpe().map_err(|e| e.to_string())?;
            let mut tokens = Vec::with_capacity(GPT2_VOCAB);
            for id in 0..GPT2_VOCAB as u32 {
                tokens.push(bpe.decode_bytes(&[id]).map_err(|e| format!("GPT-2 vocabulary has no token {}", e.token))?);
            }
            Table::new(&tokens, GPT2_EOT).map(Arc::new)
        });
        match table {
            Ok(t) => Ok(Tokenizer { table: t.clone() }),
            Err(e) => Err(Error::Unavailable(e.clone())),
        }
    }

    /// A tokenizer from an explicit table (token `i` = `tokens[i]`); `eot` must be a valid id.
    pub fn from_tokens(tokens: &[Vec<u8>], eot: u32) -> Result<Tokenizer> {
        Table::new(tokens, eot).map(|t| Tokenizer { table: Arc::new(t) }).map_err(Error::Data)
    }

    /// GPT-2 BPE encoding of `text` (ordinary: `<|endoftext|>` in the text is encoded as plain
    /// text, never as the EOT token). Always the GPT-2 (r50k_base) merges, whatever table this
    /// tokenizer decodes with.
    pub fn encode(&self, text: &str) -> Vec<u32> {
        // gpt2() has built the BPE already for tokenizers it made; read() ones build it here.
        gpt2_bpe().expect("tiktoken-rs's bundled r50k_base loads").encode_ordinary(text)
    }

    /// The bytes of all `ids` concatenated, as lossy UTF-8; ids outside the vocabulary decode to
    /// nothing (as in llm.c).
    pub fn decode(&self, ids: &[u32]) -> String {
        let mut out = Vec::with_capacity(ids.len() * 4);
        for &id in ids {
            if let Some(b) = self.decode_bytes(id) {
                out.extend_from_slice(b);
            }
        }
        String::from_utf8_lossy(&out).into_owned()
    }

    /// The raw bytes of token `id` (not necessarily UTF-8 on their own); None outside the vocab.
    pub fn decode_bytes(&self, id: u32) -> Option<&[u8]> {
        let t = &*self.table;
        let i = id as usize;
        if i + 1 >= t.offsets.len() {
            return None;
        }
        Some(&t.bytes[t.offsets[i] as usize..t.offsets[i + 1] as usize])
    }

    /// The end-of-text token id (50256 for GPT-2).
    pub fn eot(&self) -> u32 {
        self.table.eot
    }

    /// Number of token ids (50257 for GPT-2).
    pub fn vocab_size(&self) -> usize {
        self.table.offsets.len() - 1
    }

    /// Read llm.c's `gpt2_tokenizer.bin` (version 1 or 2).
    pub fn read(path: &Path) -> Result<Tokenizer> {
        let data = std::fs::read(path).map_err(|e| Error::io(path, e))?;
        Tokenizer::from_bytes(path, &data)
    }

    /// Parse the bytes of a `gpt2_tokenizer.bin` (version 1 or 2); `path` names them in errors
    /// (e.g. `<bundled>/gpt2_tokenizer.bin` for the one built into the binary).
    pub fn from_bytes(path: &Path, data: &[u8]) -> Result<Tokenizer> {
        let fail = |msg: String| Err(Error::format(path, msg));
        if data.is_empty() {
            return fail("file is empty, not a tokenizer file".into());
        }
        let word = |i: usize| u32::from_le_bytes([data[4 * i], data[4 * i + 1], data[4 * i + 2], data[4 * i + 3]]);
        if data.len() >= 4 && word(0) != TOKENIZER_MAGIC {
            let what = match word(0) {
                20240326 => "this is an llm.c model checkpoint, not a tokenizer file".to_string(),
                20240520 => "this is a token shard, not a tokenizer file".to_string(),
                m => format!("bad magic {m} (expected {TOKENIZER_MAGIC}); not a gpt2_tokenizer.bin file"),
            };
            return fail(what);
        }
        if data.len() < 1024 {
            return fail(format!("file is {} bytes, shorter than the 1024-byte tokenizer header (truncated?)", data.len()));
        }
        let version = word(1);
        let vocab = word(2) as usize;
        let eot = match version {
            1 => {
                if vocab != GPT2_VOCAB {
                    return fail(format!("version 1 tokenizer files must have {GPT2_VOCAB} tokens, this one says {vocab}"));
                }
                GPT2_EOT
            }
            2 => word(3),
            v => return fail(format!("unsupported tokenizer version {v} (expected 1 or 2)")),
        };
        if vocab == 0 {
            return fail("header says the vocabulary has 0 tokens".into());
        }
        if eot as usize >= vocab {
            return fail(format!("end-of-text id {eot} is outside the vocabulary of {vocab} tokens"));
        }
        // every token takes at least 2 bytes (its length and one byte): a header claiming more
        // tokens than that is refused before anything is allocated for them
        let room = (data.len() - 1024) / 2;
        if vocab > room {
            return fail(format!(
                "header says {vocab} tokens, but the {} bytes after the header hold at most {room} (truncated?)",
                data.len() - 1024
            ));
        }
        let mut bytes = Vec::with_capacity(data.len() - 1024);
        let mut offsets = Vec::with_capacity(vocab + 1);
        offsets.push(0u32);
        let mut pos = 1024;
        for i in 0..vocab {
            let Some(&len) = data.get(pos) else {
                return fail(format!("file ends before token {i} of {vocab} (truncated?)"));
            };
            let len = len as usize;
            if len == 0 {
                return fail(format!("token {i} has length 0"));
            }
            let Some(b) = data.get(pos + 1..pos + 1 + len) else {
                return fail(format!("file ends inside token {i} of {vocab} (truncated?)"));
            };
            bytes.extend_from_slice(b);
            offsets.push(bytes.len() as u32);
            pos += 1 + len;
        }
        Ok(Tokenizer { table: Arc::new(Table { bytes, offsets, eot }) })
    }

    /// Write llm.c's `gpt2_tokenizer.bin`, version 2, atomically (372,108 bytes for GPT-2).
    pub fn write(&self, path: &Path) -> Result<()> {
        let n = self.vocab_size();
        let mut out = Vec::with_capacity(1024 + n + self.table.bytes.len());
        let header = [TOKENIZER_MAGIC, 2, n as u32, self.eot()];
        for k in 0..256 {
            out.extend_from_slice(&header.get(k).copied().unwrap_or(0).to_le_bytes());
        }
        for id in 0..n as u32 {
            let b = self.decode_bytes(id).unwrap_or_default();
            if b.is_empty() || b.len() > 255 {
                return Err(Error::format(path, format!("token {id} is {} bytes; the format stores 1..=255", b.len())));
            }
            out.push(b.len() as u8);
            out.extend_from_slice(b);
        }
        crate::atomic::write_atomic(path, &out)
    }
}

impl Table {
    fn new(tokens: &[Vec<u8>], eot: u32) -> std::result::Result<Table, String> {
        if tokens.is_empty() {
            return Err("a tokenizer needs at least one token".into());
        }
        if eot as usize >= tokens.len() {
            return Err(format!("end-of-text id {eot} is outside the vocabulary of {} tokens", tokens.len()));
        }
        let total: usize = tokens.iter().map(|t| t.len()).sum();
        if total > u32::MAX as usize {
            return Err("tokenizer table too large".into());
        }
        let mut bytes = Vec::with_capacity(total);
        let mut offsets = Vec::with_capacity(tokens.len() + 1);
        offsets.push(0);
        for t in tokens {
            bytes.extend_from_slice(t);
            offsets.push(bytes.len() as u32);
        }
        Ok(Table { bytes, offsets, eot })
    }
}
