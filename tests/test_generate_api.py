"""generate() API behaviour against transformers 5.x on one kind (tiny Llama): return kinds and
shapes per input kind, padding of finished rows, eos / length controls, num_return_sequences,
stop_strings, streamers, return_dict_in_generate outputs, generation_config objects, argument
validation and the right-padding warning.

Every test runs the same call through transformers (the reference) and kvgen and compares.
"""

from __future__ import annotations

import logging
import warnings

import numpy as np
import pytest
import torch
import transformers
from transformers import GenerationConfig, TextIteratorStreamer, TextStreamer

from tiny_models import PROMPTS, hf_generate, to_torch

KIND = "llama"
NEW = 12


# -- fixtures -----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def hf(hf_model):
    return hf_model(KIND)


@pytest.fixture(scope="module")
def gen(kv_model):
    return kv_model(KIND)


@pytest.fixture(scope="module")
def enc(hf_tok):
    e = hf_tok(PROMPTS, padding=True, padding_side="left", return_tensors="pt")
    assert (e["attention_mask"] == 0).any()
    return e


@pytest.fixture(scope="module")
def prompt_len(enc):
    return enc["input_ids"].shape[1]


@pytest.fixture(scope="module")
def ref_batch(hf, enc):
    """HF greedy run of the batch (no early eos: the fixture's eos never shows up in 24 tokens)."""
    out = hf_generate(hf, **enc, max_new_tokens=24, do_sample=False)
    return out


def _new_tokens(seqs, prompt_len):
    return seqs[:, prompt_len:]


def _pick_eos(ref_batch, prompt_len, row, steps=range(1, 6), avoid_rows=None):
    """A token that `row` emits at one of `steps` (first occurrence in that row) and that no other
    row (or only rows not in `avoid_rows`) emits in the reference run: using it as eos finishes
    `row` early while the others keep going."""
    new = _new_tokens(ref_batch, prompt_len)
    others = [r for r in range(new.shape[0]) if r != row] if avoid_rows is None else avoid_rows
    for step in steps:
        tok = int(new[row, step])
        if tok in new[row, :step].tolist():
            continue
        if any(tok in new[r].tolist() for r in others):
            continue
        return tok, step
    raise AssertionError(f"fixture: no usable early-eos token for row {row}")


def _cmp(kv_out, hf_out):
    kv_out = to_torch(kv_out)
    assert tuple(kv_out.shape) == tuple(hf_out.shape), f"shape {tuple(kv_out.shape)} vs HF {tuple(hf_out.shape)}"
    assert torch.equal(kv_out.long(), hf_out), f"\nkvgen: {kv_out.tolist()}\nHF:    {hf_out.tolist()}"


# -- return kinds and shapes --------------------------------------------------------------------


def test_torch_in_torch_out(gen, hf, enc):
    ref = hf_generate(hf, **enc, max_new_tokens=NEW, do_sample=False)
    out = gen.generate(enc["input_ids"], attention_mask=enc["attention_mask"], max_new_tokens=NEW, do_sample=False)
    assert isinstance(out, torch.Tensor), type(out)
    assert out.dtype == torch.int64
    _cmp(out, ref)


@pytest.mark.parametrize("np_dtype", [np.int64, np.int32])
def test_numpy_in_numpy_out(gen, hf, enc, np_dtype):
    ref = hf_generate(hf, **enc, max_new_tokens=NEW, do_sample=False)
    ids = enc["input_ids"].numpy().astype(np_dtype)
    mask = enc["attention_mask"].numpy().astype(np_dtype)
    out = gen.generate(ids, attention_mask=mask, max_new_tokens=NEW)
    assert isinstance(out, np.ndarray), type(out)
    assert out.dtype == np.int64
    _cmp(out, ref)


