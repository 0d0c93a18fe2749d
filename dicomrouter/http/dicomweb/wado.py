"""WADO-RS: which server gives which series, C-GET from there, instances handed on as they arrive."""

from __future__ import annotations

import asyncio
import queue
import threading
import time
from collections.abc import AsyncIterator, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from io import BytesIO
from pathlib import Path

from pydicom import Dataset, dcmread
from pydicom.uid import (
    JPEG2000,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    JPEGExtended12Bit,
    JPEGLossless,
    JPEGLosslessSV1,
    JPEGLSLossless,
    JPEGLSNearLossless,
    RLELossless,
)
from pynetdicom import PYNETDICOM_IMPLEMENTATION_UID, PYNETDICOM_IMPLEMENTATION_VERSION

from dicomrouter.catalog.queries import Catalog
from dicomrouter.config import Config, ServerConfig
from dicomrouter.http.dicomweb.errors import DicomWebError
from dicomrouter.logging import get_logger
from dicomrouter.net.find_client import STUDY_ROOT_FIND, PeerFind, PeerFindError
from dicomrouter.net.get_client import STUDY_ROOT_GET, ReceivedInstance
from dicomrouter.net.upper_layer import FileSlice
from dicomrouter.retrieve.collect import collect_instances
from dicomrouter.retrieve.move_to_self import MoveToSelf
from dicomrouter.retrieve.plan import SourcePlan, plan_retrieve
from dicomrouter.routing.access import Caller
from dicomrouter.scp.store import file_meta  # the one writer of a received instance's file meta

log = get_logger(__name__)

# Offered one per presentation context, so the source picks the one it holds (no transcoding).
TRANSFER_SYNTAXES = tuple(
    str(uid)
    for uid in (
        ExplicitVRLittleEndian,
        ImplicitVRLittleEndian,
        JPEGBaseline8Bit,
        JPEGExtended12Bit,
        JPEGLossless,
        JPEGLosslessSV1,
        JPEGLSLossless,
        JPEGLSNearLossless,
        JPEG2000Lossless,
        JPEG2000,
        RLELossless,
        DeflatedExplicitVRLittleEndian,
        ExplicitVRBigEndian,
    )
)
MAX_STORAGE_CONTEXTS = 126
# Offered when a server does not say which classes it holds.
COMMON_SOP_CLASSES = (
    "1.2.840.10008.5.1.4.1.1.1",  # CR
    "1.2.840.10008.5.1.4.1.1.1.1",  # DX
    "1.2.840.10008.5.1.4.1.1.1.2",  # MG
    "1.2.840.10008.5.1.4.1.1.2",  # CT
    "1.2.840.10008.5.1.4.1.1.2.1",  # Enhanced CT
    "1.2.840.10008.5.1.4.1.1.4",  # MR
    "1.2.840.10008.5.1.4.1.1.4.1",  # Enhanced MR
    "1.2.840.10008.5.1.4.1.1.6.1",  # US
    "1.2.840.10008.5.1.4.1.1.7",  # Secondary Capture
    "1.2.840.10008.5.1.4.1.1.88.11",  # Basic Text SR
    "1.2.840.10008.5.1.4.1.1.88.22",  # Enhanced SR
    "1.2.840.10008.5.1.4.1.1.128",  # PET
    "1.2.840.10008.5.1.4.1.1.20",  # NM
    "1.2.840.10008.5.1.4.1.1.66.4",  # Segmentation
    "1.2.840.10008.5.1.4.1.1.481.1",  # RT Image
    "1.2.840.10008.5.1.4.1.1.104.1",  # Encapsulated PDF
)
DATASET_CHUNK = 1024 * 1024
QUEUED_INSTANCES = 16  # instances held between the C-GET and a slow HTTP client...
QUEUED_BYTES = (
    32 * 1024 * 1024
)  # ...and at most this many bytes of them in memory (spilled ones are on disk)
SUCCESS, OUT_OF_RESOURCES = 0x0000, 0xA700


@dataclass
class WadoSource:
    """What to C-GET from one server (the retrieve plan's) and the SOP classes it holds there."""

    plan: SourcePlan
    sop_classes: set[str] = field(default_factory=set)

    @property
    def server(self) -> ServerConfig:
        return self.plan.server


def part10_prefix(instance: ReceivedInstance) -> bytes:
    """Preamble, 'DICM' and file meta for the data set exactly as the source sent it."""
    return file_meta(
        instance.sop_class_uid,
        instance.sop_instance_uid,
        instance.transfer_syntax,
        PYNETDICOM_IMPLEMENTATION_UID,
        PYNETDICOM_IMPLEMENTATION_VERSION,
        "",
    )


