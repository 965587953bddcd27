"""Anthropic's Messages API routes (errors in Anthropic's shape: see server/errors.py)."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import Response

from server.anthropic import messages

router = APIRouter(prefix="/v1", tags=["anthropic"])


@router.post("/messages")
async def create_message(request: Request) -> Response:
    return await messages.create_message(request)


@router.post("/messages/count_tokens")
async def count_tokens(request: Request) -> Response:
    return await messages.count_tokens(request)
