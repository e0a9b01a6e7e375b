"""One patient's case folder: a good CT series with its lesion SEG, or one of the broken
patients (a CT series missing its middle slice, an MR series), plus the stray broken files placed
among a site's good cases. A ``CaseJob`` holds all a worker process needs (it pickles).

Volumes are (rows, cols, slices) in HU, spacings in mm; paths in summaries are relative to the
cohort's output folder.
"""

from __future__ import annotations

import dataclasses
import datetime
from collections.abc import Sequence
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path

import numpy as np

from simulator.broken_inputs import (
    BrokenInput,
    ExpectedReason,
    drop_middle_slice,
    t1_signal,
    write_non_dicom_file,
    write_truncated_copy,
)
from simulator.cohort_manifest import CaseSummary
from simulator.dicom_writer import (
    CtAcquisition,
    Equipment,
    ImageSeries,
    SeriesGeometry,
    WrittenSeries,
    deterministic_uid,
    write_ct_series,
    write_lesion_seg,
    write_mr_series,
)
from simulator.patients import PatientVisit
from simulator.phantom import Phantom, PhantomSpec, draw_lesion_count, make_phantom
from simulator.site_profiles import SiteProfile, slice_count
from site_app.dicom_series import series_key  # the key the site's quarantine uses, so both compare

__all__ = ["CaseJob", "CaseKind", "CaseWritten", "write_case", "write_stray_files"]

_MR_SLICE_THICKNESS_MM = 6.0
_CT_SERIES_NUMBER = 2
_MR_SERIES_NUMBER = 5


class CaseKind(StrEnum):
    """What one patient's case folder holds."""

    GOOD = "good"
    """A CT series with its lesion SEG."""
    MISSING_SLICE = "missing_slice"
    """A CT series that lost its middle slice, with a SEG still referencing all of it."""
    WRONG_MODALITY = "wrong_modality"
    """An MR series swept up with the CT studies."""


@dataclass(frozen=True, kw_only=True)
class CaseJob:
    """One patient's case folder to write: all a worker process needs (it pickles)."""

    kind: CaseKind
    visit: PatientVisit
    profile: SiteProfile
    case_dir: Path
    out_dir: Path


@dataclass(frozen=True, kw_only=True)
class CaseWritten:
    """What a worker wrote for one `CaseJob`."""

    case: CaseSummary | None
    """The good patient's summary; None for a broken one."""
    slice_paths: tuple[Path, ...] = ()
    """The CT slice files of a good patient."""
    broken: tuple[BrokenInput, ...] = ()


def write_case(job: CaseJob) -> CaseWritten:
    """One patient's case folder; runs in a worker process."""
    if job.kind is CaseKind.MISSING_SLICE:
        broken = _write_missing_slice_case(
            visit=job.visit, profile=job.profile, case_dir=job.case_dir, out_dir=job.out_dir
        )
        return CaseWritten(case=None, broken=tuple(broken))
    if job.kind is CaseKind.WRONG_MODALITY:
        broken = _write_wrong_modality_case(
            visit=job.visit, profile=job.profile, case_dir=job.case_dir, out_dir=job.out_dir
        )
        return CaseWritten(case=None, broken=tuple(broken))
    phantom, ct, seg_path = _write_ct_case(
        visit=job.visit, profile=job.profile, case_dir=job.case_dir
    )
    case = CaseSummary(
        case=job.case_dir.name,
        ct_series=_relative(job.case_dir / "CT", job.out_dir),
        seg=_relative(seg_path, job.out_dir),
        series_key=series_key(ct.datasets[0].SeriesInstanceUID),
        slices=len(ct.paths),
        lesion_count=phantom.lesion_count,
        lesion_voxels=int(phantom.lesion_mask.sum()),
    )
    return CaseWritten(case=case, slice_paths=ct.paths)


