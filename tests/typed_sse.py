"""Parse typed SSE streams (Anthropic Messages, OpenAI Responses) strictly, for tests."""

from __future__ import annotations

import json


def typed_events(raw: str) -> list[dict]:
    """Every frame's data, after checking that its `event:` line names the data's type."""
    events = []
    for frame in raw.split("\n\n"):
        if not frame.strip() or frame.startswith(":"):  # blank, or a keep-alive comment
            continue
        lines = frame.split("\n")
        assert len(lines) == 2 and lines[0].startswith("event: "), frame
        assert lines[1].startswith("data: "), frame
        data = json.loads(lines[1][len("data: ") :])
        assert data["type"] == lines[0][len("event: ") :], frame
        events.append(data)
    return events
