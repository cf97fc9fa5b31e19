//! `wgpt info` and `wgpt kernels`: what is available here and why an absent backend is absent,
//! and which rank of which launcher this process is.

use crate::backend::{cuda, wgpu};
use crate::error::Result;

pub fn report() -> String {
    let mut s = String::new();
    let threads = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1);
    s += &format!("cpu: available ({threads} threads)\n");
    let adapters = wgpu::list_adapters();
    if adapters.is_empty() {
        s += "wgpu: no adapter found (no Vulkan/Metal/DX12/GL driver; on Linux install your GPU's Vulkan driver, or mesa-vulkan-drivers for the software one)\n";
    } else {
        s += &format!("wgpu: {} adapter(s); --backend auto uses {}\n", adapters.len(), match wgpu::best_hardware_adapter() {
            Some(i) => format!("--device {i}"),
            None => "none of them (software only: the cpu backend is faster)".to_string(),
        });
        for a in &adapters {
            s += &format!(
                "  --device {}: {} ({}, {}, driver {}) | max binding {} MiB, max buffer {} MiB, workgroup storage {} KiB | f16 {} | subgroups {}\n",
                a.index,
                a.name,
                a.backend,
                a.device_type,
                if a.driver.is_empty() { "?" } else { &a.driver },
                a.max_storage_buffer_binding_size >> 20,
                a.max_buffer_size >> 20,
                a.max_compute_workgroup_storage_size >> 10,
                if a.f16 { "yes" } else { "no" },
                if a.subgroup { format!("yes ({}..{})", a.subgroup_sizes.0, a.subgroup_sizes.1) } else { "no".into() },
            );
        }
    }
    let cuda = cuda::probe();
    s += &format!("{cuda}");
    if !s.ends_with('\n') {
        s.push('\n');
    }
    // the launcher and this process's rank (and, with several ranks, the device it would take)
    s += &crate::dist::report(cuda.devices.len(), &adapters);
    s
}

/// `wgpt kernels --cuda --arch ...`: compile every cuda/*.cu with NVRTC, one line per file and
/// arch, after a line naming the NVRTC used.
pub fn compile_cuda(archs: &[String]) -> Result<()> {
    let reports = cuda::compile_all(archs)?;
    if let Ok(d) = cuda::compile::nvrtc_description() {
        println!("nvrtc: {d}");
    }
    for r in reports {
        println!("{r}");
    }
    Ok(())
}
