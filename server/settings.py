"""Settings: configs/default.toml < --config FILE < MLXD_* environment < command-line flags."""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from engine.types import EngineConfig

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

DEFAULT_CONFIG = Path(__file__).resolve().parent.parent / "configs" / "default.toml"


@dataclass
class Settings:
    # [server]
    host: str = "127.0.0.1"
    port: int = 11434
    api_keys: list[str] = field(default_factory=list)
    cors_origins: list[str] = field(default_factory=list)
    max_body_bytes: int = 8 * 1024 * 1024
    max_messages: int = 2048
    max_stop_strings: int = 16
    log_level: str = "info"
    drain_timeout: float = 10.0
    # [models]
    models_dir: Path = Path("~/.mlxd/models")
    default_model: str = "smollm2:135m"
    keep_alive: float = 300.0
    preload: list[str] = field(default_factory=list)
    pinned: list[str] = field(default_factory=list)
    memory_limit: int = 0
    weights_on_cpu: str = "fp32"
    # [engine]
    max_num_seqs: int = 32
    max_num_batched_tokens: int = 2048
    max_waiting: int = 256
    max_context: int = 0
    prefix_cache_bytes: int = 256 * 1024 * 1024
    kv_fraction: float = 0.5


# TOML (table, key) -> Settings attribute, where the names differ.
_RENAMES = {("models", "dir"): "models_dir", ("models", "default"): "default_model"}
# Environment variable -> Settings attribute.
_ENV = {
    "MLXD_HOST": "host",
    "MLXD_PORT": "port",
    "MLXD_MODELS": "models_dir",
    "MLXD_MODEL": "default_model",
    "MLXD_API_KEY": "api_keys",
    "MLXD_CORS_ORIGINS": "cors_origins",
    "MLXD_LOG_LEVEL": "log_level",
    "MLXD_DRAIN_TIMEOUT": "drain_timeout",
    "MLXD_KEEP_ALIVE": "keep_alive",
    "MLXD_MEMORY_LIMIT": "memory_limit",
    "MLXD_WEIGHTS_ON_CPU": "weights_on_cpu",
    "MLXD_MAX_NUM_SEQS": "max_num_seqs",
    "MLXD_MAX_WAITING": "max_waiting",
}


def _coerce(name: str, value: Any) -> Any:
    kind = {f.name: f.type for f in fields(Settings)}[name]
    if isinstance(value, str):
        if "list" in str(kind):
            return [v.strip() for v in value.split(",") if v.strip()]
        if kind in ("int", int):
            return int(value)
        if kind in ("float", float):
            return float(value)
    if name == "models_dir":
        return Path(value).expanduser()
    return value


def _apply_toml(s: Settings, path: Path) -> None:
    with open(path, "rb") as f:
        data = tomllib.load(f)
    known = {f.name for f in fields(Settings)}
    for table, values in data.items():
        if not isinstance(values, dict):
            continue
        for key, value in values.items():
            attr = _RENAMES.get((table, key), key)
            if attr in known:
                setattr(s, attr, _coerce(attr, value))


def load_settings(config: str | Path | None = None, **overrides: Any) -> Settings:
    """Build the settings; `overrides` are flags (None values are ignored)."""
    s = Settings()
    if (
        DEFAULT_CONFIG.exists()
    ):  # absent in a non-editable install: the dataclass holds the same defaults
        _apply_toml(s, DEFAULT_CONFIG)
    if config:
        _apply_toml(s, Path(config).expanduser())
    for env, attr in _ENV.items():
        if os.environ.get(env):
            setattr(s, attr, _coerce(attr, os.environ[env]))
    key_file = os.environ.get("MLXD_API_KEY_FILE")
    if key_file:
        keys = Path(key_file).expanduser().read_text().split()
        s.api_keys = [*s.api_keys, *keys]
    for attr, value in overrides.items():
        if value is not None:
            setattr(s, attr, _coerce(attr, value))
    s.models_dir = Path(s.models_dir).expanduser()
    return s


def engine_config(s: Settings) -> EngineConfig:
    """The engine's share of the settings."""
    names = {f.name for f in fields(EngineConfig)}
    return EngineConfig(**{n: getattr(s, n) for n in names})
