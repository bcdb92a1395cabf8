"""Simulated whole-slide scans of stained blood smears, with ground truth.

The subpackage is independent of detection: scene (where cells lie), cells (their shapes), stain
(Beer-Lambert colour), optics (blur, illumination, noise), svs (the file) and run (the tiled,
Dask-parallel driver). Entry point: :func:`simulate_slide`.
"""

from __future__ import annotations

from .presets import PRESETS, BloodPreset, get_preset
from .run import TRUTH_COLUMNS, SimulationResult, simulate_slide
from .scene import PLACEMENTS

__all__ = [
    "PLACEMENTS",
    "PRESETS",
    "TRUTH_COLUMNS",
    "BloodPreset",
    "SimulationResult",
    "get_preset",
    "simulate_slide",
]
