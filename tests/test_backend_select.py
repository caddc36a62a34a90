"""device= / backend= selection, in any build: bad names are ValueErrors naming the choices; the
torch backend in a build without the `torch` feature is a BackendUnavailableError saying how to
get it (the torch build's own errors are in test_torch_backend.py)."""

from __future__ import annotations

import pytest

import kvgen


@pytest.mark.parametrize(
    "kw, match",
    [
        (dict(device="tpu"), "not a kvgen device"),
        (dict(device="cpu", backend="jax"), "not a kvgen backend"),
        (dict(device="cuda", backend="native"), "CPU only"),
    ],
    ids=["unknown-device", "unknown-backend", "native-off-cpu"],
)
def test_bad_names(kw, match, model_dir):
    with pytest.raises(kvgen.InvalidInputError, match=match):
        kvgen.Generator.from_pretrained(str(model_dir("llama")), **kw)


@pytest.mark.skipif(kvgen._kvgen.HAS_TORCH, reason="this build has the torch backend")
@pytest.mark.parametrize("kw", [dict(device="cuda"), dict(device="cuda:1"), dict(backend="torch")], ids=["gpu", "gpu-1", "torch-cpu"])
def test_torch_backend_absent(kw, model_dir):
    with pytest.raises(kvgen.BackendUnavailableError, match=r"--features python,torch"):
        kvgen.Generator.from_pretrained(str(model_dir("llama")), **kw)


def test_native_is_the_cpu_default(model_dir):
    gen = kvgen.Generator.from_pretrained(str(model_dir("llama")), backend="native")
    assert gen.device == "cpu"
