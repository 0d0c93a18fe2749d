"""Instances a PACS moves to the router, handed between worker processes.

With several workers on one port (router.workers), the PACS's callback association reaches any of
them, while the retrieval waiting for it lives in the worker that sent the C-MOVE (the HTTP one).
That worker announces each pending move with a marker file in the spool's tmp/moves/<host>/ (the
server, the move's Message ID, its process) naming a Unix socket in the abstract namespace it
listens on. A worker receiving an instance no move of its own asked for finds the marker and hands
the instance over that socket: a small JSON header, then the data set's bytes (or the path of its
spill file in tmp/, which the owner then owns), answered with the C-STORE status to give the PACS.
"""

from __future__ import annotations

import hashlib
import json
import os
import secrets
import socket
import struct
import threading
from collections.abc import Callable
from pathlib import Path

from dicomrouter.logging import get_logger
from dicomrouter.net.get_client import ReceivedInstance
from dicomrouter.net.upper_layer import FileSlice

log = get_logger(__name__)

OUT_OF_RESOURCES = 0xA700
HEADER = struct.Struct(">I")
MAX_HEADER = 64 * 1024
HANDOFF_TIMEOUT_S = 600.0  # the owner answers once its HTTP client took the instance


def _server_key(server_name: str) -> str:
    return hashlib.sha256(server_name.encode()).hexdigest()[:16]


def _read_exactly(conn: socket.socket, count: int) -> bytes:
    data = bytearray()
    while len(data) < count:
        chunk = conn.recv(min(count - len(data), 1024 * 1024))
        if not chunk:
            raise ConnectionError("the other worker closed the connection")
        data += chunk
    return bytes(data)


def _send_message(conn: socket.socket, header: dict, body: bytes = b"") -> None:
    encoded = json.dumps(header).encode()
    conn.sendall(HEADER.pack(len(encoded)) + encoded + body)


def _read_message(conn: socket.socket) -> dict:
    (length,) = HEADER.unpack(_read_exactly(conn, HEADER.size))
    if length > MAX_HEADER:
        raise ConnectionError("header too long")
    return json.loads(_read_exactly(conn, length))


def _alive(marker: Path) -> bool:
    """Whether the process that wrote `marker` still runs; a dead one's marker is removed."""
    try:
        os.kill(int(marker.name.rsplit(".", 1)[-1]), 0)
    except ProcessLookupError:
        marker.unlink(missing_ok=True)
        return False
    except (ValueError, PermissionError):
        pass
    return True


# Takes (server name, Move Originator Message ID or None, instance): (C-STORE status, comment).
Deliver = Callable[[str, "int | None", ReceivedInstance], tuple[int, str]]


class MoveExchange:
    """One process's side: announce its pending moves, take instances other workers received, and
    hand over the ones this worker received for another's move."""

    def __init__(self, folder: Path, deliver: Deliver):
        self.folder = folder
        self.deliver = deliver
        self.address = f"\0dicomrouter-moves-{os.getpid()}-{secrets.token_hex(4)}"
        self._listener: socket.socket | None = None
        self._lock = threading.Lock()

    # -- the owner's side

    def announce(self, server_name: str, message_id: int) -> Path:
        """A marker for a pending move (remove it when the move ends)."""
        self._listen()
        self.folder.mkdir(parents=True, exist_ok=True)
        marker = self.folder / f"{_server_key(server_name)}.{message_id}.{os.getpid()}"
        marker.write_text(self.address[1:])
        return marker

    def _listen(self) -> None:
        with self._lock:
            if self._listener is not None:
                return
            listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            listener.bind(self.address)
            listener.listen(16)
            self._listener = listener
        threading.Thread(target=self._accept, name="move-exchange", daemon=True).start()

    def _accept(self) -> None:
        assert self._listener is not None
        while True:
            try:
                conn, _ = self._listener.accept()
            except OSError:
                return  # closed
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        with conn:
            try:
                while True:
                    try:
                        header = _read_message(conn)
                    except ConnectionError:
                        return
                    instance = self._instance(conn, header)
                    status, comment = self.deliver(
                        header["server"], header.get("move_id"), instance
                    )
                    _send_message(conn, {"status": status, "comment": comment})
            except (OSError, ValueError, KeyError) as exc:
                log.warning("move_exchange_failed", reason=str(exc))

    @staticmethod
    def _instance(conn: socket.socket, header: dict) -> ReceivedInstance:
        if header.get("path"):
            dataset: bytes | FileSlice = FileSlice(
                Path(header["path"]), header["offset"], header["length"]
            )
        else:
            dataset = _read_exactly(conn, header["length"])
        return ReceivedInstance(header["sop_class"], header["sop_uid"], header["syntax"], dataset)

    def close(self) -> None:
        with self._lock:
            if self._listener is not None:
                self._listener.close()

    # -- the receiving worker's side

    def owner(self, server_name: str, message_id: int | None) -> str | None:
        """The address of another worker with a move pending for `server_name` (the one
        `message_id` names, when given and announced), or None."""
        try:
            markers = list(self.folder.glob(f"{_server_key(server_name)}.*"))
        except OSError:
            return None
        mine = str(os.getpid())
        others = [m for m in markers if m.name.rsplit(".", 1)[-1] != mine and _alive(m)]
        named = [m for m in others if m.name.split(".")[1] == str(message_id)]
        for marker in named or others:
            try:
                return "\0" + marker.read_text()
            except OSError:
                continue  # the move ended meanwhile
        return None

    def hand_over(
        self, address: str, server_name: str, message_id: int | None, instance: ReceivedInstance
    ) -> tuple[int, str]:
        """Give `instance` to the worker at `address`: the status it answers. The instance is the
        other worker's once it answered; if it could not, it is discarded here."""
        header: dict = {
            "server": server_name,
            "move_id": message_id,
            "sop_class": instance.sop_class_uid,
            "sop_uid": instance.sop_instance_uid,
            "syntax": instance.transfer_syntax,
        }
        data = instance.dataset
        if isinstance(data, FileSlice):
            header.update(path=str(data.path), offset=data.offset, length=data.length)
            body = b""
        else:
            header.update(length=len(data))
            body = bytes(data)
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as conn:
                conn.settimeout(HANDOFF_TIMEOUT_S)
                conn.connect(address)
                _send_message(conn, header, body)
                answer = _read_message(conn)
            return int(answer["status"]), str(answer.get("comment", ""))
        except (OSError, ValueError, KeyError, ConnectionError) as exc:
            log.warning("move_handoff_failed", server=server_name, reason=str(exc))
            instance.discard()
            return OUT_OF_RESOURCES, "the worker waiting for it could not be reached"
