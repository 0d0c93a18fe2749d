"""WADO-RS frames (PS3.18 10.4.1.1.3): frames of one instance's pixel data, as stored (no decoding)."""

from __future__ import annotations

from io import BytesIO

from pydicom import dcmread
from pydicom.encaps import get_frame

from dicomrouter.http.dicomweb.errors import DicomWebError

OCTET_STREAM = "application/octet-stream"
# Compressed transfer syntaxes -> the media type of their frames (PS3.18 Table 8.7.3-2).
FRAME_MEDIA_TYPES = {
    "1.2.840.10008.1.2.4.50": "image/jpeg",
    "1.2.840.10008.1.2.4.51": "image/jpeg",
    "1.2.840.10008.1.2.4.57": "image/jpeg",
    "1.2.840.10008.1.2.4.70": "image/jpeg",
    "1.2.840.10008.1.2.4.80": "image/jls",
    "1.2.840.10008.1.2.4.81": "image/jls",
    "1.2.840.10008.1.2.4.90": "image/jp2",
    "1.2.840.10008.1.2.4.91": "image/jp2",
    "1.2.840.10008.1.2.4.201": "image/jphc",
    "1.2.840.10008.1.2.4.202": "image/jphc",
    "1.2.840.10008.1.2.4.203": "image/jphc",
    "1.2.840.10008.1.2.5": "image/dicom-rle",
}


def parse_frame_list(text: str) -> list[int]:
    """`1,3,5` -> [1, 3, 5] (1-based); DicomWebError 400 otherwise."""
    try:
        numbers = [int(item) for item in text.split(",") if item.strip()]
    except ValueError:
        raise DicomWebError(400, f"{text!r} is not a list of frame numbers") from None
    if not numbers or min(numbers) < 1:
        raise DicomWebError(400, "frame numbers start at 1")
    return numbers


def frame_media_type(transfer_syntax: str) -> str:
    """The Content-Type of one frame part: the compressed format, or raw bytes."""
    media_type = FRAME_MEDIA_TYPES.get(transfer_syntax)
    if media_type is None:
        return f"{OCTET_STREAM}; transfer-syntax={transfer_syntax}"
    return f"{media_type}; transfer-syntax={transfer_syntax}"


def extract_frames(part10: bytes, numbers: list[int]) -> tuple[str, list[bytes]]:
    """(transfer syntax, the frames' bytes) of a DICOM file; DicomWebError 404 for a missing frame."""
    dataset = dcmread(BytesIO(part10))
    syntax = dataset.file_meta.TransferSyntaxUID
    if "PixelData" not in dataset:
        raise DicomWebError(404, "the instance has no pixel data")
    count = int(dataset.get("NumberOfFrames", 1) or 1)
    missing = [n for n in numbers if n > count]
    if missing:
        raise DicomWebError(404, f"the instance has {count} frame(s); no frame {missing[0]}")
    pixels = dataset.PixelData
    if syntax.is_encapsulated:
        return str(syntax), [get_frame(pixels, n - 1, number_of_frames=count) for n in numbers]
    samples = int(dataset.get("SamplesPerPixel", 1) or 1)
    bits = int(dataset.BitsAllocated)
    pixel_count = int(dataset.Rows) * int(dataset.Columns) * samples
    if bits == 1:
        raise DicomWebError(406, "single-bit frames are not served one by one")
    size = pixel_count * bits // 8
    return str(syntax), [bytes(pixels[(n - 1) * size : n * size]) for n in numbers]