def _write_missing_slice_case(
    *, visit: PatientVisit, profile: SiteProfile, case_dir: Path, out_dir: Path
) -> list[BrokenInput]:
    """A CT series that lost its middle slice, with a SEG still referencing the full series."""
    _, series, seg_path = _write_ct_case(visit=visit, profile=profile, case_dir=case_dir)
    lost = drop_middle_slice(series)
    digest = series_key(series.datasets[0].SeriesInstanceUID)
    return [
        BrokenInput(
            path=_relative(case_dir / "CT", out_dir),
            expected_reason=ExpectedReason.MISSING_SLICES,
            series_key=digest,
            description=f"CT series without its middle slice ({lost.name})",
        ),
        BrokenInput(
            path=_relative(seg_path, out_dir),
            expected_reason=ExpectedReason.LABEL_WITHOUT_SERIES,
            series_key=digest,
            description="SEG referencing the CT series that has a missing slice",
        ),
    ]


def _write_wrong_modality_case(
    *, visit: PatientVisit, profile: SiteProfile, case_dir: Path, out_dir: Path
) -> list[BrokenInput]:
    """An MR series in `case-NNN/MR/`, with no SEG: an export that swept up the wrong study."""
    mr = _write_mr_case(visit=visit, profile=profile, case_dir=case_dir)
    return [
        BrokenInput(
            path=_relative(case_dir / "MR", out_dir),
            expected_reason=ExpectedReason.UNSUPPORTED_MODALITY,
            series_key=series_key(mr.datasets[0].SeriesInstanceUID),
            description="MR Image Storage series (Modality MR) in a CT-only federation",
        )
    ]


def write_stray_files(
    *,
    good_slices: Sequence[tuple[Path, ...]],
    cases: Sequence[CaseSummary],
    rng: np.random.Generator,
    out_dir: Path,
) -> list[BrokenInput]:
    """A truncated slice copy and a non-DICOM file, each inside a different good CT folder.

    `good_slices[i]` are the slice files of `cases[i]`; both series stay complete.
    """
    truncated_case, notes_case = (int(i) for i in rng.choice(len(cases), size=2, replace=False))
    slices = good_slices[truncated_case]
    source = slices[int(rng.integers(1, len(slices) - 1))]
    truncated = source.with_name(f"{source.stem}-copy.dcm")
    write_truncated_copy(source=source, destination=truncated)
    stray = good_slices[notes_case][0].parent / "notes.dcm"
    stray_kind = write_non_dicom_file(destination=stray, rng=rng)
    return [
        BrokenInput(
            path=_relative(truncated, out_dir),
            expected_reason=ExpectedReason.TRUNCATED,
            series_key=cases[truncated_case].series_key,
            description=f"first half of the bytes of {source.name}, as after a cut transfer",
        ),
        BrokenInput(
            path=_relative(stray, out_dir),
            expected_reason=ExpectedReason.NOT_DICOM,
            series_key=None,
            description=f"{stray_kind} saved with a .dcm name",
        ),
    ]


