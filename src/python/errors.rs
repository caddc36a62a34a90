//! The one place kvgen's `Error` becomes a Python exception (classes in python/kvgen/errors.py).

use pyo3::exceptions::{PyKeyboardInterrupt, PyRuntimeError};
use pyo3::prelude::*;

use crate::error::Error;

fn class_name(err: &Error) -> &'static str {
    match err {
        Error::InvalidInput(_) => "InvalidInputError",
        Error::TokenOutOfRange { .. } => "TokenOutOfRangeError",
        Error::ContextOverflow(_) => "ContextLengthError",
        Error::NotFound { .. } => "ModelNotFoundError",
        Error::BadModelFile { .. } => "ModelFormatError",
        Error::UnsupportedArchitecture { .. } => "UnsupportedArchitectureError",
        Error::Numerical(_) => "NumericalError",
        Error::BackendUnavailable(_) => "BackendUnavailableError",
        Error::Backend(_) => "BackendError",
        Error::Tokenizer(_) => "TokenizerError",
        Error::Io { source, .. } if source.kind() == std::io::ErrorKind::NotFound => "ModelNotFoundError",
        Error::Cancelled => "RequestCancelledError",
        Error::OutOfMemory(_) => "OutOfMemoryError",
        Error::Overloaded(_) => "OverloadedError",
        Error::Io { .. } | Error::Callback(_) | Error::Internal(_) | Error::Interrupted => "InternalError",
    }
}

pub fn to_py(err: Error) -> PyErr {
    if matches!(err, Error::Interrupted) {
        return PyKeyboardInterrupt::new_err("generation interrupted");
    }
    let message = err.to_string();
    Python::attach(|py| {
        let class = py.import("kvgen.errors").and_then(|m| m.getattr(class_name(&err)));
        match class {
            Ok(cls) => match cls.call1((message.clone(),)) {
                Ok(instance) => PyErr::from_value(instance),
                Err(e) => e,
            },
            Err(_) => PyRuntimeError::new_err(message),
        }
    })
}

/// `to_py`, except that a request ended by a Python hook's exception (`Error::Callback` with the
/// exception kept in `carried`) raises that exception object itself, type and traceback intact.
pub fn to_py_carried(err: Error, carried: Option<&super::hooks::HookError>) -> PyErr {
    if let (Error::Callback(_), Some(slot)) = (&err, carried) {
        if let Some(original) = slot.lock().unwrap_or_else(|p| p.into_inner()).take() {
            return original;
        }
    }
    to_py(err)
}

/// `?`-friendly conversion for kvgen results inside pymethods.
pub trait IntoPyResult<T> {
    fn py(self) -> PyResult<T>;
}

impl<T> IntoPyResult<T> for crate::error::Result<T> {
    fn py(self) -> PyResult<T> {
        self.map_err(to_py)
    }
}

/// Runs Rust work so that a panic becomes `Error::Internal` (an `InternalError` in Python) rather
/// than a `PanicException`, which `except Exception` would not catch.
pub fn guarded<T>(work: impl FnOnce() -> crate::error::Result<T>) -> crate::error::Result<T> {
    crate::error::catch_panic("a Rust panic was caught", work)
}
