"""Config validation: each broken file gets a message naming the key and the fix, exit 2."""

from __future__ import annotations

import pytest
from click.testing import CliRunner

from dicomrouter.cli import main as _main  # noqa: F401  (the console script's entry)
from dicomrouter.cli.main import cli
from dicomrouter.config import ConfigError, load_config
from tests.support.configs import base_document, write_document


def _broken(mutate):
    document = base_document()
    mutate(document)
    return document


def _set(path, value):
    def mutate(document):
        target = document
        for key in path[:-1]:
            target = target[key]
        target[path[-1]] = value

    return mutate


def _two_primaries(document):
    document["servers"][1]["primary"] = True


def _no_primary(document):
    document["servers"][0]["primary"] = False


def _inactive_primary(document):
    document["servers"][0]["active"] = False


def _deleted_active(document):
    document["servers"][1]["deleted"] = True


def _deleted_primary(document):
    document["servers"][0].update(deleted=True, active=False)
    document["servers"][1]["primary"] = True


def _none_active(document):
    document["servers"][1]["active"] = False
    document["servers"][0]["active"] = False


def _duplicate_name(document):
    document["servers"][1]["name"] = "Test PACS 1"


def _duplicate_ae(document):
    document["servers"][1]["ae_title"] = "TEST_PACS_1"


def _bad_move_routing(document):
    document["servers"][0]["move_routing"] = {"Nowhere PACS": "NOWHERE"}


def _bad_route_destination(document):
    document["routes"] = [{"name": "CT", "match": {"Modality": "CT"}, "destinations": ["Test PACS 9"]}]


BROKEN = [
    ("port too big", _set(["servers", 1, "port"], 70000), "servers[1].port", "70000 is not a valid TCP port"),
    ("port text", _set(["router", "port"], "eleven"), "router.port", "not a valid TCP port"),
    ("AE too long", _set(["servers", 0, "ae_title"], "A" * 17), "servers[0].ae_title", "1 to 16"),
    ("AE backslash", _set(["router", "ae_title"], "BAD\\AE"), "router.ae_title", "backslash"),
    ("AE spaces", _set(["clients", 0, "ae_title"], "    "), "clients[0].ae_title", "all spaces"),
    ("AE control", _set(["servers", 0, "ae_title"], "BAD\x01"), "servers[0].ae_title", "control"),
    ("environment", _set(["servers", 0, "environment"], "staging"), "servers[0].environment", "use test or prod"),
    ("role", _set(["clients", 0, "roles"], ["test_reed"]), "clients[0].roles", "did you mean 'test_read'"),
    ("two primaries", _two_primaries, "servers", "2 servers are primary"),
    ("no primary", _no_primary, "servers", "no server is primary"),
    ("inactive primary", _inactive_primary, "servers[0].active", "primary server 'Test PACS 1' is inactive"),
    ("deleted but active", _deleted_active, "servers[1].active", "deleted but active"),
    ("deleted primary", _deleted_primary, "servers[0].primary", "deleted but primary"),
    ("none active", _none_active, "servers", "no server is active"),
    ("duplicate name", _duplicate_name, "servers[1].name", "already used by servers[0]"),
    ("duplicate AE", _duplicate_ae, "servers[1].ae_title", "already used by servers[0]"),
    ("move routing", _bad_move_routing, "servers[0].move_routing.Nowhere PACS", "neither a server name"),
    ("route destination", _bad_route_destination, "routes[0].destinations", "'Test PACS 9' is not a server name"),
    ("missing host", lambda d: d["servers"][0].pop("host"), "servers[0].host", "is required"),
    ("bool as text", _set(["servers", 0, "active"], "yes"), "servers[0].active", "expected true or false"),
    ("duplicate policy", _set(["router", "duplicate_policy"], "keep"), "router.duplicate_policy", "overwrite or reject"),
    ("keep_done", _set(["router", "forwarding"], {"keep_done": "soon"}), "router.forwarding.keep_done",
     "not a positive duration"),
    ("audit keep_days", _set(["router", "audit"], {"keep_days": 0}), "router.audit.keep_days",
     "not a positive number of days"),
    ("retrieve mode", _set(["servers", 1, "retrieve"], "c-move"), "servers[1].retrieve",
     "use get (C-GET), move (C-MOVE to the router) or auto"),
]


