//! The kernel graph: an ordered list of kernel launches over a table of named buffers.
//! `build.rs` is the only place that knows GPT-2; backends execute `Launch`es over `BufferTable`s.

pub mod build;
pub mod kernels;

pub use build::{build_forward, build_train_step, Graph, GraphIo, TrainOptions};
pub use kernels::{BufId, Hyper, Kernel, Launch, View};

/// Element type of a buffer. Everything is f32 today except token ids; the enum is where
/// mixed precision (bf16/f16 storage with f32 master weights) will slot in.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DType {
    F32,
    I32,
}

impl DType {
    pub fn size(self) -> usize {
        4
    }
}

/// What a buffer holds; used for memory accounting, checkpointing and planning.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Role {
    /// parameter tensor number `0..16` in llm.c checkpoint order
    Param(usize),
    /// gradient of parameter tensor `i`
    Grad(usize),
    /// AdamW first moment of tensor `i`
    OptM(usize),
    /// AdamW second moment of tensor `i`
    OptV(usize),
    /// saved for the backward pass or passed between kernels
    Activation,
    /// gradient of an activation
    ActGrad,
    /// i32 input token ids
    Tokens,
    /// i32 target token ids
    Targets,
    /// per-position losses read back by the host
    Losses,
    /// optimiser scalars (see `Hyper`)
    Hyper,
    /// small reduction scratch (norm parts)
    Scratch,
}

#[derive(Clone, Debug)]
pub struct BufferDesc {
    pub name: String,
    /// number of elements
    pub len: usize,
    pub dtype: DType,
    pub role: Role,
}

impl BufferDesc {
    pub fn bytes(&self) -> usize {
        self.len * self.dtype.size()
    }
}

/// Every buffer a graph uses, indexed by `BufId`.
#[derive(Clone, Debug, Default)]
pub struct BufferTable {
    pub bufs: Vec<BufferDesc>,
}

impl BufferTable {
    pub fn add(&mut self, name: impl Into<String>, len: usize, dtype: DType, role: Role) -> BufId {
        let id = BufId(self.bufs.len() as u32);
        self.bufs.push(BufferDesc { name: name.into(), len, dtype, role });
        id
    }
    pub fn get(&self, id: BufId) -> &BufferDesc {
        &self.bufs[id.0 as usize]
    }
    /// The whole buffer as a view.
    pub fn view(&self, id: BufId) -> View {
        View { buf: id, offset: 0, len: self.get(id).len }
    }
    pub fn len(&self) -> usize {
        self.bufs.len()
    }
    pub fn is_empty(&self) -> bool {
        self.bufs.is_empty()
    }
    pub fn total_bytes(&self) -> usize {
        self.bufs.iter().map(|b| b.bytes()).sum()
    }
    pub fn iter(&self) -> impl Iterator<Item = (BufId, &BufferDesc)> {
        self.bufs.iter().enumerate().map(|(i, b)| (BufId(i as u32), b))
    }
}
