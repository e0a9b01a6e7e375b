"""Ingestion speed against bare pydicom, and a warm cache against a cold one, side by side.

    .venv/bin/python benchmarks/ingestion.py [--quick] [--patients N] [--matrix M]
        [--repeats R] [--data DIR]

Writes one simulated site, good patients only (CT slices and their SEG, as a clean PACS export),
stored twice: as the simulator writes it (Explicit VR Little Endian) and re-encoded as JPEG 2000
lossless (as many PACS archive). `--data` keeps both for reuse. Then, per encoding, R times in
turn on the same files, read from the page cache:

- bare pydicom: ``dcmread(path).pixel_array`` for every file (CT slices and SEGs);
- bare pydicom + HU volumes: the same, plus what any loader must add to get fedseg's output:
  each series' slices rescaled to float32 HU and stacked (rows, cols, slices);
- fedseg ingestion without a cache: headers, content hashes, validation, decoding, HU, the
  SEG placed on the slices by highdicom;
- fedseg ingestion with an empty cache (cold: also writes the cache), then again with it (warm:
  every file is still read and hashed, nothing parsed or decoded).

Prints the median of each and the ratios; goals (issue 6): ingestion <= 1.5x bare pydicom,
warm <= 0.2x cold.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import tempfile
import time
import warnings
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path

ENCODINGS = ("explicit VR little endian", "JPEG 2000 lossless")


def _clean_site(*, out: Path, patients: int, matrix: int) -> tuple[Path, str]:
    """A site folder with only good cases (CT slices + SEG); returns it and a description."""
    from simulator.synthetic_data import generate_federation_data

    raw = out / "generated"
    summary = generate_federation_data(
        out_dir=raw, sites=1, patients_per_site=patients, seed=0, matrix=matrix
    )
    site = out / "native"
    if not site.exists():
        for case in summary.sites[0].cases:
            (site / case.case / "CT").mkdir(parents=True)
            for path in sorted((raw / case.ct_series).glob("slice-[0-9][0-9][0-9].dcm")):
                shutil.copyfile(path, site / case.case / "CT" / path.name)
            (site / case.case / "SEG").mkdir()
            shutil.copyfile(raw / case.seg, site / case.case / "SEG" / "seg.dcm")
    profile = summary.sites[0]
    slices = sum(case.slices for case in profile.cases)
    described = (
        f"{len(profile.cases)} CT series of {matrix}x{matrix}x{profile.slices_per_series} "
        f"({profile.rescale}; {slices} slices) + {len(profile.cases)} SEG"
    )
    return site, described


def _jpeg2000_copy(site: Path, out: Path) -> Path:
    """``site`` with every CT slice re-encoded as JPEG 2000 lossless (same UIDs)."""
    from pydicom import dcmread
    from pydicom.uid import JPEG2000Lossless

    if out.exists():
        return out
    partial = out.with_name(out.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    for path in sorted(site.rglob("*.dcm")):
        target = partial / path.relative_to(site)
        target.parent.mkdir(parents=True, exist_ok=True)
        if path.parent.name != "CT":
            shutil.copyfile(path, target)
            continue
        ds = dcmread(path)
        ds.compress(JPEG2000Lossless, generate_instance_uid=False)
        ds.save_as(target, enforce_file_format=True)
    partial.rename(out)
    return out


def _bare(files: list[Path]) -> None:
    from pydicom import dcmread

    for path in files:
        _ = dcmread(path).pixel_array


def _bare_with_hu(files: list[Path]) -> None:
    """Bare reads, plus float32 HU volumes (rows, cols, slices) per CT folder, ordered by
    position: rescaled in place into one slice-first array, then one transposing copy."""
    import numpy as np
    from pydicom import dcmread

    series = defaultdict(list)
    for path in files:
        ds = dcmread(path)
        pixels = ds.pixel_array
        if path.parent.name == "CT":
            rescale = (float(ds.RescaleSlope), float(ds.RescaleIntercept))
            series[path.parent].append((float(ds.ImagePositionPatient[2]), pixels, rescale))
    for planes in series.values():
        planes.sort(key=lambda item: item[0])
        volume = np.empty((len(planes), *planes[0][1].shape), np.float32)
        for k, (_, pixels, (slope, intercept)) in enumerate(planes):
            np.multiply(pixels, np.float32(slope), out=volume[k], dtype=np.float32)
            volume[k] += np.float32(intercept)
        _ = np.ascontiguousarray(np.moveaxis(volume, 0, -1))


def _timed(action: Callable[[], object]) -> float:
    started = time.perf_counter()
    action()
    return time.perf_counter() - started


def _measure(site: Path, work: Path, repeats: int) -> dict[str, float]:
    from site_app.ingestion import ingest_site

    files = sorted(site.rglob("*.dcm"))
    for path in files:  # into the page cache, for every contender alike
        path.read_bytes()
    ingest_site(site)  # imports and first-call costs outside the timings
    _bare_with_hu(files)
    times: dict[str, list[float]] = defaultdict(list)
    for round_index in range(repeats):
        cache = work / f"cache-{site.name}-{round_index}"
        times["bare"].append(_timed(lambda: _bare(files)))
        times["bare_hu"].append(_timed(lambda: _bare_with_hu(files)))
        times["none"].append(_timed(lambda: ingest_site(site)))
        times["cold"].append(_timed(lambda cache=cache: ingest_site(site, cache_dir=cache)))
        times["warm"].append(_timed(lambda cache=cache: ingest_site(site, cache_dir=cache)))
    warm = ingest_site(site, cache_dir=cache)
    if warm.quarantine or warm.cache_hits != warm.series_usable:
        raise SystemExit(f"{site}: the site should be clean and fully cached; it is not")
    return {name: statistics.median(values) for name, values in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="3 patients of 128², 2 repeats")
    parser.add_argument("--patients", type=int, default=3, help="good patients (default 3)")
    parser.add_argument("--matrix", type=int, default=512, help="rows = columns (default 512)")
    parser.add_argument("--repeats", type=int, default=3, help="timed rounds (default 3)")
    parser.add_argument("--data", type=Path, help="folder to write the sites into and reuse")
    args = parser.parse_args()
    if args.quick:
        args.patients, args.matrix, args.repeats = 3, 128, 2
    warnings.simplefilter("ignore")

    work = Path(tempfile.mkdtemp(prefix="fedseg-ingestion-bench-"))
    data = args.data or work / "data"
    try:
        native, described = _clean_site(out=data, patients=args.patients, matrix=args.matrix)
        sites = dict(
            zip(ENCODINGS, (native, _jpeg2000_copy(native, data / "jpeg2000")), strict=True)
        )
        print(f"site: {described}; median of {args.repeats} round(s)", flush=True)
        rows = []
        for encoding, site in sites.items():
            median = _measure(site, work, args.repeats)
            megabytes = sum(p.stat().st_size for p in site.rglob("*.dcm")) / 1e6
            print(f"\n{encoding} ({megabytes:.0f} MB)")
            print(f"  bare pydicom (dcmread + pixel_array)  {median['bare']:7.3f} s")
            print(f"  bare pydicom + HU volumes (numpy)     {median['bare_hu']:7.3f} s")
            print(f"  fedseg ingestion, no cache            {median['none']:7.3f} s")
            print(f"  fedseg ingestion, cold (writes cache) {median['cold']:7.3f} s")
            print(f"  fedseg ingestion, warm cache          {median['warm']:7.3f} s", flush=True)
            rows.append((encoding, median))
        print()
        for encoding, median in rows:
            print(
                f"{encoding}: ingestion / bare pydicom {median['none'] / median['bare']:.2f}x "
                f"(goal <= 1.5x); / bare + HU {median['none'] / median['bare_hu']:.2f}x; "
                f"cold / bare {median['cold'] / median['bare']:.2f}x; "
                f"warm / cold {median['warm'] / median['cold']:.3f} (goal <= 0.2)"
            )
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
