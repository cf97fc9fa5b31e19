//! Who this process is in a multi-process job, read from whatever launcher started it, and which
//! device its local rank uses. Everything here is a pure function of an environment map (and of
//! the device counts the caller found), so every launcher, the precedence between them and each
//! refusal is unit-tested without any launcher installed.
//!
//! Precedence (`shared/reference/multi-gpu.md`, §2 "Environment-variable table by launcher"):
//! `WGPT_*` > Open MPI `OMPI_COMM_WORLD_*` > MPICH/Intel MPI `PMI_*` > MVAPICH `MV2_COMM_WORLD_*` >
//! Horovod `HOROVOD_*` > torchrun `RANK`/`WORLD_SIZE` > a Slurm step (`srun`, Tianhe's `yhrun`) >
//! one process. Slurm's variables count only inside a job step: a batch (`sbatch`) or `salloc`
//! shell also has `SLURM_PROCID=0` and `SLURM_NTASKS=4`, and a process started from it is alone.

use crate::error::{Error, Result};
use std::collections::HashMap;

/// The program that started this process (and set the variables it was read from).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Launcher {
    /// no launcher: one process
    None,
    /// `WGPT_RANK`, `WGPT_WORLD_SIZE`, `WGPT_LOCAL_RANK`, `WGPT_LOCAL_SIZE`, set by hand or a script
    Wgpt,
    /// Open MPI's `mpirun`/`prterun` (4.x and 5.x): `OMPI_COMM_WORLD_*`
    OpenMpi,
    /// MPICH's or Intel MPI's hydra `mpiexec` (`PMI_RANK`, `PMI_SIZE`, `MPI_LOCALRANKID`,
    /// `MPI_LOCALNRANKS`); `srun --mpi=pmi2` sets `PMI_*` too
    Pmi,
    /// MVAPICH: `MV2_COMM_WORLD_*`
    Mvapich,
    /// `horovodrun`: `HOROVOD_*`
    Horovod,
    /// torchrun / `env://`: `RANK`, `WORLD_SIZE`, `LOCAL_RANK`, `LOCAL_WORLD_SIZE`
    Torchrun,
    /// a Slurm job step: `srun`, or Tianhe's `yhrun` (the same program, the same variables)
    Slurm,
}

impl Launcher {
    /// How a message names it: "Open MPI mpirun".
    pub fn name(self) -> &'static str {
        match self {
            Launcher::None => "none",
            Launcher::Wgpt => "WGPT_RANK/WGPT_WORLD_SIZE",
            Launcher::OpenMpi => "Open MPI mpirun",
            Launcher::Pmi => "MPICH/Intel MPI hydra (PMI)",
            Launcher::Mvapich => "MVAPICH",
            Launcher::Horovod => "horovodrun",
            Launcher::Torchrun => "torchrun",
            Launcher::Slurm => "Slurm srun/yhrun",
        }
    }
}

impl std::fmt::Display for Launcher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// This process's place in the job. A plain process is rank 0 of 1, local rank 0 of 1.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct World {
    pub rank: usize,
    pub size: usize,
    /// rank among the processes on this node (the device index follows it)
    pub local_rank: usize,
    pub local_size: usize,
    pub launcher: Launcher,
    /// the variables read, as `NAME=value` separated by spaces (empty for one process)
    pub from: String,
    /// the launcher gave no local rank or no local size: they are assumed (all ranks on this node)
    pub local_assumed: bool,
    /// launcher variables present but not trusted, and why (the Slurm batch-shell case)
    pub ignored: Option<String>,
}

/// One launcher's four variables (Slurm is read by its own function).
struct Spec {
    launcher: Launcher,
    rank: &'static str,
    size: &'static str,
    local_rank: &'static str,
    local_size: &'static str,
}

/// In precedence order: the first whose rank or size variable is set is the launcher.
const SPECS: [Spec; 6] = [
    Spec { launcher: Launcher::Wgpt, rank: "WGPT_RANK", size: "WGPT_WORLD_SIZE", local_rank: "WGPT_LOCAL_RANK", local_size: "WGPT_LOCAL_SIZE" },
    Spec {
        launcher: Launcher::OpenMpi,
        rank: "OMPI_COMM_WORLD_RANK",
        size: "OMPI_COMM_WORLD_SIZE",
        local_rank: "OMPI_COMM_WORLD_LOCAL_RANK",
        local_size: "OMPI_COMM_WORLD_LOCAL_SIZE",
    },
    Spec { launcher: Launcher::Pmi, rank: "PMI_RANK", size: "PMI_SIZE", local_rank: "MPI_LOCALRANKID", local_size: "MPI_LOCALNRANKS" },
    Spec {
        launcher: Launcher::Mvapich,
        rank: "MV2_COMM_WORLD_RANK",
        size: "MV2_COMM_WORLD_SIZE",
        local_rank: "MV2_COMM_WORLD_LOCAL_RANK",
        local_size: "MV2_COMM_WORLD_LOCAL_SIZE",
    },
    Spec { launcher: Launcher::Horovod, rank: "HOROVOD_RANK", size: "HOROVOD_SIZE", local_rank: "HOROVOD_LOCAL_RANK", local_size: "HOROVOD_LOCAL_SIZE" },
    Spec { launcher: Launcher::Torchrun, rank: "RANK", size: "WORLD_SIZE", local_rank: "LOCAL_RANK", local_size: "LOCAL_WORLD_SIZE" },
];

/// Slurm step ids at or above this are the batch, extern and interactive steps (0xfffffffa..),
/// which are shells, not tasks started by srun.
const SLURM_SPECIAL_STEP: u64 = 0xffff_fff0;

/// An environment variable, trimmed; an empty value counts as unset.
fn get<'a>(env: &'a HashMap<String, String>, var: &str) -> Option<&'a str> {
    env.get(var).map(|v| v.trim()).filter(|v| !v.is_empty())
}

fn number(env: &HashMap<String, String>, var: &str, launcher: Launcher) -> Result<Option<usize>> {
    match get(env, var) {
        None => Ok(None),
        Some(v) => v
            .parse::<usize>()
            .map(Some)
            .map_err(|_| Error::flag(var, format!("'{v}' is not a non-negative integer ({launcher})"))),
    }
}

impl World {
    /// One process, no launcher.
    pub fn single() -> World {
        World { rank: 0, size: 1, local_rank: 0, local_size: 1, launcher: Launcher::None, from: String::new(), local_assumed: false, ignored: None }
    }

    /// The world described by this process's environment.
    pub fn from_env() -> Result<World> {
        World::from_env_map(&env_map())
    }

