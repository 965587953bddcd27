"""Anthropic Messages request -> the internal chat request (server/chat.py's ChatRequest).

Tool use becomes the template's assistant `tool_calls`, tool results its `tool` messages;
`tools` / `tool_choice` / `thinking` / `output_config.format` become the OutputSpec."""

from __future__ import annotations

import re
import uuid
from typing import Any

from engine.grammar import schema_error
from engine.output.events import OutputSpec, ToolSpec
from engine.types import SamplingParams
from server.anthropic.protocol import Blocks, CountTokensRequest, MessagesRequest
from server.chat import ChatRequest, Message
from server.errors import APIError
from server.limits import stop_list
from server.settings import Settings

_TOOL_NAME = re.compile(r"^[a-zA-Z0-9_-]{1,64}$")


def bad(param: str, message: str) -> APIError:
    return APIError(400, f"'{param}': {message}", param=param)


def unsupported(param: str, what: str) -> APIError:
    return bad(param, f"{what} is not supported by this server")


def _schema(schema: Any, param: str) -> dict[str, Any]:
    error = schema_error(schema)
    if error is not None:
        raise bad(param, f"invalid JSON schema: {error}")
    return schema  # type: ignore[no-any-return]


def _tools(raw: list[dict[str, Any]]) -> list[ToolSpec]:
    tools = []
    for i, t in enumerate(raw):
        if t.get("type") not in (None, "custom"):
            raise unsupported(f"tools[{i}].type", f"server tool '{str(t.get('type'))[:40]}'")
        name = t.get("name")
        if not isinstance(name, str) or not _TOOL_NAME.match(name):
            raise bad(f"tools[{i}].name", "a tool name is 1-64 letters, digits, '_' or '-'")
        description = t.get("description") or ""
        if not isinstance(description, str):
            raise bad(f"tools[{i}].description", "must be a string")
        tools.append(
            ToolSpec(name, description, _schema(t.get("input_schema"), f"tools[{i}].input_schema"))
        )
    return tools


def output_spec(req: CountTokensRequest) -> OutputSpec:
    """tools, tool_choice (auto / any / tool / none), thinking and output_config.format."""
    spec = OutputSpec(tools=_tools(req.tools or []))
    choice = req.tool_choice or {"type": "auto"}
    kind = choice.get("type")
    if kind == "tool":
        name = choice.get("name")
        if name not in {t.name for t in spec.tools}:
            raise bad("tool_choice.name", f"'{str(name)[:64]}' is not among tools")
        spec.tool_choice, spec.tool_name = "named", name
    elif kind in ("auto", "any", "none"):
        spec.tool_choice = "required" if kind == "any" else kind
    else:
        raise bad("tool_choice.type", "must be 'auto', 'any', 'tool' or 'none'")
    if spec.tool_choice in ("required", "named") and not spec.tools:
        raise bad("tool_choice", f"tool_choice '{kind}' needs tools")
    spec.parallel_tool_calls = not choice.get("disable_parallel_tool_use", False)
    # Thinking is opt-in in this API: without `thinking`, a reasoning model is asked not to think.
    thinking = (req.thinking or {}).get("type", "disabled")
    if thinking not in ("enabled", "disabled", "adaptive"):
        raise bad("thinking.type", "must be 'enabled', 'adaptive' or 'disabled'")
    spec.reasoning = thinking != "disabled"
    budget = (req.thinking or {}).get("budget_tokens")
    if thinking == "enabled" and budget is not None:
        if not isinstance(budget, int) or isinstance(budget, bool) or budget < 0:
            raise bad("thinking.budget_tokens", "must be a non-negative integer")
        spec.reasoning_budget = budget  # the thinking's end is forced after this many tokens
    fmt = (req.output_config or {}).get("format")
    if fmt is not None:
        if not isinstance(fmt, dict) or fmt.get("type") != "json_schema":
            raise bad("output_config.format.type", "must be 'json_schema'")
        spec.json_schema = _schema(fmt.get("schema"), "output_config.format.schema")
    return spec


def _result_text(content: Any, param: str) -> str:
    if isinstance(content, str) or content is None:
        return content or ""
    if isinstance(content, list):
        return block_text(content, param)
    raise bad(param, "must be a string or text blocks")


def block_text(content: str | Blocks, param: str) -> str:
    """The text of a content field: a string, or text blocks (joined)."""
    if isinstance(content, str):
        return content
    texts = []
    for j, block in enumerate(content):
        if block.get("type") != "text":
            raise unsupported(
                f"{param}[{j}].type", f"content block type '{str(block.get('type'))[:32]}'"
            )
        if not isinstance(block.get("text"), str):
            raise bad(f"{param}[{j}].text", "must be a string")
        texts.append(block["text"])
    return "\n".join(texts)


def _turn(role: str, content: str | Blocks, param: str) -> list[Message]:
    """One Anthropic message as template messages: tool results become `tool` messages (before
    the user's text), tool use the assistant's `tool_calls`; past thinking is dropped."""
    if isinstance(content, str):
        return [Message(role, content)]
    texts: list[str] = []
    calls: list[dict[str, Any]] = []
    results: list[Message] = []
    for j, block in enumerate(content):
        kind, where = block.get("type"), f"{param}[{j}]"
        if kind == "text" and isinstance(block.get("text"), str):
            texts.append(block["text"])
        elif kind == "tool_use" and role == "assistant":
            if not isinstance(block.get("name"), str) or not isinstance(block.get("input"), dict):
                raise bad(where, "a tool_use block needs a name and an object input")
            fn = {"name": block["name"], "arguments": block["input"]}
            calls.append({"id": block.get("id"), "type": "function", "function": fn})
        elif kind == "tool_result" and role == "user":
            text = _result_text(block.get("content"), f"{where}.content")
            if block.get("is_error"):
                text = f"Error: {text}"
            results.append(Message("tool", text, extra={"tool_call_id": block.get("tool_use_id")}))
        elif kind in ("thinking", "redacted_thinking") and role == "assistant":
            continue
        else:
            raise unsupported(
                f"{where}.type", f"content block type '{str(kind)[:32]}' in a {role} message"
            )
    if role == "user":
        return results + ([Message("user", "\n".join(texts))] if texts or not results else [])
    return [Message("assistant", "\n".join(texts), extra={"tool_calls": calls} if calls else {})]


def template_messages(req: CountTokensRequest) -> tuple[list[Message], str]:
    """The chat template's messages, and the assistant prefill: a last assistant message of text
    is the start of the answer, which the model continues (Anthropic's semantics)."""
    messages: list[Message] = []
    if req.system:
        messages.append(Message("system", block_text(req.system, "system")))
    for i, m in enumerate(req.messages):
        messages.extend(_turn(m.role, m.content, f"messages[{i}].content"))
    prefill = ""
    if messages[-1].role == "assistant" and not messages[-1].extra:
        prefill = messages.pop().content
    return messages, prefill


def chat_request(req: MessagesRequest, settings: Settings) -> ChatRequest:
    """The Messages request as the internal chat request."""
    output = output_spec(req)
    messages, prefill = template_messages(req)
    params = SamplingParams(
        temperature=1.0 if req.temperature is None else req.temperature,
        top_p=1.0 if req.top_p is None else req.top_p,
        top_k=req.top_k or 0,
        stop=stop_list(settings, req.stop_sequences, "stop_sequences"),
    )
    return ChatRequest(
        id=f"msg_{uuid.uuid4().hex[:24]}",
        model=req.model,
        messages=messages,
        params=params,
        max_tokens=req.max_tokens,
        prefill=prefill,
        output=output,
    )
