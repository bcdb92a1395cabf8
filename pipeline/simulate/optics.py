"""The microscope and camera: blur (PSF and defocus), uneven illumination per camera field, noise.

Published bright-field simulators (DESIGN-NOTES.md section 4) model the same chain: a Gaussian PSF, a
smoothly varying defocus with out-of-focus patches, illumination that is uneven within each camera
field (so a scanner's stitched fields leave seams), and Poisson-Gaussian sensor noise. Every term is a
function of absolute slide position, never of the tile being rendered, so tiles agree at their borders.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import lru_cache

import cv2
import numpy as np

from ._hash import block_rng, hash_uniform

#: Blur sigmas (um) rendered exactly; a pixel's blur is interpolated between the two nearest.
BLUR_LEVELS_UM = (0.18, 0.45, 0.9, 1.6, 2.4)
#: Cells whose total blur sigma is below this count as in focus in the truth.
IN_FOCUS_MAX_SIGMA_UM = 0.5
DEFOCUS_BLOCK_UM = 2000.0
#: The defocus field is evaluated on this grid (px) and interpolated bilinearly.
FIELD_GRID_PX = 32
NOISE_BLOCK_PX = 256

#: Smooth fields (blur, glass) are interpolated per aligned block of this size.
SMOOTH_BLOCK_PX = 512
N_NOISE_BLOCKS = 32
#: Rows of the region the camera stage handles at a time (a divisor of NOISE_BLOCK_PX).
_NOISE_BAND_PX = 128

_S_FIELD_GAIN, _S_FIELD_TINT, _S_NOISE_PICK = 21, 22, 23
_B_PATCH, _B_OPTICS, _B_NOISE = 201, 202, 203


@dataclass(frozen=True)
class Optics:
    """One slide's optical and camera parameters (drawn from the seed by :func:`draw_optics`)."""

    seed: int
    mpp: float
    psf_sigma_um: float
    defocus_waves: np.ndarray  # (n, 3): kx, ky, phase of the gentle defocus field
    defocus_base_um: float
    patch_rate_per_mm2: float
    field_px: tuple[int, int]  # camera field (width, height) in level-0 px
    vignetting: float  # relative intensity loss at a field corner
    field_gain_sd: float
    white_rgb: np.ndarray  # (3,) glass intensity 0-255 at the field centre
    gradient: np.ndarray  # (5,) slide-wide 2nd-order illumination polynomial
    slide_size_px: tuple[int, int]
    electrons_per_dn: float
    read_noise_dn: float
    seam_tint: float = 0.006  # per-field tint change (relative, per channel)
    glass_waves: np.ndarray = field(default_factory=lambda: np.zeros((1, 3)))  # (n, 3): kx, ky, phase
    glass_od_mean: float = 0.0  # OD of the film on the glass (stain, plasma) at its mean thickness
    glass_od_amplitude: float = 0.0
    glass_tint_od: np.ndarray = field(default_factory=lambda: np.ones(3))  # (3,) colour of that film


