"""The scheduler survives its own faults: a panic injected (a test-only hook) at admission, in one
request's part of a mixed step, in a release or in the loop itself ends only the requests it
should, with kvgen.InternalError, and the generator keeps serving with its slots free."""

from __future__ import annotations

import pytest

from scheduler_helpers import join_all, queue_then_release, run_threads, wait_for

KIND = "llama"
# A token no other test prompt uses: the fault fires only for work that holds it.
MARKER = 97


@pytest.fixture(scope="module")
def gen(kv_model):
    return kv_model(KIND)


@pytest.fixture
def arm(kvgen):
    armed = []

    def do(point: str) -> None:
        kvgen._kvgen._arm_fault(point, MARKER)
        armed.append(point)

    yield do
    for point in armed:
        kvgen._kvgen._arm_fault(point, None)


def _call(i: int) -> dict:
    return dict(inputs=[[3 + (i * 7 + t * 5) % 80 for t in range(3 + i % 3)]], max_new_tokens=12, min_new_tokens=12)


def _poisoned() -> dict:
    return dict(inputs=[[5, MARKER, 6]], max_new_tokens=12, min_new_tokens=12)


def _assert_serving(gen, kvgen) -> None:
    wait_for(lambda: gen.scheduler_stats()["running_sequences"] == 0, "the slots to be free")
    assert gen.generate(**_call(0)) == gen.generate(**_call(0))


@pytest.mark.parametrize("point", ["admit", "step"])
def test_a_fault_in_one_request_fails_only_that_request(gen, kvgen, arm, point):
    """Three good requests and a poisoned one admitted together (their prefills share one
    step): the poisoned one raises InternalError, the others get their solo tokens."""
    calls = [_call(i) for i in range(3)]
    solo = [gen.generate(**c) for c in calls]
    arm(point)
    threads, results, errors = queue_then_release(gen, calls + [_poisoned()])
    join_all(threads)
    assert isinstance(errors.get(3), kvgen.InternalError), errors
    assert "injected fault" in str(errors[3])
    assert results[:3] == solo
    _assert_serving(gen, kvgen)


def test_a_fault_in_a_decode_step_of_a_mixed_batch(gen, kvgen, arm):
    """The poisoned request joins two running ones mid-generation: its prefill shares a step with
    their decode; only it fails, and the running ones continue to their solo tokens."""
    calls = [dict(_call(i), max_new_tokens=30, min_new_tokens=30) for i in range(2)]
    solo = [gen.generate(**c) for c in calls]
    arm("step")
    engine = gen._engine
    engine._pause_scheduler(True)
    try:
        threads, results, _ = run_threads(gen, calls)
        wait_for(lambda: gen.scheduler_stats()["queued_requests"] == 2, "2 queued requests")
        steps = gen.scheduler_stats()["steps"]
        engine._pause_scheduler(True, after_steps=3)  # both prefill together, then decode twice
        wait_for(lambda: gen.scheduler_stats()["steps"] == steps + 3, "3 steps")
        assert gen.scheduler_stats()["running_requests"] == 2
        bad_threads, _, bad_errors = run_threads(gen, [_poisoned()])
        wait_for(lambda: gen.scheduler_stats()["queued_requests"] == 1, "the poisoned request queued")
    finally:
        engine._pause_scheduler(False)
    join_all(threads + bad_threads)
    assert isinstance(bad_errors.get(0), kvgen.InternalError), bad_errors
    assert results == solo
    _assert_serving(gen, kvgen)


def test_a_fault_in_release_is_contained(gen, kvgen, arm):
    calls = [_call(i) for i in range(2)]
    solo = [gen.generate(**c) for c in calls + [_poisoned()]]
    faults = gen.scheduler_stats()["internal_faults"]
    arm("release")
    threads, results, errors = run_threads(gen, calls + [_poisoned()])
    join_all(threads)
    # The generation itself had finished: its caller gets it; the fault is counted.
    assert not errors and results == solo, errors
    assert gen.scheduler_stats()["internal_faults"] == faults + 1
    _assert_serving(gen, kvgen)


def test_a_fault_in_the_loop_fails_the_requests_in_flight_and_the_worker_carries_on(gen, kvgen, arm):
    faults = gen.scheduler_stats()["internal_faults"]
    arm("loop")
    threads, _, errors = run_threads(gen, [_call(1), _poisoned()])
    join_all(threads)
    assert isinstance(errors.get(1), kvgen.InternalError), errors
    assert "internal fault" in str(errors[1])
    assert gen.scheduler_stats()["internal_faults"] > faults
    kvgen._kvgen._arm_fault("loop", None)
    _assert_serving(gen, kvgen)


def test_async_waits_end_on_a_fault(gen, kvgen, arm):
    import asyncio

    arm("step")

    async def main():
        with pytest.raises(kvgen.InternalError):
            await asyncio.wait_for(gen.agenerate(**_poisoned()), timeout=20)
        with pytest.raises(kvgen.InternalError):
            await asyncio.wait_for(_collect(gen.astream([5, MARKER, 6], max_new_tokens=5)), timeout=20)
        return await asyncio.wait_for(gen.agenerate(**_call(2)), timeout=20)

    async def _collect(stream):
        return [d async for d in stream]

    assert asyncio.run(main()) == gen.generate(**_call(2))
