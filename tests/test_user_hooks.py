"""User hooks of generate(): `logits_processor=`, `stopping_criteria=`, `prefix_allowed_tokens_fn=`.

kvgen calls the very same hook objects as transformers, with the same arguments, at the same
place in the processor order (after the built-in processors, before the sampling warpers; a user
processor of a built-in's class replaces it), so greedy outputs must equal transformers' token
for token. Seeded sampling is compared with kvgen's own equivalent built-in setting (torch's RNG
is not kvgen's). Also: the kinds of arrays the hooks get, a hook that raises, concurrency.
"""

from __future__ import annotations

import threading
import traceback
import warnings

import numpy as np
import pytest
import torch
from transformers import (
    EosTokenCriteria,
    LogitsProcessorList,
    MaxLengthCriteria,
    MinLengthLogitsProcessor,
    NoBadWordsLogitsProcessor,
    NoRepeatNGramLogitsProcessor,
    RepetitionPenaltyLogitsProcessor,
    StoppingCriteria,
    StoppingCriteriaList,
)

from tiny_models import PROMPTS, assert_sequences_match, eos_ids_of, hf_generate, to_torch

KIND = "llama"
NEW = 16


@pytest.fixture(scope="module")
def hf(hf_model):
    return hf_model(KIND)


@pytest.fixture(scope="module")
def gen(kv_model):
    return kv_model(KIND)


@pytest.fixture(scope="module")
def enc(hf_tok):
    e = hf_tok(PROMPTS, padding=True, padding_side="left", return_tensors="pt")
    assert (e["attention_mask"] == 0).any(), "fixture: the batch must be left padded"
    return e


@pytest.fixture(scope="module")
def greedy_ref(hf, enc):
    return hf_generate(hf, **enc, max_new_tokens=NEW, do_sample=False)


def _both(hf, gen, enc, **kwargs):
    """The same call through transformers (with logits, for the near-tie check) and kvgen."""
    ref = hf_generate(hf, **enc, max_new_tokens=NEW, return_dict_in_generate=True, output_logits=True, **kwargs)
    out = gen.generate(enc["input_ids"], attention_mask=enc["attention_mask"], max_new_tokens=NEW, **kwargs)
    return out, ref


def _match(out, ref, enc, hf, what):
    assert isinstance(out, torch.Tensor)
    assert_sequences_match(out, ref, enc["input_ids"].shape[1], what=what, eos_ids=eos_ids_of(hf))


# -- hooks written for the test (torch ops, as transformers' own) --------------------------------


class LastTokenBias:
    """Lowers the score of each row's last token and raises the one after it: depends on input_ids."""

    def __call__(self, input_ids, scores):
        rows = torch.arange(scores.shape[0])
        last = input_ids[:, -1]
        scores = scores.clone()
        scores[rows, last] -= 4.0
        scores[rows, (last + 1) % scores.shape[1]] += 1.5
        return scores


class StopOnToken(StoppingCriteria):
    def __init__(self, token: int):
        self.token = token

    def __call__(self, input_ids, scores, **kwargs):
        return input_ids[:, -1] == self.token


def _early_token(ref, prompt_len, row=0):
    """A token `row` emits early in the greedy reference that no other row emits there."""
    new = ref[:, prompt_len:]
    for step in range(1, 6):
        tok = int(new[row, step])
        if tok not in new[row, :step].tolist() and all(tok not in new[r].tolist() for r in range(len(new)) if r != row):
            return tok
    raise AssertionError("fixture: no early token unique to row 0")


# -- parity with transformers --------------------------------------------------------------------


def test_custom_processor_greedy_batched(hf, gen, enc):
    out, ref = _both(hf, gen, enc, do_sample=False, logits_processor=LogitsProcessorList([LastTokenBias()]))
    plain = hf_generate(hf, **enc, max_new_tokens=NEW, do_sample=False)
    assert not torch.equal(ref.sequences, plain), "fixture: the processor must change the output"
    _match(out, ref, enc, hf, "custom processor")


def test_plain_list_of_callables(hf, gen, enc):
    bias = LastTokenBias()
    out, ref = _both(hf, gen, enc, do_sample=False, logits_processor=[lambda ids, s: bias(ids, s)])
    _match(out, ref, enc, hf, "plain list of callables")


