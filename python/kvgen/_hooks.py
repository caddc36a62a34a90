"""User hooks of generate(): `logits_processor=`, `stopping_criteria=`, `prefix_allowed_tokens_fn=`.

They are merged with kvgen's built-in processors and criteria as transformers 5.x
`_merge_criteria_processor_list` does: the built-in list keeps its order, a user object of a type
the settings also build takes that one's place (with transformers' warning; 4.x raised instead),
the other user objects follow; the sampling warpers come after all of them. The Rust engine calls
`HookRunner.process` / `HookRunner.stop` once per step for the request (src/python/hooks.rs),
with numpy arrays that are handed on as torch tensors when the call's inputs were torch tensors.
"""

from __future__ import annotations

import math
import warnings
from typing import Any, Callable

import numpy as np

from .errors import InvalidInputError

# transformers builds PrefixConstrainedLogitsProcessor after these and before the rest.
_BEFORE_PREFIX = {
    "SequenceBiasLogitsProcessor",
    "RepetitionPenaltyLogitsProcessor",
    "NoRepeatNGramLogitsProcessor",
    "NoBadWordsLogitsProcessor",
    "MinLengthLogitsProcessor",
    "MinNewTokensLengthLogitsProcessor",
}


class _Builtin:
    """A processor or criterion kvgen runs itself (in Rust), by its transformers class name."""

    def __init__(self, name: str, index: int) -> None:
        self.name, self.index = name, index

    def __repr__(self) -> str:
        return f"<kvgen built-in {self.name}>"


def _is_class(obj: Any, name: str) -> bool:
    """`type(obj)` is transformers' class `name` (transformers compares types exactly)."""
    t = type(obj)
    return t.__name__ == name and t.__module__.startswith("transformers.")


def _hook_list(value: Any, name: str) -> list:
    if value is None:
        return []
    if callable(value) and not isinstance(value, (list, tuple)):
        raise InvalidInputError(
            f"{name} must be a list of callables (e.g. transformers' {'LogitsProcessorList' if name == 'logits_processor' else 'StoppingCriteriaList'}), "
            f"not a single {type(value).__name__}; wrap it: {name}=[...]"
        )
    if not isinstance(value, (list, tuple)):
        raise InvalidInputError(f"{name} must be a list of callables, not {type(value).__name__}")
    for item in value:
        if not callable(item):
            raise InvalidInputError(f"{name} holds {item!r}, which is not callable; pass objects called as f(input_ids, scores)")
    return list(value)


def merge(defaults: list, custom: list) -> list:
    """transformers 5.x `_merge_criteria_processor_list`: the same rules, the same warning."""
    if not custom:
        return defaults
    final: list = []
    for default in defaults:
        name = default.name if isinstance(default, _Builtin) else type(default).__name__
        match = next((c for c in custom if _is_class(c, name)), None)
        if match is None:
            final.append(default)
            continue
        kind = "stopping criteria" if name.endswith("Criteria") else "logits processor"
        warnings.warn(
            f"A custom {kind} of type {type(match)} has been passed to `.generate()`, but it was also created in "
            f"`.generate()`, given its parameterization. The custom {type(match)} will take precedence. Please "
            f"check the docstring of {type(match)} to see related `.generate()` flags.",
            UserWarning,
            stacklevel=5,
        )
        final.append(match)
    for c in custom:
        if not any(c is f for f in final):
            final.append(c)
    return final


class PrefixConstrainedLogitsProcessor:
    """transformers' PrefixConstrainedLogitsProcessor over numpy or torch scores: every token but
    those `fn(batch_id, row)` allows gets -inf; a prompt whose allowed tokens are all -inf already
    gets the mask itself (score 0 on the allowed ones), so the constraint still holds."""

    def __init__(self, fn: Callable, rows_per_prompt: int) -> None:
        self._fn, self._n = fn, rows_per_prompt

    def __call__(self, input_ids: Any, scores: Any) -> Any:
        torch_scores = not isinstance(scores, np.ndarray)
        s = scores.detach().cpu().numpy() if torch_scores else scores
        mask = np.full(s.shape, -math.inf, dtype=s.dtype)
        for row in range(s.shape[0]):
            batch_id = row // self._n
            allowed = self._fn(batch_id, input_ids[row])
            if hasattr(allowed, "tolist"):
                allowed = allowed.tolist()
            if len(allowed) == 0:
                raise ValueError(
                    f"`prefix_allowed_tokens_fn` returned an empty list for batch ID {batch_id}.This means that the "
                    "constraint is unsatisfiable. Please check your implementationof `prefix_allowed_tokens_fn` "
                )
            mask[row, allowed] = 0
        out = s + mask
        unsatisfiable = np.isneginf(out.max(axis=-1)).reshape(-1, self._n).all(axis=-1)
        out = np.where(np.repeat(unsatisfiable, self._n)[:, None], mask, out)
        if torch_scores:
            import torch

            return torch.from_numpy(out).to(scores.device)
        return out


