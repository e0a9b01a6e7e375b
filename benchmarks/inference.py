"""`fedseg site infer` per series against the bare model forward, measured side by side.

    .venv/bin/python benchmarks/inference.py [--quick] [--spec SPEC] [--patients N]
        [--matrix M] [--repeats R]

Writes one simulated site of good patients (CT slices and their SEG), signs a freshly
initialised network of the spec as the simulator signs (integrity only), then R times in turn:

- fedseg inference: ``site_app.inference.run_inference`` over the folder (headers and checks,
  decoding to HU, resampling to the training spacing, MONAI sliding window, resampling the mask
  back, one highdicom SEG per series written to disk), divided by the number of series;
- bare forward: MONAI's sliding window alone (same windows, overlap and batch) over each
  series' already prepared image, i.e. the network's own work;
- each phase of one series by itself (decode, prepare, forward, back onto the grid, SEG).

Prints the medians and the ratio inference / bare forward: what fedseg adds around the network.
The manifest check (`fedseg site infer` does it once per run, before any data) is timed too.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import tempfile
import time
import warnings
from collections import defaultdict
from pathlib import Path

from _measure import SMALL_SPEC


def _clean_site(out: Path, *, patients: int, matrix: int) -> Path:
    from simulator.synthetic_data import generate_federation_data

    summary = generate_federation_data(
        out_dir=out / "generated", sites=1, patients_per_site=patients, seed=0, matrix=matrix
    )
    site = out / "site"
    for case in summary.sites[0].cases:
        (site / case.case / "CT").mkdir(parents=True)
        for path in sorted((out / "generated" / case.ct_series).glob("slice-[0-9][0-9][0-9].dcm")):
            shutil.copyfile(path, site / case.case / "CT" / path.name)
    return site


def _signed_model(spec, folder: Path) -> Path:
    import torch

    from jobs.model import build_network
    from server_app.model_manifest import simulation_signer, write_signed_manifest

    folder.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    model = folder / "final_model.pt"
    torch.save(build_network(spec.model).state_dict(), model)
    write_signed_manifest(
        model,
        spec=spec.to_plain(),
        contributing_sites=["site-1"],
        epsilon_per_site={"site-1": None},
        rounds_completed=0,
        signer=simulation_signer(),
    )
    return model


def _timed(action) -> float:
    started = time.perf_counter()
    action()
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="2 patients of 64², 2 repeats")
    parser.add_argument("--spec", help="job spec YAML (default: the benchmarks' small job)")
    parser.add_argument("--patients", type=int, default=3, help="good patients (default 3)")
    parser.add_argument("--matrix", type=int, default=256, help="rows = columns (default 256)")
    parser.add_argument("--repeats", type=int, default=3, help="timed rounds (default 3)")
    args = parser.parse_args()
    if args.quick:
        args.patients, args.matrix, args.repeats = 2, 64, 2
    warnings.simplefilter("ignore")

    import numpy as np
    import torch
    from monai.inferers import sliding_window_inference
    from pydicom import dcmread

    from jobs.spec import load_spec, parse_spec
    from server_app.model_manifest import file_sha256, manifest_paths, verify_model
    from site_app.ct_pixels import decode_hu_volume
    from site_app.inference import (
        SW_BATCH_SIZE,
        SW_OVERLAP,
        find_series,
        load_model,
        predict_mask,
        prepared_image,
        run_inference,
    )
    from site_app.seg_writer import ModelProvenance, build_seg

    spec = load_spec(args.spec) if args.spec else parse_spec(SMALL_SPEC)
    work = Path(tempfile.mkdtemp(prefix="fedseg-inference-bench-"))
    try:
        site = _clean_site(work, patients=args.patients, matrix=args.matrix)
        model_path = _signed_model(spec, work / "models")
        verify_s = _timed(lambda: verify_model(model_path, spec=spec.to_plain()))
        provenance = ModelProvenance(
            job=spec.name,
            model_sha256=file_sha256(model_path),
            manifest_sha256=file_sha256(manifest_paths(model_path)[0]),
            signer=None,
        )
        model = load_model(model_path, spec=spec, provenance=provenance)
        scan = find_series(site)
        volumes = [(g, np.asarray(decode_hu_volume(site, g))) for g in scan.series]
        images = [prepared_image(hu, g, spec).as_tensor()[None] for g, hu in volumes]
        first = volumes[0][1]
        print(
            f"site: {len(volumes)} CT series of {first.shape[0]}x{first.shape[1]}x"
            f"{first.shape[2]} (training grid {tuple(images[0].shape[2:])} at "
            f"{spec.data.target_spacing_mm} mm); network {spec.model.network.value} "
            f"{list(spec.model.channels)}, windows {list(spec.model.roi_size)}; "
            f"{torch.get_num_threads()} threads; median of {args.repeats} round(s)",
            flush=True,
        )

        def bare_forward() -> None:
            with torch.inference_mode():
                for image in images:
                    sliding_window_inference(
                        image,
                        roi_size=spec.model.roi_size,
                        sw_batch_size=SW_BATCH_SIZE,
                        predictor=model.network,
                        overlap=SW_OVERLAP,
                    )

        geometry, hu = volumes[0]
        sources = [dcmread(site / h.path, stop_before_pixels=True) for h in geometry.slices]
        mask = predict_mask(model.network, hu, geometry, spec)
        phases = {
            "decode to HU": lambda: decode_hu_volume(site, geometry),
            "prepare (spacing, window)": lambda: prepared_image(hu, geometry, spec),
            "predict + mask back on the grid": lambda: predict_mask(
                model.network, hu, geometry, spec
            ),
            "SEG (highdicom, in memory)": lambda: build_seg(
                source_images=sources, mask=mask, provenance=provenance
            ),
        }
        run_inference(site, work / "warmup", model)  # imports and first calls outside the timings
        bare_forward()
        times: dict[str, list[float]] = defaultdict(list)
        for round_index in range(args.repeats):
            out = work / f"out-{round_index}"
            times["infer"].append(_timed(lambda out=out: run_inference(site, out, model)))
            times["bare"].append(_timed(bare_forward))
            for name, action in phases.items():
                times[name].append(_timed(action))
        median = {name: statistics.median(values) for name, values in times.items()}
        series = len(volumes)
        infer, bare = median["infer"] / series, median["bare"] / series
        print(f"\n  manifest check (once per run)           {verify_s:8.3f} s")
        print(f"  fedseg inference, per series            {infer:8.3f} s")
        print(f"  bare sliding-window forward, per series {bare:8.3f} s")
        for name in phases:
            print(f"    one series: {name:<31} {median[name]:8.3f} s")
        print(
            f"\ninference / bare forward {infer / bare:.2f}x per series "
            f"({series} series, {args.matrix}² matrix)",
            flush=True,
        )
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