    /// The world described by `env` (variable → value), by the precedence in the module doc.
    /// Inconsistent values (a rank not below the size, a number that is not one, a local rank not
    /// below the local size, half of a pair) are one-line errors naming the variable.
    pub fn from_env_map(env: &HashMap<String, String>) -> Result<World> {
        let slurm = slurm_step(env);
        for spec in &SPECS {
            let mut present = [spec.rank, spec.size].iter().any(|v| get(env, v).is_some());
            if spec.launcher == Launcher::Wgpt {
                present |= [spec.local_rank, spec.local_size].iter().any(|v| get(env, v).is_some());
            }
            if present {
                let mut w = from_spec(env, spec)?;
                // srun --mpi=pmi2 sets PMI_RANK/PMI_SIZE but not MPI_LOCALRANKID: the step knows it
                if w.local_assumed && spec.launcher == Launcher::Pmi {
                    if let Some(Ok(s)) = &slurm {
                        if s.size == w.size && s.rank == w.rank {
                            w.local_rank = s.local_rank;
                            w.local_size = s.local_size;
                            w.local_assumed = s.local_assumed;
                            w.from = format!("{} {}", w.from, s.from);
                        }
                    }
                }
                return Ok(w);
            }
        }
        match slurm {
            Some(r) => r,
            None => {
                let mut w = World::single();
                w.ignored = slurm_shell(env);
                Ok(w)
            }
        }
    }
}

impl std::fmt::Display for World {
    /// "rank 1 of 4, local rank 1 of 4"
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "rank {} of {}, local rank {} of {}", self.rank, self.size, self.local_rank, self.local_size)?;
        if self.local_assumed {
            write!(f, " (the launcher gives no local rank/size: all ranks assumed on this node)")?;
        }
        Ok(())
    }
}

/// This process's environment as a map (variables whose name or value is not UTF-8 are skipped;
/// none of the launchers' are).
pub fn env_map() -> HashMap<String, String> {
    std::env::vars_os().filter_map(|(k, v)| Some((k.into_string().ok()?, v.into_string().ok()?))).collect()
}

fn from_spec(env: &HashMap<String, String>, spec: &Spec) -> Result<World> {
    let l = spec.launcher;
    let rank = number(env, spec.rank, l)?;
    let size = number(env, spec.size, l)?;
    let (rank, size) = match (rank, size) {
        (Some(r), Some(s)) => (r, s),
        (Some(r), None) => return Err(Error::flag(spec.size, format!("not set, though {}={r} is ({l} sets both)", spec.rank))),
        (None, Some(s)) => return Err(Error::flag(spec.rank, format!("not set, though {}={s} is ({l} sets both)", spec.size))),
        (None, None) => {
            let var = if get(env, spec.local_rank).is_some() { spec.local_rank } else { spec.local_size };
            return Err(Error::flag(var, format!("set without {} and {} (give all of them)", spec.rank, spec.size)));
        }
    };
    check_rank(rank, size, spec.rank, spec.size, l)?;
    let mut from = format!("{}={rank} {}={size}", spec.rank, spec.size);
    let local_rank = number(env, spec.local_rank, l)?;
    let local_size = number(env, spec.local_size, l)?;
    let (local_rank, local_size, local_assumed) = match (local_rank, local_size) {
        (Some(lr), Some(ls)) => {
            from += &format!(" {}={lr} {}={ls}", spec.local_rank, spec.local_size);
            (lr, ls, false)
        }
        (Some(lr), None) => {
            from += &format!(" {}={lr}", spec.local_rank);
            (lr, size, true)
        }
        (None, Some(ls)) => {
            return Err(Error::flag(spec.local_rank, format!("not set, though {}={ls} is (give both)", spec.local_size)))
        }
        (None, None) => (rank, size, size > 1),
    };
    check_local(local_rank, local_size, size, spec.local_rank, spec.local_size, spec.size, l)?;
    Ok(World { rank, size, local_rank, local_size, launcher: l, from, local_assumed, ignored: None })
}

fn check_rank(rank: usize, size: usize, rank_var: &str, size_var: &str, l: Launcher) -> Result<()> {
    if size == 0 {
        return Err(Error::flag(size_var, format!("0 ranks: a world has at least one ({l})")));
    }
    if rank >= size {
        return Err(Error::flag(rank_var, format!("{rank} is not below {size_var}={size} ({l})")));
    }
    Ok(())
}

fn check_local(lr: usize, ls: usize, size: usize, lr_var: &str, ls_var: &str, size_var: &str, l: Launcher) -> Result<()> {
    if ls == 0 {
        return Err(Error::flag(ls_var, format!("0 ranks on this node: there is at least this one ({l})")));
    }
    if lr >= ls {
        return Err(Error::flag(lr_var, format!("{lr} is not below {ls_var}={ls} ({l})")));
    }
    if ls > size {
        return Err(Error::flag(ls_var, format!("{ls} ranks on this node is more than {size_var}={size} in the whole world ({l})")));
    }
    Ok(())
}

/// `SLURM_STEP_ID` (or the older `SLURM_STEPID`) of a task step, i.e. not the batch, extern or
/// interactive shell's.
fn in_slurm_step(env: &HashMap<String, String>) -> bool {
    let id = get(env, "SLURM_STEP_ID").or_else(|| get(env, "SLURM_STEPID"));
    matches!(id.map(|s| s.parse::<u64>()), Some(Ok(n)) if n < SLURM_SPECIAL_STEP)
}

/// A Slurm task step's world, if this is one.
fn slurm_step(env: &HashMap<String, String>) -> Option<Result<World>> {
    if !in_slurm_step(env) || get(env, "SLURM_PROCID").is_none() {
        return None;
    }
    Some(slurm_world(env))
}