class HookRunner:
    """One request's hooks, called from Rust. `replaced`, `groups_at` and `has_criteria` are
    its plan (src/generation/hooks.rs `HookSet`)."""

    def __init__(self, groups: list, replaced: list, groups_at: list, criteria: list, torch_device: Any, keep_scores: bool):
        self.groups, self.replaced, self.groups_at = groups, replaced, groups_at
        self.criteria = criteria
        self.has_criteria = bool(criteria)
        self._device = torch_device
        # transformers passes the criteria the tuple of scores so far with output_scores, else None.
        self._scores: tuple | None = () if keep_scores else None

    def _wrap(self, array: np.ndarray) -> Any:
        if self._device is None:
            return array
        import torch

        t = torch.from_numpy(array)
        return t if str(self._device) == "cpu" else t.to(self._device)

    def process(self, group: int, input_ids: np.ndarray, scores: np.ndarray) -> np.ndarray:
        ids, s = self._wrap(input_ids), self._wrap(scores)
        for p in self.groups[group]:
            s = p(ids, s)
            if tuple(s.shape) != scores.shape:
                raise InvalidInputError(
                    f"logits processor {p!r} returned scores of shape {tuple(s.shape)}; it must return the "
                    f"(batch, vocab) = {scores.shape} scores it was given, processed"
                )
        if not isinstance(s, np.ndarray):
            s = s.detach().cpu().numpy()
        return np.ascontiguousarray(s, dtype=np.float32)

    def stop(self, input_ids: np.ndarray, scores: np.ndarray) -> np.ndarray:
        ids = self._wrap(input_ids)
        if self._scores is not None:
            self._scores += (self._wrap(scores.copy()),)
        batch = input_ids.shape[0]
        done = np.zeros(batch, dtype=bool)
        for c in self.criteria:
            flags = c(ids, self._scores)
            if not isinstance(flags, (bool, np.ndarray, np.bool_)) and hasattr(flags, "detach"):
                flags = flags.detach().cpu().numpy()
            flags = np.asarray(flags, dtype=bool)
            if flags.shape not in ((), (batch,)):
                raise InvalidInputError(
                    f"stopping criterion {c!r} returned shape {flags.shape}; return one bool per row, shape ({batch},)"
                )
            done |= flags
        return np.ascontiguousarray(done)


def build(
    *,
    logits_processor: Any,
    stopping_criteria: Any,
    prefix_allowed_tokens_fn: Any,
    builtin_names: Callable[[], list[str]],
    rows_per_prompt: int,
    has_stop_strings: bool,
    has_eos: bool,
    torch_device: Any,
    keep_scores: bool,
) -> tuple[HookRunner | None, set[str]]:
    """The request's HookRunner (None without hooks) and the names of kvgen's built-in stopping
    criteria that a user one replaces (the caller turns those off)."""
    processors = _hook_list(logits_processor, "logits_processor")
    criteria = _hook_list(stopping_criteria, "stopping_criteria")
    if prefix_allowed_tokens_fn is not None and not callable(prefix_allowed_tokens_fn):
        raise InvalidInputError(
            f"prefix_allowed_tokens_fn={prefix_allowed_tokens_fn!r} must be a callable (batch_id, input_ids) -> list[int]"
        )
    if not processors and not criteria and prefix_allowed_tokens_fn is None:
        return None, set()

    defaults: list = [_Builtin(n, i) for i, n in enumerate(builtin_names())]
    n_builtin = len(defaults)
    if prefix_allowed_tokens_fn is not None:
        at = next((i for i, d in enumerate(defaults) if d.name not in _BEFORE_PREFIX), n_builtin)
        defaults.insert(at, PrefixConstrainedLogitsProcessor(prefix_allowed_tokens_fn, rows_per_prompt))
    final = merge(defaults, processors)
    kept = {item.index for item in final if isinstance(item, _Builtin)}
    groups, groups_at, current = [], [], []
    for item in final:
        if isinstance(item, _Builtin):
            if current:
                groups.append(current)
                groups_at.append(item.index)
                current = []
        else:
            current.append(item)
    if current:
        groups.append(current)
        groups_at.append(n_builtin)

    builtin_criteria = ["MaxLengthCriteria"]
    builtin_criteria += ["StopStringCriteria"] if has_stop_strings else []
    builtin_criteria += ["EosTokenCriteria"] if has_eos else []
    merged = merge([_Builtin(n, i) for i, n in enumerate(builtin_criteria)], criteria)
    user_criteria = [c for c in merged if not isinstance(c, _Builtin)]
    replaced_criteria = set(builtin_criteria) - {c.name for c in merged if isinstance(c, _Builtin)}

    runner = HookRunner(
        groups,
        [i for i in range(n_builtin) if i not in kept],
        groups_at,
        user_criteria,
        torch_device,
        keep_scores,
    )
    return runner, replaced_criteria
