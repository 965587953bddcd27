"""Request bodies of the Ollama API (pydantic), parsed leniently like Ollama: unknown keys ignored."""

from __future__ import annotations

from typing import Any, TypeVar

from fastapi import Request
from pydantic import BaseModel, ConfigDict, Field, model_validator

from server.errors import APIError
from server.errors import parse_body as parse_json_body


class _Body(BaseModel):
    model_config = ConfigDict(extra="ignore", populate_by_name=True)


class _Named(_Body):
    model: str = ""

    @model_validator(mode="before")
    @classmethod
    def _legacy_name(cls, data: Any) -> Any:
        # Older clients send "name" where newer ones send "model".
        if isinstance(data, dict) and not data.get("model") and data.get("name"):
            data = {**data, "model": data["name"]}
        return data


class Message(_Body):
    role: str
    content: str = ""
    images: list[str] | None = None
    tool_calls: list[dict[str, Any]] | None = None
    tool_name: str | None = None
    thinking: str | None = None


class _Generative(_Named):
    stream: bool = True
    format: Any = None
    options: dict[str, Any] = Field(default_factory=dict)
    keep_alive: float | str | None = None
    think: bool | str | None = None


class ChatBody(_Generative):
    messages: list[Message] = Field(default_factory=list)
    tools: list[dict[str, Any]] | None = None


class GenerateBody(_Generative):
    prompt: str = ""
    suffix: str = ""
    system: str | None = None
    template: str | None = None
    context: list[int] | None = None
    raw: bool = False
    images: list[str] | None = None


class EmbedBody(_Named):
    input: str | list[str] = ""
    truncate: bool = True
    options: dict[str, Any] = Field(default_factory=dict)
    keep_alive: float | str | None = None
    dimensions: int | None = None


class EmbeddingsBody(_Named):
    prompt: str = ""
    options: dict[str, Any] = Field(default_factory=dict)
    keep_alive: float | str | None = None


class ShowBody(_Named):
    verbose: bool = False


class PullBody(_Named):
    stream: bool = True
    insecure: bool = False


class CreateBody(_Named):
    stream: bool = True
    from_: str | None = Field(default=None, alias="from")
    files: dict[str, str] | None = None
    modelfile: str | None = None
    quantize: str | None = None
    template: str | None = None
    system: str | None = None
    parameters: dict[str, Any] | None = None
    adapters: dict[str, str] | None = None
    messages: list[dict[str, Any]] | None = None
    license: str | list[str] | None = None


class CopyBody(_Body):
    source: str = ""
    destination: str = ""


class DeleteBody(_Named):
    pass


B = TypeVar("B", bound=BaseModel)


async def parse_body(request: Request, kind: type[B], require_model: bool = True) -> B:
    """Read and validate a JSON body (server.errors.parse_body); problems are 400 errors."""
    raw = await request.body()
    if not raw.strip():
        raise APIError(400, "missing request body")
    body = parse_json_body(raw, kind)
    if require_model and not getattr(body, "model", "x"):
        raise APIError(400, "model is required")
    return body
