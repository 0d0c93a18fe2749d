"""Storage Commitment Push Model messages (PS3.4 J), and the router's two requestor roles in it:
asking a server to commit (N-ACTION) and reporting to a client on a new association (N-EVENT-REPORT)."""

from __future__ import annotations

import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

from pydicom import Dataset

from dicomrouter.config import RouterSettings, ServerConfig, calling_ae_for
from dicomrouter.net.encoding import decode_identifier, encode_dataset
from dicomrouter.net.peer import PeerUnavailable, associate_with
from dicomrouter.net.upper_layer import (
    EXPLICIT_VR_LE,
    IMPLICIT_VR_LE,
    Link,
    UpperLayerError,
    command_set,
    open_link,
    us,
)

STORAGE_COMMITMENT = "1.2.840.10008.1.20.1"
STORAGE_COMMITMENT_INSTANCE = "1.2.840.10008.1.20.1.1"  # the well-known SOP instance (PS3.4 J.3.1)
REQUEST_COMMITMENT = 1  # Action Type ID
ALL_COMMITTED, SOME_FAILED = 1, 2  # Event Type IDs
N_EVENT_REPORT_RQ, N_ACTION_RQ, N_EVENT_REPORT_RSP, N_ACTION_RSP = 0x0100, 0x0130, 0x8100, 0x8130
PROCESSING_FAILURE, NO_SUCH_INSTANCE, CLASS_NOT_SUPPORTED = 0x0110, 0x0112, 0x0122
SYNTAXES = (EXPLICIT_VR_LE, IMPLICIT_VR_LE)
# Command elements (group 0000) the N- services add
REQUESTED_SOP_CLASS, REQUESTED_SOP_INSTANCE, EVENT_TYPE_ID, ACTION_TYPE_ID = (
    0x0003,
    0x1001,
    0x1002,
    0x1008,
)
AFFECTED_SOP_INSTANCE = 0x1000
MESSAGE_ID = 1


def uid_value(uid: str) -> bytes:
    data = uid.encode("ascii")
    return data + b"\0" * (len(data) % 2)


@dataclass(frozen=True)
class Referenced:
    sop_class_uid: str
    sop_instance_uid: str


def request_dataset(transaction_uid: str, instances: Iterable[Referenced]) -> Dataset:
    """The N-ACTION data set: Transaction UID and the Referenced SOP Sequence."""
    ds = Dataset()
    ds.TransactionUID = transaction_uid
    ds.ReferencedSOPSequence = [_item(ref) for ref in instances]
    return ds


def report_dataset(
    transaction_uid: str, committed: Iterable[Referenced], failed: Mapping[Referenced, int]
) -> Dataset:
    """The N-EVENT-REPORT data set: committed instances, and failed ones with their Failure Reason."""
    ds = Dataset()
    ds.TransactionUID = transaction_uid
    committed = list(committed)
    if committed:
        ds.ReferencedSOPSequence = [_item(ref) for ref in committed]
    if failed:
        items = []
        for ref, reason in failed.items():
            item = _item(ref)
            item.FailureReason = reason
            items.append(item)
        ds.FailedSOPSequence = items
    return ds


def _item(ref: Referenced) -> Dataset:
    item = Dataset()
    item.ReferencedSOPClassUID = ref.sop_class_uid
    item.ReferencedSOPInstanceUID = ref.sop_instance_uid
    return item


def referenced(sequence: Sequence[Dataset] | None) -> list[Referenced]:
    """The (class, instance) pairs of a Referenced or Failed SOP Sequence; items without an instance UID skipped."""
    pairs = []
    for item in sequence or ():
        instance = str(item.get("ReferencedSOPInstanceUID", "") or "").strip()
        if instance:
            pairs.append(
                Referenced(str(item.get("ReferencedSOPClassUID", "") or "").strip(), instance)
            )
    return pairs


def decode(data: bytes, transfer_syntax: str) -> Dataset:
    return decode_identifier(data, transfer_syntax)


def encode(dataset: Dataset, transfer_syntax: str) -> bytes:
    data = encode_dataset(dataset, transfer_syntax)
    if data is None:
        raise ValueError(f"cannot encode a storage commitment data set in {transfer_syntax}")
    return data


