//! GPT-2 model definition: configuration, parameter layout, initialisation, llm.c checkpoints,
//! Hugging Face GPT-2 conversion.

pub mod checkpoint;
pub mod config;
pub mod debug_state;
pub mod hf;
pub mod init;
pub mod params;

pub use config::Config;
pub use params::{ParamLayout, NUM_PARAM_TENSORS, PARAM_NAMES};
