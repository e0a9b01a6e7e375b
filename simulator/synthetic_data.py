"""Generate synthetic cohorts: per-site folders of real CT DICOM series with lesion SEGs.

Sites differ in scanner, geometry, noise, lesions and patient mix; each also gets a few broken
inputs that ingestion must quarantine. A public cohort (`generate_public_cohort`) stands for a
public challenge dataset: other vendors, calibration and larger, brighter lesions, no broken
inputs. Seeded and deterministic; a PHI-free manifest.json describes what was written and what
each broken input must be rejected for.

Size of the data. Every series is `matrix` x `matrix` pixels (64 by default) of 5.0-6.25 mm, a
320-400 mm field of view, about the 5 mm voxels training resamples to: a larger matrix would
only be averaged away (and 32 keeps tests fast). Slices cover 200 mm cranio-caudally, the phantom's
whole liver with a margin and more than a 32-voxel crop at 5 mm, at the site's thickness
(1.5, 2.5, 3.0, 4.0 or 5.0 mm: 40-96 slices at matrix 64, at most 3/2 matrix, so the 1.5 mm site
covers 144 mm). Thin slices are few because they only cost files: a 1.5 mm series needs 3.3x the
files of a 5 mm one, and training averages them to 5 mm anyway. Every slice is a real CT Image
Storage file, and every SEG a real highdicom SEG with one frame per slice.

Speed. Patients are written by a pool of processes (one per CPU; `workers`), each patient from
its own seeded generator, so the bytes do not depend on the number of workers or the order in
which they finish. Slices of one series share one encoded template (`dicom_slice_encoder`).
The SEG, built by highdicom, is then most of the time: about 1.5 ms per frame.

This module lays cohorts out (sites, case numbers, generator streams) and summarises them;
beside it: `cohort_manifest` (parameters, summaries, manifest.json), `patients` (identities and
visits), `case_writer` (one case folder, good or broken), `case_workers` (the process pool),
`site_profiles`, `phantom`, `broken_inputs` and `dicom_writer`.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from simulator.broken_inputs import BrokenInput
from simulator.case_workers import write_cases
from simulator.case_writer import CaseJob, CaseKind, write_stray_files
from simulator.cohort_manifest import (
    PUBLIC_FOLDER,
    CaseSummary,
    Cohort,
    FederationDataSummary,
    GenerationParameters,
    PublicCentreSummary,
    PublicCohortParameters,
    PublicCohortSummary,
    SiteSummary,
    by_case,
    existing_manifest,
    write_manifest,
)
from simulator.patients import IdentityFactory, new_visit, synthetic_identity
from simulator.site_profiles import SiteProfile, public_profiles, site_profiles

__all__ = ["generate_federation_data", "generate_public_cohort", "write_federation"]

logger = logging.getLogger(__name__)

# Generator stream ids (site_profiles uses 0, 1 and 4): every patient, site layout and public
# patient draws from its own stream, so no two of them can share data.
_PATIENT_STREAM = 2
_SITE_LAYOUT_STREAM = 3
_PUBLIC_PATIENT_STREAM = 5
_PUBLIC_LAYOUT_STREAM = 6


def generate_federation_data(
    *,
    out_dir: Path,
    sites: int = 3,
    patients_per_site: int = 12,
    seed: int = 0,
    matrix: int = 64,
    progress: bool = False,
    workers: int | None = None,
) -> FederationDataSummary:
    """Write synthetic DICOM data for `sites` hospitals into `out_dir/site-K/`.

    Layout: `site-K/case-NNN/CT/slice-NNN.dcm` (one CT file per slice, `matrix` x `matrix`
    pixels) and `site-K/case-NNN/SEG/seg.dcm`, plus per site two extra patients (one with a
    missing slice, one MR series) and two broken files among the good cases; `manifest.json`
    lists everything with the quarantine reason each broken input must get.

    Args:
        out_dir: empty (or missing) folder; a folder holding this exact federation is reused.
        sites: number of hospitals.
        patients_per_site: good patients per site (each with a CT series and a SEG).
        seed: makes the output byte-identical across runs; different seeds give different data.
        matrix: rows = columns of every CT slice.
        progress: show a progress bar per patient.
        workers: processes writing patients; None = one per CPU (fewer for small federations).
            The files do not depend on it.

    Raises:
        ValueError: a parameter is out of range.
        OutputFolderNotEmptyError: `out_dir` holds anything else.
    """
    parameters = GenerationParameters(
        sites=sites, patients_per_site=patients_per_site, seed=seed, matrix=matrix
    )
    return write_federation(
        parameters=parameters, out_dir=out_dir, progress=progress, workers=workers
    )


def write_federation(
    *,
    parameters: GenerationParameters,
    out_dir: Path,
    progress: bool = False,
    identity_factory: IdentityFactory = synthetic_identity,
    workers: int | None = None,
) -> FederationDataSummary:
    """`generate_federation_data` with a pluggable patient identity (tests inject names).

    `identity_factory` is called in this process, once per patient in site and patient order;
    only the writing of the files goes to the worker processes.
    """
    out_dir = Path(out_dir)
    manifest = existing_manifest(out_dir, Cohort.FEDERATION, dataclasses.asdict(parameters))
    if manifest is not None:
        logger.info("%s already holds this synthetic federation; not regenerating", out_dir)
        return FederationDataSummary.from_manifest(manifest, out_dir=out_dir)

    profiles = site_profiles(seed=parameters.seed, sites=parameters.sites, matrix=parameters.matrix)
    good = parameters.patients_per_site
    layouts, jobs = {}, []
    for profile in profiles:
        layout_rng = np.random.default_rng([parameters.seed, _SITE_LAYOUT_STREAM, profile.index])
        # Broken patients get case numbers among the good ones, as they would in a real export.
        case_numbers = [int(n) + 1 for n in layout_rng.permutation(good + 2)]
        layouts[profile.name] = layout_rng
        kinds = [CaseKind.GOOD] * good + [CaseKind.MISSING_SLICE, CaseKind.WRONG_MODALITY]
        for ordinal, kind in enumerate(kinds):
            rng = np.random.default_rng([parameters.seed, _PATIENT_STREAM, profile.index, ordinal])
            uid_key = ("seed", parameters.seed, "matrix", parameters.matrix, profile.name, ordinal)
            case_dir = out_dir / profile.name / f"case-{case_numbers[ordinal]:03d}"
            jobs.append(
                CaseJob(
                    kind=kind,
                    visit=new_visit(
                        rng=rng, profile=profile, uid_key=uid_key, identity_factory=identity_factory
                    ),
                    profile=profile,
                    case_dir=case_dir,
                    out_dir=out_dir,
                )
            )
    written = write_cases(jobs, workers=workers, progress=progress)

    summaries = []
    for profile in profiles:
        results = [w for job, w in zip(jobs, written, strict=True) if job.profile is profile]
        goods = [w for w in results if w.case is not None]
        broken = [item for w in results for item in w.broken]
        broken += write_stray_files(
            good_slices=[w.slice_paths for w in goods],
            cases=[w.case for w in goods],
            rng=layouts[profile.name],
            out_dir=out_dir,
        )
        summaries.append(
            _site_summary(
                profile=profile,
                cases=[w.case for w in goods],
                broken=broken,
                patients_written=len(results),
                site_dir=out_dir / profile.name,
            )
        )
    summary = FederationDataSummary(out_dir=out_dir, parameters=parameters, sites=tuple(summaries))
    write_manifest(out_dir, summary.to_manifest())
    logger.info(
        "wrote %d sites, %d files, to %s",
        len(summaries),
        sum(site.files_written for site in summaries),
        out_dir,
    )
    return summary


def generate_public_cohort(
    *,
    out_dir: Path,
    patients: int = 32,
    seed: int = 0,
    matrix: int = 64,
    progress: bool = False,
    workers: int | None = None,
) -> PublicCohortSummary:
    """Write a public cohort, data a model may be pretrained on without DP, to `out_dir/public/`.

    It stands for a public challenge dataset: patients of the centres of
    `site_profiles.public_profiles` (other vendors than any site's, another HU calibration,
    larger and brighter lesions), drawn from their own generator streams, so no patient equals a
    site's. Layout as a site's, without broken inputs: `public/case-NNN/CT/slice-NNN.dcm` and
    `public/case-NNN/SEG/seg.dcm`; `manifest.json` records the centres' profiles and cases.

    Args:
        out_dir: empty (or missing) folder; a folder holding this exact cohort is reused.
        patients: patients in the cohort (each with a CT series and a SEG), alternating between
            the centres.
        seed: makes the output byte-identical across runs; the same seed as a federation's still
            gives other patients.
        matrix: rows = columns of every CT slice.
        progress: show a progress bar per patient.
        workers: processes writing patients; None = one per CPU (fewer for small cohorts).

    Raises:
        ValueError: a parameter is out of range.
        OutputFolderNotEmptyError: `out_dir` holds anything else.
    """
    parameters = PublicCohortParameters(patients=patients, seed=seed, matrix=matrix)
    out_dir = Path(out_dir)
    manifest = existing_manifest(out_dir, Cohort.PUBLIC, dataclasses.asdict(parameters))
    if manifest is not None:
        logger.info("%s already holds this public cohort; not regenerating", out_dir)
        return PublicCohortSummary.from_manifest(manifest, out_dir=out_dir)

    profiles = public_profiles(seed=seed, matrix=matrix)
    layout_rng = np.random.default_rng([seed, _PUBLIC_LAYOUT_STREAM])
    case_numbers = [int(n) + 1 for n in layout_rng.permutation(patients)]
    jobs = []
    for ordinal in range(patients):
        profile = profiles[ordinal % len(profiles)]
        rng = np.random.default_rng([seed, _PUBLIC_PATIENT_STREAM, ordinal])
        uid_key = (PUBLIC_FOLDER, "seed", seed, "matrix", matrix, ordinal)
        jobs.append(
            CaseJob(
                kind=CaseKind.GOOD,
                visit=new_visit(
                    rng=rng, profile=profile, uid_key=uid_key, identity_factory=synthetic_identity
                ),
                profile=profile,
                case_dir=out_dir / PUBLIC_FOLDER / f"case-{case_numbers[ordinal]:03d}",
                out_dir=out_dir,
            )
        )
    written = write_cases(jobs, workers=workers, progress=progress)
    centres = tuple(
        PublicCentreSummary(
            profile=profile,
            cases=tuple(
                sorted(
                    (
                        w.case
                        for job, w in zip(jobs, written, strict=True)
                        if job.profile is profile
                    ),
                    key=by_case,
                )
            ),
        )
        for profile in profiles
    )
    summary = PublicCohortSummary(
        out_dir=out_dir,
        parameters=parameters,
        centres=centres,
        files_written=_count_files(out_dir / PUBLIC_FOLDER),
    )
    write_manifest(out_dir, summary.to_manifest())
    logger.info("wrote a public cohort of %d patients to %s", patients, summary.folder)
    return summary


def _site_summary(
    *,
    profile: SiteProfile,
    cases: Sequence[CaseSummary],
    broken: Sequence[BrokenInput],
    patients_written: int,
    site_dir: Path,
) -> SiteSummary:
    return SiteSummary(
        name=profile.name,
        manufacturer=profile.scanner.manufacturer,
        model_name=profile.scanner.model_name,
        transfer_syntax_uid=profile.transfer_syntax_uid,
        rescale=str(profile.scanner.rescale),
        pixel_spacing_mm=profile.pixel_spacing_mm,
        slice_thickness_mm=profile.slice_thickness_mm,
        slices_per_series=profile.slices,
        noise_sigma_hu=profile.noise_sigma_hu,
        intensity_offset_hu=profile.intensity_offset_hu,
        lesion_prevalence=profile.lesion_prevalence,
        good_patients=len(cases),
        patients_written=patients_written,
        files_written=_count_files(site_dir),
        cases=tuple(sorted(cases, key=by_case)),
        broken_inputs=tuple(sorted(broken, key=lambda item: item.path)),
    )


def _count_files(folder: Path) -> int:
    return sum(1 for path in folder.rglob("*") if path.is_file())
