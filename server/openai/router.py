"""The OpenAI API's routes; handlers live in chat.py, completions.py, embeddings.py, models.py."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import Response

from server.openai import chat, completions, embeddings, models

router = APIRouter(prefix="/v1", tags=["openai"])


@router.post("/chat/completions")
async def chat_completions(request: Request) -> Response:
    return await chat.create_chat_completion(request)


@router.post("/completions")
async def text_completions(request: Request) -> Response:
    return await completions.create_completion(request)


@router.post("/embeddings")
async def create_embeddings(request: Request) -> dict[str, Any]:
    return await embeddings.create_embeddings(request)


@router.get("/models")
async def list_models(request: Request) -> dict[str, Any]:
    return await models.list_models(request)


@router.get("/models/{model_id:path}")
async def retrieve_model(request: Request, model_id: str) -> dict[str, Any]:
    return await models.retrieve_model(request, model_id)
