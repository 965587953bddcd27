"""GET /v1/models and /v1/models/{id}: every model on disk.

Extension: each model object carries `"mlxd": {context_length, quantization, loaded, parameters,
architecture, size_bytes, family}` (the standard fields are id, object, created, owned_by).
"""

from __future__ import annotations

from typing import Any

from fastapi import Request

from engine.types import ModelStatus
from server.jobs import engine_of

OWNER = "mlxd"


def model_object(status: ModelStatus) -> dict[str, Any]:
    return {
        "id": status.name,
        "object": "model",
        "created": int(status.modified_at),
        "owned_by": OWNER,
        "mlxd": {
            "context_length": status.context_length,
            "quantization": status.quantization,
            "loaded": status.loaded,
            "parameters": status.parameters,
            "architecture": status.architecture,
            "family": status.family,
            "size_bytes": status.size_bytes,
        },
    }


async def list_models(request: Request) -> dict[str, Any]:
    statuses = sorted(engine_of(request).list_models(), key=lambda s: s.name)
    return {"object": "list", "data": [model_object(s) for s in statuses]}


async def retrieve_model(request: Request, model_id: str) -> dict[str, Any]:
    # model_status raises ModelNotFoundError -> 404 model_not_found (server/errors.py).
    return model_object(engine_of(request).model_status(model_id))
