"""`queue`, `route explain` and `import`: the store-and-forward side for admins."""

from __future__ import annotations

import sys
import time
from pathlib import Path

import click

from dicomrouter.cli.common import CliState, pass_state, print_table


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
@click.option("--dead", is_flag=True, help="Dead letters instead of waiting jobs.")
@click.option("--limit", type=int, default=200, show_default=True)
@pass_state
def queue_list(state: CliState, dead: bool, limit: int) -> None:
    """Jobs waiting (or dead), with attempts and the last error."""
    app = _app(state)
    jobs = app.queue.list_jobs(dead=dead, limit=limit)
    counts = app.queue.counts()
    print_table(
        ("id", "destination", "state", "attempts", "next_attempt", "sop_instance_uid", "last_error"),
        [
            (
                j.id, j.destination, j.state, j.attempts,
                j.next_attempt_at.strftime("%Y-%m-%d %H:%M:%S") if j.next_attempt_at else None,
                j.sop_instance_uid, (j.last_error or "")[:80],
            )
            for j in jobs
        ],
    )
    summary = ", ".join(f"{state_name} {count}" for state_name, count in sorted(counts.items())) or "empty"
    click.echo(f"\nqueue: {summary}")


@queue_group.command("retry")
@click.argument("job_id", type=int, required=False)
@click.option("--all-dead", is_flag=True, help="Every dead letter.")
@pass_state
def queue_retry(state: CliState, job_id: int | None, all_dead: bool) -> None:
    """Send a dead (or waiting) job again now, attempts reset."""
    if (job_id is None) == (not all_dead):
        raise click.UsageError("give a job ID or --all-dead")
    count = _app(state).queue.retry(job_id=job_id, all_dead=all_dead)
    if count == 0:
        raise click.ClickException("no such dead or waiting job")
    click.echo(f"{count} job(s) queued again; a running router sends them within its poll interval")


@queue_group.command("purge")
@click.option("--dead", is_flag=True, required=True, help="Delete dead letters (and their spool files).")
@click.option("--yes", is_flag=True, help="Do not ask.")
@pass_state
def queue_purge(state: CliState, dead: bool, yes: bool) -> None:
    """Delete dead letters for good."""
    app = _app(state)
    count = app.queue.counts().get("dead", 0)
    if count == 0:
        click.echo("no dead letters")
        return
    if not yes:
        click.confirm(f"delete {count} dead letter(s) and their spool files?", abort=True)
    paths = app.queue.purge_dead()
    for path in paths:
        app.spool.remove(Path(path))
    click.echo(f"purged {count} dead letter(s), {len(paths)} spool file(s) removed")


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

    configure_logging("console", "warning")
    config = state.config()
    if to_server and (config.server(to_server) is None or not config.server(to_server).usable):
        raise click.ClickException(f"{to_server!r} is not an active server")
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
