"""What every worker of one router holds, so the association limits hold for the router, not per worker.

The supervisor creates one small shared-memory file (memfd) with a slot per worker and hands its
descriptor to each worker it starts. A worker publishes in its slot its associations, the
connections it is refusing, and one entry per connection still waiting for its A-ASSOCIATE-RQ
(source address, when it was accepted, whether its peer has been silent so far); it reads the other
slots before it decides about room. A worker out of room with no silent connection of its own to
drop may *claim* another worker's silent one: it marks the entry and waits (without the locks) until
the owner closed it, at its next look at the table (at most `CLAIM_POLL_S` later), or found it no
longer silent and turned the claim down; then it decides again. So idle sockets on one worker
cannot lock a modality out of another, and a connection that spoke is never dropped for one.

Every decision and publication happens under one flock() on the file, taken after the worker's own
thread lock: the kernel drops it when its holder dies, so a worker killed mid-decision never blocks
the others. The supervisor clears the slot of a worker that died.

The workers share one listening socket, too: each slot's *turn* says which worker takes the next
connection (`next_to_accept`): the one holding the fewest, then the one that took one least recently.
`accepted_at` is `time.monotonic()`: one clock for every process of the machine (CLOCK_MONOTONIC).

Bounded by construction: `MAX_WORKERS` slots of `ENTRIES_PER_SLOT` waiting connections each; a
worker with that many waiting refuses the next one (see `ConnectionTable.admit`).
"""

from __future__ import annotations

import fcntl
import mmap
import os
import struct
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

ENTRIES_PER_SLOT = 512
ADDRESS_BYTES = 48  # an address as text (IPv6 with a zone fits)
CLAIM_POLL_S = 0.05  # how soon a worker closes the connections others claimed from it
CLAIM_WAIT_S = 0.5  # how long a worker waits for that before it gives up on the claim
# What a waiting connection's peer has done so far, as published (`WaitingEntry.peer`).
PEER_SPOKE = 0  # sent bytes (read or not): never dropped to make room
PEER_SILENT = 1  # not a byte: dropped to make room once older than the silent age
PEER_CLOSED = 2  # closed without a byte (a port probe): dropped to make room at once
_HEADER = struct.Struct("<4I")  # associated, refusing, entries used, turn (0: no worker runs in the slot)
_ENTRY = struct.Struct(f"<I{ADDRESS_BYTES}sdBB2x")  # id, address, accepted_at, peer, claimed
SLOT_BYTES = _HEADER.size + ENTRIES_PER_SLOT * _ENTRY.size
FD_ENV = "DICOMROUTER_SHARED_COUNTS_FD"  # the inherited descriptor, as a worker finds it
SLOTS_ENV = "DICOMROUTER_SHARED_COUNTS_SLOTS"


@dataclass(frozen=True)
class OtherCounts:
    """What the other workers hold now."""

    pending: int = 0
    associated: int = 0
    refusing: int = 0
    pending_from_address: int = 0


@dataclass(frozen=True)
class WaitingEntry:
    """One connection waiting for its A-ASSOCIATE-RQ, as its worker publishes it."""

    id: int
    address: str
    accepted_at: float
    peer: int  # PEER_SPOKE, PEER_SILENT or PEER_CLOSED


def _encoded(address: str) -> bytes:
    return address.encode("utf-8", "replace")[:ADDRESS_BYTES].ljust(ADDRESS_BYTES, b"\0")


