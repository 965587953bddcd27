"""The only place that maps exceptions to HTTP error responses, in each API's shape.

OpenAI shape: {"error": {"message", "type", "param", "code"}}; Ollama shape: {"error": "<message>"};
Anthropic shape: {"type": "error", "error": {"type", "message"}}. The shape is chosen by path:
/api/* is Ollama's, /v1/messages* Anthropic's, everything else OpenAI's. No response ever carries a
traceback, a filesystem path or a memory address: unexpected exceptions become a generic 500.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Mapping, Sequence
from typing import Any, Literal, TypeVar

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from engine.errors import (
    ContextLengthError,
    EngineError,
    EngineShuttingDownError,
    EngineUnavailableError,
    ImportFailedError,
    InsufficientMemoryError,
    InvalidModelNameError,
    InvalidRequestError,
    ModelError,
    ModelLoadError,
    ModelNotFoundError,
    QueueFullError,
)
from server.logging_setup import REQUEST_ID

log = logging.getLogger("mlxd.server")

_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    405: "invalid_request_error",
    413: "invalid_request_error",
    429: "rate_limit_error",
    500: "server_error",
    503: "server_error",
}

# Anthropic's documented error types by status; its "overloaded" status is 529, not 503.
_ANTHROPIC_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    413: "request_too_large",
    429: "rate_limit_error",
    500: "api_error",
    529: "overloaded_error",
}


class APIError(Exception):
    """An error with everything an API response needs. Raise it from any handler."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        param: str | None = None,
        code: str | None = None,
        type: str | None = None,
        retry_after: float | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code
        self.type = type or _TYPES.get(status, "invalid_request_error")
        self.retry_after = retry_after

    def openai_body(self) -> dict[str, Any]:
        return {
            "error": {
                "message": self.message,
                "type": self.type,
                "param": self.param,
                "code": self.code,
            }
        }

    def ollama_body(self) -> dict[str, Any]:
        return {"error": self.message}

    def anthropic_status(self) -> int:
        return 529 if self.status == 503 else self.status

    def anthropic_body(self) -> dict[str, Any]:
        status = self.anthropic_status()
        default = "invalid_request_error" if status < 500 else "api_error"
        kind = _ANTHROPIC_TYPES.get(status, default)
        return {"type": "error", "error": {"type": kind, "message": self.message}}

    def headers(self) -> dict[str, str]:
        if self.retry_after is None:
            return {}
        return {"Retry-After": str(max(1, round(self.retry_after)))}


def context_error(exc: ContextLengthError, param: str | None = "messages") -> APIError:
    """The 400 for a prompt plus completion budget that does not fit the model's context."""
    return APIError(
        400,
        f"{exc} Please reduce the length of the prompt or the completion.",
        param=param,
        code="context_length_exceeded",
    )


def from_exception(exc: BaseException) -> APIError:
    """Map any exception to an APIError; unknown ones become a generic 500 (logged, not shown)."""
    if isinstance(exc, APIError):
        return exc
    if isinstance(exc, ModelNotFoundError):
        return APIError(404, str(exc), param="model", code="model_not_found")
    if isinstance(exc, InvalidModelNameError):
        return APIError(400, str(exc), param="model", code="invalid_model_name")
    if isinstance(exc, InvalidRequestError):
        return APIError(400, str(exc), param=exc.param, code="invalid_request")
    if isinstance(exc, ContextLengthError):
        return context_error(exc)
    if isinstance(exc, QueueFullError):
        msg = str(exc) or "the server is overloaded; retry later"
        return APIError(429, msg, code="queue_full", retry_after=exc.retry_after)
    if isinstance(exc, InsufficientMemoryError):
        msg = str(exc) or "not enough memory to serve this request; retry later"
        return APIError(503, msg, code="insufficient_memory", retry_after=exc.retry_after)
    if isinstance(exc, EngineShuttingDownError):
        return APIError(503, str(exc), code="shutting_down", retry_after=exc.retry_after)
    if isinstance(exc, EngineUnavailableError):
        return APIError(503, str(exc), code="engine_unavailable", retry_after=exc.retry_after)
    if isinstance(exc, ModelLoadError):
        return APIError(503, str(exc), param="model", code="model_load_failed", retry_after=5)
    if isinstance(exc, ImportFailedError):
        return APIError(400, str(exc) or "import failed", code="import_failed")
    if isinstance(exc, ModelError | EngineError):
        # Their messages are written to be shown to users (see engine/errors.py).
        return APIError(500, str(exc) or type(exc).__name__, code="engine_error")
    # Our bug, not the client's: the whole stack trace goes to the log with the request id.
    log.error("unhandled error in request %s", REQUEST_ID.get(), exc_info=exc)
    return APIError(500, "internal server error", code="internal_error")


