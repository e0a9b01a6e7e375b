"""Subgroup cells at the site: bands from headers, and small cells never leave the site."""

from collections import Counter

import pytest
from nvflare.apis.fl_context import FLContext
from nvflare.apis.signal import Signal
from nvflare.app_common.abstract.fl_model import FLModel, ParamsType
from nvflare.app_common.utils.fl_model_utils import FLModelUtils
from nvflare.fuel.utils import fobs

from jobs import keys
from jobs.model import initial_weights
from jobs.spec import JobSpecError
from simulator.synthetic_data import generate_federation_data
from site_app.evaluation import PatientEvaluation, VolumeScore
from site_app.executor import SiteTrainer
from site_app.local_job import LocalJob
from site_app.policy import PrivacyPolicy
from site_app.site_config import SiteConfig
from site_app.subgroups import (
    PatientGroups,
    _suppressed_cells,
    age_band,
    subgroup_cells,
    thickness_band,
    vendor_group,
)
from tests.conftest import tiny_spec


@pytest.mark.parametrize(
    ("age", "band"),
    [
        (None, "unknown"),
        (0, "<40"),
        (39, "<40"),
        (40, "40-59"),
        (59, "40-59"),
        (60, "60-79"),
        (79, "60-79"),
        (80, "80+"),
        (104, "80+"),
    ],
)
def test_age_bands(age, band):
    assert age_band(age) == band


@pytest.mark.parametrize(
    ("thickness", "band"),
    [
        (None, "unknown"),
        (0.0, "unknown"),
        (0.625, "<=1.5 mm"),
        (1.5, "<=1.5 mm"),
        (1.75, "1.5-3 mm"),
        (3.0, "1.5-3 mm"),
        (5.0, "3-5 mm"),
        (7.5, ">5 mm"),
    ],
)
def test_slice_thickness_bands(thickness, band):
    assert thickness_band(thickness) == band


@pytest.mark.parametrize(
    ("manufacturer", "vendor"),
    [
        ("GE MEDICAL SYSTEMS", "GE"),
        ("SIEMENS", "Siemens"),
        ("Siemens Healthineers", "Siemens"),
        ("Philips", "Philips"),
        ("CANON_MEC", "Canon"),
        ("TOSHIBA", "Canon"),
        ("  acme   imaging ", "ACME IMAGING"),
        ("GENERIC SCANNERS", "GENERIC SCANNERS"),  # starts with "GE" but is not GE
        ("", "unknown"),
        (None, "unknown"),
    ],
)
def test_vendor_names_are_normalised(manufacturer, vendor):
    assert vendor_group(manufacturer) == vendor


def test_every_fixed_band_label_is_a_wire_value_the_report_knows():
    ages = {age_band(a) for a in (None, 10, 45, 65, 90)}
    thicknesses = {thickness_band(t) for t in (None, 1.0, 2.0, 4.0, 6.0)}
    assert ages == set(keys.SUBGROUP_VALUES[keys.AGE_BAND])
    assert thicknesses == set(keys.SUBGROUP_VALUES[keys.SLICE_THICKNESS_BAND])


def _patient(key, dice, hd95=1.0):
    has_lesion = dice is not None
    score = VolumeScore(
        dice=dice,
        hd95_mm=hd95 if has_lesion else None,
        has_lesion=has_lesion,
        empty_prediction=has_lesion and hd95 is None,
    )
    return PatientEvaluation(key, (score,))


def _groups(sex):
    return PatientGroups(sex=sex, age_band="40-59", vendor="GE", slice_thickness_band="3-5 mm")


def _cohort():
    """5 women with a lesion, 2 men with a lesion, 1 woman without: (evaluations, groups)."""
    evaluations = [_patient(f"f{i}", 0.5 + 0.1 * i) for i in range(5)]
    evaluations += [_patient("m0", 0.1), _patient("m1", 0.3), _patient("f-healthy", None)]
    groups = {
        e.patient_key: _groups("male" if e.patient_key[0] == "m" else "female") for e in evaluations
    }
    return evaluations, groups


def test_cells_below_five_patients_are_dropped_and_the_rest_are_exact():
    evaluations, groups = _cohort()
    evaluations += [_patient(f"m{i}", 0.2) for i in range(2, 8)]  # 8 men with a lesion now
    groups |= {f"m{i}": _groups("male") for i in range(2, 8)}
    cells = {(c.attribute, c.value): c for c in subgroup_cells(evaluations, groups)}
    female = cells[(keys.SEX, "female")]
    assert female.n == 5  # the lesion-free woman has no Dice, so is not counted
    assert female.dice == pytest.approx(0.7)
    assert female.hd95_mm == pytest.approx(1.0)
    assert cells[(keys.SEX, "male")].n == 8
    assert cells[(keys.VENDOR, "GE")].n == 13


def test_a_small_cell_takes_its_complement_with_it_so_totals_cannot_reveal_it():
    """Worked example: 5 women and 2 men with a lesion. Sending the women's cell alone would
    give the men's away: the site also sends its totals (7 lesion patients, mean Dice 0.5714),
    and 7 x 0.5714 - 5 x 0.7 = 2 men with mean Dice 0.2. So the women's cell is suppressed too."""
    evaluations, groups = _cohort()
    cells = {(c.attribute, c.value) for c in subgroup_cells(evaluations, groups)}
    assert (keys.SEX, "male") not in cells and (keys.SEX, "female") not in cells
    assert (keys.VENDOR, "GE") in cells  # an attribute with nothing suppressed is untouched


