"""The generic tool format's parser: the whole output is the JSON envelope
`{"tool_calls": [...]}` or `{"response": <answer>}` (the generic grammar enforces it).

A string answer streams as it is written: its JSON escapes are decoded as they complete, and
the envelope around it is never shown. Calls stream as their arguments are written."""

from __future__ import annotations

import json
import re

from engine.output.calls import CallStreamer, ToolParser, call_parts, dumps
from engine.output.events import ToolCall, ToolSpec

_OPEN = '{"response": "'  # how the grammar writes a string answer's start
_CALLS = '{"tool_calls":['  # a call list's start, without its layout
_CALLS_HEAD = re.compile(r'\{\s*"tool_calls"\s*:\s*\[')


class GenericParser(ToolParser):
    def __init__(self, tools: list[ToolSpec]):
        super().__init__(tools)
        self._buf = ""
        self._mode = "start"  # start | string | calls | json | done | text
        self._call: CallStreamer | None = None

    def feed(self, text: str, final: bool = False) -> tuple[str, list[ToolCall]]:
        self._buf += text
        if self._mode == "start":
            s = self._buf.lstrip()
            calls = _CALLS_HEAD.match(s)
            maybe = _OPEN.startswith(s) or _CALLS.startswith(re.sub(r"\s", "", s))
            if s.startswith(_OPEN):
                self._mode, self._buf = "string", s[len(_OPEN) :]
            elif calls is not None:
                self._mode, self._buf = "calls", s[calls.end() :]
            elif s.startswith("{") and not maybe:
                self._mode = "json"
            elif s and not s.startswith("{"):
                self._mode = "text"  # not the envelope at all (no grammar): plain text
            elif not final:
                return "", []
            else:
                self._mode = "json"
        if self._mode == "string":
            return self._string(final), []
        if self._mode == "calls":
            return "", self._calls(final)
        if self._mode == "json":
            return self._json(final)
        if self._mode == "text":
            out, self._buf = self._buf, ""
            return out, []
        return "", []  # done: the envelope's closing brace

    def _string(self, final: bool) -> str:
        """Decode the answer string up to its closing quote or the last complete escape."""
        s, i = self._buf, 0
        while i < len(s):
            ch = s[i]
            if ch == '"':
                self._mode = "done"
                break
            if ch == "\\":
                need = 6 if s[i + 1 : i + 2] == "u" else 2
                if i + need > len(s):
                    break
                if need == 6 and _high_surrogate(s[i + 2 : i + 6]):
                    need = 12  # a surrogate pair: decode both halves together
                    if i + need > len(s):
                        break
                i += need
                continue
            i += 1
        safe, self._buf = s[:i], s[i:]
        if self._mode == "done":
            self._buf = ""
        elif final:
            self._buf = ""  # a cut escape at the very end is dropped
        try:
            return str(json.loads(f'"{safe}"'))
        except ValueError:
            return safe

    def _calls(self, final: bool) -> list[ToolCall]:
        """The call list's objects, each streamed as it is written."""
        calls: list[ToolCall] = []
        while self._mode == "calls":
            if self._call is None:
                s = self._buf.lstrip(" \n\t,")
                if s.startswith("]"):
                    self._buf, self._mode = "", "done"  # the envelope's end is layout
                    break
                if not s.startswith("{"):
                    self._buf = "" if final else s  # cut short: nothing more to release
                    break
                self._buf, self._call = s, CallStreamer(self)
            reader = self._call
            rest, self._buf = reader.feed(self._buf), ""
            if rest is None:
                if final:  # cut by max_tokens: the call never completes
                    self._call = None
                    self.abandon()
                break
            self._call, self._buf = None, rest
            call = reader.close()
            if call is not None:
                calls.append(call)
        return calls

    def _json(self, final: bool) -> tuple[str, list[ToolCall]]:
        try:
            value, _ = json.JSONDecoder().raw_decode(self._buf.lstrip())
        except ValueError:
            if final:
                self._buf = ""  # a cut envelope: its calls are incomplete, never shown as text
            return "", []
        self._buf, self._mode = "", "done"
        if not isinstance(value, dict):
            return "", []
        if "response" in value and "tool_calls" not in value:
            answer = value["response"]
            return (answer if isinstance(answer, str) else dumps(answer)), []
        items = value.get("tool_calls") or ([value["tool_call"]] if "tool_call" in value else [])
        calls: list[ToolCall] = []
        for obj in items if isinstance(items, list) else []:
            parts = call_parts(obj)
            call = self.release(*parts) if parts is not None else None
            if call is not None:
                calls.append(call)
        return "", calls


def _high_surrogate(hex4: str) -> bool:
    try:
        return 0xD800 <= int(hex4, 16) <= 0xDBFF
    except ValueError:
        return False
