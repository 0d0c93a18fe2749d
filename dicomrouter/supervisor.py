"""`serve` with several workers: one supervisor process and N full routers on the one DICOM port.

Like gunicorn's arbiter, in small. The supervisor holds no association and no database session;
it checks the config and the catalog once, then starts each worker as a fresh interpreter
(`python -m dicomrouter serve --worker-index I`, never a fork of this process) and watches them:

- the supervisor binds the DICOM port once and every worker accepts on that one socket, each
  connection taken by the worker holding the fewest (dicomrouter/dul/listener.py); each counts its
  associations in a shared table the supervisor created (dicomrouter/dul/shared_counts.py), so the
  association limits hold for the router as a whole. A connection arriving while a worker restarts
  waits in the one backlog for another;
- only worker 0 serves `router.http`: the status page and the API read one process's state; the
  counters of /metrics are every worker's (prometheus_client's multiprocess mode, in a folder the
  supervisor owns);
- forwarding is spread by the queue's claims, each worker being one node, each running its share of
  `workers_per_destination` (at least one lane), so a PACS sees about as many associations as before;
- a worker that dies is logged and replaced, at once the first time, then after a growing pause
  while it keeps dying (a crash loop does not spin); its share of the association table is cleared;
- SIGHUP (or the file changing) is checked here first: a config that fails validation changes no
  worker; a valid one is copied to a snapshot every worker reloads from, so all run the same one;
- SIGTERM or SIGINT drains: every worker stops accepting, finishes its associations and exits;
  after `DRAIN_TIMEOUT_S` and a margin what is left is killed.
"""

from __future__ import annotations

import os
import select
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

from dicomrouter.config import Config, ConfigError, parse_config, read_document
from dicomrouter.dul.shared_counts import SharedCounts
from dicomrouter.logging import get_logger

log = get_logger("dicomrouter.supervisor")

DRAIN_TIMEOUT_S = 30.0  # what each worker gives its associations to finish (RouterApp.stop)
KILL_MARGIN_S = 15.0  # then forwarding and the audit trail stop; after that, SIGKILL
RESTART_BACKOFF_S = (
    1.0,
    30.0,
)  # pause before the second restart of a worker that keeps dying, and the longest
STABLE_AFTER_S = 10.0  # a worker that ran this long and then died is restarted at once again
FILE_POLL_S = 1.0
WORKER_BOOT_FAILED = 3  # a worker's exit code when it could not start (port, schema, HTTP port)

SNAPSHOT_ENV = "DICOMROUTER_CONFIG_SNAPSHOT"
LISTEN_FD_ENV = "DICOMROUTER_LISTEN_FD"
READY_FD_ENV = "DICOMROUTER_READY_FD"
METRICS_DIR_ENV = "PROMETHEUS_MULTIPROC_DIR"
WORKERS_ENV = "DICOMROUTER_WORKERS"