def _memory_size(instance: ReceivedInstance) -> int:
    return len(instance.dataset) if isinstance(instance.dataset, bytes) else 0


def dataset_chunks(instance: ReceivedInstance) -> Iterator[bytes]:
    """The data set's bytes as received, piece by piece (a large one is read from its spill file)."""
    data = instance.dataset
    if not isinstance(data, FileSlice):
        yield data
        return
    with open(data.path, "rb") as handle:
        handle.seek(data.offset)
        left = data.length
        while left > 0:
            chunk = handle.read(min(DATASET_CHUNK, left))
            if not chunk:
                raise OSError(f"{data.path} ends {left} bytes early")
            left -= len(chunk)
            yield chunk


def decode_instance(instance: ReceivedInstance) -> Dataset:
    """The instance as pydicom reads it, pixel data left out (for /metadata)."""
    encoded = part10_prefix(instance) + b"".join(dataset_chunks(instance))
    return dcmread(BytesIO(encoded), stop_before_pixels=True)


def storage_contexts(sop_classes: set[str]) -> list[tuple[str, list[str]]] | None:
    """One context per (class, transfer syntax) while they fit in one association; None beyond:
    the collection then splits the classes over several associations (retrieve/held_syntax.py)
    rather than let the source transcode."""
    classes = sorted(sop_classes)
    if len(classes) * len(TRANSFER_SYNTAXES) <= MAX_STORAGE_CONTEXTS:
        return [(sop, [syntax]) for sop in classes for syntax in TRANSFER_SYNTAXES]
    return None


def _query_values(
    config: Config, server: ServerConfig, identifier: Dataset, keyword: str
) -> set[str]:
    """Every value of `keyword` in the answers of one C-FIND (empty when it fails)."""
    find = PeerFind(
        server, config.router, STUDY_ROOT_FIND, identifier, config.router.find_timeout_s
    )
    values: set[str] = set()
    try:
        for answer in find.answers():
            value = answer.get(keyword)
            if isinstance(value, str):
                values.add(value)
            elif value is not None:
                values.update(str(v) for v in value)
    except PeerFindError as exc:
        log.warning(
            "wado_sop_classes_unknown", server=server.name, keyword=keyword, reason=exc.reason
        )
    finally:
        find.close()
    values.discard("")
    return values


def _sop_classes(
    config: Config, server: ServerConfig, study: str, series: list[str] | None
) -> set[str]:
    """The SOP classes `server` holds in the study, to offer one context each: SOP Classes in
    Study (one answer) where the PACS supports it, else every instance's SOP Class UID."""
    identifier = Dataset()
    identifier.QueryRetrieveLevel = "STUDY"
    identifier.StudyInstanceUID = study
    identifier.SOPClassesInStudy = ""
    found = _query_values(config, server, identifier, "SOPClassesInStudy")
    if not found:
        identifier = Dataset()
        identifier.QueryRetrieveLevel = "IMAGE"
        identifier.StudyInstanceUID = study
        identifier.SeriesInstanceUID = "\\".join(series) if series else ""
        identifier.SOPInstanceUID = ""
        identifier.SOPClassUID = ""
        found = _query_values(config, server, identifier, "SOPClassUID")
    return found or set(COMMON_SOP_CLASSES)


def retrieve_identifier(study: str, series: str | None, instance: str | None) -> Dataset:
    identifier = Dataset()
    identifier.QueryRetrieveLevel = "IMAGE" if instance else "SERIES" if series else "STUDY"
    identifier.StudyInstanceUID = study
    if series:
        identifier.SeriesInstanceUID = series
    if instance:
        identifier.SOPInstanceUID = instance
    return identifier


def plan_wado(
    config: Config,
    catalog: Catalog | None,
    caller: Caller,
    study: str,
    series: str | None = None,
    instance: str | None = None,
) -> list[WadoSource]:
    """Each series once, from the server the retrieve plan picks; DicomWebError 404 or 502."""
    plan = plan_retrieve(
        config, catalog, caller, retrieve_identifier(study, series, instance), STUDY_ROOT_GET
    )
    if not plan.sources:
        if plan.unreachable:
            failed = "; ".join(f"{name}: {reason}" for name, reason in plan.unreachable.items())
            raise DicomWebError(
                502, f"{study} not found on the servers that answered; failed: {failed}"
            )
        raise DicomWebError(404, f"{study} is on no server {caller.ae_title} may read")

    def source(plan_source) -> WadoSource:
        held = plan_source.series.get(study) or ([series] if series else None)
        return WadoSource(plan_source, _sop_classes(config, plan_source.server, study, held))

    with ThreadPoolExecutor(max_workers=len(plan.sources), thread_name_prefix="wado-plan") as pool:
        return list(pool.map(source, plan.sources))


