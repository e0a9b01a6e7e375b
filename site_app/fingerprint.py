"""A site's fingerprint of the data one job trained on: aggregates that later data is compared
with (`site_app.drift`, ``fedseg site drift``).

Only counts, shares, quantiles and a histogram: no per-patient value, no identifier, no date, no
UID, no path. It still stays at the site, beside the job's quarantine list in the site's
``private_dir``, and is never sent to the server.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Annotated, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from jobs.atomic_files import atomic_write
from jobs.validation_errors import format_validation_error
from site_app.data_summary import summarize
from site_app.ingestion import IngestionResult
from site_app.volumes import LabelledVolume

__all__ = [
    "BODY_THRESHOLD_HU",
    "FINGERPRINT_FILE",
    "HU_QUANTILE_LEVELS",
    "DataFingerprint",
    "FingerprintError",
    "HuProfile",
    "LabelProfile",
    "fingerprint_of",
    "fingerprint_path",
    "job_fingerprints",
    "read_fingerprint",
    "write_fingerprint",
]

FORMAT = "fedseg-data-fingerprint-v1"
FINGERPRINT_FILE = "fingerprint.json"

BODY_THRESHOLD_HU = -500.0
"""Voxels above this are "body": air (-1000 HU) and lung (about -800 HU) are left out, so the
HU profile does not move with the share of air a field of view holds."""
HU_QUANTILE_LEVELS = (1, 5, 10, 25, 50, 75, 90, 95, 99)
"""Percentiles of body-voxel HU kept in a fingerprint."""
_HU_MAX = 3071  # the top of a 12-bit CT range; brighter voxels are counted here
HISTOGRAM_BIN_HU = 25.0
"""Width of the kept HU histogram's bins; the first starts at `BODY_THRESHOLD_HU`."""
HISTOGRAM_TOP_HU = 1500.0
"""The last bin holds every body voxel from here up (bone, metal)."""
SPACING_QUANTILE_LEVELS = (0, 25, 50, 75, 100)
UNKNOWN = "unknown"
"""The category of a vendor or thickness a series does not state."""

Share = Annotated[float, Field(ge=0.0, le=1.0)]


class FingerprintError(ValueError):
    """A fingerprint file cannot be read; the message names the file and what to do."""


