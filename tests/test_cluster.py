"""Batch runs on a real Dask cluster (scheduler and worker processes on 127.0.0.1), and SLURM options.

The cluster tests start ``dask scheduler`` and two ``dask worker`` processes, then run the ``run`` command
against them: a batch with a truncated slide in it, a re-run that must skip what is finished, and a run
during which one worker process is killed. The SLURM tests here check the mapping of options to
``SLURMCluster`` arguments and the job script dask-jobqueue generates from them; runs on a real SLURM are
in tests/test_slurm.py.
"""

from __future__ import annotations

import contextlib
import importlib
import io
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from pipeline import cli
from pipeline.engine import SlurmOptions, compute_client, slurm_cluster_kwargs, walltime_seconds
from pipeline.errors import ParameterError, PipelineError
from pipeline.gallery import is_complete, open_gallery

pytestmark = pytest.mark.slow

#: Task name prefixes of the per-tile and per-shard stages (submitted by pipeline.engine.ordered_map).
TILE_TASKS = ("_detect_tile", "_cells_task", "_shard_task")
#: Small overview tiles so that a 0.6 mm slide makes 9 detection tasks (several per worker).
RUN_OPTIONS = ["--tile-px", "256", "--quiet"]
START_TIMEOUT_S = 60.0
#: A re-run that skips every finished slide passes if it is under half the first run or under this.
RERUN_MAX_SECONDS = 5.0


# ------------------------------------------------------------------------------- cluster fixture
@dataclass
class DaskProcesses:
    """A scheduler and its worker processes, each in its own process group (so a kill takes the
    nanny and the worker it started)."""

    scheduler_file: Path
    logs: Path
    scheduler: subprocess.Popen
    workers: dict[str, subprocess.Popen]

    def start_worker(self, name: str) -> None:
        command = [
            sys.executable, "-m", "distributed.cli.dask_worker", "--scheduler-file", str(self.scheduler_file),
            "--name", name, "--nworkers", "1", "--nthreads", "1", "--memory-limit", "2GiB",
            "--no-dashboard", "--local-directory", str(self.logs / name),
        ]  # fmt: skip
        with open(self.logs / f"{name}.log", "ab") as log:
            self.workers[name] = subprocess.Popen(
                command, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
            )

    def kill_worker(self, name: str) -> None:
        """SIGKILL a worker's whole process group (nanny and worker): no goodbye to the scheduler."""
        proc = self.workers.pop(name)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)

    def client(self):  # -> distributed.Client
        from distributed import Client

        return Client(scheduler_file=str(self.scheduler_file), timeout=START_TIMEOUT_S)

    def ensure_workers(self, n: int) -> None:
        """Start workers until ``n`` are alive and wait for them to join."""
        for name, proc in list(self.workers.items()):
            if proc.poll() is not None:
                del self.workers[name]
        index = 0
        while len(self.workers) < n:
            while f"w{index}" in self.workers:
                index += 1
            self.start_worker(f"w{index}")
        with self.client() as client:
            client.wait_for_workers(n, timeout=START_TIMEOUT_S)
            # as on a long-lived cluster, workers have imported the pipeline before the timed runs
            client.run(importlib.import_module, "pipeline.runner")
            deadline = time.monotonic() + START_TIMEOUT_S
            # the scheduler forgets killed workers a moment after their connection drops
            while len(client.scheduler_info()["workers"]) != n:
                assert time.monotonic() < deadline, "the scheduler still lists a killed worker"
                time.sleep(0.1)

    def close(self) -> None:
        for proc in [*self.workers.values(), self.scheduler]:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGTERM)
        for proc in [*self.workers.values(), self.scheduler]:
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=10)


@pytest.fixture(scope="module")
def dask_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DaskProcesses]:
    """``dask scheduler`` on 127.0.0.1 (a free port) with two single-threaded ``dask worker`` processes."""
    root = tmp_path_factory.mktemp("dask")
    scheduler_file = root / "scheduler.json"
    command = [
        sys.executable, "-m", "distributed.cli.dask_scheduler", "--host", "127.0.0.1", "--port", "0",
        "--scheduler-file", str(scheduler_file), "--no-dashboard",
    ]  # fmt: skip
    with open(root / "scheduler.log", "ab") as log:
        scheduler = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    cluster = DaskProcesses(scheduler_file, root, scheduler, {})
    try:
        deadline = time.monotonic() + START_TIMEOUT_S
        while not _scheduler_file_ready(scheduler_file):
            assert scheduler.poll() is None, (root / "scheduler.log").read_text()
            assert time.monotonic() < deadline, "dask scheduler did not start"
            time.sleep(0.1)
        cluster.ensure_workers(2)
        yield cluster
    finally:
        cluster.close()


