"""`queue`, `route explain` and `import`: the store-and-forward side for admins."""

from __future__ import annotations

import json
import sys
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING

import click

from dicomrouter.catalog.states import DONE
from dicomrouter.cli.common import (
    CliState,
    catalog_reader,
    catalog_writer,
    cli_identity,
    pass_state,
    print_table,
    server_argument,
    write_audit,
)
from dicomrouter.status import age

if TYPE_CHECKING:
    from dicomrouter.catalog.plain import Reader
    from dicomrouter.store.queue_report import JobRow


# `queue list` counts finished jobs up to this many ("done 10000+"): the catalog keeps them for days,
# and counting a million of them cost ~0.1 s on SQLite, ~0.3 s on PostgreSQL.
DONE_SHOWN_UP_TO = 10_000


def utcnow() -> datetime:
    return datetime.now(UTC)


def _app(state: CliState):
    from dicomrouter.app import build_app
    from dicomrouter.catalog.schema import SchemaNeedsUpgrade

    config = state.config()
    try:
        return build_app(config, watch_file=False)
    except SchemaNeedsUpgrade as exc:
        raise click.ClickException(str(exc)) from None


@click.group("queue")
def queue_group() -> None:
    """The forwarding queue and its dead letters."""


@queue_group.command("list")
@click.option("--instances", is_flag=True, help="One row per instance and destination instead of the summaries.")
@click.option("--dead", is_flag=True, help="The dead letters, one row per instance (implies --instances).")
@click.option("--study", "study_uid", help="Only this study (every state, per destination).")
@click.option("--limit", type=click.IntRange(1), default=200, show_default=True, help="At most N study or instance rows.")
@click.option("--json", "as_json", is_flag=True)
@pass_state
def queue_list(state: CliState, instances: bool, dead: bool, study_uid: str | None, limit: int, as_json: bool) -> None:
    """What waits to be forwarded: per destination and per study (per instance with --instances)."""
    with catalog_reader(state.config()) as reader:
        _print_queue(reader, instances, dead, study_uid, limit, as_json)


def _print_queue(
    reader: Reader, instances: bool, dead: bool, study_uid: str | None, limit: int, as_json: bool
) -> None:
    from dicomrouter.store import queue_report

    counts = queue_report.job_counts(reader, done_cap=DONE_SHOWN_UP_TO)
    done_capped = counts.get(DONE, 0) > DONE_SHOWN_UP_TO
    if done_capped:
        counts[DONE] = DONE_SHOWN_UP_TO
    now = utcnow()
    if instances or dead:
        jobs = queue_report.instance_jobs(reader, dead=dead, study_uid=study_uid, limit=limit)
        if as_json:
            click.echo(json.dumps(
                {"instances": [_job_dict(j) for j in jobs], "counts": counts, **_capped(done_capped)}, indent=2
            ))
            return
        print_table(
            ("id", "destination", "state", "attempts", "queued", "next_attempt", "study_uid", "sop_instance_uid", "last_error"),
            [
                (
                    j.id, j.destination, j.state, j.attempts, f"{age(j.created_at, now)} ago",
                    _next_attempt(j.next_attempt_at, now) if j.state == "pending" else j.state,
                    j.header.get("StudyInstanceUID"), j.sop_instance_uid, (j.last_error or "")[:80] or None,
                )
                for j in jobs
            ],
        )
    else:
        destinations = [] if study_uid else queue_report.destination_backlogs(reader)
        studies = queue_report.study_backlogs(reader, study_uid=study_uid, limit=limit)
        if as_json:
            click.echo(json.dumps({
                "destinations": [d.as_dict() for d in destinations],
                "studies": [s.as_dict() for s in studies],
                "counts": counts,
                **_capped(done_capped),
            }, indent=2))
            return
        if destinations:
            print_table(
                ("destination", "pending", "sending", "dead", "oldest", "unreachable_since", "failed_connects",
                 "next_attempt", "suspended", "last_error"),
                [
                    (
                        d.destination, d.pending, d.sending, d.dead, age(d.oldest, now),
                        _moment(d.unreachable_since, now), d.failed_connects if d.unreachable_since else None,
                        _next_attempt(d.next_attempt, now) if d.pending else None,
                        _moment(d.suspended_at, now), (d.last_error or "")[:80] or None,
                    )
                    for d in destinations
                ],
            )
            click.echo("")
        if studies:
            print_table(
                ("destination", "study_uid", "pending", "sending", "dead", *(("done",) if study_uid else ()), "oldest",
                 "last_error"),
                [
                    (
                        s.destination, s.study_uid, s.pending, s.sending, s.dead, *((s.done,) if study_uid else ()),
                        age(s.oldest, now), (s.last_error or "")[:80] or None,
                    )
                    for s in studies
                ],
            )
        elif study_uid:
            click.echo(f"no forwarding jobs for study {study_uid}")
        elif not destinations:
            click.echo("nothing waits to be forwarded")
    summary = ", ".join(
        f"{state_name} {count}{'+' if done_capped and state_name == DONE else ''}"
        for state_name, count in sorted(counts.items())
    )
    click.echo(f"\nqueue: {summary or 'empty'}")


