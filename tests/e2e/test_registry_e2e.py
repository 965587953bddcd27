"""Two models, a memory limit that holds one: interleaved requests swap them, all are served."""

import shutil
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest

from bench.launch import ServerProcess

pytestmark = pytest.mark.e2e


@pytest.fixture
def two_model_server(
    tmp_path: Path, smollm2_dir: Path, start_server: Callable[..., ServerProcess]
) -> ServerProcess:
    models = tmp_path / "models"
    models.mkdir()
    shutil.copytree(smollm2_dir, models / smollm2_dir.name)
    shutil.copytree(smollm2_dir, models / "smollm2--twin")  # a second model of the same size
    # fp32 weights are 538 MB each: 900 MB holds one of them (plus its KV), never both.
    return start_server(models, MLXD_MEMORY_LIMIT="900000000", MLXD_WEIGHTS_ON_CPU="fp32")


def test_interleaved_models_under_a_limit_for_one(two_model_server: ServerProcess) -> None:
    url = two_model_server.url
    names = ["smollm2:135m", "smollm2:twin"] * 2
    with httpx.Client(base_url=url, timeout=300) as client:
        for name in names:
            body = {
                "model": name,
                "messages": [{"role": "user", "content": "What is the capital of France?"}],
                "max_tokens": 16,
                "temperature": 0,
            }
            r = client.post("/v1/chat/completions", json=body)
            assert r.status_code == 200, r.text
            assert "Paris" in r.json()["choices"][0]["message"]["content"]
            loaded = [m["name"] for m in client.get("/api/ps").json()["models"]]
            assert loaded == [name], loaded  # the other one was unloaded to make room
