"""A farm of real local Orthanc servers for development, demos, tests and benchmarks."""

from __future__ import annotations

import argparse
import atexit
import base64
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

ORTHANC_BINARY = Path("/usr/sbin/Orthanc")
HTTP_USER = "test"
HTTP_PASSWORD = "test123"
# Demo and router default ports: never handed out by free_ports().
RESERVED_PORTS = frozenset({*range(4242, 4247), *range(8042, 8047), 11112})

Peer = tuple[str, str, int]  # (AE title, host, DICOM port) for Orthanc's DicomModalities

# Settings shared by every farm server (Orthanc 1.10 key names).
BASE_CONFIG: dict[str, Any] = {
    "DicomServerEnabled": True,
    "HttpServerEnabled": True,
    "DicomCheckCalledAet": False,
    "DicomCheckModalityHost": False,
    **{
        f"DicomAlwaysAllow{op}": True
        for op in ("Echo", "Store", "Find", "FindWorklist", "Get", "Move")
    },
    "RemoteAccessAllowed": True,
    "AuthenticationEnabled": True,
    "RegisteredUsers": {HTTP_USER: HTTP_PASSWORD},
    "StableAge": 1,
    "SaveJobs": False,
    "DicomAssociationCloseDelay": 0,
    # A re-sent SOP Instance UID replaces the old copy (the router's duplicate_policy: overwrite).
    "OverwriteInstances": True,
    "ConcurrentJobs": 4,
    "Plugins": [],
}


class OrthancError(RuntimeError):
    """An Orthanc server could not be started, stopped or queried."""


class PortBusyError(OrthancError):
    """A TCP port an Orthanc server needs is already in use."""


@dataclass
class OrthancSpec:
    """Identity and ports of one Orthanc server."""

    name: str
    ae_title: str
    dicom_port: int
    http_port: int
    environment: str = "test"

    @property
    def slug(self) -> str:
        """Folder name for this server's data, e.g. ``test-pacs-1``."""
        return "-".join(self.name.lower().split())


DEMO_FARM: tuple[OrthancSpec, ...] = (
    OrthancSpec("Test PACS 1", "TEST_PACS_1", 4242, 8042, "test"),
    OrthancSpec("Test PACS 2", "TEST_PACS_2", 4243, 8043, "test"),
    OrthancSpec("Prod PACS 1", "PROD_PACS_1", 4245, 8045, "prod"),
    OrthancSpec("Prod PACS 2", "PROD_PACS_2", 4246, 8046, "prod"),
)

_handed_out: set[int] = set()
_handed_out_lock = threading.Lock()


