"""The server registry through the real CLI: listing, validated edits, invariants, comments kept."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from dicomrouter.cli.main import cli
from dicomrouter.config import load_config
from tests.support.configs import base_document, write_document

THIRD_SERVER = {
    "name": "Test PACS 2", "ae_title": "TEST_PACS_2", "host": "127.0.0.1", "port": 4243,
    "environment": "test", "active": True, "primary": False, "deleted": False,
    "comments": "second test archive",
}


def run(config_path: Path, *args: str):
    result = CliRunner().invoke(cli, ["--config", str(config_path), *args], catch_exceptions=False)
    return result


def servers_json(config_path: Path, *extra: str) -> dict[str, dict]:
    result = run(config_path, "servers", "list", "--json", *extra)
    assert result.exit_code == 0, result.output
    return {item["name"]: item for item in json.loads(result.stdout)}


@pytest.fixture
def config_path(tmp_path: Path) -> Path:
    document = base_document()
    document["servers"].append(dict(THIRD_SERVER))
    return write_document(tmp_path / "dicomrouter.yaml", document)


@pytest.fixture
def catalog_ready(config_path: Path) -> Path:
    """The config's catalog created (`db upgrade`) and its servers mirrored."""
    result = run(config_path, "db", "upgrade")
    assert result.exit_code == 0, result.output
    return config_path


def seed_studies(config_path: Path, server_name: str, count: int) -> None:
    from dicomrouter.cli.common import open_catalog

    config = load_config(config_path)
    catalog = open_catalog(config, must_exist=True)
    catalog.sync_servers(config)
    for index in range(count):
        catalog.record_study_seen(server_name, f"1.2.826.0.1.3680043.10.999.{index + 1}", "found")


def leftovers(folder: Path) -> list[str]:
    """Files an interrupted atomic write would leave (temporary copies of the YAML)."""
    return sorted(p.name for p in folder.iterdir() if p.name.startswith(".") or p.suffix == ".tmp")


# ----------------------------------------------------------------------------- listing


def test_list_shows_live_servers_with_flags(config_path):
    result = run(config_path, "servers", "list")
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert lines[0].split()[:3] == ["name", "ae_title", "address"]
    body = "\n".join(lines[2:])
    for name, ae in (("Test PACS 1", "TEST_PACS_1"), ("Prod PACS 1", "PROD_PACS_1"), ("Test PACS 2", "TEST_PACS_2")):
        assert name in body and ae in body
    assert "127.0.0.1:4242" in body
    assert "second test archive" in body
    primary_line = next(line for line in lines if line.startswith("Test PACS 1"))
    assert "*" in primary_line


def test_list_json_fields_and_all(config_path, catalog_ready):
    seed_studies(config_path, "Test PACS 1", 2)
    servers = servers_json(config_path)
    assert list(servers) == ["Test PACS 1", "Prod PACS 1", "Test PACS 2"]
    first = servers["Test PACS 1"]
    assert first["ae_title"] == "TEST_PACS_1"
    assert (first["host"], first["port"], first["environment"]) == ("127.0.0.1", 4242, "test")
    assert first["active"] is True and first["primary"] is True and first["deleted"] is False
    assert first["studies"] == 2
    assert servers["Prod PACS 1"]["studies"] == 0

    # A soft-deleted server only shows with --all.
    seed_studies(config_path, "Test PACS 2", 1)
    assert run(config_path, "servers", "delete", "Test PACS 2").exit_code == 0
    assert "Test PACS 2" not in servers_json(config_path)
    everything = servers_json(config_path, "--all")
    assert everything["Test PACS 2"]["deleted"] is True
    assert everything["Test PACS 2"]["active"] is False


def test_show_one_server_and_unknown_name(config_path):
    result = run(config_path, "servers", "show", "Test PACS 2")
    assert result.exit_code == 0, result.output
    assert "ae_title: TEST_PACS_2" in result.stdout
    assert "port: 4243" in result.stdout
    assert "comments: second test archive" in result.stdout
    missing = run(config_path, "servers", "show", "Nope")
    assert missing.exit_code != 0
    assert "no server named 'Nope'" in missing.output


# ----------------------------------------------------------------------------- add / edit


