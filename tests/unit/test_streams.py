"""engine/streams.py: a step's outputs reach each event loop in one hand-off, in order; a
request's end hands back its model reference; the engine thread flushes after every round."""

import asyncio
import threading

from engine.engine_thread import EngineThread
from engine.outputs import StepOutput
from engine.sequence import Sequence
from engine.streams import Sink, Streams
from engine.types import FinishReason, GenerateRequest, SamplingParams


class CountingLoop:
    """Forwards to a real loop, counting call_soon_threadsafe (each one wakes the loop)."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.calls = 0

    def call_soon_threadsafe(self, fn, *args):
        self.calls += 1
        return self.loop.call_soon_threadsafe(fn, *args)


class ClosedLoop:
    def call_soon_threadsafe(self, fn, *args):
        raise RuntimeError("Event loop is closed")


class FakeCore:
    def __init__(self) -> None:
        self.aborted: list[str] = []

    def abort(self, request_id: str) -> None:
        self.aborted.append(request_id)


def seq(rid: str, keep_alive: float | None = None) -> Sequence:
    return Sequence(GenerateRequest(rid, "m", [1, 2], SamplingParams(), keep_alive=keep_alive))


async def drained(q: asyncio.Queue) -> list:
    await asyncio.sleep(0)  # the loop runs the delivery callback
    return [q.get_nowait() for _ in range(q.qsize())]


async def test_one_step_of_many_requests_wakes_the_loop_once_in_order():
    released = []
    streams = Streams(lambda model, keep: released.append((model, keep)))
    loop = CountingLoop(asyncio.get_running_loop())
    sinks = {rid: Sink(loop, asyncio.Queue()) for rid in ("a", "b")}  # type: ignore[arg-type]
    seqs = {rid: seq(rid, keep_alive=5.0) for rid in sinks}
    for rid, sink in sinks.items():
        streams.open(rid, sink)
        streams.own(rid, "m", FakeCore())  # type: ignore[arg-type]
    streams.emit(seqs["a"], StepOutput([7]))
    streams.emit(seqs["b"], StepOutput([8]))
    streams.emit(seqs["a"], StepOutput([9], finish_reason=FinishReason.LENGTH))
    assert loop.calls == 0  # nothing leaves before the flush
    streams.flush()
    streams.flush()  # an empty outbox sends nothing
    assert loop.calls == 1
    a, b = await drained(sinks["a"].queue), await drained(sinks["b"].queue)
    assert [o.token_ids for o in a] == [[7], [9]] and [o.token_ids for o in b] == [[8]]
    assert released == [("m", 5.0)]  # a's end handed back its reference, with its keep_alive
    assert streams  # b is still open
    streams.emit(seqs["a"], StepOutput([10]))  # a late output of an ended stream goes nowhere
    streams.flush()
    assert loop.calls == 1


async def test_abort_releases_and_a_closed_loop_does_not_stop_other_deliveries():
    released = []
    streams = Streams(lambda model, keep: released.append((model, keep)))
    core = FakeCore()
    good = Sink(asyncio.get_running_loop(), asyncio.Queue())
    streams.open("gone", Sink(ClosedLoop(), asyncio.Queue()))  # type: ignore[arg-type]
    streams.open("good", good)
    streams.own("gone", "m", core)  # type: ignore[arg-type]
    streams.emit(seq("gone"), StepOutput([1]))
    streams.emit(seq("good"), StepOutput([2]))
    streams.flush()
    assert [o.token_ids for o in await drained(good.queue)] == [[2]]
    streams.abort("gone")
    streams.abort("gone")  # twice: nothing more to do
    assert core.aborted == ["gone"] and released == [("m", None)]


async def test_end_all_reaches_every_stream_without_a_flush():
    streams = Streams(lambda model, keep: None)
    sinks = [Sink.here() for _ in range(2)]
    for i, sink in enumerate(sinks):
        streams.open(f"r{i}", sink)
    streams.end_all(StepOutput([], finish_reason=FinishReason.ERROR))
    for sink in sinks:
        [out] = await drained(sink.queue)
        assert out.finish_reason is FinishReason.ERROR


def test_the_engine_thread_flushes_after_each_round():
    rounds = threading.Event()
    flushed: list[str] = []
    posted: list[str] = []

    def flush() -> None:
        flushed.append(posted[-1] if posted else "")
        if posted:
            rounds.set()

    thread = EngineThread(lambda: False, lambda: None, flush=flush)
    thread.start()
    try:
        thread.post(lambda: posted.append("abort"))  # e.g. an abort that emits a last output
        assert rounds.wait(10)
    finally:
        thread.stop()
    assert "abort" in flushed  # what a posted call emitted is sent in the same round
