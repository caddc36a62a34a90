//! Model definitions, written once per architecture family over the op interface (`ops`), and
//! the tensor-parallel plan (`tp`) that shards them. Nothing here imports a backend.

pub mod host;
pub mod llama;
pub mod ops;
pub mod rope;
pub mod tp;
