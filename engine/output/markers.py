"""Finding markers in streamed text without ever releasing a marker's first bytes as text."""

from __future__ import annotations


def held_prefix(text: str, marker: str) -> int:
    """Length of the longest end of `text` that is a proper beginning of `marker`."""
    for n in range(min(len(marker) - 1, len(text)), 0, -1):
        if text.endswith(marker[:n]):
            return n
    return 0


def split_at(buffer: str, marker: str, final: bool) -> tuple[str, str | None, str]:
    """(text before the marker, the marker if found, what remains held or after it).

    Without the marker, text that could begin it stays held unless `final`."""
    at = buffer.find(marker)
    if at >= 0:
        return buffer[:at], marker, buffer[at + len(marker) :]
    keep = 0 if final else held_prefix(buffer, marker)
    return buffer[: len(buffer) - keep], None, buffer[len(buffer) - keep :]
