"""A fault peer: a Q/R SCP (pynetdicom) that accepts the C-GET context but answers every C-GET
"SOP class not supported" (0x0122), while C-FIND and C-MOVE work. Real PACS refuse C-GET at
negotiation (dcmqrscp --disable-get); this is the other way of saying it."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from pydicom import Dataset
from pynetdicom import AE, StoragePresentationContexts, evt
from pynetdicom.sop_class import (
    StudyRootQueryRetrieveInformationModelFind,
    StudyRootQueryRetrieveInformationModelGet,
    StudyRootQueryRetrieveInformationModelMove,
)

from dicomrouter.net.sockets import set_nodelay
from dicomrouter.pacsfarm import free_ports

SOP_CLASS_NOT_SUPPORTED = 0x0122


@dataclass
class GetRefusingPeer:
    """Holds `datasets` (one study); moves them to the AE titles in `destinations`."""

    ae_title: str
    datasets: Sequence[Dataset]
    destinations: dict[str, tuple[str, int]]
    port: int = 0
    gets: int = 0
    moves: int = 0
    _server: object = field(default=None, repr=False)

    def _matches(self, identifier: Dataset) -> list[Dataset]:
        study = str(identifier.get("StudyInstanceUID", "") or "")
        series = str(identifier.get("SeriesInstanceUID", "") or "")
        return [
            ds
            for ds in self.datasets
            if study in ("", ds.StudyInstanceUID) and series in ("", ds.SeriesInstanceUID)
        ]

    def _handle_find(self, event):
        identifier = event.identifier
        seen: set[str] = set()
        for ds in self._matches(identifier):
            if ds.SeriesInstanceUID in seen:
                continue
            seen.add(ds.SeriesInstanceUID)
            answer = Dataset()
            answer.QueryRetrieveLevel = identifier.QueryRetrieveLevel
            answer.StudyInstanceUID = ds.StudyInstanceUID
            if identifier.QueryRetrieveLevel != "STUDY":
                answer.SeriesInstanceUID = ds.SeriesInstanceUID
                answer.NumberOfSeriesRelatedInstances = sum(
                    other.SeriesInstanceUID == ds.SeriesInstanceUID for other in self.datasets
                )
            yield 0xFF00, answer
            if identifier.QueryRetrieveLevel == "STUDY":
                return

    def _handle_get(self, event):
        self.gets += 1
        yield len(self._matches(event.identifier))  # with 0, pynetdicom answers Success at once
        yield SOP_CLASS_NOT_SUPPORTED, None

    def _handle_move(self, event):
        self.moves += 1
        set_nodelay(event.assoc.dul.socket.socket)
        address = self.destinations.get(str(event.move_destination).strip())
        if address is None:
            yield None, None
            return
        matches = self._matches(event.identifier)
        yield (*address, {"contexts": StoragePresentationContexts[:100]})
        yield len(matches)
        for ds in matches:
            yield 0xFF00, ds

    def start(self) -> GetRefusingPeer:
        self.port = self.port or free_ports(1)[0]
        ae = AE(ae_title=self.ae_title)
        for model in (
            StudyRootQueryRetrieveInformationModelFind,
            StudyRootQueryRetrieveInformationModelGet,
            StudyRootQueryRetrieveInformationModelMove,
        ):
            ae.add_supported_context(model)
        handlers = [
            (evt.EVT_C_FIND, self._handle_find),
            (evt.EVT_C_GET, self._handle_get),
            (evt.EVT_C_MOVE, self._handle_move),
        ]
        self._server = ae.start_server(("127.0.0.1", self.port), block=False, evt_handlers=handlers)
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server = None
