"""STOW-RS: each part of the upload goes the way a C-STORE from the same client goes."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from io import BytesIO
from typing import Any

from pydicom import dcmread

from dicomrouter.config import Config
from dicomrouter.dicom_file import MAX_FILE_META_BYTES, PREFIX_BYTES, with_group_length
from dicomrouter.http.dicomweb.errors import DicomWebError
from dicomrouter.logging import get_logger
from dicomrouter.routing.access import Caller, may_write
from dicomrouter.store.receive import (
    CANNOT_UNDERSTAND,
    DATASET_MISMATCH,
    OUT_OF_RESOURCES,
    SUCCESS,
    ReceiveResult,
    ReceiveService,
)
from dicomrouter.store.spool import PartialFile, Spool

log = get_logger(__name__)

DICOM_MEDIA_TYPE = "application/dicom"
HEADER_TAGS = ("SOPClassUID", "SOPInstanceUID", "StudyInstanceUID")
HEAD_BYTES = PREFIX_BYTES + MAX_FILE_META_BYTES  # enough to complete a part's file meta


def may_store_anywhere(config: Config, caller: Caller) -> bool:
    """Whether `caller` may write to at least one usable server (otherwise STOW-RS is 403)."""
    return any(may_write(caller, server) for server in config.usable_servers())


class SpillingSink:
    """A part's bytes: in memory up to `threshold`, then written to a spool file as they arrive."""

    def __init__(self, spool: Spool, threshold: int, content_type: str = ""):
        self.spool = spool
        self.threshold = threshold
        self.content_type = content_type
        self.memory: bytearray | None = bytearray()
        self.partial: PartialFile | None = None
        self._head_checked = False

    def write(self, data: bytes | memoryview) -> None:
        if self.partial is not None:
            self.partial.write(data)
            return
        assert self.memory is not None
        self.memory += data
        if len(self.memory) >= HEAD_BYTES:
            self._complete_head()
        if len(self.memory) > self.threshold:
            self._complete_head()
            self.partial = self.spool.open_partial()
            self.partial.write(self.memory)
            self.memory = None

    def _complete_head(self) -> None:
        """Clients that write a data set with file meta but no preamble, or a file meta without its
        group length (pydicom's dcmwrite does both by default) get them added, as PS3.10 has them."""
        if self._head_checked or self.memory is None:
            return
        self._head_checked = True
        if self.memory[128:132] == b"DICM":
            pass
        elif self.memory[:4] == b"DICM":
            self.memory[:0] = bytes(128)
        elif self.memory[:2] == b"\x02\x00":  # a (0002,xxxx) file meta element, little endian
            self.memory[:0] = bytes(128) + b"DICM"
        try:
            completed = with_group_length(bytes(self.memory))
        except ValueError:
            return  # the receive service refuses it with the reason
        if len(completed) != len(self.memory):
            self.memory = bytearray(completed)

    @property
    def size(self) -> int:
        return self.partial.size if self.partial is not None else len(self.memory or b"")

    def header(self) -> dict[str, str]:
        """The UIDs the response names (empty when the part cannot be read)."""
        self._complete_head()
        try:
            if self.partial is not None:
                with open(self.partial.path, "rb") as handle:
                    dataset = dcmread(
                        handle, stop_before_pixels=True, specific_tags=list(HEADER_TAGS)
                    )
            else:
                dataset = dcmread(
                    BytesIO(bytes(self.memory or b"")),
                    stop_before_pixels=True,
                    specific_tags=list(HEADER_TAGS),
                )
            return {key: str(dataset.get(key, "") or "") for key in HEADER_TAGS}
        except Exception:
            return {}

    def discard(self) -> None:
        if self.partial is not None:
            self.partial.discard()
        self.memory = None


@dataclass
class StoredPart:
    sop_class_uid: str
    sop_instance_uid: str
    status: int
    comment: str = ""
    study_uid: str = ""


