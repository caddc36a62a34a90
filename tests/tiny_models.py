"""Tiny random checkpoints for every architecture kvgen supports, built with transformers, plus
the transformers-side reference helpers shared by the test modules.

`build_model(out_dir, kind, dtype="float32", max_shard_size=None)` writes an HF model directory
(config.json, safetensors weights, generation_config.json and the tiny tokenizer) and returns it.

Notes on transformers 5.x that the fixtures rely on (checked against 5.24):
- RoPE scaling is spelled `rope_parameters` (a dict holding `rope_type`, `rope_theta` and the scaling
  keys) in 5.x configs and in the config.json they save. The legacy 4.x spelling (top-level
  `rope_theta` + `rope_scaling: {"rope_type"|"type": ...}`) is still read by 5.x and converted.
  Real checkpoints on the hub (Llama 3.x etc.) use the legacy spelling, so the `llama3_rope` fixture
  is deliberately rewritten to it after saving; the other scaled kinds keep the 5.x spelling.
  `build_model` reloads every saved config and asserts the scaling is really applied.
- HF initialises biases to 0 and RMSNorm weights to 1, which would make q/k/v biases and (q/k)
  norms invisible to a parity test; every 1-D parameter is therefore randomised after init.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

# -- prompts -------------------------------------------------------------------------------------

# Different lengths on purpose: the batch is left padded, and the longest prompt plus 32 new tokens
# is longer than the Mistral sliding window (8) and than the dynamic-RoPE max_position_embeddings.
PROMPTS = [
    "The cat",
    "Hello, world!",
    "My friend walks to the park.",
    "Python and Rust are programming languages. The teacher",
]

# Longer than the sliding window (8) and the dynamic-RoPE max_position_embeddings (20) by itself,
# for full-forward logits parity.
LONG_TEXT = (
    "Once upon a time, there was a little village in the mountains. "
    "The quick brown fox jumps over the lazy dog."
)

ALL_KINDS = [
    "llama",
    "llama_tied",
    "llama3_rope",
    "llama_linear_rope",
    "llama_dynamic_rope",
    "mistral",
    "qwen2",
    "qwen3",
]

# Generic sizes (qwen3 overrides head_dim).
HIDDEN = 64
LAYERS = 2
HEADS = 4
KV_HEADS = 2
INTERMEDIATE = 128
MAX_POS = 256
DYNAMIC_MAX_POS = 20  # shorter than prompt + 32 new tokens, so dynamic NTK scaling kicks in
SLIDING_WINDOW = 8  # shorter than prompt + output
INIT_RANGE = 0.3  # large init -> greedy top-1/top-2 margins far from ties

SEED = {kind: 1000 + i for i, kind in enumerate(ALL_KINDS)}

# Extra kinds for the tensor-parallel tests (tests/test_tensor_parallel.py), deliberately not in
# ALL_KINDS (the other suites' parametrisations stay as they are). Llama layout with head layouts
# that tp_degree 2 and 4 split in different ways (vocab 386 does not divide by 4: the lm_head's
# vocab split is uneven at tp 4):
#   llama_8q4kv  8 query / 4 kv heads, hidden 64 (head_dim 8), intermediate 128: tp 2 and 4
#                divide every head count and the MLP.
#   llama_8q2kv  8 query / 2 kv heads, same sizes: at tp 4 there are fewer kv heads than ranks,
#                so each kv head is replicated on the two ranks whose query heads use it.
#   llama_mqa    4 query / 1 kv head (multi-query), hidden 64, intermediate 128: the one kv head
#                is replicated on every rank at tp 2 and 4.
#   llama_wide   4 / 2 heads, hidden 64, intermediate 1024: the layers hold ~17x the embedding's
#                bytes, so sharding them shows in the per-rank weight bytes although the
#                embedding is replicated (the byte arithmetic is in test_tensor_parallel.py).
TP_KINDS = ["llama_8q4kv", "llama_8q2kv", "llama_mqa", "llama_wide"]
TP_SIZES = {
    # kind: (hidden, heads, kv_heads, intermediate)
    "llama_8q4kv": (64, 8, 4, 128),
    "llama_8q2kv": (64, 8, 2, 128),
    "llama_mqa": (64, 4, 1, 128),
    "llama_wide": (64, 4, 2, 1024),
}
SEED.update({kind: 2000 + i for i, kind in enumerate(TP_KINDS)})


def _load_tokenizer_into(out_dir: Path, tokenizer_dir: str | os.PathLike | None):
    from transformers import AutoTokenizer

    if tokenizer_dir is None:
        from tiny_tokenizer import build_tokenizer

        build_tokenizer(str(out_dir))
        tok = AutoTokenizer.from_pretrained(str(out_dir))
    else:
        tok = AutoTokenizer.from_pretrained(str(tokenizer_dir))
        tok.save_pretrained(str(out_dir))
    return tok


def make_config(kind: str, tok):
    """The transformers config for `kind` (5.x spelling)."""
    from transformers import LlamaConfig, MistralConfig, Qwen2Config, Qwen3Config

    common = dict(
        vocab_size=len(tok),
        hidden_size=HIDDEN,
        intermediate_size=INTERMEDIATE,
        num_hidden_layers=LAYERS,
        num_attention_heads=HEADS,
        num_key_value_heads=KV_HEADS,
        max_position_embeddings=MAX_POS,
        initializer_range=INIT_RANGE,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
        tie_word_embeddings=False,
    )
    if kind == "llama":
        return LlamaConfig(**common, rope_parameters={"rope_type": "default", "rope_theta": 10000.0})
    if kind == "llama_tied":
        common["tie_word_embeddings"] = True
        common["num_hidden_layers"] = 3
        return LlamaConfig(**common, rope_parameters={"rope_type": "default", "rope_theta": 500000.0})
    if kind == "llama3_rope":
        return LlamaConfig(
            **common,
            rope_parameters={
                "rope_type": "llama3",
                "rope_theta": 10000.0,
                "factor": 8.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 64,
            },
        )
    if kind == "llama_linear_rope":
        return LlamaConfig(
            **common, rope_parameters={"rope_type": "linear", "rope_theta": 10000.0, "factor": 2.0}
        )
    if kind == "llama_dynamic_rope":
        common["max_position_embeddings"] = DYNAMIC_MAX_POS
        return LlamaConfig(
            **common, rope_parameters={"rope_type": "dynamic", "rope_theta": 10000.0, "factor": 2.0}
        )
    if kind == "mistral":
        return MistralConfig(
            **common,
            sliding_window=SLIDING_WINDOW,
            rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
        )
    if kind == "qwen2":
        # Qwen2 always has q/k/v biases (o_proj none); no sliding window by default.
        return Qwen2Config(**common, rope_parameters={"rope_type": "default", "rope_theta": 1000000.0})
    if kind == "qwen3":
        # explicit head_dim != hidden / heads (64 / 4 = 16), q/k RMSNorm; also attention_bias on.
        return Qwen3Config(
            **common,
            head_dim=32,
            attention_bias=True,
            rope_parameters={"rope_type": "default", "rope_theta": 1000000.0},
        )
    if kind in TP_SIZES:
        hidden, heads, kv_heads, intermediate = TP_SIZES[kind]
        common.update(
            hidden_size=hidden,
            num_attention_heads=heads,
            num_key_value_heads=kv_heads,
            intermediate_size=intermediate,
        )
        return LlamaConfig(**common, rope_parameters={"rope_type": "default", "rope_theta": 10000.0})
    raise ValueError(f"unknown kind {kind!r}")


MODEL_CLASS = {
    "llama": "LlamaForCausalLM",
    "llama_tied": "LlamaForCausalLM",
    "llama3_rope": "LlamaForCausalLM",
    "llama_linear_rope": "LlamaForCausalLM",
    "llama_dynamic_rope": "LlamaForCausalLM",
    "mistral": "MistralForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "qwen3": "Qwen3ForCausalLM",
}
MODEL_CLASS.update({kind: "LlamaForCausalLM" for kind in TP_KINDS})


def _randomize_1d_params(model, gen: torch.Generator):
    """Biases -> N(0, 0.2); norm weights -> U(0.5, 1.5). HF inits them to 0 / 1."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() != 1:
                continue
            if name.endswith("bias"):
                p.copy_(torch.randn(p.shape, generator=gen) * 0.2)
            else:
                p.copy_(torch.rand(p.shape, generator=gen) + 0.5)


