"""Helpers for tests of the HTTP port: plain HTTP requests with urllib, Basic and Bearer credentials."""

from __future__ import annotations

import base64
import json
import urllib.error
import urllib.request
from contextlib import contextmanager
from dataclasses import dataclass


@dataclass
class Reply:
    status: int
    headers: dict[str, str]
    body: bytes

    def json(self):
        return json.loads(self.body)

    @property
    def text(self) -> str:
        return self.body.decode("utf-8", "replace")


def basic(user: str, password: str) -> dict[str, str]:
    value = base64.b64encode(f"{user}:{password}".encode()).decode()
    return {"Authorization": f"Basic {value}"}


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def http_request(
    url: str,
    headers: dict[str, str] | None = None,
    method: str = "GET",
    data: bytes | None = None,
    timeout: float = 10.0,
    context=None,
) -> Reply:
    """One request; HTTP errors are replies too (status, headers, body)."""
    request = urllib.request.Request(url, headers=headers or {}, method=method, data=data)
    try:
        with urllib.request.urlopen(request, timeout=timeout, context=context) as response:
            return Reply(response.status, dict(response.headers), response.read())
    except urllib.error.HTTPError as exc:
        return Reply(exc.code, dict(exc.headers), exc.read())


def metric_samples(text: str) -> dict[tuple[str, frozenset], float]:
    """Prometheus text -> {(sample name, labels): value}."""
    from prometheus_client.parser import text_string_to_metric_families

    samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples[(sample.name, frozenset(sample.labels.items()))] = sample.value
    return samples


def metric(samples: dict, name: str, **labels: str) -> float | None:
    return samples.get((name, frozenset(labels.items())))


def destination_lines(text: str, destination: str) -> list[str]:
    """The /metrics lines about one destination (for logs and reports)."""
    return [line for line in text.splitlines() if f'destination="{destination}"' in line]


def wait_until(predicate, timeout: float = 30.0, interval: float = 0.1):
    """Poll `predicate` until it returns something true; return that (or raise after `timeout`)."""
    import time

    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout}s")
        time.sleep(interval)


def instances(folder, count: int) -> list[str]:
    """`count` small CT instances of one new study, written under `folder`; their paths."""
    from pydicom.uid import generate_uid

    from tests.support.orthanc_fixtures import make_test_instance, write_instance

    study_uid, series_uid = generate_uid(), generate_uid()
    return [
        str(
            write_instance(
                folder / f"{i:03d}.dcm",
                make_test_instance(study_uid, series_uid, instance_number=i + 1),
            )
        )
        for i in range(count)
    ]


@contextmanager
def http_router(config_path, router_port: int, change=None):
    """`serve` on `config_path` with fast retries and its HTTP port (C-ECHO watch every second); yields
    (RouterProcess, base URL); always stopped. `change(data)` edits the config first."""
    from dicomrouter.pacsfarm import free_ports
    from tests.support.router_process import RouterProcess, wait_for_port
    from tests.support.store_helpers import edit_config, fast_retries

    (http_port,) = free_ports(1)

    def edit(data):
        fast_retries(data)
        data["router"]["http"] = {"host": "127.0.0.1", "port": http_port, "health_interval": 1}
        if change is not None:
            change(data)

    edit_config(config_path, edit)
    router = RouterProcess(config_path, router_port).start()
    try:
        wait_for_port(http_port)
        yield router, f"http://127.0.0.1:{http_port}"
    finally:
        router.stop()
