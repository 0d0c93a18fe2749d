"""A received C-STORE: decide destinations, spool the bytes, queue jobs; Success only when safe."""

from __future__ import annotations

import re
import time
import zlib
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from io import BytesIO
from pathlib import Path
from typing import Any, Protocol

from pydicom import dcmread
from pydicom.dataelem import RawDataElement
from pydicom.filereader import _read_file_meta_info, read_preamble
from pydicom.uid import DeflatedExplicitVRLittleEndian
from sqlalchemy import bindparam, func, select
from sqlalchemy.orm import Session, sessionmaker

from dicomrouter.catalog.db import engine_of
from dicomrouter.catalog.direct import DirectConnections, DirectTransaction
from dicomrouter.catalog.models import Instance, InstanceLocation, Server
from dicomrouter.config import Config
from dicomrouter.dicom_file import MAX_FILE_META_BYTES, META_HEAD_BYTES, dataset_offset
from dicomrouter.logging import get_logger
from dicomrouter.routing.access import Caller, may_write
from dicomrouter.routing.store_rules import choose_destinations, rule_keywords
from dicomrouter.store.dataset_walk import walk_instance, walk_instance_file, wanted_tags
from dicomrouter.store.plain_values import plain_value
from dicomrouter.store.queue import ClaimedJob, ForwardQueue, NewJob
from dicomrouter.store.spool import PartialFile, Spool, SpooledFile, SpoolError, SpoolFull

log = get_logger(__name__)

# C-STORE statuses (PS3.4 B.2.3, PS3.7 C)
SUCCESS = 0x0000
REFUSED_NOT_AUTHORIZED = 0x0124
SOP_CLASS_NOT_SUPPORTED = 0x0122  # a chosen destination refuses this class (or syntax) at its negotiation
OUT_OF_RESOURCES = 0xA700
DATASET_MISMATCH = 0xA900
CANNOT_UNDERSTAND = 0xC000
DUPLICATE_REFUSED = 0xC011
NO_DESTINATION = 0xC012

# Deflate gives real DICOM a few times, text-heavy reports some tens; a bomb gives a thousand.
MAX_INFLATION_RATIO = 100
UNDEFINED_LENGTH = 0xFFFFFFFF
DEFLATED_UID = DeflatedExplicitVRLittleEndian.encode("ascii")
META_PEEK_BYTES = META_HEAD_BYTES + MAX_FILE_META_BYTES + 2  # the whole meta and the first bytes after it

UID_PATTERN = re.compile(r"^(0|[1-9][0-9]*)(\.(0|[1-9][0-9]*))*$")

# What the catalog records about every instance (beyond what the rules look at).
CATALOG_KEYWORDS = (
    "PatientID",
    "IssuerOfPatientID",
    "PatientName",
    "PatientBirthDate",
    "StudyInstanceUID",
    "StudyDate",
    "AccessionNumber",
    "StudyDescription",
    "SeriesInstanceUID",
    "Modality",
    "SeriesNumber",
    "SOPInstanceUID",
    "SOPClassUID",
)


@dataclass(frozen=True)
class ReceiveResult:
    status: int
    comment: str = ""
    destinations: tuple[str, ...] = ()  # the destinations a job was queued for
    sop_instance_uid: str | None = None
    study_uid: str | None = None  # for the audit trail, once the header was read
    servers: tuple[str, ...] = ()  # the destinations routing chose (refused or not)


def valid_uid(value: Any) -> bool:
    """One UID (a multi-valued element arrives as a list: not valid here)."""
    return isinstance(value, str) and 0 < len(value) <= 64 and UID_PATTERN.match(value) is not None


