"""The microscope and camera: blur (PSF and defocus), uneven illumination per camera field, noise.

Published bright-field simulators (DESIGN-NOTES.md section 4) model the same chain: a Gaussian PSF, a
smoothly varying defocus with out-of-focus patches, illumination that is uneven within each camera
field (so a scanner's stitched fields leave seams), and Poisson-Gaussian sensor noise. Every term is a
function of absolute slide position, never of the tile being rendered, so tiles agree at their borders.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import cv2
import numpy as np
from scipy.special import erfinv

from ._hash import block_rng, hash_uniform

#: Blur sigmas (um) rendered exactly; a pixel's blur is interpolated between the two nearest.
BLUR_LEVELS_UM = (0.18, 0.45, 0.9, 1.6, 2.4)
#: Cells whose total blur sigma is below this count as in focus in the truth.
IN_FOCUS_MAX_SIGMA_UM = 0.5
DEFOCUS_BLOCK_UM = 2000.0
#: The defocus field is evaluated on this grid (px) and interpolated bilinearly.
FIELD_GRID_PX = 32
NOISE_BLOCK_PX = 256

_S_FIELD_GAIN, _S_FIELD_TINT = 21, 22
# Standard-normal quantiles of 65536 equiprobable bins: a uint16 draw through this table is a normal
# deviate (tails cut at 4.3 sigma) at a third of the cost of numpy's ziggurat.
_NORMAL_TABLE = (np.sqrt(2.0) * erfinv(2.0 * (np.arange(65536) + 0.5) / 65536 - 1.0)).astype(np.float32)
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


def draw_optics(seed: int, mpp: float, width_px: int, height_px: int) -> Optics:
    """Draw one slide's optics and camera from its seed."""
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
    white = 243.0 * np.exp(rng.normal(0.0, 0.015, 3)) - rng.uniform(0, 6)
    return Optics(
        seed=seed,
        mpp=mpp,
        psf_sigma_um=BLUR_LEVELS_UM[0],
        defocus_waves=waves,
        defocus_base_um=float(rng.uniform(0.05, 0.25)),
        patch_rate_per_mm2=float(rng.uniform(0.05, 0.2)),
        field_px=(round(field_um[0] / mpp), round(field_um[1] / mpp)),
        vignetting=float(rng.uniform(0.05, 0.12)),
        field_gain_sd=float(rng.uniform(0.01, 0.025)),
        white_rgb=np.clip(white, 200, 252),
        gradient=rng.normal(0.0, 0.02, 5),
        slide_size_px=(width_px, height_px),
        electrons_per_dn=float(rng.uniform(25.0, 60.0)),
        read_noise_dn=float(rng.uniform(0.6, 1.4)),
    )


# --------------------------------------------------------------------------------------- defocus
def _patches_near(optics: Optics, x0_um: float, y0_um: float, x1_um: float, y1_um: float) -> np.ndarray:
    """Out-of-focus patches (x_um, y_um, radius_um, peak_sigma_um) that may reach a rectangle."""
    reach = 1.0  # patches are at most ~0.5 block across, so neighbouring blocks suffice
    bx0 = math.floor(x0_um / DEFOCUS_BLOCK_UM - reach)
    bx1 = math.floor(x1_um / DEFOCUS_BLOCK_UM + reach)
    by0 = math.floor(y0_um / DEFOCUS_BLOCK_UM - reach)
    by1 = math.floor(y1_um / DEFOCUS_BLOCK_UM + reach)
    rows = []
    mean = optics.patch_rate_per_mm2 * (DEFOCUS_BLOCK_UM / 1000.0) ** 2
    for by in range(by0, by1 + 1):
        for bx in range(bx0, bx1 + 1):
            rng = block_rng(optics.seed, _B_PATCH, bx, by)
            n = rng.poisson(mean)
            for _ in range(n):
                rows.append(
                    (
                        (bx + rng.random()) * DEFOCUS_BLOCK_UM,
                        (by + rng.random()) * DEFOCUS_BLOCK_UM,
                        rng.uniform(60.0, 250.0),
                        rng.uniform(0.7, 2.2),
                    )
                )
    return np.asarray(rows, dtype=np.float64).reshape(-1, 4)


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


