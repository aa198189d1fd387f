"""Lazy reading of image files into spatialdata image elements: JPEG/PNG here, TIFF and whole slides via ``_wsi``."""

from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any

import dask
import dask.array as da
import numpy as np

from .._logging import logger
from ._wsi import Backend, parse_levels, wsi_array

if TYPE_CHECKING:
    from xarray import DataTree

PIL_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp"}
TIFF_SUFFIXES = {".tif", ".tiff", ".svs", ".ome.tif", ".ome.tiff"}


def _pil_open(path: Path):
    from PIL import Image

    Image.MAX_IMAGE_PIXELS = None  # H&E scans are legitimately larger than PIL's bomb limit
    return Image.open(path)


def _decode_rgb(path: str, mode: str) -> np.ndarray:
    try:
        with _pil_open(Path(path)) as img:
            rgb = img.convert("RGB") if mode != "RGB" else img
            arr = np.asarray(rgb)
    except (OSError, ValueError) as e:  # truncated or damaged files decode only when pixels are read
        msg = (
            f"Image file {path!r} could not be decoded ({type(e).__name__}: {e}); it is truncated or damaged. "
            "Copy or download it again, then read the data again."
        )
        raise ValueError(msg) from e
    return np.moveaxis(arr, -1, 0)


def image_shape(path: str | os.PathLike) -> tuple[int, int, int]:
    """``(channels, height, width)`` of an image file, read from its header only."""
    path = Path(path)
    if path.suffix.lower() in PIL_SUFFIXES:
        with _pil_open(path) as img:
            return len(img.getbands()), img.height, img.width
    import tifffile

    with tifffile.TiffFile(path) as tif:
        page = tif.pages[0]
        shape = page.shape
        if page.axes.endswith("S"):  # (y, x, samples)
            return shape[-1], shape[0], shape[1]
        return (1, *shape[-2:]) if len(shape) == 2 else shape


def read_image_lazy(path: str | os.PathLike, *, element: str) -> da.Array:
    """A lazy ``(3, y, x)`` uint8 dask array of an RGB image file; nothing is decoded until pixels are read.

    RGBA images lose their alpha channel (with a warning); single-channel images are refused.
    """
    path = Path(path)
    if not path.is_file():
        msg = f"Image of {element!r} not found: {str(path)!r}. Check the path, or leave the image out for a count-only section."
        raise FileNotFoundError(msg)
    if path.suffix.lower() not in PIL_SUFFIXES:
        return wsi_array(path, element=element)[0][0]  # level 0 of the file's pyramid (its own errors are clear)
    try:
        with _pil_open(path) as img:
            mode, width, height = img.mode, img.width, img.height
    except (OSError, ValueError) as e:
        msg = f"Image of {element!r} could not be read: {str(path)!r} ({e}). Is it a valid JPEG/PNG/TIFF file?"
        raise ValueError(msg) from e
    if mode in {"L", "I", "F", "1", "I;16"}:
        msg = (
            f"Image of {element!r} ({path.name}) has one channel (mode {mode!r}); comtip needs an RGB H&E image. "
            "Convert it to RGB, or pass the RGB scan."
        )
        raise ValueError(msg)
    if mode in {"RGBA", "LA", "P"}:
        warnings.warn(
            f"Image of {element!r} ({path.name}) is {mode}; using its RGB channels and dropping the rest.",
            UserWarning,
            stacklevel=3,
        )
    logger.debug("lazy image %s: %d x %d (%s)", path, height, width, mode)
    return da.from_delayed(dask.delayed(_decode_rgb)(str(path), mode), shape=(3, height, width), dtype=np.uint8)


def parse_image(array: da.Array, *, coordinate_system: str, mpp: float, levels: int | None = None):
    """A multiscale image element (``DataTree``) whose level 0 maps to ``coordinate_system`` in µm.

    Parameters
    ----------
    array
        ``(c, y, x)`` uint8 array of the full-resolution image.
    coordinate_system
        Name of the section's coordinate system (unit: µm).
    mpp
        µm per full-resolution pixel.
    levels
        Number of extra pyramid levels (each 2x smaller); by default until the smallest side is under 2,000 px.
    """
    from spatialdata.models import Image2DModel
    from spatialdata.transformations import Scale

    _, h, w = array.shape
    if levels is None:
        levels = 0
        while min(h, w) / 2 ** (levels + 1) >= 1000 and levels < 6:
            levels += 1
    # one chunk per level for plain image files: a JPEG decodes as a whole, so smaller chunks
    # would decode it again for each of them
    chunks = array.chunksize if array.numblocks != (1, 1, 1) else (3, h, w)
    return Image2DModel.parse(
        array,
        dims=("c", "y", "x"),
        c_coords=["r", "g", "b"],
        scale_factors=[2] * levels if levels else None,
        transformations={coordinate_system: Scale([mpp, mpp], axes=("y", "x"))},
        chunks=chunks,
    )


def image_element(
    path: str | os.PathLike,
    *,
    element: str,
    coordinate_system: str,
    mpp: float | None,
    backend: Backend = "tifffile",
) -> tuple[DataTree, float]:
    """The image element of a full-resolution image file (JPEG/PNG, or a TIFF/whole slide with its own pyramid).

    Returns the element (level 0 -> ``coordinate_system`` is ``Scale([mpp, mpp])``) and the pixel size used: ``mpp``
    when given, else the file's. A file whose stated pixel size differs from ``mpp`` by more than 10 % is reported.
    """
    from spatialdata.transformations import Scale

    path = Path(path)
    if path.suffix.lower() in PIL_SUFFIXES:
        if mpp is None:
            msg = f"Pixel size missing for image {element!r} ({path.name}): pass mpp= (µm per full-resolution pixel)."
            raise ValueError(msg)
        return parse_image(read_image_lazy(path, element=element), coordinate_system=coordinate_system, mpp=mpp), mpp
    levels, _, file_mpp = wsi_array(path, element=element, backend=backend)
    if mpp is None:
        if file_mpp is None:
            msg = (
                f"Pixel size missing for image {element!r}: {str(path)!r} states none (no OpenSlide mpp, OME "
                "PhysicalSizeX or TIFF resolution in cm/inch). Pass mpp= (µm per level-0 pixel)."
            )
            raise ValueError(msg)
        mpp = file_mpp
    elif file_mpp is not None and not np.isclose(mpp, file_mpp, rtol=0.1):
        logger.warning("%s: the file states %.4g µm/px, using mpp=%.4g as given", path.name, file_mpp, mpp)
    tree = parse_levels(levels, coordinate_system=coordinate_system, transformation=Scale([mpp, mpp], axes=("y", "x")))
    return tree, float(mpp)


def level0_shape(element: Any) -> tuple[int, int]:
    """``(height, width)`` of an image element's full-resolution level (``DataArray`` or multiscale ``DataTree``)."""
    from xarray import DataTree

    arr = next(iter(element["scale0"].data_vars.values())) if isinstance(element, DataTree) else element
    return int(arr.sizes["y"]), int(arr.sizes["x"])
