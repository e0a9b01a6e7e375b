"""DP-SGD cost per Opacus per-sample-gradient mode, measured side by side in one run.

    .venv/bin/python benchmarks/dp_overhead.py [--quick] [--reference] [--spec SPEC]

For each mode (no DP, hooks, functorch, expanded weights, ghost clipping) a fresh child process
builds the spec's network, takes warm-up steps and then timed steps on fixed random batches
(batch = training.batch_size, crop = model.roi_size), and reports the median step time and its
peak RSS. DP steps clip per sample and add noise exactly as a site does (LesionLoss, Adam).
Then one batch is pushed through the reference mode (hooks) and every other working mode with
noise 0 from the same weights, and the clipped, averaged gradients are compared.
--reference uses the network and crop of the STACK_NOTES measurement (UNet 8-16-32-64, 64³,
batch 4). The last lines are the ratios against no DP.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
import warnings

MODES = ("none", "hooks", "functorch", "ew", "ghost")
REFERENCE = {"channels": [8, 16, 32, 64], "strides": [2, 2, 2], "roi_size": [64, 64, 64]}


def _setup(spec_path: str, reference: bool):
    from jobs.spec import load_spec, parse_spec

    data = load_spec(spec_path).to_plain()
    if reference:
        data["model"].update(REFERENCE)
        data["training"]["batch_size"] = 4
    return parse_spec(data)


def _private(spec, mode: str, noise: float, seed: int = 0):
    """Model, optimizer and criterion for ``mode``, all from the same initial weights."""
    import torch
    from opacus import PrivacyEngine
    from torch.utils.data import DataLoader, TensorDataset

    from jobs.model import build_network
    from site_app.training import make_loss

    torch.manual_seed(seed)
    network = build_network(spec.model)
    optimizer = torch.optim.Adam(network.parameters(), lr=spec.training.lr)
    criterion = make_loss()
    if mode == "none":
        return network, optimizer, criterion
    batch = spec.training.batch_size
    # The loader only tells Opacus the sampling rate (expected batch / dataset size).
    loader = DataLoader(TensorDataset(torch.zeros(batch * 4, 1)), batch_size=batch)
    wrapped = PrivacyEngine().make_private(
        module=network,
        optimizer=optimizer,
        criterion=criterion,
        data_loader=loader,
        noise_multiplier=noise,
        max_grad_norm=spec.privacy.max_grad_norm,
        grad_sample_mode=mode,
    )
    if mode == "ghost":
        model, optimizer, criterion, _ = wrapped
    else:
        model, optimizer, _ = wrapped
    return model, optimizer, criterion


def _batch(spec, seed: int = 1):
    import torch

    generator = torch.Generator().manual_seed(seed)
    shape = (spec.training.batch_size, 1, *spec.model.roi_size)
    image = torch.rand(shape, generator=generator)
    label = (torch.rand(shape, generator=generator) > 0.97).float()
    return image, label


def _step(model, optimizer, criterion, image, label) -> None:
    optimizer.zero_grad(set_to_none=True)
    loss = criterion(model(image), label)
    loss.backward()
    optimizer.step()


def measure(spec_path: str, reference: bool, mode: str, steps: int, warmup: int) -> dict:
    """Run in a child process: the median step time and this process's peak RSS."""
    import torch

    torch.set_num_threads(torch.get_num_threads())
    spec = _setup(spec_path, reference)
    image, label = _batch(spec)
    try:
        model, optimizer, criterion = _private(
            spec, mode, noise=spec.privacy.noise_multiplier or 1.0
        )
        times = []
        for index in range(warmup + steps):
            started = time.perf_counter()
            _step(model, optimizer, criterion, image, label)
            if index >= warmup:
                times.append(time.perf_counter() - started)
    except Exception as error:  # a mode that cannot run is a result, not a crash
        return {"mode": mode, "error": f"{type(error).__name__}: {str(error)[:160]}"}
    peak_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {"mode": mode, "step_s": statistics.median(times), "peak_rss_mib": peak_kib / 1024}


def clipped_gradients(spec, mode: str):
    """The clipped, averaged gradient of one batch with noise 0, flattened, or None."""
    import torch

    model, optimizer, criterion = _private(spec, mode, noise=0.0)
    image, label = _batch(spec)
    optimizer.zero_grad(set_to_none=True)
    criterion(model(image), label).backward()
    optimizer.pre_step()  # clip per sample, accumulate, add (zero) noise, scale: p.grad
    return torch.cat([p.grad.flatten() for p in optimizer.params])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--spec", default="jobs/specs/demo.yaml")
    parser.add_argument("--quick", action="store_true", help="few steps (a minute or two)")
    parser.add_argument("--reference", action="store_true", help="UNet 8-16-32-64, 64³, batch 4")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    steps, warmup = (5, 2) if args.quick else (20, 3)

    if args.child:
        print(json.dumps(measure(args.spec, args.reference, args.child, steps, warmup)))
        return 0

    spec = _setup(args.spec, args.reference)
    print(
        f"network {spec.model.network.value} {list(spec.model.channels)}, crop "
        f"{list(spec.model.roi_size)}, batch {spec.training.batch_size}, {steps} timed steps"
    )
    results = {}
    for mode in MODES:
        command = [sys.executable, __file__, "--spec", args.spec, "--child", mode]
        command += ["--quick"] if args.quick else []
        command += ["--reference"] if args.reference else []
        output = subprocess.run(command, capture_output=True, text=True, check=False)
        lines = [line for line in output.stdout.splitlines() if line.startswith("{")]
        results[mode] = json.loads(lines[-1]) if lines else {"error": output.stderr[-300:]}
        row = results[mode]
        if "error" in row:
            print(f"{mode:>10}: fails: {row['error']}")
        else:
            step_ms, peak = row["step_s"] * 1000, row["peak_rss_mib"]
            print(f"{mode:>10}: {step_ms:8.1f} ms/step, peak RSS {peak:.0f} MiB")

    print("clipped-gradient agreement with hooks (noise 0, same weights and batch):")
    reference = clipped_gradients(spec, "hooks")
    for mode in ("functorch", "ghost"):
        if "error" in results.get(mode, {}):
            continue
        other = clipped_gradients(spec, mode)
        diff = float((other - reference).abs().max())
        scale = float(reference.abs().max())
        relative = diff / scale
        print(
            f"{mode:>10}: max |diff| {diff:.2e} (max |grad| {scale:.2e}, relative {relative:.1e})"
        )

    base = results["none"]
    for mode in MODES[1:]:
        row = results[mode]
        if "error" in row or "error" in base:
            print(f"ratio {mode} / no DP: not measured ({row.get('error', 'no baseline')[:60]})")
            continue
        print(
            f"ratio {mode} / no DP: time {row['step_s'] / base['step_s']:.2f}x, "
            f"peak memory {row['peak_rss_mib'] / base['peak_rss_mib']:.2f}x"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
