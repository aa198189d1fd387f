"""Whole-slide images (SVS, OME-TIFF, pyramidal TIFF, anything OpenSlide reads) as lazy multiscale image elements.

The file's own pyramid levels become the levels of the image element; pixels are read tile by tile when dask
computes a chunk, through a file handle opened lazily in each process (never shared across a fork).
"""

from __future__ import annotations

import os
import re
import threading
import warnings
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import dask.array as da
import numpy as np
from dask.base import tokenize

from .. import _constants as C
from .._logging import logger

if TYPE_CHECKING:
    from spatialdata import SpatialData
    from spatialdata.transformations import BaseTransformation
    from xarray import DataTree

Backend = Literal["tifffile", "openslide"]

WSI_INSTALL = "pip install 'comtip[wsi]'"
CHUNK_PX = 1024  # target chunk side: file tiles are grouped into chunks of about this size
MPP_RANGE = (0.01, 100.0)  # plausible µm per pixel of a microscope image; outside it resolution tags are ignored
_OME_UNITS_UM = {"pm": 1e-6, "nm": 1e-3, "µm": 1.0, "um": 1.0, "\u03bcm": 1.0, "mm": 1e3, "cm": 1e4, "m": 1e6}
_OPEN_LOCK = threading.Lock()


def import_openslide():
    """The ``openslide`` module, or an :class:`ImportError` that names the extra to install."""
    try:
        import openslide
    except (ImportError, OSError) as e:  # OSError: python binding present, OpenSlide library missing
        msg = f"The 'openslide' backend needs openslide-python and the OpenSlide library: {WSI_INSTALL} ({e})."
        raise ImportError(msg) from e
    return openslide


# --- lazy, picklable level readers -------------------------------------------------------------------------------
class _LevelReader:
    """Array-like ``(3, height, width)`` uint8 view of one pyramid level, for :func:`dask.array.from_array`.

    Subclasses implement ``_open`` (returns a per-process handle) and ``_read(handle, y0, y1, x0, x1)`` (returns
    ``(y1 - y0, x1 - x0, 3)`` uint8). The handle is opened on the first read in each process and dropped when the
    reader is pickled, so forked or spawned workers open their own.
    """

    ndim = 3
    dtype = np.dtype(np.uint8)

    def __init__(self, path: Path, level: int, shape: tuple[int, int]):
        self.path = str(path)
        self.level = level
        self.shape = (3, int(shape[0]), int(shape[1]))
        self._handle: Any = None
        self._pid: int | None = None

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_handle"] = None
        state["_pid"] = None
        return state

    def _get_handle(self) -> Any:
        pid = os.getpid()
        if self._handle is None or self._pid != pid:
            with _OPEN_LOCK:
                if self._handle is None or self._pid != pid:
                    self._handle = self._open()
                    self._pid = pid
        return self._handle

    def __getitem__(self, key: Any) -> np.ndarray:
        key = key if isinstance(key, tuple) else (key,)
        key = key + (slice(None),) * (3 - len(key))
        if not all(isinstance(k, slice) for k in key):
            msg = f"{type(self).__name__} supports slices only, got {key!r}."
            raise TypeError(msg)
        cs, ys, xs = key
        y0, y1, ystep = ys.indices(self.shape[1])
        x0, x1, xstep = xs.indices(self.shape[2])
        if y1 <= y0 or x1 <= x0:
            return np.zeros((len(range(*cs.indices(3))), max(y1 - y0, 0), max(x1 - x0, 0)), dtype=np.uint8)
        region = self._read(self._get_handle(), y0, y1, x0, x1)
        return np.moveaxis(region, -1, 0)[cs, ::ystep, ::xstep]

    def _open(self) -> Any:  # pragma: no cover - abstract
        raise NotImplementedError

    def _read(self, handle: Any, y0: int, y1: int, x0: int, x1: int) -> np.ndarray:  # pragma: no cover - abstract
        raise NotImplementedError


