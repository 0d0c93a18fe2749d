"""Commands that do not talk DICOM answer quickly: they never import pydicom, pynetdicom or aiohttp,
and those that read the catalog read it in plain SQL, without SQLAlchemy (~0.2 s of imports).

Checked in a fresh interpreter from `-X importtime` (which modules were imported), not from
a wall-clock time, which would flake on a loaded machine.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import click
import pytest
from click.testing import CliRunner

from dicomrouter.catalog.db import make_engine, session_factory
from dicomrouter.catalog.models import CommitmentRequest, ForwardJob, utcnow
from dicomrouter.catalog.queries import Catalog
from dicomrouter.catalog.schema import SCHEMA_REVISION, head_revision, upgrade
from dicomrouter.cli.main import COMMANDS, cli
from dicomrouter.config import load_config
from tests.support.configs import base_document, write_document

ROOT = Path(__file__).resolve().parents[2]
DICOM_STACK = {"pydicom", "pynetdicom", "aiohttp", "numpy"}


def imported_by(*arguments: str) -> set[str]:
    """The top-level packages `dicomrouter ARGUMENTS` imports; the command must succeed."""
    return run_importing(*arguments)[0]


def run_importing(*arguments: str, returncode: int = 0) -> tuple[set[str], str]:
    """(the top-level packages `dicomrouter ARGUMENTS` imports, what it printed, errors included); it must
    exit with `returncode`."""
    modules, printed = run_importing_modules(*arguments, returncode=returncode)
    return {module.split(".")[0] for module in modules}, printed


def run_importing_modules(*arguments: str, returncode: int = 0) -> tuple[set[str], str]:
    """As `run_importing`, but every module by its full name (dicomrouter.cli.store)."""
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
    assert result.returncode == returncode, result.stderr[-3000:]
    modules = set()
    for line in result.stderr.splitlines():
        if line.startswith("import time:") and not line.endswith("| package"):
            modules.add(line.rsplit("|", 1)[1].strip())
    assert "dicomrouter" in modules, "no -X importtime output: cannot tell what was imported"
    errors = "".join(line + "\n" for line in result.stderr.splitlines() if not line.startswith("import time:"))
    return modules, result.stdout + errors


@pytest.fixture
def config_path(tmp_path: Path) -> Path:
    return write_document(tmp_path / "router.yaml", base_document())


def test_help_imports_no_dicom_database_or_logging_stack() -> None:
    modules = imported_by("--help")
    assert not modules & (DICOM_STACK | {"sqlalchemy", "alembic", "structlog", "prometheus_client"})


def test_help_imports_no_command_and_no_config_loader() -> None:
    """`--help` lists the commands from cli/main.py's summaries: no command's module is imported."""
    modules, printed = run_importing_modules("--help")
    assert "serve" in printed and "Run the router" in printed
    ours = {module for module in modules if module.split(".")[0] == "dicomrouter"}
    assert ours == {"dicomrouter", "dicomrouter.cli", "dicomrouter.cli.main", "dicomrouter.config_location"}


def test_help_lists_the_commands_as_click_would_with_them_imported() -> None:
    """Each summary in cli/main.py is what the command's own docstring gives: the help is the same, at any
    terminal width, as that of a plain click group holding the imported commands."""
    eager = click.Group(
        "dicomrouter",
        commands={name: command.load() for name, command in COMMANDS.items()},
        params=cli.params,
        help=cli.help,
        context_settings=cli.context_settings,
    )
    for name, command in COMMANDS.items():
        loaded = command.load()
        assert loaded.name == name and not loaded.hidden and not loaded.deprecated, name
        stand_in = click.Command(name, help=command.summary)
        for limit in range(1, 120):
            assert stand_in.get_short_help_str(limit) == loaded.get_short_help_str(limit), (name, limit)
    for width in (30, 60, 80, 200):
        shown = CliRunner().invoke(cli, ["--help"], prog_name="dicomrouter", terminal_width=width)
        expected = CliRunner().invoke(eager, ["--help"], prog_name="dicomrouter", terminal_width=width)
        assert shown.exit_code == expected.exit_code == 0
        assert shown.output == expected.output


def test_config_check_imports_no_dicom_or_database_stack(config_path: Path) -> None:
    modules, _ = run_importing_modules("--config", str(config_path), "config", "check")
    assert not {module.split(".")[0] for module in modules} & (DICOM_STACK | {"sqlalchemy", "alembic"})
    # Loading a config imports neither the PDU codec nor, without TLS files in it, ssl.
    assert not modules & {"dicomrouter.dul.pdu", "ssl", "dicomrouter.net.tls"}


@pytest.fixture
def filled_config(tmp_path: Path, catalog_url: str) -> Path:
    """A config whose catalog (SQLite or PostgreSQL) is current and holds a study, a job waiting to be
    forwarded, an audit row and a commitment request."""
    document = base_document()
    document["router"]["catalog"] = catalog_url
    path = write_document(tmp_path / "router.yaml", document)
    upgrade(catalog_url)
    engine = make_engine(catalog_url)
    try:
        catalog = Catalog(session_factory(engine))
        catalog.sync_servers(load_config(path))
        catalog.record_study_seen("Test PACS 1", "1.2.3", "found")
        catalog.add_audit(
            "store", "success", calling_ae="MOD", study_uid="1.2.3", counts={"stored": 1}
        )
        with catalog.sessions.begin() as session:
            session.add(
                ForwardJob(
                    sop_instance_uid="1.2.3.4.5",
                    spool_path="x.dcm",
                    sha256="0" * 64,
                    size_bytes=1,
                    destination="Prod PACS 1",
                    header={"StudyInstanceUID": "1.2.3"},
                    study_uid="1.2.3",
                )
            )
            session.add(
                CommitmentRequest(
                    transaction_uid="2.25.7",
                    calling_ae="MOD",
                    called_ae="DICOMROUTER",
                    address="127.0.0.1",
                    instances=[["1.2", "1.2.3.4.5"]],
                    deadline_at=utcnow(),
                )
            )
    finally:
        engine.dispose()
    return path


# Each read command, and what its output must show to have read the catalog.
READ_COMMANDS = [
    (["catalog", "where", "1.2.3"], "Test PACS 1"),
    (["catalog", "where", "1.2.3", "--json"], '"learned_by": "found"'),
    (["queue", "list"], "queue: pending 1"),
    (["queue", "list", "--instances", "--json"], "1.2.3.4.5"),
    (["queue", "list", "--study", "1.2.3"], "Prod PACS 1"),
    (["commitments", "list"], "2.25.7"),
    (["audit", "--since", "1h"], "stored=1"),
    (["servers", "list"], "Test PACS 1"),
    (["servers", "show", "Test PACS 1"], "studies: 1"),
    (["db", "upgrade"], f"catalog already at {SCHEMA_REVISION}"),
]


@pytest.mark.parametrize(
    "arguments, shown",
    READ_COMMANDS,
    ids=[" ".join(arguments) for arguments, _ in READ_COMMANDS],
)
def test_read_commands_import_no_sqlalchemy(
    filled_config: Path, arguments: list[str], shown: str
) -> None:
    modules, printed = run_importing_modules("--config", str(filled_config), *arguments)
    assert shown in printed
    assert not {module.split(".")[0] for module in modules} & (DICOM_STACK | {"sqlalchemy", "alembic"})
    # Only the module of the command that runs: not those of the other commands.
    commands = {module for module in modules if module.startswith("dicomrouter.cli.")}
    assert commands == {"dicomrouter.cli.main", "dicomrouter.cli.common", COMMANDS[arguments[0]].module}


def test_db_backup_imports_no_sqlalchemy(config_path: Path) -> None:
    upgrade(f"sqlite:///{config_path.parent / 'var' / 'catalog.db'}")
    modules, printed = run_importing(
        "--config", str(config_path), "db", "backup", str(config_path.parent / "copy.db")
    )
    assert f"schema {SCHEMA_REVISION}" in printed
    assert not modules & (DICOM_STACK | {"sqlalchemy", "alembic"})


def test_schema_revision_is_the_newest_migration() -> None:
    assert SCHEMA_REVISION == head_revision()


# Commands that change the catalog, in an order in which each has something to do, and what each must
# print: they write in plain SQL too (catalog/plain.py open_writer), audit rows included.
WRITE_COMMANDS = [
    (["queue", "suspend", "Prod PACS 1"], "Prod PACS 1 suspended"),
    (["queue", "resume", "Prod PACS 1"], "Prod PACS 1 resumed"),
    (["queue", "purge", "--dead", "--yes"], "purged 1 dead letter(s), 1 spool file(s) removed"),
    (["queue", "retry", "--all-dead"], None),  # nothing dead any more: exit 1, "no such dead or waiting job"
    (["queue", "retry", "{pending_id}"], "1 job(s) queued again"),
    (["queue", "reroute", "--from", "Prod PACS 1", "--to", "Test PACS 1"], "1 job(s) rerouted from Prod PACS 1"),
    (["servers", "deactivate", "Prod PACS 1"], "server 'Prod PACS 1' is now inactive"),
    (["servers", "activate", "Prod PACS 1"], "server 'Prod PACS 1' is now active"),
    (["clients", "token", "WORKSTATION"], "token for WORKSTATION"),
]


def test_write_commands_import_no_sqlalchemy(filled_config: Path, tmp_path: Path) -> None:
    url = load_config(filled_config).router.catalog
    engine = make_engine(url)
    try:
        with session_factory(engine).begin() as session:
            session.add(
                ForwardJob(
                    sop_instance_uid="1.2.3.4.6", spool_path=str(tmp_path / "dead.dcm"), sha256="1" * 64,
                    size_bytes=1, destination="Prod PACS 1", header={}, state="dead",
                )
            )
            pending_id = session.query(ForwardJob.id).filter_by(state="pending").scalar()
    finally:
        engine.dispose()
    (tmp_path / "dead.dcm").write_bytes(b"x")
    for arguments, shown in WRITE_COMMANDS:
        arguments = [argument.format(pending_id=pending_id) for argument in arguments]
        if shown is None:
            modules, printed = run_importing("--config", str(filled_config), *arguments, returncode=1)
            assert "no such dead or waiting job" in printed
        else:
            modules, printed = run_importing("--config", str(filled_config), *arguments)
            assert shown in printed, arguments
        assert not modules & (DICOM_STACK | {"sqlalchemy", "alembic"}), arguments
    assert not (tmp_path / "dead.dcm").exists()
    engine = make_engine(url)
    try:
        audit = Catalog(session_factory(engine)).audit_events(operation="queue") + Catalog(
            session_factory(engine)
        ).audit_events(operation="config")
    finally:
        engine.dispose()
    assert sorted(row.outcome for row in audit) == ["changed"] * 3 + ["rerouted", "resumed", "suspended"]
    assert all(row.node.startswith("cli ") and row.counts is None for row in audit)
