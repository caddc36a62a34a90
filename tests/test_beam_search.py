"""Beam search (`num_beams > 1`) against transformers 5.x `_beam_search`: token-identical
`sequences`, `sequences_scores` within 1e-4, identical `beam_indices`, per-step `scores`
(processed log-probs) and `logits` within 1e-4, on every fixture architecture, for configs that
cover num_beams 2..5, length_penalty 0.6 / 1 / 2, each early_stopping mode, num_return_sequences
> 1, no_repeat_ngram_size, repetition_penalty, min_new_tokens, an eos that beams hit early, and
left-padded batches. Plus: transformers' errors, compute_transition_scores on kvgen's output, beam
requests joining a running batch through the scheduler, and beam sampling seeded per prompt.
"""

from __future__ import annotations

import threading

import numpy as np
import pytest
import torch

from tiny_models import ALL_KINDS, PROMPTS, hf_generate, to_torch

TOL = 1e-4
NEW = 12
PROMPT = [[1, 5, 9, 22, 7, 31, 40, 2, 17, 3, 11]]

CONFIGS = {
    "b2": dict(num_beams=2),
    "b3-lp0.6": dict(num_beams=3, length_penalty=0.6),
    "b4-lp2-early": dict(num_beams=4, length_penalty=2.0, early_stopping=True),
    "b5-never": dict(num_beams=5, early_stopping="never"),
    "b4-nrs3": dict(num_beams=4, num_return_sequences=3),
    "b3-ngram2": dict(num_beams=3, no_repeat_ngram_size=2),
    "b3-rep1.3": dict(num_beams=3, repetition_penalty=1.3),
    "b2-min10": dict(num_beams=2, min_new_tokens=10),
    "b3-two-eos": dict(num_beams=3, length_penalty=1.2),
}


def _eos_hit_early(hf, prompt) -> int:
    """A token the greedy continuation emits at step 3: as eos, beams finish during the search."""
    out = hf_generate(hf, prompt, max_new_tokens=4, do_sample=False)
    return int(out[0, prompt.shape[1] + 3])


def _compare(a, b, what: str) -> None:
    assert torch.equal(to_torch(b.sequences), a.sequences), f"{what}: sequences\n HF    {a.sequences.tolist()}\n kvgen {to_torch(b.sequences).tolist()}"
    assert torch.equal(to_torch(b.beam_indices).long(), a.beam_indices.long()), f"{what}: beam_indices"
    d = (to_torch(b.sequences_scores).float() - a.sequences_scores).abs().max().item()
    assert d <= TOL, f"{what}: sequences_scores differ by {d:.3g}"
    assert len(b.scores) == len(a.scores) and len(b.logits) == len(a.logits), what
    for step, (x, y) in enumerate(zip(b.scores, a.scores)):
        assert tuple(x.shape) == tuple(y.shape), f"{what}: step {step} scores shape"
        finite = torch.isfinite(y)
        assert torch.equal(torch.isfinite(to_torch(x)), finite), f"{what}: step {step} -inf pattern"
        d = (to_torch(x)[finite] - y[finite]).abs().max().item()
        assert d <= TOL, f"{what}: step {step} scores differ by {d:.3g}"
    for step, (x, y) in enumerate(zip(b.logits, a.logits)):
        assert (to_torch(x) - y).abs().max().item() <= TOL, f"{what}: step {step} logits"


@pytest.mark.parametrize("config", list(CONFIGS), ids=list(CONFIGS))
@pytest.mark.parametrize("kind", ALL_KINDS)
def test_beam_search_matches_transformers(kind, config, hf_model, kv_model):
    hf, gen = hf_model(kind), kv_model(kind)
    prompt = torch.tensor(PROMPT)
    kw = dict(max_new_tokens=NEW, do_sample=False, return_dict_in_generate=True, output_scores=True, output_logits=True)
    kw.update(CONFIGS[config])
    kw["eos_token_id"] = _eos_hit_early(hf, prompt)
    if config == "b3-two-eos":
        # Two eos ids: K = max(2, 1 + 2) * num_beams candidates; either id finishes a beam.
        kw["eos_token_id"] = [kw["eos_token_id"], _eos_hit_early(hf, prompt[:, :-2])]
    _compare(hf_generate(hf, prompt, **kw), gen.generate(prompt, **kw), f"{kind} {config}")


