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
    args = parser.parse_args()
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


if __name__ == "__main__":
    main()
