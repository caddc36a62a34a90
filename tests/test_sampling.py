"""Seeded, batch-invariant sampling; its distribution; NaN handling; validation; no panics.

A row's sampled tokens must depend only on (its seed, its prompt, its parameters): not on the
batch it runs in, the other prompts and their lengths, repeated calls or threads.
"""

from __future__ import annotations

import json
import math
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from tiny_models import PROMPTS

KIND = "llama"
SAMPLING = dict(do_sample=True, temperature=0.9, top_k=40, top_p=0.95, max_new_tokens=16)


@pytest.fixture(scope="module")
def gen(kv_model):
    return kv_model(KIND)


def _ids(hf_tok, text):
    return hf_tok(text)["input_ids"]


def _left_pad(hf_tok, texts):
    enc = hf_tok(texts, padding=True, padding_side="left", return_tensors="np")
    return enc["input_ids"].astype(np.int64), enc["attention_mask"].astype(np.int64)


def _new(seqs, mask_row_len, row):
    return list(np.asarray(seqs)[row, mask_row_len:])


# -- reproducibility and batch invariance ------------------------------------------------------


def test_same_seed_same_tokens_across_calls(gen, hf_tok):
    ids = [_ids(hf_tok, PROMPTS[1])]
    a = gen.generate(ids, seed=123, **SAMPLING)
    b = gen.generate(ids, seed=123, **SAMPLING)
    c = gen.generate(ids, seed=124, **SAMPLING)
    assert a == b
    assert a != c, "different seeds gave identical samples"


def test_row_independent_of_batch_composition(gen, hf_tok):
    target = PROMPTS[2]
    alone = gen.generate([_ids(hf_tok, target)], seed=7, **SAMPLING)[0][len(_ids(hf_tok, target)):]
    others = ["x", "The quick brown fox jumps over the lazy dog again and again", "Hi", "Rust"]
    texts = (others * 4)[:15]
    for position in (0, 7, 15):
        batch_texts = texts[:position] + [target] + texts[position:]
        ids, mask = _left_pad(hf_tok, batch_texts)
        out = gen.generate(ids, attention_mask=mask, seed=7, **SAMPLING)
        got = list(out[position, ids.shape[1]:])
        # rows that finished early are padded after eos in a batch; compare up to the alone length
        assert got[: len(alone)] == list(alone), f"row at position {position} of 16 differs from the row alone"


def test_seed_list_one_per_row(gen, hf_tok):
    ids, mask = _left_pad(hf_tok, PROMPTS[:3])
    batch = gen.generate(ids, attention_mask=mask, seed=[5, 6, 7], **SAMPLING)
    for r, s in enumerate([5, 6, 7]):
        alone = gen.generate([_ids(hf_tok, PROMPTS[r])], seed=s, **SAMPLING)[0][len(_ids(hf_tok, PROMPTS[r])):]
        assert list(batch[r, ids.shape[1]:])[: len(alone)] == list(alone)


def test_threads_do_not_change_samples(gen, hf_tok):
    ids = [_ids(hf_tok, p) for p in PROMPTS]
    expected = [gen.generate([i], seed=42, **SAMPLING) for i in ids]
    n_threads = 8
    results: dict = {}
    errors: list = []

    def work(k):
        try:
            results[k] = gen.generate([ids[k % len(ids)]], seed=42, **SAMPLING)
        except BaseException as e:  # a thread's exception is otherwise lost; reported below
            errors.append((k, e))

    threads = [threading.Thread(target=work, args=(k,)) for k in range(n_threads)]
    for t in threads:
        t.start()
    deadline = time.monotonic() + 60
    for t in threads:
        t.join(max(0.0, deadline - time.monotonic()))
    assert not any(t.is_alive() for t in threads), "a generate() thread did not return within 60 s"
    assert not errors, errors
    assert sorted(results) == list(range(n_threads)), f"only threads {sorted(results)} returned a result"
    for k in range(n_threads):
        assert results[k] == expected[k % len(ids)], f"thread {k} sampled different tokens than the call alone"


def test_num_return_sequences_rows_get_own_streams(gen, hf_tok):
    ids = [_ids(hf_tok, PROMPTS[0])]
    out = gen.generate(ids, seed=3, num_return_sequences=4, **SAMPLING)
    assert len(out) == 4
    assert len({tuple(r) for r in out}) > 1, "all returned sequences are identical"
    again = gen.generate(ids, seed=3, num_return_sequences=4, **SAMPLING)
    assert out == again
    # the first copy of each prompt uses the same stream as a single sequence with that seed
    single = gen.generate(ids, seed=3, **SAMPLING)
    assert out[0][: len(single[0])] == single[0]


def test_set_seed_makes_unseeded_calls_reproducible(kvgen, gen, hf_tok):
    ids = [_ids(hf_tok, PROMPTS[3])]
    kvgen.set_seed(99)
    a1, a2 = gen.generate(ids, **SAMPLING), gen.generate(ids, **SAMPLING)
    kvgen.set_seed(99)
    b1, b2 = gen.generate(ids, **SAMPLING), gen.generate(ids, **SAMPLING)
    assert (a1, a2) == (b1, b2)