def test_servers_are_named_by_name_or_ae_title(config_path, catalog_ready):
    result = run(config_path, "servers", "show", "TEST_PACS_2")
    assert result.exit_code == 0, result.output
    assert "name: Test PACS 2" in result.stdout
    result = run(config_path, "servers", "deactivate", "PROD_PACS_1")
    assert result.exit_code == 0, result.output
    assert "server 'Prod PACS 1' is now inactive" in result.stdout
    assert servers_json(config_path)["Prod PACS 1"]["active"] is False
    assert run(config_path, "servers", "activate", "PROD_PACS_1").exit_code == 0
    result = run(config_path, "queue", "suspend", "TEST_PACS_2")
    assert result.exit_code == 0, result.output
    assert "Test PACS 2 suspended" in result.output
    assert run(config_path, "queue", "resume", "TEST_PACS_2").exit_code == 0
    result = run(config_path, "servers", "delete", "TEST_PACS_2")
    assert result.exit_code == 0, result.output
    assert "Test PACS 2" not in servers_json(config_path, "--all")


def test_client_server_lists_take_ae_titles_and_keep_names(config_path):
    result = run(
        config_path, "clients", "add", "CT_SCANNER", "--roles", "test_read,test_write",
        "--query-servers", "TEST_PACS_2,Test PACS 1", "--move-destinations", "TEST_PACS_1,WORKSTATION",
    )
    assert result.exit_code == 0, result.output
    config = load_config(config_path)
    client = config.client("CT_SCANNER")
    assert client.query_servers == ("Test PACS 2", "Test PACS 1")
    assert client.move_destinations == ("Test PACS 1", "WORKSTATION")


@pytest.mark.parametrize(
    ("args", "refusal"),
    [
        (["servers", "show", "TEST_PACS2"], "no server named 'TEST_PACS2'"),
        (["servers", "deactivate", "TEST_PACS2"], "no server named 'TEST_PACS2'"),
        (["echo", "TEST_PACS2"], "no server named 'TEST_PACS2'"),
        (["find", "--server", "TEST_PACS2"], "no server named 'TEST_PACS2'"),
        (["move", "1.2.3", "--from", "TEST_PACS2", "--to", "Test PACS 1"], "no server named 'TEST_PACS2'"),
        (["move", "1.2.3", "--to", "TEST_PACS2"], "unknown destination 'TEST_PACS2'"),
        (["queue", "suspend", "TEST_PACS2"], "no server named 'TEST_PACS2'"),
    ],
    ids=["show", "deactivate", "echo", "find", "move from", "move to", "queue suspend"],
)
def test_an_unknown_server_gets_a_did_you_mean(config_path, args, refusal):
    result = run(config_path, *args)
    assert result.exit_code == 1
    assert refusal in result.output
    assert "did you mean 'TEST_PACS_2'?" in result.output


def test_add_server_appears_and_file_stays_valid(config_path):
    result = run(
        config_path, "servers", "add", "Prod PACS 2", "--ae-title", "PROD_PACS_2", "--host", "127.0.0.1",
        "--port", "4246", "--environment", "prod", "--comments", "MR only",
    )
    assert result.exit_code == 0, result.output
    assert "added server 'Prod PACS 2'" in result.stdout
    added = servers_json(config_path)["Prod PACS 2"]
    assert (added["ae_title"], added["port"], added["environment"]) == ("PROD_PACS_2", 4246, "prod")
    assert added["active"] is True and added["primary"] is False and added["comments"] == "MR only"
    assert load_config(config_path).server("Prod PACS 2") is not None
    assert leftovers(config_path.parent) == []


def test_add_with_primary_moves_the_flag(config_path):
    result = run(
        config_path, "servers", "add", "New Primary", "--ae-title", "NEW_PRIMARY", "--host", "127.0.0.1",
        "--port", "4300", "--environment", "prod", "--primary",
    )
    assert result.exit_code == 0, result.output
    servers = servers_json(config_path)
    assert servers["New Primary"]["primary"] is True
    assert [name for name, s in servers.items() if s["primary"]] == ["New Primary"]


