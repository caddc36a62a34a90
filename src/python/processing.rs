//! `kvgen._kvgen.process_logits_native`: transformers' logits processors over a (batch, vocab) array,
//! the engine behind `kvgen.process_logits` (python/kvgen/processing.py).

use numpy::{PyArray1, PyArrayMethods, PyReadonlyArray2, PyUntypedArrayMethods};
use pyo3::prelude::*;
use rayon::prelude::*;

use super::errors::{guarded, IntoPyResult};
use crate::error::{Error, Result};
use crate::sampling::config::ProcessorConfig;
use crate::sampling::processors::{self, RowContext};

/// Processes `scores` (batch, vocab) float32 with the processors built from `config_json` (a
/// ProcessorConfig), `input_ids` (batch, seq) int64 as transformers' `input_ids` and
/// `ignore_prefix` (per row, the left padding repetition_penalty skips). Returns a new array.
#[pyfunction]
#[pyo3(signature = (scores, input_ids, config_json, ignore_prefix = None))]
pub fn process_logits_native<'py>(
    py: Python<'py>,
    scores: PyReadonlyArray2<'py, f32>,
    input_ids: PyReadonlyArray2<'py, i64>,
    config_json: &str,
    ignore_prefix: Option<Vec<usize>>,
) -> PyResult<Bound<'py, PyAny>> {
    let (batch, vocab) = (scores.shape()[0], scores.shape()[1]);
    let (id_rows, seq) = (input_ids.shape()[0], input_ids.shape()[1]);
    if id_rows != batch {
        return Err(Error::invalid(format!(
            "scores has {batch} rows but input_ids has {id_rows}: pass one input_ids row per scores row"
        )))
        .py();
    }
    if let Some(p) = &ignore_prefix {
        if p.len() != batch {
            return Err(Error::invalid(format!("ignore_prefix has {} entries for {batch} rows", p.len()))).py();
        }
    }
    let cfg: ProcessorConfig = serde_json::from_str(config_json)
        .map_err(|e| Error::invalid(format!("invalid processor settings: {e}")))
        .py()?;
    let list = processors::build(&cfg, vocab).py()?;
    let mut out: Vec<f32> = scores.as_array().iter().copied().collect();
    // Ids outside u32 (negative ones included) are no token: they never match a vocabulary id.
    let ids: Vec<u32> = input_ids
        .as_array()
        .iter()
        .map(|&t| if (0..u32::MAX as i64).contains(&t) { t as u32 } else { u32::MAX })
        .collect();
    let prefix = ignore_prefix.unwrap_or_else(|| vec![0; batch]);
    py.detach(|| {
        guarded(|| -> Result<()> {
            if vocab > 0 {
                out.par_chunks_mut(vocab).enumerate().for_each(|(r, row)| {
                    let ctx = RowContext { input_ids: &ids[r * seq..(r + 1) * seq], ignore_prefix: prefix[r] };
                    processors::apply(&list, &ctx, row);
                });
            }
            Ok(())
        })
    })
    .py()?;
    Ok(PyArray1::from_vec(py, out).reshape([batch, vocab])?.into_any())
}

/// The transformers class names of the processors `config_json` builds before the warpers, in
/// order: what a user `logits_processor` list is merged with (python/kvgen/_hooks.py).
#[pyfunction]
pub fn builtin_processor_names(config_json: &str, vocab_size: usize) -> PyResult<Vec<&'static str>> {
    let cfg: ProcessorConfig = serde_json::from_str(config_json)
        .map_err(|e| Error::invalid(format!("invalid processor settings: {e}")))
        .py()?;
    Ok(processors::build_split(&cfg, vocab_size).py()?.pre.into_iter().map(|(name, _)| name).collect())
}

pub fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_function(wrap_pyfunction!(process_logits_native, m)?)?;
    m.add_function(wrap_pyfunction!(builtin_processor_names, m)?)
}
