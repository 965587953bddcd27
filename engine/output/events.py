"""Typed pieces of a request's output stream, and what the server tells the engine about tools."""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field
from typing import Any, Literal


@dataclass
class ToolSpec:
    """A function the model may call: its name, description and JSON-schema parameters."""

    name: str
    description: str = ""
    parameters: dict[str, Any] = field(default_factory=lambda: {"type": "object"})
    strict: bool = False  # OpenAI's strict mode: the arguments take no keys beyond the schema's


ToolChoiceMode = Literal["none", "auto", "required", "named"]


@dataclass
class OutputSpec:
    """How a request's output is shaped: tools, tool choice, a JSON answer, reasoning.

    `json_schema` constrains the answer (None: free text; {} with json_object: any object)."""

    tools: list[ToolSpec] = field(default_factory=list)
    tool_choice: ToolChoiceMode = "auto"
    tool_name: str | None = None  # with tool_choice "named"
    parallel_tool_calls: bool = True
    json_schema: dict[str, Any] | None = None
    strict_schema: bool = False  # the JSON answer in OpenAI's strict mode (see tools' `strict`)
    reasoning: bool = True  # split the model's thinking out when it has markers
    reasoning_budget: int | None = None  # thinking tokens before its end is forced (None: no cap)
    reasoning_effort: str | None = None  # a level for templates that read one (gpt-oss's)

    @property
    def calls_tools(self) -> bool:
        return bool(self.tools) and self.tool_choice != "none"

    def allowed_tools(self) -> list[ToolSpec]:
        if self.tool_choice == "named":
            return [t for t in self.tools if t.name == self.tool_name]
        return self.tools if self.calls_tools else []


def new_call_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"


@dataclass
class ToolCall:
    """One complete tool call the model made; `arguments` is JSON text."""

    index: int
    name: str
    arguments: str
    id: str = field(default_factory=new_call_id)


@dataclass
class ToolCallDelta:
    """A piece of a tool call as the model writes it. A call's first piece carries its `id` and
    `name`; every piece may carry an `arguments` fragment (their concatenation is the call's
    `arguments`); its last piece has `done` set, in the same output as the complete ToolCall.
    A call cut short (max_tokens) never gets `done`."""

    index: int
    arguments: str = ""
    id: str | None = None
    name: str | None = None
    done: bool = False


def add_call_delta(deltas: list[ToolCallDelta], d: ToolCallDelta) -> None:
    """Append `d`, merged into the last piece when it continues the same unfinished call."""
    last = deltas[-1] if deltas else None
    if last is not None and last.index == d.index and not last.done and d.id is None:
        last.arguments += d.arguments
        last.done = d.done
    else:
        deltas.append(ToolCallDelta(d.index, d.arguments, d.id, d.name, d.done))


@dataclass
class OutputDelta:
    """What one step added to the answer, reasoning and tool calls (any may be empty):
    `call_deltas` the calls' pieces in order, `tool_calls` the calls completed."""

    content: str = ""
    reasoning: str = ""
    tool_calls: list[ToolCall] = field(default_factory=list)
    call_deltas: list[ToolCallDelta] = field(default_factory=list)

    def __bool__(self) -> bool:
        return bool(self.content or self.reasoning or self.tool_calls or self.call_deltas)

    def extend(self, other: OutputDelta) -> None:
        self.content += other.content
        self.reasoning += other.reasoning
        self.tool_calls.extend(other.tool_calls)
        for d in other.call_deltas:
            add_call_delta(self.call_deltas, d)
