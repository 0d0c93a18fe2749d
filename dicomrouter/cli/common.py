"""What every command shares: loading the config, opening the catalog, printing tables."""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager, ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, TypeVar

import click

from dicomrouter.config import ConfigError, load_config
from dicomrouter.printable import printable

# Commands import what they need when they run: `--help` and the commands that only read
# the config or the catalog must not pay for SQLAlchemy, pydicom, pynetdicom or aiohttp.
if TYPE_CHECKING:
    from dicomrouter.catalog.plain import Reader, Transactions
    from dicomrouter.catalog.queries import Catalog
    from dicomrouter.config import Config, ServerConfig

T = TypeVar("T")
EXIT_CONFIG = 2
AUDIT_ATTEMPTS = 5  # as the router's Catalog: a deadlock or lock timeout runs the insert again


class ConfigProblem(click.ClickException):
    """A configuration error: printed without a traceback, exit code 2."""

    exit_code = EXIT_CONFIG

    def show(self, file=None) -> None:
        click.echo(f"dicomrouter: {self.message}", err=True)


@dataclass
class CliState:
    config_path: Path
    _config: Config | None = None

    def config(self) -> Config:
        if self._config is None:
            try:
                self._config = load_config(self.config_path)
            except ConfigError as exc:
                raise ConfigProblem(exc.render()) from None
        return self._config

    def forget_config(self) -> None:
        self._config = None


pass_state = click.make_pass_decorator(CliState)


def open_catalog(
    config: Config, must_exist: bool = False, consequence: str = "study counts unknown"
) -> Catalog | None:
    """The catalog service for `config`, or None (with a note) when its schema is not ready.

    For commands that talk DICOM too; the others take `catalog_reader` or `catalog_writer`, which spare
    them SQLAlchemy.
    """
    from dicomrouter.catalog.db import make_engine, session_factory
    from dicomrouter.catalog.queries import Catalog
    from dicomrouter.catalog.schema import require_current_schema

    engine = make_engine(config.router.catalog)
    try:
        require_current_schema(engine)
    except Exception as exc:
        engine.dispose()
        _catalog_unusable(config, exc, must_exist, consequence)
        return None
    return Catalog(session_factory(engine))


@contextmanager
def catalog_reader(config: Config) -> Iterator[Reader]:
    """Plain-SQL reads of the catalog in one transaction, without SQLAlchemy (quick read commands);
    a ClickException when its schema is not ready or it cannot be opened."""
    from dicomrouter.catalog.plain import open_reader

    with _catalog_connection(config, open_reader, must_exist=True, consequence="") as reader:
        assert reader is not None
        yield reader


@contextmanager
def optional_catalog_reader(config: Config, consequence: str = "study counts unknown") -> Iterator[Reader | None]:
    """`catalog_reader` for a command that does without the catalog: None (with a note) when it cannot read it."""
    from dicomrouter.catalog.plain import open_reader

    with _catalog_connection(config, open_reader, must_exist=False, consequence=consequence) as reader:
        yield reader


@contextmanager
def catalog_writer(config: Config) -> Iterator[Transactions]:
    """Plain-SQL write transactions on the catalog, without SQLAlchemy (quick commands that change it);
    a ClickException when its schema is not ready or it cannot be opened."""
    from dicomrouter.catalog.plain import open_writer

    with _catalog_connection(config, open_writer, must_exist=True, consequence="") as transactions:
        assert transactions is not None
        yield transactions


@contextmanager
def _catalog_connection(
    config: Config, open_connection: Callable[[str], AbstractContextManager[T]], must_exist: bool, consequence: str
) -> Iterator[T | None]:
    """`open_connection(catalog URL)`, or None (or a ClickException: `must_exist`) when it cannot be opened."""
    with ExitStack() as stack:
        try:
            connection = stack.enter_context(open_connection(config.router.catalog))
        except Exception as exc:
            _catalog_unusable(config, exc, must_exist, consequence)
            connection = None
        yield connection


