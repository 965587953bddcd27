"""Splitting a model's thinking (between its reasoning markers) from its answer, as text streams."""

from __future__ import annotations

from dataclasses import dataclass

from engine.output.markers import split_at

# The thinking markers mlx-lm's tokenizer utilities know (a pair is used when both are in the vocab).
THINK_MARKERS: list[tuple[str, str]] = [
    ("<think>", "</think>"),
    ("<longcat_think>", "</longcat_think>"),
    ("<|think:start|>", "<|think:end|>"),
    ("<|channel>thought", "<channel|>"),
    ("<|open|>think<|sep|>", "<|close|>think<|sep|>"),
]


@dataclass(frozen=True)
class ReasoningMarkers:
    start: str
    end: str


def detect_reasoning(vocab: set[str] | dict[str, int]) -> ReasoningMarkers | None:
    """The model's thinking markers, from its vocabulary (as mlx-lm infers them)."""
    for start, end in THINK_MARKERS[:3]:
        if start in vocab and end in vocab:
            return ReasoningMarkers(start, end)
    if "<|channel>" in vocab and "<channel|>" in vocab:
        return ReasoningMarkers(*THINK_MARKERS[3])
    if all(t in vocab for t in ("<|open|>", "<|close|>", "<|sep|>", "<|end_of_msg|>")):
        return ReasoningMarkers(*THINK_MARKERS[4])
    return None


def starts_thinking(prompt_text: str, markers: ReasoningMarkers) -> bool:
    """The prompt opened a thinking block the model continues (templates that write `<think>`)."""
    tail = prompt_text.rstrip()
    return tail.endswith(markers.start)


class ReasoningSplitter:
    """Feed text; get (reasoning, content). Thinking is recognized only at the start of the
    output (or when the prompt opened it); all reasoning precedes all content."""

    def __init__(self, markers: ReasoningMarkers, in_reasoning: bool = False):
        self.markers = markers
        self._state = "thinking" if in_reasoning else "start"
        self._buf = ""
        self._thought = False  # some reasoning was released
        self.entered = in_reasoning  # the output is (or was) inside the thinking block

    @property
    def state(self) -> str:
        """start (nothing decided yet) | thinking | after (the end marker passed) | content"""
        return self._state

    def feed(self, text: str, final: bool = False) -> tuple[str, str]:
        self._buf += text
        reasoning = content = ""
        while True:
            if self._state == "start":
                stripped = self._buf.lstrip()
                if stripped.startswith(self.markers.start):
                    self._buf = stripped[len(self.markers.start) :]
                    self._state = "thinking"
                    self.entered = True
                    continue
                if not final and (not stripped or self.markers.start.startswith(stripped)):
                    return reasoning, content  # may still become the start marker
                self._state = "content"
                continue
            if self._state == "thinking":
                if not self._thought:  # the line break after the start marker is layout
                    self._buf = self._buf.lstrip("\n")
                before, found, rest = split_at(self._buf, self.markers.end, final)
                self._thought |= bool(before)
                reasoning += before
                self._buf = rest
                if found is None:
                    return reasoning, content
                self._state = "after"
                continue
            if self._state == "after":  # the blank lines between thinking and answer
                self._buf = self._buf.lstrip()
                if not self._buf and not final:
                    return reasoning, content
                self._state = "content"
                continue
            content += self._buf
            self._buf = ""
            return reasoning, content

    def finish(self) -> tuple[str, str]:
        return self.feed("", final=True)
