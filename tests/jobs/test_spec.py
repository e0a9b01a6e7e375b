from pathlib import Path

import pytest

from jobs.spec import JobSpec, JobSpecError, load_spec, parse_spec

SPECS = sorted((Path(__file__).parents[2] / "jobs" / "specs").glob("*.yaml"))


@pytest.mark.parametrize("path", SPECS, ids=lambda p: p.name)
def test_shipped_specs_are_valid(path):
    spec = load_spec(path)
    assert isinstance(spec, JobSpec)


def test_defaults_fill_missing_sections():
    spec = parse_spec({"name": "minimal"})
    assert spec.privacy.enabled and spec.privacy.noise_multiplier == 1.0
    assert spec.model.norm.value == "instance"


def test_round_trip_through_plain_data():
    spec = load_spec(SPECS[0])
    assert parse_spec(spec.to_plain()) == spec


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        ({"name": "x", "modle": {}}, "modle: unknown key"),
        ({"name": "x", "model": {"chanels": [8]}}, "model.chanels: unknown key"),
        ({"name": "x", "model": {"network": "resnet"}}, "model.network: Input should be 'unet'"),
        ({"name": "x", "model": {"norm": "batch"}}, "model.norm: Input should be 'instance'"),
        ({"name": "x", "model": {"roi_size": [30, 32, 32]}}, "divisible by 8"),
        ({"name": "x", "model": {"strides": [2, 2]}}, "expected 3 strides"),
        (
            {"name": "x", "training": {"rounds": 0}},
            "training.rounds: Input should be greater than 0",
        ),
        (
            {"name": "x", "training": {"lr": -1}},
            "training.lr: Input should be greater than 0, got -1",
        ),
        ({"name": "x", "data": {"hu_window": [300, -200]}}, "low < high"),
        ({"name": "x", "data": {"val_fraction": 1.5}}, "data.val_fraction"),
        (
            {"name": "x", "privacy": {"target_epsilon": -1}},
            "privacy.target_epsilon: Input should be greater than 0, got -1",
        ),
        (
            {"name": "x", "privacy": {"noise_multiplier": 1.0, "target_epsilon": 8}},
            "set exactly one of noise_multiplier or target_epsilon",
        ),
        ({"name": "x", "privacy": {"enabled": True}}, "set exactly one"),
        ({"name": "bad name!"}, "name: String should match pattern"),
        ({"model": {}}, "name: Field required"),
        ([1, 2], "expected a mapping"),
    ],
)
def test_bad_specs_name_the_field(data, expected):
    with pytest.raises(JobSpecError) as raised:
        parse_spec(data, source="my-spec.yaml")
    assert expected in str(raised.value)
    assert "my-spec.yaml" in str(raised.value)


def test_every_problem_is_reported_at_once():
    with pytest.raises(JobSpecError) as raised:
        parse_spec({"name": "x", "training": {"rounds": 0, "lr": 0}, "extra": 1})
    message = str(raised.value)
    assert "3 problem(s)" in message
    assert "training.rounds" in message and "training.lr" in message and "extra" in message


def test_missing_file_and_bad_yaml(tmp_path):
    with pytest.raises(JobSpecError, match="job spec not found"):
        load_spec(tmp_path / "nope.yaml")
    broken = tmp_path / "broken.yaml"
    broken.write_text("name: [unclosed\n")
    with pytest.raises(JobSpecError, match="not valid YAML"):
        load_spec(broken)


def test_dp_off_needs_no_noise_settings():
    spec = parse_spec({"name": "x", "privacy": {"enabled": False}})
    assert not spec.privacy.enabled