def port_is_free(port: int) -> bool:
    """True if nothing listens on `port` (checked by binding it on all interfaces)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(("", port))
        except OSError:
            return False
    return True


def free_ports(count: int, exclude: Sequence[int] = ()) -> list[int]:
    """`count` distinct free TCP ports, never reserved ones nor ones handed out before in this process."""
    avoid = set(exclude) | RESERVED_PORTS
    held: list[socket.socket] = []
    ports: list[int] = []
    try:
        with _handed_out_lock:
            while len(ports) < count:
                sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
                held.append(sock)
                sock.bind(("", 0))
                port = sock.getsockname()[1]
                if port not in avoid and port not in _handed_out and port not in ports:
                    ports.append(port)
            _handed_out.update(ports)
    finally:
        for sock in held:
            sock.close()
    return ports


def _proc_cmdline(pid: int) -> str:
    try:
        return (
            Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        )
    except OSError:
        return ""


_LIVE: set[OrthancServer] = set()  # attached servers, stopped at exit if a caller forgot


@atexit.register
def _stop_leftovers() -> None:
    """Stop attached servers still running when Python exits."""
    for server in list(_LIVE):
        server.stop()


class OrthancServer:
    """One Orthanc process with its own config, data, log and pid file under `data_dir`."""

    def __init__(
        self,
        spec: OrthancSpec,
        data_dir: Path | str,
        peers: Sequence[Peer] = (),
        *,
        host: str = "127.0.0.1",
        binary: Path | str = ORTHANC_BINARY,
        extra_config: dict[str, Any] | None = None,
    ) -> None:
        self.spec = spec
        self.data_dir = Path(data_dir).absolute()
        self.peers = list(peers)
        self.host = host
        self.binary = str(binary)
        self.extra_config = dict(extra_config or {})
        self.config_path = self.data_dir / "orthanc.json"
        self.log_path = self.data_dir / "orthanc.log"
        self.pid_path = self.data_dir / "orthanc.pid"
        self._proc: subprocess.Popen[bytes] | None = None

    def __repr__(self) -> str:
        return f"<OrthancServer {self.spec.ae_title} dicom={self.spec.dicom_port} http={self.spec.http_port}>"

    @property
    def url(self) -> str:
        """Base URL of the REST API and Orthanc Explorer."""
        return f"http://{self.host}:{self.spec.http_port}"

    def config(self) -> dict[str, Any]:
        """The Orthanc JSON configuration for this server."""
        config = {
            **BASE_CONFIG,
            "Name": self.spec.name,
            "StorageDirectory": str(self.data_dir / "storage"),
            "IndexDirectory": str(self.data_dir / "index"),
            "DicomAet": self.spec.ae_title,
            "DicomPort": self.spec.dicom_port,
            "HttpPort": self.spec.http_port,
            "DicomModalities": {ae: [ae, host, port] for ae, host, port in self.peers},
        }
        config.update(self.extra_config)
        return config

    def write_config(self) -> Path:
        """Write the JSON configuration into the data dir."""
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.config_path.write_text(json.dumps(self.config(), indent=2) + "\n", encoding="utf-8")
        return self.config_path

    @property
    def pid(self) -> int | None:
        """Process id of the running Orthanc (this object's child or the one in the pid file)."""
        if self._proc is not None:
            return self._proc.pid if self._proc.poll() is None else None
        try:
            pid = int(self.pid_path.read_text().strip())
        except (OSError, ValueError):
            return None
        cmdline = _proc_cmdline(pid)
        return pid if "Orthanc" in cmdline and str(self.config_path) in cmdline else None

    def is_running(self) -> bool:
        """True while the Orthanc process is alive."""
        return self.pid is not None

    def check_ports(self) -> None:
        """Raise PortBusyError if the DICOM or HTTP port is in use."""
        for kind, port in (("DICOM", self.spec.dicom_port), ("HTTP", self.spec.http_port)):
            if not port_is_free(port):
                raise PortBusyError(f"{self.spec.name}: {kind} port {port} is already in use")

    def start(self, timeout: float = 30.0, detach: bool = False) -> None:
        """Start Orthanc and wait until GET /system reports our AE title; `detach` outlives this process."""
        if self.is_running():
            raise OrthancError(f"{self.spec.name} is already running (pid {self.pid})")
        self.check_ports()
        if not os.access(self.binary, os.X_OK):
            raise OrthancError(f"Orthanc binary {self.binary} not found (apt-get install orthanc)")
        self.write_config()
        with open(self.log_path, "ab") as log:
            self._proc = subprocess.Popen(
                [self.binary, str(self.config_path)],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=self.data_dir,
                env={**os.environ, "TCP_NODELAY": "1"},
                start_new_session=detach,
            )
        self.pid_path.write_text(f"{self._proc.pid}\n")
        if not detach:
            _LIVE.add(self)
        try:
            self.wait_until_ready(timeout)
        except BaseException:
            self.stop()
            raise

    def wait_until_ready(self, timeout: float = 30.0) -> None:
        """Poll GET /system until it answers with this server's AE title."""
        deadline = time.monotonic() + timeout
        while True:
            if self._proc is not None and self._proc.poll() is not None:
                tail = self.log_tail()
                error = PortBusyError if "already in use" in tail else OrthancError
                raise error(f"{self.spec.name} exited with code {self._proc.returncode}:\n{tail}")
            try:
                aet = self.system(timeout=1.0).get("DicomAet")
            except urllib.error.HTTPError as exc:
                raise OrthancError(f"{self.url}/system: HTTP {exc.code}, a stray server?") from None
            except (OSError, ValueError):
                aet = None
            else:
                if aet != self.spec.ae_title:
                    raise OrthancError(f"{self.url} answers as {aet!r}, not {self.spec.ae_title!r}")
                return
            if time.monotonic() > deadline:
                raise OrthancError(f"{self.spec.name}: no answer from {self.url} in {timeout} s")
            time.sleep(0.05)

    def log_tail(self, lines: int = 15) -> str:
        """The last lines of the Orthanc log."""
        try:
            text = self.log_path.read_text(encoding="utf-8", errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])

    def stop(self, timeout: float = 15.0) -> None:
        """SIGTERM, wait up to `timeout` s, then SIGKILL; no-op if not running."""
        pid = self.pid
        if pid is not None:
            try:
                os.kill(pid, signal.SIGTERM)
                if not self._wait_exit(pid, timeout):
                    os.kill(pid, signal.SIGKILL)
                    self._wait_exit(pid, 5.0)
            except ProcessLookupError:
                pass
        if self._proc is not None:
            self._proc.wait(timeout=5.0)  # reap our child
            self._proc = None
        _LIVE.discard(self)
        self.pid_path.unlink(missing_ok=True)

    @staticmethod
    def _wait_exit(pid: int, timeout: float) -> bool:
        """Poll until `pid` is no longer an Orthanc (gone, or a zombie without cmdline)."""
        deadline = time.monotonic() + timeout
        while "Orthanc" in _proc_cmdline(pid):
            if time.monotonic() > deadline:
                return False
            time.sleep(0.05)
        return True

    # ------------------------------------------------------------------ REST

    def request(
        self,
        method: str,
        path: str,
        body: bytes | None = None,
        content_type: str = "application/json",
        timeout: float = 60.0,
    ) -> bytes:
        """One authenticated REST call; returns the response body."""
        token = base64.b64encode(f"{HTTP_USER}:{HTTP_PASSWORD}".encode()).decode()
        headers = {"Authorization": f"Basic {token}"}
        if body is not None:
            headers["Content-Type"] = content_type
        req = urllib.request.Request(self.url + path, data=body, method=method, headers=headers)
        with urllib.request.urlopen(req, timeout=timeout) as response:
            return response.read()

    def get_json(self, path: str, timeout: float = 60.0) -> Any:
        """GET `path` and decode the JSON answer."""
        return json.loads(self.request("GET", path, timeout=timeout))

    def post_json(self, path: str, payload: Any) -> Any:
        """POST a JSON body (or raw text if `payload` is str) and decode the JSON answer."""
        body = payload.encode() if isinstance(payload, str) else json.dumps(payload).encode()
        return json.loads(self.request("POST", path, body))

    def system(self, timeout: float = 60.0) -> dict[str, Any]:
        """GET /system."""
        return self.get_json("/system", timeout=timeout)

    def statistics(self) -> dict[str, Any]:
        """GET /statistics (CountStudies, CountInstances, ...)."""
        return self.get_json("/statistics")

    def study_uids(self) -> list[str]:
        """StudyInstanceUID of every stored study."""
        return [s["MainDicomTags"]["StudyInstanceUID"] for s in self.get_json("/studies?expand")]

    def instance_count(self) -> int:
        """Number of stored instances."""
        return int(self.statistics()["CountInstances"])

    def instance_sop_uids(self) -> list[str]:
        """SOPInstanceUID of every stored instance."""
        return [i["MainDicomTags"]["SOPInstanceUID"] for i in self.get_json("/instances?expand")]

    def upload(self, data: bytes) -> dict[str, Any]:
        """POST /instances with one DICOM file; returns Orthanc's answer (ID, Status, ...)."""
        return json.loads(self.request("POST", "/instances", data, "application/dicom"))

    def download_instance(self, sop_instance_uid: str) -> bytes:
        """The stored DICOM file of one instance; KeyError if absent."""
        for hit in self.post_json("/tools/lookup", sop_instance_uid):
            if hit.get("Type") == "Instance":
                return self.request("GET", f"/instances/{hit['ID']}/file")
        raise KeyError(f"{self.spec.ae_title} has no instance {sop_instance_uid}")

    def delete_all(self) -> None:
        """Delete every patient (hence every study and instance)."""
        for patient in self.get_json("/patients"):
            self.request("DELETE", f"/patients/{patient}")

    def wait_for_instance_count(self, count: int, timeout: float = 30.0) -> int:
        """Poll until at least `count` instances are stored; returns the final count."""
        deadline = time.monotonic() + timeout
        while (found := self.instance_count()) < count and time.monotonic() < deadline:
            time.sleep(0.05)
        return found


