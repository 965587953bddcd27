"""Tool-call formats: detected from the chat template, with each format's parser and grammar.

Grammars are Lark text for llguidance (`%json {...}` inlines a JSON schema). `tool_choice`
auto lets the model write text until the format's opening marker, then constrains the call
(a lazy grammar); required and a named choice constrain from the first token."""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from typing import Any

from engine.output.events import OutputSpec, ToolSpec
from engine.output.generic import GenericParser
from engine.output.reasoning import ReasoningMarkers
from engine.output.strict import closed
from engine.output.tool_parsers import (
    Llama3Parser,
    MarkerParser,
    MistralParser,
    Qwen3CoderParser,
    ToolParser,
)

FORMATS = ("hermes", "llama3", "mistral", "qwen3_coder", "generic")

# A marker's id when it is one special token (llguidance matches those by id, not by text).
SpecialId = Callable[[str], int | None]


def detect_tool_format(template: str | None) -> str:
    """The tool-call format a chat template writes; "generic" when it knows no tools."""
    t = template or ""
    if "<tool_call>\n<function=" in t or "<tool_call>\\n<function=" in t:
        return "qwen3_coder"
    if "[TOOL_CALLS]" in t:
        return "mistral"
    if "<tool_call>" in t:
        return "hermes"
    if "<|python_tag|>" in t or ("<|start_header_id|>" in t and "tools" in t):
        return "llama3"
    return "generic"


def make_parser(fmt: str, tools: list[ToolSpec]) -> ToolParser:
    parsers: dict[str, type[ToolParser]] = {
        "hermes": MarkerParser,
        "qwen3_coder": Qwen3CoderParser,
        "llama3": Llama3Parser,
        "mistral": MistralParser,
        "generic": GenericParser,
    }
    return parsers[fmt](tools)


# --- the generic format: tools described in a system message, a JSON envelope -------------------


def generic_system_prompt(spec: OutputSpec) -> str:
    """What a model whose template knows no tools is told (llama.cpp's generic handler's idea)."""
    tools = [
        {"name": t.name, "description": t.description, "parameters": t.parameters}
        for t in spec.allowed_tools()
    ]
    many = "one or more tool calls" if spec.parallel_tool_calls else "exactly one tool call"
    lines = [
        "You can call these tools:",
        json.dumps(tools, ensure_ascii=False, indent=2),
        'Answer with a JSON object only. To call tools: {"tool_calls": [{"name": <tool name>, '
        f'"arguments": <arguments object>}}]}} with {many}.',
    ]
    if spec.tool_choice == "auto":
        lines.append(
            "Call a tool whenever one can help with the request. Only when no tool fits, "
            'answer directly: {"response": <your answer>}.'
        )
    return "\n".join(lines)


def _call_schema(tool: ToolSpec, args_key: str = "arguments") -> dict[str, Any]:
    args = closed(tool.parameters or {}) if tool.strict else tool.parameters or {}
    return {
        "type": "object",
        "properties": {"name": {"const": tool.name}, args_key: args},
        "required": ["name", args_key],
        "additionalProperties": False,
    }


def _any_call(spec: OutputSpec, args_key: str = "arguments") -> dict[str, Any]:
    schemas = [_call_schema(t, args_key) for t in spec.allowed_tools()]
    return schemas[0] if len(schemas) == 1 else {"anyOf": schemas}


def _calls_array(spec: OutputSpec) -> dict[str, Any]:
    arr: dict[str, Any] = {"type": "array", "items": _any_call(spec), "minItems": 1}
    if not spec.parallel_tool_calls:
        arr["maxItems"] = 1
    return arr


def _answer_schema(spec: OutputSpec) -> dict[str, Any]:
    if spec.json_schema is None:
        return {"type": "string"}
    return closed(spec.json_schema) if spec.strict_schema else spec.json_schema


def _generic_envelope(spec: OutputSpec) -> dict[str, Any]:
    calls = {
        "type": "object",
        "properties": {"tool_calls": _calls_array(spec)},
        "required": ["tool_calls"],
        "additionalProperties": False,
    }
    if spec.tool_choice != "auto":
        return calls
    answer = {
        "type": "object",
        "properties": {"response": _answer_schema(spec)},
        "required": ["response"],
        "additionalProperties": False,
    }
    return {"anyOf": [calls, answer]}


# --- grammars -------------------------------------------------------------------------------------


# JSON as models write it ({"a": 1, "b": 2}): whitespace never runs on, and parsers read it.
_JSON_STYLE = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}


def _json(schema: dict[str, Any]) -> str:
    return "%json " + json.dumps({**schema, "x-guidance": _JSON_STYLE}, ensure_ascii=False)