def test_complementary_suppression_hides_a_group_of_at_least_the_minimum():
    """6 women, 6 men, 2 of unknown sex: unknown is suppressed, and with it the smallest sent
    cell (women, first by name at equal size), so what the totals minus the sent cells give is
    the 8 women and unknowns together, never the 2."""
    evaluations = [_patient(f"f{i}", 0.6) for i in range(6)]
    evaluations += [_patient(f"m{i}", 0.4) for i in range(6)]
    evaluations += [_patient(f"u{i}", 0.9) for i in range(2)]
    sex = {"f": "female", "m": "male", "u": keys.UNKNOWN}
    groups = {e.patient_key: _groups(sex[e.patient_key[0]]) for e in evaluations}
    sent = [c for c in subgroup_cells(evaluations, groups) if c.attribute == keys.SEX]
    assert [(c.value, c.n) for c in sent] == [("male", 6)]
    total_patients = 14
    hidden = total_patients - sum(c.n for c in sent)
    assert hidden == 8 >= 5


def test_a_job_may_raise_the_minimum_but_not_lower_it():
    evaluations, groups = _cohort()
    lowered = subgroup_cells(evaluations, groups, min_cell_size=1)
    assert (keys.SEX, "male") not in {(c.attribute, c.value) for c in lowered}
    raised = subgroup_cells(evaluations, groups, min_cell_size=6)  # sex: 5 and 2, both hidden
    assert {(c.attribute, c.value) for c in raised} == {
        (keys.AGE_BAND, "40-59"),
        (keys.VENDOR, "GE"),
        (keys.SLICE_THICKNESS_BAND, "3-5 mm"),
    }


def test_hd95_of_a_kept_cell_is_withheld_when_few_patients_have_one():
    evaluations = [_patient(f"f{i}", 0.5, hd95=None if i < 2 else 2.0) for i in range(6)]
    groups = {e.patient_key: _groups("female") for e in evaluations}
    female = next(c for c in subgroup_cells(evaluations, groups) if c.value == "female")
    assert female.n == 6
    assert female.hd95_mm is None and female.n_hd95 is None


def test_spec_refuses_a_minimum_below_five():
    with pytest.raises(JobSpecError, match=r"evaluation\.min_subgroup_size"):
        tiny_spec(evaluation={"min_subgroup_size": 3})


# -- end to end at one site: real DICOM, the real executor, the FLARE message it returns ----------


@pytest.fixture(scope="module")
def larger_site(tmp_path_factory):
    """One site of 12 patients, 9 held out: enough for some cells to pass 5 and some not."""
    out = tmp_path_factory.mktemp("subgroup-site") / "data"
    generate_federation_data(out_dir=out, sites=1, patients_per_site=12, seed=0, matrix=32)
    return out / "site-1"


def _validate_via_executor(job, weights, owner):
    trainer = SiteTrainer(spec=job.spec.to_plain())
    trainer._job = job  # the job FLARE would have built on the first task
    task = FLModel(
        params=weights, params_type=ParamsType.FULL, meta={keys.ROUND: 1, keys.MODEL_OWNER: owner}
    )
    reply = trainer.execute(
        keys.TASK_VALIDATE, FLModelUtils.to_shareable(task), FLContext(), Signal()
    )
    return reply, FLModelUtils.from_shareable(reply).meta


def test_suppressed_cells_never_reach_the_flare_message(larger_site, tmp_path):
    spec = tiny_spec(data={"val_fraction": 0.75}, privacy={"enabled": False})
    job = LocalJob(
        spec=spec,
        site="site-1",
        config=SiteConfig(
            data_dir=larger_site,
            cache_dir=tmp_path / "cache",
            policy=PrivacyPolicy(dp_required=False),
        ),
        state_dir=tmp_path / "state",
        simulation=True,
    )
    # What the site knows locally: every cell's size among held-out patients with a lesion.
    weights = initial_weights(spec.model, 0)
    local = {p.patient_key: p for p in job.val_patients}
    lesion_keys = [key for key, p in local.items() if any(v.label.any() for v in p.volumes)]
    sizes = Counter(cell for key in lesion_keys for cell in job._groups[key].items())
    suppressed = _suppressed_cells(sizes, 5)  # below 5, and their complements
    kept = set(sizes) - suppressed
    assert kept and {cell for cell, n in sizes.items() if n < 5}  # so this test can fail

    reply, meta = _validate_via_executor(job, weights, keys.GLOBAL_MODEL)
    sent = {(c[keys.CELL_ATTRIBUTE], c[keys.CELL_VALUE]): c for c in meta[keys.SUBGROUPS]}
    assert set(sent) == kept
    assert all(sent[cell][keys.CELL_PATIENTS] == sizes[cell] for cell in kept)
    # The serialised message holds no trace of a suppressed cell's value.
    wire = fobs.dumps(reply)
    kept_values = {value for _, value in kept}
    absent = {v for _, v in suppressed if not any(v in other for other in kept_values)}
    assert absent  # e.g. an age band only a few held-out patients fall in
    for value in absent:
        assert value.encode() not in wire

    _, cross_site = _validate_via_executor(job, weights, "site-2")
    assert keys.SUBGROUPS not in cross_site  # another site's local model: site-level only
    assert cross_site[keys.VAL_DICE] == meta[keys.VAL_DICE]
