"""The engine's map: order, retries of transient errors, no retries of the pipeline's own errors."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from pipeline.engine import (
    TaskQueue,
    held_rows,
    ordered_map,
    ordered_map_holding,
    scheduler_workers,
    worker_count,
)
from pipeline.errors import SlideError


def _count_call(path: Path) -> int:
    with open(path, "a") as fh:
        fh.write("x")
    return len(path.read_text())


def _corrupt_tile(item: int, calls: Path) -> int:
    _count_call(calls)
    raise SlideError(f"slide.svs: tile {item} of level 0 cannot be decoded; re-copy the file")


def _flaky(item: int, calls: Path) -> int:
    if _count_call(calls) == 1:
        raise OSError("stale NFS file handle")  # transient: the retry succeeds
    return item * 10


def _square(item: int, offset: int) -> int:
    return item * item + offset


@pytest.fixture(scope="module")
def client():
    distributed = pytest.importorskip("distributed")
    with distributed.Client(processes=False, n_workers=2, threads_per_worker=1, dashboard_address=":0") as c:
        yield c


def test_results_come_back_in_order(client):
    assert list(ordered_map(client, _square, range(20), 1, window=3)) == [i * i + 1 for i in range(20)]
    assert list(ordered_map(None, _square, range(5), 1)) == [i * i + 1 for i in range(5)]


def test_the_pipelines_own_errors_are_raised_once_not_retried(client, tmp_path):
    calls = tmp_path / "calls"
    with pytest.raises(SlideError, match="tile 7 of level 0"):
        list(ordered_map(client, _corrupt_tile, [7], calls))
    assert calls.read_text() == "x"


def test_transient_errors_are_retried(client, tmp_path):
    calls = tmp_path / "calls"
    assert list(ordered_map(client, _flaky, [4], calls)) == [40]
    assert calls.read_text() == "xx"


def test_every_worker_is_counted(client):
    assert len(scheduler_workers(client)) == 2
    assert worker_count(client) == 2
    assert worker_count(None) == 0


class _QueueThatNeverStarts:
    """A client whose SLURM jobs never start a worker."""

    def __init__(self) -> None:
        self.waited_s = 0.0

    def wait_for_workers(self, n: int, timeout: float) -> None:
        self.waited_s += timeout
        raise TimeoutError


def test_waiting_for_slurm_jobs_gives_up_with_a_clear_error(monkeypatch):
    from pipeline import engine
    from pipeline.errors import PipelineError

    monkeypatch.setattr(engine, "SLURM_NOTICE_S", 600.0)
    said: list[str] = []
    client = _QueueThatNeverStarts()
    with pytest.raises(PipelineError, match=r"no SLURM job started a worker within 25 min.*squeue"):
        engine._wait_for_slurm_jobs(client, said.append, timeout_s=1500.0)
    assert client.waited_s == 1500.0
    assert len(said) == 2 and "squeue --me" in said[0]


def _opencv_threads(_item: int) -> int:
    import cv2

    return cv2.getNumThreads()


def _profiler_and_tick(_item: int) -> tuple[bool, str]:
    import dask.config

    return bool(dask.config.get("distributed.worker.profile.enabled")), dask.config.get(
        "distributed.admin.tick.interval"
    )


def test_local_workers_run_opencv_on_one_thread_without_profiler_and_fast_ticks():
    import os

    from pipeline.engine import compute_client

    if (os.cpu_count() or 1) < 2:
        pytest.skip("OpenCV already runs on one thread on a one-core machine")
    with compute_client(2) as c:
        assert set(ordered_map(c, _opencv_threads, range(4))) == {1}
        assert set(ordered_map(c, _profiler_and_tick, range(4))) == {(False, "1s")}


# ----------------------------------------------------------------------- results held on the cluster
def _rows_and_total(item: int, offset: int) -> tuple[int, np.ndarray]:
    rows = np.arange(item * 10, item * 10 + item + 1) + offset
    return int(rows.sum()), rows


def _joined(parts: list[np.ndarray], tag: str) -> tuple[str, list[int]]:
    return tag, np.concatenate(parts).tolist()


def _fails_on_three(item: int) -> tuple[int, np.ndarray]:
    if item == 3:
        raise SlideError("slide.svs: tile 3 cannot be decoded")
    return item, np.zeros(item)


@pytest.mark.parametrize("on_cluster", [True, False], ids=["dask", "in-process"])
def test_held_results_feed_later_tasks_in_order(client, on_cluster):
    engine = client if on_cluster else None
    sums, runs = [], []
    with TaskQueue(engine, window=2) as queue:
        for total, held in ordered_map_holding(engine, _rows_and_total, range(5), 1000, window=2):
            sums.append(total)
            runs.append(held_rows(engine, held, 1, 1 + total % 2))
            if len(runs) == 2:
                queue.submit(_joined, runs, f"pair {len(sums)}")
                runs = []
        queue.submit(_joined, runs, "rest")
        results = queue.results()
    expected = [_rows_and_total(i, 1000) for i in range(5)]
    assert sums == [total for total, _ in expected]
    picked = [rows[1 : 1 + total % 2] for total, rows in expected]
    assert results == [
        ("pair 2", np.concatenate(picked[0:2]).tolist()),
        ("pair 4", np.concatenate(picked[2:4]).tolist()),
        ("rest", picked[4].tolist()),
    ]


@pytest.mark.parametrize("on_cluster", [True, False], ids=["dask", "in-process"])
def test_held_map_raises_the_pipelines_own_error(client, on_cluster):
    engine = client if on_cluster else None
    seen = []
    with pytest.raises(SlideError, match="tile 3"):
        for total, _held in ordered_map_holding(engine, _fails_on_three, range(6), window=2):
            seen.append(total)
    assert seen == [0, 1, 2]
