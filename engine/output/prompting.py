"""Conversations with tools, as the model's chat template wants them.

Templates that know tools get `tools=` and the messages as they are (assistant `tool_calls`
with arguments as objects, `tool` messages). Templates that know none (the generic format) get
the tools described in a system message, and past calls written as the JSON envelope."""

from __future__ import annotations

import json
from typing import Any

from engine.output.events import OutputSpec
from engine.output.formats import detect_tool_format, generic_system_prompt


def tool_messages(
    spec: OutputSpec, chat_template: str | None, messages: list[dict[str, Any]]
) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """(messages, extra chat-template arguments) for a request that may use tools."""
    fmt = detect_tool_format(chat_template)
    has_history = any(m.get("tool_calls") or m.get("role") == "tool" for m in messages)
    if not spec.calls_tools and not has_history:
        return messages, {}
    if fmt != "generic":
        tools = [
            {
                "type": "function",
                "function": {
                    "name": t.name,
                    "description": t.description,
                    "parameters": t.parameters,
                },
            }
            for t in (spec.tools if spec.calls_tools else [])
        ]
        return messages, ({"tools": tools} if tools else {})
    out = [_generic_message(m) for m in messages]
    if spec.calls_tools:
        prompt = generic_system_prompt(spec)
        if out and out[0].get("role") == "system":
            out[0] = {**out[0], "content": f"{out[0].get('content') or ''}\n\n{prompt}".strip()}
        else:
            out.insert(0, {"role": "system", "content": prompt})
    return out, {}


def _generic_message(m: dict[str, Any]) -> dict[str, Any]:
    calls = m.get("tool_calls")
    if calls:
        envelope = {
            "tool_calls": [
                {"name": c["function"]["name"], "arguments": c["function"]["arguments"]}
                for c in calls
            ]
        }
        return {"role": "assistant", "content": json.dumps(envelope, ensure_ascii=False)}
    if m.get("role") == "tool":
        result = {"tool_response": m.get("content") or ""}
        if m.get("name"):
            result["name"] = m["name"]
        return {"role": "tool", "content": json.dumps(result, ensure_ascii=False)}
    return m
