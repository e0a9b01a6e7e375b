"""The DICOM SEG a site writes for a model's prediction, and storing it in the site's own PACS.

One BINARY SEG (highdicom) per CT series, on the series' own frames: it references the source
instances, copies their patient, study and frame-of-reference modules (highdicom does that, and
nothing else is copied), and says which model made it in the segment's Segmentation Algorithm
Identification Sequence (0062,0007; the Algorithm Identification Macro, PS3.3 Table 10-19):
AlgorithmName = the job's name, AlgorithmVersion = the fedseg version that ran the model,
AlgorithmParameters = ``model_sha256=<hex>,manifest_sha256=<hex>,signer=<server>``. Storing is
STOW-RS to the hospital's own PACS, followed by a read-back of what the PACS kept.
"""

from __future__ import annotations

import datetime
import importlib.metadata
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import highdicom as hd
import numpy as np
from pydicom import Dataset, dcmread
from pydicom.sr.codedict import codes

from jobs.atomic_files import atomic_write
from site_app.dicomweb_search import search_client
from site_app.dicomweb_source import DicomwebSource, ImportLimits
from site_app.pacs_errors import http_errors, transport_quiet

__all__ = [
    "ModelProvenance",
    "SegStoreError",
    "StoredSeg",
    "WrittenSeg",
    "algorithm_parameters",
    "build_seg",
    "fedseg_version",
    "store_segs",
    "write_seg",
]

logger = logging.getLogger(__name__)

SEGMENT_LABEL = "lesion"
SEG_SERIES_NUMBER = 9901
"""SeriesNumber of every SEG fedseg writes: high, so a viewer lists it after the CT's series."""
SERIES_DESCRIPTION_LIMIT = 64  # LO
SOP_INSTANCE_UID_TAG = "00080018"
UNPROVEN_SIGNER = "simulation-unproven"
"""``signer=`` value for a simulation-signed model: the files are intact, the signer unknown."""


def fedseg_version() -> str:
    try:
        return importlib.metadata.version("fedseg")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


@dataclass(frozen=True, kw_only=True)
class ModelProvenance:
    """What a SEG records about the model that made it (all public: no patient data).

    ``signer`` is the federation's server proven to have signed the manifest (root CA and
    name checked), or None for a simulation signature (integrity only).
    """

    job: str
    model_sha256: str
    manifest_sha256: str
    signer: str | None


def algorithm_parameters(provenance: ModelProvenance) -> dict[str, str]:
    """The AlgorithmParameters of the SEG's segment, as highdicom writes them (``k=v,k=v``)."""
    return {
        "model_sha256": provenance.model_sha256,
        "manifest_sha256": provenance.manifest_sha256,
        "signer": provenance.signer or UNPROVEN_SIGNER,
    }


def build_seg(
    *,
    source_images: Sequence[Dataset],
    mask: np.ndarray,
    provenance: ModelProvenance,
    created: datetime.datetime | None = None,
) -> hd.seg.Segmentation:
    """A BINARY SEG of ``mask`` on ``source_images``.

    Args:
        source_images: the CT series' datasets (headers suffice), in slice order.
        mask: (rows, cols, slices) binary, slice k on ``source_images[k]``.
        provenance: the model, recorded in the segment's Algorithm Identification Sequence.
        created: content and series date/time (default: now, local time).

    Frames without lesion are left out (highdicom's ``omit_empty_frames``); a mask without any
    lesion keeps every frame, so that "nothing found" is a SEG too.

    Raises:
        ValueError: ``mask`` does not have one slice per source image of their size.
    """
    rows, columns = int(source_images[0].Rows), int(source_images[0].Columns)
    if mask.shape != (rows, columns, len(source_images)):
        raise ValueError(
            f"mask: expected shape {(rows, columns, len(source_images))} (rows, cols, one slice "
            f"per source image), got {mask.shape}"
        )
    created = created or datetime.datetime.now()
    version = fedseg_version()
    algorithm = hd.AlgorithmIdentificationSequence(
        name=provenance.job,
        family=codes.DCM.ArtificialIntelligence,
        version=version,
        source="fedseg",
        parameters=algorithm_parameters(provenance),
    )
    segment = hd.seg.SegmentDescription(
        segment_number=1,
        segment_label=SEGMENT_LABEL,
        segmented_property_category=codes.SCT.MorphologicallyAbnormalStructure,
        segmented_property_type=codes.SCT.Lesion,
        algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
        algorithm_identification=algorithm,
    )
    frames = np.ascontiguousarray(np.moveaxis(mask.astype(bool), 2, 0))  # (slices, rows, cols)
    description = f"fedseg {provenance.job} lesions (automatic)"[:SERIES_DESCRIPTION_LIMIT]
    return hd.seg.Segmentation(
        source_images=list(source_images),
        pixel_array=frames,
        segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=[segment],
        series_instance_uid=hd.UID(),
        series_number=SEG_SERIES_NUMBER,
        sop_instance_uid=hd.UID(),
        instance_number=1,
        manufacturer="fedseg",
        manufacturer_model_name=provenance.job,
        software_versions=version,
        device_serial_number=provenance.model_sha256[:16],
        series_description=description,
        content_label="LESION",
        content_description="automatic lesion segmentation by a federated model",
        omit_empty_frames=bool(frames.any()),
        content_date=created.date(),
        content_time=created.time().replace(microsecond=0),
        series_date=created.date(),
        series_time=created.time().replace(microsecond=0),
    )


