"""C-ECHO SCP handler."""

from __future__ import annotations

from pynetdicom.events import Event

from dicomrouter.audit import association_audit
from dicomrouter.logging import get_logger

log = get_logger(__name__)


def handle_echo(event: Event) -> int:
    """Answer Success; the association gate already decided who may talk to us."""
    log.debug("echo", calling_ae=event.assoc.requestor.ae_title)
    association_audit(event.assoc).record("echo", "success")
    return 0x0000
