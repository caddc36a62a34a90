"""Argument checks for device="neuron" (Generator.from_pretrained) and the XLA:CPU worker's command."""

from __future__ import annotations

import os
import sys
from typing import Any

from .errors import InvalidInputError

EXECUTORS = ("nrt", "xla-cpu")


def _sizes(name: str, value: Any, *, limit: int) -> list[int]:
    items = [value] if isinstance(value, int) else list(value)
    if not items or any(isinstance(v, bool) or not isinstance(v, int) or not 1 <= v <= limit for v in items):
        raise InvalidInputError(f"{name}={value!r} must be one or more integers from 1 to {limit}, e.g. (1,) or (1, 4)")
    return sorted(set(items))


def xla_worker_command() -> list[str]:
    """The interpreter running this process and the worker script (no kvgen import needed there)."""
    return [sys.executable, os.path.join(os.path.dirname(__file__), "_neuron_xla.py")]


def set_options(executor: str, neuron_dir: Any, batch_sizes: Any, buckets: Any, max_context: Any) -> tuple:
    if executor not in EXECUTORS:
        raise InvalidInputError(
            f"neuron_executor={executor!r} is not a Neuron executor; use \"nrt\" (NeuronCores through libnrt) or "
            "\"xla-cpu\" (the same graphs on XLA's CPU backend)"
        )
    batch = _sizes("batch_sizes", batch_sizes, limit=256)
    bucket_list = None if buckets is None else _sizes("buckets", buckets, limit=1 << 20)
    if max_context is not None and (isinstance(max_context, bool) or not isinstance(max_context, int) or max_context < 1):
        raise InvalidInputError(f"max_context={max_context!r} must be a positive integer (cache positions per sequence)")
    d = None if neuron_dir is None else os.fspath(neuron_dir)
    return (executor, d, batch, bucket_list, max_context, xla_worker_command())