def test_list_int_in_list_int_out(gen, hf, hf_tok):
    ids = hf_tok(PROMPTS[2])["input_ids"]
    ref = hf_generate(hf, torch.tensor([ids]), max_new_tokens=NEW, do_sample=False)
    out = gen.generate(list(ids), max_new_tokens=NEW)
    assert isinstance(out, list), type(out)
    assert all(type(t) is int for t in out), [type(t) for t in out]
    assert out == ref[0].tolist()


def test_list_list_int_in_list_list_int_out(gen, hf, hf_tok):
    rows = [hf_tok(p)["input_ids"] for p in PROMPTS]
    n = min(len(r) for r in rows)
    rows = [r[:n] for r in rows]  # equal lengths, no padding
    ref = hf_generate(hf, torch.tensor(rows), max_new_tokens=NEW, do_sample=False)
    out = gen.generate(rows, max_new_tokens=NEW)
    assert isinstance(out, list) and all(isinstance(r, list) for r in out), type(out)
    assert all(type(t) is int for r in out for t in r)
    assert out == ref.tolist()


def test_str_in_str_out(gen, hf, hf_tok):
    text = PROMPTS[2]
    e = hf_tok(text, return_tensors="pt")
    ref = hf_generate(hf, **e, max_new_tokens=NEW, do_sample=False)
    expected = hf_tok.decode(ref[0, e["input_ids"].shape[1] :], skip_special_tokens=True)
    out = gen.generate(text, max_new_tokens=NEW)
    assert isinstance(out, str), type(out)
    assert out == expected  # newly generated text only, no prompt


def test_list_str_in_list_str_out(gen, hf, hf_tok, enc, prompt_len, ref_batch):
    """Text batch: kvgen left-pads internally; finished rows' pad tokens (special) are skipped."""
    eos, _ = _pick_eos(ref_batch, prompt_len, row=0)
    ref = hf_generate(hf, **enc, max_new_tokens=NEW, do_sample=False, eos_token_id=eos)
    assert (ref[0, prompt_len:] == hf_tok.pad_token_id).any(), "fixture: row 0 must finish early"
    expected = hf_tok.batch_decode(ref[:, prompt_len:], skip_special_tokens=True)
    out = gen.generate(list(PROMPTS), max_new_tokens=NEW, eos_token_id=eos)
    assert isinstance(out, list) and all(isinstance(s, str) for s in out)
    assert out == expected


