"""`dicomrouter move` and `dicomrouter routes show`: move studies between PACS, see the move-AE grid."""

from __future__ import annotations

import sys
from typing import TYPE_CHECKING

import click

from dicomrouter.cli.common import (
    CliState,
    cli_identity,
    open_catalog,
    pass_state,
    print_table,
    server_argument,
)
from dicomrouter.config import suggest
from dicomrouter.routing.move_routes import destination_refusal, resolve_destination, route_table

# pydicom, pynetdicom and the retrieve machinery load when `move` runs, not with every command.
if TYPE_CHECKING:
    from dicomrouter.retrieve.mover import MoveTotals
    from dicomrouter.retrieve.plan import RetrievePlan

EXIT_FAILED = 1
EXIT_PARTIAL = 3


@click.group("routes")
def routes_group() -> None:
    """The C-MOVE routing table (which AE title each server uses for each destination)."""


@routes_group.command("show")
@pass_state
def routes_show(state: CliState) -> None:
    """Sources down, destinations across: the AE title the source sends to, or relay."""
    destinations, rows = route_table(state.config())
    print_table(
        ("source \\ destination", *destinations), [(source, *cells) for source, cells in rows]
    )


def _bar(done: int, total: int, width: int = 30) -> str:
    filled = width * done // total if total else width
    return f"[{'#' * filled}{'.' * (width - filled)}] {done}/{total}"


def _describe(plan: RetrievePlan) -> str:
    """Which server gives what, e.g. "2 series (40 instances) from Test PACS 1"."""
    parts = []
    for source in plan.sources:
        series = sum(len(uids) for uids in source.series.values())
        what = f"{series} series" if series else "the study"
        if source.instances is not None:
            what += f" ({source.instances} instances)"
        parts.append(f"{what} from {source.name}")
    text = ", ".join(parts)
    if plan.copies_differ:
        text += f"; copies differ for {len(plan.copies_differ)} series, the most complete is taken"
    return text


@click.command("move")
@click.argument("study_uid")
@click.option(
    "--to", "move_destination", required=True, help="Server name or AE title, or a client AE title."
)
@click.option(
    "--from", "source_name", help="Move only from this server (default: every server holding it)."
)
@pass_state
def move_command(
    state: CliState, study_uid: str, move_destination: str, source_name: str | None
) -> None:
    """Move a study to another PACS or a workstation; the catalog learns the new location."""
    from pydicom import Dataset

    from dicomrouter.net.move_client import STUDY_ROOT_MOVE
    from dicomrouter.retrieve.mover import SUCCESS, WARNING, MoveRun, MoveTotals
    from dicomrouter.retrieve.plan import plan_retrieve
    from dicomrouter.routing.access import Caller

    config = state.config()
    destination = resolve_destination(config, move_destination)
    if destination is None:
        known = {s.name for s in config.live_servers()} | {s.ae_title for s in config.live_servers()}
        known |= {c.ae_title for c in config.clients if c.host and c.port}
        raise click.ClickException(
            f"unknown destination {move_destination!r}: not a server, nor a client with host and port; "
            + suggest(move_destination, known)
        )
    refusal = destination_refusal(destination)
    if refusal:
        raise click.ClickException(f"refused: {refusal}; it takes no stores or moves")
    catalog = open_catalog(config)
    if catalog is not None:
        catalog.sync_servers(config)  # so it can learn where the study went
    only = None
    if source_name:
        source = server_argument(config, source_name)
        if source.deleted:
            raise click.ClickException(f"server {source.name!r} is deleted")
        only = [source.name]
    identifier = Dataset()
    identifier.QueryRetrieveLevel = "STUDY"
    identifier.StudyInstanceUID = study_uid
    admin = Caller(config.router.ae_title, "cli", "client", frozenset({"admin"}))
    # A destination server is not its own source: the move is to make it hold the study.
    exclude = [destination.server.name] if destination.server is not None else []
    plan = plan_retrieve(
        config, catalog, admin, identifier, STUDY_ROOT_MOVE, only=only, exclude=exclude
    )
    for name, reason in plan.unreachable.items():
        click.echo(f"warning: could not ask {name}: {reason}", err=True)
    sources = plan.sources
    if plan.inactive_only:
        click.echo(
            f"warning: only inactive servers hold it: {', '.join(s.name for s in sources)}",
            err=True,
        )
    if not sources:
        raise click.ClickException(f"no server holds study {study_uid}")
    click.echo(f"moving {study_uid} to {destination.name}: {_describe(plan)}")
    run = MoveRun(config, catalog, sources, destination, study_uid)
    final = MoveTotals()
    show_bar = sys.stderr.isatty()
    try:
        for totals in run.progress():
            if totals.final:
                final = totals
            elif show_bar:
                done = totals.completed + totals.failed + totals.warning
                click.echo("\r" + _bar(done, done + totals.remaining), nl=False, err=True)
    except KeyboardInterrupt:
        run.cancel()
        raise
    if show_bar:
        click.echo("", err=True)
    if catalog is not None:
        _audit_move(catalog, final, study_uid, sources, destination.name)
    status = final.status if final.status is not None else -1
    click.echo(
        f"status 0x{status:04X}: {final.completed} completed, {final.failed} failed, {final.warning} warning"
    )
    if final.comment:
        click.echo(f"  {final.comment}")
    for sop_uid in final.failed_sop_uids:
        click.echo(f"  failed: {sop_uid}")
    if status == WARNING:
        sys.exit(EXIT_PARTIAL)
    if status != SUCCESS:
        sys.exit(EXIT_FAILED)


def _audit_move(catalog, final: MoveTotals, study_uid: str, sources, destination_name: str) -> None:
    from dicomrouter.retrieve.mover import move_outcome

    try:
        catalog.add_audit(
            "move",
            move_outcome(final.status),
            node=cli_identity(),
            study_uid=study_uid,
            servers=[s.name for s in sources],
            detail=f"STUDY to {destination_name} (dicomrouter move)",
            counts={"completed": final.completed, "failed": final.failed, "warning": final.warning},
        )
    except Exception as exc:
        click.echo(f"note: audit row not written ({exc.__class__.__name__})", err=True)
