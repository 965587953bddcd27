"""A step's plan as rank 0 sends it, and the SchedulerOutput the other ranks rebuild from it.

Every rank runs the same ModelRunner over its part of the model, so its calls (prefills, joins
and leaves of the decode batch, prefix-cache restores and inserts) and therefore its collectives
come in the order rank 0's do. The plan carries what those calls read: per scheduled row its
chunk (tokens, start, whether it samples, its cached prefix), the row's tokens while the runner
reads them (a new or prefilling row; a leaving row, whose KV the prefix cache keeps), and the
token each decode row feeds next, which only rank 0 samples.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from engine.outputs import ScheduledSeq, SchedulerOutput
from engine.sequence import Sequence
from engine.types import GenerateRequest, SamplingParams


@dataclass
class StepPlan:
    out: SchedulerOutput
    feeds: dict[str, int] = field(default_factory=dict)  # decode row -> the token it feeds next


def encode_step(out: SchedulerOutput, decoding: set[str], feeds: dict[str, int]) -> dict[str, Any]:
    """The plan of `out` as a JSON-able message. `decoding`: the rows in rank 0's decode batch
    (the runner never reads their tokens again until they leave)."""
    rows = []
    for s in out.scheduled:
        seq, p = s.seq, s.seq.params
        tokens = None if seq.id in decoding else seq.all_token_ids()
        rows.append(
            [seq.id, s.num_tokens, s.start, int(s.samples), s.cached, s.preemptions, tokens,
             seq.num_prompt, seq.num_prefill, int(p.prompt_logprobs), p.top_logprobs]
        )  # fmt: skip
    return {
        "k": "step",
        "s": rows,
        "f": [_leaving(q) for q in out.finished],
        "p": [_leaving(q) for q in out.preempted],
        "x": feeds,
    }


def step_deadline(message: dict[str, Any], base: float) -> float:
    """Seconds a step may take on any rank: `base` for each forward pass it may hold (the decode
    batch's, and one per row still prefilling), so a busy step is not taken for a hang."""
    return base * (1 + sum(1 for row in message["s"] if row[6] is not None))


def decode_step(message: dict[str, Any]) -> StepPlan:
    """The step a rank other than 0 runs: mirror sequences decoding greedily (their samples are
    never read: rank 0's arrive in the next plan's feeds)."""
    out = SchedulerOutput()
    for row in message["s"]:
        sid, num, start, samples, cached, preemptions, tokens, n_prompt, n_prefill, plp, top = row
        params = SamplingParams(temperature=0.0, prompt_logprobs=bool(plp), top_logprobs=top)
        seq = _mirror(sid, tokens or [], n_prompt if tokens else 0, params)
        seq.num_prefill = n_prefill
        out.scheduled.append(ScheduledSeq(seq, num, start, bool(samples), cached, preemptions))
    for key, into in (("f", out.finished), ("p", out.preempted)):
        for sid, tokens, n_prompt in message[key]:
            into.append(_mirror(sid, tokens, n_prompt, SamplingParams()))
    return StepPlan(out, {k: int(v) for k, v in message["x"].items()})


def _leaving(seq: Sequence) -> list[Any]:
    return [seq.id, seq.all_token_ids(), seq.num_prompt]


def _mirror(sid: str, tokens: list[int], n_prompt: int, params: SamplingParams) -> Sequence:
    seq = Sequence(GenerateRequest(sid, "", tokens[:n_prompt], params))
    seq.output_ids = tokens[n_prompt:]  # a row with output does not score its prompt again
    return seq
