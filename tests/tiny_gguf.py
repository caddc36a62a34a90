"""Tiny random GGUF files for tests: every dequantized ggml type, llama (SentencePiece, permuted Q/K,
untied) and qwen2 (byte-level BPE with the qwen2 split, biases) layouts."""

import gguf
import numpy as np
from gguf import GGMLQuantizationType as Q

def _kquant_blocks(qtype, rows, cols, rng):
    block, size = gguf.GGML_QUANT_SIZES[qtype]
    nb = rows * cols // block
    raw = rng.integers(0, 256, size=(nb, size), dtype=np.uint8)
    offs, std = {Q.Q4_K: ([0, 2], 2e-4), Q.Q5_K: ([0, 2], 1e-4), Q.Q6_K: ([208], 2e-5)}[qtype]
    for off in offs:
        raw[:, off:off + 2] = (np.abs(rng.standard_normal(nb)) * std).astype(np.float16).view(np.uint8).reshape(nb, 2)
    return raw.reshape(rows, cols // block * size)

def _tensor(w, name, rows, cols, qtype, rng):
    if qtype in (Q.Q4_K, Q.Q5_K, Q.Q6_K):
        w.add_tensor(name, _kquant_blocks(qtype, rows, cols, rng), raw_dtype=qtype)
        return
    x = (rng.standard_normal((rows, cols)) * 0.05).astype(np.float32)
    if qtype == Q.F32:
        w.add_tensor(name, x)
    elif qtype == Q.F16:
        w.add_tensor(name, x.astype(np.float16))
    else:
        w.add_tensor(name, gguf.quants.quantize(x, qtype), raw_dtype=qtype)

LAYER_TYPES = [
    dict(attn_q=Q.Q4_K, attn_k=Q.Q5_K, attn_v=Q.Q6_K, attn_output=Q.Q4_0, ffn_gate=Q.Q5_0, ffn_up=Q.Q5_1, ffn_down=Q.Q4_1),
    dict(attn_q=Q.Q8_0, attn_k=Q.F16, attn_v=Q.BF16, attn_output=Q.F32, ffn_gate=Q.Q6_K, ffn_up=Q.Q4_K, ffn_down=Q.Q5_K),
]

def spm_vocab():
    pieces = ["\u2581", "\u2581t", "th", "\u2581th", "he", "\u2581the", "in", "\u2581a", "er", "an", "\u2581i", "on",
              "\u2581w", "re", "at", "\u2581s", "en", "\u2581o", "is", "or", "ll", "\u2581h", "\u2581he", "\u2581hello", "ello", "ell", "lo",
              "\u2581wor", "\u2581world", "ld", "rld", "\u2581c", "\u2581is", "\u2581in", "ing", "\u2581and", "nd", "\u2581an"]
    letters = list("etaoinshrdlcumwfgypbvkjxqz") + list("ETAOINSHRDLCUMWFGYPBVKJXQZ") + list(".,!?'0123456789")
    tokens = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)]
    types = [2, 3, 3] + [6] * 256
    scores = [0.0, 0.0, 0.0] + [0.0] * 256
    for i, p in enumerate(pieces + letters):
        tokens.append(p); types.append(1); scores.append(-float(i))
    return tokens, scores, types

def gpt2_vocab():
    from transformers.convert_slow_tokenizer import bytes_to_unicode
    alphabet = [bytes_to_unicode()[b] for b in range(256)]
    merges = ["\u0120 t", "h e", "\u0120t he", "i n", "\u0120 a", "e r", "a n", "\u0120 w", "o r", "l l", "\u0120 h", "e ll", "\u0120h ell", "\u0120hell o", "\u0120w or", "l d", "\u0120wor ld", "i s", "\u0120 is", "1 2"]
    tokens = list(alphabet)
    for m in merges:
        a, b = m.split(" ")
        if a + b not in tokens:
            tokens.append(a + b)
    tokens += ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    types = [1] * (len(tokens) - 3) + [3, 3, 3]
    return tokens, merges, types

