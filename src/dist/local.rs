//! In-process data parallelism: several backends in one process (several wgpu adapters, or the
//! cpu and a GPU together), one `Session` per rank, one optimiser step at a time.
//!
//! The one gradient rule (the same one every data-parallel trainer follows): every rank seeds its
//! loss gradient with 1/N_global, N_global the tokens of the whole optimiser step (every rank,
//! every micro-step), and the gradients are *summed* across ranks, never averaged. That is exact
//! when ranks have different micro-batch sizes (each rank's graph is built with its own B).
//!
//! The reduction goes through the host: every rank's gradients are downloaded, summed in rank
//! order in f32 (deterministic), and the sum is uploaded to every rank. The update then runs on
//! identical gradients on every rank. Ranks of one kind of backend update bit-identically; ranks
//! of different kinds (cpu and wgpu) may round AdamW differently in the last bit, so by default
//! such a group broadcasts rank 0's parameters after the update (`SyncPolicy::BroadcastRank0`).

use crate::error::{Error, Result};
use crate::train::session::{AdamConsts, Session};

/// How ranks keep identical parameters after the update.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SyncPolicy {
    /// Every rank runs AdamW on the identical summed gradients; nothing more is sent. Exact when
    /// every rank is the same kind of backend.
    SameUpdate,
    /// Every rank runs AdamW, then rank 0's parameters are uploaded to every other rank (one more
    /// parameter-sized transfer per rank). For ranks on different kinds of backend. The other
    /// ranks' AdamW moments may differ from rank 0's in the last bit; checkpoints take rank 0's.
    BroadcastRank0,
}

/// One micro-batch of a rank: inputs and targets, B·T tokens each (B the rank's own).
pub type Batch = (Vec<i32>, Vec<i32>);

/// What one optimiser step of the group reports.
#[derive(Clone, Debug, PartialEq)]
pub struct StepReport {
    /// global token mean of the loss: Σ_r (rank r's summed per-position losses) / N_global
    pub loss: f32,
    /// gradient norm of the summed gradients (rank 0's, before clipping)
    pub grad_norm: f32,
    /// N_global, the tokens of this step across every rank and micro-step
    pub tokens: usize,
}

pub struct LocalGroup {
    /// one session per rank, rank order
    pub ranks: Vec<Session>,
    pub sync: SyncPolicy,
}

/// Run `f` on every rank at once, each on its own thread (`Backend: Send`); one rank runs inline.
/// Results in rank order; the first error by rank order is returned.
fn each<T: Send>(ranks: &mut [Session], f: impl Fn(usize, &mut Session) -> Result<T> + std::marker::Sync) -> Result<Vec<T>> {
    if ranks.len() == 1 {
        return Ok(vec![f(0, &mut ranks[0])?]);
    }
    let f = &f;
    let results: Vec<Result<T>> = std::thread::scope(|s| {
        let handles: Vec<_> = ranks.iter_mut().enumerate().map(|(r, sess)| s.spawn(move || f(r, sess))).collect();
        handles
            .into_iter()
            .enumerate()
            .map(|(r, h)| h.join().unwrap_or_else(|_| Err(Error::Internal(format!("rank {r}: its thread panicked")))))
            .collect()
    });
    results.into_iter().collect()
}

/// 64-bit FNV-1a over the f32 bits: equal for bit-identical parameters.
pub fn checksum(flat: &[f32]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for x in flat {
        for b in x.to_bits().to_le_bytes() {
            h ^= b as u64;
            h = h.wrapping_mul(0x0000_0100_0000_01b3);
        }
    }
    h
}

impl LocalGroup {
    /// A group of the given sessions (rank order), every one a training graph of the same model
    /// and sequence length (micro-batch sizes may differ). The sync policy is `SameUpdate` when
    /// every backend is the same kind (`Backend::kind`), else
    /// `BroadcastRank0`.
    pub fn new(ranks: Vec<Session>) -> Result<LocalGroup> {
        let Some(first) = ranks.first() else { return Err(Error::Internal("a local group needs at least one rank".into())) };
        let (total, t) = (first.layout.total, first.graph.t);
        for (r, s) in ranks.iter().enumerate() {
            if s.graph.io.grads.is_none() {
                return Err(Error::Internal(format!("rank {r}: a local group needs training graphs")));
            }
            if s.layout.total != total || s.graph.t != t {
                return Err(Error::Internal(format!(
                    "rank {r}: {} parameters, T = {}; rank 0 has {total}, T = {t}",
                    s.layout.total, s.graph.t
                )));
            }
        }
        let k0 = first.backend.kind();
        let same = ranks.iter().all(|s| s.backend.kind() == k0);
        Ok(LocalGroup { ranks, sync: if same { SyncPolicy::SameUpdate } else { SyncPolicy::BroadcastRank0 } })
    }

