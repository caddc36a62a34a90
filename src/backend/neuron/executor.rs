//! The seam between kvgen's Neuron orchestration (buckets, padding, positions, cache slots, the
//! scheduler; `backend.rs`) and what runs a graph: libnrt on NeuronCores (`nrt`), or XLA's CPU
//! backend running the very same `.hlo.pb` bytes with one host device per rank (`xla_cpu`).
//!
//! Contract, for every executor:
//! - `put` creates a persistent tensor on one rank (a weight shard or table with its bytes, or a
//!   KV cache, zero-filled when `data` is None). Every persistent tensor is put before the first
//!   `run`, each once per rank.
//! - `load` readies every graph of the manifest on every rank (a NEFF per graph per rank for nrt).
//! - `run(graph, inputs)` executes graph on every rank together (a collective needs all ranks in
//!   flight): `inputs[rank]` holds the bytes of the graph's `Role::Step` inputs in graph order;
//!   persistent inputs are bound by name; cache outputs update their caches in place. It returns,
//!   per rank, the bytes of each output that aliases nothing (the rank's logits), in graph order.
//! - A failed `run` leaves the executor usable (the caches may hold garbage for the rows of that
//!   step; the caller fails those sequences).

use std::path::Path;

use super::manifest::{Manifest, TensorSpec};
use crate::error::Result;

/// Which executor `device="neuron"` uses.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ExecutorKind {
    /// libnrt on NeuronCores (the default; needs compiled NEFFs).
    Nrt,
    /// XLA:CPU through jaxlib in a worker process (needs only the `.hlo.pb` graphs).
    XlaCpu,
}

impl ExecutorKind {
    pub fn parse(name: &str) -> Result<Self> {
        match name {
            "nrt" => Ok(ExecutorKind::Nrt),
            "xla-cpu" | "xla_cpu" => Ok(ExecutorKind::XlaCpu),
            other => Err(crate::error::Error::invalid(format!(
                "neuron_executor={other:?} is not a Neuron executor; use \"nrt\" (NeuronCores through libnrt) or \
                 \"xla-cpu\" (the same graphs on XLA's CPU backend, for tests)"
            ))),
        }
    }
}

pub trait Executor: Send {
    /// Ranks this executor runs (the manifest's tp_degree).
    fn ranks(&self) -> usize;
    fn put(&mut self, rank: usize, spec: &TensorSpec, data: Option<&[u8]>) -> Result<()>;
    /// `dir` holds the manifest and the files it names.
    fn load(&mut self, manifest: &Manifest, dir: &Path) -> Result<()>;
    fn run(&mut self, graph: &str, inputs: &[Vec<Vec<u8>>]) -> Result<Vec<Vec<Vec<u8>>>>;
    /// A persistent tensor's current bytes on `rank` (tests read the caches back).
    fn fetch(&mut self, rank: usize, name: &str) -> Result<Vec<u8>> {
        Err(crate::error::Error::invalid(format!("this executor cannot read tensor {name:?} of rank {rank} back")))
    }
}
