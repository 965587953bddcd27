"""Logging for the server: a configurable level and one structured line per HTTP request.

`configure_logging(level, fmt)` sets up the root "mlxd" logger once per process (idempotent);
`log_request(entry)` writes one line per finished request to the "mlxd.access" logger. Lines are
`key=value` pairs (fmt="text", the default) or one JSON object (fmt="json"), so both people and
log shippers can read them. Values never contain a traceback, a path or a memory address.
"""

from __future__ import annotations

import contextvars
import json
import logging
import sys
from dataclasses import asdict, dataclass, field

ACCESS_LOGGER = "mlxd.access"
# The id of the HTTP request being served (set by RequestIdMiddleware), for log lines written
# deep inside a handler, such as an unexpected error's stack trace.
REQUEST_ID: contextvars.ContextVar[str] = contextvars.ContextVar("mlxd_request_id", default="-")
_LEVELS = {"critical", "error", "warning", "info", "debug", "trace"}
_HANDLER_NAME = "mlxd-stderr"


@dataclass
class RequestLogEntry:
    """What one finished request leaves in the log (durations in milliseconds)."""

    request_id: str
    method: str
    path: str
    status: int
    outcome: str
    model: str = ""
    prompt_tokens: int = 0
    cached_tokens: int = 0
    completion_tokens: int = 0
    queue_ms: float = 0.0
    ttft_ms: float = 0.0
    prefill_tps: float = 0.0
    decode_tps: float = 0.0
    total_ms: float = 0.0
    error: str = ""
    extra: dict[str, str] = field(default_factory=dict)

    def fields(self) -> dict[str, object]:
        """The entry as an ordered dict, rounding floats and dropping empty optional values."""
        out: dict[str, object] = {}
        for key, value in asdict(self).items():
            if key == "extra":
                out.update(value)
            elif isinstance(value, float):
                out[key] = round(value, 1)
            elif value != "" or key in ("request_id", "path", "outcome"):
                out[key] = value
        return out


def _quote(value: object) -> str:
    text = str(value)
    if text == "" or any(c in text for c in ' "=\n\t'):
        return json.dumps(text)  # quotes and escapes, so one entry stays one line
    return text


def format_entry(entry: RequestLogEntry, fmt: str = "text") -> str:
    """Render one entry as a single line: `key=value ...` or a JSON object."""
    data = entry.fields()
    if fmt == "json":
        return json.dumps({"event": "request", **data}, separators=(",", ":"))
    return " ".join(f"{k}={_quote(v)}" for k, v in data.items())


class _State:
    fmt = "text"


def parse_level(level: str | int) -> int:
    """'debug' / 'INFO' / 10 -> a logging level; 'trace' maps to DEBUG. Raises ValueError."""
    if isinstance(level, int):
        return level
    name = level.strip().lower()
    if name not in _LEVELS:
        raise ValueError(f"unknown log level '{level}' (one of {', '.join(sorted(_LEVELS))})")
    return logging.DEBUG if name == "trace" else getattr(logging, name.upper())


def configure_logging(level: str | int = "info", fmt: str = "text") -> None:
    """Send the "mlxd" loggers to stderr at `level`; call again to change the level or format."""
    if fmt not in ("text", "json"):
        raise ValueError(f"unknown log format '{fmt}' (text or json)")
    _State.fmt = fmt
    root = logging.getLogger("mlxd")
    root.setLevel(parse_level(level))
    if not any(h.get_name() == _HANDLER_NAME for h in root.handlers):
        handler = logging.StreamHandler(sys.stderr)
        handler.set_name(_HANDLER_NAME)
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s %(message)s"))
        root.addHandler(handler)
    root.propagate = False  # uvicorn configures the root logger too; don't print lines twice


def log_request(entry: RequestLogEntry) -> None:
    """Write the request's line at INFO (WARNING for 5xx responses and engine errors)."""
    logger = logging.getLogger(ACCESS_LOGGER)
    level = logging.WARNING if entry.status >= 500 or entry.outcome == "error" else logging.INFO
    if logger.isEnabledFor(level):
        logger.log(level, format_entry(entry, _State.fmt))
