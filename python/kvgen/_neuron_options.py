"""Argument checks for device="neuron" (Generator.from_pretrained) and the XLA:CPU worker's command.
The integer checks are kvgen.neuron.export's (one set of rules); ranges are checked in Rust."""

from __future__ import annotations

import os
import sys
from typing import Any

from .errors import InvalidInputError
from .neuron import _int_list, _positive_int

EXECUTORS = ("nrt", "xla-cpu")


def xla_worker_command() -> list[str]:
    """The interpreter running this process and the worker script (no kvgen import needed there)."""
    return [sys.executable, os.path.join(os.path.dirname(__file__), "_neuron_xla.py")]


def set_options(executor: str, neuron_dir: Any, batch_sizes: Any, buckets: Any, max_context: Any) -> tuple:
    if executor not in EXECUTORS:
        raise InvalidInputError(
            f"neuron_executor={executor!r} is not a Neuron executor; use \"nrt\" (NeuronCores through libnrt) or "
            "\"xla-cpu\" (the same graphs on XLA's CPU backend)"
        )
    batch = _int_list([batch_sizes] if isinstance(batch_sizes, int) else batch_sizes, "batch_sizes",
                      "pass the batch sizes to run, e.g. batch_sizes=(1, 4)")
    bucket_list = None if buckets is None else _int_list(buckets, "buckets", "pass the prompt lengths, e.g. buckets=(128, 512)")
    if max_context is not None:
        max_context = _positive_int(max_context, "max_context", "pass the longest prompt + generation, e.g. 2048")
    d = None if neuron_dir is None else os.fspath(neuron_dir)
    return (executor, d, sorted(set(batch)), bucket_list, max_context, xla_worker_command())
