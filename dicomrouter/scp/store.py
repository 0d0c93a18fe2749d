"""C-STORE SCP handler: thin, hands the encoded bytes to the receive service."""

from __future__ import annotations

from pydicom import Dataset
from pynetdicom.events import Event

from dicomrouter.logging import get_logger
from dicomrouter.store.receive import OUT_OF_RESOURCES, REFUSED_NOT_AUTHORIZED, ReceiveService

log = get_logger(__name__)


def status_dataset(status: int, comment: str = "") -> Dataset:
    result = Dataset()
    result.Status = status
    if comment:
        result.ErrorComment = comment[:64]  # LO
    return result


def handle_store(event: Event, receive: ReceiveService, relay=None) -> Dataset:
    caller = event.assoc.router_caller
    request = event.request
    sop_instance_uid = str(request.AffectedSOPInstanceUID or "")
    if caller.kind == "server":
        # A PACS calls in only to deliver C-MOVE sub-operations the router asked for.
        if relay is not None:
            return relay.receive_sub_operation(event)
        log.warning("store_refused", calling_ae=caller.ae_title, reason="server AE outside a relayed move")
        return status_dataset(REFUSED_NOT_AUTHORIZED, "server AE may only deliver relayed moves")
    try:
        encoded = event.encoded_dataset(include_meta=True)
        result = receive.receive(caller, event.assoc.router_called_ae, sop_instance_uid, encoded)
    except MemoryError:
        return status_dataset(OUT_OF_RESOURCES, "out of memory")
    except Exception:
        log.exception("store_failed", calling_ae=caller.ae_title, sop_instance_uid=sop_instance_uid[:80])
        return status_dataset(OUT_OF_RESOURCES, "internal error; not stored")
    return status_dataset(result.status, result.comment)