def _write_ct_case(
    *, visit: PatientVisit, profile: SiteProfile, case_dir: Path
) -> tuple[Phantom, WrittenSeries, Path]:
    """Phantom, CT series and lesion SEG of one patient; returns the SEG path last."""
    rng = visit.rng
    lesion_count = draw_lesion_count(
        prevalence=profile.lesion_prevalence, max_lesions=profile.max_lesions, rng=rng
    )
    contrast = rng.uniform(*profile.lesion_contrast_hu)
    if rng.random() < profile.hypodense_fraction:
        contrast = -contrast
    spec = PhantomSpec(
        rows=profile.matrix,
        cols=profile.matrix,
        slices=profile.slices,
        pixel_spacing_mm=profile.pixel_spacing_mm,
        slice_spacing_mm=profile.slice_thickness_mm,
        noise_sigma_hu=profile.noise_sigma_hu,
        intensity_offset_hu=profile.intensity_offset_hu,
        lesion_count=lesion_count,
        lesion_radius_mm=profile.lesion_radius_mm,
        lesion_contrast_hu=float(contrast),
    )
    phantom = make_phantom(spec, rng=rng)
    series = ImageSeries(
        patient=visit.identity,
        study=visit.study,
        equipment=Equipment(
            manufacturer=profile.scanner.manufacturer,
            model_name=profile.scanner.model_name,
            institution_name=profile.institution_name,
        ),
        geometry=SeriesGeometry.centred(
            shape=spec.shape,
            pixel_spacing_mm=profile.pixel_spacing_mm,
            slice_thickness_mm=profile.slice_thickness_mm,
            table_z_mm=_table_position_mm(rng),
        ),
        series_uid=deterministic_uid(*visit.uid_key, "ct-series"),
        series_number=_CT_SERIES_NUMBER,
        description=f"ABDOMEN PORTAL {profile.slice_thickness_mm:g}mm",
        transfer_syntax_uid=profile.transfer_syntax_uid,
    )
    ct = write_ct_series(
        hu=phantom.hu,
        series=series,
        acquisition=CtAcquisition(kvp=profile.scanner.kvp, rescale=profile.scanner.rescale),
        out_dir=case_dir / "CT",
    )
    annotated = datetime.datetime.combine(
        visit.study.date + datetime.timedelta(days=int(rng.integers(1, 15))),
        datetime.time(hour=int(rng.integers(8, 18)), minute=int(rng.integers(60))),
    )
    seg_path = case_dir / "SEG" / "seg.dcm"
    write_lesion_seg(
        mask=phantom.lesion_mask,
        source_images=ct.datasets,
        series_uid=deterministic_uid(*visit.uid_key, "seg-series"),
        content_datetime=annotated,
        out_path=seg_path,
    )
    return phantom, ct, seg_path


def _write_mr_case(*, visit: PatientVisit, profile: SiteProfile, case_dir: Path) -> WrittenSeries:
    """A T1 MR series of the same anatomy, as exported by mistake with the CT studies."""
    rng = visit.rng
    slices = slice_count(matrix=profile.matrix, slice_thickness_mm=_MR_SLICE_THICKNESS_MM)
    spec = PhantomSpec(
        rows=profile.matrix,
        cols=profile.matrix,
        slices=slices,
        pixel_spacing_mm=profile.pixel_spacing_mm,
        slice_spacing_mm=_MR_SLICE_THICKNESS_MM,
        lesion_count=draw_lesion_count(
            prevalence=profile.lesion_prevalence, max_lesions=profile.max_lesions, rng=rng
        ),
        lesion_radius_mm=profile.lesion_radius_mm,
    )
    phantom = make_phantom(spec, rng=rng)
    study = dataclasses.replace(visit.study, description="MR ABDOMEN")
    series = ImageSeries(
        patient=visit.identity,
        study=study,
        equipment=Equipment(
            manufacturer=profile.scanner.manufacturer,
            model_name=profile.scanner.mr_model_name,
            institution_name=profile.institution_name,
        ),
        geometry=SeriesGeometry.centred(
            shape=spec.shape,
            pixel_spacing_mm=profile.pixel_spacing_mm,
            slice_thickness_mm=_MR_SLICE_THICKNESS_MM,
            table_z_mm=_table_position_mm(rng),
        ),
        series_uid=deterministic_uid(*visit.uid_key, "mr-series"),
        series_number=_MR_SERIES_NUMBER,
        description="AX T1 GRE",
        transfer_syntax_uid=profile.transfer_syntax_uid,
    )
    return write_mr_series(
        intensity=t1_signal(phantom, noise_sigma=25.0, rng=rng),
        series=series,
        out_dir=case_dir / "MR",
    )


def _table_position_mm(rng: np.random.Generator) -> float:
    """Scanner table z of the volume centre, mm; differs per patient as on a real scanner."""
    return round(float(rng.uniform(-450.0, -150.0)), 1)


def _relative(path: Path, root: Path) -> str:
    return path.relative_to(root).as_posix()
