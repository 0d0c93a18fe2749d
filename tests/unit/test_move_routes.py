"""The pure C-MOVE decisions: destinations, permissions, direct or relay, the route grid."""

from __future__ import annotations

from dicomrouter.config import load_config
from dicomrouter.routing.access import Caller
from dicomrouter.routing.move_routes import (
    may_move_to,
    plan_route,
    resolve_destination,
    route_table,
)
from tests.support.configs import base_document, write_document


def make_config(tmp_path, change=None):
    document = base_document()
    document["servers"][0]["move_routing"] = {
        "WORKSTATION": "WS_AT_TEST",
        "Prod PACS 1": "PROD_PACS_1",
    }
    document["servers"].append(
        {
            "name": "Old PACS",
            "ae_title": "OLD_PACS",
            "host": "127.0.0.1",
            "port": 4250,
            "environment": "test",
            "active": False,
            "primary": False,
            "deleted": False,
        }
    )
    document["servers"].append(
        {
            "name": "Gone PACS",
            "ae_title": "GONE_PACS",
            "host": "127.0.0.1",
            "port": 4251,
            "environment": "test",
            "active": False,
            "primary": False,
            "deleted": True,
        }
    )
    document["clients"].append({"ae_title": "LAPTOP", "roles": ["test_read"]})
    if change:
        change(document)
    return load_config(write_document(tmp_path / "dicomrouter.yaml", document))


def caller(config, ae_title="WORKSTATION", roles=None):
    client = config.client(ae_title)
    return Caller(
        ae_title, "127.0.0.1", "client", roles if roles is not None else client.roles, client=client
    )


def test_destinations_by_name_ae_or_client(tmp_path):
    config = make_config(tmp_path)
    assert resolve_destination(config, "Prod PACS 1").ae_title == "PROD_PACS_1"
    assert resolve_destination(config, "PROD_PACS_1").name == "Prod PACS 1"
    assert resolve_destination(config, "WORKSTATION").kind == "client"
    assert resolve_destination(config, "LAPTOP") is None  # no host and port to send to
    assert resolve_destination(config, "GONE_PACS") is None
    assert resolve_destination(config, "DICOMROUTER") is None
    assert resolve_destination(config, "NOBODY") is None


def test_may_move_to_itself_and_writable_servers(tmp_path):
    config = make_config(tmp_path)
    workstation = caller(config)  # test_read, test_write
    assert may_move_to(workstation, resolve_destination(config, "WORKSTATION"), config)
    assert may_move_to(workstation, resolve_destination(config, "Test PACS 1"), config)
    assert not may_move_to(workstation, resolve_destination(config, "Prod PACS 1"), config)
    assert may_move_to(
        caller(config, roles=frozenset({"admin"})),
        resolve_destination(config, "Prod PACS 1"),
        config,
    )


def test_listed_move_destinations_win(tmp_path):
    config = make_config(
        tmp_path, lambda d: d["clients"][0].update(move_destinations=["Prod PACS 1"])
    )
    workstation = caller(config)
    assert may_move_to(workstation, resolve_destination(config, "PROD_PACS_1"), config)
    assert not may_move_to(workstation, resolve_destination(config, "WORKSTATION"), config)


def test_direct_when_routed_else_relay(tmp_path):
    config = make_config(tmp_path)
    test_pacs, prod_pacs = config.server("Test PACS 1"), config.server("Prod PACS 1")
    direct = plan_route(test_pacs, resolve_destination(config, "WORKSTATION"), "DICOMROUTER")
    assert direct.direct and direct.move_destination_ae == "WS_AT_TEST"
    relay = plan_route(prod_pacs, resolve_destination(config, "WORKSTATION"), "DICOMROUTER")
    assert not relay.direct


def test_route_table_grid(tmp_path):
    config = make_config(tmp_path)
    destinations, rows = route_table(config)
    assert destinations == ["Test PACS 1", "Prod PACS 1", "Old PACS", "WORKSTATION"]
    grid = dict(rows)
    assert grid["Test PACS 1"] == ["-", "PROD_PACS_1", "relay", "WS_AT_TEST"]
    assert grid["Prod PACS 1"] == ["relay", "-", "relay", "relay"]


def test_an_inactive_server_is_refused_as_destination_and_as_called_ae(tmp_path):
    from dicomrouter.routing.access import called_server_refusal
    from dicomrouter.routing.access_report import explain_access
    from dicomrouter.routing.move_routes import destination_refusal

    config = make_config(tmp_path)
    reason = "server 'Old PACS' (OLD_PACS) is inactive"
    assert destination_refusal(resolve_destination(config, "OLD_PACS")) == reason
    assert destination_refusal(resolve_destination(config, "Prod PACS 1")) is None
    assert called_server_refusal(config, "OLD_PACS") == reason
    assert called_server_refusal(config, "PROD_PACS_1") is None
    assert called_server_refusal(config, config.router.ae_title) is None
    report = explain_access(config, "WORKSTATION", "127.0.0.1")
    old = next(entry for entry in report.servers if entry.server.name == "Old PACS")
    assert {op: old.verdicts[op].allowed for op in ("echo", "store", "move_to")} == dict.fromkeys(
        ("echo", "store", "move_to"), False
    )
    assert all(reason in old.verdicts[op].why for op in ("echo", "store", "move_to"))
