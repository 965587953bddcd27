"""Turn /api/chat and /api/generate bodies into prompt text.

Chat uses the model's own chat template (its tokenizer's). /api/generate follows Ollama: `raw`
sends the prompt untouched; a request `template` (Ollama's Go-template syntax, the common subset:
`{{ .System }}`, `{{ .Prompt }}`, `{{ .Response }}`, `{{ if .X }}...{{ else }}...{{ end }}`) is
rendered; otherwise a model with a chat template gets [system, user] through it, and a base model
(no chat template) gets the plain prompt, with `system` before it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

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


def chat_prompt(tokenizer: Any, messages: list[dict[str, Any]]) -> Prompt:
    """The model's chat template over the messages, ending with the assistant's turn."""
    if getattr(tokenizer, "chat_template", None):
        text = tokenizer.apply_chat_template(messages, add_generation_prompt=True)
        return Prompt(text, add_special_tokens=False)
    # A base model: a plain transcript is the best it can continue.
    lines = [f"{m['role']}: {m.get('content', '')}" for m in messages]
    return Prompt("\n".join(lines) + "\nassistant:", add_special_tokens=True)


def generate_prompt(
    tokenizer: Any, prompt: str, system: str | None, template: str | None, raw: bool
) -> Prompt:
    """The text /api/generate feeds the model (see the module docstring)."""
    if raw:
        return Prompt(prompt, add_special_tokens=True)
    if template:
        values = {"System": system or "", "Prompt": prompt, "Response": ""}
        return Prompt(render_go_template(template, values), add_special_tokens=True)
    if getattr(tokenizer, "chat_template", None):
        messages = [{"role": "system", "content": system}] if system else []
        messages.append({"role": "user", "content": prompt})
        return chat_prompt(tokenizer, messages)
    text = f"{system}\n\n{prompt}" if system else prompt
    return Prompt(text, add_special_tokens=True)
