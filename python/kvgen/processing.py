"""`kvgen.process_logits`: transformers' logits processors and warpers, run by kvgen's Rust code.

The settings travel to Rust as a ProcessorConfig JSON (src/sampling/config.rs) built by
`processor_config_json`, which the Generator uses too; `src/sampling/processors.rs::build` picks the
processors with transformers' `_get_logits_processor` order and conditions and validates ranges.
"""

from __future__ import annotations

import json
import math
from typing import Any

import numpy as np

from . import _kvgen
from .errors import InvalidInputError
from .generation_config import GLOBAL_DEFAULTS, GenerationConfig

# generate() settings with no processor in kvgen: refused rather than silently ignored.
_UNSUPPORTED = {
    "guidance_scale": (None, 1, 1.0),
    "watermarking_config": (None,),
    "top_h": (None,),
}

_FLOATS = ("repetition_penalty", "temperature", "top_p", "min_p", "typical_p", "epsilon_cutoff", "eta_cutoff")


def _is_int(v: Any) -> bool:
    return isinstance(v, (int, np.integer)) and not isinstance(v, bool)


def _ids(name: str, value: Any) -> list[int] | None:
    """An id or list of ids (int, list, tuple, tensor, array) as a list of ints."""
    if value is None:
        return None
    if hasattr(value, "tolist"):
        value = value.tolist()
    if not isinstance(value, (list, tuple)):
        value = [value]
    out = []
    for v in value:
        if not _is_int(v):
            raise InvalidInputError(f"{name}={value!r} must hold integer token ids, got {v!r}")
        out.append(int(v))
    return out


def _id_lists(name: str, value: Any) -> list[list[int]] | None:
    if value is None:
        return None
    if hasattr(value, "tolist"):
        value = value.tolist()
    if not isinstance(value, (list, tuple)) or any(not isinstance(w, (list, tuple)) for w in value):
        raise InvalidInputError(f"{name}={value!r} must be a list of lists of token ids, e.g. [[12], [7, 9]]")
    return [_ids(name, w) or [] for w in value]


def _number(name: str, value: Any) -> float | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise InvalidInputError(f"{name}={value!r} must be a number")
    value = float(value)
    if not math.isfinite(value):
        # JSON cannot carry it; the message matches the Rust validation's.
        raise InvalidInputError(f"{name}={value} is invalid: it must be a finite number")
    return value


def _count(name: str, value: Any) -> int | None:
    if value is None:
        return None
    if not _is_int(value) or value < 0:
        raise InvalidInputError(f"{name}={value!r} must be an integer >= 0")
    return int(value)


def _sequence_bias(value: Any) -> list | None:
    if value is None:
        return None
    # transformers' legacy dict form {(ids...): bias} becomes its list form [[ids], bias].
    items = list(value.items()) if isinstance(value, dict) else list(value)
    out = []
    for item in items:
        if not isinstance(item, (list, tuple)) or len(item) != 2:
            raise InvalidInputError(f"sequence_bias entry {item!r} must be a pair [[token ids], bias]")
        seq, bias = item
        seq = _ids("sequence_bias", list(seq) if isinstance(seq, tuple) else seq)
        out.append([seq, _number("sequence_bias bias", bias)])
    return out


def processor_config_json(cfg: GenerationConfig, prompt_length: int, max_length: int | None, min_tokens_to_keep: int = 1) -> str:
    """The ProcessorConfig JSON (src/sampling/config.rs) for a merged GenerationConfig.

    `prompt_length`: padded prompt width (transformers' input_ids_seq_length); `max_length`: the final
    max length (prompt included) forced_eos_token_id fires before. Type errors raise
    InvalidInputError here; ranges and ids are checked in Rust.
    """
    get = lambda name: getattr(cfg, name, None)  # noqa: E731
    for name, neutral in _UNSUPPORTED.items():
        if get(name) not in neutral:
            raise InvalidInputError(f"{name}={get(name)!r} is not supported by kvgen; leave it unset")
    do_sample = bool(get("do_sample"))
    top_k = get("top_k")
    if top_k is not None and (not _is_int(top_k) or (do_sample and top_k < 0)):
        raise InvalidInputError(f"top_k={top_k!r} is invalid: it must be an integer >= 0 (0 disables top-k)")
    if top_k is not None and top_k < 0:
        top_k = None  # greedy ignores it, as transformers does
    floats = {name: _number(name, get(name)) for name in _FLOATS}
    if not do_sample:
        # Sampling settings are ignored without do_sample (transformers does not even check them).
        for name in ("temperature", "top_p", "min_p", "typical_p", "epsilon_cutoff", "eta_cutoff"):
            floats[name] = None
    decay = get("exponential_decay_length_penalty")
    if decay is not None:
        if not isinstance(decay, (list, tuple)) or len(decay) != 2 or not _is_int(decay[0]) or decay[0] < 0:
            raise InvalidInputError(
                f"exponential_decay_length_penalty={decay!r} must be a pair (start_index >= 0, decay_factor)"
            )
        decay = [int(decay[0]), _number("exponential_decay_length_penalty factor", decay[1])]
    forced_bos = _ids("forced_bos_token_id", get("forced_bos_token_id"))
    if forced_bos is not None and len(forced_bos) != 1:
        raise InvalidInputError(f"forced_bos_token_id={get('forced_bos_token_id')!r} must be a single token id")
    out = {
        **floats,
        "no_repeat_ngram_size": _count("no_repeat_ngram_size", get("no_repeat_ngram_size")),
        "bad_words_ids": _id_lists("bad_words_ids", get("bad_words_ids")),
        "sequence_bias": _sequence_bias(get("sequence_bias")),
        "min_length": _count("min_length", get("min_length")),
        "min_new_tokens": _count("min_new_tokens", get("min_new_tokens")),
        "eos_token_id": _ids("eos_token_id", get("eos_token_id")) or [],
        "forced_bos_token_id": None if forced_bos is None else forced_bos[0],
        "forced_eos_token_id": _ids("forced_eos_token_id", get("forced_eos_token_id")),
        "max_length": _count("max_length", max_length),
        "remove_invalid_values": get("remove_invalid_values") is True,
        "exponential_decay_length_penalty": decay,
        "suppress_tokens": _ids("suppress_tokens", get("suppress_tokens")),
        "begin_suppress_tokens": _ids("begin_suppress_tokens", get("begin_suppress_tokens")),
        "do_sample": do_sample,
        "top_k": top_k if do_sample else None,
        "renormalize_logits": get("renormalize_logits") is True,
        "prompt_length": int(prompt_length),
        "min_tokens_to_keep": int(min_tokens_to_keep),
    }
    return json.dumps(out)


