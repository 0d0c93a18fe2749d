"""`clients` edits (validated, comments kept), `access explain`, and the audit rows CLI edits leave."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from dicomrouter.cli.main import cli
from dicomrouter.config import load_config
from tests.unit.test_registry_cli import COMMENTED_YAML, leftovers


def run(config_path: Path, *args: str):
    return CliRunner().invoke(cli, ["--config", str(config_path), *args], catch_exceptions=False)


@pytest.fixture
def commented(tmp_path: Path) -> Path:
    path = tmp_path / "dicomrouter.yaml"
    path.write_text(COMMENTED_YAML, encoding="utf-8")
    return path


def clients_json(path: Path) -> dict[str, dict]:
    result = run(path, "clients", "list", "--json")
    assert result.exit_code == 0, result.output
    return {item["ae_title"]: item for item in json.loads(result.stdout)}


# ----------------------------------------------------------------------------- clients


def test_list_shows_roles_and_defaults(commented):
    result = run(commented, "clients", "list")
    assert result.exit_code == 0, result.output
    line = next(line for line in result.stdout.splitlines() if line.startswith("WORKSTATION"))
    assert "127.0.0.1" in line and "11113" in line and "test_read, test_write" in line and "(default)" in line
    assert clients_json(commented)["WORKSTATION"]["roles"] == ["test_read", "test_write"]


def test_add_edit_remove_keep_the_rest_of_the_file(commented):
    result = run(
        commented, "clients", "add", "CT_SCANNER", "--host", "127.0.0.1", "--roles", "test_write,prod_write",
        "--move-destinations", "Test PACS 1",
    )
    assert result.exit_code == 0, result.output
    assert "added client 'CT_SCANNER'" in result.stdout
    added = (
        "  - ae_title: CT_SCANNER\n    host: 127.0.0.1\n    roles: [test_write, prod_write]\n"
        "    move_destinations: [Test PACS 1]\n"
    )
    head, tail = COMMENTED_YAML.split("\nrouter:")
    assert commented.read_text(encoding="utf-8") == head.rstrip("\n") + "\n" + added + "\nrouter:" + tail
    client = clients_json(commented)["CT_SCANNER"]
    assert client["roles"] == ["prod_write", "test_write"] and client["move_destinations"] == ["Test PACS 1"]

    result = run(commented, "clients", "edit", "WORKSTATION", "--roles", "test_read,prod_read", "--port", "11114")
    assert result.exit_code == 0, result.output
    text = commented.read_text(encoding="utf-8")
    assert "  - roles: [test_read, prod_read]    # flow style kept\n" in text  # the comment keeps its column
    assert "    port: 11114\n" in text
    assert "    move_destinations: [Test PACS 1]\n" in text  # the other client is untouched

    assert run(commented, "clients", "edit", "CT_SCANNER", "--clear", "move_destinations").exit_code == 0
    assert clients_json(commented)["CT_SCANNER"]["move_destinations"] is None
    assert run(commented, "clients", "remove", "CT_SCANNER").exit_code == 0
    expected = COMMENTED_YAML.replace("[test_read, test_write]   #", "[test_read, prod_read]    #").replace(
        "    port: 11113\n", "    port: 11114\n"
    )
    assert commented.read_text(encoding="utf-8") == expected
    assert leftovers(commented.parent) == []


@pytest.mark.parametrize(
    ("args", "key", "message"),
    [
        (["add", "CT1", "--roles", "test_wrte"], "clients[1].roles", "did you mean 'test_write'"),
        (["add", "CT1", "--port", "70000"], "clients[1].port", "not a valid TCP port"),
        (["add", "BAD\\AE"], "clients[1].ae_title", "backslash"),
        (["add", "CT1", "--query-servers", "Nope PACS"], "clients[1].query_servers", "not a server name"),
        (["edit", "WORKSTATION", "--move-destinations", "NOWHERE"], "clients[0].move_destinations", "NOWHERE"),
    ],
    ids=["bad-role", "bad-port", "bad-ae", "unknown-server", "unknown-destination"],
)
def test_invalid_results_are_refused_with_exit_2_and_the_key_path(commented, args, key, message):
    result = run(commented, "clients", *args)
    assert result.exit_code == 2, result.output
    assert "refused, the result would be invalid" in result.output
    assert key in result.output and message in result.output
    assert "Traceback" not in result.output
    assert commented.read_text(encoding="utf-8") == COMMENTED_YAML
    assert leftovers(commented.parent) == []


def test_removing_a_client_a_server_still_routes_to_is_refused(tmp_path):
    path = tmp_path / "dicomrouter.yaml"
    path.write_text(
        COMMENTED_YAML.replace("    active: true   # keep it on\n", "    active: true   # keep it on\n"
                               "    move_routing: {WORKSTATION: WS_AT_PACS1}\n"),
        encoding="utf-8",
    )
    before = path.read_bytes()
    result = run(path, "clients", "remove", "WORKSTATION")
    assert result.exit_code == 2, result.output
    assert "servers[0].move_routing.WORKSTATION" in result.output
    assert path.read_bytes() == before


def test_other_refusals_exit_1(commented):
    duplicate = run(commented, "clients", "add", "WORKSTATION")
    assert duplicate.exit_code == 1 and "already exists" in duplicate.output
    unknown = run(commented, "clients", "edit", "NOPE", "--port", "1")
    assert unknown.exit_code == 1 and "no client with AE title 'NOPE'" in unknown.output
    nothing = run(commented, "clients", "edit", "WORKSTATION")
    assert nothing.exit_code == 1 and "nothing to change" in nothing.output
    assert commented.read_text(encoding="utf-8") == COMMENTED_YAML


# ----------------------------------------------------------------------------- audit of CLI edits


def test_cli_edits_are_audit_rows(commented):
    assert run(commented, "db", "upgrade").exit_code == 0
    assert run(commented, "clients", "add", "CT1", "--roles", "test_write").exit_code == 0
    assert run(commented, "servers", "edit", "Prod PACS 1", "--port", "4999").exit_code == 0
    assert run(commented, "clients", "edit", "CT1", "--roles", "bogus").exit_code == 2  # refused: no row
    result = run(commented, "audit", "--json", "--operation", "config")
    assert result.exit_code == 0, result.output
    rows = json.loads(result.stdout)
    assert [(r["outcome"], r["servers"]) for r in rows] == [("changed", []), ("changed", ["Prod PACS 1"])]
    assert rows[0]["detail"].startswith("added client 'CT1'") and str(commented) in rows[0]["detail"]
    assert rows[1]["detail"].startswith("edited server 'Prod PACS 1': port")
    assert all(r["node"].startswith("cli ") for r in rows)


def test_an_edit_stands_when_the_audit_row_cannot_be_written(commented):
    # No `db upgrade`: the catalog has no schema, the change is still made.
    result = run(commented, "clients", "add", "CT1")
    assert result.exit_code == 0, result.output
    assert "not in the audit trail" in result.output
    assert "CT1" in clients_json(commented)


# ----------------------------------------------------------------------------- access explain


@pytest.fixture
def explained(commented) -> Path:
    for args in (
        ["clients", "add", "CT1", "--host", "127.0.0.1", "--roles", "test_write"],
        ["clients", "add", "VIEWER", "--host", "127.0.0.1", "--port", "4000", "--roles", "test_read,prod_read",
         "--move-destinations", "VIEWER"],
        ["clients", "add", "BOSS", "--roles", "admin"],
    ):
        assert run(commented, *args).exit_code == 0
    return commented


def explain(path: Path, *args: str) -> dict:
    result = run(path, "access", "explain", *args, "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    report["by_server"] = {s["name"]: s for s in report["servers"]}
    return report


def test_explain_a_writer_that_may_not_read(explained):
    report = explain(explained, "CT1")
    assert report["accepted"] and report["roles"] == ["test_write"] and report["address"] == "127.0.0.1"
    test, prod = report["by_server"]["Test PACS 1"], report["by_server"]["Prod PACS 1"]
    assert (test["echo"]["allowed"], test["store"]["allowed"], test["find"]["allowed"]) == (True, True, False)
    assert test["find"]["why"] == "needs test_read (or admin)"
    assert prod["store"] == {"allowed": False, "why": "needs prod_write (or admin): refused with 0x0124"}
    assert prod["retrieve"]["allowed"] is False
    # Without move_destinations: itself (not a destination: no port) and the servers it may write to.
    assert [d["name"] for d in report["move_destinations"]] == ["Test PACS 1"]
    assert "Prod PACS 1" in [d["name"] for d in report["refused_move_destinations"]]


def test_explain_listed_move_destinations_and_admin(explained):
    viewer = explain(explained, "VIEWER")
    assert [d["name"] for d in viewer["move_destinations"]] == ["VIEWER"]
    assert viewer["by_server"]["Prod PACS 1"]["find"]["allowed"] is True
    assert viewer["by_server"]["Prod PACS 1"]["move_to"]["why"].startswith("not in its move_destinations")
    boss = explain(explained, "BOSS", "--host", "10.9.8.7")
    assert boss["address"] == "10.9.8.7" and boss["accepted"]
    assert all(s[op]["allowed"] for s in boss["servers"] for op in ("store", "find", "retrieve", "move_to"))
    assert {d["why"] for d in boss["move_destinations"]} == {"admin"}


def test_explain_text_and_rejections(explained):
    result = run(explained, "access", "explain", "CT1")
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert lines[0] == "CT1 calling from 127.0.0.1: association accepted (known client)"
    header = next(line for line in lines if line.startswith("server"))
    assert header.split() == ["server", "env", "echo", "store", "find", "move/get", "from", "move", "to"]
    prod_row = next(line for line in lines if line.startswith("Prod PACS 1 "))
    assert prod_row.split()[3:] == ["prod", "yes", "no", "no", "no", "no"]
    assert "    store: no, needs prod_write (or admin): refused with 0x0124" in lines
    assert any(line.startswith("C-MOVE destinations allowed: Test PACS 1") for line in lines)

    wrong_host = run(explained, "access", "explain", "CT1", "--host", "10.1.2.3")
    assert "association REJECTED (client 'CT1' must call from 127.0.0.1, not 10.1.2.3)" in wrong_host.stdout
    stranger = run(explained, "access", "explain", "STRANGER")
    assert "association REJECTED (calling AE title 'STRANGER' is not a configured client)" in stranger.stdout
    assert "may do nothing" in stranger.stdout


def test_explain_follows_accept_unknown_callers(explained):
    text = explained.read_text(encoding="utf-8").replace(
        "  host: 127.0.0.1\n  catalog", "  host: 127.0.0.1\n  accept_unknown_callers: true\n  catalog"
    )
    explained.write_text(text, encoding="utf-8")
    assert load_config(explained).router.accept_unknown_callers
    report = explain(explained, "STRANGER")
    assert report["accepted"] and report["kind"] == "unknown"
    assert report["roles"] == ["test_read", "test_write"]  # router.unknown_caller_roles default
    assert report["by_server"]["Prod PACS 1"]["find"]["allowed"] is False
