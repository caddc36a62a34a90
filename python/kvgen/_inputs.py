"""Conversion between the input kinds generate() accepts and the int64 matrices the engine takes."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import numpy as np

from .errors import InvalidInputError


def is_torch_tensor(x: Any) -> bool:
    return type(x).__module__.startswith("torch") and hasattr(x, "detach")


@dataclass
class PreparedInputs:
    ids: np.ndarray  # (batch, seq) int64
    attention_mask: np.ndarray | None
    kind: str  # "torch" | "numpy" | "list" | "list2d" | "text" | "texts"
    torch_device: Any = None

    def wrap(self, sequences: np.ndarray) -> Any:
        """Returns `sequences` (batch, total) in the caller's input kind (not used for text)."""
        if self.kind == "torch":
            import torch

            return torch.from_numpy(np.ascontiguousarray(sequences)).to(self.torch_device)
        if self.kind == "numpy":
            return sequences.astype(np.int64, copy=False)
        if self.kind == "list" and sequences.shape[0] == 1:
            return [int(t) for t in sequences[0]]
        # A flat list in with several rows out (num_return_sequences > 1): one list per row.
        return [[int(t) for t in row] for row in sequences]

    def wrap_floats(self, array: np.ndarray) -> Any:
        if self.kind == "torch":
            import torch

            return torch.from_numpy(array).to(self.torch_device)
        return array


def _is_int(t: Any) -> bool:
    return isinstance(t, (int, np.integer)) and not isinstance(t, bool)


def to_int_matrix(x: Any, name: str) -> tuple[np.ndarray, str, Any]:
    """(matrix, kind, torch device) for a tensor, ndarray or (nested) list of ints."""
    if is_torch_tensor(x):
        arr = x.detach().cpu().numpy()
        kind, device = "torch", x.device
    elif isinstance(x, np.ndarray):
        arr, kind, device = x, "numpy", None
    elif isinstance(x, (list, tuple)):
        if len(x) == 0:
            raise InvalidInputError(f"{name} is empty; pass at least one token id")
        if all(_is_int(t) for t in x):
            return np.asarray([x], dtype=np.int64), "list", None
        if all(isinstance(r, (list, tuple)) for r in x):
            bad = next((t for r in x for t in r if not _is_int(t)), None)
            if bad is not None:
                raise InvalidInputError(f"{name} holds {bad!r}; token ids must be integers")
            lengths = {len(r) for r in x}
            if len(lengths) != 1:
                raise InvalidInputError(
                    f"{name} rows have different lengths {sorted(lengths)}; pad them to one length (left padding) "
                    "and pass attention_mask, or use gen.tokenizer(texts, padding=True)"
                )
            try:
                return np.asarray(x, dtype=np.int64), "list2d", None
            except (TypeError, ValueError, OverflowError) as e:
                raise InvalidInputError(f"{name} must hold integers: {e}") from None
        bad = next((t for t in x if not _is_int(t) and not isinstance(t, (list, tuple))), None)
        raise InvalidInputError(
            f"{name} must be a list of ints or a list of lists of ints" + (f"; it holds {bad!r}" if bad is not None else "")
        )
    else:
        raise InvalidInputError(
            f"{name} of type {type(x).__name__} is not supported; pass a torch.LongTensor, a numpy int array, "
            "list[int], list[list[int]], str or list[str]"
        )
    if arr.ndim == 1:
        arr = arr[None, :]
    if arr.ndim != 2:
        raise InvalidInputError(f"{name} must have shape (batch, sequence), got {arr.shape}")
    if arr.dtype.kind not in "iub":
        raise InvalidInputError(f"{name} must hold integer token ids, got dtype {arr.dtype}")
    if arr.shape[1] == 0:
        raise InvalidInputError(f"{name} has no tokens (shape {arr.shape}); pass at least one token per row")
    return arr.astype(np.int64, copy=False), kind, device


def prepare(inputs: Any, attention_mask: Any, encode_texts: Callable[[list[str]], dict]) -> PreparedInputs:
    if isinstance(inputs, str) or (isinstance(inputs, (list, tuple)) and inputs and all(isinstance(t, str) for t in inputs)):
        texts = [inputs] if isinstance(inputs, str) else list(inputs)
        enc = encode_texts(texts)
        kind = "text" if isinstance(inputs, str) else "texts"
        return PreparedInputs(enc["input_ids"], enc["attention_mask"], kind)
    ids, kind, device = to_int_matrix(inputs, "inputs")
    mask = None
    if attention_mask is not None:
        mask, _, _ = to_int_matrix(attention_mask, "attention_mask")
        if mask.shape != ids.shape:
            raise InvalidInputError(
                f"attention_mask has shape {mask.shape} but inputs have shape {ids.shape}; they must match"
            )
    return PreparedInputs(ids, mask, kind, device)
