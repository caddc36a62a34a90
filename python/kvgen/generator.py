"""`kvgen.Generator`: transformers' `model.generate()` surface over kvgen's Rust engine."""

from __future__ import annotations

import json
import logging
import sys
import warnings
from dataclasses import dataclass
from typing import Any

import numpy as np

from . import _hooks, _kvgen
from ._inputs import PreparedInputs, prepare
from ._progress import load_progress
from .config import ModelConfig
from .errors import InvalidInputError
from .generation_config import GLOBAL_DEFAULTS, GenerationConfig
from .outputs import GenerateBeamDecoderOnlyOutput, GenerateDecoderOnlyOutput
from .processing import processor_config_json
from .seeding import row_seeds
from .tokenizer import Tokenizer

# generate() kwargs that are model inputs rather than generation settings.
_MODEL_KWARGS = {"attention_mask", "input_ids", "use_cache", "tokenizer", "assistant_tokenizer"}

# Settings kvgen refuses rather than silently ignoring (no processor for them yet).
_UNSUPPORTED = {
    "guidance_scale": (None, 1, 1.0),
    "watermarking_config": (None,),
    "penalty_alpha": (None,),
    "constraints": (None,),
    "force_words_ids": (None,),
    "dola_layers": (None,),
    "max_time": (None,),
    "top_h": (None,),
    "low_memory": (None, False),
    "assistant_model": (None,),
    "prompt_lookup_num_tokens": (None,),
}

# generate() arguments that are Python callables run at every step (python/kvgen/_hooks.py).
_HOOK_KWARGS = ("logits_processor", "stopping_criteria", "prefix_allowed_tokens_fn")

# A hard bound far above any context (the scheduler's cache budget refuses much less); it keeps
# sizes inside the native integer range.
_MAX_NEW_TOKENS = 1 << 31


@dataclass
class _Call:
    """A generate() call, prepared: what the native engine gets and what formatting needs."""

    prepared: PreparedInputs
    ids: np.ndarray
    mask: np.ndarray | None
    cfg: GenerationConfig
    engine_kwargs: dict


def _as_id_list(value: Any) -> list[int]:
    if value is None:
        return []
    if isinstance(value, (list, tuple)):
        return [int(v) for v in value]
    if hasattr(value, "tolist"):
        v = value.tolist()
        return [int(x) for x in (v if isinstance(v, list) else [v])]
    return [int(value)]


