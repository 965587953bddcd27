"""A scripted stand-in for the engine so server tests run in milliseconds (no MLX, no weights).

Usage:
    engine = FakeEngine()                      # one model, "fake:latest", context 256
    engine.script = Script(text="Hello world", finish_reason=FinishReason.STOP)
    app = create_app(Settings(), engine)

The tokenizer is character-level (id = code point + 3; 0 pad, 1 BOS, 2 EOS), so a text of n
characters is n tokens and decode(encode(t)) == t. generate() emits one character per output,
honours max_tokens, stop strings and logprobs, and records every request and every abort.
"""

from __future__ import annotations

import asyncio
import hashlib
import math
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

from engine.api import EngineAPI, ModelHandle
from engine.detokenizer import Detokenizer
from engine.errors import ContextLengthError, InvalidModelNameError, ModelNotFoundError
from engine.output.events import ToolCall, ToolCallDelta
from engine.types import (
    EngineStats,
    FailureKind,
    FinishReason,
    GenerateRequest,
    ModelStatus,
    RequestMetrics,
    RequestOutput,
    TokenLogprob,
)
from engine.validation import check_embedding_inputs, check_generate_request

FAKE_MODEL = "fake:latest"
FAKE_CONTEXT = 256
BOS_ID, EOS_ID, OFFSET = 1, 2, 3
FAKE_VOCAB = 0x110000 + OFFSET  # every code point has an id; the engine's id check uses this
DEFAULT_TEMPLATE = "{% for m in messages %}<{{ m.role }}>{{ m.content }}\n{% endfor %}<assistant>"


class FakeTokenizer:
    """Character-level tokenizer with the interface engine/api.py documents."""

    def __init__(self, chat_template: str | None = DEFAULT_TEMPLATE):
        self.chat_template = chat_template
        self.bos_token_id = BOS_ID
        self.eos_token_ids = {EOS_ID}

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        ids = [ord(c) + OFFSET for c in text]
        return [BOS_ID, *ids] if add_special_tokens else ids

    def decode(self, ids: list[int]) -> str:
        # Like a real tokenizer: unknown ids decode to nothing, text is always valid Unicode.
        return "".join(
            chr(i - OFFSET)
            for i in ids
            if OFFSET <= i < FAKE_VOCAB and not 0xD800 <= i - OFFSET <= 0xDFFF
        )

    def apply_chat_template(
        self, messages: list[dict[str, Any]], add_generation_prompt: bool = True, **kwargs: Any
    ) -> str:
        if self.chat_template is None:
            raise ValueError("this model has no chat template")
        text = "".join(f"<{m['role']}>{m.get('content') or ''}\n" for m in messages)
        return text + ("<assistant>" if add_generation_prompt else "")


@dataclass
class Script:
    """What the next generate() calls produce.

    text: the completion (one token per character); `text_fn(request)` overrides it per request.
    finish_reason: reported when the text runs out (STOP: as if EOS; LENGTH: as if max_tokens).
    first_delay / token_delay: seconds before the first token and between tokens.
    gate: when set, generation waits for it before the first token (tests release it).
    reject: raised at the first __anext__ (the engine's way to refuse a request).
    error_after: after this many tokens, end with FinishReason.ERROR and `error_message`.
    cached_tokens: reported as prefix-cache hits in the metrics.
    """

    text: str = "Hello world"
    text_fn: Callable[[GenerateRequest], str] | None = None
    finish_reason: FinishReason = FinishReason.STOP
    first_delay: float = 0.0
    token_delay: float = 0.0
    gate: asyncio.Event | None = None
    reject: BaseException | None = None
    error_after: int | None = None
    error_message: str = "the engine failed on this request"
    error_kind: FailureKind = "internal"  # whose fault the error is
    cached_tokens: int = 0
    reasoning: str = ""  # streamed (one character an output) before the text
    tool_calls: list[ToolCall] = field(default_factory=list)  # streamed after the text


def fake_status(name: str = FAKE_MODEL, context_length: int = FAKE_CONTEXT) -> ModelStatus:
    return ModelStatus(
        name=name,
        architecture="llama",
        parameters=1_000_000,
        context_length=context_length,
        quantization="none",
        size_bytes=4_000_000,
        modified_at=1_700_000_000.0,
        family="llama",
        digest=hashlib.sha256(name.encode()).hexdigest(),
    )


@dataclass
class _Model:
    status: ModelStatus
    tokenizer: FakeTokenizer