def test_integer_temperature_is_accepted(gen, hf_tok):
    out = gen.generate([_ids(hf_tok, "Hi")], seed=1, do_sample=True, temperature=1, max_new_tokens=4)
    assert len(out[0]) == len(_ids(hf_tok, "Hi")) + 4


# -- the distribution ----------------------------------------------------------------------------


def _chi_square_critical(dof: int) -> float:
    # Wilson-Hilferty approximation of the 99.9% quantile of chi2(dof).
    z = 3.09
    return dof * (1 - 2 / (9 * dof) + z * math.sqrt(2 / (9 * dof))) ** 3


@pytest.mark.parametrize(
    "settings",
    [
        dict(temperature=1.0, top_k=0),
        dict(temperature=0.7, top_k=8),
        dict(temperature=1.3, top_k=0, top_p=0.8),
        # at temperature 1 this prompt's top token has p = 0.94 and min_p=0.05 keeps only it (a
        # single bin: nothing to test); at temperature 2 it keeps 6 tokens
        dict(temperature=2.0, top_k=0, min_p=0.05),
    ],
    ids=["plain", "temp-topk", "topp", "minp"],
)
def test_sample_frequencies_match_processed_distribution(kvgen, gen, hf_tok, settings):
    prompt = _ids(hf_tok, PROMPTS[1])
    logits = gen.logits([prompt])[0, -1][None, :]
    processed = kvgen.process_logits(logits, np.asarray([prompt]), do_sample=True, **settings)[0]
    probs = np.exp(processed - processed.max())
    probs /= probs.sum()
    n = 4000
    ids = np.repeat(np.asarray([prompt], dtype=np.int64), n, axis=0)
    # In calls of 200 rows (within the scheduler's max_sequences): each row's draw depends only
    # on its own seed, so this is the same sample as one call of n rows.
    out = np.concatenate([
        gen.generate(ids[i : i + 200], seed=list(range(i, i + 200)), do_sample=True, max_new_tokens=1,
                     eos_token_id=None, pad_token_id=0, **settings)
        for i in range(0, n, 200)
    ])
    drawn = out[:, -1]
    counts = np.bincount(drawn, minlength=probs.size)
    assert counts[probs == 0].sum() == 0, "sampled a token the processors removed"
    # pool rare tokens so every expected count is >= 5
    order = np.argsort(-probs)
    expected, observed, acc_e, acc_o = [], [], 0.0, 0
    for t in order:
        if probs[t] == 0:
            break
        acc_e += probs[t] * n
        acc_o += counts[t]
        if acc_e >= 5:
            expected.append(acc_e)
            observed.append(acc_o)
            acc_e, acc_o = 0.0, 0
    if acc_e > 0 and expected:
        expected[-1] += acc_e
        observed[-1] += acc_o
    expected, observed = np.asarray(expected), np.asarray(observed)
    # every setting here keeps several likely tokens; a single bin would make the test vacuous
    assert len(expected) >= 2, f"fixture: only {len(expected)} bin(s) with an expected count >= 5"
    assert observed.sum() == n
    stat = float(((observed - expected) ** 2 / expected).sum())
    assert stat < _chi_square_critical(len(expected) - 1), (stat, len(expected))


# -- numerical faults ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def nan_model_dir(model_dir, tmp_path_factory):
    """The untied llama with one lm_head row set to NaN: that token's logit is NaN at every step."""
    from safetensors.torch import load_file, save_file
    import shutil

    src = Path(model_dir(KIND))
    dst = tmp_path_factory.mktemp("nan-llama")
    for f in src.iterdir():
        if f.is_file():
            shutil.copy(f, dst / f.name)
    weights = load_file(str(dst / "model.safetensors"))
    weights["lm_head.weight"][5] = float("nan")
    save_file(weights, str(dst / "model.safetensors"), metadata={"format": "pt"})
    return dst


def test_nan_logits_raise_numerical_error_naming_step_and_row(kvgen, nan_model_dir, hf_tok):
    gen = kvgen.Generator.from_pretrained(str(nan_model_dir))
    ids, mask = _left_pad(hf_tok, PROMPTS[:2])
    with pytest.raises(kvgen.NumericalError) as info:
        gen.generate(ids, attention_mask=mask, max_new_tokens=4)
    msg = str(info.value)
    assert "step 0" in msg and "row 0" in msg and "remove_invalid_values" in msg
    assert isinstance(info.value, RuntimeError)
    with pytest.raises(kvgen.NumericalError):
        gen.generate(ids, attention_mask=mask, max_new_tokens=4, do_sample=True, seed=0)


def test_remove_invalid_values_matches_transformers(kvgen, nan_model_dir, hf_tok):
    from tiny_models import load_hf

    gen = kvgen.Generator.from_pretrained(str(nan_model_dir))
    hf = load_hf(nan_model_dir)
    ids, mask = _left_pad(hf_tok, PROMPTS[:2])
    ref = hf.generate(torch.from_numpy(ids), attention_mask=torch.from_numpy(mask), max_new_tokens=6,
                      do_sample=False, remove_invalid_values=True)
    got = gen.generate(ids, attention_mask=mask, max_new_tokens=6, remove_invalid_values=True)
    np.testing.assert_array_equal(got, ref.numpy())


