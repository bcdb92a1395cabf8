"""Batch path expansion."""

from __future__ import annotations

import pytest

from pipeline.batch import expand_slides
from pipeline.errors import ParameterError


def test_expand_files_folders_and_globs(tmp_path):
    for name in ("a.svs", "b.ndpi", "c.txt", "d.tif"):
        (tmp_path / name).write_bytes(b"x")
    sub = tmp_path / "sub"
    sub.mkdir()
    (sub / "e.svs").write_bytes(b"x")
    from_folder = expand_slides([str(tmp_path)])
    assert [p.name for p in from_folder] == ["a.svs", "b.ndpi", "d.tif"]
    from_glob = expand_slides([str(tmp_path / "*.svs"), str(sub / "e.svs")])
    assert [p.name for p in from_glob] == ["a.svs", "e.svs"]
    # the same slide named twice runs once
    assert len(expand_slides([str(tmp_path / "a.svs"), str(tmp_path / "*.svs")])) == 1


def test_missing_paths_are_kept_to_be_reported(tmp_path):
    missing = tmp_path / "nope.svs"
    assert expand_slides([str(missing)]) == [missing]
    assert expand_slides([str(tmp_path / "none-*.svs")]) == [tmp_path / "none-*.svs"]


def test_folder_without_slides_is_an_error(tmp_path):
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(ParameterError, match="holds no slide files"):
        expand_slides([str(tmp_path)])
