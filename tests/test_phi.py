"""No patient identifier leaves the site's own data and cache.

Simulated DICOM gets distinctive names, patient IDs and birth dates; then ingestion (``fedseg
site check``), a one-round simulated federation with its report (``fedseg simulate run``, which
drives ``simulator.federation.run_simulation`` and FLARE's own simulator) run over it. Every byte
they produce (results, reports, models, FLARE workspace and logs, the site workspaces, temporary
files, terminal output and log records) is searched for each identifier, as text in several
spellings and inside compressed files. Only the data folder and the sites' caches may hold them.
"""

from __future__ import annotations

import datetime
import gzip
import itertools
import logging
import shutil
import tempfile
import zipfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import yaml

from fedseg.cli import main
from simulator.cohort_manifest import GenerationParameters
from simulator.dicom_writer import PatientIdentity
from simulator.patients import synthetic_identity
from simulator.site_profiles import SiteProfile
from simulator.synthetic_data import write_federation
from tests.conftest import tiny_spec

pytestmark = pytest.mark.slow


def distinctive_identities() -> tuple[list[PatientIdentity], object]:
    """An identity factory giving each patient a name, ID and birth date found nowhere else, and
    the list it fills."""
    made: list[PatientIdentity] = []
    counter = itertools.count(1)

    def factory(
        *, rng: np.random.Generator, site: SiteProfile, study_date: datetime.date
    ) -> PatientIdentity:
        n = next(counter)
        plain = synthetic_identity(rng=rng, site=site, study_date=study_date)
        identity = PatientIdentity(
            name=f"QZXFAMILY{n:02d}^QZXGIVEN{n:02d}",
            patient_id=f"QZXID{70000 + n}",
            birth_date=datetime.date(1917, 1 + n % 12, 1 + n),  # no other date in 1917
            sex=plain.sex,
            age_years=plain.age_years,
        )
        made.append(identity)
        return identity

    return made, factory


def spellings(identity: PatientIdentity) -> set[str]:
    """How the identity may appear: DICOM PN and its parts, the ID, birth date as DICOM DA,
    ISO 8601 and day-first/month-first."""
    family, given = identity.name.split("^")
    born = identity.birth_date
    return {
        identity.name,
        family,
        given,
        f"{given} {family}",
        identity.patient_id,
        born.strftime("%Y%m%d"),
        born.isoformat(),
        born.strftime("%d.%m.%Y"),
        born.strftime("%m/%d/%Y"),
    }


def needles(identities: list[PatientIdentity]) -> dict[bytes, str]:
    """Byte patterns to look for (lower case; UTF-8 and UTF-16) -> the spelling they encode."""
    found = {}
    for identity in identities:
        for text in spellings(identity):
            for encoding in ("utf-8", "utf-16-le"):
                found[text.lower().encode(encoding)] = text
    return found


def contents(path: Path) -> Iterator[tuple[str, bytes]]:
    """The file's bytes, and those of every member if it is a zip or gzip file."""
    data = path.read_bytes()
    yield str(path), data
    if zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as archive:
            for member in archive.namelist():
                yield f"{path}!{member}", archive.read(member)
    elif data[:2] == b"\x1f\x8b":
        yield f"{path}!gunzip", gzip.decompress(data)


def leaks_in(texts: dict[str, bytes], patterns: dict[bytes, str]) -> list[str]:
    lowered = {where: data.lower() for where, data in texts.items()}
    return [
        f"{where}: {spelling!r}"
        for where, data in lowered.items()
        for pattern, spelling in patterns.items()
        if pattern in data
    ]


def produced_files(folder: Path, *, excluded: tuple[Path, ...]) -> dict[str, bytes]:
    texts = {}
    for path in sorted(folder.rglob("*")):
        if path.is_file() and not any(path.is_relative_to(e) for e in excluded):
            texts.update(contents(path))
    return texts


@pytest.fixture
def short_scratch() -> Iterator[Path]:
    """A temporary folder with a short path, for this process's and FLARE's temporary files.

    FLARE's simulator starts a multiprocessing manager whose AF_UNIX socket lives in TMPDIR;
    a socket path is limited to 107 bytes, which pytest's per-worker tmp_path can exceed.
    """
    scratch = Path(tempfile.mkdtemp(prefix="fedseg-phi-"))
    yield scratch
    shutil.rmtree(scratch, ignore_errors=True)


def test_no_identifier_leaves_the_site_data_or_cache(
    tmp_path, short_scratch, monkeypatch, capfd, caplog
):
    data, out = tmp_path / "data", tmp_path / "results"
    scratch = short_scratch  # temporary files of this process and of FLARE's
    monkeypatch.setenv("TMPDIR", str(scratch))
    monkeypatch.setattr(tempfile, "tempdir", None)
    caplog.set_level(logging.DEBUG)

    identities, factory = distinctive_identities()
    write_federation(
        parameters=GenerationParameters(sites=2, patients_per_site=3, seed=0, matrix=32),
        out_dir=data,
        identity_factory=factory,
    )
    patterns = needles(identities)
    assert len(identities) == 2 * (3 + 2)  # good and broken patients

    # The search finds what is there: every name, ID and DICOM birth date is in the site data.
    in_data = leaks_in(produced_files(data, excluded=()), patterns)
    for identity in identities:
        for text in (identity.name, identity.patient_id, identity.birth_date.strftime("%Y%m%d")):
            assert any(line.endswith(repr(text)) for line in in_data), text

    spec = out / "spec.yaml"
    out.mkdir()
    spec.write_text(yaml.safe_dump(tiny_spec(training={"rounds": 1}).to_plain()))
    for site in ("site-1", "site-2"):
        check = ["site", "check", "--data", str(data / site)]
        quarantine = out / "site-check" / f"{site}-quarantine.json"
        cache = out / "cache" / site
        assert main([*check, "--cache", str(cache), "--quarantine-out", str(quarantine)]) == 0
    assert main(["simulate", "run", str(spec), "--data", str(data), "--out", str(out)]) == 0

    assert (out / "report.md").is_file() and (out / "site-check").is_dir()
    assert list((out / "flare_workspace").rglob("log.txt")), "FLARE wrote its logs"
    assert list((out / "cache").rglob("*.npy")), "the sites cached decoded volumes"
    terminal = capfd.readouterr()
    texts = {
        **produced_files(out, excluded=(out / "cache",)),
        **produced_files(scratch, excluded=()),
        "terminal (stdout)": terminal.out.encode(),
        "terminal (stderr)": terminal.err.encode(),
        "log records": "\n".join(r.getMessage() for r in caplog.records).encode(),
    }
    assert len(texts) > 20
    assert leaks_in(texts, patterns) == []
