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
    m.add_function(wrap_pyfunction!(_hlo_selfcheck_graph, m)?)?;
    m.add_function(wrap_pyfunction!(_hlo_record_step, m)?)
}

/// `_hlo_record_step(model_dir, tp_degree, tokens, start_pos, cache_len) ->
/// [(module bytes, [(name, dims, "f32"|"s32", data bytes)])]`, one entry per rank: the family
/// forward recorded as each rank's graph for this step shape, with this step's input values.
#[pyfunction]
fn _hlo_record_step(
    py: Python<'_>,
    model_dir: String,
    tp_degree: usize,
    tokens: Vec<u32>,
    start_pos: usize,
    cache_len: usize,
) -> PyResult<Vec<RankGraph>> {
    use crate::backend::neuron::record::record_step;
    let ranks = py
        .detach(|| -> crate::error::Result<_> {
            let dir = std::path::Path::new(&model_dir);
            let cfg = crate::config::ModelConfig::from_file(&dir.join("config.json"))?;
            let plan = crate::model::tp::TpPlan::new(&cfg, tp_degree)?;
            let src = crate::weights::safetensors::SafetensorsSource::open_dir(dir)?;
            let weights = crate::weights::llama::load(&src, &cfg, crate::tensor::DType::F32, &mut |_, _| {})?;
            record_step(&cfg, &plan.shapes, plan.shard(&cfg, weights)?, &tokens, start_pos, cache_len)
        })
        .map_err(to_py)?;
    Ok(ranks
        .into_iter()
        .map(|r| {
            let inputs = r
                .bindings
                .into_iter()
                .map(|b| {
                    let (kind, data) = match (b.f32s, b.s32s) {
                        (Some(v), _) => ("f32", v.iter().flat_map(|x| x.to_le_bytes()).collect()),
                        (None, Some(v)) => ("s32", v.iter().flat_map(|x| x.to_le_bytes()).collect()),
                        (None, None) => ("f32", Vec::new()),
                    };
                    (b.name, b.dims, kind.to_string(), data)
                })
                .collect();
            (r.module, inputs)
        })
        .collect())
}

type RankGraph = (Vec<u8>, Vec<(String, Vec<i64>, String, Vec<u8>)>);