def draw_optics(
    seed: int, mpp: float, width_px: int, height_px: int, focus: bool = True, seams: bool = True
) -> Optics:
    """Draw one slide's optics and camera from its seed.

    ``focus=False`` removes the out-of-focus patches (the gentle defocus stays); ``seams=False`` makes
    every camera field alike (no vignetting, gain or tint steps at the stitching lines).
    """
    rng = block_rng(seed, _B_OPTICS)
    n = 4
    wavelength = rng.uniform(1500.0, 6000.0, n)
    angle = rng.uniform(0, 2 * np.pi, n)
    waves = np.stack(
        [
            2 * np.pi / wavelength * np.cos(angle),
            2 * np.pi / wavelength * np.sin(angle),
            rng.uniform(0, 2 * np.pi, n),
        ],
        axis=1,
    )
    # A 2448 x 2048 camera at 40x: fields of ~0.6 x 0.5 mm at 0.25 um/px.
    field_um = (2448 * 0.25, 2048 * 0.25)
    # Glass is rarely white: it is warm, bluish or grey. Drawn to match the glass of real photographs
    # (benchmarks/realism.py: median about (214, 210, 204)), but kept above 200 in every channel as a
    # slide scanner calibrates its white (photographs go down to 140).
    level = rng.uniform(208.0, 222.0)
    white = level * np.array([rng.uniform(1.0, 1.06), 1.0, rng.uniform(0.965, 0.995)])
    return Optics(
        seed=seed,
        mpp=mpp,
        psf_sigma_um=BLUR_LEVELS_UM[0],
        defocus_waves=waves,
        defocus_base_um=float(rng.uniform(0.05, 0.25)),
        patch_rate_per_mm2=float(rng.uniform(0.05, 0.2)) * focus,
        # Fields are whole numbers of smooth-field blocks, so each block lies in one camera field.
        field_px=(_blocks(field_um[0] / mpp), _blocks(field_um[1] / mpp)),
        vignetting=float(rng.uniform(0.02, 0.05)) * seams,  # what flat-field correction leaves
        field_gain_sd=float(rng.uniform(0.005, 0.015)) * seams,
        white_rgb=np.clip(white, 120, 252),
        gradient=rng.normal(0.0, 0.02, 5),
        slide_size_px=(width_px, height_px),
        electrons_per_dn=float(rng.uniform(25.0, 60.0)),
        read_noise_dn=float(rng.uniform(0.6, 1.4)),
        glass_waves=_plane_waves(rng, 5, 40.0, 600.0),
        glass_od_mean=float(rng.uniform(0.0, 0.04)),
        glass_od_amplitude=float(rng.uniform(0.015, 0.04)),
        glass_tint_od=np.array([1.0, 1.0, 1.0]),
        seam_tint=0.006 * seams,
    )


def _blocks(px: float) -> int:
    return max(1, round(px / SMOOTH_BLOCK_PX)) * SMOOTH_BLOCK_PX


def _plane_waves(rng: np.random.Generator, n: int, shortest_um: float, longest_um: float) -> np.ndarray:
    """``(n, 3)`` wave vectors (rad/um) and phases of a smooth random field."""
    wavelength = rng.uniform(shortest_um, longest_um, n)
    angle = rng.uniform(0, 2 * np.pi, n)
    return np.stack(
        [
            2 * np.pi / wavelength * np.cos(angle),
            2 * np.pi / wavelength * np.sin(angle),
            rng.uniform(0, 2 * np.pi, n),
        ],
        axis=1,
    )


# --------------------------------------------------------------------------------------- defocus
def _patches_near(optics: Optics, x0_um: float, y0_um: float, x1_um: float, y1_um: float) -> np.ndarray:
    """Out-of-focus patches (x_um, y_um, radius_um, peak_sigma_um) that may reach a rectangle."""
    reach = 1.0  # patches are at most ~0.5 block across, so neighbouring blocks suffice
    bx0 = math.floor(x0_um / DEFOCUS_BLOCK_UM - reach)
    bx1 = math.floor(x1_um / DEFOCUS_BLOCK_UM + reach)
    by0 = math.floor(y0_um / DEFOCUS_BLOCK_UM - reach)
    by1 = math.floor(y1_um / DEFOCUS_BLOCK_UM + reach)
    rows = [
        row
        for by in range(by0, by1 + 1)
        for bx in range(bx0, bx1 + 1)
        for row in _block_patches(optics.seed, optics.patch_rate_per_mm2, bx, by)
    ]
    return np.asarray(rows, dtype=np.float64).reshape(-1, 4)


@lru_cache(maxsize=1024)
def _block_patches(seed: int, rate_per_mm2: float, bx: int, by: int) -> tuple[tuple[float, ...], ...]:
    """The patches of one defocus block (cached: every render chunk draws the nine around it)."""
    rng = block_rng(seed, _B_PATCH, bx, by)
    n = rng.poisson(rate_per_mm2 * (DEFOCUS_BLOCK_UM / 1000.0) ** 2)
    return tuple(
        (
            (bx + rng.random()) * DEFOCUS_BLOCK_UM,
            (by + rng.random()) * DEFOCUS_BLOCK_UM,
            rng.uniform(60.0, 250.0),
            rng.uniform(0.7, 2.2),
        )
        for _ in range(n)
    )


