//! The libnrt executor: kvgen's graphs, compiled to NEFFs, run on NeuronCores through the Neuron
//! runtime's C API, opened at run time (`ffi`), with kvgen's own status table (`status`), owning
//! handle wrappers (`handles`), the process-wide init/close (`runtime`), the NEFF-vs-manifest
//! check (`plan`) and one thread per rank (`workers`).
//! `tests/nrt_double` is a stand-in libnrt that checks the call contracts without a device.

pub mod executor;
pub mod ffi;
pub mod handles;
pub mod plan;
pub mod runtime;
pub mod status;
mod workers;

pub use executor::NrtExecutor;
