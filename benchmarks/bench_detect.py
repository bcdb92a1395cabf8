"""Detection on one simulated slide: the pipeline (1 and 2 workers, and in one process) against a
hand-written openslide + scikit-image script, each with its time, crop count, and recall and precision
against the simulator's truth; and the bare JPEG decode time of the tiles the job touches.

Usage (from the repository root)::

    python -m benchmarks.bench_detect --size-mm 6 --preset mll23

The hand-written script (:func:`hand_written`) is what a careful researcher would write in an afternoon:
``read_region`` of the ~1 um/px level in 1024-px tiles with a halo, green optical density against the
slide's glass, a fixed nucleus threshold taken from real smears (:data:`NUCLEUS_GREEN_OD`), a closing,
``regionprops`` with the 40-800 um^2 filter, then one ``read_region`` of level 0 per object,
``skimage.transform.resize`` to 288 x 288 px and a zarr of the crops (zstd level 1, like the gallery).
It has no quality filter. Every setting runs as its own process (interpreter start-up and imports
included), alternating, ``--repeat`` rounds; recall and precision use :func:`pipeline.evaluate.match`
(through :func:`~pipeline.evaluate.evaluate_tables`), for the pipeline over its gallery's accepted cells.
The decode floor decodes, on one core, every overview tile plus every level-0 tile under a crop of the
pipeline's gallery or under the window read to re-centre a cell, with imagecodecs.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd

from benchmarks._measure import Measured, run_measured

# pipeline/ is imported inside the functions that use it: the hand-written script runs as a process of
# its own from this module, and must not pay for importing the pipeline it is compared with.


#: Green-channel optical density above which a pixel counts as nucleus: the geometric mean of a real red
#: cell's (0.18: OD sum 0.33-0.40 along the direction (0.50, 0.76, 0.42)) and a real nucleus's (0.96,
#: PBC/CellaVision median colour against its glass), so both sit a factor of ~2.3 from it
#: (docs: DESIGN-NOTES sections 3 and 9). Fixed: a researcher picks it once, not per slide.
NUCLEUS_GREEN_OD = 0.4
#: Overview tile (px of the ~1 um/px level) and the halo read around it; the halo is wider than the
#: largest nucleus, so an object whose centroid lies in the core is whole.
TILE_PX, HALO_PX = 1024, 32


def glass_white(rgb: np.ndarray) -> np.ndarray:
    """The slide's glass colour: per channel, the median of the brightest 3 % of pixels.

    Parameters
    ----------
    rgb
        An ``(h, w, 3)`` image of the slide (e.g. its smallest pyramid level).

    Returns
    -------
    numpy.ndarray
        ``(3,)`` float64, each in 1-255.
    """
    pixels = np.asarray(rgb, dtype=np.float64).reshape(-1, 3)
    brightness = pixels.sum(axis=1)
    brightest = pixels[brightness >= np.percentile(brightness, 97)]
    return np.clip(np.median(brightest, axis=0), 1.0, 255.0)


def nucleus_objects(
    rgb: np.ndarray,
    white: np.ndarray,
    mpp: float,
    threshold: float = NUCLEUS_GREEN_OD,
    area_um2: tuple[float, float] = (40.0, 800.0),
) -> list[tuple[float, float, float]]:
    """Nuclei of an overview image: green OD above a fixed threshold, closed, 40-800 um^2.

    Parameters
    ----------
    rgb
        ``(h, w, 3)`` uint8 image at about 1 um/px.
    white
        The slide's glass colour (:func:`glass_white`).
    mpp
        Pixel size of ``rgb``, um/px.
    threshold
        Green-channel optical density of a nucleus pixel.
    area_um2
        Smallest and largest object kept, um^2.

    Returns
    -------
    list of (float, float, float)
        ``(row, column, area_um2)`` of each object's centroid, in pixels of ``rgb``.
    """
    from skimage import measure, morphology

    green = np.asarray(rgb[..., 1], dtype=np.float32)
    od = -np.log10(np.clip(green / np.float32(white[1]), 1 / 255, 1.0))
    # A closing of 2 um joins the lobes of a segmented neutrophil into one object.
    mask = morphology.closing(od > threshold, morphology.disk(2))
    out = []
    for prop in measure.regionprops(measure.label(mask)):
        area = prop.area * mpp * mpp
        if area_um2[0] <= area <= area_um2[1]:
            out.append((float(prop.centroid[0]), float(prop.centroid[1]), float(area)))
    return out


def hand_written(
    slide_path: Path, out_path: Path, crop_um: float = 25.0, crop_px: int = 288, shard_cells: int = 128
) -> pd.DataFrame:
    """The afternoon script: find nuclei on the ~1 um/px level, crop each from level 0 into a zarr.

    Reads the overview level in 1024-px tiles with ``read_region`` (with a halo, an object kept by the
    tile holding its centroid), thresholds green optical density against the slide's glass at a fixed
    :data:`NUCLEUS_GREEN_OD`, keeps 40-800 um^2 objects, then reads ``crop_um`` of level 0 around each
    and resizes it to ``crop_px`` with ``skimage.transform.resize``. Crops go to a zarr v3 array like the
    pipeline's (one chunk per crop, whole shards of ``shard_cells``, zstd level 1). No quality filter.

    Parameters
    ----------
    slide_path
        Any slide OpenSlide reads, with an MPP.
    out_path
        The zarr array to write (replaced if present).
    crop_um, crop_px
        Crop side in um and in pixels.
    shard_cells
        Crops per shard.

    Returns
    -------
    pandas.DataFrame
        One row per crop: level-0 ``x_px``, ``y_px`` of the object's centroid and its ``area_um2``.
    """
    import openslide
    import zarr
    from skimage import transform
    from zarr.codecs import ZstdCodec

    slide = openslide.OpenSlide(str(slide_path))
    mpp = float(slide.properties["openslide.mpp-x"])
    level = slide.get_best_level_for_downsample(1.0 / mpp)
    down = slide.level_downsamples[level]
    lmpp = mpp * down
    w, h = slide.level_dimensions[level]
    white = glass_white(np.asarray(slide.get_thumbnail((1024, 1024)).convert("RGB")))
    size = round(crop_um / mpp)
    crops = zarr.create_array(
        store=str(out_path),
        shape=(0, crop_px, crop_px, 3),
        chunks=(1, crop_px, crop_px, 3),
        shards=(shard_cells, crop_px, crop_px, 3),
        dtype="uint8",
        compressors=[ZstdCodec(level=1)],
        overwrite=True,
    )
    buffer: list[np.ndarray] = []
    rows: list[tuple[float, float, float]] = []

    def flush() -> None:
        # Whole shards only: appending crop by crop would rewrite a shard for every crop.
        n = crops.shape[0]
        crops.resize((n + len(buffer), crop_px, crop_px, 3))
        crops[n:] = np.stack(buffer)
        buffer.clear()

    for y in range(0, h, TILE_PX):
        for x in range(0, w, TILE_PX):
            # Stay inside the level: OpenSlide fills beyond it with transparent black, which is "stain".
            x0, y0 = max(x - HALO_PX, 0), max(y - HALO_PX, 0)
            x1, y1 = min(x + TILE_PX + HALO_PX, w), min(y + TILE_PX + HALO_PX, h)
            region = slide.read_region((round(x0 * down), round(y0 * down)), level, (x1 - x0, y1 - y0))
            for cy, cx, area in nucleus_objects(np.asarray(region.convert("RGB")), white, lmpp):
                if not (x <= x0 + cx < x + TILE_PX and y <= y0 + cy < y + TILE_PX):
                    continue  # the neighbouring tile's object
                x_px, y_px = (x0 + cx + 0.5) * down, (y0 + cy + 0.5) * down
                corner = (round(x_px - size / 2), round(y_px - size / 2))
                window = np.asarray(slide.read_region(corner, 0, (size, size)).convert("RGB"))
                buffer.append((transform.resize(window, (crop_px, crop_px)) * 255).round().astype(np.uint8))
                rows.append((x_px, y_px, area))
                if len(buffer) == shard_cells:
                    flush()
    if buffer:
        flush()
    slide.close()
    return pd.DataFrame(rows, columns=["x_px", "y_px", "area_um2"])


def raw_tiles(page, fh, indices: list[int] | None = None) -> list[bytes]:
    """The stored (still encoded) bytes of a TIFF page's tiles ``indices`` (default: all), from ``fh``."""
    if indices is None:
        indices = list(range(len(page.dataoffsets)))
    out = []
    for index in indices:
        fh.seek(page.dataoffsets[index])
        out.append(fh.read(page.databytecounts[index]))
    return out


