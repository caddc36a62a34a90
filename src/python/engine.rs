//! `kvgen._kvgen.Engine`: the loaded model as seen from Python. The HF-compatible surface
//! (kwargs, GenerationConfig merging, return kinds) lives in python/kvgen/generator.py.

use std::sync::{Arc, OnceLock};

use numpy::{PyArray1, PyArrayMethods, PyReadonlyArray2, PyUntypedArrayMethods};
use pyo3::prelude::*;
use pyo3::types::PyDict;

use super::errors::{guarded, to_py, IntoPyResult};
use super::hooks::{HookError, PyHooks};
use super::request::{GenerateResult, PyDoorbell, PyRequest};
use super::tokenizer::PyTokenizer;
use crate::backend::{SeqInput, SlotGuard};
use crate::config::RopeScaling;
use crate::engine::Engine;
use crate::error::{Error, Result};
use crate::generation::{self, GenerationParams, Prompt, Request};
use crate::sampling::config::ProcessorConfig;
use crate::scheduler::{Limits, Scheduler};

#[pyclass(name = "Engine", module = "kvgen._kvgen", frozen)]
pub struct PyEngine {
    inner: Arc<Engine>,
    /// Owns the step loop of every generate call on this engine.
    scheduler: OnceLock<Scheduler>,
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


/// Default cache budget for the scheduler's memory bound, in bytes of f32 KV cache.
const DEFAULT_CACHE_BYTES: usize = 4 << 30;

impl PyEngine {
    pub fn new(engine: Engine) -> Self {
        PyEngine { inner: Arc::new(engine), scheduler: OnceLock::new() }
    }

    /// The engine's scheduler, started on first use.
    fn scheduler(&self) -> PyResult<&Scheduler> {
        if self.scheduler.get().is_none() {
            let limits = Limits {
                max_cache_positions: (DEFAULT_CACHE_BYTES / self.cache_bytes_per_token().max(1)).max(1),
                ..Limits::default()
            };
            // Dynamic NTK RoPE makes a step's arithmetic depend on its longest sequence.
            let isolate = matches!(self.inner.config.rope_scaling, RopeScaling::Dynamic { .. });
            let started = Scheduler::start(Arc::clone(&self.inner.backend), limits, isolate).py()?;
            // Two threads may race here; the loser's scheduler is dropped (its thread joined).
            let _ = self.scheduler.set(started);
        }
        self.scheduler.get().ok_or_else(|| to_py(Error::Internal("the scheduler did not start".into())))
    }

    /// Refuses image placeholders in the attended ids (`Engine::check_text_only`), before the
    /// id range check so that the message says what the id is.
    fn check_text_only(&self, ids: &PyReadonlyArray2<i64>, mask: &Option<PyReadonlyArray2<i64>>) -> PyResult<()> {
        if self.inner.config.vision_language.is_none() {
            return Ok(()); // text checkpoints: nothing to refuse, no row copies
        }
        let ids = ids.as_array();
        let mask = mask.as_ref().map(|m| m.as_array());
        for (r, row) in ids.rows().into_iter().enumerate() {
            let m = mask.as_ref().filter(|m| m.shape() == ids.shape()).map(|m| m.row(r).to_vec());
            self.inner.check_text_only(r, &row.to_vec(), m.as_deref()).py()?;
        }
        Ok(())
    }

    /// Bytes of key and value cache per sequence position on this engine's backend.
    fn cache_bytes_per_token(&self) -> usize {
        self.inner.backend.cache_bytes_per_position()
    }

