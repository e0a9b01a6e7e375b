"""The benchmark scripts measure what they claim (no timing is asserted anywhere)."""

import argparse
import importlib.util
import sys
from pathlib import Path

import pytest

from tests.conftest import tiny_spec

BENCHMARKS = Path(__file__).parents[2] / "benchmarks"


def _load(name: str):
    sys.path.insert(0, str(BENCHMARKS))  # the scripts import their shared helper module
    try:
        module_spec = importlib.util.spec_from_file_location(name, BENCHMARKS / f"{name}.py")
        module = importlib.util.module_from_spec(module_spec)
        module_spec.loader.exec_module(module)
        return module
    finally:
        sys.path.remove(str(BENCHMARKS))


@pytest.fixture(scope="module")
def dp_overhead():
    return _load("dp_overhead")


def test_every_mode_is_timed_or_reported_as_failing(dp_overhead):
    args = argparse.Namespace(threads=0, channels_last=True, relu=False)
    results = dp_overhead.time_modes(tiny_spec(), args, rounds=2, warmup=1)
    assert set(results) == set(dp_overhead.MODES)
    assert "prelu" in results["ew"]["error"].lower()  # expanded weights cannot run this UNet
    for mode in ("none", "hooks", "functorch", "ghost", "grouped"):
        assert results[mode]["steps"] == 2 and results[mode]["step_s"] > 0


def test_the_gradient_check_compares_the_same_batch_and_weights(dp_overhead):
    samples, clipped = dp_overhead.gradients(tiny_spec(), "hooks")
    again, clipped_again = dp_overhead.gradients(tiny_spec(), "grouped")
    assert samples.shape[0] == tiny_spec().training.batch_size
    assert dp_overhead._relative(again, samples)[1] < 1e-5
    assert dp_overhead._relative(clipped_again, clipped)[1] < 1e-5


def test_flare_task_phases_are_read_from_the_server_log(tmp_path):
    sites_scale = _load("sites_scale")
    log = tmp_path / "log.txt"
    log.write_text(
        "2026-11-25 07:00:00,000 - SimulatorClientRunner - INFO - Simulate Run client: site-1 on "
        "GPU group: None\n"
        "2026-11-25 07:00:07,500 - GetTaskCommand - INFO - return task to client.  client_name: "
        "site-1  task_name: train   task_id: x\n"
        "2026-11-25 07:00:08,250 - SubmitUpdateCommand - INFO - submit_update process. "
        "client_name:site-1   task_id:x\n"
        "2026-11-25 07:00:09,000 - GetTaskCommand - INFO - return task to client.  client_name: "
        "site-1  task_name: __end_run__   task_id: y\n"
    )
    phases = sites_scale.task_phases(log)
    assert phases == {"start_to_fetch": [7.5], "fetch_to_result": [0.75]}


def test_tree_memory_counts_the_child_processes():
    measure = _load("_measure")
    sleeper = "import time; time.sleep(1.5)"
    code = f"import subprocess, sys; subprocess.run([sys.executable, '-c', {sleeper!r}])"
    wall, peak, _ = measure.run_sampled([sys.executable, "-c", code], interval_s=0.2)
    assert wall >= 1.5
    assert peak.processes == 2 and peak.rss > 0
