"""Streaming tool-call parsers, one per family of chat-template markup.

Each parser is fed the answer text as it streams and returns (content, complete tool calls);
the calls' pieces (id and name first, then argument fragments) stream as they are written
(engine/output/calls.py). Text that could be the beginning of a call's markup is held until it
is known not to be, so markup never reaches the content."""

from __future__ import annotations

import json
import re
from typing import Any

from engine.output.calls import CallStreamer, ToolParser, dumps
from engine.output.events import ToolCall, ToolSpec
from engine.output.markers import split_at

__all__ = ["Llama3Parser", "MarkerParser", "MistralParser", "Qwen3CoderParser", "ToolParser"]


class MarkerParser(ToolParser):
    """Calls wrapped in start/end markers (hermes `<tool_call>{json}</tool_call>`, Qwen3-coder)."""

    open_mark = "<tool_call>"
    close_mark = "</tool_call>"

    def __init__(self, tools: list[ToolSpec]):
        super().__init__(tools)
        self._buf = ""
        self._call: Any = None  # the open call's body reader (None: outside a call)

    def feed(self, text: str, final: bool = False) -> tuple[str, list[ToolCall]]:
        self._buf += text
        content, calls = "", list[ToolCall]()
        while True:
            if self._call is None:
                before, found, self._buf = split_at(self._buf, self.open_mark, final)
                content += self._content(before)
                if found is None:
                    return content, calls
                self._call = self.body_reader()
                continue
            before, found, self._buf = split_at(self._buf, self.close_mark, final)
            self._call.feed(before)
            if found is None and not final:
                return content, calls
            reader, self._call = self._call, None
            call = reader.close() if reader.closed else None  # cut or broken: dropped
            if call is None:
                self.abandon()
            else:
                calls.append(call)
            if found is None:
                return content, calls

    def body_reader(self) -> Any:
        """What reads a call's body (feed, closed, close): the JSON object's streamer."""
        return CallStreamer(self)


class _Qwen3Body:
    """`<function=NAME><parameter=P>value</parameter>...</function>`: the name starts the call,
    each closed parameter adds its `"P": value` to the arguments object."""

    _FUNC = re.compile(r"<function=([^>\n]+)>")
    _PARAM = re.compile(r"<parameter=([^>\n]+)>\n?(.*?)\n?</parameter>", re.S)

    def __init__(self, parser: ToolParser):
        self.parser = parser
        self.closed = False
        self._buf = ""
        self._props: dict[str, Any] | None = None  # the function's parameter schemas, once named
        self._n = 0  # parameters written

    def feed(self, text: str) -> None:
        self._buf += text
        if self._props is None:
            m = self._FUNC.search(self._buf)
            if m is None:
                return
            name = m.group(1).strip()
            tool = self.parser.tools.get(name)
            self._props = tool.parameters.get("properties", {}) if tool is not None else {}
            self.parser.begin(name)
            self._buf = self._buf[m.end() :]
        while not self.closed:
            m, at = self._PARAM.search(self._buf), self._buf.find("</function>")
            if m is not None and (at < 0 or m.start() < at):
                key, raw = m.group(1).strip(), m.group(2)
                value = dumps(_typed(raw, self._props.get(key, {})))
                self.parser.fragment(f"{', ' if self._n else '{'}{dumps(key)}: {value}")
                self._n += 1
                self._buf = self._buf[m.end() :]
            elif at >= 0:
                self.parser.fragment("}" if self._n else "{}")
                self.closed = True
            else:
                return

    def close(self) -> ToolCall | None:
        return self.parser.end()


class Qwen3CoderParser(MarkerParser):
    """`<tool_call><function=NAME><parameter=P>value</parameter>...</function></tool_call>`."""

    def body_reader(self) -> Any:
        return _Qwen3Body(self)


def _typed(raw: str, schema: dict[str, Any]) -> Any:
    """A parameter's text as the value its schema wants (text stays text for strings)."""
    if schema.get("type") == "string":
        return raw
    try:
        return json.loads(raw)
    except ValueError:
        return raw