    /// Validates a generate call's arguments into a request; also returns its batch size.
    #[allow(clippy::too_many_arguments)]
    fn request(
        &self,
        input_ids: &PyReadonlyArray2<i64>,
        attention_mask: &Option<PyReadonlyArray2<i64>>,
        max_new_tokens: usize,
        processor_config_json: &str,
        eos_token_ids: &[i64],
        pad_token_id: Option<i64>,
        stop_strings: Vec<String>,
        (output_scores, output_logits): (bool, bool),
        seeds: Vec<(u64, u64)>,
        logprobs: Option<usize>,
        beam_json: Option<&str>,
        hooks: Option<Py<PyAny>>,
    ) -> PyResult<(Request, usize, Option<HookError>)> {
        let vocab = self.inner.config.vocab_size;
        self.check_text_only(input_ids, attention_mask)?;
        let (prompts, _) = prompts_from(input_ids, attention_mask, vocab)?;
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
        let mut params = GenerationParams {
            max_new_tokens,
            processors,
            eos_token_ids: eos_token_ids.iter().map(|&i| check_id("eos_token_id", i)).collect::<PyResult<_>>()?,
            pad_token_id: pad_token_id.map(|i| check_id("pad_token_id", i)).transpose()?,
            stop_strings,
            output_scores,
            output_logits,
            seeds,
            logprobs,
            beam: beam_json
                .map(|j| serde_json::from_str(j).map_err(|e| to_py(Error::invalid(format!("invalid beam search settings: {e}")))))
                .transpose()?,
            hooks: None,
        };
        let mut hook_error = None;
        if let Some(runner) = hooks {
            // Beam search runs num_beams rows per prompt: the hooks see each prompt once per beam.
            let beams = params.beam.as_ref().map_or(1, |b| b.num_beams);
            let view = input_ids.as_array();
            let prompt: Vec<i64> =
                view.rows().into_iter().flat_map(|row| (0..beams).flat_map(move |_| row.into_iter().copied())).collect();
            let width = input_ids.shape()[1];
            let (set, error) = PyHooks::hook_set(input_ids.py(), runner, prompt, width, vocab)?;
            params.hooks = Some(set);
            hook_error = Some(error);
        }
        let decode = self.inner.tokenizer.as_ref().map(|t| {
            let t = Arc::clone(t);
            Arc::new(move |ids: &[u32]| t.decode(ids, false)) as Arc<generation::stopping::DecodeFn>
        });
        let batch = prompts.len();
        let request = guarded(|| Request::new(prompts, params, decode, vocab)).py()?;
        Ok((request, batch, hook_error))
    }
}

#[pymethods]
impl PyEngine {
    #[staticmethod]
    #[pyo3(signature = (model, device = "cpu".to_string(), dtype = "auto".to_string(), progress = None, backend = "auto".to_string(), tp_degree = 1, neuron = None, compute_dtype = "auto".to_string()))]
    #[allow(clippy::too_many_arguments)]
    fn load(
        py: Python<'_>,
        model: String,
        device: String,
        dtype: String,
        progress: Option<Py<PyAny>>,
        backend: String,
        tp_degree: i64,
        neuron: Option<super::neuron::NeuronArgs>,
        compute_dtype: String,
    ) -> PyResult<Self> {
        let tp_degree = usize::try_from(tp_degree).ok().filter(|&t| t >= 1).ok_or_else(|| {
            crate::error::Error::invalid(format!(
                "tp_degree={tp_degree} is not a number of ranks; use an integer >= 1 that divides the model's attention heads"
            ))
        });
        let tp_degree = tp_degree.py()?;
        let mut report = |done: usize, total: usize| {
            if let Some(cb) = &progress {
                // A failing progress display must not fail the load.
                Python::attach(|py| {
                    let _ = cb.call1(py, (done, total));
                });
            }
        };
        let engine = if device == "neuron" {
            if compute_dtype != "auto" {
                return Err(crate::error::Error::invalid(format!(
                    "compute_dtype={compute_dtype:?} does not apply to device=\"neuron\": the graphs compute in their dtype; \
                     choose it with dtype=, and leave compute_dtype=\"auto\""
                )))
                .py();
            }
            let opts = super::neuron::neuron_options(neuron, tp_degree).py()?;
            py.detach(|| guarded(|| Engine::load_neuron(&model, &dtype, &opts, &mut report))).py()?
        } else {
            py.detach(|| guarded(|| Engine::load_on(&model, &device, &backend, &dtype, &compute_dtype, tp_degree, &mut report))).py()?
        };
        Ok(PyEngine::new(engine))
    }

    #[getter]
    fn config_json(&self) -> String {
        self.inner.config.raw.to_string()
    }

    /// (is_warning, message) for each thing the load reported (`Engine::notices`).
    #[getter]
    fn load_notices(&self) -> Vec<(bool, String)> {
        self.inner.notices.iter().map(|n| (n.warning, n.message.clone())).collect()
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
    fn compute_dtype(&self) -> &'static str {
        self.inner.compute_dtype.name()
    }

