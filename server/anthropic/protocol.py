"""Pydantic schemas of the Anthropic Messages requests mlxd accepts.

Unknown fields are ignored (SDKs and agents send harmless ones); content blocks are checked in
convert.py so an unsupported block gets a message naming it.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictInt, StrictStr

Float = Annotated[float, Field(strict=True)]  # ints are accepted, strings are not
Blocks = list[dict[str, Any]]


class _Schema(BaseModel):
    model_config = ConfigDict(extra="ignore")


class Message(_Schema):
    role: Literal["user", "assistant"]
    content: StrictStr | Blocks


class CountTokensRequest(_Schema):
    """POST /v1/messages/count_tokens: what shapes the prompt."""

    model: StrictStr = Field(min_length=1)
    messages: list[Message] = Field(min_length=1)
    system: StrictStr | Blocks | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: dict[str, Any] | None = None
    thinking: dict[str, Any] | None = None
    output_config: dict[str, Any] | None = None


class MessagesRequest(CountTokensRequest):
    """POST /v1/messages."""

    max_tokens: Annotated[StrictInt, Field(ge=1)]
    stop_sequences: list[StrictStr] | None = None
    temperature: Annotated[Float, Field(ge=0.0, le=1.0)] | None = None
    top_p: Annotated[Float, Field(ge=0.0, le=1.0)] | None = None
    top_k: Annotated[StrictInt, Field(ge=0)] | None = None
    stream: StrictBool = False
    metadata: dict[str, Any] | None = None