fn slurm_world(env: &HashMap<String, String>) -> Result<World> {
    let l = Launcher::Slurm;
    let rank = number(env, "SLURM_PROCID", l)?.unwrap_or(0);
    let size_var = ["SLURM_STEP_NUM_TASKS", "SLURM_NTASKS", "SLURM_NPROCS"].into_iter().find(|v| get(env, v).is_some());
    let Some(size_var) = size_var else {
        return Err(Error::flag("SLURM_STEP_NUM_TASKS", format!("not set (nor SLURM_NTASKS), though SLURM_PROCID={rank} is in a job step ({l})")));
    };
    let size = number(env, size_var, l)?.unwrap_or(0);
    check_rank(rank, size, "SLURM_PROCID", size_var, l)?;
    let mut from = format!("SLURM_PROCID={rank} {size_var}={size}");
    let local_rank = number(env, "SLURM_LOCALID", l)?;
    let per_node_var = ["SLURM_STEP_TASKS_PER_NODE", "SLURM_TASKS_PER_NODE"].into_iter().find(|v| get(env, v).is_some());
    let local_size = match per_node_var {
        Some(var) => Some((var, tasks_on_this_node(env, var)?)),
        None => None,
    };
    let (local_rank, local_size, assumed) = match (local_rank, local_size) {
        (Some(lr), Some((var, ls))) => {
            from += &format!(" SLURM_LOCALID={lr} {var}={}", get(env, var).unwrap_or(""));
            check_local(lr, ls, size, "SLURM_LOCALID", var, size_var, l)?;
            (lr, ls, false)
        }
        (Some(lr), None) => {
            from += &format!(" SLURM_LOCALID={lr}");
            check_local(lr, size, size, "SLURM_LOCALID", size_var, size_var, l)?;
            (lr, size, true)
        }
        (None, Some((var, _))) => {
            return Err(Error::flag("SLURM_LOCALID", format!("not set, though {var} is, in a job step ({l})")));
        }
        (None, None) => (rank, size, size > 1),
    };
    Ok(World { rank, size, local_rank, local_size, launcher: l, from, local_assumed: assumed, ignored: None })
}

/// This node's entry of a Slurm tasks-per-node list such as "2(x3),1" (nodes in step order;
/// `SLURM_NODEID` says which one this is when the counts differ).
fn tasks_on_this_node(env: &HashMap<String, String>, var: &str) -> Result<usize> {
    let text = get(env, var).unwrap_or("");
    let counts = parse_tasks_per_node(text)
        .ok_or_else(|| Error::flag(var, format!("'{text}' is not a Slurm task-count list such as 2(x3),1 ({})", Launcher::Slurm)))?;
    if counts.iter().all(|&c| c == counts[0]) {
        return Ok(counts[0]);
    }
    let node = number(env, "SLURM_NODEID", Launcher::Slurm)?;
    match node {
        Some(n) if n < counts.len() => Ok(counts[n]),
        _ => Err(Error::flag(
            "SLURM_NODEID",
            format!("missing or outside the {} nodes of {var}={text}: cannot tell how many tasks run on this node", counts.len()),
        )),
    }
}

/// "2(x3),1" → [2, 2, 2, 1]; None when malformed (or absurdly long).
fn parse_tasks_per_node(text: &str) -> Option<Vec<usize>> {
    let mut out = Vec::new();
    for part in text.split(',') {
        let part = part.trim();
        let (count, times) = match part.split_once("(x") {
            Some((c, rest)) => (c, rest.strip_suffix(')')?.parse::<usize>().ok()?),
            None => (part, 1),
        };
        let count = count.parse::<usize>().ok()?;
        if out.len() + times > 1 << 20 {
            return None;
        }
        out.extend(std::iter::repeat_n(count, times));
    }
    (!out.is_empty()).then_some(out)
}

/// Slurm variables of a job shell (sbatch, salloc) outside any srun step: why they are ignored.
fn slurm_shell(env: &HashMap<String, String>) -> Option<String> {
    let seen: Vec<String> = ["SLURM_PROCID", "SLURM_NTASKS"]
        .iter()
        .filter_map(|v| get(env, v).map(|x| format!("{v}={x}")))
        .collect();
    if seen.is_empty() {
        return None;
    }
    let step = get(env, "SLURM_STEP_ID").or_else(|| get(env, "SLURM_STEPID"));
    let why = match step {
        None => "no SLURM_STEP_ID".to_string(),
        Some(s) => format!("SLURM_STEP_ID={s} is a batch/extern/interactive step"),
    };
    Some(format!(
        "{} ignored: {why}, so this is a Slurm job shell, not a task started by srun/yhrun (one process)",
        seen.join(" ")
    ))
}

// ---------------------------------------------------------------------------------------------
// Rank → device

/// `--device-per-rank`: which device each local rank uses when a launcher starts several ranks
/// on one node.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum DevicePerRank {
    /// local rank i uses visible device i (CUDA: i-th entry of CUDA_VISIBLE_DEVICES)
    Auto,
    /// entry i is local rank i's device index (as `--device` numbers them)
    List(Vec<usize>),
}

impl DevicePerRank {
    /// "auto" or a comma-separated list of device indices ("0,1,2,3").
    pub fn parse(s: &str) -> std::result::Result<DevicePerRank, String> {
        let s = s.trim();
        if s.eq_ignore_ascii_case("auto") {
            return Ok(DevicePerRank::Auto);
        }
        let list: std::result::Result<Vec<usize>, _> = s.split(',').map(|p| p.trim().parse::<usize>()).collect();
        match list {
            Ok(l) if !l.is_empty() => Ok(DevicePerRank::List(l)),
            _ => Err(format!("'{s}' is neither auto nor a list of device indices such as 0,1,2,3")),
        }
    }
}

impl std::fmt::Display for DevicePerRank {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            DevicePerRank::Auto => f.write_str("auto"),
            DevicePerRank::List(l) => f.write_str(&join(l)),
        }
    }
}

fn join(l: &[usize]) -> String {
    l.iter().map(|d| d.to_string()).collect::<Vec<_>>().join(",")
}

/// The devices the chosen backend would spread local ranks over.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Devices {
    /// the cpu backend: no device, so nothing to share
    Cpu,
    /// CUDA devices as the driver numbers them: `visible` of them, after CUDA_VISIBLE_DEVICES
    Cuda { visible: usize },
    /// wgpu adapters (`wgpt info` indices): `total` of them; local ranks go to `usable` in order
    /// (the adapters of one API, so that no GPU counts twice through Vulkan and GL; hardware ones
    /// only for --backend auto, which never takes a software adapter)
    Wgpu { total: usize, usable: Vec<usize> },
}

/// Where this rank runs.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Placement {
    /// one rank on this node (or no device of that kind here): `--device`, else the backend's own choice
    Default,
    /// the cpu backend: ranks share nothing that matters
    Host,
    /// device `index` (`--device` numbering) of `kind` ("CUDA device", "wgpu adapter"), and why
    Device { kind: &'static str, index: usize, why: String },
}

impl std::fmt::Display for Placement {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Placement::Default => f.write_str("as one process (--device, else the backend's default): one rank on this node"),
            Placement::Host => f.write_str("the cpu backend (no device: ranks on cpu share nothing)"),
            Placement::Device { kind, index, why } => write!(f, "{kind} {index} ({why})"),
        }
    }
}

/// CUDA_VISIBLE_DEVICES as the driver reads it: the entries (indices or GPU-/MIG- UUIDs) up to
/// the first empty or negative one; the driver numbers the visible devices 0.. in this order.
pub fn visible_devices(cvd: &str) -> Vec<String> {
    cvd.split(',').map(|e| e.trim()).take_while(|e| !e.is_empty() && !e.starts_with('-')).map(String::from).collect()
}

