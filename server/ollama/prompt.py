"""Turn /api/generate bodies into prompt text.

Chat prompts are rendered by server/chat.py, for every API. /api/generate follows Ollama: `raw`
sends the prompt untouched; a request `template` (Ollama's Go-template syntax, the common subset:
`{{ .System }}`, `{{ .Prompt }}`, `{{ .Response }}`, `{{ if .X }}...{{ else }}...{{ end }}`) is
rendered; otherwise a model with a chat template gets [system, user] through it, and a base model
(no chat template) gets the plain prompt, with `system` before it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from engine.output.events import OutputSpec
from server.chat import Message, chat_text
from server.errors import APIError

_TOKEN = re.compile(r"{{-?\s*(.*?)\s*-?}}", re.S)


@dataclass
class Prompt:
    text: str
    add_special_tokens: bool  # False when a chat template already wrote BOS and the like


def render_go_template(template: str, values: dict[str, str]) -> str:
    """Render the subset of Go templates that Ollama prompt templates mostly use."""
    out: list[str] = []
    # Stack of (this branch is emitting, some branch of this `if` was taken).
    stack: list[tuple[bool, bool]] = []
    pos = 0
    for m in _TOKEN.finditer(template):
        emitting = all(e for e, _ in stack)
        if emitting:
            out.append(template[pos : m.start()])
        pos = m.end()
        action = m.group(1)
        if action.startswith("if "):
            cond = bool(_value(action[3:], values))
            stack.append((cond, cond))
        elif action == "else":
            if not stack:
                raise APIError(400, "template: 'else' without 'if'")
            _, taken = stack.pop()
            stack.append((not taken, True))
        elif action == "end":
            if not stack:
                raise APIError(400, "template: 'end' without 'if'")
            stack.pop()
        elif emitting:
            out.append(_value(action, values))
    if stack:
        raise APIError(400, "template: 'if' without 'end'")
    out.append(template[pos:])
    return "".join(out)


def _value(expr: str, values: dict[str, str]) -> str:
    expr = expr.strip()
    if not expr.startswith("."):
        raise APIError(400, f"template: unsupported action '{expr}'")
    return values.get(expr[1:], "")


def generate_prompt(
    tokenizer: Any,
    prompt: str,
    system: str | None,
    template: str | None,
    raw: bool,
    output: OutputSpec | None = None,
) -> Prompt:
    """The text /api/generate feeds the model (see the module docstring)."""
    if raw:
        return Prompt(prompt, add_special_tokens=True)
    if template:
        values = {"System": system or "", "Prompt": prompt, "Response": ""}
        return Prompt(render_go_template(template, values), add_special_tokens=True)
    if getattr(tokenizer, "chat_template", None):
        messages = [Message("system", system)] if system else []
        messages.append(Message("user", prompt))
        text, special = chat_text(tokenizer, "", messages, transcript=True, output=output)
        return Prompt(text, add_special_tokens=special)
    text = f"{system}\n\n{prompt}" if system else prompt
    return Prompt(text, add_special_tokens=True)