def _capped(done_capped: bool) -> dict[str, int]:
    """In --json: the count of finished jobs stopped at this many (there are more)."""
    return {"done_counted_up_to": DONE_SHOWN_UP_TO} if done_capped else {}


def _job_dict(job: JobRow) -> dict:
    return {
        "id": job.id, "destination": job.destination, "state": job.state, "attempts": job.attempts,
        "queued_at": job.created_at.isoformat(), "next_attempt_at": job.next_attempt_at.isoformat(),
        "study_uid": job.header.get("StudyInstanceUID"), "sop_instance_uid": job.sop_instance_uid,
        "last_error": job.last_error, "claimed_by": job.claimed_by,
    }


def _moment(moment: datetime | None, now: datetime) -> str | None:
    """A past time as local time and how long ago."""
    if moment is None:
        return None
    return f"{moment.astimezone().strftime('%Y-%m-%d %H:%M:%S')} ({age(moment, now)} ago)"


def _next_attempt(moment: datetime | None, now: datetime) -> str | None:
    if moment is None:
        return None
    return "due" if moment <= now else f"in {age(now, moment)}"


@queue_group.command("retry")
@click.argument("job_id", type=int, required=False)
@click.option("--all-dead", is_flag=True, help="Every dead letter.")
@pass_state
def queue_retry(state: CliState, job_id: int | None, all_dead: bool) -> None:
    """Send a dead (or waiting) job again now, attempts reset."""
    from dicomrouter.store import queue_actions

    if (job_id is None) == (not all_dead):
        raise click.UsageError("give a job ID or --all-dead")
    with catalog_writer(state.config()) as catalog:
        count = catalog.write(lambda writer: queue_actions.retry(writer, job_id=job_id, all_dead=all_dead))
    if count == 0:
        raise click.ClickException("no such dead or waiting job")
    click.echo(f"{count} job(s) queued again; a running router sends them within its poll interval")


@queue_group.command("purge")
@click.option("--dead", is_flag=True, required=True, help="Delete dead letters (and their spool files).")
@click.option("--yes", is_flag=True, help="Do not ask.")
@pass_state
def queue_purge(state: CliState, dead: bool, yes: bool) -> None:
    """Delete dead letters for good."""
    from dicomrouter.store import queue_actions
    from dicomrouter.store.spool import Spool

    config = state.config()
    with catalog_writer(config) as catalog:
        spool = Spool(config.router.spool)
        count = catalog.read(queue_actions.dead_count)
        if count == 0:
            click.echo("no dead letters")
            return
        if not yes:
            click.confirm(f"delete {count} dead letter(s) and their spool files?", abort=True)
        paths = catalog.write(queue_actions.purge_dead)
    for path in paths:
        spool.remove(Path(path))
    click.echo(f"purged {count} dead letter(s), {len(paths)} spool file(s) removed")


def _known_destination(config, name: str, usable: bool = False) -> str:
    """The name of the server `name` names (its name or AE title); `usable`: it must be active."""
    server = server_argument(config, name)
    if usable and not server.usable:
        active = ", ".join(s.name for s in config.usable_servers())
        raise click.ClickException(f"{server.name!r} is not an active server (active: {active})")
    return server.name


def _queue_action(state: CliState, outcome: str, servers: list[str], detail: str, act) -> None:
    """Run `act(writer)` (-> a message, or None for nothing done) in one transaction, then audit it as operation
    `queue` in another."""
    with catalog_writer(state.config()) as catalog:
        message = catalog.write(act)
        if message is None:
            return
        write_audit(catalog, "queue", outcome, servers=servers, detail=f"{detail}: {message}")
        click.echo(message)


@queue_group.command("suspend")
@click.argument("destination")
@pass_state
def queue_suspend(state: CliState, destination: str) -> None:
    """Put a destination in maintenance: its jobs wait, no retries are spent, until `queue resume`."""
    from dicomrouter.store import queue_actions

    name = _known_destination(state.config(), destination)

    def act(writer):
        if not queue_actions.suspend(writer, name, cli_identity()):
            click.echo(f"{name} was already suspended")
            return None
        return f"{name} suspended: jobs for it wait until `dicomrouter queue resume {name!r}`"

    _queue_action(state, "suspended", [name], f"suspend {name}", act)


@queue_group.command("resume")
@click.argument("destination")
@pass_state
def queue_resume(state: CliState, destination: str) -> None:
    """End a destination's maintenance: a running router sends its jobs again within its poll interval."""
    from dicomrouter.store import queue_actions

    name = _known_destination(state.config(), destination)

    def act(writer):
        if not queue_actions.resume(writer, name):
            click.echo(f"{name} was not suspended")
            return None
        return f"{name} resumed"

    _queue_action(state, "resumed", [name], f"resume {name}", act)


