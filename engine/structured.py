"""A chat request's output plan (format, reasoning markers, grammar) from the model's tokenizer,
and its grammar compiled into a matcher, off the engine thread."""

from __future__ import annotations

from typing import Any

from engine.grammar import compiler_for
from engine.output.pipeline import OutputPlan, plan_output
from engine.output.reasoning import ReasoningMarkers, detect_reasoning
from engine.types import GenerateRequest

_markers: dict[int, tuple[Any, ReasoningMarkers | None]] = {}


def reasoning_markers(tokenizer: Any) -> ReasoningMarkers | None:
    """The model's thinking markers, from its vocabulary (looked up once per tokenizer)."""
    hit = _markers.get(id(tokenizer))
    if hit is None or hit[0] is not tokenizer:
        vocab: dict[str, int] = getattr(getattr(tokenizer, "hf", None), "get_vocab", dict)()
        hit = (tokenizer, detect_reasoning(vocab))
        _markers[id(tokenizer)] = hit
    return hit[1]


def prepare_output(tokenizer: Any, request: GenerateRequest) -> OutputPlan | None:
    """Plan the request's output and give it a grammar matcher when it needs one (blocking:
    the first use of a tokenizer builds llguidance's view of it; call from a worker thread)."""
    spec = request.output
    if spec is None:
        return None
    tail = tokenizer.decode(request.prompt_token_ids[-8:], skip_special_tokens=False)
    compiler = compiler_for(tokenizer) if spec.calls_tools or spec.json_schema is not None else None
    special = compiler.special_id if compiler is not None else (lambda _s: None)
    plan = plan_output(spec, tokenizer.chat_template, reasoning_markers(tokenizer), tail, special)
    if plan.grammar is not None and compiler is not None:
        param = "tools" if spec.calls_tools else "response_format"
        request.params.grammar = compiler.matcher(plan.grammar, param)
    if plan.markers is not None and spec.reasoning_budget is not None:
        # Imported here: it brings MLX, which the CLI must not load before its BLAS preload.
        from engine.reasoning_budget import ReasoningBudget

        start, end = (
            list(tokenizer.encode(m, add_special_tokens=False))
            for m in (plan.markers.start, plan.markers.end)
        )
        budget = ReasoningBudget(
            len(request.prompt_token_ids), start, end, spec.reasoning_budget, plan.in_reasoning
        )
        # A new list: the job's choices share their params' lists (dataclasses.replace).
        request.params.logits_processors = [*request.params.logits_processors, budget]
    return plan
