"""Tensor parallelism on the native CPU backend: `Generator.from_pretrained(path, tp_degree=N)`.

N ranks each hold a shard of every weight (q/k/v/gate/up split by output rows, o/down by input
columns followed by an all-reduce: two per layer per forward; lm_head split by vocab rows, the
logits concatenated on the host). With fewer kv heads than ranks each rank holds the kv head its
query heads use (replication); a single kv head (MQA) is held by every rank.

What is checked here:
- parity: at tp_degree 2 every architecture kind is greedy token-identical to transformers (the
  left-padded batch and single prompts) and its logits are within 1e-4 (gen.logits() and the
  per-step generate logits); the GQA/MQA/replication fixtures at tp_degree 1, 2 and 4 likewise
  (tp 1 there checks the fixtures themselves);
- seeded sampling at tp 2 (4) gives tp 1's tokens; 16 concurrent threads at tp 2 get their
  sequential tokens;
- the all-reduce debug hook: every all-reduce leaves the ranks bit-identical, there are exactly
  2 * num_hidden_layers per scheduler step (and per gen.logits() forward), and
  scheduler_stats()["all_reduces"] counts them (0 at tp 1);
- memory_stats(): per-rank weight bytes against a by-hand count, per-rank KV cache bytes;
- invalid degrees are refused with InvalidInputError naming the head counts;
- GGUF quantized files (the tiny files of tiny_gguf.py, and SmolLM2-135M-Instruct Q4_1 at tp 3:
  9 heads / 3 kv heads) give tp 1's greedy tokens; streaming and stop strings at tp > 1.

tp > 1 sums o/down partial products in a different order than tp 1, so its logits differ from
tp 1's by f32 rounding (~1e-6 on these fixtures); the greedy comparisons keep the near-tie rule
of test_generate_parity.py (no margin on these fixtures is near 1e-4), seeded sampling is
compared outright (a draw would have to fall within ~1e-6 of a CDF boundary to flip).
"""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch

from scheduler_helpers import join_all, mixed_call, queue_then_release, wait_for
from tiny_models import (
    ALL_KINDS,
    LONG_TEXT,
    PROMPTS,
    TP_KINDS,
    assert_sequences_match,
    build_model,
    eos_ids_of,
    hf_forward_logits,
    hf_generate,
    load_hf,
    logits_scale,
    max_abs_diff_valid,
    step_margins,
    to_torch,
)

NEW_TOKENS = 24  # longest prompt + 24 > the Mistral sliding window (8) and dynamic max_pos (20)
LOGITS_ATOL = 1e-4
SINGLE_PROMPTS = (0, 3)  # the shortest and the longest prompt, alone
F32 = 4  # bytes per weight / cache element: every safetensors fixture here is float32

# The GQA / MQA / replication fixtures and the degrees they run at (tp 1: the fixture itself).
# llama_8q2kv at 4 and llama_mqa at 2 and 4 have fewer kv heads than ranks (replication).
HEAD_LAYOUT_CASES = [
    ("llama_8q4kv", 1),
    ("llama_8q4kv", 2),
    ("llama_8q4kv", 4),
    ("llama_8q2kv", 1),
    ("llama_8q2kv", 2),
    ("llama_8q2kv", 4),
    ("llama_mqa", 1),
    ("llama_mqa", 2),
    ("llama_mqa", 4),
    ("llama_wide", 2),
    ("llama_wide", 4),
]


def _case_id(case):
    return f"{case[0]}-tp{case[1]}"


DYNAMIC_NOTE = (
    " [llama_dynamic_rope: transformers recomputes the dynamic-NTK inv_freq over the whole batch; "
    "see test_generate_parity.py]"
)


def _note(kind):
    return DYNAMIC_NOTE if kind == "llama_dynamic_rope" else ""


# -- fixtures -------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tp_dir(model_dir, tokenizer_dir, tmp_path_factory):
    """HF model directory of any kind: ALL_KINDS through conftest's cache, TP_KINDS built here."""
    cache: dict = {}

    def get(kind: str):
        if kind in ALL_KINDS:
            return model_dir(kind)
        assert kind in TP_KINDS, kind
        if kind not in cache:
            d = tmp_path_factory.mktemp(kind)
            build_model(d, kind, tokenizer_dir=tokenizer_dir)
            cache[kind] = d
        return cache[kind]

    return get


@pytest.fixture(scope="module")
def tp_hf(hf_model, tp_dir):
    """transformers reference (f32, eager) of any kind."""
    cache: dict = {}

    def get(kind: str):
        if kind in ALL_KINDS:
            return hf_model(kind)
        if kind not in cache:
            cache[kind] = load_hf(tp_dir(kind))
        return cache[kind]

    return get


