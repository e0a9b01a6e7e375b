"""The evaluation part of the report: HD95, cross-site matrix, subgroups, plots, model card, and
the rebuild from saved results."""

import json
from pathlib import Path

import pytest
import torch

from fedseg.cli import main
from jobs import keys
from server_app.history import CrossSiteResult, RunHistory, SiteRound, write_history
from server_app.model_card import ModelCardError, fill_template
from server_app.model_manifest import simulation_signer, write_signed_manifest
from server_app.report import rebuild_report, write_report
from server_app.report_build import largest_gaps, pool_subgroups
from server_app.report_schema import ReportError, SubgroupCell
from tests.conftest import tiny_spec

SPEC = tiny_spec().to_plain()


def _cell(attribute, value, n, dice, hd95=4.0):
    return {
        keys.CELL_ATTRIBUTE: attribute,
        keys.CELL_VALUE: value,
        keys.CELL_PATIENTS: n,
        keys.CELL_DICE: dice,
        keys.CELL_HD95_MM: hd95,
        keys.CELL_HD95_PATIENTS: n,
    }


def _round(site, index, dice, epsilon):
    return SiteRound(
        site=site,
        round=index,
        val_dice=dice,
        val_patients=6,
        num_patients=20,
        num_steps=10,
        train_loss=0.5,
        epsilon=epsilon,
        delta=1e-5,
        val_hd95_mm=9.0,
    )


def _final(site, dice, hd95, missing, subgroups):
    return SiteRound(
        site=site,
        round=2,
        val_dice=dice,
        val_patients=6,
        num_patients=None,
        num_steps=None,
        train_loss=None,
        epsilon=2.0,
        delta=None,
        phase="final",
        val_hd95_mm=hd95,
        val_hd95_missing=missing,
        val_lesion_volumes=5,
        subgroups=subgroups,
    )


def _cross(model, site, dice):
    return CrossSiteResult(
        model=model,
        model_round=1,
        site=site,
        val_dice=dice,
        val_hd95_mm=7.5,
        val_hd95_missing=0,
        val_lesion_volumes=5,
        val_patients=6,
    )


def _history():
    history = RunHistory(job_name="tiny", sites=["site-1", "site-2"], rounds_planned=2, spec=SPEC)
    history.rounds = [
        _round("site-1", 0, 0.01, 1.0),
        _round("site-2", 0, 0.02, 1.0),
        _round("site-1", 1, 0.30, 2.0),
        _round("site-2", 1, 0.40, 2.0),
    ]
    history.final = [
        _final(
            "site-1",
            0.5,
            6.25,
            1,
            [_cell(keys.SEX, "female", 6, 0.6), _cell(keys.VENDOR, "GE", 9, 0.5)],
        ),
        _final(
            "site-2",
            0.6,
            5.0,
            0,
            [
                _cell(keys.SEX, "female", 5, 0.8, hd95=None),
                _cell(keys.SEX, "male", 5, 0.4),
                _cell(keys.VENDOR, "Siemens", 10, 0.6),
            ],
        ),
    ]
    history.cross_site = [
        _cross("site-1", "site-1", 0.55),
        _cross("site-1", "site-2", 0.25),
        _cross("site-2", "site-1", 0.35),
        _cross("site-2", "site-2", 0.65),
    ]
    history.rounds_completed = 2
    history.best_round = 2
    return history


def test_final_hd95_and_its_undefined_count_are_reported_per_site(tmp_path):
    report = write_report(_history(), spec=SPEC, out_dir=tmp_path).to_json()
    rows = {row["site"]: row for row in report["per_site"]}
    assert rows["site-1"]["final_hd95_mm"] == 6.25 and rows["site-1"]["final_hd95_missing"] == 1
    assert rows["site-2"]["train_patients"] == 20
    markdown = (tmp_path / "report.md").read_text()
    assert "| site-1 | 0.010 | 0.500 | 6.2 | 1 |" in markdown
    assert "spacing 10 x 10 x 10 mm" in markdown  # the spacing HD95 is measured at is stated


def test_cross_site_matrix_has_global_and_every_local_model_at_every_site(tmp_path):
    report = write_report(_history(), spec=SPEC, out_dir=tmp_path).to_json()
    cross = report["cross_site"]
    assert cross["models"] == ["global", "site-1", "site-2"]
    cells = {(c["model"], c["site"]): c for c in cross["cells"]}
    assert len(cells) == 6
    assert cells[("global", "site-2")]["dice"] == 0.6
    assert cells[("site-1", "site-2")]["dice"] == 0.25
    markdown = (tmp_path / "report.md").read_text()
    assert "| final global | 0.500 / 6.2 | 0.600 / 5.0 |" in markdown
    assert "| site-1 local | 0.550 / 7.5 | 0.250 / 7.5 |" in markdown


def test_subgroups_are_pooled_by_patients_and_suppressed_cells_shown_as_below_minimum(tmp_path):
    report = write_report(_history(), spec=SPEC, out_dir=tmp_path).to_json()
    pooled = {(c["attribute"], c["value"]): c for c in report["subgroups"]["pooled"]}
    female = pooled[(keys.SEX, "female")]
    assert female["n"] == 11 and female["sites"] == ["site-1", "site-2"]
    assert female["dice"] == pytest.approx((6 * 0.6 + 5 * 0.8) / 11)
    assert female["hd95_mm"] == pytest.approx(4.0)  # site-2 withheld its HD95: site-1 alone
    gaps = {g["attribute"]: g for g in report["subgroups"]["largest_gap"]}
    assert gaps[keys.SEX]["gap"] == pytest.approx(female["dice"] - 0.4)
    assert gaps[keys.SEX]["worst"]["value"] == "male"
    assert gaps[keys.VENDOR]["best"]["value"] == "Siemens"
    markdown = (tmp_path / "report.md").read_text()
    # male was not sent by site-1 (too few patients there): shown as suppressed, not as 0.
    assert "| sex | male | <5 | 0.400 (5) | 0.400 (5) | 4.0 |" in markdown
    assert "| age band | 60-79 | <5 | <5 | <5 | - |" in markdown
    assert "Largest gap per attribute" in markdown


