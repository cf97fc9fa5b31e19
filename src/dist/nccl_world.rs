//! A world of CUDA ranks joined by NCCL alone, with no MPI (torchrun, `srun` without an MPI,
//! `WGPT_RANK`...): rank 0's NCCL unique id reaches the others through `rendezvous` (`fs:DIR` or
//! `tcp`), and from then on every collective runs on NCCL, the training loop's small ones
//! (losses, flags, checksums) included, through a device staging buffer, as llm.c does when it
//! has no MPI. The gradient sum uses the same communicator (`Comm::nccl`).
//!
//! Nothing waits forever: each collective polls its stream and NCCL's asynchronous error, and
//! past `--dist-timeout` aborts the communicator and returns an error; a call that blocks inside
//! NCCL itself (connecting to a dead peer) is caught by the watchdog, which ends the process.

use super::comm::{Comm, Watchdog};
use super::nccl::{Nccl, NcclComm, NcclOp, NcclType, UNIQUE_ID_BYTES};
use super::rendezvous::{self, DistInit};
use crate::backend::cuda::probe::driver_error;
use crate::error::{Error, Result};
use cudarc::driver::{result as drv, sys as drv_sys, CudaContext, CudaStream};
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Device memory for one collective's input and output.
struct Staging {
    ptr: u64,
    bytes: usize,
}

/// One rank of a world joined by NCCL alone.
pub struct NcclWorld {
    /// first: joined before the rest is freed
    dog: Watchdog,
    comm: Arc<Mutex<NcclComm>>,
    ctx: Arc<CudaContext>,
    stream: Arc<CudaStream>,
    staging: Mutex<Staging>,
    rank: usize,
    size: usize,
    timeout: Duration,
    how: String,
}

fn cuda(what: &str, e: drv::DriverError) -> Error {
    Error::Dist(format!("{what}: {}", driver_error(e)))
}

const ALIGN: usize = 256;

impl NcclWorld {
    /// Join rank `rank` of `size` on CUDA device `device` through `init` (`fs:DIR` or `tcp`).
    pub fn join(env: &HashMap<String, String>, rank: usize, size: usize, device: usize, init: &DistInit, timeout: Duration) -> Result<NcclWorld> {
        crate::backend::cuda::open_device(device)?;
        let lib =
            Arc::new(Nccl::load(env).map_err(|e| Error::flag("--dist-init", format!("{init}: CUDA ranks without MPI are joined by NCCL, and {e}")))?);
        let ctx = CudaContext::new(device).map_err(|e| cuda(&format!("CUDA device {device}"), e))?;
        // raw device pointers only: cudarc's per-buffer events are not needed
        unsafe { ctx.disable_event_tracking() };
        let stream = ctx.new_stream().map_err(|e| cuda("creating a CUDA stream for NCCL", e))?;
        let id = if rank == 0 { Some(lib.unique_id()?) } else { None };
        let blob = rendezvous::share(init, env, rank, size, id.as_ref().map(|i| &i[..]), timeout)?;
        let id: [u8; UNIQUE_ID_BYTES] = blob.try_into().map_err(|b: Vec<u8>| {
            Error::Dist(format!("--dist-init {init}: rank 0 sent {} bytes, not an NCCL unique id ({UNIQUE_ID_BYTES})", b.len()))
        })?;
        // ncclCommInitRank returns once every rank has joined: on its own thread, given the timeout
        let (tx, rx) = std::sync::mpsc::channel();
        let (l, c) = (lib.clone(), ctx.clone());
        std::thread::spawn(move || {
            let r = c.bind_to_thread().map_err(|e| cuda("binding the CUDA context", e)).and_then(|()| l.init_rank(size, &id, rank));
            let _ = tx.send(r);
        });
        let comm = match rx.recv_timeout(timeout) {
            Ok(r) => r?,
            Err(_) => {
                return Err(Error::Dist(format!(
                    "rank {rank} of {size}: ncclCommInitRank did not return within {} s (--dist-timeout): not every rank joined",
                    timeout.as_secs()
                )))
            }
        };
        if rank == 0 {
            // every rank has read rank 0's id (they have all joined): the file goes, so that no
            // later run reads it (after a failure it stays; a later rank 0 replaces it, and
            // files older than 5 minutes are ignored)
            rendezvous::finish_fs(init, env);
        }
        let how = format!("NCCL {} ({}) alone, joined through --dist-init {init}", lib.version(), lib.path());
        let dog = Watchdog::new(rank, size, timeout, "ending this rank", Box::new(|| std::process::exit(1)));
        Ok(NcclWorld {
            dog,
            comm: Arc::new(Mutex::new(comm)),
            ctx,
            stream,
            staging: Mutex::new(Staging { ptr: 0, bytes: 0 }),
            rank,
            size,
            timeout,
            how,
        })
    }

