"""HF-compatible tokenizer surface over kvgen's native (Rust) tokenizer.

`Tokenizer` mirrors the parts of transformers' fast tokenizer that generation code uses:
`encode`, `decode`, `batch_decode`, `__call__` (padding, truncation, tensors), `apply_chat_template`,
special tokens and their ids, `vocab_size` / `len()`, `padding_side`. Results equal
`AutoTokenizer.from_pretrained(dir)` for the same files. Needs numpy; torch only for
`return_tensors="pt"` (imported lazily).
"""

from __future__ import annotations

import dataclasses
import json
import os
import warnings
from collections.abc import Mapping
from typing import Any

import numpy as np

__all__ = ["Tokenizer", "BatchEncoding"]

# transformers' VERY_LARGE_INTEGER: the model_max_length when none is configured.
VERY_LARGE_INTEGER = int(1e30)

_NAMED_SPECIAL = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")
_UNSET = object()
_CONTINUE_FINAL_MESSAGE_TAG = "CONTINUE_FINAL_MESSAGE_TAG "


class BatchEncoding(dict):
    """A dict of model inputs with attribute access (`.input_ids`, `.attention_mask`), like
    transformers' BatchEncoding."""

    def __getattr__(self, item: str) -> Any:
        try:
            return self[item]
        except KeyError:
            raise AttributeError(item) from None

    def __setattr__(self, key: str, value: Any) -> None:
        self[key] = value

    def __getstate__(self):
        return dict(self)

    def __setstate__(self, state):
        self.update(state)

    def to(self, device) -> "BatchEncoding":
        """Move torch tensors to `device` (non-tensor values are left as they are)."""
        out = BatchEncoding()
        for k, v in self.items():
            out[k] = v.to(device) if hasattr(v, "to") and not isinstance(v, np.ndarray) else v
        return out

    def convert_to_tensors(self, tensor_type: str | None = None) -> "BatchEncoding":
        if tensor_type is None:
            return self
        for k, v in list(self.items()):
            self[k] = _to_tensor(v, tensor_type, key=k)
        return self


def _torch():
    try:
        import torch
    except ImportError as e:  # pragma: no cover - depends on environment
        raise ImportError("return_tensors='pt' needs PyTorch installed (pip install torch)") from e
    return torch


def _to_tensor(value, tensor_type: str, key: str = "input_ids"):
    tensor_type = str(getattr(tensor_type, "value", tensor_type))
    if tensor_type not in ("np", "pt"):
        raise ValueError(f"return_tensors must be None, 'np' or 'pt', got {tensor_type!r}")
    try:
        arr = np.asarray(value, dtype=np.int64)
    except (ValueError, TypeError) as e:
        raise ValueError(
            f"Unable to create tensor for {key!r}: the sequences have different lengths. "
            "Pass padding=True (and truncation=True if needed) to get tensors of equal length."
        ) from e
    if arr.dtype == object:  # pragma: no cover
        raise ValueError(f"Unable to create tensor for {key!r}: ragged sequences; pass padding=True")
    if tensor_type == "pt":
        return _torch().from_numpy(arr)
    return arr


def _to_py_ids(obj):
    """ints / lists / tuples / numpy arrays / torch tensors -> python ints or (nested) lists."""
    if isinstance(obj, (bool, np.bool_)):
        return int(obj)
    if isinstance(obj, (int, np.integer)):
        return int(obj)
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if hasattr(obj, "tolist") and hasattr(obj, "dim"):  # torch.Tensor, without importing torch
        return obj.detach().cpu().tolist() if hasattr(obj, "detach") else obj.tolist()
    if isinstance(obj, Mapping) and "input_ids" in obj:
        return _to_py_ids(obj["input_ids"])
    if isinstance(obj, (list, tuple)):
        return [_to_py_ids(x) for x in obj]
    if hasattr(obj, "tolist"):
        return obj.tolist()
    return obj


def _check_ids(ids: list, what: str = "token ids") -> list[int]:
    out = []
    for i in ids:
        if isinstance(i, float) and float(i).is_integer():
            i = int(i)
        if not isinstance(i, int):
            raise TypeError(f"{what} must be integers, got {type(i).__name__}: {i!r}")
        if i < 0 or i > 0xFFFFFFFF:
            raise ValueError(f"token id {i} is out of range: ids must be in 0..{0xFFFFFFFF}")
        out.append(i)
    return out


