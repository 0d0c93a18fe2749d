"""Hot reload of a running `serve`: SIGHUP and file changes; an invalid file keeps the old config."""

from __future__ import annotations

import pytest
from pynetdicom import AE
from pynetdicom.sop_class import Verification
from ruamel.yaml import YAML

from tests.front.test_echo_scp import ROUTER_AE, echoscu, wait_for_event, write_router_config
from tests.support.router_process import RouterProcess
from tests.support.scu_sockets import OUTGOING_SOCKET_HANDLERS

pytestmark = pytest.mark.slow


def edit_yaml(path, change) -> None:
    """Apply `change` to the parsed document and write it back (as an admin's editor would)."""
    engine = YAML()
    document = engine.load(path.read_text())
    change(document)
    with open(path, "w", encoding="utf-8") as handle:
        engine.dump(document, handle)


def add_client(ae_title: str):
    def change(document) -> None:
        document["clients"].append({"ae_title": ae_title, "roles": ["test_read"]})

    return change


def echo_accepted(port: int, calling_ae: str) -> bool:
    return echoscu(port, calling_ae).returncode == 0


@pytest.fixture
def router(tmp_path):
    path, port = write_router_config(tmp_path)
    with RouterProcess(path, port) as process:
        yield process


def test_sighup_applies_a_valid_edit_without_dropping_open_associations(router):
    assert not echo_accepted(router.port, "NEWCOMER")
    workstation = AE(ae_title="WORKSTATION")
    workstation.add_requested_context(Verification)
    open_assoc = workstation.associate(
        "127.0.0.1", router.port, ae_title=ROUTER_AE, evt_handlers=OUTGOING_SOCKET_HANDLERS
    )
    assert open_assoc.is_established
    try:
        edit_yaml(router.config_path, add_client("NEWCOMER"))
        router.reload()
        wait_for_event(router, "config_reloaded", timeout=10)
        assert echo_accepted(router.port, "NEWCOMER"), router.log_tail()
        # The association opened under the old config is still there and still served.
        assert open_assoc.is_established
        status = open_assoc.send_c_echo()
        assert status and status.Status == 0x0000
    finally:
        open_assoc.release()


def test_file_change_on_disk_is_picked_up_without_a_signal(router):
    edit_yaml(router.config_path, add_client("FROMDISK"))
    wait_for_event(router, "config_reloaded", timeout=10, reason="file changed")
    assert echo_accepted(router.port, "FROMDISK"), router.log_tail()


def test_invalid_edit_is_refused_and_the_old_config_stays(router):
    def break_it(document) -> None:
        document["clients"].append({"ae_title": "BROKEN", "roles": ["test_read"]})
        document["servers"][0]["port"] = 70000

    edit_yaml(router.config_path, break_it)
    router.reload()
    record = wait_for_event(router, "config_reload_refused", timeout=10)
    assert "servers[0].port" in str(record["problems"])
    assert router.process.poll() is None, "an invalid file must not stop the router"
    assert echo_accepted(router.port, "WORKSTATION"), router.log_tail()
    assert not echo_accepted(router.port, "BROKEN"), "the refused file must not be in force"
    # Fixing the file brings the new client in.
    edit_yaml(router.config_path, lambda document: document["servers"][0].__setitem__("port", 4999))
    router.reload()
    wait_for_event(router, "config_reloaded", timeout=10)
    assert echo_accepted(router.port, "BROKEN")
