"""scripts/install.sh puts dicomrouter in the checkout's own virtual environment, quickly on a re-run."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
VENV = ROOT / ".venv"


def install() -> subprocess.CompletedProcess:
    return subprocess.run(
        ["bash", str(ROOT / "scripts" / "install.sh")], capture_output=True, text=True, timeout=1200
    )


@pytest.mark.slow  # the first run in a checkout creates .venv and installs from the package index
def test_install_uses_the_checkouts_venv_and_is_quick_on_a_rerun():
    first = install()
    assert first.returncode == 0, first.stderr
    assert (VENV / "pyvenv.cfg").is_file()
    where = subprocess.run(
        [
            str(VENV / "bin" / "python"),
            "-I",
            "-c",
            "import dicomrouter; print(dicomrouter.__file__)",
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert where.returncode == 0, where.stderr
    assert Path(where.stdout.strip()) == ROOT / "dicomrouter" / "__init__.py"
    version = subprocess.run(
        [str(VENV / "bin" / "dicomrouter"), "--version"], capture_output=True, text=True, timeout=60
    )
    assert version.returncode == 0 and "dicomrouter" in version.stdout

    again = install()
    assert again.returncode == 0, again.stderr
    assert "installing" not in again.stderr  # nothing changed: neither apt nor pip ran
    ignored = subprocess.run(["git", "check-ignore", "-q", ".venv"], cwd=ROOT, timeout=60)
    assert ignored.returncode == 0, ".venv must not be committed"
