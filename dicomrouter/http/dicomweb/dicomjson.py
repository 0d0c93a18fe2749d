"""Data sets -> DICOM JSON (PS3.18 F.2), always UTF-8 whatever character set the PACS used."""

from __future__ import annotations

import json
from collections.abc import Callable

from pydicom import Dataset
from pydicom.dataelem import DataElement

MEDIA_TYPE = "application/dicom+json"
QUERY_RETRIEVE_LEVEL = 0x00080052
SPECIFIC_CHARACTER_SET = 0x00080005
RETRIEVE_URL = 0x00081190
# Values this large are bulk data in /metadata: left out, or referenced by a BulkDataURI.
BULK_DATA_THRESHOLD = 1024
PIXEL_DATA_TAGS = (0x7FE00008, 0x7FE00009, 0x7FE00010)  # float, double float and pixel data


def answer_json(answer: Dataset, retrieve_url: str | None = None) -> dict:
    """One QIDO-RS answer: the C-FIND identifier without its query bookkeeping, text as Unicode."""
    dataset = Dataset()
    dataset.update(answer)
    if QUERY_RETRIEVE_LEVEL in dataset:
        del dataset[QUERY_RETRIEVE_LEVEL]
    result = dataset_json(dataset)
    if retrieve_url:
        result["00081190"] = {"vr": "UR", "Value": [retrieve_url]}
    return result


def dataset_json(
    dataset: Dataset, bulk_data_uri: Callable[[DataElement], str] | None = None
) -> dict:
    """DICOM JSON of `dataset`; bulk data (large binary values) left out, or referenced by
    `bulk_data_uri(element)`. Pixel data is bulk data whatever its size. The Specific Character
    Set is dropped: JSON text is UTF-8. `dataset` loses its pixel data elements."""
    pixels = [dataset[tag] for tag in PIXEL_DATA_TAGS if tag in dataset]
    for element in pixels:
        del dataset[element.tag]

    def bulk(element: DataElement) -> str:
        return bulk_data_uri(element) if bulk_data_uri is not None else ""

    result = dataset.to_json_dict(BULK_DATA_THRESHOLD, bulk, suppress_invalid_tags=True)
    result.pop("00080005", None)
    if bulk_data_uri is None:
        _drop_bulk(result)
    else:
        for element in pixels:
            result[f"{element.tag:08X}"] = {"vr": element.VR, "BulkDataURI": bulk_data_uri(element)}
    return result


def _drop_bulk(json_dataset: dict) -> None:
    for key in list(json_dataset):
        element = json_dataset[key]
        if "BulkDataURI" in element:
            del json_dataset[key]
        elif element.get("vr") == "SQ":
            for item in element.get("Value", []):
                _drop_bulk(item)


def encode_json(value: object) -> bytes:
    return json.dumps(value, ensure_ascii=False, separators=(",", ":")).encode("utf-8")
