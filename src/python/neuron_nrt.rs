//! Test hook for the libnrt executor: `_NrtExecutorProbe` drives `NrtExecutor` directly
//! (put / load / run / close), so tests/test_neuron_nrt.py can check it against the libnrt test
//! double (tests/nrt_double) without a model or a device.

use std::sync::Mutex;

use pyo3::prelude::*;
use pyo3::types::PyBytes;

use super::errors::{guarded, IntoPyResult};
use crate::backend::neuron::executor::Executor;
use crate::backend::neuron::manifest::{ElemType, Manifest, TensorSpec};
use crate::backend::neuron::nrt::NrtExecutor;
use crate::error::{Error, Result};

#[pyclass(name = "_NrtExecutorProbe", module = "kvgen._kvgen", frozen)]
pub struct NrtExecutorProbe {
    // A Mutex makes the class Sync (the executor's worker channels are only Send).
    inner: Mutex<Option<NrtExecutor>>,
}

impl NrtExecutorProbe {
    fn with<T>(&self, work: impl FnOnce(&mut NrtExecutor) -> Result<T>) -> Result<T> {
        let mut slot = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        let exec = slot.as_mut().ok_or_else(|| Error::invalid("this _NrtExecutorProbe was closed"))?;
        guarded(|| work(exec))
    }
}

fn elem_type(dtype: &str) -> Result<ElemType> {
    match dtype {
        "float32" => Ok(ElemType::Float32),
        "bfloat16" => Ok(ElemType::Bfloat16),
        "int32" => Ok(ElemType::Int32),
        other => Err(Error::invalid(format!("dtype {other:?}: use \"float32\", \"bfloat16\" or \"int32\""))),
    }
}

#[pymethods]
impl NrtExecutorProbe {
    /// Opens libnrt and starts the runtime for `tp_degree` ranks.
    #[staticmethod]
    fn open(py: Python<'_>, tp_degree: usize) -> PyResult<Self> {
        let exec = py.detach(|| guarded(|| NrtExecutor::open(tp_degree))).py()?;
        Ok(NrtExecutorProbe { inner: Mutex::new(Some(exec)) })
    }

    fn ranks(&self) -> PyResult<usize> {
        self.with(|e| Ok(e.ranks())).py()
    }

    /// A persistent tensor on `rank`: `data` bytes, or zeros when None.
    #[pyo3(signature = (rank, name, shape, dtype, data=None))]
    fn put(
        &self,
        py: Python<'_>,
        rank: usize,
        name: String,
        shape: Vec<i64>,
        dtype: &str,
        data: Option<Vec<u8>>,
    ) -> PyResult<()> {
        let spec = TensorSpec { name, shape, dtype: elem_type(dtype).py()? };
        py.detach(|| self.with(|e| e.put(rank, &spec, data.as_deref()))).py()
    }

    /// Loads every graph of `manifest_dir/manifest.json` on every rank.
    fn load(&self, py: Python<'_>, manifest_dir: String) -> PyResult<()> {
        py.detach(|| {
            self.with(|e| {
                let dir = std::path::Path::new(&manifest_dir);
                let manifest = Manifest::read(dir)?;
                e.load(&manifest, dir)
            })
        })
        .py()
    }

    /// One step of `graph`: `inputs[rank]` = the step inputs' bytes in graph order; returns,
    /// per rank, the bytes of each non-aliased output.
    fn run<'py>(
        &self,
        py: Python<'py>,
        graph: String,
        inputs: Vec<Vec<Vec<u8>>>,
    ) -> PyResult<Vec<Vec<Bound<'py, PyBytes>>>> {
        let out = py.detach(|| self.with(|e| e.run(&graph, &inputs))).py()?;
        Ok(out.into_iter().map(|rank| rank.iter().map(|b| PyBytes::new(py, b)).collect()).collect())
    }

    /// Frees every handle (and, with the last executor of the process, closes the runtime).
    fn close(&self, py: Python<'_>) {
        // Taken and dropped without the GIL: a run in another thread holds the lock meanwhile.
        py.detach(|| drop(self.inner.lock().unwrap_or_else(|p| p.into_inner()).take()));
    }
}

pub fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<NrtExecutorProbe>()
}
