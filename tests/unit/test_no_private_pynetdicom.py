"""The router uses pynetdicom's public API only: no private module, attribute or method of it."""

from __future__ import annotations

import re
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[2] / "dicomrouter"

# What the network layer used to reach into, and the shapes of private use in general.
PRIVATE_USE = re.compile(
    r"pynetdicom\._"  # a private module (pynetdicom._config, pynetdicom._handlers...)
    r"|\b_serve_request\b|\b_accepted_cx\b|\b_negotiate_as_acceptor\b|\b_servers\b"
    r"|\.__class__\s*=|active_associations\.fget|\bcancel_req\b|\brouter_(caller|audit|called_ae)\b"
)
# pynetdicom modules whose public names the router may import.
PUBLIC_MODULES = {"pynetdicom", "pynetdicom.sop_class", "pynetdicom.presentation", "pynetdicom.service_class",
                  "pynetdicom.dsutils"}
IMPORT = re.compile(r"^\s*(?:from\s+(pynetdicom[\w.]*)\s+import\s+(.+)|import\s+(pynetdicom[\w.]*))", re.M)


def sources() -> list[Path]:
    return sorted(PACKAGE.rglob("*.py"))


def test_no_private_pynetdicom_api_anywhere():
    offenders = []
    for path in sources():
        text = path.read_text(encoding="utf-8")
        for number, line in enumerate(text.splitlines(), 1):
            if PRIVATE_USE.search(line):
                offenders.append(f"{path.relative_to(PACKAGE.parent)}:{number}: {line.strip()}")
    assert not offenders, "\n".join(offenders)


def test_only_public_pynetdicom_modules_and_names_are_imported():
    offenders = []
    for path in sources():
        for match in IMPORT.finditer(path.read_text(encoding="utf-8")):
            module = match.group(1) or match.group(3)
            names = [n.strip(" ()\n") for n in (match.group(2) or "").split(",") if n.strip(" ()\n")]
            if module not in PUBLIC_MODULES or any(name.startswith("_") for name in names):
                offenders.append(f"{path.relative_to(PACKAGE.parent)}: {match.group(0).strip()}")
    assert not offenders, "\n".join(offenders)


def test_the_acceptor_uses_no_pynetdicom_at_all():
    """The upper layer and the front are ours: pynetdicom appears there not even for its public classes."""
    for folder in ("dul",):
        for path in (PACKAGE / folder).rglob("*.py"):
            assert "pynetdicom" not in path.read_text(encoding="utf-8"), path
    assert "pynetdicom" not in (PACKAGE / "scp" / "front.py").read_text(encoding="utf-8")
