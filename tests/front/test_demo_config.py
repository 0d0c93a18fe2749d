"""What the demo writes (scripts/setup_pacs_config.py) is what the router then uses."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from dicomrouter.config import load_config

ROOT = Path(__file__).resolve().parents[2]


def test_demo_config_keeps_catalog_and_spool_beside_it(tmp_path):
    written = subprocess.run(
        [
            sys.executable,
            str(ROOT / "scripts" / "setup_pacs_config.py"),
            "--output",
            "var/dicomrouter.yaml",
        ],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert written.returncode == 0, written.stderr
    config = load_config(tmp_path / "var" / "dicomrouter.yaml")
    assert config.router.catalog == f"sqlite:///{tmp_path}/var/catalog.db"
    assert config.router.spool == tmp_path / "var" / "spool"

    upgraded = subprocess.run(
        [sys.executable, "-m", "dicomrouter", "--config", "var/dicomrouter.yaml", "db", "upgrade"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert upgraded.returncode == 0, upgraded.stderr
    assert (tmp_path / "var" / "catalog.db").is_file()
    assert not (tmp_path / "var" / "var").exists()