@pytest.fixture(scope="module")
def tp_gen(kvgen, tp_dir):
    """kvgen.Generator of `kind` at `tp` ranks (native CPU backend), loaded once per module."""
    cache: dict = {}

    def get(kind: str, tp: int):
        key = (kind, tp)
        if key not in cache:
            cache[key] = kvgen.Generator.from_pretrained(str(tp_dir(kind)), tp_degree=tp)
        return cache[key]

    return get


# -- helpers --------------------------------------------------------------------------------------


def _left_padded(hf_tok, texts, return_tensors="pt"):
    return hf_tok(texts, padding=True, padding_side="left", return_tensors=return_tensors)


def _alive(sequences: torch.Tensor, prompt_len: int, step: int, eos_ids) -> torch.Tensor:
    """Rows that had not produced an eos before new token `step` (their step logits are real)."""
    sequences = to_torch(sequences)
    new = sequences[:, prompt_len : prompt_len + step]
    done = torch.zeros(sequences.shape[0], dtype=torch.bool)
    for e in eos_ids:
        done |= (new == e).any(dim=1)
    return ~done


def _assert_step_logits_match_hf(out, ref, prompt_len, eos_ids, what):
    """kvgen's per-step generate logits (the last position of each step) within LOGITS_ATOL of
    transformers' for every row still running and not past an HF near-tie."""
    assert isinstance(out.logits, tuple), type(out.logits)
    assert len(out.logits) == len(ref.logits), (what, len(out.logits), len(ref.logits))
    margins = step_margins(ref.logits)
    compared = 0
    for step, (got, exp) in enumerate(zip(out.logits, ref.logits)):
        got = to_torch(got).float()
        assert tuple(got.shape) == tuple(exp.shape), (what, step, tuple(got.shape), tuple(exp.shape))
        rows = _alive(ref.sequences, prompt_len, step, eos_ids)
        if step:
            rows &= (margins[:, :step] > 1e-4).all(dim=1)
        else:
            assert rows.all(), f"{what}: the prefill step must be compared for every row"
        if not rows.any():
            continue
        compared += int(rows.sum())
        diff = (got - exp.float()).abs()[rows].max().item()
        assert diff <= LOGITS_ATOL, f"{what}: step {step} logits max |diff| {diff:.3g} vs transformers"
    assert compared >= len(ref.logits), f"{what}: only {compared} (row, step) logits compared"


def _greedy_vs_hf(gen, hf, hf_tok, kind, what):
    """Left-padded PROMPTS batch: tokens and per-step logits against transformers."""
    enc = _left_padded(hf_tok, PROMPTS)
    assert (enc["attention_mask"] == 0).any(), "fixture: prompts must need left padding"
    prompt_len = enc["input_ids"].shape[1]
    kw = dict(max_new_tokens=NEW_TOKENS, do_sample=False, return_dict_in_generate=True, output_logits=True)
    ref = hf_generate(hf, **enc, **kw)
    out = gen.generate(enc["input_ids"], attention_mask=enc["attention_mask"], **kw)
    eos = eos_ids_of(hf)
    assert_sequences_match(
        out.sequences, ref, prompt_len, what=f"{what} left-padded batch{_note(kind)}", eos_ids=eos,
        min_compared=len(PROMPTS) * len(ref.logits),
    )
    _assert_step_logits_match_hf(out, ref, prompt_len, eos, f"{what} left-padded batch{_note(kind)}")


def _single_vs_hf(gen, hf, hf_tok, kind, index, what):
    enc = hf_tok(PROMPTS[index], return_tensors="pt")
    prompt_len = enc["input_ids"].shape[1]
    ref = hf_generate(
        hf, **enc, max_new_tokens=NEW_TOKENS, do_sample=False, return_dict_in_generate=True, output_logits=True
    )
    out = gen.generate(
        enc["input_ids"], attention_mask=enc["attention_mask"], max_new_tokens=NEW_TOKENS, do_sample=False
    )
    assert isinstance(out, torch.Tensor) and out.dtype == torch.long
    assert_sequences_match(
        out, ref, prompt_len, what=f"{what} prompt {index} alone{_note(kind)}", eos_ids=eos_ids_of(hf),
        min_compared=len(ref.logits),
    )


