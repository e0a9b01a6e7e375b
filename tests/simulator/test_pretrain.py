"""The public weights that ship with the demo spec are what the documented command makes, bit
for bit (portable arithmetic: the same bytes on any x86-64 CPU)."""

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from jobs.spec import load_spec

SPECS = Path(__file__).parents[2] / "jobs" / "specs"


@pytest.mark.slow
def test_the_shipped_public_weights_regenerate_bit_for_bit(tmp_path):
    record = json.loads((SPECS / "public_unet.pt.json").read_text())
    shipped = SPECS / record["weights"]
    assert hashlib.sha256(shipped.read_bytes()).hexdigest() == record["sha256"]
    demo = load_spec(SPECS / "demo.yaml")
    assert demo.model.init.file == record["weights"] and demo.model.init.sha256 == record["sha256"]
    # The spec the record names: the model (without init) and data sections it was made with.
    spec = tmp_path / "spec.yaml"
    spec.write_text(
        yaml.safe_dump({"name": "pretrain", "model": record["model"], "data": record["data"]})
    )
    settings = record["settings"]
    out = tmp_path / "public_unet.pt"
    command = [
        sys.executable, "-m", "fedseg.cli", "simulate", "pretrain", str(spec), "--out", str(out),
        "--public-patients", str(settings["public_patients"]),
        "--public-seed", str(settings["public_seed"]),
        "--epochs", str(settings["epochs"]),
        "--batch-size", str(settings["batch_size"]),
        "--lr", repr(settings["lr"]),
        "--seed", str(settings["seed"]),
    ]  # fmt: skip
    done = subprocess.run(command, capture_output=True, text=True, timeout=1200, check=False)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    assert "portable arithmetic" in done.stdout
    assert out.read_bytes() == shipped.read_bytes()
