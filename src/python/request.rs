//! `kvgen._kvgen.Request`: one submitted generation, seen from Python. Blocking waits release
//! the GIL; async callers watch their event loop's `Doorbell` and `poll()` without blocking.
//! Dropping the object (or `cancel()`) cancels the generation and frees its cache slots.

use std::sync::Arc;
use std::time::Duration;

use numpy::{PyArray1, PyArrayMethods};
use pyo3::prelude::*;

use super::errors::{to_py, to_py_carried, IntoPyResult};
use super::hooks::HookError;
use crate::error::Error;
use crate::generation::GenerationOutput;
use crate::scheduler::{Doorbell, Events, RequestHandle};

/// Per row, per generated token: (token, log-probability, [(id, log-probability)] of the top ones).
pub type RowLogprobs = Vec<Vec<(u32, f64, Vec<(u32, f64)>)>>;

/// (new tokens, per-step scores, per-step raw logits) as numpy arrays, the logprobs, and for beam
/// search (sequences_scores, beam_indices).
pub type GenerateResult<'py> =
    (Bound<'py, PyAny>, Vec<Bound<'py, PyAny>>, Vec<Bound<'py, PyAny>>, RowLogprobs, Option<(Bound<'py, PyAny>, Bound<'py, PyAny>)>);

/// How often a blocked waiter wakes to notice Ctrl-C.
const SIGNAL_POLL: Duration = Duration::from_millis(20);

#[pyclass(name = "Request", module = "kvgen._kvgen", frozen)]
pub struct PyRequest {
    handle: RequestHandle,
    batch: usize,
    vocab: usize,
    /// Where a Python hook's exception is kept (requests with hooks only).
    hook_error: Option<HookError>,
}

fn matrix<'py>(py: Python<'py>, flat: Vec<f32>, rows: usize, cols: usize) -> PyResult<Bound<'py, PyAny>> {
    Ok(PyArray1::from_vec(py, flat).reshape([rows, cols])?.into_any())
}

impl PyRequest {
    pub fn new(handle: RequestHandle, batch: usize, vocab: usize) -> Self {
        PyRequest { handle, batch, vocab, hook_error: None }
    }

    /// Re-raises `hook_error`'s exception, when a hook ends the request, instead of its text.
    pub fn with_hook_error(mut self, hook_error: Option<HookError>) -> Self {
        self.hook_error = hook_error;
        self
    }

    fn to_numpy<'py>(&self, py: Python<'py>, out: GenerationOutput) -> PyResult<GenerateResult<'py>> {
        let vocab = self.vocab;
        // Beam search returns num_return_sequences rows per prompt and scores num_beams rows.
        let batch = if out.beam_indices.is_empty() { self.batch } else { out.tokens.len() };
        let steps = out.tokens.first().map_or(0, Vec::len);
        // u32::MAX marks transformers' -1 filler (beam search without an eos id).
        let flat: Vec<i64> = out.tokens.iter().flat_map(|r| r.iter().map(|&t| if t == u32::MAX { -1 } else { t as i64 })).collect();
        let tokens = PyArray1::from_vec(py, flat).reshape([batch, steps])?.into_any();
        let rows_of = |s: &Vec<f32>| s.len() / vocab.max(1);
        let scores = out.scores.into_iter().map(|s| { let r = rows_of(&s); matrix(py, s, r, vocab) }).collect::<PyResult<_>>()?;
        let logits = out.logits.into_iter().map(|s| { let r = rows_of(&s); matrix(py, s, r, vocab) }).collect::<PyResult<_>>()?;
        let beam = if out.beam_indices.is_empty() {
            None
        } else {
            let width = out.beam_indices.first().map_or(0, Vec::len);
            let idx: Vec<i64> = out.beam_indices.into_iter().flatten().collect();
            Some((
                PyArray1::from_vec(py, out.sequences_scores).into_any(),
                PyArray1::from_vec(py, idx).reshape([batch, width])?.into_any(),
            ))
        };
        let logprobs = out
            .logprobs
            .into_iter()
            .map(|row| row.into_iter().map(|e| (e.token, e.logprob, e.top)).collect())
            .collect();
        Ok((tokens, scores, logits, logprobs, beam))
    }

    /// Blocks (GIL released) until the end, calling `on_step(tokens)` per streamed step and
    /// checking for Ctrl-C between waits; either failing cancels the request.
    pub fn wait<'py>(&self, py: Python<'py>, on_step: Option<Py<PyAny>>) -> PyResult<GenerateResult<'py>> {
        let mut py_error: Option<PyErr> = None;
        let result = py.detach(|| {
            self.handle.wait(SIGNAL_POLL, |steps| {
                Python::attach(|py| -> PyResult<()> {
                    py.check_signals()?;
                    if let Some(cb) = &on_step {
                        for tokens in steps {
                            cb.call1(py, (tokens,))?;
                        }
                    }
                    Ok(())
                })
                .map_err(|e| {
                    // The Python exception itself (KeyboardInterrupt, the streamer's error) is re-raised below.
                    let carried = Error::Callback(e.to_string());
                    py_error = Some(e);
                    carried
                })
            })
        });
        if let Some(e) = py_error {
            return Err(e);
        }
        let out = result.map_err(|e| to_py_carried(e, self.hook_error.as_ref()))?;
        self.to_numpy(py, out)
    }
}

