//! `kvgen._kvgen.Engine`: the loaded model as seen from Python. The HF-compatible surface
//! (kwargs, GenerationConfig merging, return kinds) lives in python/kvgen/generator.py.

use std::sync::Arc;

use numpy::{PyArray1, PyArrayMethods, PyReadonlyArray2, PyUntypedArrayMethods};
use pyo3::prelude::*;

use super::errors::{guarded, to_py, IntoPyResult};
use super::tokenizer::PyTokenizer;
use crate::backend::{SeqInput, SlotGuard};
use crate::engine::Engine;
use crate::error::{Error, Result};
use crate::generation::{self, GenerationParams, Prompt, StepObserver};
use crate::sampling::config::ProcessorConfig;

/// (new tokens, per-step scores, per-step raw logits) as numpy arrays.
type GenerateResult<'py> = (Bound<'py, PyAny>, Vec<Bound<'py, PyAny>>, Vec<Bound<'py, PyAny>>);

#[pyclass(name = "Engine", module = "kvgen._kvgen", frozen)]
pub struct PyEngine {
    inner: Arc<Engine>,
}

/// Streams tokens to a Python callback and turns Ctrl-C into an interruption, holding the GIL
/// only for the moment of each call.
struct PyObserver {
    callback: Option<Py<PyAny>>,
    error: Option<PyErr>,
}

impl PyObserver {
    fn signals(&mut self, py: Python<'_>) -> Result<()> {
        py.check_signals().map_err(|e| {
            self.error = Some(e);
            Error::Interrupted
        })
    }
}

impl StepObserver for PyObserver {
    fn on_step(&mut self, tokens: &[u32]) -> Result<()> {
        Python::attach(|py| {
            self.signals(py)?;
            if let Some(cb) = &self.callback {
                if let Err(e) = cb.call1(py, (tokens.to_vec(),)) {
                    let msg = e.to_string();
                    self.error = Some(e);
                    return Err(Error::Callback(msg));
                }
            }
            Ok(())
        })
    }

    fn check_interrupt(&mut self) -> Result<()> {
        Python::attach(|py| self.signals(py))
    }
}

/// Rows of a padded (batch, seq) id matrix, with their masks, compacted and validated.
fn prompts_from(
    ids: &PyReadonlyArray2<i64>,
    mask: &Option<PyReadonlyArray2<i64>>,
    vocab: usize,
) -> PyResult<(Vec<Prompt>, Vec<Vec<bool>>)> {
    let ids = ids.as_array();
    let mask = mask.as_ref().map(|m| m.as_array());
    if let Some(m) = &mask {
        if m.shape() != ids.shape() {
            return Err(to_py(Error::invalid(format!(
                "attention_mask has shape {:?} but input_ids has shape {:?}; they must match",
                m.shape(),
                ids.shape()
            ))));
        }
    }
    let mut prompts = Vec::with_capacity(ids.nrows());
    let mut valid = Vec::with_capacity(ids.nrows());
    for (r, row) in ids.rows().into_iter().enumerate() {
        let row: Vec<i64> = row.to_vec();
        let m: Option<Vec<i64>> = mask.as_ref().map(|m| m.row(r).to_vec());
        valid.push(match &m {
            Some(m) => m.iter().map(|&x| x != 0).collect(),
            None => vec![true; row.len()],
        });
        prompts.push(generation::prompt_from_row(&row, m.as_deref(), r, vocab).py()?);
    }
    Ok((prompts, valid))
}

fn matrix<'py>(py: Python<'py>, flat: Vec<f32>, rows: usize, cols: usize) -> PyResult<Bound<'py, PyAny>> {
    Ok(PyArray1::from_vec(py, flat).reshape([rows, cols])?.into_any())
}

#[pymethods]
impl PyEngine {
    #[staticmethod]
    #[pyo3(signature = (model, device = "cpu".to_string(), dtype = "auto".to_string(), progress = None, backend = "auto".to_string()))]
    fn load(
        py: Python<'_>,
        model: String,
        device: String,
        dtype: String,
        progress: Option<Py<PyAny>>,
        backend: String,
    ) -> PyResult<Self> {
        let mut report = |done: usize, total: usize| {
            if let Some(cb) = &progress {
                // A failing progress display must not fail the load.
                Python::attach(|py| {
                    let _ = cb.call1(py, (done, total));
                });
            }
        };
        let engine = py.detach(|| guarded(|| Engine::load_on(&model, &device, &backend, &dtype, &mut report))).py()?;
        Ok(PyEngine { inner: Arc::new(engine) })
    }

    #[getter]
    fn config_json(&self) -> String {
        self.inner.config.raw.to_string()
    }

    #[getter]
    fn generation_config_json(&self) -> String {
        self.inner.generation_config.to_string()
    }

    #[getter]
    fn tokenizer(&self) -> Option<PyTokenizer> {
        self.inner.tokenizer.as_ref().map(|t| PyTokenizer { inner: Arc::clone(t) })
    }

    #[getter]
    fn vocab_size(&self) -> usize {
        self.inner.config.vocab_size
    }

