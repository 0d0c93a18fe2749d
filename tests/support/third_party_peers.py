"""Other DICOM implementations as peers of the router: how to find them, run them and read their output.

Each tool comes from a Debian package that scripts/install.sh installs. A missing tool skips its test with
the package to install, except under CI, where every peer must be there and a missing one fails the test.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

import pytest

from dicomrouter.pacsfarm import free_ports
from tests.support.router_process import dcmtk, dcmtk_env, wait_for_port

PIXELMED_JAR = Path("/usr/share/java/pixelmed.jar")

# Debian package of each program the tests run.
PACKAGES = {
    "/usr/bin/gdcmscu": "libgdcm-tools",
    "/usr/bin/odil": "odil",
    "/usr/bin/dicom_echo": "ctn",
    "/usr/bin/send_image": "ctn",
    "/usr/bin/javac": "default-jdk-headless",
    "/usr/bin/java": "default-jdk-headless",
    str(PIXELMED_JAR): "libpixelmed-java",
    "/usr/bin/dcmqrscp": "dcmtk",
    "/usr/bin/storescp": "dcmtk",
}


def require(*paths: str) -> None:
    """Skip (fail under CI) unless every file in `paths` is installed."""
    missing = [path for path in paths if not Path(path).exists()]
    if not missing:
        return
    packages = sorted({PACKAGES.get(path, "?") for path in missing})
    reason = f"{', '.join(missing)} not installed (apt-get install {' '.join(packages)}; scripts/install.sh does it)"
    if os.environ.get("CI"):
        pytest.fail(f"CI must run the third-party peer tests, but {reason}")
    pytest.skip(reason)


def run(
    args: Sequence[str], cwd: Path | None = None, timeout: float = 60
) -> subprocess.CompletedProcess:
    """Run a peer with Nagle off (PEERS.md 2); stdout and stderr together in `.stdout`."""
    return subprocess.run(
        list(args),
        cwd=cwd,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        errors="replace",
        env=dcmtk_env(),
        timeout=timeout,
    )


def pynetdicom_app(app: str, *args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    """pynetdicom's own command line apps (`python -m pynetdicom APP`), verbose."""
    return run([sys.executable, "-m", "pynetdicom", app, "-v", *args], cwd=cwd)


def gdcm_responses(output: str) -> set[tuple[int, int]]:
    """(Command Field, Status) of each DIMSE response gdcmscu -D printed.

    gdcmscu prints every command set it receives (several times); it never prints a received identifier."""
    responses = set()
    command = None
    for line in output.splitlines():
        match = re.match(r"\(0000,(0100|0900)\) \?\? \(US\) (\d+)", line)
        if not match:
            continue
        if match.group(1) == "0100":
            command = int(match.group(2))
        elif command is not None:
            responses.add((command, int(match.group(2))))
            command = None
    return responses


C_STORE_RSP, C_FIND_RSP, C_ECHO_RSP = 0x8001, 0x8020, 0x8030
SUCCESS, PENDING = 0x0000, 0xFF00


PIXELMED_SOURCE = """
import com.pixelmed.dicom.*;
import com.pixelmed.network.*;

/** echo | store FILE... | find PATIENT_ID, as a PixelMed SCU: PixelmedPeer OP HOST PORT CALLED CALLING [ARGS] */
public class PixelmedPeer {
    public static void main(String[] args) throws Exception {
        String host = args[1];
        int port = Integer.parseInt(args[2]);
        String called = args[3];
        String calling = args[4];
        if (args[0].equals("echo")) {
            new VerificationSOPClassSCU(host, port, called, calling, false, 0);
            System.out.println("echo done");
        } else if (args[0].equals("store")) {
            SetOfDicomFiles files = new SetOfDicomFiles();
            for (int i = 5; i < args.length; i++) {
                files.add(args[i]);
            }
            new StorageSOPClassSCU(host, port, called, calling, files, 0, new MultipleInstanceTransferStatusHandler() {
                public void updateStatus(int remaining, int completed, int failed, int warning, String uid) {
                    System.out.println("stored " + uid + " completed=" + completed + " failed=" + failed
                        + " warning=" + warning);
                }
            }, 0);
        } else if (args[0].equals("find")) {
            AttributeList keys = new AttributeList();
            Attribute level = new CodeStringAttribute(TagFromName.QueryRetrieveLevel);
            level.addValue("STUDY");
            keys.put(level);
            Attribute patient = new LongStringAttribute(TagFromName.PatientID);
            patient.addValue(args[5]);
            keys.put(patient);
            keys.put(new UniqueIdentifierAttribute(TagFromName.StudyInstanceUID));
            new FindSOPClassSCU(host, port, called, calling, SOPClass.StudyRootQueryRetrieveInformationModelFind,
                keys, new IdentifierHandler() {
                    public void doSomethingWithIdentifier(AttributeList answer) throws DicomException {
                        System.out.println("study " + Attribute.getSingleStringValueOrEmptyString(
                            answer, TagFromName.StudyInstanceUID));
                    }
                }, 0);
            System.out.println("find done");
        }
    }
}
"""


