//! The wgpu backend (in progress).
