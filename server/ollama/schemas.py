"""Request bodies of the Ollama API (pydantic), parsed leniently like Ollama: unknown keys ignored."""

from __future__ import annotations

from typing import Any, TypeVar

from fastapi import Request
from pydantic import BaseModel, ConfigDict, Field, StrictBool, field_validator, model_validator

from server.errors import APIError
from server.errors import parse_body as parse_json_body


class _Body(BaseModel):
    model_config = ConfigDict(extra="ignore", populate_by_name=True)

    @model_validator(mode="before")
    @classmethod
    def _nulls_unset(cls, data: Any) -> Any:
        # Ollama's Go decoder leaves a field at its default on a JSON null.
        if isinstance(data, dict):
            return {key: value for key, value in data.items() if value is not None}
        return data


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


# Ollama's numeric options (api/types.go): JSON numbers, as Ollama's Go decoder wants them.
_INT_OPTIONS = {
    "num_ctx",
    "num_predict",
    "num_keep",
    "num_batch",
    "num_gpu",
    "main_gpu",
    "num_thread",
    "top_k",
    "repeat_last_n",
    "seed",
}
_FLOAT_OPTIONS = {
    "temperature",
    "top_p",
    "min_p",
    "typical_p",
    "repeat_penalty",
    "presence_penalty",
    "frequency_penalty",
    "tfs_z",
    "mirostat_tau",
    "mirostat_eta",
}
INT_RANGE = (-(2**63), 2**64 - 1)  # int64 as Ollama reads them, and unsigned 64-bit seeds


def check_options(options: dict[str, Any]) -> dict[str, Any]:
    """Options with a wrong type are refused here, naming the option, before any int() or float()
    conversion downstream can fail on them (NaN and infinities never parse: server/errors.py)."""
    for key, value in options.items():
        if value is None:
            continue
        number = isinstance(value, int | float) and not isinstance(value, bool)
        if key in _INT_OPTIONS:
            if not number or value != int(value) or not INT_RANGE[0] <= value <= INT_RANGE[1]:
                raise ValueError(f"option '{key}' must be an integer")
        elif key in _FLOAT_OPTIONS and not number:
            raise ValueError(f"option '{key}' must be a number")
        elif key == "stop" and not (
            isinstance(value, str)
            or (isinstance(value, list) and all(isinstance(v, str) for v in value))
        ):
            raise ValueError("option 'stop' must be a string or a list of strings")
    return options


class _Generative(_Named):
    stream: StrictBool = True  # "false" as a string is Go's unmarshal error, not false
    format: Any = None
    options: dict[str, Any] = Field(default_factory=dict)
    keep_alive: float | str | None = None
    think: bool | str | None = None
    # A prompt past num_ctx is cut to fit unless truncate is false (then 400). Ollama's shift
    # (slide the context when the answer reaches its end) is accepted; the answer stops there.
    truncate: StrictBool | None = None
    shift: StrictBool | None = None

    @field_validator("options")
    @classmethod
    def _typed_options(cls, value: dict[str, Any]) -> dict[str, Any]:
        return check_options(value)


class ChatBody(_Generative):
    messages: list[Message] = Field(default_factory=list)
    tools: list[dict[str, Any]] | None = None


class GenerateBody(_Generative):
    prompt: str = ""
    suffix: str = ""
    system: str | None = None
    template: str | None = None
    context: list[int] | None = None
    raw: StrictBool = False
    images: list[str] | None = None


class EmbedBody(_Named):
    input: str | list[str] = ""
    truncate: StrictBool = True
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
    stream: StrictBool = True  # "false" as a string is Go's unmarshal error, not false
    insecure: bool = False


class CreateBody(_Named):
    stream: StrictBool = True  # "false" as a string is Go's unmarshal error, not false
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
