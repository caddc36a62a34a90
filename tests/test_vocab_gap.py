"""The vocabulary gap (issue 14): a model's vocabulary is its embedding's row count, never the
tokenizer's length, and the two can differ either way.

* Embedding larger than the tokenizer (Gemma 3: 262,208 rows, 262,144 tokens): logits span every
  row, equal to transformers'; a generated id with no token decodes to "" in every text API
  (generate's text, batch_decode, stream, the OpenAI server's text, logprobs and top_logprobs) with
  one warning per generator. Fixture: 64 rows past the tokenizer, one of them made "hot" (its
  output row is 1.3x the row of the token greedy picks first) so the model emits a gap id by
  itself, with a high raw log-probability (top_logprobs need that; processors do not change them).
  The head is untied there: with a tied one the hot row is also the gap id's input embedding and
  this random model then repeats it forever, leaving no text around it to check.
* Embedding smaller than the tokenizer (Gemma 3 1B: `<image_soft_token>` = 262,144, one past the
  embedding): a warning at load naming the token; a prompt holding it (as ids, or as text that
  tokenizes to it) raises TokenOutOfRangeError naming the id, the size and the fix, before any
  compute, on every backend; the server answers 400. Fixture: one row fewer than the tokenizer,
  so `<|im_end|>` (the last id, and part of the chat template) has no row.
"""

from __future__ import annotations

import asyncio
import json
import warnings
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from tiny_models import assert_sequences_match, build_gemma, build_model, eos_ids_of, hf_forward_logits, hf_generate, load_hf

NEW = 8
LOGITS_ATOL = 1e-4
EXTRA_ROWS = 64
USER_TEXT = "The cat"
# The warning a generator gives (once) for an id its tokenizer has no token for.
UNKNOWN_ID_WARNING = "has no token in the tokenizer"
# Small Neuron graph set: one bucket holds the chat-templated prompt (43 tokens) plus NEW.
NEURON = dict(
    device="neuron", tp_degree=2, neuron_executor="xla-cpu", dtype="float32", buckets=(64,), max_context=64, batch_sizes=(1,)
)


# -- fixtures -----------------------------------------------------------------------------------


def _prompt_text(hf_tok) -> str:
    return hf_tok.apply_chat_template([{"role": "user", "content": USER_TEXT}], add_generation_prompt=True, tokenize=False)


@pytest.fixture(scope="module")
def prompt(hf_tok):
    """(text, ids) of the chat-templated prompt: the same ids through text, ids, completions and chat."""
    text = _prompt_text(hf_tok)
    ids = hf_tok(text)["input_ids"]
    templated = hf_tok.apply_chat_template([{"role": "user", "content": USER_TEXT}], add_generation_prompt=True, tokenize=True, return_dict=False)
    assert list(ids) == list(templated), "fixture: the rendered template must tokenize to the template's ids"
    return text, list(ids)


def _make_hot(model_dir: Path, ids: list[int], target: int) -> int:
    """Makes `target`'s output row 1.3x the row of the token greedy picks after `ids`, so the
    model emits `target` there by itself (its logit is 1.3x a positive maximum). Returns that token."""
    logits = hf_forward_logits(load_hf(model_dir), torch.tensor([ids]))[0, -1]
    top = int(logits.argmax())
    assert logits[top] > 0, "fixture: the greedy logit must be positive for its double to win"
    path = model_dir / "model.safetensors"
    weights = load_file(str(path))
    # Tied models (Gemma) keep only the embedding; untied ones (the Llama fixture) an lm_head.
    name = "lm_head.weight" if "lm_head.weight" in weights else "model.embed_tokens.weight"
    weights[name][target] = 1.3 * weights[name][top]
    save_file(weights, str(path), metadata={"format": "pt"})
    return top


