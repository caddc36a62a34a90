//! Test hook for the Neuron HLO emitter: a small module's serialized bytes, so
//! tests/test_neuron_hlo.py can run them on XLA:CPU with two replicas.

use pyo3::prelude::*;
use pyo3::types::PyBytes;

use super::errors::to_py;

/// `_hlo_selfcheck_graph(n, k, m, rows) -> bytes`: see `backend::neuron::hlo::builder::selfcheck_graph`.
#[pyfunction]
fn _hlo_selfcheck_graph(py: Python<'_>, n: i64, k: i64, m: i64, rows: i64) -> PyResult<Bound<'_, PyBytes>> {
    let bytes = crate::backend::neuron::hlo::builder::selfcheck_graph(n, k, m, rows).map_err(to_py)?;
    Ok(PyBytes::new(py, &bytes))
}

pub fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_function(wrap_pyfunction!(_hlo_selfcheck_graph, m)?)
}
