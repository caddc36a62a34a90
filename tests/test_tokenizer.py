"""Parity of kvgen.tokenizer.Tokenizer with transformers' fast tokenizer on the tiny tokenizer."""

from __future__ import annotations

import json
import os
import random
import shutil

import numpy as np
import pytest

transformers = pytest.importorskip("transformers")
from transformers import AutoTokenizer  # noqa: E402

import kvgen  # noqa: E402
from kvgen.tokenizer import Tokenizer  # noqa: E402
from tiny_tokenizer import TOKENIZER_LEN, build_tokenizer  # noqa: E402

TEXTS = [
    "Hello, world! How are you today?",
    "The quick brown fox jumps over the lazy dog.",
    "",
    " ",
    "   leading and trailing spaces   ",
    "tabs\tand\nnewlines\r\nand\n\n\nblank lines",
    "Caf\u00e9 na\u00efve r\u00e9sum\u00e9 \u00fcber \u00c5ngstr\u00f6m",
    "Emoji: \U0001F600\U0001F680 \u2764\ufe0f \U0001F468\u200d\U0001F469\u200d\U0001F467 flags \U0001F1EB\U0001F1F7",
    "\u4f60\u597d\uff0c\u4e16\u754c\u3002\u3053\u3093\u306b\u3061\u306f \uc548\ub155\ud558\uc138\uc694 \u0645\u0631\u062d\u0628\u0627",
    "combining: e\u0301 a\u0308 n\u0303",
    "Numbers 0 1 12 123 1234 3.14159 -42 1e10",
    "<s>already has bos</s>",
    "<|im_start|>user\nhi there<|im_end|>\n<|im_start|>assistant\n",
    "special<pad>inside<pad><pad>text",
    "partial <|im_ and <|im_start| and <s and </s",
    "<|im_end|><|im_end|>",
    "def f(x):\n    return x ** 2  # comment\n",
    "Hello" * 50,
    "a b c d e f g h i j k l m n o p q r s t u v w x y z",
    "don't won't it's we're I'm you've",
    "\u00a0non-breaking\u2003em space\u200bzero width",
]

MESSAGES = [
    [{"role": "user", "content": "Hello!"}],
    [
        {"role": "system", "content": "You are a pirate."},
        {"role": "user", "content": "Where is the treasure?"},
        {"role": "assistant", "content": "Arr, \u00e0 l'\u00eele \U0001F3F4\u200d\u2620\ufe0f!"},
        {"role": "user", "content": "  spaces  and\nnewlines\n"},
    ],
    [
        {"role": "user", "content": "What is 2+2?"},
        {"role": "assistant", "content": "4"},
        {"role": "user", "content": "And <|im_end|> inside text?"},
    ],
]


@pytest.fixture(scope="session")
def tok_dirs(tmp_path_factory):
    plain = tmp_path_factory.mktemp("tiny_tok")
    build_tokenizer(plain)
    bos = tmp_path_factory.mktemp("tiny_tok_bos")
    build_tokenizer(bos, add_bos_token=True)
    return {"plain": str(plain), "bos": str(bos)}


@pytest.fixture(scope="session", params=["plain", "bos"])
def pair(request, tok_dirs):
    d = tok_dirs[request.param]
    return Tokenizer.from_pretrained(d), AutoTokenizer.from_pretrained(d)


@pytest.fixture()
def fresh(tok_dirs):
    """A fresh pair (for tests that mutate pad_token / padding_side)."""
    d = tok_dirs["plain"]
    return Tokenizer.from_pretrained(d), AutoTokenizer.from_pretrained(d)


def test_sizes_and_special_tokens(pair):
    kv, hf = pair
    assert len(kv) == len(hf) == TOKENIZER_LEN
    assert kv.vocab_size == hf.vocab_size
    for name in ("bos", "eos", "pad", "unk"):
        assert getattr(kv, f"{name}_token") == getattr(hf, f"{name}_token"), name
        assert getattr(kv, f"{name}_token_id") == getattr(hf, f"{name}_token_id"), name
    assert kv.eos_token_id == 2 and kv.pad_token_id == 0 and kv.bos_token_id == 1
    assert kv.all_special_ids == hf.all_special_ids
    assert kv.all_special_tokens == hf.all_special_tokens
    assert kv.special_tokens_map == hf.special_tokens_map
    assert kv.padding_side == hf.padding_side == "right"
    assert kv.model_max_length == hf.model_max_length
    assert kv.chat_template == hf.chat_template
    assert kv.get_vocab() == hf.get_vocab()