def test_custom_stopping_criterion(hf, gen, enc, greedy_ref):
    prompt_len = enc["input_ids"].shape[1]
    tok = _early_token(greedy_ref, prompt_len)
    crit = StoppingCriteriaList([StopOnToken(tok)])
    out, ref = _both(hf, gen, enc, do_sample=False, stopping_criteria=crit)
    _match(out, ref, enc, hf, "custom stopping criterion")
    # Row 0 stopped early and was padded; the rest went on.
    assert (ref.sequences[0, prompt_len:] == hf.generation_config.pad_token_id).any()
    # All rows stopped by it: generation ends early, as in transformers.
    everywhere = [lambda ids, scores: torch.ones(ids.shape[0], dtype=torch.bool) if ids.shape[1] >= prompt_len + 3 else torch.zeros(ids.shape[0], dtype=torch.bool)]
    out, ref = _both(hf, gen, enc, do_sample=False, stopping_criteria=everywhere)
    assert out.shape[1] == prompt_len + 3
    _match(out, ref, enc, hf, "criterion ending every row")


def test_user_criteria_replace_the_built_in_eos_and_max_length(hf, gen, enc, greedy_ref):
    prompt_len = enc["input_ids"].shape[1]
    tok = _early_token(greedy_ref, prompt_len)
    crit = StoppingCriteriaList([EosTokenCriteria(eos_token_id=tok), MaxLengthCriteria(max_length=prompt_len + 9)])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out, ref = _both(hf, gen, enc, do_sample=False, stopping_criteria=crit)
    expected = f"A custom stopping criteria of type {type(crit[0])} has been passed to `.generate()`"
    assert any(str(w.message).startswith(expected) for w in caught), [str(w.message) for w in caught]
    assert ref.sequences.shape[1] == prompt_len + 9
    _match(out, ref, enc, hf, "user EosTokenCriteria and MaxLengthCriteria")


def test_prefix_allowed_tokens_fn(hf, gen, enc):
    vocab = hf.config.vocab_size

    def allowed(batch_id, ids):
        assert isinstance(ids, torch.Tensor) and ids.dim() == 1
        last = int(ids[-1])
        return [(last * 7 + k * 13 + batch_id) % vocab for k in range(6)]

    out, ref = _both(hf, gen, enc, do_sample=False, prefix_allowed_tokens_fn=allowed)
    _match(out, ref, enc, hf, "prefix_allowed_tokens_fn")
    new = to_torch(out)[:, enc["input_ids"].shape[1] :]
    assert int(new[1, 0]) in allowed(1, enc["input_ids"][1])


def test_prefix_allowed_tokens_fn_runs_where_transformers_puts_it(hf, gen, enc):
    """bad_words_ids (built before it) ban both allowed tokens, so the prefix processor finds its
    constraint unsatisfiable and keeps the allowed tokens at score 0; suppress_tokens (built
    after it) then removes the lower one. Run anywhere else, the outcome is different."""
    eos = set(eos_ids_of(hf))
    t1, t2 = [t for t in range(20, 40) if t not in eos][:2]
    settings = dict(do_sample=False, bad_words_ids=[[t1], [t2]], suppress_tokens=[t1])
    out, ref = _both(hf, gen, enc, prefix_allowed_tokens_fn=lambda b, ids: [t1, t2], **settings)
    assert (ref.sequences[:, enc["input_ids"].shape[1] :] == t2).all()
    _match(out, ref, enc, hf, "prefix_allowed_tokens_fn among built-in processors")


def test_transformers_classes_passed_by_the_user(hf, gen, enc, greedy_ref):
    prompt_len = enc["input_ids"].shape[1]
    eos = eos_ids_of(hf)
    first = greedy_ref[:, prompt_len].tolist()
    procs = LogitsProcessorList(
        [NoBadWordsLogitsProcessor([[first[0]], [first[1]]], eos_token_id=eos), MinLengthLogitsProcessor(prompt_len + 8, eos)]
    )
    out, ref = _both(hf, gen, enc, do_sample=False, logits_processor=procs)
    assert int(ref.sequences[0, prompt_len]) != first[0]
    _match(out, ref, enc, hf, "NoBadWords + MinLength from the user")


def test_user_processor_replaces_the_built_in_one_with_transformers_warning(hf, gen, enc):
    # Below 1 the user's penalty favours repeats, the built-in one (2.0) discourages them.
    user = RepetitionPenaltyLogitsProcessor(0.5)
    settings = dict(do_sample=False, repetition_penalty=2.0, no_repeat_ngram_size=2)
    # Replaced in the middle (before no_repeat_ngram) plus one appended: two hook groups per step.
    procs = LogitsProcessorList([user, LastTokenBias()])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = gen.generate(
            enc["input_ids"], attention_mask=enc["attention_mask"], max_new_tokens=NEW, logits_processor=procs, **settings
        )
    texts = [str(w.message) for w in caught]
    expected = (
        f"A custom logits processor of type {type(user)} has been passed to `.generate()`, but it was also created in "
        f"`.generate()`, given its parameterization. The custom {type(user)} will take precedence."
    )
    assert any(t.startswith(expected) for t in texts), texts
    ref = hf_generate(
        hf, **enc, max_new_tokens=NEW, logits_processor=procs, return_dict_in_generate=True, output_logits=True, **settings
    )
    _match(out, ref, enc, hf, "replaced repetition penalty")
    builtin = gen.generate(
        enc["input_ids"], attention_mask=enc["attention_mask"], max_new_tokens=NEW, logits_processor=[LastTokenBias()], **settings
    )
    assert not torch.equal(to_torch(out), to_torch(builtin)), "fixture: the replacement must matter"


