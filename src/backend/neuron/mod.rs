//! The Neuron path: kvgen records the family forward of `model/` as XLA HLO graphs (`record`,
//! `hlo`), one per (phase, batch, bucket), exports them with a manifest (`export`, `manifest`) for
//! neuronx-cc, and runs them (`backend`) through an executor (`executor`): libnrt on NeuronCores
//! (`nrt`) or XLA's CPU backend on the same graph bytes (`xla_cpu`).

pub mod backend;
pub mod executor;
pub mod export;
pub mod hlo;
pub mod manifest;
pub mod nrt;
pub mod record;
pub mod xla_cpu;
