"""One-to-one matching of detections to truth, and the evaluate command."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from pipeline.evaluate import evaluate_gallery, evaluate_tables, format_report, match, scene_zones


def test_match_is_one_to_one_closest_first_and_counts_duplicates():
    truth_x = np.array([0.0, 100.0, 200.0])
    truth_y = np.zeros(3)
    radius = np.full(3, 5.0)
    det_x = np.array([1.0, 3.0, 101.0, 400.0])
    det_y = np.zeros(4)
    m = match(det_x, det_y, truth_x, truth_y, radius, min_radius_um=6.0)
    assert m.truth_of_detection.tolist() == [0, -1, 1, -1]
    assert m.detection_of_truth.tolist() == [0, 2, -1]
    assert m.duplicate.tolist() == [False, True, False, False]  # 3.0 is a second hit on cell 0
    assert m.distance_um[0] == 1.0 and np.isnan(m.distance_um[3])


def test_match_radius_follows_cell_size():
    m = match(np.array([9.0]), np.array([0.0]), np.array([0.0]), np.array([0.0]), np.array([10.0]))
    assert m.truth_of_detection[0] == 0  # within a 10 um radius cell, beyond the 6 um minimum
    m = match(np.array([9.0]), np.array([0.0]), np.array([0.0]), np.array([0.0]), np.array([3.0]))
    assert m.truth_of_detection[0] == -1


# ----------------------------------------------------------------------------------------------------
# An independent recomputation on a slide with every zone of a smear
# ----------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def across_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A 1 x 0.6 mm mll23 slide across thick zone, monolayer and feathered edge, and its gallery."""
    from pipeline.runner import run_slide
    from pipeline.simulate import simulate_slide

    folder = tmp_path_factory.mktemp("across")
    sim = simulate_slide(
        folder / "across.svs",
        width_mm=1.0,
        height_mm=0.6,
        seed=7,
        preset="mll23",
        placement="across",
        workers=0,
        progress=False,
    )
    result = run_slide(sim.slide_path, folder / "out", workers=0, progress=False)
    return result.gallery, sim.truth_path


