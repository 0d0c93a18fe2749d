"""Socket options pynetdicom does not set: TCP_NODELAY on every router socket."""

from __future__ import annotations

import socket

from pynetdicom import evt
from pynetdicom.events import Event


def set_nodelay(sock: socket.socket | None) -> None:
    """Disable Nagle: without it every DIMSE message waits ~40 ms for a delayed ACK."""
    if sock is None:
        return
    try:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    except OSError:
        pass  # already closed, or not TCP (TLS wrappers forward the call)


def _nodelay_on_connect(event: Event) -> None:
    transport = event.assoc.dul.socket
    set_nodelay(getattr(transport, "socket", None))


# Pass as `evt_handlers` to every outgoing `ae.associate(...)`.
OUTGOING_SOCKET_HANDLERS = [(evt.EVT_CONN_OPEN, _nodelay_on_connect)]
