//! The collectives a data-parallel rank needs, over whichever engine joins the ranks:
//! - `Solo`: a world of one (every collective is the identity; no MPI is loaded);
//! - `MpiComm`: processes joined by the site's MPI, loaded at run time (`mpi.rs`), on host buffers;
//! - `ThreadComm`: ranks that are threads of one process (several wgpu adapters, or cpu and GPU
//!   together), summed through host memory — the only engine there is between wgpu devices.
//!
//! Every sum is deterministic and identical on every rank (MPI's reductions are; the in-process
//! sum adds rank 0, 1, … in order), so ranks that apply the same update to the same summed
//! gradients keep bit-identical parameters.
//!
//! No collective waits forever: each is bounded by the communicator's timeout. When it passes
//! (a peer died or hangs), `MpiComm` prints one line and calls `MPI_Abort`, which ends every
//! rank; `ThreadComm` returns an error naming the ranks that did not arrive. A rank that fails
//! on its own calls `fail`, so its peers stop at their next collective instead of waiting.

use super::mpi::Mpi;
use crate::error::{Error, Result};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, RwLock};
use std::time::{Duration, Instant};

/// The engine between ranks.
pub trait Comm: Send + Sync {
    fn rank(&self) -> usize;
    fn size(&self) -> usize;
    /// How the ranks are joined, for the training header: "MPI: /usr/lib/.../libmpi.so.40 (...)".
    fn describe(&self) -> String;
    /// Element-wise sum over ranks, in place.
    fn allreduce_sum_f32(&self, buf: &mut [f32]) -> Result<()>;
    fn allreduce_sum_f64(&self, buf: &mut [f64]) -> Result<()>;
    /// ZeRO-1's gradient reduction: `buf` is `size` equal chunks; returns chunk `rank` summed
    /// over ranks.
    fn reduce_scatter_sum_f32(&self, buf: &[f32]) -> Result<Vec<f32>>;
    /// Every rank's `mine` (equal lengths), concatenated in rank order.
    fn allgather_f32(&self, mine: &[f32]) -> Result<Vec<f32>> {
        let all = self.allgather(bytemuck::cast_slice(mine))?;
        Ok(all.chunks_exact(4).map(|c| f32::from_le_bytes(c.try_into().unwrap())).collect())
    }
    /// Every rank's `mine` (equal lengths), concatenated in rank order.
    fn allgather(&self, mine: &[u8]) -> Result<Vec<u8>>;
    /// `buf` on every rank becomes `root`'s.
    fn bcast(&self, buf: &mut [u8], root: usize) -> Result<()>;
    fn barrier(&self) -> Result<()>;
    /// Run `f`, a collective of another engine (NCCL), under this communicator's timeout where it
    /// has a watchdog (MPI: past `--dist-timeout` the job is aborted, which also ends a rank stuck
    /// in NCCL); elsewhere just run it.
    fn watched(&self, _what: &'static str, f: &mut dyn FnMut() -> Result<()>) -> Result<()> {
        f()
    }
    /// The NCCL communicator that joins the ranks, where NCCL is the engine itself (CUDA ranks
    /// without MPI, `NcclWorld`): the gradient sum uses it instead of making a second one.
    fn nccl(&self) -> Option<&Arc<Mutex<super::nccl::NcclComm>>> {
        None
    }
    /// This rank has failed with `why`: make the other ranks stop instead of waiting for it.
    /// For MPI this ends the job (`MPI_Abort`) and does not return.
    fn fail(&self, why: &str);
}

/// f32 values broadcast from `root` (parameters of a rank 0 that the others copy).
pub fn bcast_f32(comm: &dyn Comm, buf: &mut [f32], root: usize) -> Result<()> {
    comm.bcast(bytemuck::cast_slice_mut(buf), root)
}

/// Whether any rank says `yes` (a stop request seen by one rank stops them all at the same step).
pub fn any(comm: &dyn Comm, yes: bool) -> Result<bool> {
    if comm.size() == 1 {
        return Ok(yes);
    }
    let mut v = [yes as u8 as f64];
    comm.allreduce_sum_f64(&mut v)?;
    Ok(v[0] > 0.0)
}

/// Every rank's f64 (rank order).
pub fn gather_f64(comm: &dyn Comm, x: f64) -> Result<Vec<f64>> {
    let all = comm.allgather(&x.to_le_bytes())?;
    Ok(all.chunks_exact(8).map(|c| f64::from_le_bytes(c.try_into().unwrap())).collect())
}