def _logits_vs_hf(gen, hf, hf_tok, kind, what):
    """gen.logits(): left-padded PROMPTS + LONG_TEXT (every valid position, and the last position
    of every row) and LONG_TEXT alone, within LOGITS_ATOL of transformers' forward."""
    enc = _left_padded(hf_tok, PROMPTS + [LONG_TEXT], return_tensors="np")
    ids, mask = enc["input_ids"].astype(np.int64), enc["attention_mask"].astype(np.int64)
    assert ids.shape[1] > 20, "fixture: longest row must exceed the sliding window and dynamic max_pos"
    ref = hf_forward_logits(hf, torch.from_numpy(ids), torch.from_numpy(mask))
    got = gen.logits(ids, attention_mask=mask)
    assert isinstance(got, np.ndarray) and got.dtype == np.float32, (type(got), getattr(got, "dtype", None))
    assert got.shape == tuple(ref.shape) == (ids.shape[0], ids.shape[1], len(hf_tok)), got.shape
    last = float(np.abs(got[:, -1] - ref[:, -1].numpy()).max())
    assert last <= LOGITS_ATOL, f"{what}: last-position logits max |diff| {last:.3g}{_note(kind)}"
    diff = max_abs_diff_valid(got, ref, mask)
    assert diff <= LOGITS_ATOL, (
        f"{what}: max |logits diff| {diff:.3g} on valid positions (HF scale {logits_scale(ref):.3g}){_note(kind)}"
    )
    ids1 = ids[-1:][:, mask[-1].astype(bool)]  # LONG_TEXT, the longest row: no padding
    assert ids1.shape[1] == ids.shape[1]
    ref1 = hf_forward_logits(hf, torch.from_numpy(ids1))
    diff1 = float(np.abs(gen.logits(ids1) - ref1.numpy()).max())
    assert diff1 <= LOGITS_ATOL, f"{what}: unpadded LONG_TEXT max |logits diff| {diff1:.3g}"


def _layers(gen) -> int:
    return int(gen.config.num_hidden_layers)


def _all_reduces(gen) -> int:
    n = gen.scheduler_stats()["all_reduces"]
    assert isinstance(n, int) and not isinstance(n, bool), type(n)
    return n


def _check_log(log, tp, what):
    """Every entry: tp_degree ints, all equal (the ranks' reduced hidden states are bit-identical);
    digests differ between entries (each all-reduce reduces a different hidden state, so a
    constant digest would mean the hook records nothing real)."""
    assert isinstance(log, list), type(log)
    for i, entry in enumerate(log):
        entry = list(entry)
        assert len(entry) == tp, f"{what}: all-reduce {i} has {len(entry)} digests, expected {tp}: {entry}"
        assert all(isinstance(d, int) and not isinstance(d, bool) for d in entry), f"{what}: entry {i}: {entry}"
        assert len(set(entry)) == 1, f"{what}: all-reduce {i} left the ranks different: digests {entry}"
    firsts = [list(e)[0] for e in log]
    assert len(set(firsts)) == len(firsts), f"{what}: repeated digests across all-reduces: {firsts}"


# -- (1) tp 2 parity with transformers on every kind ---------------------------------------------


@pytest.mark.parametrize("kind", ALL_KINDS)
def test_tp2_greedy_batch_left_padded_matches_transformers(kind, hf_tok, tp_hf, tp_gen):
    _greedy_vs_hf(tp_gen(kind, 2), tp_hf(kind), hf_tok, kind, f"{kind} tp2")


@pytest.mark.parametrize("index", SINGLE_PROMPTS)
@pytest.mark.parametrize("kind", ALL_KINDS)
def test_tp2_greedy_single_prompt_matches_transformers(kind, index, hf_tok, tp_hf, tp_gen):
    _single_vs_hf(tp_gen(kind, 2), tp_hf(kind), hf_tok, kind, index, f"{kind} tp2")


@pytest.mark.parametrize("kind", ALL_KINDS)
def test_tp2_forward_logits_match_transformers(kind, hf_tok, tp_hf, tp_gen):
    _logits_vs_hf(tp_gen(kind, 2), tp_hf(kind), hf_tok, kind, f"{kind} tp2")


# -- (4) GQA, MQA and kv-head replication at tp 1, 2, 4 ------------------------------------------


@pytest.mark.parametrize("case", HEAD_LAYOUT_CASES, ids=_case_id)
def test_head_layouts_greedy_match_transformers(case, hf_tok, tp_hf, tp_gen):
    kind, tp = case
    gen, hf = tp_gen(kind, tp), tp_hf(kind)
    assert gen.config.num_key_value_heads == {"llama_8q4kv": 4, "llama_8q2kv": 2, "llama_mqa": 1, "llama_wide": 2}[kind]
    _greedy_vs_hf(gen, hf, hf_tok, kind, f"{kind} tp{tp}")
    _single_vs_hf(gen, hf, hf_tok, kind, 3, f"{kind} tp{tp}")


@pytest.mark.parametrize("case", HEAD_LAYOUT_CASES, ids=_case_id)
def test_head_layouts_logits_match_transformers(case, hf_tok, tp_hf, tp_gen):
    kind, tp = case
    _logits_vs_hf(tp_gen(kind, tp), tp_hf(kind), hf_tok, kind, f"{kind} tp{tp}")


# -- (2) seeded sampling: tp N == tp 1 ------------------------------------------------------------

SAMPLING = dict(do_sample=True, temperature=0.8, top_k=40, top_p=0.9, max_new_tokens=16)
SAMPLE_SEEDS = (0, 7, 1234)


