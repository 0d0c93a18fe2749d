"""C-STORE SCU to one PACS over a reused association, sending data sets as the encoded bytes.

`EncodedStoreClient` speaks the lean upper layer (net/upper_layer.py): the forwarder sends spool
files with it, the relay data sets it holds in memory; neither is ever decoded on the way.
"""

from __future__ import annotations

import os
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from dicomrouter.config import RouterSettings, ServerConfig, calling_ae_for
from dicomrouter.dicom_file import META_HEAD_BYTES, dataset_offset
from dicomrouter.dul.dimse import us
from dicomrouter.dul.pdata import GROUP_BYTES, FileSlice
from dicomrouter.net.peer import PeerUnavailable, associate_with
from dicomrouter.net.upper_layer import Link, UpperLayerError, command_set

MAX_CONTEXTS = 128  # presentation contexts one association may propose (PS3.8)


class ContextRejected(Exception):
    """The peer does not accept this SOP class in this transfer syntax: a permanent refusal."""


class SpoolFileMissing(Exception):
    """The spool file to send is gone: nothing will ever send it (a permanent failure of the job)."""


class StoreFailed(Exception):
    """No C-STORE response (timeout, abort): worth retrying."""


@dataclass(frozen=True)
class StoreOutcome:
    status: int
    comment: str = ""

    @property
    def success(self) -> bool:
        return self.status in (0x0000, 0xB000, 0xB007, 0xB006)

    @property
    def permanent_failure(self) -> bool:
        """Refusals that will not change by retrying (PS3.4 B.2.3; 0xA7xx is transient)."""
        return not self.success and (self.status >> 8) in (0xA9, 0xC0, 0xC1, 0xC2, 0xC3, 0x01)


class EncodedStoreClient:
    """One reusable lean association to `peer` for encoded data sets; renegotiates like StoreClient."""

    def __init__(
        self,
        peer: ServerConfig,
        router: RouterSettings,
        on_negotiated: Callable[[ServerConfig, Link], None] | None = None,
    ):
        """`on_negotiated(peer, link)` hears of every association opened: what it accepted and refused."""
        self.peer = peer
        self.router = router
        self.on_negotiated = on_negotiated
        self.calling_ae = calling_ae_for(peer, "store", router)
        self._wanted: OrderedDict[tuple[str, str], None] = OrderedDict()
        self._link: Link | None = None
        self._message_id = 0

    def _context(self, sop_class: str, transfer_syntax: str) -> int:
        """The accepted context for the pair, associating anew when it is new; ContextRejected."""
        link = self._link
        if link is not None and not link.closed:
            context_id = link.context_for(sop_class, transfer_syntax)
            if context_id is not None:
                return context_id
        pair = (sop_class, transfer_syntax)
        newly_wanted = pair not in self._wanted
        self._wanted[pair] = None
        self._wanted.move_to_end(pair)
        while len(self._wanted) > MAX_CONTEXTS:
            self._wanted.popitem(last=False)
        rejected = ContextRejected(
            f"{self.peer.name} does not accept SOP class {sop_class} in {transfer_syntax}"
        )
        if link is not None and not link.closed and not newly_wanted:
            raise rejected
        self.close()
        # PeerUnavailable when it cannot be reached or refuses the association
        self._link = associate_with(
            self.peer,
            self.router,
            self.calling_ae,
            [(sop, [syntax]) for sop, syntax in self._wanted],
        )
        if self.on_negotiated is not None:
            self.on_negotiated(self.peer, self._link)
        context_id = self._link.context_for(sop_class, transfer_syntax)
        if context_id is None:
            raise rejected
        return context_id

    def send_encoded(
        self,
        sop_class: str,
        sop_instance: str,
        transfer_syntax: str,
        dataset: bytes | memoryview | FileSlice,
        move_originator: tuple[str, int] | None = None,
    ) -> StoreOutcome:
        """C-STORE one encoded data set; raise PeerUnavailable, ContextRejected or StoreFailed.

        `move_originator` (AE title, Message ID) marks a C-MOVE sub-operation (PS3.7 9.1.1.1).
        """
        context_id = self._context(sop_class, transfer_syntax)
        link = self._link
        assert link is not None
        self._message_id = self._message_id % 65535 + 1
        command = command_set(
            [
                (0x0002, sop_class.encode("ascii")),
                (0x0100, us(0x0001)),
                (0x0110, us(self._message_id)),
                (0x0700, us(0x0000)),  # medium priority
                (0x0800, us(0x0000)),  # a data set follows
                (0x1000, sop_instance.encode("ascii")),
                *_originator_elements(move_originator),
            ]
        )
        try:
            link.send_message(context_id, command, dataset)
            while True:
                for message in link.receive_messages(self.router.dimse_timeout_s):
                    if message.command_field == 0x8001 and message.us(0x0120) == self._message_id:
                        return StoreOutcome(message.status, message.text(0x0902))
        except (OSError, UpperLayerError) as exc:
            self.close(abort=True)
            raise StoreFailed(f"no C-STORE response from {self.peer.name} ({exc})") from exc

    def send_file(
        self, path: Path | str, sop_class: str, sop_instance: str, transfer_syntax: str
    ) -> StoreOutcome:
        """C-STORE a spool file (a DICOM file as received): its data set, after the file meta.

        A file up to one send group is read whole, at once; a larger one piece by piece as it goes
        out (a 2 GB instance costs one group of memory, not 2 GB)."""
        try:
            # os.open, not open(): the file object's own fstat and checks cost system calls per instance.
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError as exc:
            raise SpoolFileMissing(f"spool file {path} is missing") from exc
        except OSError as exc:
            raise StoreFailed(f"cannot read spool file {path}: {exc}") from exc
        try:
            try:
                size = os.fstat(fd).st_size
                head = os.read(fd, size if size <= GROUP_BYTES else META_HEAD_BYTES)
            finally:
                os.close(fd)
            start = dataset_offset(head)  # the group length says where the meta ends
            if start > size:
                raise ValueError(f"the file meta claims {start} bytes, the file has {size}")
        except OSError as exc:
            raise StoreFailed(f"cannot read spool file {path}: {exc}") from exc
        except ValueError as exc:
            # Never sent: a spool file that is not a whole DICOM file will not become one.
            raise ContextRejected(f"spool file {path} is unusable: {exc}") from exc
        if len(head) == size:
            return self.send_encoded(sop_class, sop_instance, transfer_syntax, memoryview(head)[start:])
        return self.send_encoded(sop_class, sop_instance, transfer_syntax, FileSlice(Path(path), start, size - start))

    def close(self, abort: bool = False) -> None:
        link, self._link = self._link, None
        if link is None:
            return
        if abort:
            link.abort()
        else:
            link.release()


def _originator_elements(move_originator: tuple[str, int] | None) -> list[tuple[int, bytes]]:
    if move_originator is None:
        return []
    ae_title, message_id = move_originator
    ae = ae_title.encode("ascii")
    if len(ae) % 2:
        ae += b" "  # AE values pad with a space
    return [(0x1030, ae), (0x1031, us(message_id))]


__all__ = [
    "EncodedStoreClient",
    "StoreOutcome",
    "ContextRejected",
    "StoreFailed",
    "SpoolFileMissing",
    "PeerUnavailable",
]
