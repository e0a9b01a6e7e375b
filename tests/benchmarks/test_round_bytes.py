"""The bytes benchmark measures what it claims: a serialised round result holds the weights."""

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).parents[2] / "benchmarks" / "round_bytes.py"


@pytest.fixture(scope="module")
def round_bytes():
    module_spec = importlib.util.spec_from_file_location("round_bytes", SCRIPT)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module


def _sizes(encoding: str) -> tuple[int, int, int]:
    """The script's FOBS measurement, in a child process: registering FLARE's decomposers and
    serialising in this process leaves FLARE state that later breaks in-process admin sessions
    (tests/provisioning)."""
    code = (
        "import importlib.util, json, sys\n"
        f"spec = importlib.util.spec_from_file_location('round_bytes', {str(SCRIPT)!r})\n"
        "module = importlib.util.module_from_spec(spec); spec.loader.exec_module(module)\n"
        "from jobs.spec import load_spec\n"
        f"print(json.dumps(module._sizes(load_spec('jobs/specs/demo.yaml'), {encoding!r})))\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=300
    )
    return tuple(json.loads(done.stdout.strip().splitlines()[-1]))


def test_serialised_round_result_carries_the_weights_with_bounded_overhead():
    raw, named, tensors = _sizes("named")
    assert tensors > 1 and raw > 0
    assert raw <= named <= raw + 1024 * tensors  # weights plus per-tensor metadata
    raw32, packed, arrays = _sizes("packed-float32")
    assert (raw32, arrays) == (raw, 1)
    assert raw <= packed <= raw + 1024 < named  # one array: the per-tensor overhead is gone
    _, half, _ = _sizes("packed-float16")
    assert raw // 2 <= half <= raw // 2 + 1024


def test_flare_log_lines_are_read_as_byte_counts(round_bytes):
    site = "Communicator - INFO - SubmitUpdate to: server. size: 1.5KB (1504 Bytes). time: 0.02"
    server = "function - INFO - [client] download ref=ab-12 done: elapsed=0.01s (151,642 bytes)"
    assert round_bytes._SUBMIT.findall(site) == ["1504"]
    assert round_bytes._DOWNLOAD.findall(server) == ["151,642"]