/// Every rank's u64 (rank order).
pub fn gather_u64(comm: &dyn Comm, x: u64) -> Result<Vec<u64>> {
    let all = comm.allgather(&x.to_le_bytes())?;
    Ok(all.chunks_exact(8).map(|c| u64::from_le_bytes(c.try_into().unwrap())).collect())
}

/// A world of one process.
pub struct Solo;

impl Comm for Solo {
    fn rank(&self) -> usize {
        0
    }
    fn size(&self) -> usize {
        1
    }
    fn describe(&self) -> String {
        "none (one rank)".into()
    }
    fn allreduce_sum_f32(&self, _: &mut [f32]) -> Result<()> {
        Ok(())
    }
    fn allreduce_sum_f64(&self, _: &mut [f64]) -> Result<()> {
        Ok(())
    }
    fn reduce_scatter_sum_f32(&self, buf: &[f32]) -> Result<Vec<f32>> {
        Ok(buf.to_vec())
    }
    fn allgather(&self, mine: &[u8]) -> Result<Vec<u8>> {
        Ok(mine.to_vec())
    }
    fn bcast(&self, _: &mut [u8], _: usize) -> Result<()> {
        Ok(())
    }
    fn barrier(&self) -> Result<()> {
        Ok(())
    }
    fn fail(&self, _: &str) {}
}