def test_input_ids_keyword_and_tokenizer_output_splat(gen, hf, enc):
    ref = hf_generate(hf, **enc, max_new_tokens=NEW, do_sample=False)
    _cmp(gen.generate(**enc, max_new_tokens=NEW), ref)
    _cmp(gen.generate(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"], max_new_tokens=NEW), ref)


def test_attention_mask_inferred_from_pad_tokens(gen, hf, enc):
    """No attention_mask given: HF infers it as input_ids != pad_token_id (pad != eos here)."""
    ref = hf_generate(hf, enc["input_ids"], max_new_tokens=NEW, do_sample=False)
    _cmp(gen.generate(enc["input_ids"], max_new_tokens=NEW), ref)


# -- finished rows, eos, lengths ----------------------------------------------------------------


def test_finished_rows_padded_with_pad_token(gen, hf, hf_tok, enc, prompt_len, ref_batch):
    eos, step = _pick_eos(ref_batch, prompt_len, row=0)
    ref = hf_generate(hf, **enc, max_new_tokens=NEW, do_sample=False, eos_token_id=eos)
    # HF: the eos itself is kept, every later position of that row is pad_token_id
    assert ref[0, prompt_len + step] == eos
    assert (ref[0, prompt_len + step + 1 :] == hf_tok.pad_token_id).all()
    assert ref.shape[1] == prompt_len + NEW
    _cmp(gen.generate(enc["input_ids"], attention_mask=enc["attention_mask"], max_new_tokens=NEW, eos_token_id=eos), ref)


def test_pad_token_id_kwarg_used_for_finished_rows(gen, hf, enc, prompt_len, ref_batch):
    eos, _ = _pick_eos(ref_batch, prompt_len, row=0)
    ref = hf_generate(hf, **enc, max_new_tokens=NEW, do_sample=False, eos_token_id=eos, pad_token_id=7)
    assert (ref[0, -1] == 7).item()
    out = gen.generate(**enc, max_new_tokens=NEW, eos_token_id=eos, pad_token_id=7)
    _cmp(out, ref)


def test_eos_token_id_list(gen, hf, enc, prompt_len, ref_batch):
    eos0, _ = _pick_eos(ref_batch, prompt_len, row=0)
    eos1, _ = _pick_eos(ref_batch, prompt_len, row=1, avoid_rows=[2, 3])
    ref = hf_generate(hf, **enc, max_new_tokens=NEW, do_sample=False, eos_token_id=[eos0, eos1])
    out = gen.generate(**enc, max_new_tokens=NEW, eos_token_id=[eos0, eos1])
    _cmp(out, ref)


def test_all_rows_finished_stops_early(gen, hf, hf_tok):
    e = hf_tok(PROMPTS[1], return_tensors="pt")
    n = e["input_ids"].shape[1]
    full = hf_generate(hf, **e, max_new_tokens=NEW, do_sample=False)
    eos = int(full[0, n + 3])
    first = full[0, n:].tolist().index(eos)
    ref = hf_generate(hf, **e, max_new_tokens=NEW, do_sample=False, eos_token_id=eos)
    assert ref.shape[1] == n + first + 1  # HF stops when every row is done
    _cmp(gen.generate(**e, max_new_tokens=NEW, eos_token_id=eos), ref)
    # same through the list[int] path
    assert gen.generate(e["input_ids"][0].tolist(), max_new_tokens=NEW, eos_token_id=eos) == ref[0].tolist()


def test_max_length(gen, hf, enc, prompt_len):
    """max_length counts the (padded) prompt."""
    ref = hf_generate(hf, **enc, max_length=prompt_len + 7, do_sample=False)
    assert ref.shape[1] == prompt_len + 7
    _cmp(gen.generate(**enc, max_length=prompt_len + 7), ref)


def test_max_new_tokens_takes_precedence_over_max_length(gen, hf, enc, prompt_len):
    ref = hf_generate(hf, **enc, max_new_tokens=5, max_length=prompt_len + 9, do_sample=False)
    assert ref.shape[1] == prompt_len + 5
    _cmp(gen.generate(**enc, max_new_tokens=5, max_length=prompt_len + 9), ref)


def test_default_length_is_20_new_tokens(gen, hf, hf_tok):
    """No length given anywhere: transformers 5.x generates 20 new tokens (max_length = 20 + prompt
    length, capped at max_position_embeddings)."""
    e = hf_tok(PROMPTS[0], return_tensors="pt")
    ref = hf_generate(hf, **e)
    assert ref.shape[1] == e["input_ids"].shape[1] + 20
    _cmp(gen.generate(**e), ref)


def test_min_new_tokens_suppresses_eos(gen, hf, enc, prompt_len, ref_batch):
    eos, step = _pick_eos(ref_batch, prompt_len, row=0, steps=range(1, 3))
    plain = hf_generate(hf, **enc, max_new_tokens=NEW, do_sample=False, eos_token_id=eos)
    ref = hf_generate(hf, **enc, max_new_tokens=NEW, do_sample=False, eos_token_id=eos, min_new_tokens=step + 3)
    assert not torch.equal(plain, ref), "fixture: min_new_tokens must change the result"
    _cmp(gen.generate(**enc, max_new_tokens=NEW, eos_token_id=eos, min_new_tokens=step + 3), ref)


def test_min_length_suppresses_eos(gen, hf, enc, prompt_len, ref_batch):
    """min_length counts the (padded) prompt, like max_length."""
    eos, step = _pick_eos(ref_batch, prompt_len, row=0, steps=range(1, 3))
    plain = hf_generate(hf, **enc, max_new_tokens=NEW, do_sample=False, eos_token_id=eos)
    ref = hf_generate(
        hf, **enc, max_new_tokens=NEW, do_sample=False, eos_token_id=eos, min_length=prompt_len + step + 3
    )
    assert not torch.equal(plain, ref), "fixture: min_length must change the result"
    _cmp(gen.generate(**enc, max_new_tokens=NEW, eos_token_id=eos, min_length=prompt_len + step + 3), ref)


# -- num_return_sequences -----------------------------------------------------------------------


def test_num_return_sequences_greedy_raises_value_error(gen, hf, enc):
    with pytest.raises(ValueError, match="num_return_sequences"):
        hf_generate(hf, **enc, max_new_tokens=3, do_sample=False, num_return_sequences=2)
    with pytest.raises(ValueError, match="num_return_sequences"):
        gen.generate(**enc, max_new_tokens=3, do_sample=False, num_return_sequences=2)


def test_num_return_sequences_one_is_fine(gen, hf, enc):
    ref = hf_generate(hf, **enc, max_new_tokens=NEW, do_sample=False, num_return_sequences=1)
    _cmp(gen.generate(**enc, max_new_tokens=NEW, num_return_sequences=1), ref)


# -- stop_strings -------------------------------------------------------------------------------


def _pick_stop_string(hf_tok, ref_batch, prompt_len, row=0):
    """A 2-char ASCII stop string made of the last char of new token k-1 and the first char of new
    token k (so it spans a token boundary, and overhangs when token k is longer)."""
    new = _new_tokens(ref_batch, prompt_len)[row].tolist()
    for k in range(2, 10):
        a = hf_tok.decode([new[k - 1]])
        b = hf_tok.decode([new[k]])
        if a and b and a[-1].isascii() and a[-1].isalpha() and b[0].isascii() and b[0].isalpha():
            return a[-1] + b[0]
    raise AssertionError("fixture: no stop string candidate")


@pytest.mark.parametrize("as_list", [True, False])
def test_stop_strings(gen, hf, hf_tok, enc, prompt_len, ref_batch, as_list):
    stop = _pick_stop_string(hf_tok, ref_batch, prompt_len)
    arg = [stop] if as_list else stop
    ref = hf_generate(hf, **enc, max_new_tokens=NEW, do_sample=False, stop_strings=arg, tokenizer=hf_tok)
    assert (ref[0, prompt_len:] == hf_tok.pad_token_id).any(), "fixture: stop string must end row 0 early"
    # kvgen owns its tokenizer: no tokenizer= needed
    _cmp(gen.generate(**enc, max_new_tokens=NEW, stop_strings=arg), ref)


def test_stop_strings_single_prompt_stops_generation(gen, hf, hf_tok):
    e = hf_tok(PROMPTS[0], return_tensors="pt")
    n = e["input_ids"].shape[1]
    full = hf_generate(hf, **e, max_new_tokens=NEW, do_sample=False)
    stop = _pick_stop_string(hf_tok, full, n)
    ref = hf_generate(hf, **e, max_new_tokens=NEW, do_sample=False, stop_strings=[stop], tokenizer=hf_tok)
    assert ref.shape[1] < n + NEW
    _cmp(gen.generate(**e, max_new_tokens=NEW, stop_strings=[stop]), ref)


# -- streamers ----------------------------------------------------------------------------------


class Recorder:
    """A duck-typed streamer: HF only calls put(value) and end()."""

    def __init__(self):
        self.calls = []

    def put(self, value):
        self.calls.append(
            ("put", isinstance(value, torch.Tensor), str(value.dtype), tuple(value.shape), value.tolist())
        )

    def end(self):
        self.calls.append(("end",))


def test_custom_streamer_batch_call_pattern(gen, hf, enc, prompt_len, ref_batch):
    """HF: put(prompt ids, shape (batch, prompt_len)), then put(tokens, shape (batch,)) once per
    step (finished rows get pad_token_id), then end(). torch tensors for torch input."""
    eos, _ = _pick_eos(ref_batch, prompt_len, row=0)
    a, b = Recorder(), Recorder()
    hf_generate(hf, **enc, max_new_tokens=6, do_sample=False, eos_token_id=eos, streamer=a)
    gen.generate(**enc, max_new_tokens=6, eos_token_id=eos, streamer=b)
    assert a.calls[0][3] == tuple(enc["input_ids"].shape) and a.calls[1][3] == (len(PROMPTS),)
    assert b.calls == a.calls


def test_custom_streamer_single_prompt(gen, hf, hf_tok):
    e = hf_tok(PROMPTS[1], return_tensors="pt")
    a, b = Recorder(), Recorder()
    hf_generate(hf, **e, max_new_tokens=5, do_sample=False, streamer=a)
    gen.generate(**e, max_new_tokens=5, streamer=b)
    assert b.calls == a.calls


@pytest.mark.parametrize("skip_prompt", [False, True])
def test_text_iterator_streamer(gen, hf, hf_tok, skip_prompt):
    e = hf_tok(PROMPTS[1], return_tensors="pt")
    s_hf = TextIteratorStreamer(hf_tok, skip_prompt=skip_prompt, timeout=30)
    s_kv = TextIteratorStreamer(hf_tok, skip_prompt=skip_prompt, timeout=30)
    hf_generate(hf, **e, max_new_tokens=NEW, do_sample=False, streamer=s_hf)
    gen.generate(**e, max_new_tokens=NEW, streamer=s_kv)
    # the queue is unbounded, so reading after generate() returns is fine
    assert list(s_kv) == list(s_hf)


def test_text_streamer_prints_same_text(gen, hf, hf_tok, capsys):
    e = hf_tok(PROMPTS[2], return_tensors="pt")
    hf_generate(hf, **e, max_new_tokens=NEW, do_sample=False, streamer=TextStreamer(hf_tok))
    expected = capsys.readouterr().out
    gen.generate(**e, max_new_tokens=NEW, streamer=TextStreamer(hf_tok))
    assert capsys.readouterr().out == expected


# -- return_dict_in_generate --------------------------------------------------------------------


def test_return_dict_scores_and_logits(gen, hf, hf_tok, enc, prompt_len, ref_batch):
    """.sequences as usual; .scores = processed scores (here min_new_tokens puts -inf on eos),
    .logits = raw logits; tuples with one (batch, vocab) float tensor per generated step."""
    eos, step = _pick_eos(ref_batch, prompt_len, row=0, steps=range(1, 3))
    kwargs = dict(
        max_new_tokens=8,
        do_sample=False,
        eos_token_id=eos,
        min_new_tokens=step + 2,
        return_dict_in_generate=True,
        output_scores=True,
        output_logits=True,
    )
    ref = hf_generate(hf, **enc, **kwargs)
    out = gen.generate(**enc, **kwargs)
    _cmp(out.sequences, ref.sequences)
    vocab = len(hf_tok)
    n_steps = ref.sequences.shape[1] - prompt_len
    for name in ("scores", "logits"):
        got_all, exp_all = getattr(out, name), getattr(ref, name)
        assert isinstance(got_all, tuple), f".{name} is {type(got_all)}, HF gives a tuple"
        assert len(got_all) == len(exp_all) == n_steps
        for s, (got, exp) in enumerate(zip(got_all, exp_all)):
            got = to_torch(got)
            assert tuple(got.shape) == (len(PROMPTS), vocab), (name, s, got.shape)
            assert got.dtype.is_floating_point
            got, exp = got.float(), exp.float()
            assert torch.equal(torch.isinf(got), torch.isinf(exp)), f".{name}[{s}]: -inf positions differ"
            fin = torch.isfinite(exp)
            diff = (got[fin] - exp[fin]).abs().max().item()
            assert diff <= 1e-4, f".{name}[{s}] max |diff| {diff:.3g}"
    # min_new_tokens made the processed scores differ from the raw logits on the eos column
    assert torch.isinf(ref.scores[0][:, eos]).all() and not torch.isinf(ref.logits[0][:, eos]).any()


def test_return_dict_without_outputs(gen, hf, enc):
    ref = hf_generate(hf, **enc, max_new_tokens=4, do_sample=False, return_dict_in_generate=True)
    out = gen.generate(**enc, max_new_tokens=4, return_dict_in_generate=True)
    _cmp(out.sequences, ref.sequences)
    assert ref.scores is None and ref.logits is None
    assert out.scores is None and out.logits is None


def test_output_cache_field_and_old_name():
    """transformers 5.24 named the field `cache`; `past_key_values` still answers (attribute, key,
    `in`, `get`, constructor keyword) on both transformers' output and kvgen's."""
    import dataclasses

    from transformers.generation.utils import GenerateDecoderOnlyOutput as HFOut

    from kvgen import GenerateDecoderOnlyOutput as KVOut

    assert [f.name for f in dataclasses.fields(KVOut)] == [f.name for f in dataclasses.fields(HFOut)]
    marker = object()
    for cls in (HFOut, KVOut):
        for out in (cls(sequences=torch.zeros(1, 1), cache=marker), cls(sequences=torch.zeros(1, 1), past_key_values=marker)):
            assert out.cache is marker and out.past_key_values is marker, cls
            assert out["cache"] is marker and out["past_key_values"] is marker, cls
            assert "cache" in out and "past_key_values" in out, cls
            assert out.get("past_key_values") is marker, cls
            assert list(out.keys()) == ["sequences", "cache"], cls
    empty = KVOut(sequences=torch.zeros(1, 1))
    assert empty.past_key_values is None and "past_key_values" not in empty
    with pytest.raises(TypeError, match="cache"):
        KVOut(sequences=None, cache=1, past_key_values=2)


def test_return_dict_has_both_cache_names(gen, enc):
    # kvgen keeps its cache inside the engine: both names read None, as transformers' use_cache=False does.
    out = gen.generate(**enc, max_new_tokens=2, return_dict_in_generate=True)
    assert out.cache is None and out.past_key_values is None

# -- generation_config and argument validation --------------------------------------------------


def test_transformers_generation_config_accepted(gen, hf, enc, prompt_len, ref_batch):
    eos, _ = _pick_eos(ref_batch, prompt_len, row=0)
    cfg = GenerationConfig(max_new_tokens=9, do_sample=False, eos_token_id=eos)
    ref = hf_generate(hf, **enc, generation_config=cfg)
    _cmp(gen.generate(**enc, generation_config=cfg), ref)
    # pad_token_id is not in cfg: HF fills it from the model's generation_config
    cfg2 = GenerationConfig(max_new_tokens=6, do_sample=False)
    _cmp(gen.generate(enc["input_ids"], cfg2, attention_mask=enc["attention_mask"]), hf_generate(hf, **enc, generation_config=cfg2))


def test_generation_config_not_mutated(gen, enc):
    cfg = GenerationConfig(max_new_tokens=3, do_sample=False)
    before = cfg.to_dict()
    gen.generate(**enc, generation_config=cfg)
    assert cfg.to_dict() == before


def test_unknown_kwarg_raises_value_error(gen, hf, enc):
    with pytest.raises(ValueError, match="foo_bar"):
        hf_generate(hf, **enc, max_new_tokens=2, foo_bar=1)
    with pytest.raises(ValueError, match="foo_bar"):
        gen.generate(**enc, max_new_tokens=2, foo_bar=1)


def _warning_texts(fn, caplog):
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        with caplog.at_level(logging.WARNING):
            caplog.clear()
            fn()
    return [str(w.message) for w in rec] + [r.getMessage() for r in caplog.records]


def test_right_padding_warns(gen, hf_tok, caplog):
    """HF logs: "A decoder-only architecture is being used, but right-padding was detected! For
    correct generation results, please set `padding_side='left'` when initializing the tokenizer."
    kvgen must warn too (Python warnings or logging)."""
    e = hf_tok(PROMPTS, padding=True, padding_side="right", return_tensors="pt")
    texts = _warning_texts(lambda: gen.generate(**e, max_new_tokens=2), caplog)
    assert any("right-padding" in t.lower() or "right padding" in t.lower() for t in texts), texts


def test_left_padding_does_not_warn(gen, enc, caplog):
    texts = _warning_texts(lambda: gen.generate(**enc, max_new_tokens=2), caplog)
    assert not any("right-padding" in t.lower() or "right padding" in t.lower() for t in texts), texts


def test_transformers_version_is_5():
    assert int(transformers.__version__.split(".")[0]) >= 5


def test_flat_list_with_several_return_sequences_gives_one_list_per_row(gen):
    out = gen.generate([5, 6, 7], do_sample=True, num_return_sequences=3, max_new_tokens=4, min_new_tokens=4, seed=1)
    assert isinstance(out, list) and len(out) == 3, out
    assert all(isinstance(row, list) and row[:3] == [5, 6, 7] and len(row) == 7 for row in out), out
    assert out == gen.generate([[5, 6, 7]], do_sample=True, num_return_sequences=3, max_new_tokens=4, min_new_tokens=4, seed=1)
    assert isinstance(gen.generate([5, 6, 7], max_new_tokens=2)[0], int)  # one row out stays flat


def test_logprobs_are_computed_per_step_from_the_raw_logits(gen):
    """The engine's per-step logprobs (what the server's `logprobs` reports) equal a float64
    log-softmax of that step's raw logits, top entries in a stable sort's order."""
    kwargs = dict(max_new_tokens=6, do_sample=True, seed=3, num_return_sequences=2, return_dict_in_generate=True, output_logits=True)
    request, _ = gen._submit([[5, 6, 7]], kwargs, stream_steps=False, doorbell=False, logprobs=4)
    tokens, _, logits, logprobs, _ = request.wait_result()
    compared = 0
    for row in range(2):
        assert 1 <= len(logprobs[row]) <= tokens.shape[1]
        for step, (token, logprob, top) in enumerate(logprobs[row]):
            raw = logits[step][row].astype(np.float64)
            ref = raw - raw.max() - np.log(np.exp(raw - raw.max()).sum())
            assert token == tokens[row, step]
            assert logprob == pytest.approx(ref[token], abs=1e-9)
            assert [t for t, _ in top] == list(np.argsort(-ref, kind="stable")[:4])
            assert [v for _, v in top] == pytest.approx(list(np.sort(ref)[::-1][:4]), abs=1e-9)
            compared += 1
    assert compared >= 2


def test_huge_max_new_tokens_is_an_error_not_an_abort(kv_model, kvgen):
    """Dynamic NTK RoPE has no context check, so only kvgen's bounds stand between a huge
    max_new_tokens and a multi-terabyte allocation."""
    gen = kv_model("llama_dynamic_rope")
    with pytest.raises(kvgen.InvalidInputError, match="limit of 2147483648"):
        gen.generate([[5, 6, 7]], max_new_tokens=10**12)
    with pytest.raises(kvgen.InvalidInputError, match="max_cache_tokens="):
        gen.generate([[5, 6, 7]], max_new_tokens=10**9)
    with pytest.raises(kvgen.InvalidInputError, match="max_sequences=256"):
        gen.generate([[5, 6, 7]] * 257, max_new_tokens=2)
    assert len(gen.generate([[5, 6, 7]], max_new_tokens=2)[0]) == 5
