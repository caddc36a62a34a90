"""Concurrent generation through the continuous-batching scheduler: many threads at once get
exactly the tokens each gets alone (greedy and seeded sampling), and they really share steps;
requests that arrive mid-generation join the running batch; the bounds queue the rest."""

from __future__ import annotations

import numpy as np
import pytest

from scheduler_helpers import join_all, mixed_call, queue_then_release, run_threads, wait_for

THREADS = 16


_call = mixed_call


@pytest.mark.parametrize("sample", [False, True], ids=["greedy", "sampled"])
@pytest.mark.parametrize("kind", ["llama", "qwen3"])
def test_16_threads_get_their_solo_tokens_in_shared_steps(kv_model, kind, sample):
    gen = kv_model(kind)
    calls = [_call(i, sample) for i in range(THREADS)]
    solo = [gen.generate(**c) for c in calls]
    # Hold the scheduler until all 16 requests are queued, so they provably share steps.
    threads, results, errors = queue_then_release(gen, calls)
    join_all(threads)
    assert not errors, errors
    for i, (got, want) in enumerate(zip(results, solo)):
        assert got == want, f"request {i} differs under concurrency"
    stats = gen.scheduler_stats()
    assert stats["max_step_sequences"] == THREADS, stats
    assert stats["running_sequences"] == 0


def test_free_running_threads_match_solo(kv_model):
    """No pause: threads race into the scheduler however they arrive."""
    gen = kv_model("llama")
    calls = [_call(i, sample=i % 2 == 1) for i in range(THREADS)]
    solo = [gen.generate(**c) for c in calls]
    threads, results, errors = run_threads(gen, calls)
    for t in threads:
        t.join(30)
    assert not errors, errors
    assert results == solo


def test_request_joins_a_running_batch_with_its_prefill(kv_model):
    gen = kv_model("llama")
    engine = gen._engine
    long_call = dict(inputs=[[5, 6, 7, 8]], max_new_tokens=40, min_new_tokens=40)
    late_call = dict(inputs=[[9, 10, 11]], max_new_tokens=12, do_sample=True, seed=3)
    solo_long, solo_late = gen.generate(**long_call), gen.generate(**late_call)
    engine.reset_scheduler_peaks()
    steps_before = gen.scheduler_stats()["steps"]
    # Let the long request run 5 steps, then hold it mid-generation.
    engine._pause_scheduler(True, 5)
    threads, results, errors = run_threads(gen, [long_call])
    wait_for(lambda: gen.scheduler_stats()["steps"] == steps_before + 5, what="5 steps")
    assert gen.scheduler_stats()["running_requests"] == 1
    late_threads, late_results, late_errors = run_threads(gen, [late_call])
    wait_for(lambda: gen.scheduler_stats()["queued_requests"] == 1, what="the late request queued")
    engine._pause_scheduler(False)
    for t in threads + late_threads:
        t.join(30)
    assert not errors and not late_errors, errors | late_errors
    assert results[0] == solo_long and late_results[0] == solo_late
    stats = gen.scheduler_stats()
    assert stats["mixed_steps"] >= 1, stats  # the late prefill ran in the same step as decode
    assert stats["max_step_sequences"] == 2


def _limits(gen) -> dict:
    stats = gen.scheduler_stats()
    return dict(max_sequences=stats["max_sequences"], max_cache_tokens=stats["max_cache_tokens"])


@pytest.mark.parametrize(
    "bound, calls, max_step",
    [
        # Two sequences at a time.
        (dict(max_sequences=2), [_call(i, sample=False) for i in range(6)], 2),
        # Room for one 4-token prompt + 20 new tokens at a time.
        (dict(max_cache_tokens=30), [dict(inputs=[[4 + i, 5, 6, 7]], max_new_tokens=20) for i in range(4)], 1),
    ],
    ids=["max_sequences", "max_cache_tokens"],
)
def test_bounds_queue_the_rest(kv_model, bound, calls, max_step):
    gen = kv_model("mistral")
    solo = [gen.generate(**c) for c in calls]
    previous = _limits(gen)
    gen.set_scheduler_limits(**bound)
    try:
        assert _limits(gen) == dict(previous, **bound)
        threads, results, errors = queue_then_release(gen, calls)
        join_all(threads)
        assert not errors, errors
        for i, (got, want) in enumerate(zip(results, solo)):
            assert got == want, f"request {i} under {bound} differs from its solo run"
        # all were waiting when the scheduler was released: bounded, and the bound was used
        assert gen.scheduler_stats()["max_step_sequences"] == max_step, gen.scheduler_stats()
    finally:
        gen.set_scheduler_limits(**previous)
    assert _limits(gen) == previous


def test_scores_and_batches_through_the_scheduler(kv_model):
    """A multi-row call with scores keeps transformers' layout when others run beside it."""
    gen = kv_model("llama")
    ids = np.array([[1, 5, 6, 7], [8, 9, 10, 11]])
    kw = dict(max_new_tokens=6, return_dict_in_generate=True, output_scores=True, output_logits=True)
    alone = gen.generate(ids, **kw)
    threads, results, errors = run_threads(gen, [dict(inputs=ids, **kw)] + [_call(i, True) for i in range(6)])
    for t in threads:
        t.join(30)
    assert not errors
    for i, c in enumerate(results[1:], start=1):
        assert c is not None, f"request {i} returned nothing"
    got = results[0]
    np.testing.assert_array_equal(got.sequences, alone.sequences)
    assert len(got.scores) == len(alone.scores) == len(got.logits) == len(alone.logits) == 6
    for a, b in zip(got.scores, alone.scores):
        np.testing.assert_array_equal(a, b)
    for a, b in zip(got.logits, alone.logits):
        np.testing.assert_array_equal(a, b)


def test_bad_limits_are_refused(kv_model, kvgen):
    gen = kv_model("llama")
    with pytest.raises(kvgen.InvalidInputError, match="max_sequences"):
        gen.set_scheduler_limits(max_sequences=0)
