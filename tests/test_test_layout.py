"""The test suite's own layout: every module that starts FLARE processes is in the list that
keeps them on one pytest-xdist worker (tests/conftest.py), and nothing else is."""

import re
from pathlib import Path

from tests.conftest import FLARE_PROCESS_MODULES

ROOT = Path(__file__).resolve().parents[1]

STARTS_FLARE = re.compile(
    r"run_simulation\(|run_compare\(|\btiny_run\b|\bstart_poc\(|[(,]\s*poc\b"
    r'|"simulate",\s*"(run|compare)"'
)
"""What starts the FLARE simulator or a POC federation from a test: the simulator and compare
entry points, the shared ``tiny_run`` fixture, the POC fixture or ``start_poc``, the CLI."""

ONLY_REFUSALS = {"tests/test_cli.py": "its `simulate run` calls are refused before FLARE starts"}


def test_every_module_that_starts_flare_is_kept_on_one_worker():
    starting = {
        path.relative_to(ROOT).as_posix()
        for path in (ROOT / "tests").rglob("test_*.py")
        if path != Path(__file__).resolve() and STARTS_FLARE.search(path.read_text())
    } - set(ONLY_REFUSALS)
    assert starting == FLARE_PROCESS_MODULES, (
        "tests/conftest.py FLARE_PROCESS_MODULES must list exactly the test modules that start "
        f"FLARE: add {sorted(starting - FLARE_PROCESS_MODULES)}, "
        f"remove {sorted(FLARE_PROCESS_MODULES - starting)}"
    )