def write_tiny(path, arch="llama", tokenizer="llama", seed=0, extra_rows=0):
    """hidden 256 (a K-quant block per row), 2 layers with different types, 4 heads / 2 kv heads.
    `extra_rows`: embedding (and output) rows past the token list, as Gemma 3's files have."""
    rng = np.random.default_rng(seed)
    hidden, inter, heads, kv, layers = 256, 512, 4, 2, 2
    w = gguf.GGUFWriter(path, arch)
    w.add_name(f"tiny-{arch}")
    w.add_block_count(layers); w.add_context_length(256); w.add_embedding_length(hidden)
    w.add_feed_forward_length(inter); w.add_head_count(heads); w.add_head_count_kv(kv)
    w.add_rope_freq_base(10000.0); w.add_layer_norm_rms_eps(1e-6)
    if arch == "llama":
        w.add_rope_dimension_count(hidden // heads)
    if tokenizer == "llama":
        tokens, scores, types = spm_vocab()
        w.add_tokenizer_model("llama"); w.add_token_list(tokens); w.add_token_scores(scores); w.add_token_types(types)
        w.add_bos_token_id(1); w.add_eos_token_id(2); w.add_unk_token_id(0)
    else:
        tokens, merges, types = gpt2_vocab()
        w.add_tokenizer_model("gpt2"); w.add_tokenizer_pre("qwen2"); w.add_token_list(tokens); w.add_token_merges(merges)
        w.add_token_types(types)
        eos = tokens.index("<|im_end|>")
        w.add_eos_token_id(eos); w.add_pad_token_id(tokens.index("<|endoftext|>")); w.add_bos_token_id(tokens.index("<|endoftext|>"))
        w.add_add_bos_token(False)
        w.add_chat_template("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
    vocab = len(tokens) + extra_rows
    _tensor(w, "token_embd.weight", vocab, hidden, Q.Q6_K if arch == "llama" else Q.Q8_0, rng)
    for i in range(layers):
        t = LAYER_TYPES[i]
        hd = hidden // heads
        shapes = dict(attn_q=(hidden, hidden), attn_k=(kv * hd, hidden), attn_v=(kv * hd, hidden),
                      attn_output=(hidden, hidden), ffn_gate=(inter, hidden), ffn_up=(inter, hidden), ffn_down=(hidden, inter))
        for n, (r, c) in shapes.items():
            _tensor(w, f"blk.{i}.{n}.weight", r, c, t[n], rng)
        if arch == "qwen2":
            for n, r in (("attn_q", hidden), ("attn_k", kv * hd), ("attn_v", kv * hd)):
                w.add_tensor(f"blk.{i}.{n}.bias", (rng.standard_normal(r) * 0.1).astype(np.float32))
        for n in ("attn_norm", "ffn_norm"):
            w.add_tensor(f"blk.{i}.{n}.weight", (1 + 0.1 * rng.standard_normal(hidden)).astype(np.float32))
    w.add_tensor("output_norm.weight", (1 + 0.1 * rng.standard_normal(hidden)).astype(np.float32))
    if arch == "llama":
        _tensor(w, "output.weight", vocab, hidden, Q.Q8_0, rng)
    w.write_header_to_file(); w.write_kv_data_to_file(); w.write_tensors_to_file(); w.close()
    return path



def gemma_spm_vocab():
    """Gemma's special-token layout (pad 0, eos 1, bos 2, unk 3, mask 4), byte fallback, control
    turn markers, and user-defined newline / multi-space tokens (stored as spaces, as llama.cpp does)."""
    tokens, scores, types = spm_vocab()
    tokens = ["<pad>", "<eos>", "<bos>", "<unk>", "<mask>", "<start_of_turn>", "<end_of_turn>", "\n", "\n\n", "  ", "   "] + tokens[3:]
    types = [3, 3, 3, 2, 3, 3, 3, 4, 4, 4, 4] + types[3:]
    scores = [0.0] * 11 + scores[3:]
    return tokens, scores, types


def write_tiny_gemma(path, arch="gemma3", seed=0):
    """A llama.cpp-shaped gemma2/gemma3 file: norms stored as 1 + w, q/k norms (gemma3), head_dim 256
    (transformers' query_pre_attn_scalar default, which it does not read from the file), 6 layers so
    Gemma 3's default pattern has a global layer, a sliding window of 4."""
    rng = np.random.default_rng(seed)
    hidden, inter, heads, kv, layers, hd = 256, 512, 2, 1, 6, 256
    w = gguf.GGUFWriter(path, arch)
    w.add_name(f"tiny-{arch}")
    w.add_block_count(layers); w.add_context_length(256); w.add_embedding_length(hidden)
    w.add_feed_forward_length(inter); w.add_head_count(heads); w.add_head_count_kv(kv)
    w.add_key_length(hd); w.add_value_length(hd); w.add_sliding_window(4)
    w.add_rope_freq_base(1e6 if arch == "gemma3" else 10000.0); w.add_layer_norm_rms_eps(1e-6)
    if arch == "gemma2":
        w.add_attn_logit_softcapping(50.0); w.add_final_logit_softcapping(30.0)
    tokens, scores, types = gemma_spm_vocab()
    w.add_tokenizer_model("llama"); w.add_tokenizer_pre("default")
    w.add_token_list(tokens); w.add_token_scores(scores); w.add_token_types(types)
    w.add_bos_token_id(2); w.add_eos_token_id(1); w.add_unk_token_id(3); w.add_pad_token_id(0)
    w.add_add_bos_token(True); w.add_add_eos_token(False); w.add_add_space_prefix(False)
    vocab = len(tokens)

    def norm(name, n):
        w.add_tensor(name, (1 + 0.3 * rng.standard_normal(n)).astype(np.float32))

    _tensor(w, "token_embd.weight", vocab, hidden, Q.Q8_0, rng)
    for i in range(layers):
        t = LAYER_TYPES[i % 2]
        shapes = dict(attn_q=(heads * hd, hidden), attn_k=(kv * hd, hidden), attn_v=(kv * hd, hidden),
                      attn_output=(hidden, heads * hd), ffn_gate=(inter, hidden), ffn_up=(inter, hidden),
                      ffn_down=(hidden, inter))
        for n, (r, c) in shapes.items():
            _tensor(w, f"blk.{i}.{n}.weight", r, c, t[n], rng)
        for n in ("attn_norm", "post_attention_norm", "ffn_norm", "post_ffw_norm"):
            norm(f"blk.{i}.{n}.weight", hidden)
        if arch == "gemma3":
            norm(f"blk.{i}.attn_q_norm.weight", hd)
            norm(f"blk.{i}.attn_k_norm.weight", hd)
    norm("output_norm.weight", hidden)
    w.write_header_to_file(); w.write_kv_data_to_file(); w.write_tensors_to_file(); w.close()
    return path