def defocus_sigma_um(optics: Optics, x_um: np.ndarray, y_um: np.ndarray) -> np.ndarray:
    """Total blur sigma (PSF and defocus, in um) at points of the slide."""
    x = np.asarray(x_um, dtype=np.float64)
    y = np.asarray(y_um, dtype=np.float64)
    kx, ky, ph = optics.defocus_waves.T
    gentle = optics.defocus_base_um * (1.0 + np.sin(x[..., None] * kx + y[..., None] * ky + ph).mean(axis=-1))
    if x.size:
        patches = _patches_near(optics, float(x.min()), float(y.min()), float(x.max()), float(y.max()))
    else:
        patches = np.zeros((0, 4))
    defocus = gentle
    for px, py, radius, peak in patches:
        bump = peak * np.exp(-((x - px) ** 2 + (y - py) ** 2) / (2 * radius**2))
        defocus = np.maximum(defocus, bump)
    return np.sqrt(optics.psf_sigma_um**2 + defocus**2)


def _grid_values(optics: Optics, gy: np.ndarray, gx: np.ndarray) -> np.ndarray:
    """Smooth per-pixel quantities at grid points (absolute px): blur level index and glass RGB.

    Returns ``(len(gy), len(gx), 4)`` float32: channel 0 the fractional index into
    :data:`BLUR_LEVELS_UM`, channels 1-3 the glass intensity (0-255) before per-field camera terms.
    """
    mpp = optics.mpp
    y_um = (gy * mpp)[:, None] + 0 * gx[None, :]
    x_um = (gx * mpp)[None, :] + 0 * gy[:, None]
    sigma = defocus_sigma_um(optics, x_um, y_um)
    levels = np.asarray(BLUR_LEVELS_UM)
    out = np.empty((*sigma.shape, 4), dtype=np.float32)
    out[..., 0] = np.interp(sigma, levels, np.arange(len(levels), dtype=np.float64))
    sw, sh = optics.slide_size_px
    u = x_um / (sw * mpp) - 0.5
    v = y_um / (sh * mpp) - 0.5
    g = optics.gradient
    gradient = 1.0 + g[0] * u + g[2] * u * u + g[1] * v + g[3] * v * v + g[4] * u * v
    # Uneven glass: a thin film of plasma protein and stain of slowly varying thickness (an OD per
    # channel in the slide's background tint).
    kx, ky, ph = optics.glass_waves.T
    film = np.sin(x_um[..., None] * kx + y_um[..., None] * ky + ph).mean(axis=-1)
    film_od = np.maximum(optics.glass_od_mean + optics.glass_od_amplitude * film, 0.0)
    out[..., 1:] = (
        gradient[..., None] * optics.white_rgb * np.power(10.0, -film_od[..., None] * optics.glass_tint_od)
    )
    return out


def _field_factor(optics: Optics, gy: np.ndarray, gx: np.ndarray, fy: int, fx: int) -> np.ndarray:
    """Camera-field terms ``(len(gy), len(gx), 3)`` at grid points, for the field (fy, fx).

    Each camera field has its own vignetting and a slightly different gain and tint; they change
    abruptly where fields are stitched, which leaves the seams of a real scan.
    """
    fw, fh = optics.field_px
    ry = (gy - (fy + 0.5) * fh) / (fh / 2)
    rx = (gx - (fx + 0.5) * fw) / (fw / 2)
    vignette = 1.0 - optics.vignetting * 0.5 * (ry[:, None] ** 2 + rx[None, :] ** 2)
    return (
        vignette[..., None] * _field_gain(optics.seed, optics.field_gain_sd, optics.seam_tint, fy, fx)
    ).astype(np.float32)


