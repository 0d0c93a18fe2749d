"""What happens when a destination acknowledged instances: catalog, job done, spool file freed."""

from __future__ import annotations

from dicomrouter.catalog.db import engine_of
from dicomrouter.catalog.direct import DirectConnections, DirectTransaction
from dicomrouter.catalog.queries import Catalog
from dicomrouter.catalog.upserts import StoredInstance, record_stored
from dicomrouter.config import ServerConfig
from dicomrouter.store.queue import ClaimedJob, ForwardQueue


def _sort_key(item: StoredInstance) -> tuple[str, str, str]:
    attrs = item.attrs
    return (attrs.get("StudyInstanceUID", ""), attrs.get("SeriesInstanceUID", ""), attrs.get("SOPInstanceUID", ""))


class AckRecorder:
    """One transaction per acknowledged batch: locations recorded, jobs completed.

    On a kept DB-API connection with statements compiled once (catalog.direct), as the receive
    transaction: through a Session or Connection, SQLAlchemy's per-statement machinery cost more
    than the database's work. Retried on a deadlock or lock timeout as Catalog.write is.
    """

    def __init__(self, catalog: Catalog, queue: ForwardQueue):
        self.catalog = catalog
        self.queue = queue
        # One writer thread (forwarder.AckWriter): one connection kept.
        self.direct = DirectConnections(engine_of(catalog.sessions), max_idle=1)

    def __call__(self, server: ServerConfig, jobs: list[ClaimedJob]) -> list[str]:
        """Returns the spool paths no job needs any more."""
        items = sorted(
            (StoredInstance(job.header, job.sop_class_uid, job.transfer_syntax_uid, job.size_bytes, job.sha256) for job in jobs),
            key=_sort_key,
        )

        def work(transaction: DirectTransaction) -> list[str]:
            record_stored(transaction, server.name, items)
            return self._complete(transaction, jobs)

        return self.direct.write(work, attempts=self.catalog.attempts)

    def complete_only(self, jobs: list[ClaimedJob]) -> list[str]:
        """Complete delivered jobs without touching the catalog's hierarchy (it refused them)."""
        return self.direct.write(lambda transaction: self._complete(transaction, jobs), attempts=self.catalog.attempts)

    def close(self) -> None:
        """Close the kept connection (once the ack writer has stopped)."""
        self.direct.close()

    def _complete(self, transaction: DirectTransaction, jobs: list[ClaimedJob]) -> list[str]:
        self.queue.complete(transaction, [job.id for job in jobs])
        return self.queue.unreferenced_paths(transaction, [job.spool_path for job in jobs])
