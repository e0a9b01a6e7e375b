"""Bytes a site sends per round against the model's own bytes, measured side by side.

    .venv/bin/python benchmarks/round_bytes.py [--spec SPEC]

Builds exactly the result a site's executor returns after a training round (FLModel with full
weights and fedseg's metadata, converted by FLARE's FLModelUtils) and serialises it with FLARE's
own FOBS, as FLARE does before sending it. Prints, for the spec's network and for the
STACK_NOTES reference network (UNet 8-16-32-64), the raw weight bytes, the serialised bytes and
their ratio. What travels on the wire adds FLARE's cell framing and TLS on top; not measured here.
"""

from __future__ import annotations

import argparse
import sys
import warnings


def _sizes(spec) -> tuple[int, int, int]:
    from nvflare.app_common.abstract.fl_model import FLModel, ParamsType
    from nvflare.app_common.decomposers import common_decomposers
    from nvflare.app_common.utils.fl_model_utils import FLModelUtils
    from nvflare.fuel.utils import fobs

    from jobs import keys
    from jobs.model import initial_weights

    common_decomposers.register()
    weights = initial_weights(spec.model, 0)
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
    result = FLModel(params=weights, params_type=ParamsType.FULL, meta=meta, current_round=4)
    serialised = len(fobs.dumps(FLModelUtils.to_shareable(result)))
    raw = sum(array.nbytes for array in weights.values())
    return raw, serialised, len(weights)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--spec", default="jobs/specs/demo.yaml")
    args = parser.parse_args()
    warnings.filterwarnings("ignore")

    from jobs.spec import load_spec, parse_spec

    spec = load_spec(args.spec)
    reference = spec.to_plain()
    reference["model"].update({"channels": [8, 16, 32, 64], "strides": [2, 2, 2]})
    rows = []
    for label, this_spec in (
        (args.spec, spec),
        ("reference UNet 8-16-32-64", parse_spec(reference)),
    ):
        raw, serialised, tensors = _sizes(this_spec)
        rows.append((label, raw, serialised, tensors))
        print(f"{label}: {tensors} tensors, {raw:,} raw bytes, {serialised:,} serialised bytes")
    for label, raw, serialised, _ in rows:
        print(f"ratio bytes sent per round / model bytes ({label}): {serialised / raw:.3f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
