"""DICOMweb (PS3.18) under /dicom-web: thin aiohttp handlers over the search, wado and stow services."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from io import BytesIO
from pathlib import Path
from typing import Any

from aiohttp import web
from pydicom import dcmread

from dicomrouter.http.auth import require_client
from dicomrouter.http.deps import HttpDeps
from dicomrouter.http.dicomweb import PREFIX
from dicomrouter.http.dicomweb.bulkdata import BULK_SEGMENT, bulk_data_uris, bulk_value, parse_path
from dicomrouter.http.dicomweb.dicomjson import MEDIA_TYPE, dataset_json, encode_json
from dicomrouter.http.dicomweb.errors import DicomWebError
from dicomrouter.http.dicomweb.frames import (
    OCTET_STREAM,
    extract_frames,
    frame_media_type,
    parse_frame_list,
)
from dicomrouter.http.dicomweb.multipart import (
    MultipartError,
    MultipartWriter,
    content_type_parameters,
    iter_parts,
    related_content_type,
)
from dicomrouter.http.dicomweb.qido import QidoError, parse_qido
from dicomrouter.http.dicomweb.search import qido_search, warning_value
from dicomrouter.http.dicomweb.stow import DICOM_MEDIA_TYPE, SpillingSink, stow_store
from dicomrouter.http.dicomweb.wado import (
    Retrieval,
    dataset_chunks,
    decode_instance,
    part10_prefix,
    plan_wado,
)
from dicomrouter.logging import get_logger
from dicomrouter.query.federation import Federation
from dicomrouter.retrieve.move_to_self import MoveToSelf
from dicomrouter.retrieve.pending import PendingRetrievals
from dicomrouter.routing.access import Caller
from dicomrouter.store.receive import ReceiveService

log = get_logger(__name__)

STUDY = "{study}"
SERIES = "{series}"
INSTANCE = "{instance}"


def base_url(request: web.Request) -> str:
    """The DICOMweb root as the client reached it (RetrieveURL values point there)."""
    host = request.host
    has_port = "]:" in host if host.startswith("[") else ":" in host
    if not has_port:
        # Some clients (dicomweb-client) send a Host without the port: add the one they reached.
        sockname = request.transport.get_extra_info("sockname") if request.transport else None
        port = sockname[1] if sockname else None
        if port and port != {"http": 80, "https": 443}.get(request.scheme):
            host = f"{host}:{port}"
    return f"{request.scheme}://{host}{PREFIX}"


def _error_response(exc: DicomWebError) -> web.Response:
    headers = [("Warning", value) for value in exc.warnings]
    response = web.Response(status=exc.status, text=exc.message + "\n")
    for name, value in headers:
        response.headers.add(name, value)
    return response


class DicomWebRoutes:
    """The handlers, given the services they call (one Federation for QIDO, the receive service)."""

    def __init__(
        self,
        deps: HttpDeps,
        receive: ReceiveService,
        federation: Federation,
        pending: PendingRetrievals | None = None,
        capabilities: Any = None,
    ):
        self.deps = deps
        self.receive = receive
        self.federation = federation
        self.pending = pending or PendingRetrievals()  # where C-MOVEs to the router wait
        self.capabilities = capabilities  # remembers which servers refuse C-GET

    def add_to(self, app: web.Application) -> None:
        get, post = app.router.add_get, app.router.add_post
        for resource, prefix in (
            ("studies", ""),
            ("series", ""),
            ("instances", ""),
            ("series", f"/studies/{STUDY}"),
            ("instances", f"/studies/{STUDY}"),
            ("instances", f"/studies/{STUDY}/series/{SERIES}"),
        ):
            get(f"{PREFIX}{prefix}/{resource}", self._search_handler(resource), allow_head=False)
        for path in (
            f"/studies/{STUDY}",
            f"/studies/{STUDY}/series/{SERIES}",
            f"/studies/{STUDY}/series/{SERIES}/instances/{INSTANCE}",
        ):
            get(f"{PREFIX}{path}", self.retrieve, allow_head=False)
            get(f"{PREFIX}{path}/metadata", self.metadata, allow_head=False)
        get(
            f"{PREFIX}/studies/{STUDY}/series/{SERIES}/instances/{INSTANCE}/frames/{{frames}}",
            self.frames,
            allow_head=False,
        )
        get(
            f"{PREFIX}/studies/{STUDY}/series/{SERIES}/instances/{INSTANCE}/{BULK_SEGMENT}/{{path:.+}}",
            self.bulkdata,
            allow_head=False,
        )
        post(f"{PREFIX}/studies", self.store)
        post(f"{PREFIX}/studies/{STUDY}", self.store)

    def _audit(self, caller: Caller, operation: str, outcome: str, **fields: Any) -> None:
        self.deps.audit.record(
            operation, outcome, calling_ae=caller.ae_title, address=caller.address, **fields
        )

    # QIDO-RS

    def _search_handler(self, resource: str) -> Callable:
        async def search(request: web.Request) -> web.StreamResponse:
            return await self.search(request, resource)

        return search

    async def search(self, request: web.Request, resource: str) -> web.StreamResponse:
        caller = require_client(request)
        config = self.deps.holder.current
        study, series = request.match_info.get("study"), request.match_info.get("series")
        try:
            query = parse_qido(resource, list(request.query.items()), study, series)
        except QidoError as exc:
            return web.Response(status=400, text=f"{exc}\n")
        started = time.monotonic()
        try:
            result = await asyncio.to_thread(
                qido_search, config, self.federation, caller, query, base_url(request)
            )
        except DicomWebError as exc:
            self._audit(
                caller,
                "find",
                "refused" if exc.status == 403 else "failed",
                detail=f"DICOMweb {request.path_qs}: {exc.message}"[:500],
            )
            return _error_response(exc)
        self._audit(
            caller,
            "find",
            "success" if result.outcome == "complete" else result.outcome,
            servers=result.servers,
            detail=f"DICOMweb {request.path_qs}"[:500],
            counts={
                "answers": len(result.answers),
                "ms": round((time.monotonic() - started) * 1000),
            },
        )
        response = web.Response(body=encode_json(result.answers), content_type=MEDIA_TYPE)
        for value in result.warnings:
            response.headers.add("Warning", value)
        return response

    # WADO-RS

    async def _plan(self, request: web.Request) -> tuple[Caller, Retrieval]:
        caller = require_client(request)
        config = self.deps.holder.current
        study = request.match_info["study"]
        series, instance = request.match_info.get("series"), request.match_info.get("instance")
        sources = await asyncio.to_thread(
            plan_wado, config, self.deps.catalog, caller, study, series, instance
        )
        spill_folder = (
            Path(config.router.spool) / "tmp"
        )  # large instances wait there, not in memory
        mover = MoveToSelf(config, self.pending, self.capabilities)
        return caller, Retrieval(config, sources, spill_folder, mover)

    async def retrieve(self, request: web.Request) -> web.StreamResponse:
        accept = request.headers.get("Accept", "*/*")
        if not _accepts_dicom_multipart(accept):
            return web.Response(
                status=406, text='only multipart/related; type="application/dicom" is served\n'
            )
        started = time.monotonic()
        try:
            caller, retrieval = await self._plan(request)
        except DicomWebError as exc:
            return _error_response(exc)
        planned_ms = round((time.monotonic() - started) * 1000, 1)
        writer = MultipartWriter()
        response = web.StreamResponse(
            headers={"Content-Type": related_content_type(writer.boundary, DICOM_MEDIA_TYPE)}
        )
        outcome = "cancelled"
        try:
            async for instance in retrieval.instances():
                if not response.prepared:  # headers wait for the first instance: see below
                    await response.prepare(request)
                try:
                    head = writer.part(DICOM_MEDIA_TYPE) + part10_prefix(instance)
                    if isinstance(instance.dataset, bytes):
                        await response.write(head + instance.dataset)
                        continue
                    await response.write(head)
                    chunks = dataset_chunks(instance)  # a large one, from its spill file
                    while (chunk := await asyncio.to_thread(next, chunks, None)) is not None:
                        await response.write(chunk)
                finally:
                    instance.discard()
            if not response.prepared and retrieval.errors:
                # Nothing came: the status can still say so (C-MOVE never delivered, refused...).
                outcome = "failed"
                return _error_response(_retrieval_failed(retrieval.errors))
            if retrieval.errors:
                # Headers are sent: a body cut short (no closing boundary, connection closed) is
                # how the client learns the study is incomplete; the log and audit say why.
                outcome = "partial"
                log.warning(
                    "wado_incomplete", path=request.path, reason="; ".join(retrieval.errors)
                )
                if request.transport is not None:
                    request.transport.close()
                return response
            if not response.prepared:
                await response.prepare(request)
            await response.write(writer.close())
            await response.write_eof()
            outcome = "success"
        finally:
            retrieval.close()
            log.info(
                "wado_sent",
                calling_ae=caller.ae_title,
                path=request.path,
                outcome=outcome,
                instances=retrieval.count,
                plan_ms=planned_ms,
                first_instance_ms=retrieval.first_instance_ms,
                elapsed_ms=round((time.monotonic() - started) * 1000, 1),
            )
            self._audit(
                caller,
                "get",
                outcome,
                study_uid=request.match_info["study"],
                servers=[source.server.name for source in retrieval.sources],
                counts={"instances": retrieval.count},
                detail=(f"DICOMweb {request.path}; " + "; ".join(retrieval.errors))[:500],
            )
        return response

    async def metadata(self, request: web.Request) -> web.StreamResponse:
        try:
            caller, retrieval = await self._plan(request)
        except DicomWebError as exc:
            return _error_response(exc)
        try:
            datasets = await asyncio.to_thread(_metadata_of, retrieval, base_url(request))
        finally:
            retrieval.close()
        if not datasets and retrieval.errors:
            return _error_response(_retrieval_failed(retrieval.errors))
        self._audit(
            caller,
            "get",
            "partial" if retrieval.errors else "success",
            study_uid=request.match_info["study"],
            counts={"instances": len(datasets)},
            detail=f"DICOMweb {request.path}"[:500],
        )
        return web.Response(body=encode_json(datasets), content_type=MEDIA_TYPE)

    async def _read_instance(
        self, request: web.Request, read: Callable[[bytes], Any], counts: Callable[[Any], dict]
    ) -> Any:
        """`read(part10)` of the one instance the path names, audited; raises DicomWebError."""
        caller, retrieval = await self._plan(request)
        try:
            result = await asyncio.to_thread(lambda: read(_part10_of(retrieval)))
        finally:
            retrieval.close()
        self._audit(
            caller,
            "get",
            "success",
            study_uid=request.match_info["study"],
            counts=counts(result),
            detail=f"DICOMweb {request.path}"[:500],
        )
        return result

    async def frames(self, request: web.Request) -> web.StreamResponse:
        """Frames as stored: raw bytes (application/octet-stream) or the compressed bitstream."""
        try:
            numbers = parse_frame_list(request.match_info["frames"])
            syntax, frames = await self._read_instance(
                request,
                lambda part10: extract_frames(part10, numbers),
                lambda result: {"frames": len(result[1])},
            )
        except DicomWebError as exc:
            return _error_response(exc)
        writer = MultipartWriter()
        media_type = frame_media_type(syntax)
        body = b"".join(writer.part(media_type) + frame for frame in frames) + writer.close()
        content_type = related_content_type(writer.boundary, media_type.split(";")[0])
        return web.Response(body=body, headers={"Content-Type": content_type})

    async def bulkdata(self, request: web.Request) -> web.StreamResponse:
        """A value /metadata referenced by its BulkDataURI, as the instance holds it."""
        try:
            path = parse_path(request.match_info["path"])
            value = await self._read_instance(
                request,
                lambda part10: bulk_value(dcmread(BytesIO(part10)), path),
                lambda result: {"bytes": len(result)},
            )
        except DicomWebError as exc:
            return _error_response(exc)
        accept = request.headers.get("Accept", "*/*")
        if "multipart/" not in accept and OCTET_STREAM in accept:
            return web.Response(body=value, content_type=OCTET_STREAM)  # single part, as asked
        writer = MultipartWriter()
        body = writer.part(OCTET_STREAM) + value + writer.close()
        content_type = related_content_type(writer.boundary, OCTET_STREAM)
        return web.Response(body=body, headers={"Content-Type": content_type})

    # STOW-RS

    async def store(self, request: web.Request) -> web.StreamResponse:
        caller = require_client(request)
        config = self.deps.holder.current
        media_type, params = content_type_parameters(request.headers.get("Content-Type", ""))
        part_type = params.get("type", DICOM_MEDIA_TYPE).lower()
        if media_type != "multipart/related" or part_type != DICOM_MEDIA_TYPE:
            return web.Response(
                status=415, text='send multipart/related; type="application/dicom"\n'
            )
        study = request.match_info.get("study")
        loop = asyncio.get_running_loop()

        async def read_up_to(size: int) -> bytes:
            # Whole chunks (not whatever one TCP segment brought): one hop to the loop per chunk.
            try:
                return await request.content.readexactly(size)
            except asyncio.IncompleteReadError as exc:
                return exc.partial  # the end of the body

        def read(size: int) -> bytes:
            return asyncio.run_coroutine_threadsafe(read_up_to(size), loop).result()

        threshold = config.router.max_in_memory_dataset
        sinks: list[SpillingSink] = []

        def new_sink(headers: dict[str, str]) -> SpillingSink:
            sink = SpillingSink(
                self.receive.spool, threshold, headers.get("content-type", DICOM_MEDIA_TYPE)
            )
            sinks.append(sink)
            return sink

        def store_all():
            parts = iter_parts(read, params.get("boundary", ""), new_sink)
            return stow_store(self.receive, config, caller, parts, study)

        try:
            result = await asyncio.to_thread(store_all)
        except DicomWebError as exc:
            self._audit(
                caller,
                "store",
                "refused" if exc.status == 403 else "failed",
                study_uid=study,
                detail=f"DICOMweb STOW: {exc.message}"[:500],
            )
            return _error_response(exc)
        except MultipartError as exc:
            return web.Response(status=400, text=f"{exc}\n")
        finally:
            for sink in sinks:
                sink.discard()  # a part cut short by a broken upload leaves nothing in tmp/
        stored = sum(p.status == 0 for p in result.parts)
        self._audit(
            caller,
            "store",
            {200: "success", 202: "partial", 409: "failed"}[result.http_status],
            study_uid=study or next((p.study_uid for p in result.parts if p.study_uid), None),
            counts={"instances": len(result.parts), "stored": stored},
            detail="DICOMweb STOW " + "; ".join(p.comment for p in result.parts if p.comment)[:400],
        )
        return web.Response(
            status=result.http_status,
            body=encode_json(result.response(base_url(request), study)),
            content_type=MEDIA_TYPE,
        )


def _retrieval_failed(errors: list[str]) -> DicomWebError:
    """502 naming what each failed source said."""
    return DicomWebError(
        502,
        "nothing retrieved: " + "; ".join(errors),
        [warning_value(error) for error in errors],
    )


def _accepts_dicom_multipart(accept: str) -> bool:
    for item in accept.split(","):
        media_type, params = content_type_parameters(item.strip() or "*/*")
        if media_type in ("*/*", "multipart/*"):
            return True
        if media_type == "multipart/related" and params.get("type", DICOM_MEDIA_TYPE).lower() in (
            DICOM_MEDIA_TYPE,
            "application/*",
        ):
            return True
    return False


def _part10_of(retrieval: Retrieval) -> bytes:
    """The one instance a retrieval brings, as a Part 10 file; DicomWebError 404 if none came."""
    for instance in retrieval:
        try:
            return part10_prefix(instance) + b"".join(dataset_chunks(instance))
        finally:
            instance.discard()
    raise DicomWebError(
        404, "the instance was not retrieved" + "".join(f"; {e}" for e in retrieval.errors)
    )


def _metadata_of(retrieval: Retrieval, base: str) -> list[dict]:
    result = []
    for instance in retrieval:
        try:
            dataset = decode_instance(instance)
        finally:
            instance.discard()
        instance_url = (
            f"{base}/studies/{dataset.StudyInstanceUID}/series/{dataset.SeriesInstanceUID}"
            f"/instances/{dataset.SOPInstanceUID}"
        )
        result.append(dataset_json(dataset, bulk_data_uris(dataset, instance_url)))
    return result


def dicomweb_routes(
    receive: ReceiveService,
    federation: Federation,
    pending: PendingRetrievals | None = None,
    capabilities: Any = None,
) -> Callable[[web.Application, HttpDeps], None]:
    """The route module app.py passes to make_http_app."""

    def add_routes(app: web.Application, deps: HttpDeps) -> None:
        DicomWebRoutes(deps, receive, federation, pending, capabilities).add_to(app)

    return add_routes
