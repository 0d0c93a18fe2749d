"""Limits on what a peer can make the DICOM front hold: connections, PDU sizes, time.

pynetdicom trusts the PDU length a peer announces and waits, per recv, as long as the network
timeout allows; a connection that never associates keeps two threads until the ACSE timeout,
even after the peer hung up. The front therefore:

- counts connections itself: at most `max_associations` associated, and as many again waiting
  for their A-ASSOCIATE-RQ; beyond that a connection is refused on the accepting thread, without
  starting pynetdicom's threads (A-ASSOCIATE-RJ "local limit exceeded");
- reads every PDU through `GuardedAssociationSocket`: a length over the cap (the router's maximum
  PDU for P-DATA-TF, a fixed bound for association PDUs) aborts the association before a byte of
  the body is read, and a PDU must arrive whole within the ACSE timeout (before association) or
  the network timeout (after);
- lets a connection that closes, aborts or breaks the protocol before associating free its slot
  at once instead of after the ACSE timeout;
- aborts the association when pynetdicom's state machine raises (a command set without a
  CommandField, an event its tables do not allow after a peer's garbage): pynetdicom would let
  the exception end its DUL thread and leave the association to the timeouts.
"""

from __future__ import annotations

import copy
import socket
import struct
import threading
import time
from collections.abc import Callable

from pynetdicom.association import Association
from pynetdicom.presentation import PresentationContext
from pynetdicom.transport import AssociationSocket

from dicomrouter.logging import get_logger

log = get_logger(__name__)

PDU_HEADER_LENGTH = 6
KNOWN_PDU_TYPES = frozenset(range(0x01, 0x08))
P_DATA_TF = 0x04
# A-ASSOCIATE-RQ with every storage class in every transfer syntax is ~100 KiB; release and
# abort PDUs are 4 bytes. Only P-DATA-TF is bounded by the negotiated maximum length.
MAX_ASSOCIATION_PDU_LENGTH = 1024 * 1024
# A peer off by a header's length is not worth an abort; a 4 GB length is.
P_DATA_SLACK = 1024

# A-ABORT source 2 (service provider), reason 6 (invalid PDU parameter value), PS3.8 9.3.8
ABORT_INVALID_PARAMETER = struct.pack(">BxIxxBB", 0x07, 4, 0x02, 0x06)
# A-ASSOCIATE-RJ rejected-transient, service provider (presentation), local limit exceeded
REJECT_LOCAL_LIMIT = (0x02, 0x03, 0x02)
REJECT_LOCAL_LIMIT_PDU = struct.pack(">BxIxBBB", 0x03, 4, *REJECT_LOCAL_LIMIT)


def max_pdu_length(pdu_type: int, max_pdu_size: int) -> int:
    """The largest PDU length field the router reads for `pdu_type`."""
    if pdu_type == P_DATA_TF:
        return max_pdu_size + P_DATA_SLACK
    return MAX_ASSOCIATION_PDU_LENGTH


P_DATA_TF_TYPE = 0x04


class Admission:
    """Counts the front's live connections under locks, so a burst cannot overshoot the limits."""

    def __init__(self, max_associations: Callable[[], int], max_dataset_size: Callable[[], int] = lambda: 2 * 1024**3):
        self._max_associations = max_associations
        self._max_dataset_size = max_dataset_size
        self._connect_lock = threading.Lock()
        self._admit_lock = threading.Lock()

    @property
    def limit(self) -> int:
        return self._max_associations()

    @property
    def max_dataset_size(self) -> int:
        return self._max_dataset_size()

    @property
    def max_connections(self) -> int:
        """Associated ones up to the limit, and as many again still negotiating."""
        return 2 * self.limit

    def connection_lock(self) -> threading.Lock:
        return self._connect_lock

    def room_for_connection(self, live: list[Association]) -> bool:
        return len(live) < self.max_connections

    def admit(self, assoc: Association, live: Callable[[], list[Association]]) -> bool:
        """Take an association slot for `assoc` (its A-ASSOCIATE-RQ passed the gate).

        `live` is read under the lock: one admitted a moment ago is counted.
        """
        with self._admit_lock:
            others = live()
            admitted = sum(1 for other in others if other is not assoc and getattr(other, "router_admitted", False))
            if admitted >= self.limit:
                return False
            assoc.router_admitted = True
            return True


