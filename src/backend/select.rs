//! Which backend serves a `from_pretrained(device=, backend=)` request.

use crate::error::{Error, Result};

/// The backend a model is loaded onto.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Target {
    /// kvgen's own CPU kernels.
    Native,
    /// libtorch through tch; `device` is "cpu", "cuda" or "cuda:N".
    Torch { device: String },
}

/// How to get the torch backend, for every error that needs it.
pub const TORCH_BUILD_HINT: &str = "install torch==2.11.0, then build kvgen with the `torch` feature: \
     LIBTORCH_USE_PYTORCH=1 MATURIN_PEP517_ARGS=\"--features python,torch --auditwheel skip\" \
     pip install --no-build-isolation . (see README, \"GPU: the torch backend\")";

fn is_cuda(device: &str) -> bool {
    device == "cuda" || device.strip_prefix("cuda:").is_some_and(|n| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()))
}

/// Maps the user's `device=` and `backend=` to a backend. backend="auto" picks the native
/// backend for "cpu" and torch for CUDA; backend="torch" also runs libtorch on the CPU (CI tests
/// the torch backend that way).
pub fn choose(device: &str, backend: &str) -> Result<Target> {
    let known = device == "cpu" || is_cuda(device);
    let target = match (backend, device) {
        (_, d) if !known && d != "neuron" => {
            return Err(Error::invalid(format!(
                "device={d:?} is not a kvgen device; use \"cpu\", \"cuda\" or \"cuda:N\" (N = GPU index)"
            )))
        }
        (_, "neuron") => {
            return Err(Error::BackendUnavailable(
                "device=\"neuron\" is not available in this build; kvgen serves \"cpu\", \"cuda\" and \"cuda:N\"".into(),
            ))
        }
        ("auto", "cpu") | ("native", "cpu") => Target::Native,
        ("native", d) => {
            return Err(Error::invalid(format!(
                "backend=\"native\" runs on the CPU only, not device={d:?}; use backend=\"torch\" or \"auto\" for CUDA"
            )))
        }
        ("auto", d) | ("torch", d) => Target::Torch { device: d.to_string() },
        (b, _) => {
            return Err(Error::invalid(format!(
                "backend={b:?} is not a kvgen backend; use \"auto\" (native on CPU, torch on CUDA), \"native\" or \"torch\""
            )))
        }
    };
    if matches!(target, Target::Torch { .. }) && !cfg!(feature = "torch") {
        return Err(Error::BackendUnavailable(format!(
            "device={device:?} with backend={backend:?} needs libtorch, and this kvgen build has no torch backend; {TORCH_BUILD_HINT}"
        )));
    }
    Ok(target)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn devices_and_backends() {
        assert_eq!(choose("cpu", "auto").unwrap(), Target::Native);
        assert_eq!(choose("cpu", "native").unwrap(), Target::Native);
        assert!(matches!(choose("mps", "auto"), Err(Error::InvalidInput(_))));
        assert!(matches!(choose("cuda:x", "auto"), Err(Error::InvalidInput(_))));
        assert!(matches!(choose("cpu", "jax"), Err(Error::InvalidInput(_))));
        assert!(matches!(choose("cuda", "native"), Err(Error::InvalidInput(_))));
        assert!(matches!(choose("neuron", "auto"), Err(Error::BackendUnavailable(_))));
        for (d, b) in [("cuda", "auto"), ("cuda:1", "torch"), ("cpu", "torch")] {
            let got = choose(d, b);
            if cfg!(feature = "torch") {
                assert_eq!(got.unwrap(), Target::Torch { device: d.to_string() });
            } else {
                assert!(matches!(got, Err(Error::BackendUnavailable(m)) if m.contains("--features python,torch")));
            }
        }
    }
}
