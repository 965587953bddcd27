"""The OpenAI OpenAPI spec subset as JSON-schema validators, for the server and e2e tests.

The spec is OpenAPI 3.1, whose schemas are JSON Schema 2020-12 except for OpenAPI 3.0's
`nullable: true`, which it still uses in places; `json_schema()` rewrites that into "or null".
`$ref`s ("#/components/schemas/X") resolve through an in-memory `referencing` registry holding the
rewritten spec, so the file on disk is never changed.

Usage:
    errors = schema_errors("CreateChatCompletionResponse", body)   # [] when valid
    assert_valid("Model", body)                                    # AssertionError listing errors
"""

from __future__ import annotations

import copy
import functools
import json
import os
from pathlib import Path
from typing import Any

import pytest
from jsonschema import Draft202012Validator
from referencing import Registry, Resource
from referencing.jsonschema import DRAFT202012

# A copy of the OpenAI spec's chat, completions and models operations, kept with the tests.
SPEC_PATH = Path(
    os.environ.get(
        "MLXD_OPENAI_SPEC", Path(__file__).parent / "data" / "openai-openapi-subset.json"
    )
)
SPEC_URI = "urn:mlxd:openai-spec"

# OpenAI's spec has no schema for a streamed legacy completion chunk: it says chunks share
# CreateCompletionResponse's shape. Its API (and the `stream_options` docs) send
# `finish_reason: null` and `usage: null` on every chunk but the last, as for chat chunks, so the
# derived schema below allows exactly those two nulls.
COMPLETION_CHUNK = "CreateCompletionStreamResponse"


def json_schema(node: Any) -> Any:
    """A copy of an OpenAPI schema tree with every `nullable: true` turned into `anyOf [.., null]`.

    Wrapping (rather than editing `type`) keeps `$ref`, `enum` and `oneOf` schemas correct: an
    enum without null would still reject null even with `type: [.., "null"]`.
    """
    if isinstance(node, list):
        return [json_schema(item) for item in node]
    if not isinstance(node, dict):
        return node
    out: dict[str, Any] = {}
    for key, value in node.items():
        if key in _SCHEMA_MAPS and isinstance(value, dict):
            # Keys here are names ("properties": {"nullable": {...}}), never keywords.
            out[key] = {name: json_schema(sub) for name, sub in value.items()}
        elif key != "nullable":
            out[key] = json_schema(value)
    if node.get("nullable") is True:
        return {"anyOf": [out, {"type": "null"}]}
    return out


_SCHEMA_MAPS = frozenset(
    {"properties", "patternProperties", "$defs", "dependentSchemas", "schemas"}
)


def _with_completion_chunk(spec: dict[str, Any]) -> dict[str, Any]:
    schemas = spec["components"]["schemas"]
    chunk = copy.deepcopy(schemas["CreateCompletionResponse"])
    chunk["properties"]["choices"]["items"]["properties"]["finish_reason"]["nullable"] = True
    chunk["properties"]["usage"]["nullable"] = True
    schemas[COMPLETION_CHUNK] = chunk
    return spec


@functools.cache
def load_spec() -> dict[str, Any]:
    """The spec as JSON Schema (nullable rewritten, derived chunk schema added); skips if absent."""
    if not SPEC_PATH.is_file():
        pytest.skip(f"OpenAI spec subset not found (set MLXD_OPENAI_SPEC): {SPEC_PATH}")
    raw = json.loads(SPEC_PATH.read_text(encoding="utf-8"))
    return json_schema(_with_completion_chunk(raw))  # type: ignore[no-any-return]


@functools.cache
def validator(name: str) -> Draft202012Validator:
    """A validator for components/schemas/<name>, resolving every `$ref` inside the spec."""
    spec = load_spec()
    if name not in spec["components"]["schemas"]:
        raise KeyError(f"no schema named {name!r} in {SPEC_PATH.name}")
    resource = Resource.from_contents(spec, default_specification=DRAFT202012)
    registry: Registry[Any] = Registry().with_resource(SPEC_URI, resource)
    return Draft202012Validator(
        {"$ref": f"{SPEC_URI}#/components/schemas/{name}"}, registry=registry
    )


def schema_errors(name: str, body: Any) -> list[str]:
    """Every violation of schema `name` by `body`, as 'path: message' lines ([] when valid)."""
    errors = sorted(validator(name).iter_errors(body), key=lambda e: list(e.absolute_path))
    return [f"{e.json_path}: {e.message[:300]}" for e in errors]


def assert_valid(name: str, body: Any) -> None:
    errors = schema_errors(name, body)
    assert not errors, f"{name} violations:\n" + "\n".join(errors)


def sse_events(text: str) -> list[dict[str, Any]]:
    """The JSON `data:` events of an SSE body that ends with `data: [DONE]` (comments skipped)."""
    frames = [f for f in text.strip().split("\n\n") if f]
    assert frames and frames[-1] == "data: [DONE]", f"stream did not end with [DONE]: {text[-200:]}"
    return [json.loads(f[len("data: ") :]) for f in frames[:-1] if f.startswith("data: ")]