class QuickCopyContexts(list):
    """The front's supported contexts, copied for each new association without `deepcopy`.

    pynetdicom deep-copies every supported context for each connection it accepts: with all
    storage classes in all transfer syntaxes that is ~90 ms of CPU per connection, which caps
    accepting at about ten a second. A context's only mutable state is its transfer syntax list
    and scalars, so a shallow copy plus a copy of that list is enough.
    """

    def __deepcopy__(self, memo: dict) -> list[PresentationContext]:
        copies = []
        for context in self:
            duplicate = copy.copy(context)
            duplicate._transfer_syntax = list(context._transfer_syntax)
            copies.append(duplicate)
        return copies


def _read_exactly(sock: socket.socket, count: int, deadline: float) -> bytes:
    data = bytearray()
    while len(data) < count:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            break
        sock.settimeout(remaining)
        chunk = sock.recv(min(65536, count - len(data)))
        if not chunk:
            break
        data += chunk
    return bytes(data)


def refuse_connection(sock: socket.socket, address: str, timeout_s: float, live: int) -> None:
    """Answer a connection over the limit with A-ASSOCIATE-RJ (local limit exceeded), then close.

    The request is read first: closing with unread data would reset the connection and the peer
    might never see the rejection. Runs on the accepting thread only, with no pynetdicom threads.
    """
    deadline = time.monotonic() + timeout_s
    try:
        header = _read_exactly(sock, PDU_HEADER_LENGTH, deadline)
        if len(header) == PDU_HEADER_LENGTH:
            pdu_type, length = struct.unpack(">BxI", header)
            if pdu_type == 0x01 and length <= MAX_ASSOCIATION_PDU_LENGTH:
                _read_exactly(sock, length, deadline)
                sock.settimeout(max(deadline - time.monotonic(), 0.1))
                sock.sendall(REJECT_LOCAL_LIMIT_PDU)
                # As after any A-ASSOCIATE-RJ (Sta13), the requestor closes first: pynetdicom
                # reports an abort instead of the rejection when the acceptor hangs up at once.
                while _read_exactly(sock, 4096, min(deadline, time.monotonic() + 2.0)):
                    pass
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass
    finally:
        sock.close()
    log.warning("association_rejected", address=address, reason=f"local limit exceeded ({live} connections)")