@lru_cache(maxsize=1024)
def _field_gain(seed: int, gain_sd: float, seam_tint: float, fy: int, fx: int) -> np.ndarray:
    """Gain per channel of one camera field (a common gain and a small tint)."""
    common = 1.0 + gain_sd * 2.0 * (hash_uniform(seed, _S_FIELD_GAIN, fy, fx) - 0.5)
    return common * (1.0 + seam_tint * 2.0 * (hash_uniform(seed, _S_FIELD_TINT, fy, fx, np.arange(3)) - 0.5))


@dataclass(frozen=True)
class Glass:
    """Glass intensity (0-255, per channel) of a region, interpolated block by block when the camera
    stage first asks for it (see :func:`smooth_fields`).

    Each block stays in the buffer it was interpolated into (copying them into one ``(h, w, 3)`` array
    cost a tenth of a chunk's render), and only just before its use, while it is still in the cache:
    interpolated with the blur index, it was read back from memory after the blur.

    The buffers are scratch arrays of this thread, shared by every ``Glass`` it makes: read one region's
    glass before another's is read (the renderer does, one region at a time).
    """

    grids: dict[tuple[int, int], np.ndarray]  # (by, bx) -> the block's (n, n, 3) grid
    _pixels: dict[tuple[int, int], np.ndarray] = field(default_factory=dict)

    def at(self, y0: int, x0: int, y1: int, x1: int) -> np.ndarray:
        """The ``(y1 - y0, x1 - x0, 3)`` glass of absolute pixels [y0, y1) x [x0, x1), which must lie in
        one block."""
        by, bx = y0 // SMOOTH_BLOCK_PX, x0 // SMOOTH_BLOCK_PX
        pixels = self._pixels.get((by, bx))
        if pixels is None:
            # One buffer per block of the region: a block is read band by band.
            pixels = _upsample(self.grids[by, bx], f"smooth_up3_{len(self._pixels)}")
            self._pixels[by, bx] = pixels
        oy, ox = FIELD_GRID_PX // 2 - by * SMOOTH_BLOCK_PX, FIELD_GRID_PX // 2 - bx * SMOOTH_BLOCK_PX
        return pixels[y0 + oy : y1 + oy, x0 + ox : x1 + ox]


def _upsample(grid: np.ndarray, name: str) -> np.ndarray:
    """A block's ``(n, n, ...)`` grid interpolated bilinearly to ``n`` :data:`FIELD_GRID_PX` px a side
    (scratch buffer ``name`` of this thread)."""
    size = grid.shape[0] * FIELD_GRID_PX
    up = workspace(name, (size, size, *grid.shape[2:]))
    # A contiguous grid per quantity: numpy is slow on interleaved channel views.
    cv2.resize(np.ascontiguousarray(grid), (size, size), dst=up, interpolation=cv2.INTER_LINEAR)
    return up


