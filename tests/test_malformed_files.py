"""Malformed model files and configs must raise a typed kvgen error, never abort the process.

Each case writes a broken file set into tmp_path and loads it in a subprocess whose code catches
the expected exception class (and checks its message) and exits 0: an abort (exit 134 / -6), a
panic or a wrong exception fails the test instead of killing pytest.
"""

from __future__ import annotations

import json
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import pytest

# -- running a load in a subprocess ---------------------------------------------------------------

_LOAD = """
import re, sys
import kvgen
try:
    kvgen.Generator.from_pretrained({path!r})
except kvgen.{cls} as e:
    if not re.search({match!r}, str(e)):
        print("message does not match {match!r}:", e)
        sys.exit(3)
    sys.exit(0)
except BaseException as e:
    print("wrong exception:", type(e).__name__, e)
    sys.exit(2)
print("loaded without an error")
sys.exit(1)
"""


def assert_load_raises(path, cls: str, match: str) -> None:
    code = _LOAD.format(path=str(path), cls=cls, match=match)
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, f"exit {r.returncode}\nstdout: {r.stdout}\nstderr: {r.stderr[-3000:]}"


def _copy_model(model_dir, tmp_path: Path, kind: str = "llama") -> Path:
    d = tmp_path / "model"
    shutil.copytree(model_dir(kind), d)
    return d


# -- config.json ----------------------------------------------------------------------------------

CONFIG_CASES = [
    ("num_hidden_layers", 10**12, r"1\.\.=1024"),
    ("num_hidden_layers", -1, r"1\.\.=1024"),
    ("num_hidden_layers", 2.5, r"1\.\.=1024"),
    ("num_hidden_layers", "abc", r"1\.\.=1024"),
    ("hidden_size", 10**12, r"1\.\.=262144"),
    ("hidden_size", 0, r"1\.\.=262144"),
    ("intermediate_size", 10**12, r"1\.\.=1048576"),
    ("intermediate_size", 0, r"1\.\.=1048576"),
    ("vocab_size", 10**12, r"1\.\.=16777216"),
    ("vocab_size", 0, r"1\.\.=16777216"),
    ("num_attention_heads", 10**12, r"1\.\.=4096"),
    ("num_attention_heads", 0, r"1\.\.=4096"),
    ("num_key_value_heads", 10**12, r"1\.\.=4 "),
    ("head_dim", 10**9, r"1\.\.=4096"),
    ("max_position_embeddings", 10**12, r"1\.\.=16777216"),
    ("max_position_embeddings", -5, r"1\.\.=16777216"),
]


@pytest.mark.parametrize("field,value,limit", CONFIG_CASES, ids=[f"{f}={v!r}" for f, v, _ in CONFIG_CASES])
def test_bad_config_value_is_model_format_error(model_dir, tmp_path, field, value, limit):
    d = _copy_model(model_dir, tmp_path)
    cfg = json.loads((d / "config.json").read_text())
    cfg[field] = value
    (d / "config.json").write_text(json.dumps(cfg))
    assert_load_raises(d, "ModelFormatError", rf"`{field}` = .*{limit}.*config\.json")


@pytest.mark.parametrize(
    "edit,match",
    [
        # Each value within its own limit, together ~9e14 parameters.
        (dict(hidden_size=2**18, intermediate_size=2**20, num_hidden_layers=1024, head_dim=64), r"parameters.*2\^41"),
        (dict(rope_parameters={"rope_type": "linear", "factor": -2.0, "rope_theta": 10000.0}), r"`factor` = -2\.0"),
        (dict(rope_parameters={"rope_type": "default", "rope_theta": 0}), r"`rope_theta` = 0"),
    ],
    ids=["implied-parameters", "rope-factor-negative", "rope-theta-zero"],
)
def test_bad_config_combination_is_model_format_error(model_dir, tmp_path, edit, match):
    d = _copy_model(model_dir, tmp_path)
    cfg = json.loads((d / "config.json").read_text())
    cfg.update(edit)
    (d / "config.json").write_text(json.dumps(cfg))
    assert_load_raises(d, "ModelFormatError", match)


@pytest.mark.parametrize("kind", ["llama", "mistral", "qwen2", "qwen3"])
def test_missing_max_position_embeddings_takes_transformers_default(kvgen, model_dir, tmp_path, kind):
    from transformers import AutoConfig

    d = _copy_model(model_dir, tmp_path, kind)
    cfg = json.loads((d / "config.json").read_text())
    del cfg["max_position_embeddings"]
    (d / "config.json").write_text(json.dumps(cfg))
    ref = AutoConfig.from_pretrained(str(d)).max_position_embeddings
    gen = kvgen.Generator.from_pretrained(str(d))
    assert gen.config.max_position_embeddings == ref
    # The value is the one in force: a prompt may use that context and no more.
    with pytest.raises(kvgen.ContextLengthError, match=str(ref)):
        gen.generate([1, 2, 3], max_new_tokens=ref)


