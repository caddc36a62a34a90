//! Test hooks for the GGUF reader: dequantize raw blocks and read a file's tensors by name, so
//! tests/test_gguf.py can compare bit for bit with the gguf Python package.

use numpy::{PyArray1, PyArrayMethods};
use pyo3::prelude::*;

use super::errors::to_py;
use crate::error::Error;
use crate::weights::gguf::{quant, GgmlType, GgufSource};
use crate::weights::TensorSource;

/// `_gguf_dequantize(data: bytes, ggml_type: int, n_elements: int) -> np.ndarray[float32]`
#[pyfunction]
fn _gguf_dequantize<'py>(
    py: Python<'py>,
    data: &[u8],
    ggml_type: u32,
    n_elements: usize,
) -> PyResult<Bound<'py, PyArray1<f32>>> {
    let kind = GgmlType::from_u32(ggml_type);
    let v = quant::dequantize(kind, data, n_elements).ok_or_else(|| {
        to_py(Error::invalid(format!(
            "cannot dequantize {} bytes as {} x {n_elements}",
            data.len(),
            kind.name()
        )))
    })?;
    Ok(PyArray1::from_vec(py, v))
}

/// `_gguf_tensor(path, hf_name) -> np.ndarray[float32]` in HF shape, as the model loader sees it.
#[pyfunction]
fn _gguf_tensor<'py>(py: Python<'py>, path: &str, hf_name: &str) -> PyResult<Bound<'py, PyAny>> {
    let t = py
        .detach(|| GgufSource::open(std::path::Path::new(path)).and_then(|s| s.get(hf_name)))
        .map_err(to_py)?;
    let v = t.data.to_f32_vec();
    Ok(PyArray1::from_vec(py, v).reshape(t.shape)?.into_any())
}

/// `_gguf_config(path) -> str`: the HF-style config.json kvgen builds from the file's metadata.
#[pyfunction]
fn _gguf_config(path: &str) -> PyResult<String> {
    let src = GgufSource::open(std::path::Path::new(path)).map_err(to_py)?;
    Ok(src.config_json().map_err(to_py)?.to_string())
}

pub fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_function(wrap_pyfunction!(_gguf_dequantize, m)?)?;
    m.add_function(wrap_pyfunction!(_gguf_tensor, m)?)?;
    m.add_function(wrap_pyfunction!(_gguf_config, m)?)?;
    Ok(())
}
