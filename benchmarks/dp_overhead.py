"""DP-SGD cost per per-sample-gradient mode, measured side by side in one run.

    .venv/bin/python benchmarks/dp_overhead.py [--quick] [--reference] [--spec SPEC]
        [--threads N] [--contiguous] [--relu]

Time: one process builds every mode from the same initial weights (no DP; Opacus's hooks,
functorch, expanded weights and ghost clipping; fedseg's grouped mode) and takes their steps in
turn, round after round, so load from other processes on the machine falls on every mode
alike; each mode's time is the median of its steps. A step is what a site does: forward,
LesionLoss, backward, per-sample clipping, noise, Adam (batch = training.batch_size, crop =
model.roi_size, fixed random batches).
Memory: each mode again in its own child process; peak RSS of the process over steps taken
after warm-up, and its growth over the RSS before them (what the mode itself adds).
Equivalence: one batch through hooks (the reference) and every other working mode, noise 0,
same weights: per-sample gradients and the clipped, averaged gradients are compared.
--reference uses the network and crop of the STACK_NOTES measurement (UNet 8-16-32-64, 64³,
batch 4); --threads sets torch's CPU threads; weights and batches are channels_last_3d as a
CPU site stores them, --contiguous measures the default torch layout instead; --relu swaps the
network's PReLU for ReLU (a layer choice: expanded weights cannot handle PReLU). The last lines
are the ratios against no DP.
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
from pathlib import Path

MODES = ("none", "hooks", "functorch", "ew", "ghost", "grouped", "grouped+secure")
"""``grouped+secure``: fedseg's shipped setting, grouped samplers with Opacus's floating-point-safe
noise (four Gaussian samples per noise value, ``DPOptimizer.secure_mode``)."""
DEVICE = "cpu"  # set by main(): cuda when torch sees a GPU, unless --device says otherwise
REFERENCE_MODE = "hooks"
REFERENCE = {"channels": [8, 16, 32, 64], "strides": [2, 2, 2], "roi_size": [64, 64, 64]}


def _setup(spec_path: str, reference: bool):
    from jobs.spec import load_spec, parse_spec

    data = load_spec(spec_path).to_plain()
    if reference:
        data["model"].update(REFERENCE)
        data["training"]["batch_size"] = 4
    return parse_spec(data)


def _network(spec, *, relu: bool, channels_last: bool):
    import torch
    from monai.networks.nets import UNet

    from jobs.model import build_network

    if relu:
        model = spec.model
        network = UNet(
            spatial_dims=3,
            in_channels=1,
            out_channels=1,
            channels=model.channels,
            strides=model.strides,
            num_res_units=model.num_res_units,
            norm=model.norm.value,
            act="relu",
        )
    else:
        network = build_network(spec.model)
    network = network.to(DEVICE)
    if channels_last:
        network = network.to(memory_format=torch.channels_last_3d)
    return network


def _private(spec, mode: str, noise: float, *, relu=False, channels_last=False, seed: int = 0):
    """(model, optimizer, criterion) for ``mode``, all from the same initial weights."""
    import torch
    from opacus import PrivacyEngine
    from torch.utils.data import DataLoader, TensorDataset

    from site_app.dp_samplers import wrap_private
    from site_app.training import make_loss

    torch.manual_seed(seed)
    network = _network(spec, relu=relu, channels_last=channels_last)
    optimizer = torch.optim.Adam(network.parameters(), lr=spec.training.lr)
    criterion = make_loss()
    if mode == "none":
        return network, optimizer, criterion
    secure = mode.endswith("+secure")
    mode = mode.removesuffix("+secure")
    batch = spec.training.batch_size
    # The loader only tells Opacus the sampling rate (expected batch / dataset size).
    loader = DataLoader(TensorDataset(torch.zeros(batch * 4, 1)), batch_size=batch)
    wrapped = wrap_private(
        PrivacyEngine(),
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
    optimizer.secure_mode = secure
    return model, optimizer, criterion


def _batch(spec, *, channels_last=False, seed: int = 1):
    """A fixed (image, label) batch, each (B, 1, *roi); ~3% lesion voxels."""
    import torch

    generator = torch.Generator().manual_seed(seed)
    shape = (spec.training.batch_size, 1, *spec.model.roi_size)
    image = torch.rand(shape, generator=generator).to(DEVICE)
    label = (torch.rand(shape, generator=generator) > 0.97).float().to(DEVICE)
    if channels_last:
        image = image.contiguous(memory_format=torch.channels_last_3d)
        label = label.contiguous(memory_format=torch.channels_last_3d)
    return image, label


def _step(model, optimizer, criterion, image, label) -> None:
    optimizer.zero_grad(set_to_none=True)
    loss = criterion(model(image), label)
    loss.backward()
    optimizer.step()
    if DEVICE.startswith("cuda"):
        import torch

        torch.cuda.synchronize()  # time the work, not its launch


def time_modes(spec, args, rounds: int, warmup: int) -> dict[str, dict]:
    """Median step time per mode, steps interleaved mode by mode (order reversed every round)."""

    from site_app.training import use_cpu_threads

    if args.threads:
        use_cpu_threads(args.threads)
    image, label = _batch(spec, channels_last=args.channels_last)
    built, results = {}, {}
    for mode in MODES:
        try:
            built[mode] = _private(
                spec,
                mode,
                noise=spec.privacy.noise_multiplier or 1.0,
                relu=args.relu,
                channels_last=args.channels_last,
            )
            for _ in range(warmup):
                _step(*built[mode], image, label)
        except Exception as error:  # a mode that cannot run is a result, not a crash
            built.pop(mode, None)
            results[mode] = {"error": f"{type(error).__name__}: {str(error)[:160]}"}
    times: dict[str, list[float]] = {mode: [] for mode in built}
    order = list(built)
    for index in range(rounds):
        for mode in order if index % 2 == 0 else reversed(order):
            started = time.perf_counter()
            _step(*built[mode], image, label)
            times[mode].append(time.perf_counter() - started)
    for mode, values in times.items():
        results[mode] = {
            "step_s": statistics.median(values),
            "min_step_s": min(values),  # least disturbed by other processes' load
            "steps": len(values),
        }
    return results


def _peak_rss_since_reset(reset: bool = False) -> int | None:
    """Linux: the process's peak RSS (bytes) since the last reset (``/proc/self/clear_refs``)."""
    try:
        if reset:
            Path("/proc/self/clear_refs").write_text("5")
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def peak_memory(spec_path: str, args, mode: str, warmup: int, steps: int) -> dict:
    """Run in a child process: peak RSS over ``steps`` steps taken after ``warmup`` steps.

    The warm-up steps carry one-off costs every mode shares (torch imports its compiler stack on
    an optimizer's first step, oneDNN builds its kernels), so the peak is reset after them
    where Linux allows; ``growth_mib`` is that peak minus the RSS before the timed steps.
    """
    import psutil

    spec = _setup(spec_path, args.reference)
    image, label = _batch(spec, channels_last=args.channels_last)
    try:
        model, optimizer, criterion = _private(
            spec,
            mode,
            noise=spec.privacy.noise_multiplier or 1.0,
            relu=args.relu,
            channels_last=args.channels_last,
        )
        for _ in range(warmup):
            _step(model, optimizer, criterion, image, label)
        before = psutil.Process().memory_info().rss
        _peak_rss_since_reset(reset=True)
        if DEVICE.startswith("cuda"):
            import torch

            torch.cuda.reset_peak_memory_stats()
        for _ in range(steps):
            _step(model, optimizer, criterion, image, label)
    except Exception as error:
        return {"mode": mode, "error": f"{type(error).__name__}: {str(error)[:160]}"}
    peak = _peak_rss_since_reset() or resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    result = {"mode": mode, "peak_rss_mib": peak / 2**20, "growth_mib": (peak - before) / 2**20}
    if DEVICE.startswith("cuda"):
        import torch

        result["peak_gpu_mib"] = torch.cuda.max_memory_allocated() / 2**20
    return result


