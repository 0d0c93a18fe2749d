"""C-GET SCP: the router C-GETs from the holding PACS and returns the instances on the caller's
own association (workstations behind NAT, no fixed port)."""

from __future__ import annotations

import shutil
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from pydicom import Dataset, dcmread
from pydicom.dataset import FileMetaDataset
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_file_meta_info
from pynetdicom import ALL_TRANSFER_SYNTAXES, evt
from pynetdicom.events import Event
from pynetdicom.presentation import AllStoragePresentationContexts

from dicomrouter.audit import association_audit
from dicomrouter.catalog.queries import Catalog
from dicomrouter.logging import get_logger
from dicomrouter.net.get_client import PATIENT_ROOT_GET, STUDY_ROOT_GET, ReceivedInstance
from dicomrouter.reload import ConfigHolder
from dicomrouter.retrieve.collect import collect_instances
from dicomrouter.retrieve.mover import UNABLE_TO_PERFORM
from dicomrouter.scp.retrieve_request import (
    IDENTIFIER_MISMATCH,
    PENDING,
    MoveRefused,
    check_retrieve_identifier,
    retrieve_sources,
)
from dicomrouter.scp.server import SupportedContext
from dicomrouter.scp.status import status_dataset

log = get_logger(__name__)

DEFER_VALUES_OVER = 64 * 1024  # bytes: pixel data is read from the held file only while sent

GET_MODELS = (PATIENT_ROOT_GET, STUDY_ROOT_GET)
CANCELLED = 0xFE00
WARNING = 0xB000

GetResponse = int | tuple[int | Dataset, Dataset | None]


def caller_storage(assoc) -> dict[str, list[str]]:
    """Storage SOP class -> transfer syntaxes the caller accepted to receive (it took the SCP role)."""
    storage: dict[str, list[str]] = {}
    for context in assoc.accepted_contexts:
        if context.as_scu and context.abstract_syntax not in GET_MODELS:
            storage.setdefault(str(context.abstract_syntax), []).append(
                str(context.transfer_syntax[0])
            )
    return storage


