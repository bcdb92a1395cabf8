"""Detection speed on one simulated slide: the pipeline (1 and 2 workers) against a hand-written
openslide + scikit-image script doing the same job, and against the bare JPEG decode time of the tiles
the job touches.

Usage (from the repository root)::

    python -m benchmarks.bench_detect --size-mm 5 --preset mll23

The hand-written script is what a researcher would write in an afternoon: ``read_region`` of the
~1 um/px level in 1024-px tiles, optical density against the slide's white, an Otsu threshold,
closing, labelling, ``regionprops`` with the 40-800 um^2 filter, then one ``read_region`` of level 0
per object and ``skimage.transform.resize`` to 288 x 288 px. It has no quality filter and no halo
handling, so it does less than the pipeline. The decode floor decodes, on one core, every overview
tile plus every level-0 tile under a crop of the pipeline's gallery or under the window read to
re-centre a cell, with imagecodecs.
"""

from __future__ import annotations

import argparse
import math
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from benchmarks._measure import run_measured
from pipeline.gallery import open_gallery
from pipeline.relocate import CropParams, search_window_half_um


def hand_written(slide_path: Path, crop_um: float = 25.0, crop_px: int = 288) -> int:
    """The straightforward script; returns the number of crops it made."""
    import openslide
    from skimage import filters, measure, morphology, transform

    slide = openslide.OpenSlide(str(slide_path))
    mpp = float(slide.properties["openslide.mpp-x"])
    level = slide.get_best_level_for_downsample(1.0 / mpp)
    down = slide.level_downsamples[level]
    lmpp = mpp * down
    w, h = slide.level_dimensions[level]
    crops = []
    tile = 1024
    for y in range(0, h, tile):
        for x in range(0, w, tile):
            region = slide.read_region((int(x * down), int(y * down)), level, (tile, tile)).convert("RGB")
            rgb = np.asarray(region, dtype=np.float64)
            od = -np.log10(np.clip(rgb / 240.0, 1e-3, 1)).sum(axis=-1)
            if od.max() < 0.3:
                continue
            mask = od > filters.threshold_otsu(od)
            mask = morphology.closing(mask, morphology.disk(2))
            for prop in measure.regionprops(measure.label(mask)):
                area_um2 = prop.area * lmpp * lmpp
                if not 40 <= area_um2 <= 800:
                    continue
                cy, cx = prop.centroid
                x0 = int((x + cx) * down - crop_um / 2 / mpp)
                y0 = int((y + cy) * down - crop_um / 2 / mpp)
                size = round(crop_um / mpp)
                window = np.asarray(slide.read_region((x0, y0), 0, (size, size)).convert("RGB"))
                crops.append((transform.resize(window, (crop_px, crop_px)) * 255).astype(np.uint8))
    np.save(slide_path.with_suffix(".handwritten.npy"), np.asarray(crops))
    return len(crops)


