"""Whole-slide image access for the detection pipeline.

One :class:`Slide` type over three readers, chosen when the file is opened:

``"tiff-tiles"``
    Aperio SVS and generic tiled TIFF that OpenSlide opens and whose levels map one-to-one (by
    dimensions) onto TIFF pages: tiles are read with one file descriptor (``os.pread``) and decoded
    with the page's own tifffile decoder (JPEG tables, YCbCr, predictors), several times faster than
    OpenSlide's ``read_region`` and pixel-identical to it (see ``tests/test_slide.py``).
``"openslide"``
    Every other format OpenSlide reads; RGBA is composited on white.
``"tifffile"``
    TIFFs OpenSlide rejects but tifffile reads (stripped, one level, greyscale, RGBA, 16-bit, planar).

Handles hold open files and cannot be pickled. Dask graphs carry a :class:`SlideRef`; tasks call
:func:`cached_slide`, which keeps a few handles per process and reopens a handle after an error.

Examples
--------
>>> with open_slide("scan.svs") as slide:  # doctest: +SKIP
...     overview = slide.read_at_mpp(0, 0, 2048, 2048, mpp_out=1.0)

Modules, one job each: :mod:`.handle` (:class:`Slide`, :func:`open_slide`, :class:`SlideRef`),
:mod:`.opening` (which reader serves a file, its levels and metadata), :mod:`.tiff_tiles` (the direct
TIFF reader), :mod:`.openslide_reader`, :mod:`.pixels` (conversion to RGB uint8), :mod:`.mpp`
(pixel-size rules), :mod:`.resample` (``read_at_mpp``'s resampling) and :mod:`.cache` (per-process
handles for Dask tasks).
"""

from .cache import cached_slide
from .handle import Slide, SlideRef, open_slide
from .mpp import MPP_RANGE_UM, check_mpp_option

__all__ = ["MPP_RANGE_UM", "Slide", "SlideRef", "cached_slide", "check_mpp_option", "open_slide"]
