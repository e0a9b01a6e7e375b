"""Baselines in one command, the privacy-utility sweep and the synthetic-only slice overlays."""

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from fedseg.cli import main
from jobs.model import file_sha256, initial_weights, numpy_to_state
from server_app.history import read_history
from simulator.baselines import SiteScore, load_site_splits
from simulator.compare import run_compare
from simulator.compare_results import Method, MethodResult, comparison_ratios
from simulator.compare_specs import CompareError, parse_epsilons, privacy_variant
from simulator.federation import run_simulation
from simulator.overlays import (
    OverlayRefused,
    middle_lesion_slice,
    require_simulator_data,
    write_site_overlays,
)
from site_app.local_job import LocalJob
from site_app.site_config import SiteConfig
from tests.conftest import tiny_spec

# -- the sweep's epsilon list -----------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("1,4,8,inf", (1.0, 4.0, 8.0, math.inf)),
        (" 8 , 0.5,inf ", (0.5, 8.0, math.inf)),
        ("inf", (math.inf,)),
    ],
)
def test_epsilon_lists_parse_in_ascending_order(text, expected):
    assert parse_epsilons(text) == expected


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("", "got nothing"),
        ("1,,4", "got '' in '1,,4'"),
        ("0", "got '0'"),
        ("-1,4", "got '-1'"),
        ("1,four", "got 'four'"),
        ("nan", "got 'nan'"),
        ("-inf", "got '-inf'"),
        ("4,4.0,8", "4 appears more than once"),
    ],
)
def test_bad_epsilon_lists_are_refused_with_the_reason(text, message):
    with pytest.raises(CompareError, match="--epsilons") as error:
        parse_epsilons(text)
    assert message in str(error.value)


def test_the_cli_refuses_a_bad_epsilon_list_as_a_usage_error(tmp_path, capsys):
    argv = ["simulate", "compare", "jobs/specs/demo.yaml", "--data", str(tmp_path)]
    with pytest.raises(SystemExit) as exit_info:
        main([*argv, "--out", str(tmp_path / "out"), "--epsilons", "1,x,8"])
    assert exit_info.value.code == 2
    assert "expected positive numbers or inf" in capsys.readouterr().err


def test_inf_turns_dp_off_and_a_number_becomes_the_whole_job_target():
    spec = tiny_spec()
    off = privacy_variant(spec, math.inf)
    assert not off.privacy.enabled
    target = privacy_variant(spec, 4)
    assert target.privacy.enabled and target.privacy.target_epsilon == 4.0
    assert target.privacy.noise_multiplier is None
    assert privacy_variant(spec, None) == spec
    # Nothing else changes: the rows differ only in privacy.
    assert off.training == target.training == spec.training and off.model == spec.model


def test_a_spec_without_dp_needs_a_dp_epsilon_for_the_dp_row(tiny_federation, tmp_path):
    spec = tiny_spec(privacy={"enabled": False})
    with pytest.raises(CompareError, match="pass --dp-epsilon"):
        run_compare(spec, data_dir=tiny_federation, out_dir=tmp_path)
    assert not (tmp_path / "compare").exists()  # refused before any training


# -- ratios ------------------------------------------------------------------------------------


def _row(method: str, *dice: float | None) -> MethodResult:
    scores = tuple(
        SiteScore(
            site=f"site-{i + 1}",
            dice=d,
            hd95_mm=None,
            hd95_missing=0,
            lesion_volumes=1,
            val_patients=1,
        )
        for i, d in enumerate(dice)
    )
    return MethodResult(method, method, scores, steps=0, wall_s=0.0, run_dir="", privacy="")


def test_ratios_are_of_the_mean_dice_over_sites():
    rows = [
        _row(Method.LOCAL_ONLY, 0.2, 0.4),
        _row(Method.POOLED, 0.5, 0.7),
        _row(Method.FEDAVG, 0.4, None, 0.8),  # a site without a lesion held out is left out
        _row(Method.FEDAVG_DP, 0.3, 0.3),
    ]
    ratios = comparison_ratios(rows)
    assert ratios["fedavg_over_pooled"] == pytest.approx(0.6 / 0.6)
    assert ratios["dp_over_fedavg"] == pytest.approx(0.3 / 0.6)
    assert ratios["fedavg_minus_local_only"] == pytest.approx(0.6 - 0.3)


def test_ratios_are_none_without_a_usable_denominator():
    ratios = comparison_ratios([_row(Method.POOLED, 0.0), _row(Method.FEDAVG, 0.5)])
    assert ratios["fedavg_over_pooled"] is None
    assert ratios["dp_over_fedavg"] is None and ratios["fedavg_minus_local_only"] is None


