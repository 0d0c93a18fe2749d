"""C-STORE SCP handler: thin, hands the encoded bytes to the receive service."""

from __future__ import annotations

from pydicom import Dataset
from pynetdicom.events import Event

from dicomrouter.audit import association_audit
from dicomrouter.logging import get_logger
from dicomrouter.scp.status import status_dataset
from dicomrouter.store.receive import (
    DUPLICATE_REFUSED,
    NO_DESTINATION,
    OUT_OF_RESOURCES,
    REFUSED_NOT_AUTHORIZED,
    SUCCESS,
    ReceiveResult,
    ReceiveService,
)
from dicomrouter.store.spool import PartialFile

log = get_logger(__name__)



def audit_outcome(status: int) -> str:
    """The audit trail's word for a C-STORE status."""
    if status == SUCCESS:
        return "success"
    if status in (REFUSED_NOT_AUTHORIZED, DUPLICATE_REFUSED, NO_DESTINATION):
        return "refused"
    return "failed"


def store_instance(
    receive: ReceiveService, caller, called_ae: str, sop_instance_uid: str, received: bytes | PartialFile, audit
) -> ReceiveResult:
    """Hand one received instance (file meta and data set, as bytes or already in a spool file) to the
    receive service; tally it in `audit`."""
    try:
        if isinstance(received, PartialFile):
            result = receive.receive_partial(caller, called_ae, sop_instance_uid, received)
        else:
            result = receive.receive(caller, called_ae, sop_instance_uid, received)
    except MemoryError:
        result = ReceiveResult(OUT_OF_RESOURCES, "out of memory")
    except Exception:
        log.exception("store_failed", calling_ae=caller.ae_title, sop_instance_uid=sop_instance_uid[:80])
        result = ReceiveResult(OUT_OF_RESOURCES, "internal error; not stored")
    reason = result.comment if result.status != SUCCESS else None
    audit.count_store(result.study_uid, audit_outcome(result.status), result.servers, reason)
    return result


def handle_store(event: Event, receive: ReceiveService, relay=None) -> Dataset:
    caller = event.assoc.router_caller
    request = event.request
    sop_instance_uid = str(request.AffectedSOPInstanceUID or "")
    audit = association_audit(event.assoc)
    if caller.kind == "server":
        # A PACS calls in only to deliver C-MOVE sub-operations the router asked for.
        if relay is not None:
            return relay.receive_sub_operation(event)
        log.warning("store_refused", calling_ae=caller.ae_title, reason="server AE outside a relayed move")
        result = ReceiveResult(REFUSED_NOT_AUTHORIZED, "server AE may only deliver relayed moves")
        audit.count_store(None, audit_outcome(result.status), (), result.comment)
    else:
        try:
            encoded = event.encoded_dataset(include_meta=True)
        except MemoryError:
            result = ReceiveResult(OUT_OF_RESOURCES, "out of memory")
            audit.count_store(None, audit_outcome(result.status), (), result.comment)
        else:
            result = store_instance(receive, caller, event.assoc.router_called_ae, sop_instance_uid, encoded, audit)
    return status_dataset(result.status, result.comment)
