"""OpenAI Responses request -> the internal chat request (server/chat.py's ChatRequest).

`function_call` items become the template's assistant `tool_calls`, `function_call_output`
items its `tool` messages; `tools` / `tool_choice` / `text.format` /
`reasoning` become the OutputSpec."""

from __future__ import annotations

import json
import re
import uuid
from typing import Any

from engine.grammar import schema_error
from engine.output.events import OutputSpec, ToolChoiceMode, ToolSpec
from engine.output.strict import strict_error
from engine.types import SamplingParams
from server.chat import ChatRequest, Message
from server.effort import apply_effort
from server.errors import APIError
from server.responses.protocol import ResponsesRequest

_ROLES = {"user": "user", "assistant": "assistant", "system": "system", "developer": "system"}
_TEXT_PARTS = {"input_text", "output_text", "text"}
_CHOICES: dict[Any, ToolChoiceMode] = {"none": "none", "auto": "auto", "required": "required"}
_TOOL_NAME = re.compile(r"^[a-zA-Z0-9_.-]{1,64}$")


def bad(param: str, message: str, code: str = "invalid_value") -> APIError:
    return APIError(400, f"'{param}': {message}", param=param, code=code)


def unsupported(param: str, what: str) -> APIError:
    return bad(param, f"{what} is not supported by this server", "unsupported")


def check_stateless(req: ResponsesRequest) -> None:
    if req.previous_response_id is not None:
        raise APIError(
            400,
            "previous_response_id is not supported: this server is stateless and stores no "
            "responses; send the whole conversation in 'input'",
            param="previous_response_id",
            code="unsupported",
        )
    if req.store:
        raise APIError(
            400,
            "store: true is not supported: this server is stateless and stores no responses; "
            "omit 'store' or send false",
            param="store",
            code="unsupported",
        )


def _schema(schema: Any, param: str, strict: bool = False) -> dict[str, Any]:
    error = schema_error(schema)
    if error is None and strict:
        error = strict_error(schema)
    if error is not None:
        raise bad(param, f"invalid JSON schema: {error}", "invalid_schema")
    return schema  # type: ignore[no-any-return]


def _tools(raw: list[dict[str, Any]]) -> list[ToolSpec]:
    tools = []
    for i, t in enumerate(raw):
        if t.get("type") != "function":
            raise unsupported(f"tools[{i}].type", f"tool type '{str(t.get('type'))[:40]}'")
        name = t.get("name")
        if not isinstance(name, str) or not _TOOL_NAME.match(name):
            raise bad(
                f"tools[{i}].name", "a function name is 1-64 letters, digits, '_', '.' or '-'"
            )
        params = t.get("parameters") or {"type": "object", "properties": {}}
        description = t.get("description") or ""
        strict = t.get("strict") is True
        schema = _schema(params, f"tools[{i}].parameters", strict)
        tools.append(ToolSpec(name, str(description), schema, strict))
    return tools


def output_spec(req: ResponsesRequest) -> OutputSpec:
    """tools, tool_choice, text.format and reasoning."""
    spec = OutputSpec(
        tools=_tools(req.tools or []), parallel_tool_calls=req.parallel_tool_calls is not False
    )
    choice = req.tool_choice
    if isinstance(choice, dict):
        name = choice.get("name") if choice.get("type") == "function" else None
        if name not in {t.name for t in spec.tools}:
            raise bad("tool_choice", "must name a function among tools")
        spec.tool_choice, spec.tool_name = "named", name
    elif choice in _CHOICES:
        spec.tool_choice = _CHOICES[choice]
    elif choice is not None:
        raise bad("tool_choice", "must be 'none', 'auto', 'required' or a function")
    if spec.tool_choice in ("required", "named") and not spec.tools:
        raise bad("tool_choice", f"tool_choice '{spec.tool_choice}' needs tools")
    fmt = (req.text or {}).get("format")
    if fmt is not None:
        kind = fmt.get("type") if isinstance(fmt, dict) else None
        if kind == "json_schema":
            spec.strict_schema = fmt.get("strict") is True
            spec.json_schema = _schema(fmt.get("schema"), "text.format.schema", spec.strict_schema)
        elif kind == "json_object":
            spec.json_schema = {"type": "object"}
        elif kind != "text":
            raise bad("text.format.type", "must be 'text', 'json_object' or 'json_schema'")
    apply_effort(spec, (req.reasoning or {}).get("effort"), "reasoning.effort")
    return spec


def _content_text(content: Any, param: str) -> str:
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise bad(param, "must be a string or a list of parts")
    texts = []
    for j, part in enumerate(content):
        kind = part.get("type") if isinstance(part, dict) else None
        if kind in _TEXT_PARTS and isinstance(part.get("text"), str):
            texts.append(part["text"])
        else:
            raise unsupported(f"{param}[{j}].type", f"content part type '{str(kind)[:32]}'")
    return "\n".join(texts)


def _function_call(item: dict[str, Any], param: str) -> dict[str, Any]:
    name, args = item.get("name"), item.get("arguments")
    if not isinstance(name, str) or not isinstance(args, str):
        raise bad(param, "a function_call item needs a name and arguments (a JSON string)")
    try:
        parsed = json.loads(args) if args.strip() else {}
    except ValueError:
        raise bad(f"{param}.arguments", "is not JSON") from None
    return {
        "id": item.get("call_id"),
        "type": "function",
        "function": {"name": name, "arguments": parsed},
    }


def _item(messages: list[Message], item: dict[str, Any], i: int) -> None:
    """Append one input item to the template messages."""
    kind = item.get("type", "message")
    if kind == "function_call":
        call = _function_call(item, f"input[{i}]")
        last = messages[-1] if messages else None
        if last is not None and last.role == "assistant" and "tool_calls" in last.extra:
            last.extra["tool_calls"].append(call)  # parallel calls: one assistant turn
        else:
            messages.append(Message("assistant", "", extra={"tool_calls": [call]}))
    elif kind == "function_call_output":
        output = item.get("output")
        text = output if isinstance(output, str) else _content_text(output, f"input[{i}].output")
        messages.append(Message("tool", text, extra={"tool_call_id": item.get("call_id")}))
    elif kind == "reasoning":
        return  # earlier thinking: chat templates drop it from history too
    elif kind == "message":
        role = _ROLES.get(str(item.get("role")))
        if role is None:
            raise bad(f"input[{i}].role", "must be one of user, assistant, system, developer")
        messages.append(Message(role, _content_text(item.get("content"), f"input[{i}].content")))
    else:
        raise unsupported(f"input[{i}].type", f"input item type '{str(kind)[:32]}'")


def template_messages(req: ResponsesRequest) -> list[Message]:
    """instructions as the system message, then the input as messages."""
    messages: list[Message] = []
    if req.instructions:
        messages.append(Message("system", req.instructions))
    if isinstance(req.input, str):
        messages.append(Message("user", req.input))
        return messages
    if not req.input:
        raise bad("input", "must not be empty")
    for i, item in enumerate(req.input):
        _item(messages, item, i)
    return messages


def chat_request(req: ResponsesRequest) -> ChatRequest:
    """The Responses request as the internal chat request."""
    check_stateless(req)
    params = SamplingParams(
        temperature=1.0 if req.temperature is None else req.temperature,
        top_p=1.0 if req.top_p is None else req.top_p,
    )
    return ChatRequest(
        id=f"resp_{uuid.uuid4().hex[:24]}",
        model=req.model,
        messages=template_messages(req),
        params=params,
        max_tokens=req.max_output_tokens,
        budget_param="input" if req.max_output_tokens is None else "max_output_tokens",
        output=output_spec(req),
    )
