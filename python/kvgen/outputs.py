"""Return objects with transformers' names (GenerateDecoderOnlyOutput)."""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any


@dataclass
class GenerateDecoderOnlyOutput:
    """What generate(return_dict_in_generate=True) returns: attribute, key and index access like HF's ModelOutput."""

    sequences: Any = None
    scores: tuple | None = None
    logits: tuple | None = None
    attentions: tuple | None = None
    hidden_states: tuple | None = None
    past_key_values: Any = None

    def _present(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self) if getattr(self, f.name) is not None}

    def keys(self):
        return self._present().keys()

    def values(self):
        return self._present().values()

    def items(self):
        return self._present().items()

    def to_tuple(self) -> tuple:
        return tuple(self._present().values())

    def __getitem__(self, key: str | int) -> Any:
        if isinstance(key, str):
            return self._present()[key]
        return self.to_tuple()[key]

    def __contains__(self, key: str) -> bool:
        return key in self._present()

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
