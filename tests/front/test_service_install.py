"""scripts/install-service.sh and config/dicomrouter.service: installed under a temporary root, the unit's
own command lines run as systemd would (umask 0077, its environment), reloaded by SIGHUP, stopped by SIGTERM."""

from __future__ import annotations

import os
import re
import shlex
import shutil
import signal
import site
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from dicomrouter.pacsfarm import free_ports
from tests.support.http_support import http_request, wait_until
from tests.support.router_process import wait_for_port
from tests.support.store_helpers import edit_config

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]


def unit_settings(path: Path) -> dict[str, list[str]]:
    settings: dict[str, list[str]] = {}
    for line in path.read_text().splitlines():
        if "=" in line and not line.startswith(("#", "[")):
            key, _, value = line.partition("=")
            settings.setdefault(key.strip(), []).append(value.strip())
    return settings


def test_unit_file_as_the_issue_asks():
    unit = unit_settings(ROOT / "config" / "dicomrouter.service")
    assert unit["User"] == ["dicomrouter"] and unit["UMask"] == ["0077"]
    assert unit["ProtectSystem"] == ["strict"] and unit["NoNewPrivileges"] == ["yes"]
    assert unit["ReadWritePaths"] == ["/var/lib/dicomrouter"]
    assert unit["ExecReload"] == ["/bin/kill -HUP $MAINPID"]
    assert unit["ExecStartPre"] == [
        "/usr/local/bin/dicomrouter --config /etc/dicomrouter/dicomrouter.yaml db upgrade"
    ]
    assert unit["ExecStart"] == [
        "/usr/local/bin/dicomrouter --config /etc/dicomrouter/dicomrouter.yaml serve"
    ]


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("service-root")
    env = {
        **os.environ,
        "DICOMROUTER_ROOT": str(root),
        "SERVICE_USER": subprocess.run(
            ["id", "-un"], capture_output=True, text=True
        ).stdout.strip(),
        "PYTHON": sys.executable,
        # The test machine has the dependencies: only dicomrouter itself goes into the virtualenv.
        "VENV_ARGS": "--system-site-packages",
        "PIP_ARGS": "--no-deps",
    }
    result = subprocess.run(
        ["bash", str(ROOT / "scripts" / "install-service.sh")],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    if sys.prefix != sys.base_prefix:
        # Run from a virtualenv (scripts/test.sh uses .venv): the dependencies are in it, not in the
        # base Python that --system-site-packages reaches, so the service's venv is pointed at it.
        service_site = next((root / "opt/dicomrouter/lib").glob("python*/site-packages"))
        (service_site / "test-dependencies.pth").write_text("\n".join(site.getsitepackages()) + "\n")
    return root


def test_install_makes_folders_program_config_and_unit(installed):
    root = installed
    assert stat.S_IMODE((root / "etc/dicomrouter").stat().st_mode) == 0o750
    assert stat.S_IMODE((root / "etc/dicomrouter/dicomrouter.yaml").stat().st_mode) == 0o640
    assert stat.S_IMODE((root / "var/lib/dicomrouter").stat().st_mode) == 0o700
    assert (root / "usr/local/bin/dicomrouter").resolve() == (
        root / "opt/dicomrouter/bin/dicomrouter"
    )
    config = (root / "etc/dicomrouter/dicomrouter.yaml").read_text()
    assert f"sqlite:///{root}/var/lib/dicomrouter/catalog.db" in config
    assert f"spool: {root}/var/lib/dicomrouter/spool" in config
    analyze = shutil.which("systemd-analyze")
    if analyze:
        result = subprocess.run(
            [analyze, "verify", str(root / "etc/systemd/system/dicomrouter.service")],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert (
            result.returncode == 0
            and "Unknown" not in result.stderr
            and "ignoring" not in result.stderr
        ), result.stdout + result.stderr


def test_the_units_commands_run_reload_and_stop(installed, tmp_path):
    root = installed
    unit = unit_settings(root / "etc/systemd/system/dicomrouter.service")
    config_path = root / "etc/dicomrouter/dicomrouter.yaml"
    dicom_port, http_port = free_ports(2)

    def change(data):
        data["router"]["host"] = "127.0.0.1"
        data["router"]["port"] = dicom_port
        data["router"]["http"] = {"port": http_port}
        data["router"]["log"] = {"level": "info", "format": "json"}

    edit_config(config_path, change)
    env = dict(os.environ)
    for assignment in unit.get("Environment", []):
        key, _, value = assignment.partition("=")
        env[key] = value
    umask = int(unit["UMask"][0], 8)

    def run_as_systemd(command: str, **kwargs):
        return subprocess.Popen(
            shlex.split(command),
            env=env,
            cwd=unit["WorkingDirectory"][0],
            preexec_fn=lambda: os.umask(umask),
            **kwargs,
        )

    pre = run_as_systemd(
        unit["ExecStartPre"][0], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    output, _ = pre.communicate(timeout=120)
    assert pre.returncode == 0, output
    catalog = root / "var/lib/dicomrouter/catalog.db"
    assert stat.S_IMODE(catalog.stat().st_mode) == 0o600  # UMask=0077

    log_path = tmp_path / "journal.log"
    with open(log_path, "wb") as log:
        main = run_as_systemd(unit["ExecStart"][0], stdout=log, stderr=subprocess.STDOUT)
    try:
        wait_for_port(dicom_port)
        wait_for_port(http_port)
        assert http_request(f"http://127.0.0.1:{http_port}/readyz").status == 200
        reload_command = unit["ExecReload"][0].replace("$MAINPID", str(main.pid))
        assert subprocess.run(shlex.split(reload_command), timeout=10).returncode == 0
        wait_until(lambda: '"config_reloaded"' in log_path.read_text(), timeout=20)
        assert re.search(r'"reason": "SIGHUP"', log_path.read_text())
        assert unit["KillSignal"] == ["SIGTERM"]
        main.send_signal(signal.SIGTERM)
        assert main.wait(timeout=int(unit["TimeoutStopSec"][0])) == 0
    finally:
        if main.poll() is None:
            main.kill()
            main.wait()
    text = log_path.read_text()
    assert text.lstrip().startswith("{"), "router.log.format json is used under the unit"
    for path in (root / "var/lib/dicomrouter").rglob("*"):
        if path.is_file():
            assert stat.S_IMODE(path.stat().st_mode) & 0o077 == 0, path
