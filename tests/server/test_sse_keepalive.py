"""server/sse.with_keepalive: ticks while the source is silent never cancel its pending item;
one reader task for a whole stream; errors and early exits reach the source."""

import asyncio

import pytest

from server.sse import with_keepalive


class Source:
    """An async generator's stand-in that records the task each item is read in, waits on
    `gate` before the item at `wait_at`, and notes how it ended."""

    def __init__(self, items: list, wait_at: int = -1, fail: bool = False) -> None:
        self.items, self.wait_at, self.fail = items, wait_at, fail
        self.gate = asyncio.Event()
        self.tasks: list = []
        self.cancelled = self.closed = False

    def __aiter__(self):
        return self

    async def __anext__(self):
        i = len(self.tasks)
        self.tasks.append(asyncio.current_task())
        if i == self.wait_at:
            try:
                await self.gate.wait()
            except asyncio.CancelledError:
                self.cancelled = True
                raise
        if i < len(self.items):
            return self.items[i]
        if self.fail:
            raise ValueError("the source failed")
        raise StopAsyncIteration

    async def aclose(self) -> None:
        self.closed = True


async def test_ticks_while_silent_then_the_pending_item_in_one_reader_task():
    src = Source(["a", "b", "c"], wait_at=1)
    got = []
    async for item in with_keepalive(src, 0.001):
        got.append(item)
        if item is None and not src.gate.is_set():
            src.gate.set()  # "b" exists only once a keep-alive went out
    assert got[0] == "a" and got[-2:] == ["b", "c"]
    assert None in got[1:-2] and set(got[1:-2]) == {None}
    assert not src.cancelled  # a tick never cancelled the pending read
    assert len(set(src.tasks)) == 1  # one reader task for the whole stream
    assert src.closed


@pytest.mark.parametrize("interval", [None, 10.0])
async def test_a_source_error_comes_after_its_items(interval):
    src = Source(["a"], fail=True)
    got = []
    with pytest.raises(ValueError, match="the source failed"):
        async for item in with_keepalive(src, interval):
            got.append(item)
    assert got == ["a"] and src.closed


@pytest.mark.parametrize("interval", [None, 10.0])
async def test_leaving_early_cancels_the_pending_read_and_closes_the_source(interval):
    src = Source(["a", "b"], wait_at=1)
    stream = with_keepalive(src, interval)
    assert await stream.__anext__() == "a"
    pending = asyncio.ensure_future(stream.__anext__())
    while len(src.tasks) < 2:  # the read of "b" is under way
        await asyncio.sleep(0)
    pending.cancel()
    with pytest.raises(asyncio.CancelledError):
        await pending
    await stream.aclose()
    assert src.cancelled and src.closed


async def test_a_slow_consumer_holds_the_reader_one_item_ahead():
    src = Source(list(range(5)))
    stream = with_keepalive(src, 10.0)
    assert await stream.__anext__() == 0
    for _ in range(20):
        await asyncio.sleep(0)
    assert len(src.tasks) <= 3  # item 1 in the slot, item 2 read and waiting for the slot
    assert [i async for i in stream] == [1, 2, 3, 4]
