"""C-ECHO SCP: the association was admitted, so the answer is Success, unless the called AE is an
inactive server's (refused 0x0124 with the reason, as a store to it would be)."""

from __future__ import annotations

from dicomrouter.dul.association import Association, DataSink, DimseRefusal, Request
from dicomrouter.dul.dimse import C_ECHO_RQ
from dicomrouter.logging import get_logger
from dicomrouter.reload import ConfigHolder
from dicomrouter.routing.access import called_server_refusal

log = get_logger(__name__)

VERIFICATION = "1.2.840.10008.1.1"
ECHO_REFUSED = 0x0124  # refused: not authorized (the called AE is an inactive server), as a store to it


class EchoService:
    operation = "echo"
    commands = frozenset({C_ECHO_RQ})
    long_running = False

    def open_dataset(self, request: Request, association: Association) -> DataSink:
        raise DimseRefusal(0xC000, "a C-ECHO carries no data set")

    def __init__(self, holder: ConfigHolder | None = None):
        self.holder = holder

    def handle(self, request: Request, association: Association) -> None:
        refusal = called_server_refusal(self.holder.current, association.called_ae) if self.holder else None
        if refusal:
            raise DimseRefusal(ECHO_REFUSED, refusal)
        association.respond(request, 0x0000)
        log.debug("echo", calling_ae=association.calling_ae)
        association.audit.record("echo", "success")

    def refused(self, request: Request, refusal: DimseRefusal, association: Association) -> None:
        association.audit.record("echo", "refused", detail=refusal.reason)
