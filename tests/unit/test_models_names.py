"""Model names: grammar, folder mapping both ways, and every path-escape attempt refused."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from models.errors import InvalidModelNameError
from models.names import folder_to_name, model_dir, name_to_folder, normalize_name, parse_name


@pytest.mark.parametrize(
    ("name", "family", "tag"),
    [
        ("smollm2:135m", "smollm2", "135m"),
        ("llama3", "llama3", "latest"),
        ("a.b_c-d:v1.5", "a.b_c-d", "v1.5"),
    ],
)
def test_parse_valid_names(name: str, family: str, tag: str) -> None:
    assert parse_name(name) == (family, tag)


@pytest.mark.parametrize(
    "bad",
    [
        "",
        "../x",
        "..",
        "a/../../b",
        "/etc/passwd",
        "a/b",
        "a\\b",
        "x%2Fy",
        "x%2e%2e",
        "..%2F",
        "Upper",
        "a:b:c",
        "a:",
        ":tag",
        "-lead",
        "a--b",
        "a b",
        "a\x00b",
        "x" * 129,
        "~root",
    ],
)
def test_invalid_names_are_refused(bad: str) -> None:
    with pytest.raises(InvalidModelNameError):
        parse_name(bad)


@pytest.mark.parametrize("name", ["smollm2:135m", "qwen3:0.6b-4bit", "plain", "m.x_y-z:t"])
def test_folder_mapping_round_trips(name: str) -> None:
    folder = name_to_folder(name)
    assert "/" not in folder and ":" not in folder
    assert normalize_name(folder_to_name(folder)) == normalize_name(name)


def test_known_folder_names() -> None:
    assert name_to_folder("smollm2:135m") == "smollm2--135m"
    assert name_to_folder("smollm2:latest") == name_to_folder("smollm2") == "smollm2"
    assert folder_to_name("smollm2--135m") == "smollm2:135m"


def test_model_dir_stays_inside(tmp_path: Path) -> None:
    assert model_dir(tmp_path, "a:b") == tmp_path.resolve() / "a--b"
    with pytest.raises(InvalidModelNameError):
        model_dir(tmp_path, "../escape")


def test_symlink_out_of_models_dir_is_refused(tmp_path: Path) -> None:
    root = tmp_path / "models"
    root.mkdir()
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    os.symlink(outside, root / "evil")
    with pytest.raises(InvalidModelNameError, match="outside"):
        model_dir(root, "evil")
    os.symlink(root / "real", root / "inside")  # a link within the dir is fine
    assert model_dir(root, "inside").name == "inside"