/// A thread that ends a rank stuck in a collective: past `timeout` it prints one line naming
/// the collective and the rank, then runs `on_timeout` (MPI_Abort; for NCCL alone, the process
/// exits). Joined on drop.
pub struct Watchdog {
    /// what the collective in progress is ("" when none) and since when (ms since `epoch`)
    busy: Arc<(Mutex<&'static str>, AtomicU64)>,
    epoch: Instant,
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Watchdog {
    /// `ending` finishes the line ("aborting the job").
    pub fn new(rank: usize, size: usize, timeout: Duration, ending: &'static str, on_timeout: Box<dyn Fn() + Send>) -> Watchdog {
        let busy: Arc<(Mutex<&'static str>, AtomicU64)> = Arc::new((Mutex::new(""), AtomicU64::new(0)));
        let epoch = Instant::now();
        let stop = Arc::new(AtomicBool::new(false));
        let (b, s) = (busy.clone(), stop.clone());
        let thread = std::thread::Builder::new()
            .name("wgpt-dist-watchdog".into())
            .spawn(move || {
                while !s.load(Ordering::Relaxed) {
                    std::thread::sleep(Duration::from_millis(200));
                    let what = *b.0.lock().unwrap_or_else(|e| e.into_inner());
                    if what.is_empty() {
                        continue;
                    }
                    let since = Duration::from_millis(b.1.load(Ordering::Relaxed));
                    let waited = epoch.elapsed().saturating_sub(since);
                    if waited > timeout {
                        eprintln!(
                            "wgpt: error: rank {rank} of {size}: {what} has waited {:.0} s for the other ranks (--dist-timeout {}): a peer died or hangs; {ending}",
                            waited.as_secs_f64(),
                            timeout.as_secs()
                        );
                        on_timeout();
                        return;
                    }
                }
            })
            .expect("spawning the watchdog thread");
        Watchdog { busy, epoch, stop, thread: Some(thread) }
    }

    /// Run `f`, a collective called `what`, under the watchdog.
    pub fn guard<T>(&self, what: &'static str, f: impl FnOnce() -> T) -> T {
        self.busy.1.store(self.epoch.elapsed().as_millis() as u64, Ordering::Relaxed);
        *self.busy.0.lock().unwrap_or_else(|e| e.into_inner()) = what;
        let r = f();
        *self.busy.0.lock().unwrap_or_else(|e| e.into_inner()) = "";
        r
    }
}

impl Drop for Watchdog {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(w) = self.thread.take() {
            let _ = w.join();
        }
    }
}

/// MPI between processes, with a watchdog: a collective that has not returned after `timeout`
/// ends the job with `MPI_Abort` and a line naming the collective and this rank.
pub struct MpiComm {
    /// first, so it is joined (and lets go of its `mpi`) before `mpi` drops: MPI_Finalize runs
    dog: Watchdog,
    mpi: Arc<Mpi>,
}

impl MpiComm {
    pub fn new(mpi: Mpi, timeout: Duration) -> MpiComm {
        let mpi = Arc::new(mpi);
        let m = mpi.clone();
        let dog = Watchdog::new(mpi.rank(), mpi.size(), timeout, "aborting the job", Box::new(move || m.abort(1)));
        MpiComm { dog, mpi }
    }

    fn guard<T>(&self, what: &'static str, f: impl FnOnce(&Mpi) -> Result<T>) -> Result<T> {
        self.dog.guard(what, || f(&self.mpi))
    }
}

impl Comm for MpiComm {
    fn rank(&self) -> usize {
        self.mpi.rank()
    }
    fn size(&self) -> usize {
        self.mpi.size()
    }
    fn describe(&self) -> String {
        format!("MPI: {}", self.mpi.describe())
    }
    fn allreduce_sum_f32(&self, buf: &mut [f32]) -> Result<()> {
        self.guard("MPI_Allreduce", |m| m.allreduce_sum_f32(buf))
    }
    fn allreduce_sum_f64(&self, buf: &mut [f64]) -> Result<()> {
        self.guard("MPI_Allreduce", |m| m.allreduce_sum_f64(buf))
    }
    fn reduce_scatter_sum_f32(&self, buf: &[f32]) -> Result<Vec<f32>> {
        self.guard("MPI_Reduce_scatter_block", |m| m.reduce_scatter_sum_f32(buf))
    }
    fn allgather_f32(&self, mine: &[f32]) -> Result<Vec<f32>> {
        self.guard("MPI_Allgather", |m| m.allgather_f32(mine))
    }
    fn allgather(&self, mine: &[u8]) -> Result<Vec<u8>> {
        self.guard("MPI_Allgather", |m| m.allgather(mine))
    }
    fn bcast(&self, buf: &mut [u8], root: usize) -> Result<()> {
        self.guard("MPI_Bcast", |m| m.bcast(buf, root))
    }
    fn barrier(&self) -> Result<()> {
        self.guard("MPI_Barrier", |m| m.barrier())
    }
    fn watched(&self, what: &'static str, f: &mut dyn FnMut() -> Result<()>) -> Result<()> {
        self.guard(what, |_| f())
    }
    fn fail(&self, why: &str) {
        eprintln!("wgpt: error: rank {} of {}: {why}; aborting the job", self.rank(), self.size());
        self.mpi.abort(1);
    }
}

/// What the threads of one in-process group share.
struct Shared {
    size: usize,
    timeout: Duration,
    /// (ranks arrived at the current barrier, generation)
    gate: Mutex<(usize, u64)>,
    cv: Condvar,
    /// a rank that failed (and why): every wait returns an error from then on
    failed: Mutex<Option<String>>,
    /// each rank's contribution, then (after a barrier) each rank's share of the result
    slots: Vec<RwLock<Vec<u8>>>,
    parts: Vec<RwLock<Vec<f32>>>,
    parts64: Vec<RwLock<Vec<f64>>>,
}

/// One rank of an in-process group (see `ThreadComm::group`).
pub struct ThreadComm {
    rank: usize,
    shared: Arc<Shared>,
}

impl ThreadComm {
    /// `size` communicators, one per thread, rank order.
    pub fn group(size: usize, timeout: Duration) -> Vec<ThreadComm> {
        let shared = Arc::new(Shared {
            size,
            timeout,
            gate: Mutex::new((0, 0)),
            cv: Condvar::new(),
            failed: Mutex::new(None),
            slots: (0..size).map(|_| RwLock::new(Vec::new())).collect(),
            parts: (0..size).map(|_| RwLock::new(Vec::new())).collect(),
            parts64: (0..size).map(|_| RwLock::new(Vec::new())).collect(),
        });
        (0..size).map(|rank| ThreadComm { rank, shared: shared.clone() }).collect()
    }

    fn failed(&self) -> Option<String> {
        self.shared.failed.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Wait until every rank has arrived (or one failed, or the timeout passed).
    fn wait(&self, what: &str) -> Result<()> {
        let s = &*self.shared;
        let mut g = s.gate.lock().unwrap_or_else(|e| e.into_inner());
        let gen = g.1;
        g.0 += 1;
        if g.0 == s.size {
            g.0 = 0;
            g.1 += 1;
            s.cv.notify_all();
            return Ok(());
        }
        let deadline = Instant::now() + s.timeout;
        loop {
            if let Some(why) = self.failed() {
                return Err(Error::Dist(format!("rank {}: {what}: stopped because {why}", self.rank)));
            }
            let now = Instant::now();
            if now >= deadline {
                let arrived = g.0;
                drop(g);
                let why = format!("rank {} waited {} s in {what}; {} of {} ranks arrived", self.rank, s.timeout.as_secs(), arrived, s.size);
                self.fail(&why);
                return Err(Error::Dist(why));
            }
            let (ng, _) = s.cv.wait_timeout(g, (deadline - now).min(Duration::from_millis(200))).unwrap_or_else(|e| e.into_inner());
            g = ng;
            if g.1 != gen {
                return Ok(());
            }
        }
    }

    /// Deposit `buf`, wait for every rank's, and sum this rank's chunk over ranks in rank order
    /// into `parts[rank]`. The slots and parts keep their memory from call to call (no fresh
    /// allocation, so no page faults, once the first step has sized them).
    fn sum_own_chunk(&self, buf: &[f32]) -> Result<()> {
        let s = &*self.shared;
        deposit(&s.slots[self.rank], bytemuck::cast_slice(buf));
        self.wait("all-reduce (deposit)")?;
        let r = self.chunk(buf.len(), self.rank);
        let mut part = lock_w(&s.parts[self.rank]);
        part.clear();
        part.extend_from_slice(bytemuck::cast_slice(&lock_r(&s.slots[0])[r.start * 4..r.end * 4]));
        for slot in &s.slots[1..] {
            let g = lock_r(slot);
            let src: &[f32] = bytemuck::cast_slice(&g[r.start * 4..r.end * 4]);
            for (a, b) in part.iter_mut().zip(src) {
                *a += *b;
            }
        }
        Ok(())
    }

    /// Rank r's chunk of n elements split in `size` contiguous pieces.
    fn chunk(&self, n: usize, r: usize) -> std::ops::Range<usize> {
        let per = n.div_ceil(self.shared.size);
        (r * per).min(n)..((r + 1) * per).min(n)
    }
}

/// `bytes` into a slot, reusing its memory.
fn deposit(slot: &RwLock<Vec<u8>>, bytes: &[u8]) {
    let mut g = lock_w(slot);
    g.clear();
    g.extend_from_slice(bytes);
}

fn lock_w<T>(l: &RwLock<T>) -> std::sync::RwLockWriteGuard<'_, T> {
    l.write().unwrap_or_else(|e| e.into_inner())
}
fn lock_r<T>(l: &RwLock<T>) -> std::sync::RwLockReadGuard<'_, T> {
    l.read().unwrap_or_else(|e| e.into_inner())
}

impl Comm for ThreadComm {
    fn rank(&self) -> usize {
        self.rank
    }
    fn size(&self) -> usize {
        self.shared.size
    }
    fn describe(&self) -> String {
        "in-process host staging (gradients downloaded, summed on the host in rank order, uploaded)".into()
    }