def _parallel(
    servers: Sequence[OrthancServer], action: Callable[[OrthancServer], None]
) -> list[BaseException]:
    """Run `action` on every server in its own thread; returns the exceptions raised."""
    if not servers:
        return []
    with ThreadPoolExecutor(max_workers=len(servers), thread_name_prefix="orthanc") as pool:
        futures = [pool.submit(action, server) for server in servers]
    return [exc for future in futures if (exc := future.exception()) is not None]


class OrthancFarm:
    """Several OrthancServers started and stopped together, in parallel."""

    def __init__(self, servers: Sequence[OrthancServer]) -> None:
        self.servers = list(servers)

    def __iter__(self) -> Iterator[OrthancServer]:
        return iter(self.servers)

    def __len__(self) -> int:
        return len(self.servers)

    def __getitem__(self, key: int | str) -> OrthancServer:
        """A server by index, name or AE title."""
        if isinstance(key, int):
            return self.servers[key]
        for server in self.servers:
            if key in (server.spec.name, server.spec.ae_title):
                return server
        raise KeyError(key)

    def start_all(self, timeout: float = 30.0, detach: bool = False) -> None:
        """Start the servers not running yet, in parallel; on any failure stop those and raise."""
        todo = [server for server in self.servers if not server.is_running()]
        for server in todo:  # fail before starting anything
            server.check_ports()
        errors = _parallel(todo, lambda s: s.start(timeout, detach))
        if errors:
            _parallel(todo, lambda s: s.stop())
            busy = [e for e in errors if isinstance(e, PortBusyError)]
            raise (busy or errors)[0]

    def stop_all(self, timeout: float = 15.0) -> None:
        """Stop every server in parallel."""
        errors = _parallel(self.servers, lambda s: s.stop(timeout))
        if errors:
            raise errors[0]

    def __enter__(self) -> OrthancFarm:
        self.start_all()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop_all()

    @classmethod
    def build(
        cls,
        specs: Sequence[OrthancSpec],
        base_dir: Path | str,
        extra_peers: Sequence[Peer] = (),
        host: str = "127.0.0.1",
    ) -> OrthancFarm:
        """Servers in `base_dir/<slug>`, each knowing all the others plus `extra_peers`."""
        base = Path(base_dir)
        everyone = [(s.ae_title, host, s.dicom_port) for s in specs] + list(extra_peers)
        return cls(
            [
                OrthancServer(
                    s, base / s.slug, [p for p in everyone if p[0] != s.ae_title], host=host
                )
                for s in specs
            ]
        )

    @classmethod
    def demo(cls, base_dir: Path | str, extra_peers: Sequence[Peer] = ()) -> OrthancFarm:
        """The four demo servers on their well-known ports."""
        return cls.build(DEMO_FARM, base_dir, extra_peers)

    @classmethod
    def on_free_ports(
        cls,
        base_dir: Path | str,
        environments: Sequence[str] = ("test", "test", "prod", "prod"),
        extra_peers: Sequence[Peer] = (),
        exclude: Sequence[int] = (),
    ) -> OrthancFarm:
        """Servers named like the demo ones (Test PACS 1, ...), one per environment, on free ports."""
        ports = free_ports(2 * len(environments), exclude=[*exclude, *(p[2] for p in extra_peers)])
        specs = []
        for index, env in enumerate(environments):
            n = environments[: index + 1].count(env)
            name, ae = f"{env.capitalize()} PACS {n}", f"{env.upper()}_PACS_{n}"
            specs.append(OrthancSpec(name, ae, ports[2 * index], ports[2 * index + 1], env))
        return cls.build(specs, base_dir, extra_peers)


