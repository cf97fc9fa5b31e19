//! CPU kernels (written by the cpu-kernels work).
