"""Text from the network made safe to show; kept apart from logging so the CLI can print without structlog."""

from __future__ import annotations


def printable(text: str) -> str:
    """Text that came from the network, safe to print or log on one line: control characters (CR, LF,
    ESC...) are shown escaped, never acted on by a terminal or a log reader."""
    if text.isprintable():
        return text
    return "".join(
        ch if ch.isprintable() else ch.encode("unicode_escape").decode("ascii") for ch in text
    )