def _lit(text: str, special: SpecialId) -> str:
    tid = special(text)
    return f"<[{tid}]>" if tid is not None else json.dumps(text)


def _lazy(marker: str, special: SpecialId, body: str) -> list[str]:
    """`answer`: free text, or text up to the format's marker followed by `body` (lazy)."""
    if special(marker) is not None:
        return [f"answer: TEXT? ({_lit(marker, special)} {body})?", "TEXT: /(?s:.*)/"]
    # Text that never contains the marker, or text ending at the marker and then the body.
    return [
        f"answer: TEXT | text {body}",
        f"TEXT: /(?s:.*)/ & ~/(?s:.*{re.escape(marker)}.*)/",
        f"text[suffix={json.dumps(marker)}]: /(?s:.*)/",
    ]


def _qwen3_coder_calls(spec: OutputSpec, special: SpecialId) -> list[str]:
    lines, names = [], []
    for i, tool in enumerate(spec.allowed_tools()):
        params = list((tool.parameters or {}).get("properties", {}))
        names.append(f"f{i}")
        lines.append(f'f{i}: {json.dumps(f"<function={tool.name}>")} "\\n" p{i}* "</function>"')
        keys = " | ".join(json.dumps(p) for p in params) or '""'
        lines.append(f'p{i}: "<parameter=" ({keys}) ">\\n" pval "\\n"')
    lines.append('pval[suffix="\\n</parameter>"]: /(?s:.*)/')
    lines.append(f'call_body: "\\n" ({" | ".join(names)}) "\\n" {_lit("</tool_call>", special)}')
    return lines


def tool_grammar(fmt: str, spec: OutputSpec, special: SpecialId) -> list[str]:
    """Lark rules defining `answer` for a request with tools (tool_choice auto/required/named)."""
    eager = spec.tool_choice != "auto"
    more = "*" if spec.parallel_tool_calls else ""
    if fmt == "generic":
        return [f"answer: {_json(_generic_envelope(spec))}"]
    if fmt == "llama3":
        call = _json(_any_call(spec, "parameters"))
        calls = f'call (";" " "? call){more}' if more else "call"
        rules = [f"call: {call}"]
        if eager:
            return [f"answer: {calls}", *rules]
        free = _json(_answer_schema(spec)) if spec.json_schema is not None else "TEXT"
        return [f"answer: {free} | {calls}", *rules, "TEXT: /[^{](?s:.*)/"]
    if fmt == "mistral":
        rules = [f"calls: {_json(_calls_array(spec))}"]
        mark = _lit("[TOOL_CALLS]", special)
        if eager:
            return [f"answer: {mark} calls", *rules]
        return [*_lazy("[TOOL_CALLS]", special, "calls"), *rules]
    # hermes and qwen3_coder: <tool_call> ... </tool_call>, repeated when parallel
    start = _lit("<tool_call>", special)
    if fmt == "qwen3_coder":
        rules = _qwen3_coder_calls(spec, special)
    else:
        end = _lit("</tool_call>", special)
        rules = [f'call_body: "\\n" {_json(_any_call(spec))} "\\n" {end}']
    body = "call_body"
    if spec.parallel_tool_calls:
        rules.append(f'more: ("\\n" {start} call_body)*')
        body = "call_body more"
    if eager:
        return [f"answer: {start} {body}", *rules]
    if spec.json_schema is not None:
        return [f"answer: {_json(_answer_schema(spec))} | {start} {body}", *rules]
    return [*_lazy("<tool_call>", special, body), *rules]


def answer_grammar(spec: OutputSpec) -> list[str]:
    """Lark rules defining `answer` for a JSON answer without tools."""
    return [f"answer: {_json(_answer_schema(spec) if spec.json_schema else {'type': 'object'})}"]


def with_start(
    rules: list[str],
    markers: ReasoningMarkers | None,
    in_reasoning: bool,
    special: SpecialId,
) -> str:
    """The whole grammar: the model's thinking (left free) may come first, then `answer`."""
    if markers is None:
        return "\n".join(["start: answer", *rules])
    end = _lit(markers.end, special)
    if special(markers.end) is not None:
        think_rules = ["think_body: THINK? " + end, "THINK: /(?s:.*)/"]
    else:
        think_rules = [f"think_body[suffix={json.dumps(markers.end)}]: /(?s:.*)/"]
    head = "think_body" if in_reasoning else f"({_lit(markers.start, special)} think_body)?"
    return "\n".join([f"start: {head} /\\s*/ answer", *think_rules, *rules])