def compile_pixelmed_peer(folder: Path) -> list[str]:
    """Compile the PixelMed SCU into `folder`; returns the java command line that runs it."""
    require("/usr/bin/javac", "/usr/bin/java", str(PIXELMED_JAR))
    source = folder / "PixelmedPeer.java"
    source.write_text(PIXELMED_SOURCE)
    result = run(
        ["/usr/bin/javac", "-nowarn", "-cp", str(PIXELMED_JAR), "-d", str(folder), str(source)],
        timeout=120,
    )
    assert result.returncode == 0, result.stdout
    return ["/usr/bin/java", "-cp", f"{PIXELMED_JAR}:{folder}", "PixelmedPeer"]


class Dcmqrscp:
    """DCMTK's dcmqrscp as a second, independent PACS (PEERS.md 12) on a free port.

    It forks one child per association (`--single-process` exits after the first one), so it runs in a
    process group of its own, stopped as a whole."""

    def __init__(
        self,
        folder: Path,
        ae_title: str,
        peers: Sequence[tuple[str, str, int]],
        options: Sequence[str] = (),
    ):
        self.folder = folder
        self.ae_title = ae_title
        self.options = list(options)  # e.g. --disable-get: a PACS that only moves
        self.port = free_ports(1)[0]
        self.process: subprocess.Popen | None = None
        storage = self.storage = folder / "storage"
        storage.mkdir(parents=True, exist_ok=True)
        hosts = [
            f"peer{index} = ({ae}, {host}, {port})" for index, (ae, host, port) in enumerate(peers)
        ]
        self.config = folder / "dcmqrscp.cfg"
        self.config.write_text(
            "\n".join(
                [
                    f"NetworkTCPPort = {self.port}",
                    "MaxPDUSize = 16384",
                    "MaxAssociations = 16",
                    "",
                    "HostTable BEGIN",
                    *hosts,
                    "HostTable END",
                    "",
                    "VendorTable BEGIN",
                    "VendorTable END",
                    "",
                    "AETable BEGIN",
                    f"{ae_title} {storage} RW (200, 1024mb) ANY",
                    "AETable END",
                    "",
                ]
            )
        )
        self.log_path = folder / "dcmqrscp.log"

    def start(self) -> Dcmqrscp:
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(
                [dcmtk("dcmqrscp"), "-v", *self.options, "-c", str(self.config)],
                stdout=log,
                stderr=subprocess.STDOUT,
                env=dcmtk_env(),
                start_new_session=True,
            )
        wait_for_port(self.port)
        return self

    def stop(self) -> None:
        if self.process is None:
            return
        try:
            # Its own group: the server and the children serving associations.
            os.killpg(self.process.pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(timeout=10)

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""


class StoreScp:
    """DCMTK's storescp as a workstation that receives C-MOVE results into a folder."""

    def __init__(self, folder: Path, ae_title: str, port: int):
        self.folder = folder
        self.ae_title = ae_title
        self.port = port
        self.process: subprocess.Popen | None = None
        self.log_path = folder.parent / f"{folder.name}.log"

    def start(self) -> StoreScp:
        self.folder.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(
                [
                    dcmtk("storescp"),
                    "-v",
                    "-aet",
                    self.ae_title,
                    "-od",
                    str(self.folder),
                    str(self.port),
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
                env=dcmtk_env(),
            )
        wait_for_port(self.port)
        return self

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            self.process.wait(timeout=10)
