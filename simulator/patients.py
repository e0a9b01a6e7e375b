"""Synthetic patient visits: a fake identity drawn from a site's sex and age mix, with a
consistent birth date, and the visit's study (date, time, accession, UIDs) drawn from the
patient's own generator, which the case writer then goes on with.
"""

from __future__ import annotations

import datetime
from dataclasses import dataclass
from typing import Protocol

import numpy as np

from simulator.dicom_writer import PatientIdentity, Study, deterministic_uid
from simulator.site_profiles import SiteProfile

__all__ = ["IdentityFactory", "PatientVisit", "new_visit", "synthetic_identity"]

_FIRST_STUDY_DATE = datetime.date(2018, 1, 1)
_STUDY_DATE_SPAN_DAYS = 6 * 365

_FAMILY_NAMES = (
    "SMITH",
    "MUELLER",
    "ROSSI",
    "GARCIA",
    "DUBOIS",
    "JANSEN",
    "NOWAK",
    "SILVA",
    "KOWALSKI",
    "NIELSEN",
    "MURPHY",
    "ANDERSSON",
    "HOFFMANN",
    "MORENO",
    "BERGER",
    "LAURENT",
    "KING",
    "WEBER",
)
_GIVEN_NAMES = {
    "F": ("ANNA", "MARIA", "SOFIA", "EMMA", "CLARA", "LEA", "NORA", "EVA", "IDA", "JULIA"),
    "M": ("JOHN", "LUCA", "JAN", "PAUL", "DAVID", "TOMAS", "ERIK", "LEON", "MARC", "HUGO"),
}


class IdentityFactory(Protocol):
    """Makes the synthetic identity of one patient of `site`, examined on `study_date`."""

    def __call__(
        self, *, rng: np.random.Generator, site: SiteProfile, study_date: datetime.date
    ) -> PatientIdentity: ...


def synthetic_identity(
    *, rng: np.random.Generator, site: SiteProfile, study_date: datetime.date
) -> PatientIdentity:
    """A fake patient drawn from the site's sex and age mix, with a consistent birth date."""
    sex = "F" if rng.random() < site.female_fraction else "M"
    age = int(rng.integers(site.age_range_years[0], site.age_range_years[1] + 1))
    anniversary = _years_before(study_date, age)
    birth_date = anniversary - datetime.timedelta(days=int(rng.integers(1, 360)))
    family = _FAMILY_NAMES[int(rng.integers(len(_FAMILY_NAMES)))]
    given = _GIVEN_NAMES[sex][int(rng.integers(len(_GIVEN_NAMES[sex])))]
    return PatientIdentity(
        name=f"{family}^{given}",
        patient_id=f"H{site.index + 1}{int(rng.integers(10**6, 10**7))}",
        birth_date=birth_date,
        sex=sex,
        age_years=_age_on(birth_date, study_date),
    )


@dataclass(frozen=True, kw_only=True)
class PatientVisit:
    """One synthetic patient visit: its generator, identity and study."""

    rng: np.random.Generator
    identity: PatientIdentity
    study: Study
    uid_key: tuple[object, ...]


def new_visit(
    *,
    rng: np.random.Generator,
    profile: SiteProfile,
    uid_key: tuple[object, ...],
    identity_factory: IdentityFactory,
) -> PatientVisit:
    """Draw the visit's date, identity and study from `rng`, which the case writer goes on with."""
    study_date = _FIRST_STUDY_DATE + datetime.timedelta(
        days=int(rng.integers(_STUDY_DATE_SPAN_DAYS))
    )
    study_time = datetime.time(
        hour=int(rng.integers(7, 19)), minute=int(rng.integers(60)), second=int(rng.integers(60))
    )
    identity = identity_factory(rng=rng, site=profile, study_date=study_date)
    study = Study(
        study_uid=deterministic_uid(*uid_key, "study"),
        frame_of_reference_uid=deterministic_uid(*uid_key, "frame-of-reference"),
        date=study_date,
        time=study_time,
        accession_number=f"A{int(rng.integers(10**8, 10**9))}",
        study_id=str(int(rng.integers(1, 10**5))),
    )
    return PatientVisit(rng=rng, identity=identity, study=study, uid_key=uid_key)


def _years_before(day: datetime.date, years: int) -> datetime.date:
    try:
        return day.replace(year=day.year - years)
    except ValueError:  # 29 February in a non-leap target year
        return day.replace(year=day.year - years, day=28)


def _age_on(birth_date: datetime.date, day: datetime.date) -> int:
    before_birthday = (day.month, day.day) < (birth_date.month, birth_date.day)
    return day.year - birth_date.year - int(before_birthday)
