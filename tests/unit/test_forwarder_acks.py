"""The ack writer: one instance the catalog cannot describe must not hold back the others."""

from __future__ import annotations

import threading

from dicomrouter.config import CallingAETitles, ServerConfig
from dicomrouter.store.forwarder import AckWriter
from dicomrouter.store.queue import ClaimedJob


class RecordingSpool:
    def __init__(self):
        self.removed: list[str] = []

    def remove(self, path) -> None:
        self.removed.append(str(path))


class CatalogRefusingOne:
    """Stands in for AckRecorder: the catalog refuses any batch holding `bad_id`."""

    def __init__(self, bad_id: int):
        self.bad_id = bad_id
        self.recorded: list[int] = []
        self.completed_only: list[int] = []
        self.done = threading.Event()

    def __call__(self, server, jobs):
        if any(job.id == self.bad_id for job in jobs):
            raise ValueError("StudyInstanceUID is missing or empty")
        self.recorded += [job.id for job in jobs]
        return [job.spool_path for job in jobs]

    def complete_only(self, jobs):
        self.completed_only += [job.id for job in jobs]
        self.done.set()
        return [job.spool_path for job in jobs]

    def close(self) -> None:
        pass


def job(job_id: int) -> ClaimedJob:
    return ClaimedJob(job_id, f"1.2.3.{job_id}", f"/spool/{job_id}.dcm", "0" * 64, 10, "PACS", 0, {})


SERVER = ServerConfig(
    name="PACS", ae_title="PACS", host="127.0.0.1", port=104, environment="test", active=True, primary=True,
    deleted=False, comments="", web_url=None, calling_ae=CallingAETitles(), move_routing={},
)


def test_a_bad_instance_is_completed_alone_and_the_batch_is_recorded():
    recorder, spool = CatalogRefusingOne(bad_id=3), RecordingSpool()
    writer = AckWriter(recorder, spool, linger_s=0.05)
    writer.start()
    try:
        writer.submit(SERVER, [job(i) for i in range(1, 6)])
        assert recorder.done.wait(5)
    finally:
        writer.stop(timeout_s=5)
    assert sorted(recorder.recorded) == [1, 2, 4, 5]
    assert recorder.completed_only == [3]
    assert sorted(spool.removed) == sorted(f"/spool/{i}.dcm" for i in range(1, 6))
