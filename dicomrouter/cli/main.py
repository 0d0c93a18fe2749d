"""Top-level command group: each command's module is imported only when that command runs."""

from __future__ import annotations

from pathlib import Path
from typing import NamedTuple

import click

from dicomrouter import __version__
from dicomrouter.config_location import CONFIG_ENV_VAR, DEFAULT_CONFIG_NAME


class LazyCommand(NamedTuple):
    """Where a command is defined, and its summary for `dicomrouter --help`: the first paragraph of
    its docstring (tests/unit/test_cli_imports.py checks that they agree)."""

    module: str
    attribute: str
    summary: str

    def load(self) -> click.Command:
        # __import__, not importlib.import_module: only the former shows in `python -X importtime`,
        # which is how tests/unit/test_cli_imports.py sees what a command imports.
        return getattr(__import__(self.module, fromlist=[self.attribute]), self.attribute)


# Importing every command's module would cost each command, and --help, the imports of all the others.
COMMANDS = {
    "access": LazyCommand(
        "dicomrouter.cli.access",
        "access_group",
        "Who may do what: roles, environments, move destinations.",
    ),
    "audit": LazyCommand(
        "dicomrouter.cli.audit",
        "audit_command",
        "The audit trail: associations, DICOM operations, CLI config changes, dead letters.",
    ),
    "catalog": LazyCommand(
        "dicomrouter.cli.catalog", "catalog_group", "What the catalog knows about studies."
    ),
    "clients": LazyCommand(
        "dicomrouter.cli.clients",
        "clients_group",
        "List and edit the AEs allowed to call the router, and their roles.",
    ),
    "commitments": LazyCommand(
        "dicomrouter.cli.commitments",
        "commitments_group",
        "Storage commitment requests (N-ACTION) and their reports (N-EVENT-REPORT).",
    ),
    "config": LazyCommand(
        "dicomrouter.cli.config_check", "config_group", "Check the configuration file."
    ),
    "db": LazyCommand("dicomrouter.cli.catalog", "db_group", "The catalog database schema."),
    "echo": LazyCommand(
        "dicomrouter.cli.health",
        "echo_command",
        "C-ECHO a server (or --all) with its echo calling AE.",
    ),
    "find": LazyCommand(
        "dicomrouter.cli.find",
        "find_command",
        "Query every server you may read at once; one row per study (or patient, series, image).",
    ),
    "health": LazyCommand(
        "dicomrouter.cli.health",
        "health_command",
        "Every server's state; exit 1 when the primary is not healthy.",
    ),
    "import": LazyCommand(
        "dicomrouter.cli.store",
        "import_command",
        "Send DICOM files through the router's routing and forwarding.",
    ),
    "move": LazyCommand(
        "dicomrouter.cli.move",
        "move_command",
        "Move a study to another PACS or a workstation; the catalog learns the new location.",
    ),
    "queue": LazyCommand(
        "dicomrouter.cli.store", "queue_group", "The forwarding queue and its dead letters."
    ),
    "route": LazyCommand("dicomrouter.cli.store", "route_group", "Store routing rules."),
    "routes": LazyCommand(
        "dicomrouter.cli.move",
        "routes_group",
        "The C-MOVE routing table (which AE title each server uses for each destination).",
    ),
    "serve": LazyCommand(
        "dicomrouter.cli.serve",
        "serve_command",
        "Run the router: DICOM SCP in front, forwarding behind. SIGHUP reloads the config.",
    ),
    "servers": LazyCommand(
        "dicomrouter.cli.servers",
        "servers_group",
        "List and edit the PACS servers behind the router.",
    ),
}


class LazyGroup(click.Group):
    """A group whose commands are imported when asked for by name; listed in its help by their summaries."""

    def __init__(self, *args, lazy_commands: dict[str, LazyCommand], **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.lazy_commands = lazy_commands

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted({*self.commands, *self.lazy_commands})

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        if cmd_name in self.commands or cmd_name not in self.lazy_commands:
            return self.commands.get(cmd_name)
        return self.lazy_commands[cmd_name].load()

    def format_commands(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        """The Commands section as click writes it, but from the summaries: no command imported."""
        listed = [
            (
                name,
                self.commands.get(name)
                or click.Command(name, help=self.lazy_commands[name].summary),
            )
            for name in self.list_commands(ctx)
        ]
        listed = [(name, command) for name, command in listed if not command.hidden]
        if not listed:
            return
        limit = formatter.width - 6 - max(len(name) for name, _ in listed)
        with formatter.section("Commands"):
            formatter.write_dl(
                [(name, command.get_short_help_str(limit)) for name, command in listed]
            )


@click.group(
    cls=LazyGroup,
    lazy_commands=COMMANDS,
    context_settings={"help_option_names": ["-h", "--help"]},
)
@click.option(
    "--config",
    "config_path",
    type=click.Path(dir_okay=False, path_type=Path),
    envvar=CONFIG_ENV_VAR,
    default=DEFAULT_CONFIG_NAME,
    show_default=True,
    help=f"The router's YAML file (or set {CONFIG_ENV_VAR}).",
)
@click.version_option(__version__, prog_name="dicomrouter")
@click.pass_context
def cli(ctx: click.Context, config_path: Path) -> None:
    """dicomrouter: one DICOM node in front of several PACS."""
    from dicomrouter.cli.common import CliState

    ctx.obj = CliState(config_path)


def main() -> None:
    cli(prog_name="dicomrouter")
