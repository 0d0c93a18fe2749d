"""Database URLs shown to people, without importing SQLAlchemy (`config check` stays quick)."""

from __future__ import annotations

import re
from typing import Any

# SQLAlchemy's own URL pattern, up to the password: `name://user:password@`, password up to the first @.
_CREDENTIALS = re.compile(
    r"^(?P<head>[\w+]+://[^:/]*:)(?P<password>[^@]*)(?P<tail>@.*)$", re.DOTALL
)
_URL = re.compile(r"^[\w+]+://")


def shown_url(url: Any) -> str:
    """The URL to print or log: its password masked, as SQLAlchemy's render_as_string(hide_password=True)."""
    if not isinstance(url, str):
        try:  # a sqlalchemy URL object
            return url.render_as_string(hide_password=True)
        except Exception:  # not a URL we can read: print nothing of it that could be secret
            return "(an unreadable URL)"
    if not _URL.match(url):
        return "(an unreadable URL)"
    credentials = _CREDENTIALS.match(url)
    if credentials is None:
        return url
    return f"{credentials['head']}***{credentials['tail']}"
