"""Return objects with transformers' names (GenerateDecoderOnlyOutput)."""

from __future__ import annotations

import functools
from dataclasses import dataclass, fields
from typing import Any

# transformers 5.24 renamed the output field `past_key_values` to `cache` and kept the old name as
# an alias (attribute, key, `in`, constructor keyword); code written for either release keeps working.
_OLD_CACHE_NAMES = ("past_key_values", "cache_params")


def _cache_name(key: Any) -> Any:
    return "cache" if key in _OLD_CACHE_NAMES else key


def _accept_old_cache_names(cls):
    """Wraps the dataclass __init__ so `past_key_values=` (the pre-5.24 name) fills `cache`."""
    init = cls.__init__

    @functools.wraps(init)
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        for old in _OLD_CACHE_NAMES:
            if old in kwargs:
                if "cache" in kwargs:
                    raise TypeError(f"pass either cache= or {old}= (its old name), not both")
                kwargs["cache"] = kwargs.pop(old)
        init(self, *args, **kwargs)

    cls.__init__ = __init__
    return cls


@_accept_old_cache_names
@dataclass
class GenerateDecoderOnlyOutput:
    """What generate(return_dict_in_generate=True) returns: attribute, key and index access like HF's ModelOutput."""

    sequences: Any = None
    scores: tuple | None = None
    logits: tuple | None = None
    attentions: tuple | None = None
    hidden_states: tuple | None = None
    cache: Any = None

    @property
    def past_key_values(self) -> Any:
        """The pre-5.24 name of `cache`."""
        return self.cache

    @past_key_values.setter
    def past_key_values(self, value: Any) -> None:
        self.cache = value

    cache_params = past_key_values

    def _present(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self) if getattr(self, f.name) is not None}

    def keys(self):
        return self._present().keys()

    def values(self):
        return self._present().values()

    def items(self):
        return self._present().items()

    def get(self, key: str, default: Any = None) -> Any:
        return self._present().get(_cache_name(key), default)

    def to_tuple(self) -> tuple:
        return tuple(self._present().values())

    def __getitem__(self, key: str | int) -> Any:
        if isinstance(key, str):
            return self._present()[_cache_name(key)]
        return self.to_tuple()[key]

    def __contains__(self, key: str) -> bool:
        return _cache_name(key) in self._present()

    def __iter__(self):
        return iter(self._present())


@dataclass
class GenerateBeamDecoderOnlyOutput(GenerateDecoderOnlyOutput):
    """Beam search's return_dict_in_generate=True output, in transformers' field order:
    sequences, sequences_scores (with output_scores), scores, logits, beam_indices, ..."""

    sequences_scores: Any = None
    beam_indices: Any = None

    # transformers' order, not the dataclass's (which appends a subclass's fields).
    _ORDER = ("sequences", "sequences_scores", "scores", "logits", "beam_indices", "attentions", "hidden_states", "past_key_values")

    def _present(self) -> dict[str, Any]:
        return {name: getattr(self, name) for name in self._ORDER if getattr(self, name, None) is not None}