@pytest.mark.parametrize("case", [("llama_tied", 2), ("qwen3", 2), ("llama_8q2kv", 4)], ids=_case_id)
def test_seeded_sampling_equals_tp1(case, hf_tok, tp_gen):
    """Same seed and settings: tp N samples exactly tp 1's tokens, and their step logits agree
    within 1e-4 (that agreement is what makes the draws equal: they can only differ where a
    uniform draw falls within the ~1e-6 logits difference of a CDF boundary)."""
    kind, tp = case
    one, many = tp_gen(kind, 1), tp_gen(kind, tp)
    enc = _left_padded(hf_tok, PROMPTS)
    prompt_len = enc["input_ids"].shape[1]
    ids, mask = enc["input_ids"], enc["attention_mask"]
    eos = [hf_tok.eos_token_id]
    greedy = one.generate(ids, attention_mask=mask, max_new_tokens=SAMPLING["max_new_tokens"], do_sample=False)
    outputs = []
    for seed in SAMPLE_SEEDS:
        kw = dict(SAMPLING, seed=seed, return_dict_in_generate=True, output_logits=True)
        a = one.generate(ids, attention_mask=mask, **kw)
        b = many.generate(ids, attention_mask=mask, **kw)
        sa, sb = to_torch(a.sequences), to_torch(b.sequences)
        assert len(a.logits) == len(b.logits) or not torch.equal(sa, sb)
        for step in range(min(len(a.logits), len(b.logits))):
            rows = _alive(sa, prompt_len, step, eos) & _alive(sb, prompt_len, step, eos)
            # a row whose earlier tokens already differ sees different inputs: stop comparing it
            rows &= (sa[:, prompt_len : prompt_len + step] == sb[:, prompt_len : prompt_len + step]).all(dim=1)
            if not rows.any():
                continue
            diff = (to_torch(a.logits[step]).float() - to_torch(b.logits[step]).float()).abs()[rows].max().item()
            assert diff <= LOGITS_ATOL, f"{kind} seed {seed}: step {step} logits tp{tp} vs tp1 max |diff| {diff:.3g}"
        if not torch.equal(sa, sb):
            row = next(r for r in range(sa.shape[0]) if not torch.equal(sa[r], sb[r]))
            first = next(i for i, (x, y) in enumerate(zip(sa[row].tolist(), sb[row].tolist())) if x != y)
            raise AssertionError(
                f"{kind} seed {seed}: tp{tp} sampled differently from tp1, row {row}, new token "
                f"{first - prompt_len}\n tp1:  {sa[row].tolist()}\n tp{tp}: {sb[row].tolist()}"
            )
        outputs.append(sa)
    # not a tautology: the runs really sampled (not greedy), and the seed matters
    assert any(not torch.equal(o, to_torch(greedy)) for o in outputs), f"{kind}: sampling gave greedy tokens"
    assert not torch.equal(outputs[0], outputs[1]), f"{kind}: seeds {SAMPLE_SEEDS[:2]} sampled the same tokens"


# -- (3) 16 concurrent threads at tp 2 ------------------------------------------------------------

THREADS = 16


_call = mixed_call  # as in test_serving_concurrency.py


@pytest.mark.parametrize("sample", [False, True], ids=["greedy", "sampled"])
@pytest.mark.parametrize("kind", ["llama", "qwen3"])
def test_tp2_16_threads_get_their_sequential_tokens(kind, sample, tp_gen):
    gen = tp_gen(kind, 2)
    calls = [_call(i, sample) for i in range(THREADS)]
    solo = [gen.generate(**c) for c in calls]
    tp1 = [tp_gen(kind, 1).generate(**c) for c in calls]
    assert solo == tp1, f"{kind}: tp2 sequential tokens differ from tp1's"
    steps0, reduces0 = gen.scheduler_stats()["steps"], _all_reduces(gen)
    # Hold the scheduler until all 16 requests are queued, so they provably share steps.
    threads, results, errors = queue_then_release(gen, calls)
    join_all(threads)
    assert not errors, errors
    for i, (got, want) in enumerate(zip(results, solo)):
        assert got == want, f"{kind} tp2: request {i} differs under concurrency"
    # a caller can get its result just before the scheduler frees its slot
    wait_for(lambda: gen.scheduler_stats()["running_sequences"] == 0, "the slots to be freed")
    stats = gen.scheduler_stats()
    assert stats["max_step_sequences"] == THREADS, stats
    steps = stats["steps"] - steps0
    assert steps >= max(c["max_new_tokens"] for c in calls), stats
    # mixed prefill/decode steps of many rows still cost two all-reduces per layer
    assert stats["all_reduces"] - reduces0 == 2 * _layers(gen) * steps, (stats["all_reduces"], reduces0, steps)


# -- (5) all-reduce bit identity and counts -------------------------------------------------------


