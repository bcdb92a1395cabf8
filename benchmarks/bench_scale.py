"""Speed at scale: a whole large slide against the time it takes just to decode its JPEG tiles.

What counts for users running thousands of slides is core-seconds per slide on large slides, where
start-up no longer matters. This benchmark

1. builds a large slide (default 4 x 4 blocks of a simulated 4.096 x 4.096 mm ``mll23`` monolayer: 16.4 x
   16.4 mm, 268 mm^2, 4.3 gigapixels at 0.25 um/px): the block is simulated once, its level-0 JPEG tiles
   are copied into every block without re-encoding and its reduced levels are tiled, so the large
   slide takes seconds to write (``--slide`` takes an existing one instead);
2. runs ``python -m pipeline run`` on it with 1 and 2 local workers (wall time of the command and peak
   memory of its process tree);
3. measures, in the same run, the *decode floor*: one core decoding (libjpeg-turbo, imagecodecs) every
   JPEG tile the job must touch: the whole overview level, plus the level-0 tiles under each crop and
   under the window read to re-centre each relocated cell (:func:`benchmarks.bench_detect.decode_floor`);
   and the *strict* floor without the re-centring windows (what any tool cutting these crops decodes);
4. prints the ratio of each run to both floors, CPU milliseconds per cell of the whole process tree
   (driver, scheduler and workers), cells per second per core, peak memory and the gallery's bytes per
   cell.

Usage (from the repository root)::

    python -m benchmarks.bench_scale                    # 16.4 x 16.4 mm, workers 1 and 2
    python -m benchmarks.bench_scale --blocks 2 --workers 2
    python -m benchmarks.bench_scale --slide big.svs --workers 2
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import tempfile
from pathlib import Path

import numpy as np

from benchmarks._measure import run_measured
from benchmarks.bench_detect import decode_floor, raw_tiles
from pipeline.gallery import open_gallery

BLOCK_MM = 4.096  # 16384 px at 0.25 um/px: every level of the block is a whole number of 256-px tiles
MPP = 0.25


def build_large_slide(out: Path, blocks: int, seed: int = 3, workers: int = 2) -> Path:
    """A ``blocks`` x ``blocks`` mosaic of one simulated block, written without re-encoding level 0."""
    import tifffile

    from pipeline.simulate.svs import TILE_PX, SvsWriter, thumbnail_from

    block = out.with_name("block.svs")
    m = run_measured(
        [sys.executable, "-m", "pipeline", "simulate", str(block), "--width-mm", str(BLOCK_MM),
         "--height-mm", str(BLOCK_MM), "--preset", "mll23", "--placement", "monolayer", "--seed", str(seed),
         "--workers", str(workers), "--quiet"]
    )  # fmt: skip
    if m.returncode:
        raise SystemExit(m.output)
    print(f"simulated the {BLOCK_MM} mm block in {m.seconds:.1f} s", flush=True)
    with tifffile.TiffFile(block) as tif, open(block, "rb") as fh:
        levels = tif.series[0].levels
        page0 = levels[0].pages[0]
        across = math.ceil(page0.imagewidth / TILE_PX)
        down = math.ceil(page0.imagelength / TILE_PX)
        if page0.imagewidth % TILE_PX or page0.imagelength % TILE_PX:
            raise SystemExit("the block must be a whole number of tiles")
        tiles0 = raw_tiles(page0, fh)
        reduced = [level.asarray() for level in levels[1:]]
    w0, h0 = page0.imagewidth * blocks, page0.imagelength * blocks

    def level0() -> object:
        for _by in range(blocks):
            for ty in range(down):
                for _bx in range(blocks):
                    yield from tiles0[ty * across : (ty + 1) * across]

    def tiled(level: np.ndarray) -> object:
        big_h, big_w = level.shape[0] * blocks, level.shape[1] * blocks
        for y in range(0, big_h, TILE_PX):
            for x in range(0, big_w, TILE_PX):
                tile = np.full((TILE_PX, TILE_PX, 3), 255, np.uint8)
                ys = np.arange(y, min(y + TILE_PX, big_h)) % level.shape[0]
                xs = np.arange(x, min(x + TILE_PX, big_w)) % level.shape[1]
                tile[: len(ys), : len(xs)] = level[np.ix_(ys, xs)]
                yield tile

    with SvsWriter(out, w0, h0, MPP) as svs:
        svs.write_level0(level0())
        smallest = np.tile(reduced[-1], (blocks, blocks, 1))
        svs.write_thumbnail(thumbnail_from(smallest))
        for level in reduced:
            svs.write_level(tiled(level), (level.shape[1] * blocks, level.shape[0] * blocks))
    for leftover in (block, block.with_suffix(".truth.csv"), block.with_suffix(".truth.json")):
        leftover.unlink(missing_ok=True)
    return out


def _bytes_under(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--slide", type=Path, default=None, help="an existing large slide")
    parser.add_argument("--blocks", type=int, default=4, help="blocks of 4.096 mm across and down")
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--keep", type=Path, default=None, help="keep the slide and galleries here")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp_dir:
        tmp = args.keep or Path(tmp_dir)
        tmp.mkdir(parents=True, exist_ok=True)
        slide = args.slide
        if slide is None:
            slide = tmp / f"scale_{args.blocks}x{args.blocks}.svs"
            if not slide.exists():
                build_large_slide(slide, args.blocks)
        size_gb = slide.stat().st_size / 1e9
        print(f"slide {slide.name}: {size_gb:.2f} GB", flush=True)
        rows = []
        gallery = None
        for workers in args.workers:
            out = tmp / f"out{workers}"
            m = run_measured(
                [sys.executable, "-m", "pipeline", "run", str(slide), "--out", str(out), "--workers",
                 str(workers), "--quiet", "--overwrite"]
            )  # fmt: skip
            if m.returncode:
                raise SystemExit(m.output)
            gallery = out / f"{slide.stem}.zarr"
            g = open_gallery(gallery)
            timings = g.attrs.get("timings_s", {})
            n = len(g)
            per_cell = _bytes_under(gallery / "images") / max(n, 1)
            rows.append((workers, m.seconds, m.cpu_seconds, m.peak_rss_mb, n, per_cell))
            print(
                f"{workers} worker(s): {m.seconds:.1f} s, {m.cpu_seconds:.1f} CPU s, {n} cells, peak RSS "
                f"{m.peak_rss_mb:.0f} MB (driver {m.peak_driver_rss_mb:.0f}), load {os.getloadavg()[0]:.1f}; "
                "stages " + ", ".join(f"{k} {v:.1f}" for k, v in timings.items()),
                flush=True,
            )
        # The same decode, best of 3 (a busy machine only ever slows it down). The strict floor is what
        # any tool cutting these crops must decode; the pipeline also decodes the wider window it
        # reads to re-centre each cell.
        floor, n_tiles = decode_floor(slide, gallery, relocation_windows=True, repeats=3)
        strict, n_strict = decode_floor(slide, gallery, relocation_windows=False, repeats=3)
    print(
        f"\nJPEG decode floor, one core (load {os.getloadavg()[0]:.1f}): overview + crops + re-centring "
        f"windows {n_tiles} tiles in {floor:.2f} s; overview + crops only {n_strict} tiles in {strict:.2f} s"
    )
    print(
        f"{'workers':>7} {'seconds':>8} {'x floor':>8} {'x strict':>9} {'CPU ms/cell':>12} "
        f"{'cells/s/core':>13} {'peak MB':>8} {'KB/cell':>8}"
    )
    for workers, seconds, cpu_s, peak, n, per_cell in rows:
        cores = max(workers, 1)
        print(
            f"{workers:>7} {seconds:>8.1f} {seconds / floor:>8.2f} {seconds / strict:>9.2f} "
            f"{cpu_s / max(n, 1) * 1e3:>12.2f} {n / seconds / cores:>13.1f} {peak:>8.0f} "
            f"{per_cell / 1024:>8.1f}"
        )


if __name__ == "__main__":
    main()
