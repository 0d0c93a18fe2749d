"""Retrievals waiting for a PACS to call the router back: the C-MOVEs the router sent with itself
as Move Destination (retrieve/move_to_self.py), and which of them an arriving instance belongs to.

One registry per app (app.py), shared by the retrieval that sends the C-MOVE and the C-STORE
service that receives its sub-operations (scp/move_delivery.py); with several worker processes,
an instance another worker received is handed over to this one (retrieve/handoff.py). An instance is taken only from
the server the move went to, while the move is pending, and only if it is what the move asked
for (its study, series, instance); anything else is refused, never stored.
"""

from __future__ import annotations

import threading
import zlib
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from io import BytesIO
from pathlib import Path

from pydicom import Dataset
from pydicom.filereader import read_dataset

from dicomrouter.net.get_client import ReceivedInstance
from dicomrouter.net.upper_layer import FileSlice
from dicomrouter.retrieve.handoff import MoveExchange

SUCCESS = 0x0000
NOT_WANTED = 0x0124  # Refused: not authorized
IMPLICIT_VR_LE, EXPLICIT_VR_BE = "1.2.840.10008.1.2", "1.2.840.10008.1.2.2"
DEFLATED = "1.2.840.10008.1.2.1.99"
SERIES_INSTANCE_UID_TAG = 0x0020000E
PREFIX_BYTES = 64 * 1024  # the study and series UIDs come long before any bulk data
MAX_MESSAGE_ID = 0xFFFF


def _values(identifier: Dataset, keyword: str) -> frozenset[str]:
    value = identifier.get(keyword)
    if value is None:
        return frozenset()
    values = [value] if isinstance(value, str) else list(value)
    return frozenset(str(v) for v in values if str(v))


@dataclass(frozen=True)
class Wanted:
    """What a C-MOVE identifier asks for; an empty set asks for any value."""

    study_uids: frozenset[str]
    series_uids: frozenset[str]
    sop_uids: frozenset[str]

    @classmethod
    def of(cls, identifier: Dataset) -> Wanted:
        return cls(
            _values(identifier, "StudyInstanceUID"),
            _values(identifier, "SeriesInstanceUID"),
            _values(identifier, "SOPInstanceUID"),
        )

    def wants(self, study_uid: str, series_uid: str, sop_uid: str) -> bool:
        return all(
            not wanted or value in wanted
            for wanted, value in (
                (self.study_uids, study_uid),
                (self.series_uids, series_uid),
                (self.sop_uids, sop_uid),
            )
        )


@dataclass(eq=False)
class PendingMove:
    """One C-MOVE to the router, waiting for its sub-operations."""

    server_name: str
    originator_ae: str  # the calling AE of the C-MOVE: the sub-operations' Move Originator AE
    message_id: int  # the C-MOVE's Message ID: their Move Originator Message ID
    wanted: Wanted
    hand_on: Callable[[ReceivedInstance], int]  # takes the instance; the C-STORE status
    received: int = 0  # instances handed on with Success


def instance_keys(instance: ReceivedInstance) -> tuple[str, str]:
    """(Study, Series Instance UID) from the first bytes of a received data set ('' if absent)."""
    data = instance.dataset
    if isinstance(data, FileSlice):
        with open(data.path, "rb") as handle:
            handle.seek(data.offset)
            prefix = handle.read(min(PREFIX_BYTES, data.length))
    else:
        prefix = bytes(data[:PREFIX_BYTES])
    syntax = instance.transfer_syntax
    if syntax == DEFLATED:
        prefix = zlib.decompressobj(-zlib.MAX_WBITS).decompress(prefix, PREFIX_BYTES)
    try:
        dataset = read_dataset(
            BytesIO(prefix),
            syntax == IMPLICIT_VR_LE,
            syntax != EXPLICIT_VR_BE,
            stop_when=lambda tag, _vr, _length: tag > SERIES_INSTANCE_UID_TAG,
        )
        return str(dataset.get("StudyInstanceUID", "")), str(dataset.get("SeriesInstanceUID", ""))
    except Exception:  # malformed or cut short in its first bytes: it matches nothing
        return "", ""


class PendingRetrievals:
    """The C-MOVEs to the router now pending, by Message ID (unique among them). Thread-safe."""

    def __init__(self, exchange_folder: Path | None = None) -> None:
        self._lock = threading.Lock()
        self._moves: dict[int, PendingMove] = {}
        self._last_id = 0
        # With several workers: where they announce pending moves to each other.
        self.exchange = (
            MoveExchange(exchange_folder, self._deliver_handed) if exchange_folder else None
        )

    def _free_message_id(self) -> int:
        for _ in range(MAX_MESSAGE_ID):
            self._last_id = self._last_id % MAX_MESSAGE_ID + 1
            if self._last_id not in self._moves:
                return self._last_id
        raise RuntimeError("65535 retrievals pending")

    @contextmanager
    def expect(
        self,
        server_name: str,
        originator_ae: str,
        identifier: Dataset,
        hand_on: Callable[[ReceivedInstance], int],
    ) -> Iterator[PendingMove]:
        """Register a C-MOVE about to be sent (its Message ID is the registration's) until it ends."""
        with self._lock:
            move = PendingMove(
                server_name, originator_ae, self._free_message_id(), Wanted.of(identifier), hand_on
            )
            self._moves[move.message_id] = move
        marker = self.exchange.announce(server_name, move.message_id) if self.exchange else None
        try:
            yield move
        finally:
            if marker is not None:
                marker.unlink(missing_ok=True)
            with self._lock:
                self._moves.pop(move.message_id, None)

    def candidates(
        self, server_name: str, originator_ae: str, originator_id: int | None
    ) -> list[PendingMove]:
        """The pending moves a sub-operation from `server_name` may belong to: the one its Move
        Originator names, else (a PACS that leaves them out) every move to that server."""
        with self._lock:
            moves = [m for m in self._moves.values() if m.server_name == server_name]
        named = [
            m
            for m in moves
            if m.message_id == originator_id and originator_ae in ("", m.originator_ae)
        ]
        return named or moves

    def other_worker(self, server_name: str, originator_id: int | None) -> str | None:
        """The address of another worker waiting for a move from `server_name`, or None."""
        return self.exchange.owner(server_name, originator_id) if self.exchange else None

    def hand_over(
        self, address: str, server_name: str, originator_id: int | None, instance: ReceivedInstance
    ) -> tuple[int, str]:
        """Give `instance` to the worker at `address` (other_worker): the status it answers."""
        assert self.exchange is not None
        return self.exchange.hand_over(address, server_name, originator_id, instance)

    def _deliver_handed(
        self, server_name: str, originator_id: int | None, instance: ReceivedInstance
    ) -> tuple[int, str]:
        return self.deliver(instance, self.candidates(server_name, "", originator_id))

    def deliver(self, instance: ReceivedInstance, candidates: list[PendingMove]) -> tuple[int, str]:
        """Hand `instance` to the first candidate that asked for it: (C-STORE status, why not).
        The instance is discarded unless a retrieval took it."""
        study_uid, series_uid = instance_keys(instance)
        for move in candidates:
            if move.wanted.wants(study_uid, series_uid, instance.sop_instance_uid):
                status = move.hand_on(instance)
                if status == SUCCESS:
                    move.received += 1
                return status, "" if status == SUCCESS else "the retrieval waiting for it ended"
        instance.discard()
        return NOT_WANTED, "no pending retrieval asked this server for this instance"
