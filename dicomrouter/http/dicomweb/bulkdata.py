"""Bulk data in /metadata (PS3.18 8.6.2.1, F.2.6): large values referenced by a BulkDataURI the
router serves, so a viewer gets a palette, a VOI LUT or an encapsulated document whatever its size.

A value is named by its path from the instance: `00283010/0/00283006` is LUT Data in the first
item of the VOI LUT Sequence. Pixel data is not referenced: viewers take it frame by frame.
"""

from __future__ import annotations

from collections.abc import Callable

from pydicom import Dataset
from pydicom.dataelem import DataElement, RawDataElement

from dicomrouter.http.dicomweb.errors import DicomWebError

BULK_SEGMENT = "bulkdata"


def element_paths(dataset: Dataset, prefix: str = "") -> dict[int, str]:
    """id(element) -> its path, for every element of `dataset` and its sequences' items."""
    paths: dict[int, str] = {}
    for element in dataset:  # converts raw elements; to_json_dict then meets the same objects
        path = f"{prefix}{element.tag:08X}"
        paths[id(element)] = path
        if element.VR == "SQ":
            for index, item in enumerate(element.value or ()):
                paths.update(element_paths(item, f"{path}/{index}/"))
    return paths


def bulk_data_uris(dataset: Dataset, instance_url: str) -> Callable[[DataElement], str]:
    """The BulkDataURI of each of `dataset`'s elements: `{instance_url}/bulkdata/{path}`."""
    paths = element_paths(dataset)

    def uri(element: DataElement) -> str:
        return f"{instance_url}/{BULK_SEGMENT}/{paths[id(element)]}"

    return uri


def parse_path(text: str) -> list[int]:
    """`00283010/0/00283006` -> [tag, item index, tag]; DicomWebError 400 otherwise."""
    parts = text.strip("/").split("/")
    try:
        numbers = [
            int(part, 16) if index % 2 == 0 else int(part) for index, part in enumerate(parts)
        ]
    except ValueError:
        raise DicomWebError(400, f"{text!r} is not a bulk data path (tag/item/tag...)") from None
    if len(numbers) % 2 == 0 or any(n < 0 for n in numbers):
        raise DicomWebError(400, f"{text!r} is not a bulk data path (tag/item/tag...)")
    return numbers


def bulk_value(dataset: Dataset, path: list[int]) -> bytes:
    """The bytes of the value at `path` as the instance holds them (`dataset` freshly read, so
    its elements are still raw: no decoding, no re-encoding)."""
    current = dataset
    for depth in range(0, len(path) - 1, 2):
        element = current.get(path[depth])
        index = path[depth + 1]
        if element is None or element.VR != "SQ" or index >= len(element.value):
            raise DicomWebError(404, "the instance has no such sequence item")
        current = element.value[index]
    raw = current.get_item(path[-1])
    value = raw.value if isinstance(raw, RawDataElement) else None
    if not isinstance(value, bytes | bytearray) or not value:
        raise DicomWebError(404, f"the instance has no bulk data at {path[-1]:08X}")
    return bytes(value)