class GuardedAssociationSocket(AssociationSocket):
    """pynetdicom's acceptor socket, reading PDUs under a length cap and a deadline.

    Installed on an AssociationSocket pynetdicom built (`guard`), so the transport events it
    queued on creation stay as they are.
    """

    max_pdu_size: int
    max_dataset_size: int
    _expect_header: bool
    _dropped: bool
    _reading_pdata: bool
    _dataset_bytes: dict[int, int]  # presentation context -> bytes of the data set in progress
    _replay: bytearray

    @classmethod
    def guard(
        cls, sock: AssociationSocket, max_pdu_size: int, max_dataset_size: int = 2 * 1024**3, replay: bytes = b""
    ) -> GuardedAssociationSocket:
        """`replay`: bytes the front already read from this connection, served before the socket's."""
        sock.__class__ = cls
        assert isinstance(sock, GuardedAssociationSocket)
        sock.max_pdu_size = max_pdu_size
        sock.max_dataset_size = max_dataset_size
        sock._expect_header = True
        sock._dropped = False
        sock._reading_pdata = False
        sock._dataset_bytes = {}
        sock._replay = bytearray(replay)
        return sock

    @property
    def ready(self) -> bool:
        return bool(self._replay) or super().ready

    def _read_timeout(self) -> float:
        assoc = self.assoc
        timeout = assoc.network_timeout if assoc.is_established else assoc.acse_timeout
        return float(timeout) if timeout else 60.0

    def recv(self, nr_bytes: int) -> bytearray:
        """Up to `nr_bytes`; fewer when the peer closed, stalled or broke a limit (then dropped)."""
        expect_header, self._expect_header = self._expect_header, True
        sock = self.socket
        data = bytearray()
        if sock is None or self._dropped:
            return data
        previous_timeout = sock.gettimeout()
        read_timeout = self._read_timeout()
        deadline = time.monotonic() + read_timeout
        if self._replay:
            data += self._replay[:nr_bytes]
            del self._replay[:nr_bytes]
        try:
            while len(data) < nr_bytes:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    self._drop(f"no complete PDU within {read_timeout:g} s")
                    return data
                sock.settimeout(remaining)
                chunk = sock.recv(min(65536, nr_bytes - len(data)))
                if not chunk:
                    self._peer_closed()
                    return data
                data += chunk
        except TimeoutError:
            self._drop(f"no complete PDU within {read_timeout:g} s")
            return data
        except OSError:
            self._peer_closed()
            return data
        finally:
            if not self._dropped and self.socket is not None:
                sock.settimeout(previous_timeout)
        if expect_header and nr_bytes == PDU_HEADER_LENGTH:
            self._check_header(bytes(data))
        elif self._reading_pdata:
            self._reading_pdata = False
            self._count_dataset(data)
            if self._dropped:
                return bytearray()  # not even the last fragment reaches pynetdicom
        return data

    def _count_dataset(self, body: bytearray) -> None:
        """Add up each data set's fragments: pynetdicom keeps a whole data set in memory."""
        offset = 0
        while offset + 6 <= len(body):
            (length,) = struct.unpack_from(">I", body, offset)
            context_id, control = body[offset + 4], body[offset + 5]
            if not control & 0x01:  # a data set fragment, not a command
                size = self._dataset_bytes.get(context_id, 0) + max(length - 2, 0)
                if size > self.max_dataset_size:
                    self._dataset_bytes.clear()
                    self._drop(
                        f"data set over router.max_dataset_size ({self.max_dataset_size} bytes)", abort=True
                    )
                    return
                self._dataset_bytes[context_id] = 0 if control & 0x02 else size
            offset += 4 + length

    def _check_header(self, header: bytes) -> None:
        pdu_type, length = struct.unpack(">BxI", header)
        if pdu_type not in KNOWN_PDU_TYPES:
            return  # pynetdicom aborts on it without reading a body
        cap = max_pdu_length(pdu_type, self.max_pdu_size)
        if length > cap:
            self._drop(f"PDU type 0x{pdu_type:02X} announces {length} bytes, more than {cap}", abort=True)
            return
        self._expect_header = False  # pynetdicom reads the body next
        self._reading_pdata = pdu_type == P_DATA_TF_TYPE

    def _drop(self, reason: str, abort: bool = False) -> None:
        """Stop reading from this peer: optionally A-ABORT, then shut the connection down."""
        if self._dropped:
            return
        self._dropped = True
        sock = self.socket
        log.warning(
            "association_dropped",
            address=self.assoc.requestor.address,
            calling_ae=(self.assoc.requestor.ae_title or "").strip() or None,
            reason=reason,
        )
        if sock is not None:
            try:
                if abort:
                    sock.settimeout(1.0)
                    sock.sendall(ABORT_INVALID_PARAMETER)
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        self._wake_unassociated()

    def _peer_closed(self) -> None:
        self._dropped = True
        self._wake_unassociated()

    def close(self) -> None:
        super().close()
        self._wake_unassociated()

    def _wake_unassociated(self) -> None:
        """The association thread waits up to the ACSE timeout for an A-ASSOCIATE-RQ; None ends the wait."""
        assoc = self.assoc
        if not assoc.is_established and assoc.requestor.primitive is None:
            assoc.dul.to_user_queue.put(None)


def guard_state_machine(assoc: Association) -> None:
    """Turn an exception in pynetdicom's state machine into an A-ABORT of this one association."""
    machine = assoc.dul.state_machine
    do_action = machine.do_action

    def guarded_do_action(event: str) -> None:
        try:
            do_action(event)
        except Exception as exc:
            sock = assoc.dul.socket
            reason = f"protocol error in state {machine.current_state} on {event}: {exc.__class__.__name__}: {exc}"
            if isinstance(sock, GuardedAssociationSocket):
                sock._drop(reason[:300], abort=True)
            # As pynetdicom does for an exception while reading: stop both reactors.
            assoc.is_aborted = True
            assoc.is_established = False
            assoc._kill = True
            assoc.dul._kill_thread = True

    machine.do_action = guarded_do_action
