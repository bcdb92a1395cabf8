"""Per-tile detection speed: Mpx/s of slide per core at the 1 um/px overview, reading left out.

Times :func:`pipeline.runner._detect_tile` (optical density, segmentation, red-cell layers and ring
features of one overview tile, as the workers run it) on tiles read beforehand, in CPU time
(``time.process_time``) with OpenCV on one thread, as in a worker. Rates count the tiles' *cores*
(1024 x 1024 px of slide each); every tile also carries its halo, so the pixels processed are more.

Slides (built into ``--folder`` once, reused afterwards):

- ``monolayer``: a simulated healthy monolayer (``normal`` preset) scanned at 1 um/px;
- ``bccd``: a mosaic of the BCCD photographs (:mod:`benchmarks.bccd_recall`), resampled to 1 um/px and
  tiled edge to edge: a white cell every 46 x 35 um, as dense as a leukaemic smear;
- any slide given with ``--slide`` (for example the 268 mm^2 slide of ``benchmarks/bench_scale.py``).

``--dump`` writes every tile's candidate table and a digest of its segmentation labels, and
``--compare A B`` checks that two dumps (say, of two versions of the code) agree exactly.

Usage (from the repository root)::

    python -m benchmarks.bench_detect_tile                          # monolayer and bccd
    python -m benchmarks.bench_detect_tile --slide big.svs --tiles 64
    python -m benchmarks.bench_detect_tile --profile                # where the time goes
    python -m benchmarks.bench_detect_tile --tile-px 1024           # more halo per tile
    python -m benchmarks.bench_detect_tile --dump new.pkl --tiles 0 # every tile, for --compare
    python -m benchmarks.bench_detect_tile --compare old.pkl new.pkl
"""

from __future__ import annotations

import argparse
import cProfile
import hashlib
import math
import os
import pickle
import pstats
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import cv2
import numpy as np
import pandas as pd

from pipeline import runner
from pipeline.slide import SlideRef

DEFAULT_FOLDER = Path(os.environ.get("TMPDIR", "/tmp")) / "bench_detect_tile"
Tile = tuple[int, int, int, int]


# ------------------------------------------------------------------------------------------ slides
def monolayer_slide(folder: Path, size_mm: float = 4.096) -> Path:
    """A simulated healthy monolayer scanned at 1 um/px (built once)."""
    from pipeline.simulate import simulate_slide

    path = folder / "monolayer_1um.svs"
    if not path.exists():
        simulate_slide(
            path, width_mm=size_mm, height_mm=size_mm, seed=1, preset="normal", mpp=1.0,
            placement="monolayer", workers=0, progress=False,
        )  # fmt: skip
    return path


def bccd_slide(folder: Path, size_px: int = 4096) -> Path:
    """The BCCD photographs at 1 um/px tiled into a ``size_px`` square slide (built once)."""
    from benchmarks.bccd_recall import DEFAULT_BCCD, bccd_mosaic
    from pipeline.simulate.svs import write_svs

    path = folder / "bccd_1um.svs"
    if not path.exists():
        write_svs(bccd_mosaic(DEFAULT_BCCD, 1.0, size_px)[1], path, 1.0)
    return path


# ------------------------------------------------------------------------------------------ tiles
def prepare(
    path: Path, n_tiles: int, tile_px: int | None = None
) -> tuple[runner.Plan, runner.SlideEstimate, dict[Tile, np.ndarray]]:
    """Plan and estimate the slide as a run does; read up to ``n_tiles`` non-blank tiles (0: all),
    spread evenly over the slide, with their halo."""
    params = runner.RunParams() if tile_px is None else runner.RunParams(tile_px=tile_px)
    plan = runner.plan_slide(SlideRef(str(path)), params)
    tiles = runner.overview_tiles(plan)
    stains = runner.stain_map(plan)
    blank = runner.blank_tile_mask(plan, tiles, stains)
    estimate = runner._estimate_task(runner.sample_windows(plan, params.stat_samples, stains=stains), plan)
    todo = [t for t, b in zip(tiles, blank, strict=True) if not b]
    if 0 < n_tiles < len(todo):
        todo = [todo[i] for i in np.linspace(0, len(todo) - 1, n_tiles).round().astype(int)]
    halo = plan.halo_px
    pixels = {
        (x, y, w, h): runner._read_overview(plan, x - halo, y - halo, w + 2 * halo, h + 2 * halo)
        for x, y, w, h in todo
    }
    return plan, estimate, pixels


@contextmanager
def _preread(pixels: dict[Tile, np.ndarray]) -> Iterator[None]:
    """Serve ``_detect_tile``'s read from memory: the benchmark times detection, not decoding."""
    original = runner._read_overview

    def read(plan: runner.Plan, x0: int, y0: int, width: int, height: int) -> np.ndarray:
        halo = plan.halo_px
        return pixels[(x0 + halo, y0 + halo, width - 2 * halo, height - 2 * halo)].copy()

    runner._read_overview = read
    try:
        yield
    finally:
        runner._read_overview = original


def time_detection(
    plan: runner.Plan, estimate: runner.SlideEstimate, pixels: dict[Tile, np.ndarray], repeats: int
) -> tuple[float, int]:
    """Best CPU seconds, over ``repeats``, to detect every tile; and the candidates found."""
    best, found = math.inf, 0
    with _preread(pixels):
        runner._detect_tile(next(iter(pixels)), plan, estimate)  # warm-up (caches, imports)
        for _ in range(repeats):
            t0 = time.process_time()
            found = sum(len(runner._detect_tile(tile, plan, estimate)) for tile in pixels)
            best = min(best, time.process_time() - t0)
    return best, found