    /// Copy `input` to the device, run `op(comm, send, recv, stream)`, wait for it (bounded),
    /// and return `out_bytes` from `recv`.
    fn run(&self, what: &'static str, input: &[u8], out_bytes: usize, op: impl FnOnce(&NcclComm, u64, u64, usize) -> Result<()>) -> Result<Vec<u8>> {
        self.dog.guard(what, || {
            let mut comm = self.comm.lock().unwrap_or_else(|e| e.into_inner());
            let mut st = self.staging.lock().unwrap_or_else(|e| e.into_inner());
            self.ctx.bind_to_thread().map_err(|e| cuda("binding the CUDA context", e))?;
            let send_bytes = input.len().div_ceil(ALIGN).max(1) * ALIGN;
            let need = send_bytes + out_bytes.div_ceil(ALIGN).max(1) * ALIGN;
            if st.bytes < need {
                if st.ptr != 0 {
                    unsafe { drv::free_sync(st.ptr) }.map_err(|e| cuda("freeing NCCL's staging buffer", e))?;
                    *st = Staging { ptr: 0, bytes: 0 };
                }
                let ptr = unsafe { drv::malloc_sync(need) }.map_err(|e| cuda("allocating NCCL's staging buffer", e))?;
                *st = Staging { ptr, bytes: need };
            }
            let (send, recv) = (st.ptr, st.ptr + send_bytes as u64);
            if !input.is_empty() {
                unsafe { drv::memcpy_htod_sync(send, input) }.map_err(|e| cuda("copying to NCCL's staging buffer", e))?;
            }
            let stream = self.stream.cu_stream() as usize;
            op(&comm, send, recv, stream)?;
            self.wait(&mut comm, what, stream)?;
            let mut out = vec![0u8; out_bytes];
            if out_bytes > 0 {
                unsafe { drv::memcpy_dtoh_sync(&mut out[..], recv) }.map_err(|e| cuda("copying from NCCL's staging buffer", e))?;
            }
            Ok(out)
        })
    }

    /// Until the stream has done the collective: NCCL's asynchronous error, or the timeout, abort
    /// the communicator (every later call then fails at once).
    fn wait(&self, comm: &mut NcclComm, what: &str, stream: usize) -> Result<()> {
        let deadline = Instant::now() + self.timeout;
        loop {
            let r = unsafe { drv_sys::cuStreamQuery(stream as drv_sys::CUstream) };
            match r {
                drv_sys::CUresult::CUDA_SUCCESS => return Ok(()),
                drv_sys::CUresult::CUDA_ERROR_NOT_READY => {}
                e => return Err(cuda(&format!("{what} on its stream"), drv::DriverError(e))),
            }
            if let Err(e) = comm.async_error() {
                comm.abort();
                return Err(Error::Dist(format!("rank {} of {}: {what}: {e}", self.rank, self.size)));
            }
            if Instant::now() >= deadline {
                comm.abort();
                return Err(Error::Dist(format!(
                    "rank {} of {}: {what} waited {} s for the other ranks (--dist-timeout): a peer died or hangs",
                    self.rank,
                    self.size,
                    self.timeout.as_secs()
                )));
            }
            std::thread::sleep(Duration::from_micros(100));
        }
    }

    fn allreduce_bytes(&self, bytes: &[u8], ty: NcclType, op: NcclOp) -> Result<Vec<u8>> {
        let n = bytes.len() / ty.size();
        self.run("ncclAllReduce", bytes, bytes.len(), |c, s, r, st| c.allreduce(s, r, n, ty, op, st))
    }
}

impl Drop for NcclWorld {
    fn drop(&mut self) {
        let st = self.staging.get_mut().unwrap_or_else(|e| e.into_inner());
        if st.ptr != 0 && self.ctx.bind_to_thread().is_ok() {
            let _ = unsafe { drv::free_sync(st.ptr) };
        }
    }
}