def _bilinear_grid(values: np.ndarray, gy0: int, gx0: int, y0: int, x0: int, h: int, w: int) -> np.ndarray:
    """Interpolate a field sampled at absolute pixels k * FIELD_GRID_PX onto a region of pixels."""
    step = FIELD_GRID_PX
    fy = (np.arange(y0, y0 + h) + 0.5) / step - gy0
    fx = (np.arange(x0, x0 + w) + 0.5) / step - gx0
    iy = np.clip(np.floor(fy).astype(np.int64), 0, values.shape[0] - 2)
    ix = np.clip(np.floor(fx).astype(np.int64), 0, values.shape[1] - 2)
    wy = (fy - iy).astype(np.float32)[:, None]
    wx = (fx - ix).astype(np.float32)[None, :]
    v = values.astype(np.float32)
    # Separable: along x on the few grid rows, then along y on full rows.
    rows = v[:, ix] * (1 - wx) + v[:, ix + 1] * wx
    return rows[iy] * (1 - wy) + rows[iy + 1] * wy


def sigma_map_um(optics: Optics, y0: int, x0: int, h: int, w: int) -> np.ndarray:
    """Blur sigma (um) of every pixel of a level-0 region, from a grid tied to absolute pixels."""
    step = FIELD_GRID_PX
    gy0 = math.floor((y0 + 0.5) / step) - 1
    gx0 = math.floor((x0 + 0.5) / step) - 1
    gy1 = math.floor((y0 + h - 0.5) / step) + 2
    gx1 = math.floor((x0 + w - 0.5) / step) + 2
    gy = np.arange(gy0, gy1 + 1) * step * optics.mpp
    gx = np.arange(gx0, gx1 + 1) * step * optics.mpp
    grid = defocus_sigma_um(optics, gx[None, :] + 0 * gy[:, None], gy[:, None] + 0 * gx[None, :])
    return _bilinear_grid(grid, gy0, gx0, y0, x0, h, w)


def blur_halo_px(mpp: float) -> int:
    """Pixels of context a region needs on each side for its blur to be exact."""
    return math.ceil(3.5 * BLUR_LEVELS_UM[-1] / mpp) + 1


def _gaussian(image: np.ndarray, sigma_px: float) -> np.ndarray:
    radius = math.ceil(3.5 * sigma_px)
    return cv2.GaussianBlur(image, (2 * radius + 1, 2 * radius + 1), sigma_px, borderType=cv2.BORDER_REFLECT)


def apply_blur(transmittance: np.ndarray, sigma_um: np.ndarray, mpp: float) -> np.ndarray:
    """Blur a transmittance image with a per-pixel sigma, blending exactly rendered blur levels.

    The result at a pixel depends only on the image within ``blur_halo_px`` of it, so a region rendered
    with that halo and cropped equals the same region of the whole slide.
    """
    levels = np.asarray(BLUR_LEVELS_UM, dtype=np.float32)
    # Fractional level index of every pixel; a level's share is the tent 1 - |index - level|.
    index = np.interp(sigma_um.ravel(), levels, np.arange(len(levels), dtype=np.float32))
    index = index.astype(np.float32).reshape(sigma_um.shape)
    lo, hi = float(index.min()), float(index.max())
    out: np.ndarray | None = None
    for level in range(math.floor(lo), min(len(levels) - 1, math.ceil(hi)) + 1):
        share = 1.0 - np.abs(index - np.float32(level))
        np.maximum(share, 0.0, out=share)
        blurred = _gaussian(transmittance, float(levels[level]) / mpp)
        blurred *= share[..., None]
        out = blurred if out is None else cv2.add(out, blurred)
    assert out is not None
    return out