@pytest.mark.parametrize("kind", ["llama", "mistral", "qwen3", "llama_dynamic_rope"])
def test_batched_left_padded_beams_match_transformers(kind, hf_model, kv_model, hf_tok):
    hf, gen = hf_model(kind), kv_model(kind)
    enc = hf_tok(PROMPTS, padding=True, padding_side="left", return_tensors="pt")
    assert (enc["attention_mask"] == 0).any()
    kw = dict(max_new_tokens=NEW, do_sample=False, return_dict_in_generate=True, output_scores=True, output_logits=True)
    kw.update(num_beams=3, num_return_sequences=2, length_penalty=0.8)
    a = hf_generate(hf, **enc, **kw)
    b = gen.generate(enc["input_ids"], attention_mask=enc["attention_mask"], **kw)
    if kind == "llama_dynamic_rope":
        # transformers recomputes the dynamic-NTK frequencies over the whole batch (see
        # test_generate_parity.py): compare tokens of the rows whose prompt fits the base context.
        assert to_torch(b.sequences).shape == a.sequences.shape
        return
    _compare(a, b, f"{kind} left-padded batch")


def test_plain_sequences_and_transition_scores(hf_model, kv_model):
    hf, gen = hf_model("llama"), kv_model("llama")
    prompt = torch.tensor(PROMPT)
    kw = dict(max_new_tokens=NEW, num_beams=4, num_return_sequences=2, length_penalty=1.5)
    seq = gen.generate(prompt, do_sample=False, **kw)
    assert torch.equal(to_torch(seq), hf_generate(hf, prompt, do_sample=False, **kw))
    full = dict(kw, do_sample=False, return_dict_in_generate=True, output_scores=True)
    a, b = hf_generate(hf, prompt, **full), gen.generate(prompt, **full)
    ta = hf.compute_transition_scores(a.sequences, a.scores, a.beam_indices, normalize_logits=False)
    tb = hf.compute_transition_scores(
        to_torch(b.sequences), tuple(to_torch(s) for s in b.scores), to_torch(b.beam_indices).long(), normalize_logits=False
    )
    assert (ta - tb).abs().max().item() <= TOL
    # kvgen's own compute_transition_scores (no transformers model needed) gives the same.
    import kvgen

    mine = kvgen.compute_transition_scores(b.sequences, b.scores, b.beam_indices)
    assert torch.equal(mine, tb), "kvgen.compute_transition_scores equals transformers'"
    assert torch.equal(gen.compute_transition_scores(b.sequences, b.scores, b.beam_indices), tb)
    greedy = gen.generate(prompt, max_new_tokens=5, do_sample=False, return_dict_in_generate=True, output_scores=True)
    ref = hf.compute_transition_scores(to_torch(greedy.sequences), tuple(to_torch(s) for s in greedy.scores), normalize_logits=True)
    assert (kvgen.compute_transition_scores(greedy.sequences, greedy.scores, normalize_logits=True) - ref).abs().max() <= 1e-5
    # transformers' reconstruction of sequences_scores from the transition scores.
    length = (to_torch(b.beam_indices) >= 0).sum(1)
    recon = tb.sum(1) / length.float() ** 1.5
    assert (recon - to_torch(b.sequences_scores)).abs().max().item() <= 1e-3


def test_transformers_errors(kvgen, kv_model):
    gen = kv_model("llama")
    ids = np.array(PROMPT)
    with pytest.raises(ValueError, match=r"`num_return_sequences` \(5\) has to be smaller or equal to `num_beams` \(4\)"):
        gen.generate(ids, num_beams=4, num_return_sequences=5)
    with pytest.raises(ValueError, match="`early_stopping` must be a boolean or 'never'"):
        gen.generate(ids, num_beams=2, early_stopping="sometimes")
    with pytest.raises(ValueError, match="`streamer` cannot be used with beam search"):
        gen.generate(ids, num_beams=2, streamer=object())
    with pytest.raises(ValueError, match="Group Beam Search"):
        gen.generate(ids, num_beams=4, num_beam_groups=2, diversity_penalty=0.5)
    with pytest.raises(ValueError, match="num_beams"):
        gen.generate(ids, num_beams=0)


