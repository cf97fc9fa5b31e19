//! `wgpt info` and `wgpt kernels`: what is available here and why an absent backend is absent.

use crate::error::Result;

pub fn report() -> String {
    let mut s = String::new();
    let threads = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1);
    s += &format!("cpu: available ({threads} threads)\n");
    s += "wgpu: (not built yet)\n";
    s += "cuda: (not built yet)\n";
    s
}

pub fn compile_cuda(_archs: &[String]) -> Result<()> {
    Err(crate::error::Error::Unavailable("the CUDA kernels are not built yet".into()))
}