# -- validation before compute; the generator stays usable ------------------------------------

BAD_SETTINGS = [
    (dict(do_sample=True, temperature=0.0), "temperature"),
    (dict(do_sample=True, temperature=float("nan")), "temperature"),
    (dict(do_sample=True, temperature=-1.0), "temperature"),
    (dict(do_sample=True, top_k=-1), "top_k"),
    (dict(do_sample=True, top_k=2.5), "top_k"),
    (dict(do_sample=True, top_p=1.5), "top_p"),
    (dict(do_sample=True, top_p=-0.1), "top_p"),
    (dict(do_sample=True, min_p=1.5), "min_p"),
    (dict(do_sample=True, typical_p=0.0), "typical_p"),
    (dict(do_sample=True, epsilon_cutoff=1.5), "epsilon"),
    (dict(do_sample=True, eta_cutoff=-0.5), "eta"),
    (dict(repetition_penalty=0.0), "repetition_penalty"),
    (dict(repetition_penalty=-1.0), "repetition_penalty"),
    (dict(max_new_tokens=0), "max_new_tokens"),
    (dict(max_new_tokens=10_000), "max_position_embeddings"),
    (dict(eos_token_id=10_000), "10000"),
    (dict(pad_token_id=-3), "-3"),
    (dict(bad_words_ids=[[10_000]]), "10000"),
    (dict(suppress_tokens=[999_999]), "999999"),
    (dict(not_a_setting=1), "not_a_setting"),
    (dict(seed=-1, do_sample=True), "seed"),
]


@pytest.mark.parametrize("kwargs,needle", BAD_SETTINGS, ids=[n for _, n in BAD_SETTINGS])
def test_bad_settings_raise_value_error_and_generator_stays_usable(kvgen, gen, hf_tok, kwargs, needle):
    ids = [_ids(hf_tok, "Hello")]
    with pytest.raises(ValueError) as info:
        gen.generate(ids, **{"max_new_tokens": 4, **kwargs})
    assert needle in str(info.value), str(info.value)
    assert isinstance(info.value, kvgen.KvgenError)
    assert len(gen.generate(ids, max_new_tokens=2)[0]) == len(ids[0]) + 2


BAD_INPUTS = [
    ([[1, 2, 3], [4, 5]], "lengths"),
    ([[1.0, 2.0]], "integers"),
    (np.array([[1.5, 2.0]]), "integer"),
    ([[1, 2, 10_000]], "10000"),
    ([[1, -5]], "-5"),
]


@pytest.mark.parametrize("inputs,needle", BAD_INPUTS, ids=[n for _, n in BAD_INPUTS])
def test_bad_inputs_raise_value_error(kvgen, gen, inputs, needle):
    with pytest.raises(ValueError) as info:
        gen.generate(inputs, max_new_tokens=2)
    assert needle in str(info.value)
    assert gen.generate([[1, 2]], max_new_tokens=1) is not None


def test_token_error_names_row_position_and_vocab(kvgen, gen):
    with pytest.raises(kvgen.TokenOutOfRangeError) as info:
        gen.generate([[3, 4, 5], [6, 7, 50_000]], max_new_tokens=2)
    msg = str(info.value)
    assert "50000" in msg and "row 1" in msg and "position 2" in msg and str(gen.config.vocab_size) in msg


def test_attention_mask_shape_mismatch(gen):
    with pytest.raises(ValueError, match="attention_mask"):
        gen.generate([[1, 2, 3]], attention_mask=[[1, 1]], max_new_tokens=2)


def test_no_panic_crosses_into_python(kvgen):
    with pytest.raises(kvgen.KvgenError) as info:
        kvgen._kvgen._debug_panic()
    assert isinstance(info.value, RuntimeError)
    assert "panic" in str(info.value)


def test_tokenizer_larger_than_embedding_warns(kvgen, model_dir, tmp_path):
    import shutil

    src = Path(model_dir(KIND))
    for f in src.iterdir():
        if f.is_file():
            shutil.copy(f, tmp_path / f.name)
    from safetensors.torch import load_file, save_file

    cfg = json.loads((tmp_path / "config.json").read_text())
    cut = cfg["vocab_size"] - 10
    w = load_file(str(tmp_path / "model.safetensors"))
    w["model.embed_tokens.weight"] = w["model.embed_tokens.weight"][:cut].clone()
    w["lm_head.weight"] = w["lm_head.weight"][:cut].clone()
    save_file(w, str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
    cfg["vocab_size"] = cut
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.warns(UserWarning, match="embedding"):
        gen = kvgen.Generator.from_pretrained(str(tmp_path))
    with pytest.raises(kvgen.TokenOutOfRangeError):
        gen.generate([[1, cut + 3]], max_new_tokens=1)