def test_missing_mistral_sliding_window_takes_transformers_default(kvgen, model_dir, tmp_path):
    """MistralConfig's sliding_window defaults to 4096 when the key is absent (an explicit null
    means full attention); kvgen attends as transformers does in both cases."""
    import numpy as np
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    ids = [[(7 * i) % 90 + 3 for i in range(40)]]
    for value in ("absent", None):
        d = _copy_model(model_dir, tmp_path / str(value), "mistral")
        cfg = json.loads((d / "config.json").read_text())
        cfg.pop("sliding_window")
        if value is None:
            cfg["sliding_window"] = None
        (d / "config.json").write_text(json.dumps(cfg))
        ref_cfg = AutoConfig.from_pretrained(str(d))
        gen = kvgen.Generator.from_pretrained(str(d))
        assert gen.config.sliding_window == ref_cfg.sliding_window == (4096 if value == "absent" else None)
        hf = AutoModelForCausalLM.from_pretrained(str(d), attn_implementation="eager", dtype=torch.float32).eval()
        with torch.no_grad():
            ref = hf(torch.tensor(ids)).logits.numpy()
        assert np.abs(gen.logits(ids) - ref).max() < 1e-4


# -- safetensors ----------------------------------------------------------------------------------


def _read_st(path: Path):
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    return json.loads(raw[8 : 8 + n]), raw[8 + n :]


def _write_st(path: Path, header: dict, data: bytes) -> None:
    h = json.dumps(header).encode()
    h += b" " * (-len(h) % 8)
    path.write_bytes(struct.pack("<Q", len(h)) + h + data)


def _set_header_length(path: Path, n: int) -> None:
    raw = bytearray(path.read_bytes())
    raw[:8] = struct.pack("<Q", n)
    path.write_bytes(bytes(raw))


_EMBED = "model.embed_tokens.weight"


def _edit_tensor(key, value):
    def edit(header):
        header[_EMBED][key] = value(header[_EMBED][key])

    return edit


def _offsets_past_end(header):
    last = max((k for k in header if k != "__metadata__"), key=lambda k: header[k]["data_offsets"][1])
    header[last]["data_offsets"][1] += 10**12


SAFETENSORS_CASES = {
    "shape-overflowing": (_edit_tensor("shape", lambda s: [2**40, 2**40, 2**40]), r"overflow"),
    "shape-huge": (_edit_tensor("shape", lambda s: [2**20, 2**20]), r"invalid shape"),
    "offsets-past-end": (_offsets_past_end, r"not a valid safetensors file"),
    "dtype-bytes-mismatch": (_edit_tensor("dtype", lambda d: "F16"), r"invalid shape, data type"),
    # Consistent bytes, but not what config.json implies: refused before any copy.
    "shape-disagrees-with-config": (_edit_tensor("shape", lambda s: [s[0] * s[1]]), r"has shape .* config\.json implies"),
}


@pytest.mark.parametrize("case", list(SAFETENSORS_CASES))
def test_bad_safetensors_header_is_model_format_error(model_dir, tmp_path, case):
    edit, match = SAFETENSORS_CASES[case]
    d = _copy_model(model_dir, tmp_path)
    st = d / "model.safetensors"
    header, data = _read_st(st)
    edit(header)
    _write_st(st, header, data)
    assert_load_raises(d, "ModelFormatError", match)


@pytest.mark.parametrize("length,match", [(2**62, r"header length \d+ is above"), (None, r"runs past the end")])
def test_bad_safetensors_header_length_is_model_format_error(model_dir, tmp_path, length, match):
    d = _copy_model(model_dir, tmp_path)
    st = d / "model.safetensors"
    _set_header_length(st, length if length is not None else st.stat().st_size)
    assert_load_raises(d, "ModelFormatError", match)


# -- GGUF -----------------------------------------------------------------------------------------
# Written byte by byte (the gguf package refuses most of these); types as in the GGUF spec.

U8, U32, I32, F32, STRING, ARRAY, U64 = 0, 4, 5, 6, 8, 9, 10


def _s(text: str) -> bytes:
    b = text.encode()
    return struct.pack("<Q", len(b)) + b


def _scalar(ty: int, v) -> bytes:
    fmt = {U8: "<B", U32: "<I", I32: "<i", F32: "<f", U64: "<Q"}[ty]
    return struct.pack(fmt, v)