@dataclass(frozen=True)
class WorkerRole:
    """What makes a router process one worker of several (app.build_app reads it)."""

    index: int
    shared_counts: SharedCounts | None
    config_snapshot: Path | None
    metrics_dir: str | None
    workers: int = 1  # how many the supervisor runs
    listen_fd: int | None = None  # the DICOM port, bound by the supervisor for every worker

    @property
    def serves_http(self) -> bool:
        return self.index == 0

    @classmethod
    def from_environment(cls, index: int) -> WorkerRole:
        snapshot = os.environ.get(SNAPSHOT_ENV)
        return cls(
            index,
            SharedCounts.inherited(index),
            Path(snapshot) if snapshot else None,
            os.environ.get(METRICS_DIR_ENV),
            int(os.environ.get(WORKERS_ENV, "1")),
            int(os.environ[LISTEN_FD_ENV]) if LISTEN_FD_ENV in os.environ else None,
        )

    def listen_socket(self) -> socket.socket | None:
        """The listening socket every worker accepts on (None: this process binds its own)."""
        return socket.socket(fileno=self.listen_fd) if self.listen_fd is not None else None

    def share(self, config: Config) -> Config:
        """This worker's part of what the router does at once: `workers_per_destination` is for the router
        as a whole (a PACS may take few associations), so each worker runs its share of the lanes, at
        least one (the jobs it receives are its own to send first)."""
        forwarding = config.router.forwarding
        lanes = max(1, -(-forwarding.workers_per_destination // self.workers))
        return replace(
            config,
            router=replace(
                config.router, forwarding=replace(forwarding, workers_per_destination=lanes)
            ),
        )

    def load_config(self, config_path: Path) -> Config:
        """The config the supervisor checked last, read as if it were the file."""
        assert self.config_snapshot is not None
        return parse_config(read_document(self.config_snapshot), config_path.absolute())

    def reload_reason(self) -> str:
        """Why the supervisor asked for the reload it signalled last (SIGHUP, file changed)."""
        try:
            return (
                self.config_snapshot.with_suffix(".reason").read_text()
                if self.config_snapshot
                else "SIGHUP"
            )
        except OSError:
            return "SIGHUP"

    def report_ready(self) -> None:
        """Tell the supervisor this worker listens (and handles SIGHUP) now."""
        fd = os.environ.get(READY_FD_ENV)
        if fd is not None:
            os.write(int(fd), b"\n")
            os.close(int(fd))


@dataclass
class Worker:
    index: int
    process: subprocess.Popen | None = None
    ready_fd: int | None = None  # the read end of this worker's ready pipe
    ready: bool = False
    started_at: float = 0.0
    failures: int = 0  # deaths in a row, each after less than STABLE_AFTER_S
    restart_at: float | None = None
    generation: int = 0  # the config snapshot it runs


@dataclass
class Supervisor:
    """Starts `count` workers for `config` and keeps them running until SIGTERM."""

    config: Config
    count: int
    worker_options: list[str]  # serve options passed on (log format and level)
    listening: socket.socket  # the DICOM port, bound for every worker
    workers: list[Worker] = field(init=False)
    _runtime: Path = field(init=False)
    _snapshot: Path = field(init=False)
    _counts: SharedCounts = field(init=False)
    _signals: list[int] = field(default_factory=list, init=False)
    _booted: bool = field(default=False, init=False)
    _generation: int = field(
        default=0, init=False
    )  # bumped by each reload that changed the snapshot

    def __post_init__(self) -> None:
        self.workers = [Worker(index) for index in range(self.count)]

    # ------------------------------------------------------------------ the loop

    def run(self) -> int:
        """Supervise until a stop signal; the exit code for `serve`."""
        self._runtime = Path(tempfile.mkdtemp(prefix="dicomrouter-supervisor-"))
        self._snapshot = self._runtime / "config.yaml"
        (self._runtime / "metrics").mkdir()
        shutil.copyfile(self.config.path, self._snapshot)
        self._counts = SharedCounts.create(self.count)
        wake_read, wake_write = os.pipe()
        os.set_blocking(wake_write, False)
        previous_wakeup = signal.set_wakeup_fd(wake_write, warn_on_full_buffer=False)
        for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGCHLD):
            signal.signal(signum, lambda signum, _frame: self._signals.append(signum))
        log.info("supervisor_started", workers=self.count, pid=os.getpid())
        try:
            return self._supervise(wake_read)
        finally:
            signal.set_wakeup_fd(previous_wakeup)
            os.close(wake_read)
            os.close(wake_write)
            shutil.rmtree(self._runtime, ignore_errors=True)

    def _supervise(self, wake_read: int) -> int:
        for worker in self.workers:
            self._spawn(worker)
        file_signature = _signature(self.config.path)
        next_poll = time.monotonic() + FILE_POLL_S
        while True:
            ready_fds = {w.ready_fd: w for w in self.workers if w.ready_fd is not None}
            timeout = max(
                0.0,
                min([next_poll, *(w.restart_at for w in self.workers if w.restart_at)])
                - time.monotonic(),
            )
            readable, _, _ = select.select([wake_read, *ready_fds], [], [], timeout)
            if wake_read in readable:
                os.read(wake_read, 512)
            for fd in readable:
                if fd in ready_fds:
                    self._worker_ready(ready_fds[fd])
            while self._signals:
                signum = self._signals.pop(0)
                if signum in (signal.SIGTERM, signal.SIGINT):
                    log.info("stop_requested", signal=signal.Signals(signum).name)
                    self._drain()
                    return 0
                if signum == signal.SIGHUP:
                    self.reload("SIGHUP")
            halted = self._reap()
            if halted is not None:
                self._drain()
                return halted
            now = time.monotonic()
            for worker in self.workers:
                if worker.restart_at is not None and worker.restart_at <= now:
                    self._spawn(worker)
            if now >= next_poll:
                next_poll = now + FILE_POLL_S
                current = _signature(self.config.path)
                if current is not None and current != file_signature:
                    file_signature = current
                    self.reload("file changed")

    # ------------------------------------------------------------------ workers

    def _spawn(self, worker: Worker) -> None:
        ready_read, ready_write = os.pipe()
        env = {
            **os.environ,
            **self._counts.environment(),
            SNAPSHOT_ENV: str(self._snapshot),
            READY_FD_ENV: str(ready_write),
            METRICS_DIR_ENV: str(self._runtime / "metrics"),
            WORKERS_ENV: str(self.count),
            LISTEN_FD_ENV: str(self.listening.fileno()),
        }
        command = [
            sys.executable,
            "-m",
            "dicomrouter",
            "--config",
            str(self.config.path),
            "serve",
            "--worker-index",
            str(worker.index),
            *self.worker_options,
        ]
        with self._counts.locked():
            self._counts.clear(worker.index)
        worker.process = subprocess.Popen(
            command, env=env, pass_fds=(self._counts.fd, ready_write, self.listening.fileno())
        )
        os.close(ready_write)
        worker.ready_fd, worker.ready, worker.restart_at = ready_read, False, None
        worker.started_at = time.monotonic()
        worker.generation = self._generation
        log.info("worker_started", index=worker.index, pid=worker.process.pid)

    def _worker_ready(self, worker: Worker) -> None:
        assert worker.ready_fd is not None
        os.read(worker.ready_fd, 16)
        os.close(worker.ready_fd)
        worker.ready_fd = None
        if worker.process is not None and worker.process.poll() is None:
            worker.ready = True
            log.info("worker_ready", index=worker.index, pid=worker.process.pid)
            if worker.generation != self._generation:  # a reload came while it was starting
                self._signal_reload(worker)
            if not self._booted and all(w.ready for w in self.workers):
                self._booted = True
                log.info("workers_ready", workers=self.count)

    def _reap(self) -> int | None:
        """Notice dead workers and schedule their replacement; an exit code when the router must stop."""
        now = time.monotonic()
        for worker in self.workers:
            if worker.process is None or worker.process.poll() is None:
                continue
            code, pid = worker.process.returncode, worker.process.pid
            worker.process = None
            if worker.ready_fd is not None:
                os.close(worker.ready_fd)
                worker.ready_fd = None
            with self._counts.locked():
                self._counts.clear(worker.index)  # what it held is gone with its sockets
            self._release_claims(pid)
            how = f"signal {signal.Signals(-code).name}" if code < 0 else f"exit code {code}"
            if code == WORKER_BOOT_FAILED and not self._booted:
                log.error(
                    "worker_boot_failed",
                    index=worker.index,
                    pid=pid,
                    reason="see its log lines above",
                )
                return 1
            if now - worker.started_at >= STABLE_AFTER_S and worker.ready:
                worker.failures = 0
            delay = (
                0.0
                if worker.failures == 0
                else min(RESTART_BACKOFF_S[0] * 2 ** (worker.failures - 1), RESTART_BACKOFF_S[1])
            )
            worker.failures += 1
            worker.ready = False
            worker.restart_at = now + delay
            log.error("worker_died", index=worker.index, pid=pid, how=how, restart_in_s=delay)
        return None

    def _release_claims(self, pid: int) -> None:
        """Give the forwarding jobs a dead worker had claimed back to the others now, not when the lease ends."""
        from sqlalchemy import update

        from dicomrouter.app import node_id_prefix
        from dicomrouter.catalog.db import make_engine
        from dicomrouter.catalog.models import ForwardJob
        from dicomrouter.store.queue import CLAIMED, PENDING, utcnow

        engine = make_engine(self.config.router.catalog)
        try:
            with engine.begin() as connection:
                released = connection.execute(
                    update(ForwardJob)
                    .where(
                        ForwardJob.state == CLAIMED,
                        ForwardJob.claimed_by.like(f"{node_id_prefix(pid)}%"),
                    )
                    .values(state=PENDING, lease_until=None, updated_at=utcnow())
                ).rowcount
        except Exception as exc:  # the catalog is down: the lease ends them as after any crash
            log.warning(
                "claims_not_released", pid=pid, reason=f"{exc.__class__.__name__}: {str(exc)[:200]}"
            )
            return
        finally:
            engine.dispose()
        if released:
            log.info("claims_released", pid=pid, jobs=released)

    def _drain(self) -> None:
        """Every worker stops accepting and finishes its associations; what is left after the timeout is killed."""
        # The port closes once the workers closed their descriptors too: new callers are refused, not queued.
        self.listening.close()
        running = [
            w.process for w in self.workers if w.process is not None and w.process.poll() is None
        ]
        for process in running:
            process.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + DRAIN_TIMEOUT_S + KILL_MARGIN_S
        for process in running:
            try:
                process.wait(timeout=max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                log.error(
                    "worker_killed", pid=process.pid, reason="still running after the drain timeout"
                )
                process.kill()
                process.wait()
        for worker in self.workers:
            if worker.ready_fd is not None:
                os.close(worker.ready_fd)
                worker.ready_fd = None
        log.info("supervisor_stopped", workers=len(running))

    # ------------------------------------------------------------------ reload

    def reload(self, reason: str) -> bool:
        """Check the file; when valid, every worker reloads the same copy of it, else none does."""
        candidate = self._runtime / "config.candidate.yaml"
        try:
            shutil.copyfile(self.config.path, candidate)
            new = parse_config(read_document(candidate), self.config.path)
        except (ConfigError, OSError) as exc:
            problems = exc.render() if isinstance(exc, ConfigError) else str(exc)
            log.error(
                "config_reload_refused",
                path=str(self.config.path),
                reason=reason,
                problems=problems,
                workers="none reloaded",
            )
            return False
        self._snapshot.with_suffix(".reason").write_text(
            reason
        )  # for the workers' config_reloaded lines
        os.replace(candidate, self._snapshot)
        if new.router.workers not in (None, self.config.router.workers):
            log.warning(
                "workers_change_needs_restart", workers=self.count, configured=new.router.workers
            )
        self.config = new
        self._generation += 1
        signalled = []
        for worker in self.workers:
            # One still starting gets it once ready: SIGHUP before its handler exists would end it.
            if worker.ready and self._signal_reload(worker):
                signalled.append(worker.index)
        log.info("config_reload_sent", reason=reason, workers=signalled)
        return True

    def _signal_reload(self, worker: Worker) -> bool:
        if worker.process is None or worker.process.poll() is not None:
            return False
        worker.process.send_signal(signal.SIGHUP)
        worker.generation = self._generation
        return True


def _signature(path: Path) -> tuple[int, int, int] | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return (st.st_mtime_ns, st.st_size, st.st_ino)


def bind_port(host: str, port: int) -> socket.socket:
    """The DICOM port, bound once for every worker (OSError when it is taken)."""
    from dicomrouter.dul.listener import LISTEN_BACKLOG

    listening = socket.create_server((host, port), backlog=LISTEN_BACKLOG)
    listening.set_inheritable(True)
    return listening
