"""Build a small, deterministic byte-level BPE tokenizer for tests.

`build_tokenizer(out_dir)` trains a byte-level BPE (base vocab 384 incl. `<pad>`, `<s>`, `</s>`)
on a fixed built-in English corpus, adds the special tokens `<|im_start|>` and `<|im_end|>`
(ids 384 and 385, so `len(tokenizer) == 386` while HF's `vocab_size == 384`), sets a ChatML chat
template, and saves it with transformers' `save_pretrained(out_dir)`.

Needs the Python `tokenizers` and `transformers` packages (test-time only).
"""

from __future__ import annotations

import os

BASE_VOCAB_SIZE = 384
SPECIAL_TOKENS = ["<pad>", "<s>", "</s>"]
CHAT_TOKENS = ["<|im_start|>", "<|im_end|>"]
# len(tokenizer) after build_tokenizer(): base vocab + the two chat tokens.
TOKENIZER_LEN = BASE_VOCAB_SIZE + len(CHAT_TOKENS)

CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n' }}"
    "{% endif %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

_SUBJECTS = [
    "The cat", "A dog", "My friend", "The old man", "A young girl", "The teacher", "Our team",
    "The small bird", "A farmer", "The doctor", "Every student", "The river", "The machine",
    "A little robot", "The quick brown fox",
]
_VERBS = [
    "walks to", "looks at", "talks about", "runs past", "thinks of", "writes about", "sings near",
    "waits for", "dreams of", "jumps over",
]
_OBJECTS = [
    "the park.", "the lazy dog.", "a red house.", "the green hills.", "the city at night.",
    "a long story.", "the morning sun.", "the blue sea.", "an open window.", "the warm kitchen.",
    "the tall trees.", "a quiet library.",
]
_EXTRA = [
    "Hello, world! How are you today?",
    "I am fine, thank you. And you?",
    "What is the capital of France? It is Paris.",
    "Numbers like 1, 2, 3, 42 and 2024 appear in text.",
    "She said: \"Let's go home now.\"",
    "The weather is nice; we should take a walk.",
    "Can you help me write a short poem about the sea?",
    "Once upon a time, there was a little village in the mountains.",
    "Python and Rust are programming languages.",
    "def hello():\n    print('hi')\n",
    "Tabs\tand  double  spaces   matter.",
    "Caf\u00e9, na\u00efve, r\u00e9sum\u00e9 \u2014 and \u00fcber are words with accents.",
    "Emoji test: \U0001F600 \U0001F680 \u2764\ufe0f.",
    "\u4f60\u597d\uff0c\u4e16\u754c\u3002",
    "The user asked a question and the assistant gave an answer.",
]


def corpus() -> list[str]:
    """A fixed English corpus of a few hundred sentences (deterministic order)."""
    lines = []
    i = 0
    for s in _SUBJECTS:
        for v in _VERBS:
            o = _OBJECTS[i % len(_OBJECTS)]
            lines.append(f"{s} {v} {o}")
            i += 1
    lines.extend(_EXTRA)
    return lines


def build_tokenizer(out_dir, add_bos_token: bool = False) -> None:
    """Train the tiny tokenizer and save it (tokenizer.json, tokenizer_config.json,
    chat_template.jinja) to `out_dir`.

    With `add_bos_token=True` the tokenizer.json post-processor prepends `<s>` when
    `add_special_tokens=True` (Llama-style); by default nothing is added (Qwen/SmolLM-style).
    The vocabulary is the same either way: `len(tokenizer) == TOKENIZER_LEN`.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    out_dir = os.fspath(out_dir)
    os.makedirs(out_dir, exist_ok=True)

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=BASE_VOCAB_SIZE,
        min_frequency=1,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    # The BPE trainer is deterministic for a fixed corpus in a single iterator.
    tok.train_from_iterator(corpus(), trainer=trainer)
    if add_bos_token:
        bos_id = tok.token_to_id("<s>")
        tok.post_processor = processors.TemplateProcessing(
            single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", bos_id)]
        )
    else:
        tok.post_processor = processors.ByteLevel(trim_offsets=False)

    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        additional_special_tokens=list(CHAT_TOKENS),
        model_max_length=2048,
    )
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(out_dir)


if __name__ == "__main__":  # pragma: no cover
    import sys

    d = sys.argv[1] if len(sys.argv) > 1 else "tiny_tok"
    build_tokenizer(d)
    from transformers import AutoTokenizer

    t = AutoTokenizer.from_pretrained(d)
    print(d, "len", len(t), "vocab_size", t.vocab_size)
