//! A graph allocated on a backend, with the host-side operations that training, evaluation,
//! verification and benchmarking share: parameter/optimiser-state transfer, one micro-step, one
//! optimiser update, one evaluation. Every phase of the graph is validated and prepared once, in
//! `new`, and replayed by name; per-step values go through the device scalars buffer.

use crate::backend::{Backend, Prepared};
use crate::error::{Error, Result};
use crate::graph::{check_token_ids, Graph, Phase, Scalars};
use crate::model::{ParamLayout, NUM_PARAM_TENSORS};
use std::collections::BTreeMap;

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
    /// every non-empty phase of the graph, prepared on the backend
    prepared: BTreeMap<Phase, Prepared>,
    /// the host's copy of the device scalars (uploaded whole when a host-written slot changes)
    scalars: [f32; Scalars::LEN],
    /// `Train` cut at the gradient buckets, prepared on the first `train_micro_overlapped`
    train_parts: Option<Vec<Prepared>>,
    /// `--offload-optimizer`: AdamW's state on the host (the graph's `io.host_update`)
    host_opt: Option<HostAdam>,
    /// dL/dloss before the loss scale (`set_loss_seed`); the device gets it × LOSS_SCALE
    loss_seed: f32,
    /// whether the last `GradNorm` found the gradients inf/NaN (the update was skipped)
    found_inf: bool,
}

/// AdamW on the host (`--offload-optimizer`): the fp32 master weights and both moments, flat in
/// checkpoint order, updated tensor by tensor by the cpu backend's own AdamW kernel, so a cpu run
/// gives exactly the parameters the on-device optimiser does.
struct HostAdam {
    master: Vec<f32>,
    m: Vec<f32>,
    v: Vec<f32>,
    decays: [f32; NUM_PARAM_TENSORS],
}

impl Session {
    /// Allocate every buffer of `graph` on `backend` and prepare each of its phases.
    pub fn new(mut backend: Box<dyn Backend>, graph: Graph) -> Result<Session> {
        let phases: Vec<&[crate::graph::Launch]> = graph.iter_phases().map(|(_, l)| l).collect();
        backend.check_fits(&graph.buffers, &phases)?;
        backend.alloc(&graph.buffers)?;
        let mut prepared = BTreeMap::new();
        for (phase, launches) in graph.iter_phases() {
            prepared.insert(phase, backend.prepare(launches)?);
        }
        let layout = ParamLayout::new(&graph.cfg);
        let mut scalars = [0f32; Scalars::LEN];
        scalars[Scalars::GRAD_SCALE] = 1.0;
        scalars[Scalars::LOSS_SCALE] = 1.0;
        scalars[Scalars::LOSS_SEED] = 1.0 / (graph.b * graph.t * graph.grad_accum.max(1)) as f32;
        let host_opt = graph.io.host_update.map(|decays| {
            let n = layout.total;
            HostAdam { master: vec![0.0; n], m: vec![0.0; n], v: vec![0.0; n], decays }
        });
        let loss_seed = scalars[Scalars::LOSS_SEED];
        let mut s = Session { backend, graph, layout, micro: 0, prepared, scalars, train_parts: None, host_opt, loss_seed, found_inf: false };
        s.upload_scalars()?;
        Ok(s)
    }

    /// Run a phase of the graph (nothing when the graph has none).
    pub fn run_phase(&mut self, phase: Phase) -> Result<()> {
        match self.prepared.get(&phase) {
            Some(&p) => self.backend.run_prepared(p),
            None => Ok(()),
        }
    }

    /// Set the loss-gradient seed: dL/dloss for every position, 1/N with N the tokens of the
    /// whole optimiser step (all micro-steps, all ranks). `new` seeds 1/(B·T·grad_accum).
    pub fn set_loss_seed(&mut self, seed: f32) -> Result<()> {
        self.loss_seed = seed;
        self.scalars[Scalars::LOSS_SEED] = seed * self.scalars[Scalars::LOSS_SCALE];
        self.upload_scalars()
    }

