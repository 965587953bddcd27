"""What every tool-call parser shares: releasing calls as typed pieces, and streaming a call's
JSON arguments as the model writes them.

A call is streamed once its name and the start of its arguments object are known (the
grammars write `{"name": ..., "arguments": {` in that order): the arguments' text then goes
out fragment by fragment, and the complete call carries exactly their concatenation. A call
written another way is parsed whole when it closes and released in one piece."""

from __future__ import annotations

import json
import re
from typing import Any

from engine.output.events import ToolCall, ToolCallDelta, ToolSpec, add_call_delta

ARGS_KEYS = ("arguments", "parameters")
# A call object's head up to its arguments object's opening brace (not consumed).
_HEAD = re.compile(
    r'\s*\{\s*"name"\s*:\s*("(?:[^"\\]|\\.)*")\s*,\s*"(?:arguments|parameters)"\s*:\s*(?=\{)'
)


def dumps(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False)


def call_parts(obj: Any, args_keys: tuple[str, ...] = ARGS_KEYS) -> tuple[str, str] | None:
    """(name, arguments JSON) of {"name": ..., "arguments": {...}}, or None when obj is no call."""
    if not isinstance(obj, dict) or not isinstance(obj.get("name"), str):
        return None
    args: Any = next((obj[k] for k in args_keys if k in obj), {})
    if isinstance(args, str):  # some models write the arguments as a JSON string
        try:
            args = json.loads(args)
        except ValueError:
            return None
    if not isinstance(args, dict):
        return None
    return obj["name"], dumps(args)


class ToolParser:
    """Feed text, get (content, complete calls); `take_deltas()` drains the calls' pieces
    produced so far, in order. `finish()` releases what is held at the end."""

    def __init__(self, tools: list[ToolSpec]):
        self.tools = {t.name: t for t in tools}
        self.count = 0  # calls begun so far (the next call's index)
        self._deltas: list[ToolCallDelta] = []
        self._open: ToolCall | None = None  # the call whose arguments are streaming

    def feed(self, text: str, final: bool = False) -> tuple[str, list[ToolCall]]:
        raise NotImplementedError

    def finish(self) -> tuple[str, list[ToolCall]]:
        return self.feed("", final=True)

    def take_deltas(self) -> list[ToolCallDelta]:
        out, self._deltas = self._deltas, []
        return out

    def begin(self, name: str) -> None:
        """A call starts: its first piece carries its id and name."""
        call = self._open = ToolCall(self.count, name, "")
        self.count += 1
        add_call_delta(self._deltas, ToolCallDelta(call.index, "", call.id, name))

    def fragment(self, text: str) -> None:
        if text and self._open is not None:
            self._open.arguments += text
            add_call_delta(self._deltas, ToolCallDelta(self._open.index, text))

    def end(self) -> ToolCall | None:
        """The streamed call, complete; None when its arguments are no JSON object (it was
        broken: it is dropped, as a call cut short is)."""
        call, self._open = self._open, None
        if call is None:
            return None
        try:
            ok = isinstance(json.loads(call.arguments), dict)
        except ValueError:
            ok = False
        if not ok:
            return None
        add_call_delta(self._deltas, ToolCallDelta(call.index, done=True))
        return call

    def abandon(self) -> None:
        """The output ended inside a call: it never completes."""
        self._open = None

    def release(self, name: str, arguments: str) -> ToolCall | None:
        """A call parsed whole: all its pieces at once."""
        self.begin(name)
        self.fragment(arguments)
        return self.end()

    def _content(self, text: str) -> str:
        # Whitespace between and after calls is layout, not an answer.
        return "" if self.count and not text.strip() else text


class ValueScanner:
    """Finds where a JSON object (or array) ends in text that arrives in pieces."""

    def __init__(self) -> None:
        self.depth = 0
        self._in_string = False
        self._escaped = False

    def scan(self, text: str) -> int | None:
        """The index in `text` just past the value's end, or None while it goes on."""
        for i, ch in enumerate(text):
            if self._in_string:
                if self._escaped:
                    self._escaped = False
                elif ch == "\\":
                    self._escaped = True
                elif ch == '"':
                    self._in_string = False
            elif ch == '"':
                self._in_string = True
            elif ch in "{[":
                self.depth += 1
            elif ch in "}]":
                self.depth -= 1
                if self.depth <= 0:
                    return i + 1
        return None


class CallStreamer:
    """One call object fed in pieces (it starts at `{`). With `name`, the text is the arguments
    object itself (Mistral's `name[ARGS]{...}`)."""

    def __init__(self, parser: ToolParser, name: str | None = None):
        self.parser = parser
        self.raw = ""  # the object's text so far
        self.closed = False
        self.streaming = name is not None  # pieces have been sent
        self._object = ValueScanner()
        self._args = ValueScanner()
        self._args_done = False
        if name is not None:
            parser.begin(name)

    def feed(self, text: str) -> str | None:
        """Consume text; None while the object is open, else the text after it."""
        if self.closed:
            return text
        if self.streaming and not self.raw:
            text = text.lstrip()  # the bare arguments' leading layout
        end = self._object.scan(text)
        part, rest = (text, None) if end is None else (text[:end], text[end:])
        self.raw += part
        self.closed = rest is not None
        if not self.streaming:
            head = _HEAD.match(self.raw)
            if head is None:
                return rest
            self.parser.begin(json.loads(head.group(1)))
            self.streaming = True
            part = self.raw[head.end() :]
        if not self._args_done:
            at = self._args.scan(part)
            self.parser.fragment(part if at is None else part[:at])
            self._args_done = at is not None
        return rest

    def close(self) -> ToolCall | None:
        """The call, once the object has closed; None when it is no call (then, unless
        `streaming`, nothing of it was sent and `raw` is plain JSON text)."""
        if self.streaming:
            return self.parser.end()
        try:
            parts = call_parts(json.loads(self.raw))
        except ValueError:
            return None
        return self.parser.release(*parts) if parts is not None else None
