//! Parameter layout: the 16 tensors of an llm.c checkpoint, in file order.

use super::Config;

pub const NUM_PARAM_TENSORS: usize = 16;

pub const PARAM_NAMES: [&str; NUM_PARAM_TENSORS] = [
    "wte", "wpe", "ln1w", "ln1b", "qkvw", "qkvb", "attprojw", "attprojb", "ln2w", "ln2b", "fcw", "fcb", "fcprojw",
    "fcprojb", "lnfw", "lnfb",
];

/// Indices of the tensors, for readability at call sites.
pub mod idx {
    pub const WTE: usize = 0;
    pub const WPE: usize = 1;
    pub const LN1W: usize = 2;
    pub const LN1B: usize = 3;
    pub const QKVW: usize = 4;
    pub const QKVB: usize = 5;
    pub const ATTPROJW: usize = 6;
    pub const ATTPROJB: usize = 7;
    pub const LN2W: usize = 8;
    pub const LN2B: usize = 9;
    pub const FCW: usize = 10;
    pub const FCB: usize = 11;
    pub const FCPROJW: usize = 12;
    pub const FCPROJB: usize = 13;
    pub const LNFW: usize = 14;
    pub const LNFB: usize = 15;
}

/// The 2-D weight matrices that llm.c's CUDA trainer (and PyTorch's recipe) weight-decays.
pub const DECAYED_2D: [usize; 6] = [idx::WTE, idx::WPE, idx::QKVW, idx::ATTPROJW, idx::FCW, idx::FCPROJW];

/// Element counts of the 16 tensors and their offsets in the concatenated (file) order.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ParamLayout {
    pub sizes: [usize; NUM_PARAM_TENSORS],
    pub offsets: [usize; NUM_PARAM_TENSORS],
    pub total: usize,
}

impl ParamLayout {
    pub fn new(cfg: &Config) -> ParamLayout {
        let (l, c, vp, max_t) = (cfg.l, cfg.c, cfg.vp, cfg.max_t);
        let sizes = [
            vp * c,        // wte
            max_t * c,     // wpe
            l * c,         // ln1w
            l * c,         // ln1b
            l * 3 * c * c, // qkvw
            l * 3 * c,     // qkvb
            l * c * c,     // attprojw
            l * c,         // attprojb
            l * c,         // ln2w
            l * c,         // ln2b
            l * 4 * c * c, // fcw
            l * 4 * c,     // fcb
            l * c * 4 * c, // fcprojw
            l * c,         // fcprojb
            c,             // lnfw
            c,             // lnfb
        ];
        let mut offsets = [0; NUM_PARAM_TENSORS];
        let mut total = 0;
        for i in 0..NUM_PARAM_TENSORS {
            offsets[i] = total;
            total += sizes[i];
        }
        ParamLayout { sizes, offsets, total }
    }

    /// Split a flat parameter vector (file order) into the 16 tensors.
    pub fn split<'a>(&self, flat: &'a [f32]) -> Vec<&'a [f32]> {
        (0..NUM_PARAM_TENSORS).map(|i| &flat[self.offsets[i]..self.offsets[i] + self.sizes[i]]).collect()
    }

    /// `split`, mutably: the 16 tensors of a flat vector as disjoint slices (the tensors are
    /// contiguous, in file order).
    pub fn split_mut<'a>(&self, flat: &'a mut [f32]) -> Vec<&'a mut [f32]> {
        let mut rest = &mut flat[..self.total];
        self.sizes
            .iter()
            .map(|&n| {
                let (t, tail) = std::mem::take(&mut rest).split_at_mut(n);
                rest = tail;
                t
            })
            .collect()
    }
}
