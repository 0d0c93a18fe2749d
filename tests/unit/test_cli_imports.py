"""Commands that do not talk DICOM answer quickly: they never import pydicom, pynetdicom or aiohttp.

Checked in a fresh interpreter from `-X importtime` (which modules were imported), not from
a wall-clock time, which would flake on a loaded machine.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from dicomrouter.catalog.db import make_engine, session_factory
from dicomrouter.catalog.queries import Catalog
from dicomrouter.catalog.schema import SCHEMA_REVISION, head_revision, upgrade
from dicomrouter.config import load_config
from tests.support.configs import base_document, write_document

ROOT = Path(__file__).resolve().parents[2]
DICOM_STACK = {"pydicom", "pynetdicom", "aiohttp", "numpy"}


def imported_by(*arguments: str) -> set[str]:
    """The top-level packages `dicomrouter ARGUMENTS` imports; the command must succeed."""
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
    }
    result = subprocess.run(
        [sys.executable, "-X", "importtime", "-m", "dicomrouter", *arguments],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    modules = set()
    for line in result.stderr.splitlines():
        if line.startswith("import time:") and not line.endswith("| package"):
            modules.add(line.rsplit("|", 1)[1].strip().split(".")[0])
    assert "dicomrouter" in modules, "no -X importtime output: cannot tell what was imported"
    return modules


@pytest.fixture
def config_path(tmp_path: Path) -> Path:
    return write_document(tmp_path / "router.yaml", base_document())


def test_help_imports_no_dicom_database_or_logging_stack() -> None:
    modules = imported_by("--help")
    assert not modules & (DICOM_STACK | {"sqlalchemy", "alembic", "structlog", "prometheus_client"})


def test_config_check_imports_no_dicom_or_database_stack(config_path: Path) -> None:
    modules = imported_by("--config", str(config_path), "config", "check")
    assert not modules & (DICOM_STACK | {"sqlalchemy", "alembic"})


def test_catalog_where_imports_no_dicom_stack_nor_alembic(config_path: Path) -> None:
    url = f"sqlite:///{config_path.parent / 'var' / 'catalog.db'}"
    upgrade(url)
    engine = make_engine(url)
    try:
        catalog = Catalog(session_factory(engine))
        catalog.sync_servers(load_config(config_path))
        catalog.record_study_seen("Test PACS 1", "1.2.3", "found")
    finally:
        engine.dispose()
    modules = imported_by("--config", str(config_path), "catalog", "where", "1.2.3")
    assert "sqlalchemy" in modules
    assert not modules & (DICOM_STACK | {"alembic"})


def test_schema_revision_is_the_newest_migration() -> None:
    assert SCHEMA_REVISION == head_revision()