# ---------------------------------------------------------------------------------- illumination
def illumination(optics: Optics, y0: int, x0: int, h: int, w: int) -> np.ndarray:
    """Glass intensity (0-255, per channel) of a level-0 region: white level, vignetting per camera
    field, per-field gain and tint, and a slide-wide gradient."""
    fw, fh = optics.field_px
    ys = np.arange(y0, y0 + h) + 0.5
    xs = np.arange(x0, x0 + w) + 0.5
    iy = np.floor(ys / fh).astype(np.int64)
    ix = np.floor(xs / fw).astype(np.int64)
    ry = ((ys - (iy + 0.5) * fh) / (fh / 2)).astype(np.float32)[:, None]
    rx = ((xs - (ix + 0.5) * fw) / (fw / 2)).astype(np.float32)[None, :]
    sw, sh = optics.slide_size_px
    u = (xs / sw - 0.5).astype(np.float32)[None, :]
    v = (ys / sh - 0.5).astype(np.float32)[:, None]
    g = optics.gradient.astype(np.float32)
    vignette = 1.0 - np.float32(optics.vignetting * 0.5) * (ry * ry + rx * rx)
    gradient = (1.0 + g[0] * u + g[2] * u * u) + (g[1] * v + g[3] * v * v) + g[4] * u * v
    base = vignette * gradient
    out = np.empty((h, w, 3), dtype=np.float32)
    # Per-field gain and tint are constant over each camera field: apply them field by field.
    for fy in np.unique(iy):
        rows = slice(int(np.searchsorted(iy, fy)), int(np.searchsorted(iy, fy, side="right")))
        for fx in np.unique(ix):
            cols = slice(int(np.searchsorted(ix, fx)), int(np.searchsorted(ix, fx, side="right")))
            common = 1.0 + optics.field_gain_sd * 2.0 * (
                hash_uniform(optics.seed, _S_FIELD_GAIN, fy, fx) - 0.5
            )
            tint = 1.0 + 0.006 * 2.0 * (hash_uniform(optics.seed, _S_FIELD_TINT, fy, fx, np.arange(3)) - 0.5)
            gain = (common * tint * optics.white_rgb).astype(np.float32)
            out[rows, cols] = base[rows, cols, None] * gain
    return out


# ----------------------------------------------------------------------------------------- noise
def add_sensor_noise(intensity: np.ndarray, optics: Optics, y0: int, x0: int) -> np.ndarray:
    """Poisson-Gaussian camera noise drawn per 256-px block of absolute position; returns uint8."""
    h, w = intensity.shape[:2]
    b = NOISE_BLOCK_PX
    z = np.empty((h, w, 3), dtype=np.float32)
    for by in range(y0 // b, (y0 + h - 1) // b + 1):
        for bx in range(x0 // b, (x0 + w - 1) // b + 1):
            draws = block_rng(optics.seed, _B_NOISE, by, bx).integers(0, 65536, (b, b, 3), dtype=np.uint16)
            block = _NORMAL_TABLE[draws]
            ys0, xs0 = max(y0, by * b), max(x0, bx * b)
            ys1, xs1 = min(y0 + h, (by + 1) * b), min(x0 + w, (bx + 1) * b)
            z[ys0 - y0 : ys1 - y0, xs0 - x0 : xs1 - x0] = block[
                ys0 - by * b : ys1 - by * b, xs0 - bx * b : xs1 - bx * b
            ]
    sd = np.maximum(intensity, 0)
    sd *= np.float32(1.0 / optics.electrons_per_dn)
    sd += np.float32(optics.read_noise_dn**2)
    np.sqrt(sd, out=sd)
    sd *= z
    sd += intensity
    # Rounding to nearest and saturating, as a camera's ADC does.
    return cv2.convertScaleAbs(np.clip(sd, 0, 255, out=sd))
