//! The wgpu backend: WGSL compute shaders (`shaders/`) through wgpu on Vulkan, Metal, DX12 or GL.
pub mod shaders;