def _await_response(link: Link, command_field: int, timeout_s: float) -> int:
    deadline = time.monotonic() + timeout_s
    while True:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise TimeoutError
        for message in link.receive_messages(remaining):
            if message.command_field == command_field and message.us(0x0120) == MESSAGE_ID:
                return message.status


def request_commitment(
    server: ServerConfig,
    router: RouterSettings,
    transaction_uid: str,
    instances: Sequence[Referenced],
) -> None:
    """Ask `server` to commit `instances` (N-ACTION); its N-EVENT-REPORT comes later on an association
    of its own. PeerUnavailable when it cannot be asked or does not answer Success."""
    link = associate_with(
        server, router, calling_ae_for(server, "store", router), [(STORAGE_COMMITMENT, SYNTAXES)]
    )
    try:
        context_id = link.context_for(STORAGE_COMMITMENT)
        if context_id is None:
            raise PeerUnavailable("rejected", f"{server.name} does not accept Storage Commitment")
        syntax = link.contexts[context_id][1]
        command = command_set(
            [
                (REQUESTED_SOP_CLASS, uid_value(STORAGE_COMMITMENT)),
                (0x0100, us(N_ACTION_RQ)),
                (0x0110, us(MESSAGE_ID)),
                (0x0800, us(0x0000)),
                (REQUESTED_SOP_INSTANCE, uid_value(STORAGE_COMMITMENT_INSTANCE)),
                (ACTION_TYPE_ID, us(REQUEST_COMMITMENT)),
            ]
        )
        link.send_message(
            context_id, command, encode(request_dataset(transaction_uid, instances), syntax)
        )
        status = _await_response(link, N_ACTION_RSP, router.dimse_timeout_s)
    except (TimeoutError, UpperLayerError, OSError) as exc:
        link.abort()
        raise PeerUnavailable(
            "unreachable", f"no N-ACTION response from {server.name} ({exc or 'timeout'})"
        ) from None
    except BaseException:
        link.abort()
        raise
    link.release(router.acse_timeout_s)
    if status != 0x0000:
        raise PeerUnavailable(
            "rejected", f"{server.name} answered the N-ACTION with 0x{status:04X}"
        )


def event_report_command(event_type: int) -> list[tuple[int, bytes]]:
    """The N-EVENT-REPORT-RQ command elements, without Message ID and Data Set Type."""
    return [
        (0x0002, uid_value(STORAGE_COMMITMENT)),
        (0x0100, us(N_EVENT_REPORT_RQ)),
        (AFFECTED_SOP_INSTANCE, uid_value(STORAGE_COMMITMENT_INSTANCE)),
        (EVENT_TYPE_ID, us(event_type)),
    ]


def send_report_on_new_association(
    host: str, port: int, called_ae: str, router: RouterSettings, event_type: int, report: Dataset
) -> int:
    """Open an association to the client (proposing the SCP role, PS3.4 J.3.3), send the report,
    return the N-EVENT-REPORT-RSP status; PeerUnavailable when the client is not there."""
    try:
        link = open_link(
            host,
            port,
            router.ae_title,
            called_ae,
            [(STORAGE_COMMITMENT, SYNTAXES)],
            router.max_pdu_size,
            router.connect_timeout_s,
            router.acse_timeout_s,
            scp_roles=(STORAGE_COMMITMENT,),
            send_timeout_s=router.network_timeout_s,
        )
    except UpperLayerError as exc:
        raise PeerUnavailable(
            "rejected" if exc.kind == "rejected" else "unreachable", exc.reason
        ) from None
    try:
        context_id = link.context_for(STORAGE_COMMITMENT)
        if context_id is None:
            raise PeerUnavailable(
                "rejected", f"{called_ae} accepted no Storage Commitment context for the report"
            )
        syntax = link.contexts[context_id][1]
        elements = [
            *event_report_command(event_type),
            (0x0110, us(MESSAGE_ID)),
            (0x0800, us(0x0000)),
        ]
        link.send_message(context_id, command_set(sorted(elements)), encode(report, syntax))
        status = _await_response(link, N_EVENT_REPORT_RSP, router.dimse_timeout_s)
    except (TimeoutError, UpperLayerError, OSError) as exc:
        link.abort()
        raise PeerUnavailable(
            "unreachable", f"no N-EVENT-REPORT response from {called_ae} ({exc or 'timeout'})"
        ) from None
    except BaseException:
        link.abort()
        raise
    link.release(router.acse_timeout_s)
    return status