class _TiffLevelReader(_LevelReader):
    """One level of ``TiffFile.series[series]`` through tifffile's zarr store (only the tiles needed are decoded)."""

    def __init__(self, path: Path, level: int, shape: tuple[int, int], *, series: int, axes: str):
        super().__init__(path, level, shape)
        self.series = series
        self.axes = axes

    def _open(self) -> Any:
        import tifffile
        import zarr

        tif = tifffile.TiffFile(self.path)
        store = tif.series[self.series].aszarr(level=self.level, lock=threading.RLock())
        return tif, zarr.open(store, mode="r")

    def _read(self, handle: Any, y0: int, y1: int, x0: int, x1: int) -> np.ndarray:
        _, z = handle
        index = []
        for ax in self.axes:
            if ax == "Y":
                index.append(slice(y0, y1))
            elif ax == "X":
                index.append(slice(x0, x1))
            elif ax in "SC":
                index.append(slice(0, 3))
            else:
                index.append(0)
        out = np.asarray(z[tuple(index)])
        kept = [ax for ax in self.axes if ax in "YXSC"]
        return np.ascontiguousarray(np.moveaxis(out, [kept.index("Y"), kept.index("X")], [0, 1]))


class _OpenSlideLevelReader(_LevelReader):
    """One level of an OpenSlide slide through ``read_region`` (RGBA composited onto the slide's background)."""

    def __init__(
        self, path: Path, level: int, shape: tuple[int, int], *, downsample: float, background: tuple[int, int, int]
    ):
        super().__init__(path, level, shape)
        self.downsample = float(downsample)
        self.background = background

    def _open(self) -> Any:
        return import_openslide().OpenSlide(self.path)

    def _read(self, handle: Any, y0: int, y1: int, x0: int, x1: int) -> np.ndarray:
        # read_region takes the top-left corner in level-0 pixels; with a non-integer downsample OpenSlide
        # resamples the level by a sub-pixel offset
        location = (round(x0 * self.downsample), round(y0 * self.downsample))
        rgba = np.asarray(handle.read_region(location, self.level, (x1 - x0, y1 - y0)))
        rgb = rgba[..., :3]
        alpha = rgba[..., 3:4]
        if alpha.min() == 255:
            return np.ascontiguousarray(rgb)
        bg = np.asarray(self.background, dtype=np.float32)
        a = alpha.astype(np.float32) / 255.0
        return np.clip(rgb * a + bg * (1.0 - a) + 0.5, 0, 255).astype(np.uint8)


def _chunks(tile: tuple[int, int], shape: tuple[int, int]) -> tuple[int, int, int]:
    """``(3, cy, cx)``: multiples of the file's tile size near :data:`CHUNK_PX`, at most the level's size."""
    out = []
    for t, n in zip(tile, shape, strict=True):
        t = max(int(t), 1)
        out.append(min(n, t * max(1, round(CHUNK_PX / t))))
    return 3, out[0], out[1]


def _dask_level(reader: _LevelReader, *, chunks: tuple[int, int, int], backend: str) -> da.Array:
    stat = os.stat(reader.path)
    name = f"{backend}-level{reader.level}-" + tokenize(
        reader.path, stat.st_mtime_ns, stat.st_size, backend, reader.level
    )
    return da.from_array(
        reader,
        chunks=chunks,
        name=name,
        asarray=False,
        fancy=False,
        lock=False,
        meta=np.empty((0, 0, 0), dtype=np.uint8),
    )


# --- pixel size from metadata ---------------------------------------------------------------------------------------
def _plausible(mpp: float | None, source: str, path: Path) -> float | None:
    if mpp is None or not np.isfinite(mpp) or mpp <= 0:
        return None
    if not (MPP_RANGE[0] <= mpp <= MPP_RANGE[1]):
        logger.warning("%s: %s gives %.4g µm/px, not a microscope pixel size; ignored", path.name, source, mpp)
        return None
    return float(mpp)