def _rewrite_rope_to_legacy(out_dir: Path):
    """Rewrite config.json's 5.x `rope_parameters` into the 4.x/hub spelling
    (`rope_theta` top-level + `rope_scaling`)."""
    path = out_dir / "config.json"
    cfg = json.loads(path.read_text())
    rp = dict(cfg.pop("rope_parameters"))
    cfg["rope_theta"] = rp.pop("rope_theta")
    cfg["rope_scaling"] = rp
    path.write_text(json.dumps(cfg, indent=2))


def _verify_reload(out_dir: Path, kind: str):
    """The saved config must reload in transformers with the intended RoPE/attention variant."""
    from transformers import AutoConfig

    cfg = AutoConfig.from_pretrained(str(out_dir))
    assert cfg.architectures == [MODEL_CLASS[kind]], cfg.architectures
    rp = cfg.rope_parameters
    expected = {
        "llama3_rope": "llama3",
        "llama_linear_rope": "linear",
        "llama_dynamic_rope": "dynamic",
    }.get(kind, "default")
    assert rp["rope_type"] == expected, (kind, rp)
    if kind == "llama3_rope":
        assert rp["factor"] == 8.0 and rp["original_max_position_embeddings"] == 64, rp
    if kind == "mistral":
        assert cfg.sliding_window == SLIDING_WINDOW
    if kind == "qwen3":
        assert cfg.head_dim == 32
    if kind == "llama_tied":
        assert cfg.tie_word_embeddings is True
    if kind in TP_SIZES:
        got = (cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.intermediate_size)
        assert got == TP_SIZES[kind], (kind, got)
        assert cfg.head_dim == cfg.hidden_size // cfg.num_attention_heads and cfg.tie_word_embeddings is False


