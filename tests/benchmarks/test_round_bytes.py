"""The bytes benchmark measures what it claims: a serialised round result holds the weights."""

import importlib.util
from pathlib import Path

from jobs.spec import load_spec

SCRIPT = Path(__file__).parents[2] / "benchmarks" / "round_bytes.py"


def test_serialised_round_result_carries_the_weights_with_bounded_overhead():
    module_spec = importlib.util.spec_from_file_location("round_bytes", SCRIPT)
    round_bytes = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(round_bytes)
    raw, serialised, tensors = round_bytes._sizes(load_spec("jobs/specs/demo.yaml"))
    assert tensors > 0 and raw > 0
    assert raw <= serialised <= raw + 1024 * tensors  # weights plus per-tensor metadata
