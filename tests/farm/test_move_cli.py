"""`dicomrouter routes show` and `dicomrouter move` against the real Orthanc farm."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from dicomrouter.cli.main import cli
from tests.support.find_support import upload_study
from tests.support.move_support import received_sop_uids, workstation

pytestmark = pytest.mark.slow

def run_cli(config_path, *args):
    return CliRunner().invoke(cli, ["--config", str(config_path), *args], catch_exceptions=False)


def test_routes_show_prints_the_grid(farm_config):
    result = run_cli(farm_config, "routes", "show")
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert "Test PACS 1" in lines[0] and "WORKSTATION" in lines[0]
    row = next(line for line in lines if line.startswith("Prod PACS 1"))
    assert "TEST_PACS_1" in row and "WORKSTATION" in row


def test_move_command_between_pacs_updates_catalog(farm_config, clean_orthanc_farm):
    study = upload_study(clean_orthanc_farm[0], images=3)
    result = run_cli(farm_config, "move", study["study"], "--to", "Test PACS 2")
    assert result.exit_code == 0, result.output
    assert "3 completed, 0 failed" in result.output
    assert set(study["sops"]) <= set(clean_orthanc_farm[1].instance_sop_uids())
    again = run_cli(farm_config, "catalog", "where", study["study"])
    assert "Test PACS 2" in again.output, again.output
    audit = run_cli(farm_config, "audit", "--json", "--study", study["study"])
    rows = json.loads(audit.stdout)
    assert [(r["operation"], r["outcome"], r["servers"], r["counts"]["completed"]) for r in rows] == [
        ("move", "success", ["Test PACS 1"], 3)
    ]
    assert rows[0]["node"].startswith("cli ") and "to Test PACS 2" in rows[0]["detail"]


def test_move_command_to_workstation_from_one_server(
    farm_config, clean_orthanc_farm, workstation_port, tmp_path
):
    study = upload_study(clean_orthanc_farm[2], images=2)
    with workstation(workstation_port, tmp_path / "ws") as folder:
        result = run_cli(
            farm_config, "move", study["study"], "--to", "WORKSTATION", "--from", "Prod PACS 1"
        )
    assert result.exit_code == 0, result.output
    assert received_sop_uids(folder) == set(study["sops"])


def test_move_command_unknown_destination(farm_config):
    result = run_cli(farm_config, "move", "1.2.3", "--to", "NOBODY")
    assert result.exit_code == 1
    assert "unknown destination 'NOBODY'" in result.output
