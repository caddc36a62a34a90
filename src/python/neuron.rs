//! The Neuron path's Python surface: `device="neuron"` options, `kvgen.neuron.export`'s native
//! half, and a test hook for the pinned self-check graph.

use std::path::PathBuf;

use pyo3::prelude::*;
use pyo3::types::PyBytes;

use super::errors::{guarded, to_py, IntoPyResult as _};
use crate::backend::neuron::backend::NeuronOptions;
use crate::backend::neuron::executor::ExecutorKind;
use crate::backend::neuron::export::SetOptions;
use crate::backend::neuron::manifest::ElemType;
use crate::error::Result;

/// (executor, neuron_dir, batch_sizes, buckets, max_context, xla worker command), as
/// `Generator.from_pretrained` validated them.
pub type NeuronArgs = (String, Option<String>, Vec<usize>, Option<Vec<usize>>, Option<usize>, Vec<String>);

pub fn neuron_options(args: Option<NeuronArgs>, tp_degree: usize) -> Result<NeuronOptions> {
    let (executor, dir, batch_sizes, buckets, max_context, xla_worker) =
        args.unwrap_or_else(|| ("nrt".into(), None, vec![1], None, None, vec![]));
    Ok(NeuronOptions {
        executor: ExecutorKind::parse(&executor)?,
        dir: dir.map(PathBuf::from),
        set: SetOptions { tp_degree, batch_sizes, buckets, max_context, dtype: ElemType::Bfloat16 },
        xla_worker,
    })
}

/// `_hlo_selfcheck_graph(n, k, m, rows) -> bytes`: see `backend::neuron::hlo::builder::selfcheck_graph`.
#[pyfunction]
fn _hlo_selfcheck_graph(py: Python<'_>, n: i64, k: i64, m: i64, rows: i64) -> PyResult<Bound<'_, PyBytes>> {
    let bytes = crate::backend::neuron::hlo::builder::selfcheck_graph(n, k, m, rows).map_err(to_py)?;
    Ok(PyBytes::new(py, &bytes))
}

/// `_neuron_export(model, out_dir, tp_degree, batch_sizes, buckets, max_context, dtype) -> str`:
/// records the graph set and writes it with manifest.json; returns the manifest's path.
#[pyfunction]
#[pyo3(signature = (model, out_dir, tp_degree, batch_sizes, buckets, max_context, dtype))]
fn _neuron_export(
    py: Python<'_>,
    model: String,
    out_dir: String,
    tp_degree: usize,
    batch_sizes: Vec<usize>,
    buckets: Option<Vec<usize>>,
    max_context: Option<usize>,
    dtype: String,
) -> PyResult<String> {
    let set = SetOptions { tp_degree, batch_sizes, buckets, max_context, dtype: ElemType::Bfloat16 };
    let path = py
        .detach(|| guarded(|| crate::engine::neuron_export(&model, std::path::Path::new(&out_dir), &dtype, &set, &mut |_, _| {})))
        .py()?;
    Ok(path.to_string_lossy().into_owned())
}

pub fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_function(wrap_pyfunction!(_hlo_selfcheck_graph, m)?)?;
    m.add_function(wrap_pyfunction!(_neuron_export, m)?)
}
