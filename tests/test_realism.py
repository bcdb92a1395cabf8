"""The realism statistics (benchmarks/realism_stats.py) measure what they claim, on known pictures."""

from __future__ import annotations

import math
import os

import numpy as np
import pytest

from benchmarks.realism import report
from benchmarks.realism_stats import MPP, STATISTICS, Field, field_stats, resample
from tests.conftest import SHARED

GLASS = np.array([220.0, 210.0, 200.0])


def _picture(centre_od: float, rim_od: float, spacing_um: float = 7.0) -> Field:
    """Glass with a hexagonal grid of red-cell discs: OD ``rim_od`` at the rim, ``centre_od`` inside."""
    h, w = 400, 480
    direction = np.array([0.25, 0.45, 0.30])  # OD share R, G, B of a red cell
    od = np.zeros((h, w))
    rbc = []
    r_px = 3.75 / MPP
    yy, xx = np.mgrid[0:h, 0:w] + 0.5
    for j, y in enumerate(np.arange(20, h - 20, spacing_um / MPP * 0.866)):
        for x in np.arange(20 + (j % 2) * spacing_um / MPP / 2, w - 20, spacing_um / MPP):
            rho = np.hypot(xx - x, yy - y) / r_px
            cell = np.where(rho < 0.45, centre_od, rim_od) * (rho < 1.0)
            od = np.maximum(od, cell)
            rbc.append((x, y, 7.5))
    rgb = GLASS * 10.0 ** (-od[..., None] * direction / direction.sum())
    return Field(np.clip(rgb, 0, 255).astype(np.uint8), rbc=np.array(rbc), rbc_complete=True)


def test_red_cell_statistics_on_a_known_picture():
    stats = field_stats(_picture(centre_od=0.15, rim_od=0.40))
    assert stats["glass_r"] == pytest.approx(220, abs=1.5)
    assert stats["glass_b"] == pytest.approx(200, abs=1.5)
    assert stats["rbc_rim_od"] == pytest.approx(0.40, abs=0.03)
    assert stats["rbc_centre_od"] == pytest.approx(0.15, abs=0.03)
    assert stats["rbc_pallor"] == pytest.approx(0.375, abs=0.08)
    assert stats["rbc_red_share"] == pytest.approx(0.25, abs=0.02)
    assert stats["rbc_nn_um"] == pytest.approx(7.0, abs=0.3)
    assert stats["rbc_touching_share"] == 1.0  # 7 um apart: closer than one 7.5 um diameter
    # a field of 120 x 100 um with cells every 7 um
    assert 10_000 < stats["rbc_per_mm2"] < 25_000
    flat = field_stats(_picture(centre_od=0.40, rim_od=0.40))
    assert flat["rbc_pallor"] == pytest.approx(1.0, abs=0.05)


def test_sparse_cells_do_not_touch():
    stats = field_stats(_picture(0.2, 0.4, spacing_um=12.0))
    assert stats["rbc_touching_share"] == 0.0
    assert stats["rbc_nn_um"] == pytest.approx(12.0, abs=0.4)


def test_resample_brings_fields_to_the_report_pixel_size():
    rgb = np.zeros((480, 640, 3), np.uint8)
    out, scale = resample(rgb, 0.18)
    assert scale == pytest.approx(0.18 / MPP)
    assert out.shape[:2] == (round(480 * scale), round(640 * scale))


def test_report_flags_a_simulated_median_outside_the_real_range():
    real = {"a": {k: list(np.linspace(1.0, 2.0, 11)) for k in STATISTICS}}
    inside = {k: [1.5] for k in STATISTICS}
    text, out = report(real, inside)
    assert out == [] and "OUT" not in text
    outside = {**inside, "rbc_pallor": [3.0]}
    text, out = report(real, outside)
    assert out == ["rbc_pallor"]
    assert "OUT" in text


def test_report_flags_gallery_recalls_more_than_5_points_apart():
    real = {"a": {k: list(np.linspace(1.0, 2.0, 11)) for k in STATISTICS}}
    inside = {k: [1.5] for k in STATISTICS}
    text, out = report(real, inside, [("vs all real (pooled)", 0.95, 0.97), ("vs a", 0.95, 0.99)])
    assert out == [] and "OUT" not in text and "95.0%" in text
    text, out = report(real, inside, [("vs all real (pooled)", 0.99, 0.90), ("vs a", 0.99, 0.90)])
    assert out == ["gallery recall (simulated vs real, pooled)"] and text.count("OUT") == 2


def test_every_statistic_is_measured_on_real_and_simulated_fields():
    """A few real images per set and one simulated slide give every statistic a value."""
    from benchmarks.realism import REAL_SETS, collect, simulated_fields

    data = SHARED / "data"
    if not data.is_dir():
        if os.environ.get("CI"):
            pytest.fail(f"{data} (the real smear sets) is missing")
        pytest.skip(f"{data} not available")
    real = {
        name: collect(loader(data / folder, "heldout", 8)) for name, (folder, loader) in REAL_SETS.items()
    }
    sim = collect(simulated_fields([5], per_seed=2))
    for key in STATISTICS:
        assert any(real[s][key] for s in real), key
        assert sim[key], key
        assert all(math.isfinite(v) for v in sim[key])