def _isotropic(mpp_x: float, mpp_y: float, source: str, path: Path) -> float:
    if not np.isclose(mpp_x, mpp_y, rtol=0.01):
        warnings.warn(
            f"{path.name}: pixels are not square ({mpp_x:.4g} x {mpp_y:.4g} µm, from {source}); using their mean size.",
            UserWarning,
            stacklevel=4,
        )
    return float(np.sqrt(mpp_x * mpp_y))


def _tiff_mpp(tif: Any, path: Path) -> float | None:
    """µm per level-0 pixel from OME-XML PhysicalSizeX/Y, the Aperio description or the TIFF resolution tags."""
    import tifffile

    if tif.is_ome and tif.ome_metadata:
        try:
            root = ET.fromstring(tif.ome_metadata)
            pixels = next(el for el in root.iter() if el.tag.endswith("}Pixels") or el.tag == "Pixels")
            sizes = []
            for ax in ("X", "Y"):
                value = pixels.get(f"PhysicalSize{ax}")
                unit = pixels.get(f"PhysicalSize{ax}Unit", "µm")
                sizes.append(None if value is None or unit not in _OME_UNITS_UM else float(value) * _OME_UNITS_UM[unit])
            if sizes[0] is not None:
                mpp = _isotropic(sizes[0], sizes[1] or sizes[0], "OME PhysicalSizeX/Y", path)
                if (mpp := _plausible(mpp, "OME PhysicalSizeX", path)) is not None:
                    return mpp
        except (ET.ParseError, StopIteration, ValueError) as e:
            logger.warning("%s: could not parse the OME-XML pixel size (%s)", path.name, e)
    page = tif.pages.first
    if tif.is_svs:
        try:
            meta = tifffile.tifffile.svs_description_metadata(page.description)
            if (mpp := _plausible(float(meta.get("MPP", "nan")), "Aperio MPP", path)) is not None:
                return mpp
        except ValueError:
            pass
    unit = page.resolutionunit
    per_unit_um = {
        tifffile.RESUNIT.INCH: 25400.0,
        tifffile.RESUNIT.CENTIMETER: 1e4,
        tifffile.RESUNIT.MILLIMETER: 1e3,
        tifffile.RESUNIT.MICROMETER: 1.0,
    }.get(unit)
    xres, yres = page.resolution
    if per_unit_um is not None and xres > 0 and yres > 0:
        mpp = _isotropic(per_unit_um / xres, per_unit_um / yres, "TIFF resolution tags", path)
        return _plausible(mpp, f"the TIFF resolution tags ({xres:.4g} px per {unit.name.lower()})", path)
    return None


# --- the two backends ------------------------------------------------------------------------------------------------
def _tifffile_levels(path: Path, *, element: str) -> tuple[list[da.Array], list[float], float | None]:
    import tifffile

    try:
        tif = tifffile.TiffFile(path)
    except (tifffile.TiffFileError, OSError, ValueError) as e:
        msg = (
            f"Image of {element!r} could not be read as a TIFF by tifffile: {str(path)!r} ({e}). "
            "For other whole-slide formats (MRXS, NDPI, SCN, ...) use backend='openslide'."
        )
        raise ValueError(msg) from e
    with tif:
        if not tif.series:
            msg = f"Image of {element!r} ({path.name}) holds no image series."
            raise ValueError(msg)
        series = tif.series[0]
        axes, shape = series.axes, series.shape
        _check_axes(axes, shape, path=path, element=element)
        if series.dtype != np.uint8:
            msg = (
                f"Image of {element!r} ({path.name}) has pixel type {series.dtype}; comtip needs an 8-bit RGB H&E image. "
                "Convert it to uint8 RGB first."
            )
            raise ValueError(msg)
        mpp = _tiff_mpp(tif, path)
        levels, downsamples = [], []
        y0, x0 = shape[axes.index("Y")], shape[axes.index("X")]
        for i, level in enumerate(series.levels):
            if level.axes != axes:
                logger.warning(
                    "%s: level %d has axes %s, not %s; levels from %d on are left out",
                    path.name,
                    i,
                    level.axes,
                    axes,
                    i,
                )
                break
            h, w = level.shape[axes.index("Y")], level.shape[axes.index("X")]
            page = level.keyframe
            tile = (
                (page.tilelength, page.tilewidth)
                if page.is_tiled
                else (page.rowsperstrip or h, w if w <= 4 * CHUNK_PX else CHUNK_PX)
            )
            reader = _TiffLevelReader(path, i, (h, w), series=0, axes=axes)
            levels.append(_dask_level(reader, chunks=_chunks(tile, (h, w)), backend="tifffile"))
            downsamples.append(float(np.sqrt(y0 / h * x0 / w)))
    return levels, downsamples, mpp


