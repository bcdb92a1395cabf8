"""Simulated whole-slide scans of stained blood smears, with ground truth.

The subpackage is independent of detection: scene (where cells lie), cells (their shapes), stain
(Beer-Lambert colour), optics (blur, illumination, noise), svs (the file) and run (the tiled,
Dask-parallel driver). Entry point: :func:`simulate_slide`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .presets import PLACEMENTS, PRESETS, BloodPreset, get_preset
    from .run import TRUTH_COLUMNS, SimulationResult, simulate_slide

__all__ = [
    "PLACEMENTS",
    "PRESETS",
    "TRUTH_COLUMNS",
    "BloodPreset",
    "SimulationResult",
    "get_preset",
    "simulate_slide",
]

_HOMES = {
    "PLACEMENTS": "presets",
    "PRESETS": "presets",
    "BloodPreset": "presets",
    "get_preset": "presets",
    "TRUTH_COLUMNS": "run",
    "SimulationResult": "run",
    "simulate_slide": "run",
}


def __getattr__(name: str) -> Any:
    # Lazy: the command line reads the presets to build its help, and must not pay for importing the
    # renderer (Dask, tifffile, scipy: over a second) on every call.
    if name in _HOMES:
        from importlib import import_module

        return getattr(import_module(f".{_HOMES[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
