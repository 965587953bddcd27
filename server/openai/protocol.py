"""Pydantic schemas of the OpenAI requests mlxd accepts.

Unknown fields are ignored (clients send many harmless ones); fields that would change the meaning
of a request and that mlxd does not implement are rejected by `unsupported_field()` with a 400
naming them. Responses are plain dicts built in chat.py / completions.py (validated against the
OpenAI spec in tests).
"""

from __future__ import annotations

import re
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StrictBool,
    StrictInt,
    StrictStr,
    field_validator,
)

# ints are accepted, strings are not; NaN and infinities never parse (server/errors.read_json)
Float = Annotated[float, Field(strict=True)]
# The engine checks ids against the model's vocabulary (engine/validation.py); this bound only
# keeps an absurd integer from reaching the tokenizer's decode (a 32-bit id) first.
TokenId = Annotated[StrictInt, Field(ge=0, le=2**31 - 1)]
# OpenAI documents a signed 64-bit seed; unsigned 64-bit ones are taken too. The engine folds
# every seed onto the PRNG's key space (SamplingParams).
Seed = Annotated[StrictInt, Field(ge=-(2**63), le=2**64 - 1)]
_TOKEN_KEY = re.compile(r"^[0-9]{1,10}$")


class _Schema(BaseModel):
    model_config = ConfigDict(extra="ignore", populate_by_name=True)


class StreamOptions(_Schema):
    include_usage: StrictBool = False


class SamplingFields(_Schema):
    """Fields chat and completions share."""

    model: StrictStr = Field(min_length=1)
    max_tokens: Annotated[StrictInt, Field(ge=0)] | None = None
    temperature: Annotated[Float, Field(ge=0.0, le=2.0)] | None = None
    top_p: Annotated[Float, Field(ge=0.0, le=1.0)] | None = None
    n: Annotated[StrictInt, Field(ge=1, le=16)] | None = None
    stop: StrictStr | list[StrictStr] | None = None
    seed: Seed | None = None
    presence_penalty: Annotated[Float, Field(ge=-2.0, le=2.0)] | None = None
    frequency_penalty: Annotated[Float, Field(ge=-2.0, le=2.0)] | None = None
    logit_bias: dict[str, Annotated[Float, Field(ge=-100.0, le=100.0)]] | None = None
    user: StrictStr | None = None
    stream: StrictBool | None = False
    stream_options: StreamOptions | None = None
    # Extensions (vLLM / llama.cpp spelling).
    top_k: Annotated[StrictInt, Field(ge=-1)] | None = None
    min_p: Annotated[Float, Field(ge=0.0, le=1.0)] | None = None
    repetition_penalty: Annotated[Float, Field(gt=0.0, le=10.0)] | None = None
    ignore_eos: StrictBool | None = None  # generate past EOS up to max_tokens (benchmarks)

    @field_validator("logit_bias")
    @classmethod
    def _token_id_keys(cls, value: dict[str, float] | None) -> dict[str, float] | None:
        # Keys are token ids as decimal strings (OpenAI's shape); the vocabulary bound is the
        # engine's check.
        for key in value or {}:
            if not _TOKEN_KEY.match(key):
                raise ValueError(f"keys must be token ids (decimal integers), got '{key[:32]}'")
        return value


class TextPart(_Schema):
    type: Literal["text"]
    text: StrictStr


class ChatMessage(_Schema):
    role: Literal["system", "developer", "user", "assistant", "tool", "function"]
    # Parts are validated in chat.py so a non-text part gets a message naming it.
    content: StrictStr | list[dict[str, Any]] | None = None
    name: StrictStr | None = None
    tool_calls: list[dict[str, Any]] | None = None  # checked in tools.py, naming the field
    tool_call_id: StrictStr | None = None
    function_call: Any = None


class FunctionDef(_Schema):
    name: StrictStr = Field(pattern=r"^[a-zA-Z0-9_.-]{1,64}$")
    description: StrictStr | None = None
    parameters: dict[str, Any] | None = None
    strict: StrictBool | None = None


class ToolDef(_Schema):
    type: Literal["function"]
    function: FunctionDef


class ChatCompletionRequest(SamplingFields):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: Annotated[StrictInt, Field(ge=0)] | None = None
    logprobs: StrictBool | None = False
    top_logprobs: Annotated[StrictInt, Field(ge=0, le=20)] | None = None
    tools: list[ToolDef] | None = None
    tool_choice: StrictStr | dict[str, Any] | None = None
    parallel_tool_calls: StrictBool | None = None
    response_format: dict[str, Any] | None = None
    chat_template_kwargs: dict[str, Any] | None = None  # vLLM's extension (enable_thinking)
    reasoning_effort: Any = None  # checked in server/effort.py, naming the levels


Prompt = StrictStr | list[StrictStr] | list[TokenId] | list[list[TokenId]]


class CompletionRequest(SamplingFields):
    prompt: Prompt
    echo: StrictBool | None = False
    logprobs: Annotated[StrictInt, Field(ge=0, le=20)] | None = None
    best_of: Annotated[StrictInt, Field(ge=1)] | None = None
    suffix: StrictStr | None = None


class EmbeddingRequest(_Schema):
    model: StrictStr = Field(min_length=1)
    input: Any = None  # checked in embeddings.py, to name the accepted forms in the error
    encoding_format: str = "float"
    dimensions: StrictInt | None = None


# Fields whose presence changes what the client expects; never silently ignored.
_UNSUPPORTED_CHAT = (
    "functions",
    "audio",
    "prediction",
    "web_search_options",
)


def unsupported_field(body: dict[str, Any], chat: bool) -> str | None:
    """The first field in `body` that mlxd cannot honour, or None."""
    if chat:
        for name in _UNSUPPORTED_CHAT:
            if body.get(name) not in (None, [], {}):
                return name
        if body.get("function_call") not in (None, "none", "auto"):
            return "function_call"
        modalities = body.get("modalities")
        if modalities is not None and modalities != ["text"]:
            return "modalities"
    else:
        if body.get("suffix") not in (None, ""):
            return "suffix"
        best_of, n = body.get("best_of"), body.get("n") or 1
        if best_of is not None and best_of != n and best_of != 1:
            return "best_of"
    return None
