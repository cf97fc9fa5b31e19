//! Several devices, one job (data-parallel training; the loop itself is `train::run_rank`):
//! - `world`: which rank this process is, whichever launcher started it, and which device its
//!   local rank uses (pure: environment maps in, values out);
//! - `mpi`: the site's MPI, loaded at run time, which joins processes;
//! - `nccl`: NCCL, loaded at run time, which sums CUDA ranks' gradients on the GPUs;
//! - `rendezvous` and `nccl_world`: CUDA ranks joined by NCCL alone, without MPI (`--dist-init`);
//! - `comm`: the collectives a rank uses, over MPI, over threads of one process, or none;
//! - `split`: how the global micro-batch is divided among ranks (`--batch-split`);
//! - `local`: `--devices`, several devices in one process, and the parameter checksum.
//!
//! This file adds the two things that look at the machine: the devices a backend would spread
//! ranks over, and `wgpt info`'s lines.

pub mod comm;
pub mod local;
pub mod mpi;
pub mod nccl;
pub mod nccl_world;
pub mod rendezvous;
pub mod split;
pub mod world;

pub use world::{env_map, place, visible_devices, DevicePerRank, Devices, Launcher, Placement, World};

use crate::backend::wgpu::AdapterReport;
use crate::backend::{cuda, wgpu, BackendKind};

/// The wgpu adapters that are real GPUs (what `--backend auto` takes), by `wgpt info` index.
pub fn hardware_adapters(adapters: &[AdapterReport]) -> Vec<usize> {
    adapters.iter().filter(|a| !matches!(a.device_type.as_str(), "Cpu" | "Other")).map(|a| a.index).collect()
}

/// The adapters to spread local ranks over: those of one API only, since one GPU shows up once
/// per API (Vulkan and GL, Vulkan and DX12) and two ranks would otherwise share it unnoticed.
/// The API is the first of Vulkan, Metal, DX12, GL that `candidates` has.
pub fn one_api(adapters: &[AdapterReport], candidates: &[usize]) -> Vec<usize> {
    const ORDER: [&str; 4] = ["Vulkan", "Metal", "Dx12", "Gl"];
    let rank = |i: usize| {
        let api = adapters.iter().find(|a| a.index == i).map_or("", |a| a.backend.as_str());
        ORDER.iter().position(|o| *o == api).unwrap_or(ORDER.len())
    };
    let Some(best) = candidates.iter().map(|&i| rank(i)).min() else {
        return Vec::new();
    };
    candidates.iter().copied().filter(|&i| rank(i) == best).collect()
}

/// What `--backend auto` would spread ranks over, given what was found: CUDA devices if the
/// driver shows any, else the hardware wgpu adapters (of one API), else the cpu.
pub fn auto_devices(cuda_visible: usize, adapters: &[AdapterReport]) -> Devices {
    if cuda_visible > 0 {
        return Devices::Cuda { visible: cuda_visible };
    }
    let usable = one_api(adapters, &hardware_adapters(adapters));
    if usable.is_empty() {
        Devices::Cpu
    } else {
        Devices::Wgpu { total: adapters.len(), usable }
    }
}

/// The devices `kind` would spread local ranks over, probed on this machine. An explicit
/// `--backend wgpu` spreads over software adapters too when there is no hardware one.
pub fn probe_devices(kind: BackendKind) -> Devices {
    match kind {
        BackendKind::Cpu => Devices::Cpu,
        BackendKind::Cuda => Devices::Cuda { visible: cuda::probe().devices.len() },
        BackendKind::Wgpu => {
            let adapters = wgpu::list_adapters();
            let hw = hardware_adapters(&adapters);
            let candidates = if hw.is_empty() { adapters.iter().map(|a| a.index).collect() } else { hw };
            Devices::Wgpu { total: adapters.len(), usable: one_api(&adapters, &candidates) }
        }
        BackendKind::Auto => auto_devices(cuda::probe().devices.len(), &wgpu::list_adapters()),
    }
}

/// `wgpt info`'s lines about the world: the launcher, the ranks and, in a world of several, the
/// device this rank would use with `--backend auto` (given what `wgpt info` found).
pub fn report(cuda_visible: usize, adapters: &[AdapterReport]) -> String {
    let env = env_map();
    let w = match World::from_env_map(&env) {
        Ok(w) => w,
        Err(e) => return format!("launcher: error: {e}\n"),
    };
    let mut s = match w.launcher {
        Launcher::None => "launcher: none (one process)".to_string(),
        l => format!("launcher: {l} ({})", w.from),
    };
    if let Some(why) = &w.ignored {
        s += &format!("; {why}");
    }
    s += &format!("\nworld: {w}\n");
    // the engines several ranks would use (nothing is initialised here)
    // the first MPI library that opens (dlopen only: MPI is not initialised)
    let found = mpi::candidates(&env).into_iter().find_map(|c| crate::dl::Lib::open(&c).ok().map(|l| l.file_of("MPI_Init").unwrap_or(c)));
    s += &match found {
        Some(p) => format!("MPI (joins several processes): {p}\n"),
        None => "MPI (joins several processes): none found ($WGPT_MPI_LIB, libmpi.so.40/.12, libmpi_abi.so.1 on $LD_LIBRARY_PATH, beside mpirun, on the loader's path)\n".into(),
    };
    s += &match nccl::Nccl::load(&env) {
        Ok(n) => format!("NCCL (sums CUDA ranks' gradients): {} ({})\n", n.version(), n.path()),
        Err(e) => format!("NCCL (sums CUDA ranks' gradients): {e}\n"),
    };
    if w.size > 1 {
        let devices = auto_devices(cuda_visible, adapters);
        match place(&w, &devices, &env, &DevicePerRank::Auto) {
            Ok(p) => s += &format!("rank device (--backend auto): {p}\n"),
            Err(e) => s += &format!("rank device (--backend auto): refused: {e}\n"),
        }
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    fn adapter(index: usize, backend: &str, device_type: &str) -> AdapterReport {
        AdapterReport {
            index,
            name: format!("gpu {index}"),
            backend: backend.into(),
            device_type: device_type.into(),
            driver: String::new(),
            max_storage_buffer_binding_size: 0,
            max_buffer_size: 0,
            max_compute_workgroup_storage_size: 0,
            f16: false,
            subgroup: false,
            subgroup_sizes: (0, 0),
        }
    }

    #[test]
    fn ranks_spread_over_one_api_and_auto_skips_software() {
        // two GPUs seen through Vulkan and GL, and lavapipe: ranks go to the two Vulkan GPUs
        let a = [
            adapter(0, "Gl", "DiscreteGpu"),
            adapter(1, "Vulkan", "DiscreteGpu"),
            adapter(2, "Vulkan", "Cpu"),
            adapter(3, "Vulkan", "DiscreteGpu"),
            adapter(4, "Gl", "DiscreteGpu"),
        ];
        assert_eq!(auto_devices(0, &a), Devices::Wgpu { total: 5, usable: vec![1, 3] });
        // CUDA first when the driver shows devices
        assert_eq!(auto_devices(2, &a), Devices::Cuda { visible: 2 });
        // software only (lavapipe through Vulkan and GL): auto uses the cpu; the Vulkan one otherwise
        let sw = [adapter(0, "Vulkan", "Cpu"), adapter(1, "Gl", "Cpu")];
        assert_eq!(auto_devices(0, &sw), Devices::Cpu);
        assert_eq!(one_api(&sw, &[0, 1]), vec![0]);
        assert!(one_api(&sw, &[]).is_empty());
    }
}