@pytest.mark.parametrize(
    ("args", "reason"),
    [
        (["Other", "--ae-title", "PROD_PACS_1", "--host", "127.0.0.1", "--port", "4300", "--environment", "prod"],
         "PROD_PACS_1"),
        (["Prod PACS 1", "--ae-title", "OTHER_AE", "--host", "127.0.0.1", "--port", "4300", "--environment", "prod"],
         "already exists"),
        (["Other", "--ae-title", "BAD\\AE", "--host", "127.0.0.1", "--port", "4300", "--environment", "prod"],
         "ae_title"),
        (["Other", "--ae-title", "OTHER_AE", "--host", "127.0.0.1", "--port", "70000", "--environment", "prod"],
         "port"),
    ],
    ids=["duplicate-ae", "duplicate-name", "bad-ae", "bad-port"],
)
def test_add_refused_with_reason_file_unchanged(config_path, args, reason):
    before = config_path.read_bytes()
    result = run(config_path, "servers", "add", *args)
    assert result.exit_code != 0
    assert reason in result.output
    assert "Traceback" not in result.output
    assert config_path.read_bytes() == before
    assert leftovers(config_path.parent) == []


def test_add_duplicate_ae_names_the_problem(config_path):
    result = run(
        config_path, "servers", "add", "Other", "--ae-title", "PROD_PACS_1", "--host", "127.0.0.1",
        "--port", "4300", "--environment", "prod",
    )
    assert result.exit_code == 2  # an invalid result is a configuration error, as for clients
    assert "refused" in result.output
    assert "servers[3].ae_title" in result.output and "already used by servers[1]" in result.output


def test_add_requires_the_address_fields(config_path):
    result = run(config_path, "servers", "add", "Other", "--ae-title", "OTHER_AE")
    assert result.exit_code == 2
    assert "--host" in result.output and "--port" in result.output and "--environment" in result.output


def test_edit_changes_only_given_fields(config_path):
    result = run(config_path, "servers", "edit", "Prod PACS 1", "--port", "4999", "--comments", "moved")
    assert result.exit_code == 0, result.output
    server = servers_json(config_path)["Prod PACS 1"]
    assert (server["port"], server["comments"]) == (4999, "moved")
    assert (server["ae_title"], server["host"], server["environment"]) == ("PROD_PACS_1", "127.0.0.1", "prod")
    assert server["retrieve"] == "auto"


def test_edit_sets_how_the_router_retrieves(config_path):
    result = run(config_path, "servers", "edit", "Prod PACS 1", "--retrieve", "move")
    assert result.exit_code == 0, result.output
    assert servers_json(config_path)["Prod PACS 1"]["retrieve"] == "move"
    assert load_config(config_path).server("Prod PACS 1").retrieve == "move"
    refused = run(config_path, "servers", "edit", "Prod PACS 1", "--retrieve", "c-move")
    assert refused.exit_code == 2 and "'c-move' is not one of" in refused.output


def test_edit_rename_and_refusals(config_path):
    assert run(config_path, "servers", "edit", "Test PACS 2", "--rename", "Archive").exit_code == 0
    assert "Archive" in servers_json(config_path)
    before = config_path.read_bytes()
    clash = run(config_path, "servers", "edit", "Archive", "--ae-title", "TEST_PACS_1")
    assert clash.exit_code != 0 and "TEST_PACS_1" in clash.output
    nothing = run(config_path, "servers", "edit", "Archive")
    assert nothing.exit_code != 0 and "nothing to change" in nothing.output
    unknown = run(config_path, "servers", "edit", "Nope", "--port", "1234")
    assert unknown.exit_code != 0 and "no server named 'Nope'" in unknown.output
    assert config_path.read_bytes() == before


# ----------------------------------------------------------------------------- flags


def test_activate_and_deactivate(config_path):
    result = run(config_path, "servers", "deactivate", "Prod PACS 1")
    assert result.exit_code == 0, result.output
    assert servers_json(config_path)["Prod PACS 1"]["active"] is False
    assert run(config_path, "servers", "activate", "Prod PACS 1").exit_code == 0
    assert servers_json(config_path)["Prod PACS 1"]["active"] is True


def test_deactivating_the_primary_is_refused(config_path):
    before = config_path.read_bytes()
    result = run(config_path, "servers", "deactivate", "Test PACS 1")
    assert result.exit_code != 0
    assert "primary" in result.output
    assert config_path.read_bytes() == before