fn events_tuple(events: Events) -> (Vec<Vec<u32>>, bool) {
    (events.steps, events.finished)
}

#[pymethods]
impl PyRequest {
    /// This request's ticket on the doorbell it was submitted with (what `Doorbell.take_ready`
    /// returns when it has news).
    #[getter]
    fn ticket(&self) -> PyResult<u64> {
        self.handle.link().ticket().ok_or_else(|| {
            to_py(Error::invalid("this request has no doorbell; submit it with doorbell=Doorbell() to watch it from an event loop"))
        })
    }

    /// Never blocks: (steps since the last call, finished).
    fn poll(&self) -> (Vec<Vec<u32>>, bool) {
        events_tuple(self.handle.link().poll())
    }

    /// Blocks up to `timeout` seconds (GIL released) for a step or the end: (steps, finished).
    fn wait_steps(&self, py: Python<'_>, timeout: f64) -> (Vec<Vec<u32>>, bool) {
        let timeout = Duration::from_secs_f64(timeout.clamp(0.0, 3600.0));
        events_tuple(py.detach(|| self.handle.link().wait(timeout)))
    }

    /// Blocks until the end; same result as `Engine.generate`.
    #[pyo3(signature = (on_step = None))]
    fn wait_result<'py>(&self, py: Python<'py>, on_step: Option<Py<PyAny>>) -> PyResult<GenerateResult<'py>> {
        self.wait(py, on_step)
    }

    /// The result of a finished request (raises its error); only once.
    fn result<'py>(&self, py: Python<'py>) -> PyResult<GenerateResult<'py>> {
        let out = self.handle.link().take_result().map_err(|e| to_py_carried(e, self.hook_error.as_ref()))?;
        self.to_numpy(py, out)
    }

    /// Stops the generation at the next step and frees its cache slots; harmless when finished.
    fn cancel(&self) {
        self.handle.cancel();
    }
}

/// `kvgen._kvgen.Doorbell`: one socket an event loop watches for all the requests submitted with
/// it; `take_ready()` returns the tickets of those with news.
#[pyclass(name = "Doorbell", module = "kvgen._kvgen", frozen)]
pub struct PyDoorbell {
    pub inner: Arc<Doorbell>,
}

#[pymethods]
impl PyDoorbell {
    #[new]
    fn new() -> PyResult<Self> {
        Ok(PyDoorbell { inner: Arc::new(Doorbell::new().py()?) })
    }

    /// The descriptor to watch for readability.
    fn fileno(&self) -> i32 {
        self.inner.fd()
    }

    /// Empties the socket and returns the tickets rung since the last call.
    fn take_ready(&self) -> Vec<u64> {
        self.inner.take_ready()
    }
}
