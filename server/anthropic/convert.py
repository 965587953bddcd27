"""Anthropic Messages request -> the internal chat request (server/chat.py's ChatRequest)."""

from __future__ import annotations

import uuid

from engine.types import SamplingParams
from server.anthropic.protocol import Blocks, CountTokensRequest, MessagesRequest
from server.chat import ChatRequest, Message
from server.errors import APIError
from server.limits import stop_list
from server.settings import Settings


def unsupported(param: str, what: str) -> APIError:
    return APIError(400, f"'{param}': {what} is not supported by this server", param=param)


def check_unsupported(req: CountTokensRequest) -> None:
    """Tools and thinking wait for the tool-call and reasoning pipeline: refused, never ignored."""
    if req.tools:
        raise unsupported("tools", "tool use")
    if req.tool_choice and req.tool_choice.get("type") != "none":
        raise unsupported("tool_choice", "tool use")
    if req.thinking and req.thinking.get("type") != "disabled":
        raise unsupported("thinking", "extended thinking")
    if req.output_config and req.output_config.get("format"):
        raise unsupported("output_config.format", "structured output")


def block_text(content: str | Blocks, param: str) -> str:
    """The text of a content field: a string, or text blocks (joined)."""
    if isinstance(content, str):
        return content
    texts = []
    for j, block in enumerate(content):
        kind = block.get("type")
        if kind == "text" and isinstance(block.get("text"), str):
            texts.append(block["text"])
        elif kind == "text":
            raise APIError(400, f"'{param}[{j}].text' must be a string", param=f"{param}[{j}].text")
        else:
            raise unsupported(f"{param}[{j}].type", f"content block type '{str(kind)[:32]}'")
    return "\n".join(texts)


def template_messages(req: CountTokensRequest) -> tuple[list[Message], str]:
    """The chat template's messages, and the assistant prefill: a last assistant message is the
    start of the answer, which the model continues (Anthropic's semantics)."""
    check_unsupported(req)
    messages: list[Message] = []
    if req.system:
        messages.append(Message("system", block_text(req.system, "system")))
    for i, m in enumerate(req.messages):
        messages.append(Message(m.role, block_text(m.content, f"messages[{i}].content")))
    prefill = ""
    if req.messages[-1].role == "assistant":
        prefill = messages.pop().content
    return messages, prefill


def chat_request(req: MessagesRequest, settings: Settings) -> ChatRequest:
    """The Messages request as the internal chat request."""
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
    )