def _catalog_unusable(config: Config, exc: Exception, must_exist: bool, consequence: str) -> None:
    """Why the catalog cannot be used: an error for a command that needs it, else a note (and go on)."""
    from dicomrouter.catalog.revision import SchemaNeedsUpgrade
    from dicomrouter.catalog.urls import shown_url

    if isinstance(exc, SchemaNeedsUpgrade):
        if must_exist:
            raise click.ClickException(f"{exc} (config: {config.path})") from None
        click.echo(f"note: catalog not ready ({exc}); {consequence}", err=True)
    elif must_exist:
        raise click.ClickException(f"cannot open the catalog {shown_url(config.router.catalog)}: {exc}") from None
    else:  # database unreachable: counts are a nicety, not a must
        click.echo(f"note: catalog unavailable ({exc.__class__.__name__}); {consequence}", err=True)


def server_argument(config: Config, text: str) -> ServerConfig:
    """The server a command line names by its name or its AE title; a did-you-mean otherwise."""
    server = config.server_by_name_or_ae(text)
    if server is None:
        raise click.ClickException(config.unknown_server(text))
    return server


def cli_identity() -> str:
    """Who made a change from the command line, for the audit trail."""
    import getpass  # here: only commands that change something need it (and socket)
    import socket

    try:
        user = getpass.getuser()
    except Exception:  # no user name in this environment
        user = f"uid {os.getuid()}"
    return f"cli {user}@{socket.gethostname()}"


def audit_config_change(config: Config, message: str, servers: Sequence[str] = ()) -> None:
    """One audit row for an edit the CLI made; the edit stands even when the row cannot be written."""
    from dicomrouter.catalog.plain import open_writer

    consequence = "the change is not in the audit trail"
    with _catalog_connection(config, open_writer, must_exist=False, consequence=consequence) as catalog:
        if catalog is None:
            return
        try:
            write_audit(
                catalog, "config", "changed", servers=list(servers) or None, detail=f"{message} ({config.path})"
            )
        except Exception as exc:
            click.echo(f"note: audit row not written ({exc.__class__.__name__}); the change was made", err=True)


def write_audit(catalog: Transactions, operation: str, outcome: str, **fields) -> None:
    """One audit row for what the CLI did (node: who ran it), retried like the router's audit writes."""
    from dicomrouter.catalog import writes

    values = writes.audit_values(operation, outcome, node=cli_identity(), **fields)
    catalog.write(lambda writer: writes.add_audit(writer, values), attempts=AUDIT_ATTEMPTS)


def apply_edit(state: CliState, change, servers: Sequence[str] = ()) -> None:
    """Apply a registry edit to the file, print what changed, add it to the audit trail.

    A file that cannot be read or parsed, and an edit whose result would be invalid, exit 2
    with the file, the key paths and the fixes, like `config check`.
    """
    from dicomrouter import registry

    try:
        result = registry.edit(state.config_path, change)
    except ConfigError as exc:
        raise ConfigProblem(exc.render()) from None
    except registry.InvalidResult as exc:
        raise ConfigProblem(str(exc)) from None
    except registry.RegistryError as exc:
        raise click.ClickException(str(exc)) from None
    state.forget_config()
    click.echo(result.message)
    audit_config_change(result.config, result.message, result.servers or servers)


def print_table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> None:
    """A plain aligned table; None shows as '-', control characters escaped (values may come from the network)."""
    cells = [[("-" if v is None else printable(str(v))) for v in row] for row in rows]
    widths = [len(h) for h in headers]
    for row in cells:
        for i, value in enumerate(row):
            widths[i] = max(widths[i], len(value))
    line = "  ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True))
    click.echo(line.rstrip())
    click.echo("  ".join("-" * w for w in widths))
    for row in cells:
        click.echo("  ".join(v.ljust(w) for v, w in zip(row, widths, strict=True)).rstrip())


def yes_no(flag: bool) -> str:
    return "yes" if flag else "no"


def fail(message: str, code: int = 1) -> None:
    click.echo(f"dicomrouter: {message}", err=True)
    sys.exit(code)