@dataclass
class StowResult:
    parts: list[StoredPart] = field(default_factory=list)

    @property
    def http_status(self) -> int:
        failed = sum(p.status != SUCCESS for p in self.parts)
        if not failed:
            return 200
        return 409 if failed == len(self.parts) else 202

    def response(self, base_url: str, study_uid: str | None = None) -> dict[str, Any]:
        """The Store Instances Response Module (PS3.18 10.5.3) as DICOM JSON."""
        body: dict[str, Any] = {}
        stored = [p for p in self.parts if p.status == SUCCESS]
        failed = [p for p in self.parts if p.status != SUCCESS]
        study = study_uid or next((p.study_uid for p in stored if p.study_uid), "")
        if study and base_url:
            body["00081190"] = {"vr": "UR", "Value": [f"{base_url}/studies/{study}"]}
        if failed:
            body["00081198"] = {
                "vr": "SQ",
                "Value": [_reference(p, base_url, failed=True) for p in failed],
            }
        if stored:
            body["00081199"] = {"vr": "SQ", "Value": [_reference(p, base_url) for p in stored]}
        return body


def _reference(part: StoredPart, base_url: str, failed: bool = False) -> dict[str, Any]:
    item: dict[str, Any] = {}
    if part.sop_class_uid:
        item["00081150"] = {"vr": "UI", "Value": [part.sop_class_uid]}
    if part.sop_instance_uid:
        item["00081155"] = {"vr": "UI", "Value": [part.sop_instance_uid]}
    if failed:
        item["00081197"] = {"vr": "US", "Value": [part.status]}
    elif base_url and part.study_uid:
        item["00081190"] = {
            "vr": "UR",
            "Value": [f"{base_url}/studies/{part.study_uid}/instances/{part.sop_instance_uid}"],
        }
    return item


def store_part(
    receive: ReceiveService,
    config: Config,
    caller: Caller,
    sink: SpillingSink,
    study_uid: str | None,
) -> StoredPart:
    """Hand one uploaded part to the receive service, as a C-STORE to the router's own AE title."""
    header = sink.header()
    part = StoredPart(
        header.get("SOPClassUID", ""),
        header.get("SOPInstanceUID", ""),
        SUCCESS,
        study_uid=header.get("StudyInstanceUID", ""),
    )
    try:
        if sink.content_type.split(";")[0].strip().lower() != DICOM_MEDIA_TYPE:
            part.status, part.comment = (
                CANNOT_UNDERSTAND,
                f"part of type {sink.content_type!r}, not {DICOM_MEDIA_TYPE}",
            )
            return part
        if study_uid is not None and part.study_uid != study_uid:
            part.status = DATASET_MISMATCH
            part.comment = f"StudyInstanceUID {part.study_uid!r} is not the study of the URL"
            return part
        try:
            if sink.partial is not None:
                result = receive.receive_partial(caller, config.router.ae_title, None, sink.partial)
            else:
                result = receive.receive(
                    caller, config.router.ae_title, None, bytes(sink.memory or b"")
                )
        except Exception:
            log.exception(
                "stow_part_failed",
                calling_ae=caller.ae_title,
                sop_instance_uid=part.sop_instance_uid,
            )
            result = ReceiveResult(OUT_OF_RESOURCES, "internal error; not stored")
        part.status, part.comment = result.status, result.comment
        return part
    finally:
        sink.discard()


def stow_store(
    receive: ReceiveService,
    config: Config,
    caller: Caller,
    parts: Iterable[tuple[dict[str, str], SpillingSink]],
    study_uid: str | None = None,
) -> StowResult:
    """Store every part in upload order (each read from the request only when the last is safe)."""
    if not may_store_anywhere(config, caller):
        raise DicomWebError(403, f"{caller.ae_title} may not store on any server")
    result = StowResult()
    for _headers, sink in parts:
        part = store_part(receive, config, caller, sink, study_uid)
        if part.status != SUCCESS:
            log.warning(
                "stow_part_refused",
                calling_ae=caller.ae_title,
                sop_instance_uid=part.sop_instance_uid,
                status=f"0x{part.status:04X}",
                reason=part.comment,
            )
        result.parts.append(part)
    if not result.parts:
        raise DicomWebError(400, "the request holds no part")
    return result
