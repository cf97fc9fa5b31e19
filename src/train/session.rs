//! A graph allocated on a backend, with the host-side operations that training, evaluation,
//! verification and benchmarking share: parameter/optimiser-state transfer, one micro-step, one
//! optimiser update, one evaluation.

use crate::backend::Backend;
use crate::error::{Error, Result};
use crate::graph::{BufId, Graph, Hyper, Kernel};
use crate::model::{ParamLayout, NUM_PARAM_TENSORS};

/// AdamW constants that do not change during a run.
#[derive(Clone, Copy, Debug)]
pub struct AdamConsts {
    pub beta1: f32,
    pub beta2: f32,
    pub eps: f32,
}

impl Default for AdamConsts {
    fn default() -> Self {
        AdamConsts { beta1: 0.9, beta2: 0.95, eps: 1e-8 }
    }
}

pub struct Session {
    pub backend: Box<dyn Backend>,
    pub graph: Graph,
    pub layout: ParamLayout,
    /// micro-steps run since the last `zero_grad` (their losses add up in `io.losses`)
    micro: usize,
}

impl Session {
    /// Allocate every buffer of `graph` on `backend`.
    pub fn new(mut backend: Box<dyn Backend>, graph: Graph) -> Result<Session> {
        let phases = [&graph.zero_grad[..], &graph.train[..], &graph.eval[..], &graph.update[..]];
        backend.check_fits(&graph.buffers, &phases)?;
        backend.alloc(&graph.buffers)?;
        let layout = ParamLayout::new(&graph.cfg);
        Ok(Session { backend, graph, layout, micro: 0 })
    }

    fn upload_flat(&mut self, ids: [crate::graph::BufId; NUM_PARAM_TENSORS], flat: &[f32]) -> Result<()> {
        if flat.len() != self.layout.total {
            return Err(Error::Data(format!("expected {} parameters, got {}", self.layout.total, flat.len())));
        }
        for (i, id) in ids.iter().enumerate() {
            let o = self.layout.offsets[i];
            self.backend.upload_f32(*id, &flat[o..o + self.layout.sizes[i]])?;
        }
        Ok(())
    }

    fn download_flat(&mut self, ids: [crate::graph::BufId; NUM_PARAM_TENSORS]) -> Result<Vec<f32>> {
        let mut flat = Vec::with_capacity(self.layout.total);
        for id in ids {
            flat.extend(self.backend.download_f32(id)?);
        }
        Ok(flat)
    }

    pub fn upload_params(&mut self, flat: &[f32]) -> Result<()> {
        self.upload_flat(self.graph.io.params, flat)
    }
    pub fn download_params(&mut self) -> Result<Vec<f32>> {
        self.download_flat(self.graph.io.params)
    }
    pub fn download_grads(&mut self) -> Result<Vec<f32>> {
        let ids = self.graph.io.grads.ok_or_else(|| not_train("gradients"))?;
        self.download_flat(ids)
    }
    /// AdamW (m, v), flat in checkpoint order.
    pub fn download_opt_state(&mut self) -> Result<(Vec<f32>, Vec<f32>)> {
        let (m, v) = (self.graph.io.m.ok_or_else(|| not_train("optimiser state"))?, self.graph.io.v.unwrap());
        Ok((self.download_flat(m)?, self.download_flat(v)?))
    }
    pub fn upload_opt_state(&mut self, m: &[f32], v: &[f32]) -> Result<()> {
        let (mi, vi) = (self.graph.io.m.ok_or_else(|| not_train("optimiser state"))?, self.graph.io.v.unwrap());
        self.upload_flat(mi, m)?;
        self.upload_flat(vi, v)
    }

    fn upload_batch(&mut self, x: &[i32], y: &[i32]) -> Result<()> {
        let n = self.graph.b * self.graph.t;
        if x.len() != n || y.len() != n {
            return Err(Error::Data(format!("batch has {} tokens, the graph expects B·T = {n}", x.len())));
        }
        self.backend.upload_i32(self.graph.io.tokens, x)?;
        self.backend.upload_i32(self.graph.io.targets, y)
    }

    /// Mean of the per-position losses left by the last `eval` (waits for the device).
    pub fn mean_loss(&mut self) -> Result<f32> {
        let losses = self.backend.download_f32(self.graph.io.losses)?;
        let sum: f64 = losses.iter().map(|&l| l as f64).sum();
        Ok((sum / losses.len() as f64) as f32)
    }

    /// Zero the gradients and the summed losses: the start of an optimiser step.
    pub fn zero_grad(&mut self) -> Result<()> {
        self.micro = 0;
        self.backend.run(&self.graph.zero_grad)
    }

