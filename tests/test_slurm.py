"""Cluster runs on a real single-node SLURM (see tests/slurm_cluster.py): both ways users run on SLURM.

1. ``run --cluster slurm``: the driver submits Dask workers as SLURM jobs (dask-jobqueue). Tested: a batch
   with a corrupt slide; ``scancel`` of a worker job mid-run; a walltime shorter than the run; SIGTERM and
   Ctrl-C of the driver.
2. The whole run inside SLURM jobs: one allocation (``examples/slurm/run-in-allocation.sbatch``) and a job
   array over a list of slides writing into one OUT/ (``examples/slurm/array.sbatch``).

Every run is a ``python -m pipeline`` subprocess, as a user starts it; galleries are compared with a clean
in-process run of the same slide. Select these tests with ``-m slurm``.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from pipeline import cli
from pipeline.gallery import is_complete, open_gallery
from tests.slurm_cluster import SlurmCluster

pytestmark = [pytest.mark.slurm, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[1]
SAMPLE = REPO / "sample_data" / "sample_mll23.svs"
EXAMPLES = REPO / "examples" / "slurm"
#: Small overview tiles: more tasks per slide, so that a worker lost mid-run is always busy.
RUN_OPTIONS = ["--tile-px", "256", "--quiet"]
#: The shortest SLURM time limit (SLURM counts whole minutes).
SHORT_WALLTIME = "00:01:00"
WALLTIME_S = 60.0
#: Copies of the sample slide in the walltime test: 1.8 s of work each on one core of a quiet machine
#: (measured: 18 took 33 s), 3-8 s under load; more in all than the walltime (60 s) even on a quiet
#: machine, so that the first worker's lifetime (at most 45 s) runs out and a replacement must finish.
WALLTIME_SLIDES = 36
RUN_TIMEOUT_S = 420.0


# ------------------------------------------------------------------------------------------ slides
@pytest.fixture(scope="module")
def tiny_svs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 0.6 x 0.6 mm simulated slide (about 30 white cells): a few seconds of work."""
    from pipeline.simulate import simulate_slide

    folder = tmp_path_factory.mktemp("slurm-slides")
    result = simulate_slide(
        folder / "tiny.svs", width_mm=0.6, height_mm=0.6, seed=41, preset="aml", placement="monolayer",
        workers=0, progress=False,
    )  # fmt: skip
    return Path(result.slide_path)