@pytest.mark.parametrize(("label", "mutate", "key", "message"), BROKEN, ids=[b[0] for b in BROKEN])
def test_broken_file_names_key_and_fix(tmp_path, label, mutate, key, message):
    path = write_document(tmp_path / "router.yaml", _broken(mutate))
    with pytest.raises(ConfigError) as caught:
        load_config(path)
    problems = {p.key: p for p in caught.value.problems}
    assert key in problems, caught.value.render()
    assert message in problems[key].message or message in problems[key].fix, caught.value.render()
    assert problems[key].fix, "every problem says how to fix it"

    result = CliRunner().invoke(cli, ["--config", str(path), "config", "check"])
    assert result.exit_code == 2
    assert str(path) in result.output
    assert key in result.output
    assert "Traceback" not in result.output


def test_yaml_syntax_error_names_line(tmp_path):
    path = tmp_path / "router.yaml"
    path.write_text("router:\n  ae_title: X\n servers: [\n")
    result = CliRunner().invoke(cli, ["--config", str(path), "config", "check"])
    assert result.exit_code == 2
    assert "line" in result.output and str(path) in result.output
    assert "Traceback" not in result.output


def test_missing_file_is_exit_2(tmp_path):
    result = CliRunner().invoke(cli, ["--config", str(tmp_path / "nope.yaml"), "config", "check"])
    assert result.exit_code == 2
    assert "file not found" in result.output


def _with_typos(tmp_path):
    document = base_document()
    document["router"]["acept_unknown_callers"] = True
    document["servers"][1]["enviroment"] = "prod"
    return write_document(tmp_path / "router.yaml", document)


def test_unknown_key_is_an_error_with_suggestion(tmp_path):
    path = _with_typos(tmp_path)
    with pytest.raises(ConfigError) as caught:
        load_config(path)
    problems = {p.key: p for p in caught.value.problems}
    assert "did you mean 'accept_unknown_callers'" in problems["router.acept_unknown_callers"].fix
    assert "did you mean 'environment'" in problems["servers[1].enviroment"].fix
    result = CliRunner().invoke(cli, ["--config", str(path), "config", "check"])
    assert result.exit_code == 2
    assert str(path) in result.output and "valid" not in result.output.replace("invalid", "")
    assert "router.acept_unknown_callers: unknown key" in result.output
    assert "did you mean 'environment'" in result.output


@pytest.mark.parametrize(
    "args",
    [
        ["clients", "add", "CT_SCANNER", "--roles", "test_write"],
        ["servers", "deactivate", "Prod PACS 1"],
        ["serve"],
    ],
    ids=["clients add", "servers deactivate", "serve"],
)
def test_unknown_key_refuses_edits_and_serve(tmp_path, args):
    path = _with_typos(tmp_path)
    before = path.read_bytes()
    result = CliRunner().invoke(cli, ["--config", str(path), *args])
    assert result.exit_code == 2, result.output
    assert "router.acept_unknown_callers" in result.output
    assert "did you mean 'accept_unknown_callers'" in result.output
    assert "Traceback" not in result.output
    assert result.exception is None or isinstance(result.exception, SystemExit), result.exception
    assert path.read_bytes() == before


# Every command that reads the file, the edits included: a broken file is one clean message, exit 2.
EVERY_COMMAND = [
    ["config", "check"],
    ["serve"],
    ["db", "upgrade"],
    ["db", "backup", "copy.db"],
    ["servers", "list"],
    ["servers", "show", "Test PACS 1"],
    ["servers", "add", "X", "--ae-title", "X", "--host", "h", "--port", "1", "--environment", "test"],
    ["servers", "edit", "Test PACS 1", "--port", "4000"],
    ["servers", "activate", "Test PACS 1"],
    ["servers", "deactivate", "Test PACS 1"],
    ["servers", "set-primary", "Test PACS 1"],
    ["servers", "delete", "Test PACS 1"],
    ["servers", "restore", "Test PACS 1"],
    ["clients", "list"],
    ["clients", "add", "CT_SCANNER"],
    ["clients", "edit", "WORKSTATION", "--port", "4000"],
    ["clients", "remove", "WORKSTATION"],
    ["clients", "token", "WORKSTATION"],
    ["access", "explain", "WORKSTATION"],
    ["echo", "Test PACS 1"],
    ["health"],
    ["catalog", "where", "1.2.3"],
    ["queue", "list"],
    ["find", "-k", "PatientName=*"],
    ["move", "1.2.3", "--to", "Test PACS 1"],
    ["routes", "show"],
    ["audit"],
]