# An error shape (and a stream framing, see server/jobs.py).
API = Literal["openai", "ollama", "anthropic", "responses"]


def api_of_path(path: str) -> API:
    """/api/* and / are Ollama's, /v1/messages* Anthropic's; everything else (/v1, /health,
    /metrics) answers as OpenAI."""
    if path == "/v1/messages" or path.startswith("/v1/messages/"):
        return "anthropic"
    return "ollama" if path in ("/", "/api") or path.startswith("/api/") else "openai"


def error_body(api: API, exc: BaseException) -> dict[str, Any]:
    """`exc` as `api`'s JSON error object (a response body, or a stream's last frame)."""
    err = from_exception(exc)
    if api == "anthropic":
        return err.anthropic_body()
    if api == "responses":  # only in streams: its HTTP errors have OpenAI's shape (api_of_path)
        return {"type": "error", "code": err.code, "message": err.message, "param": err.param}
    return err.ollama_body() if api == "ollama" else err.openai_body()


def error_response(path: str, exc: BaseException) -> JSONResponse:
    """The JSON error response for `exc`, in the shape of the API that `path` belongs to."""
    err = from_exception(exc)
    api = api_of_path(path)
    status = err.anthropic_status() if api == "anthropic" else err.status
    return JSONResponse(error_body(api, err), status_code=status, headers=err.headers())


# --- request validation ----------------------------------------------------------------------


_TAGS = {"str", "int", "float", "bool", "dict", "list", "none", "bytes"}


def _is_schema_tag(item: str) -> bool:
    """pydantic inserts union members and validators into locations ('prompt', 'list[int]', 0)."""
    return item in _TAGS or "[" in item or item.startswith(("function-", "constrained-", "tagged-"))


def _param(loc: tuple[Any, ...]) -> str | None:
    """pydantic's error location as an OpenAI `param`: ('messages', 0, 'content') -> messages[0].content."""
    parts: list[str] = []
    for item in loc:
        if item == "body":
            continue
        if isinstance(item, int):
            parts.append(f"[{item}]")
        elif isinstance(item, str) and not _is_schema_tag(item):
            parts.append(f".{item}" if parts else item)
    return "".join(parts) or None


def _most_specific(errors: Sequence[Mapping[str, Any]]) -> Mapping[str, Any]:
    """The first error, or, when it is a union member's type mismatch, the error of the same
    field from the member whose type did match: [-1] as a prompt is a token id below 0, not
    "Input should be a valid string"."""
    first = errors[0]
    if not str(first.get("type", "")).endswith("_type"):
        return first
    field = _param(tuple(first.get("loc", ()))) or ""
    for e in errors[1:]:
        param = _param(tuple(e.get("loc", ()))) or ""
        inside = param == field or param.startswith((field + "[", field + "."))
        if inside and not str(e.get("type", "")).endswith("_type"):
            return e
    return first


def validation_error(errors: Sequence[Mapping[str, Any]]) -> APIError:
    """A 400 for the first field pydantic rejects, naming it (`param`) and saying why."""
    if not errors:
        return APIError(400, "invalid request body")
    first = _most_specific(errors)
    param = _param(tuple(errors[0].get("loc", ())))  # the field, as OpenAI names it
    loc = tuple(first.get("loc", ()))
    kind = first.get("type", "")
    if kind == "json_invalid":
        return APIError(400, "request body is not valid JSON", code="invalid_json")
    if kind == "missing":
        missing = _param(loc) or param
        return APIError(
            400,
            f"missing required parameter: '{missing}'",
            param=missing,
            code="missing_required_parameter",
        )
    msg = str(first.get("msg", "invalid value"))
    where = f"'{_param(loc) or param}'" if param else "request body"
    return APIError(400, f"invalid value for {where}: {msg}", param=param, code="invalid_value")


M = TypeVar("M", bound=BaseModel)


