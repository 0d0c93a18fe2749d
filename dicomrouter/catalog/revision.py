"""Whether the catalog's schema is the one this release needs: the check every command makes first.

Importable without SQLAlchemy; Alembic loads only to explain a revision that is not current.
"""

from __future__ import annotations

# The newest revision in migrations/versions (tests/unit/test_catalog.py keeps the two equal).
SCHEMA_REVISION = "0009"
UPGRADE_HINT = "run: dicomrouter --config FILE db upgrade"


class SchemaNeedsUpgrade(Exception):
    """The catalog database is not at the revision this release of dicomrouter needs."""


def require_revision(current: str | None) -> None:
    """Raise SchemaNeedsUpgrade unless `current` (from alembic_version; None: empty) is SCHEMA_REVISION."""
    if current == SCHEMA_REVISION:
        return
    if current is None:
        raise SchemaNeedsUpgrade(f"the catalog database has no schema yet; {UPGRADE_HINT}")
    if not _shipped(current):
        raise SchemaNeedsUpgrade(
            f"the catalog database is at revision {current}, which this release does not know"
            f" (it expects {SCHEMA_REVISION}); a newer dicomrouter migrated it: upgrade dicomrouter"
        )
    raise SchemaNeedsUpgrade(
        f"the catalog database is at revision {current}, this release needs {SCHEMA_REVISION}; {UPGRADE_HINT}"
    )


def _shipped(revision: str) -> bool:
    """True when the packaged migrations have `revision` (an older schema this release can upgrade)."""
    from alembic.script import ScriptDirectory
    from alembic.util import CommandError

    from dicomrouter.catalog.schema import alembic_config

    try:
        ScriptDirectory.from_config(alembic_config()).get_revision(revision)
    except CommandError:
        return False
    return True
