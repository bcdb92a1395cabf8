"""Artefacts of real slides: each one present by default and each one can be switched off."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

from pipeline.errors import ParameterError
from pipeline.simulate.artefacts import LABEL_END, artefact_sprites
from pipeline.simulate.presets import ARTEFACTS, get_preset, parse_artefacts
from pipeline.simulate.render import SlideModel, render_region
from pipeline.simulate.scene import SceneSpec


def _spec(artefacts=frozenset(ARTEFACTS), placement="monolayer", size_px=40000):
    return SceneSpec(size_px, size_px // 3, 0.25, 3, get_preset("normal"), placement, frozenset(artefacts))


def test_parse_artefacts():
    assert parse_artefacts("all") == frozenset(ARTEFACTS)
    assert parse_artefacts("none") == frozenset()
    assert parse_artefacts("dust, seams") == {"dust", "seams"}
    with pytest.raises(ParameterError, match="precipitate"):
        parse_artefacts("dust,glitter")


def test_sparse_artefacts_switch_off_one_by_one():
    rect = (0.0, 0.0, 3000.0, 3000.0)  # 9 mm^2: dozens of each kind
    all_sprites = artefact_sprites(_spec(), *rect)
    assert len(all_sprites) > 30
    assert artefact_sprites(_spec(()), *rect) == []
    without_debris = artefact_sprites(_spec(set(ARTEFACTS) - {"debris"}), *rect)
    only_debris = artefact_sprites(_spec({"debris"}), *rect)
    assert 0 < len(without_debris) < len(all_sprites)
    assert len(without_debris) + len(only_debris) == len(all_sprites)
    # the others stay where they were
    kept = {(y, x) for y, x, _ in without_debris}
    assert kept <= {(y, x) for y, x, _ in all_sprites}


@pytest.mark.parametrize("kind", ["debris", "precipitate", "dust"])
def test_sparse_artefacts_are_smaller_than_any_white_cell(kind):
    """Debris, precipitate and dust are never white-cell-sized stained objects (they once were cell-sized
    purple blobs that the detector kept as smudge cells): in OD summed over R, G, B above 0.15 (stained,
    DESIGN-NOTES section 9), each sprite covers far less than the 40 um^2 a scanner's gallery keeps."""
    mpp = 0.25
    spec = _spec({kind})
    sprites = artefact_sprites(spec, 0.0, 0.0, 6000.0, 6000.0)  # 36 mm^2: dozens to hundreds
    assert len(sprites) > 40
    areas, directions = [], []
    for _, _, od in sprites:
        stained = od.sum(axis=2) > 0.15
        areas.append(stained.sum() * mpp * mpp)
        if stained.any():
            mean = od[stained].mean(axis=0)
            directions.append(mean / mean.sum())
    assert max(areas) < 25.0, sorted(areas)[-5:]
    if kind == "precipitate":  # dark azure granules: green absorbed most
        assert min(areas) > 0 and all(d[1] > 0.4 for d in directions)
    if kind == "dust":  # grey, no stain hue (when it shows at all)
        assert all(np.ptp(d) < 0.01 for d in directions)


def test_switching_artefacts_off_changes_the_pixels():
    region = (1000, 1000, 3000, 3000)
    on = render_region(SlideModel(_spec()), *region).rgb
    off = render_region(SlideModel(_spec(())), *region).rgb
    assert not np.array_equal(on, off)
    again = render_region(SlideModel(_spec(())), *region).rgb
    assert np.array_equal(off, again)


def test_focus_and_seams_switch_off_in_the_optics():
    model = SlideModel(_spec(set(ARTEFACTS) - {"focus", "seams"}))
    assert model.optics.patch_rate_per_mm2 == 0.0
    assert model.optics.vignetting == 0.0 and model.optics.field_gain_sd == 0.0
    full = SlideModel(_spec())
    assert full.optics.patch_rate_per_mm2 > 0 and full.optics.vignetting > 0


def _whole(artefacts):
    # A 75 x 25 mm slide; only small regions of it are rendered.
    return SlideModel(SceneSpec(300000, 100000, 0.25, 3, get_preset("normal"), "whole", frozenset(artefacts)))


def test_label_on_a_whole_slide():
    assert LABEL_END * 300000 > 2000
    no_unscanned = set(ARTEFACTS) - {"unscanned"}
    label = render_region(_whole(no_unscanned), 1000, 50000, 256, 256).rgb
    assert label.mean() < 40  # opaque paper: dark in transmitted light
    glass = render_region(_whole(no_unscanned - {"label"}), 1000, 50000, 256, 256).rgb
    assert glass.mean() > 150


def test_skipped_camera_fields_over_glass_are_black_or_white():
    # Bare glass between the label and the smear, along the top edge of the slide.
    region = (36352, 0, 8704, 256)

    def blank_tiles(rgb):
        return sum((rgb[:, x : x + 256] == v).all() for x in range(0, rgb.shape[1], 256) for v in (0, 255))

    assert blank_tiles(render_region(_whole(ARTEFACTS), *region).rgb) > 0
    assert blank_tiles(render_region(_whole(set(ARTEFACTS) - {"unscanned"}), *region).rgb) == 0


def test_cli_rejects_an_unknown_artefact(tmp_path):
    out = tmp_path / "x.svs"
    proc = subprocess.run(
        [sys.executable, "-m", "pipeline", "simulate", str(out), "--workers", "0", "--artefacts", "glitter"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert proc.returncode == 1
    assert "glitter" in proc.stderr and "dust" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1


def test_help_shows_defaults_and_the_truth_files():
    proc = subprocess.run(
        [sys.executable, "-m", "pipeline", "simulate", "--help"], capture_output=True, text=True, check=True
    )
    text = " ".join(proc.stdout.split())
    assert "(default normal)" in text and "(default monolayer)" in text and "(default all)" in text
    assert "truth.json" in proc.stdout.strip().splitlines()[-1]