def gradients(spec, mode: str, *, relu=False, channels_last=False):
    """(per-sample gradients (B, P), clipped averaged gradient (P,)) of one batch, noise 0."""
    import torch

    model, optimizer, criterion = _private(
        spec, mode, noise=0.0, relu=relu, channels_last=channels_last
    )
    image, label = _batch(spec, channels_last=channels_last)
    optimizer.zero_grad(set_to_none=True)
    criterion(model(image), label).backward()
    per_sample = None
    if mode != "ghost":  # ghost clipping never materialises per-sample gradients
        per_sample = torch.cat([p.grad_sample.flatten(1) for p in optimizer.params], dim=1)
    optimizer.pre_step()  # clip per sample, accumulate, add (zero) noise, scale: p.grad
    return per_sample, torch.cat([p.grad.flatten() for p in optimizer.params])


def _relative(a, b) -> tuple[float, float]:
    diff = float((a - b).abs().max())
    return diff, diff / float(b.abs().max())


def _child_command(args, mode: str) -> list[str]:
    command = [sys.executable, __file__, "--spec", args.spec, "--child", mode]
    for flag in ("quick", "reference", "contiguous", "relu"):
        if getattr(args, flag):
            command.append("--" + flag.replace("_", "-"))
    if args.threads:
        command += ["--threads", str(args.threads)]
    command += ["--device", args.device]
    return command


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--spec", default="jobs/specs/demo.yaml")
    parser.add_argument("--quick", action="store_true", help="few steps (a minute or two)")
    parser.add_argument("--reference", action="store_true", help="UNet 8-16-32-64, 64³, batch 4")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: default)")
    parser.add_argument(
        "--contiguous", action="store_true", help="torch's default layout, not channels_last_3d"
    )
    parser.add_argument("--relu", action="store_true", help="ReLU instead of PReLU")
    parser.add_argument("--device", help="cpu or cuda (default: cuda when torch sees a GPU)")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    import torch

    global DEVICE
    DEVICE = args.device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    # As a site stores weights and batches: channels-last on CPU (site_app.training).
    args.channels_last = not args.contiguous and DEVICE == "cpu"
    warnings.filterwarnings("ignore")
    rounds, warmup = (6, 2) if args.quick else (20, 3)

    if args.child:
        if args.threads:
            from site_app.training import use_cpu_threads

            use_cpu_threads(args.threads)
        print(json.dumps(peak_memory(args.spec, args, args.child, warmup=warmup, steps=3)))
        return 0

    import torch

    spec = _setup(args.spec, args.reference)
    print(
        f"network {spec.model.network.value} {list(spec.model.channels)}"
        f"{' ReLU' if args.relu else ''}, crop {list(spec.model.roi_size)}, batch "
        f"{spec.training.batch_size}, {DEVICE}, {args.threads or torch.get_num_threads()} "
        "thread(s), "
        f"{'channels_last_3d' if args.channels_last else 'contiguous'}; {rounds} interleaved "
        "rounds of one step per mode"
    )
    results = time_modes(spec, args, rounds, warmup)
    for mode in MODES:
        command = _child_command(args, mode)
        output = subprocess.run(command, capture_output=True, text=True, check=False)
        lines = [line for line in output.stdout.splitlines() if line.startswith("{")]
        memory = json.loads(lines[-1]) if lines else {"error": output.stderr[-300:]}
        if "error" not in results[mode] and "error" not in memory:
            results[mode].update(memory)
        row = results[mode]
        if "error" in row:
            print(f"{mode:>10}: fails: {row['error']}")
        else:
            print(
                f"{mode:>10}: {row['step_s'] * 1000:8.1f} ms/step (median of {row['steps']}), "
                f"peak RSS {row.get('peak_rss_mib', float('nan')):.0f} MiB, "
                f"growth {row.get('growth_mib', float('nan')):.0f} MiB"
                + (f", peak GPU {row['peak_gpu_mib']:.0f} MiB" if "peak_gpu_mib" in row else "")
            )

    print(f"gradient agreement with {REFERENCE_MODE} (noise 0, same weights and batch):")
    options = {"relu": args.relu, "channels_last": args.channels_last}
    reference_samples, reference = gradients(spec, REFERENCE_MODE, **options)
    for mode in ("functorch", "ghost", "grouped", "ew"):
        if "error" in results.get(mode, {}):
            continue
        samples, clipped = gradients(spec, mode, **options)
        diff, relative = _relative(clipped, reference)
        line = f"{mode:>10}: clipped max |diff| {diff:.2e} (relative {relative:.1e})"
        if samples is not None:
            diff, relative = _relative(samples, reference_samples)
            line += f"; per-sample max |diff| {diff:.2e} (relative {relative:.1e})"
        print(line)

    base = results["none"]
    for mode in MODES[1:]:
        row = results[mode]
        if "error" in row or "error" in base:
            print(f"ratio {mode} / no DP: not measured ({row.get('error', 'no baseline')[:60]})")
            continue
        memory = ""
        key = "peak_gpu_mib" if "peak_gpu_mib" in base else "peak_rss_mib"
        if key in row and key in base:
            memory = f", peak {'GPU ' if key == 'peak_gpu_mib' else ''}memory "
            memory += f"{row[key] / base[key]:.2f}x"
        print(
            f"ratio {mode} / no DP: time {row['step_s'] / base['step_s']:.2f}x (medians; "
            f"{row['min_step_s'] / base['min_step_s']:.2f}x from fastest steps){memory}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