def _check_axes(axes: str, shape: tuple[int, ...], *, path: Path, element: str) -> None:
    dims = dict(zip(axes, shape, strict=True))
    if "Y" not in dims or "X" not in dims:
        msg = f"Image of {element!r} ({path.name}) has axes {axes!r}; expected an image with Y and X axes."
        raise ValueError(msg)
    channel = [ax for ax in axes if ax in "SC"]
    others = {ax: n for ax, n in dims.items() if ax not in "YXSC" and n > 1}
    if len(channel) > 1 or others:
        msg = (
            f"Image of {element!r} ({path.name}) has axes {axes!r} with shape {shape}; comtip reads a single 2D RGB "
            "image (Y, X and 3 colour samples). Extract the RGB plane first."
        )
        raise ValueError(msg)
    n = dims[channel[0]] if channel else 1
    if n < 3:
        msg = (
            f"Image of {element!r} ({path.name}) has {n} channel(s); comtip needs an RGB H&E image. "
            "Convert it to RGB, or pass the RGB scan."
        )
        raise ValueError(msg)
    if n == 4:
        warnings.warn(
            f"Image of {element!r} ({path.name}) is RGBA; using its RGB channels and dropping alpha.",
            UserWarning,
            stacklevel=5,
        )
    elif n > 4:
        msg = f"Image of {element!r} ({path.name}) has {n} channels; comtip needs a brightfield RGB (H&E) image."
        raise ValueError(msg)


def _openslide_levels(path: Path, *, element: str) -> tuple[list[da.Array], list[float], float | None]:
    openslide = import_openslide()
    try:
        slide = openslide.OpenSlide(str(path))
    except (openslide.OpenSlideError, OSError, ValueError) as e:
        msg = f"Image of {element!r} could not be opened by OpenSlide: {str(path)!r} ({type(e).__name__}: {e})."
        raise ValueError(msg) from e
    with slide:
        props = slide.properties
        mpp = None
        mx, my = props.get(openslide.PROPERTY_NAME_MPP_X), props.get(openslide.PROPERTY_NAME_MPP_Y)
        if mx is not None:
            mpp = _plausible(_isotropic(float(mx), float(my or mx), "openslide.mpp-x/y", path), "openslide.mpp-x", path)
        bg_hex = props.get(openslide.PROPERTY_NAME_BACKGROUND_COLOR, "FFFFFF")
        try:
            background = tuple(int(bg_hex[i : i + 2], 16) for i in (0, 2, 4))
        except ValueError:
            background = (255, 255, 255)
        levels, downsamples = [], []
        for i, ((w, h), ds) in enumerate(zip(slide.level_dimensions, slide.level_downsamples, strict=True)):
            tw = int(props.get(f"openslide.level[{i}].tile-width", CHUNK_PX))
            th = int(props.get(f"openslide.level[{i}].tile-height", CHUNK_PX))
            reader = _OpenSlideLevelReader(path, i, (h, w), downsample=ds, background=background)
            levels.append(_dask_level(reader, chunks=_chunks((th, tw), (h, w)), backend="openslide"))
            downsamples.append(float(ds))
    return levels, downsamples, mpp


