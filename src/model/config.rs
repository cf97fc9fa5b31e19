//! GPT-2 hyper-parameters, from an llm.c checkpoint header or a descriptor like `d12`.

use crate::error::{Error, Result};

/// Shape of a GPT-2 model, named as in llm.c.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Config {
    /// max sequence length (rows of wpe)
    pub max_t: usize,
    /// real vocabulary size
    pub v: usize,
    /// padded vocabulary size (rows of wte), a multiple of 128
    pub vp: usize,
    /// number of layers
    pub l: usize,
    /// number of heads
    pub nh: usize,
    /// channels
    pub c: usize,
}

pub const GPT2_VOCAB: usize = 50257;
pub const GPT2_PADDED_VOCAB: usize = 50304;
pub const GPT2_EOT: u32 = 50256;

impl Config {
    /// `dN` / `gpt2:dN` as llm.c's train_gpt2.cu defines them (V=50257, Vp=50304, maxT=1024).
    pub fn from_descriptor(desc: &str) -> Result<Config> {
        let d = desc.strip_prefix("gpt2:").unwrap_or(desc);
        let depth: usize = d
            .strip_prefix('d')
            .and_then(|n| n.parse().ok())
            .ok_or_else(|| Error::flag("--init", format!("'{desc}' is neither a .bin checkpoint nor a descriptor d6/d12/d24/d36/d48")))?;
        let (c, nh) = match depth {
            6 => (384, 6),
            12 => (768, 12),
            24 => (1024, 16),
            36 => (1280, 20),
            48 => (1600, 25),
            60 => (1920, 30),
            72 => (2880, 30),
            84 => (3456, 36),
            _ => return Err(Error::flag("--init", format!("unknown depth in '{desc}'; use d6, d12, d24, d36, d48, d60, d72 or d84"))),
        };
        Ok(Config { max_t: 1024, v: GPT2_VOCAB, vp: GPT2_PADDED_VOCAB, l: depth, nh, c })
    }

    /// Channels per head.
    pub fn hs(&self) -> usize {
        self.c / self.nh
    }

    /// Check the invariants every kernel relies on.
    pub fn validate(&self) -> std::result::Result<(), String> {
        if self.l == 0 || self.nh == 0 || self.c == 0 || self.v == 0 || self.max_t == 0 {
            return Err(format!("invalid model shape {self:?}: every size must be > 0"));
        }
        if self.c % self.nh != 0 {
            return Err(format!("channels {} not divisible by heads {}", self.c, self.nh));
        }
        if self.vp < self.v {
            return Err(format!("padded vocab {} smaller than vocab {}", self.vp, self.v));
        }
        Ok(())
    }
}