def test_encode_parity(pair):
    kv, hf = pair
    for text in TEXTS:
        for add in (True, False):
            assert kv.encode(text, add_special_tokens=add) == hf.encode(text, add_special_tokens=add), (text, add)
        assert kv.tokenize(text) == hf.tokenize(text), text


def test_encode_random_corpus(pair):
    kv, hf = pair
    rng = random.Random(0)
    alphabet = "abcdefghijklmnopqrstuvwxyz ABCXYZ.,!?'\n\t0123456789\u00e9\u00fc\u4e16\U0001F600<>|/_"
    pieces = ["<s>", "</s>", "<pad>", "<|im_start|>", "<|im_end|>"]
    texts = []
    for _ in range(200):
        s = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 40)))
        if rng.random() < 0.3:
            i = rng.randint(0, len(s))
            s = s[:i] + rng.choice(pieces) + s[i:]
        texts.append(s)
    for s in texts:
        assert kv.encode(s) == hf.encode(s), s
    assert kv(texts)["input_ids"] == hf(texts)["input_ids"]


def test_decode_parity(pair):
    kv, hf = pair
    for text in TEXTS:
        ids = hf.encode(text)
        for skip in (False, True):
            assert kv.decode(ids, skip_special_tokens=skip) == hf.decode(ids, skip_special_tokens=skip), (text, skip)
    rng = random.Random(1)
    for _ in range(100):
        ids = [rng.randrange(len(hf)) for _ in range(rng.randint(0, 30))]
        for skip in (False, True):
            assert kv.decode(ids, skip_special_tokens=skip) == hf.decode(ids, skip_special_tokens=skip), ids


def test_decode_input_kinds(pair):
    torch = pytest.importorskip("torch")
    kv, hf = pair
    ids = hf.encode("<|im_start|>user\nHello there, friend!<|im_end|>")
    want = hf.decode(ids)
    assert kv.decode(ids) == want
    assert kv.decode(tuple(ids)) == want
    assert kv.decode(np.array(ids, dtype=np.int64)) == want
    assert kv.decode(np.array(ids, dtype=np.int32)) == want
    assert kv.decode(torch.tensor(ids)) == want
    assert kv.decode(ids[3]) == hf.decode(ids[3])
    assert kv.decode(np.int64(ids[3])) == hf.decode(np.int64(ids[3]))
    batch = [ids, ids[:4]]
    assert kv.decode(batch) == hf.decode(batch)
    assert kv.batch_decode(batch, skip_special_tokens=True) == hf.batch_decode(batch, skip_special_tokens=True)
    padded = hf(["hello", "hello there my friend"], padding=True, return_tensors="pt")["input_ids"]
    assert kv.batch_decode(padded) == hf.batch_decode(padded)
    assert kv.batch_decode(padded, skip_special_tokens=True) == hf.batch_decode(padded, skip_special_tokens=True)
    assert kv.batch_decode(padded.numpy()) == hf.batch_decode(padded.numpy())


def test_convert_tokens(pair):
    kv, hf = pair
    ids = hf.encode("<|im_start|>Hello, w\u00f6rld \U0001F600<|im_end|>")
    assert kv.convert_ids_to_tokens(ids) == hf.convert_ids_to_tokens(ids)
    assert kv.convert_ids_to_tokens(ids, skip_special_tokens=True) == hf.convert_ids_to_tokens(
        ids, skip_special_tokens=True
    )
    assert kv.convert_ids_to_tokens(ids[1]) == hf.convert_ids_to_tokens(ids[1])
    toks = hf.convert_ids_to_tokens(ids)
    assert kv.convert_tokens_to_ids(toks) == hf.convert_tokens_to_ids(toks)
    assert kv.convert_tokens_to_ids("<|im_end|>") == hf.convert_tokens_to_ids("<|im_end|>") == 385
    assert kv.convert_tokens_to_ids("not-a-token-xyz") == hf.convert_tokens_to_ids("not-a-token-xyz")


BATCH = ["Hello, world!", "A much longer sentence about the quick brown fox and the dog.", "", "\U0001F600 hi"]


def _assert_same(kv_out, hf_out, kind):
    assert set(kv_out.keys()) == set(hf_out.keys())
    for k in hf_out:
        a, b = kv_out[k], hf_out[k]
        if kind is None:
            assert a == b, k
        elif kind == "np":
            assert isinstance(a, np.ndarray) and a.dtype == np.int64 and b.dtype == a.dtype, k
            np.testing.assert_array_equal(a, b)
        else:
            import torch

            assert isinstance(a, torch.Tensor) and a.dtype == torch.int64 == b.dtype, k
            assert torch.equal(a, b), k


