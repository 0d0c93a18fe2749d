"""`serve`: run the router in the foreground until SIGTERM."""

from __future__ import annotations

import os
import signal
import threading

import click

from dicomrouter.cli.common import CliState, pass_state
from dicomrouter.private_files import PRIVATE_UMASK


@click.command("serve")
@click.option("--log-format", type=click.Choice(["console", "json"]), default=None,
              help="console for a terminal, json lines otherwise (default: router.log.format, else by terminal).")
@click.option("--log-level", type=click.Choice(["debug", "info", "warning", "error"]), default=None,
              help="Default: router.log.level (info).")
@click.option("--host", default=None, help="Override router.host.")
@click.option("--port", type=int, default=None, help="Override router.port.")
@pass_state
def serve_command(
    state: CliState, log_format: str | None, log_level: str | None, host: str | None, port: int | None
) -> None:
    """Run the router: DICOM SCP in front, forwarding behind. SIGHUP reloads the config."""
    import sys

    from dicomrouter.app import build_app
    from dicomrouter.catalog.schema import SchemaNeedsUpgrade
    from dicomrouter.http.server import HttpListenError
    from dicomrouter.logging import configure_logging, get_logger

    config = state.config()
    os.umask(PRIVATE_UMASK)  # the catalog, the spool and what else it writes hold patient data
    settings = config.router.log
    log_format = log_format or settings.format or ("console" if sys.stderr.isatty() else "json")
    configure_logging(log_format, log_level or settings.level)
    log = get_logger("dicomrouter.serve")
    raise_descriptor_limit(log)
    try:
        app = build_app(config, host=host, port=port)
    except SchemaNeedsUpgrade as exc:
        raise click.ClickException(f"{exc} (dicomrouter --config {config.path} db upgrade)") from None
    stop_requested = threading.Event()

    def request_stop(signum, _frame) -> None:
        log.info("stop_requested", signal=signal.Signals(signum).name)
        stop_requested.set()

    def request_reload(_signum, _frame) -> None:
        # Reload off the signal handler: it takes locks and touches the database.
        threading.Thread(target=app.reload, args=("SIGHUP",), daemon=True).start()

    signal.signal(signal.SIGTERM, request_stop)
    signal.signal(signal.SIGINT, request_stop)
    signal.signal(signal.SIGHUP, request_reload)
    try:
        app.start()
    except HttpListenError as exc:
        raise click.ClickException(str(exc)) from None
    except OSError as exc:
        raise click.ClickException(f"cannot listen on {host or config.router.host}:{port or config.router.port}: {exc}") from None
    while not stop_requested.wait(1.0):
        pass
    app.stop()


def raise_descriptor_limit(log) -> None:
    """Every association is a socket: take the hard limit on open files (Debian's soft default is 1024)."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and soft < hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        except (ValueError, OSError) as exc:
            log.warning("descriptor_limit_kept", soft=soft, hard=hard, reason=str(exc))
            return
        log.info("descriptor_limit_raised", was=soft, now=hard)
