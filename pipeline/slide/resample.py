"""Resampling for ``Slide.read_at_mpp``: area averaging to shrink, linear to enlarge, on the slide's
global sample grid."""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np

# Sample positions are rounded to 1/32 px (OpenCV's remap precision) on the slide's global grid, so
# a window's pixels depend only on where they are, not on which larger window they were cut from.
_POSITION_STEPS_PER_PX = 32
_REMAP_TILE_PX = 1024


@dataclass(frozen=True)
class _AxisPlan:
    """Which level pixels make each output pixel along one axis.

    "copy": output pixel ``j`` is level pixel ``first[j]``. "block": the mean of level pixels
    ``first[j] .. first[j] + box - 1``. "remap": the level is box-filtered with a ``box``-pixel
    kernel, then sampled bilinearly ``frac[j] / 32`` of the way from pixel ``first[j]`` to the next.
    """

    kind: str  # "copy", "block" or "remap"
    box: int
    first: np.ndarray  # (n_out,) int64, non-decreasing
    frac: np.ndarray | None = None  # remap: (n_out,) int64 in [0, 32)

    @property
    def margin(self) -> tuple[int, int]:
        """Extra level pixels the remap path's box filter needs before and after the samples."""
        if self.kind != "remap":
            return 0, 0
        return self.box // 2, self.box - 1 - self.box // 2

    def source_span(self, start: int, stop: int) -> tuple[int, int]:
        """Half-open range of level pixels used by output pixels ``start:stop``."""
        before, after = self.margin
        taps = {"copy": 1, "block": self.box, "remap": 2}[self.kind]
        return int(self.first[start]) - before, int(self.first[stop - 1]) + taps + after


def _near_int(value: float, tolerance: float) -> bool:
    return abs(value - round(value)) <= tolerance


def _plan_kind(u0: float, v0: float, scale: float) -> str:
    """Copying and a plain integer shrink need the window on the level's pixel grid."""
    aligned = _near_int(u0, 1e-6) and _near_int(v0, 1e-6)
    if aligned and abs(scale - 1.0) <= 1e-9:
        return "copy"
    if aligned and scale > 1.5 and _near_int(scale, 1e-9):
        return "block"
    return "remap"


def _axis_plan(kind: str, start: float, scale: float, n_out: int) -> _AxisPlan:
    """Plan one axis of a window starting at level coordinate ``start``, ``scale`` level px per output px."""
    if kind in ("copy", "block"):
        factor = round(scale)
        return _AxisPlan(kind, factor, round(start) + factor * np.arange(n_out, dtype=np.int64))
    # A box of about `scale` pixels, then bilinear sampling at each output pixel's centre, is within
    # ~1 grey level of INTER_AREA on tissue and needs no per-window weights.
    box = max(1, int(scale + 0.5))
    centre = start + scale * (np.arange(n_out, dtype=np.float64) + 0.5) - 0.5  # pixel-index coordinates
    if box % 2 == 0:
        centre += 0.5  # an even box filter's output pixel p is centred on p - 0.5
    centre_q = np.round(centre * _POSITION_STEPS_PER_PX).astype(np.int64)
    first = centre_q // _POSITION_STEPS_PER_PX
    return _AxisPlan(kind, box, first, centre_q - first * _POSITION_STEPS_PER_PX)


def _remap_tile(
    image: np.ndarray, plan_x: _AxisPlan, plan_y: _AxisPlan, cols: slice, rows: slice
) -> np.ndarray:
    """Bilinear samples for output ``rows`` x ``cols``; ``image`` starts at the first sampled pixel."""
    assert plan_x.frac is not None and plan_y.frac is not None
    x_first, y_first = plan_x.first[cols], plan_y.first[rows]
    # Built in their final small types: int64 temporaries of the full map cost as much as the remap.
    map_xy = np.empty((len(y_first), len(x_first), 2), dtype=np.int16)
    map_xy[..., 0] = (x_first - x_first[0]).astype(np.int16)
    map_xy[..., 1] = (y_first - y_first[0]).astype(np.int16)[:, None]
    # OpenCV's fixed-point map: interpolation table index (y_frac << 5) + x_frac, in 1/32 px.
    map_frac = np.add.outer(
        (plan_y.frac[rows] * _POSITION_STEPS_PER_PX).astype(np.uint16), plan_x.frac[cols].astype(np.uint16)
    )
    return cv2.remap(image, map_xy, map_frac, cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE)


def _resample(source: np.ndarray, plan_x: _AxisPlan, plan_y: _AxisPlan, rows: slice) -> np.ndarray:
    """Output rows ``rows`` from ``source``, the level pixels ``plan_x.source_span(0, width)`` x
    ``plan_y.source_span(rows.start, rows.stop)``."""
    height, width = rows.stop - rows.start, len(plan_x.first)
    if plan_x.kind == "copy":
        return source
    if plan_x.kind == "block":
        return cv2.resize(source, (width, height), interpolation=cv2.INTER_AREA)
    box = plan_x.box
    # Every sampled pixel's box lies inside `source` (see margin), so border handling never matters.
    smooth = cv2.blur(source, (box, box), borderType=cv2.BORDER_REPLICATE) if box > 1 else source
    before = plan_x.margin[0]
    y_base, x_base = int(plan_y.first[rows.start]) - before, int(plan_x.first[0]) - before
    out = np.empty((height, width, 3), dtype=np.uint8)
    tile = _REMAP_TILE_PX  # keeps int16 map coordinates small and the maps a few MB
    for r0 in range(rows.start, rows.stop, tile):
        tile_rows = slice(r0, min(rows.stop, r0 + tile))
        y0 = int(plan_y.first[tile_rows.start]) - y_base
        y1 = int(plan_y.first[tile_rows.stop - 1]) + 2 - y_base
        for c0 in range(0, width, tile):
            tile_cols = slice(c0, min(width, c0 + tile))
            x0 = int(plan_x.first[tile_cols.start]) - x_base
            x1 = int(plan_x.first[tile_cols.stop - 1]) + 2 - x_base
            out[r0 - rows.start : tile_rows.stop - rows.start, tile_cols] = _remap_tile(
                smooth[y0:y1, x0:x1], plan_x, plan_y, tile_cols, tile_rows
            )
    return out