@pytest.mark.parametrize(
    "case", [("llama", 2), ("qwen3", 2), ("llama_8q4kv", 4), ("llama_8q2kv", 4), ("llama_mqa", 4)], ids=_case_id
)
def test_all_reduces_leave_ranks_bit_identical(case, hf_tok, tp_gen):
    kind, tp = case
    gen = tp_gen(kind, tp)
    layers = _layers(gen)
    enc = _left_padded(hf_tok, PROMPTS[:3], return_tensors="np")
    kw = dict(attention_mask=enc["attention_mask"], max_new_tokens=6, min_new_tokens=6, do_sample=False)

    def recorded_run():
        steps0, reduces0 = gen.scheduler_stats()["steps"], _all_reduces(gen)
        gen._record_all_reduces(True)
        try:
            out = gen.generate(enc["input_ids"], **kw)
        finally:
            gen._record_all_reduces(False)
        log = gen._all_reduce_log()
        steps = gen.scheduler_stats()["steps"] - steps0
        return out, log, steps, _all_reduces(gen) - reduces0

    out, log, steps, reduces = recorded_run()
    assert steps == 6, f"{kind}: 6 new tokens took {steps} scheduler steps"
    assert len(log) == 2 * layers * steps, f"{kind} tp{tp}: {len(log)} all-reduces for {steps} steps of {layers} layers"
    assert reduces == len(log), f"{kind} tp{tp}: scheduler_stats all_reduces grew by {reduces}, log has {len(log)}"
    _check_log(log, tp, f"{kind} tp{tp}")
    assert gen._all_reduce_log() == [], "the log must be cleared when it is returned"

    # deterministic: the same request gives the same digests, in the same order
    out2, log2, steps2, _ = recorded_run()
    np.testing.assert_array_equal(out2, out)
    assert log2 == log, f"{kind} tp{tp}: a second identical run reduced different hidden states"

    # recording off: nothing logged, the counter still counts
    before = _all_reduces(gen)
    gen.generate(enc["input_ids"], **kw)
    assert gen._all_reduce_log() == []
    assert _all_reduces(gen) - before == 2 * layers * 6


def test_all_reduces_of_logits_are_counted(hf_tok, tp_gen):
    gen = tp_gen("llama", 2)
    layers = _layers(gen)
    ids = np.asarray([hf_tok(LONG_TEXT)["input_ids"]], dtype=np.int64)
    before = _all_reduces(gen)
    gen._record_all_reduces(True)
    try:
        gen.logits(ids)
    finally:
        gen._record_all_reduces(False)
    log = gen._all_reduce_log()
    assert _all_reduces(gen) - before == 2 * layers, "one forward of one row: two all-reduces per layer"
    assert len(log) == 2 * layers
    _check_log(log, 2, "llama tp2 logits()")
    # a batch: whole forwards only
    enc = _left_padded(hf_tok, PROMPTS, return_tensors="np")
    before = _all_reduces(gen)
    gen.logits(enc["input_ids"].astype(np.int64), attention_mask=enc["attention_mask"].astype(np.int64))
    delta = _all_reduces(gen) - before
    assert delta > 0 and delta % (2 * layers) == 0, delta


def test_tp1_has_no_all_reduces(hf_tok, tp_gen):
    gen = tp_gen("llama", 1)
    assert gen.memory_stats()["tp_degree"] == 1
    assert _all_reduces(gen) == 0
    gen._record_all_reduces(True)
    try:
        gen.generate(PROMPTS[0], max_new_tokens=4)
        gen.logits(np.asarray([hf_tok(PROMPTS[1])["input_ids"]], dtype=np.int64))
    finally:
        gen._record_all_reduces(False)
    assert gen._all_reduce_log() == []
    assert _all_reduces(gen) == 0
    assert gen.scheduler_stats()["steps"] >= 4


# -- (6) memory_stats -----------------------------------------------------------------------------