@pytest.fixture(scope="module")
def big_dir(tmp_path_factory, hf_tok, prompt):
    """Gemma 3 with EXTRA_ROWS embedding rows past the tokenizer; gap id len(tok) + 5 is hot."""
    d = build_gemma(
        tmp_path_factory.mktemp("gap_big"), "gemma3", window=6, vocab_size=len(hf_tok) + EXTRA_ROWS, tie_word_embeddings=False
    )
    _make_hot(d, prompt[1], len(hf_tok) + 5)
    return d


@pytest.fixture(scope="module")
def big_llama_dir(tmp_path_factory, hf_tok, prompt):
    """The same gap on the Llama layout (untied head), for backends that do not run Gemma yet."""
    d = build_model(tmp_path_factory.mktemp("gap_llama"), "llama", vocab_size=len(hf_tok) + EXTRA_ROWS)
    _make_hot(d, prompt[1], len(hf_tok) + 5)
    return d


@pytest.fixture(scope="module")
def small_dir(tmp_path_factory, hf_tok):
    """Gemma 3 with one embedding row fewer than the tokenizer: `<|im_end|>` has no row."""
    return build_gemma(tmp_path_factory.mktemp("gap_small"), "gemma3", window=6, vocab_size=len(hf_tok) - 1)


@pytest.fixture(scope="module")
def target(hf_tok) -> int:
    return len(hf_tok) + 5


@pytest.fixture(scope="module")
def missing(hf_tok) -> int:
    """The tokenizer's last id, which the small fixture's embedding has no row for."""
    last = len(hf_tok) - 1
    assert hf_tok.convert_ids_to_tokens(last) == "<|im_end|>"
    return last


@pytest.fixture(scope="module")
def big_hf(big_dir):
    return load_hf(big_dir)


@pytest.fixture(scope="module")
def big_gen(kvgen, big_dir):
    return kvgen.Generator.from_pretrained(str(big_dir), backend="native")


