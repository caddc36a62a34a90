//! Checkpoint reading. The only module that spells tensor names (see `names`).

pub mod gguf;
pub mod llama;
pub mod safetensors;

use std::path::PathBuf;

use crate::error::Result;
use crate::tensor::Tensor;

/// Anything that yields tensors by checkpoint name.
pub trait TensorSource {
    fn contains(&self, name: &str) -> bool;
    /// The stored shape (HF order), from the header alone: loaders check it against the config
    /// before `get` touches, copies or converts any data.
    fn shape(&self, name: &str) -> Result<Vec<usize>>;
    fn get(&self, name: &str) -> Result<Tensor>;
    /// The file holding `name` (or the checkpoint's first file), for error messages.
    fn path_of(&self, name: &str) -> PathBuf;
    /// The dtype most weights are stored in (for dtype="auto").
    fn dominant_dtype(&self) -> Option<crate::tensor::DType>;
    /// Every tensor name (for reporting what a loader leaves unread); empty where unknown.
    fn names(&self) -> Vec<String> {
        Vec::new()
    }
}