@pytest.mark.parametrize("return_tensors", [None, "np", "pt"])
@pytest.mark.parametrize("side", ["left", "right"])
def test_batch_call_padding(pair, return_tensors, side):
    if return_tensors == "pt":
        pytest.importorskip("torch")
    kv, hf = pair
    for padding in (True, "longest"):
        a = kv(BATCH, padding=padding, padding_side=side, return_tensors=return_tensors)
        b = hf(BATCH, padding=padding, padding_side=side, return_tensors=return_tensors)
        _assert_same(a, b, return_tensors)
        assert a.input_ids is a["input_ids"] and a.attention_mask is a["attention_mask"]
    a = kv(BATCH, padding="max_length", max_length=40, padding_side=side, return_tensors=return_tensors)
    b = hf(BATCH, padding="max_length", max_length=40, padding_side=side, return_tensors=return_tensors)
    _assert_same(a, b, return_tensors)
    a = kv(BATCH, padding=True, pad_to_multiple_of=8, padding_side=side, return_tensors=return_tensors)
    b = hf(BATCH, padding=True, pad_to_multiple_of=8, padding_side=side, return_tensors=return_tensors)
    _assert_same(a, b, return_tensors)


@pytest.mark.parametrize("return_tensors", [None, "np", "pt"])
def test_single_and_unpadded_call(pair, return_tensors):
    if return_tensors == "pt":
        pytest.importorskip("torch")
    kv, hf = pair
    for text in ("Hello there!", ""):
        _assert_same(kv(text, return_tensors=return_tensors), hf(text, return_tensors=return_tensors), return_tensors)
        _assert_same(
            kv(text, add_special_tokens=False, return_tensors=return_tensors),
            hf(text, add_special_tokens=False, return_tensors=return_tensors),
            return_tensors,
        )
    if return_tensors is None:
        _assert_same(kv(BATCH), hf(BATCH), None)
        _assert_same(kv(BATCH, return_attention_mask=False), hf(BATCH, return_attention_mask=False), None)
    else:
        with pytest.raises(ValueError, match="different lengths"):
            kv(BATCH, return_tensors=return_tensors)
        same_len = ["hello there", "hello there"]
        _assert_same(
            kv(same_len, return_tensors=return_tensors), hf(same_len, return_tensors=return_tensors), return_tensors
        )


@pytest.mark.parametrize("side", ["left", "right"])
def test_truncation(pair, side):
    kv, hf = pair
    kv.truncation_side = side
    hf.truncation_side = side
    try:
        for n in (1, 3, 7, 100):
            a = kv(BATCH, truncation=True, max_length=n, padding=True)
            b = hf(BATCH, truncation=True, max_length=n, padding=True)
            _assert_same(a, b, None)
            assert kv.encode(TEXTS[0], truncation=True, max_length=n) == hf.encode(
                TEXTS[0], truncation=True, max_length=n
            )
    finally:
        kv.truncation_side = "right"
        hf.truncation_side = "right"


def test_padding_side_attribute_and_pad_token_setter(fresh):
    kv, hf = fresh
    kv.padding_side = "left"
    hf.padding_side = "left"
    _assert_same(kv(BATCH, padding=True), hf(BATCH, padding=True), None)
    with pytest.raises(ValueError, match="padding_side must be 'left' or 'right', got 'middle'"):
        kv.padding_side = "middle"
    # the usual `tok.pad_token = tok.eos_token`
    kv.pad_token = kv.eos_token
    hf.pad_token = hf.eos_token
    assert kv.pad_token == hf.pad_token == "</s>"
    assert kv.pad_token_id == hf.pad_token_id == 2
    _assert_same(kv(BATCH, padding=True), hf(BATCH, padding=True), None)
    assert kv.all_special_ids == hf.all_special_ids
    kv.pad_token_id = 0
    assert kv.pad_token == "<pad>" and kv.pad_token_id == 0


def test_pad_without_pad_token_raises(fresh):
    kv, _ = fresh
    kv.pad_token = None
    assert kv.pad_token_id is None
    with pytest.raises(ValueError, match="pad"):
        kv(BATCH, padding=True)
    kv(["same", "same"], padding=True)  # nothing to pad: fine


