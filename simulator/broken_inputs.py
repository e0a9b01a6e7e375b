"""Deliberately broken inputs that a site's ingestion must quarantine, with the reason it must give.

Each helper damages or fakes one input the way it happens in practice (a transfer cut short, a
stray note in an export folder, a lost slice, a series from the wrong scanner).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path

import numpy as np

from simulator.dicom_writer import WrittenSeries
from simulator.phantom import Phantom, Tissue

logger = logging.getLogger(__name__)


class ExpectedReason(StrEnum):
    """Quarantine reason an ingestion must report for a broken input."""

    NOT_DICOM = "not_dicom"
    TRUNCATED = "truncated"
    MISSING_SLICES = "missing_slices"
    UNSUPPORTED_MODALITY = "unsupported_modality"
    LABEL_WITHOUT_SERIES = "label_without_series"


@dataclass(frozen=True, kw_only=True)
class BrokenInput:
    """One broken file or series as recorded in the manifest.

    Attributes:
        path: POSIX path relative to the federation folder (a file, or a series folder).
        expected_reason: what ingestion must report for it.
        series_key: `series_key` of the series involved, None for non-DICOM files.
        description: what is wrong, for a human reading the manifest.
    """

    path: str
    expected_reason: ExpectedReason
    series_key: str | None
    description: str


_NOTES = (
    b"Export note\r\nSeries re-sent after the PACS gateway dropped the connection.\r\n"
    b"Please contact radiology IT before re-importing.\r\n",
    b"QA: window/level preset changed on the console, no clinical impact.\r\n",
)
_JPEG_START = b"\xff\xd8\xff\xe0\x00\x10JFIF\x00\x01\x01\x00\x00\x01\x00\x01\x00\x00"
_JPEG_END = b"\xff\xd9"

# T1-weighted gradient-echo signal per tissue (unitless, 12-bit): fat bright, fluid-like
# lesions dark, cortical bone and air void.
_T1_SIGNAL = {
    Tissue.AIR: 0.0,
    Tissue.FAT: 1400.0,
    Tissue.SOFT_TISSUE: 600.0,
    Tissue.LUNG: 40.0,
    Tissue.LIVER: 850.0,
    Tissue.BONE: 900.0,
    Tissue.LESION: 420.0,
}


def write_truncated_copy(*, source: Path, destination: Path) -> None:
    """Copy the first half of `source`'s bytes to `destination`, as an interrupted transfer does.

    The header stays readable; the pixel data ends early.
    """
    data = source.read_bytes()
    destination.write_bytes(data[: len(data) // 2])
    logger.debug("wrote truncated copy %s (%d of %d bytes)", destination, len(data) // 2, len(data))


def write_non_dicom_file(*, destination: Path, rng: np.random.Generator) -> str:
    """Write a file with a DICOM-looking name that is not DICOM; return what it holds.

    It is either a text note left by staff or a JPEG preview, chosen by `rng`.
    """
    if rng.random() < 0.5:
        payload = _NOTES[int(rng.integers(len(_NOTES)))]
        kind = "a text note"
    else:
        body = rng.integers(0, 256, size=int(rng.integers(600, 1200)), dtype=np.uint8).tobytes()
        payload = _JPEG_START + body + _JPEG_END
        kind = "a JPEG preview"
    destination.write_bytes(payload)
    logger.debug("wrote non-DICOM file %s (%d bytes)", destination, len(payload))
    return kind


def drop_middle_slice(series: WrittenSeries) -> Path:
    """Delete the middle slice file of a written series (a slice lost in transfer); return it."""
    lost = series.paths[len(series.paths) // 2]
    lost.unlink()
    logger.debug("deleted %s to leave a gap in its series", lost)
    return lost


def t1_signal(phantom: Phantom, *, noise_sigma: float, rng: np.random.Generator) -> np.ndarray:
    """T1-like MR signal of a phantom, float32 (rows, cols, slices), 0..4095, unitless.

    Magnitude of signal plus Gaussian noise, so the background is Rician as on a real magnitude
    image.
    """
    lookup = np.zeros(max(Tissue) + 1, dtype=np.float32)
    for tissue, signal in _T1_SIGNAL.items():
        lookup[tissue] = signal
    signal = lookup[phantom.tissue]
    noisy = np.abs(signal + rng.normal(0.0, noise_sigma, size=signal.shape).astype(np.float32))
    return np.clip(noisy, 0.0, 4095.0)
