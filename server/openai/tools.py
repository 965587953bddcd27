"""OpenAI chat's tools, tool_choice, response_format and tool messages, onto the engine's
OutputSpec; and the engine's tool calls back into OpenAI's message and delta shapes."""

from __future__ import annotations

import json
from typing import Any

from engine.grammar import schema_error
from engine.output.events import OutputSpec, ToolCall, ToolCallDelta, ToolChoiceMode, ToolSpec
from engine.output.strict import strict_error
from server.effort import apply_effort
from server.errors import APIError
from server.openai.protocol import ChatCompletionRequest, ChatMessage

_CHOICES: dict[str, ToolChoiceMode] = {"none": "none", "auto": "auto", "required": "required"}


def _bad(message: str, param: str, code: str = "invalid_value") -> APIError:
    return APIError(400, message, param=param, code=code)


def _checked_schema(schema: Any, param: str, strict: bool = False) -> dict[str, Any]:
    error = schema_error(schema)
    if error is None and strict:
        error = strict_error(schema)
    if error is not None:
        raise _bad(f"invalid JSON schema at {param}: {error}", param, "invalid_schema")
    return schema  # type: ignore[no-any-return]


def output_spec(req: ChatCompletionRequest) -> OutputSpec:
    """The request's tools, tool choice and answer format; 400 naming the field when wrong."""
    tools = []
    for i, t in enumerate(req.tools or []):
        params = t.function.parameters or {"type": "object", "properties": {}}
        param = f"tools[{i}].function.parameters"
        strict = t.function.strict is True
        schema = _checked_schema(params, param, strict)
        tools.append(ToolSpec(t.function.name, t.function.description or "", schema, strict))
    spec = OutputSpec(tools=tools, parallel_tool_calls=req.parallel_tool_calls is not False)
    choice = req.tool_choice
    if isinstance(choice, dict):
        name = (
            (choice.get("function") or {}).get("name") if choice.get("type") == "function" else None
        )
        if not isinstance(name, str):
            raise _bad("tool_choice must name a function", "tool_choice")
        if name not in {t.name for t in tools}:
            raise _bad(f"tool_choice names '{name[:64]}', which is not among tools", "tool_choice")
        spec.tool_choice, spec.tool_name = "named", name
    elif choice in _CHOICES:
        spec.tool_choice = _CHOICES[choice]
    elif choice is not None:
        raise _bad("tool_choice must be 'none', 'auto', 'required' or a function", "tool_choice")
    if spec.tool_choice in ("required", "named") and not tools:
        raise _bad(f"tool_choice '{spec.tool_choice}' needs tools", "tool_choice")
    spec.json_schema = _response_schema(req.response_format)
    inner = (req.response_format or {}).get("json_schema")
    spec.strict_schema = isinstance(inner, dict) and inner.get("strict") is True
    apply_effort(spec, req.reasoning_effort, "reasoning_effort")
    kwargs = req.chat_template_kwargs or {}
    if kwargs.get("enable_thinking") is False:
        spec.reasoning = False
    return spec


def _response_schema(fmt: dict[str, Any] | None) -> dict[str, Any] | None:
    if fmt is None:
        return None
    kind = fmt.get("type")
    if kind == "text":
        return None
    if kind == "json_object":
        return {"type": "object"}
    if kind == "json_schema":
        inner = fmt.get("json_schema")
        if not isinstance(inner, dict) or "schema" not in inner:
            raise _bad(
                "response_format json_schema needs json_schema.schema",
                "response_format.json_schema.schema",
            )
        strict = inner.get("strict") is True
        return _checked_schema(inner["schema"], "response_format.json_schema.schema", strict)
    raise _bad(
        "response_format.type must be 'text', 'json_object' or 'json_schema'",
        "response_format.type",
    )


def template_tool_calls(i: int, m: ChatMessage) -> list[dict[str, Any]]:
    """An assistant message's tool_calls as chat templates expect them (arguments as objects)."""
    out = []
    for j, call in enumerate(m.tool_calls or []):
        param = f"messages[{i}].tool_calls[{j}]"
        fn = call.get("function") if isinstance(call, dict) else None
        if not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
            raise _bad("a tool call needs function.name", param)
        args = fn.get("arguments")
        if isinstance(args, str):
            try:
                args = json.loads(args) if args.strip() else {}
            except ValueError:
                raise _bad(
                    "function.arguments is not JSON", f"{param}.function.arguments"
                ) from None
        out.append(
            {
                "id": call.get("id"),
                "type": "function",
                "function": {"name": fn["name"], "arguments": args or {}},
            }
        )
    return out


def message_tool_calls(calls: list[ToolCall]) -> list[dict[str, Any]]:
    return [
        {"id": c.id, "type": "function", "function": {"name": c.name, "arguments": c.arguments}}
        for c in calls
    ]


def tool_call_deltas(deltas: list[ToolCallDelta]) -> list[dict[str, Any]]:
    """Streamed: a call's index, id, type and name in its first delta, then its arguments in
    fragments as the model writes them."""
    out: list[dict[str, Any]] = []
    for d in deltas:
        if d.id is not None:
            fn = {"name": d.name, "arguments": d.arguments}
            out.append({"index": d.index, "id": d.id, "type": "function", "function": fn})
        elif d.arguments:
            out.append({"index": d.index, "function": {"arguments": d.arguments}})
    return out