@queue_group.command("reroute")
@click.option("--from", "source", required=True, help="The destination whose waiting jobs move.")
@click.option("--to", "target", required=True, help="The active server that gets them.")
@click.option("--dead", is_flag=True, help="Its dead letters too (sent again, attempts reset).")
@pass_state
def queue_reroute(state: CliState, source: str, target: str, dead: bool) -> None:
    """Send what is stuck for one destination to another (jobs being sent right now stay)."""
    from dicomrouter.store import queue_actions

    config = state.config()
    source = _known_destination(config, source)
    target = _known_destination(config, target, usable=True)
    if source == target:
        raise click.UsageError("--from and --to name the same server")

    def act(writer):
        count = queue_actions.reroute(writer, source, target, dead)
        return f"{count} job(s) rerouted from {source} to {target}" + (" (dead letters included)" if dead else "")

    _queue_action(state, "rerouted", [source, target], f"reroute {source} -> {target}", act)


@click.group("route")
def route_group() -> None:
    """Store routing rules."""


@route_group.command("explain")
@click.argument("file", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--calling-ae", default="MODALITY", show_default=True)
@click.option("--called-ae", default=None, help="Default: the router's AE title.")
@pass_state
def route_explain(state: CliState, file: Path, calling_ae: str, called_ae: str | None) -> None:
    """Which rule a file matches, and why the earlier ones did not."""
    from dicomrouter.routing.store_rules import choose_destinations, rule_keywords
    from dicomrouter.store.receive import read_header

    config = state.config()
    called_ae = called_ae or config.router.ae_title
    try:
        header = read_header(file.read_bytes(), rule_keywords(config))
    except Exception as exc:
        raise click.ClickException(f"{file} is not a readable DICOM file: {exc}") from None
    decision = choose_destinations(config, calling_ae, called_ae, header)
    click.echo(f"file: {file}  calling AE: {calling_ae}  called AE: {called_ae}")
    for verdict in decision.verdicts:
        mark = "MATCH" if verdict.matched else "no"
        click.echo(f"  [{mark:5}] {verdict.rule}: {verdict.why}")
    if decision.refused:
        click.echo(f"refused: {decision.refused}")
        sys.exit(1)
    names = ", ".join(s.name for s in decision.destinations)
    click.echo(f"-> {names} ({decision.reason})")


@click.command("import")
@click.argument("paths", nargs=-1, required=True, type=click.Path(exists=True, path_type=Path))
@click.option("--to", "to_server", help="Send to this server, whatever the rules say.")
@click.option("--recursive", "-r", is_flag=True, help="Descend into subfolders.")
@click.option("--wait", "wait_s", type=float, default=600, show_default=True,
              help="Seconds to wait for deliveries before reporting what is still queued.")
@pass_state
def import_command(state: CliState, paths: tuple[Path, ...], to_server: str | None, recursive: bool, wait_s: float) -> None:
    """Send DICOM files through the router's routing and forwarding."""
    from dicomrouter.logging import configure_logging
    from dicomrouter.store.importer import iter_files, run_import

    config = state.config()
    if to_server:
        to_server = _known_destination(config, to_server, usable=True)
    configure_logging("console", "warning")
    files = list(iter_files(list(paths), recursive))
    total_bytes = sum(f.stat().st_size for f in files if f.exists())
    app = _app(state)
    app.start_forwarding()
    started = time.monotonic()
    done = {"files": 0, "bytes": 0}

    def describe(_item) -> str:
        elapsed = max(time.monotonic() - started, 1e-6)
        return f"{done['files']}/{len(files)} files, {done['bytes'] / 1e6:.1f} MB, {done['bytes'] / 1e6 / elapsed:.1f} MB/s"

    try:
        with click.progressbar(length=max(total_bytes, 1), label="importing", show_eta=True,
                               item_show_func=describe, file=sys.stderr) as bar:
            def progress(_path: Path, size: int) -> None:
                done["files"] += 1
                done["bytes"] += size
                bar.update(size, _path)

            report = run_import(app, files, to_server, progress, wait_timeout_s=wait_s)
    finally:
        app.stop()
    click.echo(f"sent {len(report.sent)}, skipped {len(report.duplicates)} duplicates, "
               f"skipped {len(report.not_dicom)} non-DICOM, failed {len(report.failed)} "
               f"({report.bytes_read / 1e6:.1f} MB in {report.seconds:.1f} s)")
    for path in report.not_dicom:
        click.echo(f"  not DICOM, skipped: {path}")
    for path, reason in report.failed:
        click.echo(f"  FAILED {path}: {reason}")
    sys.exit(1 if report.failed else 0)
