"""Run a command while sampling the peak memory (RSS) of its whole process tree, Dask workers included."""

from __future__ import annotations

import subprocess
import threading
import time
from dataclasses import dataclass

import psutil


@dataclass(frozen=True)
class Measured:
    """Wall time, peak summed RSS of the process tree, and the command's exit code."""

    seconds: float
    peak_rss_mb: float
    peak_driver_rss_mb: float
    returncode: int
    output: str
    #: CPU seconds (user + system) of the whole process tree, from the last sample of each process.
    cpu_seconds: float = 0.0


def run_measured(command: list[str], interval_s: float = 0.1) -> Measured:
    """Run ``command`` to completion, sampling RSS of it and all its descendants every ``interval_s``."""
    started = time.perf_counter()
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    peak = [0.0, 0.0]
    cpu: dict[int, float] = {}
    done = threading.Event()

    def sample() -> None:
        root = psutil.Process(proc.pid)
        while not done.is_set():
            try:
                driver = root.memory_info().rss
                total = driver
                times = root.cpu_times()
                cpu[root.pid] = times.user + times.system
                for child in root.children(recursive=True):
                    try:
                        total += child.memory_info().rss
                        times = child.cpu_times()
                        cpu[child.pid] = times.user + times.system
                    except psutil.Error:
                        pass
            except psutil.Error:
                break
            peak[0] = max(peak[0], total / 2**20)
            peak[1] = max(peak[1], driver / 2**20)
            time.sleep(interval_s)

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    output, _ = proc.communicate()
    done.set()
    thread.join()
    return Measured(
        time.perf_counter() - started, peak[0], peak[1], proc.returncode, output, sum(cpu.values())
    )
