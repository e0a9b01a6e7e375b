"""DICOM SEG labels: pair each SEG with the CT series it references, and decode it to a binary
lesion mask (rows, cols, slices) uint8 on that series' slices.

Pairing is pure (headers in, pairs and quarantine entries out); decoding reads the SEG with
highdicom. Problems name the series by `series_key` and files by relative path, never patient
data.
"""

from __future__ import annotations

from pathlib import Path

import highdicom as hd
import numpy as np

from site_app.dicom_headers import SliceHeader
from site_app.dicom_series import SeriesGeometry, SeriesProblem, series_key
from site_app.quarantine import QuarantineEntry, QuarantineReason, describe_error

__all__ = ["decode_seg_mask", "pair_segs"]

_FRACTIONAL_LESION_THRESHOLD = 0.5


def pair_segs(
    segs: list[SliceHeader],
    valid: dict[str, SeriesGeometry],
    rejected: dict[str, QuarantineReason],
) -> tuple[dict[str, SliceHeader], list[QuarantineEntry]]:
    """Match each SEG to the valid CT series it references (first SEG by path wins)."""
    labels: dict[str, SliceHeader] = {}
    entries = []

    def refuse(seg: SliceHeader, reason: QuarantineReason, detail: str, key: str | None) -> None:
        entries.append(QuarantineEntry(seg.path, reason, detail, key))

    for seg in sorted(segs, key=lambda h: h.path):
        referenced = sorted(set(seg.referenced_series_uids))
        if len(referenced) != 1:
            refuse(
                seg,
                QuarantineReason.LABEL_WITHOUT_SERIES,
                "the SEG does not name the series it labels (no ReferencedSeriesSequence); "
                "re-export it from the annotation tool"
                if not referenced
                else f"the SEG labels {len(referenced)} series at once; fedseg expects one SEG "
                "per CT series",
                None,
            )
            continue
        uid = referenced[0]
        key = series_key(uid)
        if uid in rejected:
            refuse(
                seg,
                QuarantineReason.LABEL_WITHOUT_SERIES,
                f"labels series {key}, which was quarantined ({rejected[uid].value}); fix that "
                "series (see its entry) and re-run",
                key,
            )
        elif uid not in valid:
            refuse(
                seg,
                QuarantineReason.LABEL_WITHOUT_SERIES,
                f"labels series {key}, which is not in the data folder; export the CT series "
                "together with its SEG",
                key,
            )
        elif seg.patient_key != valid[uid].slices[0].patient_key:
            refuse(
                seg,
                QuarantineReason.LABEL_WITHOUT_SERIES,
                f"labels series {key} but names a different patient than that series; check "
                "which patient the SEG belongs to",
                key,
            )
        elif uid in labels:
            first = labels[uid]
            refuse(
                seg,
                QuarantineReason.DUPLICATE_INSTANCE,
                f"byte-identical copy of {first.path}; the copy is ignored"
                if seg.digest == first.digest
                else f"a second SEG for series {key}; only {first.path} is used (remove one of "
                "them if the other is the right label)",
                key,
            )
        else:
            labels[uid] = seg
    return labels, entries


def decode_seg_mask(
    root: Path, seg_header: SliceHeader, geometry: SeriesGeometry, key: str
) -> np.ndarray | SeriesProblem:
    """Binary lesion mask (rows, cols, slices) uint8 aligned with ``geometry.slices``.

    Any non-zero segment counts as lesion (fractional SEGs: value >= 0.5); CT slices without a
    SEG frame are empty.
    """
    first = geometry.slices[0]
    try:
        seg = hd.seg.segread(root / seg_header.path)
        seg.get_stored_frame(1)  # decode one frame here, so a codec failure is told from a misfit
    except Exception as exc:
        return SeriesProblem(
            QuarantineReason.UNDECODABLE_PIXELS,
            f"the SEG could not be decoded by highdicom ({describe_error(exc)}); re-export it from "
            "the annotation tool",
        )
    if (int(seg.Rows), int(seg.Columns)) != (first.rows, first.columns):
        return SeriesProblem(
            QuarantineReason.LABEL_SIZE_MISMATCH,
            f"SEG frames are {seg.Rows}x{seg.Columns} pixels but the slices of series {key} are "
            f"{first.rows}x{first.columns}: the label was drawn on another image; re-export the "
            "SEG for this series",
        )
    in_series = [h.sop_instance_uid for h in geometry.slices]
    foreign = {sop for _, _, sop in seg.get_source_image_uids()} - set(in_series)
    if foreign:
        return SeriesProblem(
            QuarantineReason.LABEL_SIZE_MISMATCH,
            f"the SEG labels {len(foreign)} image(s) that are not among the {len(in_series)} "
            f"slices of series {key}: the series is incomplete or the SEG was made on another "
            "export of it",
        )
    try:
        pixels = seg.get_pixels_by_source_instance(
            source_sop_instance_uids=in_series,
            assert_missing_frames_are_empty=True,
            skip_overlap_checks=True,
        )
    except Exception as exc:
        return SeriesProblem(
            QuarantineReason.LABEL_SIZE_MISMATCH,
            f"the SEG frames could not be placed on the slices of series {key} "
            f"({describe_error(exc)}); re-export the SEG for this series",
        )
    expected = (len(in_series), first.rows, first.columns)
    if pixels.ndim != 4 or pixels.shape[:3] != expected:
        return SeriesProblem(
            QuarantineReason.LABEL_SIZE_MISMATCH,
            f"the SEG decoded to shape {pixels.shape}, expected {expected} + segments for "
            f"series {key}; re-export the SEG for this series",
        )
    lesion = (
        pixels >= _FRACTIONAL_LESION_THRESHOLD
        if np.issubdtype(pixels.dtype, np.floating)
        else pixels > 0
    )
    return _slices_last(lesion.any(axis=-1))


def _slices_last(mask: np.ndarray) -> np.ndarray:
    """A (slices, rows, cols) boolean mask as contiguous uint8 (rows, cols, slices). Only slices
    holding a lesion are copied: lesions are sparse, and a full transposing copy of a byte
    volume costs more than the SEG read itself."""
    out = np.zeros((*mask.shape[1:], mask.shape[0]), dtype=np.uint8)
    for k in np.flatnonzero(mask.any(axis=(1, 2))):
        out[:, :, k] = mask[k]
    return out