def _as_array(x: Any, dtype: Any, name: str) -> np.ndarray:
    if hasattr(x, "detach") and hasattr(x, "cpu"):  # torch tensor, without importing torch
        x = x.detach().cpu().numpy()
    arr = np.asarray(x)
    if arr.ndim != 2:
        raise InvalidInputError(f"{name} must be 2-D (batch, ...), got shape {arr.shape}")
    if dtype == np.int64 and arr.size and not np.issubdtype(arr.dtype, np.integer):
        raise InvalidInputError(f"{name} must hold integer token ids, got dtype {arr.dtype}")
    return np.ascontiguousarray(arr, dtype=dtype)


def process_logits(
    scores: Any,
    input_ids: Any,
    generation_config: Any = None,
    *,
    attention_mask: Any = None,
    **kwargs: Any,
) -> np.ndarray:
    """Applies exactly the logits processors/warpers transformers' `generate()` builds for this config.

    scores: float32 (batch, vocab); input_ids: int64 (batch, seq), treated as the prompt (so
    min_new_tokens, begin_suppress_tokens and the default max_length count from its width);
    attention_mask: optional (batch, seq), its leading zeros are the left padding
    repetition_penalty skips. kwargs override `generation_config` fields, as in generate().
    Returns a new float32 numpy array with -inf where tokens were removed.
    """
    cfg = GenerationConfig.from_any(generation_config)
    user_max_length = kwargs.get("max_length", cfg.max_length)
    unused = cfg.update(**kwargs)
    if unused:
        raise InvalidInputError(
            f"The following generation arguments are not used: {list(unused)} (check for typos; the valid names are "
            "transformers' GenerationConfig fields)"
        )
    cfg.update(defaults_only=True, **GLOBAL_DEFAULTS)
    scores = _as_array(scores, np.float32, "scores")
    ids = _as_array(input_ids, np.int64, "input_ids")
    if ids.shape[0] != scores.shape[0]:
        raise InvalidInputError(
            f"scores has {scores.shape[0]} rows but input_ids has {ids.shape[0]}: pass one input_ids row per scores row"
        )
    prompt_length = ids.shape[1]
    # transformers' _prepare_generated_length with input_ids as the prompt.
    if cfg.max_new_tokens is not None:
        max_length = _count("max_new_tokens", cfg.max_new_tokens) + prompt_length
    elif user_max_length is None:
        max_length = GLOBAL_DEFAULTS["max_length"] + prompt_length
    else:
        max_length = cfg.max_length
    if cfg.min_new_tokens is not None:
        cfg.min_length = _count("min_new_tokens", cfg.min_new_tokens) + prompt_length
    ignore_prefix = None
    if attention_mask is not None:
        mask = _as_array(attention_mask, np.int64, "attention_mask")
        if mask.shape != ids.shape:
            raise InvalidInputError(f"attention_mask has shape {mask.shape} but input_ids has shape {ids.shape}")
        # (mask != 0).argmax(): the first attended position, 0 for an all-zero row.
        ignore_prefix = [int(i) for i in (mask != 0).argmax(axis=1)] if mask.shape[1] else [0] * mask.shape[0]
    config = processor_config_json(cfg, prompt_length=prompt_length, max_length=max_length)
    return _kvgen.process_logits_native(scores, ids, config, ignore_prefix)
