"""Romanowsky (Pappenheim / May-Grünwald-Giemsa) stain as absorbing components.

Bright-field images obey Beer-Lambert: optical densities (OD = -log10 I/I0) of overlapping
absorbers add, so every simulated object is a map of *concentrations* of a few stain components, and
the slide's colour is ``OD = concentrations @ stain_matrix``. The base OD vectors are fitted to median
colours measured on CellaVision images of MGG smears (DESIGN-NOTES.md section 3) and scaled to the
optical densities measured on real photographs (``python -m benchmarks.realism``: a red cell sums to
about 0.3, a nucleus to about 0.7-1.4): one unit of ``EOSIN`` is a typical red cell, one unit of
``CHROMATIN`` a typical nucleus, and lymphocyte cytoplasm is about 0.5 ``BLUE`` + 0.6 ``EOSIN``.
"""

from __future__ import annotations

import numpy as np

#: Indices of the stain components in a concentration array's last axis.
EOSIN = 0  # eosin / haemoglobin: red cells, eosinophil granules, pinkish neutrophil cytoplasm
BLUE = 1  # methylene blue: basophilic (RNA-rich) cytoplasm, sky-blue to deep blue
CHROMATIN = 2  # azure B-eosinate bound to DNA: purple nuclei, basophil and azurophil granules
N_STAINS = 3
STAIN_NAMES = ("eosin", "blue", "chromatin")

#: OD per unit concentration, rows are components, columns R, G, B.
BASE_STAIN_MATRIX = np.array(
    [
        [0.06, 0.105, 0.07],  # eosin: red cell; hue between chula-rbc and txl-pbc (DESIGN-NOTES 9)
        [0.20, 0.12, 0.03],  # methylene blue
        [0.29, 0.50, 0.10],  # chromatin: nucleus hue (70,25,133); strength from the realism report
    ],
    dtype=np.float32,
)


def slide_stain_matrix(rng: np.random.Generator, variation: float = 1.0) -> np.ndarray:
    """Draw one slide's stain matrix: the base matrix with per-lab intensity and hue changes.

    Parameters
    ----------
    rng
        Random generator of the slide.
    variation
        Scale of the variation; 0 returns the base matrix.

    Returns
    -------
    numpy.ndarray
        ``(3, 3)`` float32 OD per unit concentration (rows: eosin, blue, chromatin; columns: R, G, B).
    """
    matrix = BASE_STAIN_MATRIX.astype(np.float64).copy()
    if variation <= 0:
        return matrix.astype(np.float32)
    # Staining time and dye batch change how much dye binds (intensity) and, less, which wavelengths
    # it absorbs (hue); both vary independently per component.
    strength = np.exp(rng.normal(0.0, 0.15 * variation, size=(N_STAINS, 1)))
    hue = np.exp(rng.normal(0.0, 0.10 * variation, size=(N_STAINS, 3)))
    matrix = matrix * strength * hue
    return np.clip(matrix, 0.005, None).astype(np.float32)


def concentrations_to_od(conc: np.ndarray, stain_matrix: np.ndarray) -> np.ndarray:
    """Convert a ``(..., 3)`` concentration array to ``(..., 3)`` RGB optical density."""
    return np.asarray(conc, dtype=np.float32) @ np.asarray(stain_matrix, dtype=np.float32)
