"""What the router asks of a PACS (dicomrouter/net/) runs on our own upper layer: no pynetdicom
requestor, and nothing private of pynetdicom's."""

from __future__ import annotations

import re
from pathlib import Path

NET = Path(__file__).resolve().parents[2] / "dicomrouter" / "net"
PRIVATE = re.compile(r"pynetdicom(\.\w+)*\._\w+|from pynetdicom[\w.]* import [^#\n]*\b_\w+")
REQUESTOR = re.compile(
    r"from pynetdicom import [^#\n]*\b(AE|Association)\b|pynetdicom\.(association|dul|transport|acse)\b"
)


def test_net_uses_no_private_pynetdicom_api_and_not_its_requestor():
    offenders = []
    for path in sorted(NET.glob("*.py")):
        for number, line in enumerate(path.read_text().splitlines(), 1):
            if PRIVATE.search(line) or REQUESTOR.search(line):
                offenders.append(f"{path.name}:{number}: {line.strip()}")
    assert offenders == []
