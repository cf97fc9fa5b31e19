//! The cpu backend: executes launches with the plain kernels of `kernels.rs`.
pub mod kernels;
