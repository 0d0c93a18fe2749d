"""`serve`: run the router in the foreground until SIGTERM, as one process or a supervisor of workers."""

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
@click.option("--workers", type=int, default=None,
              help="Worker processes on the one port (default: router.workers, else one per CPU; 1: a single process).")
@click.option("--worker-index", type=int, default=None, hidden=True)  # set by the supervisor for its workers
@pass_state
def serve_command(
    state: CliState, log_format: str | None, log_level: str | None, host: str | None, port: int | None,
    workers: int | None, worker_index: int | None,
) -> None:
    """Run the router: DICOM SCP in front, forwarding behind. SIGHUP reloads the config."""
    import sys

    from dicomrouter.config import MAX_WORKERS
    from dicomrouter.logging import configure_logging, get_logger
    from dicomrouter.supervisor import WorkerRole

    if workers is not None and not 1 <= workers <= MAX_WORKERS:
        raise click.BadParameter(f"{workers} is not from 1 to {MAX_WORKERS}", param_hint="--workers")

    role = WorkerRole.from_environment(worker_index) if worker_index is not None else None
    config = role.load_config(state.config_path) if role is not None and role.config_snapshot else state.config()
    os.umask(PRIVATE_UMASK)  # the catalog, the spool and what else it writes hold patient data
    settings = config.router.log
    log_format = log_format or settings.format or ("console" if sys.stderr.isatty() else "json")
    log_level = log_level or settings.level
    count = workers or config.router.workers or os.cpu_count() or 1
    worker_id: int | str | None = role.index if role is not None else ("supervisor" if count > 1 else None)
    configure_logging(log_format, log_level, worker=worker_id)
    log = get_logger("dicomrouter.serve")
    raise_descriptor_limit(log)
    if role is None and count > 1:  # the supervisor holds no instance: its allocator stays as it is
        options = ["--log-format", log_format, "--log-level", log_level]
        raise SystemExit(supervise(config, count, options, host, port))
    from dicomrouter.allocator import keep_large_buffers

    log.debug("allocator_tuned", keeps_large_buffers=keep_large_buffers())
    run_router(config, host, port, role, log)


def supervise(config, count: int, options: list[str], host: str | None, port: int | None) -> int:
    """Check what every worker would refuse to start on, once, then supervise them."""
    from dicomrouter.catalog.db import make_engine
    from dicomrouter.catalog.schema import SchemaNeedsUpgrade, require_current_schema
    from dicomrouter.supervisor import Supervisor, bind_port

    engine = make_engine(config.router.catalog)
    try:
        require_current_schema(engine)
    except SchemaNeedsUpgrade as exc:
        raise click.ClickException(f"{exc} (dicomrouter --config {config.path} db upgrade)") from None
    finally:
        engine.dispose()
    listen_host, listen_port = host or config.router.host, port or config.router.port
    try:
        listening = bind_port(listen_host, listen_port)
    except OSError as exc:
        raise click.ClickException(f"cannot listen on {listen_host}:{listen_port}: {exc}") from None
    return Supervisor(config, count, options, listening).run()


def run_router(config, host: str | None, port: int | None, role, log) -> None:
    """One router process (alone, or worker `role.index` of several) until SIGTERM."""
    from dicomrouter.app import build_app
    from dicomrouter.catalog.schema import SchemaNeedsUpgrade
    from dicomrouter.http.server import HttpListenError
    from dicomrouter.supervisor import WORKER_BOOT_FAILED

    def boot_failed(message: str) -> None:
        if role is None:
            raise click.ClickException(message)
        log.error("worker_boot_failed", reason=message)
        raise SystemExit(WORKER_BOOT_FAILED)

    try:
        app = build_app(config, host=host, port=port, worker=role)
    except SchemaNeedsUpgrade as exc:
        boot_failed(f"{exc} (dicomrouter --config {config.path} db upgrade)")
    stop_requested = threading.Event()

    def request_stop(signum, _frame) -> None:
        log.info("stop_requested", signal=signal.Signals(signum).name)
        stop_requested.set()

    def request_reload(_signum, _frame) -> None:
        # Reload off the signal handler: it takes locks and touches the database. A worker reloads
        # the copy its supervisor checked, so every worker runs the same config.
        source = role.config_snapshot if role is not None else None
        reason = role.reload_reason() if role is not None else "SIGHUP"
        threading.Thread(target=app.reload, args=(reason, source), daemon=True).start()

    signal.signal(signal.SIGTERM, request_stop)
    signal.signal(signal.SIGINT, request_stop)
    signal.signal(signal.SIGHUP, request_reload)
    try:
        app.start()
    except HttpListenError as exc:
        boot_failed(str(exc))
    except OSError as exc:
        boot_failed(f"cannot listen on {host or config.router.host}:{port or config.router.port}: {exc}")
    supervisor_pid = os.getppid()
    if role is not None:
        role.report_ready()
    while not stop_requested.wait(1.0):
        if role is not None and os.getppid() != supervisor_pid:
            log.error("supervisor_gone", reason="the supervisor died; this worker stops")
            break
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
