"""Streaming tool-call parsers, one per family of chat-template markup.

Each parser is fed the answer text as it streams and returns (content, complete tool calls).
Text that could be the beginning of a call's markup is held until it is known not to be, so
markup never reaches the content. A call is released whole when its markup closes."""

from __future__ import annotations

import json
import re
from typing import Any

from engine.output.events import ToolCall, ToolSpec
from engine.output.markers import split_at

_DECODER = json.JSONDecoder()


def dumps(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False)


def call_of(
    obj: Any, index: int, args_keys: tuple[str, ...] = ("arguments", "parameters")
) -> ToolCall | None:
    """A ToolCall from {"name": ..., "arguments": {...}}, or None when obj is not one."""
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
    return ToolCall(index, obj["name"], dumps(args))


class ToolParser:
    """Feed text, get (content, calls). `finish()` releases what is held at the end."""

    def __init__(self, tools: list[ToolSpec]):
        self.tools = {t.name: t for t in tools}
        self.count = 0  # calls released so far

    def feed(self, text: str, final: bool = False) -> tuple[str, list[ToolCall]]:
        raise NotImplementedError

    def finish(self) -> tuple[str, list[ToolCall]]:
        return self.feed("", final=True)

    def _content(self, text: str) -> str:
        # Whitespace between and after calls is layout, not an answer.
        return "" if self.count and not text.strip() else text


class MarkerParser(ToolParser):
    """Calls wrapped in start/end markers (hermes `<tool_call>{json}</tool_call>`, Qwen3-coder)."""

    start = "<tool_call>"
    end = "</tool_call>"

    def __init__(self, tools: list[ToolSpec]):
        super().__init__(tools)
        self._buf = ""
        self._in_call = False

    def feed(self, text: str, final: bool = False) -> tuple[str, list[ToolCall]]:
        self._buf += text
        content, calls = "", list[ToolCall]()
        while True:
            if not self._in_call:
                before, found, self._buf = split_at(self._buf, self.start, final)
                content += self._content(before)
                if found is None:
                    return content, calls
                self._in_call = True
                continue
            at = self._buf.find(self.end)
            if at < 0 and not final:
                return content, calls
            body = self._buf if at < 0 else self._buf[:at]
            self._buf = "" if at < 0 else self._buf[at + len(self.end) :]
            self._in_call = False
            call = self.parse_body(body.strip())  # a truncated or broken call is dropped
            if call is not None:
                calls.append(call)
                self.count += 1
            if at < 0:
                return content, calls

    def parse_body(self, body: str) -> ToolCall | None:
        try:
            return call_of(json.loads(body), self.count)
        except ValueError:
            return None


class Qwen3CoderParser(MarkerParser):
    """`<tool_call><function=NAME><parameter=P>value</parameter>...</function></tool_call>`."""

    _FUNC = re.compile(r"<function=([^>\n]+)>(.*?)</function>", re.S)
    _PARAM = re.compile(r"<parameter=([^>\n]+)>\n?(.*?)\n?</parameter>", re.S)

    def parse_body(self, body: str) -> ToolCall | None:
        m = self._FUNC.search(body)
        if m is None:
            return None
        name = m.group(1).strip()
        props = self.tools[name].parameters.get("properties", {}) if name in self.tools else {}
        args: dict[str, Any] = {}
        for pm in self._PARAM.finditer(m.group(2)):
            key, raw = pm.group(1).strip(), pm.group(2)
            args[key] = _typed(raw, props.get(key, {}))
        return ToolCall(self.count, name, dumps(args))


def _typed(raw: str, schema: dict[str, Any]) -> Any:
    """A parameter's text as the value its schema wants (text stays text for strings)."""
    if schema.get("type") == "string":
        return raw
    try:
        return json.loads(raw)
    except ValueError:
        return raw


