import json

from server_app.history import RunHistory, SiteRound, read_history, write_history
from server_app.report import write_report

SPEC = {
    "privacy": {
        "enabled": True,
        "noise_multiplier": 1.0,
        "accountant": "rdp",
        "max_grad_norm": 1.0,
        "delta": 1e-5,
        "target_epsilon": None,
    }
}


def _round(site, index, dice, epsilon, refused=None):
    return SiteRound(
        site=site,
        round=index,
        val_dice=dice,
        val_patients=3,
        num_patients=9,
        num_steps=12,
        train_loss=0.5,
        epsilon=epsilon,
        delta=1e-5,
        refused=refused,
    )


def _history():
    history = RunHistory(job_name="job", sites=["site-1", "site-2"], rounds_planned=2)
    history.rounds = [
        _round("site-1", 0, 0.01, 2.0),
        _round("site-2", 0, 0.02, 2.0),
        _round("site-1", 1, 0.30, 3.5),
        _round("site-2", 1, 0.40, 12.0, refused="site site-2 refused the round: epsilon ..."),
    ]
    history.final = [
        SiteRound(
            site="site-1",
            round=2,
            val_dice=0.5,
            val_patients=3,
            num_patients=None,
            num_steps=None,
            train_loss=None,
            epsilon=3.5,
            delta=None,
            phase="final",
        ),
        SiteRound(
            site="site-2",
            round=2,
            val_dice=0.6,
            val_patients=3,
            num_patients=None,
            num_steps=None,
            train_loss=None,
            epsilon=12.0,
            delta=None,
            phase="final",
        ),
    ]
    history.rounds_completed = 2
    return history


def test_report_has_untrained_and_final_dice_and_last_epsilon_per_site(tmp_path):
    report = write_report(_history(), spec=SPEC, out_dir=tmp_path).to_json()
    rows = {row["site"]: row for row in report["per_site"]}
    assert rows["site-1"]["untrained_dice"] == 0.01 and rows["site-1"]["final_dice"] == 0.5
    assert rows["site-2"]["epsilon"] == 12.0
    assert report["refusals"][0]["site"] == "site-2"
    markdown = (tmp_path / "report.md").read_text()
    assert "## Refusals" in markdown and "weak privacy" in markdown and "site-2" in markdown


def test_report_is_rebuilt_identically_from_saved_history(tmp_path):
    write_history(_history(), tmp_path / "history.json")
    first = write_report(_history(), spec=SPEC, out_dir=tmp_path / "a")
    again = write_report(read_history(tmp_path / "history.json"), spec=SPEC, out_dir=tmp_path / "b")
    assert first == again
    assert json.loads((tmp_path / "b" / "report.json").read_text()) == json.loads(
        (tmp_path / "a" / "report.json").read_text()
    )


def test_no_weak_privacy_warning_when_dp_is_strong_enough(tmp_path):
    history = _history()
    history.rounds = [r for r in history.rounds if r.site == "site-1"]
    history.sites = ["site-1"]
    history.final = history.final[:1]
    write_report(history, spec=SPEC, out_dir=tmp_path)
    assert "weak privacy" not in (tmp_path / "report.md").read_text()


def test_epsilon_plot_is_written_and_linked(tmp_path):
    report = write_report(_history(), spec=SPEC, out_dir=tmp_path).to_json()
    png = tmp_path / "epsilon_per_round.png"
    assert png.name in report["plots"]
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert f"]({png.name})" in (tmp_path / "report.md").read_text()


def test_no_plot_without_dp(tmp_path):
    history = _history()
    history.rounds = [
        SiteRound(
            site=r.site,
            round=r.round,
            val_dice=r.val_dice,
            val_patients=3,
            num_patients=9,
            num_steps=12,
            train_loss=0.5,
            epsilon=None,
            delta=None,
        )
        for r in history.rounds
    ]
    report = write_report(history, spec={"privacy": {"enabled": False}}, out_dir=tmp_path).to_json()
    assert "epsilon_per_round.png" not in report["plots"]
    assert not (tmp_path / "epsilon_per_round.png").exists()


def test_budget_left_is_reported_per_site(tmp_path):
    history = _history()
    history.rounds[2] = SiteRound(
        site="site-1",
        round=1,
        val_dice=0.3,
        val_patients=3,
        num_patients=9,
        num_steps=12,
        train_loss=0.5,
        epsilon=3.5,
        delta=1e-5,
        budget_left=6.5,
    )
    report = write_report(history, spec=SPEC, out_dir=tmp_path).to_json()
    rows = {row["site"]: row for row in report["per_site"]}
    assert rows["site-1"]["budget_left"] == 6.5 and rows["site-2"]["budget_left"] is None
    assert "| 6.50 |" in (tmp_path / "report.md").read_text()