class SharedCounts:
    """One worker's view of the shared table: its own slot to write, the others to read and claim from."""

    def __init__(self, fd: int, slots: int, own_slot: int | None):
        self.fd = fd
        self.slots = slots
        self.own_slot = own_slot
        self._map = mmap.mmap(fd, slots * SLOT_BYTES)
        # A description of the file of our own: flock() excludes other descriptions (the inherited one is
        # shared by every worker). Not fcntl() record locks: the kernel takes a thread of a process
        # waiting on one while another thread holds another lock for a deadlock (EDEADLK).
        self._lock_fd = os.open(f"/proc/self/fd/{fd}", os.O_RDWR | os.O_CLOEXEC)

    @classmethod
    def create(cls, slots: int) -> SharedCounts:
        """The supervisor's table: all zero, its descriptor inheritable by the workers it starts."""
        fd = os.memfd_create("dicomrouter-associations", 0)
        os.ftruncate(fd, slots * SLOT_BYTES)
        return cls(fd, slots, own_slot=None)

    @classmethod
    def inherited(cls, own_slot: int) -> SharedCounts | None:
        """A worker's table, from the descriptor its supervisor passed (None: a single-process router)."""
        fd, slots = os.environ.get(FD_ENV), os.environ.get(SLOTS_ENV)
        if fd is None or slots is None:
            return None
        table = cls(int(fd), int(slots), own_slot)
        table.start_serving()
        return table

    def start_serving(self) -> None:
        """This worker's slot, fresh (a predecessor may have died mid-publication), and marked as served:
        it takes connections from now on, after those that already did."""
        assert self.own_slot is not None
        with self.locked():
            self.clear(self.own_slot)
            self.took_connection()

    def environment(self) -> dict[str, str]:
        """What a worker started with `pass_fds=(self.fd,)` needs in its environment."""
        return {FD_ENV: str(self.fd), SLOTS_ENV: str(self.slots)}

    @contextmanager
    def locked(self) -> Iterator[None]:
        """The table to this process alone (threads of one process serialise on their own lock)."""
        fcntl.flock(self._lock_fd, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(self._lock_fd, fcntl.LOCK_UN)

    # -- under `locked`

    def _entries(self, slot: int) -> Iterator[tuple[int, tuple]]:
        offset = slot * SLOT_BYTES
        used = min(_HEADER.unpack_from(self._map, offset)[2], ENTRIES_PER_SLOT)
        for index in range(used):
            position = offset + _HEADER.size + index * _ENTRY.size
            yield position, _ENTRY.unpack_from(self._map, position)

    def _other_slots(self) -> Iterable[int]:
        return (slot for slot in range(self.slots) if slot != self.own_slot)

    def others(self, address: str) -> OtherCounts:
        """The other workers' counts."""
        wanted = _encoded(address)
        pending = associated = refusing = from_address = 0
        for slot in self._other_slots():
            slot_associated, slot_refusing, _, _ = _HEADER.unpack_from(self._map, slot * SLOT_BYTES)
            associated += slot_associated
            refusing += slot_refusing
            for _, (_, entry_address, _, _, _) in self._entries(slot):
                pending += (
                    1  # claimed ones too: they hold their place until their worker closed them
                )
                from_address += entry_address == wanted
        return OtherCounts(pending, associated, refusing, from_address)

    def claim_silent(
        self,
        older_than: float,
        address: str | None,
        accept: Callable[[str], bool] = lambda _a: True,
    ) -> tuple[int, int] | None:
        """Mark another worker's oldest connection silent since before `older_than` (from `address` if
        given, from one `accept` takes) for its owner to close: (slot, id) to wait for, or None."""
        wanted = _encoded(address) if address is not None else None
        best: tuple[float, int, int, int] | None = None  # (accepted_at, position, slot, id)
        for slot in self._other_slots():
            for position, entry in self._entries(slot):
                entry_id, entry_address, accepted_at, peer, claimed = entry
                old_enough = peer == PEER_CLOSED or (
                    peer == PEER_SILENT and accepted_at <= older_than
                )
                if claimed or not old_enough:
                    continue
                if wanted is not None and entry_address != wanted:
                    continue
                if not accept(entry_address.rstrip(b"\0").decode("utf-8", "replace")):
                    continue
                if best is None or accepted_at < best[0]:
                    best = (accepted_at, position, slot, entry_id)
        if best is None:
            return None
        _, position, slot, entry_id = best
        entry = _ENTRY.unpack_from(self._map, position)
        _ENTRY.pack_into(self._map, position, *entry[:4], 1)
        return slot, entry_id

    def claim_pending(self, claim: tuple[int, int]) -> bool:
        """The claimed connection's worker has neither closed it nor turned the claim down yet."""
        slot, wanted = claim
        return any(entry[0] == wanted and entry[4] for _, entry in self._entries(slot))

    def take_claims(self) -> set[int]:
        """Ids of this worker's connections others claimed (they are for this worker to close)."""
        assert self.own_slot is not None
        return {entry[0] for _, entry in self._entries(self.own_slot) if entry[4]}

    def publish(self, waiting: list[WaitingEntry], associated: int, refusing: int) -> None:
        """This worker's counts; at most ENTRIES_PER_SLOT waiting connections (claims are cleared)."""
        assert self.own_slot is not None
        offset = self.own_slot * SLOT_BYTES
        waiting = waiting[:ENTRIES_PER_SLOT]
        for index, entry in enumerate(waiting):
            _ENTRY.pack_into(
                self._map,
                offset + _HEADER.size + index * _ENTRY.size,
                entry.id,
                _encoded(entry.address),
                entry.accepted_at,
                entry.peer,
                0,
            )
        turn = _HEADER.unpack_from(self._map, offset)[3]
        _HEADER.pack_into(self._map, offset, associated, refusing, len(waiting), turn)

    def next_to_accept(self) -> bool:
        """Whether this worker should take the connection waiting on the shared port: the one holding
        the fewest connections (associated and waiting) takes it, the one that took one least recently
        among equals. Slots no worker runs in are skipped."""
        assert self.own_slot is not None
        ranks = []
        for slot in range(self.slots):
            associated, _, used, turn = _HEADER.unpack_from(self._map, slot * SLOT_BYTES)
            if turn or slot == self.own_slot:
                ranks.append((associated + used, turn, slot))
        return min(ranks)[2] == self.own_slot

    def took_connection(self) -> None:
        """This worker took a connection: its turn goes after everyone else's."""
        assert self.own_slot is not None
        offset = self.own_slot * SLOT_BYTES
        latest = max(_HEADER.unpack_from(self._map, slot * SLOT_BYTES)[3] for slot in range(self.slots))
        associated, refusing, used, _ = _HEADER.unpack_from(self._map, offset)
        _HEADER.pack_into(self._map, offset, associated, refusing, used, latest % 0xFFFFFFFE + 1)

    def clear(self, slot: int) -> None:
        """Forget what the worker in `slot` held (it died)."""
        _HEADER.pack_into(self._map, slot * SLOT_BYTES, 0, 0, 0, 0)

    def totals(self) -> OtherCounts:
        """Every worker's counts together, but this one's."""
        with self.locked():
            return self.others("")