class Generator:
    """A loaded model with transformers' `generate()` API. Build it with `from_pretrained`."""

    def __init__(self, engine: "_kvgen.Engine") -> None:
        self._engine = engine
        native_tok = engine.tokenizer
        self.tokenizer: Tokenizer | None = Tokenizer(native_tok) if native_tok is not None else None
        self.config = ModelConfig(json.loads(engine.config_json))
        self.generation_config = self._model_generation_config()
        self._report_load_notices(engine)
        self._warn_tokens_past_embedding()

    def _warn_tokens_past_embedding(self) -> None:
        """A tokenizer with ids the embedding has no row for (Gemma 3 1B: `<image_soft_token>` =
        262,144, one past its embedding) loads with a warning naming them; a prompt holding one
        raises TokenOutOfRangeError before any compute (the native engine checks every id)."""
        tok, rows = self.tokenizer, int(self.config.vocab_size)
        if tok is None:
            return
        added = [(i, t) for i, t, _ in tok.native.added_tokens() if i >= rows]
        # Added tokens can sit past len(tokenizer) (ids with gaps), so both are looked at.
        top = max([len(tok)] + [i + 1 for i, _ in added])
        if top <= rows:
            return
        named = ", ".join(f"{t!r} = {i}" for i, t in added[:3]) + (", ..." if len(added) > 3 else "")
        warnings.warn(
            f"the tokenizer has ids up to {top - 1} but the model's embedding has {rows} rows (ids 0..{rows - 1})"
            + (f"; tokens past it: {named}" if named else "")
            + f". A prompt holding an id >= {rows} raises kvgen.TokenOutOfRangeError: leave those tokens out of "
            "prompts, or check that the tokenizer belongs to this model.",
            stacklevel=4,
        )

    @classmethod
    def from_pretrained(
        cls,
        model: str,
        device: str = "cpu",
        dtype: str = "auto",
        tp_degree: int = 1,
        backend: str = "auto",
        neuron_executor: str = "nrt",
        neuron_dir: str | None = None,
        batch_sizes: Any = (1,),
        buckets: Any = None,
        max_context: int | None = None,
        compute_dtype: str = "auto",
        **kwargs: Any,
    ) -> "Generator":
        """Loads an HF model directory, a .gguf file, a packaged model by name
        ("SmolLM2-135M-Instruct"), or a hub id already in the local HF cache. A progress bar is
        drawn on stderr for large files when stderr is a terminal.

        device: "cpu", "cuda" or "cuda:N". backend: "auto" (kvgen's native kernels on "cpu",
        libtorch on CUDA), "native", or "torch" (libtorch, also on "cpu"; needs a build with the
        `torch` feature, else BackendUnavailableError). tp_degree: tensor-parallel ranks (native
        backend; README "Tensor parallelism"), each holding its shard of every weight.

        device="neuron" (README "Neuron"): the model as exported graphs on tp_degree NeuronCores.
        neuron_dir: an export (`kvgen.neuron.export`, compiled with `kvgen.neuron.compile`);
        neuron_executor: "nrt" (libnrt, the default) or "xla-cpu" (the same graphs on XLA's CPU
        backend, recorded on the fly when neuron_dir is None). batch_sizes, buckets and max_context
        shape the graphs when they are recorded here (an export fixes them).

        compute_dtype: "auto" (the native backend multiplies in float32 whatever `dtype` stores,
        torch in the weights' dtype), "float32", or "bfloat16": transformers' bfloat16 forward
        (bfloat16 weights and activations, float32 accumulation; AVX512-BF16 dot products where
        the CPU has them), so logits track `model.to(torch.bfloat16)` rather than float32."""
        neuron = None
        if str(device) == "neuron":
            from ._neuron_options import set_options as _set_options

            neuron = _set_options(neuron_executor, neuron_dir, batch_sizes, buckets, max_context)
        elif neuron_dir is not None or neuron_executor != "nrt":
            raise InvalidInputError(f"neuron_dir / neuron_executor apply to device=\"neuron\" only, not device={device!r}")
        if kwargs:
            raise InvalidInputError(f"unknown from_pretrained arguments: {sorted(kwargs)}")
        if isinstance(tp_degree, bool) or not isinstance(tp_degree, int):
            raise InvalidInputError(f"tp_degree={tp_degree!r} must be an integer >= 1 (the number of tensor-parallel ranks)")
        import os

        from . import models
        from .errors import ModelNotFoundError

        name = os.fspath(model)
        name = models.packaged_model_path(name) or name
        try:
            progress = load_progress(name)
            # str() accepts torch.device / torch.dtype objects as transformers users pass them.
            engine = _kvgen.Engine.load(
                name,
                str(device),
                str(dtype).replace("torch.", ""),
                progress,
                str(backend),
                max(-1, min(int(tp_degree), 1 << 62)),
                neuron,
                str(compute_dtype).replace("torch.", ""),
            )
            gen = cls(engine)
            gen._device = str(device)
            return gen
        except ModelNotFoundError as e:
            hint = models.install_hint(name)
            if hint is None:
                raise
            raise ModelNotFoundError(f"{hint} ({e})") from e

    @staticmethod
    def _report_load_notices(engine: "_kvgen.Engine") -> None:
        """What the load decided, once per load: warnings through `warnings` (a choice the user can
        change, e.g. the compute dtype), the rest as log lines of the "kvgen" logger."""
        for is_warning, message in getattr(engine, "load_notices", ()):
            if is_warning:
                warnings.warn(message, stacklevel=4)
            else:
                logging.getLogger("kvgen").warning(message)

    def _model_generation_config(self) -> GenerationConfig:
        data = json.loads(self._engine.generation_config_json)
        cfg = GenerationConfig.from_any(data)
        # Like transformers' GenerationConfig.from_model_config: special tokens fall back to config.json.
        for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
            if getattr(cfg, key, None) is None and getattr(self.config, key, None) is not None:
                setattr(cfg, key, getattr(self.config, key))
        return cfg

    @property
    def device(self) -> str:
        return getattr(self, "_device", "cpu")

    @property
    def dtype(self) -> str:
        return self._engine.dtype

    @property
    def compute_dtype(self) -> str:
        """The forward's arithmetic: "float32", or the weights' dtype (torch, compute_dtype="bfloat16")."""
        return self._engine.compute_dtype

    # ---- generation -------------------------------------------------------------------------

    def _merge_config(self, generation_config: Any, kwargs: dict) -> tuple[GenerationConfig, dict, bool, bool]:
        """transformers 5.x `_prepare_generation_config`: user config, then the model's, then global defaults, then kwargs."""
        user_cfg = GenerationConfig.from_any(generation_config) if generation_config is not None else None
        has_default_max_length = (
            kwargs.get("max_length") is None
            and (user_cfg is None or user_cfg.max_length is None)
            and self.generation_config.max_length is None
        )
        has_default_min_length = (
            kwargs.get("min_length") is None
            and (user_cfg is None or user_cfg.min_length is None)
            and self.generation_config.min_length is None
        )
        cfg = user_cfg if user_cfg is not None else GenerationConfig()
        cfg.update(defaults_only=True, **{k: v for k, v in self.generation_config.to_dict().items() if v is not None})
        cfg.update(defaults_only=True, **GLOBAL_DEFAULTS)
        model_kwargs = {k: v for k, v in kwargs.items() if k in _MODEL_KWARGS}
        unused = cfg.update(**{k: v for k, v in kwargs.items() if k not in _MODEL_KWARGS})
        if unused:
            raise InvalidInputError(
                f"The following `model_kwargs` are not used by the model: {list(unused)} (note: typos in the "
                "generate arguments will also show up in this list)"
            )
        return cfg, model_kwargs, has_default_max_length, has_default_min_length

    def _validate(self, cfg: GenerationConfig) -> None:
        """Checks transformers would also make (same messages), plus kvgen's stricter ones."""
        beams = cfg.num_beams if cfg.num_beams is not None else 1
        if not isinstance(beams, (int, np.integer)) or isinstance(beams, bool) or beams < 1:
            raise InvalidInputError(f"num_beams={cfg.num_beams!r} must be a positive integer")
        if beams > 1:
            _validate_beams(cfg, beams)
        elif cfg.num_return_sequences is not None and cfg.num_return_sequences > 1 and not cfg.do_sample:
            raise InvalidInputError(
                "Greedy methods (do_sample != True) without beam search do not support `num_return_sequences` "
                f"different than 1 (got {cfg.num_return_sequences})."
            )
        n = cfg.num_return_sequences
        if not isinstance(n, (int, np.integer)) or isinstance(n, bool) or n < 1:
            raise InvalidInputError(f"num_return_sequences={n!r} must be a positive integer")
        for name, neutral in _UNSUPPORTED.items():
            value = getattr(cfg, name, None)
            if value not in neutral:
                raise InvalidInputError(f"{name}={value!r} is not supported by kvgen; leave it unset")
        for name in ("max_new_tokens", "min_new_tokens", "max_length", "min_length"):
            value = getattr(cfg, name, None)
            if value is not None and (not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < 0):
                raise InvalidInputError(f"{name}={value!r} must be a non-negative integer")
        if cfg.max_new_tokens is not None and cfg.max_new_tokens <= 0:
            raise InvalidInputError(
                f"max_new_tokens={cfg.max_new_tokens} must be greater than 0; ask for at least one new token"
            )
        if cfg.top_k is not None and (not isinstance(cfg.top_k, (int, np.integer)) or isinstance(cfg.top_k, bool)):
            raise InvalidInputError(f"top_k={cfg.top_k!r} must be an integer >= 0 (0 disables top-k)")

    def _encode_texts(self, texts: list[str]) -> dict:
        if self.tokenizer is None:
            raise InvalidInputError("text input needs a tokenizer, and this model was loaded without tokenizer.json")
        return self.tokenizer(texts, padding=True, padding_side="left", return_tensors="np")

    def generate(
        self,
        inputs: Any = None,
        generation_config: Any = None,
        *,
        attention_mask: Any = None,
        streamer: Any = None,
        seed: Any = None,
        **kwargs: Any,
    ) -> Any:
        """transformers-compatible generate(); see the README for the accepted kinds of input.
        Safe to call from many threads at once: concurrent calls share the model's steps.
        `logits_processor=`, `stopping_criteria=` and `prefix_allowed_tokens_fn=` take
        transformers' hook objects (or plain callables), merged as transformers 5.x merges them."""
        call = self._prepare_call(inputs, generation_config, attention_mask, seed, kwargs)
        _refuse_beam_streamer(call.cfg, streamer)
        on_step = self._start_streamer(streamer, call)
        new_tokens, scores, logits, _, beam = self._engine.generate(call.ids, call.mask, **call.engine_kwargs, on_step=on_step)
        if streamer is not None:
            streamer.end()
        return self._format(call.prepared, call.ids, new_tokens, scores, logits, call.cfg, beam)

    async def agenerate(
        self,
        inputs: Any = None,
        generation_config: Any = None,
        *,
        attention_mask: Any = None,
        streamer: Any = None,
        seed: Any = None,
        **kwargs: Any,
    ) -> Any:
        """`await gen.agenerate(...)`: generate() for asyncio. The event loop never waits on the
        model; cancelling the awaiting task cancels the generation and frees its cache slots."""
        from ._async import wait_request

        call = self._prepare_call(inputs, generation_config, attention_mask, seed, kwargs)
        _refuse_beam_streamer(call.cfg, streamer)
        request = self._submit_call(call, stream_steps=streamer is not None, doorbell=True)
        on_step = self._start_streamer(streamer, call)
        new_tokens, scores, logits, _, beam = await wait_request(request, on_step)
        if streamer is not None:
            streamer.end()
        return self._format(call.prepared, call.ids, new_tokens, scores, logits, call.cfg, beam)

    def _submit(
        self, inputs: Any, kwargs: dict, *, stream_steps: bool, doorbell: bool, logprobs: int | None = None
    ) -> tuple[Any, "_Call"]:
        """Starts a generation without waiting for it: (native Request, the prepared call).
        `logprobs=k` has each generated token's log-probability and the k likeliest computed per step."""
        kwargs = dict(kwargs)
        generation_config = kwargs.pop("generation_config", None)
        attention_mask = kwargs.pop("attention_mask", None)
        seed = kwargs.pop("seed", None)
        call = self._prepare_call(inputs, generation_config, attention_mask, seed, kwargs)
        return self._submit_call(call, stream_steps=stream_steps, doorbell=doorbell, logprobs=logprobs), call

    def _submit_call(self, call: "_Call", *, stream_steps: bool, doorbell: bool, logprobs: int | None = None) -> Any:
        """Submits to the scheduler; `doorbell=True` rings the running event loop's doorbell."""
        from ._async import loop_doorbell

        bell = loop_doorbell() if doorbell else None
        return self._engine.submit(
            call.ids, call.mask, **call.engine_kwargs, logprobs=logprobs, stream_steps=stream_steps, doorbell=bell
        )

    def _start_streamer(self, streamer: Any, call: "_Call") -> Any:
        """Gives an HF-style streamer the prompt; returns the per-step callback (or None)."""
        if streamer is None:
            return None
        prepared = call.prepared
        streamer.put(self._stream_value(prepared, call.ids))
        return lambda tokens: streamer.put(self._stream_value(prepared, np.asarray(tokens, dtype=np.int64)))

    def _prepare_call(self, inputs: Any, generation_config: Any, attention_mask: Any, seed: Any, kwargs: dict) -> "_Call":
        """Everything generate() does before the model runs: merging and validating settings,
        encoding and expanding inputs, the arguments of the native call."""
        if inputs is None:
            inputs = kwargs.pop("input_ids", None)
        elif "input_ids" in kwargs:
            raise InvalidInputError("pass the prompt either as `inputs` or as `input_ids`, not both")
        if inputs is None:
            raise InvalidInputError("generate() needs `inputs` (token ids or text)")
        if attention_mask is None:
            attention_mask = kwargs.pop("attention_mask", None)
        hook_args = {k: kwargs.pop(k, None) for k in _HOOK_KWARGS}
        cfg, _, has_default_max_length, has_default_min_length = self._merge_config(generation_config, kwargs)
        self._validate(cfg)

        prepared = prepare(inputs, attention_mask, self._encode_texts)
        ids = prepared.ids
        prompt_batch, input_len = ids.shape
        n_return = int(cfg.num_return_sequences or 1)
        beams = int(cfg.num_beams or 1)
        # Beam search expands each prompt into its beams natively (and returns n_return rows each).
        if n_return > 1 and beams == 1:
            # transformers' _expand_inputs_for_generation: each row repeated n times, consecutively.
            ids = np.repeat(ids, n_return, axis=0)
            if prepared.attention_mask is not None:
                prepared.attention_mask = np.repeat(prepared.attention_mask, n_return, axis=0)
        batch = ids.shape[0]

        eos_ids = _as_id_list(cfg.eos_token_id)
        pad_id = cfg.pad_token_id
        if pad_id is None and eos_ids:
            pad_id = eos_ids[0]
        pad_id = None if pad_id is None else int(pad_id)

        mask = prepared.attention_mask
        if mask is None and pad_id is not None and (ids == pad_id).any() and pad_id not in eos_ids:
            # transformers infers the mask from pad tokens when pad differs from eos.
            mask = (ids != pad_id).astype(np.int64)
        if pad_id is not None and batch > 1:
            right_padded = (mask[:, -1] == 0).any() if mask is not None else (ids[:, -1] == pad_id).any()
            if right_padded:
                warnings.warn(
                    "A decoder-only architecture is being used, but right-padding was detected! For correct "
                    "generation results, please set `padding_side='left'` when initializing the tokenizer.",
                    stacklevel=3,
                )

        max_length = self._max_length(cfg, input_len, has_default_max_length)
        min_length = cfg.min_length or 0
        if cfg.min_new_tokens is not None:
            min_length = cfg.min_new_tokens + input_len
        steps = max(1, max_length - input_len)
        if steps > _MAX_NEW_TOKENS:
            raise InvalidInputError(
                f"max_new_tokens={steps} exceeds kvgen's limit of {_MAX_NEW_TOKENS} new tokens per call; ask for fewer"
            )

        cfg.min_length = min_length
        cfg.eos_token_id = eos_ids
        seeds = row_seeds(seed, prompt_batch, beams if beams > 1 else n_return) if cfg.do_sample else []
        engine_kwargs = dict(
            max_new_tokens=steps,
            processor_config_json=processor_config_json(
                cfg, prompt_length=input_len, max_length=max_length,
                # transformers: beam sampling's warpers keep len(eos) + 1 tokens at least.
                min_tokens_to_keep=len(eos_ids) + 1 if beams > 1 and cfg.do_sample else 1,
            ),
            eos_token_ids=eos_ids,
            pad_token_id=pad_id if eos_ids else None,
            stop_strings=self._stop_strings(cfg),
            output_scores=bool(cfg.output_scores and cfg.return_dict_in_generate),
            output_logits=bool(cfg.output_logits and cfg.return_dict_in_generate),
            seeds=seeds,
        )
        if beams > 1:
            # transformers' filler: `pad_token_id or eos_token_id[0] if eos_token_id is not None else -1`.
            fill = (pad_id if pad_id else eos_ids[0]) if eos_ids else -1
            early = cfg.early_stopping
            engine_kwargs["beam_json"] = json.dumps({
                "num_beams": beams,
                "length_penalty": float(cfg.length_penalty if cfg.length_penalty is not None else 1.0),
                "early_stopping": "never" if early == "never" else ("true" if early is True else "false"),
                "num_return_sequences": n_return,
                "fill_value": int(fill),
            })
        self._attach_hooks(engine_kwargs, hook_args, prepared, beams if beams > 1 else n_return, input_len)
        return _Call(
            prepared=prepared,
            ids=np.ascontiguousarray(ids),
            mask=None if mask is None else np.ascontiguousarray(mask, dtype=np.int64),
            cfg=cfg,
            engine_kwargs=engine_kwargs,
        )

    def _attach_hooks(self, engine_kwargs: dict, hook_args: dict, prepared: PreparedInputs, n_return: int, input_len: int) -> None:
        """Adds the call's user hooks (merged as transformers merges them) to the engine arguments;
        a user stopping criterion of a built-in's class turns that built-in check off."""
        config_json = engine_kwargs["processor_config_json"]
        runner, replaced = _hooks.build(
            **hook_args,
            builtin_names=lambda: _kvgen.builtin_processor_names(config_json, int(self.config.vocab_size)),
            rows_per_prompt=n_return,
            has_stop_strings=bool(engine_kwargs["stop_strings"]),
            has_eos=bool(engine_kwargs["eos_token_ids"]),
            torch_device=prepared.torch_device if prepared.kind == "torch" else None,
            keep_scores=engine_kwargs["output_scores"],
        )
        if runner is None:
            return
        engine_kwargs["hooks"] = runner
        if "StopStringCriteria" in replaced:
            engine_kwargs["stop_strings"] = []
        if "EosTokenCriteria" in replaced:
            # The user's criterion decides where rows end; finished rows are still padded.
            engine_kwargs["eos_token_ids"] = []
        if "MaxLengthCriteria" in replaced:
            user_max = next(getattr(c, "max_length", None) for c in runner.criteria if type(c).__name__ == "MaxLengthCriteria")
            if isinstance(user_max, (int, np.integer)) and not isinstance(user_max, bool):
                engine_kwargs["max_new_tokens"] = max(1, int(user_max) - input_len)

    # ---- concurrency ------------------------------------------------------------------------

    def memory_stats(self) -> dict:
        """What the model holds: `tp_degree`, `weight_bytes_per_rank` (the largest rank's; a
        replicated embedding counts on every rank), `kv_cache_bytes_per_token` (one position of
        one sequence on one rank) and `kv_cache_bytes_reserved` (all ranks, now)."""
        return self._engine.memory_stats()

    def _record_all_reduces(self, on: bool = True) -> None:
        """Debug hook: start (clearing the log) or stop (keeping it) recording, for every all-reduce, a 64-bit
        digest of each rank's result."""
        self._engine.record_all_reduces(bool(on))

    def _debug_tensor(self, name: str) -> list:
        """Test hook (device="neuron"): a named device tensor's bytes on each rank."""
        return [bytes(b) for b in self._engine.debug_tensor(name)]

    def _all_reduce_log(self) -> list:
        """The recorded digests (one list of tp_degree ints per all-reduce, in order); cleared."""
        return self._engine.all_reduce_log()

    def scheduler_stats(self) -> dict:
        """The continuous-batching scheduler's counters: running/queued requests and sequences,
        steps, `max_step_sequences` (the most rows one model step has run), limits."""
        return self._engine.scheduler_stats()

    def set_scheduler_limits(
        self,
        max_sequences: int | None = None,
        max_cache_tokens: int | None = None,
        max_queued_requests: int | None = None,
    ) -> None:
        """Bounds what runs at once (the rest waits in arrival order): sequences decoding
        together, and KV-cache positions reserved together (prompt + max_new_tokens per row;
        `scheduler_stats()["cache_bytes_per_token"]` converts to bytes). A call that could never
        fit them raises InvalidInputError at once. `max_queued_requests` bounds the calls waiting
        for admission; beyond it a call raises OverloadedError."""
        for name, value in (
            ("max_sequences", max_sequences),
            ("max_cache_tokens", max_cache_tokens),
            ("max_queued_requests", max_queued_requests),
        ):
            if value is not None and (not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < 1):
                raise InvalidInputError(f"{name}={value!r} must be a positive integer")
        self._engine.set_scheduler_limits(max_sequences, max_cache_tokens, max_queued_requests)

    def _max_length(self, cfg: GenerationConfig, input_len: int, has_default_max_length: bool) -> int:
        if cfg.max_new_tokens is not None:
            return cfg.max_new_tokens + input_len
        if has_default_max_length:
            limit = cfg.max_length + input_len
            max_pos = getattr(self.config, "max_position_embeddings", None)
            return min(limit, max_pos) if max_pos is not None else limit
        if input_len >= cfg.max_length:
            warnings.warn(
                f"Input length of input_ids is {input_len}, but `max_length` is set to {cfg.max_length}. This can "
                "lead to unexpected behavior. You should consider increasing `max_length` or, better yet, setting "
                "`max_new_tokens`.",
                stacklevel=4,
            )
        return cfg.max_length

    @staticmethod
    def _stop_strings(cfg: GenerationConfig) -> list[str]:
        s = cfg.stop_strings
        if s is None:
            return []
        return [s] if isinstance(s, str) else list(s)

    @staticmethod
    def _stream_value(prepared: PreparedInputs, array: np.ndarray) -> Any:
        # HF streamers call .tolist() and read .shape: torch tensors when torch is in use, else numpy.
        if prepared.kind == "torch" or "torch" in sys.modules:
            import torch

            return torch.from_numpy(np.ascontiguousarray(array))
        return array

    def _format(self, prepared, ids, new_tokens, scores, logits, cfg, beam=None) -> Any:
        if prepared.kind in ("text", "texts"):
            if self.tokenizer is None:
                raise InvalidInputError("text output needs a tokenizer")
            texts = self.tokenizer.batch_decode(new_tokens.tolist(), skip_special_tokens=True)
            return texts[0] if prepared.kind == "text" and len(texts) == 1 else texts
        if beam is not None:
            ids = np.repeat(ids, int(cfg.num_return_sequences or 1), axis=0)
        sequences = np.concatenate([ids, new_tokens.astype(np.int64)], axis=1)
        out = prepared.wrap(sequences)
        if not cfg.return_dict_in_generate:
            return out
        if beam is not None:
            sequences_scores, beam_indices = beam
            return GenerateBeamDecoderOnlyOutput(
                sequences=out,
                sequences_scores=prepared.wrap_floats(np.asarray(sequences_scores, dtype=np.float32)) if cfg.output_scores else None,
                scores=tuple(prepared.wrap_floats(s) for s in scores) if cfg.output_scores else None,
                logits=tuple(prepared.wrap_floats(s) for s in logits) if cfg.output_logits else None,
                beam_indices=prepared.wrap(np.asarray(beam_indices, dtype=np.int64)),
            )
        return GenerateDecoderOnlyOutput(
            sequences=out,
            scores=tuple(prepared.wrap_floats(s) for s in scores) if cfg.output_scores else None,
            logits=tuple(prepared.wrap_floats(s) for s in logits) if cfg.output_logits else None,
        )

    def stream(self, inputs: Any = None, **kwargs: Any):
        """Yields the newly generated text as deltas (one prompt). Same kwargs as generate()."""
        from .streaming import stream

        return stream(self, inputs, kwargs)

    def astream(self, inputs: Any = None, **kwargs: Any):
        """Async iterator of text deltas; generation runs off the event loop."""
        from .streaming import astream

        return astream(self, inputs, kwargs)

    # ---- parity helpers ---------------------------------------------------------------------

    def logits(self, input_ids: Any, attention_mask: Any = None) -> np.ndarray:
        """float32 (batch, seq, vocab) logits of a full forward pass; masked positions are 0."""
        prepared = prepare(input_ids, attention_mask, self._encode_texts)
        mask = prepared.attention_mask
        return self._engine.logits(
            np.ascontiguousarray(prepared.ids), None if mask is None else np.ascontiguousarray(mask, dtype=np.int64)
        )

    def compute_transition_scores(self, sequences: Any, scores: Any, beam_indices: Any = None, normalize_logits: bool = False) -> Any:
        """transformers' `model.compute_transition_scores`: each generated token's score at its
        step (its beam's row when `beam_indices` is given; 0 past a beam's end)."""
        return compute_transition_scores(sequences, scores, beam_indices, normalize_logits)

    def __repr__(self) -> str:
        return f"Generator({self._engine.model_path!r}, arch={self.config.architectures}, dtype={self.dtype})"


