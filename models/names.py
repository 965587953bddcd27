"""Model names: `family:tag` (Ollama style) or a plain folder name, and their folders on disk.

Grammar: lowercase letters, digits and `._-`, at most one `:`, at most 128 characters, starting
with a letter or digit. `family` alone means `family:latest`. A name maps to one folder directly
inside the models dir (`smollm2:135m` -> `smollm2--135m`) and back; nothing a user types can reach
a path outside that dir.
"""

from __future__ import annotations

import re
import urllib.parse
from pathlib import Path

from models.errors import InvalidModelNameError

MAX_NAME_LEN = 128
DEFAULT_TAG = "latest"
TAG_SEP = "--"  # a name's ':' in its folder name; '--' cannot occur in a valid family or tag

_PART = r"[a-z0-9](?:[a-z0-9._]|-(?!-))*"  # no '--' so that folder names stay reversible
_NAME_RE = re.compile(rf"^(?P<family>{_PART})(?::(?P<tag>{_PART}))?$")


def parse_name(name: str) -> tuple[str, str]:
    """Split a validated name into (family, tag); the tag defaults to `latest`."""
    if not isinstance(name, str) or not name:
        raise InvalidModelNameError(str(name), "empty model name")
    if len(name) > MAX_NAME_LEN:
        raise InvalidModelNameError(name[:40] + "...", f"model name longer than {MAX_NAME_LEN}")
    decoded = urllib.parse.unquote(name)
    if decoded != name or "%" in name:
        raise InvalidModelNameError(name, "encoded characters are not allowed in a model name")
    if "/" in name or "\\" in name or "\x00" in name:
        raise InvalidModelNameError(name, "path separators are not allowed in a model name")
    if ".." in name:
        raise InvalidModelNameError(name, "'..' is not allowed in a model name")
    if name != name.lower():
        raise InvalidModelNameError(name, "model names are lowercase")
    m = _NAME_RE.match(name)
    if m is None:
        raise InvalidModelNameError(
            name, "a model name uses a-z, 0-9, '.', '_', '-' and one optional ':'"
        )
    return m.group("family"), m.group("tag") or DEFAULT_TAG


def normalize_name(name: str) -> str:
    """The canonical `family:tag` form of a name (`smollm2` -> `smollm2:latest`)."""
    family, tag = parse_name(name)
    return f"{family}:{tag}"


def name_to_folder(name: str) -> str:
    """Folder name of a model: `smollm2:135m` -> `smollm2--135m`, `foo` -> `foo` (tag latest)."""
    family, tag = parse_name(name)
    return family if tag == DEFAULT_TAG else f"{family}{TAG_SEP}{tag}"


def folder_to_name(folder: str) -> str:
    """Inverse of name_to_folder: `smollm2--135m` -> `smollm2:135m`; invalid -> InvalidModelNameError."""
    family, sep, tag = folder.partition(TAG_SEP)
    name = f"{family}:{tag}" if sep else family
    parse_name(name)
    return name


def model_dir(models_dir: Path, name: str) -> Path:
    """The folder of `name` inside models_dir, refusing anything that resolves outside it
    (a symlink pointing elsewhere included). The folder need not exist."""
    root = Path(models_dir).expanduser().resolve()
    path = root / name_to_folder(name)
    if path.is_symlink() or path.exists():
        target = path.resolve()
        if target.parent != root and root not in target.parents:
            raise InvalidModelNameError(name, "model folder points outside the models directory")
    return path
