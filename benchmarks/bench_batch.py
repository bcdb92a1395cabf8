"""Batch throughput (slides/hour) and peak memory of ``run`` on a folder of slides, by number of workers.

Usage (from the repository root)::

    python -m benchmarks.bench_batch /path/to/slides --workers 1 2
    python -m benchmarks.bench_batch --simulate 8 --size-mm 5 --folder bench-batch   # makes missing slides

Each worker count runs ``python -m pipeline run SLIDES --out OUT/workers-N --workers N --quiet`` in a
fresh process into a fresh output folder (nothing is skipped). Wall time is the whole command, cluster
start-up included; slides/hour counts the slides that finished. Memory is the peak summed RSS of the
driver and its Dask workers (sampled every 0.1 s), and of the driver alone: with the driver's share flat
from a few slides to many, the batch does not grow it.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import tempfile
from pathlib import Path

from benchmarks._measure import run_measured


def simulate_missing(folder: Path, n_slides: int, size_mm: float, preset: str) -> list[Path]:
    """``folder/batch_<i>.svs`` for i < n_slides, simulating the ones not there yet (seed = i)."""
    folder.mkdir(parents=True, exist_ok=True)
    slides = []
    for i in range(n_slides):
        slide = folder / f"batch_{i}.svs"
        if not slide.exists():
            command = [
                sys.executable, "-m", "pipeline", "simulate", str(slide), "--width-mm", str(size_mm),
                "--height-mm", str(size_mm), "--seed", str(i), "--preset", preset, "--quiet",
            ]  # fmt: skip
            measured = run_measured(command)
            if measured.returncode != 0:
                raise SystemExit(f"simulating {slide} failed:\n{measured.output}")
            print(f"simulated {slide} ({size_mm:g} x {size_mm:g} mm) in {measured.seconds:.1f} s")
        slides.append(slide)
    return slides


def bench(slides: list[str], out: Path, workers: int, where: list[str] | None = None) -> dict[str, float]:
    """One batch with ``workers`` local workers into a fresh ``out``; its measurements.

    ``where`` replaces ``--workers N`` (e.g. ``--cluster slurm --jobs 2 ...``; ``workers`` is then only
    reported).
    """
    shutil.rmtree(out, ignore_errors=True)
    command = [sys.executable, "-m", "pipeline", "run", *slides, "--out", str(out)]
    command += ["--workers", str(workers)] if where is None else where
    measured = run_measured([*command, "--quiet"])
    record_path = out / "batch.json"
    if not record_path.exists():
        raise SystemExit(f"run wrote no batch record:\n{measured.output}")
    record = json.loads(record_path.read_text())
    rows = record["slides"]
    done = [row for row in rows if row["status"] == "done"]
    return {
        "workers": workers,
        "slides": len(rows),
        "done": len(done),
        "failed": record["summary"]["failed"],
        "cells": record["summary"]["cells"],
        "seconds": measured.seconds,
        "slides_per_hour": 3600 * len(done) / measured.seconds,
        "median_slide_s": statistics.median(row["seconds"] for row in done) if done else float("nan"),
        "peak_rss_mb": measured.peak_rss_mb,
        "peak_driver_rss_mb": measured.peak_driver_rss_mb,
        "exit_code": measured.returncode,
    }


def table_row(label: str, r: dict[str, float] | None = None, width: int = 7) -> str:
    """A row of the results table (the header without ``r``)."""
    if r is None:
        return (
            f"{label:>{width}} {'slides':>6} {'done':>6} {'failed':>6} {'cells':>7} {'seconds':>8} "
            f"{'slides/h':>9} {'median s/slide':>14} {'peak RSS MB':>11} {'driver MB':>9}"
        )
    return (
        f"{label:>{width}} {r['slides']:>6} {r['done']:>6} {r['failed']:>6} {r['cells']:>7} "
        f"{r['seconds']:>8.1f} {r['slides_per_hour']:>9.0f} {r['median_slide_s']:>14.1f} "
        f"{r['peak_rss_mb']:>11.0f} {r['peak_driver_rss_mb']:>9.0f}"
    )


def add_slide_arguments(parser: argparse.ArgumentParser, size_mm: float) -> None:
    """The slides to run: given, or simulated once into a folder (``--simulate N --size-mm S``)."""
    parser.add_argument("slides", nargs="*", help="slide files, folders or globs (default: --simulate)")
    parser.add_argument("--simulate", type=int, default=8, help="slides to simulate when none are given")
    parser.add_argument("--size-mm", type=float, default=size_mm, help="side of simulated slides, mm")
    parser.add_argument("--preset", default="mll23", help="blood preset of simulated slides")
    parser.add_argument("--folder", type=Path, default=None, help="where simulated slides go (kept)")


def selected_slides(args: argparse.Namespace, tmp: Path) -> list[str]:
    """The slides of :func:`add_slide_arguments`: as given, else simulated into ``--folder`` or ``tmp``.

    Files, folders and globs are passed on as they are: ``pipeline run`` expands them, as a user's batch.
    """
    if args.slides:
        return list(args.slides)
    folder = args.folder or tmp / "slides"
    return [str(s) for s in simulate_missing(folder, args.simulate, args.size_mm, args.preset)]


def main(argv: list[str] | None = None) -> list[dict[str, float]]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_slide_arguments(parser, size_mm=5.0)
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2], help="worker counts to compare")
    parser.add_argument("--out", type=Path, default=None, help="output root (default: a temporary folder)")
    parser.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        slides = selected_slides(args, Path(tmp))
        out_root = args.out or Path(tmp) / "out"
        results = []
        print(table_row("workers"))
        for workers in args.workers:
            r = bench(slides, out_root / f"workers-{workers}", workers)
            results.append(r)
            print(table_row(str(workers), r))
    if args.json is not None:
        args.json.write_text(json.dumps(results, indent=2))
    return results


if __name__ == "__main__":
    main()