def check_complete(dataset) -> None:
    """Refuse a dataset whose elements stop short of their declared length (a truncated send)."""
    for tag in list(dataset.keys()):
        raw = dataset.get_item(tag, keep_deferred=True)
        length = getattr(raw, "length", None)
        value = getattr(raw, "value", None)
        if length is None or length == 0xFFFFFFFF or not isinstance(value, bytes | bytearray):
            continue
        if len(value) != length:
            raise ValueError(f"element {tag} is truncated: {len(value)} of {length} bytes")


def check_readable(dataset) -> None:
    """Convert every value, nested ones included: what the spool keeps must read back.

    pydicom parses lazily; without this walk a wrong VR or a broken item deep in a sequence
    would pass here and fail at the destination. Pixel data stays bytes (nothing is decoded).
    """
    for element in dataset.iterall():
        _ = element.value


def check_no_meta_in_dataset(first_group_bytes: bytes) -> None:
    """A data set never carries group 0002 (PS3.7 6.3.1): a peer appending file meta elements after
    the meta the router wrote could change the transfer syntax pydicom reads (a deflate bomb past the check)."""
    if first_group_bytes in (b"\x02\x00", b"\x00\x02"):
        raise ValueError("the data set carries File Meta Information (group 0002) elements")


def check_inflation(encoded: bytes, max_inflated: int = 2 * 1024**3) -> None:
    """Refuse a deflated dataset that would inflate far beyond what deflate gives real data, or
    beyond `max_inflated` bytes (router.max_dataset_size) whatever the ratio.

    pydicom inflates the whole dataset at once; a few hundred KiB of deflated zeros would cost
    gigabytes and minutes of parsing.
    """
    meta_end = dataset_offset(encoded)
    check_no_meta_in_dataset(encoded[meta_end : meta_end + 2])
    if DEFLATED_UID not in encoded[132:meta_end]:
        return  # the file meta names another transfer syntax: no need for pydicom to read it
    fp = BytesIO(encoded)
    read_preamble(fp, False)
    meta = _read_file_meta_info(fp)
    if meta.get("TransferSyntaxUID") != DeflatedExplicitVRLittleEndian:
        return
    deflated = encoded[fp.tell() :]
    limit = min(MAX_INFLATION_RATIO * len(deflated) + 1024 * 1024, max_inflated)
    inflater = zlib.decompressobj(-zlib.MAX_WBITS)
    inflated = 0
    for start in range(0, len(deflated), 65536):
        inflated += len(inflater.decompress(deflated[start : start + 65536], limit + 1 - inflated))
        while inflater.unconsumed_tail and inflated <= limit:
            inflated += len(inflater.decompress(inflater.unconsumed_tail, limit + 1 - inflated))
        if inflated > limit:
            raise ValueError(f"deflated dataset of {len(deflated)} bytes inflates beyond {limit} bytes")


def read_header(encoded: bytes, keywords: Iterable[str], max_inflated: int = 2 * 1024**3) -> dict[str, Any]:
    """Check the data set is whole and every value reads back; return what we route by.

    Our walk (store.dataset_walk) answers for the usual instance; pydicom's full parse for the rest.
    """
    wanted_keywords = {*CATALOG_KEYWORDS, *keywords}
    walked = walk_instance(encoded, wanted_tags(wanted_keywords))
    if walked is not None:
        return _header(walked.plain, wanted_keywords, walked.transfer_syntax)
    return read_header_pydicom(encoded, keywords, max_inflated)


def read_header_pydicom(encoded: bytes, keywords: Iterable[str], max_inflated: int = 2 * 1024**3) -> dict[str, Any]:
    """read_header by pydicom: parse the whole dataset (pixels stay bytes), convert every value."""
    check_inflation(encoded, max_inflated)
    dataset = dcmread(BytesIO(encoded), force=False)
    check_complete(dataset)
    check_readable(dataset)
    return header_values(dataset, keywords)


def header_values(dataset, keywords: Iterable[str]) -> dict[str, Any]:
    """What the catalog records and the rules look at, as plain values."""
    return _header(
        lambda keyword: plain_value(dataset.get(keyword)),
        {*CATALOG_KEYWORDS, *keywords},
        str(dataset.file_meta.TransferSyntaxUID),
    )