def _validate_beams(cfg: GenerationConfig, beams: int) -> None:
    """transformers' beam-search checks, with its messages."""
    if (getattr(cfg, "num_beam_groups", None) or 1) > 1:
        raise InvalidInputError(
            "Group Beam Search requires `trust_remote_code=True` in your `generate` call, since it loads "
            "https://hf.co/transformers-community/group-beam-search. kvgen cannot load Hub code: group beam search "
            "is not available; use num_beam_groups=1"
        )
    if getattr(cfg, "constraints", None) or getattr(cfg, "force_words_ids", None):
        raise InvalidInputError(
            "Constrained Beam Search requires `trust_remote_code=True` in your `generate` call, since it loads "
            "https://hf.co/transformers-community/constrained-beam-search. kvgen cannot load Hub code: constrained "
            "beam search is not available"
        )
    if cfg.early_stopping not in (None, True, False, "never"):
        raise InvalidInputError(f"`early_stopping` must be a boolean or 'never', but is {cfg.early_stopping}.")
    n = cfg.num_return_sequences or 1
    if n > beams:
        raise InvalidInputError(f"`num_return_sequences` ({n}) has to be smaller or equal to `num_beams` ({beams}).")


def _refuse_beam_streamer(cfg: GenerationConfig, streamer: Any) -> None:
    if streamer is not None and (cfg.num_beams or 1) > 1:
        raise InvalidInputError(
            "`streamer` cannot be used with beam search (yet!). Make sure that `num_beams` is set to 1."
        )


