"""history.json: read back as written, and a damaged file named with each bad field."""

import json

import pytest

from server_app.history import (
    CrossSiteResult,
    HistoryError,
    RunHistory,
    SiteRound,
    read_history,
    write_history,
)


def _history() -> RunHistory:
    history = RunHistory(job_name="job", sites=["site-1"], rounds_planned=1, spec={"name": "job"})
    history.rounds.append(
        SiteRound(
            site="site-1",
            round=0,
            val_dice=0.25,
            val_patients=3,
            num_patients=9,
            num_steps=12,
            train_loss=0.5,
            epsilon=2.0,
            delta=1e-5,
            subgroups=[{"attribute": "sex", "value": "F", "n": 5, "dice": 0.3}],
        )
    )
    history.final.append(SiteRound.absent("site-1", 1, phase="final"))
    history.cross_site.append(
        CrossSiteResult(
            model="site-1",
            model_round=0,
            site="site-1",
            val_dice=None,
            val_hd95_mm=None,
            val_hd95_missing=None,
            val_lesion_volumes=None,
            val_patients=None,
            missing=True,
        )
    )
    history.rounds_completed = 1
    return history


def test_a_history_reads_back_as_written_byte_for_byte(tmp_path):
    path = tmp_path / "history.json"
    write_history(_history(), path)
    again = tmp_path / "again.json"
    write_history(read_history(path), again)
    assert read_history(path) == _history()
    assert again.read_bytes() == path.read_bytes()
    assert list(json.loads(path.read_text())) == list(RunHistory.model_fields)


def test_a_damaged_history_names_the_file_each_field_what_was_expected_and_what_was_found(
    tmp_path,
):
    data = _history().to_json()
    data["rounds"][0]["epsilom"] = 2.0  # a misspelt key
    data["rounds"][0]["num_steps"] = "twelve"
    path = tmp_path / "history.json"
    path.write_text(json.dumps(data))
    with pytest.raises(HistoryError) as error:
        read_history(path)
    lines = str(error.value).splitlines()
    assert lines[0] == f"{path}: 2 problem(s) in the run history:"
    assert lines[1] == (
        "  - rounds.0.num_steps: Input should be a valid integer, unable to parse string as an "
        "integer, got 'twelve'"
    )
    assert (
        lines[2] == "  - rounds.0.epsilom: unknown key (not a field of this fedseg's run history)"
    )
    assert "re-run the job" in lines[3]


def test_a_history_that_is_not_json_names_the_file(tmp_path):
    path = tmp_path / "history.json"
    path.write_text("{not json")
    with pytest.raises(HistoryError, match="not valid JSON") as error:
        read_history(path)
    assert str(error.value).startswith(str(path))


def test_to_json_holds_only_json_types_so_flare_can_send_it_as_the_status_answer():
    # FLARE's message encoding drops an answer holding an enum: `fedseg job status` then
    # showed 0 rounds while a job ran.
    plain = _history().to_json()

    def kinds(value) -> set[type]:
        if isinstance(value, dict):
            return {dict}.union(*(kinds(v) for v in value.values()), *(kinds(k) for k in value))
        if isinstance(value, list):
            return {list}.union(*(kinds(v) for v in value))
        return {type(value)}

    assert kinds(plain) <= {dict, list, str, int, float, bool, type(None)}
    assert plain["final"][0]["phase"] == "final"
    assert json.loads(json.dumps(plain)) == plain
