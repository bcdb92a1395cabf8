"""Simulator throughput (Mpx/s of level 0) and peak memory of the whole process tree, by slide size.

Usage (from the repository root)::

    python -m benchmarks.bench_simulate --sizes 5 10 --workers 2

Each size runs ``python -m pipeline simulate`` in a fresh process; memory is the peak summed RSS of the
driver, the server local workers are forked from and the Dask workers, sampled every 0.1 s (pages a
worker shares with that server count in both). Flat memory from 5 x 5 to 10 x 10 mm shows that
rendering streams tile by tile (target: under 1.5 GB for 20 x 20 mm).

Throughput per core is given two ways: wall-clock Mpx/s divided by the workers (the target, >= 20 Mpx/s
per core with 2 workers, holds on an otherwise idle machine), and Mpx per CPU-second of the whole
process tree (driver, scheduler and workers: start-up, rendering, JPEG, pyramid), which other load on a
shared machine does not change much.

``--in-process`` renders every chunk of the same slide in this one process instead, as a worker does
(render, JPEG tiles, 4x reduction; no Dask, no file), and prints the CPU milliseconds per chunk and a
digest of the encoded tiles (in slide order, so it does not depend on the chunk size): the render's own
cost, steadier than a whole run on a shared machine, and the digest tells whether two checkouts draw
the same slide. To compare another checkout, run this file with that checkout's package, alternately::

    PYTHONPATH=. python -m benchmarks.bench_simulate --sizes 5 --in-process
    PYTHONPATH=/path/to/other python benchmarks/bench_simulate.py --sizes 5 --in-process
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

from benchmarks._measure import run_measured


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=float, nargs="+", default=[5.0, 10.0], help="square slide sides, mm")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--preset", default="normal")
    parser.add_argument("--mpp", type=float, default=0.25)
    parser.add_argument("--chunk-px", type=int, default=1024, help="render chunk side (simulate --chunk-px)")
    parser.add_argument("--in-process", action="store_true", help="render the chunks in this process")
    parser.add_argument("--every", type=int, default=1, help="with --in-process: every n-th chunk only")
    args = parser.parse_args()
    if args.in_process:
        for size in args.sizes:
            _render_in_process(size, args)
        return
    print(
        f"{'size':>9} {'Mpx':>8} {'seconds':>8} {'Mpx/s':>7} {'per core':>8} {'CPU s':>7} {'Mpx/CPU-s':>9} "
        f"{'peak RSS MB':>12} {'driver MB':>10}"
    )
    with tempfile.TemporaryDirectory() as tmp:
        for size in args.sizes:
            out = Path(tmp) / f"bench_{size:g}mm.svs"
            command = [
                sys.executable, "-m", "pipeline", "simulate", str(out),
                "--width-mm", str(size), "--height-mm", str(size), "--seed", "1",
                "--preset", args.preset, "--mpp", str(args.mpp), "--workers", str(args.workers),
                "--chunk-px", str(args.chunk_px), "--quiet",
            ]  # fmt: skip
            measured = run_measured(command)
            if measured.returncode != 0:
                print(measured.output)
                raise SystemExit(f"simulate failed for {size} mm")
            mpx = (size * 1000 / args.mpp) ** 2 / 1e6
            rate = mpx / measured.seconds
            per_cpu = mpx / max(measured.cpu_seconds, 1e-9)
            print(
                f"{size:>6g} mm {mpx:>8.0f} {measured.seconds:>8.1f} {rate:>7.1f} "
                f"{rate / max(1, args.workers):>8.1f} {measured.cpu_seconds:>7.1f} {per_cpu:>9.1f} "
                f"{measured.peak_rss_mb:>12.0f} {measured.peak_driver_rss_mb:>10.0f}"
            )
            out.unlink(missing_ok=True)


def _render_in_process(size_mm: float, args: argparse.Namespace) -> None:
    """CPU ms per chunk of rendering a slide's chunks in this process, and a digest of their tiles."""
    import hashlib
    import math
    import time

    import cv2

    from pipeline.simulate.presets import get_preset, parse_artefacts
    from pipeline.simulate.render import SlideModel, render_region
    from pipeline.simulate.scene import SceneSpec
    from pipeline.simulate.svs import TILE_PX, encode_tile

    cv2.setNumThreads(1)  # as in a worker
    side_px = round(size_mm * 1000.0 / args.mpp)
    spec = SceneSpec(
        side_px, side_px, args.mpp, 1, get_preset(args.preset), "monolayer", parse_artefacts("all")
    )
    model = SlideModel(spec)
    padded = math.ceil(side_px / TILE_PX) * TILE_PX
    step = args.chunk_px
    chunks = [(x0, y0) for y0 in range(0, padded, step) for x0 in range(0, padded, step)][:: args.every]
    tiles: dict[tuple[int, int], bytes] = {}
    started = time.process_time()
    for x0, y0 in chunks:
        w, h = min(step, padded - x0), min(step, padded - y0)
        rgb = render_region(model, x0, y0, w, h).rgb
        for ty in range(0, h, TILE_PX):
            for tx in range(0, w, TILE_PX):
                tile = encode_tile(rgb[ty : ty + TILE_PX, tx : tx + TILE_PX])
                tiles[y0 + ty, x0 + tx] = hashlib.sha256(tile).digest()
        cv2.resize(rgb, (w // 4, h // 4), interpolation=cv2.INTER_AREA)
    cpu_ms = 1000.0 * (time.process_time() - started) / len(chunks)
    digest = hashlib.sha256(b"".join(tiles[key] for key in sorted(tiles)))
    print(
        f"{size_mm:g} mm, {len(chunks)} chunks of {step} px in one process: {cpu_ms:.2f} CPU-ms per chunk, "
        f"tiles digest {digest.hexdigest()[:16]}"
    )


if __name__ == "__main__":
    main()
