"""Loading: model directories, hub ids resolved from the local HF cache (offline), error types and
messages, config / generation_config exposure, input validation."""

from __future__ import annotations

import hashlib
import json
import os
import shutil

import numpy as np
import pytest
import torch

from tiny_models import ALL_KINDS, PROMPTS, hf_generate, to_torch

SUPPORTED = ["LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM"]
HUB_ID = "kvtest-org/tiny-llama"


def _ids(hf_tok):
    return np.asarray([hf_tok(PROMPTS[1])["input_ids"]], dtype=np.int64)


# -- directories --------------------------------------------------------------------------------


def test_from_pretrained_directory_str_and_path(kvgen, model_dir, hf_tok, hf_model):
    d = model_dir("llama")
    a = kvgen.Generator.from_pretrained(str(d))
    b = kvgen.Generator.from_pretrained(d)  # os.PathLike
    ids = _ids(hf_tok)
    np.testing.assert_array_equal(a.logits(ids), b.logits(ids))
    e = hf_tok(PROMPTS[1], return_tensors="pt")
    ref = hf_generate(hf_model("llama"), **e, max_new_tokens=5, do_sample=False)
    assert torch.equal(to_torch(a.generate(**e, max_new_tokens=5)), ref)


# -- hub ids from the local cache ---------------------------------------------------------------


def _fake_hub_cache(cache_dir, src_dir, repo_id=HUB_ID, stale_src=None):
    """Lay out `src_dir` as huggingface_hub does: models--org--name/{blobs,refs/main,snapshots/<rev>}
    with snapshot files symlinked to content-addressed blobs. Optionally add a stale older snapshot
    (not the one refs/main points to)."""
    repo = cache_dir / ("models--" + repo_id.replace("/", "--"))
    (repo / "blobs").mkdir(parents=True)
    (repo / "refs").mkdir()

    def snapshot(src, rev):
        snap = repo / "snapshots" / rev
        snap.mkdir(parents=True)
        for f in sorted(os.listdir(src)):
            data = (src / f).read_bytes()
            blob = repo / "blobs" / hashlib.sha256(data).hexdigest()
            if not blob.exists():
                blob.write_bytes(data)
            os.symlink(os.path.relpath(blob, snap), snap / f)

    rev = hashlib.sha1(b"main").hexdigest()
    if stale_src is not None:
        snapshot(stale_src, hashlib.sha1(b"stale").hexdigest())
    snapshot(src_dir, rev)
    (repo / "refs" / "main").write_text(rev)
    return repo


def _stale_copy(tmp_path, src):
    """A snapshot that must not be picked: same files, but an unsupported architecture."""
    stale = tmp_path / "stale"
    shutil.copytree(src, stale)
    cfg = json.loads((stale / "config.json").read_text())
    cfg["architectures"] = ["GPT2LMHeadModel"]
    (stale / "config.json").write_text(json.dumps(cfg))
    return stale


def _clear_hf_env(monkeypatch):
    for var in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE", "HF_HOME", "TRANSFORMERS_CACHE", "XDG_CACHE_HOME"):
        monkeypatch.delenv(var, raising=False)


def test_hub_id_from_hf_hub_cache(kvgen, model_dir, hf_tok, tmp_path, monkeypatch):
    from transformers import AutoConfig

    src = model_dir("llama")
    cache = tmp_path / "hub-cache"
    _fake_hub_cache(cache, src, stale_src=_stale_copy(tmp_path, src))
    # the layout is a valid HF cache: transformers resolves it offline too
    assert AutoConfig.from_pretrained(HUB_ID, cache_dir=str(cache), local_files_only=True).architectures == [
        "LlamaForCausalLM"
    ]

    _clear_hf_env(monkeypatch)
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HOME", str(tmp_path / "unused-home"))
    gen = kvgen.Generator.from_pretrained(HUB_ID)
    ids = _ids(hf_tok)
    np.testing.assert_array_equal(gen.logits(ids), kvgen.Generator.from_pretrained(str(src)).logits(ids))


def test_hub_id_from_hf_home(kvgen, model_dir, hf_tok, tmp_path, monkeypatch):
    src = model_dir("qwen2")
    home = tmp_path / "hf-home"
    _fake_hub_cache(home / "hub", src)
    _clear_hf_env(monkeypatch)
    monkeypatch.setenv("HF_HOME", str(home))
    gen = kvgen.Generator.from_pretrained(HUB_ID)
    ids = _ids(hf_tok)
    np.testing.assert_array_equal(gen.logits(ids), kvgen.Generator.from_pretrained(str(src)).logits(ids))


