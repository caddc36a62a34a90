//! Python bindings (pyo3): the only place that knows about Python.

pub mod engine;
pub mod errors;
pub mod gguf;
pub mod hooks;
pub mod neuron;
pub mod neuron_nrt;
pub mod processing;
pub mod request;
pub mod tokenizer;

use pyo3::prelude::*;

#[pymodule]
fn _kvgen(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add("__version__", env!("CARGO_PKG_VERSION"))?;
    // Whether this build links libtorch (the `torch` feature): tests and the Python package ask.
    m.add("HAS_TORCH", cfg!(feature = "torch"))?;
    #[cfg(feature = "torch")]
    m.add("CUDA_GRAPHS", crate::backend::torch::cuda_graphs_built())?;
    #[cfg(not(feature = "torch"))]
    m.add("CUDA_GRAPHS", false)?;
    engine::register(m)?;
    tokenizer::register(m)?;
    processing::register(m)?;
    gguf::register(m)?;
    neuron::register(m)?;
    neuron_nrt::register(m)?;
    Ok(())
}