class FakeEngine(EngineAPI):
    """EngineAPI with scripted outputs. Inspect `requests`, `aborted`, `finished` after a call."""

    def __init__(self, script: Script | None = None) -> None:
        self.alive = False
        self.script = script or Script()
        self.models: dict[str, _Model] = {}
        self.add_model(FAKE_MODEL)
        self.load_errors: dict[str, BaseException] = {}  # get_model(name) raises this
        self.requests: list[GenerateRequest] = []
        self.aborted: list[str] = []
        self.finished: list[str] = []
        self.active: set[str] = set()
        self.started = 0
        self.shutdowns = 0

    def add_model(
        self,
        name: str,
        context_length: int = FAKE_CONTEXT,
        chat_template: str | None = DEFAULT_TEMPLATE,
    ) -> ModelStatus:
        status = fake_status(name, context_length)
        self.models[name] = _Model(status, FakeTokenizer(chat_template))
        return status

    # --- lifecycle ----------------------------------------------------------------------------
    async def start(self) -> None:
        self.alive = True
        self.started += 1

    async def shutdown(self, drain_timeout: float = 10.0) -> None:
        self.alive = False
        self.shutdowns += 1

    # --- models -------------------------------------------------------------------------------
    def _get(self, name: str) -> _Model:
        if not name or "\x00" in name or ".." in name:
            raise InvalidModelNameError(name)
        if name not in self.models:
            raise ModelNotFoundError(name, sorted(self.models))
        return self.models[name]

    def list_models(self) -> list[ModelStatus]:
        return [m.status for m in self.models.values()]

    def model_status(self, name: str) -> ModelStatus:
        return self._get(name).status

    def running_models(self) -> list[ModelStatus]:
        return [m.status for m in self.models.values() if m.status.loaded]

    async def get_model(self, name: str, keep_alive: float | None = None) -> ModelHandle:
        if name in self.load_errors:
            raise self.load_errors[name]
        model = self._get(name)
        load_time = 0.0 if model.status.loaded else 0.001  # a "load" the first time
        model.status.loaded = True
        model.status.weight_bytes = model.status.size_bytes
        return ModelHandle(name, model.status, model.tokenizer, load_time)

    async def unload_model(self, name: str) -> None:
        status = self._get(name).status
        status.loaded, status.weight_bytes = False, 0

    async def import_gguf(self, path: str, name: str, progress: Any = None) -> ModelStatus:
        if progress is not None:
            progress(1, 1, "tensors")
        return self.add_model(name)

    async def import_folder(self, path: str, name: str) -> ModelStatus:
        return self.add_model(name)

    async def pull_model(self, name: str, progress: Any = None) -> ModelStatus:
        if progress is not None:
            for done in (0, 50, 100):
                progress(done, 100, "download")
        return self.add_model(name)

    async def copy_model(self, src: str, dst: str) -> None:
        model = self._get(src)
        self.add_model(dst, model.status.context_length, model.tokenizer.chat_template)

    async def delete_model(self, name: str) -> None:
        self._get(name)
        del self.models[name]

    # --- inference ----------------------------------------------------------------------------
    def generate(self, request: GenerateRequest) -> AsyncIterator[RequestOutput]:
        return self._generate(request)

    async def _generate(self, request: GenerateRequest) -> AsyncIterator[RequestOutput]:
        script = self.script
        self.requests.append(request)
        if script.reject is not None:
            raise script.reject
        model = self._get(request.model)
        check_generate_request(request, FAKE_VOCAB)
        prompt_len = len(request.prompt_token_ids)
        context = model.status.context_length
        if prompt_len + request.params.max_tokens > context:
            raise ContextLengthError(prompt_len, request.params.max_tokens, context)
        self.active.add(request.request_id)
        done = False
        try:
            async for out in self._stream(request, model.tokenizer, script):
                done = out.finished
                yield out
        finally:
            self.active.discard(request.request_id)
            # Leaving the iteration before the last output is the abort the contract describes.
            (self.finished if done else self.aborted).append(request.request_id)

    async def _stream(
        self, request: GenerateRequest, tok: FakeTokenizer, script: Script
    ) -> AsyncIterator[RequestOutput]:
        params, rid = request.params, request.request_id
        text = script.text_fn(request) if script.text_fn else script.text
        start = time.monotonic()
        if script.gate is not None:
            await script.gate.wait()
        if script.first_delay:
            await asyncio.sleep(script.first_delay)
        for ch in script.reasoning:
            yield RequestOutput(request_id=rid, reasoning=ch, token_ids=[ord(ch) + OFFSET])
        # The engine's own detokenizer holds back what may start a stop string.
        detok = Detokenizer(tok.decode, None, params.stop)
        for i, ch in enumerate(text):
            if script.error_after is not None and i >= script.error_after:
                yield self._last(
                    rid, request, i, FinishReason.ERROR, start, script, error=script.error_message
                )
                return
            if i >= params.max_tokens:
                yield self._last(
                    rid, request, i, FinishReason.LENGTH, start, script, text=detok.flush()
                )
                return
            ids = tok.encode(ch, add_special_tokens=False)
            out_text = detok.add(ids)
            if detok.stopped is not None:
                yield self._last(
                    rid,
                    request,
                    i + 1,
                    FinishReason.STOP,
                    start,
                    script,
                    text=out_text,
                    stop=detok.stopped,
                )
                return
            if i and script.token_delay:
                await asyncio.sleep(script.token_delay)
            lp = [_logprob(ids[0], ch, params.top_logprobs)] if params.logprobs else None
            yield RequestOutput(request_id=rid, text=out_text, token_ids=ids, logprobs=lp)
        tail = detok.flush()
        for call in script.tool_calls:  # as the engine streams them: id and name, then pieces
            if tail:
                yield RequestOutput(request_id=rid, text=tail)
                tail = ""
            yield RequestOutput(
                rid, call_deltas=[ToolCallDelta(call.index, "", call.id, call.name)]
            )
            args = call.arguments
            for at in range(0, len(args), 4):
                done = at + 4 >= len(args)
                piece = ToolCallDelta(call.index, args[at : at + 4], done=done)
                yield RequestOutput(rid, call_deltas=[piece], tool_calls=[call] if done else [])
        reason = script.finish_reason
        eos = EOS_ID if reason == FinishReason.STOP else None
        yield self._last(rid, request, len(text), reason, start, script, text=tail, stop=eos)

    def _last(
        self,
        rid: str,
        request: GenerateRequest,
        completion_tokens: int,
        reason: FinishReason,
        start: float,
        script: Script,
        text: str = "",
        stop: str | int | None = None,
        error: str | None = None,
    ) -> RequestOutput:
        elapsed = max(time.monotonic() - start, 1e-6)
        metrics = RequestMetrics(
            prompt_tokens=len(request.prompt_token_ids),
            cached_tokens=min(script.cached_tokens, len(request.prompt_token_ids)),
            completion_tokens=len(script.reasoning) + completion_tokens,
            reasoning_tokens=len(script.reasoning),
            prefill_time=elapsed / 2,
            decode_time=elapsed / 2,
            ttft=elapsed / 2,
            total_time=elapsed,
        )
        return RequestOutput(
            request_id=rid,
            text=text,
            finish_reason=reason,
            stop_matched=stop,
            metrics=metrics,
            error=error,
            error_kind=script.error_kind,
        )

    async def abort(self, request_id: str) -> None:
        self.aborted.append(request_id)

    async def embed(self, model: str, inputs: list[list[int]]) -> list[list[float]]:
        self._get(model)
        check_embedding_inputs(inputs, FAKE_VOCAB)
        out = []
        for ids in inputs:
            vec = [float(sum(ids) % 7 + 1), float(len(ids)), 1.0, float(ids[0] if ids else 0)]
            norm = math.sqrt(sum(v * v for v in vec))
            out.append([v / norm for v in vec])
        return out

    def stats(self) -> EngineStats:
        return EngineStats(
            running=len(self.active),
            loaded=[m.status for m in self.models.values() if m.status.loaded],
        )


def _logprob(token_id: int, text: str, top: int) -> TokenLogprob:
    alts = [(token_id, text, -0.1)] + [(OFFSET + 97 + k, chr(97 + k), -2.0 - k) for k in range(top)]
    return TokenLogprob(token_id=token_id, token=text, logprob=-0.1, top=alts[:top])


def make_app(engine: FakeEngine | None = None, keepalive: float = 10.0, **settings: Any) -> Any:
    """create_app over a FakeEngine with Settings(**settings); the SSE keep-alive is adjustable."""
    from server.app import create_app
    from server.settings import Settings

    # TestClient sends Host: testserver; the loopback Host check has its own tests (test_ollama_api).
    settings.setdefault("host", "0.0.0.0")
    app = create_app(Settings(**settings), engine or FakeEngine())
    app.state.keepalive_seconds = keepalive
    return app