def test_deactivating_the_last_active_server_is_refused(tmp_path):
    document = base_document()
    document["servers"][1]["active"] = False
    path = write_document(tmp_path / "dicomrouter.yaml", document)
    assert run(path, "servers", "set-primary", "Prod PACS 1").exit_code != 0  # inactive
    result = run(path, "servers", "deactivate", "Test PACS 1")
    assert result.exit_code != 0


def test_set_primary_moves_the_flag(config_path):
    result = run(config_path, "servers", "set-primary", "Prod PACS 1")
    assert result.exit_code == 0, result.output
    servers = servers_json(config_path)
    assert servers["Prod PACS 1"]["primary"] is True
    assert servers["Test PACS 1"]["primary"] is False
    # The old primary may now be deactivated.
    assert run(config_path, "servers", "deactivate", "Test PACS 1").exit_code == 0


def test_set_primary_refused_for_an_inactive_server(config_path):
    assert run(config_path, "servers", "deactivate", "Prod PACS 1").exit_code == 0
    before = config_path.read_bytes()
    result = run(config_path, "servers", "set-primary", "Prod PACS 1")
    assert result.exit_code != 0
    assert "inactive" in result.output
    assert config_path.read_bytes() == before
    assert servers_json(config_path)["Test PACS 1"]["primary"] is True


# ----------------------------------------------------------------------------- delete / restore


def test_delete_without_studies_removes_from_file(config_path, catalog_ready):
    result = run(config_path, "servers", "delete", "Test PACS 2")
    assert result.exit_code == 0, result.output
    assert "removed" in result.stdout
    assert "Test PACS 2" not in config_path.read_text()
    assert "Test PACS 2" not in servers_json(config_path, "--all")


def test_delete_with_studies_is_soft_with_the_count(config_path, catalog_ready):
    seed_studies(config_path, "Test PACS 2", 3)
    result = run(config_path, "servers", "delete", "Test PACS 2")
    assert result.exit_code == 0, result.output
    assert "soft-deleted" in result.stdout and "3 studies" in result.stdout
    server = servers_json(config_path, "--all")["Test PACS 2"]
    assert server["deleted"] is True and server["active"] is False
    assert server["studies"] == 3
    # A deleted server cannot be activated or made primary until restored.
    assert run(config_path, "servers", "activate", "Test PACS 2").exit_code != 0
    assert run(config_path, "servers", "set-primary", "Test PACS 2").exit_code != 0

    restored = run(config_path, "servers", "restore", "Test PACS 2")
    assert restored.exit_code == 0, restored.output
    server = servers_json(config_path)["Test PACS 2"]
    assert server["deleted"] is False and server["active"] is False
    assert run(config_path, "servers", "activate", "Test PACS 2").exit_code == 0
    assert run(config_path, "servers", "restore", "Test PACS 2").exit_code != 0  # not deleted


def test_delete_the_primary_is_refused(config_path, catalog_ready):
    before = config_path.read_bytes()
    result = run(config_path, "servers", "delete", "Test PACS 1")
    assert result.exit_code != 0 and "primary" in result.output
    assert config_path.read_bytes() == before


def test_delete_without_a_catalog_keeps_the_server(config_path):
    result = run(config_path, "servers", "delete", "Test PACS 2")
    assert result.exit_code == 0, result.output
    assert servers_json(config_path, "--all")["Test PACS 2"]["deleted"] is True


# ----------------------------------------------------------------------------- comments kept

COMMENTED_YAML = """\
# dicomrouter for the radiology department
# owner: PACS team

servers:   # the archives behind the router

  # the main CT archive
  - primary: true
    name: Test PACS 1      # friendly name
    port: 4242
    ae_title: TEST_PACS_1
    host: 127.0.0.1
    environment: test
    active: true   # keep it on

  - environment: prod
    ae_title: PROD_PACS_1  # upper case on purpose
    name: Prod PACS 1
    host: 127.0.0.1

    port: 4245
    comments: "MR; do not route CT here"   # quoted on purpose
    active: true

clients:
  - roles: [test_read, test_write]   # flow style kept
    ae_title: WORKSTATION
    port: 11113
    host: 127.0.0.1

router:
  port: 11199
  ae_title: DICOMROUTER
  # a comment inside the router block
  host: 127.0.0.1
  catalog: sqlite:///var/catalog.db
  spool: var/spool

routes: []   # no store rules yet
# trailing comment at the end of the file
"""


