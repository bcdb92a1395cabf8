"""The slide selection both batch benchmarks (``bench_batch``, ``bench_slurm``) share."""

from __future__ import annotations

import argparse
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from benchmarks import bench_batch
from benchmarks.bench_batch import add_slide_arguments, selected_slides


def _args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_slide_arguments(parser, size_mm=2.0)
    return parser.parse_args(argv)


def _no_simulation(*args: Any) -> None:
    raise AssertionError(f"simulated slides although slides were given: {args}")


def test_given_slides_folders_and_globs_are_passed_on_as_they_are(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr(bench_batch, "simulate_missing", _no_simulation)
    given = ["one.svs", str(tmp_path), str(tmp_path / "*.tif")]
    assert selected_slides(_args(given), tmp_path) == given


def test_without_slides_the_folder_gets_only_what_is_missing(tmp_path: Path, monkeypatch) -> None:
    simulated: list[str] = []

    def simulate(command: list[str]) -> SimpleNamespace:
        simulated.append(command[command.index("simulate") + 1])
        return SimpleNamespace(returncode=0, seconds=0.1, output="")

    monkeypatch.setattr(bench_batch, "run_measured", simulate)
    folder = tmp_path / "kept"
    folder.mkdir()
    (folder / "batch_0.svs").write_bytes(b"simulated by an earlier run")
    args = _args(["--simulate", "2", "--folder", str(folder), "--size-mm", "0.5"])
    assert selected_slides(args, tmp_path) == [str(folder / "batch_0.svs"), str(folder / "batch_1.svs")]
    assert simulated == [str(folder / "batch_1.svs")]
    # no --folder: simulated into the command's temporary folder
    assert selected_slides(_args(["--simulate", "1"]), tmp_path) == [str(tmp_path / "slides" / "batch_0.svs")]