    /// fp16's loss scale S: the loss gradient is seeded S times larger, so every gradient carries
    /// S, and `GradNorm` divides it out of the norm and the update (1: no scaling).
    pub fn set_loss_scale(&mut self, scale: f32) -> Result<()> {
        if self.scalars[Scalars::LOSS_SCALE] == scale {
            return Ok(()); // unchanged: nothing to upload (the loop sets it every step)
        }
        self.scalars[Scalars::LOSS_SCALE] = scale;
        self.scalars[Scalars::LOSS_SEED] = self.loss_seed * scale;
        self.upload_scalars()
    }

    /// Whether the last gradient norm (`update`, `grad_norm`) was inf/NaN, so that AdamW left
    /// everything as it was: known from the same read-back as the norm, no extra wait.
    pub fn found_inf(&self) -> bool {
        self.found_inf
    }

    fn upload_scalars(&mut self) -> Result<()> {
        let id = self.graph.io.scalars;
        self.backend.upload_f32(id, &self.scalars)
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

    /// The parameters (flat, checkpoint order); with low-precision parameters, into the f32
    /// master weights too (the parameters get them rounded).
    pub fn upload_params(&mut self, flat: &[f32]) -> Result<()> {
        self.upload_flat(self.graph.io.params, flat)?;
        if let Some(ids) = self.graph.io.masters {
            self.upload_flat(ids, flat)?;
        }
        if let Some(h) = &mut self.host_opt {
            h.master.copy_from_slice(flat);
        }
        Ok(())
    }
    /// The parameters: the f32 master weights where the graph has them (mixed precision), so
    /// that a checkpoint holds what training updates, not its rounded copy.
    pub fn download_params(&mut self) -> Result<Vec<f32>> {
        if let Some(h) = &self.host_opt {
            return Ok(h.master.clone());
        }
        self.download_flat(self.graph.io.masters.unwrap_or(self.graph.io.params))
    }
    pub fn download_grads(&mut self) -> Result<Vec<f32>> {
        let ids = self.graph.io.grads.ok_or_else(|| not_train("gradients"))?;
        self.download_flat(ids)
    }
    /// The gradients of the flat range `range` (checkpoint order) only: the parts of the tensors
    /// that fall in it (a ZeRO-1 rank's range).
    pub fn download_grads_range(&mut self, range: std::ops::Range<usize>) -> Result<Vec<f32>> {
        let ids = self.graph.io.grads.ok_or_else(|| not_train("gradients"))?;
        let mut out = Vec::with_capacity(range.len());
        for (i, id) in ids.into_iter().enumerate() {
            let (o, n) = (self.layout.offsets[i], self.layout.sizes[i]);
            let (a, b) = (range.start.max(o), range.end.min(o + n));
            if a < b {
                out.extend(self.backend.download_view(crate::graph::View { buf: id, offset: a - o, len: b - a })?);
            }
        }
        Ok(out)
    }
    /// Overwrite the gradients (flat, checkpoint order): an in-process all-reduce uploads the sum.
    pub fn upload_grads(&mut self, flat: &[f32]) -> Result<()> {
        let ids = self.graph.io.grads.ok_or_else(|| not_train("gradients"))?;
        self.upload_flat(ids, flat)
    }
    /// AdamW (m, v), flat in checkpoint order; with ZeRO-1, those of the rank's range only.
    pub fn download_opt_state(&mut self) -> Result<(Vec<f32>, Vec<f32>)> {
        if let Some(h) = &self.host_opt {
            return Ok((h.m.clone(), h.v.clone()));
        }
        if let Some(sh) = self.graph.io.opt_shard.clone() {
            let n = sh.range.len();
            let mut m = self.backend.download_f32(sh.m)?;
            let mut v = self.backend.download_f32(sh.v)?;
            m.truncate(n);
            v.truncate(n);
            return Ok((m, v));
        }
        let (m, v) = (self.graph.io.m.ok_or_else(|| not_train("optimiser state"))?, self.graph.io.v.unwrap());
        Ok((self.download_flat(m)?, self.download_flat(v)?))
    }
    pub fn upload_opt_state(&mut self, m: &[f32], v: &[f32]) -> Result<()> {
        if let Some(h) = &mut self.host_opt {
            if m.len() != h.m.len() || v.len() != h.v.len() {
                return Err(Error::Data(format!("expected the AdamW state of {} parameters, got {}", h.m.len(), m.len())));
            }
            h.m.copy_from_slice(m);
            h.v.copy_from_slice(v);
            return Ok(());
        }
        if let Some(sh) = self.graph.io.opt_shard.clone() {
            let n = sh.range.len();
            if m.len() != n || v.len() != n {
                return Err(Error::Data(format!("expected the AdamW state of {n} parameters (this rank's ZeRO-1 range), got {}", m.len())));
            }
            // the buffers have at least one element (an empty range keeps a placeholder)
            let pad = |x: &[f32]| if x.is_empty() { vec![0.0] } else { x.to_vec() };
            self.backend.upload_f32(sh.m, &pad(m))?;
            return self.backend.upload_f32(sh.v, &pad(v));
        }
        let (mi, vi) = (self.graph.io.m.ok_or_else(|| not_train("optimiser state"))?, self.graph.io.v.unwrap());
        self.upload_flat(mi, m)?;
        self.upload_flat(vi, v)
    }

    /// AdamW with a gradient norm the caller computed (ZeRO-1: each rank holds the summed
    /// gradients of its own range only, and the norm comes from every rank's part); `GradNorm` is
    /// not run. The clip scale is `ClipScale`'s: `max_norm / norm` when `max_norm > 0` and
    /// `norm > max_norm`, else 1.
    pub fn update_with_norm(&mut self, lr: f32, adam: AdamConsts, t: usize, norm: f32, max_norm: f32) -> Result<()> {
        self.check_optimiser()?;
        self.write_optim_scalars(lr, adam, t);
        self.scalars[Scalars::GRAD_NORM] = norm;
        let s = self.scalars[Scalars::LOSS_SCALE];
        self.scalars[Scalars::GRAD_SCALE] = (if max_norm > 0.0 && norm > max_norm { max_norm / norm } else { 1.0 }) / s;
        self.found_inf = !norm.is_finite();
        self.scalars[Scalars::FOUND_INF] = if self.found_inf { 1.0 } else { 0.0 };
        self.upload_scalars()?;
        let r = self.apply_update();
        self.scalars[Scalars::FOUND_INF] = 0.0;
        r
    }

    /// The graph can train: it has an `Update` phase, or AdamW runs on the host.
    fn check_optimiser(&self) -> Result<()> {
        if self.prepared.contains_key(&Phase::Update) || self.host_opt.is_some() {
            Ok(())
        } else {
            Err(not_train("the optimiser"))
        }
    }

    /// `--offload-optimizer`'s update: the scalars `GradNorm` left (the clip scale) are read back,
    /// then tensor by tensor its gradient is downloaded, AdamW updates the host's master copy and
    /// m and v, and the parameters are uploaded. The three overlap as a pipeline: a host thread
    /// runs AdamW (itself on every core) on tensor i while this thread waits for the download of
    /// tensor i+1 and uploads tensor i−1. The next step's forward cannot start earlier, since it
    /// reads every updated weight (overlapping it would need a delayed update, a different
    /// optimiser). The result is the same, bit for bit, as the sequential loop.
    fn host_update(&mut self, hyper: &[f32]) -> Result<()> {
        if hyper[Scalars::FOUND_INF] != 0.0 {
            return Ok(()); // a skipped step: AdamW would change nothing
        }
        let grads = self.graph.io.grads.ok_or_else(|| not_train("gradients"))?;
        let params = self.graph.io.params;
        let h = self.host_opt.as_mut().expect("called with a host optimiser");
        let decays = h.decays;
        // each tensor's disjoint (master, m, v) slices, in checkpoint order
        let l = &self.layout;
        let parts = l.split_mut(&mut h.master).into_iter().zip(l.split_mut(&mut h.m)).zip(l.split_mut(&mut h.v));
        let backend = &mut self.backend;
        std::thread::scope(|s| -> Result<()> {
            use std::sync::mpsc;
            // one gradient waits while AdamW runs on another: at most two tensors' gradients in flight
            let (to_worker, work) = mpsc::sync_channel::<(usize, Vec<f32>, &mut [f32], &mut [f32], &mut [f32])>(1);
            let (to_main, done) = mpsc::channel::<(usize, &mut [f32])>();
            s.spawn(move || {
                for (i, g, p, m, v) in work {
                    crate::backend::cpu::kernels::adamw(p, &g, m, v, hyper, decays[i]);
                    if to_main.send((i, p)).is_err() {
                        break; // the main thread gave up (a transfer failed)
                    }
                }
            });
            for (i, ((p, m), v)) in parts.enumerate() {
                let g = backend.download_f32(grads[i])?;
                // a closed channel means the worker panicked: the join at the end of the scope reports it
                let _ = to_worker.send((i, g, p, m, v));
                while let Ok((j, p)) = done.try_recv() {
                    backend.upload_f32(params[j], p)?;
                }
            }
            drop(to_worker);
            for (j, p) in done.iter() {
                backend.upload_f32(params[j], p)?;
            }
            Ok(())
        })
    }

    fn upload_batch(&mut self, x: &[i32], y: &[i32]) -> Result<()> {
        let n = self.graph.b * self.graph.t;
        if x.len() != n || y.len() != n {
            return Err(Error::Data(format!("batch has {} tokens, the graph expects B·T = {n}", x.len())));
        }
        // kernels assume valid ids (graph::signature); the data loader has already named the
        // shard of a bad token, this catches every other source of batches
        let v = self.graph.cfg.v;
        for (ids, what) in [(x, "input"), (y, "target")] {
            if let Err((i, bad)) = check_token_ids(ids, v) {
                return Err(Error::Data(format!("{what} token {bad} at batch position {i} is outside the vocabulary [0, {v})")));
            }
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

    /// Sum of the per-position losses of the micro-steps since `zero_grad` (waits for the
    /// device): what ranks add up to report the global token mean.
    pub fn loss_sum(&mut self) -> Result<f64> {
        let losses = self.backend.download_f32(self.graph.io.losses)?;
        Ok(losses.iter().map(|&l| l as f64).sum())
    }

    /// Zero the gradients and the summed losses: the start of an optimiser step.
    pub fn zero_grad(&mut self) -> Result<()> {
        self.micro = 0;
        self.run_phase(Phase::ZeroGrad)
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
        self.run_phase(Phase::Train)?;
        self.micro += 1;
        Ok(())
    }

    /// `train_micro_async` with `Train` run bucket by bucket (`GraphIo::grad_buckets`): after each
    /// part, the gradients it finished are downloaded and handed to `on_bucket(k, values)`
    /// (the views' values concatenated), which can sum them over ranks on another thread while
    /// the next part runs on the device. Put the sums back with `upload_grad_buckets`.
    pub fn train_micro_overlapped(&mut self, x: &[i32], y: &[i32], on_bucket: &mut dyn FnMut(usize, Vec<f32>) -> Result<()>) -> Result<()> {
        if self.train_parts.is_none() {
            let launches = self.graph.phase(Phase::Train).to_vec();
            let mut parts = Vec::new();
            let mut start = 0;
            for b in &self.graph.io.grad_buckets {
                parts.push(self.backend.prepare(&launches[start..b.end])?);
                start = b.end;
            }
            self.train_parts = Some(parts);
        }
        self.upload_batch(x, y)?;
        let parts = self.train_parts.clone().expect("prepared above");
        for (k, p) in parts.into_iter().enumerate() {
            self.backend.run_prepared(p)?;
            let mut values = Vec::new();
            for &(_, v) in &self.graph.io.grad_buckets[k].grads {
                values.extend(self.backend.download_view(v)?);
            }
            on_bucket(k, values)?;
        }
        self.micro += 1;
        Ok(())
    }

    /// The summed gradient buckets (`sums[k]` for bucket k, as `train_micro_overlapped` handed
    /// them out) written back: each tensor put together on the host and uploaded whole.
    pub fn upload_grad_buckets(&mut self, sums: &[Vec<f32>]) -> Result<()> {
        let ids = self.graph.io.grads.ok_or_else(|| not_train("gradients"))?;
        let mut tensors: Vec<Vec<f32>> = self.layout.sizes.iter().map(|&n| vec![0f32; n]).collect();
        for (b, sum) in self.graph.io.grad_buckets.iter().zip(sums) {
            let mut at = 0;
            for &(i, v) in &b.grads {
                tensors[i][v.offset..v.offset + v.len].copy_from_slice(&sum[at..at + v.len]);
                at += v.len;
            }
        }
        for (id, t) in ids.iter().zip(&tensors) {
            self.backend.upload_f32(*id, t)?;
        }
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
        self.queue_grad_norm(lr, adam, t)?;
        if self.host_opt.is_some() {
            // the host update needs the scalars anyway: one read-back serves it and the norm
            let h = self.read_scalars()?;
            self.host_update(&h)?;
            return Ok(h[Scalars::GRAD_NORM]);
        }
        self.apply_update()?;
        self.read_grad_norm()
    }

    /// The first half of `update`: the gradient norm and clip scale only (waits for the device),
    /// so the caller can decide whether to `apply_update` (llm.c's outlier skipping).
    pub fn grad_norm(&mut self, lr: f32, adam: AdamConsts, t: usize) -> Result<f32> {
        self.queue_grad_norm(lr, adam, t)?;
        self.read_grad_norm()
    }

    /// The second half of `update`, after `grad_norm`: AdamW with the clip scale it left.
    pub fn apply_update(&mut self) -> Result<()> {
        match self.host_opt {
            Some(_) => {
                let h = self.read_scalars()?;
                self.host_update(&h)
            }
            None => self.run_phase(Phase::Update),
        }
    }

    /// Writes the optimiser scalars, then queues the gradient reduction (with several devices)
    /// and the `GradNorm` phase.
    fn queue_grad_norm(&mut self, lr: f32, adam: AdamConsts, t: usize) -> Result<()> {
        self.check_optimiser()?;
        self.write_optim_scalars(lr, adam, t);
        self.upload_scalars()?;
        self.run_phase(Phase::ReduceGrads)?;
        self.run_phase(Phase::GradNorm)
    }

    /// AdamW's scalars for 1-based step `t` into the host copy (uploaded by the caller).
    fn write_optim_scalars(&mut self, lr: f32, adam: AdamConsts, t: usize) {
        let h = &mut self.scalars;
        h[Scalars::LR] = lr;
        h[Scalars::BETA1] = adam.beta1;
        h[Scalars::BETA2] = adam.beta2;
        h[Scalars::EPS] = adam.eps;
        h[Scalars::BC1] = (1.0 - (adam.beta1 as f64).powi(t as i32)) as f32;
        h[Scalars::BC2] = (1.0 - (adam.beta2 as f64).powi(t as i32)) as f32;
        h[Scalars::GRAD_SCALE] = 1.0;
    }

    /// The gradient norm `GradNorm` left in the scalars (waits for the device).
    fn read_grad_norm(&mut self) -> Result<f32> {
        Ok(self.read_scalars()?[Scalars::GRAD_NORM])
    }

    /// The device scalars (waits for the device); notes whether `GradNorm` found an overflow.
    fn read_scalars(&mut self) -> Result<Vec<f32>> {
        let h = self.backend.download_f32(self.graph.io.scalars)?;
        self.found_inf = h[Scalars::FOUND_INF] != 0.0;
        Ok(h)
    }

    /// Forward only; returns the loss at every position (B·T, row-major).
    pub fn eval_losses(&mut self, x: &[i32], y: &[i32]) -> Result<Vec<f32>> {
        self.upload_batch(x, y)?;
        self.run_phase(Phase::Eval)?;
        self.backend.download_f32(self.graph.io.losses)
    }

    /// Forward only; returns the mean loss over the batch (the logits stay in `io.logits`).
    pub fn eval(&mut self, x: &[i32], y: &[i32]) -> Result<f32> {
        self.upload_batch(x, y)?;
        self.run_phase(Phase::Eval)?;
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
    Error::Internal(format!("{what} requested from an inference-only graph"))
}