def _header(plain: Callable[[str], Any], keywords: Iterable[str], transfer_syntax: str) -> dict[str, Any]:
    """`plain(keyword)` of each keyword that has a value (store.plain_values: str or list of str)."""
    header: dict[str, Any] = {}
    for keyword in keywords:
        value = plain(keyword)
        if value is not None:
            header[keyword] = value
    header["TransferSyntaxUID"] = transfer_syntax
    return header


# Values this large stay in the file while a streamed instance is checked (pixel data is not read at all).
DEFERRED_VALUE_BYTES = 1024 * 1024


def check_file_elements(dataset, file_size: int) -> None:
    """check_complete and check_readable for a data set read from a file with deferred values.

    Deferred (large) values are not loaded: they must lie within the file. Every other value is
    converted, nested ones included.
    """
    for tag in list(dataset.keys()):
        raw = dataset.get_item(tag, keep_deferred=True)
        if isinstance(raw, RawDataElement) and raw.value is None and raw.length != 0:
            # Deferred. A defined length must end within the file; an undefined one (encapsulated
            # pixel data) was walked item by item up to its delimiter by pydicom (EOFError if cut).
            if raw.length != UNDEFINED_LENGTH and raw.value_tell + raw.length > file_size:
                raise ValueError(f"element {tag} is truncated: {raw.length} bytes declared past the end")
            continue
        length = getattr(raw, "length", None)
        value = getattr(raw, "value", None)
        if isinstance(value, bytes | bytearray) and length not in (None, UNDEFINED_LENGTH) and len(value) != length:
            raise ValueError(f"element {tag} is truncated: {len(value)} of {length} bytes")
        element = dataset[tag]
        if element.VR == "SQ":
            for item in element.value:
                check_file_elements(item, file_size)


def read_header_from_file(path: Path, file_size: int, keywords: Iterable[str]) -> dict[str, Any]:
    """read_header for a large instance on disk: every element checked, pixel data included, but
    values over DEFERRED_VALUE_BYTES stay in the file (only their bounds are checked)."""
    wanted_keywords = {*CATALOG_KEYWORDS, *keywords}
    walked = walk_instance_file(path, file_size, wanted_tags(wanted_keywords), DEFERRED_VALUE_BYTES)
    if walked is not None:
        return _header(walked.plain, wanted_keywords, walked.transfer_syntax)
    return read_header_from_file_pydicom(path, file_size, keywords)


def read_header_from_file_pydicom(path: Path, file_size: int, keywords: Iterable[str]) -> dict[str, Any]:
    """read_header_from_file by pydicom (dcmread with defer_size)."""
    with open(path, "rb") as fp:
        prefix = fp.read(META_PEEK_BYTES)  # the file meta the front wrote is a few hundred bytes
        meta_end = dataset_offset(prefix)
        check_no_meta_in_dataset(prefix[meta_end : meta_end + 2])
        if DEFLATED_UID in prefix[132:meta_end]:
            raise ValueError("a deflated data set this large is refused")  # the front keeps deflated ones in memory
        fp.seek(0)
        dataset = dcmread(fp, force=False, defer_size=DEFERRED_VALUE_BYTES)
        check_file_elements(dataset, file_size)
        return header_values(dataset, keywords)


# Run on a DB-API connection with its SQL compiled once (catalog.direct), as every C-STORE runs it.
_DELIVERED_COPIES = (
    select(Server.name, func.coalesce(InstanceLocation.sha256, Instance.sha256))
    .join(InstanceLocation, InstanceLocation.server_id == Server.id)
    .join(Instance, Instance.id == InstanceLocation.instance_id)
    .where(Instance.sop_instance_uid == bindparam("sop_uid"))
)


