"""benchmarks/data_generation.py runs the generator of the tree it is given, in a child process."""

import sys
from pathlib import Path

BENCHMARKS = Path(__file__).parents[2] / "benchmarks"
TINY = {"sites": 1, "patients_per_site": 2, "seed": 0, "matrix": 32}


def _load():
    sys.path.insert(0, str(BENCHMARKS))  # the script imports its shared helper module
    try:
        import data_generation

        return data_generation
    finally:
        sys.path.remove(str(BENCHMARKS))


def test_before_is_the_baseline_commit_and_after_the_working_tree(tmp_path):
    bench = _load()
    baseline = bench._baseline_tree(bench.BASELINE, tmp_path / "baseline")
    assert "generate_public_cohort" not in (baseline / "simulator/synthetic_data.py").read_text()
    before = bench._generate(baseline, tmp_path / "out", TINY)
    after = bench._generate(bench.REPO, tmp_path / "out", {**TINY, "workers": 1})
    for run in (before, after):
        assert run["patients"] == 4 and run["files"] > 4 * 16
        assert run["wall_s"] > 0 and run["cpu_s"] > 0
    assert not (tmp_path / "out").exists()