def start_free_farm(
    base_dir: Path | str,
    environments: Sequence[str] = ("test", "test", "prod", "prod"),
    extra_peers: Sequence[Peer] = (),
    attempts: int = 3,
    timeout: float = 30.0,
) -> OrthancFarm:
    """Start a farm on free ports, picking new ports if one was taken meanwhile; returns it started."""
    for attempt in range(attempts):
        farm = OrthancFarm.on_free_ports(base_dir, environments, extra_peers)
        try:
            farm.start_all(timeout)
            return farm
        except PortBusyError:
            if attempt == attempts - 1:
                raise
    raise AssertionError("unreachable")


# ---------------------------------------------------------------------- CLI


def _ports(text: str | None, default: list[int]) -> list[int]:
    """Parse a comma-separated list of one port per demo server."""
    ports = [int(p) for p in text.split(",")] if text else default
    if len(ports) != len(DEMO_FARM):
        raise SystemExit(f"error: give {len(DEMO_FARM)} comma-separated ports, not {text!r}")
    return ports


def _demo_from_args(args: argparse.Namespace) -> OrthancFarm:
    """The demo farm with the ports and peers given on the command line."""
    dicom = _ports(args.dicom_ports, [s.dicom_port for s in DEMO_FARM])
    http = _ports(args.http_ports, [s.http_port for s in DEMO_FARM])
    specs = []
    for spec, dport, hport in zip(DEMO_FARM, dicom, http, strict=True):
        written = Path(args.base_dir) / spec.slug / "orthanc.json"
        if args.command in ("status", "stop", "clean") and written.exists():
            config = json.loads(written.read_text())  # report the ports it was started with
            dport, hport = config["DicomPort"], config["HttpPort"]
        specs.append(replace(spec, dicom_port=dport, http_port=hport))
    peers = [(args.router_ae, args.router_host, args.router_port)]
    if args.workstation_port:
        peers.append((args.workstation_ae, args.workstation_host, args.workstation_port))
    return OrthancFarm.build(specs, args.base_dir, peers)