def _gguf(kv, tensors=(), tensor_count=None, kv_count=None) -> bytes:
    """kv: (key, type, payload bytes); tensors: (name, dims, ggml type, n_bytes) with zero data."""
    out = b"GGUF" + struct.pack("<I", 3)
    out += struct.pack("<QQ", len(tensors) if tensor_count is None else tensor_count, len(kv) if kv_count is None else kv_count)
    for key, ty, payload in kv:
        out += _s(key) + struct.pack("<I", ty) + payload
    offset = 0
    for name, dims, ty, n_bytes in tensors:
        out += _s(name) + struct.pack("<I", len(dims)) + b"".join(struct.pack("<Q", d) for d in dims)
        out += struct.pack("<IQ", ty, offset)
        offset += -(-n_bytes // 32) * 32
    out += b"\0" * (-len(out) % 32)
    return out + b"\0" * offset


def _llama_meta(**override):
    """Metadata of a small llama file (hidden 64, 2 layers); `override` replaces (type, value)."""
    meta = {
        "general.architecture": (STRING, "llama"),
        "llama.block_count": (U32, 2),
        "llama.embedding_length": (U32, 64),
        "llama.feed_forward_length": (U32, 128),
        "llama.attention.head_count": (U32, 4),
        "llama.context_length": (U32, 256),
        "llama.vocab_size": (U32, 100),
    }
    meta.update(override)
    return [(k, ty, _s(v) if ty == STRING else _scalar(ty, v)) for k, (ty, v) in meta.items()]


def _array(ty: int, n: int, items: bytes = b"") -> bytes:
    return struct.pack("<IQ", ty, n) + items


def _nested(depth: int) -> bytes:
    return b"".join(_array(ARRAY, 1) for _ in range(depth)) + _array(U32, 0)


GGUF_CASES = {
    # Sanity: the same writer with sane values gets as far as the (absent) weights.
    "valid-metadata-no-tensors": (_gguf(_llama_meta()), r"lacks tensor"),
    "array-count-huge": (_gguf(_llama_meta() + [("x", ARRAY, _array(U8, 2**62))]), r"x.*remaining"),
    "string-array-count-huge": (_gguf(_llama_meta() + [("x", ARRAY, _array(STRING, 2**40))]), r"remaining"),
    "string-length-huge": (_gguf(_llama_meta() + [("x", STRING, struct.pack("<Q", 2**62))]), r"x.*remaining"),
    "nested-array-count-huge": (_gguf(_llama_meta() + [("x", ARRAY, _array(ARRAY, 10**6, b"\0" * 100))]), r"at least 12 bytes"),
    "nested-arrays-too-deep": (_gguf(_llama_meta() + [("x", ARRAY, _nested(5))]), r"nested"),
    "u8-array-expanding-past-memory-limit": (None, r"in memory"),
    "tensor-count-huge": (_gguf(_llama_meta(), tensor_count=2**62), r"tensor_count"),
    "kv-count-huge": (_gguf(_llama_meta(), kv_count=2**62), r"metadata_kv_count"),
    "tensor-dims-overflowing": (_gguf(_llama_meta(), [("token_embd.weight", [2**32, 2**32, 2**32], 0, 32)]), r"overflows"),
    "tensor-dims-huge": (_gguf(_llama_meta(), [("token_embd.weight", [2**30, 2**30], 0, 32)]), r"runs past the end"),
    "tensor-n-dims-huge": (_gguf(_llama_meta(), [("token_embd.weight", [1] * 9, 0, 32)]), r"9 dimensions"),
    "block-count-huge": (_gguf(_llama_meta(**{"llama.block_count": (U64, 10**12)})), r"num_hidden_layers.*llama\.block_count.*1024"),
    "block-count-negative": (_gguf(_llama_meta(**{"llama.block_count": (I32, -1)})), r"llama\.block_count.*non-negative"),
    "embedding-length-huge": (_gguf(_llama_meta(**{"llama.embedding_length": (U64, 2**40)})), r"hidden_size.*embedding_length"),
    "head-count-zero": (_gguf(_llama_meta(**{"llama.attention.head_count": (U32, 0)})), r"num_attention_heads"),
    "context-length-huge": (_gguf(_llama_meta(**{"llama.context_length": (U64, 2**50)})), r"max_position_embeddings"),
}


@pytest.mark.parametrize("case", list(GGUF_CASES))
def test_bad_gguf_is_model_format_error(tmp_path, case):
    data, match = GGUF_CASES[case]
    if data is None:
        # 40M one-byte items: 40 MB on disk, 1.3 GB as parsed values (over the 1 GiB bound).
        n = 40_000_000
        data = _gguf(_llama_meta() + [("x", ARRAY, _array(U8, n, bytes(n)))])
    path = tmp_path / "bad.gguf"
    path.write_bytes(data)
    assert_load_raises(path, "ModelFormatError", match)


@pytest.mark.parametrize("method", ["add_token_types", "add_token_scores"])
def test_gguf_tokenizer_arrays_that_disagree(tmp_path, monkeypatch, method):
    import gguf
    from tiny_gguf import write_tiny

    original = getattr(gguf.GGUFWriter, method)
    monkeypatch.setattr(gguf.GGUFWriter, method, lambda self, values: original(self, list(values)[:-1]))
    path = write_tiny(str(tmp_path / "tiny.gguf"), arch="llama", tokenizer="llama")
    field = "token_type" if method == "add_token_types" else "scores"
    assert_load_raises(path, "ModelFormatError", rf"tokenizer\.ggml\.{field} has \d+ entries but tokenizer\.ggml\.tokens has")
