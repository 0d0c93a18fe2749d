"""Store routing and store-and-forward through the real router, DCMTK storescu and real Orthanc."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from pydicom.uid import ExplicitVRLittleEndian, generate_uid
from pynetdicom import AE
from pynetdicom.sop_class import CTImageStorage, Verification

from tests.conftest import upgrade_catalog
from tests.support.orthanc_fixtures import make_test_instance, write_instance, write_router_config
from tests.support.router_process import RouterProcess
from tests.support.store_helpers import (
    dataset_bytes,
    edit_config,
    fast_retries,
    read_until_acknowledged,
    start_storescu,
    storescu,
    successful_sop_uids,
)

pytestmark = pytest.mark.slow


def _instances(
    folder: Path, count: int, modality: str = "CT", study_uid: str | None = None, rows: int = 64
) -> list[str]:
    folder.mkdir(parents=True, exist_ok=True)
    study_uid = study_uid or generate_uid()
    series_uid = generate_uid()
    files = []
    for index in range(count):
        ds = make_test_instance(
            study_uid=study_uid,
            series_uid=series_uid,
            modality=modality,
            rows=rows,
            cols=rows,
            instance_number=index + 1,
        )
        files.append(str(write_instance(folder / f"{modality}{index:04d}.dcm", ds)))
    return files


def _sop_uid(path: str) -> str:
    from pydicom import dcmread

    return str(dcmread(path, stop_before_pixels=True).SOPInstanceUID)


def _wait_for(predicate, timeout: float = 30.0, interval: float = 0.2):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    return predicate()


@pytest.fixture
def rules_router(farm_config, router_port):
    """Router with a rule sending MR to Test PACS 2, and fast retries."""

    def change(data):
        fast_retries(data)
        data["routes"] = [
            {
                "name": "MR to Test PACS 2",
                "match": {"Modality": "MR"},
                "destinations": ["Test PACS 2"],
            }
        ]

    edit_config(farm_config, change)
    router = RouterProcess(farm_config, router_port).start()
    try:
        yield router
    finally:
        router.stop()


def test_routing_by_primary_rule_and_called_ae(
    rules_router, clean_orthanc_farm, tmp_path, router_port
):
    farm = clean_orthanc_farm
    ct_files = _instances(tmp_path / "ct", 3, "CT")
    mr_files = _instances(tmp_path / "mr", 2, "MR")
    virtual_files = _instances(tmp_path / "virtual", 2, "CT")

    assert storescu(router_port, ct_files).returncode == 0
    assert storescu(router_port, mr_files).returncode == 0
    result = storescu(router_port, virtual_files, "WORKSTATION", farm[3].spec.ae_title)
    assert result.returncode == 0, result.stderr

    assert farm[0].wait_for_instance_count(3) == 3  # primary
    assert farm[1].wait_for_instance_count(2) == 2  # rule
    assert farm[3].wait_for_instance_count(2) == 2  # called AE PROD_PACS_2
    assert farm[2].instance_count() == 0
    assert set(farm[1].instance_sop_uids()) == {_sop_uid(f) for f in mr_files}
    # Bytes are passed on as received.
    for path in ct_files:
        stored = farm[0].download_instance(_sop_uid(path))
        assert dataset_bytes(stored) == dataset_bytes(Path(path).read_bytes())

    explain = rules_router.cli("route", "explain", mr_files[0])
    assert explain.returncode == 0, explain.stderr
    assert "MR to Test PACS 2" in explain.stdout and "Test PACS 2" in explain.stdout
    explain_ct = rules_router.cli("route", "explain", ct_files[0])
    assert "Modality is 'CT'" in explain_ct.stdout and "Test PACS 1" in explain_ct.stdout

    where = rules_router.cli("catalog", "where", str(make_uid_of(ct_files[0])))
    assert "Test PACS 1" in where.stdout


def make_uid_of(path: str) -> str:
    from pydicom import dcmread

    return str(dcmread(path, stop_before_pixels=True).StudyInstanceUID)


def test_same_instance_twice_is_idempotent(farm_router, clean_orthanc_farm, tmp_path, router_port):
    files = _instances(tmp_path / "twice", 1)
    assert storescu(router_port, files).returncode == 0
    assert clean_orthanc_farm[0].wait_for_instance_count(1) == 1
    assert _wait_for(lambda: "queue: done 1" in farm_router.cli("queue", "list").stdout)
    second = storescu(router_port, files)
    assert second.returncode == 0 and "Success" in second.stderr + second.stdout
    # Success comes only after the store's jobs are committed: the queue is final for it now.
    listing = farm_router.cli("queue", "list").stdout
    assert "queue: done 1" in listing, listing  # no second job for the same bytes
    assert clean_orthanc_farm[0].instance_count() == 1


def _listing_with(router: RouterProcess, text: str) -> str:
    """`queue list` if it contains `text`, else ''."""
    listing = router.cli("queue", "list").stdout
    return listing if text in listing else ""


def test_destination_down_then_back_delivers_everything(
    farm_config, clean_orthanc_farm, tmp_path, router_port
):
    edit_config(farm_config, fast_retries)
    farm = clean_orthanc_farm
    files = _instances(tmp_path / "down", 5)
    with RouterProcess(farm_config, router_port) as router:
        farm[0].stop()
        try:
            result = storescu(router_port, files)
            assert result.returncode == 0, result.stderr
            assert len(successful_sop_uids(result.stdout + result.stderr, files)) == 5
            # The first attempts fail and the jobs wait for their retry.
            listing = _wait_for(lambda: _listing_with(router, "pending"))
            assert "Test PACS 1" in listing and "pending" in listing, router.cli(
                "queue", "list"
            ).stdout
        finally:
            farm[0].start()
        assert farm[0].wait_for_instance_count(5, timeout=30) == 5
        assert set(farm[0].instance_sop_uids()) == {_sop_uid(f) for f in files}
    assert "destination_unavailable" in router.log_text()


def test_sigkill_mid_stream_loses_nothing_acknowledged(
    farm_config, clean_orthanc_farm, tmp_path, router_port
):
    """SIGKILL lands after the sender has seen KILL_AFTER acknowledgements, with more still to send:
    every instance acknowledged before the kill reaches the PACS once the router is back."""
    kill_after = 20
    edit_config(farm_config, fast_retries)
    farm = clean_orthanc_farm
    files = _instances(tmp_path / "kill", 150, rows=256)
    router = RouterProcess(farm_config, router_port).start()
    try:
        sender = start_storescu(router_port, files)
        lines = read_until_acknowledged(sender, kill_after)
        router.kill()  # the whole process group: supervisor and workers, if any
        output = "".join(lines) + sender.communicate(timeout=60)[0]
        acknowledged = successful_sop_uids(output, files)
        assert kill_after <= len(acknowledged) < len(files), "the kill should land mid-stream"
        router.start()
        held = _wait_for(lambda: acknowledged <= set(farm[0].instance_sop_uids()), timeout=60)
        assert held, (
            f"{len(acknowledged - set(farm[0].instance_sop_uids()))} acknowledged instances missing"
        )
    finally:
        router.stop()


def test_malformed_input_is_refused_and_router_keeps_serving(
    farm_router, clean_orthanc_farm, tmp_path, router_port, farm_config
):
    spool = farm_config.parent / "var" / "spool"
    ae = AE(ae_title="WORKSTATION")
    ae.add_requested_context(CTImageStorage, ExplicitVRLittleEndian)
    ae.add_requested_context(Verification)
    assoc = ae.associate("127.0.0.1", router_port, ae_title="DICOMROUTER")
    assert assoc.is_established
    try:
        for bad_uid in ("../../x", "1.2.3\x00.4", "1.2.3.4/../../etc"):
            ds = make_test_instance()
            ds.SOPInstanceUID = bad_uid
            status = assoc.send_c_store(ds)
            assert status and status.Status != 0x0000, bad_uid
        # A truncated dataset: the first half of a valid file, sent as a file path (not decoded).
        good = tmp_path / "good.dcm"
        write_instance(good, make_test_instance())
        truncated = tmp_path / "truncated.dcm"
        raw = good.read_bytes()
        truncated.write_bytes(raw[: len(raw) // 2])
        from pynetdicom import _config

        _config.STORE_SEND_CHUNKED_DATASET = True
        status = assoc.send_c_store(truncated)
        assert status and status.Status != 0x0000
        assert assoc.send_c_echo().Status == 0x0000
    finally:
        assoc.release()
    assert not (tmp_path.parent / "x").exists()
    assert not list(Path("/").glob("x"))
    stray = [p for p in spool.rglob("*") if p.is_file() and p.suffix == ".dcm"]
    assert stray == [], "refused instances must not stay in the spool"
    assert clean_orthanc_farm[0].instance_count() == 0
    assert "store_refused" in farm_router.log_text()


def test_import_folder_with_non_dicom_file(farm_config, clean_orthanc_farm, tmp_path):
    folder = tmp_path / "usb"
    files = _instances(folder / "sub", 4)
    (folder / "README.txt").write_text("not an image")
    router = RouterProcess(farm_config, 1)
    result = router.cli("import", str(folder), "--recursive", "--to", "Test PACS 2")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "sent 4" in result.stdout
    assert "README.txt" in result.stdout and "not DICOM" in result.stdout
    assert set(clean_orthanc_farm[1].instance_sop_uids()) == {_sop_uid(f) for f in files}
    again = router.cli("import", str(folder), "--recursive", "--to", "Test PACS 2")
    assert "skipped 4 duplicates" in again.stdout, again.stdout


def test_spool_full_answers_out_of_resources(
    farm_config, clean_orthanc_farm, tmp_path, router_port
):
    import subprocess

    spool = tmp_path / "tiny-spool"
    spool.mkdir()
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=300k", "tmpfs", str(spool)], capture_output=True
    )
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here: {mounted.stderr.decode().strip()}")
    try:
        edit_config(farm_config, lambda d: d["router"].update(spool=str(spool)))
        clean_orthanc_farm[0].stop()  # nothing leaves the spool while we fill it
        try:
            files = _instances(tmp_path / "full", 60, rows=64)
            with RouterProcess(farm_config, router_port) as router:
                result = storescu(router_port, files)
                output = result.stdout + result.stderr
                acknowledged = successful_sop_uids(output, files)
                assert "Refused: OutOfResources" in output
                assert len(acknowledged) < len(files)
                clean_orthanc_farm[0].start()
                assert _wait_for(
                    lambda: acknowledged <= set(clean_orthanc_farm[0].instance_sop_uids()), 30
                )
            assert "spool" in router.log_text() and "full" in router.log_text()
        finally:
            if not clean_orthanc_farm[0].is_running():
                clean_orthanc_farm[0].start()
    finally:
        subprocess.run(["umount", str(spool)], capture_output=True)


def test_config_for_other_port_is_separate(tmp_path, orthanc_farm, workstation_port):
    """The farm config writer gives a valid, upgradable config (guards the fixtures)."""
    path = write_router_config(tmp_path / "x.yaml", orthanc_farm, 12999, workstation_port)
    upgrade_catalog(path)
    assert (tmp_path / "var").exists()


@pytest.mark.parametrize("streamed", [False, True], ids=["held in memory", "streamed to the spool"])
def test_mixed_transfer_syntaxes_arrive_byte_identical(
    farm_config, clean_orthanc_farm, tmp_path, router_port, streamed
):
    """With router.max_in_memory_dataset at its minimum (1 KiB) every data set but the deflated one is
    written to the spool while it arrives, checked from the file, and forwarded from it."""
    if streamed:
        edit_config(farm_config, lambda d: d["router"].update(max_in_memory_dataset=1024))
    with RouterProcess(farm_config, router_port) as router:
        sent = _mixed_transfer_syntaxes_arrive_byte_identical(
            clean_orthanc_farm, tmp_path, router_port
        )
    streamed_count = router.log_text().count('"store_streaming_to_spool"')
    assert streamed_count == (sent - 1 if streamed else 0), (
        router.log_tail()
    )  # the deflated one stays in memory


def _mixed_transfer_syntaxes_arrive_byte_identical(clean_orthanc_farm, tmp_path, router_port):
    from pydicom.data import get_testdata_file

    from tests.support.store_helpers import MIXED_FILES, storescu_profile, with_new_uids

    study_uid = generate_uid()
    files: dict[str, Path] = {}
    for name in MIXED_FILES:
        source = get_testdata_file(name, download=False)
        if source is None:
            pytest.skip(f"pydicom test file {name} is not installed")
        target = tmp_path / name
        sop_uid = with_new_uids(Path(source), target, study_uid)
        files[sop_uid] = target
    profile = storescu_profile(tmp_path / "mixed.cfg", list(files.values()))
    result = storescu(
        router_port,
        [str(p) for p in files.values()],
        "WORKSTATION",
        "DICOMROUTER",
        "-xf",
        str(profile),
        "Mixed",
    )
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    assert len(successful_sop_uids(output, [str(p) for p in files.values()])) == len(files), output
    assert clean_orthanc_farm[0].wait_for_instance_count(len(files)) == len(files)
    # The same files straight to another Orthanc: storescu itself re-encodes some elements, so the
    # router is transparent when both copies carry the same dataset bytes.
    direct = storescu(
        clean_orthanc_farm[1].spec.dicom_port,
        [str(p) for p in files.values()],
        "WORKSTATION",
        clean_orthanc_farm[1].spec.ae_title,
        "-xf",
        str(profile),
        "Mixed",
    )
    assert direct.returncode == 0, direct.stderr
    for sop_uid, path in files.items():
        through_router = clean_orthanc_farm[0].download_instance(sop_uid)
        straight = clean_orthanc_farm[1].download_instance(sop_uid)
        assert dataset_bytes(through_router) == dataset_bytes(straight), path.name
    return len(files)
