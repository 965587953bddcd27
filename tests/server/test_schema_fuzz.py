"""A schema fuzz of the app's own OpenAPI document (every route, OpenAI and Ollama families).

schemathesis generates bodies from each route's documented schema, valid and invalid, and checks
that no answer is a 5xx, every status and content type is documented and error bodies have the
documented shape. The app runs in-process over the FakeEngine (the engine's token-id check is
the real one); most bodies name the fake model so routes that need a model do real work.
`make test` runs a short budget; `make fuzz` sets MLXD_FUZZ_EXAMPLES for a long one.

MLXD_FUZZ_URL=http://127.0.0.1:PORT (and MLXD_FUZZ_MODEL, default smollm2:135m) fuzzes a running
server instead, real engine and model included (generation lengths are capped to keep it short;
/api/delete and /api/create are skipped there so the server's models survive).
"""

from __future__ import annotations

import json
import os

import pytest

pytest.importorskip("schemathesis")

import schemathesis  # noqa: E402
from hypothesis import HealthCheck, settings  # noqa: E402
from schemathesis.checks import not_a_server_error  # noqa: E402
from schemathesis.specs.openapi.checks import (  # noqa: E402
    content_type_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from tests.server.fake_engine import FAKE_MODEL, FakeEngine, make_app  # noqa: E402

EXAMPLES = int(os.environ.get("MLXD_FUZZ_EXAMPLES", "12"))
CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_schema_conformance,
]

URL = os.environ.get("MLXD_FUZZ_URL", "").rstrip("/")
MODEL = os.environ.get("MLXD_FUZZ_MODEL", "smollm2:135m") if URL else FAKE_MODEL
ENGINE = FakeEngine()
APP = make_app(ENGINE, keepalive=0.5)
if URL:
    schema = schemathesis.openapi.from_url(URL + "/openapi.json")
    schema = schema.exclude(path=["/api/delete", "/api/create", "/api/copy"])
else:
    schema = schemathesis.openapi.from_asgi("/openapi.json", APP)


@pytest.fixture(scope="module", autouse=True)
def _scratch_models_dir(tmp_path_factory: pytest.TempPathFactory) -> None:
    """Uploaded blobs and import_dirs live in a scratch folder, never in the user's models."""
    root = tmp_path_factory.mktemp("fuzz")
    APP.state.settings.models_dir = root / "models"
    APP.state.settings.import_dirs = [str(root / "imports")]


def _short(body: dict) -> None:
    """A real model generates for real: every body asks for at most 8 tokens."""
    if not any(k in body for k in ("prompt", "messages", "context", "max_tokens")):
        return
    tokens = body.get("max_tokens")
    if not (type(tokens) is int and tokens <= 8):
        body["max_tokens"] = 8
    body.pop("max_completion_tokens", None)
    options = body.get("options")
    if isinstance(options, dict):
        options["num_predict"] = 8
    else:
        body["options"] = {"num_predict": 8}


def _aim_at_the_model(body: object) -> None:
    """Most generated bodies name the served model, so routes get past the model lookup."""
    if not isinstance(body, dict):
        return
    if len(json.dumps(body, default=str)) % 4 == 0:
        return  # a quarter keep whatever name was generated
    for key in ("model", "name", "source"):
        if key in body:
            body[key] = MODEL


@schema.parametrize()
@settings(
    max_examples=EXAMPLES,
    deadline=None,
    suppress_health_check=list(HealthCheck),
    derandomize=True,
)
def test_no_5xx_and_documented_shapes(case) -> None:
    _aim_at_the_model(case.body)
    if URL and isinstance(case.body, dict):
        _short(case.body)
    if FAKE_MODEL not in ENGINE.models:  # a fuzzed /api/delete removed it
        ENGINE.add_model(FAKE_MODEL)
    case.call_and_validate(checks=CHECKS, base_url=URL or None)