    /// One micro-step (forward, loss, backward; gradients and losses accumulate). Returns the mean
    /// loss over the micro-steps since `zero_grad` (this batch's loss when it is the first).
    pub fn train_micro(&mut self, x: &[i32], y: &[i32]) -> Result<f32> {
        self.train_micro_async(x, y)?;
        self.step_loss()
    }

    /// One micro-step without reading anything back: on a GPU all the micro-steps and the update
    /// queue up without a host wait; read the step's loss once with `step_loss`.
    pub fn train_micro_async(&mut self, x: &[i32], y: &[i32]) -> Result<()> {
        self.upload_batch(x, y)?;
        self.backend.run(&self.graph.train)?;
        self.micro += 1;
        Ok(())
    }

    /// Mean loss over every position of the micro-steps since `zero_grad` (waits for the device).
    /// An `eval` in between overwrites the sums, so read this first.
    pub fn step_loss(&mut self) -> Result<f32> {
        Ok(self.mean_loss()? / self.micro.max(1) as f32)
    }

    /// One AdamW update with learning rate `lr` at 1-based step `t`. Returns the gradient norm
    /// (before clipping).
    pub fn update(&mut self, lr: f32, adam: AdamConsts, t: usize) -> Result<f32> {
        let hyper_id = self.upload_hyper(lr, adam, t)?;
        self.backend.run(&self.graph.update)?;
        let h = self.backend.download_f32(hyper_id)?;
        Ok(h[Hyper::GRAD_NORM])
    }

    /// The first half of `update`: the gradient norm and clip scale only (waits for the device),
    /// so the caller can decide whether to `apply_update` (llm.c's outlier skipping).
    pub fn grad_norm(&mut self, lr: f32, adam: AdamConsts, t: usize) -> Result<f32> {
        let hyper_id = self.upload_hyper(lr, adam, t)?;
        let split = self.update_split();
        self.backend.run(&self.graph.update[..split])?;
        let h = self.backend.download_f32(hyper_id)?;
        Ok(h[Hyper::GRAD_NORM])
    }

    /// The second half of `update`, after `grad_norm`: AdamW with the clip scale it left.
    pub fn apply_update(&mut self) -> Result<()> {
        let split = self.update_split();
        self.backend.run(&self.graph.update[split..])
    }

    /// Index of the first AdamW launch in the update phase.
    fn update_split(&self) -> usize {
        self.graph.update.iter().position(|l| matches!(l.kernel, Kernel::AdamW { .. })).unwrap_or(self.graph.update.len())
    }

    fn upload_hyper(&mut self, lr: f32, adam: AdamConsts, t: usize) -> Result<BufId> {
        let hyper_id = self.graph.io.hyper.ok_or_else(|| not_train("the optimiser"))?;
        let mut h = [0f32; Hyper::LEN];
        h[Hyper::LR] = lr;
        h[Hyper::BETA1] = adam.beta1;
        h[Hyper::BETA2] = adam.beta2;
        h[Hyper::EPS] = adam.eps;
        h[Hyper::BC1] = (1.0 - (adam.beta1 as f64).powi(t as i32)) as f32;
        h[Hyper::BC2] = (1.0 - (adam.beta2 as f64).powi(t as i32)) as f32;
        h[Hyper::GRAD_SCALE] = 1.0;
        self.backend.upload_f32(hyper_id, &h)?;
        Ok(hyper_id)
    }

    /// Forward only; returns the loss at every position (B·T, row-major).
    pub fn eval_losses(&mut self, x: &[i32], y: &[i32]) -> Result<Vec<f32>> {
        self.upload_batch(x, y)?;
        self.backend.run(&self.graph.eval)?;
        self.backend.download_f32(self.graph.io.losses)
    }

    /// Forward only; returns the mean loss over the batch (the logits stay in `io.logits`).
    pub fn eval(&mut self, x: &[i32], y: &[i32]) -> Result<f32> {
        self.upload_batch(x, y)?;
        self.backend.run(&self.graph.eval)?;
        self.mean_loss()
    }

    /// Logits (first `cfg.v` columns) of row `row` (= b·T + t) after `eval`; row must be below
    /// `io.logits_rows`.
    pub fn logits_row(&mut self, row: usize) -> Result<Vec<f32>> {
        let io = &self.graph.io;
        assert!(row < io.logits_rows, "logits row {row} not kept by the graph");
        let vp = self.graph.cfg.vp;
        let view = self.graph.buffers.view(io.logits).slice(row * vp, self.graph.cfg.v);
        self.backend.download_view(view)
    }
}

fn not_train(what: &str) -> Error {
    Error::backend("graph", format!("{what} requested from an inference-only graph"))
}
