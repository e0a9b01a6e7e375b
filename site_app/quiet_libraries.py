"""Library log records and warnings kept out of a site's logs while it touches patient data.

pydicom and highdicom quote header values (names, IDs, dates) in validation messages; the HTTP
stack quotes request URLs, which hold UIDs. ``libraries_silenced(*loggers)`` raises those
loggers above CRITICAL (their per-module children follow the root) and ignores warnings, then
restores both; what they would have said is reported by our own quarantine and error messages.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Iterator
from contextlib import contextmanager

__all__ = ["DICOM_LIBRARIES", "libraries_silenced"]

DICOM_LIBRARIES = ("pydicom", "highdicom")


@contextmanager
def libraries_silenced(*logger_names: str) -> Iterator[None]:
    """No log record from ``logger_names`` and no warning from anywhere inside the block."""
    loggers = [logging.getLogger(name) for name in logger_names]
    saved = [each.level for each in loggers]
    for each in loggers:
        each.setLevel(logging.CRITICAL + 1)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        for each, level in zip(loggers, saved, strict=True):
            each.setLevel(level)
