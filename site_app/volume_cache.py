"""The content-hash volume cache: decoded volumes and parsed headers, keyed by file digests.

A decoded series is one ``<key>.npy`` file (`VOLUME_SUFFIX`) whose key is a sha256 over
`CACHE_VERSION` and the content digests of its slice files and its label (`cache_key`): any
changed byte gives a new key, so a stale volume is never read. Parsed headers are kept by content
digest in ``headers.json`` (`HEADER_CACHE_NAME`). Both hold site data (HU, labels, UIDs and
patient pseudonyms) and must stay at the site, outside the data folder.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from jobs.atomic_files import atomic_write
from site_app.dicom_headers import PixelLayout, SliceHeader
from site_app.nifti_labels import MaskFile
from site_app.volumes import LabelledVolume, frozen_volume

__all__ = [
    "CACHE_VERSION",
    "HEADER_CACHE_NAME",
    "VOLUME_SUFFIX",
    "VolumeCache",
    "cache_key",
    "require_cache_dir",
]

logger = logging.getLogger(__name__)

CACHE_VERSION = "fedseg-ingest-v2"
"""Part of every cache key and of the header cache: bump it when decoding or `SliceHeader`
changes, so old cache files are not reused."""
HEADER_CACHE_NAME = "headers.json"
VOLUME_SUFFIX = ".npy"
"""A cached volume is one file of four consecutive .npy records: the version, HU (int16 when
whole, else float32), label (uint8) and geometry (spacing 3, orientation 6, origin 3; float64)."""
_PER_FILE_FIELDS = frozenset({"path", "digest", "stamp"})  # not cached: they belong to one file


def require_cache_dir(cache_dir: Path, root: Path) -> Path:
    """``cache_dir``, created if missing; refused inside the data folder ``root`` (only read) or
    when it is a file."""
    if cache_dir.resolve().is_relative_to(root.resolve()):
        raise ValueError(
            f"cache folder {cache_dir} lies inside the data folder {root}, which fedseg only "
            "reads; choose a cache folder outside it"
        )
    if cache_dir.exists() and not cache_dir.is_dir():
        raise NotADirectoryError(
            f"cache folder {cache_dir} is a file, not a folder; remove it or choose another path"
        )
    cache_dir.mkdir(parents=True, exist_ok=True)
    return cache_dir


def cache_key(slices: Sequence[SliceHeader], label: SliceHeader | MaskFile) -> str:
    """sha256 over the version tag and the content digests of the series' files (by path) and of
    its label (SEG or NIfTI): any changed byte gives a new key."""
    digest = hashlib.sha256(CACHE_VERSION.encode())
    for header in sorted(slices, key=lambda h: h.path):
        digest.update(header.digest.encode())
    kind = b"nifti:" if isinstance(label, MaskFile) else b"seg:"
    digest.update(kind + label.digest.encode())
    return digest.hexdigest()


class VolumeCache:
    """Decoded volumes as ``<key>.npy`` files (`VOLUME_SUFFIX`), and parsed headers by content
    digest in ``headers.json``; writes are atomic (temp file, then rename).

    The header cache lets a rerun over unchanged files skip parsing them: a file is still read
    and hashed, and a file whose bytes changed gets a new digest and is parsed again. It holds
    what `SliceHeader` holds (UIDs and patient pseudonyms, no names or dates) and, like the
    decoded volumes, must stay at the site.
    """

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self._headers_loaded: frozenset[str] = frozenset()

    def load_headers(self) -> dict[str, SliceHeader]:
        """Headers stored by an earlier run, by content digest ({} if none or unreadable)."""
        path = self.directory / HEADER_CACHE_NAME
        if not path.exists():
            return {}
        names = {f.name for f in dataclasses.fields(SliceHeader)} - _PER_FILE_FIELDS
        try:
            document = json.loads(path.read_text(encoding="utf-8"))
            if document.get("version") != CACHE_VERSION:
                return {}
            headers = {}
            for digest, fields in document["headers"].items():
                if set(fields) != names:
                    return {}
                values = {k: _tuples(v) for k, v in fields.items()}
                if values["pixel_layout"] is not None:
                    values["pixel_layout"] = PixelLayout(**values["pixel_layout"])
                headers[digest] = SliceHeader(path="", digest=digest, **values)
        except Exception as exc:
            logger.warning(
                "header cache %s is unreadable (%s); parsing every file again",
                path.name,
                type(exc).__name__,
            )
            return {}
        self._headers_loaded = frozenset(headers)
        return headers

    def store_headers(self, headers: Sequence[SliceHeader]) -> None:
        """Keep the headers of this run (only these: files gone since are forgotten)."""
        by_digest = {h.digest: h for h in headers}
        if frozenset(by_digest) == self._headers_loaded:
            return
        document = {
            "version": CACHE_VERSION,
            "headers": {
                digest: {
                    k: v for k, v in dataclasses.asdict(header).items() if k not in _PER_FILE_FIELDS
                }
                for digest, header in sorted(by_digest.items())
            },
        }
        try:
            self._write_atomically(
                HEADER_CACHE_NAME, lambda handle: handle.write(json.dumps(document).encode())
            )
        except OSError as exc:
            logger.warning(
                "could not write the header cache (%s); files will be parsed again next run",
                type(exc).__name__,
            )
            return
        self._headers_loaded = frozenset(by_digest)

    def _write_atomically(self, name: str, write) -> None:
        atomic_write(self.directory / name, write, durable=False, prefix=".")

    def load(self, cache_key: str, key: str) -> LabelledVolume | None:
        path = self.directory / f"{cache_key}{VOLUME_SUFFIX}"
        if not path.exists():
            return None
        try:
            with path.open("rb") as handle:
                version, image, label, geometry = (
                    np.load(handle, allow_pickle=False) for _ in range(4)
                )
            if str(version) != CACHE_VERSION:
                return None
            volume = frozen_volume(
                key, image, label, geometry[:3].tolist(), geometry[3:9].tolist(), geometry[9:]
            )
        except Exception as exc:
            logger.warning(
                "cache file %s for series %s is unreadable (%s); decoding again",
                path.name,
                key,
                type(exc).__name__,
            )
            return None
        if volume.image_hu.shape != volume.label.shape or volume.image_hu.ndim != 3:
            logger.warning("cache file %s for series %s is inconsistent; decoding again", path, key)
            return None
        logger.debug("series %s loaded from cache", key)
        return volume

    def store(self, cache_key: str, volume: LabelledVolume) -> None:
        # Whole HU that fit int16 (the usual CT case) are stored as such: half the bytes.
        as_int16 = volume.image_hu.astype(np.int16)
        exact = np.array_equal(as_int16, volume.image_hu)
        records = (
            np.array(CACHE_VERSION),
            as_int16 if exact else volume.image_hu,
            volume.label,
            np.array([*volume.spacing_mm, *volume.orientation, *volume.origin_mm]),
        )

        def write(handle) -> None:
            for record in records:
                np.save(handle, record, allow_pickle=False)

        try:
            self._write_atomically(f"{cache_key}{VOLUME_SUFFIX}", write)
        except OSError as exc:
            logger.warning(
                "could not write the cache for series %s (%s); it will be decoded again next run",
                volume.series_key,
                type(exc).__name__,
            )


def _tuples(value: object) -> object:
    """JSON lists back to the tuples `SliceHeader` holds, at any depth."""
    if isinstance(value, list):
        return tuple(_tuples(v) for v in value)
    if isinstance(value, dict):
        return {k: _tuples(v) for k, v in value.items()}
    return value
