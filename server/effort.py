"""Reasoning effort (OpenAI's `reasoning_effort`, the Responses API's `reasoning.effort`,
Ollama's `think: "low" | "medium" | "high"`) onto the OutputSpec, the same way for every API.

"none" turns thinking off. Other levels cap the thinking at a token budget (its end marker is
forced there, see engine/reasoning_budget.py), so a lower effort answers sooner on any reasoning
model, and the level also reaches the chat template as `reasoning_effort`, the variable that
templates which take a level (gpt-oss's) read. A model without thinking ignores the level.
"""

from __future__ import annotations

from engine.output.events import OutputSpec
from server.errors import APIError

# Thinking tokens per level; None: no cap. The levels are OpenAI's.
BUDGETS: dict[str, int | None] = {
    "minimal": 256,
    "low": 1024,
    "medium": 4096,
    "high": None,
    "xhigh": None,
}
LEVELS = ("none", *BUDGETS)


def apply_effort(spec: OutputSpec, effort: object, param: str, levels: tuple = LEVELS) -> None:
    """Set `spec`'s reasoning from an effort level; 400 naming `param` for an unknown level.
    `None` leaves the spec alone (the model's default)."""
    if effort is None:
        return
    if not isinstance(effort, str) or effort not in levels:
        shown = str(effort)[:32]
        raise APIError(
            400, f"'{param}' must be one of {', '.join(levels)} (got '{shown}')", param=param
        )
    if effort == "none":
        spec.reasoning = False
        return
    spec.reasoning_effort = effort
    if spec.reasoning_budget is None:  # an explicit budget (Anthropic's) wins
        spec.reasoning_budget = BUDGETS[effort]
