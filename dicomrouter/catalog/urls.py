"""Database URLs shown to people and taken apart, without importing SQLAlchemy (quick CLI commands)."""

from __future__ import annotations

import re
from typing import Any, NamedTuple
from urllib.parse import parse_qsl, quote, unquote

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


class DatabaseURL(NamedTuple):
    """The parts of a database URL as SQLAlchemy's make_url reads them (user, password and database unquoted)."""

    backend: str  # "sqlite", "postgresql"
    driver: str | None  # "psycopg", "pysqlite", or None for the backend's default
    username: str | None
    password: str | None
    host: str | None
    port: int | None
    database: str | None
    query: dict[str, str]

    def without_password(self) -> str:
        """backend://user@host:port/database, as SQLAlchemy renders it: what libpq's tools take."""
        user = f"{quote(self.username, safe=' +')}@" if self.username is not None else ""
        host = f"[{self.host}]" if self.host and ":" in self.host else (self.host or "")
        port = f":{self.port}" if self.port is not None else ""
        database = f"/{quote(self.database, safe=' +/')}" if self.database is not None else ""
        return f"{self.backend}://{user}{host}{port}{database}"


# name://[user[:password]@][host or [ipv6]][:port][/database][?query]
_PARTS = re.compile(
    r"""^(?P<name>[\w+]+)://
    (?:(?P<username>[^:/]*)(?::(?P<password>[^@]*))?@)?
    (?:\[(?P<ipv6>[^/?]+)\]|(?P<host>[^/:?]+))?
    (?::(?P<port>[^/?]*))?
    (?:/(?P<database>[^?]*))?
    (?:\?(?P<query>.*))?$""",
    re.VERBOSE | re.DOTALL,
)


def parse_url(url: str) -> DatabaseURL:
    """Split a catalog URL without importing SQLAlchemy; ValueError when it is not one."""
    match = _PARTS.match(url)
    if match is None:
        raise ValueError(f"{shown_url(url)} is not a database URL")
    backend, _, driver = match["name"].partition("+")
    return DatabaseURL(
        backend,
        driver or None,
        unquote(match["username"]) if match["username"] is not None else None,
        unquote(match["password"]) if match["password"] is not None else None,
        match["ipv6"] or match["host"] or None,
        int(match["port"]) if match["port"] else None,
        unquote(match["database"]) if match["database"] is not None else None,
        dict(parse_qsl(match["query"] or "")),
    )
