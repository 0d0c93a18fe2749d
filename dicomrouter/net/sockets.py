"""Socket options: TCP_NODELAY on every router socket."""

from __future__ import annotations

import socket


def set_nodelay(sock: socket.socket | None) -> None:
    """Disable Nagle: without it every DIMSE message waits ~40 ms for a delayed ACK."""
    if sock is None:
        return
    try:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    except OSError:
        pass  # already closed, or not TCP (TLS wrappers forward the call)
