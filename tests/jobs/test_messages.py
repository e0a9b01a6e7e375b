"""The message records: what goes on the wire, and what the server does with a site's bad meta."""

import math

import pytest

from jobs import keys
from jobs.messages import MessageError, SiteResultMeta, SubgroupCell, TaskMeta, result_site

CELL = SubgroupCell(attribute=keys.SEX, value="female", n=6, dice=0.5, hd95_mm=None, n_hd95=None)


def test_every_field_is_a_wire_key_and_every_site_key_a_field():
    site_keys = {
        value
        for name, value in vars(keys).items()
        if name.isupper() and isinstance(value, str) and not name.startswith(("TASK_", "CELL_"))
    } - {
        keys.RESULT_SITE,  # FLARE's, not the site's
        keys.ROUND,  # the server's (TaskMeta)
        keys.GLOBAL_MODEL,
        keys.STATUS_COMMAND,
        keys.SEX,
        keys.AGE_BAND,
        keys.VENDOR,
        keys.SLICE_THICKNESS_BAND,
        keys.UNKNOWN,
    }
    assert {f.alias for f in SiteResultMeta.model_fields.values()} == site_keys
    assert {f.alias for f in TaskMeta.model_fields.values()} == {keys.ROUND, keys.MODEL_OWNER}
    cell_keys = {value for name, value in vars(keys).items() if name.startswith("CELL_")}
    assert {f.alias for f in SubgroupCell.model_fields.values()} == cell_keys


def test_only_given_keys_are_sent_none_included_in_the_order_given():
    meta = SiteResultMeta(val_dice=0.25, budget_left=None, num_steps=3).to_meta()
    assert meta == {keys.VAL_DICE: 0.25, keys.NUM_STEPS: 3, keys.BUDGET_LEFT: None}
    assert list(meta) == [keys.VAL_DICE, keys.BUDGET_LEFT, keys.NUM_STEPS]  # as a dict would
    assert keys.TRAIN_LOSS not in meta  # a DP job never sends it, not even as None
    updated = SiteResultMeta(val_dice=None, epsilon=1.0).updated(refused="no", epsilon=None)
    assert list(updated.to_meta().items()) == [
        (keys.VAL_DICE, None),
        (keys.EPSILON, None),  # like dict.update: keeps its place
        (keys.REFUSED, "no"),
    ]
    received = {keys.NUM_STEPS: 1, keys.RESULT_SITE: "site-1", keys.VAL_DICE: 0.5}
    assert list(SiteResultMeta.from_meta(received).to_meta()) == [keys.NUM_STEPS, keys.VAL_DICE]


def test_round_trip_is_exact():
    sent = SiteResultMeta(
        val_dice=0.5,
        val_hd95_mm=None,
        val_hd95_missing=1,
        val_lesion_volumes=3,
        val_patients=4,
        subgroups=[CELL],
        model_owner=keys.GLOBAL_MODEL,
        epsilon=math.inf,
    ).to_meta()
    assert sent[keys.SUBGROUPS] == [
        {
            "attribute": "sex",
            "value": "female",
            "n": 6,
            "dice": 0.5,
            "hd95_mm": None,
            "n_hd95": None,
        }
    ]
    assert SiteResultMeta.from_meta(sent).to_meta() == sent
    task = TaskMeta(round=2, model_owner="site-1").to_meta()
    assert task == {keys.ROUND: 2, keys.MODEL_OWNER: "site-1"}
    assert TaskMeta.from_meta(task).to_meta() == task
    assert TaskMeta(round=0).to_meta() == {keys.ROUND: 0}


def test_owner_defaults_to_the_global_model_only_when_not_given():
    assert TaskMeta.from_meta({keys.ROUND: 1}).owner == keys.GLOBAL_MODEL
    assert TaskMeta.from_meta({keys.MODEL_OWNER: "site-2"}).owner == "site-2"
    assert SiteResultMeta.from_meta({keys.VAL_DICE: 0.1}).owner == keys.GLOBAL_MODEL


def test_unknown_keys_are_ignored_as_before_since_flare_adds_its_own():
    meta = {keys.RESULT_SITE: "site-1", keys.NUM_STEPS: 2, "something_new": [1, 2]}
    assert SiteResultMeta.from_meta(meta).to_meta() == {keys.NUM_STEPS: 2}
    assert result_site(meta) == "site-1"


@pytest.mark.parametrize(
    ("meta", "field"),
    [
        ({keys.VAL_DICE: "high"}, "val_dice"),
        ({keys.NUM_PATIENTS: 2.5}, "num_patients"),
        ({keys.REFUSED: 3}, "refused"),
        ({keys.LOCAL_MODEL_SHAREABLE: "perhaps"}, "local_model_shareable"),
        ({keys.SUBGROUPS: [{"attribute": "sex"}]}, "subgroups.0.value"),
        ({keys.SUBGROUPS: [{**CELL.to_meta(), "patients": ["p-1"]}]}, "subgroups.0.patients"),
    ],
)
def test_a_malformed_site_meta_raises_one_line_naming_the_field(meta, field):
    with pytest.raises(MessageError) as raised:
        SiteResultMeta.from_meta(meta, source="site-1")
    text = str(raised.value)
    assert "\n" not in text and text.startswith("site-1's result") and field in text