impl Comm for NcclWorld {
    fn rank(&self) -> usize {
        self.rank
    }
    fn size(&self) -> usize {
        self.size
    }
    fn describe(&self) -> String {
        self.how.clone()
    }
    fn allreduce_sum_f32(&self, buf: &mut [f32]) -> Result<()> {
        let out = self.allreduce_bytes(bytemuck::cast_slice(buf), NcclType::F32, NcclOp::Sum)?;
        buf.copy_from_slice(bytemuck::cast_slice(&out));
        Ok(())
    }
    fn allreduce_sum_f64(&self, buf: &mut [f64]) -> Result<()> {
        let out = self.allreduce_bytes(bytemuck::cast_slice(buf), NcclType::F64, NcclOp::Sum)?;
        buf.copy_from_slice(bytemuck::cast_slice(&out));
        Ok(())
    }
    fn reduce_scatter_sum_f32(&self, buf: &[f32]) -> Result<Vec<f32>> {
        // (the host path of ZeRO-1; CUDA ranks reduce on the device, see train's NCCL ZeRO path)
        let mut all = buf.to_vec();
        self.allreduce_sum_f32(&mut all)?;
        let chunk = buf.len() / self.size;
        Ok(all[self.rank * chunk..(self.rank + 1) * chunk].to_vec())
    }
    fn allgather(&self, mine: &[u8]) -> Result<Vec<u8>> {
        let n = mine.len();
        self.run("ncclAllGather", mine, n * self.size, |c, s, r, st| c.allgather(s, r, n, NcclType::U8, st))
    }
    fn bcast(&self, buf: &mut [u8], root: usize) -> Result<()> {
        let n = buf.len();
        let out = self.run("ncclBroadcast", buf, n, |c, s, r, st| c.broadcast(s, r, n, NcclType::U8, root, st))?;
        buf.copy_from_slice(&out);
        Ok(())
    }
    fn barrier(&self) -> Result<()> {
        self.allreduce_bytes(&[0u8], NcclType::U8, NcclOp::Max).map(|_| ())
    }
    fn watched(&self, what: &'static str, f: &mut dyn FnMut() -> Result<()>) -> Result<()> {
        self.dog.guard(what, f)
    }
    fn nccl(&self) -> Option<&Arc<Mutex<NcclComm>>> {
        Some(&self.comm)
    }
    fn fail(&self, why: &str) {
        eprintln!("wgpt: error: rank {} of {}: {why}; ending this rank", self.rank, self.size);
        // the peers' next NCCL call fails (or times out) instead of waiting for this rank
        if let Ok(mut c) = self.comm.try_lock() {
            c.abort();
        }
    }
}

/// `wgpt nccl-selftest` (hidden), run once per rank by a launcher or by hand (`WGPT_RANK`...):
/// rank 0's NCCL unique id reaches every rank through `init`, and each prints
/// "rank R of N: NCCL V, id fnv1a=H" (the same H on every rank). With `join` (a GPU machine),
/// the ranks then join on `device` and every collective of `Comm` is checked on known values.
pub fn self_test(init: &DistInit, timeout: Duration, join: bool, device: usize) -> Result<String> {
    let env = super::env_map();
    let world = super::World::from_env_map(&env)?;
    let (rank, size) = (world.rank, world.size);
    if !join {
        let lib = Nccl::load(&env)?;
        let id = if rank == 0 { Some(lib.unique_id()?) } else { None };
        let blob = rendezvous::share(init, &env, rank, size, id.as_ref().map(|i| &i[..]), timeout)?;
        let hash = blob.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, &b| (h ^ b as u64).wrapping_mul(0x100_0000_01b3));
        return Ok(format!("rank {rank} of {size}: NCCL {} ({}), id fnv1a={hash:016x} ({} bytes)", lib.version(), lib.path(), blob.len()));
    }
    let w = NcclWorld::join(&env, rank, size, device, init, timeout)?;
    let n = size as f64;
    let mut a = [rank as f32 + 1.0, 2.0];
    w.allreduce_sum_f32(&mut a)?;
    let mut b = [rank as f64 * 0.5, 1.0];
    w.allreduce_sum_f64(&mut b)?;
    let g = w.allgather(&[rank as u8, 7])?;
    let mut c = [rank as u8; 3];
    w.bcast(&mut c, size - 1)?;
    w.barrier()?;
    let want_g: Vec<u8> = (0..size).flat_map(|r| [r as u8, 7]).collect();
    let ok = a == [(n * (n + 1.0) / 2.0) as f32, 2.0 * n as f32] && b == [n * (n - 1.0) / 4.0, n] && g == want_g && c == [(size - 1) as u8; 3];
    if !ok {
        return Err(Error::Dist(format!("rank {rank} of {size}: wrong results: allreduce f32 {a:?}, f64 {b:?}, allgather {g:?}, bcast {c:?}")));
    }
    Ok(format!("ok rank {rank} of {size} ({})", w.describe()))
}
