"""Associations with a PACS kept between federated C-FINDs (router.find_keepalive)."""

from __future__ import annotations

from pydicom import Dataset

from dicomrouter.config import load_config
from dicomrouter.net.find_client import STUDY_ROOT_FIND
from dicomrouter.query.federation import Federation
from tests.support.configs import base_document, write_document
from tests.support.find_peers import SlowFindPeer, server_entry
from tests.support.http_support import wait_until


def _study(uid: str) -> Dataset:
    ds = Dataset()
    ds.QueryRetrieveLevel = "STUDY"
    ds.StudyInstanceUID = uid
    return ds


def _config(tmp_path, peer: SlowFindPeer, **router):
    document = base_document(
        servers=[{**server_entry(peer.ae_title, peer.ae_title, peer.port), "primary": True}]
    )
    document["router"].update(router)
    return load_config(write_document(tmp_path / "peers.yaml", document))


def _query(federation: Federation, config) -> list[str]:
    run = federation.start(
        config.usable_servers(), config.router, STUDY_ROOT_FIND, _study(""), "STUDY", "ROUTER"
    )
    uids = [answer.identifier.StudyInstanceUID for answer in run.answers()]
    assert run.summary is not None and run.summary.outcome == "complete"
    return uids


def test_the_next_query_reuses_the_association_and_stop_releases_it(tmp_path):
    peer = SlowFindPeer("KEEP", [_study("1.5")]).start()
    federation = Federation(None)
    try:
        config = _config(tmp_path, peer)
        assert _query(federation, config) == ["1.5"]
        assert _query(federation, config) == ["1.5"]
        assert (peer.queries, peer.associations, peer.released) == (2, 1, 0)
        federation.close()
        wait_until(lambda: peer.released == 1, timeout=5, interval=0.01)
    finally:
        peer.stop()


def test_keepalive_zero_releases_after_each_query(tmp_path):
    peer = SlowFindPeer("ONCE", [_study("1.6")]).start()
    federation = Federation(None)
    try:
        config = _config(tmp_path, peer, find_keepalive=0)
        _query(federation, config)
        _query(federation, config)
        wait_until(lambda: peer.released == 2, timeout=5, interval=0.01)
        assert (peer.queries, peer.associations) == (2, 2)
    finally:
        federation.close()
        peer.stop()


def test_a_kept_association_the_pacs_dropped_is_replaced(tmp_path):
    peer = SlowFindPeer("DROPS", [_study("1.7")]).start()
    federation = Federation(None)
    try:
        config = _config(tmp_path, peer)
        _query(federation, config)
        assert peer.abort_associations() == 1  # the PACS drops the idle association
        assert _query(federation, config) == ["1.7"]
        assert (peer.queries, peer.associations) == (2, 2)
    finally:
        federation.close()
        peer.stop()


def test_a_kept_association_that_fails_before_its_first_answer_is_retried_once(
    tmp_path, monkeypatch
):
    peer = SlowFindPeer("RACES", [_study("1.8")]).start()
    federation = Federation(None)
    try:
        config = _config(tmp_path, peer)
        _query(federation, config)
        # The PACS drops it just after the router took it: nothing says so until the query is sent.
        monkeypatch.setattr("dicomrouter.net.link_pool._looks_open", lambda link: True)
        assert peer.abort_associations() == 1
        assert _query(federation, config) == ["1.8"]
        assert (peer.queries, peer.associations) == (2, 2)
    finally:
        federation.close()
        peer.stop()