class Llama3Parser(ToolParser):
    """Llama 3.x: `{"name": ..., "parameters": {...}}` (optionally after `<|python_tag|>`),
    several separated by `;`. Output that opens with JSON but is no call is the answer."""

    TAG = "<|python_tag|>"

    def __init__(self, tools: list[ToolSpec]):
        super().__init__(tools)
        self._buf = ""
        self._mode = "start"  # start | json | held (a JSON answer, released at the end) | text
        self._call: CallStreamer | None = None

    def feed(self, text: str, final: bool = False) -> tuple[str, list[ToolCall]]:
        self._buf += text
        if self._mode == "start":
            self._mode = self._opening(final)
            if self._mode == "start":
                return "", []
        if self._mode == "text":
            out, self._buf = self._buf, ""
            return out, []
        calls = self._take(final) if self._mode == "json" else []
        if final and self._buf.strip():  # JSON that is no call: it was the answer
            out, self._buf = self._buf, ""
            return (out if not self.count else ""), calls
        return "", calls

    def _opening(self, final: bool) -> str:
        s = self._buf.lstrip()
        if s.startswith(self.TAG):
            self._buf = s[len(self.TAG) :]
            return "json"
        if s.startswith("{"):
            return "json"
        if not final and (not s or self.TAG.startswith(s)):
            return "start"
        return "text"

    def _take(self, final: bool) -> list[ToolCall]:
        calls: list[ToolCall] = []
        while True:
            if self._call is None:
                s = self._buf.lstrip(" \n\t;,")
                if not s.startswith("{"):
                    return calls  # nothing yet, or text after the calls
                self._buf, self._call = s, CallStreamer(self)
            reader = self._call
            rest, self._buf = reader.feed(self._buf), ""
            if rest is None:
                if final:  # cut short: a call never completes; other JSON is the answer
                    self._call = None
                    self._buf = "" if reader.streaming else reader.raw
                    self.abandon()
                return calls
            self._call, self._buf = None, rest
            call = reader.close()
            if call is not None:
                calls.append(call)
            elif not reader.streaming:  # a JSON value that is no call: the answer
                self._buf, self._mode = reader.raw + rest, "held"
                return calls


class MistralParser(ToolParser):
    """Mistral: `[TOOL_CALLS][{"name", "arguments"}, ...]` or `[TOOL_CALLS]name[ARGS]{...}`."""

    MARK = "[TOOL_CALLS]"
    ARGS = "[ARGS]"

    def __init__(self, tools: list[ToolSpec]):
        super().__init__(tools)
        self._buf = ""
        self._state = "out"  # out | open (after the mark) | array | args
        self._call: CallStreamer | None = None

    def feed(self, text: str, final: bool = False) -> tuple[str, list[ToolCall]]:
        self._buf += text
        content, calls = "", list[ToolCall]()
        while True:
            if self._call is not None:
                reader = self._call
                rest, self._buf = reader.feed(self._buf), ""
                if rest is None:
                    if final:  # a truncated call is dropped, never shown as text
                        self._call = None
                        self.abandon()
                    return content, calls
                self._call, self._buf = None, rest
                call = reader.close()
                if call is not None:
                    calls.append(call)
                if self._state == "args":
                    self._state = "out"
                continue
            if self._state == "out":
                before, found, self._buf = split_at(self._buf, self.MARK, final)
                content += self._content(before)
                if found is None:
                    return content, calls
                self._state = "open"
                continue
            if not self._next(final):
                return content, calls

    def _next(self, final: bool) -> bool:
        """Read past the mark: the array's calls or the name before [ARGS] (False: wait)."""
        s = self._buf.lstrip(" \n\t,")
        if self._state == "open" and s.startswith("["):
            self._buf, self._state = s[1:], "array"
            return True
        if self._state == "open":
            at = s.find(self.ARGS)
            if at >= 0:
                self._buf, self._state = s[at + len(self.ARGS) :], "args"
                self._call = CallStreamer(self, name=s[:at].strip())
                return True
        elif s.startswith("{"):
            self._buf, self._call = s, CallStreamer(self)
            return True
        elif s.startswith("]"):
            self._buf, self._state = s[1:], "out"
            return True
        if final:
            self._buf = ""  # a truncated call is dropped, never shown as text
        return False