def _scheduler_file_ready(path: Path) -> bool:
    try:
        return "address" in json.loads(path.read_text())
    except (OSError, ValueError):
        return False


# --------------------------------------------------------------------------------- batch fixture
@pytest.fixture(scope="module")
def batch_slides(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    """Two good simulated slides (0.6 x 0.6 mm) and a truncated copy of the first."""
    from pipeline.simulate import simulate_slide

    folder = tmp_path_factory.mktemp("batch-slides")
    good = []
    for seed, name in ((41, "good1"), (42, "good2")):
        result = simulate_slide(
            folder / f"{name}.svs", width_mm=0.6, height_mm=0.6, seed=seed, preset="aml",
            placement="monolayer", workers=0, progress=False,
        )  # fmt: skip
        good.append(Path(result.slide_path))
    data = good[0].read_bytes()
    bad = folder / "cut.svs"
    bad.write_bytes(data[: len(data) // 3])
    return [*good, bad]


@dataclass(frozen=True)
class CliRun:
    code: int
    seconds: float
    stdout: str
    stderr: str


def run_cli(argv: list[str]) -> CliRun:
    """``python -m pipeline ARGV`` in this process (imports are paid once, so times compare)."""
    out, err = io.StringIO(), io.StringIO()
    started = time.perf_counter()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = cli.main(argv)
    return CliRun(code, time.perf_counter() - started, out.getvalue(), err.getvalue())


@pytest.fixture(scope="module")
def first_batch(dask_cluster, batch_slides, tmp_path_factory) -> tuple[Path, CliRun]:
    """Two good slides and a truncated one, run against the external scheduler."""
    dask_cluster.ensure_workers(2)
    out = tmp_path_factory.mktemp("first-batch")
    return out, run_cli(_batch_argv(batch_slides, out, dask_cluster))


def _batch_argv(slides: list[Path], out: Path, dask_cluster) -> list[str]:
    """``run`` of the slides against the external scheduler, with the test's options."""
    return [
        "run",
        *map(str, slides),
        "--out",
        str(out),
        "--scheduler",
        str(dask_cluster.scheduler_file),
        *RUN_OPTIONS,
    ]


def _record(out: Path) -> dict[str, dict]:
    return {Path(row["slide"]).name: row for row in json.loads((out / "batch.json").read_text())["slides"]}


# ------------------------------------------------------------------------------------------ tests
def test_batch_on_external_scheduler_isolates_a_truncated_slide(first_batch, batch_slides):
    out, run = first_batch
    assert run.code == 1, run.stderr
    for slide in batch_slides[:2]:
        assert is_complete(out / f"{slide.stem}.zarr")
        assert len(open_gallery(out / f"{slide.stem}.zarr")) > 0
        assert (out / "logs" / f"{slide.stem}.log").read_text().rstrip().endswith("end done")
    assert not (out / "cut.zarr").exists()
    assert not list(out.glob(".*.partial"))
    rows = _record(out)
    assert [rows[s.name]["status"] for s in batch_slides] == ["done", "done", "failed"]
    assert rows["good1.svs"]["cells"] == len(open_gallery(out / "good1.zarr"))
    assert "truncated" in rows["cut.svs"]["error"]
    assert "\n" not in rows["cut.svs"]["error"]
    assert "error: " in run.stderr and "truncated" in run.stderr
    summary = json.loads((out / "batch.json").read_text())["summary"]
    assert (summary["done"], summary["failed"]) == (2, 1)
    csv = pd.read_csv(out / "batch.csv", keep_default_na=False)
    assert list(csv["status"]) == ["done", "done", "failed"]
    assert "2 workers" in (out / "batch.log").read_text()


def _snapshot(out: Path, stems: list[str]) -> dict[str, tuple[int, int, int]]:
    """Inode, mtime and size of every file and folder a finished slide wrote."""
    paths: list[Path] = []
    for stem in stems:
        gallery = out / f"{stem}.zarr"
        paths += [gallery, *gallery.rglob("*"), out / f"{stem}.overview.png", out / f"{stem}.contact.png"]
    return {str(p): (p.stat().st_ino, p.stat().st_mtime_ns, p.stat().st_size) for p in paths}


def test_rerun_skips_finished_galleries_and_is_fast(dask_cluster, first_batch, batch_slides):
    out, first = first_batch
    stems = [s.stem for s in batch_slides[:2]]
    before = _snapshot(out, stems)
    dask_cluster.ensure_workers(2)
    again = run_cli(_batch_argv(batch_slides, out, dask_cluster))
    assert again.code == 1  # the truncated slide is tried again, and fails again
    assert _snapshot(out, stems) == before
    rows = _record(out)
    assert [rows[s.name]["status"] for s in batch_slides] == ["skipped", "skipped", "failed"]
    assert rows["good2.svs"]["cells"] == len(open_gallery(out / "good2.zarr"))
    assert "skipped" in again.stdout
    print(f"first run {first.seconds:.2f} s, re-run {again.seconds:.2f} s")
    # A re-run only opens the slides and checks the galleries. On a loaded 2-core machine the first run
    # may itself be quick (small slides), so the ratio alone could fail for no fault of the re-run: an
    # absolute bound, far below what processing two slides costs, is accepted instead.
    assert again.seconds < 0.5 * first.seconds or again.seconds < RERUN_MAX_SECONDS, (
        first.seconds,
        again.seconds,
    )


def test_killing_a_worker_mid_run_still_gives_the_clean_gallery(
    dask_cluster, first_batch, batch_slides, tmp_path
):
    clean_out, _ = first_batch
    dask_cluster.ensure_workers(2)
    out = tmp_path / "out"
    command = [
        sys.executable, "-m", "pipeline", "run", *map(str, batch_slides[:2]), "--out", str(out),
        "--scheduler", str(dask_cluster.scheduler_file), *RUN_OPTIONS,
    ]  # fmt: skip
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        with dask_cluster.client() as client:
            victim, task = _wait_for_a_busy_worker(client, proc)
            names = {addr: info["name"] for addr, info in client.scheduler_info()["workers"].items()}
            assert proc.poll() is None, "the run ended before a worker could be killed"
            dask_cluster.kill_worker(names[victim])
            print(f"killed {names[victim]} while it ran {task}")
            stdout, stderr = proc.communicate(timeout=180)
            assert len(client.scheduler_info()["workers"]) == 1  # the killed one never came back
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, f"killed {victim} while it ran {task}\n{stdout}\n{stderr}"
    for slide in batch_slides[:2]:
        got, clean = open_gallery(out / f"{slide.stem}.zarr"), open_gallery(clean_out / f"{slide.stem}.zarr")
        assert len(got) == len(clean) > 0
        assert np.array_equal(np.asarray(got.images[:]), np.asarray(clean.images[:]))
        pd.testing.assert_frame_equal(got.cells, clean.cells)
        pd.testing.assert_frame_equal(got.candidates, clean.candidates)


def _wait_for_a_busy_worker(client, proc: subprocess.Popen, timeout_s: float = 120.0) -> tuple[str, str]:
    """The address of a worker running a tile or shard task of the run (so earlier tasks are done)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        for address, keys in client.processing().items():
            for key in keys:
                name = key if isinstance(key, str) else str(key)
                if name.startswith(TILE_TASKS):
                    return address, name
        if proc.poll() is not None:
            raise AssertionError(f"the run ended before any tile task was seen: {proc.communicate()}")
        time.sleep(0.02)
    raise AssertionError("no tile task seen on the cluster")


# ------------------------------------------------------------------------------------ connection
def test_unknown_scheduler_file_is_a_one_line_error(tmp_path, capsys):
    code = cli.main(["run", str(tmp_path / "a.svs"), "--out", str(tmp_path), "--scheduler", "nope.json"])
    assert code == 1
    assert "no such scheduler file" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------ SLURM
SLURM_CONFIG_DEFAULTS = {"walltime": "00:30:00", "log-directory": None, "worker-extra-args": []}


def test_slurm_options_map_to_cluster_kwargs():
    options = SlurmOptions(
        jobs=3, cores=4, memory="16GB", walltime="02:00:00", queue="short", account="haem",
        local_directory="/scratch/me",
    )  # fmt: skip
    kwargs = slurm_cluster_kwargs(
        options, config=SLURM_CONFIG_DEFAULTS, default_log_directory="OUT/logs/slurm"
    )
    assert kwargs["cores"] == 4 and kwargs["processes"] == 4  # one single-threaded worker per core
    assert kwargs["memory"] == "16GB"
    assert (kwargs["walltime"], kwargs["queue"], kwargs["account"]) == ("02:00:00", "short", "haem")
    assert kwargs["local_directory"] == "/scratch/me"
    assert kwargs["log_directory"] == "OUT/logs/slurm"
    extra = kwargs["worker_extra_args"]
    lifetime_s = int(extra[extra.index("--lifetime") + 1].rstrip("s"))
    stagger_s = int(extra[extra.index("--lifetime-stagger") + 1].rstrip("s"))
    # workers leave before the job is killed, even the latest of the staggered ones
    assert 0 < lifetime_s + stagger_s < 7200
    assert lifetime_s >= 6000


def test_slurm_options_left_unset_come_from_dask_config():
    config = {
        "cores": 8, "memory": "32GB", "processes": 2, "walltime": "01:00:00", "queue": "gpu",
        "log-directory": "/logs", "worker-extra-args": ["--lifetime", "50m"],
    }  # fmt: skip
    kwargs = slurm_cluster_kwargs(SlurmOptions(jobs=2), config=config, default_log_directory="OUT/logs/slurm")
    # nothing passed: SLURMCluster reads these from the same configuration
    for name in ("cores", "memory", "processes", "walltime", "queue", "log_directory", "worker_extra_args"):
        assert name not in kwargs
    explicit = slurm_cluster_kwargs(SlurmOptions(cores=2, queue="short"), config=config)
    assert explicit["cores"] == 2 and explicit["queue"] == "short"
    assert "processes" not in explicit  # the configuration's processes stand


def test_slurm_options_read_the_live_dask_config():
    import dask.config

    with dask.config.set({"jobqueue.slurm.cores": 6, "jobqueue.slurm.memory": "12GB"}):
        kwargs = slurm_cluster_kwargs(SlurmOptions())
    assert kwargs["processes"] == 6 and "memory" not in kwargs


@pytest.mark.parametrize(
    ("options", "message"),
    [
        (SlurmOptions(memory="4GB"), "--cores"),
        (SlurmOptions(cores=2), "--memory"),
        (SlurmOptions(cores=2, memory="lots"), "not a size"),
        (SlurmOptions(cores=2, memory="4GB", walltime="2 hours"), "not a SLURM time"),
        (SlurmOptions(jobs=0, cores=2, memory="4GB"), "--jobs"),
        (SlurmOptions(cores=0, memory="4GB"), "--cores"),
        (SlurmOptions(cores=2, memory="4GB", queue=" "), "--queue"),
    ],
)
def test_bad_slurm_options_are_parameter_errors(options, message):
    with pytest.raises(ParameterError, match=message):
        slurm_cluster_kwargs(options, config=SLURM_CONFIG_DEFAULTS)


@pytest.mark.parametrize(
    ("walltime", "seconds"),
    [("45", 2700), ("10:30", 630), ("02:00:00", 7200), ("1-12", 129600), ("2-00:30", 174600),
     ("1-01:02:03", 90123)],
)  # fmt: skip
def test_walltime_formats(walltime, seconds):
    assert walltime_seconds(walltime) == seconds


def test_slurm_job_script_has_the_sbatch_lines(tmp_path):
    dask_jobqueue = pytest.importorskip("dask_jobqueue")
    options = SlurmOptions(
        jobs=2, cores=4, memory="16GB", walltime="02:00:00", queue="short", account="haem",
        local_directory="/scratch/me",
    )  # fmt: skip
    kwargs = slurm_cluster_kwargs(options, default_log_directory=str(tmp_path / "slurm"))
    # dashboard on a free port: only the script is wanted, nothing is submitted
    with dask_jobqueue.SLURMCluster(**kwargs, scheduler_options={"dashboard_address": ":0"}) as cluster:
        script = cluster.job_script()
    lines = script.splitlines()
    for directive in ("-p short", "-A haem", "--cpus-per-task=4", "-t 02:00:00", "-n 1"):
        assert f"#SBATCH {directive}" in lines, script
    assert any(line.startswith("#SBATCH --mem=") for line in lines)
    assert f"#SBATCH -o {tmp_path / 'slurm'}/" in script
    worker = next(line for line in lines if "distributed.cli.dask_worker" in line)
    for argument in ("--nworkers 4", "--nthreads 1", "--local-directory /scratch/me", "--lifetime "):
        assert argument in worker, worker


FAKE_SBATCH = """#!/usr/bin/env bash
# Runs the job script at once on this machine, in its own session; the job id is its process id.
set -e
here="$(dirname "$0")"
n=$(ls "$here"/job-*.sh 2>/dev/null | wc -l)
cp "$1" "$here/job-$n.sh"
setsid bash "$here/job-$n.sh" > "$here/job-$n.log" 2>&1 < /dev/null &
echo "$!" >> "$here/jobs"
echo "Submitted batch job $!"
"""
FAKE_SCANCEL = """#!/usr/bin/env bash
for id in "$@"; do kill -TERM -- "-$id" 2>/dev/null || true; echo "$id" >> "$(dirname "$0")/cancelled"; done
"""


def test_slurm_cluster_runs_a_batch_through_a_fake_sbatch(first_batch, batch_slides, tmp_path, monkeypatch):
    """The whole --cluster slurm path (dask-jobqueue submits, workers join, jobs are cancelled at the
    end) with stand-ins for sbatch and scancel that run the job script on this machine."""
    pytest.importorskip("dask_jobqueue")
    clean_out, _ = first_batch
    fake = tmp_path / "bin"
    fake.mkdir()
    for name, text in (("sbatch", FAKE_SBATCH), ("scancel", FAKE_SCANCEL), ("squeue", "#!/bin/sh\n")):
        (fake / name).write_text(text)
        (fake / name).chmod(0o755)
    monkeypatch.setenv("PATH", f"{fake}{os.pathsep}{os.environ['PATH']}")
    out = tmp_path / "out"
    slide = batch_slides[1]
    argv = [
        "run", str(slide), "--out", str(out), "--cluster", "slurm", "--jobs", "1", "--cores", "1",
        "--memory", "2GB", "--walltime", "00:20:00", "--queue", "fakeq", *RUN_OPTIONS,
    ]  # fmt: skip
    try:
        run = run_cli(argv)
    finally:
        jobs = [int(j) for j in (fake / "jobs").read_text().split()] if (fake / "jobs").exists() else []
        for job in jobs:  # never leave a worker behind, whatever happened
            with contextlib.suppress(ProcessLookupError):
                os.killpg(job, signal.SIGKILL)
    assert run.code == 0, run.stderr + "".join(p.read_text() for p in fake.glob("job-*.log"))
    assert len(jobs) == 1
    script = (fake / "job-0.sh").read_text()
    assert "#SBATCH -p fakeq" in script and "--lifetime" in script
    assert "#SBATCH -o " + str(out.resolve() / "logs" / "slurm") in script
    assert (fake / "cancelled").read_text().split() == [str(jobs[0])]  # jobs cancelled at the end
    got, clean = open_gallery(out / f"{slide.stem}.zarr"), open_gallery(clean_out / f"{slide.stem}.zarr")
    assert np.array_equal(np.asarray(got.images[:]), np.asarray(clean.images[:]))
    pd.testing.assert_frame_equal(got.cells, clean.cells)


def test_missing_dask_jobqueue_is_a_clear_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "dask_jobqueue", None)  # import now fails
    with pytest.raises(PipelineError, match=r"pip install 'bloodsmear-pipeline\[slurm\]'"):
        with compute_client(1, slurm=SlurmOptions(cores=1, memory="2GB")):
            pass


def test_cli_passes_slurm_options(monkeypatch, tmp_path):
    seen: dict = {}

    @contextlib.contextmanager
    def fake_client(workers, scheduler=None, **kwargs):
        seen.update(kwargs, scheduler=scheduler)
        yield None

    monkeypatch.setattr("pipeline.engine.compute_client", fake_client)
    monkeypatch.setattr("pipeline.batch.run_batch", lambda *args, **kwargs: [])
    argv = [
        "run", str(tmp_path / "a.svs"), "--out", str(tmp_path / "out"), "--cluster", "slurm", "--jobs", "3",
        "--cores", "4", "--memory", "16GB", "--walltime", "04:00:00", "--queue", "short", "--account", "haem",
        "--local-directory", "/scratch/me",
    ]  # fmt: skip
    assert cli.main(argv) == 0
    assert seen["slurm"] == SlurmOptions(
        jobs=3, cores=4, memory="16GB", walltime="04:00:00", queue="short", account="haem",
        local_directory="/scratch/me",
    )  # fmt: skip
    assert seen["slurm_log_directory"] == str(tmp_path / "out" / "logs" / "slurm")


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--jobs", "2"], "--jobs applies only with --cluster slurm"),
        (["--cluster", "slurm", "--cores", "1", "--memory", "1GB", "--scheduler", "tcp://127.0.0.1:1"],
         "exclude each other"),
    ],
)  # fmt: skip
def test_cli_rejects_inconsistent_cluster_options(tmp_path, capsys, extra, message):
    assert cli.main(["run", str(tmp_path / "a.svs"), "--out", str(tmp_path / "out"), *extra]) == 1
    assert message in capsys.readouterr().err