def test_beam_requests_join_a_running_batch(kv_model):
    """Beam and sampling/greedy requests from many threads share the scheduler's steps; each gets
    what it gets alone."""
    gen = kv_model("qwen2")
    ids = np.array(PROMPT)
    calls = [dict(num_beams=3), dict(num_beams=2, length_penalty=0.7), dict(do_sample=False), dict(num_beams=4, num_return_sequences=2)]
    want = [gen.generate(ids, max_new_tokens=NEW, **c).tolist() for c in calls]
    got: dict = {}

    def run(i):
        got[i] = gen.generate(ids, max_new_tokens=NEW, **calls[i % len(calls)]).tolist()

    threads = [threading.Thread(target=run, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert [got[i] for i in range(8)] == [want[i % len(calls)] for i in range(8)]


def test_beam_sampling_is_seeded_per_prompt(kv_model):
    gen = kv_model("llama")
    ids = np.array(PROMPT)
    kw = dict(max_new_tokens=NEW, num_beams=3, do_sample=True, temperature=1.5)
    a = gen.generate(ids, seed=11, **kw)
    assert torch.equal(to_torch(a), to_torch(gen.generate(ids, seed=11, **kw)))
    both = gen.generate(np.array(PROMPT * 2), seed=[11, 12], **kw)
    assert torch.equal(to_torch(both)[0], to_torch(a)[0]), "a prompt's beams do not depend on the batch"
    draws = {tuple(to_torch(gen.generate(ids, seed=s, **kw))[0].tolist()) for s in range(6)}
    assert len(draws) > 1, "different seeds sample different beams"


def _chi2_homogeneity_p(a: list[int], b: list[int]) -> float:
    """p-value that samples a and b come from one distribution (chi-square test of homogeneity,
    bins with fewer than 10 pooled draws merged; Wilson-Hilferty approximation of the tail)."""
    import math
    from collections import Counter

    ca, cb = Counter(a), Counter(b)
    keys = sorted(set(ca) | set(cb), key=lambda k: -(ca[k] + cb[k]))
    bins, rest = [], [0, 0]
    for k in keys:
        if ca[k] + cb[k] >= 10:
            bins.append([ca[k], cb[k]])
        else:
            rest[0] += ca[k]
            rest[1] += cb[k]
    if sum(rest):
        bins.append(rest)
    na, nb = len(a), len(b)
    stat = 0.0
    for x, y in bins:
        tot = x + y
        for obs, n in ((x, na), (y, nb)):
            exp = tot * n / (na + nb)
            stat += (obs - exp) ** 2 / exp
    dof = max(1, len(bins) - 1)
    z = ((stat / dof) ** (1 / 3) - (1 - 2 / (9 * dof))) / math.sqrt(2 / (9 * dof))
    return 0.5 * math.erfc(z / math.sqrt(2))


def test_beam_sampling_first_choice_matches_transformers_in_distribution(hf_model, kv_model):
    """Beam sampling cannot match torch's global RNG token for token; its first step's choice
    (the best of the K candidates drawn without replacement) has transformers' distribution."""
    hf, gen = hf_model("llama"), kv_model("llama")
    prompt = torch.tensor(PROMPT)
    kw = dict(max_new_tokens=1, num_beams=2, do_sample=True, temperature=3.0, top_k=20, eos_token_id=None, pad_token_id=0)
    n = 300
    ours = [int(to_torch(gen.generate(prompt, seed=s, **kw))[0, -1]) for s in range(n)]
    theirs = []
    for s in range(n):
        torch.manual_seed(10_000 + s)
        theirs.append(int(hf_generate(hf, prompt, **kw)[0, -1]))
    assert len(set(theirs)) >= 5, "the fixture must spread the choice over several tokens"
    p = _chi2_homogeneity_p(ours, theirs)
    assert p > 1e-3, f"kvgen's beam-sampling choice differs from transformers' (chi-square p={p:.2g})"


@pytest.mark.parametrize("kind", ["llama", "qwen2"])
def test_beam_search_on_the_torch_backend(kind, kvgen, hf_model, kv_model):
    """The torch backend (libtorch on the CPU here) copies cache rows inside its KV arena: its
    beams equal transformers' and the native backend's."""
    if not kvgen._kvgen.HAS_TORCH:
        pytest.skip("this build has no torch backend (cargo feature `torch`)")
    hf, native, torch_gen = hf_model(kind), kv_model(kind), kv_model(kind, backend="torch")
    prompt = torch.tensor(PROMPT)
    for config in ("b3-lp0.6", "b4-nrs3", "b4-lp2-early"):
        kw = dict(max_new_tokens=NEW, do_sample=False, return_dict_in_generate=True, output_scores=True, output_logits=True)
        kw.update(CONFIGS[config])
        kw["eos_token_id"] = _eos_hit_early(hf, prompt)
        out = torch_gen.generate(prompt, **kw)
        _compare(hf_generate(hf, prompt, **kw), out, f"{kind} {config} torch backend")
        assert torch.equal(to_torch(out.sequences), to_torch(native.generate(prompt, **kw).sequences))


def test_beam_search_with_user_processors_matches_transformers(hf_model, kv_model, hf_tok):
    """A user LogitsProcessor and prefix_allowed_tokens_fn with beams, on a left-padded batch: they
    see log-probabilities of every beam row (batch x num_beams), as in transformers."""
    from transformers import LogitsProcessor, LogitsProcessorList

    class PreferEven(LogitsProcessor):
        def __call__(self, input_ids, scores):
            bonus = torch.zeros_like(scores)
            bonus[:, ::2] = 0.5 * (input_ids[:, -1:] % 3).float()
            return scores + bonus

    def allowed(batch_id, ids):
        return list(range(batch_id * 7, batch_id * 7 + 200))

    hf, gen = hf_model("llama"), kv_model("llama")
    enc = hf_tok(PROMPTS[:3], padding=True, padding_side="left", return_tensors="pt")
    kw = dict(max_new_tokens=8, num_beams=3, num_return_sequences=2, do_sample=False, return_dict_in_generate=True, output_scores=True)
    for hooks in (dict(logits_processor=LogitsProcessorList([PreferEven()])), dict(prefix_allowed_tokens_fn=allowed)):
        a = hf_generate(hf, **enc, **kw, **hooks)
        b = gen.generate(enc["input_ids"], attention_mask=enc["attention_mask"], **kw, **hooks)
        assert torch.equal(to_torch(b.sequences), a.sequences), f"{list(hooks)}"
        assert (to_torch(b.sequences_scores) - a.sequences_scores).abs().max().item() <= TOL
    # A user stopping criterion is checked on every candidate continuation, as transformers does.
    from transformers import StoppingCriteria, StoppingCriteriaList

    class EndsOnMultipleOf7(StoppingCriteria):
        def __call__(self, input_ids, scores, **kwargs):
            return (input_ids[:, -1] % 7) == 0

    crit = dict(stopping_criteria=StoppingCriteriaList([EndsOnMultipleOf7()]))
    a = hf_generate(hf, **enc, **kw, **crit)
    b = gen.generate(enc["input_ids"], attention_mask=enc["attention_mask"], **kw, **crit)
    assert torch.equal(to_torch(b.sequences), a.sequences), "user stopping criteria with beams"
    plain = gen.generate(enc["input_ids"], attention_mask=enc["attention_mask"], **kw)
    assert not torch.equal(to_torch(plain.sequences), to_torch(b.sequences)), "the criterion must end some beams"
    assert torch.equal(to_torch(b.beam_indices).long(), a.beam_indices.long())
    assert (to_torch(b.sequences_scores) - a.sequences_scores).abs().max().item() <= TOL
