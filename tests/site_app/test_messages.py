"""Every key a site sends is on docs/privacy.md's list, with its protection; a DP job sends
nothing computed on its training patients without noise."""

import re
from pathlib import Path

from jobs import keys
from jobs.messages import SiteResultMeta
from jobs.model import initial_weights
from tests.conftest import site_job, tiny_spec

DOC = Path(__file__).parents[2] / "docs" / "privacy.md"


def _documented_keys() -> set[str]:
    section = DOC.read_text().split("## Everything a site sends", 1)[1].split("\n## ", 1)[0]
    found = set()
    for line in section.splitlines():
        if line.startswith("| `"):
            found |= set(re.findall(r"`([a-z0-9_]+)`", line.split("|")[1]))
    return found


def _sent_keys(spec, federation, tmp_path) -> tuple[set[str], list[dict]]:
    job = site_job(spec, federation / "site-1", tmp_path)
    weights = initial_weights(spec.model, 0)
    metas = []
    for round_index in range(2):
        weights, meta = job.train_round(weights, round_index)
        metas.append(meta)
    metas.append(job.validate_task(weights, keys.GLOBAL_MODEL))  # the executor's answer
    return {key for meta in metas for key in meta}, metas


def test_every_key_a_dp_site_sends_is_listed_with_its_protection(tiny_federation, tmp_path):
    sent, metas = _sent_keys(tiny_spec(), tiny_federation, tmp_path)
    unlisted = sent - _documented_keys()
    assert not unlisted, f"sent but not on docs/privacy.md's list: {sorted(unlisted)}"
    # Nothing computed on the training patients without noise leaves a DP job.
    assert keys.TRAIN_LOSS not in sent and keys.ELAPSED_S not in sent
    # What it sends as a count is the released one, the same every round.
    assert len({m[keys.NUM_PATIENTS] for m in metas[:2]}) == 1


def test_every_key_a_site_sends_without_dp_is_listed_too(tiny_federation, tmp_path):
    sent, _ = _sent_keys(tiny_spec(privacy={"enabled": False}), tiny_federation, tmp_path)
    unlisted = sent - _documented_keys()
    assert not unlisted, f"sent but not on docs/privacy.md's list: {sorted(unlisted)}"
    assert keys.TRAIN_LOSS in sent  # listed as un-noised, sent only without DP


def test_the_result_record_holds_exactly_the_listed_keys():
    """What a site can send at all is SiteResultMeta's fields: the list, no more, no less."""
    fields = {field.alias for field in SiteResultMeta.model_fields.values()}
    assert fields == _documented_keys()