    #[getter]
    fn dtype(&self) -> &'static str {
        self.inner.dtype.name()
    }

    #[getter]
    fn model_path(&self) -> String {
        self.inner.model_path.display().to_string()
    }

    /// Generation over a padded id matrix. Returns (new_tokens (batch, steps) int64,
    /// scores list of (batch, vocab) float32, logits list of the same).
    #[pyo3(signature = (input_ids, attention_mask, *, max_new_tokens, processor_config_json,
        eos_token_ids = Vec::new(), pad_token_id = None, stop_strings = Vec::new(), output_scores = false,
        output_logits = false, seeds = Vec::new(), on_step = None))]
    #[allow(clippy::too_many_arguments)]
    fn generate<'py>(
        &self,
        py: Python<'py>,
        input_ids: PyReadonlyArray2<'py, i64>,
        attention_mask: Option<PyReadonlyArray2<'py, i64>>,
        max_new_tokens: usize,
        processor_config_json: &str,
        eos_token_ids: Vec<i64>,
        pad_token_id: Option<i64>,
        stop_strings: Vec<String>,
        output_scores: bool,
        output_logits: bool,
        seeds: Vec<(u64, u64)>,
        on_step: Option<Py<PyAny>>,
    ) -> PyResult<GenerateResult<'py>> {
        let vocab = self.inner.config.vocab_size;
        let (prompts, _) = prompts_from(&input_ids, &attention_mask, vocab)?;
        let longest = prompts.iter().map(|p| p.tokens.len()).max().unwrap_or(0);
        self.inner.check_context(longest, max_new_tokens).py()?;
        let check_id = |what: &str, id: i64| -> PyResult<u32> {
            if id < 0 || id as u64 >= vocab as u64 {
                return Err(to_py(Error::invalid(format!(
                    "{what}={id} is out of range: the model's vocabulary has {vocab} ids (0..={}); pass an id below {vocab}",
                    vocab.saturating_sub(1)
                ))));
            }
            Ok(id as u32)
        };
        let processors: ProcessorConfig = serde_json::from_str(processor_config_json)
            .map_err(|e| to_py(Error::invalid(format!("invalid generation settings: {e}"))))?;
        let params = GenerationParams {
            max_new_tokens,
            processors,
            eos_token_ids: eos_token_ids.iter().map(|&i| check_id("eos_token_id", i)).collect::<PyResult<_>>()?,
            pad_token_id: pad_token_id.map(|i| check_id("pad_token_id", i)).transpose()?,
            stop_strings,
            output_scores,
            output_logits,
            seeds,
        };
        let engine = Arc::clone(&self.inner);
        let mut observer = PyObserver { callback: on_step, error: None };
        let result = py.detach(|| {
            guarded(|| {
                let tok = engine.tokenizer.clone();
                let decode = tok.as_ref().map(|t| {
                    let t = Arc::clone(t);
                    Box::new(move |ids: &[u32]| t.decode(ids, false)) as Box<generation::stopping::DecodeFn>
                });
                generation::generate(engine.backend.as_ref(), &prompts, &params, decode.as_deref(), &mut observer)
            })
        });
        if let Some(e) = observer.error.take() {
            return Err(e);
        }
        let out = result.py()?;
        let batch = prompts.len();
        let steps = out.tokens.first().map_or(0, Vec::len);
        let flat: Vec<i64> = out.tokens.iter().flat_map(|r| r.iter().map(|&t| t as i64)).collect();
        let tokens = PyArray1::from_vec(py, flat).reshape([batch, steps])?.into_any();
        let scores = out.scores.into_iter().map(|s| matrix(py, s, batch, vocab)).collect::<PyResult<_>>()?;
        let logits = out.logits.into_iter().map(|s| matrix(py, s, batch, vocab)).collect::<PyResult<_>>()?;
        Ok((tokens, scores, logits))
    }

    /// Full forward: float32 (batch, seq, vocab) logits; masked-out positions are 0.
    #[pyo3(signature = (input_ids, attention_mask = None))]
    fn logits<'py>(
        &self,
        py: Python<'py>,
        input_ids: PyReadonlyArray2<'py, i64>,
        attention_mask: Option<PyReadonlyArray2<'py, i64>>,
    ) -> PyResult<Bound<'py, PyAny>> {
        let vocab = self.inner.config.vocab_size;
        let (batch, seq) = (input_ids.shape()[0], input_ids.shape()[1]);
        let (prompts, valid) = prompts_from(&input_ids, &attention_mask, vocab)?;
        let engine = Arc::clone(&self.inner);
        let out = py
            .detach(|| guarded(|| -> Result<Vec<f32>> {
                let backend = engine.backend.as_ref();
                let slots =
                    prompts.iter().map(|p| SlotGuard::new(backend, p.tokens.len())).collect::<Result<Vec<_>>>()?;
                let seqs: Vec<SeqInput> = prompts
                    .iter()
                    .zip(&slots)
                    .map(|(p, s)| SeqInput { slot: s.slot, tokens: &p.tokens, start_pos: 0 })
                    .collect();
                let packed = backend.step(&seqs, true)?;
                let mut full = vec![0f32; batch * seq * vocab];
                let mut src = 0;
                for (r, mask) in valid.iter().enumerate() {
                    for (c, _) in mask.iter().enumerate().filter(|(_, &v)| v) {
                        let dst = (r * seq + c) * vocab;
                        full[dst..dst + vocab].copy_from_slice(&packed[src * vocab..(src + 1) * vocab]);
                        src += 1;
                    }
                }
                Ok(full)
            }))
            .py()?;
        Ok(PyArray1::from_vec(py, out).reshape([batch, seq, vocab])?.into_any())
    }
}

/// Panics on purpose inside the guard, so tests can prove no panic crosses into Python.
#[pyfunction]
fn _debug_panic(py: Python<'_>) -> PyResult<()> {
    py.detach(|| guarded(|| -> Result<()> { panic!("deliberate panic for kvgen's tests") })).py()
}

pub fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<PyEngine>()?;
    m.add_function(wrap_pyfunction!(_debug_panic, m)?)
}