def read_json(raw: bytes) -> dict[str, Any]:
    """A request body as a JSON object; non-UTF-8, malformed JSON or a non-object is a 400."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise APIError(400, "request body is not valid UTF-8", code="invalid_encoding") from None
    try:
        data = json.loads(text, parse_constant=_no_constant, parse_float=_finite_float)
    except json.JSONDecodeError as e:
        raise APIError(
            400, f"request body is not valid JSON: {e.msg} at position {e.pos}", code="invalid_json"
        ) from None
    except ValueError as e:  # NaN / Infinity, an integer of thousands of digits
        msg = str(e).split(";")[0][:120]
        raise APIError(400, f"request body is not valid JSON: {msg}", code="invalid_json") from None
    except RecursionError:
        raise APIError(
            400, "request body is not valid JSON: nested too deeply", code="invalid_json"
        ) from None
    if not isinstance(data, dict):
        raise APIError(400, "request body must be a JSON object", code="invalid_json")
    bad = _unencodable(data, "")
    if bad is not None:
        raise APIError(
            400,
            f"invalid value for '{bad or 'request body'}': the string holds a lone UTF-16 "
            "surrogate (an escape like \\ud800 without its pair), which is not valid Unicode",
            param=bad or None,
            code="invalid_encoding",
        )
    return data


class _NotFinite(ValueError):
    pass


def _no_constant(name: str) -> Any:
    # Python's json reads NaN and Infinity, which JSON does not have; no field can use them.
    raise _NotFinite(f"'{name}' is not a JSON number")


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise _NotFinite(f"the number {text[:32]} is out of range")
    return value


def _unencodable(value: Any, where: str) -> str | None:
    """The path ('messages[0].content') of the first string, or key, holding a lone surrogate.

    JSON may escape one (\\ud800); Python decodes it into a str no tokenizer or UTF-8 encoder
    takes, so it is refused here, once, for every field of every route."""
    stack: list[tuple[Any, str]] = [(value, where)]
    while stack:
        item, path = stack.pop()
        if isinstance(item, str):
            if not _is_utf8(item):
                return path
        elif isinstance(item, dict):
            for key, sub in item.items():
                child = f"{path}.{key}" if path else str(key)
                if not _is_utf8(key):
                    return path
                stack.append((sub, child))
        elif isinstance(item, list):
            stack.extend((sub, f"{path}[{i}]") for i, sub in enumerate(item))
    return None


def _is_utf8(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def validate(data: dict[str, Any], schema: type[M]) -> M:
    """`data` as `schema`; the first validation failure is a 400 naming the field."""
    try:
        return schema.model_validate(data)
    except ValidationError as e:
        raise validation_error(e.errors(include_url=False, include_input=False)) from None


def parse_body(raw: bytes, schema: type[M]) -> M:
    """Decode a JSON request body into `schema`; every failure is a 400 APIError with `param` set."""
    return validate(read_json(raw), schema)


# --- handlers --------------------------------------------------------------------------------


ERROR_STATE = "mlxd_error"  # request.state key: the exception that answered the request


def install_error_handlers(app: FastAPI) -> None:
    """Route every error through error_response (FastAPI's 422 and {"detail"} shapes never leak).
    The exception stays on the request's state for the metrics (rejections by reason)."""

    async def on_any(request: Request, exc: Exception) -> JSONResponse:
        setattr(request.state, ERROR_STATE, exc)
        return error_response(request.url.path, exc)

    async def on_validation(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, RequestValidationError)
        return error_response(request.url.path, validation_error(list(exc.errors())))

    async def on_http(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, StarletteHTTPException)
        if exc.status_code == 404:
            err = APIError(
                404, f"no route for {request.method} {request.url.path}", code="not_found"
            )
        elif exc.status_code == 405:
            err = APIError(
                405,
                f"method {request.method} not allowed on {request.url.path}",
                code="method_not_allowed",
            )
        else:
            err = APIError(exc.status_code, str(exc.detail))
        resp = error_response(request.url.path, err)
        if exc.headers:
            resp.headers.update(exc.headers)
        return resp

    app.add_exception_handler(APIError, on_any)
    app.add_exception_handler(EngineError, on_any)
    app.add_exception_handler(ModelError, on_any)
    app.add_exception_handler(RequestValidationError, on_validation)
    app.add_exception_handler(StarletteHTTPException, on_http)
    app.add_exception_handler(Exception, on_any)
