"""`python -m kvgen generate|chat` on a fixture model: the chat template is applied and the text
streamed equals generate() on the same ids."""

from __future__ import annotations

import subprocess
import sys

KIND = "llama"


def _run(args, stdin=""):
    return subprocess.run([sys.executable, "-m", "kvgen", *args], input=stdin, capture_output=True, text=True,
                          timeout=120)


def test_generate_streams_chat_reply(model_dir, kv_model):
    d = str(model_dir(KIND))
    res = _run(["generate", "Hello there", "--model", d, "--max-new-tokens", "12"])
    assert res.returncode == 0, res.stderr
    gen = kv_model(KIND)
    ids = gen.tokenizer.apply_chat_template([{"role": "user", "content": "Hello there"}], add_generation_prompt=True,
                                            tokenize=True, return_dict=False)
    out = gen.generate([ids], max_new_tokens=12)[0][len(ids):]
    assert res.stdout == gen.tokenizer.decode(out, skip_special_tokens=True) + "\n"


def test_chat_two_turns(model_dir):
    res = _run(["chat", "--model", str(model_dir(KIND)), "--max-new-tokens", "5"], stdin="Hi\nAnd then?\n\n")
    assert res.returncode == 0, res.stderr
    assert res.stdout.count("> ") == 3


def test_missing_model_is_a_clear_error(tmp_path):
    res = _run(["generate", "x", "--model", str(tmp_path / "nope")])
    assert res.returncode == 2
    assert "kvgen:" in res.stderr and "nope" in res.stderr