@pytest.fixture(scope="module")
def clean(tiny_svs: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Galleries of a clean in-process run (no cluster) of the tiny slide and the sample slide."""
    out = tmp_path_factory.mktemp("slurm-clean")
    assert (
        cli.main(["run", str(tiny_svs), str(SAMPLE), "--out", str(out), "--workers", "0", *RUN_OPTIONS]) == 0
    )
    return {"tiny": out / "tiny.zarr", "sample": out / "sample_mll23.zarr"}


def copies(source: Path, folder: Path, names: list[str]) -> list[Path]:
    """Hard links of ``source`` under other names: distinct slides to the pipeline, no bytes copied."""
    folder.mkdir(parents=True, exist_ok=True)
    made = []
    for name in names:
        path = folder / f"{name}{source.suffix}"
        try:
            os.link(source, path)
        except OSError:  # another file system
            shutil.copyfile(source, path)
        made.append(path)
    return made


def assert_same_gallery(got: Path, clean: Path) -> None:
    assert is_complete(got), got
    a, b = open_gallery(got), open_gallery(clean)
    assert len(a) == len(b) > 0
    assert np.array_equal(np.asarray(a.images[:]), np.asarray(b.images[:]))
    pd.testing.assert_frame_equal(a.cells, b.cells)
    pd.testing.assert_frame_equal(a.candidates, b.candidates)


def assert_nothing_unfinished(out: Path) -> None:
    left = [p.name for p in out.iterdir() if p.name.endswith((".partial", ".lock", ".break"))]
    assert not left, left


def record(out: Path) -> dict[str, dict]:
    return {Path(row["slide"]).name: row for row in json.loads((out / "batch.json").read_text())["slides"]}


# ---------------------------------------------------------------------------------------- running
def slurm_env(slurm: SlurmCluster) -> dict[str, str]:
    """The cluster's environment, with this checkout first on the path of the driver and of the jobs
    (sbatch passes the submitting environment on)."""
    env = dict(slurm.env)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH", "")) if p)
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env["PATH"]])
    return env


def start_run(
    slurm: SlurmCluster,
    slides: list[Path],
    out: Path,
    *,
    jobs: int,
    walltime: str = "00:10:00",
    dask: dict[str, str] | None = None,
) -> subprocess.Popen:
    """``python -m pipeline run SLIDES --cluster slurm`` with single-core worker jobs, in the background
    (``dask``: extra ``DASK_*`` configuration variables)."""
    command = [
        sys.executable, "-m", "pipeline", "run", *map(str, slides), "--out", str(out), "--cluster", "slurm",
        "--jobs", str(jobs), "--cores", "1", "--memory", "2GB", "--walltime", walltime, "--queue", "debug",
        *RUN_OPTIONS,
    ]  # fmt: skip
    return subprocess.Popen(
        command,
        # Ctrl-C as from a terminal: the driver must not inherit an ignored SIGINT (a shell ignores it
        # in its background jobs, and pytest may be one)
        preexec_fn=_default_sigint,
        env={**slurm_env(slurm), **(dask or {})},
        cwd=out.parent,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def _default_sigint() -> None:
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def finish(proc: subprocess.Popen, timeout_s: float = RUN_TIMEOUT_S) -> tuple[int, str, str]:
    try:
        stdout, stderr = proc.communicate(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        proc.kill()
        stdout, stderr = proc.communicate()
        raise AssertionError(f"the run did not end within {timeout_s:.0f} s\n{stdout}\n{stderr}") from None
    return proc.returncode, stdout, stderr


def new_jobs(slurm: SlurmCluster, before: set[str]) -> dict[str, dict[str, str]]:
    """Jobs that ended since ``before`` (ids), once the queue is empty: id -> jobcomp record."""
    slurm.wait_until("the worker jobs to end", lambda: not slurm.queue())
    return {job: rec for job, rec in slurm.finished().items() if job not in before}


def seconds(job: dict[str, str]) -> float:
    start, end = (datetime.fromisoformat(job[k]) for k in ("StartTime", "EndTime"))
    return (end - start).total_seconds()


@pytest.fixture
def slurm(slurm_cluster: SlurmCluster) -> Iterator[SlurmCluster]:
    """The session's SLURM with an empty queue, emptied again after the test."""
    slurm_cluster.clear()
    yield slurm_cluster
    slurm_cluster.clear()


# ------------------------------------------------------------------------------ --cluster slurm
def test_batch_with_a_corrupt_slide(slurm, tiny_svs, clean, tmp_path):
    good = copies(tiny_svs, tmp_path / "slides", ["good1", "good2"])
    corrupt = tmp_path / "slides" / "cut.svs"
    corrupt.write_bytes(tiny_svs.read_bytes()[: tiny_svs.stat().st_size // 3])
    before = set(slurm.finished())
    out = tmp_path / "out"
    code, _, stderr = finish(start_run(slurm, [*good, corrupt], out, jobs=2))
    assert code == 1, stderr
    for slide in good:
        assert_same_gallery(out / f"{slide.stem}.zarr", clean["tiny"])
    assert not (out / "cut.zarr").exists()
    rows = record(out)
    assert [rows[name]["status"] for name in ("good1.svs", "good2.svs", "cut.svs")] == [
        "done",
        "done",
        "failed",
    ]
    assert "truncated" in rows["cut.svs"]["error"] and "truncated" in stderr
    assert_nothing_unfinished(out)
    jobs = new_jobs(slurm, before)
    # two single-core worker jobs ran the batch, and the driver cancelled them at the end
    assert len(jobs) == 2 and {j["JobState"] for j in jobs.values()} == {"CANCELLED"}, jobs
    assert {j["Partition"] for j in jobs.values()} == {"debug"}
    assert all("cpu=1" in j["Tres"] for j in jobs.values())
    assert list((out / "logs" / "slurm").glob("*.err")) or list((out / "logs" / "slurm").glob("*.out"))


def test_scancel_of_a_worker_job_is_replaced(slurm, clean, tmp_path):
    slides = copies(SAMPLE, tmp_path / "slides", ["s1", "s2", "s3", "s4"])
    before = set(slurm.finished())
    out = tmp_path / "out"
    # Dask notices a lost worker at once, and gives it lost-worker-timeout (15 s) to come back before
    # adapt starts another job in its place: shortened here, so the run need not be long.
    proc = start_run(slurm, slides, out, jobs=2, dask={"DASK_DISTRIBUTED__DEPLOY__LOST_WORKER_TIMEOUT": "2s"})
    try:
        # mid-run: both workers have joined and slides are being written
        slurm.wait_until("2 running worker jobs", lambda: len(slurm.running()) == 2, timeout_s=60)
        wait_for_a_draft(slurm, proc, out)
        running = sorted(slurm.running(), key=lambda job: int(job["id"]))
        victim = running[0]["id"]
        slurm.command("scancel", victim)
        replaced = slurm.wait_until(
            "a replacement job",
            lambda: (
                [j for j in slurm.queue() if int(j["id"]) > int(running[-1]["id"])] or proc.poll() is not None
            ),
            timeout_s=60,
        )
        code, _, stderr = finish(proc)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert replaced is not True, "the run ended without replacing the cancelled job"
    assert code == 0, stderr
    for slide in slides:
        assert_same_gallery(out / f"{slide.stem}.zarr", clean["sample"])
    assert [row["status"] for row in record(out).values()] == ["done"] * 4
    assert_nothing_unfinished(out)
    jobs = new_jobs(slurm, before)
    assert jobs[victim]["JobState"] == "CANCELLED"
    assert len(jobs) == 3, jobs


def wait_for_a_draft(slurm: SlurmCluster, proc: subprocess.Popen, out: Path) -> None:
    """Until a slide's gallery is being written (its hidden draft exists): workers are busy."""
    slurm.wait_until(
        "a gallery draft",
        lambda: proc.poll() is not None or any(p.name.endswith(".partial") for p in _listing(out)),
        timeout_s=120,
        every_s=0.05,
    )
    assert proc.poll() is None, f"the run ended before it could be disturbed: {proc.communicate()}"


def test_workers_leave_before_a_short_walltime_and_replacements_finish(slurm, clean, tmp_path):
    # One single-core job with SLURM's shortest time limit, and a run longer than that: its worker
    # retires before the limit (--lifetime), and new jobs take over until the batch is done. Between a
    # worker leaving and its replacement starting, Dask's lost-worker-timeout (15 s) passes idle.
    slides = copies(SAMPLE, tmp_path / "slides", [f"w{i}" for i in range(WALLTIME_SLIDES)])
    before = set(slurm.finished())
    out = tmp_path / "out"
    started = time.monotonic()
    proc = start_run(slurm, slides, out, jobs=1, walltime=SHORT_WALLTIME)
    code, _, stderr = finish(proc)
    run_s = time.monotonic() - started
    assert code == 0, stderr
    for slide in slides:
        assert_same_gallery(out / f"{slide.stem}.zarr", clean["sample"])
    jobs = new_jobs(slurm, before)
    states = {job: rec["JobState"] for job, rec in jobs.items()}
    durations = ", ".join(f"{seconds(jobs[j]):.0f}" for j in sorted(jobs, key=int))
    print(f"{len(slides)} slides: run {run_s:.0f} s, jobs of {durations} s")
    assert run_s > WALLTIME_S, f"the run ({run_s:.0f} s) must outlast the walltime; give it more slides"
    assert "TIMEOUT" not in states.values(), states  # no worker was killed by SLURM
    # every job but the last (cancelled by the driver at the end) lost its worker to --lifetime before
    # its walltime; the driver cancels such a job if its nanny has not ended it yet
    ids = sorted(jobs, key=int)
    assert len(ids) >= 2, states
    for job in ids[:-1]:
        log = _text(out / "logs" / "slurm" / f"dask-worker-{job}.err")
        assert "Reason: worker-lifetime-reached" in log, log
        assert states[job] in ("COMPLETED", "CANCELLED") and seconds(jobs[job]) < WALLTIME_S, jobs[job]
    assert states[ids[-1]] in ("CANCELLED", "COMPLETED")


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "Ctrl-C"])
def test_stopping_the_driver_cancels_the_jobs_and_leaves_nothing_unfinished(slurm, tmp_path, signum):
    slides = copies(SAMPLE, tmp_path / "slides", ["a", "b"])
    before = set(slurm.finished())
    out = tmp_path / "out"
    proc = start_run(slurm, slides, out, jobs=2)
    try:
        slurm.wait_until("2 running worker jobs", lambda: len(slurm.running()) == 2, timeout_s=60)
        wait_for_a_draft(slurm, proc, out)
        proc.send_signal(signum)
        code, _, stderr = finish(proc, timeout_s=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert code == 130, stderr
    assert "interrupted" in stderr
    jobs = new_jobs(slurm, before)  # the queue empties
    assert len(jobs) == 2 and {j["JobState"] for j in jobs.values()} == {"CANCELLED"}, jobs
    assert_nothing_unfinished(out)
    assert not [p for p in out.glob("*.zarr") if not is_complete(p)]


def _text(path: Path) -> str:
    try:
        return path.read_text()
    except OSError:
        return ""


def _listing(folder: Path) -> list[Path]:
    try:
        return list(folder.iterdir())
    except OSError:
        return []


# ----------------------------------------------------------------------- the run inside SLURM jobs
def sbatch(slurm: SlurmCluster, *argv: str, cwd: Path) -> str:
    """Submit with the environment a user's shell would pass on; the job id."""
    done = subprocess.run(
        ["sbatch", "--parsable", *argv],
        env=slurm_env(slurm),
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert done.returncode == 0, done.stderr
    return done.stdout.strip().split(";")[0]


def test_the_whole_run_in_one_allocation(slurm, tiny_svs, clean, tmp_path):
    slides = copies(tiny_svs, tmp_path / "slides", ["x1", "x2"])
    before = set(slurm.finished())
    out = tmp_path / "out"
    job = sbatch(
        slurm, "--cpus-per-task=2", "--mem=4G", "--time=00:10:00", "--output=alloc-%j.out",
        str(EXAMPLES / "run-in-allocation.sbatch"), str(out), *map(str, slides), cwd=tmp_path,
    )  # fmt: skip
    slurm.wait_until("the allocation to end", lambda: not slurm.queue(), timeout_s=RUN_TIMEOUT_S, every_s=0.5)
    jobs = new_jobs(slurm, before)
    log = _text(tmp_path / f"alloc-{job}.out")
    assert jobs[job]["JobState"] == "COMPLETED", log
    for slide in slides:
        assert_same_gallery(out / f"{slide.stem}.zarr", clean["tiny"])
    assert [row["status"] for row in record(out).values()] == ["done", "done"]
    assert "2 workers" in (out / "batch.log").read_text()  # --workers $SLURM_CPUS_PER_TASK


def test_a_job_array_over_a_slide_list_writes_one_out(slurm, tiny_svs, clean, tmp_path):
    slides = copies(tiny_svs, tmp_path / "slides", [f"a{i}" for i in range(8)])
    listing = tmp_path / "slides.txt"
    listing.write_text("".join(f"{s}\n" for s in slides))
    before = set(slurm.finished())
    out = tmp_path / "out"
    job = sbatch(
        slurm, "--array=0-3", "--cpus-per-task=1", "--mem=2G", "--time=00:10:00", "--output=array-%A_%a.out",
        str(EXAMPLES / "array.sbatch"), str(listing), str(out), cwd=tmp_path,
    )  # fmt: skip
    slurm.wait_until("the array to end", lambda: not slurm.queue(), timeout_s=RUN_TIMEOUT_S, every_s=0.5)
    jobs = new_jobs(slurm, before)
    logs = "\n".join(p.read_text() for p in sorted(tmp_path.glob(f"array-{job}_*.out")))
    assert len(jobs) == 4 and {j["JobState"] for j in jobs.values()} == {"COMPLETED"}, (jobs, logs)
    assert logs.count("2 slide(s)") == 4, logs
    for slide in slides:
        assert_same_gallery(out / f"{slide.stem}.zarr", clean["tiny"])
    rows = record(out)
    assert sorted(rows) == sorted(s.name for s in slides)
    assert {row["status"] for row in rows.values()} == {"done"}
    cells = len(open_gallery(clean["tiny"]))
    assert all(row["cells"] == cells for row in rows.values())
    summary = json.loads((out / "batch.json").read_text())["summary"]
    assert summary == {"slides": 8, "done": 8, "skipped": 0, "failed": 0, "cells": 8 * cells}
    assert len(pd.read_csv(out / "batch.csv")) == 8
    assert_nothing_unfinished(out)
