"""DIMSE messages as P-DATA-TF PDUs (PS3.8 9.3.5), sent with as few system calls and copies as the socket allows.

Both roles send through here: the acceptor its responses and C-GET sub-operations, the requestor
its C-STOREs to a PACS. A message's PDUs go out in groups: each group is one `sendmsg()` of the PDV
headers and memoryviews of the data between them (no PDU is assembled by copying), at most
`GROUP_BYTES` of data and `GROUP_PDUS` PDUs each. A data set still in a spool file is read a group
at a time into one buffer, so a 2 GB instance costs one group of memory, not 2 GB.
"""

from __future__ import annotations

import os
import socket
import ssl
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from dicomrouter.dul.pdu import P_DATA_TF

GROUP_BYTES = 1024 * 1024
GROUP_PDUS = 256  # two buffers each
MAX_BUFFERS_PER_SEND = 1024  # the kernel's limit for one sendmsg() (IOV_MAX)
FILE_CHUNK_WITHOUT_LIMIT = 1024 * 1024  # a peer announcing no maximum PDU length still gets PDUs of 1 MiB
_HEADER = struct.Struct(">BxIIBB")  # PDU type, length; PDV length, context, message control header

Buffer = bytes | bytearray | memoryview


@dataclass(frozen=True)
class FileSlice:
    """A data set still in a file: `length` bytes from `offset`, read piece by piece as it is sent."""

    path: Path
    offset: int
    length: int


def pdv_header(context_id: int, length: int, command: bool, last: bool) -> bytes:
    """The PDU and PDV headers of one P-DATA-TF carrying `length` bytes of one message part."""
    return _HEADER.pack(P_DATA_TF, length + 6, length + 2, context_id, (1 if command else 0) | (2 if last else 0))


def _chunk(max_pdu: int, without_limit: int) -> int:
    return max(max_pdu - 6, 1) if max_pdu else without_limit  # a peer announcing under 7 bytes is broken; never loop


def _framed(context_id: int, data: memoryview, command: bool, chunk: int, last_group: bool) -> list[Buffer]:
    parts: list[Buffer] = []
    for start in range(0, max(len(data), 1), chunk):
        piece = data[start : start + chunk]
        parts += (pdv_header(context_id, len(piece), command, last_group and start + chunk >= len(data)), piece)
    return parts


def iter_pdata_pdus(context_id: int, data: Buffer, command: bool, max_pdu: int) -> Iterator[bytes]:
    """One message part (command or data set) as whole P-DATA-TF PDUs of at most `max_pdu` bytes (0: any)."""
    chunk = _chunk(max_pdu, len(data) or 1)
    for start in range(0, max(len(data), 1), chunk):
        piece = data[start : start + chunk]
        yield pdv_header(context_id, len(piece), command, start + chunk >= len(data)) + piece


def pdata_pdus(context_id: int, data: Buffer, command: bool, max_pdu: int) -> bytes:
    return b"".join(iter_pdata_pdus(context_id, data, command, max_pdu))


def message_groups(
    context_id: int, command: Buffer, dataset: Buffer | FileSlice | None, max_pdu: int
) -> Iterator[list[Buffer]]:
    """A message's PDUs as groups of buffers, each to be sent whole before the next is asked for (the
    buffers of a file's group are views into one buffer reused for the next). OSError when a file
    ends early."""
    parts = _framed(context_id, memoryview(command), True, _chunk(max_pdu, len(command) or 1), True)
    if dataset is None:
        yield parts
        return
    if not isinstance(dataset, FileSlice):
        data = memoryview(dataset)
        chunk = _chunk(max_pdu, len(data) or 1)
        step = chunk * max(1, min(GROUP_PDUS, GROUP_BYTES // chunk))
        for start in range(0, max(len(data), 1), step):
            parts += _framed(context_id, data[start : start + step], False, chunk, start + step >= len(data))
            yield parts
            parts = []
        return
    chunk = _chunk(max_pdu, FILE_CHUNK_WITHOUT_LIMIT)
    step = chunk * max(1, min(GROUP_PDUS, GROUP_BYTES // chunk))
    buffer = memoryview(bytearray(min(step, dataset.length)))
    with open(dataset.path, "rb", buffering=0) as fp:
        fp.seek(dataset.offset)
        remaining = dataset.length
        while True:
            size = min(step, remaining)
            view = buffer[:size]
            got = 0
            while got < size and (count := fp.readinto(view[got:])):
                got += count
            if got != size:
                raise OSError(f"{dataset.path} ended {remaining - got} bytes early")
            remaining -= size
            parts += _framed(context_id, view, False, chunk, remaining == 0)
            yield parts
            parts = []
            if remaining == 0:
                return


def send_gathered(sock: socket.socket, parts: list[Buffer]) -> None:
    """All of `parts`, in order: one sendmsg() for all of them when the socket takes them at once."""
    if isinstance(sock, ssl.SSLSocket):  # TLS has no gathering write: one record stream, one copy
        sock.sendall(b"".join(parts))
        return
    views = [memoryview(part) for part in parts if len(part)]
    left = sum(len(view) for view in views)
    first = 0
    # A socket with a timeout never blocks: write straight away while the kernel takes it all. Its own
    # sendmsg would poll before every call; once the buffer is full, it waits (within its timeout).
    at_once = sock.gettimeout() is not None
    while left:
        batch = views[first : first + MAX_BUFFERS_PER_SEND]
        sent = 0
        if at_once:
            try:
                sent = os.writev(sock.fileno(), batch)
            except BlockingIOError:
                pass
            at_once = sent == sum(len(view) for view in batch)
        if not sent:
            sent = sock.sendmsg(batch)
        left -= sent
        while sent and sent >= len(views[first]):
            sent -= len(views[first])
            first += 1
        if sent:
            views[first] = views[first][sent:]


def send_message(
    sock: socket.socket, context_id: int, command: Buffer, dataset: Buffer | FileSlice | None, max_pdu: int
) -> None:
    """One DIMSE message, for a caller holding the connection's send lock."""
    for parts in message_groups(context_id, command, dataset, max_pdu):
        send_gathered(sock, parts)
