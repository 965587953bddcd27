"""One request's output pipeline: detokenize -> stop strings -> reasoning split -> tool calls."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from engine.detokenizer import Detokenizer
from engine.output.events import OutputDelta, OutputSpec
from engine.output.formats import (
    SpecialId,
    answer_grammar,
    detect_tool_format,
    make_parser,
    tool_grammar,
    with_start,
)
from engine.output.reasoning import ReasoningMarkers, ReasoningSplitter, starts_thinking
from engine.output.tool_parsers import ToolParser


@dataclass
class OutputPlan:
    """What a request's output needs, decided once from its spec and the model's tokenizer."""

    spec: OutputSpec
    tool_format: str | None = None  # None: no tools
    markers: ReasoningMarkers | None = None  # None: no thinking to split out
    in_reasoning: bool = False  # the prompt opened the thinking block
    grammar: str | None = None  # Lark for llguidance; None: unconstrained

    @property
    def needs_special_tokens(self) -> bool:
        """Markup may be special tokens, which plain decoding drops."""
        return self.tool_format is not None or self.markers is not None


def plan_output(
    spec: OutputSpec,
    chat_template: str | None,
    markers: ReasoningMarkers | None,
    prompt_text: str,
    special: SpecialId,
) -> OutputPlan:
    """The plan for one request. `markers` are the model's thinking markers (if any);
    `prompt_text` is the end of the rendered prompt (it may open the thinking block)."""
    markers = markers if spec.reasoning else None
    in_reasoning = markers is not None and starts_thinking(prompt_text, markers)
    plan = OutputPlan(spec, markers=markers, in_reasoning=in_reasoning)
    rules: list[str] | None = None
    if spec.calls_tools:
        plan.tool_format = detect_tool_format(chat_template)
        rules = tool_grammar(plan.tool_format, spec, special)
    elif spec.json_schema is not None:
        rules = answer_grammar(spec)
    if rules is not None:
        plan.grammar = with_start(rules, markers, in_reasoning, special)
    return plan


class OutputPipeline:
    """Feed each step's token ids; get typed deltas. Every API renders these."""

    def __init__(self, detokenizer: Detokenizer, plan: OutputPlan | None = None):
        self.detok = detokenizer
        self.splitter: ReasoningSplitter | None = None
        self.parser: ToolParser | None = None
        if plan is not None and plan.markers is not None:
            self.splitter = ReasoningSplitter(plan.markers, plan.in_reasoning)
        if plan is not None and plan.tool_format is not None:
            self.parser = make_parser(plan.tool_format, plan.spec.allowed_tools())
        self.calls = 0  # tool calls released so far
        self.reasoning_tokens = 0  # tokens spent inside the thinking block, its markers included
        self._undecided = 0  # tokens fed before the output showed whether it thinks

    @property
    def stopped(self) -> str | None:
        """The stop string that ended the text, if one did."""
        return self.detok.stopped

    def add(self, token_ids: list[int]) -> OutputDelta:
        before = self.splitter.state if self.splitter is not None else None
        out = self._stages(self.detok.add(token_ids), final=False)
        if self.splitter is not None:
            self._count_reasoning(len(token_ids), before, self.splitter)
        return out

    def _count_reasoning(self, n: int, before: str | None, splitter: ReasoningSplitter) -> None:
        """Tokens whose text went into the thinking block: from its start marker (or the
        output's start when the prompt opened it) through its end marker."""
        if splitter.state == "start":
            self._undecided += n
            return
        if before in ("start", "thinking") and splitter.entered:
            self.reasoning_tokens += self._undecided + n
        self._undecided = 0

    def flush(self) -> OutputDelta:
        """The end of the stream: release everything held."""
        return self._stages(self.detok.flush(), final=True)

    def finish_stopped(self) -> OutputDelta:
        """A stop string ended the text: release what the later stages hold."""
        return self._stages("", final=True)

    def _stages(self, text: str, final: bool) -> OutputDelta:
        out = OutputDelta()
        if self.splitter is not None:
            out.reasoning, text = self.splitter.feed(text, final)
        if self.parser is not None:
            text, out.tool_calls = self.parser.feed(text, final)
            out.call_deltas = self.parser.take_deltas()
            self.calls += len(out.tool_calls)
        out.content = text
        return out


def decoder_for(
    plan: OutputPlan | None,
    decode: Callable[..., str],
    hidden_ids: set[int],
) -> Callable[[list[int]], str]:
    """Decoding that keeps special tokens where markup needs them (EOS and the like dropped)."""
    if plan is None or not plan.needs_special_tokens:
        return decode

    def with_specials(ids: list[int]) -> str:
        return decode([i for i in ids if i not in hidden_ids], skip_special_tokens=False)

    return with_specials