@dataclass(frozen=True)
class WrittenSeg:
    """One SEG written for one series. UIDs are kept in memory only (to store and read it back);
    like the file itself, they never go to logs or printed output."""

    series_key: str
    path: Path
    frames: int
    lesion_voxels: int
    study_uid: str
    series_uid: str
    sop_instance_uid: str


def write_seg(seg: hd.seg.Segmentation, *, path: Path, series_key: str, lesion_voxels: int):
    """Write ``seg`` to ``path`` whole (temporary file, then rename; readable by this user only)."""
    atomic_write(path, lambda handle: seg.save_as(handle, enforce_file_format=True), durable=True)
    return WrittenSeg(
        series_key=series_key,
        path=path,
        frames=int(seg.NumberOfFrames),
        lesion_voxels=lesion_voxels,
        study_uid=str(seg.StudyInstanceUID),
        series_uid=str(seg.SeriesInstanceUID),
        sop_instance_uid=str(seg.SOPInstanceUID),
    )


# --- storing in the site's PACS (STOW-RS) ---------------------------------------------------------


class SegStoreError(Exception):
    """The PACS did not take a SEG, or kept something else than was sent."""


@dataclass(frozen=True)
class StoredSeg:
    series_key: str
    frames: int
    """NumberOfFrames of the instance the PACS returns for the SEG's SeriesInstanceUID."""


def store_segs(source: DicomwebSource, written: Sequence[WrittenSeg]) -> list[StoredSeg]:
    """STOW-RS each SEG to ``source`` (the PACS the series came from), then search the PACS for
    its SeriesInstanceUID and retrieve the instance's metadata: the PACS must hold exactly that
    instance, a SEG with as many frames as was written.

    Raises:
        PacsImportError: the PACS cannot be reached or refuses (naming the server and the fix).
        SegStoreError: the PACS did not keep what was sent (naming the series by its key).
    """
    client = search_client(source, ImportLimits())
    stored = []
    with transport_quiet():
        for seg in written:
            with http_errors(source, f"storing the SEG of series {seg.series_key}"):
                answer = client.store_instances(
                    datasets=[dcmread(seg.path)], study_instance_uid=seg.study_uid
                )
            if answer is not None and answer.get("FailedSOPSequence"):
                raise SegStoreError(
                    f"the PACS refused the SEG of series {seg.series_key} (STOW-RS "
                    "FailedSOPSequence); see the PACS's log"
                )
            with http_errors(source, f"reading back the SEG of series {seg.series_key}"):
                found = client.search_for_instances(
                    study_instance_uid=seg.study_uid, series_instance_uid=seg.series_uid
                )
                metadata = client.retrieve_instance_metadata(
                    study_instance_uid=seg.study_uid,
                    series_instance_uid=seg.series_uid,
                    sop_instance_uid=seg.sop_instance_uid,
                )
            stored.append(_checked_copy(seg, found, metadata))
            logger.info("stored the SEG of series %s in the PACS and read it back", seg.series_key)
    return stored


def _checked_copy(seg: WrittenSeg, found: Sequence[dict], metadata: dict) -> StoredSeg:
    """What the PACS lists in the SEG's series and returns for its instance, against what was
    sent."""
    sops = [(item.get(SOP_INSTANCE_UID_TAG) or {}).get("Value", [None])[0] for item in found]
    if sops != [seg.sop_instance_uid]:
        raise SegStoreError(
            f"after storing the SEG of series {seg.series_key}, the PACS lists {len(sops)} "
            "instance(s) in the SEG's series instead of the one sent; check the PACS"
        )
    kept = Dataset.from_json(metadata)
    modality, frames = kept.get("Modality"), int(kept.get("NumberOfFrames", 0) or 0)
    if (
        modality != "SEG"
        or frames != seg.frames
        or kept.get("SOPInstanceUID") != seg.sop_instance_uid
    ):
        raise SegStoreError(
            f"the PACS returns the SEG of series {seg.series_key} as modality {modality} with "
            f"{frames} frame(s), not the SEG of {seg.frames} frame(s) that was sent; check the PACS"
        )
    return StoredSeg(series_key=seg.series_key, frames=frames)
