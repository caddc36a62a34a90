//! `UserHooks` over Python callables: a hooked request takes the GIL once per step (per user
//! processor group, and once for its stopping criteria), builds transformers-shaped arrays, calls
//! python/kvgen/_hooks.py's `HookRunner` (which converts to torch when the call's inputs were
//! torch tensors and calls each hook) and copies the scores back. Requests without hooks never
//! come here. A Python exception ends the request with `Error::Callback`; the exception object
//! itself is kept in `HookError` so that generate() re-raises it (type and traceback intact).

use std::sync::{Arc, Mutex};

use numpy::{PyArray1, PyArrayMethods, PyReadonlyArray1, PyReadonlyArray2, PyUntypedArrayMethods};
use pyo3::prelude::*;

use crate::error::{Error, Result};
use crate::generation::hooks::{HookSet, UserHooks};

/// Where a hook's exception waits for the caller of generate() (the first one: the request
/// ends with it).
pub type HookError = Arc<Mutex<Option<PyErr>>>;

pub struct PyHooks {
    runner: Py<PyAny>,
    /// The prompt matrix as given (batch x width, int64): ids under a zero mask that are no
    /// token reach the hooks unchanged, as in transformers.
    prompt: Vec<i64>,
    width: usize,
    vocab: usize,
    error: HookError,
}

impl PyHooks {
    /// A hook set over `runner` (a `kvgen._hooks.HookRunner`), with its plan read from it.
    pub fn hook_set(
        py: Python<'_>,
        runner: Py<PyAny>,
        prompt: Vec<i64>,
        width: usize,
        vocab: usize,
    ) -> PyResult<(HookSet, HookError)> {
        let r = runner.bind(py);
        let replaced: Vec<usize> = r.getattr("replaced")?.extract()?;
        let groups_at: Vec<usize> = r.getattr("groups_at")?.extract()?;
        let has_criteria: bool = r.getattr("has_criteria")?.extract()?;
        let error: HookError = Arc::new(Mutex::new(None));
        let hooks = Arc::new(PyHooks { runner, prompt, width, vocab, error: Arc::clone(&error) });
        Ok((HookSet { hooks, replaced, groups_at, has_criteria }, error))
    }

    /// transformers' `input_ids` of this step: (batch, cur_len) int64.
    fn input_ids<'py>(&self, py: Python<'py>, rows: &[Vec<u32>], prompt_of: Option<&[usize]>) -> PyResult<Bound<'py, PyAny>> {
        let cur = rows.first().map_or(self.width, Vec::len);
        let mut flat = Vec::with_capacity(rows.len() * cur);
        for (i, row) in rows.iter().enumerate() {
            let r = prompt_of.map_or(i, |p| p.get(i).copied().unwrap_or(usize::MAX));
            let prompt = self.prompt.get(r.saturating_mul(self.width)..r.saturating_mul(self.width).saturating_add(self.width));
            let prompt = prompt.ok_or_else(|| crate::python::errors::to_py(Error::Internal(format!("hook row {i}: no prompt row {r}"))))?;
            flat.extend_from_slice(prompt);
            flat.extend(row[self.width.min(row.len())..].iter().map(|&t| i64::from(t)));
        }
        if flat.len() != rows.len() * cur {
            return Err(crate::python::errors::to_py(Error::Internal("hook rows of unequal lengths".into())));
        }
        Ok(PyArray1::from_vec(py, flat).reshape([rows.len(), cur])?.into_any())
    }

    fn scores<'py>(&self, py: Python<'py>, scores: &[f32]) -> PyResult<Bound<'py, PyAny>> {
        let batch = scores.len() / self.vocab.max(1);
        Ok(PyArray1::from_slice(py, scores).reshape([batch, self.vocab])?.into_any())
    }

    /// Keeps the exception for the caller and ends the request with its text.
    fn carry(&self, what: &str, e: PyErr) -> Error {
        let message = format!("{what} raised {e}");
        let mut slot = self.error.lock().unwrap_or_else(|p| p.into_inner());
        slot.get_or_insert(e);
        Error::Callback(message)
    }
}

impl UserHooks for PyHooks {
    fn process(&self, group: usize, rows: &[Vec<u32>], scores: &mut [f32]) -> Result<()> {
        Python::attach(|py| -> PyResult<()> {
            let ids = self.input_ids(py, rows, None)?;
            let arr = self.scores(py, scores)?;
            // The runner returns a C-contiguous float32 (batch, vocab) array or raises.
            let out = self.runner.bind(py).call_method1("process", (group, ids, arr))?;
            let out: PyReadonlyArray2<f32> = out.extract()?;
            let slice = out.as_slice()?;
            if slice.len() != scores.len() {
                return Err(crate::python::errors::to_py(Error::Internal(format!(
                    "the hook runner returned {:?} scores for {} values",
                    out.shape(),
                    scores.len()
                ))));
            }
            scores.copy_from_slice(slice);
            Ok(())
        })
        .map_err(|e| self.carry("a logits processor", e))
    }

    fn stop(&self, rows: &[Vec<u32>], prompt_of: &[usize], scores: &[f32]) -> Result<Vec<bool>> {
        Python::attach(|py| -> PyResult<Vec<bool>> {
            let ids = self.input_ids(py, rows, Some(prompt_of))?;
            let arr = self.scores(py, scores)?;
            // The runner returns one bool per row (a numpy bool array) or raises.
            let out = self.runner.bind(py).call_method1("stop", (ids, arr))?;
            let out: PyReadonlyArray1<bool> = out.extract()?;
            Ok(out.as_slice()?.to_vec())
        })
        .map_err(|e| self.carry("a stopping criterion", e))
    }
}