    /// Each rank deposits its buffer; each then sums its own 1/size of the elements over every
    /// rank in rank order (the ranks' threads share the work); each copies every sum back.
    fn allreduce_sum_f32(&self, buf: &mut [f32]) -> Result<()> {
        let s = &*self.shared;
        self.sum_own_chunk(buf)?;
        self.wait("all-reduce (sum)")?;
        for q in 0..s.size {
            let r = self.chunk(buf.len(), q);
            buf[r].copy_from_slice(&lock_r(&s.parts[q]));
        }
        self.wait("all-reduce (copy)")
    }

    fn reduce_scatter_sum_f32(&self, buf: &[f32]) -> Result<Vec<f32>> {
        self.sum_own_chunk(buf)?;
        // the others may still be reading this rank's slot
        self.wait("reduce-scatter (sum)")?;
        Ok(lock_r(&self.shared.parts[self.rank]).clone())
    }

    fn allreduce_sum_f64(&self, buf: &mut [f64]) -> Result<()> {
        let s = &*self.shared;
        deposit(&s.slots[self.rank], bytemuck::cast_slice(buf));
        self.wait("all-reduce (deposit)")?;
        if self.rank == 0 {
            let mut sum = vec![0f64; buf.len()];
            for slot in &s.slots {
                let g = lock_r(slot);
                let src: &[f64] = bytemuck::cast_slice(&g);
                for (a, b) in sum.iter_mut().zip(src) {
                    *a += *b;
                }
            }
            *lock_w(&s.parts64[0]) = sum;
        }
        self.wait("all-reduce (sum)")?;
        buf.copy_from_slice(&lock_r(&s.parts64[0]));
        self.wait("all-reduce (copy)")
    }