/// Whether Slurm gave each task its own CUDA_VISIBLE_DEVICES (`--gpus-per-task` with as many
/// GPUs visible as each task gets, or `--gpu-bind=per_task|map_gpu|mask_gpu`): then every rank's
/// device 0.. is its own GPU, and local ranks outnumbering the visible devices share nothing.
fn slurm_binds_per_task(world: &World, env: &HashMap<String, String>, visible: usize) -> bool {
    if world.launcher != Launcher::Slurm || get(env, "CUDA_VISIBLE_DEVICES").is_none() {
        return false;
    }
    let per_task = get(env, "SLURM_GPUS_PER_TASK").and_then(|g| g.rsplit(':').next()?.parse::<usize>().ok());
    let bind = get(env, "SLURM_GPU_BIND").unwrap_or("");
    matches!(per_task, Some(g) if g >= 1 && visible <= g) || ["per_task", "map_gpu", "mask_gpu"].iter().any(|b| bind.contains(b))
}

/// The device of this process's local rank, before anything is allocated. Only a world with more
/// than one local rank chooses; two local ranks that would use one GPU are refused with what to
/// change (NCCL refuses such a pair anyway, "Duplicate GPU detected").
///
/// * `--device-per-rank LIST`: entry `local_rank`, checked to exist; duplicates are refused,
///   except for CUDA with CUDA_VISIBLE_DEVICES set, where each rank may have been given its own
///   list (wgpt cannot see the others' environment) and the explicit list is trusted.
/// * auto, CUDA: visible device `local_rank` (the `local_rank`-th CUDA_VISIBLE_DEVICES entry); with
///   Slurm's per-task GPU binding, `local_rank` modulo the visible count.
/// * auto, wgpu: the `local_rank`-th of `usable`.
pub fn place(world: &World, devices: &Devices, env: &HashMap<String, String>, per_rank: &DevicePerRank) -> Result<Placement> {
    if world.local_size <= 1 {
        return Ok(Placement::Default);
    }
    let (kind, count) = match devices {
        Devices::Cpu => return Ok(Placement::Host),
        Devices::Cuda { visible } => ("CUDA device", *visible),
        Devices::Wgpu { total, .. } => ("wgpu adapter", *total),
    };
    if count == 0 {
        // nothing of that kind here: the backend says so in its own words
        return Ok(Placement::Default);
    }
    let cvd = match devices {
        Devices::Cuda { .. } => get(env, "CUDA_VISIBLE_DEVICES"),
        _ => None,
    };
    let cvd_note = cvd.map(|c| format!(", CUDA_VISIBLE_DEVICES={c}")).unwrap_or_default();
    let (lr, ls) = (world.local_rank, world.local_size);
    let entry = |index: usize| -> String {
        match cvd.map(visible_devices) {
            Some(list) if index < list.len() => format!("; CUDA_VISIBLE_DEVICES entry {}", list[index]),
            _ => String::new(),
        }
    };
    let plural = |n: usize, one: &str, many: &str| if n == 1 { format!("{n} {one}") } else { format!("{n} {many}") };

    if let DevicePerRank::List(list) = per_rank {
        let shown = join(list);
        if list.len() < ls {
            return Err(Error::flag(
                "--device-per-rank",
                format!(
                    "{shown} has {} for {ls} ranks on this node ({}): give one device per local rank",
                    plural(list.len(), "entry", "entries"),
                    world.launcher
                ),
            ));
        }
        let mine = &list[..ls];
        if let Some((i, &d)) = mine.iter().enumerate().find(|(_, &d)| d >= count) {
            return Err(Error::flag(
                "--device-per-rank",
                format!("{shown}: local rank {i}'s {kind} {d} does not exist here ({} visible{cvd_note}; see wgpt info)", plural(count, kind, &format!("{kind}s"))),
            ));
        }
        if cvd.is_none() {
            if let Some((a, b)) = first_shared(mine) {
                return Err(Error::flag(
                    "--device-per-rank",
                    format!("{shown}: local ranks {a} and {b} would both use {kind} {}: give each local rank its own device", mine[a]),
                ));
            }
        }
        let index = list[lr];
        return Ok(Placement::Device { kind, index, why: format!("--device-per-rank {shown}, local rank {lr} of {ls}{}", entry(index)) });
    }

    match devices {
        Devices::Cuda { visible } => {
            let visible = *visible;
            if slurm_binds_per_task(world, env, visible) {
                let index = lr % visible;
                return Ok(Placement::Device {
                    kind,
                    index,
                    why: format!("local rank {lr} of {ls}; Slurm binds GPUs per task{}", entry(index)),
                });
            }
            if ls > visible {
                let hint = match cvd {
                    Some(_) => format!(
                        "; if each rank was given its own CUDA_VISIBLE_DEVICES, say so with --device-per-rank {}",
                        join(&(0..ls).map(|i| i % visible).collect::<Vec<_>>())
                    ),
                    None => String::new(),
                };
                return Err(Error::Unavailable(format!(
                    "local ranks 0 and {visible} would both use CUDA device 0 ({ls} ranks per node, {}{cvd_note}): \
                     launch one rank per GPU, or set --device-per-rank / CUDA_VISIBLE_DEVICES{hint}",
                    plural(visible, "visible device", "visible devices")
                )));
            }
            Ok(Placement::Device { kind, index: lr, why: format!("local rank {lr} of {ls}{}", entry(lr)) })
        }
        Devices::Wgpu { usable, .. } => {
            if usable.is_empty() {
                return Ok(Placement::Default);
            }
            if ls > usable.len() {
                return Err(Error::Unavailable(format!(
                    "local ranks 0 and {} would both use wgpu adapter {} ({ls} ranks per node, {} to spread them over): \
                     launch one rank per GPU, or set --device-per-rank",
                    usable.len(),
                    usable[0],
                    plural(usable.len(), "adapter", "adapters")
                )));
            }
            Ok(Placement::Device { kind, index: usable[lr], why: format!("local rank {lr} of {ls}") })
        }
        Devices::Cpu => Ok(Placement::Host),
    }
}

