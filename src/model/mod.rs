//! Model definitions, written once per architecture family.

pub mod llama;
pub mod rope;