# -- seeded sampling: hooks vs kvgen's built-in equivalent ---------------------------------------


def test_seeded_sampling_hooks_equal_built_in_settings(gen, enc, greedy_ref):
    prompt_len = enc["input_ids"].shape[1]
    eos = [gen.generation_config.eos_token_id]
    first = greedy_ref[:, prompt_len].tolist()
    bad = [[first[0]], [first[2]]]
    sampling = dict(do_sample=True, top_k=4, temperature=0.8, seed=1234, max_new_tokens=NEW)
    args = (enc["input_ids"], )
    built_in = gen.generate(*args, attention_mask=enc["attention_mask"], bad_words_ids=bad, no_repeat_ngram_size=2, **sampling)
    hooked = gen.generate(
        *args,
        attention_mask=enc["attention_mask"],
        logits_processor=[NoBadWordsLogitsProcessor(bad, eos_token_id=eos), NoRepeatNGramLogitsProcessor(2)],
        **sampling,
    )
    assert torch.equal(to_torch(hooked), to_torch(built_in))
    # The warpers ran after the hooks: banning after top_k would sample differently.
    plain = gen.generate(*args, attention_mask=enc["attention_mask"], **sampling)
    assert not torch.equal(to_torch(plain), to_torch(built_in)), "fixture: the bans must matter"
    # A criterion under sampling: same as the built-in eos at that token.
    row0 = to_torch(plain)[0, prompt_len:].tolist()
    step = next(s for s in range(1, NEW) if row0[s] not in row0[:s])
    stopped = gen.generate(*args, attention_mask=enc["attention_mask"], stopping_criteria=[StopOnToken(row0[step])], **sampling)
    assert to_torch(stopped)[0, prompt_len : prompt_len + step + 1].tolist() == row0[: step + 1]
    assert (to_torch(stopped)[0, prompt_len + step + 1 :] == gen.generation_config.pad_token_id).all()


# -- what the hooks receive ----------------------------------------------------------------------


class Recorder:
    def __init__(self):
        self.seen = []

    def __call__(self, input_ids, scores):
        self.seen.append((type(input_ids), input_ids.dtype, tuple(input_ids.shape), type(scores), scores.dtype, tuple(scores.shape), input_ids[:, : input_ids.shape[1]].tolist()))
        return scores


@pytest.mark.parametrize("kind", ["torch", "numpy"])
def test_hooks_get_arrays_of_the_input_kind(gen, enc, kind):
    ids = enc["input_ids"] if kind == "torch" else enc["input_ids"].numpy()
    mask = enc["attention_mask"] if kind == "torch" else enc["attention_mask"].numpy()
    rec, crit_seen = Recorder(), []

    def crit(input_ids, scores):
        crit_seen.append((type(input_ids), scores))
        return np.zeros(input_ids.shape[0], dtype=bool) if kind == "numpy" else torch.zeros(input_ids.shape[0], dtype=torch.bool)

    out = gen.generate(ids, attention_mask=mask, max_new_tokens=4, do_sample=False, logits_processor=[rec], stopping_criteria=[crit])
    batch, width = ids.shape
    array_type, int_type, float_type = (torch.Tensor, torch.int64, torch.float32) if kind == "torch" else (np.ndarray, np.int64, np.float32)
    assert len(rec.seen) == 4
    vocab = gen.config.vocab_size
    for step, (t_ids, d_ids, s_ids, t_s, d_s, s_s, rows) in enumerate(rec.seen):
        assert issubclass(t_ids, array_type) and issubclass(t_s, array_type)
        assert d_ids == int_type and d_s == float_type
        assert s_ids == (batch, width + step) and s_s == (batch, vocab)
        # The padded prompt as given, then what was generated.
        assert [r[:width] for r in rows] == ids.tolist()
        assert [r[width:] for r in rows] == to_torch(out)[:, width : width + step].tolist()
    assert all(issubclass(t, array_type) and s is None for t, s in crit_seen)
    # With output_scores the criteria get the tuple of scores so far, as in transformers.
    crit_seen.clear()
    gen.generate(ids, attention_mask=mask, max_new_tokens=3, stopping_criteria=[crit], return_dict_in_generate=True, output_scores=True)
    assert [len(s) for _, s in crit_seen] == [1, 2, 3]