class JsonStreamParser(ToolParser):
    """Output that is JSON when it calls tools: calls are released as each value closes."""

    def __init__(self, tools: list[ToolSpec]):
        super().__init__(tools)
        self._buf = ""
        self._mode = "start"  # start | json | text

    def feed(self, text: str, final: bool = False) -> tuple[str, list[ToolCall]]:
        self._buf += text
        if self._mode == "start":
            self._mode = self.opening(final)
            if self._mode == "start":
                return "", []
        if self._mode == "text":
            out, self._buf = self._buf, ""
            return out, []
        calls = self.take_calls(final)
        if self._mode == "text":  # the JSON held the answer (the generic envelope)
            out, self._buf = self._buf, ""
            return out, calls
        if final and self._buf.strip():  # JSON that is no call: it was the answer
            out, self._buf = self._buf, ""
            return (out if not self.count else ""), calls
        return "", calls

    def opening(self, final: bool) -> str:
        raise NotImplementedError

    def take_calls(self, final: bool) -> list[ToolCall]:
        raise NotImplementedError

    def _decode_next(self, skip: str = " \n\t;,") -> Any:
        """The next complete JSON value in the buffer (consumed), or None."""
        s = self._buf.lstrip(skip)
        try:
            value, end = _DECODER.raw_decode(s)
        except ValueError:
            return None
        self._buf = s[end:]
        return value


class Llama3Parser(JsonStreamParser):
    """Llama 3.x: `{"name": ..., "parameters": {...}}` (optionally after `<|python_tag|>`)."""

    TAG = "<|python_tag|>"

    def opening(self, final: bool) -> str:
        s = self._buf.lstrip()
        if s.startswith(self.TAG):
            self._buf = s[len(self.TAG) :]
            return "json"
        if s.startswith("{"):
            return "json"
        if not final and (not s or self.TAG.startswith(s)):
            return "start"
        return "text"

    def take_calls(self, final: bool) -> list[ToolCall]:
        calls: list[ToolCall] = []
        while True:
            saved = self._buf
            value = self._decode_next()
            call = call_of(value, self.count) if value is not None else None
            if call is None:
                self._buf = saved
                return calls
            calls.append(call)
            self.count += 1


class MistralParser(ToolParser):
    """Mistral: `[TOOL_CALLS][{"name", "arguments"}, ...]` or `[TOOL_CALLS]name[ARGS]{...}`."""

    MARK = "[TOOL_CALLS]"
    ARGS = "[ARGS]"

    def __init__(self, tools: list[ToolSpec]):
        super().__init__(tools)
        self._buf = ""
        self._in_calls = False

    def feed(self, text: str, final: bool = False) -> tuple[str, list[ToolCall]]:
        self._buf += text
        content, calls = "", list[ToolCall]()
        while True:
            if not self._in_calls:
                before, found, self._buf = split_at(self._buf, self.MARK, final)
                content += self._content(before)
                if found is None:
                    return content, calls
                self._in_calls = True
            got = self._take()
            if got is None:
                if final:
                    self._buf = ""  # a truncated call is dropped, never shown as text
                return content, calls
            calls.extend(got)
            self._in_calls = False

    def _take(self) -> list[ToolCall] | None:
        s = self._buf.lstrip()
        if s.startswith("["):
            try:
                value, end = _DECODER.raw_decode(s)
            except ValueError:
                return None
            self._buf = s[end:]
            out = []
            for obj in value if isinstance(value, list) else []:
                call = call_of(obj, self.count)
                if call is not None:
                    out.append(call)
                    self.count += 1
            return out
        at = s.find(self.ARGS)
        if at < 0:
            return None
        rest = s[at + len(self.ARGS) :]
        try:
            args, end = _DECODER.raw_decode(rest.lstrip())
        except ValueError:
            return None
        self._buf = rest.lstrip()[end:]
        call = call_of({"name": s[:at].strip(), "arguments": args}, self.count)
        self.count += call is not None
        return [call] if call is not None else []
