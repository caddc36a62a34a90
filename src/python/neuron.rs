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
#[allow(clippy::too_many_arguments)]
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

/// A graph's interface as its bytes state it: entry parameters (number, NEFF name, element
/// type, dims), the root's NEFF output names, and (output, parameter) must-alias pairs.
type GraphIo = (Vec<(i64, String, i32, Vec<i64>)>, Vec<String>, Vec<(i64, i64, i32)>);

/// `_hlo_graph_io(pb) -> (params, output_names, aliases)`: decodes a serialized HloModuleProto,
/// so tests check manifest.json against the graph itself.
#[pyfunction]
fn _hlo_graph_io(pb: &[u8]) -> PyResult<GraphIo> {
    use crate::backend::neuron::hlo::proto::HloModuleProto;
    use prost::Message;
    let bad = |m: String| to_py(crate::error::Error::invalid(m));
    let module = HloModuleProto::decode(pb).map_err(|e| bad(format!("not an HloModuleProto: {e}")))?;
    let entry = module
        .computations
        .iter()
        .find(|c| c.id == module.entry_computation_id)
        .ok_or_else(|| bad("no entry computation".into()))?;
    let attr = |i: &crate::backend::neuron::hlo::proto::HloInstructionProto, k: &str| {
        i.frontend_attributes.as_ref().and_then(|f| f.map.get(k).cloned()).unwrap_or_default()
    };
    let mut params: Vec<_> = entry
        .instructions
        .iter()
        .filter(|i| i.opcode == "parameter")
        .map(|i| {
            let s = i.shape.clone().unwrap_or_default();
            (i.parameter_number, attr(i, "neff_input_names"), s.element_type, s.dimensions)
        })
        .collect();
    params.sort_by_key(|p| p.0);
    let root = entry.instructions.iter().find(|i| i.id == entry.root_id).ok_or_else(|| bad("no root".into()))?;
    let names = attr(root, "neff_output_names").split(',').filter(|s| !s.is_empty()).map(String::from).collect();
    let aliases = module
        .input_output_alias
        .map(|a| a.entries.iter().map(|e| (e.output_shape_index.first().copied().unwrap_or(-1), e.parameter_number, e.kind)).collect())
        .unwrap_or_default();
    Ok((params, names, aliases))
}

pub fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_function(wrap_pyfunction!(_hlo_selfcheck_graph, m)?)?;
    m.add_function(wrap_pyfunction!(_hlo_graph_io, m)?)?;
    m.add_function(wrap_pyfunction!(_neuron_export, m)?)
}