def wsi_array(
    path: str | os.PathLike, *, element: str, backend: Backend = "tifffile"
) -> tuple[list[da.Array], list[float], float | None]:
    """Lazy pyramid levels of a whole-slide image, as stored in the file.

    Parameters
    ----------
    path
        SVS, OME-TIFF, (pyramidal) TIFF, or any format OpenSlide reads (``backend="openslide"``).
    element
        Name of the image element, for error messages.
    backend
        ``"tifffile"`` (tiles decoded through tifffile's zarr store) or ``"openslide"`` (``read_region``).

    Returns
    -------
    The levels as ``(3, y, x)`` uint8 dask arrays chunked along the file's tiles (nothing is read yet), their
    downsample factors relative to level 0, and the level-0 pixel size in µm (``None`` when the file does not state it).
    """
    path = Path(path)
    if not path.is_file():
        msg = f"Image of {element!r} not found: {str(path)!r}. Check the path."
        raise FileNotFoundError(msg)
    if backend == "tifffile":
        levels, downsamples, mpp = _tifffile_levels(path, element=element)
    elif backend == "openslide":
        levels, downsamples, mpp = _openslide_levels(path, element=element)
    else:
        msg = f"Unknown backend {backend!r} for {element!r}; use 'tifffile' or 'openslide'."
        raise ValueError(msg)
    logger.debug(
        "%s (%s): levels %s, downsamples %s, mpp %s", path.name, backend, [lv.shape for lv in levels], downsamples, mpp
    )
    return levels, downsamples, mpp


# --- levels -> multiscale image element ------------------------------------------------------------------------------
def parse_levels(levels: list[da.Array], *, coordinate_system: str, transformation: BaseTransformation) -> DataTree:
    """A multiscale image element (``DataTree``) from existing pyramid levels, validated by spatialdata.

    Parameters
    ----------
    levels
        ``(3, y, x)`` uint8 arrays, level 0 first, each smaller than the one before.
    coordinate_system
        Target coordinate system of the element.
    transformation
        Level-0 pixels -> ``coordinate_system`` (µm); the other levels get it composed with their downscale.
    """
    from spatialdata.models import Image2DModel
    from spatialdata.transformations import Identity, set_transformation
    from xarray import Dataset, DataTree

    scales = {}
    for i, arr in enumerate(levels):
        if i and (arr.shape[1] > levels[i - 1].shape[1] or arr.shape[2] > levels[i - 1].shape[2]):
            msg = f"Pyramid level {i} ({arr.shape}) is larger than level {i - 1} ({levels[i - 1].shape})."
            raise ValueError(msg)
        level = Image2DModel.parse(
            arr, dims=("c", "y", "x"), c_coords=["r", "g", "b"], transformations={coordinate_system: Identity()}
        )
        scales[f"scale{i}"] = Dataset({"image": level})
    tree = DataTree.from_dict(scales)
    set_transformation(tree, {coordinate_system: transformation}, set_all=True)
    tree = _multiscale_coordinates(tree)
    Image2DModel().validate(tree)
    return tree


def _multiscale_coordinates(tree: DataTree) -> DataTree:
    """Pixel-centre coordinates of every level in level-0 pixels, as spatialdata's own multiscale parser sets them."""
    from xarray import Dataset, DataTree

    h0, w0 = tree["scale0"].sizes["y"], tree["scale0"].sizes["x"]
    out = {}
    for name, node in tree.items():
        arr = node["image"]
        coords = {}
        for ax, n0 in (("y", h0), ("x", w0)):
            n = arr.sizes[ax]
            coords[ax] = np.linspace(0, n0, n + 1)[:-1] + n0 / n / 2
        out[name] = Dataset({"image": arr.assign_coords(coords)})
    return DataTree.from_dict(out)


