"""CT pixel decoding: one series' files -> an HU volume (rows, cols, slices) float32.

Each slice file is read again, checked unchanged since its header was read (size and
modification time), decoded by pydicom (codec plugins for compressed transfer syntaxes, straight
from the Pixel Data bytes when the header read located them) and rescaled to HU with its own
RescaleSlope/Intercept. A file that cannot be used gives a `SeriesProblem`, never an exception.
"""

from __future__ import annotations

import os
from io import BytesIO
from pathlib import Path

import numpy as np
from pydicom import dcmread
from pydicom.pixels import get_decoder
from pydicom.uid import UID

from site_app.dicom_headers import PixelLayout, SliceHeader
from site_app.dicom_series import SeriesGeometry, SeriesProblem
from site_app.quarantine import QuarantineReason, describe_error

__all__ = ["decode_hu_volume", "decode_pixels", "stored_pixels"]


def decode_hu_volume(root: Path, geometry: SeriesGeometry) -> np.ndarray | SeriesProblem:
    """HU volume (rows, cols, slices) float32 in the order of ``geometry.slices``."""
    first = geometry.slices[0]
    volume = np.empty((len(geometry.slices), first.rows or 0, first.columns or 0), np.float32)
    for k, header in enumerate(geometry.slices):
        stored = stored_pixels(root / header.path, header)
        if isinstance(stored, SeriesProblem):
            return stored
        if header.rescale is None:
            return SeriesProblem(
                QuarantineReason.UNDECODABLE_PIXELS,
                f"RescaleSlope or RescaleIntercept of {header.path} is not a number, so its "
                "pixels cannot be converted to HU; re-export the series from the scanner/PACS",
            )
        slope, intercept = header.rescale
        np.multiply(stored, np.float32(slope), out=volume[k], dtype=np.float32)
        volume[k] += np.float32(intercept)
    # One transposing copy: slices are decoded as (rows, cols) planes, the volume is slice-last.
    return np.ascontiguousarray(np.moveaxis(volume, 0, -1))


def stored_pixels(path: Path, header: SliceHeader) -> np.ndarray | SeriesProblem:
    """The stored values of one single-frame greyscale image file, (rows, cols), decoded by
    `decode_pixels`; a problem instead of raising. The file must still have the size and
    modification time it had when its header was read (``header.stamp``), so what is decoded is
    what was validated and hashed (and is cached under that hash).
    """
    try:
        with path.open("rb") as handle:
            stat = os.fstat(handle.fileno())
            data = handle.read()
    except OSError as exc:
        return SeriesProblem(
            QuarantineReason.TRUNCATED,
            f"{header.path} could not be read again ({type(exc).__name__}); check that the file "
            "is still there and readable by the fedseg user",
        )
    unchanged = header.stamp in (None, (stat.st_size, stat.st_mtime_ns))
    if not unchanged or len(data) != stat.st_size:
        return SeriesProblem(
            QuarantineReason.TRUNCATED,
            f"{header.path} changed while fedseg was reading the data folder (an export still "
            "being written?); re-run when the copy has finished",
        )
    try:
        stored = decode_pixels(data, header.transfer_syntax_uid, header.pixel_layout)
    except Exception as exc:  # decoder plugins raise many types
        return SeriesProblem(
            QuarantineReason.UNDECODABLE_PIXELS,
            f"pixel data of {header.path} could not be decoded ({describe_error(exc)}); export "
            "the series uncompressed (Explicit VR Little Endian) or install the decoder "
            "for its transfer syntax",
        )
    if stored.shape != (header.rows, header.columns):
        what = "colour" if stored.ndim == 3 and stored.shape[-1] in (3, 4) else "unexpected"
        return SeriesProblem(
            QuarantineReason.UNDECODABLE_PIXELS,
            f"pixel data of {header.path} decoded to shape {stored.shape} ({what}), expected "
            f"({header.rows}, {header.columns}) from Rows/Columns: CT slices are single-frame "
            "greyscale; the file is corrupt or not a CT slice",
        )
    return stored


def decode_pixels(
    data: bytes, transfer_syntax_uid: str, layout: PixelLayout | None = None
) -> np.ndarray:
    """Pixel data of one DICOM file's bytes as pydicom decodes it (``Dataset.pixel_array``:
    codec plugins for compressed syntaxes; (rows, cols), (frames, rows, cols) or with samples
    last). Raises what pydicom raises.

    With ``layout`` (from the header read), pydicom's decoder takes the Pixel Data value straight
    from ``data``, so the file is not parsed a second time; without it, or if that fails, the
    file is read whole by ``dcmread`` as usual.
    """
    if layout is not None:
        try:
            value = data[layout.offset : layout.offset + layout.length]
            decoded, _ = get_decoder(UID(transfer_syntax_uid)).as_array(
                value,
                transfer_syntax_uid=UID(transfer_syntax_uid),
                pixel_keyword="PixelData",
                **dict(layout.options),
            )
            return decoded
        except Exception:  # the full read below is the authority when this fails
            pass
    return dcmread(BytesIO(data)).pixel_array
