"""Thinking budgets (the end marker forced after N thinking tokens) and reasoning token counts,
on the processor alone and through the app on a tiny random model with thinking markers."""

from __future__ import annotations

import httpx
import mlx.core as mx

from engine.async_engine import AsyncEngine
from engine.output.events import OutputSpec
from engine.reasoning_budget import ReasoningBudget
from engine.types import GenerateRequest, SamplingParams
from server.settings import engine_config, load_settings
from tests.tiny import make_tiny_model

V = 10


def forced(proc: ReasoningBudget, prompt: list[int], out: list[int]) -> int | None:
    """The token the processor forces after `out`, or None when it leaves the logits alone."""
    logits = mx.zeros((1, V))
    got = proc(mx.array(prompt + out, dtype=mx.int32), logits)
    if mx.array_equal(got, logits):
        return None
    assert int(mx.sum(got == 0)) == 1
    return int(mx.argmax(got))


def test_the_end_marker_is_forced_once_the_budget_is_spent():
    prompt = [9, 9, 9]
    opened = ReasoningBudget(3, [3], [4], budget=2, opened=True)
    assert forced(opened, prompt, [5]) is None
    assert forced(opened, prompt, [5, 6]) == 4
    assert forced(opened, prompt, [5, 6, 4]) is None  # the answer goes on freely
    assert forced(opened, prompt, [4, 6]) is None  # it ended by itself
    by_output = ReasoningBudget(3, [3], [7, 8], budget=2, opened=False)
    assert forced(by_output, prompt, [3, 5]) is None
    assert forced(by_output, prompt, [3, 5, 6]) == 7
    assert forced(by_output, prompt, [3, 5, 6, 7]) == 8  # a marker of two tokens
    assert forced(by_output, prompt, [3, 5, 6, 7, 8]) is None
    assert forced(by_output, prompt, [5, 5, 6]) is None  # no thinking block: nothing to end
    assert forced(ReasoningBudget(3, [3], [4], budget=0, opened=True), prompt, []) == 4


def engine_over(tmp_path) -> tuple[AsyncEngine, object]:
    make_tiny_model(tmp_path / "t", thinking=True)
    settings = load_settings(None, models_dir=tmp_path, default_model="t", memory_limit=1 << 30)
    eng = AsyncEngine(engine_config(settings))
    eng._thread.start()  # the engine thread alone: no startup probe, no default import
    return eng, settings


async def test_the_engine_ends_thinking_at_the_budget_and_counts_it(tmp_path):
    eng, _ = engine_over(tmp_path)
    try:
        tok = (await eng.get_model("t")).tokenizer
        prompt = "<|im_start|>user\nhello world<|im_end|>\n<|im_start|>assistant\n<think>\n"
        ids = list(tok.encode(prompt, add_special_tokens=False))

        async def run(budget: int | None) -> tuple[str, str, int]:
            params = SamplingParams(max_tokens=12, temperature=1.0, seed=7)
            spec = OutputSpec(reasoning_budget=budget)
            outs = [
                o
                async for o in eng.generate(
                    GenerateRequest(f"b{budget}", "t", ids, params, output=spec)
                )
            ]
            reasoning = "".join(o.reasoning for o in outs)
            return reasoning, "".join(o.text for o in outs), outs[-1].metrics.reasoning_tokens

        free = await run(None)
        assert free[1] == "" and free[2] == 12  # the prompt opened it; it never ends by itself
        capped = await run(4)
        # The same 4 thinking tokens, then the forced end marker (counted), then the answer.
        assert free[0].startswith(capped[0]) and len(capped[0]) < len(free[0])
        assert capped[1] and capped[2] == 5
        none = await run(0)
        assert none[0] == "" and none[2] == 1
    finally:
        await eng.shutdown(drain_timeout=1.0)


async def test_thinking_budget_and_reasoning_tokens_through_the_app(tmp_path):
    from server.app import create_app

    eng, settings = engine_over(tmp_path)
    app = create_app(settings.model_copy(update={"host": "0.0.0.0"}), eng)
    user = [{"role": "user", "content": "hello world"}]
    base = {"model": "t", "messages": user, "max_tokens": 12, "temperature": 0}
    transport = httpx.ASGITransport(app=app)
    try:
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as c:

            async def message(thinking: dict) -> httpx.Response:
                return await c.post("/v1/messages", json={**base, "thinking": thinking})

            # Greedy, this random model thinks line breaks (layout, not shown) forever; with a
            # budget the end marker is forced and an answer follows.
            free = (await message({"type": "enabled", "budget_tokens": 1024})).json()
            assert free["content"] == [] and free["stop_reason"] == "max_tokens"
            capped = (await message({"type": "enabled", "budget_tokens": 4})).json()
            assert [b["type"] for b in capped["content"]] == ["text"]
            off = (await message({"type": "disabled"})).json()  # the template opens no block
            assert [b["type"] for b in off["content"]] == ["text"]
            assert off["content"][0]["text"] != capped["content"][0]["text"]
            r = await message({"type": "enabled", "budget_tokens": -1})
            assert r.status_code == 400 and "budget_tokens" in r.json()["error"]["message"]
            body = {"model": "t", "input": "hello world", "max_output_tokens": 8, "temperature": 0}
            usage = (await c.post("/v1/responses", json=body)).json()["usage"]
            assert usage["output_tokens"] == 8
            assert usage["output_tokens_details"] == {"reasoning_tokens": 8}
    finally:
        await eng.shutdown(drain_timeout=1.0)