    fn allgather(&self, mine: &[u8]) -> Result<Vec<u8>> {
        let s = &*self.shared;
        deposit(&s.slots[self.rank], mine);
        self.wait("all-gather")?;
        let mut out = Vec::with_capacity(mine.len() * s.size);
        for slot in &s.slots {
            out.extend_from_slice(&lock_r(slot));
        }
        self.wait("all-gather (copy)")?;
        Ok(out)
    }

    fn bcast(&self, buf: &mut [u8], root: usize) -> Result<()> {
        let s = &*self.shared;
        if self.rank == root {
            deposit(&s.slots[root], buf);
        }
        self.wait("broadcast")?;
        if self.rank != root {
            buf.copy_from_slice(&lock_r(&s.slots[root]));
        }
        self.wait("broadcast (copy)")
    }

    fn barrier(&self) -> Result<()> {
        self.wait("barrier")
    }

    fn fail(&self, why: &str) {
        let mut f = self.shared.failed.lock().unwrap_or_else(|e| e.into_inner());
        if f.is_none() {
            *f = Some(format!("rank {} failed: {why}", self.rank));
        }
        drop(f);
        self.shared.cv.notify_all();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run_group<T: Send>(n: usize, f: impl Fn(&ThreadComm) -> T + Sync) -> Vec<T> {
        let comms = ThreadComm::group(n, Duration::from_secs(20));
        std::thread::scope(|s| {
            let hs: Vec<_> = comms.iter().map(|c| s.spawn(|| f(c))).collect();
            hs.into_iter().map(|h| h.join().unwrap()).collect()
        })
    }

    /// 0 + 1 + … + (n−1)
    fn nn_sum(n: usize) -> f32 {
        (n * (n - 1) / 2) as f32
    }

    #[test]
    fn thread_collectives_match_closed_forms() {
        for n in [1usize, 2, 3] {
            let out = run_group(n, |c| {
                let r = c.rank() as f32;
                // 1001 elements: chunks of unequal length
                let mut v: Vec<f32> = (0..1001).map(|i| r + 1.0 + i as f32 * 0.5).collect();
                c.allreduce_sum_f32(&mut v).unwrap();
                let mut d = [c.rank() as f64 * 2.0, 1.0];
                c.allreduce_sum_f64(&mut d).unwrap();
                let g = c.allgather(&[c.rank() as u8, 7]).unwrap();
                let mut b = if c.rank() == n - 1 { vec![9u8, 8, 7] } else { vec![0u8; 3] };
                c.bcast(&mut b, n - 1).unwrap();
                c.barrier().unwrap();
                // reduce-scatter of n chunks of 5: chunk q summed is Σ_r (r + q)
                let rs: Vec<f32> = (0..n * 5).map(|i| r + (i / 5) as f32).collect();
                let mine = c.reduce_scatter_sum_f32(&rs).unwrap();
                let q = c.rank() as f32;
                assert_eq!(mine, vec![nn_sum(n) + n as f32 * q; 5]);
                assert_eq!(c.allgather_f32(&[q, -q]).unwrap(), (0..n).flat_map(|r| [r as f32, -(r as f32)]).collect::<Vec<_>>());
                (v, d, g, b)
            });
            let nn = n as f32;
            for (v, d, g, b) in out {
                for (i, x) in v.iter().enumerate() {
                    // Σ_r (r + 1 + i/2) = n(n+1)/2 + n·i/2
                    assert_eq!(*x, nn * (nn + 1.0) / 2.0 + nn * i as f32 * 0.5, "n={n} i={i}");
                }
                assert_eq!(d, [(n * (n - 1)) as f64, n as f64]);
                assert_eq!(g, (0..n).flat_map(|r| [r as u8, 7]).collect::<Vec<_>>());
                assert_eq!(b, vec![9, 8, 7]);
            }
        }
    }

    #[test]
    fn a_failed_rank_stops_its_peers_and_a_missing_one_times_out() {
        let out = run_group(3, |c| {
            if c.rank() == 2 {
                c.fail("a test error");
                return Ok(());
            }
            c.barrier()
        });
        for r in &out[..2] {
            let e = r.as_ref().unwrap_err().to_string();
            assert!(e.contains("rank 2 failed: a test error"), "{e}");
        }
        // a rank that never arrives: the others return within the timeout, naming the count
        let comms = ThreadComm::group(2, Duration::from_millis(300));
        let t0 = Instant::now();
        let e = comms[0].barrier().unwrap_err().to_string();
        assert!(t0.elapsed() < Duration::from_secs(5));
        assert!(e.contains("1 of 2 ranks arrived"), "{e}");
    }
}
