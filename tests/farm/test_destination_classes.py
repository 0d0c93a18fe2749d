"""The router never says Success for what its destination will refuse (issue 10).

Orthanc 1.10 refuses recent standard storage classes (Photoacoustic Image) and private ones at
its own negotiation. The router learns that by asking it (before it answers the modality's
A-ASSOCIATE-RQ) and refuses those contexts exactly as Orthanc would; a destination it cannot
reach is trusted to accept, as before.
"""

from __future__ import annotations

import pytest
from pydicom.uid import ExplicitVRLittleEndian, generate_uid
from pynetdicom import AE

from tests.support.find_support import edit_config
from tests.support.orthanc_fixtures import WORKSTATION_AE, make_test_instance
from tests.support.router_process import RouterProcess

pytestmark = pytest.mark.slow

CT = "1.2.840.10008.5.1.4.1.1.2"
PHOTOACOUSTIC = "1.2.840.10008.5.1.4.1.1.6.3"  # standard since 2023: Orthanc 1.10 refuses it
SIEMENS_CSA_NON_IMAGE = "1.3.12.2.1107.5.9.1"  # private


def propose(port: int, classes: list[str]):
    client = AE(ae_title=WORKSTATION_AE)
    for sop_class in classes:
        client.add_requested_context(sop_class, [ExplicitVRLittleEndian])
    client.acse_timeout = 30
    assoc = client.associate("127.0.0.1", port, ae_title="DICOMROUTER")
    assert assoc.is_established
    return assoc


def instance_of(sop_class: str, modality: str = "OT"):
    ds = make_test_instance()
    ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = sop_class
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.Modality = modality
    return ds


def test_classes_the_destination_refuses_are_refused_at_negotiation(farm_config, router_port, clean_orthanc_farm):
    with RouterProcess(farm_config, router_port) as router:
        assoc = propose(router_port, [CT, PHOTOACOUSTIC, SIEMENS_CSA_NON_IMAGE])
        try:
            assert [str(cx.abstract_syntax) for cx in assoc.accepted_contexts] == [CT]
            refused = {str(cx.abstract_syntax): cx.result for cx in assoc.rejected_contexts}
            assert refused == {PHOTOACOUSTIC: 0x03, SIEMENS_CSA_NON_IMAGE: 0x03}
            ct = make_test_instance()
            assert assoc.send_c_store(ct).Status == 0x0000
        finally:
            assoc.release()
        assert "no destination this store could reach accepts this SOP class" in router.log_text()
        # Learned once: the next association is answered from memory, the same way.
        again = propose(router_port, [PHOTOACOUSTIC, CT])
        try:
            assert [str(cx.abstract_syntax) for cx in again.accepted_contexts] == [CT]
        finally:
            again.release()


def test_an_unreachable_destination_is_trusted_to_accept(farm_config, router_port, clean_orthanc_farm):
    def primary_unreachable(document):
        for server in document["servers"]:
            if server.get("primary"):
                server["port"] = 9  # discard: nobody listens
    edit_config(farm_config, primary_unreachable)
    with RouterProcess(farm_config, router_port):
        assoc = propose(router_port, [SIEMENS_CSA_NON_IMAGE])
        try:
            assert [str(cx.abstract_syntax) for cx in assoc.accepted_contexts] == [SIEMENS_CSA_NON_IMAGE]
            assert assoc.send_c_store(instance_of(SIEMENS_CSA_NON_IMAGE)).Status == 0x0000
        finally:
            assoc.release()


def test_a_store_routed_to_a_destination_that_refuses_its_class_gets_0122(
    farm_config, router_port, clean_orthanc_farm
):
    """A rule on a data set attribute leaves the destination open at negotiation: the context is accepted
    because one possible destination (unreachable, trusted) may take it; the instance the rule does not
    match goes to the primary, which refuses the class: 0x0122, nothing queued."""

    def rule_to_a_dead_server(document):
        document["servers"].append(
            {"name": "Dead PACS", "ae_title": "DEAD_PACS", "host": "127.0.0.1", "port": 9, "environment": "test",
             "active": True, "primary": False, "deleted": False}
        )
        document["routes"] = [{"name": "XX to the dead one", "match": {"Modality": "XX"}, "destinations": ["Dead PACS"]}]
    edit_config(farm_config, rule_to_a_dead_server)
    with RouterProcess(farm_config, router_port) as router:
        assoc = propose(router_port, [SIEMENS_CSA_NON_IMAGE])
        try:
            assert [str(cx.abstract_syntax) for cx in assoc.accepted_contexts] == [SIEMENS_CSA_NON_IMAGE]
            response = assoc.send_c_store(instance_of(SIEMENS_CSA_NON_IMAGE, modality="OT"))
            assert response.Status == 0x0122
            assert "does not accept SOP class" in str(response.get("ErrorComment", ""))
        finally:
            assoc.release()
        assert "0x0122" in router.log_text()
        assert router.cli("queue", "list", "--instances").stdout.count(SIEMENS_CSA_NON_IMAGE) == 0