@pytest.mark.parametrize("args", EVERY_COMMAND, ids=[" ".join(a[:2]) for a in EVERY_COMMAND])
def test_yaml_syntax_error_is_exit_2_for_every_command(tmp_path, args):
    path = tmp_path / "router.yaml"
    text = "router:\n  ae_title: X\n servers: [\n"
    path.write_text(text)
    result = CliRunner().invoke(cli, ["--config", str(path), *args])
    assert result.exit_code == 2, result.output
    assert result.exception is None or isinstance(result.exception, SystemExit), result.exception
    assert str(path) in result.output and "line 3" in result.output and "fix:" in result.output
    assert path.read_text() == text


def test_config_check_masks_the_catalog_password(tmp_path):
    document = base_document()
    document["router"]["catalog"] = "postgresql+psycopg://router:s3cret-pw@127.0.0.1:5432/test"
    path = write_document(tmp_path / "router.yaml", document)
    result = CliRunner().invoke(cli, ["--config", str(path), "config", "check"])
    assert result.exit_code == 0, result.output
    assert "postgresql+psycopg://router:***@127.0.0.1:5432/test" in result.output
    assert "s3cret" not in result.output


def test_relative_paths_follow_the_file(tmp_path):
    path = write_document(tmp_path / "router.yaml", base_document())
    config = load_config(path)
    assert config.router.spool == tmp_path / "var" / "spool"
    assert config.router.catalog == f"sqlite:///{tmp_path}/var/catalog.db"


def test_example_config_is_valid():
    from pathlib import Path

    config = load_config(Path(__file__).resolve().parents[2] / "config" / "dicomrouter.example.yaml")
    assert config.primary.name == "Test PACS 1"


def test_config_env_var(tmp_path, monkeypatch):
    path = write_document(tmp_path / "router.yaml", base_document())
    monkeypatch.setenv("DICOMROUTER_CONFIG", str(path))
    result = CliRunner().invoke(cli, ["config", "check"])
    assert result.exit_code == 0, result.output
    assert "primary: Test PACS 1" in result.output


def test_retention_keys(tmp_path):
    document = base_document()
    document["router"]["forwarding"] = {"keep_done": "12h"}
    document["router"]["audit"] = {"keep_days": 30}
    config = load_config(write_document(tmp_path / "router.yaml", document))
    assert config.router.forwarding.keep_done_s == 12 * 3600
    assert config.router.audit.keep_days == 30
    document["router"]["forwarding"] = {"keep_done": 600}
    assert load_config(write_document(tmp_path / "router.yaml", document)).router.forwarding.keep_done_s == 600
    defaults = load_config(write_document(tmp_path / "defaults.yaml", base_document())).router
    assert (defaults.forwarding.keep_done_s, defaults.audit.keep_days) == (7 * 86400, 365)


def test_retrieve_mode_defaults_to_auto(tmp_path):
    document = base_document()
    document["servers"][1]["retrieve"] = "move"
    config = load_config(write_document(tmp_path / "dicomrouter.yaml", document))
    assert [server.retrieve for server in config.servers][:2] == ["auto", "move"]


def test_http_cors_origins_are_checked_and_kept(tmp_path):
    document = base_document()
    document["router"]["http"] = {"cors_origins": ["https://Viewer.example:3000", "*"]}
    path = write_document(tmp_path / "ok.yaml", document)
    assert load_config(path).router.http.cors_origins == ("https://viewer.example:3000", "*")
    document["router"]["http"] = {"cors_origins": ["https://viewer.example/ohif/"]}
    path = write_document(tmp_path / "bad.yaml", document)
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert "router.http.cors_origins[0]" in str(info.value)
    assert "no path" in str(info.value)
