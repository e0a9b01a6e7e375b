"""The contract of what a job may build, and how a component reads its arguments as the job
wrote them (before FLARE fills in ``{...}`` references)."""

import json

import pytest

from jobs.components import SITE_EXECUTOR, has_variable_references, written_args


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ({"name": "demo", "training": {"lr": 0.003}}, False),
        ({"name": "x{$HOME}"}, True),
        ({"name": "x{SITE_NAME}"}, True),
        ({"data": {"hu_window": ["{a}", 1]}}, True),
        ({"{key}": 1}, True),
        ({"name": "half}"}, True),
        ([1, 2.0, None, True], False),
    ],
)
def test_variable_references_are_found_anywhere(value, expected):
    assert has_variable_references(value) is expected


def test_written_args_reads_the_executor_as_written(tmp_path):
    config = tmp_path / "config_fed_client.json"
    config.write_text(
        json.dumps(
            {
                "executors": [
                    {"tasks": ["train"], "executor": {"path": SITE_EXECUTOR, "args": {"spec": {}}}}
                ],
                "components": [{"id": "x", "path": "a.b.C", "args": {"k": "{$V}"}}],
            }
        )
    )
    assert written_args(config, SITE_EXECUTOR) == {"spec": {}}
    assert written_args(config, "a.b.C") == {"k": "{$V}"}
    assert written_args(config, "not.there.X") is None
    assert written_args(tmp_path / "missing.json", SITE_EXECUTOR) is None
