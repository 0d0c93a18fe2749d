"""The catalog database: which server holds which study, the forward queue and the audit trail."""

from __future__ import annotations

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