def build_model(
    out_dir,
    kind: str,
    dtype: str = "float32",
    max_shard_size: str | None = None,
    tokenizer_dir=None,
    **config_overrides,
):
    """Build the tiny `kind` model into `out_dir` (weights identical for every dtype / sharding of
    the same kind: same seed). `config_overrides` go into the config (e.g. vocab_size, to open a
    gap between the embedding and the tokenizer). Returns `out_dir` as a Path."""
    from transformers import AutoModelForCausalLM, GenerationConfig

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tok = _load_tokenizer_into(out_dir, tokenizer_dir)
    config = make_config(kind, tok)
    for key, value in config_overrides.items():
        setattr(config, key, value)
    config.architectures = [MODEL_CLASS[kind]]

    torch.manual_seed(SEED[kind])
    model = AutoModelForCausalLM.from_config(config, attn_implementation="eager", dtype=torch.float32)
    gen = torch.Generator().manual_seed(SEED[kind] + 7)
    _randomize_1d_params(model, gen)
    if config.tie_word_embeddings:
        assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    model.eval()
    model.generation_config = GenerationConfig(
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    if dtype != "float32":
        model.to(getattr(torch, dtype))
    kwargs = {}
    if max_shard_size is not None:
        kwargs["max_shard_size"] = max_shard_size
    model.save_pretrained(str(out_dir), safe_serialization=True, **kwargs)
    if max_shard_size is not None:
        assert (out_dir / "model.safetensors.index.json").exists(), os.listdir(out_dir)
    if kind == "llama3_rope":
        _rewrite_rope_to_legacy(out_dir)
    _verify_reload(out_dir, kind)
    return out_dir


# -- transformers reference helpers -------------------------------------------------------------


def gemma_config(kind: str, tok, window: int = 6, **overrides):
    """A tiny Gemma 3 text / Gemma 2 config: one sliding and one full layer, random-enough scales."""
    common = dict(
        vocab_size=len(tok),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        max_position_embeddings=256,
        initializer_range=INIT_RANGE,
        rms_norm_eps=1e-6,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
        sliding_window=window,
        layer_types=["sliding_attention", "full_attention"],
        query_pre_attn_scalar=24,
        tie_word_embeddings=True,
    )
    common.update(overrides)
    if kind == "gemma3":
        from transformers import Gemma3TextConfig

        return Gemma3TextConfig(
            **common,
            rope_parameters={
                "full_attention": {"rope_type": "linear", "factor": 4.0, "rope_theta": 100000.0},
                "sliding_attention": {"rope_type": "default", "rope_theta": 1000.0},
            },
        )
    from transformers import Gemma2Config

    return Gemma2Config(**common, attn_logit_softcapping=2.0, final_logit_softcapping=5.0)


# Gemma3Config's own fields (the rest of a "gemma3_vlm" build's overrides go to its text_config).
GEMMA3_VLM_FIELDS = ("image_token_index", "boi_token_index", "eoi_token_index", "mm_tokens_per_image")


def gemma3_vlm_config(tok, window: int = 6, **overrides):
    """A tiny Gemma3ForConditionalGeneration config: the "gemma3" text config plus a one-layer
    SigLIP vision tower (28x28 images, 2x2 patches pooled to mm_tokens_per_image = 4)."""
    from transformers import Gemma3Config, SiglipVisionConfig

    top = {k: overrides.pop(k) for k in GEMMA3_VLM_FIELDS if k in overrides}
    top.setdefault("mm_tokens_per_image", 4)
    vision = SiglipVisionConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, image_size=28, patch_size=14
    )
    text = gemma_config("gemma3", tok, window=window, **overrides)
    return Gemma3Config(text_config=text, vision_config=vision, **top)


