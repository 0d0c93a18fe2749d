"""Shared fixtures: the real Orthanc farm, router configs, a running router process."""

from __future__ import annotations

import os
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import sqlalchemy as sa
from hypothesis import settings as hypothesis_settings
from sqlalchemy.engine import make_url

from tests.support.orthanc_fixtures import *  # noqa: F403  (fixtures)
from tests.support.orthanc_fixtures import write_router_config
from tests.support.router_process import RouterProcess

# The generated-input tests explore new inputs on every local run (that is how they find bugs);
# under CI they replay a fixed sequence, so a landing is judged on the same inputs each time.
hypothesis_settings.register_profile("ci", derandomize=True)
if os.environ.get("CI"):
    hypothesis_settings.load_profile("ci")

PG_ADMIN_URL = os.environ.get(
    "DICOMROUTER_TEST_POSTGRES", "postgresql+psycopg://postgres@127.0.0.1:5432/postgres"
)


@pytest.fixture(scope="session")
def pg_database() -> Iterator[sa.URL]:
    """A throwaway PostgreSQL database for this test session, dropped at the end."""
    admin = sa.create_engine(PG_ADMIN_URL, isolation_level="AUTOCOMMIT")
    try:
        with admin.connect() as connection:
            connection.execute(sa.text("SELECT 1"))
    except sa.exc.OperationalError as exc:
        admin.dispose()
        if os.environ.get("CI"):
            pytest.fail(f"CI must run the PostgreSQL tests, but PostgreSQL is unreachable: {exc}")
        pytest.skip(f"PostgreSQL unreachable at {make_url(PG_ADMIN_URL).host}:5432: {exc}")
    name = f"dicomrouter_test_{uuid.uuid4().hex[:12]}"
    with admin.connect() as connection:
        connection.execute(sa.text(f'CREATE DATABASE "{name}"'))
    try:
        yield make_url(PG_ADMIN_URL).set(database=name)
    finally:
        with admin.connect() as connection:
            connection.execute(sa.text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def catalog_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """An empty database: a SQLite file in a not-yet-existing folder, or a fresh PG schema."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'var' / 'catalog.db'}"
        return
    database: sa.URL = request.getfixturevalue("pg_database")
    schema = f"t_{uuid.uuid4().hex[:12]}"
    admin = sa.create_engine(database, isolation_level="AUTOCOMMIT")
    with admin.connect() as connection:
        connection.execute(sa.text(f'CREATE SCHEMA "{schema}"'))
    try:
        scoped = database.update_query_dict({"options": f"-csearch_path={schema}"})
        yield scoped.render_as_string(hide_password=False)
    finally:
        with admin.connect() as connection:
            connection.execute(sa.text(f'DROP SCHEMA "{schema}" CASCADE'))
        admin.dispose()


def upgrade_catalog(config_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "dicomrouter", "--config", str(config_path), "db", "upgrade"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr + result.stdout


@pytest.fixture
def farm_config(tmp_path, clean_orthanc_farm, router_port, workstation_port) -> Path:
    """A router config for the session farm (emptied), its catalog created, in a fresh folder."""
    path = write_router_config(tmp_path / "dicomrouter.yaml", clean_orthanc_farm, router_port, workstation_port)
    upgrade_catalog(path)
    return path


@pytest.fixture
def farm_router(farm_config, router_port):
    """`dicomrouter serve` on the farm config; always stopped."""
    router = RouterProcess(farm_config, router_port)
    router.start()
    try:
        yield router
    finally:
        router.stop()