@pytest.mark.parametrize("add_generation_prompt", [False, True])
def test_chat_template_parity(pair, add_generation_prompt):
    kv, hf = pair
    for msgs in MESSAGES:
        text = kv.apply_chat_template(msgs, tokenize=False, add_generation_prompt=add_generation_prompt)
        assert text == hf.apply_chat_template(msgs, tokenize=False, add_generation_prompt=add_generation_prompt)
        a = kv.apply_chat_template(msgs, add_generation_prompt=add_generation_prompt)
        b = hf.apply_chat_template(msgs, add_generation_prompt=add_generation_prompt)
        _assert_same(a, b, None)
        # tokenize=True encodes without adding special tokens again
        assert a["input_ids"] == kv.encode(text, add_special_tokens=False)
        ids = kv.apply_chat_template(msgs, add_generation_prompt=add_generation_prompt, return_dict=False)
        assert ids == hf.apply_chat_template(msgs, add_generation_prompt=add_generation_prompt, return_dict=False)


def test_chat_template_tensors_and_batch(pair):
    pytest.importorskip("torch")
    kv, hf = pair
    a = kv.apply_chat_template(MESSAGES[1], add_generation_prompt=True, return_tensors="pt")
    b = hf.apply_chat_template(MESSAGES[1], add_generation_prompt=True, return_tensors="pt")
    _assert_same(a, b, "pt")
    a = kv.apply_chat_template(MESSAGES, add_generation_prompt=True, padding=True, return_tensors="np")
    b = hf.apply_chat_template(MESSAGES, add_generation_prompt=True, padding=True, return_tensors="np")
    _assert_same(a, b, "np")
    assert kv.apply_chat_template(MESSAGES, tokenize=False) == hf.apply_chat_template(MESSAGES, tokenize=False)


def test_continue_final_message(pair):
    kv, hf = pair
    msgs = [{"role": "user", "content": "Say hi"}, {"role": "assistant", "content": "Hi, I am"}]
    a = kv.apply_chat_template(msgs, tokenize=False, continue_final_message=True)
    assert a == hf.apply_chat_template(msgs, tokenize=False, continue_final_message=True)
    assert a.endswith("Hi, I am")
    with pytest.raises(ValueError, match="continue_final_message and add_generation_prompt are not compatible"):
        kv.apply_chat_template(msgs, continue_final_message=True, add_generation_prompt=True)


FANCY_TEMPLATE = (
    "{%- set ns = namespace(n=0, sys='') -%}\n"
    "{%- if messages[0]['role'] == 'system' %}{% set ns.sys = messages[0]['content'] | trim %}{% endif -%}\n"
    "{{ bos_token }}{% if ns.sys %}[SYS]{{ ns.sys }}[/SYS]\n{% endif %}"
    "{%- if tools %}TOOLS: {{ tools | tojson }}\nINDENTED: {{ tools[0] | tojson(indent=2) }}\n{% endif -%}\n"
    "{% for message in messages %}\n"
    "    {% if message.role == 'system' %}{% continue %}{% endif %}\n"
    "    {% if message['role'] not in ['user', 'assistant'] %}{{ raise_exception('bad role: ' + message['role']) }}{% endif %}\n"
    "    {% set ns.n = ns.n + 1 %}\n"
    "    <{{ loop.index0 }}|{{ message['role'] | upper }}|{{ ns.n }}> {{ message['content'].strip() }}"
    "{% if message.meta is defined %} meta={{ message.meta | tojson }}{% endif %}"
    "{% if not loop.last %}\n{% endif %}\n"
    "{% endfor %}\n"
    "{% if add_generation_prompt %}\n<ASSISTANT>{% endif %}"
    "{{ ' flag=' ~ flag if flag is defined }}{{ ' ' ~ eos_token if close }}"
)


