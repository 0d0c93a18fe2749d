"""No log event of ours uses a key that structlog's processors write (it would be overwritten or misread)."""

from __future__ import annotations

import ast
from pathlib import Path

import dicomrouter

# Written by the processors in dicomrouter/logging.py: the event name, add_log_level,
# add_logger_name, TimeStamper, format_exc_info. (exc_info and stack_info are instructions to
# structlog: passing them means asking for a traceback, never naming a value.)
STRUCTLOG_KEYS = frozenset({"event", "level", "logger", "timestamp", "exception"})
LOG_METHODS = frozenset(
    {"debug", "info", "warning", "error", "exception", "critical", "msg", "bind", "new"}
)


def colliding_keys(source: str) -> list[tuple[int, str]]:
    """(line, key) of each log call or bind in `source` with a keyword structlog owns."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if not isinstance(node, ast.Call) or not isinstance(node.func, ast.Attribute):
            continue
        if node.func.attr not in LOG_METHODS and node.func.attr != "bind_contextvars":
            continue
        for keyword in node.keywords:
            if keyword.arg in STRUCTLOG_KEYS:
                found.append((node.lineno, keyword.arg))
    return found


def test_the_scan_sees_a_collision():
    assert colliding_keys('log.info("find_done", level="STUDY", query_level="STUDY")') == [
        (1, "level")
    ]


def test_no_log_event_uses_a_structlog_key():
    package = Path(dicomrouter.__file__).parent
    collisions = [
        f"{path.relative_to(package.parent)}:{line}: {key}="
        for path in sorted(package.rglob("*.py"))
        for line, key in colliding_keys(path.read_text(encoding="utf-8"))
    ]
    assert collisions == [], "rename these keys (e.g. level -> query_level):\n" + "\n".join(
        collisions
    )
