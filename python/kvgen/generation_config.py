"""Generation settings with transformers 5.x names and merging rules, without importing transformers."""

from __future__ import annotations

import copy
from typing import Any

# transformers' `GenerationConfig._get_default_generation_params()`: applied when neither the user
# nor the model's generation_config.json set a value.
GLOBAL_DEFAULTS: dict[str, Any] = {
    "max_length": 20,
    "min_length": 0,
    "do_sample": False,
    "use_cache": True,
    "early_stopping": False,
    "num_beams": 1,
    "temperature": 1.0,
    "top_k": 50,
    "top_p": 1.0,
    "typical_p": 1.0,
    "repetition_penalty": 1.0,
    "length_penalty": 1.0,
    "no_repeat_ngram_size": 0,
    "encoder_no_repeat_ngram_size": 0,
    "bad_words_ids": None,
    "num_return_sequences": 1,
    "output_scores": False,
    "return_dict_in_generate": False,
    "forced_bos_token_id": None,
    "forced_eos_token_id": None,
    "remove_invalid_values": False,
    "exponential_decay_length_penalty": None,
    "output_logits": False,
    "diversity_penalty": 0.0,
    "epsilon_cutoff": 0.0,
    "eta_cutoff": 0.0,
    "min_p": None,
    "num_beam_groups": 1,
}

# Every field transformers' GenerationConfig knows; anything else passed to generate() is an error.
FIELDS: tuple[str, ...] = tuple(sorted(set(GLOBAL_DEFAULTS) | {
    "max_new_tokens", "min_new_tokens", "max_time", "stop_strings", "penalty_alpha", "dola_layers",
    "cache_implementation", "cache_config", "return_legacy_cache", "prefill_chunk_size",
    "top_h", "renormalize_logits", "sequence_bias", "token_healing", "guidance_scale",
    "watermarking_config", "suppress_tokens", "begin_suppress_tokens", "constraints",
    "force_words_ids", "num_assistant_tokens", "num_assistant_tokens_schedule",
    "assistant_confidence_threshold", "prompt_lookup_num_tokens", "max_matching_ngram_size",
    "assistant_early_exit", "assistant_lookbehind", "target_lookbehind", "output_attentions",
    "output_hidden_states", "pad_token_id", "bos_token_id", "eos_token_id",
    "encoder_repetition_penalty", "low_memory", "compile_config", "disable_compile",
    "is_assistant", "decoder_start_token_id", "trust_remote_code",
}))


class GenerationConfig:
    """A transformers-compatible generation config: unset fields are None, as in transformers 5.x."""

    def __init__(self, **kwargs: Any) -> None:
        for name in FIELDS:
            setattr(self, name, None)
        unused = self.update(**kwargs)
        if unused:
            # transformers keeps unknown entries on the config; so do we.
            for k, v in unused.items():
                setattr(self, k, v)

    def update(self, defaults_only: bool = False, **kwargs: Any) -> dict[str, Any]:
        """Sets known fields (only unset ones when `defaults_only`); returns the unknown kwargs."""
        unused = {}
        for key, value in kwargs.items():
            if key in FIELDS or hasattr(self, key):
                if not defaults_only or getattr(self, key, None) is None:
                    setattr(self, key, value)
            else:
                unused[key] = value
        return unused

    def to_dict(self) -> dict[str, Any]:
        return {k: v for k, v in vars(self).items() if not k.startswith("_")}

    @classmethod
    def from_any(cls, config: Any) -> "GenerationConfig":
        """Accepts a kvgen or transformers GenerationConfig (or a plain dict)."""
        if config is None:
            return cls()
        if isinstance(config, cls):
            return copy.deepcopy(config)
        if isinstance(config, dict):
            data = config
        elif hasattr(config, "to_dict"):
            data = config.to_dict()
        else:
            raise TypeError(
                f"generation_config must be a kvgen.GenerationConfig, a transformers.GenerationConfig or a dict, "
                f"not {type(config).__name__}"
            )
        out = cls()
        for k, v in data.items():
            if not k.startswith("_") and k != "transformers_version":
                setattr(out, k, v)
        return out

    def __repr__(self) -> str:
        set_fields = {k: v for k, v in self.to_dict().items() if v is not None}
        return f"GenerationConfig({set_fields})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, GenerationConfig) and self.to_dict() == other.to_dict()