def _greedy_matching(det_xy: np.ndarray, truth: pd.DataFrame) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Brute force: repeatedly take the closest remaining detection-truth pair within the truth radius."""
    truth_xy = truth[["x_um", "y_um"]].to_numpy(float)
    radius = np.maximum(truth["diameter_um"].to_numpy(float) / 2, 6.0)
    d = np.sqrt(((det_xy[:, None, :] - truth_xy[None, :, :]) ** 2).sum(axis=2))
    eligible = d <= radius[None, :]
    free = np.where(eligible, d, np.inf)
    truth_of = np.full(len(det_xy), -1)
    while free.size and np.isfinite(free.min()):
        i, j = np.unravel_index(np.argmin(free), free.shape)
        truth_of[i] = j
        free[i, :] = np.inf
        free[:, j] = np.inf
    matched_truth = np.zeros(len(truth), dtype=bool)
    matched_truth[truth_of[truth_of >= 0]] = True
    duplicate = (truth_of < 0) & (eligible & matched_truth[None, :]).any(axis=1)
    distance = np.array([d[i, j] if j >= 0 else np.nan for i, j in enumerate(truth_of)])
    return truth_of, duplicate, distance


def _scene_zone(truth_path: Path):
    """The smear's zone map, built here from the sidecar with the simulator's classes."""
    from pipeline.simulate.presets import get_preset
    from pipeline.simulate.scene import Scene, SceneSpec

    meta = json.loads(truth_path.with_suffix(".json").read_text())
    spec = SceneSpec(
        meta["width_px"], meta["height_px"], meta["mpp"], meta["seed"],
        get_preset(meta["preset"]["name"]), meta["placement"],
    )  # fmt: skip
    return Scene(spec).zone


def test_evaluate_agrees_with_an_independent_computation(across_run):
    from pipeline.gallery import open_gallery

    gallery_path, truth_path = across_run
    report = evaluate_gallery(gallery_path, truth_path)
    gallery = open_gallery(gallery_path)
    truth = pd.read_csv(truth_path)
    mpp = gallery.attrs["slide"]["mpp"]
    zone_of = _scene_zone(truth_path)
    assert len(set(truth["zone"])) >= 3  # the slide does exercise the per-zone split
    assert report["zone_source"] == "scene" and report["truth_cells"] == len(truth)
    for name, table in (("candidates", gallery.candidates), ("accepted", gallery.cells)):
        section = report[name]
        det_xy = table[["x_px", "y_px"]].to_numpy(float) * mpp
        truth_of, duplicate, distance = _greedy_matching(det_xy, truth)
        true_det = truth_of >= 0
        found = np.isin(np.arange(len(truth)), truth_of[true_det])
        assert section["detections"] == len(table)
        assert section["matched"] == int(true_det.sum())
        assert section["duplicates"] == int(duplicate.sum())
        assert section["false"] == int((~true_det & ~duplicate).sum())
        assert section["recall"] == pytest.approx(found.mean())
        assert section["precision"] == pytest.approx(true_det.mean())
        errors = distance[true_det]
        assert section["centring_error_um"]["median"] == pytest.approx(np.median(errors))
        assert section["centring_error_um"]["p95"] == pytest.approx(np.percentile(errors, 95))
        for cls, group in truth.groupby("cell_class"):
            assert section["recall_by_class"][cls] == pytest.approx(found[group.index].mean()), cls
            assert section["by_class"][cls]["truth"] == len(group)
        det_zone = np.asarray(zone_of(det_xy[:, 0], det_xy[:, 1]))
        for zone, group in truth.groupby("zone"):
            assert section["recall_by_zone"][zone] == pytest.approx(found[group.index].mean()), zone
        for zone in set(det_zone):
            here = det_zone == zone
            assert section["precision_by_zone"][zone] == pytest.approx(true_det[here].mean()), zone
            assert section["by_zone"][zone]["detections"] == int(here.sum())
            assert section["by_zone"][zone]["duplicates"] == int(duplicate[here].sum())
    # the slide makes the numbers informative: the thick zone is where candidates are false
    assert report["candidates"]["false"] > 0 and report["candidates"]["precision"] < 1
    assert report["accepted"]["precision"] > report["candidates"]["precision"]


def test_zone_map_from_the_sidecar_reproduces_the_truth_zones(across_run):
    _, truth_path = across_run
    truth = pd.read_csv(truth_path)
    zone = scene_zones(truth_path.with_suffix(".json"))
    assert zone is not None
    assert list(zone(truth["x_um"].to_numpy(), truth["y_um"].to_numpy())) == truth["zone"].tolist()
    assert scene_zones(truth_path.with_name("missing.truth.json")) is None


def test_without_the_sidecar_detections_take_the_nearest_truth_zone(across_run, tmp_path):
    gallery_path, truth_path = across_run
    alone = tmp_path / "copy.truth.csv"
    shutil.copy(truth_path, alone)
    report = evaluate_gallery(gallery_path, alone)
    assert report["zone_source"] == "nearest truth cell"
    with_scene = evaluate_gallery(gallery_path, truth_path)
    # recall does not depend on where detections lie; the counts of detections per zone still add up
    assert report["candidates"]["recall_by_zone"] == with_scene["candidates"]["recall_by_zone"]
    by_zone = report["candidates"]["by_zone"]
    assert sum(v["detections"] for v in by_zone.values()) == report["candidates"]["detections"]


def test_terminal_table_lists_every_class_and_zone(across_run, capsys):
    from pipeline.cli import main

    gallery_path, truth_path = across_run
    assert main(["evaluate", str(gallery_path), str(truth_path)]) == 0
    printed = capsys.readouterr().out
    report = evaluate_gallery(gallery_path, truth_path)
    assert printed.strip() == format_report(report)
    lines = printed.splitlines()
    for cls, n in report["truth_by_class"].items():
        row = next(line for line in lines if line.startswith(cls + " "))
        assert row.split()[1] == str(n)
    for zone in report["truth_by_zone"]:
        assert any(line.startswith(zone + " ") for line in lines), zone
    accepted = next(line for line in lines if line.startswith("accepted "))
    assert f"{100 * report['accepted']['recall']:.1f}%" in accepted
    # the JSON goes through a real process: it must be plain JSON on stdout, nothing else
    command = [sys.executable, "-m", "pipeline", "evaluate", str(gallery_path), str(truth_path), "--json"]
    proc = subprocess.run(command, capture_output=True, text=True, check=True)
    assert json.loads(proc.stdout) == json.loads(json.dumps(report))


def test_empty_detections_give_no_rates_but_no_error():
    truth = pd.DataFrame(
        {
            "x_um": [10.0],
            "y_um": [10.0],
            "diameter_um": [12.0],
            "cell_class": ["monocyte"],
            "zone": ["monolayer"],
        }
    )
    empty = pd.DataFrame({"x_px": [], "y_px": []})
    report = evaluate_tables(empty, empty, truth, 0.25)
    assert report["accepted"]["recall"] == 0.0 and report["accepted"]["precision"] is None
    assert report["accepted"]["centring_error_um"] == {"median": None, "p95": None}
    assert "monocyte" in format_report(report)


# ----------------------------------------------------------------------------------------------------
# The quality filter against the simulator's judgement of each cell
# ----------------------------------------------------------------------------------------------------


def _truth_cells(rows: list[tuple[float, bool, bool, str, float]]) -> pd.DataFrame:
    """Truth cells 100 um apart along x: (unused x, in_focus, touching, zone, blur_sigma_um)."""
    return pd.DataFrame(
        {
            "x_um": [100.0 * (i + 1) for i in range(len(rows))],
            "y_um": 50.0,
            "x_px": [400.0 * (i + 1) for i in range(len(rows))],
            "y_px": 200.0,
            "diameter_um": 12.0,
            "cell_class": "monocyte",
            "in_focus": [r[1] for r in rows],
            "touching": [r[2] for r in rows],
            "zone": [r[3] for r in rows],
            "blur_sigma_um": [r[4] for r in rows],
        }
    )


def test_filter_vs_truth_counts_good_and_bad_cells_per_reason():
    truth = _truth_cells(
        [
            (0, True, False, "monolayer", 0.3),  # good, rejected as touching: a good cell lost
            (0, False, False, "monolayer", 0.7),  # out of focus by the truth, within the filter's limit
            (0, False, False, "feathered", 1.4),  # out of focus by both
            (0, True, True, "thick", 0.3),  # thick zone and touching
            (0, True, False, "monolayer", 0.2),  # good and kept
        ]
    )
    reasons = ["touching", "", "out_of_focus", "thick_zone", "", "overlapping"]
    candidates = pd.DataFrame(
        {
            "x_px": [401.0, 800.0, 1200.0, 1600.0, 2000.0, 2400.0],  # the last is on bare glass
            "y_px": 200.0,
            "reason": reasons,
        }
    )
    report = evaluate_tables(candidates, candidates[candidates.reason == ""], truth, 0.25)
    section = report["filter_vs_truth"]
    by = section["by_reason"]
    assert list(by) == ["out_of_focus", "overlapping", "thick_zone", "touching", "accepted"]
    assert (by["touching"]["truly_good"], by["touching"]["truly_bad"]) == (1, 0)
    assert (by["out_of_focus"]["truly_good"], by["out_of_focus"]["truly_bad"]) == (0, 1)
    assert by["out_of_focus"]["bad_because"] == {"out_of_focus": 1, "touching": 0, "thick_zone": 0}
    assert by["thick_zone"]["bad_because"] == {"out_of_focus": 0, "touching": 1, "thick_zone": 1}
    assert (by["overlapping"]["not_a_cell"], by["overlapping"]["truly_bad"]) == (1, 0)
    assert by["accepted"] | {"bad_because": None} == {
        "candidates": 2, "truly_good": 1, "truly_bad": 1, "not_a_cell": 0, "bad_because": None,
    }  # fmt: skip
    assert section["focus_limit_um"] == {
        "truth": 0.5, "filter": 0.9, "accepted_truly_out_of_focus": 1, "accepted_between_limits": 1,
    }  # fmt: skip
    tighter = evaluate_tables(candidates, candidates[candidates.reason == ""], truth, 0.25, None, 0.6)
    assert tighter["filter_vs_truth"]["focus_limit_um"]["accepted_between_limits"] == 0
    text = format_report(report)
    assert "touching            1      1      0        0" in text
    assert "the filter accepts up to 0.9 um; 1 accepted cells are out of focus" in text


def test_filter_vs_truth_agrees_with_an_independent_computation(across_run):
    from pipeline.gallery import open_gallery

    gallery_path, truth_path = across_run
    section = evaluate_gallery(gallery_path, truth_path)["filter_vs_truth"]
    gallery = open_gallery(gallery_path)
    truth = pd.read_csv(truth_path)
    candidates = gallery.candidates
    det_xy = candidates[["x_px", "y_px"]].to_numpy(float) * gallery.attrs["slide"]["mpp"]
    truth_of, _, _ = _greedy_matching(det_xy, truth)
    good = truth["in_focus"] & ~truth["touching"] & (truth["zone"] != "thick")
    for reason, rows in candidates.groupby("reason"):
        row = section["by_reason"][reason or "accepted"]
        cells = truth_of[rows.index.to_numpy()]
        assert row["candidates"] == len(rows)
        assert row["not_a_cell"] == int((cells < 0).sum())
        assert row["truly_good"] == int(good.to_numpy()[cells[cells >= 0]].sum())
        assert row["truly_bad"] == int((~good).to_numpy()[cells[cells >= 0]].sum())
    # the across slide makes it informative: thick-zone rejects are truly bad, most kept cells good
    assert section["by_reason"]["thick_zone"]["truly_bad"] > 0
    kept = section["by_reason"]["accepted"]
    assert kept["truly_good"] > kept["truly_bad"]


def test_another_slides_truth_is_refused(across_run, tmp_path):
    from pipeline.simulate import simulate_slide

    gallery_path, truth_path = across_run
    # the same size, another seed and name: only the slide name in the sidecar tells them apart
    other = simulate_slide(
        tmp_path / "other.svs", width_mm=1.0, height_mm=0.6, seed=8, preset="mll23", placement="across",
        workers=0, progress=False,
    )  # fmt: skip
    smaller = simulate_slide(
        tmp_path / "small.svs", width_mm=0.6, height_mm=0.6, seed=7, workers=0, progress=False
    )
    alone = tmp_path / "alone" / "wide.truth.csv"  # no sidecar: its cells lie beyond the gallery's slide
    alone.parent.mkdir()
    wide = pd.read_csv(other.truth_path)
    wide["x_px"] += 4000
    wide.to_csv(alone, index=False)
    for truth, names in (
        (other.truth_path, ["other.svs", "across.svs"]),
        (smaller.truth_path, ["2400 x 2400 px", "4000 x 2400 px"]),
        (alone, ["outside", "across.svs"]),
    ):
        command = [sys.executable, "-m", "pipeline", "evaluate", str(gallery_path), str(truth)]
        proc = subprocess.run(command, capture_output=True, text=True, check=False)
        assert proc.returncode == 1, proc.stdout
        assert proc.stdout == "" and "Traceback" not in proc.stderr
        assert len(proc.stderr.strip().splitlines()) == 1
        for name in [str(truth), "pass the truth.csv that simulate wrote beside across.svs", *names]:
            assert name in proc.stderr, (name, proc.stderr)
    assert evaluate_gallery(gallery_path, truth_path)["truth_cells"] > 0  # its own truth passes
    # a converted or renamed copy of the slide: another name, but the candidates do find its cells
    renamed = tmp_path / "renamed" / "copy.truth.csv"
    renamed.parent.mkdir()
    shutil.copy(truth_path, renamed)
    meta = json.loads(truth_path.with_suffix(".json").read_text())
    renamed.with_suffix(".json").write_text(json.dumps(meta | {"slide": "copy.tif"}))
    assert evaluate_gallery(gallery_path, renamed)["candidates"]["recall"] > 0.5