def _plain(value):
    """Message objects (dataclasses, pydantic models, numpy scalars) -> JSON-able data."""
    if isinstance(value, Mapping):
        return {str(k) if not isinstance(k, (str, int, float, bool)) and k is not None else k: _plain(v)
                for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: _plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if hasattr(value, "model_dump") and callable(value.model_dump):  # pydantic v2
        return _plain(value.model_dump())
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    if hasattr(value, "tolist") and hasattr(value, "dim"):
        return value.tolist()
    return value


def _json_default(o):
    o2 = _plain(o)
    if o2 is o:
        raise TypeError(f"chat template inputs must be JSON-serializable, got {type(o).__name__}: {o!r}")
    return o2


def _dumps(obj) -> str:
    return json.dumps(_plain(obj), default=_json_default)


class Tokenizer:
    """HF-compatible tokenizer. Build with `Tokenizer.from_pretrained(dir)` or `Tokenizer(native)`
    where `native` is a `kvgen._kvgen.Tokenizer`."""

    is_fast = True
    model_input_names = ["input_ids", "attention_mask"]

    def __init__(self, native):
        self._tok = native
        self._special_overrides: dict[str, Any] = {}
        self._padding_side = native.padding_side
        self._truncation_side = native.truncation_side
        mml = native.model_max_length
        self.model_max_length = int(mml) if mml is not None else VERY_LARGE_INTEGER
        self._chat_template_override = _UNSET
        self.clean_up_tokenization_spaces = False
        self._warned_unknown_id = False

    @classmethod
    def from_pretrained(cls, path, **kwargs) -> "Tokenizer":
        """Load from a directory with tokenizer.json (+ tokenizer_config.json, chat templates).
        Keyword overrides: padding_side, truncation_side, model_max_length, and special tokens
        (bos_token=, eos_token=, pad_token=, ...)."""
        from ._kvgen import Tokenizer as _Native

        tok = cls(_Native.from_dir(os.fspath(path)))
        for k, v in kwargs.items():
            if k in ("padding_side", "truncation_side", "model_max_length", "chat_template") or k in _NAMED_SPECIAL:
                setattr(tok, k, v)
            elif k in ("trust_remote_code", "use_fast", "local_files_only", "revision", "cache_dir", "token"):
                continue
            else:
                raise TypeError(f"Tokenizer.from_pretrained() got an unexpected keyword argument {k!r}")
        return tok

    @property
    def native(self):
        """The underlying `kvgen._kvgen.Tokenizer`."""
        return self._tok

    @property
    def name_or_path(self) -> str:
        return self._tok.source or ""

    def __repr__(self) -> str:
        return (
            f"kvgen.Tokenizer(name_or_path={self.name_or_path!r}, vocab_size={self.vocab_size}, len={len(self)}, "
            f"padding_side={self.padding_side!r}, special_tokens={self.special_tokens_map})"
        )

    # ------------------------------------------------------------------ sizes / vocabulary

    @property
    def vocab_size(self) -> int:
        """Base vocabulary size without added tokens (as in transformers)."""
        return self._tok.base_vocab_size

    def __len__(self) -> int:
        """Full vocabulary size including added tokens (as in transformers)."""
        return self._tok.vocab_size

    def get_vocab(self) -> dict[str, int]:
        vocab = {}
        n = len(self)
        extra = [i for i, _, _ in self._tok.added_tokens() if i >= n]
        for i in list(range(n)) + extra:
            t = self._tok.id_to_token(i)
            if t is not None:
                vocab[t] = i
        return vocab

    def convert_ids_to_tokens(self, ids, skip_special_tokens: bool = False):
        ids = _to_py_ids(ids)
        if isinstance(ids, int):
            return self._tok.id_to_token(ids)
        skip = set(self.all_special_ids) if skip_special_tokens else set()
        return [self._tok.id_to_token(int(i)) for i in _check_ids(ids) if int(i) not in skip]

    def _token_to_id(self, token: str):
        if token is None:
            return None
        i = self._tok.token_to_id(str(token))
        if i is None:
            return self._unk_id()
        return i

    def _unk_id(self):
        unk = self.unk_token
        return self._tok.token_to_id(unk) if unk is not None else None

    def convert_tokens_to_ids(self, tokens):
        if tokens is None:
            return None
        if isinstance(tokens, str):
            return self._token_to_id(tokens)
        return [self._token_to_id(t) for t in tokens]

    def tokenize(self, text: str, add_special_tokens: bool = False, **kwargs) -> list[str]:
        return self.convert_ids_to_tokens(self._tok.encode(text, add_special_tokens))

    # ------------------------------------------------------------------ special tokens

    def _special(self, name: str):
        if name in self._special_overrides:
            return self._special_overrides[name]
        return self._tok.special_tokens_map.get(name)

    def _set_special(self, name: str, value) -> None:
        if value is not None and not isinstance(value, str):
            value = str(value)  # e.g. an AddedToken
        self._special_overrides[name] = value

    def _set_special_id(self, name: str, value) -> None:
        if value is None:
            self._special_overrides[name] = None
            return
        value = int(value)
        tok = self._tok.id_to_token(value)
        if tok is None:
            raise ValueError(f"{name}_id={value} is not in the vocabulary (0..{len(self) - 1})")
        self._special_overrides[name] = tok

    @property
    def special_tokens_map(self) -> dict[str, str]:
        names = list(self._tok.special_tokens_map.keys())
        for n in self._special_overrides:
            if n not in names:
                names.append(n)
        order = {n: i for i, n in enumerate(_NAMED_SPECIAL)}
        names.sort(key=lambda n: order.get(n, len(order)))
        out = {}
        for n in names:
            v = self._special(n)
            if v is not None:
                out[n] = v
        return out

    @property
    def extra_special_tokens(self) -> list[str]:
        return list(self._tok.extra_special_tokens)

    additional_special_tokens = extra_special_tokens

    @property
    def all_special_tokens(self) -> list[str]:
        seen, out = set(), []
        for t in list(self.special_tokens_map.values()) + self.extra_special_tokens:
            if t not in seen:
                seen.add(t)
                out.append(t)
        return out

    @property
    def all_special_ids(self) -> list[int]:
        return self.convert_tokens_to_ids(self.all_special_tokens)

    def _make_special_property(name):  # noqa: N805 - helper used at class creation
        def get_tok(self):
            return self._special(name)

        def set_tok(self, value):
            self._set_special(name, value)

        def get_id(self):
            t = self._special(name)
            return None if t is None else self._token_to_id(t)

        def set_id(self, value):
            self._set_special_id(name, value)

        return property(get_tok, set_tok), property(get_id, set_id)

    bos_token, bos_token_id = _make_special_property("bos_token")
    eos_token, eos_token_id = _make_special_property("eos_token")
    unk_token, unk_token_id = _make_special_property("unk_token")
    sep_token, sep_token_id = _make_special_property("sep_token")
    pad_token, pad_token_id = _make_special_property("pad_token")
    cls_token, cls_token_id = _make_special_property("cls_token")
    mask_token, mask_token_id = _make_special_property("mask_token")
    del _make_special_property

    # ------------------------------------------------------------------ settings

    @property
    def padding_side(self) -> str:
        return self._padding_side

    @padding_side.setter
    def padding_side(self, value: str) -> None:
        if value not in ("left", "right"):
            raise ValueError(f"padding_side must be 'left' or 'right', got {value!r}")
        self._padding_side = value

    @property
    def truncation_side(self) -> str:
        return self._truncation_side

    @truncation_side.setter
    def truncation_side(self, value: str) -> None:
        if value not in ("left", "right"):
            raise ValueError(f"truncation_side must be 'left' or 'right', got {value!r}")
        self._truncation_side = value

    @property
    def chat_template(self):
        """The chat template: a string, a dict of named templates when there are several, or None."""
        if self._chat_template_override is not _UNSET:
            return self._chat_template_override
        templates = dict(self._tok.chat_templates)
        if not templates:
            return None
        if len(templates) == 1:
            return next(iter(templates.values()))
        return templates

    @chat_template.setter
    def chat_template(self, value) -> None:
        if value is not None and not isinstance(value, (str, dict)):
            raise TypeError("chat_template must be a string, a dict of named templates, or None")
        self._chat_template_override = value

    # ------------------------------------------------------------------ encode / decode

    def encode(
        self,
        text: str,
        add_special_tokens: bool = True,
        truncation: bool | str | None = None,
        max_length: int | None = None,
        return_tensors: str | None = None,
        **kwargs,
    ):
        """Text -> list of ids (or a (1, n) tensor with return_tensors)."""
        if not isinstance(text, str):
            raise TypeError(f"encode() expects a str, got {type(text).__name__}")
        max_len = self._truncation_length(truncation, max_length)
        ids = self._tok.encode(text, add_special_tokens, max_len, self.truncation_side)
        if return_tensors is not None:
            return _to_tensor([ids], return_tensors)
        return ids

    def decode(self, token_ids, skip_special_tokens: bool = False, **kwargs):
        """ids (int, list, numpy array, torch tensor; a batch gives a list of str) -> text."""
        kwargs.pop("clean_up_tokenization_spaces", None)
        kwargs.pop("spaces_between_special_tokens", None)
        ids = _to_py_ids(token_ids)
        if isinstance(ids, int):
            ids = [ids]
        if isinstance(ids, list) and ids and isinstance(ids[0], list):
            seqs = [_check_ids(s) for s in ids]
            self._note_unknown(seqs)
            return self._tok.decode_batch(seqs, skip_special_tokens)
        checked = _check_ids(ids)
        self._note_unknown([checked])
        return self._tok.decode(checked, skip_special_tokens)

    def batch_decode(self, sequences, skip_special_tokens: bool = False, **kwargs) -> list[str]:
        seqs = _to_py_ids(sequences)
        if isinstance(seqs, int):
            seqs = [[seqs]]
        if seqs and not isinstance(seqs[0], list):  # a flat list decodes token by token, as in HF
            seqs = [[s] for s in seqs]
        checked = [_check_ids(s) for s in seqs]
        self._note_unknown(checked)
        return self._tok.decode_batch(checked, skip_special_tokens)

    def _note_unknown(self, seqs: list) -> None:
        """Ids the tokenizer has no token for (a model's embedding can have more rows than its
        tokenizer has ids: Gemma 3's 262,208 vs 262,144) decode to the empty string; warn once."""
        if self._warned_unknown_id:
            return
        n = len(self)
        # Past len() only: an id there can still be an added token (ids with gaps).
        bad = next((i for s in seqs for i in s if i >= n and self._tok.id_to_token(i) is None), None)
        if bad is not None:
            self._warned_unknown_id = True
            warnings.warn(
                f"token id {bad} has no token in the tokenizer ({n} ids); it decodes to the empty string (ids the "
                "model's embedding has beyond the tokenizer's); this warning is shown once",
                stacklevel=3,
            )

    def _truncation_length(self, truncation, max_length) -> int | None:
        if truncation in (None, False, "do_not_truncate"):
            return None
        if truncation not in (True, "longest_first", "only_first", "only_second"):
            raise ValueError(f"truncation must be a bool or 'longest_first'/'only_first', got {truncation!r}")
        if max_length is None:
            if self.model_max_length >= VERY_LARGE_INTEGER:
                return None
            max_length = self.model_max_length
        return int(max_length)

    def __call__(
        self,
        text=None,
        padding: bool | str = False,
        truncation: bool | str | None = None,
        max_length: int | None = None,
        return_tensors: str | None = None,
        add_special_tokens: bool = True,
        return_attention_mask: bool | None = None,
        padding_side: str | None = None,
        pad_to_multiple_of: int | None = None,
        return_token_type_ids: bool | None = None,
        return_length: bool = False,
        **kwargs,
    ) -> BatchEncoding:
        """Tokenize a string or a list of strings, as transformers' tokenizer `__call__`."""
        kwargs.pop("verbose", None)
        kwargs.pop("sanitize_control_tokens", None)
        if kwargs.get("text_pair") is not None or kwargs.get("is_split_into_words"):
            raise NotImplementedError("kvgen.Tokenizer does not support text pairs or pre-split words")
        kwargs.pop("text_pair", None)
        kwargs.pop("is_split_into_words", None)
        if kwargs:
            raise TypeError(f"Tokenizer.__call__() got unexpected keyword arguments {sorted(kwargs)}")
        if text is None:
            raise ValueError("You need to specify `text` (a str or a list of str)")
        batched = isinstance(text, (list, tuple))
        texts = list(text) if batched else [text]
        for i, t in enumerate(texts):
            if not isinstance(t, str):
                raise TypeError(f"text must be a str or a list of str; item {i} is {type(t).__name__}")

        max_len = self._truncation_length(truncation, max_length)
        ids = self._tok.encode_batch(texts, add_special_tokens, max_len, self.truncation_side)

        if padding is True or padding == "longest":
            target = max((len(x) for x in ids), default=0)
            do_pad = True
        elif padding == "max_length":
            target = max_length if max_length is not None else self.model_max_length
            if target >= VERY_LARGE_INTEGER:
                raise ValueError("padding='max_length' needs max_length= (this tokenizer has no model_max_length)")
            do_pad = True
        elif padding in (False, None, "do_not_pad"):
            target, do_pad = 0, False
        else:
            raise ValueError(f"padding must be a bool, 'longest', 'max_length' or 'do_not_pad', got {padding!r}")
        if do_pad and pad_to_multiple_of:
            m = int(pad_to_multiple_of)
            target = ((target + m - 1) // m) * m

        side = padding_side if padding_side is not None else self.padding_side
        if side not in ("left", "right"):
            raise ValueError(f"padding_side must be 'left' or 'right', got {side!r}")
        masks = [[1] * len(x) for x in ids]
        if do_pad and any(len(x) < target for x in ids):
            pad_id = self.pad_token_id
            if pad_id is None:
                raise ValueError(
                    "Asking to pad but the tokenizer does not have a padding token. Please select a token to use "
                    "as `pad_token` (tokenizer.pad_token = tokenizer.eos_token e.g.)"
                )
            for i, x in enumerate(ids):
                n = target - len(x)
                if n > 0:
                    if side == "right":
                        ids[i] = x + [pad_id] * n
                        masks[i] = masks[i] + [0] * n
                    else:
                        ids[i] = [pad_id] * n + x
                        masks[i] = [0] * n + masks[i]

        out = BatchEncoding()
        out["input_ids"] = ids if batched else ids[0]
        if return_token_type_ids:
            tt = [[0] * len(x) for x in ids]
            out["token_type_ids"] = tt if batched else tt[0]
        if return_attention_mask is None or return_attention_mask:
            out["attention_mask"] = masks if batched else masks[0]
        if return_length:
            lens = [sum(m) if not do_pad else len(m) for m in masks]
            out["length"] = lens if batched else lens[0]
        if return_tensors is not None:
            if not batched:
                for k in list(out.keys()):
                    out[k] = [out[k]] if k != "length" else out[k]
            for k in list(out.keys()):
                if k == "length":
                    continue
                out[k] = _to_tensor(out[k], return_tensors, key=k)
        return out

    # ------------------------------------------------------------------ chat templates

    def get_chat_template(self, chat_template: str | None = None, tools=None) -> str:
        tmpl = self.chat_template
        if isinstance(tmpl, dict):
            if chat_template is not None and chat_template in tmpl:
                return tmpl[chat_template]
            if chat_template is None:
                if tools is not None and "tool_use" in tmpl:
                    return tmpl["tool_use"]
                if "default" in tmpl:
                    return tmpl["default"]
                raise ValueError(
                    "This model has multiple chat templates with no default specified! Please either pass a chat "
                    "template or the name of the template you wish to use to the `chat_template` argument. "
                    f"Available template names are {sorted(tmpl.keys())}."
                )
            return chat_template
        if chat_template is None:
            if tmpl is None:
                from .errors import InvalidInputError

                # transformers' words first (code may match on them), then what to do about it.
                raise InvalidInputError(
                    "Cannot use chat template functions because tokenizer.chat_template is not set and no template "
                    "argument was passed! This model has no chat template (a base model, or a checkpoint saved "
                    "without one): generate from plain text, or pass chat_template=\"...\""
                )
            return tmpl
        return chat_template

    def _render(self, messages, template: str, add_generation_prompt: bool, variables: dict) -> str:
        kw = dict(self.special_tokens_map)
        kw.update(variables)
        kw["chat_template"] = template
        return self._tok.apply_chat_template(_dumps(messages), bool(add_generation_prompt), _dumps(kw))

    def apply_chat_template(
        self,
        conversation,
        tools=None,
        documents=None,
        chat_template: str | None = None,
        add_generation_prompt: bool = False,
        continue_final_message: bool | str = False,
        tokenize: bool = True,
        padding: bool | str = False,
        truncation: bool = False,
        max_length: int | None = None,
        return_tensors: str | None = None,
        return_dict: bool = True,
        tokenizer_kwargs: dict | None = None,
        **kwargs,
    ):
        """Render a conversation (or a batch of them) with the chat template, as transformers 5.x:
        `tokenize=False` gives the prompt text; `tokenize=True` encodes it without adding special
        tokens again and returns a BatchEncoding (`return_dict=True`, the transformers 5 default)
        or just the ids (`return_dict=False`)."""
        if kwargs.pop("return_assistant_tokens_mask", False):
            raise NotImplementedError("return_assistant_tokens_mask is not supported by kvgen.Tokenizer")
        if kwargs.pop("sanitize_control_tokens", False):
            raise NotImplementedError("sanitize_control_tokens is not supported by kvgen.Tokenizer")
        if not tokenize:
            return_dict = False
        template = self.get_chat_template(chat_template, tools)

        if isinstance(conversation, (list, tuple)) and len(conversation) == 0:
            raise ValueError("Cannot apply chat template to an empty conversation. Provide at least one message.")
        if isinstance(conversation, (list, tuple)) and (
            isinstance(conversation[0], (list, tuple)) or hasattr(conversation[0], "messages")
        ):
            conversations, is_batched = list(conversation), True
        else:
            conversations, is_batched = [conversation], False

        if continue_final_message and add_generation_prompt:
            raise ValueError(
                "continue_final_message and add_generation_prompt are not compatible. Use continue_final_message "
                "when you want the model to continue the final message, and add_generation_prompt when you want to "
                "add a header that will prompt it to start a new assistant message instead."
            )
        if tools is not None:
            for t in tools:
                if not isinstance(t, Mapping):
                    raise TypeError(
                        "kvgen.Tokenizer accepts tools as JSON-schema dicts only (convert functions with "
                        "transformers.utils.get_json_schema)"
                    )
        if documents is not None:
            for d in documents:
                if not isinstance(d, Mapping):
                    raise TypeError("Documents should be a list of dicts with 'title' and 'text' keys!")

        variables = dict(kwargs)
        variables["tools"] = tools
        variables["documents"] = documents
        rendered = []
        for chat in conversations:
            chat = getattr(chat, "messages", chat)
            chat = _plain(chat)
            if not isinstance(chat, list):
                raise TypeError(f"A conversation must be a list of message dicts, got {type(chat).__name__}")
            msgs = []
            for m in chat:
                if not isinstance(m, dict):
                    raise TypeError(f"Chat messages should be dicts, dataclasses or pydantic models, but got {m!r}.")
                msgs.append({k: v for k, v in m.items() if v is not None})
            final_message = None
            if continue_final_message:
                field = continue_final_message if isinstance(continue_final_message, str) else "content"
                final_message = msgs[-1].get(field) if msgs else None
                if final_message is None:
                    raise ValueError(f'continue_final_message is set but the final message has no "{field}" to continue!')
                if field not in template:
                    raise ValueError(
                        f'continue_final_message is set to "{field}" but this is not an accepted field in the chat_template'
                    )
                if isinstance(final_message, list):
                    for block in reversed(final_message):
                        if isinstance(block, dict) and "text" in block:
                            final_message = block["text"]
                            block["text"] = block["text"] + _CONTINUE_FINAL_MESSAGE_TAG
                            break
                    else:
                        raise ValueError(
                            "continue_final_message is set but we could not find any text to continue in the final message!"
                        )
                else:
                    msgs[-1][field] = final_message + _CONTINUE_FINAL_MESSAGE_TAG
            text = self._render(msgs, template, add_generation_prompt, variables)
            if continue_final_message:
                tag = _CONTINUE_FINAL_MESSAGE_TAG
                if final_message.strip() not in text or tag.strip() not in text:
                    raise ValueError(
                        "continue_final_message is set but the final message does not appear in the chat after "
                        "applying the chat template!"
                    )
                loc = text.rindex(tag.strip())
                text = text[:loc] if text[loc : loc + len(tag)] == tag else text[:loc].rstrip()
            rendered.append(text)

        rendered_out = rendered if is_batched else rendered[0]
        if not tokenize:
            return rendered_out
        out = self(
            rendered_out,
            padding=padding,
            truncation=truncation,
            max_length=max_length,
            add_special_tokens=False,
            return_tensors=return_tensors,
            **(tokenizer_kwargs or {}),
        )
        return out if return_dict else out["input_ids"]