def delivered_copies(transaction: DirectTransaction, sop_instance_uid: str) -> dict[str, str | None]:
    """server name -> sha256 of the copy that server acknowledged (per location, not the last copy anywhere)."""
    return {name: sha for name, sha in transaction.execute(_DELIVERED_COPIES, {"sop_uid": sop_instance_uid})}


@dataclass(frozen=True)
class InMemory:
    """A received instance held in memory."""

    encoded: bytes
    spool_: Spool
    max_inflated: int = 2 * 1024**3

    def header(self, keywords: Iterable[str]) -> dict[str, Any]:
        return read_header(self.encoded, keywords, self.max_inflated)

    def spool(self) -> SpooledFile:
        return self.spool_.write(self.encoded)


@dataclass(frozen=True)
class Streamed:
    """A received instance written to the spool's tmp/ while it arrived."""

    partial: PartialFile
    spool_: Spool

    def header(self, keywords: Iterable[str]) -> dict[str, Any]:
        return read_header_from_file(self.partial.path, self.partial.size, keywords)

    def spool(self) -> SpooledFile:
        return self.spool_.adopt(self.partial)


class ReceiveService:
    def __init__(
        self,
        config: Callable[[], Config],
        spool: Spool,
        queue: ForwardQueue,
        sessions: sessionmaker[Session],
        notify: Callable[[str], None],
        audit: Callable[..., None] | None = None,
        capabilities: Any = None,
        handoff: Handoff | None = None,
    ):
        self.handoff = handoff  # the forwarder: jobs it takes straight away are inserted claimed
        self.capabilities = capabilities  # store.capabilities.DestinationCapabilities: what destinations refuse
        self.config = config
        self.spool = spool
        self.queue = queue
        self.sessions = sessions
        self.direct = DirectConnections(engine_of(sessions))  # the queueing transaction's connections
        self.notify = notify
        self.audit = audit or (lambda **_: None)

    def close(self) -> None:
        """Close the catalog connections kept for queueing (once nothing is received any more)."""
        self.direct.close()

    def receive(
        self, caller: Caller, called_ae: str, sop_instance_uid: str | None, encoded: bytes
    ) -> ReceiveResult:
        """`sop_instance_uid` is the request's Affected SOP Instance UID (None: take the dataset's).

        `encoded`: preamble, file meta and data set, in memory.
        """
        max_inflated = self.config().router.max_dataset_size
        return self._receive(caller, called_ae, sop_instance_uid, InMemory(encoded, self.spool, max_inflated))

    def receive_partial(
        self, caller: Caller, called_ae: str, sop_instance_uid: str | None, partial: PartialFile
    ) -> ReceiveResult:
        """The same for an instance already written to the spool's tmp/ as it arrived (a large one)."""
        try:
            return self._receive(caller, called_ae, sop_instance_uid, Streamed(partial, self.spool))
        finally:
            partial.discard()  # refused or failed: the bytes go; adopted: nothing to do

    def _receive(
        self, caller: Caller, called_ae: str, sop_instance_uid: str | None, received: InMemory | Streamed
    ) -> ReceiveResult:
        config = self.config()
        # Passed with each line, not bound: binding a logger costs more than a small store's other bookkeeping.
        about = {"calling_ae": caller.ae_title, "address": caller.address, "sop_instance_uid": (sop_instance_uid or "")[:80]}
        if sop_instance_uid is not None and not valid_uid(sop_instance_uid):
            log.warning("store_refused", **about, reason="invalid SOP Instance UID")
            return ReceiveResult(DATASET_MISMATCH, "Affected SOP Instance UID is not a valid UID")
        try:
            header = received.header(rule_keywords(config))
        except MemoryError:
            log.error("store_refused", **about, reason="out of memory while parsing")
            return ReceiveResult(OUT_OF_RESOURCES, "out of memory while parsing the dataset")
        except Exception as exc:
            # Untrusted bytes: pydicom raises struct.error, RecursionError (deep sequences),
            # zlib.error (deflate), UnicodeDecodeError... all mean the same thing to the sender.
            reason = f"{exc.__class__.__name__}: {exc}"[:200]
            log.warning("store_refused", **about, reason=f"unreadable dataset: {reason}")
            # The Error Comment holds 64 characters: the reason itself, the exception's class in the log.
            return ReceiveResult(CANNOT_UNDERSTAND, f"unreadable data set: {exc}"[:200])
        study = header.get("StudyInstanceUID")
        study_uid = study if isinstance(study, str) else None
        if sop_instance_uid is None:
            sop_instance_uid = header.get("SOPInstanceUID")
            if not valid_uid(sop_instance_uid) or not valid_uid(header.get("SOPClassUID")):
                return ReceiveResult(
                    DATASET_MISMATCH, "the dataset has no valid SOP Instance or SOP Class UID", study_uid=study_uid
                )
        if header.get("SOPInstanceUID") != sop_instance_uid:
            log.warning("store_refused", **about, reason="SOP Instance UID in dataset differs from the request")
            return ReceiveResult(
                DATASET_MISMATCH, "SOPInstanceUID in the dataset does not match the request", study_uid=study_uid
            )
        for keyword in ("StudyInstanceUID", "SeriesInstanceUID"):
            value = header.get(keyword)
            if not isinstance(value, str) or not valid_uid(value):
                reason = f"no valid (single) {keyword} in the dataset"
                log.warning("store_refused", **about, reason=reason)
                return ReceiveResult(DATASET_MISMATCH, reason, study_uid=None, servers=())
        if not valid_uid(header.get("SOPClassUID")):
            log.warning("store_refused", **about, reason="no valid SOP Class UID in the dataset")
            return ReceiveResult(DATASET_MISMATCH, "the dataset has no valid SOPClassUID", study_uid=study_uid)
        decision = choose_destinations(config, caller.ae_title, called_ae, header)
        if decision.refused:  # an inactive server called by its AE title: refused, as an echo or move to it
            log.warning("store_refused", **about, reason=decision.refused, status="0x0124")
            return ReceiveResult(REFUSED_NOT_AUTHORIZED, decision.refused, study_uid=study_uid)
        names = tuple(s.name for s in decision.destinations)
        forbidden = [s for s in decision.destinations if not may_write(caller, s)]
        if forbidden:
            needs = ", ".join(sorted({f"{s.environment}_write" for s in forbidden}))
            reason = (
                f"{caller.ae_title} may not write to {', '.join(s.name for s in forbidden)}"
                f" (needs {needs}; {decision.reason})"
            )
            log.warning("store_refused", **about, reason=reason, status="0x0124")
            return ReceiveResult(REFUSED_NOT_AUTHORIZED, reason, study_uid=study_uid, servers=names)
        refusing = self._refusing_destinations(decision.destinations, header)
        if refusing:
            reason = (
                f"{', '.join(refusing)} does not accept SOP class {header['SOPClassUID']} in "
                f"{header['TransferSyntaxUID']} ({decision.reason})"
            )
            log.warning("store_refused", **about, reason=reason, status="0x0122")
            return ReceiveResult(SOP_CLASS_NOT_SUPPORTED, reason, study_uid=study_uid, servers=names)
        try:
            spooled = received.spool()
        except SpoolFull as exc:
            log.error("store_refused", **about, reason=str(exc))
            return ReceiveResult(OUT_OF_RESOURCES, str(exc), study_uid=study_uid, servers=names)
        except SpoolError as exc:
            log.error("store_refused", **about, reason=str(exc))
            return ReceiveResult(OUT_OF_RESOURCES, str(exc), study_uid=study_uid, servers=names)
        try:
            queued, handed, refusal = self._queue_jobs(config, caller, called_ae, spooled, header, names)
        except Exception as exc:
            self.spool.remove(spooled.path)
            log.exception("store_refused", **about, reason="catalog unavailable")
            comment = f"cannot queue the instance: {exc.__class__.__name__}"
            return ReceiveResult(OUT_OF_RESOURCES, comment, study_uid=study_uid, servers=names)
        if refusal:
            self.spool.remove(spooled.path)
            log.warning("store_refused", **about, reason=refusal)
            return ReceiveResult(DUPLICATE_REFUSED, refusal, study_uid=study_uid, servers=names)
        if not queued:
            self.spool.remove(spooled.path)  # every destination already has these exact bytes
        for name in queued:
            if name not in handed:
                self.notify(name)
        log.debug("stored", **about, destinations=names, queued=queued, route=decision.reason, bytes=spooled.size)
        return ReceiveResult(
            SUCCESS, destinations=queued, sop_instance_uid=sop_instance_uid, study_uid=study_uid, servers=names
        )

    def _refusing_destinations(self, destinations, header: dict[str, Any]) -> list[str]:
        """The chosen destinations known to refuse this SOP class in this transfer syntax (learned from their
        own negotiation): the instance would be dead-lettered there, so it is refused now (0x0122)."""
        if self.capabilities is None:
            return []
        sop_class, syntax = header.get("SOPClassUID"), header.get("TransferSyntaxUID")
        refusing = []
        for server in destinations:
            accepted = self.capabilities.accepted_syntaxes(server.name, sop_class, (syntax,))
            if accepted is not None and syntax not in accepted:
                refusing.append(server.name)
        return refusing

    def _queue_jobs(
        self, config, caller, called_ae, spooled, header, names
    ) -> tuple[tuple[str, ...], set[str], str | None]:
        """(destinations queued, those of them handed straight to the forwarder, refusal)."""
        sop_uid = header["SOPInstanceUID"]
        queued: list[str] = []
        handoff = self.handoff
        direct = {name for name in names if handoff.take_direct(name)} if handoff is not None else set()
        claimed_at = time.monotonic()  # no later than the lease's start: the forwarder's half-lease rule holds
        # On a DB-API connection, not through the engine: this transaction runs for every C-STORE.
        with self.direct.begin() as transaction:
            copies = delivered_copies(transaction, sop_uid)
            different = {n: sha for n, sha in copies.items() if n in names and sha != spooled.sha256}
            if different and config.router.duplicate_policy == "reject":
                return (), set(), (
                    f"SOP Instance UID {sop_uid} is already on {', '.join(different)} with different content "
                    "(router.duplicate_policy: reject)"
                )
            jobs = []
            already_queued = self.queue.destinations_with_open_jobs(transaction, spooled.sha256, names)
            for name in names:
                if copies.get(name) == spooled.sha256 or name in already_queued:
                    continue
                jobs.append(
                    NewJob(sop_uid, str(spooled.path), spooled.sha256, spooled.size, name, caller.ae_title, called_ae, header)
                )
                queued.append(name)
            claimed = self.queue.enqueue(transaction, jobs, claim_for=direct)
        handed: set[str] = set()
        for job in claimed:  # committed: the forwarder may send them now
            assert handoff is not None
            handoff.give(job.destination, [job], claimed_at)
            handed.add(job.destination)
        if different:
            self.audit(
                operation="store",
                calling_ae=caller.ae_title,
                address=caller.address,
                servers=",".join(different),
                study_uid=header.get("StudyInstanceUID"),
                outcome="overwrite",
                detail=f"SOP Instance UID {sop_uid} received with different content; overwriting",
            )
        return tuple(queued), handed, None


class Handoff(Protocol):
    """What the receive path asks of the forwarder (store.forwarder.Forwarder)."""

    def take_direct(self, destination: str) -> bool: ...

    def give(self, destination: str, jobs: list[ClaimedJob], claimed_at: float) -> None: ...