    pub fn with_sync(mut self, sync: SyncPolicy) -> LocalGroup {
        self.sync = sync;
        self
    }

    pub fn size(&self) -> usize {
        self.ranks.len()
    }

    /// Upload the same parameters to every rank (the start of a run).
    pub fn upload_params(&mut self, flat: &[f32]) -> Result<()> {
        each(&mut self.ranks, |_, s| s.upload_params(flat)).map(|_| ())
    }

    /// Upload the same AdamW state to every rank (a resumed run).
    pub fn upload_opt_state(&mut self, m: &[f32], v: &[f32]) -> Result<()> {
        each(&mut self.ranks, |_, s| s.upload_opt_state(m, v)).map(|_| ())
    }

    /// One optimiser step: `batches[r]` are rank r's micro-batches (at least one per rank; ranks
    /// may run different numbers). Zero the gradients, run every rank's micro-steps on its own
    /// thread with the loss seed 1/N_global, sum the gradients across ranks, and update every
    /// rank with learning rate `lr` at 1-based step `t`.
    pub fn step(&mut self, batches: &[Vec<Batch>], lr: f32, adam: AdamConsts, t: usize) -> Result<StepReport> {
        let n = self.ranks.len();
        if batches.len() != n {
            return Err(Error::Internal(format!("{} ranks but batches for {}", n, batches.len())));
        }
        if let Some(r) = batches.iter().position(|b| b.is_empty()) {
            return Err(Error::Internal(format!("rank {r} has no micro-batch for this step")));
        }
        let tokens: usize = self.ranks.iter().zip(batches).map(|(s, b)| s.graph.b * s.graph.t * b.len()).sum();
        let seed = 1.0 / tokens as f32;

        // every rank's micro-steps; each returns its summed per-position losses (f64)
        let sums = each(&mut self.ranks, |r, s| {
            s.set_loss_seed(seed)?;
            s.zero_grad()?;
            for (x, y) in &batches[r] {
                s.train_micro_async(x, y)?;
            }
            let losses = s.backend.download_f32(s.graph.io.losses)?;
            Ok(losses.iter().map(|&l| l as f64).sum::<f64>())
        })?;
        let loss = if n == 1 {
            // exactly what a plain Session reports
            self.ranks[0].step_loss()?
        } else {
            (sums.iter().sum::<f64>() / tokens as f64) as f32
        };

        // the reduction: download, sum in rank order (f32), upload the sum to every rank
        if n > 1 {
            let grads = each(&mut self.ranks, |_, s| s.download_grads())?;
            let mut sum = grads[0].clone();
            for g in &grads[1..] {
                for (a, b) in sum.iter_mut().zip(g) {
                    *a += *b;
                }
            }
            drop(grads);
            each(&mut self.ranks, |_, s| s.upload_grads(&sum))?;
        }

        let norms = each(&mut self.ranks, |_, s| s.update(lr, adam, t))?;
        if n > 1 && self.sync == SyncPolicy::BroadcastRank0 {
            let p = self.ranks[0].download_params()?;
            each(&mut self.ranks[1..], |_, s| s.upload_params(&p))?;
        }
        Ok(StepReport { loss, grad_norm: norms[0], tokens })
    }

    /// Every rank's parameters (rank order), downloaded.
    pub fn params(&mut self) -> Result<Vec<Vec<f32>>> {
        each(&mut self.ranks, |_, s| s.download_params())
    }

    /// A 64-bit hash (FNV-1a) of every rank's parameter bits, rank order.
    pub fn params_checksum(&mut self) -> Result<Vec<u64>> {
        each(&mut self.ranks, |_, s| Ok(checksum(&s.download_params()?)))
    }

    /// Ok when every rank holds bit-identical parameters; else one line naming the first rank
    /// that differs from rank 0.
    pub fn check_in_sync(&mut self) -> Result<()> {
        let sums = self.params_checksum()?;
        match sums.iter().position(|&c| c != sums[0]) {
            None => Ok(()),
            Some(r) => Err(Error::Internal(format!(
                "data-parallel ranks out of sync: rank {r} ({}) parameters checksum {:016x}, rank 0 ({}) {:016x}",
                self.ranks[r].backend.name(),
                sums[r],
                self.ranks[0].backend.name(),
                sums[0]
            ))),
        }
    }
}
