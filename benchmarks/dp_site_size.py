"""Dice against training patients per site, with DP at a target epsilon and without, one recipe.

    .venv/bin/python benchmarks/dp_site_size.py SPEC --data DIR [--sizes 25,50,...] [--epsilon 8]
        [--out DIR] [--quick] [--threads T]
    .venv/bin/python benchmarks/dp_site_size.py SPEC --data DIR --join OUT1,OUT2 --out DIR

Answers "how many patients does my site need?" for the recipe in SPEC (its model.init,
training.trainable, schedule): for each size n, every site of DIR trains on n of its training
patients (the same n for a larger n, plus more), FedAvg over the sites, once with DP at
``--epsilon`` per site and once without; each final model is scored on each site's held-out
patients, the same ones at every size (a patient's side is its own hash, ``split_patients``), so
the sizes compare. The federation runs in-process with the real site code (``LocalJob`` +
``fed_avg`` + the spec's ``server_step``, as the simulator's FLARE run does, without its process
overhead); the public model alone is scored once. Writes curve.json, curve.md and curve.png
to --out (default results/site_size). DIR must hold at least max(--sizes) training patients per
site (``fedseg simulate data --patients-per-site P`` gives about 0.75 P). Training time grows
with the sizes' sum: 25, 50 and 100 take about 20 min on 2 cores, every size several hours;
--quick (tiny network, two small sizes) a few minutes. Memory: the process holds every
decoded patient of DIR, about 12 GB for 3 sites x 1,070 patients, so on a 24 GB machine run
side-by-side ranges (--threads 1) only on data sets of a few hundred patients per site.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import math
import sys
import time
from pathlib import Path

_ROOT = Path(__file__).resolve().parents[1]
if str(_ROOT) not in sys.path:
    sys.path.insert(0, str(_ROOT))


def _subsets(data_dir: Path, sites: list[str], cache: Path, spec):
    """Every site's ingested patients, and a function that keeps its held-out patients plus the
    first n of its training patients (in a fixed hash order) for the next LocalJob."""
    import site_app.local_job as local_job
    from site_app.dataset import split_patients
    from site_app.ingestion import ingest_site

    full = {site: ingest_site(data_dir / site, cache_dir=cache / site) for site in sites}
    held_out, training = {}, {}
    for site, result in full.items():
        # Only the patients' keys matter to the split: the same sides LocalJob will draw.
        train, val = split_patients(
            result.patients, val_fraction=spec.data.val_fraction, seed=spec.training.seed
        )
        held_out[site] = {p.patient_key for p in val}
        training[site] = sorted(
            (p.patient_key for p in train),
            key=lambda key: hashlib.sha256(f"order:{key}".encode()).hexdigest(),
        )
    chosen: dict[str, object] = {}

    def ingest(folder, cache_dir=None, progress=False):  # what LocalJob calls, restricted
        return chosen[Path(folder).name]

    local_job.ingest_site = ingest  # this benchmark's process only

    def keep(n: int) -> dict[str, int]:
        counts = {}
        for site in sites:
            result = full[site]
            keys = held_out[site] | set(training[site][:n])
            chosen[site] = dataclasses.replace(
                result, patients=tuple(p for p in result.patients if p.patient_key in keys)
            )
            counts[site] = min(n, len(training[site]))
        return counts

    return keep


def _federation(spec, data_dir: Path, sites: list[str], init, state: Path, model_store: Path):
    from server_app.aggregation import SiteUpdate, fed_avg, server_step
    from site_app.local_job import LocalJob
    from site_app.policy import PrivacyPolicy
    from site_app.site_config import SiteConfig

    jobs = {
        site: LocalJob(
            spec=spec,
            site=site,
            config=SiteConfig(
                data_dir=data_dir / site,
                ledger=state / site / "ledger.jsonl",
                signing_key=state / site / "key.pem",
                policy=PrivacyPolicy.for_simulated_data(),
            ),
            state_dir=state / site / "job",
            simulation=True,
        )
        for site in sites
    }
    weights, epsilon, velocity = dict(init), {}, {}
    for round_index in range(spec.training.rounds):
        updates = []
        for site in sites:
            site_weights, meta = jobs[site].train_round(weights, round_index)
            updates.append(SiteUpdate(site, site_weights, int(meta["num_patients"])))
            epsilon[site] = meta.get("epsilon")
        weights, velocity = server_step(  # as the controller steps: the spec's FedAvgM
            weights,
            fed_avg(updates),
            velocity,
            lr=spec.federation.server_lr,
            momentum=spec.federation.server_momentum,
        )
    return weights, epsilon, jobs[sites[0]].trainable_scalars


def _score(spec, weights, data_dir: Path, sites: list[str], cache: Path):
    from simulator.baselines import load_model, load_site_splits, score_model

    splits = load_site_splits(spec, data_dir=data_dir, sites=sites, cache_dir=cache)
    model = load_model(spec, weights)
    return {site: score_model(spec, model, splits[site]).dice for site in sites}


def _mean(values) -> float | None:
    present = [v for v in values if v is not None and math.isfinite(v)]
    return sum(present) / len(present) if present else None


def write_outputs(results: dict, out: Path) -> None:
    """curve.json, curve.md (a table) and curve.png (mean Dice against patients per site)."""
    import textwrap

    from matplotlib.figure import Figure
    from matplotlib.ticker import NullFormatter

    out.mkdir(parents=True, exist_ok=True)
    (out / "curve.json").write_text(json.dumps(results, indent=2) + "\n")
    rows = results["sizes"]
    lines = [
        f"| training patients per site | FedAvg + DP (ε ≤ {results['epsilon']:g}) | FedAvg "
        "| DP / no DP |",
        "|---|---|---|---|",
    ]
    for row in rows:
        ratio = (
            "-" if not row["dice"] or not row["dice_dp"] else f"{row['dice_dp'] / row['dice']:.2f}"
        )
        lines.append(f"| {row['patients']} | {row['dice_dp']:.3f} | {row['dice']:.3f} | {ratio} |")
    lines.append(
        f"\npublic model alone: {results['public_only']:.3f}" if results["public_only"] else ""
    )
    (out / "curve.md").write_text("\n".join(lines) + "\n")
    figure = Figure(figsize=(6.4, 4.4))
    axes = figure.subplots()
    sizes = [row["patients"] for row in rows]
    axes.plot(sizes, [row["dice"] for row in rows], "o-", label="FedAvg, no DP")
    axes.plot(
        sizes,
        [row["dice_dp"] for row in rows],
        "s-",
        label=f"FedAvg + DP, ε ≤ {results['epsilon']:g}",
    )
    if results["public_only"] is not None:
        axes.axhline(
            results["public_only"], linestyle=":", color="grey", label="public model alone"
        )
    axes.set_xscale("log")
    axes.set_xticks(sizes, [str(s) for s in sizes])
    axes.xaxis.set_minor_formatter(NullFormatter())
    axes.set_xlabel("training patients per site (3 sites)")
    axes.set_ylabel("mean Dice, held-out patients")
    axes.set_title("\n".join(textwrap.wrap(results["recipe"], 80)), fontsize=7)
    axes.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(out / "curve.png", dpi=120)


def join_curves(runs: list[Path], out: Path) -> int:
    """One curve from runs over disjoint sizes (e.g. run side by side with --threads 1)."""
    parts = [json.loads((run / "curve.json").read_text()) for run in runs]
    if len({(p["recipe"], p["epsilon"], p["public_only"]) for p in parts}) != 1:
        print(
            "error: --join needs runs of one spec, epsilon and data (they differ)", file=sys.stderr
        )
        return 2
    rows = sorted((r for p in parts for r in p["sizes"]), key=lambda r: r["patients"])
    sizes = [r["patients"] for r in rows]
    if len(set(sizes)) != len(sizes):
        print(f"error: --join needs runs over disjoint sizes (got {sizes})", file=sys.stderr)
        return 2
    write_outputs(dict(parts[0], sizes=rows), out)
    print((out / "curve.md").read_text())
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("spec")
    parser.add_argument("--data", required=True)
    parser.add_argument("--sizes", default="25,50,100,200,400,800")
    parser.add_argument("--epsilon", type=float, default=8.0)
    parser.add_argument("--out", default="results/site_size")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument(
        "--threads",
        type=int,
        default=0,
        help="torch threads (default: every core); e.g. 1 to run two size ranges side by side",
    )
    parser.add_argument(
        "--join",
        metavar="OUT,OUT",
        help="instead of training: join the curve.json of runs over other sizes of the same "
        "spec and data into --out",
    )
    args = parser.parse_args()
    if args.join:
        return join_curves([Path(p) for p in args.join.split(",")], Path(args.out))

    import warnings

    from jobs.model import initial_weights
    from jobs.spec import load_spec, parse_spec
    from simulator.federation import discover_sites, threads_per_site
    from site_app.training import use_cpu_threads

    warnings.filterwarnings("ignore")
    spec_path = Path(args.spec).resolve()
    spec = load_spec(spec_path)
    if args.quick:
        plain = spec.to_plain()
        plain["model"].update(channels=[4, 8], strides=[2], roi_size=[16, 16, 16], init=None)
        plain["data"]["target_spacing_mm"] = [10.0, 10.0, 10.0]
        plain["training"].update(rounds=2, local_epochs=1, batch_size=2, trainable=["*"])
        spec = parse_spec(plain)
        args.sizes = "2,3"
    data_dir, out = Path(args.data).resolve(), Path(args.out)
    sites = discover_sites(data_dir)
    use_cpu_threads(args.threads or threads_per_site(1))
    cache = out / "cache"
    keep = _subsets(data_dir, sites, cache, spec)
    init = initial_weights(spec.model, spec.training.seed, model_store=spec_path.parent)
    keep(10**9)
    public = _mean(_score(spec, init, data_dir, sites, cache).values()) if spec.model.init else None
    recipe = (
        f"{spec.name}: trainable {list(spec.training.trainable)}, {spec.training.rounds} x "
        f"{spec.training.local_epochs} epochs, batch {spec.training.batch_size}, server step "
        f"{spec.federation.server_lr} (momentum {spec.federation.server_momentum})"
    )
    results = {"recipe": recipe, "epsilon": args.epsilon, "public_only": public, "sizes": []}
    print(recipe + (f"; public model alone {public:.3f}" if public is not None else ""))
    for n in (int(x) for x in args.sizes.split(",")):
        counts = keep(n)
        row = {"patients": n, "train_patients": counts}
        for key, epsilon in (("dice_dp", args.epsilon), ("dice", math.inf)):
            plain = spec.to_plain()
            if math.isinf(epsilon):
                plain["privacy"]["enabled"] = False
            else:
                plain["privacy"].update(enabled=True, target_epsilon=epsilon, noise_multiplier=None)
            variant = parse_spec(plain)
            started = time.perf_counter()
            weights, spent, trainable = _federation(
                variant, data_dir, sites, init, out / "state" / f"{n}-{key}", spec_path.parent
            )
            dice = _score(variant, weights, data_dir, sites, cache)
            row[key] = _mean(dice.values())
            row[key + "_per_site"] = dice
            row[key + "_epsilon"] = spent
            row[key + "_wall_s"] = round(time.perf_counter() - started)
            row["trainable"] = trainable
        print(
            f"{n:>5} patients/site: FedAvg + DP {row['dice_dp']:.3f} "
            f"(epsilon {max(v or 0 for v in row['dice_dp_epsilon'].values()):.2f}), "
            f"FedAvg {row['dice']:.3f}, ratio {row['dice_dp'] / row['dice']:.2f}",
            flush=True,
        )
        results["sizes"].append(row)
        write_outputs(results, out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
