"""What the server does with a site's result meta: parsed once by ``jobs.messages``, a bad one
rejected with its reason instead of ending the job; and the round phase as saved."""

import json

import numpy as np
import pytest
from nvflare.app_common.abstract.fl_model import FLModel, ParamsType

from jobs import keys
from jobs.messages import MessageError, SubgroupCell
from server_app.controller import FedSegController
from server_app.history import RoundPhase, SiteRound
from tests.conftest import tiny_spec

CELL = SubgroupCell(attribute=keys.SEX, value="female", n=6, dice=0.5, hd95_mm=None, n_hd95=None)


def test_site_round_from_meta_validates_through_the_record():
    record = SiteRound.from_meta("site-1", 0, {keys.NUM_STEPS: 2, keys.SUBGROUPS: [CELL.to_meta()]})
    assert record.num_steps == 2 and record.subgroups == [CELL.to_meta()]
    with pytest.raises(MessageError, match="val_dice"):
        SiteRound.from_meta("site-1", 0, {keys.VAL_DICE: "x"})


def test_round_phase_is_saved_as_its_string():
    record = SiteRound.absent("site-1", 2, phase=RoundPhase.FINAL)
    assert json.loads(json.dumps(record.model_dump()))["phase"] == "final"
    assert SiteRound.model_validate(json.loads(record.model_dump_json())).phase is RoundPhase.FINAL


def test_the_controller_rejects_a_malformed_result_without_crashing(monkeypatch):
    """Before, a site's malformed meta raised in the controller and ended the whole job; now
    that site's result is recorded as rejected (with the reason) and contributes nothing."""
    spec = tiny_spec()
    controller = FedSegController(spec=spec.to_plain())
    controller._job_spec = spec
    monkeypatch.setattr(controller, "_progress", lambda record: None)
    monkeypatch.setattr(controller, "warning", lambda message: None)
    good = {keys.RESULT_SITE: "site-1", keys.NUM_PATIENTS: 3, keys.LOCAL_MODEL_SHAREABLE: True}
    bad = {keys.RESULT_SITE: "site-2", keys.NUM_PATIENTS: "many"}
    results = [
        FLModel(params={}, params_type=ParamsType.FULL, meta=good),
        FLModel(params={"w": np.zeros(1)}, params_type=ParamsType.FULL, meta=bad),
    ]
    records, updates, shareable = controller._collect(
        results, 0, ["site-1", "site-2", "site-3"], RoundPhase.TRAIN
    )
    by_site = {r.site: r for r in records}
    assert by_site["site-1"].num_patients == 3 and by_site["site-1"].refused is None
    rejected = by_site["site-2"]
    assert rejected.refused.startswith("the server rejected the result: site-2's result")
    assert "num_patients" in rejected.refused and not rejected.missing
    assert by_site["site-3"].missing
    assert updates == [] and shareable == {"site-1": True}
    cell = controller._cross_site_cell("site-1", 0, "site-2", {keys.VAL_DICE: "x"})
    assert cell.refused.startswith("the server rejected the result") and not cell.missing