def smooth_fields(optics: Optics, y0: int, x0: int, h: int, w: int) -> tuple[np.ndarray, Glass]:
    """Blur level index ``(h, w)`` and glass intensity of a level-0 region (scratch arrays of this
    thread, overwritten by the next call; the glass's, once another region's glass is read).

    Both vary slowly, so they are evaluated on a grid of :data:`FIELD_GRID_PX` and interpolated
    bilinearly, one aligned :data:`SMOOTH_BLOCK_PX` block at a time: a block is always computed from
    the same grid values with the same call, so its pixels do not depend on the region asked for.
    Camera fields are whole blocks, so their seams stay sharp.
    """
    step, block = FIELD_GRID_PX, SMOOTH_BLOCK_PX
    per = block // step
    # Scratch arrays of this thread (see workspace): valid until the next call.
    index = workspace("smooth_index", (h, w))
    by0, by1 = y0 // block, (y0 + h - 1) // block
    bx0, bx1 = x0 // block, (x0 + w - 1) // block
    gy_all = (np.arange(by0 * per, (by1 + 1) * per + 1) * step).astype(np.float64)
    gx_all = (np.arange(bx0 * per, (bx1 + 1) * per + 1) * step).astype(np.float64)
    values = _grid_values(optics, gy_all, gx_all)
    fw, fh = optics.field_px
    half = step // 2
    glass = {}
    for by in range(by0, by1 + 1):
        for bx in range(bx0, bx1 + 1):
            gy_i, gx_i = (by - by0) * per, (bx - bx0) * per
            grid = values[gy_i : gy_i + per + 1, gx_i : gx_i + per + 1].copy()
            gy, gx = gy_all[gy_i : gy_i + per + 1], gx_all[gx_i : gx_i + per + 1]
            grid[..., 1:] *= _field_factor(optics, gy, gx, by * block // fh, bx * block // fw)
            # Output pixel d of the resize maps to grid coordinate (d + 0.5) / step - 0.5, so grid
            # point k sits at absolute pixel position (block corner) + k * step: output pixels
            # half .. half + block are the block's own.
            ya, yb = max(y0, by * block), min(y0 + h, (by + 1) * block)
            xa, xb = max(x0, bx * block), min(x0 + w, (bx + 1) * block)
            oy, ox = half - by * block, half - bx * block
            up = _upsample(grid[..., 0], "smooth_up1")
            index[ya - y0 : yb - y0, xa - x0 : xb - x0] = up[ya + oy : yb + oy, xa + ox : xb + ox]
            glass[by, bx] = np.ascontiguousarray(grid[..., 1:])
    return index, Glass(glass)


def blur_halo_px(mpp: float, level_index: np.ndarray | None = None) -> int:
    """Pixels of context a region needs on each side for its blur to be exact.

    With the region's ``level_index`` (see :func:`apply_blur`), only as much as its blurriest level
    needs; without, enough for any region.
    """
    if level_index is None or level_index.size == 0:
        return _radius_px(_level_sigma_um(len(BLUR_LEVELS_UM) - 1), mpp)
    last = len(BLUR_LEVELS_UM) - 1
    return _radius_px(_level_sigma_um(min(int(level_index.max()), last - 1) + 1), mpp)


def _radius_px(sigma_um: float, mpp: float) -> int:
    return math.ceil(3.5 * sigma_um / mpp) + 1


def _level_sigma_um(level: int) -> float:
    """The blur a level adds to the canvas, whose sprites already carry the PSF (level 0)."""
    return math.sqrt(max(BLUR_LEVELS_UM[level] ** 2 - BLUR_LEVELS_UM[0] ** 2, 0.0))


def psf_pad_px(mpp: float) -> int:
    """How far (px) :func:`psf_sprite` widens a sprite on each side."""
    return _radius_px(BLUR_LEVELS_UM[0], mpp)


def psf_sprite(y0: int, x0: int, od: np.ndarray, mpp: float) -> tuple[int, int, np.ndarray]:
    """An optical density sprite blurred by the in-focus PSF (:data:`BLUR_LEVELS_UM` ``[0]``), padded.

    Sprites carry the PSF, so the canvas needs no blur where a slide is in focus: one full-canvas
    Gaussian pass less per region (a tenth of the rendering). The PSF acts on optical density here, not
    on light; at 0.18 um the two differ only within a pixel of the sharpest edges.
    """
    sigma_px = BLUR_LEVELS_UM[0] / mpp
    pad = psf_pad_px(mpp)
    padded = cv2.copyMakeBorder(od, pad, pad, pad, pad, cv2.BORDER_CONSTANT, value=0)
    k = 2 * math.ceil(3.5 * sigma_px) + 1
    return y0 - pad, x0 - pad, cv2.GaussianBlur(padded, (k, k), sigma_px, borderType=cv2.BORDER_CONSTANT)


#: A rectangle of a region's core: (y, x, height, width) in px.
_Box = tuple[int, int, int, int]


def apply_blur(transmittance: np.ndarray, halo: int, level_index: np.ndarray, mpp: float) -> np.ndarray:
    """Blur a transmittance canvas with a per-pixel sigma, blending exactly rendered blur levels.

    Parameters
    ----------
    transmittance
        ``(h + 2 halo, w + 2 halo, 3)`` float32 canvas.
    halo
        Context on each side (at least :func:`blur_halo_px`).
    level_index
        ``(h, w)`` fractional index into :data:`BLUR_LEVELS_UM` of every core pixel; a pixel blends the
        two levels around its index linearly (index 1.3: 0.7 of level 1 and 0.3 of level 2).
    mpp
        Pixel size, um/px.

    Returns
    -------
    numpy.ndarray
        ``(h, w, 3)`` float32, the blurred core. A pixel depends only on the canvas within the radius
        of its blur levels and on its own index, so a region rendered with its halo equals the same
        pixels of the whole slide.
    """
    core = blur_core(transmittance, halo, level_index, mpp)
    return core.rows(0, core.shape[0])


@dataclass(frozen=True)
class BlurredCore:
    """The blurred ``(h, w, 3)`` core of a region (see :func:`blur_core`)."""

    shape: tuple[int, int]
    _rows: Callable[[int, int], np.ndarray]

    def rows(self, a: int, b: int) -> np.ndarray:
        """Rows [a, b) of the core (scratch of this thread, valid until the next region)."""
        return self._rows(a, b)


def blur_core(transmittance: np.ndarray, halo: int, level_index: np.ndarray, mpp: float) -> BlurredCore:
    """:func:`apply_blur`, with the usual blend (one pair of levels everywhere) done only as rows are
    read: the camera stage reads them band by band, each just blended and still in the cache."""
    h, w = level_index.shape
    last = len(BLUR_LEVELS_UM) - 1
    # The pair of levels a pixel blends is a function of its index alone (lower = floor, at most
    # last - 1), never of the region: the same two blurs and weights wherever the pixel is rendered.
    low, high, _, _ = cv2.minMaxLoc(level_index)
    first, top = min(math.floor(low), last - 1), min(math.floor(high), last - 1)
    upper_weight = workspace("blur_upper_w", (h, w))
    lower_weight = workspace("blur_lower_w", (h, w))
    out = workspace("blur_out", (h, w, 3))
    if first == top:  # one pair everywhere (usual: the gentle defocus spans less than a level)
        # lower is `first` everywhere: no per-pixel floor needed, the same differences.
        np.subtract(level_index, np.float32(first), out=upper_weight)
        np.subtract(np.float32(1.0), upper_weight, out=lower_weight)
        whole = (0, 0, h, w)
        # One pass: (lower_w * B_l + upper_w * B_l+1) / (lower_w + upper_w + 1e-5), OpenCV's formula.
        lower_blur = _blur_level(transmittance, halo, whole, first, mpp)
        upper_blur = _blur_level(transmittance, halo, whole, first + 1, mpp)

        def blend(a: int, b: int) -> np.ndarray:
            cv2.blendLinear(
                lower_blur[a:b], upper_blur[a:b], lower_weight[a:b], upper_weight[a:b], dst=out[a:b]
            )
            return out[a:b]

        return BlurredCore((h, w), blend)
    lower = np.floor(level_index, out=workspace("blur_lower", (h, w)))
    np.minimum(lower, np.float32(last - 1), out=lower)
    np.subtract(level_index, lower, out=upper_weight)
    np.subtract(np.float32(1.0), upper_weight, out=lower_weight)
    mask = workspace_u8("blur_mask", (h, w))
    # Each pair only over the box of its own pixels, each level over the boxes of its two pairs: the
    # blurriest levels (69 taps) cover the middle of an out-of-focus patch, not the whole region.
    boxes = {}
    for level in range(first, top + 1):
        cv2.compare(lower, float(level), cv2.CMP_EQ, dst=mask)
        x, y, bw, bh = cv2.boundingRect(mask)
        if bw and bh:
            boxes[level] = (y, x, bh, bw)
    blurred = {}
    for level in range(first, top + 2):
        box = _union(boxes.get(level - 1), boxes.get(level))
        if box is not None:
            blurred[level] = (box, _blur_level(transmittance, halo, box, level, mpp))
    for level, (y, x, bh, bw) in boxes.items():
        pair = [_within(blurred[k], (y, x, bh, bw)) for k in (level, level + 1)]
        blend = workspace("blur_pair", (h, w, 3))[:bh, :bw]
        cv2.blendLinear(
            *pair, lower_weight[y : y + bh, x : x + bw], upper_weight[y : y + bh, x : x + bw], dst=blend
        )
        cv2.compare(lower[y : y + bh, x : x + bw], float(level), cv2.CMP_EQ, dst=mask[:bh, :bw])
        cv2.copyTo(blend, mask[:bh, :bw], out[y : y + bh, x : x + bw])
    return BlurredCore((h, w), lambda a, b: out[a:b])


def _union(a: _Box | None, b: _Box | None) -> _Box | None:
    """The bounding box ``(y, x, h, w)`` of two boxes, either of which may be None."""
    if a is None or b is None:
        return a if b is None else b
    y, x = min(a[0], b[0]), min(a[1], b[1])
    return y, x, max(a[0] + a[2], b[0] + b[2]) - y, max(a[1] + a[3], b[1] + b[3]) - x


def _within(blurred: tuple[_Box, np.ndarray], box: _Box) -> np.ndarray:
    """The part of a level blurred over ``blurred[0]`` that covers ``box`` (inside it)."""
    (y0, x0, _, _), pixels = blurred
    y, x, h, w = box
    return pixels[y - y0 : y - y0 + h, x - x0 : x - x0 + w]


def _blur_level(transmittance: np.ndarray, halo: int, box: _Box, level: int, mpp: float) -> np.ndarray:
    """The canvas at blur :data:`BLUR_LEVELS_UM` ``[level]`` in all, over ``box = (y, x, h, w)`` of the
    core (``(h, w, 3)``)."""
    y, x, h, w = box
    if level == 0:  # the sprites carry the PSF already (psf_sprite)
        return transmittance[halo + y : halo + y + h, halo + x : halo + x + w]
    sigma_px = _level_sigma_um(level) / mpp
    r = _radius_px(_level_sigma_um(level), mpp)
    # Only the box and this level's own radius are needed: a smaller image to blur.
    part = transmittance[halo + y - r : halo + y + h + r, halo + x - r : halo + x + w + r]
    k = 2 * math.ceil(3.5 * sigma_px) + 1
    # A view of one buffer per level whatever the box: a new shape would allocate (page faults).
    full = workspace(
        f"blur_{level}",
        (transmittance.shape[0] - 2 * halo + 2 * r, transmittance.shape[1] - 2 * halo + 2 * r, 3),
    )
    dst = full[: h + 2 * r, : w + 2 * r]
    # The kernel reaches ceil(3.5 sigma) < r px, so the border rule never touches the box. OpenCV's
    # default (reflect-101), because with BORDER_REFLECT OpenCV 5 blurs a view that is not the whole
    # canvas (several levels) 30-40 % slower, to the same bits.
    dst = cv2.GaussianBlur(part, (k, k), sigma_px, dst=dst, borderType=cv2.BORDER_REFLECT_101)
    return dst[r : r + h, r : r + w]


# ------------------------------------------------------------------------------------- workspace
_WORKSPACE = threading.local()


def workspace(name: str, shape: tuple[int, ...], dtype: type = np.float32) -> np.ndarray:
    """A scratch array of this thread, reused between calls (its contents are garbage).

    Render buffers are tens of MB; allocating them afresh for every region spent more time in page
    faults than in arithmetic.
    """
    buffers = _WORKSPACE.__dict__
    key = (name, np.dtype(dtype).str)
    array = buffers.get(key)
    if array is None or array.shape != shape:
        array = np.empty(shape, dtype)
        buffers[key] = array
    return array


def workspace_u8(name: str, shape: tuple[int, ...]) -> np.ndarray:
    """Like :func:`workspace`, a uint8 scratch array of this thread (masks)."""
    return workspace(name, shape, np.uint8)


# ----------------------------------------------------------------------------------------- noise
@lru_cache(maxsize=2)
def noise_bank(seed: int) -> tuple[np.ndarray, ...]:
    """The 64 noise patterns of one slide: standard-normal blocks, each upright then upside down.

    The flipped copies are stored (25 MB more per slide): OpenCV copies a flipped view before every
    multiplication, which doubled the noise's cost.
    """
    patterns = []
    for k in range(N_NOISE_BLOCKS):
        block = block_rng(seed, _B_NOISE, k).standard_normal(
            (NOISE_BLOCK_PX, NOISE_BLOCK_PX, 3), dtype=np.float32
        )
        # Upside down: only rows are flipped, so the pattern is the same whatever order blocks are drawn in.
        patterns += [block, np.ascontiguousarray(block[::-1])]
    return tuple(patterns)


def _noise_block(optics: Optics, pick: int) -> np.ndarray:
    return noise_bank(optics.seed)[pick]


def add_sensor_noise(core: BlurredCore, glass: Glass, optics: Optics, y0: int, x0: int) -> np.ndarray:
    """Light on the sensor (``core`` transmittance times the glass) plus Poisson-Gaussian camera noise
    keyed by 256-px blocks of absolute position; returns uint8. ``core``'s rows are overwritten.

    The deviates of a block are one of a slide's bank of pre-drawn blocks, maybe flipped: drawing
    fresh ones per block cost a third of the render time, and a repeat 64 um apart is invisible under
    the noise's own randomness.
    """
    h, w = core.shape
    b, smooth = NOISE_BLOCK_PX, SMOOTH_BLOCK_PX
    rgb = np.empty((h, w, 3), np.uint8)
    # Band by band (aligned rows, each within one row of noise and glass blocks), every step before
    # the next band: a band's arrays stay in the core's cache (10-15 % less time than whole passes).
    band = _NOISE_BAND_PX
    scratch = workspace("noise_sd", (band, w, 3))
    bys = np.arange(y0 // b, (y0 + h - 1) // b + 1)
    bxs = np.arange(x0 // b, (x0 + w - 1) // b + 1)
    picks = (
        hash_uniform(optics.seed, _S_NOISE_PICK, bys[:, None], bxs[None, :]) * N_NOISE_BLOCKS * 2
    ).astype(int)
    glass_columns = [
        (max(x0, gx * smooth), min(x0 + w, (gx + 1) * smooth))
        for gx in range(x0 // smooth, (x0 + w - 1) // smooth + 1)
    ]
    for ya in [y0, *range((y0 // band + 1) * band, y0 + h, band)]:
        yb = min(y0 + h, (ya // band + 1) * band)
        light = core.rows(ya - y0, yb - y0)
        for xa, xb in glass_columns:
            view = light[:, xa - x0 : xb - x0]
            cv2.multiply(view, glass.at(ya, xa, yb, xb), dst=view)
        sd = scratch[: yb - ya]
        # light >= 0: transmittance and glass are. Variance light / gain + read noise^2, one pass.
        cv2.addWeighted(light, 1.0 / optics.electrons_per_dn, light, 0.0, optics.read_noise_dn**2, dst=sd)
        cv2.sqrt(sd, sd)
        by = ya // b
        for bx, pick in zip(bxs.tolist(), picks[by - bys[0]].tolist(), strict=True):
            block = _noise_block(optics, pick)
            xa, xb = max(x0, bx * b), min(x0 + w, (bx + 1) * b)
            view = sd[:, xa - x0 : xb - x0]
            cv2.multiply(view, block[ya - by * b : yb - by * b, xa - bx * b : xb - bx * b], dst=view)
        # Signal plus noise, rounded to nearest and saturated to 0-255 as a camera's ADC does.
        cv2.add(light, sd, dst=rgb[ya - y0 : yb - y0], dtype=cv2.CV_8U)
    return rgb
