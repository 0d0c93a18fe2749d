"""Helpers for store tests: configs with rules and fast retries, storescu runs, byte comparisons."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path
from typing import Any

from pydicom import dcmread
from pydicom.uid import generate_uid
from ruamel.yaml import YAML

from tests.support.router_process import dcmtk, dcmtk_env, run_dcmtk

FAST_FORWARDING = {"retry_initial": 0.5, "retry_max": 2, "poll_interval": 0.2, "lease": 10}


def edit_config(path: Path, change) -> Path:
    """Load the YAML document, let `change(document)` edit it in place, write it back."""
    yaml = YAML()
    data = yaml.load(path.read_text(encoding="utf-8"))
    change(data)
    with open(path, "w", encoding="utf-8") as handle:
        yaml.dump(data, handle)
    return path


def fast_retries(data: dict[str, Any]) -> None:
    data["router"]["forwarding"] = dict(FAST_FORWARDING)


def storescu(port: int, files: list[str], calling_ae: str = "WORKSTATION", called_ae: str = "DICOMROUTER", *extra: str):
    """DCMTK storescu with one association; -v to see each response."""
    return run_dcmtk("storescu", "-v", "-aet", calling_ae, "-aec", called_ae, *extra, "127.0.0.1", str(port), *files, timeout=300)


def start_storescu(port: int, files: list[str]) -> subprocess.Popen:
    """DCMTK storescu -v in the background, one association; it prints each response as it arrives."""
    return subprocess.Popen(
        [dcmtk("storescu"), "-v", "-aet", "WORKSTATION", "-aec", "DICOMROUTER", "127.0.0.1", str(port), *files],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        errors="replace",
        env=dcmtk_env(),
    )


def read_until_acknowledged(sender: subprocess.Popen, count: int) -> list[str]:
    """The sender's lines up to its `count`th Success (it keeps sending meanwhile)."""
    lines, successes = [], 0
    assert sender.stdout is not None
    for line in sender.stdout:
        lines.append(line)
        successes += "Received Store Response (Success)" in line
        if successes == count:
            return lines
    raise AssertionError(f"storescu ended after {successes} acknowledgements:\n{''.join(lines)[-2000:]}")


def successful_sop_uids(storescu_output: str, files: list[str]) -> set[str]:
    """SOP Instance UIDs whose C-STORE got Success, from storescu -v output (in file order)."""
    uids = {}
    for path in files:
        uids[Path(path).name] = str(dcmread(path, stop_before_pixels=True).SOPInstanceUID)
    current = None
    ok = set()
    for line in storescu_output.splitlines():
        match = re.search(r"Sending file: (.+)$", line)
        if match:
            current = Path(match.group(1).strip()).name
        elif "Received Store Response (Success)" in line and current:
            ok.add(uids[current])
    return ok


def dataset_bytes(file_bytes: bytes) -> bytes:
    """The bytes after the file meta group: what a router must pass on unchanged."""
    assert file_bytes[128:132] == b"DICM"
    # (0002,0000) UL group length: tag(4) VR(2) len(2) value(4)
    group_length = int.from_bytes(file_bytes[140:144], "little")
    return file_bytes[144 + group_length :]


def with_new_uids(source: Path, target: Path, study_uid: str, series_uid: str | None = None) -> str:
    """Copy a test file with new UIDs, keeping its transfer syntax; returns the SOP Instance UID."""
    ds = dcmread(source)
    ds.StudyInstanceUID = study_uid
    ds.SeriesInstanceUID = series_uid or generate_uid()
    ds.SOPInstanceUID = generate_uid()
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.PatientID = "MIXED01"
    ds.save_as(target, enforce_file_format=True)
    return str(ds.SOPInstanceUID)


MIXED_FILES = (
    "CT_small.dcm",  # explicit VR little endian
    "SC_rgb_jpeg_dcmd.dcm",  # implicit VR little endian
    "JPEG-lossy.dcm",  # JPEG extended
    "SC_rgb_jpeg_gdcm.dcm",  # JPEG lossless
    "JPEG2000.dcm",  # JPEG 2000
    "MR_small_RLE.dcm",  # RLE lossless
    "image_dfl.dcm",  # deflated explicit VR little endian
    "MR_small_bigendian.dcm",  # explicit VR big endian
)


def storescu_profile(path: Path, files: list[Path]) -> Path:
    """A storescu -xf file proposing exactly each file's (SOP class, transfer syntax)."""
    pairs = []
    for file in files:
        meta = dcmread(file, stop_before_pixels=True).file_meta
        pair = (str(meta.MediaStorageSOPClassUID), str(meta.TransferSyntaxUID))
        if pair not in pairs:
            pairs.append(pair)
    lines = ["[[TransferSyntaxes]]"]
    for index, (_, syntax) in enumerate(pairs):
        lines += [f"[TS{index}]", f"TransferSyntax1 = {syntax}"]
    lines += ["", "[[PresentationContexts]]", "[Mixed]"]
    for index, (sop_class, _) in enumerate(pairs):
        lines.append(f"PresentationContext{index + 1} = {sop_class}\\TS{index}")
    lines += ["", "[[Profiles]]", "[Mixed]", "PresentationContexts = Mixed", ""]
    path.write_text("\n".join(lines))
    return path
