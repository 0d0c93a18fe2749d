"""The catalog database: which server holds which study, the forward queue and the audit trail.

The names below are loaded on first use: importing `dicomrouter.catalog.db` (or any submodule)
must not pull in the ORM queries or Alembic, so that quick CLI commands stay quick.
"""

from __future__ import annotations

from importlib import import_module
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from dicomrouter.catalog.db import make_engine, session_factory
    from dicomrouter.catalog.queries import (
        Catalog,
        ServerSync,
        StoredInstance,
        StudyLocationRow,
        UnknownServer,
    )
    from dicomrouter.catalog.schema import (
        SchemaNeedsUpgrade,
        require_current_schema,
        schema_state,
        upgrade,
    )

_WHERE = {
    "Catalog": "queries",
    "SchemaNeedsUpgrade": "schema",
    "ServerSync": "queries",
    "StoredInstance": "queries",
    "StudyLocationRow": "queries",
    "UnknownServer": "queries",
    "make_engine": "db",
    "require_current_schema": "schema",
    "schema_state": "schema",
    "session_factory": "db",
    "upgrade": "schema",
}

__all__ = [
    "Catalog",
    "SchemaNeedsUpgrade",
    "ServerSync",
    "StoredInstance",
    "StudyLocationRow",
    "UnknownServer",
    "make_engine",
    "require_current_schema",
    "schema_state",
    "session_factory",
    "upgrade",
]


def __getattr__(name: str) -> Any:
    if name not in _WHERE:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(import_module(f"{__name__}.{_WHERE[name]}"), name)
