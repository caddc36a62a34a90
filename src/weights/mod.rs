//! Checkpoint reading. The only module that spells tensor names (see `names`).

pub mod gguf;
pub mod llama;
pub mod safetensors;

use crate::error::Result;
use crate::tensor::Tensor;

/// Anything that yields tensors by checkpoint name.
pub trait TensorSource {
    fn contains(&self, name: &str) -> bool;
    fn get(&self, name: &str) -> Result<Tensor>;
    /// The dtype most weights are stored in (for dtype="auto").
    fn dominant_dtype(&self) -> Option<crate::tensor::DType>;
}
