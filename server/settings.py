"""The one settings table. Precedence: flags > MLXD_* environment > --config FILE > default.toml.

configs/default.toml holds every key's one default; each key below names its TOML place, its
environment variable (MLXD_<KEY> unless said otherwise) and its `mlxd serve` flag
(--<key-with-dashes> unless said otherwise). pydantic-settings reads the environment and checks
every value's type, whatever its source. tests/unit/test_settings.py walks default.toml and
proves each key is reachable both ways.
"""

from __future__ import annotations

import contextvars
import dataclasses
import os
import sys
from importlib import resources
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import Field, field_validator
from pydantic.fields import FieldInfo
from pydantic_settings import (
    BaseSettings,
    NoDecode,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
)

from engine.types import EngineConfig

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

DEFAULT_CONFIG = Path(str(resources.files("configs").joinpath("default.toml")))
CommaList = Annotated[list[str], NoDecode]  # "a,b" in the environment and on the command line


def key(
    table: str, name: str | None = None, env: str | None = None, flag: str | None = None
) -> Any:
    """A setting's TOML place ([table] name), and its env variable and flag where they differ."""
    extra = {"table": table, "toml": name, "env": env, "flag": flag}
    kwargs: dict[str, Any] = {"json_schema_extra": {k: v for k, v in extra.items() if v}}
    if env:
        kwargs["validation_alias"] = env
    return Field(**kwargs)


class Settings(BaseSettings):
    """Every key of configs/default.toml, typed. Fields have no defaults of their own."""

    model_config = SettingsConfigDict(
        env_prefix="MLXD_", populate_by_name=True, extra="ignore", case_sensitive=False
    )

    # [server]
    host: str = key("server")
    port: int = key("server")
    api_keys: CommaList = key("server", env="MLXD_API_KEY", flag="--api-key")
    cors_origins: CommaList = key("server")
    max_body_bytes: int = key("server")
    max_messages: int = key("server")
    max_stop_strings: int = key("server")
    log_level: Literal["debug", "info", "warning", "error"] = key("server")
    drain_timeout: float = key("server")
    # [models]
    models_dir: Path = key("models", "dir", env="MLXD_MODELS")
    default_model: str = key("models", "default", env="MLXD_MODEL", flag="--model")
    keep_alive: float = key("models")
    preload: CommaList = key("models")
    pinned: CommaList = key("models")
    memory_limit: int = key("models")
    weights_on_cpu: Literal["as_stored", "q8", "fp32"] = key("models")
    # Folders /api/create may read a server-side `from` path in; empty: none (clients upload the
    # file as a blob, as `mlxd import` and Ollama's clients do).
    import_dirs: CommaList = key("models")
    # [engine]
    max_num_seqs: int = key("engine")
    max_num_batched_tokens: int = key("engine")
    max_waiting: int = key("engine")
    max_context: int = key("engine")
    prefix_cache_bytes: int = key("engine")
    kv_fraction: float = key("engine")
    kv_chunk: int = key("engine")
    mlx_cache_limit: int = key("engine")
    idle_release: float = key("engine")
    default_max_tokens: int = key("engine")
    speculative: Literal["off", "on", "auto"] = key("engine")
    speculative_tokens: int = key("engine")
    # [distributed]
    distributed: Literal["", "tensor", "pipeline"] = key("distributed", "mode")
    dist_step_timeout: float = key("distributed", "step_timeout")

    @field_validator("api_keys", "cors_origins", "preload", "pinned", "import_dirs", mode="before")
    @classmethod
    def _comma_list(cls, value: Any) -> Any:
        if isinstance(value, str):
            return [v.strip() for v in value.split(",") if v.strip()]
        return value

    @field_validator("kv_chunk", "mlx_cache_limit", mode="after")
    @classmethod
    def _not_negative(cls, value: int, info: Any) -> int:
        if value < 0:
            raise ValueError(f"{info.field_name} must be 0 or more")
        return value

    @field_validator("speculative_tokens", mode="after")
    @classmethod
    def _draft_length(cls, value: int) -> int:
        if not 1 <= value <= 32:
            raise ValueError("speculative_tokens must be between 1 and 32")
        return value

    @field_validator("models_dir", mode="after")
    @classmethod
    def _expand(cls, value: Path) -> Path:
        return value.expanduser()

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        files = [TomlTables(settings_cls, DEFAULT_CONFIG)]
        config = _config_file.get()
        if config is not None:
            files.insert(0, TomlTables(settings_cls, config))
        return (init_settings, env_settings, *files)


def meta(field: FieldInfo) -> dict[str, str]:
    extra = field.json_schema_extra
    return dict(extra) if isinstance(extra, dict) else {}  # type: ignore[arg-type]


def env_name(name: str) -> str:
    """The environment variable of setting `name`."""
    return meta(Settings.model_fields[name]).get("env") or f"MLXD_{name.upper()}"


def flag_name(name: str) -> str:
    """The `mlxd serve` flag of setting `name`."""
    return meta(Settings.model_fields[name]).get("flag") or "--" + name.replace("_", "-")


def toml_place(name: str) -> tuple[str, str]:
    m = meta(Settings.model_fields[name])
    return m["table"], m.get("toml") or name


class TomlTables(PydanticBaseSettingsSource):
    """A TOML file of [server] / [models] / [engine] tables, mapped onto the flat fields."""

    def __init__(self, settings_cls: type[BaseSettings], path: Path):
        super().__init__(settings_cls)
        with open(path, "rb") as f:
            self.data = tomllib.load(f)

    def get_field_value(self, field: FieldInfo, field_name: str) -> tuple[Any, str, bool]:
        table, name = toml_place(field_name)
        value = self.data.get(table, {}).get(name)
        return value, field_name, False

    def __call__(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for name, field in self.settings_cls.model_fields.items():
            value, _, _ = self.get_field_value(field, name)
            if value is not None:
                out[name] = value
        return out


# The --config file while load_settings builds Settings (pydantic-settings picks sources per class).
_config_file: contextvars.ContextVar[Path | None] = contextvars.ContextVar(
    "mlxd_config_file", default=None
)


def load_settings(config: str | Path | None = None, **overrides: Any) -> Settings:
    """Build the settings; `overrides` are flags (None values are ignored). A bad value of any
    source raises pydantic's ValidationError (a ValueError) naming the key."""
    token = _config_file.set(Path(config).expanduser() if config else None)
    try:
        s = Settings(**{k: v for k, v in overrides.items() if v is not None})
    finally:
        _config_file.reset(token)
    key_file = os.environ.get("MLXD_API_KEY_FILE")
    if key_file:
        keys = Path(key_file).expanduser().read_text().split()
        s.api_keys = [*s.api_keys, *keys]
    return s


def add_flags(parser: Any) -> None:
    """One `mlxd serve` flag per setting (a string for lists: comma separated)."""
    for name, field in Settings.model_fields.items():
        kind = field.annotation if field.annotation in (int, float) else str
        table, toml = toml_place(name)
        parser.add_argument(
            flag_name(name),
            dest=name,
            type=kind,
            default=None,
            help=f"[{table}] {toml} in the config ({env_name(name)})",
        )


def engine_config(s: Settings) -> EngineConfig:
    """The engine's share of the settings."""
    names = {f.name for f in dataclasses.fields(EngineConfig)}
    return EngineConfig(**{n: getattr(s, n) for n in names})
