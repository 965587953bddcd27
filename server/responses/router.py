"""OpenAI's Responses API route (errors in OpenAI's shape)."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import Response

from server.responses import handler

router = APIRouter(prefix="/v1", tags=["responses"])


@router.post("/responses")
async def create_response(request: Request) -> Response:
    return await handler.create_response(request)
