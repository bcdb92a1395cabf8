"""Batch throughput through SLURM worker jobs against the same batch on local workers.

Usage (from the repository root)::

    python -m benchmarks.bench_slurm --simulate 8 --size-mm 2 --folder bench-slurm --queue debug
    python -m benchmarks.bench_slurm --start-test-slurm --simulate 8 --size-mm 2   # as root, no SLURM

Runs, alternately and ``--repeat`` times each, ``python -m pipeline run SLIDES --cluster slurm --jobs 2
--cores 1`` (two single-core SLURM jobs of Dask workers) and ``run SLIDES --workers 2`` (two local
worker processes), each into a fresh output folder, and prints slides/hour (whole command wall time:
job submission, queueing and worker start-up included). ``--start-test-slurm`` first starts the
single-node SLURM the tests use (tests/slurm_cluster.py: munged, slurmctld and slurmd on this machine,
needs root and Debian's slurm packages). Peak memory counts the driver's process tree only: SLURM
workers run under slurmd, outside it.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

from benchmarks.bench_batch import add_slide_arguments, bench, selected_slides, table_row


def slurm_where(queue: str | None, memory: str) -> list[str]:
    """``run`` options for two single-core SLURM worker jobs."""
    where = ["--cluster", "slurm", "--jobs", "2", "--cores", "1", "--memory", memory]
    return [*where, "--walltime", "01:00:00", *(["--queue", queue] if queue else [])]


@contextlib.contextmanager
def started_test_slurm(root: Path) -> Iterator[str]:
    """The tests' single-node SLURM, started in ``root``; yields its partition."""
    from tests.slurm_cluster import PARTITION, SlurmCluster, unavailable_reason

    reason = unavailable_reason()
    if reason is not None:
        raise SystemExit(f"cannot start a test SLURM: {reason}")
    cluster = SlurmCluster(root, {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")})
    cluster.env["PATH"] = os.pathsep.join([cluster.env.get("PATH", ""), "/usr/sbin", "/sbin"])
    saved = os.environ.get("SLURM_CONF")
    try:
        cluster.start()
        os.environ["SLURM_CONF"] = cluster.env["SLURM_CONF"]  # for the runs' sbatch and scancel
        yield PARTITION
    finally:
        if saved is None:
            os.environ.pop("SLURM_CONF", None)
        else:
            os.environ["SLURM_CONF"] = saved
        left = cluster.stop()
        if left:
            print(f"warning: SLURM processes left: {left}")


def main(argv: list[str] | None = None) -> list[dict[str, float]]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_slide_arguments(parser, size_mm=2.0)
    parser.add_argument("--queue", default=None, help="SLURM partition (default: the site's default)")
    parser.add_argument("--memory", default="3GB", help="memory per SLURM job")
    parser.add_argument("--repeat", type=int, default=1, help="runs of each, alternating")
    parser.add_argument("--start-test-slurm", action="store_true", help="start the tests' SLURM (root)")
    parser.add_argument("--out", type=Path, default=None, help="output root (default: a temporary folder)")
    parser.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = parser.parse_args(argv)
    results = []
    with tempfile.TemporaryDirectory() as tmp, contextlib.ExitStack() as stack:
        slides = selected_slides(args, Path(tmp))
        queue = args.queue
        if args.start_test_slurm:
            queue = stack.enter_context(started_test_slurm(Path(tmp) / "slurm"))
        out_root = args.out or Path(tmp) / "out"
        ways = {"slurm 2 x 1 core": slurm_where(queue, args.memory), "local --workers 2": None}
        print(table_row("how", width=18))
        for _ in range(args.repeat):
            for how, where in ways.items():
                r = bench(slides, out_root / how.split()[0], 2, where)
                results.append({**r, "how": how})
                print(table_row(how, r, width=18))
    if args.json is not None:
        args.json.write_text(json.dumps(results, indent=2))
    return results


if __name__ == "__main__":
    main()