def test_hub_id_not_in_cache_says_where_it_looked(kvgen, tmp_path, monkeypatch):
    cache = tmp_path / "empty-cache"
    cache.mkdir()
    _clear_hf_env(monkeypatch)
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    with pytest.raises(FileNotFoundError) as info:
        kvgen.Generator.from_pretrained("nobody/not-downloaded")
    assert isinstance(info.value, kvgen.KvgenError)
    msg = str(info.value)
    assert "nobody/not-downloaded" in msg, msg
    assert str(cache) in msg, f"message should name the cache directory searched: {msg}"


# -- errors -------------------------------------------------------------------------------------


def test_missing_path_file_not_found(kvgen, tmp_path):
    missing = tmp_path / "no" / "such" / "model"
    with pytest.raises(FileNotFoundError) as info:
        kvgen.Generator.from_pretrained(str(missing))
    assert isinstance(info.value, kvgen.KvgenError)
    assert str(missing) in str(info.value), str(info.value)


def test_directory_without_weights_file_not_found(kvgen, model_dir, tmp_path):
    d = tmp_path / "no-weights"
    shutil.copytree(model_dir("llama"), d)
    for f in d.glob("*.safetensors*"):
        f.unlink()
    with pytest.raises(FileNotFoundError) as info:
        kvgen.Generator.from_pretrained(str(d))
    assert isinstance(info.value, kvgen.KvgenError)
    msg = str(info.value)
    assert str(d) in msg and "safetensors" in msg, msg