def profile_detection(
    plan: runner.Plan, estimate: runner.SlideEstimate, pixels: dict[Tile, np.ndarray], sort: str = "tottime"
) -> None:
    """Print the functions taking the most CPU time over one pass (cProfile, sorted by ``sort``)."""
    profiler = cProfile.Profile(time.process_time)
    with _preread(pixels):
        profiler.enable()
        for tile in pixels:
            runner._detect_tile(tile, plan, estimate)
        profiler.disable()
    pstats.Stats(profiler, stream=sys.stdout).sort_stats(sort).print_stats(30)


# --------------------------------------------------------------------------------- equivalence
def dump(plan: runner.Plan, estimate: runner.SlideEstimate, pixels: dict[Tile, np.ndarray]) -> dict:
    """Every tile's candidate table and the digest of its segmentation labels."""
    from pipeline.segment import optical_density, segment

    out = {}
    with _preread(pixels):
        for tile, rgb in pixels.items():
            params = plan.params.segment
            od = optical_density(rgb, plan.overview_mpp, params, estimate.stains)
            labels, _ = segment(rgb, plan.overview_mpp, estimate.stains, params, od=od)
            digest = hashlib.sha1(np.ascontiguousarray(labels, np.int32).tobytes()).hexdigest()
            out[tile] = (runner._detect_tile(tile, plan, estimate), digest)
    return out


def compare(a: dict, b: dict) -> int:
    """Print where two dumps differ; return the number of tiles that differ."""
    bad = 0
    for slide in sorted(set(a) | set(b)):
        if slide not in a or slide not in b:
            print(f"{slide}: in one dump only")
            bad += 1
            continue
        ta, tb = a[slide], b[slide]
        if set(ta) != set(tb):
            print(f"{slide}: different tiles")
            bad += 1
            continue
        n_same = n_rows = 0
        for tile in ta:
            (da, la), (db, lb) = ta[tile], tb[tile]
            n_rows += len(da)
            try:
                pd.testing.assert_frame_equal(da, db, check_exact=True)
                same = la == lb
            except AssertionError as exc:
                print(f"{slide} {tile}: {str(exc).splitlines()[0:3]}")
                same = False
            if not same and la != lb:
                print(f"{slide} {tile}: labels differ")
            n_same += same
            bad += not same
        print(f"{slide}: {n_same} of {len(ta)} tiles identical (tables and labels), {n_rows} candidates")
    return bad


# ------------------------------------------------------------------------------------------- main
def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--slide", type=Path, nargs="+", default=None, help="instead of the built slides")
    parser.add_argument("--folder", type=Path, default=DEFAULT_FOLDER, help="where the built slides go")
    parser.add_argument("--tiles", type=int, default=32, help="tiles per slide, spread evenly (0: all)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--tile-px", type=int, default=None, help="overview tile side (default: a run's)")
    parser.add_argument("--profile", action="store_true", help="profile one pass instead of timing")
    parser.add_argument("--sort", default="tottime", help="profile order (tottime, cumulative, ...)")
    parser.add_argument("--cv2-threads", type=int, default=1, help="OpenCV threads (default 1)")
    parser.add_argument("--dump", type=Path, default=None, help="write candidate tables for --compare")
    parser.add_argument("--compare", type=Path, nargs=2, default=None, help="compare two dumps")
    args = parser.parse_args(argv)
    if args.compare:
        a, b = (pickle.loads(p.read_bytes()) for p in args.compare)
        bad = compare(a, b)
        print("identical" if bad == 0 else f"{bad} tiles differ")
        raise SystemExit(1 if bad else 0)
    # One OpenCV thread: CPU time is then one core's. (Workers do not set it: OpenCV then splits some
    # calls over every core, which costs CPU time and competes with the other workers.)
    cv2.setNumThreads(args.cv2_threads)
    args.folder.mkdir(parents=True, exist_ok=True)
    slides = args.slide or [monolayer_slide(args.folder), bccd_slide(args.folder)]
    dumped = {}
    for path in slides:
        plan, estimate, pixels = prepare(path, args.tiles, args.tile_px)
        if args.dump:
            dumped[path.name] = dump(plan, estimate, pixels)
            print(f"{path.name}: {len(pixels)} tiles dumped", flush=True)
            continue
        if args.profile:
            profile_detection(plan, estimate, pixels, args.sort)
            continue
        seconds, found = time_detection(plan, estimate, pixels, args.repeats)
        core = sum(w * h for _, _, w, h in pixels)
        processed = sum(p.shape[0] * p.shape[1] for p in pixels.values())
        print(
            f"{path.name}: {len(pixels)} tiles of {plan.params.tile_px} px at {plan.overview_mpp:g} um/px "
            f"(halo {plan.halo_px} px), "
            f"{found} candidates: {seconds:.3f} s CPU = {core / seconds / 1e6:.1f} Mpx/s of slide "
            f"({processed / seconds / 1e6:.1f} Mpx/s with the halo), "
            f"{1e3 * seconds / len(pixels):.1f} ms a tile",
            flush=True,
        )
    if args.dump:
        args.dump.write_bytes(pickle.dumps(dumped))
    print(f"load average: {', '.join(f'{v:.2f}' for v in os.getloadavg())}")


if __name__ == "__main__":
    main()
