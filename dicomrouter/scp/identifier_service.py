"""What C-FIND, C-MOVE and C-GET share: an identifier held in memory, answered on the operation thread."""

from __future__ import annotations

from dicomrouter.dul.association import Association, DataSink, DimseRefusal, HeldDataset, Request

IDENTIFIER_MISMATCH = 0xA900
MAX_IDENTIFIER = 1024 * 1024  # a query or retrieve identifier is a few hundred bytes


class IdentifierService:
    """Base of the services whose request carries an identifier; subclasses answer in `answer`."""

    operation = ""
    commands: frozenset[int] = frozenset()
    long_running = True

    def open_dataset(self, request: Request, association: Association) -> DataSink:
        return HeldDataset(MAX_IDENTIFIER)

    def handle(self, request: Request, association: Association) -> None:
        if request.dataset is None:
            raise DimseRefusal(IDENTIFIER_MISMATCH, f"a {self.operation} request needs an identifier")
        self.answer(request, association)

    def answer(self, request: Request, association: Association) -> None:
        raise NotImplementedError

    def audit_operation(self, request: Request) -> str:
        return self.operation

    def refused(self, request: Request, refusal: DimseRefusal, association: Association) -> None:
        association.audit.record(self.audit_operation(request), "refused", detail=refusal.reason)
