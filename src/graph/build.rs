//! Builds GPT-2's training and inference graphs. The only module that knows the model.
use super::{BufId, BufferTable, Launch};
use crate::model::{Config, NUM_PARAM_TENSORS};

/// Options of a training graph.
#[derive(Clone, Debug)]
pub struct TrainOptions {
    /// micro-batch size B and sequence length T
    pub b: usize,
    pub t: usize,
    /// micro-steps per optimiser step; the loss gradient is seeded with 1/(B·T·grad_accum)
    pub grad_accum: usize,
    pub weight_decay: f32,
    /// true: decay every tensor (llm.c's CPU trainer / test_gpt2); false: only 2-D weights (CUDA trainer)
    pub decay_all: bool,
    /// global gradient-norm clip; 0 disables clipping (the norm is still computed)
    pub grad_clip: f32,
}

/// Buffers the host talks to.
#[derive(Clone, Debug)]
pub struct GraphIo {
    pub params: [BufId; NUM_PARAM_TENSORS],
    pub grads: Option<[BufId; NUM_PARAM_TENSORS]>,
    pub m: Option<[BufId; NUM_PARAM_TENSORS]>,
    pub v: Option<[BufId; NUM_PARAM_TENSORS]>,
    /// i32 (B·T) inputs and targets
    pub tokens: BufId,
    pub targets: BufId,
    /// f32 (B·T) per-position losses
    pub losses: BufId,
    /// f32 (rows, Vp) logits of the forward graph (for the train graph: a scratch chunk that ends
    /// up holding dlogits)
    pub logits: BufId,
    /// optimiser scalars (train graph only)
    pub hyper: Option<BufId>,
}

/// A built graph: its buffers and its launches in phases.
#[derive(Clone, Debug)]
pub struct Graph {
    pub cfg: Config,
    pub b: usize,
    pub t: usize,
    pub buffers: BufferTable,
    pub io: GraphIo,
    /// zero the parameter gradients (once per optimiser step)
    pub zero_grad: Vec<Launch>,
    /// embeddings → logits → losses (and, in a train graph, dlogits)
    pub forward: Vec<Launch>,
    /// dlogits → parameter gradients (accumulated)
    pub backward: Vec<Launch>,
    /// gradient norm, clip scale, AdamW
    pub update: Vec<Launch>,
}

pub fn build_train_step(_cfg: &Config, _opts: &TrainOptions) -> Graph {
    todo!()
}

pub fn build_forward(_cfg: &Config, _b: usize, _t: usize) -> Graph {
    todo!()
}
