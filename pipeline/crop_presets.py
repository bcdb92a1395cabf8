"""Crop geometry and image format of the public single-cell galleries, so new crops can match them.

A model trained on one public gallery sees cells at that gallery's scale (pixels per um) and field of view
(um per crop side); crops cut at another scale look like other cells to it. ``run --preset NAME`` cuts
crops at a gallery's scale and field, ``export`` writes them in its file format.

=========  ========  =========  ==========  ======  =====================================================
preset     side um   side px    px per um   format  source
=========  ========  =========  ==========  ======  =====================================================
mll23      25.0      288        11.52       png     MLL23 (Metafer, 40x), Scientific Data 2025
pbc        37.9      360        ~9.5        jpeg    PBC (CellaVision DM96), Acevedo et al., Data in Brief
                                                    2020
aml-lmu    28.29     400        14.14       tiff    AML-Cytomorphology_LMU (PreciPoint M8, 100x oil),
                                                    Matek et al. 2019
=========  ========  =========  ==========  ======  =====================================================

Crops here are square; PBC's images are 360 x 363 px, so the ``pbc`` preset cuts the 360 px square (3 px,
0.3 um, less on one side).

This module stays light (no numpy, OpenCV, pandas or zarr at import): the command line builds its
options from it.
"""

from __future__ import annotations

from dataclasses import dataclass

from .errors import ParameterError

__all__ = [
    "CROP_PRESETS",
    "DEFAULT_PRESET",
    "EXPORT_FORMATS",
    "IMAGE_FORMATS",
    "CropPreset",
    "get_crop_preset",
    "match_crop_preset",
    "resolve_crop",
]

#: Image file formats a preset may name (``export --format``).
IMAGE_FORMATS = ("png", "jpeg", "tiff")
#: Every ``export --format``: the image formats, then the tables and the QuPath overlay. Kept here, not in
#: :mod:`pipeline.export`, so that the command line lists them without importing OpenCV, pandas and zarr.
EXPORT_FORMATS = (*IMAGE_FORMATS, "geojson", "csv")


@dataclass(frozen=True)
class CropPreset:
    """Crop geometry and file format of one public gallery.

    Attributes
    ----------
    name
        Preset name used on the command line.
    crop_um
        Side of the square field of a crop, um.
    crop_px
        Side of a crop, px.
    image_format
        File format of the gallery's images: one of :data:`IMAGE_FORMATS`.
    description
        One line naming the gallery and its scanner.
    """

    name: str
    crop_um: float
    crop_px: int
    image_format: str
    description: str

    @property
    def px_per_um(self) -> float:
        """Scale of the crops, px/um."""
        return self.crop_px / self.crop_um

    @property
    def crop_mpp(self) -> float:
        """Pixel size of the crops, um/px."""
        return self.crop_um / self.crop_px


CROP_PRESETS: dict[str, CropPreset] = {
    # ../shared/reference/000 (MLL23 paper, Methods): "288 x 288 pixels and 25 um x 25 um, corresponding
    # to a resolution of 11.52 pixels per um". The paper does not name a file format: PNG keeps the
    # crops lossless.
    "mll23": CropPreset(
        "mll23", 25.0, 288, "png", "MLL23 (Metafer, 40x objective): 288 px, 25 um, 11.52 px/um"
    ),
    # ../shared/reference/003 (PBC, Acevedo et al. 2020, Specifications table and section 1): "format
    # jpg and size 360 x 363 pixels". The paper gives no pixel size; DESIGN-NOTES.md section 1 measures
    # about 9.5 px/um from the red-cell size in its images, so 360 px / 9.5 px/um = 37.9 um.
    "pbc": CropPreset(
        "pbc", 37.9, 360, "jpeg", "PBC (CellaVision DM96): 360 px (of 360 x 363), about 37.9 um, JPEG"
    ),
    # ../shared/reference/004 (AML-Cytomorphology_LMU, TCIA): "14.14 Pixels per Micron" from the
    # manufacturer, images as TIFF ("Images (TIFF, 11 GB)"). The image side, 400 x 400 px, is that of
    # the dataset's files (Matek et al., Nat Mach Intell 2019); the reference text does not state it.
    # 400 px / 14.14 px/um = 28.29 um.
    "aml-lmu": CropPreset(
        "aml-lmu",
        28.29,
        400,
        "tiff",
        "AML-Cytomorphology_LMU (PreciPoint M8, 100x oil): 400 px, 28.3 um, 14.14 px/um, TIFF",
    ),
}

#: The preset whose geometry ``run`` uses when none is named (the Metafer workflow we reproduce).
DEFAULT_PRESET = "mll23"


def get_crop_preset(name: str) -> CropPreset:
    """Look up a crop preset by name.

    Parameters
    ----------
    name
        One of :data:`CROP_PRESETS` (``mll23``, ``pbc``, ``aml-lmu``).

    Returns
    -------
    CropPreset

    Raises
    ------
    ParameterError
        If the name is unknown; the message lists the valid names.
    """
    try:
        return CROP_PRESETS[name]
    except KeyError:
        valid = ", ".join(CROP_PRESETS)
        raise ParameterError(f"unknown crop preset {name!r}; choose one of: {valid}") from None


def resolve_crop(
    preset: str | None, crop_um: float | None = None, crop_px: int | None = None
) -> tuple[float, int]:
    """Crop side in um and px: the preset's, each replaced by the value given explicitly.

    Parameters
    ----------
    preset
        Preset name, or ``None`` for :data:`DEFAULT_PRESET`.
    crop_um, crop_px
        Explicit values (``--crop-um``, ``--crop-px``); ``None`` takes the preset's.

    Returns
    -------
    tuple of (float, int)
        ``(crop_um, crop_px)``.

    Examples
    --------
    >>> resolve_crop("aml-lmu")
    (28.29, 400)
    >>> resolve_crop("pbc", crop_px=224)
    (37.9, 224)
    """
    chosen = get_crop_preset(preset or DEFAULT_PRESET)
    return (
        chosen.crop_um if crop_um is None else float(crop_um),
        chosen.crop_px if crop_px is None else int(crop_px),
    )


def match_crop_preset(crop_um: float, crop_px: int, tolerance: float = 0.005) -> CropPreset | None:
    """The preset whose geometry a gallery was cut with, if any.

    Parameters
    ----------
    crop_um, crop_px
        The gallery's crop side (``attrs["parameters"]["crop"]``).
    tolerance
        Relative difference in ``crop_um`` still counted as the same field.

    Returns
    -------
    CropPreset or None
        ``None`` when no preset has this side in px and (within ``tolerance``) in um.
    """
    for candidate in CROP_PRESETS.values():
        if candidate.crop_px == int(crop_px) and abs(candidate.crop_um - crop_um) <= tolerance * crop_um:
            return candidate
    return None