def build_gemma(out: Path, kind: str, window: int = 6, dtype=torch.float32, tokenizer_dir=None, **overrides) -> Path:
    """Saves a random Gemma ("gemma3" = Gemma3ForCausalLM, "gemma2", "gemma3_vlm" =
    Gemma3ForConditionalGeneration) with the test tokenizer into `out`.

    `overrides` go into the config (e.g. vocab_size to open a gap between embedding and tokenizer;
    for "gemma3_vlm", GEMMA3_VLM_FIELDS go to the top level and the rest to text_config)."""
    from transformers import AutoModelForCausalLM, GenerationConfig

    tok = _load_tokenizer_into(out, tokenizer_dir)
    if kind == "gemma3_vlm":
        from transformers import Gemma3ForConditionalGeneration

        cfg = gemma3_vlm_config(tok, window=window, **overrides)
        cfg.architectures = ["Gemma3ForConditionalGeneration"]
        torch.manual_seed(4444)
        model = Gemma3ForConditionalGeneration._from_config(cfg, attn_implementation="eager", dtype=torch.float32)
    else:
        cfg = gemma_config(kind, tok, window=window, **overrides)
        cfg.architectures = ["Gemma3ForCausalLM" if kind == "gemma3" else "Gemma2ForCausalLM"]
        torch.manual_seed(4242 if kind == "gemma3" else 4343)
        model = AutoModelForCausalLM.from_config(cfg, attn_implementation="eager", dtype=torch.float32)
    _randomize_1d_params(model, torch.Generator().manual_seed(7))
    model.eval()
    model.generation_config = GenerationConfig(
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id
    )
    model.to(dtype).save_pretrained(str(out), safe_serialization=True)
    return out


def load_hf(model_dir, attn_implementation: str = "eager", dtype=torch.float32):
    """HF reference model: f32, eval mode. `eager` is the reference (plain softmax(QK^T)V math);
    `sdpa` agrees with it to ~1e-6 on these models."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(
        str(model_dir), dtype=dtype, attn_implementation=attn_implementation
    )
    model.eval()
    return model


def reset_rope_state(model):
    """Dynamic NTK RoPE in transformers keeps state across calls (the rotary module grows
    `inv_freq` and only resets when a later call starts below max_position_embeddings). Put it
    back to the freshly loaded state so every reference call is independent of earlier ones."""
    for module in model.modules():
        if hasattr(module, "original_inv_freq") and hasattr(module, "max_seq_len_cached"):
            module.register_buffer("inv_freq", module.original_inv_freq.clone(), persistent=False)
            module.max_seq_len_cached = module.original_max_seq_len


def position_ids_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """What transformers 5.x generate() uses: cumsum(mask) - 1, padded positions set to 0."""
    pos = attention_mask.long().cumsum(-1) - 1
    return pos.masked_fill(attention_mask == 0, 0)


@torch.no_grad()
def hf_forward_logits(model, input_ids, attention_mask=None) -> torch.Tensor:
    """Full-sequence forward logits as transformers computes them for a (left padded) batch."""
    reset_rope_state(model)
    input_ids = torch.as_tensor(input_ids)
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    attention_mask = torch.as_tensor(attention_mask)
    out = model(
        input_ids=input_ids,
        attention_mask=attention_mask,
        position_ids=position_ids_from_mask(attention_mask),
        use_cache=False,
    )
    return out.logits.float()


@torch.no_grad()
def hf_generate(model, *args, **kwargs):
    reset_rope_state(model)
    return model.generate(*args, **kwargs)


def to_torch(x) -> torch.Tensor:
    if isinstance(x, torch.Tensor):
        return x
    import numpy as np

    return torch.from_numpy(np.asarray(x))


def step_margins(logits_per_step) -> torch.Tensor:
    """(batch, steps) top-1 minus top-2 of each step's logits (HF `output_logits`)."""
    margins = []
    for lg in logits_per_step:
        top2 = torch.topk(lg.float(), 2, dim=-1).values
        margins.append(top2[:, 0] - top2[:, 1])
    return torch.stack(margins, dim=1)