/// The first pair of positions holding the same device.
fn first_shared(devs: &[usize]) -> Option<(usize, usize)> {
    (0..devs.len()).find_map(|b| (0..b).find(|&a| devs[a] == devs[b]).map(|a| (a, b)))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(pairs: &[(&str, &str)]) -> HashMap<String, String> {
        pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
    }

    fn world(pairs: &[(&str, &str)]) -> World {
        World::from_env_map(&env(pairs)).unwrap_or_else(|e| panic!("{pairs:?}: {e}"))
    }

    fn err(pairs: &[(&str, &str)]) -> String {
        match World::from_env_map(&env(pairs)) {
            Ok(w) => panic!("{pairs:?} gave {w:?}, expected an error"),
            Err(e) => {
                let s = e.to_string();
                assert!(!s.contains('\n'), "not one line: {s}");
                s
            }
        }
    }

    fn four(w: &World) -> (usize, usize, usize, usize) {
        (w.rank, w.size, w.local_rank, w.local_size)
    }

    const OMPI: [(&str, &str); 4] = [
        ("OMPI_COMM_WORLD_RANK", "5"),
        ("OMPI_COMM_WORLD_SIZE", "8"),
        ("OMPI_COMM_WORLD_LOCAL_RANK", "1"),
        ("OMPI_COMM_WORLD_LOCAL_SIZE", "4"),
    ];
    /// what srun -N2 -n8 sets in task 6 (second node, local task 2)
    const SRUN: [(&str, &str); 8] = [
        ("SLURM_JOB_ID", "200505"),
        ("SLURM_STEP_ID", "0"),
        ("SLURM_PROCID", "6"),
        ("SLURM_NTASKS", "8"),
        ("SLURM_STEP_NUM_TASKS", "8"),
        ("SLURM_LOCALID", "2"),
        ("SLURM_NODEID", "1"),
        ("SLURM_STEP_TASKS_PER_NODE", "4(x2)"),
    ];
    /// an sbatch batch shell of a 4-task job (the gist's dump, trimmed): no SLURM_STEP_ID
    const SBATCH: [(&str, &str); 7] = [
        ("SLURM_JOB_ID", "200505"),
        ("SLURM_PROCID", "0"),
        ("SLURM_NTASKS", "4"),
        ("SLURM_LOCALID", "0"),
        ("SLURM_NODEID", "0"),
        ("SLURM_TASKS_PER_NODE", "1(x4)"),
        ("SLURM_NNODES", "4"),
    ];

    #[test]
    fn plain_process_is_a_world_of_one() {
        let w = world(&[("HOME", "/root"), ("PATH", "/usr/bin")]);
        assert_eq!(w, World::single());
        assert_eq!(w.launcher.name(), "none");
        assert_eq!(w.to_string(), "rank 0 of 1, local rank 0 of 1");
    }

    #[test]
    fn wgpt_explicit_variables() {
        let w = world(&[("WGPT_RANK", "3"), ("WGPT_WORLD_SIZE", "4"), ("WGPT_LOCAL_RANK", "1"), ("WGPT_LOCAL_SIZE", "2")]);
        assert_eq!((w.launcher, four(&w)), (Launcher::Wgpt, (3, 4, 1, 2)));
        assert!(!w.local_assumed);
        // no local variables: one node assumed
        let w = world(&[("WGPT_RANK", "3"), ("WGPT_WORLD_SIZE", "4")]);
        assert_eq!(four(&w), (3, 4, 3, 4));
        assert!(w.local_assumed && w.to_string().contains("assumed"));
        // a local rank without a local size: the whole world on this node
        let w = world(&[("WGPT_RANK", "3"), ("WGPT_WORLD_SIZE", "4"), ("WGPT_LOCAL_RANK", "1")]);
        assert_eq!(four(&w), (3, 4, 1, 4));
        assert!(w.local_assumed);
    }

    #[test]
    fn open_mpi_mpirun() {
        let w = world(&OMPI);
        assert_eq!((w.launcher, four(&w)), (Launcher::OpenMpi, (5, 8, 1, 4)));
        assert_eq!(w.from, "OMPI_COMM_WORLD_RANK=5 OMPI_COMM_WORLD_SIZE=8 OMPI_COMM_WORLD_LOCAL_RANK=1 OMPI_COMM_WORLD_LOCAL_SIZE=4");
        assert_eq!(w.launcher.name(), "Open MPI mpirun");
    }

    #[test]
    fn mpich_and_intel_mpi_hydra() {
        let w = world(&[("PMI_RANK", "2"), ("PMI_SIZE", "3"), ("MPI_LOCALRANKID", "2"), ("MPI_LOCALNRANKS", "3"), ("PMI_FD", "6")]);
        assert_eq!((w.launcher, four(&w)), (Launcher::Pmi, (2, 3, 2, 3)));
        assert!(!w.local_assumed);
    }

    #[test]
    fn srun_with_pmi2_takes_the_local_rank_from_the_step() {
        let mut e = SRUN.to_vec();
        e.extend([("PMI_RANK", "6"), ("PMI_SIZE", "8")]);
        let w = world(&e);
        assert_eq!((w.launcher, four(&w)), (Launcher::Pmi, (6, 8, 2, 4)));
        assert!(!w.local_assumed);
        // outside a step, PMI without local variables assumes one node
        let w = world(&[("PMI_RANK", "1"), ("PMI_SIZE", "2")]);
        assert_eq!(four(&w), (1, 2, 1, 2));
        assert!(w.local_assumed);
    }

    #[test]
    fn mvapich() {
        let w = world(&[
            ("MV2_COMM_WORLD_RANK", "1"),
            ("MV2_COMM_WORLD_SIZE", "2"),
            ("MV2_COMM_WORLD_LOCAL_RANK", "0"),
            ("MV2_COMM_WORLD_LOCAL_SIZE", "1"),
        ]);
        assert_eq!((w.launcher, four(&w)), (Launcher::Mvapich, (1, 2, 0, 1)));
    }

    #[test]
    fn horovodrun() {
        let w = world(&[("HOROVOD_RANK", "3"), ("HOROVOD_SIZE", "4"), ("HOROVOD_LOCAL_RANK", "1"), ("HOROVOD_LOCAL_SIZE", "2")]);
        assert_eq!((w.launcher, four(&w)), (Launcher::Horovod, (3, 4, 1, 2)));
    }

    #[test]
    fn torchrun() {
        let w = world(&[
            ("RANK", "7"),
            ("WORLD_SIZE", "8"),
            ("LOCAL_RANK", "3"),
            ("LOCAL_WORLD_SIZE", "4"),
            ("GROUP_RANK", "1"),
            ("MASTER_ADDR", "10.0.0.1"),
            ("MASTER_PORT", "29500"),
            ("TORCHELASTIC_RUN_ID", "none"),
        ]);
        assert_eq!((w.launcher, four(&w)), (Launcher::Torchrun, (7, 8, 3, 4)));
    }

    #[test]
    fn slurm_srun_step() {
        let w = world(&SRUN);
        assert_eq!((w.launcher, four(&w)), (Launcher::Slurm, (6, 8, 2, 4)));
        assert!(!w.local_assumed && w.ignored.is_none());
        assert!(w.from.contains("SLURM_STEP_NUM_TASKS=8") && w.from.contains("SLURM_STEP_TASKS_PER_NODE=4(x2)"), "{}", w.from);
        // the older SLURM_STEPID name, and the job-level counts when the step ones are absent
        let w = world(&[("SLURM_STEPID", "3"), ("SLURM_PROCID", "1"), ("SLURM_NTASKS", "2"), ("SLURM_LOCALID", "1"), ("SLURM_TASKS_PER_NODE", "2")]);
        assert_eq!((w.launcher, four(&w)), (Launcher::Slurm, (1, 2, 1, 2)));
    }

    #[test]
    fn yhrun_is_srun() {
        // Tianhe's yhrun is a renamed srun: the same SLURM_* variables, the same world
        let w = world(&[
            ("SLURM_STEP_ID", "1"),
            ("SLURM_PROCID", "1"),
            ("SLURM_STEP_NUM_TASKS", "2"),
            ("SLURM_LOCALID", "1"),
            ("SLURM_STEP_TASKS_PER_NODE", "2"),
        ]);
        assert_eq!((w.launcher, four(&w)), (Launcher::Slurm, (1, 2, 1, 2)));
        assert_eq!(w.launcher.name(), "Slurm srun/yhrun");
    }

    #[test]
    fn slurm_uneven_tasks_per_node_uses_the_node_id() {
        let mut e = SRUN.to_vec();
        e.retain(|(k, _)| !["SLURM_STEP_TASKS_PER_NODE", "SLURM_NODEID", "SLURM_STEP_NUM_TASKS", "SLURM_NTASKS", "SLURM_PROCID", "SLURM_LOCALID"].contains(k));
        e.extend([("SLURM_STEP_NUM_TASKS", "7"), ("SLURM_STEP_TASKS_PER_NODE", "2(x3),1"), ("SLURM_NODEID", "3"), ("SLURM_PROCID", "6"), ("SLURM_LOCALID", "0")]);
        assert_eq!(four(&world(&e)), (6, 7, 0, 1));
        e.retain(|(k, _)| *k != "SLURM_NODEID");
        assert!(err(&e).starts_with("SLURM_NODEID: "));
        assert_eq!(parse_tasks_per_node("2(x3),1"), Some(vec![2, 2, 2, 1]));
        assert_eq!(parse_tasks_per_node("4"), Some(vec![4]));
        assert_eq!(parse_tasks_per_node("2(x"), None);
        assert_eq!(parse_tasks_per_node("two"), None);
    }

    #[test]
    fn sbatch_shell_is_not_an_srun_task() {
        // the trap: a batch shell has SLURM_PROCID=0 and SLURM_NTASKS=4 but no step; treating it as
        // rank 0 of 4 would wait forever for three peers that never start
        let w = world(&SBATCH);
        assert_eq!((w.launcher, four(&w)), (Launcher::None, (0, 1, 0, 1)));
        let why = w.ignored.expect("the ignored Slurm variables are reported");
        assert!(why.contains("SLURM_PROCID=0") && why.contains("SLURM_NTASKS=4") && why.contains("no SLURM_STEP_ID"), "{why}");
        // salloc's interactive step and the batch step have special ids: still a shell
        for special in ["4294967290", "4294967291", "4294967292"] {
            let mut e = SBATCH.to_vec();
            e.push(("SLURM_STEP_ID", special));
            let w = world(&e);
            assert_eq!(w.launcher, Launcher::None, "step {special}");
            assert!(w.ignored.unwrap().contains(special));
        }
        // an srun inside that batch job is a step
        let mut e = SBATCH.to_vec();
        e.extend([("SLURM_STEP_ID", "0"), ("SLURM_STEP_NUM_TASKS", "4"), ("SLURM_STEP_TASKS_PER_NODE", "1(x4)")]);
        assert_eq!(world(&e).launcher, Launcher::Slurm);
    }

    #[test]
    fn precedence_follows_the_reference_order() {
        // every launcher at once, each with a different size so the winner is visible
        let all: Vec<(&str, &str)> = vec![
            ("WGPT_RANK", "0"),
            ("WGPT_WORLD_SIZE", "2"),
            ("OMPI_COMM_WORLD_RANK", "0"),
            ("OMPI_COMM_WORLD_SIZE", "3"),
            ("PMI_RANK", "0"),
            ("PMI_SIZE", "4"),
            ("MV2_COMM_WORLD_RANK", "0"),
            ("MV2_COMM_WORLD_SIZE", "5"),
            ("HOROVOD_RANK", "0"),
            ("HOROVOD_SIZE", "6"),
            ("RANK", "0"),
            ("WORLD_SIZE", "7"),
            ("SLURM_STEP_ID", "0"),
            ("SLURM_PROCID", "0"),
            ("SLURM_STEP_NUM_TASKS", "8"),
        ];
        let order = [
            (Launcher::Wgpt, 2, "WGPT_RANK"),
            (Launcher::OpenMpi, 3, "OMPI_COMM_WORLD_RANK"),
            (Launcher::Pmi, 4, "PMI_RANK"),
            (Launcher::Mvapich, 5, "MV2_COMM_WORLD_RANK"),
            (Launcher::Horovod, 6, "HOROVOD_RANK"),
            (Launcher::Torchrun, 7, "RANK"),
            (Launcher::Slurm, 8, "SLURM_PROCID"),
        ];
        let mut e = all.clone();
        for (launcher, size, rank_var) in order {
            let w = world(&e);
            assert_eq!((w.launcher, w.size), (launcher, size), "with {e:?}");
            // take this launcher's variables away: the next one wins
            let size_var = e[e.iter().position(|(k, _)| *k == rank_var).unwrap() + 1].0;
            e.retain(|(k, _)| *k != rank_var && *k != size_var);
        }
        assert_eq!(world(&e).launcher, Launcher::None);
    }

    #[test]
    fn mpirun_inside_an_allocation_beats_stale_slurm_variables() {
        let mut e = OMPI.to_vec();
        e.extend(SRUN);
        let w = world(&e);
        assert_eq!((w.launcher, four(&w)), (Launcher::OpenMpi, (5, 8, 1, 4)));
        // torchrun started by srun (one per node): torchrun's ranks, not srun's
        let mut e = SRUN.to_vec();
        e.extend([("RANK", "5"), ("WORLD_SIZE", "16"), ("LOCAL_RANK", "1"), ("LOCAL_WORLD_SIZE", "8")]);
        assert_eq!((world(&e).launcher, four(&world(&e))), (Launcher::Torchrun, (5, 16, 1, 8)));
    }

    #[test]
    fn inconsistent_values_are_one_line_errors_naming_the_variable() {
        let e = err(&[("OMPI_COMM_WORLD_RANK", "4"), ("OMPI_COMM_WORLD_SIZE", "4")]);
        assert_eq!(e, "OMPI_COMM_WORLD_RANK: 4 is not below OMPI_COMM_WORLD_SIZE=4 (Open MPI mpirun)");
        let e = err(&[("RANK", "one"), ("WORLD_SIZE", "2")]);
        assert_eq!(e, "RANK: 'one' is not a non-negative integer (torchrun)");
        let e = err(&[("PMI_RANK", "-1"), ("PMI_SIZE", "2")]);
        assert!(e.starts_with("PMI_RANK: '-1' is not"), "{e}");
        let e = err(&[("WGPT_RANK", "0"), ("WGPT_WORLD_SIZE", "0")]);
        assert!(e.starts_with("WGPT_WORLD_SIZE: 0 ranks"), "{e}");
        let e = err(&[("RANK", "1"), ("WORLD_SIZE", "4"), ("LOCAL_RANK", "2"), ("LOCAL_WORLD_SIZE", "2")]);
        assert_eq!(e, "LOCAL_RANK: 2 is not below LOCAL_WORLD_SIZE=2 (torchrun)");
        let e = err(&[("HOROVOD_RANK", "1"), ("HOROVOD_SIZE", "2"), ("HOROVOD_LOCAL_RANK", "0"), ("HOROVOD_LOCAL_SIZE", "3")]);
        assert!(e.starts_with("HOROVOD_LOCAL_SIZE: 3 ranks on this node is more than HOROVOD_SIZE=2"), "{e}");
        let e = err(&[("MV2_COMM_WORLD_RANK", "1")]);
        assert_eq!(e, "MV2_COMM_WORLD_SIZE: not set, though MV2_COMM_WORLD_RANK=1 is (MVAPICH sets both)");
        let e = err(&[("WORLD_SIZE", "2")]);
        assert!(e.starts_with("RANK: not set"), "{e}");
        let e = err(&[("WGPT_LOCAL_RANK", "1")]);
        assert!(e.starts_with("WGPT_LOCAL_RANK: set without WGPT_RANK and WGPT_WORLD_SIZE"), "{e}");
        let e = err(&[("WGPT_RANK", "0"), ("WGPT_WORLD_SIZE", "2"), ("WGPT_LOCAL_SIZE", "2")]);
        assert!(e.starts_with("WGPT_LOCAL_RANK: not set"), "{e}");
        let mut s = SRUN.to_vec();
        s.retain(|(k, _)| *k != "SLURM_PROCID");
        s.push(("SLURM_PROCID", "8"));
        assert!(err(&s).starts_with("SLURM_PROCID: 8 is not below SLURM_STEP_NUM_TASKS=8"));
        let mut s = SRUN.to_vec();
        s.retain(|(k, _)| *k != "SLURM_LOCALID");
        s.push(("SLURM_LOCALID", "4"));
        assert!(err(&s).starts_with("SLURM_LOCALID: 4 is not below SLURM_STEP_TASKS_PER_NODE=4"));
        let mut s = SRUN.to_vec();
        s.retain(|(k, _)| *k != "SLURM_STEP_TASKS_PER_NODE");
        s.push(("SLURM_STEP_TASKS_PER_NODE", "4(x2"));
        assert!(err(&s).starts_with("SLURM_STEP_TASKS_PER_NODE: '4(x2' is not"));
        // whitespace is trimmed and an empty value counts as unset
        assert_eq!(four(&world(&[("RANK", " 1 "), ("WORLD_SIZE", "2\n"), ("LOCAL_RANK", "")])), (1, 2, 1, 2));
    }


    // ---- rank → device ----

    fn ranks(local_rank: usize, local_size: usize) -> World {
        World { rank: local_rank, size: local_size, local_rank, local_size, launcher: Launcher::OpenMpi, from: String::new(), local_assumed: false, ignored: None }
    }

    fn cuda(visible: usize) -> Devices {
        Devices::Cuda { visible }
    }

    fn index(p: Placement) -> usize {
        match p {
            Placement::Device { index, .. } => index,
            other => panic!("expected a device, got {other:?}"),
        }
    }

    fn list(l: &[usize]) -> DevicePerRank {
        DevicePerRank::List(l.to_vec())
    }

    #[test]
    fn one_rank_per_gpu_maps_local_rank_to_device() {
        let none = env(&[]);
        for lr in 0..4 {
            assert_eq!(index(place(&ranks(lr, 4), &cuda(4), &none, &DevicePerRank::Auto).unwrap()), lr);
        }
        // more GPUs than ranks: the first ones
        assert_eq!(index(place(&ranks(1, 2), &cuda(8), &none, &DevicePerRank::Auto).unwrap()), 1);
        // one rank on this node (or a plain process): the usual --device / default, flag unused
        assert_eq!(place(&World::single(), &cuda(4), &none, &list(&[3])).unwrap(), Placement::Default);
        assert_eq!(place(&ranks(0, 1), &cuda(4), &none, &DevicePerRank::Auto).unwrap(), Placement::Default);
    }

    #[test]
    fn cuda_visible_devices_position_is_the_device_index() {
        // the driver numbers visible devices by their position in the list, indices or UUIDs
        let e = env(&[("CUDA_VISIBLE_DEVICES", "2,3,GPU-8c1f0e2a,5")]);
        let p = place(&ranks(2, 4), &cuda(4), &e, &DevicePerRank::Auto).unwrap();
        assert_eq!(p.to_string(), "CUDA device 2 (local rank 2 of 4; CUDA_VISIBLE_DEVICES entry GPU-8c1f0e2a)");
        assert_eq!(visible_devices("2,3,GPU-8c1f0e2a,5"), ["2", "3", "GPU-8c1f0e2a", "5"]);
        assert_eq!(visible_devices("0,2,-1,1"), ["0", "2"]);
        assert!(visible_devices("").is_empty());
    }

    #[test]
    fn two_ranks_on_one_gpu_are_refused_with_what_to_change() {
        let e = place(&ranks(3, 4), &cuda(1), &env(&[]), &DevicePerRank::Auto).unwrap_err().to_string();
        assert_eq!(
            e,
            "local ranks 0 and 1 would both use CUDA device 0 (4 ranks per node, 1 visible device): \
             launch one rank per GPU, or set --device-per-rank / CUDA_VISIBLE_DEVICES"
        );
        // every local rank refuses, not only the ones that collide
        assert!(place(&ranks(0, 4), &cuda(1), &env(&[]), &DevicePerRank::Auto).is_err());
        // 4 ranks on 2 visible devices: 0 and 2 would share device 0; with CUDA_VISIBLE_DEVICES set
        // the message says how to declare per-rank lists
        let e = place(&ranks(1, 4), &cuda(2), &env(&[("CUDA_VISIBLE_DEVICES", "4,5")]), &DevicePerRank::Auto).unwrap_err().to_string();
        assert!(e.starts_with("local ranks 0 and 2 would both use CUDA device 0 (4 ranks per node, 2 visible devices, CUDA_VISIBLE_DEVICES=4,5)"), "{e}");
        assert!(e.ends_with("say so with --device-per-rank 0,1,0,1"), "{e}");
        assert!(!e.contains('\n'));
    }

    #[test]
    fn device_per_rank_overrides_the_mapping() {
        let none = env(&[]);
        let p = place(&ranks(1, 4), &cuda(8), &none, &list(&[6, 4, 2, 0])).unwrap();
        assert_eq!(p.to_string(), "CUDA device 4 (--device-per-rank 6,4,2,0, local rank 1 of 4)");
        // entries beyond the local ranks are ignored
        assert_eq!(index(place(&ranks(1, 2), &cuda(8), &none, &list(&[3, 1, 1, 1])).unwrap()), 1);
        let e = place(&ranks(1, 4), &cuda(8), &none, &list(&[0, 1])).unwrap_err().to_string();
        assert_eq!(e, "--device-per-rank: 0,1 has 2 entries for 4 ranks on this node (Open MPI mpirun): give one device per local rank");
        let e = place(&ranks(0, 2), &cuda(2), &none, &list(&[0, 2])).unwrap_err().to_string();
        assert_eq!(e, "--device-per-rank: 0,2: local rank 1's CUDA device 2 does not exist here (2 CUDA devices visible; see wgpt info)");
        let e = place(&ranks(0, 3), &cuda(4), &none, &list(&[0, 1, 1])).unwrap_err().to_string();
        assert_eq!(e, "--device-per-rank: 0,1,1: local ranks 1 and 2 would both use CUDA device 1: give each local rank its own device");
        // with CUDA_VISIBLE_DEVICES each rank may have its own list: the explicit statement is trusted
        let cvd = env(&[("CUDA_VISIBLE_DEVICES", "0")]);
        assert_eq!(index(place(&ranks(3, 4), &cuda(1), &cvd, &list(&[0, 0, 0, 0])).unwrap()), 0);
    }

    #[test]
    fn slurm_per_task_gpu_binding_is_not_sharing() {
        // srun --gpus-per-task=1: each task sees only its own GPU as device 0
        let mut w = ranks(2, 4);
        w.launcher = Launcher::Slurm;
        let e = env(&[("CUDA_VISIBLE_DEVICES", "0"), ("SLURM_GPUS_PER_TASK", "1")]);
        let p = place(&w, &cuda(1), &e, &DevicePerRank::Auto).unwrap();
        assert_eq!(p.to_string(), "CUDA device 0 (local rank 2 of 4; Slurm binds GPUs per task; CUDA_VISIBLE_DEVICES entry 0)");
        let e = env(&[("CUDA_VISIBLE_DEVICES", "0,1"), ("SLURM_GPU_BIND", "verbose,per_task:2")]);
        assert_eq!(index(place(&w, &cuda(2), &e, &DevicePerRank::Auto).unwrap()), 0);
        // the same variables under mpirun say nothing about per-task lists: refused
        let e = env(&[("CUDA_VISIBLE_DEVICES", "0"), ("SLURM_GPUS_PER_TASK", "1")]);
        assert!(place(&ranks(2, 4), &cuda(1), &e, &DevicePerRank::Auto).is_err());
        // and Slurm without a per-task binding sharing one GPU: refused
        assert!(place(&w, &cuda(1), &env(&[("CUDA_VISIBLE_DEVICES", "0")]), &DevicePerRank::Auto).is_err());
    }

    #[test]
    fn cpu_ranks_share_nothing() {
        assert_eq!(place(&ranks(3, 4), &Devices::Cpu, &env(&[]), &DevicePerRank::Auto).unwrap(), Placement::Host);
        assert_eq!(place(&ranks(3, 4), &Devices::Cpu, &env(&[]), &list(&[0, 0, 0, 0])).unwrap(), Placement::Host);
        // no device of that kind at all: the backend's own "no driver" message comes later
        assert_eq!(place(&ranks(3, 4), &cuda(0), &env(&[]), &DevicePerRank::Auto).unwrap(), Placement::Default);
    }

    #[test]
    fn wgpu_ranks_go_to_the_usable_adapters() {
        let none = env(&[]);
        // adapters 0 (software), 1 and 2 (GPUs)
        let d = Devices::Wgpu { total: 3, usable: vec![1, 2] };
        assert_eq!(index(place(&ranks(1, 2), &d, &none, &DevicePerRank::Auto).unwrap()), 2);
        let e = place(&ranks(0, 3), &d, &none, &DevicePerRank::Auto).unwrap_err().to_string();
        assert!(e.starts_with("local ranks 0 and 2 would both use wgpu adapter 1 (3 ranks per node, 2 adapters"), "{e}");
        // CUDA_VISIBLE_DEVICES does not apply to wgpu: a duplicate list is refused
        let cvd = env(&[("CUDA_VISIBLE_DEVICES", "0")]);
        let e = place(&ranks(0, 2), &d, &cvd, &list(&[0, 0])).unwrap_err().to_string();
        assert_eq!(e, "--device-per-rank: 0,0: local ranks 0 and 1 would both use wgpu adapter 0: give each local rank its own device");
        assert_eq!(index(place(&ranks(1, 2), &d, &none, &list(&[2, 0])).unwrap()), 0);
    }

    #[test]
    fn device_per_rank_flag_parses() {
        assert_eq!(DevicePerRank::parse("auto"), Ok(DevicePerRank::Auto));
        assert_eq!(DevicePerRank::parse("0,1,2,3"), Ok(list(&[0, 1, 2, 3])));
        assert_eq!(DevicePerRank::parse(" 3, 1 "), Ok(list(&[3, 1])));
        for bad in ["", "a", "0,,1", "-1", "0;1"] {
            assert!(DevicePerRank::parse(bad).is_err(), "{bad:?}");
        }
        assert_eq!(DevicePerRank::Auto.to_string(), "auto");
        assert_eq!(list(&[0, 2]).to_string(), "0,2");
    }
}