def test_edit_keeps_comments_blank_lines_and_key_order(tmp_path):
    path = tmp_path / "dicomrouter.yaml"
    path.write_text(COMMENTED_YAML, encoding="utf-8")

    assert run(path, "servers", "edit", "Prod PACS 1", "--port", "4999").exit_code == 0
    expected = COMMENTED_YAML.replace("    port: 4245\n", "    port: 4999\n")
    assert path.read_text(encoding="utf-8") == expected

    assert run(path, "servers", "edit", "Prod PACS 1", "--comments", "CT too").exit_code == 0
    # ruamel keeps an end-of-line comment at its column when the value gets shorter.
    expected = expected.replace(
        'comments: "MR; do not route CT here"   # quoted', 'comments: "CT too"' + " " * 21 + "# quoted"
    )
    assert path.read_text(encoding="utf-8") == expected

    assert run(path, "servers", "set-primary", "Prod PACS 1").exit_code == 0
    text = path.read_text(encoding="utf-8")
    assert "  - primary: false\n" in text
    # The new flag is appended to the server's keys; nothing else moves.
    assert text.replace("  - primary: false\n", "  - primary: true\n").replace(
        "    active: true\n    primary: true\n", "    active: true\n"
    ) == expected

    assert run(path, "servers", "deactivate", "Test PACS 1").exit_code == 0
    text = path.read_text(encoding="utf-8")
    assert "    active: false  # keep it on\n" in text  # the comment keeps its column
    lines = text.splitlines()
    comments = [line[line.index("#"):] for line in lines if "#" in line]
    assert comments == [line[line.index("#"):] for line in COMMENTED_YAML.splitlines() if "#" in line]
    assert [line for line in lines if not line.strip()] == [
        line for line in COMMENTED_YAML.splitlines() if not line.strip()
    ]
    assert leftovers(tmp_path) == []


def test_add_and_delete_keep_the_rest_of_the_file(tmp_path):
    path = tmp_path / "dicomrouter.yaml"
    path.write_text(COMMENTED_YAML, encoding="utf-8")
    result = run(
        path, "servers", "add", "Extra", "--ae-title", "EXTRA", "--host", "127.0.0.1", "--port", "4300",
        "--environment", "test",
    )
    assert result.exit_code == 0, result.output
    added = (
        "  - name: Extra\n    ae_title: EXTRA\n    host: 127.0.0.1\n    port: 4300\n"
        "    environment: test\n    active: true\n    primary: false\n    deleted: false\n"
    )
    # The new entry goes after the last server; the blank line before `clients:` stays put.
    head, tail = COMMENTED_YAML.split("\nclients:")
    assert path.read_text(encoding="utf-8") == head.rstrip("\n") + "\n" + added + "\nclients:" + tail

    # Without a catalog the delete is soft; with none recorded it is removed: both keep comments.
    assert run(path, "db", "upgrade").exit_code == 0
    assert run(path, "servers", "delete", "Extra").exit_code == 0
    assert path.read_text(encoding="utf-8") == COMMENTED_YAML
    assert leftovers(tmp_path) == []


def test_refused_edit_leaves_the_file_byte_identical(tmp_path):
    path = tmp_path / "dicomrouter.yaml"
    path.write_text(COMMENTED_YAML, encoding="utf-8")
    result = run(path, "servers", "edit", "Prod PACS 1", "--ae-title", "TEST_PACS_1")
    assert result.exit_code != 0
    assert path.read_text(encoding="utf-8") == COMMENTED_YAML
    assert leftovers(tmp_path) == []


def test_atomic_write_keeps_mode_and_leaves_no_temp_file(config_path):
    config_path.chmod(0o640)
    inode_before = config_path.stat().st_ino
    assert run(config_path, "servers", "edit", "Prod PACS 1", "--comments", "x").exit_code == 0
    assert config_path.stat().st_mode & 0o777 == 0o640
    assert config_path.stat().st_ino != inode_before  # replaced by rename, not rewritten in place
    assert leftovers(config_path.parent) == []


def test_config_check_summary(config_path):
    result = run(config_path, "config", "check")
    assert result.exit_code == 0, result.output
    assert f"{config_path}: valid" in result.stdout
    assert "primary: Test PACS 1" in result.stdout