def decode_floor(
    slide_path: Path, gallery_path: Path, relocation_windows: bool = True, repeats: int = 1
) -> tuple[float, int]:
    """Seconds to decode (one core) the overview tiles and the level-0 tiles under the gallery's crops.

    With ``relocation_windows`` (default), also the level-0 tiles under the window the pipeline reads
    first to re-centre each accepted candidate (it reads the whole search window for the few whose
    nucleus reaches that window's edge, which this leaves out); without, only what any tool cutting
    these crops must decode.
    Returns the best time of ``repeats`` and the number of tiles.
    """
    import imagecodecs
    import tifffile

    from pipeline.gallery import open_gallery
    from pipeline.relocate import CropParams, search_windows_half_px

    gallery = open_gallery(gallery_path)
    overview_level = gallery.attrs["overview"]["level"]
    mpp = gallery.attrs["slide"]["mpp"]
    crop_um = gallery.attrs["parameters"]["crop"]["crop_um"]
    with tifffile.TiffFile(slide_path) as tif, open(slide_path, "rb") as fh:
        levels = tif.series[0].levels

        def tiles_of(page, wanted):
            across = math.ceil(page.imagewidth / page.tilewidth)
            return raw_tiles(page, fh, [ty * across + tx for ty, tx in wanted])

        page = levels[overview_level].pages[0] if overview_level is not None else levels[0].pages[0]
        n_across = math.ceil(page.imagewidth / page.tilewidth)
        n_down = math.ceil(page.imagelength / page.tilelength)
        overview = tiles_of(page, [(ty, tx) for ty in range(n_down) for tx in range(n_across)])
        page0 = levels[0].pages[0]
        wanted: set[tuple[int, int]] = set()
        # Level-0 tiles under every crop, and under the window read to re-centre each candidate that
        # passed the overview's quality filter (at its overview position): the pipeline must decode
        # both. Re-centring rejects only as out of focus.
        crop_half = crop_um / 2 / mpp
        first_half, _ = search_windows_half_px(mpp, CropParams(**gallery.attrs["parameters"]["crop"]))
        candidates = gallery.candidates
        tried = candidates[candidates["accepted"] | (candidates["reason"] == "out_of_focus")]
        centres = [(gallery.cells["x_px"], gallery.cells["y_px"], crop_half)]
        if relocation_windows:
            # The window holds pixels floor(x) - half to floor(x) + half - 1.
            xs, ys = np.floor(tried["x_overview_px"]) - 0.5, np.floor(tried["y_overview_px"]) - 0.5
            centres.append((xs, ys, first_half - 0.5))
        tw, th = page0.tilewidth, page0.tilelength
        rows, cols = math.ceil(page0.imagelength / th), math.ceil(page0.imagewidth / tw)
        for xs, ys, half in centres:
            for x, y in zip(xs, ys, strict=True):
                for ty in range(max(0, int((y - half) // th)), min(rows, int((y + half) // th) + 1)):
                    for tx in range(max(0, int((x - half) // tw)), min(cols, int((x + half) // tw) + 1)):
                        wanted.add((ty, tx))
        level0 = tiles_of(page0, sorted(wanted))
    best = math.inf
    for _ in range(max(1, repeats)):
        started = time.perf_counter()
        for data in overview + level0:
            imagecodecs.jpeg_decode(data)
        best = min(best, time.perf_counter() - started)
    return best, len(overview) + len(level0)


def _evaluate(
    detections: pd.DataFrame, truth_csv: Path | None, mpp: float
) -> tuple[float | None, float | None]:
    """Recall and precision of level-0 detections against the simulator's truth (None without one)."""
    from pipeline.evaluate import evaluate_tables, scene_zones, truth_json_for

    if truth_csv is None:
        return None, None
    truth = pd.read_csv(truth_csv)
    report = evaluate_tables(detections, detections, truth, mpp, scene_zones(truth_json_for(truth_csv)))
    return report["accepted"]["recall"], report["accepted"]["precision"]


def _pct(rate: float | None) -> str:
    return "-" if rate is None else f"{100 * rate:.1f}%"


def _load() -> str:
    return "load average " + " ".join(f"{v:.2f}" for v in os.getloadavg())


def main() -> None:
    from pipeline.gallery import open_gallery

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--slide", type=Path, default=None, help="an existing slide (default: simulate one)")
    parser.add_argument(
        "--truth", type=Path, default=None, help="its truth.csv (default: <slide stem>.truth.csv if present)"
    )
    parser.add_argument("--size-mm", type=float, default=6.0)
    parser.add_argument("--preset", default="mll23")
    parser.add_argument(
        "--repeat", type=int, default=3, help="rounds of every setting, alternating; median and best reported"
    )
    args = parser.parse_args()
    print(f"start: {_load()} on {os.cpu_count()} CPUs")
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
        truth = args.truth or slide.with_suffix(".truth.csv")
        truth = truth if truth.is_file() else None
        hand_zarr, hand_csv = tmp / "hand_written.zarr", tmp / "hand_written.csv"
        settings = {
            "pipeline, 1 worker": ["--workers", "1"],
            "pipeline, 2 workers": ["--workers", "2"],
            "pipeline in one process (no Dask cluster)": ["--workers", "0"],
            "hand-written openslide + skimage": [],
        }
        commands = {}
        for name, options in settings.items():
            if options:
                out = tmp / f"out{options[-1]}"
                commands[name] = [sys.executable, "-m", "pipeline", "run", str(slide), "--out", str(out),
                                  *options, "--quiet", "--overwrite"]  # fmt: skip
            else:
                commands[name] = [
                    sys.executable, "-c",
                    "import sys; from pathlib import Path; from benchmarks.bench_detect import hand_written; "
                    "hand_written(Path(sys.argv[1]), Path(sys.argv[2])).to_csv(sys.argv[3], index=False)",
                    str(slide), str(hand_zarr), str(hand_csv),
                ]  # fmt: skip
        # A shared 2-core machine varies by a third from run to run: every setting runs once per round,
        # in turn, so that a busy spell falls on all of them alike.
        runs: dict[str, list[Measured]] = {name: [] for name in settings}
        for round_ in range(max(1, args.repeat)):
            for name, command in commands.items():
                m = run_measured(command)
                if m.returncode:
                    raise SystemExit(m.output)
                runs[name].append(m)
            print(
                f"round {round_ + 1}: "
                + ", ".join(f"{name.split(' (')[0]} {r[-1].seconds:.2f} s" for name, r in runs.items())
                + f"; {_load()}"
            )
        galleries = {name: tmp / f"out{o[-1]}" / f"{slide.stem}.zarr" for name, o in settings.items() if o}
        # Where the time goes, from the in-process run's own stage timings (no start-up costs).
        stages = open_gallery(galleries["pipeline in one process (no Dask cluster)"]).attrs["timings_s"]
        print("stages of the in-process run (s): " + ", ".join(f"{k} {v:.2f}" for k, v in stages.items()))
        mpp = float(open_gallery(galleries["pipeline, 1 worker"]).attrs["slide"]["mpp"])
        found: dict[str, tuple[int | None, float | None, float | None]] = {}
        for name, path in galleries.items():
            gallery = open_gallery(path)
            found[name] = (len(gallery.cells), *_evaluate(gallery.cells, truth, mpp))
        hand = pd.read_csv(hand_csv)
        found["hand-written openslide + skimage"] = (len(hand), *_evaluate(hand, truth, mpp))
        floor, n_tiles = decode_floor(slide, galleries["pipeline, 2 workers"])
    rows = [
        (
            name,
            float(np.median([r.seconds for r in runs[name]])),
            min(r.seconds for r in runs[name]),
            max(r.peak_rss_mb for r in runs[name]),
            *found[name],
        )
        for name in settings
    ]
    floor_name = f"JPEG decode floor ({n_tiles} tiles, 1 core)"
    rows.append((floor_name, floor, floor, float("nan"), None, None, None))
    hand_s = rows[3][1]
    print(
        f"\ntruth: {'none' if truth is None else truth.name}; seconds: median (best) of {args.repeat}; "
        "recall and precision of the crops against the truth"
    )
    print(
        f"{'what':<42} {'median s':>8} {'best s':>7} {'peak MB':>8} {'crops':>6} {'recall':>7} "
        f"{'precision':>9} {'hand/this':>9} {'this/floor':>10}"
    )
    for name, median, best, peak, crops, recall, precision in rows:
        n_crops = "-" if crops is None else str(crops)
        print(
            f"{name:<42} {median:>8.2f} {best:>7.2f} {peak:>8.0f} {n_crops:>6} {_pct(recall):>7} "
            f"{_pct(precision):>9} {hand_s / median:>9.2f} {median / floor:>10.1f}"
        )
    print(f"end: {_load()}")


if __name__ == "__main__":
    main()
