"""Small misbehaving C-FIND peers for tests and the benchmark: slow, silent, or absent."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

from pydicom import Dataset
from pynetdicom import AE, evt
from pynetdicom.sop_class import (
    ModalityWorklistInformationFind,
    PatientRootQueryRetrieveInformationModelFind,
    StudyRootQueryRetrieveInformationModelFind,
    Verification,
)

from dicomrouter.net.sockets import set_nodelay
from dicomrouter.pacsfarm import free_ports


@dataclass
class SlowFindPeer:
    """A pynetdicom C-FIND SCP that waits `delay_s`, then yields `answers` `interval_s` apart.

    It answers every query with all its answers (no matching): tests choose what it holds.
    """

    ae_title: str
    answers: Sequence[Dataset] = ()
    delay_s: float = 0.0
    interval_s: float = 0.0
    port: int = 0
    cancelled: int = 0
    queries: int = 0
    released: int = 0
    associations: int = 0
    _server: object = field(default=None, repr=False)

    def _handle_find(self, event):
        self.queries += 1
        set_nodelay(event.assoc.dul.socket.socket)
        deadline = time.monotonic() + self.delay_s
        while time.monotonic() < deadline:
            if event.is_cancelled:
                self.cancelled += 1
                yield 0xFE00, None
                return
            time.sleep(0.005)
        for index, answer in enumerate(self.answers):
            if index and self.interval_s:
                time.sleep(self.interval_s)
            if event.is_cancelled:
                self.cancelled += 1
                yield 0xFE00, None
                return
            yield 0xFF00, answer

    def _on_released(self, event) -> None:
        self.released += 1

    def _on_accepted(self, event) -> None:
        self.associations += 1

    def start(self) -> SlowFindPeer:
        self.port = self.port or free_ports(1)[0]
        ae = AE(ae_title=self.ae_title)
        for model in (
            Verification,
            PatientRootQueryRetrieveInformationModelFind,
            StudyRootQueryRetrieveInformationModelFind,
            ModalityWorklistInformationFind,
        ):
            ae.add_supported_context(model)
        handlers = [
            (evt.EVT_C_FIND, self._handle_find),
            (evt.EVT_RELEASED, self._on_released),
            (evt.EVT_ACCEPTED, self._on_accepted),
        ]
        self._server = ae.start_server(("127.0.0.1", self.port), block=False, evt_handlers=handlers)
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server = None

    def abort_associations(self) -> int:
        """A-ABORT every association open now (a PACS dropping idle ones); how many there were."""
        associations = list(self._server.active_associations) if self._server is not None else []
        for association in associations:
            association.abort()
        return len(associations)


class SilentPeer:
    """Accepts TCP connections and never says a word: a hung PACS."""

    def __init__(self) -> None:
        self._sock = socket.socket()
        self._sock.bind(("127.0.0.1", 0))
        self._sock.listen(16)
        self.port = self._sock.getsockname()[1]
        self._held: list[socket.socket] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._accept, daemon=True)

    def _accept(self) -> None:
        self._sock.settimeout(0.1)
        while not self._stop.is_set():
            try:
                conn, _ = self._sock.accept()
            except OSError:
                continue
            self._held.append(conn)

    def start(self) -> SilentPeer:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=2)
        for conn in self._held:
            conn.close()
        self._sock.close()


def dead_port() -> int:
    """A port nothing listens on: connecting is refused at once, like a stopped PACS."""
    return free_ports(1)[0]


def server_entry(name: str, ae_title: str, port: int, environment: str = "test", **extra) -> dict:
    """A `servers:` item for a YAML config document."""
    return {
        "name": name,
        "ae_title": ae_title,
        "host": "127.0.0.1",
        "port": port,
        "environment": environment,
        "active": True,
        "primary": False,
        "deleted": False,
        **extra,
    }