def _expected_weight_bytes(cfg, tp: int) -> int:
    """Bytes the largest rank holds (f32 llama layout, no biases): the whole embedding and all
    norms replicated; q and o 1/tp of the query heads; k and v 1/tp of the kv heads, or the one kv
    head the rank's query heads use when kv heads < tp; gate/up/down 1/tp of the intermediate;
    the untied lm_head ceil(vocab / tp) rows (a tied head is a view of the embedding: 0 bytes)."""
    h, v, n_layers, inter = cfg.hidden_size, cfg.vocab_size, cfg.num_hidden_layers, cfg.intermediate_size
    heads, kv = cfg.num_attention_heads, cfg.num_key_value_heads
    hd = h // heads
    kv_rank = kv // tp if kv % tp == 0 else 1
    per_layer = (
        (heads // tp) * hd * h  # q_proj rows
        + 2 * kv_rank * hd * h  # k_proj, v_proj rows
        + h * (heads // tp) * hd  # o_proj columns
        + 3 * (inter // tp) * h  # gate/up rows, down columns
        + 2 * h  # input_layernorm, post_attention_layernorm
    )
    head = 0 if cfg.tie_word_embeddings else -(-v // tp) * h
    return F32 * (v * h + n_layers * per_layer + h + head)


def _safetensors_bytes(model_dir) -> int:
    total = 0
    for f in model_dir.glob("*.safetensors"):
        with open(f, "rb") as fh:
            n = int.from_bytes(fh.read(8), "little")
            header = json.loads(fh.read(n))
        total += sum(t["data_offsets"][1] - t["data_offsets"][0] for k, t in header.items() if k != "__metadata__")
    return total


def _memory_stats(gen, tp) -> dict:
    ms = gen.memory_stats()
    assert isinstance(ms, dict), type(ms)
    for key in ("tp_degree", "weight_bytes_per_rank", "kv_cache_bytes_per_token"):
        assert isinstance(ms[key], int) and not isinstance(ms[key], bool), (key, ms)
    assert ms["tp_degree"] == tp, ms
    return ms


# llama_wide (vocab 386, hidden 64, 2 layers, 4 heads / 2 kv heads of 16, intermediate 1024,
# untied), in f32 parameters:
#   tp 1: embedding 386*64 = 24,704; lm_head 24,704; per layer q 4,096 + k 2,048 + v 2,048 +
#         o 4,096 + gate/up/down 3*65,536 + norms 128 = 209,024, x2 = 418,048; final norm 64;
#         total 467,520 = 1,870,080 bytes (the safetensors file's tensor bytes).
#   tp 2: embedding 24,704 (replicated); lm_head 193 rows = 12,352; per layer 2,048 + 1,024 +
#         1,024 + 2,048 + 98,304 + 128 = 104,576, x2 = 209,152; final norm 64;
#         total 246,272 = 985,088 bytes = 0.527 x tp 1 (<= 0.6 even with the embedding replicated;
#         an unsharded lm_head would make it 0.553, unsharded MLPs 0.947).
#   tp 4: embedding 24,704; lm_head 97 rows = 6,208; per layer q 1,024 + k/v 1,024 each (1 kv
#         head: 2 kv heads < 4 ranks) + o 1,024 + 49,152 + 128 = 53,376, x2 = 106,752; + 64;
#         total 137,728 = 550,912 bytes = 0.295 x tp 1.
def test_weight_bytes_per_rank_shrink_with_tp(tp_dir, tp_gen):
    d = tp_dir("llama_wide")
    one = _memory_stats(tp_gen("llama_wide", 1), 1)["weight_bytes_per_rank"]
    assert _safetensors_bytes(d) == _expected_weight_bytes(tp_gen("llama_wide", 1).config, 1) == 1_870_080
    assert one == 1_870_080, one
    two = _memory_stats(tp_gen("llama_wide", 2), 2)["weight_bytes_per_rank"]
    four = _memory_stats(tp_gen("llama_wide", 4), 4)["weight_bytes_per_rank"]
    assert two <= 0.6 * one, (two, one, two / one)
    assert two == 985_088, (two, two / one)
    assert four == 550_912, (four, four / one)


@pytest.mark.parametrize(
    "case",
    [("llama", 2), ("llama_tied", 2), ("llama_8q4kv", 4), ("llama_8q2kv", 4), ("llama_mqa", 2), ("llama_mqa", 4)],
    ids=_case_id,
)
def test_weight_bytes_per_rank_by_hand(case, tp_dir, tp_gen):
    """The largest rank's weight bytes equal the by-hand count (replicated kv heads counted once
    per rank that holds them; a tied head adds nothing); tp 1 holds every stored byte."""
    kind, tp = case
    one, many = tp_gen(kind, 1), tp_gen(kind, tp)
    full = _expected_weight_bytes(one.config, 1)
    assert _safetensors_bytes(tp_dir(kind)) == full, "fixture: the by-hand count must match the checkpoint"
    assert _memory_stats(one, 1)["weight_bytes_per_rank"] == full
    got = _memory_stats(many, tp)["weight_bytes_per_rank"]
    want = _expected_weight_bytes(many.config, tp)
    assert got == want, f"{kind} tp{tp}: weight_bytes_per_rank {got}, by hand {want} (tp1: {full})"


@pytest.mark.parametrize(
    "case, fraction",
    [
        (("llama", 2), 1 / 2),  # 2 kv heads: one per rank
        (("qwen3", 2), 1 / 2),  # head_dim 32 != hidden / heads
        (("llama_8q4kv", 4), 1 / 4),  # 4 kv heads: one per rank
        (("llama_8q2kv", 4), 1 / 2),  # 2 kv heads, 4 ranks: each rank holds the 1 its queries use
        (("llama_mqa", 2), 1),  # 1 kv head: replicated on every rank
        (("llama_mqa", 4), 1),
    ],
    ids=lambda c: _case_id(c) if isinstance(c, tuple) else None,
)
def test_kv_cache_bytes_per_token_per_rank(case, fraction, tp_gen):
    kind, tp = case
    one, many = tp_gen(kind, 1), tp_gen(kind, tp)
    cfg = one.config
    hd = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    per_token_tp1 = cfg.num_hidden_layers * 2 * cfg.num_key_value_heads * hd * F32
    kv1 = _memory_stats(one, 1)["kv_cache_bytes_per_token"]
    assert kv1 == per_token_tp1 == one.scheduler_stats()["cache_bytes_per_token"], (kv1, per_token_tp1)
    kvn = _memory_stats(many, tp)["kv_cache_bytes_per_token"]
    assert kvn == int(kv1 * fraction), f"{kind} tp{tp}: {kvn} KV bytes per token per rank, tp1 {kv1}"


# -- (7) invalid degrees --------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kind, tp, heads, kv",
    [
        ("llama", 3, 4, 2),  # 3 divides neither
        ("llama", 8, 4, 2),  # more ranks than query heads
        ("llama_8q4kv", 3, 8, 4),
        ("llama_mqa", 8, 4, 1),
    ],
)
def test_invalid_tp_degree_names_the_head_counts(kvgen, tp_dir, kind, tp, heads, kv):
    with pytest.raises(kvgen.InvalidInputError) as info:
        kvgen.Generator.from_pretrained(str(tp_dir(kind)), tp_degree=tp)
    assert isinstance(info.value, ValueError)
    msg = str(info.value)
    for part in (f"num_attention_heads={heads}", f"num_key_value_heads={kv}", "valid"):
        assert part in msg, f"{part!r} not in {msg!r}"


def test_smollm2_tp2_is_invalid(kvgen, gguf_path):
    """SmolLM2-135M: 9 query heads, 3 kv heads: 2 divides neither."""
    with pytest.raises(kvgen.InvalidInputError) as info:
        kvgen.Generator.from_pretrained(gguf_path, tp_degree=2)
    msg = str(info.value)
    for part in ("num_attention_heads=9", "num_key_value_heads=3", "valid"):
        assert part in msg, f"{part!r} not in {msg!r}"


@pytest.mark.parametrize("tp", [0, -1])
def test_tp_degree_below_one_is_invalid(kvgen, tp_dir, tp):
    with pytest.raises(kvgen.InvalidInputError, match="tp_degree"):
        kvgen.Generator.from_pretrained(str(tp_dir("llama")), tp_degree=tp)


def test_torch_backend_refuses_tp(kvgen, tp_dir):
    if not kvgen._kvgen.HAS_TORCH:
        pytest.skip("this build has no torch backend")
    with pytest.raises(kvgen.InvalidInputError, match="tp_degree"):
        kvgen.Generator.from_pretrained(str(tp_dir("llama")), backend="torch", tp_degree=2)


# -- (8) GGUF, quantized --------------------------------------------------------------------------

# A quantized model at tp N computes its activations' 8-bit blocks per rank; the ranks' inputs
# after an all-reduce differ from tp 1's by rounding, which can move one int8 step of a block, so
# greedy is compared up to the first step where tp 1's own top-1/top-2 margin is <= 5e-3 (such a
# step moves the hidden state by ~1e-3 relative, rarely: a 1-ulp change crosses an int8 rounding
# boundary with probability ~1e-5 per element). The smallest tp 1 margin of the rows below is
# 7.9e-3 (qwen2) / 1.2e-2 (llama): every token is compared today.
QUANT_MARGIN = 5e-3


def _assert_greedy_equal_unless_near_tie(ref, out, prompt_len, what, threshold=QUANT_MARGIN):
    """`ref` (tp 1, with output_logits) and `out` (tp N) sequences equal up to ref's first near-tie
    per row; at least 3/4 of the new tokens must be compared."""
    rs, os_ = to_torch(ref.sequences), to_torch(out.sequences)
    assert rs.shape == os_.shape, (what, tuple(rs.shape), tuple(os_.shape))
    margins = step_margins([to_torch(lg) for lg in ref.logits])
    compared = 0
    for row in range(rs.shape[0]):
        n = next((s for s in range(margins.shape[1]) if margins[row, s] <= threshold), margins.shape[1])
        compared += n
        a, b = rs[row, : prompt_len + n].tolist(), os_[row, : prompt_len + n].tolist()
        assert a == b, f"{what}: row {row} differs (compared {n} new tokens)\n tp1: {a}\n tpN: {b}"
    total = rs.shape[0] * margins.shape[1]
    assert compared >= total * 3 // 4, f"{what}: only {compared}/{total} new tokens comparable"


@pytest.fixture(scope="module", params=[("llama", "llama"), ("qwen2", "gpt2")], ids=["llama-spm", "qwen2-bpe"])
def tiny_gguf_file(request, tmp_path_factory):
    """tiny_gguf.write_tiny: 4 heads / 2 kv heads, hidden 256, intermediate 512, every quant type
    (K-quants' 256-blocks along the input columns: o/down split at tp 2 stays block aligned);
    llama untied (vocab 364), qwen2 tied with biases (vocab 279: the vocab split is uneven)."""
    from tiny_gguf import write_tiny

    arch, tokenizer = request.param
    path = str(tmp_path_factory.mktemp("gguf-tp") / f"{arch}.gguf")
    write_tiny(path, arch, tokenizer)
    return path


def test_gguf_quantized_tp2_greedy_equals_tp1(kvgen, tiny_gguf_file):
    one = kvgen.Generator.from_pretrained(tiny_gguf_file)  # dtype="auto": the quantized blocks
    two = kvgen.Generator.from_pretrained(tiny_gguf_file, tp_degree=2)
    exact = kvgen.Generator.from_pretrained(tiny_gguf_file, dtype="float32")
    ids = np.asarray([[0, 0, 0, 1, 5, 6, 7], [1, 11, 12, 13, 14, 15, 16], [0, 0, 0, 0, 0, 1, 40]], dtype=np.int64)
    mask = (np.arange(ids.shape[1])[None, :] >= np.asarray([[3], [0], [5]])).astype(np.int64)
    # the quantized path really is quantized (else this would test the f32 path twice)
    assert np.abs(one.logits(ids[1:2]) - exact.logits(ids[1:2])).max() > 1e-3
    kw = dict(attention_mask=mask, max_new_tokens=12, min_new_tokens=12, do_sample=False,
              return_dict_in_generate=True, output_logits=True)
    ref, out = one.generate(ids, **kw), two.generate(ids, **kw)
    _assert_greedy_equal_unless_near_tie(ref, out, ids.shape[1], f"{os.path.basename(tiny_gguf_file)} tp2")
    assert two.memory_stats()["tp_degree"] == 2
    assert two.memory_stats()["weight_bytes_per_rank"] < one.memory_stats()["weight_bytes_per_rank"]
    assert two.memory_stats()["kv_cache_bytes_per_token"] * 2 == one.memory_stats()["kv_cache_bytes_per_token"]


@pytest.fixture(scope="module")
def smollm2_tp3(kvgen, gguf_path):
    """SmolLM2-135M-Instruct Q4_1 (9 heads / 3 kv heads, intermediate 1536, hidden 576: o_proj's
    input split is 192 columns per rank, six Q4_1 blocks) at tp 1 and tp 3."""
    return kvgen.Generator.from_pretrained(gguf_path), kvgen.Generator.from_pretrained(gguf_path, tp_degree=3)


def test_smollm2_quantized_tp3_greedy_equals_tp1(smollm2_tp3):
    one, three = smollm2_tp3
    assert three.memory_stats()["tp_degree"] == 3
    ids = one.tokenizer.apply_chat_template(
        [{"role": "user", "content": "What is the capital of France?"}], add_generation_prompt=True
    )
    ids = [list(ids["input_ids"]) if not isinstance(ids, list) else ids]
    kw = dict(max_new_tokens=12, min_new_tokens=12, do_sample=False, return_dict_in_generate=True, output_logits=True)
    ref, out = one.generate(ids, **kw), three.generate(ids, **kw)
    _assert_greedy_equal_unless_near_tie(ref, out, len(ids[0]), "SmolLM2 Q4_1 tp3", threshold=5e-2)


def test_smollm2_quantized_tp3_stream_and_stop_strings(smollm2_tp3):
    one, three = smollm2_tp3
    prompt = one.tokenizer.apply_chat_template(
        [{"role": "user", "content": "Write one sentence about the sea."}], add_generation_prompt=True, tokenize=False
    )
    # tp 3 sums o/down partials per rank: a near-tie may flip versus tp 1 (the margin-aware test
    # above covers agreement), so the stream is checked against tp 3's own generate().
    full = three.generate(prompt, max_new_tokens=16, do_sample=False)
    assert full.startswith(one.generate(prompt, max_new_tokens=4, do_sample=False))
    deltas = list(three.stream(prompt, max_new_tokens=16, do_sample=False))
    assert len(deltas) > 1 and "".join(deltas) == full
    stop = full[4:8]
    assert len(stop) == 4, full
    streamed = "".join(three.stream(prompt, max_new_tokens=16, do_sample=False, stop_strings=[stop]))
    assert streamed == full[: full.find(stop) + len(stop)]


def test_tp2_stream_and_stop_strings(tp_gen):
    """As test_streaming.py, at tp 2 (the tiny GGUF files decode to invalid UTF-8 noise, so the
    text checks use the tiny-tokenizer llama; SmolLM2 above covers a quantized file)."""
    gen = tp_gen("llama", 2)
    full = gen.generate(PROMPTS[1], max_new_tokens=24)
    assert full == tp_gen("llama", 1).generate(PROMPTS[1], max_new_tokens=24)
    deltas = list(gen.stream(PROMPTS[1], max_new_tokens=24))
    assert len(deltas) > 1 and "".join(deltas) == full
    stop = full[5:8]
    assert len(stop) == 3
    streamed = "".join(gen.stream(PROMPTS[1], max_new_tokens=24, stop_strings=[stop]))
    assert streamed == full[: full.find(stop) + len(stop)]