def test_unknown_values_do_not_count_as_a_subgroup_gap():
    pooled = pool_subgroups(
        [
            SubgroupCell(
                site="a", attribute="sex", value=value, n=5, dice=dice, hd95_mm=None, n_hd95=None
            )
            for value, dice in (("female", 0.5), ("unknown", 0.1))
        ]
    )
    assert largest_gaps(pooled) == []


def test_plots_are_written_and_linked(tmp_path):
    report = write_report(_history(), spec=SPEC, out_dir=tmp_path).to_json()
    assert report["plots"] == ["dice_per_round.png", "epsilon_per_round.png", "subgroup_dice.png"]
    markdown = (tmp_path / "report.md").read_text()
    for name in report["plots"]:
        assert (tmp_path / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert f"]({name})" in markdown


def _saved_results(tmp_path):
    """A results folder as the simulator leaves it: history.json, a signed final model."""
    results = tmp_path / "results"
    (results / "models").mkdir(parents=True)
    write_history(_history(), results / "history.json")
    model = results / "models" / "final_model.pt"
    torch.save({"w": torch.zeros(2)}, model)
    write_signed_manifest(
        model,
        spec=SPEC,
        contributing_sites=["site-1", "site-2"],
        epsilon_per_site={"site-1": 2.0, "site-2": 2.0},
        rounds_completed=2,
        signer=simulation_signer(),
    )
    return results


OUTPUTS = (
    "report.json",
    "report.md",
    "model_card.md",
    "dice_per_round.png",
    "epsilon_per_round.png",
    "subgroup_dice.png",
)


def test_rebuild_from_saved_results_equals_the_original(tmp_path):
    results = _saved_results(tmp_path)
    write_report(_history(), spec=SPEC, out_dir=results, wall_s=12.34)
    original = {name: (results / name).read_bytes() for name in OUTPUTS}
    for name in OUTPUTS[1:]:  # everything but report.json, whose wall time the rebuild keeps
        (results / name).unlink()
    assert main(["report", str(results)]) == 0
    assert {name: (results / name).read_bytes() for name in OUTPUTS} == original


def test_rebuild_needs_only_history_and_models(tmp_path):
    results = _saved_results(tmp_path)
    original = write_report(_history(), spec=SPEC, out_dir=results)
    card = (results / "model_card.md").read_bytes()
    for name in OUTPUTS:
        (results / name).unlink()
    assert rebuild_report(results) == original  # the spec comes from history.json
    assert (results / "model_card.md").read_bytes() == card


def test_rebuild_without_history_names_the_missing_file(tmp_path, capsys):
    assert main(["report", str(tmp_path)]) == 2
    assert "history.json not found" in capsys.readouterr().err


def test_model_card_holds_counts_metrics_subgroups_privacy_and_signature(tmp_path):
    results = _saved_results(tmp_path)
    write_report(_history(), spec=SPEC, out_dir=results)
    card = (results / "model_card.md").read_text()
    assert "{{" not in card and "}}" not in card
    assert "| site-1 | 20 | 6 | 5 |" in card  # training / held-out patients, lesion volumes
    assert "| site-2 | 0.020 | 0.600 | 5.0 | 0 |" in card
    assert "**sex**" in card and "Siemens" in card
    assert "site-1 ε = 2.00" in card and "δ = 1e-05" in card
    assert "simulation key" in card
    manifest = json.loads((results / "models" / "final_model.manifest.json").read_text())
    assert manifest["model_sha256"] in card
    assert "Not** for diagnosis" in card


def test_model_card_without_dp_claims_no_guarantee(tmp_path):
    spec = tiny_spec(privacy={"enabled": False}).to_plain()
    write_report(_history(), spec=spec, out_dir=tmp_path)
    card = (tmp_path / "model_card.md").read_text()
    assert "**None.** Differential privacy was disabled" in card
    assert "ε =" not in card


def test_a_template_field_the_code_does_not_know_is_an_error():
    with pytest.raises(ModelCardError, match=r"unknown field\(s\) \['nope'\]"):
        fill_template("# {{job}} {{nope}}", {"job": "x"}, source="card.md")


def test_the_default_model_card_template_ships_with_the_package():
    import server_app
    from server_app.model_card import DEFAULT_TEMPLATE

    package = Path(server_app.__file__).parent
    assert DEFAULT_TEMPLATE.is_file() and package in DEFAULT_TEMPLATE.parents
    # docs/ shows the same file (a link), so what researchers read is what fills the card.
    assert Path("docs/model-card-template.md").read_text() == DEFAULT_TEMPLATE.read_text()


def test_rebuild_with_a_damaged_report_json_names_the_file_and_the_field(tmp_path):
    results = _saved_results(tmp_path)
    write_report(_history(), spec=SPEC, out_dir=results, wall_s=3.0)
    saved = json.loads((results / "report.json").read_text())
    saved["wall_time_s"] = "slow"
    (results / "report.json").write_text(json.dumps(saved))
    with pytest.raises(ReportError) as error:
        rebuild_report(results)
    message = str(error.value)
    assert message.startswith(f"{results / 'report.json'}: 1 problem(s) in the report:")
    assert "wall_time_s: Input should be a valid number" in message and "got 'slow'" in message