def test_unsupported_architecture_lists_supported(kvgen, tokenizer_dir, hf_tok, tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel

    d = tmp_path / "gpt2"
    torch.manual_seed(0)
    cfg = GPT2Config(vocab_size=len(hf_tok), n_embd=32, n_layer=1, n_head=2, n_positions=64)
    GPT2LMHeadModel(cfg).save_pretrained(str(d), safe_serialization=True)
    hf_tok.save_pretrained(str(d))
    with pytest.raises(ValueError) as info:
        kvgen.Generator.from_pretrained(str(d))
    assert isinstance(info.value, kvgen.KvgenError)
    msg = str(info.value)
    assert "GPT2LMHeadModel" in msg, msg
    for arch in SUPPORTED:
        assert arch in msg, f"{arch} missing from: {msg}"


# The documented error classes (README, DESIGN) and the builtin each one also derives.
DOCUMENTED_ERRORS = {
    "InvalidInputError": ValueError,
    "TokenOutOfRangeError": ValueError,
    "ContextLengthError": ValueError,
    "ModelFormatError": ValueError,
    "ModelNotFoundError": FileNotFoundError,
    "NumericalError": RuntimeError,
    "BackendUnavailableError": RuntimeError,
    "BackendError": RuntimeError,
}


def test_error_hierarchy(kvgen):
    assert issubclass(kvgen.KvgenError, Exception)
    for name, builtin in DOCUMENTED_ERRORS.items():
        cls = getattr(kvgen, name, None)
        assert isinstance(cls, type), f"kvgen.{name} is missing"
        assert issubclass(cls, kvgen.KvgenError) and issubclass(cls, builtin), (name, cls.__mro__)
    # subclasses derive the fitting builtin as well; whatever extra names exist must be KvgenErrors
    checked = []
    for name in dir(kvgen):
        obj = getattr(kvgen, name)
        if isinstance(obj, type) and issubclass(obj, BaseException) and name.endswith("Error"):
            assert issubclass(obj, kvgen.KvgenError), f"kvgen.{name} does not derive from KvgenError"
            checked.append(name)
    assert set(DOCUMENTED_ERRORS) <= set(checked), checked


@pytest.mark.parametrize("bad_id", [1000, -1])
def test_token_id_out_of_vocab_value_error(kvgen, kv_model, hf_tok, bad_id):
    gen = kv_model("llama")
    vocab = len(hf_tok)
    assert vocab == gen.config.vocab_size
    ids = [5, 6, bad_id, 7]
    calls = [
        lambda: gen.generate(torch.tensor([ids]), max_new_tokens=2),
        lambda: gen.generate(np.asarray([ids], dtype=np.int64), max_new_tokens=2),
        lambda: gen.generate(ids, max_new_tokens=2),
        lambda: gen.logits(np.asarray([ids], dtype=np.int64)),
    ]
    for call in calls:
        with pytest.raises(ValueError) as info:
            call()
        assert isinstance(info.value, kvgen.KvgenError)
        msg = str(info.value)
        assert str(bad_id) in msg and str(vocab) in msg, msg


def test_token_id_equal_to_vocab_size_rejected(kv_model, hf_tok):
    vocab = len(hf_tok)
    with pytest.raises(ValueError, match=str(vocab)):
        kv_model("llama").generate([5, vocab], max_new_tokens=1)


# -- config and generation_config ---------------------------------------------------------------


@pytest.mark.parametrize("kind", ALL_KINDS)
def test_config_exposes_hf_field_names(kind, kv_model, model_dir):
    from transformers import AutoConfig

    ref = AutoConfig.from_pretrained(str(model_dir(kind)))
    cfg = kv_model(kind).config
    for field in (
        "vocab_size",
        "hidden_size",
        "intermediate_size",
        "num_hidden_layers",
        "num_attention_heads",
        "num_key_value_heads",
        "max_position_embeddings",
        "rms_norm_eps",
        "tie_word_embeddings",
    ):
        assert getattr(cfg, field) == getattr(ref, field), field
    saved = json.loads((model_dir(kind) / "config.json").read_text())
    if "head_dim" in saved:  # Qwen2Config has no head_dim field in 5.x; qwen3's is explicit (32)
        assert cfg.head_dim == saved["head_dim"]
    if kind == "mistral":
        assert cfg.sliding_window == ref.sliding_window


def test_generation_config_from_file(kvgen, model_dir, hf_tok, tmp_path):
    from transformers import AutoModelForCausalLM

    d = tmp_path / "genconf"
    shutil.copytree(model_dir("llama"), d)
    gc_path = d / "generation_config.json"
    gc = json.loads(gc_path.read_text())
    gc.update({"max_length": 19, "eos_token_id": [hf_tok.eos_token_id, 100], "pad_token_id": hf_tok.pad_token_id})
    gc_path.write_text(json.dumps(gc))

    gen = kvgen.Generator.from_pretrained(str(d))
    hf = AutoModelForCausalLM.from_pretrained(str(d), dtype=torch.float32, attn_implementation="eager").eval()
    g = gen.generation_config
    assert g.max_length == 19
    assert list(g.eos_token_id) == [hf_tok.eos_token_id, 100]
    assert g.pad_token_id == hf_tok.pad_token_id and g.bos_token_id == hf_tok.bos_token_id
    # defaults merged in as transformers does
    assert g.do_sample in (False, None) and g.max_new_tokens is None
    # and generate() uses them: max_length 19 in the file is total length
    e = hf_tok(PROMPTS[1], return_tensors="pt")
    ref = hf_generate(hf, **e)
    assert ref.shape[1] == 19
    assert torch.equal(to_torch(gen.generate(**e)), ref)


def test_generation_config_max_new_tokens_from_file(kvgen, model_dir, hf_tok, tmp_path):
    from transformers import AutoModelForCausalLM

    d = tmp_path / "genconf-new"
    shutil.copytree(model_dir("llama"), d)
    gc_path = d / "generation_config.json"
    gc = json.loads(gc_path.read_text())
    gc["max_new_tokens"] = 7
    gc_path.write_text(json.dumps(gc))
    gen = kvgen.Generator.from_pretrained(str(d))
    hf = AutoModelForCausalLM.from_pretrained(str(d), dtype=torch.float32, attn_implementation="eager").eval()
    assert gen.generation_config.max_new_tokens == 7
    e = hf_tok(PROMPTS, padding=True, padding_side="left", return_tensors="pt")
    ref = hf_generate(hf, **e)
    assert ref.shape[1] == e["input_ids"].shape[1] + 7
    assert torch.equal(to_torch(gen.generate(**e)), ref)


def test_progress_bar_only_on_a_terminal_for_large_files(tmp_path):
    import io

    from kvgen._progress import LARGE_BYTES, load_progress

    class Tty(io.StringIO):
        def isatty(self):
            return True

    big = tmp_path / "model.gguf"
    with open(big, "wb") as f:
        f.truncate(LARGE_BYTES + 1)
    assert load_progress(str(big), io.StringIO()) is None, "no bar when not a terminal"
    small = tmp_path / "small.gguf"
    small.write_bytes(b"x")
    assert load_progress(str(small), Tty()) is None, "no bar for small files"
    out = Tty()
    report = load_progress(str(big), out)
    for i in range(4):
        report(i, 3)
    text = out.getvalue()
    assert "Loading model.gguf" in text and "3/3" in text and text.endswith("s\n")


def test_loading_reports_progress_to_the_callback(model_dir):
    from kvgen import _kvgen

    calls = []
    _kvgen.Engine.load(str(model_dir("llama")), "cpu", "auto", lambda d, t: calls.append((d, t)))
    assert calls and calls[-1][0] == calls[-1][1]
    assert [d for d, _ in calls] == sorted(d for d, _ in calls)