def decode_floor(slide_path: Path, gallery_path: Path) -> tuple[float, int]:
    """Seconds to decode (one core) the overview tiles and the level-0 tiles under the gallery's crops."""
    import imagecodecs
    import tifffile

    gallery = open_gallery(gallery_path)
    overview_level = gallery.attrs["overview"]["level"]
    mpp = gallery.attrs["slide"]["mpp"]
    crop_um = gallery.attrs["parameters"]["crop"]["crop_um"]
    with tifffile.TiffFile(slide_path) as tif, open(slide_path, "rb") as fh:
        levels = tif.series[0].levels

        def tiles_of(page, wanted):
            across = math.ceil(page.imagewidth / page.tilewidth)
            out = []
            for ty, tx in wanted:
                index = ty * across + tx
                fh.seek(page.dataoffsets[index])
                out.append(fh.read(page.databytecounts[index]))
            return out

        page = levels[overview_level].pages[0] if overview_level is not None else levels[0].pages[0]
        n_across = math.ceil(page.imagewidth / page.tilewidth)
        n_down = math.ceil(page.imagelength / page.tilelength)
        overview = tiles_of(page, [(ty, tx) for ty in range(n_down) for tx in range(n_across)])
        page0 = levels[0].pages[0]
        wanted: set[tuple[int, int]] = set()
        # Level-0 tiles under every crop, and under the window read to re-centre each relocated cell
        # (at its overview position): the pipeline must decode both.
        crop_half = crop_um / 2 / mpp
        search_half = search_window_half_um(CropParams(**gallery.attrs["parameters"]["crop"])) / mpp
        relocated = gallery.candidates[gallery.candidates["relocated"]]
        centres = [
            (gallery.cells["x_px"], gallery.cells["y_px"], crop_half),
            (relocated["x_overview_px"], relocated["y_overview_px"], search_half),
        ]
        for xs, ys, half in centres:
            for x, y in zip(xs, ys, strict=True):
                for ty in range(int((y - half) // 256), int((y + half) // 256) + 1):
                    for tx in range(int((x - half) // 256), int((x + half) // 256) + 1):
                        if 0 <= ty < math.ceil(page0.imagelength / 256) and 0 <= tx < math.ceil(
                            page0.imagewidth / 256
                        ):
                            wanted.add((ty, tx))
        level0 = tiles_of(page0, sorted(wanted))
    started = time.perf_counter()
    for data in overview + level0:
        imagecodecs.jpeg_decode(data)
    return time.perf_counter() - started, len(overview) + len(level0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--slide", type=Path, default=None, help="an existing slide (default: simulate one)")
    parser.add_argument("--size-mm", type=float, default=5.0)
    parser.add_argument("--preset", default="mll23")
    parser.add_argument(
        "--repeat", type=int, default=3, help="runs of each pipeline setting; the median is reported"
    )
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp_dir:
        tmp = Path(tmp_dir)
        slide = args.slide
        if slide is None:
            slide = tmp / "bench.svs"
            m = run_measured(
                [sys.executable, "-m", "pipeline", "simulate", str(slide), "--width-mm", str(args.size_mm),
                 "--height-mm", str(args.size_mm), "--preset", args.preset, "--seed", "3", "--quiet"]
            )  # fmt: skip
            if m.returncode:
                raise SystemExit(m.output)
            print(f"simulated {slide.name}: {args.size_mm:g} x {args.size_mm:g} mm in {m.seconds:.1f} s")
        rows = []
        galleries = {}
        for workers in (1, 2, 0):
            out = tmp / f"out{workers}"
            command = [sys.executable, "-m", "pipeline", "run", str(slide), "--out", str(out)]
            # A shared 2-core machine varies by a third from run to run: the median of a few runs.
            runs = []
            for _ in range(max(1, args.repeat)):
                m = run_measured([*command, "--workers", str(workers), "--quiet", "--overwrite"])
                if m.returncode:
                    raise SystemExit(m.output)
                runs.append(m)
            galleries[workers] = out / f"{slide.stem}.zarr"
            name = f"pipeline, {workers} worker{'s' if workers > 1 else ''}"
            if workers == 0:
                name = "pipeline in one process (no Dask cluster)"
            seconds = [r.seconds for r in runs]
            rows.append((name, float(np.median(seconds)), max(r.peak_rss_mb for r in runs)))
            print(f"{name}: " + ", ".join(f"{t:.2f}" for t in seconds) + " s")
        # Where the time goes, from the in-process run's own stage timings (no start-up costs).
        stages = open_gallery(galleries[0]).attrs["timings_s"]
        print("stages of the in-process run (s): " + ", ".join(f"{k} {v:.2f}" for k, v in stages.items()))
        started = time.perf_counter()
        n_hand = hand_written(slide)
        rows.append(
            (f"hand-written openslide+skimage ({n_hand} crops)", time.perf_counter() - started, float("nan"))
        )
        floor, n_tiles = decode_floor(slide, galleries[1])
        rows.append((f"JPEG decode floor ({n_tiles} tiles, 1 core)", floor, float("nan")))
    hand = rows[3][1]
    print(f"\n{'what':<52} {'seconds':>8} {'peak MB':>8} {'hand/this':>10} {'this/floor':>10}")
    for name, seconds, peak in rows:
        print(f"{name:<52} {seconds:>8.2f} {peak:>8.0f} {hand / seconds:>10.1f} {seconds / floor:>10.1f}")


if __name__ == "__main__":
    main()