def compute_transition_scores(sequences: Any, scores: Any, beam_indices: Any = None, normalize_logits: bool = False) -> Any:
    """transformers' `compute_transition_scores` on kvgen's (or transformers') generate output:
    (rows, generated) scores of the chosen tokens, torch when the inputs are torch tensors."""
    is_torch = "torch" in type(sequences).__module__
    as_np = lambda x: x.detach().cpu().numpy() if hasattr(x, "detach") else np.asarray(x)  # noqa: E731
    seq = as_np(sequences).astype(np.int64)
    steps = np.stack([as_np(s).astype(np.float32) for s in scores])  # (steps, rows, vocab)
    if normalize_logits:
        top = steps.max(axis=-1, keepdims=True)
        steps = steps - top - np.log(np.exp(steps - top).sum(axis=-1, keepdims=True))
    if beam_indices is None:
        beams = np.broadcast_to(np.arange(steps.shape[1])[:, None], (steps.shape[1], steps.shape[0])).copy()
    else:
        beams = as_np(beam_indices).astype(np.int64).copy()
    ended = beams < 0
    length = int((~ended).sum(-1).max()) if beams.size else 0
    beams, ended = beams[:, :length], ended[:, :length]
    beams[ended] = 0
    tokens = seq[:, seq.shape[1] - length:]
    out = steps[np.arange(length)[None, :], beams, tokens]
    out[ended] = 0
    if is_torch:
        import torch

        return torch.from_numpy(np.ascontiguousarray(out))
    return out