# -- overlays: synthetic data only --------------------------------------------------------------


def test_overlays_refuse_data_that_is_not_the_simulators(tiny_federation, tmp_path):
    with pytest.raises(OverlayRefused, match=r"manifest\.json is missing"):
        require_simulator_data(tmp_path)
    (tmp_path / "manifest.json").write_text(json.dumps({"generator": "a hospital export"}))
    with pytest.raises(OverlayRefused, match="was not written by it"):
        require_simulator_data(tmp_path)
    with pytest.raises(OverlayRefused, match="only for synthetic data"):
        write_site_overlays(
            data_dir=tmp_path,
            val_patients={},
            models={},
            roi_size=(16, 16, 16),
            spacing_mm=(1.0, 1.0, 1.0),
            out_dir=tmp_path / "overlays",
        )
    assert not (tmp_path / "overlays").exists()
    require_simulator_data(tiny_federation)  # the simulator's own folder is accepted


def test_the_middle_lesion_slice_is_the_middle_of_the_slices_with_lesion():
    label = np.zeros((1, 8, 8, 10), dtype=np.float32)
    label[0, 2:4, 2:4, [3, 4, 5, 8]] = 1
    assert middle_lesion_slice(label) == 5
    with pytest.raises(ValueError, match="no lesion"):
        middle_lesion_slice(np.zeros((8, 8, 4)))


# -- the baselines use the federation's split --------------------------------------------------


def test_baselines_hold_out_the_same_patients_as_the_federation(tiny_federation, tmp_path):
    spec = privacy_variant(tiny_spec(), math.inf)
    splits = load_site_splits(
        spec, data_dir=tiny_federation, sites=["site-1", "site-2"], cache_dir=tmp_path / "cache"
    )
    for site in ("site-1", "site-2"):
        job = LocalJob(
            spec=spec,
            site=site,
            config=SiteConfig(
                data_dir=tiny_federation / site,
                cache_dir=tmp_path / "cache" / site,
                policy={"dp_required": False},
            ),
            state_dir=tmp_path / "state" / site,
            simulation=True,
        )
        assert [p.patient_key for p in splits[site].val] == [
            p.patient_key for p in job.val_patients
        ]
        assert [p.patient_key for p in splits[site].train] == [
            p.patient_key for p in job.train_patients
        ]
        assert splits[site].val  # something is held out at every site


# -- the whole comparison, end to end ----------------------------------------------------------


def _public_weights(store: Path) -> dict:
    """A stand-in for pretrained public weights: another seed's initial weights, saved."""
    store.mkdir(parents=True, exist_ok=True)
    path = store / "public.pt"
    torch.save(numpy_to_state(initial_weights(tiny_spec().model, 5)), path)
    return {"file": path.name, "sha256": file_sha256(path)}


@pytest.fixture(scope="module")
def comparison(tiny_federation, tmp_path_factory):
    out = tmp_path_factory.mktemp("compare")
    store = out / "models_store"
    spec = tiny_spec(model={"init": _public_weights(store)})
    result = run_compare(
        spec, data_dir=tiny_federation, out_dir=out, epsilons=(8, math.inf), model_store=store
    )
    return result, out


@pytest.mark.slow
def test_compare_gives_every_row_with_finite_dice_and_the_ratios(comparison):
    result, out = comparison
    assert [row.method for row in result.rows] == list(Method)
    for row in result.rows:
        assert [s.site for s in row.scores] == ["site-1", "site-2"]
        assert all(s.dice is not None and math.isfinite(s.dice) for s in row.scores), row
        assert (out / row.run_dir).exists()
    saved = json.loads((out / "compare" / "compare.json").read_text())
    means = {row["method"]: row["mean_dice"] for row in saved["rows"]}
    assert saved["ratios"]["fedavg_over_pooled"] == pytest.approx(means["fedavg"] / means["pooled"])
    assert saved["ratios"]["dp_over_fedavg"] == pytest.approx(means["fedavg_dp"] / means["fedavg"])
    markdown = (out / "compare" / "compare.md").read_text()
    assert "FedAvg / pooled mean Dice" in markdown and "| FedAvg + DP |" in markdown
    assert "| public model only |" in markdown and "| local-only + DP |" in markdown
    assert "the public model alone" in markdown


