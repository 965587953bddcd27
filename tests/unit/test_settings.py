"""The one settings table: every key of configs/default.toml is reachable from the environment
variable and the `mlxd serve` flag its comment documents, with its type checked."""

from __future__ import annotations

import re
import sys
from pathlib import Path
from typing import Any

import pytest

from server.cli import build_parser
from server.settings import DEFAULT_CONFIG, Settings, env_name, flag_name, load_settings

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

_LINE = re.compile(r"^(\w+)\s*=.*#\s*(MLXD_\w+),\s*(--[\w-]+)")


def documented() -> list[tuple[str, str, str, str]]:
    """(table, key, env variable, flag) for each key, as default.toml's comments name them."""
    out, table = [], ""
    for line in DEFAULT_CONFIG.read_text().splitlines():
        if line.startswith("["):
            table = line.strip("[] ")
        elif m := _LINE.match(line):
            out.append((table, m.group(1), m.group(2), m.group(3)))
    return out


def field_of(table: str, key: str) -> str:
    for name, field in Settings.model_fields.items():
        extra = field.json_schema_extra
        assert isinstance(extra, dict)
        if extra["table"] == table and extra.get("toml", name) == key:
            return name
    raise AssertionError(f"[{table}] {key} has no setting")


def other_value(value: Any) -> tuple[str, Any]:
    """A value unlike the default, as text (env, flag) and as the parsed setting compares."""
    if isinstance(value, bool):
        raise AssertionError("no boolean settings expected")
    if isinstance(value, int | float) and not isinstance(value, bool):
        return "7", 7
    if isinstance(value, list):
        return "a,b", ["a", "b"]
    if isinstance(value, Path):
        return "/tmp/mlxd-settings-test", Path("/tmp/mlxd-settings-test")
    return {"info": "debug", "as_stored": "fp32", "auto": "off", "": "tensor"}.get(
        value, "other-value"
    ), None


def test_every_key_is_documented_and_in_the_table() -> None:
    with open(DEFAULT_CONFIG, "rb") as f:
        data = tomllib.load(f)
    keys = {(t, k) for t, table in data.items() for k in table}
    docs = documented()
    assert {(t, k) for t, k, _, _ in docs} == keys  # every key carries its env and flag
    assert {field_of(t, k) for t, k in keys} == set(Settings.model_fields)  # no setting unlisted


@pytest.mark.parametrize(("table", "key", "env", "flag"), documented())
def test_key_reachable_from_env_and_flag(
    table: str, key: str, env: str, flag: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    name = field_of(table, key)
    assert env_name(name) == env and flag_name(name) == flag
    for var in [env_name(n) for n in Settings.model_fields]:
        monkeypatch.delenv(var, raising=False)
    default = getattr(load_settings(), name)
    text, parsed = other_value(default)
    expected = parsed if parsed is not None else text

    monkeypatch.setenv(env, text)
    assert getattr(load_settings(), name) == expected != default
    monkeypatch.delenv(env)

    args = build_parser().parse_args(["serve", flag, text])
    flags = {n: getattr(args, n) for n in Settings.model_fields}
    assert getattr(load_settings(None, **flags), name) == expected


def test_bad_values_are_refused_naming_the_key(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MLXD_MAX_NUM_BATCHED_TOKENS", "lots")
    with pytest.raises(ValueError, match="max_num_batched_tokens"):
        load_settings()
    monkeypatch.delenv("MLXD_MAX_NUM_BATCHED_TOKENS")
    with pytest.raises(ValueError, match="log_level"):
        load_settings(log_level="loud")
    for name in ("kv_chunk", "mlx_cache_limit"):  # a negative one reached MLX or the KV sums
        with pytest.raises(ValueError, match=f"{name} must be 0 or more"):
            load_settings(**{name: -1})
    with pytest.raises(ValueError, match="speculative_tokens must be between 1 and 32"):
        load_settings(speculative_tokens=33)


def test_precedence_flag_over_env_over_config_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = tmp_path / "mlxd.toml"
    config.write_text("[engine]\nmax_waiting = 5\nmax_num_seqs = 6\n[server]\nport = 1234\n")
    monkeypatch.setenv("MLXD_MAX_NUM_SEQS", "9")
    monkeypatch.delenv("MLXD_PORT", raising=False)
    s = load_settings(config, port=4321)
    assert (s.max_waiting, s.max_num_seqs, s.port) == (5, 9, 4321)
    assert load_settings().max_waiting == 256  # the file applied to that call only
