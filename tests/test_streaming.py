"""gen.stream / gen.astream: deltas concatenate to exactly the generated text, UTF-8 characters
split across tokens are never torn, stop strings end the stream at the right character."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest

from kvgen.streaming import TextAssembler
from tiny_models import PROMPTS

KIND = "llama"


@pytest.fixture(scope="module")
def gen(kv_model):
    return kv_model(KIND)


def _byte_decode(ids):
    return bytes(ids).decode("utf-8", errors="replace")


def test_assembler_holds_back_split_utf8():
    text = "héllo wörld 😀 ok ✓"
    data = list(text.encode("utf-8"))
    asm = TextAssembler(_byte_decode, [])
    deltas = [asm.push(b) for b in data] + [asm.finish()]
    assert all("\ufffd" not in d for d in deltas)
    assert "".join(deltas) == text


def test_assembler_stops_mid_token():
    vocab = ["Hel", "lo wo", "rld! and more"]
    decode = lambda ids: "".join(vocab[i] for i in ids)  # noqa: E731
    asm = TextAssembler(decode, ["o w"])
    out = "".join([asm.push(0), asm.push(1), asm.push(2), asm.finish()])
    assert out == "Hello w"


def test_assembler_without_stop_emits_everything():
    vocab = ["a", "bc", " d"]
    asm = TextAssembler(lambda ids: "".join(vocab[i] for i in ids), [])
    assert "".join([asm.push(0), asm.push(1), asm.push(2), asm.finish()]) == "abc d"


@pytest.mark.parametrize("prompt", PROMPTS[:3])
def test_stream_concatenates_to_generate_text(gen, prompt):
    expected = gen.generate(prompt, max_new_tokens=24)
    deltas = list(gen.stream(prompt, max_new_tokens=24))
    assert "".join(deltas) == expected
    assert len(deltas) > 1


def test_stream_with_stop_string_ends_after_it(gen):
    full = gen.generate(PROMPTS[1], max_new_tokens=24)
    stop = full[5:8]
    assert len(stop) == 3
    streamed = "".join(gen.stream(PROMPTS[1], max_new_tokens=24, stop_strings=[stop]))
    assert streamed == full[: full.find(stop) + len(stop)]


def test_stream_errors_surface(gen):
    with pytest.raises(ValueError, match=r"max_new_tokens=0 must be greater than 0"):
        list(gen.stream(PROMPTS[0], max_new_tokens=0))


def _wait_for(predicate, timeout=5.0):
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.005)
    return True


def test_closing_the_stream_cancels_generation(gen):
    engine = gen._engine
    before = gen.scheduler_stats()["cancelled"]
    # Hold the scheduler after 20 steps, so the 200-token generation is provably still running
    # when the stream is closed (on a tiny model it could otherwise finish before close()). The
    # timer turns a stream that yields nothing in those 20 steps into a failure, not a hang.
    engine._pause_scheduler(True, 20)
    release = threading.Timer(10.0, lambda: engine._pause_scheduler(False))
    release.start()
    try:
        it = gen.stream(PROMPTS[0], max_new_tokens=200, min_new_tokens=200)
        assert next(it)
        assert gen.scheduler_stats()["running_sequences"] == 1, gen.scheduler_stats()
        it.close()
        # The cancellation lands while the scheduler is held.
        cancelled = _wait_for(
            lambda: gen.scheduler_stats()["cancelled"] == before + 1
            and gen.scheduler_stats()["running_sequences"] == 0
        )
        stats = gen.scheduler_stats()
    finally:
        release.cancel()
        engine._pause_scheduler(False)
    assert cancelled, f"closing the stream did not cancel its generation: {stats} (cancelled before: {before})"
    assert stats["cancelled"] == before + 1 and stats["running_sequences"] == 0, stats
    # the generator stays usable afterwards
    assert gen.generate(PROMPTS[0], max_new_tokens=3)


def test_astream_matches_stream_and_keeps_loop_responsive(kv_model):
    gen = kv_model("llama_dynamic_rope")

    async def main():
        gaps = []

        async def heartbeat(stop):
            last = time.perf_counter()
            while not stop.is_set():
                await asyncio.sleep(0.005)
                now = time.perf_counter()
                gaps.append(now - last)
                last = now

        stop = asyncio.Event()
        beat = asyncio.create_task(heartbeat(stop))
        parts = [d async for d in gen.astream(PROMPTS[2], max_new_tokens=600, min_new_tokens=600)]
        stop.set()
        await beat
        return parts, gaps

    parts, gaps = asyncio.run(main())
    expected = gen.generate(PROMPTS[2], max_new_tokens=600, min_new_tokens=600)
    assert "".join(parts) == expected
    assert max(gaps) < 0.05, f"event loop blocked for {max(gaps) * 1e3:.0f} ms"


def test_assembler_decodes_a_bounded_window_per_token():
    """Streaming a long text costs O(tokens): each push decodes a few recent tokens, never the
    whole text (which made a long stream O(tokens^2) on the event loop)."""
    widths = []

    def decode(ids):
        widths.append(len(ids))
        return _byte_decode(ids)

    text = ("stream me, ünïcode 😀 and all; " * 200).encode("utf-8")
    asm = TextAssembler(decode, ["never-there"])
    out = "".join(asm.push(b) for b in text) + asm.finish()
    assert out == text.decode("utf-8")
    assert len(text) > 5000 and max(widths) <= 16, max(widths)


@pytest.fixture(scope="module")
def smollm2_tokenizer(gguf_path, kvgen):
    return kvgen.Generator.from_pretrained(gguf_path).tokenizer


@pytest.mark.parametrize("seed", [0, 1])
def test_assembler_equals_full_decode_on_real_tokenizers(gen, smollm2_tokenizer, seed):
    import random

    rng = random.Random(seed)
    for tok in (gen.tokenizer, smollm2_tokenizer):
        ids = [rng.randrange(len(tok)) for _ in range(400)]
        decode = lambda t: tok.decode(t, skip_special_tokens=True)  # noqa: E731
        asm = TextAssembler(decode, [])
        assert "".join(asm.push(t) for t in ids) + asm.finish() == decode(ids)