@pytest.mark.slow
def test_every_trained_row_starts_from_the_spec_s_initial_weights(comparison):
    result, out = comparison
    public = initial_weights(tiny_spec().model, 5)
    start = torch.load(out / "compare" / "fedavg" / "models" / "global_model_round_0.pt")
    assert all(np.array_equal(start[k].numpy(), public[k]) for k in public)
    rows = {row.method: row for row in result.rows}
    assert rows[Method.PUBLIC_ONLY].steps == 0 and rows[Method.PUBLIC_ONLY].max_epsilon is None
    # Its folder holds the very file model.init names, still matching the recorded hash.
    init = json.loads((out / rows[Method.PUBLIC_ONLY].run_dir / "init.json").read_text())
    copied = out / rows[Method.PUBLIC_ONLY].run_dir / "models" / init["file"]
    assert file_sha256(copied) == init["sha256"] == file_sha256(out / "models_store" / "public.pt")
    # The public row scores those weights untouched: what the sites measured at round 0.
    history = read_history(out / "compare" / "fedavg" / "history.json")
    at_start = {r.site: r.val_dice for r in history.rounds if r.round == 0}
    assert {s.site: s.dice for s in rows[Method.PUBLIC_ONLY].scores} == pytest.approx(at_start)


@pytest.mark.slow
def test_the_server_refuses_initial_weights_with_another_hash(tiny_federation, tmp_path):
    store = tmp_path / "store"
    init = _public_weights(store)
    spec = tiny_spec(model={"init": {**init, "sha256": "0" * 64}}, training={"rounds": 1})
    result = run_simulation(
        spec, data_dir=tiny_federation, out_dir=tmp_path / "run", model_store=store
    )
    assert result.history.rounds_completed == 0
    assert "the server refused the initial weights" in result.history.stopped_reason
    assert "has sha256 " + init["sha256"] in result.history.stopped_reason


@pytest.mark.slow
def test_every_row_gets_the_same_epochs_and_only_dp_rows_spend_epsilon(comparison):
    result, _ = comparison
    rows = {row.method: row for row in result.rows}
    # Same epochs at each site, fixed (non-DP) batches: local-only takes FedAvg's steps exactly.
    assert rows[Method.LOCAL_ONLY].steps == rows[Method.FEDAVG].steps > 0
    assert rows[Method.POOLED].steps > 0
    assert result.budget["epochs"] == 2
    for method in (Method.PUBLIC_ONLY, Method.LOCAL_ONLY, Method.POOLED, Method.FEDAVG):
        assert rows[method].max_epsilon is None
    for method in (Method.LOCAL_ONLY_DP, Method.FEDAVG_DP):
        assert all(s.epsilon > 0 for s in rows[method].scores)
    # The same DP at a site alone as in the federation: the same steps, the same epsilon.
    assert rows[Method.LOCAL_ONLY_DP].steps == rows[Method.FEDAVG_DP].steps
    assert [s.epsilon for s in rows[Method.LOCAL_ONLY_DP].scores] == pytest.approx(
        [s.epsilon for s in rows[Method.FEDAVG_DP].scores]
    )


@pytest.mark.slow
def test_the_federated_rows_score_the_model_the_sites_validated(comparison):
    """The comparison's own scoring of final_model.pt equals the sites' final validation."""
    result, out = comparison
    for method in (Method.FEDAVG, Method.FEDAVG_DP):
        row = next(r for r in result.rows if r.method == method)
        history = read_history(out / row.run_dir / "history.json")
        reported = {r.site: r.val_dice for r in history.final}
        assert {s.site: s.dice for s in row.scores} == pytest.approx(reported)
        assert (out / row.run_dir / "report.json").is_file()


@pytest.mark.slow
def test_the_sweep_meets_each_target_and_reuses_the_dp_off_run(comparison):
    result, out = comparison
    assert [p.target_epsilon for p in result.sweep] == [8, math.inf]
    at_8, off = result.sweep
    assert all(0 < s.epsilon <= 8 * (1 + 1e-9) for s in at_8.result.scores)
    assert at_8.result.run_dir == "sweep/eps_8"
    history = read_history(out / "sweep" / "eps_8" / "history.json")
    assert all(r.epsilon <= 8 * (1 + 1e-9) for r in history.rounds)
    # inf = DP off = the FedAvg row's spec and seed: the same run, not run twice.
    assert off.result.run_dir == "compare/fedavg" and not (out / "sweep" / "eps_inf").exists()
    assert all(s.epsilon is None for s in off.result.scores)
    assert (out / "sweep" / "privacy_utility.png").stat().st_size > 0


@pytest.mark.slow
def test_one_overlay_per_site_on_synthetic_data(comparison):
    result, out = comparison
    assert result.overlays == ["compare/overlays/site-1.png", "compare/overlays/site-2.png"]
    for path in result.overlays:
        assert (out / path).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