class Retrieval:
    """Instances of a planned retrieval, yielded as the sources send them; `close()` stops it."""

    def __init__(
        self,
        config: Config,
        sources: list[WadoSource],
        spill_folder: Path,
        mover: MoveToSelf | None = None,
    ):
        self.mover = mover  # for the servers that only move (their `retrieve:`)
        self.config = config
        self.sources = sources
        self.spill_folder = spill_folder
        self.errors: list[str] = []
        self.count = 0
        self.first_instance_ms: float | None = None  # after the retrieval started
        self._started = time.monotonic()
        self._queue: queue.Queue[ReceivedInstance | None] = queue.Queue(QUEUED_INSTANCES)
        self._stopped = threading.Event()
        self._queued_bytes = 0
        self._room = threading.Condition()
        # Set by an asyncio consumer: the C-GET thread wakes it per instance (no thread hop per item).
        self._loop: asyncio.AbstractEventLoop | None = None
        self._wakeup: asyncio.Event | None = None
        self._thread = threading.Thread(target=self._run, name="wado-get", daemon=True)
        self._thread.start()

    def _taken(self, item: ReceivedInstance) -> ReceivedInstance:
        with self._room:
            self._queued_bytes -= _memory_size(item)
            self._room.notify()
        if not self.count:
            self.first_instance_ms = round((time.monotonic() - self._started) * 1000, 1)
        self.count += 1
        return item

    def __iter__(self) -> Iterator[ReceivedInstance]:
        """For a consumer on a thread of its own."""
        try:
            while (item := self._queue.get()) is not None:
                yield self._taken(item)
        finally:
            self.close()

    async def instances(self) -> AsyncIterator[ReceivedInstance]:
        """For a consumer on an event loop: waits without blocking the loop."""
        self._wakeup = asyncio.Event()
        self._loop = asyncio.get_running_loop()
        try:
            while True:
                try:
                    item = self._queue.get_nowait()
                except queue.Empty:
                    self._wakeup.clear()
                    try:
                        item = self._queue.get_nowait()  # put before the clear: no wake-up follows
                    except queue.Empty:
                        await self._wakeup.wait()
                        continue
                if item is None:
                    return
                yield self._taken(item)
        finally:
            self.close()

    def _notify(self) -> None:
        loop, wakeup = self._loop, self._wakeup
        if loop is not None and wakeup is not None:
            try:
                loop.call_soon_threadsafe(wakeup.set)
            except RuntimeError:
                pass  # the loop is closed: nobody is waiting any more

    def close(self) -> None:
        self._stopped.set()
        with self._room:
            self._room.notify_all()
        try:
            while True:
                item = self._queue.get_nowait()  # unblock the C-GET thread
                if item is not None:
                    item.discard()
        except queue.Empty:
            pass

    def _hand_on(self, instance: ReceivedInstance) -> int:
        size = _memory_size(instance)
        with self._room:
            # One instance always fits, however large: the budget only holds back the ones after it.
            while (
                self._queued_bytes
                and self._queued_bytes + size > QUEUED_BYTES
                and not self._stopped.is_set()
            ):
                self._room.wait(0.2)
            self._queued_bytes += size
        while not self._stopped.is_set():
            try:
                self._queue.put(instance, timeout=0.2)
                self._notify()
                return SUCCESS
            except queue.Full:
                continue
        instance.discard()
        return OUT_OF_RESOURCES  # the client went away: the source counts it as failed

    def _run(self) -> None:
        try:
            for source in self.sources:  # each with the storage contexts for what it holds
                errors, cancelled = collect_instances(
                    self.config,
                    [source.plan],
                    storage_contexts(source.sop_classes),
                    self._hand_on,
                    self._stopped.is_set,
                    self.spill_folder,
                    mover=self.mover,
                )
                self.errors += errors
                if cancelled:
                    return
        finally:
            self._put_end()

    def _put_end(self) -> None:
        while not self._stopped.is_set():
            try:
                self._queue.put(None, timeout=0.2)
                self._notify()
                return
            except queue.Full:
                continue
