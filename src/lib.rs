pub mod atomic;
pub mod backend;
pub mod data;
pub mod error;
pub mod graph;
pub mod model;
pub mod rng;
pub mod train;
