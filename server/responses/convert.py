"""OpenAI Responses request -> the internal chat request (server/chat.py's ChatRequest)."""

from __future__ import annotations

import uuid
from typing import Any

from engine.types import SamplingParams
from server.chat import ChatRequest, Message
from server.errors import APIError
from server.responses.protocol import ResponsesRequest

_ROLES = {"user": "user", "assistant": "assistant", "system": "system", "developer": "system"}
_TEXT_PARTS = {"input_text", "output_text", "text"}


def unsupported(param: str, what: str) -> APIError:
    return APIError(
        400, f"'{param}': {what} is not supported by this server", param=param, code="unsupported"
    )


def check_unsupported(req: ResponsesRequest) -> None:
    """Refuse what would change the answer's meaning and isn't implemented (never ignore it)."""
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
    if req.tools:
        raise unsupported("tools", "tool use")
    if req.tool_choice not in (None, "none", "auto"):
        raise unsupported("tool_choice", "tool use")
    fmt = (req.text or {}).get("format")
    if fmt is not None and (not isinstance(fmt, dict) or fmt.get("type") != "text"):
        raise unsupported("text.format", "structured output")
    if req.reasoning and any(
        v is not None for k, v in req.reasoning.items() if not (k == "effort" and v == "none")
    ):
        raise unsupported("reasoning", "reasoning control")


def _content_text(content: Any, param: str) -> str:
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise APIError(400, f"'{param}' must be a string or a list of parts", param=param)
    texts = []
    for j, part in enumerate(content):
        kind = part.get("type") if isinstance(part, dict) else None
        if kind in _TEXT_PARTS and isinstance(part.get("text"), str):
            texts.append(part["text"])
        else:
            raise unsupported(f"{param}[{j}].type", f"content part type '{str(kind)[:32]}'")
    return "\n".join(texts)


def template_messages(req: ResponsesRequest) -> list[Message]:
    """instructions as the system message, then the input as messages."""
    messages: list[Message] = []
    if req.instructions:
        messages.append(Message("system", req.instructions))
    if isinstance(req.input, str):
        messages.append(Message("user", req.input))
        return messages
    if not req.input:
        raise APIError(400, "'input' must not be empty", param="input", code="invalid_value")
    for i, item in enumerate(req.input):
        kind = item.get("type", "message")
        if kind != "message":
            raise unsupported(f"input[{i}].type", f"input item type '{str(kind)[:32]}'")
        role = _ROLES.get(str(item.get("role")))
        if role is None:
            raise APIError(
                400,
                f"'input[{i}].role' must be one of user, assistant, system, developer",
                param=f"input[{i}].role",
                code="invalid_value",
            )
        messages.append(Message(role, _content_text(item.get("content"), f"input[{i}].content")))
    return messages


def chat_request(req: ResponsesRequest) -> ChatRequest:
    """The Responses request as the internal chat request."""
    check_unsupported(req)
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
    )
