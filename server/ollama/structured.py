"""Ollama's `format`, `tools`, `think` and tool messages onto the engine's OutputSpec, and the
engine's tool calls back into Ollama's shape (arguments as objects)."""

from __future__ import annotations

import json
from typing import Any

from engine.api import EngineAPI
from engine.grammar import schema_error
from engine.output.events import OutputSpec, ToolCall, ToolSpec
from engine.structured import reasoning_markers
from server.effort import apply_effort
from server.errors import APIError

# `think` as a string: a boolean's spelling or one of Ollama's levels (the ones gpt-oss takes).
_THINK_LEVELS = ("true", "false", "low", "medium", "high")


def _schema(value: Any, where: str) -> dict[str, Any]:
    error = schema_error(value)
    if error is not None:
        raise APIError(400, f"invalid JSON schema in {where}: {error}", param=where)
    return value  # type: ignore[no-any-return]


async def output_spec(
    engine: EngineAPI, model: str, fmt: Any, think: Any, tools: Any
) -> OutputSpec:
    """The request's answer format, tools and thinking; Ollama's 400 when one is wrong."""
    spec = OutputSpec()
    if fmt == "json":
        spec.json_schema = {"type": "object"}
    elif isinstance(fmt, dict):
        spec.json_schema = _schema(fmt, "format")
    elif fmt not in (None, ""):
        raise APIError(400, 'format must be "json" or a JSON schema', param="format")
    for i, tool in enumerate(tools or []):
        fn = tool.get("function") if isinstance(tool, dict) else None
        if not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
            raise APIError(400, f"tools[{i}] needs function.name", param=f"tools[{i}]")
        params = fn.get("parameters") or {"type": "object", "properties": {}}
        spec.tools.append(
            ToolSpec(
                fn["name"],
                str(fn.get("description") or ""),
                _schema(params, f"tools[{i}].function.parameters"),
            )
        )
    if isinstance(think, str) and think not in ("", "true", "false"):
        apply_effort(spec, think, "think", _THINK_LEVELS)  # Ollama's levels (gpt-oss's)
    if think not in (None, False, "", "false"):
        handle = await engine.get_model(model)
        if reasoning_markers(handle.tokenizer) is None:
            raise APIError(400, f'"{model}" does not support thinking', param="think")
    if think is False or think == "false":
        spec.reasoning = False
    return spec


def template_extra(m: Any) -> dict[str, Any]:
    """An Ollama message's template fields beyond role and content: tool calls (typed, with
    object arguments)."""
    msg: dict[str, Any] = {}
    if m.tool_calls:
        msg["tool_calls"] = [
            {
                "type": "function",
                "function": {
                    "name": (c.get("function") or {}).get("name", ""),
                    "arguments": _arguments((c.get("function") or {}).get("arguments")),
                },
            }
            for c in m.tool_calls
        ]
    return msg


def _arguments(value: Any) -> dict[str, Any]:
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except ValueError:
            raise APIError(400, "tool call arguments are not JSON") from None
    return value if isinstance(value, dict) else {}


def ollama_tool_calls(calls: list[ToolCall]) -> list[dict[str, Any]]:
    return [
        {"function": {"index": c.index, "name": c.name, "arguments": json.loads(c.arguments)}}
        for c in calls
    ]
