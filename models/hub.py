"""Download MLX-format models from the Hugging Face hub (config.json, *.safetensors, tokenizer files)."""

from __future__ import annotations

import logging
import re
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

from models.errors import ImportFailedError

log = logging.getLogger("mlxd.hub")

ALLOW_PATTERNS = [
    "config.json",
    "generation_config.json",
    "*.safetensors",
    "model.safetensors.index.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "tokenizer.model",
    "special_tokens_map.json",
    "chat_template.jinja",
    "chat_template.json",
]
_REPO_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*$")


def is_repo_id(text: str) -> bool:
    return bool(_REPO_RE.match(text)) and ".." not in text


def default_name(repo_id: str) -> str:
    """A model name from a repo id: `mlx-community/Qwen3-0.6B-4bit` -> `qwen3-0.6b-4bit`."""
    name = re.sub(r"[^a-z0-9._-]+", "-", repo_id.split("/")[-1].lower()).strip("-._")
    return re.sub(r"-{2,}", "-", name)[:128] or "model"


def _is_offline_error(e: BaseException) -> bool:
    import httpx
    from huggingface_hub.errors import LocalEntryNotFoundError, OfflineModeIsEnabled

    seen: BaseException | None = e
    while seen is not None:
        if isinstance(
            seen,
            httpx.TransportError | ConnectionError | TimeoutError | OfflineModeIsEnabled,
        ):
            return True
        if isinstance(seen, LocalEntryNotFoundError):
            return True
        seen = seen.__cause__ or seen.__context__
    return False


def download(
    repo_id: str,
    dest: Path,
    progress: Callable[[int, int, str], None] | None = None,
    endpoint: str | None = None,
    revision: str | None = None,
) -> Path:
    """Fetch an MLX-format repo into dest (which must not exist) via a temp dir renamed in place."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import (
        GatedRepoError,
        HfHubHTTPError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    if not is_repo_id(repo_id):
        raise ImportFailedError(f"'{repo_id}' is not a hub repository id (org/name)")
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".pull-", dir=dest.parent))
    try:
        if progress is not None:
            progress(0, 1, repo_id)
        snapshot_download(
            repo_id,
            revision=revision,
            local_dir=str(tmp),
            allow_patterns=ALLOW_PATTERNS,
            endpoint=endpoint,
            etag_timeout=10,
        )
        shutil.rmtree(tmp / ".cache", ignore_errors=True)  # huggingface_hub's local_dir bookkeeping
        if not (tmp / "config.json").exists() or not list(tmp.glob("*.safetensors")):
            raise ImportFailedError(
                f"'{repo_id}' is not an MLX-format model (config.json + safetensors)"
            )
        if not (tmp / "tokenizer.json").exists() and not (tmp / "tokenizer.model").exists():
            raise ImportFailedError(f"'{repo_id}' has no tokenizer files")
        if progress is not None:
            progress(1, 1, repo_id)
        tmp.chmod(0o755)
        tmp.rename(dest)
        return dest
    except ImportFailedError:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    except (GatedRepoError, RepositoryNotFoundError):
        shutil.rmtree(tmp, ignore_errors=True)
        raise ImportFailedError(f"repository '{repo_id}' was not found on the model hub") from None
    except RevisionNotFoundError:
        shutil.rmtree(tmp, ignore_errors=True)
        raise ImportFailedError(f"revision not found in '{repo_id}'") from None
    except Exception as e:  # noqa: BLE001 - one clear message, never a traceback
        shutil.rmtree(tmp, ignore_errors=True)
        log.debug("pull failed", exc_info=True)
        if _is_offline_error(e):
            raise ImportFailedError(
                f"cannot reach the model hub to pull '{repo_id}' (offline?)"
            ) from None
        if isinstance(e, HfHubHTTPError):
            raise ImportFailedError(
                f"the model hub refused '{repo_id}' ({e.__class__.__name__})"
            ) from None
        raise ImportFailedError(f"pulling '{repo_id}' failed ({type(e).__name__})") from None
