"""Seeds for kvgen's per-row ChaCha streams.

A row's stream is (seed, stream id). With `seed=int`, every prompt's k-th returned sequence uses
(seed, k): a row's tokens then depend only on its seed, prompt and parameters, never on the other
rows of the batch. `seed=[...]` gives each output row (or each prompt) its own seed. Without a seed,
a base seed comes from `set_seed`'s generator when one was set, else from the OS.
"""

from __future__ import annotations

import os
import random
import threading
from typing import Any

from .errors import InvalidInputError

_U64 = 1 << 64
_lock = threading.Lock()
_global_rng: random.Random | None = None


def set_seed(seed: int) -> None:
    """Makes later generate() calls without `seed=` reproducible, like transformers.set_seed."""
    global _global_rng
    _check(seed, "seed")
    with _lock:
        _global_rng = random.Random(int(seed))


def _check(seed: Any, name: str) -> int:
    if isinstance(seed, bool) or not isinstance(seed, int) and not hasattr(seed, "__index__"):
        raise InvalidInputError(f"{name}={seed!r} must be an integer in [0, 2**64)")
    value = int(seed)
    if not 0 <= value < _U64:
        raise InvalidInputError(f"{name}={value} is out of range; pass an integer in [0, 2**64)")
    return value


def _base_seed() -> int:
    with _lock:
        if _global_rng is not None:
            return _global_rng.getrandbits(64)
    return int.from_bytes(os.urandom(8), "little")


def row_seeds(seed: Any, prompts: int, per_prompt: int) -> list[tuple[int, int]]:
    """(seed, stream) for each of the prompts * per_prompt output rows, in output order."""
    rows = prompts * per_prompt
    if seed is None:
        base = _base_seed()
        return [(base, r) for r in range(rows)]
    if isinstance(seed, (list, tuple)) or hasattr(seed, "tolist") and not isinstance(seed, int):
        values = [_check(s, "seed") for s in (seed.tolist() if hasattr(seed, "tolist") else seed)]
        if len(values) == rows:
            return [(v, 0) for v in values]
        if len(values) == prompts:
            return [(values[r // per_prompt], r % per_prompt) for r in range(rows)]
        raise InvalidInputError(
            f"seed has {len(values)} entries, but the call produces {rows} rows ({prompts} prompts x "
            f"num_return_sequences={per_prompt}); pass one seed per output row or one per prompt"
        )
    value = _check(seed, "seed")
    return [(value, r % per_prompt) for r in range(rows)]
