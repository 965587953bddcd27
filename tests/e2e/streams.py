"""Helpers the e2e tests share: a streamed chat whose ending is recorded, the first model."""

from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass, field

import httpx


def first_model(url: str) -> str:
    return str(httpx.get(f"{url}/v1/models", timeout=30).json()["data"][0]["id"])


@dataclass
class StreamEnd:
    """How one stream ended: its finish_reason, an error frame's message, [DONE] seen."""

    first_token: asyncio.Event = field(default_factory=asyncio.Event)
    finish_reason: str | None = None
    error: str | None = None
    done: bool = False
    status: int = 0
    completion_tokens: int | None = None
    request_id: str = ""
    broken: str = ""  # a transport error: the stream was cut without a proper end


async def stream_chat(
    client: httpx.AsyncClient, model: str, max_tokens: int, end: StreamEnd
) -> None:
    body = {
        "model": model,
        "messages": [
            {"role": "user", "content": "Write a long story about a dragon and a knight."}
        ],
        "max_tokens": max_tokens,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    try:
        async with client.stream("POST", "/v1/chat/completions", json=body) as r:
            end.status = r.status_code
            end.request_id = r.headers.get("x-request-id", "")
            if r.status_code != 200:
                await r.aread()
                end.first_token.set()
                return
            async for line in r.aiter_lines():
                if not line.startswith("data:"):
                    continue
                data = line[5:].strip()
                if data == "[DONE]":
                    end.done = True
                    break
                event = json.loads(data)
                if "error" in event:
                    end.error = str(event["error"].get("message", ""))
                    continue
                if event.get("usage"):
                    end.completion_tokens = event["usage"].get("completion_tokens")
                for choice in event.get("choices") or []:
                    if (choice.get("delta") or {}).get("content"):
                        end.first_token.set()
                    if choice.get("finish_reason"):
                        end.finish_reason = choice["finish_reason"]
    except httpx.HTTPError as e:
        end.broken = type(e).__name__
    finally:
        end.first_token.set()
