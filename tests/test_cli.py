"""The fedseg command line: clear errors with exit code 2, never a traceback, for bad input."""

import json

import pytest

from fedseg.cli import main


def test_spec_check_accepts_the_demo_spec(capsys):
    assert main(["spec", "check", "jobs/specs/demo.yaml"]) == 0
    assert "is valid" in capsys.readouterr().out


def test_spec_check_names_every_bad_field(tmp_path, capsys):
    spec = tmp_path / "bad.yaml"
    spec.write_text("name: x\nmodel: {norm: batch}\ntraining: {rounds: 0}\n")
    assert main(["spec", "check", str(spec)]) == 2
    err = capsys.readouterr().err
    assert "model.norm" in err and "training.rounds" in err and "Traceback" not in err


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (["simulate", "run", "missing.yaml", "--data", "d", "--out", "o"], "job spec not found"),
        (["site", "check", "--data", "/nonexistent/dicom"], "/nonexistent/dicom"),
    ],
)
def test_missing_paths_are_named(argv, expected, capsys):
    assert main(argv) == 2
    assert expected in capsys.readouterr().err


def test_simulate_run_names_a_missing_data_folder(tmp_path, capsys):
    argv = ["simulate", "run", "jobs/specs/demo.yaml", "--data", str(tmp_path / "none")]
    assert main([*argv, "--out", str(tmp_path / "out")]) == 2
    assert "data folder not found" in capsys.readouterr().err


def test_bad_numbers_are_usage_errors(tmp_path):
    with pytest.raises(SystemExit) as exit_info:
        main(["simulate", "data", "--sites", "0", "--out", str(tmp_path)])
    assert exit_info.value.code == 2


def test_site_check_prints_the_summary_and_writes_reasons(tiny_federation, tmp_path, capsys):
    quarantine = tmp_path / "quarantine.json"
    argv = ["site", "check", "--data", str(tiny_federation / "site-1")]
    assert main([*argv, "--quarantine-out", str(quarantine)]) == 0
    out = capsys.readouterr().out
    assert "Patients with usable data" in out and "Quarantined: truncated" in out
    reasons = {entry["reason"] for entry in json.loads(quarantine.read_text())["entries"]}
    assert {"not_dicom", "truncated", "missing_slices", "unsupported_modality"} <= reasons


def test_site_ledger_shows_the_budget_and_reports_tampering(tmp_path, capsys):
    from site_app.ledger import EpsilonLedger, generate_site_key

    key, path = tmp_path / "site_key.pem", tmp_path / "epsilon_ledger.jsonl"
    generate_site_key(key)
    ledger = EpsilonLedger.open(path=path, key_path=key)
    for round_index, epsilon in enumerate((1.5, 2.5)):
        ledger.append(
            job="job-a",
            round=round_index,
            steps=10,
            sample_rate=0.25,
            noise_multiplier=1.1,
            accountant="rdp",
            epsilon_after=epsilon,
            delta=1e-5,
        )
    assert main(["site", "ledger", "--ledger", str(path), "--budget", "10"]) == 0
    out = capsys.readouterr().out
    assert "job-a" in out and "verified" in out and "left 7.500" in out

    path.write_text(path.read_text().replace('"epsilon_after":2.5', '"epsilon_after":0.5'))
    assert main(["site", "ledger", "--ledger", str(path)]) == 1
    err = capsys.readouterr().err
    assert "failed verification" in err and "round 1" in err


def test_a_redirected_results_table_is_printed_whole(capsys):
    """Into a log file rich would squeeze 12 columns into 80 and cut the numbers to '0.4…'."""
    from rich.table import Table

    from fedseg.terminal import console
    from fedseg.terminal import print_table as _print_table

    table = Table(*[f"site-{i} Dice | HD95 mm" for i in range(12)])
    table.add_row(*[f"0.{i:03d} | 123.4" for i in range(12)])
    width = console.width
    _print_table(table)
    out = capsys.readouterr().out
    assert all(f"0.{i:03d} | 123.4" in out for i in range(12)) and "…" not in out
    assert console.width == width  # messages after the table keep the console's width


# -- user and remote text is data, not rich markup ---------------------------------------------

BRACKETS = "policy of [site-1]: [/x] [bold]not markup[/bold]"


def test_an_error_message_with_brackets_arrives_intact(tmp_path, capsys):
    missing = tmp_path / "[site-1] [/x].yaml"  # `[/x]` crashed rich's markup parser
    assert main(["spec", "check", str(missing)]) == 2
    err = capsys.readouterr().err
    assert "[site-1] [/x].yaml" in err and "Traceback" not in err


def test_a_refusal_reason_and_a_site_name_with_brackets_are_printed_intact(capsys):
    from fedseg.simulate_cli import _format_record
    from fedseg.terminal import console
    from server_app.history import SiteRound

    empty = dict(val_dice=None, val_patients=None, num_patients=None, num_steps=None)
    record = SiteRound(
        site="[site-1]",
        round=0,
        train_loss=None,
        epsilon=None,
        delta=None,
        refused=BRACKETS,
        **empty,
    )
    console.print(_format_record(record))
    assert f"[site-1]: refused — {BRACKETS}" in capsys.readouterr().out


def test_job_status_prints_remote_text_intact(monkeypatch, capsys):
    from fedseg import deploy_cli
    from researcher_app import session

    status = session.JobStatus(
        job_id="[j1]",
        name="[/x] job",
        status="RUNNING",
        submitted=None,
        duration=None,
        rounds_done=1,
        rounds_planned=2,
        sites_connected=["[site-1]"],
        sites=[session.SiteStatus(site="[site-1]", last_round=0, refused=BRACKETS)],
        errors=[f"[site-2] failed: {BRACKETS}"],
    )
    monkeypatch.setattr(session, "job_status", lambda kit, job_id: status)
    monkeypatch.setattr(deploy_cli.console, "width", 400)  # no cell wrapped in the table
    assert main(["job", "status", "[j1]", "--kit", "kit"]) == 0
    out = capsys.readouterr().out
    assert "[/x] job ([j1])" in out and "sites connected: [site-1]" in out
    assert "[site-2] failed: policy of [site-1]: [/x] [bold]not markup[/bold]" in out
    assert "refused: policy of [site-1]" in out


def test_emoji_codes_in_text_stay_text(tmp_path, capsys):
    """A root CA fingerprint holds ':CD:' now and then; rich would print it as an emoji."""
    missing = tmp_path / "AB:CD:EF :smile:.yaml"
    assert main(["spec", "check", str(missing)]) == 2
    assert "AB:CD:EF :smile:.yaml" in capsys.readouterr().err
