"""Where a spool file's data set starts: from the file meta's group length alone, bounded."""

from __future__ import annotations

import struct

import pytest

from dicomrouter.config import RouterSettings
from dicomrouter.dicom_file import (
    MAX_FILE_META_BYTES,
    META_HEAD_BYTES,
    dataset_offset,
    with_group_length,
)
from dicomrouter.net.store_client import ContextRejected, EncodedStoreClient
from tests.support.configs import server_config

PREFIX = b"\0" * 128 + b"DICM"


def element(element_number: int, vr: bytes, value: bytes) -> bytes:
    return struct.pack("<HH2sH", 0x0002, element_number, vr, len(value)) + value


META = element(0x0010, b"UI", b"1.2.840.10008.1.2.1\0") + element(
    0x0002, b"UI", b"1.2.840.10008.5.1.4.1.1.2\0"
)


def with_length(meta: bytes, claimed: int | None = None) -> bytes:
    length = len(meta) if claimed is None else claimed
    return PREFIX + b"\x02\x00\x00\x00UL\x04\x00" + struct.pack("<I", length) + meta


def test_the_group_length_alone_says_where_the_data_set_starts():
    content = with_length(META) + b"\x08\x00\x16\x00"
    assert dataset_offset(content[:META_HEAD_BYTES]) == META_HEAD_BYTES + len(META)
    # Elements the group length does not cover are not looked at: they belong to the data set.
    garbage = with_length(b"\xff" * 40) + b"rest"
    assert dataset_offset(garbage) == META_HEAD_BYTES + 40


@pytest.mark.parametrize(
    ("content", "words"),
    [
        (b"\0" * 200, "no DICM prefix"),
        (PREFIX + META, "does not start with its group length"),  # no (0002,0000)
        (with_length(META)[:140], "does not start with its group length"),  # cut inside it
        (with_length(META, claimed=MAX_FILE_META_BYTES + 1), "more than 65536"),
        (with_length(META, claimed=0xFFFFFFFF), "more than 65536"),
    ],
)
def test_files_without_a_sane_group_length_are_refused(content, words):
    with pytest.raises(ValueError, match=words):
        dataset_offset(content)


def test_import_adds_a_missing_group_length_and_keeps_the_rest():
    old_style = PREFIX + META + b"\x08\x00\x16\x00UI\x02\x001\0"
    fixed = with_group_length(old_style)
    assert dataset_offset(fixed[:META_HEAD_BYTES]) == META_HEAD_BYTES + len(META)
    assert fixed[dataset_offset(fixed) :] == b"\x08\x00\x16\x00UI\x02\x001\0"
    assert with_group_length(fixed) is fixed
    with pytest.raises(ValueError, match="no readable file meta"):
        with_group_length(PREFIX + b"\x08\x00\x16\x00")


@pytest.mark.parametrize("claimed", [MAX_FILE_META_BYTES + 2, 10_000])
def test_the_forwarder_refuses_a_spool_file_whose_meta_is_oversized_or_past_its_end(
    tmp_path, claimed
):
    """Never sent (and never read beyond its first bytes): a permanent refusal, not a retry."""
    path = tmp_path / "instance.dcm"
    path.write_bytes(with_length(META, claimed=claimed) + b"\0" * 100)
    peer = server_config(9, name="Nowhere")
    with pytest.raises(ContextRejected, match="unusable"):
        EncodedStoreClient(peer, RouterSettings()).send_file(
            path, "1.2.3", "1.2.3.4", "1.2.840.10008.1.2.1"
        )
