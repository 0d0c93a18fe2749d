"""multipart/related (RFC 2387) as DICOMweb uses it: written part by part, read with bounded memory."""

from __future__ import annotations

import secrets
from collections.abc import Callable, Iterator
from email.message import Message
from typing import Protocol

CHUNK_BYTES = 256 * 1024
MAX_HEADER_BYTES = 16 * 1024
MAX_PREAMBLE_BYTES = 64 * 1024


class MultipartError(ValueError):
    """The body is not the multipart/related message its Content-Type announced (HTTP 400)."""


class PartSink(Protocol):
    def write(self, data: bytes | memoryview) -> None: ...


def content_type_parameters(content_type: str) -> tuple[str, dict[str, str]]:
    """(media type in lower case, parameters) of a Content-Type header value."""
    message = Message()
    message["Content-Type"] = content_type
    params = {key.lower(): str(value) for key, value in message.get_params(failobj=[])[1:]}
    return message.get_content_type(), params


def new_boundary() -> str:
    return f"dicomrouter-{secrets.token_hex(16)}"


def related_content_type(boundary: str, part_type: str) -> str:
    return f'multipart/related; type="{part_type}"; boundary={boundary}'


class MultipartWriter:
    """The bytes around each part, in order: `part(...)`, the part's bytes, ..., `close()`."""

    def __init__(self, boundary: str | None = None):
        self.boundary = boundary or new_boundary()
        self._parts = 0

    def part(self, content_type: str, headers: dict[str, str] | None = None) -> bytes:
        lines = [f"--{self.boundary}", f"Content-Type: {content_type}"]
        lines += [f"{name}: {value}" for name, value in (headers or {}).items()]
        lead = b"\r\n" if self._parts else b""
        self._parts += 1
        return lead + ("\r\n".join(lines) + "\r\n\r\n").encode("ascii")

    def close(self) -> bytes:
        lead = b"\r\n" if self._parts else b""
        return lead + f"--{self.boundary}--\r\n".encode("ascii")


class _Buffer:
    """What was read and not yet consumed, refilled from `read`."""

    def __init__(self, read: Callable[[int], bytes]):
        self.read = read
        self.data = bytearray()
        self.eof = False

    def fill(self) -> bool:
        if self.eof:
            return False
        chunk = self.read(CHUNK_BYTES)
        if not chunk:
            self.eof = True
            return False
        self.data += chunk
        return True

    def take(self, count: int) -> bytes:
        taken = bytes(self.data[:count])
        del self.data[:count]
        return taken


def iter_parts(
    read: Callable[[int], bytes], boundary: str, new_sink: Callable[[dict[str, str]], PartSink]
) -> Iterator[tuple[dict[str, str], PartSink]]:
    """Parts of a multipart body from `read(n)`: each body goes into `new_sink(headers)` as it
    arrives (never more than about two chunks in memory), then (headers, sink) is yielded.

    Header names are lower case. Raises MultipartError on a malformed or truncated body.
    """
    if not boundary or len(boundary) > 200:
        raise MultipartError("the Content-Type names no usable multipart boundary")
    buffer = _Buffer(read)
    first = b"--" + boundary.encode("latin-1")
    delimiter = b"\r\n" + first
    # The first delimiter may open the body without the CRLF in front of it.
    while True:
        index = (b"\r\n" + bytes(buffer.data)).find(delimiter)
        if index >= 0:
            buffer.take(index + len(first))
            break
        if len(buffer.data) > MAX_PREAMBLE_BYTES or not buffer.fill():
            raise MultipartError("the body holds no part delimited by its boundary")
    while True:
        while len(buffer.data) < 2 and buffer.fill():
            pass
        if bytes(buffer.data[:2]) == b"--":
            return  # the close delimiter
        headers = _read_headers(buffer)
        sink = new_sink(headers)
        _copy_body(buffer, delimiter, sink)
        yield headers, sink


def _read_headers(buffer: _Buffer) -> dict[str, str]:
    while True:
        end = buffer.data.find(b"\r\n\r\n")
        if end >= 0:
            break
        if len(buffer.data) > MAX_HEADER_BYTES or not buffer.fill():
            raise MultipartError("a part's headers do not end (truncated body or wrong boundary)")
    block = buffer.take(end + 4).decode("latin-1")
    headers: dict[str, str] = {}
    lines = block.split("\r\n")
    if lines[0].strip():  # transport padding after the boundary must be blank
        raise MultipartError("unexpected text after a boundary delimiter")
    for line in lines[1:]:
        if not line:
            continue
        name, colon, value = line.partition(":")
        if not colon:
            raise MultipartError(f"malformed part header {line[:80]!r}")
        headers[name.strip().lower()] = value.strip()
    return headers


def _copy_body(buffer: _Buffer, delimiter: bytes, sink: PartSink) -> None:
    """Write the part's body to `sink` up to the next delimiter; leave the buffer after it."""
    keep = len(delimiter) - 1
    while True:
        index = buffer.data.find(delimiter)
        if index >= 0:
            if index:
                sink.write(memoryview(bytes(buffer.data[:index])))
            del buffer.data[: index + len(delimiter)]
            return
        if len(buffer.data) > keep:
            # All but the last few bytes cannot start a delimiter: pass them on.
            sink.write(buffer.take(len(buffer.data) - keep))
        if not buffer.fill():
            raise MultipartError("the body ends inside a part (truncated upload)")
