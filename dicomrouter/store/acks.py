"""What happens when a destination acknowledged instances: catalog, job done, spool file freed."""

from __future__ import annotations

from dicomrouter.catalog.queries import Catalog
from dicomrouter.catalog.upserts import StoredInstance, record_stored
from dicomrouter.config import ServerConfig
from dicomrouter.store.queue import ClaimedJob, ForwardQueue


def _sort_key(item: StoredInstance) -> tuple[str, str, str]:
    attrs = item.attrs
    return (attrs.get("StudyInstanceUID", ""), attrs.get("SeriesInstanceUID", ""), attrs.get("SOPInstanceUID", ""))


class AckRecorder:
    """One transaction per acknowledged batch: locations recorded, jobs completed."""

    def __init__(self, catalog: Catalog, queue: ForwardQueue):
        self.catalog = catalog
        self.queue = queue

    def __call__(self, server: ServerConfig, jobs: list[ClaimedJob]) -> list[str]:
        """Returns the spool paths no job needs any more."""
        items = sorted(
            (StoredInstance(job.header, job.sop_class_uid, job.transfer_syntax_uid, job.size_bytes, job.sha256) for job in jobs),
            key=_sort_key,
        )

        def work(session) -> list[str]:
            record_stored(session, server.name, items)
            self.queue.complete(session, [job.id for job in jobs])
            return self.queue.unreferenced_paths(session, [job.spool_path for job in jobs])

        return self.catalog.write_core(work)

    def complete_only(self, jobs: list[ClaimedJob]) -> list[str]:
        """Complete delivered jobs without touching the catalog's hierarchy (it refused them)."""

        def work(session) -> list[str]:
            self.queue.complete(session, [job.id for job in jobs])
            return self.queue.unreferenced_paths(session, [job.spool_path for job in jobs])

        return self.catalog.write(work)