def _section_name(path: Path) -> str:
    name = path.name
    for suffix in (".ome.tiff", ".ome.tif"):
        if name.lower().endswith(suffix):
            return re.sub(r"[^0-9A-Za-z_.-]", "_", name[: -len(suffix)])
    return re.sub(r"[^0-9A-Za-z_.-]", "_", path.stem) or "slide"


def wsi(
    path: str | os.PathLike,
    *,
    backend: Backend = "tifffile",
    mpp: float | None = None,
    section: str | None = None,
) -> SpatialData:
    """Open a whole-slide image lazily as a multiscale image element, in micrometres.

    The file's own pyramid levels become the element's levels (nothing is recomputed) and nothing is read until
    pixels are: dask chunks span whole file tiles (about 1024 px) and each worker opens the file itself.

    Parameters
    ----------
    path
        SVS, OME-TIFF or pyramidal TIFF (``backend="tifffile"``), or any format OpenSlide reads
        (``backend="openslide"``: MRXS, NDPI, SCN, VMS, BIF, ...).
    backend
        ``"tifffile"``: tiles decoded through :meth:`tifffile.TiffPageSeries.aszarr`. ``"openslide"``:
        :meth:`openslide.OpenSlide.read_region` (RGBA composited onto the slide's background colour); needs
        ``pip install 'comtip[wsi]'``.
    mpp
        µm per level-0 pixel; by default read from the file (OpenSlide ``openslide.mpp-x``, OME
        ``PhysicalSizeX``, Aperio ``MPP`` or the TIFF resolution tags with their unit).
    section
        Name of the section (image element ``"{section}_he"`` and coordinate system ``section``); by default the
        file name without its extension.

    Returns
    -------
    SpatialData with one image element ``"{section}_he"`` (``DataTree`` of the file's levels, ``(c, y, x)`` uint8 RGB,
    channels ``r, g, b``; level 0 maps to coordinate system ``section`` by ``Scale([mpp, mpp])``) and no table;
    the coordinate system's unit (µm) is recorded in ``sdata.attrs['comtip']``.

    Examples
    --------
    >>> sdata = ct.io.wsi("slide.svs")
    >>> sdata = ct.io.wsi("slide.mrxs", backend="openslide", section="patient1")
    """
    from spatialdata.transformations import Scale

    from ._utils import combine_sections

    path = Path(path)
    section = section or _section_name(path)
    element = f"{section}{C.IMAGE_SUFFIX}"
    levels, _, file_mpp = wsi_array(path, element=element, backend=backend)
    if mpp is None:
        if file_mpp is None:
            msg = (
                f"Pixel size missing for whole-slide image {str(path)!r} (element {element!r}): the file states none "
                "(no OpenSlide mpp, OME PhysicalSizeX, Aperio MPP or TIFF resolution in cm/inch). "
                "Pass mpp= (µm per level-0 pixel)."
            )
            raise ValueError(msg)
        mpp = file_mpp
    elif not (np.isfinite(mpp) and mpp > 0):
        msg = f"Pixel size of {element!r} must be a positive number of µm per pixel, got mpp={mpp!r}."
        raise ValueError(msg)
    elif file_mpp is not None and not np.isclose(mpp, file_mpp, rtol=0.1):
        logger.warning("%s: the file states %.4g µm/px, using mpp=%.4g as given", path.name, file_mpp, mpp)
    tree = parse_levels(levels, coordinate_system=section, transformation=Scale([mpp, mpp], axes=("y", "x")))
    logger.info(
        "added image %r: %d levels, level 0 %s px at %.4g µm/px", element, len(levels), levels[0].shape[1:], mpp
    )
    return combine_sections([({element: tree}, {}, None, section)])
