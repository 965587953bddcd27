"""server/concurrency.merged: one request's outputs come straight from its engine iterator (no
pump task between them); several run concurrently; leaving early closes every iterator."""

import asyncio

import pytest

from engine.types import GenerateRequest, RequestOutput
from server.concurrency import merged


class Engine:
    """generate() yields `n` outputs, noting the task each is produced in and its closing."""

    def __init__(self, n: int, fail: bool = False) -> None:
        self.n, self.fail = n, fail
        self.tasks: list = []
        self.closed: list[str] = []

    async def generate(self, request: GenerateRequest):
        try:
            for i in range(self.n):
                self.tasks.append(asyncio.current_task())
                yield RequestOutput(request.request_id, text=str(i))
                await asyncio.sleep(0)
            if self.fail:
                raise ValueError("engine failure")
        finally:
            self.closed.append(request.request_id)


def requests(n: int) -> list[GenerateRequest]:
    return [GenerateRequest(f"r{i}", "m", [1]) for i in range(n)]


async def test_one_request_is_read_in_the_callers_task():
    engine = Engine(3)
    got = [(i, out.text) async for i, out in merged(engine, requests(1))]  # type: ignore[arg-type]
    assert got == [(0, "0"), (0, "1"), (0, "2")]
    assert set(engine.tasks) == {asyncio.current_task()}
    assert engine.closed == ["r0"]


@pytest.mark.parametrize("n", [1, 3])
async def test_leaving_early_closes_every_engine_iterator(n):
    engine = Engine(5)
    stream = merged(engine, requests(n))  # type: ignore[arg-type]
    await stream.__anext__()
    await stream.aclose()
    assert sorted(engine.closed) == [f"r{i}" for i in range(n)]


@pytest.mark.parametrize("n", [1, 2])
async def test_an_engine_error_reaches_the_caller(n):
    engine = Engine(1, fail=True)
    with pytest.raises(ValueError, match="engine failure"):
        async for _ in merged(engine, requests(n)):  # type: ignore[arg-type]
            pass


async def test_several_requests_all_arrive_with_their_index():
    got = [(i, out.text) async for i, out in merged(Engine(2), requests(3))]  # type: ignore[arg-type]
    assert sorted(got) == [(i, str(k)) for i in range(3) for k in range(2)]