def _status(farm: OrthancFarm) -> int:
    """Print one line per server; 0 if all are up, else 3."""
    down = 0
    for server in farm:
        spec, state, studies = server.spec, "down", "-"
        if server.is_running():
            try:
                studies, state = str(server.statistics()["CountStudies"]), "up"
            except (OSError, ValueError):
                state = "starting?"
        down += state != "up"
        print(
            f"{spec.name:<12} {spec.ae_title:<12} {state:<9} dicom {spec.dicom_port:<5} "
            f"http {spec.http_port:<5} studies {studies:<5} {server.url}/app/explorer.html"
        )
    return 3 if down else 0


def main(argv: Sequence[str] | None = None) -> int:
    """Command line: start|status|stop|restart|clean the four demo servers, detached."""
    parser = argparse.ArgumentParser(
        prog="python -m dicomrouter.pacsfarm", description=main.__doc__
    )
    parser.add_argument("command", choices=["start", "status", "stop", "restart", "clean"])
    parser.add_argument("--base-dir", required=True, help="one sub-folder of data per server")
    parser.add_argument("--router-ae", default="DICOMROUTER")
    parser.add_argument("--router-host", default="127.0.0.1")
    parser.add_argument("--router-port", type=int, default=11112)
    parser.add_argument("--workstation-ae", default="WORKSTATION")
    parser.add_argument("--workstation-host", default="127.0.0.1")
    parser.add_argument("--workstation-port", type=int, default=11113, help="0: no workstation")
    parser.add_argument("--dicom-ports", help="4 comma-separated ports (4242,4243,4245,4246)")
    parser.add_argument("--http-ports", help="4 comma-separated ports (8042,8043,8045,8046)")
    parser.add_argument("--timeout", type=float, default=30.0, help="seconds per server")
    args = parser.parse_args(argv)
    farm = _demo_from_args(args)
    try:
        if args.command in ("stop", "restart", "clean"):
            farm.stop_all()
            print(f"stopped {len(farm)} servers")
        if args.command == "clean":
            for server in farm:
                shutil.rmtree(server.data_dir, ignore_errors=True)
            print(f"removed the data in {Path(args.base_dir).absolute()}")
        if args.command in ("start", "restart"):
            count = sum(not server.is_running() for server in farm)
            farm.start_all(args.timeout, detach=True)
            print(f"started {count} servers; web login {HTTP_USER}/{HTTP_PASSWORD}")
        if args.command in ("start", "restart", "status"):
            return _status(farm)
    except OrthancError as exc:
        busy = isinstance(exc, PortBusyError)
        hint = (
            " (the Debian orthanc service uses 4242/8042: systemctl stop orthanc)" if busy else ""
        )
        print(f"error: {exc}{hint}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    signal.signal(signal.SIGPIPE, signal.SIG_DFL)  # `status | head` exits quietly
    sys.exit(main())
