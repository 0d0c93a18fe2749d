"""C-ECHO SCP handler."""

from __future__ import annotations

from pydicom import Dataset
from pynetdicom.events import Event

from dicomrouter.audit import association_audit
from dicomrouter.logging import get_logger
from dicomrouter.reload import ConfigHolder
from dicomrouter.routing.access import called_server_refusal
from dicomrouter.scp.status import status_dataset

log = get_logger(__name__)

ECHO_REFUSED = (
    0x0124  # refused: not authorized (the called AE is an inactive server), as a store to it
)


def handle_echo(event: Event, holder: ConfigHolder | None = None) -> int | Dataset:
    """Answer Success, or refuse an echo to an inactive server's AE title with the reason."""
    called_ae = getattr(event.assoc, "router_called_ae", "")
    refusal = called_server_refusal(holder.current, called_ae) if holder is not None else None
    if refusal:
        log.warning(
            "echo_refused",
            calling_ae=event.assoc.requestor.ae_title,
            reason=refusal,
            status="0x0124",
        )
        association_audit(event.assoc).record("echo", "refused", detail=refusal)
        return status_dataset(ECHO_REFUSED, refusal)
    log.debug("echo", calling_ae=event.assoc.requestor.ae_title)
    association_audit(event.assoc).record("echo", "success")
    return 0x0000
