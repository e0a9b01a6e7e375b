"""Bytes a site sends per round against the model's own bytes, measured side by side.

    .venv/bin/python benchmarks/round_bytes.py [--spec SPEC] [--quick] [--data DIR]

Serialised (always): the result a site's executor returns after a training round (FLModel with
its weights as they travel and fedseg's metadata, converted by FLARE's FLModelUtils) serialised
by FLARE's FOBS without a network cell, i.e. every array inline. Printed per network (the
spec's, and the STACK_NOTES reference UNet 8-16-32-64) and per encoding: FLARE's plain named
arrays (before issue 8), fedseg's packed float32, packed float16.
On the wire (unless --quick): the same spec run by FLARE's simulator, one site, one round, in
float32 and in float16. FLARE 2.9 sends a message whose arrays are fetched from the sender by
its download service; both sizes are read from FLARE's own log lines (the site's
"SubmitUpdate ... (N Bytes)", the server's "download ... (N bytes)"). The sum is what a site
sends per round before cell framing and TLS. Also the Dice each run's site reports for the
global model after the round, the fp16 transfer's cost on this (tiny) job.
"""

from __future__ import annotations

import argparse
import re
import sys
import tempfile
import warnings
from pathlib import Path

REFERENCE_MODEL = {"channels": [8, 16, 32, 64], "strides": [2, 2, 2]}
_SUBMIT = re.compile(r"SubmitUpdate to: server\. size: .*\((\d[\d,]*) Bytes\)")
_DOWNLOAD = re.compile(r"\[client\] download ref=\S+ done: .*\((\d[\d,]*) bytes\)")


def _round_result(weights: dict):
    from nvflare.app_common.abstract.fl_model import FLModel, ParamsType

    from jobs import keys

    meta = {  # what LocalJob.train_round reports (plain numbers, no patient data)
        keys.VAL_DICE: 0.5,
        keys.VAL_PATIENTS: 8,
        keys.NUM_PATIENTS: 24,
        keys.DELTA: 1e-5,
        keys.NOISE_MULTIPLIER: 0.15,
        keys.NUM_STEPS: 120,
        keys.TRAIN_LOSS: 0.5,
        keys.EPSILON: 10703.08,
        keys.BUDGET_LEFT: None,
        keys.ELAPSED_S: 31.2,
    }
    return FLModel(params=weights, params_type=ParamsType.FULL, meta=meta, current_round=4)


def _sizes(spec, encoding: str = "packed-float32") -> tuple[int, int, int]:
    """(model bytes, FOBS-serialised result bytes, arrays in the message) for ``encoding``:
    "named" (one array per tensor), "packed-float32" or "packed-float16"."""
    from nvflare.app_common.decomposers import common_decomposers
    from nvflare.app_common.utils.fl_model_utils import FLModelUtils
    from nvflare.fuel.utils import fobs

    from jobs.model import initial_weights
    from jobs.spec import TransferDtype
    from jobs.transfer import pack_weights

    common_decomposers.register()
    weights = initial_weights(spec.model.model_copy(update={"init": None}), 0)  # shapes only
    raw = sum(array.nbytes for array in weights.values())
    if encoding != "named":
        weights = pack_weights(weights, TransferDtype(encoding.removeprefix("packed-")))
    result = FLModelUtils.to_shareable(_round_result(weights))
    return raw, len(fobs.dumps(result)), len(weights)


def _wire(spec, data_dir: Path, work: Path, dtype: str) -> dict:
    """One site, one round through FLARE's simulator; sizes from FLARE's log lines."""
    from jobs.spec import parse_spec
    from simulator.federation import run_simulation

    plain = spec.to_plain()
    plain["training"].update({"rounds": 1, "local_epochs": 1, "batch_size": 2})
    plain["federation"].update({"min_clients": 1, "transfer_dtype": dtype})
    plain["evaluation"] = {**plain.get("evaluation", {}), "cross_site": False}
    run_spec = parse_spec(plain)
    result = run_simulation(run_spec, data_dir=data_dir, out_dir=work / dtype, threads=1)
    site_log = (result.workspace / "site-1" / "log.txt").read_text()
    server_log = (result.workspace / "server" / "log.txt").read_text()
    message = int(_SUBMIT.findall(site_log)[0].replace(",", ""))  # the train result comes first
    arrays = int(_DOWNLOAD.findall(server_log)[0].replace(",", ""))
    final = [r.val_dice for r in result.history.final if r.val_dice is not None]
    return {"message": message, "arrays": arrays, "dice": final[0] if final else None}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--spec", default="jobs/specs/demo.yaml")
    parser.add_argument("--quick", action="store_true", help="serialised sizes only (seconds)")
    parser.add_argument("--data", help="simulated sites to use (default: one tiny site, made here)")
    args = parser.parse_args()
    warnings.filterwarnings("ignore")

    from jobs.spec import load_spec, parse_spec

    spec = load_spec(args.spec)
    reference = spec.to_plain()
    reference["model"].update(REFERENCE_MODEL)
    networks = ((args.spec, spec), ("reference UNet 8-16-32-64", parse_spec(reference)))
    print("serialised by FOBS, arrays inline (no network cell):")
    ratios = []
    for label, this_spec in networks:
        for encoding in ("named", "packed-float32", "packed-float16"):
            raw, serialised, arrays = _sizes(this_spec, encoding)
            print(
                f"  {label}, {encoding}: {arrays} array(s), {raw:,} model bytes, "
                f"{serialised:,} serialised bytes"
            )
            ratios.append((f"serialised {encoding}, {label}", serialised / raw))

    if not args.quick:
        from jobs.model import initial_weights
        from simulator.synthetic_data import generate_federation_data

        with tempfile.TemporaryDirectory() as scratch:
            scratch = Path(scratch)
            data = Path(args.data) if args.data else scratch / "data"
            if not args.data:
                generate_federation_data(
                    out_dir=data, sites=1, patients_per_site=3, seed=0, matrix=32
                )
            raw = sum(
                a.nbytes
                for a in initial_weights(spec.model.model_copy(update={"init": None}), 0).values()
            )
            print(f"on the wire, FLARE simulator, {args.spec} network, 1 site, 1 round:")
            for dtype in ("float32", "float16"):
                sizes = _wire(spec, data, scratch / "runs", dtype)
                sent = sizes["message"] + sizes["arrays"]
                dice = "-" if sizes["dice"] is None else f"{sizes['dice']:.4f}"
                print(
                    f"  {dtype}: message {sizes['message']:,} + arrays {sizes['arrays']:,} = "
                    f"{sent:,} bytes for {raw:,} model bytes; final Dice {dice}"
                )
                ratios.append((f"on the wire {dtype}, {args.spec}", sent / raw))
    for label, ratio in ratios:
        print(f"ratio bytes sent per round / model bytes ({label}): {ratio:.3f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