def _load_quietly(kvgen, d, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return kvgen.Generator.from_pretrained(str(d), **kw)


@pytest.fixture(scope="module")
def small_gen(kvgen, small_dir):
    return _load_quietly(kvgen, small_dir, backend="native")


def _rows(d: Path) -> int:
    weights = load_file(str(d / "model.safetensors"))
    return int(weights["model.embed_tokens.weight"].shape[0])


def _expected_text(hf_tok, new_ids) -> str:
    """transformers' text of the new ids with the gap ids left out (they have no token)."""
    return hf_tok.decode([i for i in new_ids if i < len(hf_tok)], skip_special_tokens=True)


def _gap_warnings(record) -> list[str]:
    return [str(w.message) for w in record if UNKNOWN_ID_WARNING in str(w.message)]


def _app(gen):
    from kvgen.server import create_app

    return create_app(gen, model_name="gap", max_tokens_limit=32, max_prompt_tokens=64)


def _post(app, path, body):
    async def go():
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test") as client:
            return await client.post(path, json=body)

    return asyncio.run(go())


def _sse(text: str) -> list:
    events = [line[len("data: ") :] for line in text.splitlines() if line.startswith("data: ")]
    assert events and events[-1] == "[DONE]", events[-3:]
    return [json.loads(e) for e in events[:-1]]


def _greedy_new_ids(gen, ids) -> list[int]:
    out = gen.generate(torch.tensor([ids]), max_new_tokens=NEW, do_sample=False)
    return [int(t) for t in out[0, len(ids) :]]


# -- embedding larger than the tokenizer ---------------------------------------------------------


def test_fixture_has_the_gap(big_dir, small_dir, hf_tok, big_gen, small_gen):
    assert _rows(big_dir) == len(hf_tok) + EXTRA_ROWS == big_gen.config.vocab_size
    assert _rows(small_dir) == len(hf_tok) - 1 == small_gen.config.vocab_size
    assert len(big_gen.tokenizer) == len(small_gen.tokenizer) == len(hf_tok)


def test_no_load_warning_when_the_embedding_is_larger(kvgen, big_dir):
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        kvgen.Generator.from_pretrained(str(big_dir), backend="native")
    assert not [w for w in record if "embedding" in str(w.message)], [str(w.message) for w in record]


def test_logits_span_every_embedding_row_and_equal_transformers(big_gen, big_hf, big_dir, prompt):
    ids = torch.tensor([prompt[1]])
    got = torch.as_tensor(big_gen.logits(ids))
    ref = hf_forward_logits(big_hf, ids)
    assert got.shape == ref.shape == (1, ids.shape[1], _rows(big_dir))
    assert (got - ref).abs().max().item() <= LOGITS_ATOL
    # The rows past the tokenizer are real logits, not padding: the hot one wins at the end.
    assert int(got[0, -1].argmax()) >= len(big_gen.tokenizer)


def test_greedy_ids_hold_the_gap_id_and_equal_transformers(big_gen, big_hf, prompt, target):
    ids = torch.tensor([prompt[1]])
    ref = hf_generate(big_hf, ids, max_new_tokens=NEW, do_sample=False, return_dict_in_generate=True, output_logits=True)
    out = big_gen.generate(ids, max_new_tokens=NEW, do_sample=False)
    assert target in out[0, ids.shape[1] :].tolist()
    assert_sequences_match(out, ref, ids.shape[1], what="gap greedy", eos_ids=eos_ids_of(big_hf), min_compared=NEW // 2)


class ForceAt:
    """Makes `token` the argmax at the step where the sequence is `length` long (a user hook)."""

    def __init__(self, token: int, length: int):
        self.token, self.length = token, length

    def __call__(self, input_ids, scores):
        if input_ids.shape[1] != self.length:
            return scores
        scores = scores.clone() if isinstance(scores, torch.Tensor) else scores.copy()  # torch or numpy inputs
        scores[:, self.token] = scores.max() + 10.0
        return scores


@pytest.mark.filterwarnings(f"ignore:.*{UNKNOWN_ID_WARNING}")  # counted in the tests below
@pytest.mark.parametrize("how", ["logits_processor", "sequence_bias"])
def test_processors_can_force_a_gap_id_as_in_transformers(how, big_gen, big_hf, hf_tok, prompt, target):
    ids = torch.tensor([prompt[1]])
    forced = len(hf_tok) + EXTRA_ROWS - 1  # the embedding's last row
    if how == "logits_processor":
        from transformers import LogitsProcessorList

        kwargs = dict(logits_processor=LogitsProcessorList([ForceAt(forced, ids.shape[1] + 2)]))
    else:
        # After the hot gap id (greedy's first new token), the last row: two gap ids in a row.
        kwargs = dict(sequence_bias=[[[target, forced], 100.0]])
    ref = hf_generate(big_hf, ids, max_new_tokens=NEW, do_sample=False, return_dict_in_generate=True, output_logits=True, **kwargs)
    out = big_gen.generate(ids, max_new_tokens=NEW, do_sample=False, **kwargs)
    new = out[0, ids.shape[1] :].tolist()
    assert forced in new, new
    assert_sequences_match(out, ref, ids.shape[1], what=f"gap {how}", eos_ids=eos_ids_of(big_hf), min_compared=NEW // 2)
    assert big_gen.tokenizer.decode(new, skip_special_tokens=True) == _expected_text(hf_tok, new)


def test_every_text_api_decodes_a_gap_id_to_empty_with_one_warning(kvgen, big_dir, hf_tok, prompt, target):
    """generate's text, decode/batch_decode, stream, and the server (text, stream, logprobs and
    top_logprobs of both endpoints): "" for the gap id, never a crash, one warning in all."""
    text, ids = prompt
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        gen = kvgen.Generator.from_pretrained(str(big_dir), backend="native")
        new = _greedy_new_ids(gen, ids)  # ids out: no decoding, no warning yet
        assert target in new and new[0] == target, new
        assert not _gap_warnings(record)
        expected = _expected_text(hf_tok, new)
        assert expected, "fixture: the text around the gap id must not be empty"

        assert gen.generate(text, max_new_tokens=NEW, do_sample=False) == expected
        assert gen.generate([text], max_new_tokens=NEW, do_sample=False) == [expected]
        assert gen.tokenizer.batch_decode([new], skip_special_tokens=True) == [expected]
        assert gen.tokenizer.decode([target]) == ""
        assert "".join(gen.stream(text, max_new_tokens=NEW, do_sample=False)) == expected
        assert "".join(gen.stream(torch.tensor([ids]), max_new_tokens=NEW, do_sample=False)) == expected

        async def collect():
            return "".join([d async for d in gen.astream(text, max_new_tokens=NEW, do_sample=False)])

        assert asyncio.run(collect()) == expected
        assert asyncio.run(gen.agenerate(text, max_new_tokens=NEW, do_sample=False)) == expected

        app = _app(gen)
        body = {"model": "gap", "prompt": ids, "max_tokens": NEW, "temperature": 0, "logprobs": 3}
        r = _post(app, "/v1/completions", body)
        assert r.status_code == 200, r.text
        choice = r.json()["choices"][0]
        assert choice["text"] == expected
        tokens = choice["logprobs"]["tokens"]
        assert len(tokens) == NEW
        assert [t for t, i in zip(tokens, new) if i == target] == [""] * new.count(target)
        assert "" in choice["logprobs"]["top_logprobs"][0], choice["logprobs"]["top_logprobs"][0]
        assert "".join(tokens) == expected

        r = _post(app, "/v1/completions", dict(body, prompt=text, stream=True, logprobs=None))
        assert r.status_code == 200, r.text
        assert "".join(e["choices"][0]["text"] for e in _sse(r.text) if e.get("choices")) == expected

        chat = {
            "model": "gap", "messages": [{"role": "user", "content": USER_TEXT}], "max_tokens": NEW, "temperature": 0,
            "logprobs": True, "top_logprobs": 3,
        }
        r = _post(app, "/v1/chat/completions", chat)
        assert r.status_code == 200, r.text
        choice = r.json()["choices"][0]
        assert choice["message"]["content"] == expected
        first = choice["logprobs"]["content"][0]
        assert first["token"] == "" and first["bytes"] == []
        assert any(t["token"] == "" and t["bytes"] == [] for t in first["top_logprobs"])

        r = _post(app, "/v1/chat/completions", dict(chat, stream=True, logprobs=False, top_logprobs=None))
        assert r.status_code == 200, r.text
        deltas = [e["choices"][0]["delta"].get("content") or "" for e in _sse(r.text) if e.get("choices")]
        assert "".join(deltas) == expected
    assert len(_gap_warnings(record)) == 1, _gap_warnings(record)
    assert str(target) in _gap_warnings(record)[0]


def test_streaming_detokenizer_skips_a_gap_id_inside_a_split_character(big_gen, hf_tok, target):
    """'é' is two byte tokens; a gap id between them leaves the character whole, as in
    transformers' decode of the same ids, and the deltas add up to it."""
    from kvgen.streaming import TextAssembler

    first, second = hf_tok("é")["input_ids"]
    ids = [first, target, target + 1, second]
    assert hf_tok.decode(ids) == "é"
    assembler = TextAssembler(lambda t: big_gen.tokenizer.decode(t, skip_special_tokens=True), [])
    deltas = [assembler.push(i) for i in ids] + [assembler.finish()]
    assert "".join(deltas) == "é" and "\ufffd" not in "".join(deltas), deltas


def test_each_generator_warns_once_of_its_own(kvgen, big_dir, prompt):
    text, _ = prompt
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        for _ in range(2):
            gen = kvgen.Generator.from_pretrained(str(big_dir), backend="native")
            for _ in range(2):
                gen.generate(text, max_new_tokens=NEW, do_sample=False)
    assert len(_gap_warnings(record)) == 2, _gap_warnings(record)


@pytest.mark.parametrize("arch,tokenizer", [("llama", "llama"), ("qwen2", "gpt2")])
def test_gguf_vocabulary_is_the_embedding_rows(arch, tokenizer, kvgen, tmp_path):
    """A GGUF with embedding rows past its token list (and no vocab_size key): the vocabulary is
    token_embd's rows, not the token list's length (which would not even load: a shape mismatch)."""
    pytest.importorskip("gguf")
    from tiny_gguf import gpt2_vocab, spm_vocab, write_tiny

    n_tokens = len((spm_vocab if tokenizer == "llama" else gpt2_vocab)()[0])
    path = write_tiny(str(tmp_path / "gap.gguf"), arch, tokenizer, extra_rows=EXTRA_ROWS)
    gen = kvgen.Generator.from_pretrained(path, dtype="float32")
    assert len(gen.tokenizer) == n_tokens and gen.config.vocab_size == n_tokens + EXTRA_ROWS
    ids = [gen.tokenizer.encode("hello world")]
    assert gen.logits(ids).shape == (1, len(ids[0]), n_tokens + EXTRA_ROWS)
    forced = n_tokens + EXTRA_ROWS - 1
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        text = gen.generate("hello world", max_new_tokens=4, do_sample=False, logits_processor=[ForceAt(forced, len(ids[0]))])
        out = gen.generate(ids, max_new_tokens=4, do_sample=False, logits_processor=[ForceAt(forced, len(ids[0]))])
    new = [int(t) for t in np.asarray(out)[0, len(ids[0]) :]]
    assert new[0] == forced
    assert text == gen.tokenizer.decode(new[1:], skip_special_tokens=True)
    assert len(_gap_warnings(record)) == 1


# -- embedding smaller than the tokenizer --------------------------------------------------------


def test_load_warns_naming_the_tokens_past_the_embedding(kvgen, small_dir, missing):
    with pytest.warns(UserWarning) as record:
        kvgen.Generator.from_pretrained(str(small_dir), backend="native")
    ours = [w for w in record if "embedding" in str(w.message)]
    msgs = [str(w.message) for w in ours]
    assert len(msgs) == 1, msgs
    assert ours[0].filename == __file__, "the warning should point at the from_pretrained call"
    assert f"'<|im_end|>' = {missing}" in msgs[0] and f"{missing} rows" in msgs[0] and "TokenOutOfRangeError" in msgs[0]


def test_logits_of_the_smaller_embedding_equal_transformers(small_gen, small_dir, hf_tok):
    ids = torch.tensor([hf_tok(USER_TEXT)["input_ids"]])
    got = torch.as_tensor(small_gen.logits(ids))
    ref = hf_forward_logits(load_hf(small_dir), ids)
    assert got.shape == ref.shape == (1, ids.shape[1], len(hf_tok) - 1)
    assert (got - ref).abs().max().item() <= LOGITS_ATOL


def _assert_names_id_size_and_fix(err, missing):
    msg = str(err)
    assert f"token id {missing} " in msg, msg
    assert f"vocabulary has {missing} ids" in msg and "embedding" in msg, msg
    assert "remove that id from the prompt" in msg, msg


def _call(gen, how: str, hf_tok, missing):
    """Each way a prompt can reach the model, with the out-of-range id in it."""
    ids = hf_tok(USER_TEXT)["input_ids"] + [missing]
    text = USER_TEXT + "<|im_end|>"
    assert hf_tok(text)["input_ids"] == ids, "fixture: the text must tokenize to the special token's id"
    if how == "ids":
        return gen.generate(torch.tensor([ids]), max_new_tokens=NEW)
    if how == "numpy_batch":
        return gen.generate(np.array([ids, [1] * len(ids)]), max_new_tokens=NEW)
    if how == "text":
        return gen.generate(text, max_new_tokens=NEW)
    if how == "stream":
        return list(gen.stream(text, max_new_tokens=NEW))
    if how == "agenerate":
        return asyncio.run(gen.agenerate(torch.tensor([ids]), max_new_tokens=NEW))
    if how == "logits":
        return gen.logits(torch.tensor([ids]))
    if how == "logits_text":
        return gen.logits(text)
    raise AssertionError(how)


HOWS = ["ids", "numpy_batch", "text", "stream", "agenerate", "logits", "logits_text"]


@pytest.mark.parametrize("how", HOWS)
def test_out_of_range_prompt_raises_before_compute(how, kvgen, small_gen, hf_tok, missing):
    steps = small_gen.scheduler_stats()["steps"]
    with pytest.raises(kvgen.TokenOutOfRangeError) as info:
        _call(small_gen, how, hf_tok, missing)
    _assert_names_id_size_and_fix(info.value, missing)
    assert small_gen.scheduler_stats()["steps"] == steps, "the model ran a step before refusing the prompt"
    # The generator still serves prompts inside the embedding.
    assert small_gen.generate(USER_TEXT, max_new_tokens=2, do_sample=False) is not None


def test_masked_out_of_range_id_is_not_a_prompt_token(small_gen, hf_tok, missing):
    """A padded position (mask 0) is not read, as in transformers' left padding: no error."""
    ids = hf_tok(USER_TEXT)["input_ids"]
    out = small_gen.generate(torch.tensor([[missing] + ids]), attention_mask=torch.tensor([[0] + [1] * len(ids)]), max_new_tokens=2)
    assert out.shape == (1, len(ids) + 3)


@pytest.mark.parametrize(
    "path,body",
    [
        ("/v1/completions", {"prompt": USER_TEXT + "<|im_end|>"}),
        ("/v1/completions", {"prompt": "IDS"}),
        ("/v1/completions", {"prompt": [USER_TEXT, USER_TEXT + "<|im_end|>"]}),
        ("/v1/completions", {"prompt": USER_TEXT + "<|im_end|>", "stream": True}),
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": USER_TEXT}]}),
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": USER_TEXT}], "stream": True}),
    ],
    ids=["text", "ids", "batch", "stream", "chat", "chat_stream"],
)
def test_server_answers_400_naming_the_id(path, body, small_gen, hf_tok, missing):
    """The chat template itself emits `<|im_end|>`, so every chat request hits the gap."""
    body = dict(body, model="gap", max_tokens=4, temperature=0)
    if body.get("prompt") == "IDS":
        body["prompt"] = hf_tok(USER_TEXT)["input_ids"] + [missing]
    steps = small_gen.scheduler_stats()["steps"]
    r = _post(_app(small_gen), path, body)
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["type"] == "invalid_request_error"
    _assert_names_id_size_and_fix(error["message"], missing)
    assert small_gen.scheduler_stats()["steps"] == steps


def test_server_serves_prompts_inside_the_smaller_embedding(small_gen, hf_tok):
    body = {"model": "gap", "prompt": USER_TEXT, "max_tokens": 4, "temperature": 0, "logprobs": 2}
    r = _post(_app(small_gen), "/v1/completions", body)
    assert r.status_code == 200, r.text
    expected = small_gen.generate(USER_TEXT, max_new_tokens=4, do_sample=False)
    assert r.json()["choices"][0]["text"] == expected


# -- other backends ------------------------------------------------------------------------------


def _needs(kvgen, kw):
    if kw.get("device") == "neuron":
        pytest.importorskip("jax", reason="jax / jaxlib run the Neuron graphs on XLA:CPU")
    if kw.get("backend") == "torch" and not kvgen._kvgen.HAS_TORCH:
        pytest.skip("kvgen was built without the `torch` feature (see README)")


BACKENDS = {
    "torch_cpu": dict(backend="torch"),
    "tp2": dict(backend="native", tp_degree=2),
    "neuron_xla_cpu": NEURON,
}


@pytest.mark.parametrize("backend", list(BACKENDS))
def test_out_of_range_prompt_raises_on_every_backend(backend, kvgen, small_dir, hf_tok, missing):
    """Before compute: on the torch backend a Gemma 3 step would fail on its sliding layers
    (not on that backend yet), so getting TokenOutOfRangeError proves no step ran."""
    kw = BACKENDS[backend]
    _needs(kvgen, kw)
    with pytest.warns(UserWarning, match="embedding has"):
        gen = kvgen.Generator.from_pretrained(str(small_dir), **kw)
    steps = gen.scheduler_stats()["steps"]
    for how in ("ids", "text", "stream", "logits"):
        with pytest.raises(kvgen.TokenOutOfRangeError) as info:
            _call(gen, how, hf_tok, missing)
        _assert_names_id_size_and_fix(info.value, missing)
    assert gen.scheduler_stats()["steps"] == steps


def _gap_on_backend(kvgen, d, kw, hf_tok, prompt, target):
    """Logits width and values, greedy ids (with the hot gap id) and text on one backend."""
    gen = kvgen.Generator.from_pretrained(str(d), **kw)
    hf = load_hf(d)
    ids = torch.tensor([prompt[1]])
    rows = len(hf_tok) + EXTRA_ROWS
    if kw.get("device") != "neuron":  # Neuron graphs return the last position's logits only
        got = torch.as_tensor(gen.logits(ids))
        ref = hf_forward_logits(hf, ids)
        assert got.shape == ref.shape == (1, ids.shape[1], rows)
        assert (got - ref).abs().max().item() <= LOGITS_ATOL
    href = hf_generate(hf, ids, max_new_tokens=NEW, do_sample=False, return_dict_in_generate=True, output_logits=True)
    out = gen.generate(ids, max_new_tokens=NEW, do_sample=False, return_dict_in_generate=True, output_logits=True)
    # Each step's logits span every row, as transformers' (the first step: before any gap id is fed back).
    first, ref_first = torch.as_tensor(out.logits[0]), href.logits[0].float()
    assert first.shape == ref_first.shape == (1, rows)
    assert (first - ref_first).abs().max().item() <= LOGITS_ATOL
    new = out.sequences[0, ids.shape[1] :].tolist()
    assert target in new, new
    assert_sequences_match(out.sequences, href, ids.shape[1], what=f"gap {kw}", eos_ids=eos_ids_of(hf), min_compared=NEW // 2)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        assert gen.generate(prompt[0], max_new_tokens=NEW, do_sample=False) == _expected_text(hf_tok, new)
        assert "".join(gen.stream(prompt[0], max_new_tokens=NEW, do_sample=False)) == _expected_text(hf_tok, new)
    assert len(_gap_warnings(record)) == 1


@pytest.mark.parametrize("backend", ["tp2", "neuron_xla_cpu"])
def test_larger_embedding_on_other_backends(backend, kvgen, big_dir, hf_tok, prompt, target):
    kw = BACKENDS[backend]
    _needs(kvgen, kw)
    _gap_on_backend(kvgen, big_dir, kw, hf_tok, prompt, target)


def test_larger_embedding_on_the_torch_backend_llama(kvgen, big_llama_dir, hf_tok, prompt, target):
    _needs(kvgen, BACKENDS["torch_cpu"])
    _gap_on_backend(kvgen, big_llama_dir, BACKENDS["torch_cpu"], hf_tok, prompt, target)


def test_larger_embedding_on_the_torch_backend_gemma(kvgen, big_dir, hf_tok, prompt, target):
    _needs(kvgen, BACKENDS["torch_cpu"])
    _gap_on_backend(kvgen, big_dir, BACKENDS["torch_cpu"], hf_tok, prompt, target)