    #[getter]
    fn model_path(&self) -> String {
        self.inner.model_path.display().to_string()
    }

    /// Generation over a padded id matrix, through the scheduler (so calls from many threads
    /// share steps). Returns (new_tokens (batch, steps) int64, scores list of (batch, vocab)
    /// float32, logits list of the same). `on_step(tokens)` streams; Ctrl-C cancels.
    #[pyo3(signature = (input_ids, attention_mask, *, max_new_tokens, processor_config_json,
        eos_token_ids = Vec::new(), pad_token_id = None, stop_strings = Vec::new(), output_scores = false,
        output_logits = false, seeds = Vec::new(), logprobs = None, on_step = None, beam_json = None, hooks = None))]
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
        logprobs: Option<usize>,
        on_step: Option<Py<PyAny>>,
        beam_json: Option<String>,
        hooks: Option<Py<PyAny>>,
    ) -> PyResult<GenerateResult<'py>> {
        let (request, batch, hook_error) = self.request(
            &input_ids,
            &attention_mask,
            max_new_tokens,
            processor_config_json,
            &eos_token_ids,
            pad_token_id,
            stop_strings,
            (output_scores, output_logits),
            seeds,
            logprobs,
            beam_json.as_deref(),
            hooks,
        )?;
        let handle = self.scheduler()?.submit(request, on_step.is_some(), None).py()?;
        PyRequest::new(handle, batch, self.inner.config.vocab_size).with_hook_error(hook_error).wait(py, on_step)
    }

    /// Like `generate`, but returns at once with a `Request` to poll, wait on or cancel;
    /// `doorbell=` (a `Doorbell`) rings that event loop's socket when it has news.
    #[pyo3(signature = (input_ids, attention_mask, *, max_new_tokens, processor_config_json,
        eos_token_ids = Vec::new(), pad_token_id = None, stop_strings = Vec::new(), output_scores = false,
        output_logits = false, seeds = Vec::new(), logprobs = None, stream_steps = false, doorbell = None, beam_json = None, hooks = None))]
    #[allow(clippy::too_many_arguments)]
    fn submit<'py>(
        &self,
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
        logprobs: Option<usize>,
        stream_steps: bool,
        doorbell: Option<PyRef<'py, PyDoorbell>>,
        beam_json: Option<String>,
        hooks: Option<Py<PyAny>>,
    ) -> PyResult<PyRequest> {
        let (request, batch, hook_error) = self.request(
            &input_ids,
            &attention_mask,
            max_new_tokens,
            processor_config_json,
            &eos_token_ids,
            pad_token_id,
            stop_strings,
            (output_scores, output_logits),
            seeds,
            logprobs,
            beam_json.as_deref(),
            hooks,
        )?;
        let bell = doorbell.map(|d| Arc::clone(&d.inner));
        let handle = self.scheduler()?.submit(request, stream_steps, bell).py()?;
        Ok(PyRequest::new(handle, batch, self.inner.config.vocab_size).with_hook_error(hook_error))
    }

    /// The scheduler's counters (running/queued requests and sequences, steps, peaks).
    fn scheduler_stats<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        let s = self.scheduler()?.stats();
        let limits = self.scheduler()?.limits();
        let d = PyDict::new(py);
        d.set_item("running_requests", s.running_requests)?;
        d.set_item("running_sequences", s.running_sequences)?;
        d.set_item("queued_requests", s.queued_requests)?;
        d.set_item("steps", s.steps)?;
        d.set_item("mixed_steps", s.mixed_steps)?;
        d.set_item("max_step_sequences", s.max_step_sequences)?;
        d.set_item("max_running_requests", s.max_running_requests)?;
        d.set_item("completed", s.completed)?;
        d.set_item("cancelled", s.cancelled)?;
        d.set_item("rejected", s.rejected)?;
        d.set_item("internal_faults", s.internal_faults)?;
        d.set_item("max_sequences", limits.max_sequences)?;
        d.set_item("max_cache_tokens", limits.max_cache_positions)?;
        d.set_item("max_queued_requests", limits.max_queued_requests)?;
        d.set_item("cache_bytes_per_token", self.cache_bytes_per_token())?;
        d.set_item("cache_bytes_reserved", self.inner.backend.cache_bytes_reserved())?;
        d.set_item("all_reduces", self.inner.backend.memory_stats().all_reduces)?;
        Ok(d)
    }

    fn memory_stats<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        let m = self.inner.backend.memory_stats();
        let d = PyDict::new(py);
        d.set_item("tp_degree", m.tp_degree)?;
        d.set_item("weight_bytes_per_rank", m.weight_bytes_per_rank)?;
        d.set_item("kv_cache_bytes_per_token", m.kv_cache_bytes_per_token)?;
        d.set_item("kv_cache_bytes_reserved", self.inner.backend.cache_bytes_reserved())?;
        Ok(d)
    }

    /// Debug hook: record a digest of each rank's hidden state after every all-reduce.
    fn record_all_reduces(&self, on: bool) {
        self.inner.backend.record_all_reduces(on);
    }

    fn all_reduce_log(&self) -> Vec<Vec<u64>> {
        self.inner.backend.take_all_reduce_log()
    }

    /// Debug hook: a named device tensor's bytes on every rank (device="neuron").
    fn debug_tensor<'py>(&self, py: Python<'py>, name: String) -> PyResult<Vec<Bound<'py, pyo3::types::PyBytes>>> {
        let backend = std::sync::Arc::clone(&self.inner.backend);
        let ranks = py.detach(|| guarded(|| backend.debug_tensor(&name))).py()?;
        Ok(ranks.iter().map(|b| pyo3::types::PyBytes::new(py, b)).collect())
    }

    fn reset_scheduler_peaks(&self) -> PyResult<()> {
        self.scheduler()?.reset_peaks();
        Ok(())
    }

    #[pyo3(signature = (max_sequences = None, max_cache_tokens = None, max_queued_requests = None))]
    fn set_scheduler_limits(
        &self,
        max_sequences: Option<usize>,
        max_cache_tokens: Option<usize>,
        max_queued_requests: Option<usize>,
    ) -> PyResult<()> {
        let scheduler = self.scheduler()?;
        let current = scheduler.limits();
        scheduler
            .set_limits(Limits {
                max_sequences: max_sequences.unwrap_or(current.max_sequences),
                max_cache_positions: max_cache_tokens.unwrap_or(current.max_cache_positions),
                max_queued_requests: max_queued_requests.unwrap_or(current.max_queued_requests),
            })
            .py()
    }

    /// Holds the scheduler (nothing is admitted or stepped) until called with False, after
    /// `after_steps` more steps when given; for tests.
    #[pyo3(signature = (paused, after_steps = None))]
    fn _pause_scheduler(&self, paused: bool, after_steps: Option<usize>) -> PyResult<()> {
        self.scheduler()?.set_paused(paused, after_steps);
        Ok(())
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
        self.check_text_only(&input_ids, &attention_mask)?;
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
                let what = format!("the logits of {batch} x {seq} positions x {vocab} vocabulary entries");
                let mut full = crate::mem::try_zeroed::<f32>(batch.saturating_mul(seq).saturating_mul(vocab))
                    .map_err(|e| e.into_error(&what, "pass fewer or shorter rows"))?;
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

/// Gives freed heap memory back to the OS (glibc's malloc_trim; a no-op elsewhere): for the
/// server after work that allocated much and briefly on a thread (tokenizing a huge prompt).
#[pyfunction]
fn _release_memory(py: Python<'_>) {
    py.detach(crate::scheduler::trim::return_freed_memory);
}

/// Tests only: makes `point` ("admit", "step", "release", "loop") panic for work that holds token
/// `marker` (None disarms it). Process-wide.
#[pyfunction]
#[pyo3(signature = (point, marker = None))]
fn _arm_fault(point: &str, marker: Option<u32>) -> PyResult<()> {
    crate::faults::arm(crate::faults::parse(point).py()?, marker);
    Ok(())
}

pub fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<PyEngine>()?;
    m.add_class::<PyRequest>()?;
    m.add_class::<PyDoorbell>()?;
    m.add_function(wrap_pyfunction!(_debug_panic, m)?)?;
    m.add_function(wrap_pyfunction!(_release_memory, m)?)?;
    m.add_function(wrap_pyfunction!(_arm_fault, m)?)
}
