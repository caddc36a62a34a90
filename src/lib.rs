//! kvgen: LLM text generation in Rust, a drop-in for transformers' `generate()`.

pub mod backend;
pub mod config;
pub mod engine;
pub mod error;
pub mod faults;
pub mod generation;
pub mod mem;
pub mod model;
pub mod resolve;
pub mod sampling;
pub mod scheduler;
pub mod tensor;
pub mod tokenizer;
pub mod weights;

#[cfg(feature = "python")]
pub mod python;

pub use error::{Error, Result};
