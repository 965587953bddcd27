"""OpenAI request fields -> the engine's typed values (what chat and completions share)."""

from __future__ import annotations

import uuid

from engine.types import SamplingParams
from server.errors import APIError
from server.limits import stop_list
from server.openai.protocol import SamplingFields
from server.settings import Settings


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def unsupported(param: str) -> APIError:
    return APIError(
        400, f"'{param}' is not supported by this server", param=param, code="unsupported_parameter"
    )


def logit_bias(raw: dict[str, float] | None) -> dict[int, float]:
    out: dict[int, float] = {}
    for key, value in (raw or {}).items():
        if not key.isdigit():
            raise APIError(
                400, f"logit_bias keys must be token ids, got '{key[:32]}'", param="logit_bias"
            )
        out[int(key)] = value
    return out


def sampling_params(
    req: SamplingFields,
    settings: Settings,
    max_tokens: int,
    logprobs: bool,
    top_logprobs: int,
) -> SamplingParams:
    """The engine's typed params from the request (OpenAI defaults where a field is absent)."""
    return SamplingParams(
        max_tokens=max_tokens,
        temperature=1.0 if req.temperature is None else req.temperature,
        top_p=1.0 if req.top_p is None else req.top_p,
        top_k=max(req.top_k or 0, 0),
        min_p=req.min_p or 0.0,
        repetition_penalty=req.repetition_penalty or 1.0,
        presence_penalty=req.presence_penalty or 0.0,
        frequency_penalty=req.frequency_penalty or 0.0,
        logit_bias=logit_bias(req.logit_bias),
        seed=req.seed,
        stop=stop_list(settings, req.stop),
        ignore_eos=bool(req.ignore_eos),
        logprobs=logprobs,
        top_logprobs=top_logprobs,
    )