class _Record(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class HuProfile(_Record):
    """Body-voxel HU (voxels above `BODY_THRESHOLD_HU`, all usable volumes pooled)."""

    body_voxels: Annotated[int, Field(ge=1)]
    quantiles_hu: dict[str, float]
    """Percentile (a `HU_QUANTILE_LEVELS` entry, as text) -> HU, at 1 HU resolution."""
    histogram_shares: tuple[Share, ...]
    """Share of body voxels per `HISTOGRAM_BIN_HU`-wide bin from `BODY_THRESHOLD_HU`; the last
    bin holds everything from `HISTOGRAM_TOP_HU` up. Sums to 1."""


class LabelProfile(_Record):
    prevalence: Share
    """Share of usable volumes with at least one lesion voxel."""
    lesion_voxel_fraction: Share
    """Mean over volumes of lesion voxels / all voxels."""


class DataFingerprint(_Record):
    """What a site's data looked like, in aggregate (volumes as ingested, before resampling).

    Spacing quantiles are over series (percentile as text -> mm; ``in_plane`` is the mean of
    row and column spacing); vendor and slice-thickness mixes are shares of patients (their
    first series, as `site_app.volumes.PatientRecord` reports them), a thickness named like
    "2.5 mm" (rounded to 0.01 mm). Mixes sum to 1.
    """

    format: Literal["fedseg-data-fingerprint-v1"] = FORMAT
    job: str
    series: Annotated[int, Field(ge=1)]
    patients: Annotated[int, Field(ge=1)]
    in_plane_spacing_mm: dict[str, float]
    slice_spacing_mm: dict[str, float]
    vendor_mix: dict[str, Share]
    slice_thickness_mix: dict[str, Share]
    hu: HuProfile | None
    """None when no volume has a body voxel (an all-air export)."""
    labels: LabelProfile


# -- computing (pure) ----------------------------------------------------------------------------


def _mix(values: Iterable[str]) -> dict[str, float]:
    counts = Counter(values)
    total = sum(counts.values())
    return {name: counts[name] / total for name in sorted(counts)}


def _spacing_quantiles(values: list[float]) -> dict[str, float]:
    levels = np.percentile(np.asarray(values, dtype=np.float64), SPACING_QUANTILE_LEVELS)
    return {
        str(level): round(float(v), 4)
        for level, v in zip(SPACING_QUANTILE_LEVELS, levels, strict=True)
    }


def _body_hu_counts(volumes: Iterable[LabelledVolume]) -> np.ndarray:
    """Body voxels per whole HU from `BODY_THRESHOLD_HU` to `_HU_MAX`, summed over volumes (one
    volume in memory at a time: a site's series do not fit together)."""
    low = int(BODY_THRESHOLD_HU)
    counts = np.zeros(_HU_MAX - low + 1, dtype=np.int64)
    for volume in volumes:
        hu = volume.image_hu
        body = np.rint(hu[hu > BODY_THRESHOLD_HU]).astype(np.int64)
        counts += np.bincount(np.clip(body, low, _HU_MAX) - low, minlength=counts.size)
    return counts


def _hu_profile(counts: np.ndarray) -> HuProfile | None:
    total = int(counts.sum())
    if total == 0:
        return None
    cumulative = np.cumsum(counts)
    low = int(BODY_THRESHOLD_HU)
    quantiles = {
        str(level): float(low + int(np.searchsorted(cumulative, level / 100 * total)))
        for level in HU_QUANTILE_LEVELS
    }
    width = int(HISTOGRAM_BIN_HU)
    top = int(HISTOGRAM_TOP_HU) - low  # index of the first HU counted in the last bin
    coarse = np.add.reduceat(counts[:top], np.arange(0, top, width))
    coarse = np.append(coarse, counts[top:].sum())
    return HuProfile(
        body_voxels=total,
        quantiles_hu=quantiles,
        histogram_shares=tuple(round(float(s), 8) for s in coarse / total),
    )


def fingerprint_of(result: IngestionResult, *, job: str) -> DataFingerprint:
    """The fingerprint of the usable volumes ``ingest_site`` returned (pure; no I/O).

    Raises:
        FingerprintError: ``result`` holds no usable volume (there is nothing to describe).
    """
    volumes = [volume for patient in result.patients for volume in patient.volumes]
    if not volumes:
        raise FingerprintError(
            "no usable labelled series to fingerprint; run `fedseg site check --data DIR` to "
            "see what was quarantined and why"
        )
    summary = summarize(result)  # label shares and counts, as `fedseg site check` shows them
    patients = [p for p in result.patients if p.volumes]
    return DataFingerprint(
        job=job,
        series=summary.series_usable,
        patients=summary.patients_usable,
        in_plane_spacing_mm=_spacing_quantiles(
            [(v.spacing_mm[0] + v.spacing_mm[1]) / 2 for v in volumes]
        ),
        slice_spacing_mm=_spacing_quantiles([v.spacing_mm[2] for v in volumes]),
        vendor_mix=_mix((p.manufacturer or "").strip() or UNKNOWN for p in patients),
        slice_thickness_mix=_mix(
            f"{round(p.slice_thickness_mm, 2):g} mm" if p.slice_thickness_mm else UNKNOWN
            for p in patients
        ),
        hu=_hu_profile(_body_hu_counts(volumes)),
        labels=LabelProfile(
            prevalence=summary.label_prevalence, lesion_voxel_fraction=summary.lesion_voxel_fraction
        ),
    )


def histogram_edges_hu(bins: int) -> np.ndarray:
    """Left edges (HU) of a `HuProfile.histogram_shares` of ``bins`` bins (the last is open)."""
    return BODY_THRESHOLD_HU + HISTOGRAM_BIN_HU * np.arange(bins)


# -- files (the edge) ----------------------------------------------------------------------------


def fingerprint_path(private_dir: Path, job: str) -> Path:
    """``<private_dir>/<job>/fingerprint.json``, beside the job's ``quarantine.json``."""
    return Path(private_dir) / job / FINGERPRINT_FILE


def write_fingerprint(fingerprint: DataFingerprint, path: Path) -> None:
    """Write ``fingerprint`` as JSON (replacing any older one atomically)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, (fingerprint.model_dump_json(indent=2) + "\n").encode(), durable=False)


def read_fingerprint(path: Path) -> DataFingerprint:
    """Read a file `write_fingerprint` wrote.

    Raises:
        FileNotFoundError: no file at ``path``.
        FingerprintError: the file is not a fingerprint of this fedseg version.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"{path}: no fingerprint there; a site writes one per job when the job starts "
            "(<private_dir>/<job>/fingerprint.json)"
        )
    try:
        document = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise FingerprintError(
            f"{path}: not valid JSON ({error}); it is not a fingerprint"
        ) from None
    if not isinstance(document, Mapping) or document.get("format") != FORMAT:
        found = document.get("format") if isinstance(document, Mapping) else type(document).__name__
        raise FingerprintError(
            f"{path}: expected format {FORMAT!r}, found {found!r}; compare with a fingerprint "
            "this fedseg version wrote (a job run with it writes one)"
        )
    try:
        return DataFingerprint.model_validate(document)
    except ValidationError as error:
        raise FingerprintError(
            format_validation_error(
                error,
                str(path),
                document="the data fingerprint",
                fix="the file was edited or damaged; a job run with this fedseg writes a new one",
            )
        ) from None


def job_fingerprints(private_dir: Path) -> list[Path]:
    """Every job's fingerprint under ``private_dir``, oldest first (by modification time)."""
    found = Path(private_dir).glob(f"*/{FINGERPRINT_FILE}")
    return sorted((p for p in found if p.is_file()), key=lambda p: (p.stat().st_mtime, str(p)))
