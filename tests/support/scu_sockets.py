"""pynetdicom as an independent peer in tests: TCP_NODELAY on the sockets of its associations."""

from __future__ import annotations

from pynetdicom import evt
from pynetdicom.events import Event

from dicomrouter.net.sockets import set_nodelay


def _nodelay_on_connect(event: Event) -> None:
    transport = event.assoc.dul.socket
    set_nodelay(getattr(transport, "socket", None))


# Pass as `evt_handlers` to every `ae.associate(...)` a test makes.
OUTGOING_SOCKET_HANDLERS = [(evt.EVT_CONN_OPEN, _nodelay_on_connect)]
