"""The OpenAI app's published OpenAPI schema describes what it does: schemathesis with every check
(no server errors; documented statuses, content types, bodies and headers; schema-valid requests
served, schema-violating ones refused; unsupported methods answered 405) finds nothing, in process
over ASGI, through the same phases as `schemathesis run <app>/openapi.json --checks all`, bounded
by a small example count and a fixed seed (a failure reproduces)."""

from __future__ import annotations

import json
import shutil
import time

import pytest

pytest.importorskip("fastapi")
schemathesis = pytest.importorskip("schemathesis")

# A context long enough that no prompt schemathesis builds reaches the token limit: that limit
# depends on the tokenizer, which no JSON schema can state (its 400 is documented instead).
CONTEXT = 8192
MAX_TOKENS = 8


@pytest.fixture(scope="module")
def app(model_dir, tmp_path_factory):
    import kvgen
    from kvgen.server import create_app

    d = tmp_path_factory.mktemp("llama-long-context")
    shutil.copytree(model_dir("llama"), d, dirs_exist_ok=True)
    config = json.loads((d / "config.json").read_text())
    config["max_position_embeddings"] = CONTEXT
    (d / "config.json").write_text(json.dumps(config))
    return create_app(
        kvgen.Generator.from_pretrained(str(d)),
        model_name="tiny-llama",
        max_tokens_limit=MAX_TOKENS,
        max_prompt_tokens=CONTEXT - MAX_TOKENS,
    )


def test_schemathesis_finds_nothing(app):
    from schemathesis import engine
    from schemathesis.config import SchemathesisConfig
    from schemathesis.engine import Status, events

    config = SchemathesisConfig.from_dict(
        {"seed": 20240613, "generation": {"max-examples": 25}, "checks": {"enabled": True}}
    )
    schema = schemathesis.openapi.from_asgi("/openapi.json", app, config=config)
    failures, errors, checked = [], [], set()
    start = time.monotonic()
    for event in engine.from_schema(schema).execute():
        if isinstance(event, events.NonFatalError):
            errors.append(f"{event.label}: {event.value!r}")
        elif isinstance(event, events.ScenarioFinished):
            for nodes in event.recorder.checks.values():
                for node in nodes:
                    checked.add(node.name)
                    if node.status == Status.FAILURE:
                        info = node.failure_info
                        failures.append(f"{event.recorder.label} [{node.name}] {info.failure.title}: {info.failure.message}\n{info.code_sample}")
    elapsed = time.monotonic() - start
    assert not errors, errors
    assert not failures, "\n".join(sorted(set(failures)))
    # The run exercised the checks the issue names, not just the server-error one.
    assert {"positive_data_acceptance", "negative_data_rejection", "response_schema_conformance"} <= checked, checked
    assert elapsed < 60, f"schemathesis took {elapsed:.0f}s; lower max-examples"