def test_bad_hook_arguments_are_refused(gen, enc, kvgen):
    with pytest.raises(kvgen.InvalidInputError, match="list of callables"):
        gen.generate(enc["input_ids"], max_new_tokens=2, logits_processor=LastTokenBias())
    with pytest.raises(kvgen.InvalidInputError, match="not callable"):
        gen.generate(enc["input_ids"], max_new_tokens=2, stopping_criteria=[3])
    with pytest.raises(kvgen.InvalidInputError, match="shape"):
        gen.generate(enc["input_ids"], max_new_tokens=2, logits_processor=[lambda i, s: s[:1]])


# -- errors and concurrency ----------------------------------------------------------------------


class HookFailed(Exception):
    pass


def _raise_at_step(at):
    def hook(input_ids, scores):
        if input_ids.shape[1] >= at:
            raise HookFailed(f"boom at length {input_ids.shape[1]}")
        return scores

    return hook


def test_hook_that_raises_ends_its_request_only(gen, enc):
    width = enc["input_ids"].shape[1]
    single = gen._encode_texts([PROMPTS[1]])
    expected = gen.generate(single["input_ids"], attention_mask=single["attention_mask"], max_new_tokens=24, do_sample=False)
    gen._engine._pause_scheduler(True)
    results, errors = {}, {}

    def run(name, **kw):
        try:
            results[name] = gen.generate(**kw)
        except BaseException as e:  # noqa: BLE001 - the test inspects it
            errors[name] = e

    threads = [
        threading.Thread(target=run, args=("hooked",), kwargs=dict(inputs=enc["input_ids"], attention_mask=enc["attention_mask"], max_new_tokens=24, logits_processor=[_raise_at_step(width + 3)])),
        threading.Thread(target=run, args=("plain",), kwargs=dict(inputs=single["input_ids"], attention_mask=single["attention_mask"], max_new_tokens=24, do_sample=False)),
    ]
    for t in threads:
        t.start()
    try:
        while gen.scheduler_stats()["queued_requests"] < 2:
            threading.Event().wait(0.01)
    finally:
        gen._engine._pause_scheduler(False)
    for t in threads:
        t.join(60)
    assert isinstance(errors.get("hooked"), HookFailed), errors
    assert "boom at length" in str(errors["hooked"])
    frames = [f.name for f in traceback.extract_tb(errors["hooked"].__traceback__)]
    assert "hook" in frames, frames
    assert "plain" not in errors and np.array_equal(results["plain"], expected)
    # The generator carries on.
    again = gen.generate(single["input_ids"], attention_mask=single["attention_mask"], max_new_tokens=24, do_sample=False)
    assert np.array_equal(again, expected)
    with pytest.raises(ValueError, match="empty list for batch ID 0"):
        gen.generate(enc["input_ids"], max_new_tokens=2, prefix_allowed_tokens_fn=lambda b, ids: [])


def test_sixteen_concurrent_requests_with_hooks(gen, hf_tok):
    def hooks_for(i):
        bias = LastTokenBias()
        procs = [lambda ids, s, i=i: bias(ids, s) + (torch.arange(s.shape[1]) % (i + 2) == 0).float() * 0.5]
        return dict(logits_processor=procs, stopping_criteria=[StopOnToken(7 + i)])

    prompts = [hf_tok([PROMPTS[i % len(PROMPTS)], PROMPTS[(i + 1) % len(PROMPTS)]], padding=True, padding_side="left", return_tensors="pt") for i in range(16)]
    sequential = [gen.generate(**p, max_new_tokens=12, do_sample=False, **hooks_for(i)) for i, p in enumerate(prompts)]
    results = [None] * 16

    def run(i):
        results[i] = gen.generate(**prompts[i], max_new_tokens=12, do_sample=False, **hooks_for(i))

    gen._engine.reset_scheduler_peaks()
    gen._engine._pause_scheduler(True)  # all 16 join the same steps
    threads = [threading.Thread(target=run, args=(i,)) for i in range(16)]
    for t in threads:
        t.start()
    try:
        while gen.scheduler_stats()["queued_requests"] < 16:
            threading.Event().wait(0.01)
    finally:
        gen._engine._pause_scheduler(False)
    for t in threads:
        t.join(120)
    for i in range(16):
        assert results[i] is not None and torch.equal(results[i], sequential[i]), i
    assert gen.scheduler_stats()["max_running_requests"] == 16
