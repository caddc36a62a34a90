"""`gen.config`: config.json with attribute access under transformers' field names."""

from __future__ import annotations

from typing import Any


class ModelConfig:
    def __init__(self, data: dict[str, Any]) -> None:
        self._data = dict(data)
        for k, v in data.items():
            setattr(self, k, v)
        if "head_dim" not in data and data.get("num_attention_heads"):
            self.head_dim = data["hidden_size"] // data["num_attention_heads"]
        if "num_key_value_heads" not in data and "num_attention_heads" in data:
            self.num_key_value_heads = data["num_attention_heads"]

    def to_dict(self) -> dict[str, Any]:
        return dict(self._data)

    def __getattr__(self, name: str) -> Any:
        # Fields absent from config.json read as None, as transformers' defaults mostly do. A
        # vision-language config (Gemma3ForConditionalGeneration) keeps the language model's
        # fields in `text_config`; they read through, as transformers' generation defaults do.
        if name.startswith("_"):
            raise AttributeError(name)
        text = self._data.get("text_config")
        if isinstance(text, dict):
            return text.get(name)
        return None

    def get_text_config(self, decoder: bool = False) -> "ModelConfig":
        """transformers' `get_text_config()`: the language model's config (this one when flat)."""
        text = self._data.get("text_config")
        return ModelConfig(text) if isinstance(text, dict) else self

    def __repr__(self) -> str:
        return f"ModelConfig({self._data})"