def comparable_new_tokens(hf_out, threshold: float = 1e-4, prompt_len: int | None = None, eos_ids=()) -> list[int]:
    """For each row of an HF greedy `GenerateDecoderOnlyOutput` (with output_logits=True), how
    many new tokens can be compared exactly: all steps before the first whose top-1/top-2 margin
    is <= threshold (at that step either choice is a legitimate f32 result). Steps after a row
    emitted one of `eos_ids` (HF keeps feeding it pad tokens; its logits are meaningless and can
    tie exactly) are not near-ties. Returns the full step count for rows with no near-tie."""
    margins = step_margins(hf_out.logits)
    n_steps = margins.shape[1]
    eos_ids = set(int(e) for e in (eos_ids or ()))
    result = []
    for row in range(margins.shape[0]):
        n = n_steps
        for step in range(n_steps):
            if prompt_len is not None and step > 0 and eos_ids:
                if int(hf_out.sequences[row, prompt_len + step - 1]) in eos_ids:
                    break  # finished: the remaining positions are pad in both outputs
            if margins[row, step] <= threshold:
                n = step
                break
        result.append(n)
    return result


def eos_ids_of(model) -> list[int]:
    e = model.generation_config.eos_token_id
    return [] if e is None else ([e] if isinstance(e, int) else list(e))


def assert_sequences_match(
    kv_seq, hf_out, prompt_len: int, threshold: float = 1e-4, what: str = "", eos_ids=(), min_compared=None
) -> int:
    """kvgen's sequences must equal HF's exactly (shape and every token), except after a step
    where HF's own top-1/top-2 margin was a near-tie (then the rest of that row is not compared).
    Explains the first mismatch with HF's margins at that step.

    Returns how many new tokens were compared (summed over rows). `min_compared` (default: every
    new token of every row, i.e. no near-tie allowed) is the least that must be compared, so a
    test cannot pass by comparing nothing."""
    kv_seq = to_torch(kv_seq)
    hf_seq = hf_out.sequences
    n_ok = comparable_new_tokens(hf_out, threshold, prompt_len, eos_ids)
    compared = sum(n_ok)
    if min_compared is None:
        min_compared = hf_seq.shape[0] * len(hf_out.logits)
    assert len(hf_out.logits) > 0, f"{what}: HF generated no tokens"
    assert compared >= min_compared, (
        f"{what}: only {compared} new tokens comparable (per row {n_ok}) at margin threshold {threshold:.3g}, "
        f"at least {min_compared} required"
    )
    if all(n == len(hf_out.logits) for n in n_ok):
        if kv_seq.shape == hf_seq.shape and torch.equal(kv_seq.long(), hf_seq):
            return compared
    assert kv_seq.shape[0] == hf_seq.shape[0], f"{what}: batch {kv_seq.shape} vs HF {hf_seq.shape}"
    margins = step_margins(hf_out.logits)
    for row in range(hf_seq.shape[0]):
        end = prompt_len + n_ok[row]
        if n_ok[row] == len(hf_out.logits):
            end = max(hf_seq.shape[1], kv_seq.shape[1])
        a = kv_seq[row, :end].tolist()
        b = hf_seq[row, :end].tolist()
        if a != b:
            first = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
            step = first - prompt_len
            m = margins[row, step].item() if 0 <= step < margins.shape[1] else float("nan")
            raise AssertionError(
                f"{what}: row {row} differs from transformers at position {first} (new token {step}); "
                f"HF margin there {m:.3g} (compared {n_ok[row]} new tokens)\n kvgen: {a}\n HF:    {b}"
            )
    # all comparable prefixes matched; the shapes must still match when nothing was a near-tie
    if all(n == len(hf_out.logits) for n in n_ok):
        assert kv_seq.shape == hf_seq.shape, f"{what}: shape {tuple(kv_seq.shape)} vs HF {tuple(hf_seq.shape)}"
    return compared


def max_abs_diff_valid(kv_logits, hf_logits, attention_mask) -> float:
    """max |diff| over the non-pad positions."""
    kv = to_torch(kv_logits).float()
    hf = to_torch(hf_logits).float()
    assert kv.shape == hf.shape, f"logits shape {tuple(kv.shape)} vs HF {tuple(hf.shape)}"
    mask = torch.as_tensor(attention_mask).bool()
    return (kv - hf).abs()[mask].max().item()


def logits_scale(x) -> float:
    return to_torch(x).float().abs().max().item()


__all__ = [
    "ALL_KINDS",
    "TP_KINDS",
    "TP_SIZES",
    "PROMPTS",
    "LONG_TEXT",
    "build_model",
    "load_hf",
    "reset_rope_state",
    "position_ids_from_mask",
    "hf_forward_logits",
    "hf_generate",
    "to_torch",
    "step_margins",
    "comparable_new_tokens",
    "eos_ids_of",
    "assert_sequences_match",
    "max_abs_diff_valid",
    "logits_scale",
]