def hold_instance(folder: Path, instance: ReceivedInstance, index: int) -> Path:
    """Write the received bytes as a DICOM file (file meta + data set as received) under `folder`."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = instance.sop_class_uid
    meta.MediaStorageSOPInstanceUID = instance.sop_instance_uid
    meta.TransferSyntaxUID = instance.transfer_syntax
    encoded_meta = DicomBytesIO()
    encoded_meta.is_little_endian, encoded_meta.is_implicit_VR = True, False
    write_file_meta_info(encoded_meta, meta, enforce_standard=True)
    path = folder / f"{index:06d}.dcm"
    with open(path, "wb") as handle:
        handle.write(bytes(128) + b"DICM")
        handle.write(encoded_meta.getvalue())
        handle.write(instance.dataset)
    return path


def held_dataset(path: Path) -> Dataset:
    """A held instance for pynetdicom to send: large values stay in the file until it encodes them,
    and raw elements are written back as they were read (nothing is decoded)."""
    return dcmread(path, defer_size=DEFER_VALUES_OVER)


def handle_get(
    event: Event, holder: ConfigHolder, catalog: Catalog | None
) -> Iterator[GetResponse]:
    """Obtain the instances from every holding server, then send them as C-STORE sub-operations."""
    audit_row: dict[str, Any] = {"outcome": "cancelled", "detail": "the caller went away"}
    started = time.monotonic()
    try:
        yield from _answer_get(event, holder, catalog, audit_row)
    finally:
        association_audit(event.assoc).record("get", duration_s=time.monotonic() - started, **audit_row)


def _answer_get(
    event: Event, holder: ConfigHolder, catalog: Catalog | None, audit_row: dict[str, Any]
) -> Iterator[GetResponse]:
    config = holder.current
    caller = event.assoc.router_caller
    query_model = str(event.request.AffectedSOPClassUID)
    try:
        identifier = event.identifier
        level, study_uid = check_retrieve_identifier(identifier, query_model == STUDY_ROOT_GET)
    except MoveRefused as exc:
        log.warning("get_refused", calling_ae=caller.ae_title, reason=exc.comment)
        audit_row.update(outcome="refused", detail=exc.comment)
        yield 1
        yield status_dataset(exc.status, exc.comment), None
        return
    except Exception as exc:
        log.warning(
            "get_refused", calling_ae=caller.ae_title, reason=f"undecodable identifier: {exc}"
        )
        audit_row.update(outcome="refused", detail="cannot decode the identifier")
        yield 1
        yield status_dataset(IDENTIFIER_MISMATCH, "cannot decode the identifier"), None
        return
    sources, unreachable = retrieve_sources(config, catalog, caller, identifier, query_model)
    audit_row.update(study_uid=study_uid, servers=[s.name for s in sources] or list(unreachable), detail=level)
    storage = caller_storage(event.assoc)
    # Held on disk beside the spool, not in memory: a study can be larger than the router's RAM.
    spool_tmp = Path(config.router.spool) / "tmp"
    spool_tmp.mkdir(parents=True, exist_ok=True)
    folder = Path(tempfile.mkdtemp(prefix="get-", dir=spool_tmp))
    try:
        yield from _collect_and_send(event, config, caller, query_model, identifier, level, study_uid,
                                     sources, unreachable, storage, folder, audit_row)
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def _collect_and_send(event, config, caller, query_model, identifier, level, study_uid,
                      sources, unreachable, storage, folder: Path, audit_row: dict[str, Any]) -> Iterator[GetResponse]:
    instances: list[Path] = []

    def hold(instance: ReceivedInstance) -> int:
        """The C-STORE status the source gets for this sub-operation."""
        try:
            instances.append(hold_instance(folder, instance, len(instances)))
        except OSError as exc:
            log.error("get_hold_failed", sop_instance_uid=instance.sop_instance_uid, reason=str(exc))
            return 0xA700  # out of resources: the source counts it as failed
        return 0x0000

    errors = (
        [f"{name} unreachable: {reason}" for name, reason in unreachable.items()]
        if not sources
        else []
    )
    more_errors, cancelled = collect_instances(config, sources, storage, hold, lambda: event.is_cancelled)
    errors += more_errors
    if cancelled:
        audit_row.update(outcome="cancelled", detail=f"{level}: cancelled while collecting")
        yield 0
        return
    log.info(
        "get_collected",
        calling_ae=caller.ae_title,
        query_level=level,
        study_uid=study_uid,
        sources=[s.name for s in sources],
        instances=len(instances),
        errors=errors,
    )
    # A source that failed counts as one failed sub-operation, so the final status shows it.
    detail = f"{level}: " + "; ".join(errors) if errors else level
    audit_row.update(counts={"instances": len(instances), "sent": 0}, detail=detail)
    yield len(instances) + (1 if errors else 0)
    for sent, held in enumerate(instances):
        if event.is_cancelled:
            audit_row["outcome"] = "cancelled"
            yield CANCELLED, None
            return
        audit_row["counts"]["sent"] = sent
        yield PENDING, held_dataset(held)
    audit_row["counts"]["sent"] = len(instances)
    audit_row["outcome"] = ("partial" if instances else "failed") if errors else "success"
    if errors:
        status = WARNING if instances else UNABLE_TO_PERFORM
        yield status_dataset(status, "; ".join(errors)), None


def get_bindings(
    holder: ConfigHolder, catalog: Catalog | None = None
) -> tuple[list[SupportedContext], list[tuple[Any, ...]]]:
    """C-GET contexts and handler; storage contexts accept the caller's SCP/SCU role selection.

    Wire these after the C-STORE storage contexts: pynetdicom keeps the roles of the last call.
    """
    contexts = [SupportedContext(model) for model in GET_MODELS]
    contexts += [
        SupportedContext(
            cx.abstract_syntax, list(ALL_TRANSFER_SYNTAXES), scu_role=True, scp_role=True
        )
        for cx in AllStoragePresentationContexts
    ]
    return contexts, [(evt.EVT_C_GET, handle_get, [holder, catalog])]