def test_chat_template_features(pair):
    kv, hf = pair
    msgs = [
        {"role": "system", "content": "  Be brief.  "},
        {"role": "user", "content": " Hi \u00e9\u00e8 \U0001F600 "},
        {"role": "assistant", "content": "Hello", "meta": {"b": 1, "a": [1.5, None, True, "x\"y"], "z": "\u00fc"}},
        {"role": "user", "content": "Bye", "tool_calls": None},
    ]
    tools = [
        {
            "type": "function",
            "function": {"name": "get_weather", "description": "Weather in <city> & \"more\"",
                         "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}},
        }
    ]
    for kwargs in (
        {},
        {"add_generation_prompt": True},
        {"tools": tools},
        {"flag": False, "close": True},
        {"flag": None},
    ):
        a = kv.apply_chat_template(msgs, chat_template=FANCY_TEMPLATE, tokenize=False, **kwargs)
        b = hf.apply_chat_template(msgs, chat_template=FANCY_TEMPLATE, tokenize=False, **kwargs)
        assert a == b, kwargs
    bad = [{"role": "robot", "content": "beep"}]
    with pytest.raises(ValueError, match="bad role: robot") as info:
        kv.apply_chat_template(bad, chat_template=FANCY_TEMPLATE, tokenize=False)
    assert isinstance(info.value, kvgen.KvgenError), type(info.value)


def test_chat_template_from_config_list(tok_dirs, tmp_path):
    """chat_template as a list of {name, template} in tokenizer_config.json (no .jinja file)."""
    d = tmp_path / "multi"
    shutil.copytree(tok_dirs["plain"], d)
    default = open(d / "chat_template.jinja").read()
    os.remove(d / "chat_template.jinja")
    cfg = json.load(open(d / "tokenizer_config.json"))
    cfg["chat_template"] = [
        {"name": "default", "template": default},
        {"name": "tool_use", "template": "TOOLS{{ tools | length if tools else 0 }}{% for m in messages %}|{{ m.content }}{% endfor %}"},
    ]
    cfg["padding_side"] = "left"
    cfg["bos_token"] = {"__type": "AddedToken", "content": "<s>", "lstrip": False, "normalized": False, "rstrip": False,
                        "single_word": False, "special": True}
    json.dump(cfg, open(d / "tokenizer_config.json", "w"))
    kv, hf = Tokenizer.from_pretrained(d), AutoTokenizer.from_pretrained(d)
    assert kv.padding_side == hf.padding_side == "left"
    assert kv.bos_token == hf.bos_token == "<s>"
    assert kv.chat_template == hf.chat_template
    msgs = MESSAGES[1]
    assert kv.apply_chat_template(msgs, tokenize=False) == hf.apply_chat_template(msgs, tokenize=False)
    tools = [{"type": "function", "function": {"name": "f"}}]
    assert kv.apply_chat_template(msgs, tools=tools, tokenize=False) == hf.apply_chat_template(
        msgs, tools=tools, tokenize=False
    )
    assert kv.apply_chat_template(msgs, chat_template="tool_use", tokenize=False) == hf.apply_chat_template(
        msgs, chat_template="tool_use", tokenize=False
    )
    _assert_same(kv(BATCH, padding=True), hf(BATCH, padding=True), None)


def test_no_chat_template_raises(tok_dirs, tmp_path):
    d = tmp_path / "nochat"
    shutil.copytree(tok_dirs["plain"], d)
    os.remove(d / "chat_template.jinja")
    kv = Tokenizer.from_pretrained(d)
    assert kv.chat_template is None
    with pytest.raises(ValueError, match="chat_template"):
        kv.apply_chat_template(MESSAGES[0])


def test_missing_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="tokenizer.json"):
        Tokenizer.from_pretrained(tmp_path)
    with pytest.raises(FileNotFoundError):
        Tokenizer.from_pretrained(tmp_path / "does-not-exist")
    (tmp_path / "tokenizer.json").write_text("{not json")
    with pytest.raises(ValueError, match="tokenizer.json: cannot load tokenizer") as info:
        Tokenizer.from_pretrained(tmp_path)
    assert isinstance(info.value, kvgen.KvgenError), type(info.value)


def test_bad_ids_raise(pair):
    kv, _ = pair
    with pytest.raises((ValueError, OverflowError), match="-5"):
        kv.decode([1, -5])
    with pytest.raises(TypeError, match="integers"):
        kv.decode(["a"])


def test_batch_encoding_behaves_like_dict(pair):
    kv, _ = pair
    enc = kv(["a", "bb"], padding=True)
    assert isinstance(enc, dict)
    assert dict(enc) == {"input_ids": enc.input_ids, "attention_mask": enc.attention_mask}
    with pytest.raises(AttributeError):
        enc.nope
    import pickle

    assert pickle.loads(pickle.dumps(enc)) == enc


def test_ids_beyond_the_tokenizer_decode_to_empty_with_one_warning(tokenizer_dir):
    """A model's embedding may have more rows than its tokenizer has ids (Gemma 3: 262,208 vs
    262,144); a sampled id past the tokenizer decodes to "" with one warning, never a crash."""
    import warnings

    import kvgen

    tok = kvgen.Tokenizer.from_pretrained(tokenizer_dir)
    n = len(tok)
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        assert tok.decode([n + 3]) == ""
        assert tok.decode([5, n, 6]) == tok.decode([5, 6])
        assert tok.batch_decode([[n + 1], [5]]) == ["", tok.decode([5])]
    assert len([w for w in seen if "has no token in the tokenizer" in str(w.message)]) == 1
