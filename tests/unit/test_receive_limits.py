"""Bounds the receive service keeps whatever the sender claims (issue 10, finding 3)."""

from __future__ import annotations

import os
import zlib

import pytest

from dicomrouter.scp.store import file_meta
from dicomrouter.store.receive import check_inflation

CT = "1.2.840.10008.5.1.4.1.1.2"
DEFLATED = "1.2.840.10008.1.2.1.99"


def deflated_instance(inflated: bytes) -> bytes:
    compressor = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
    body = compressor.compress(inflated) + compressor.flush()
    return file_meta(CT, "1.2.3.4", DEFLATED, "1.2.3", "TEST", "WS") + body


def test_a_deflated_data_set_is_bounded_by_max_dataset_size_whatever_its_ratio():
    """Random bytes hardly compress (ratio ~1, far under the ratio cap): the absolute limit still holds."""
    encoded = deflated_instance(os.urandom(3 * 1024 * 1024))
    check_inflation(encoded, max_inflated=4 * 1024 * 1024)
    with pytest.raises(ValueError, match="inflates beyond"):
        check_inflation(encoded, max_inflated=2 * 1024 * 1024)


def test_a_deflate_bomb_is_refused_by_its_ratio():
    encoded = deflated_instance(bytes(200 * 1024 * 1024))
    with pytest.raises(ValueError, match="inflates beyond"):
        check_inflation(encoded)
