"""Pyramid levels of spatialdata image elements, with their pixel size in a coordinate system."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ._spatial import affine_matrix, pixel_size


@dataclass(frozen=True)
class Level:
    """One resolution level of an image element.

    Attributes
    ----------
    index
        Level index (0 = full resolution).
    data
        The level's ``(c, y, x)`` array (dask or numpy), as stored in the element.
    to_cs
        3x3 affine (x, y) from the level's pixel grid to the coordinate system.
    mpp
        µm per pixel of this level (``nan`` if the unit of the coordinate system is unknown).
    """

    index: int
    data: object
    to_cs: np.ndarray
    mpp: float

    @property
    def shape_yx(self) -> tuple[int, int]:
        return int(self.data.shape[-2]), int(self.data.shape[-1])


def level_arrays(image) -> list:
    """The ``DataArray`` of each level of an image element (one for a single-scale image)."""
    from xarray import DataArray

    if isinstance(image, DataArray):
        return [image]
    keys = sorted(image.children, key=lambda k: int(k.replace("scale", "")) if k.startswith("scale") else 0)
    out = []
    for k in keys:
        node = image[k]
        var = next(iter(node.data_vars)) if hasattr(node, "data_vars") else "image"
        out.append(node[var])
    return out


def image_levels(image, coordinate_system: str, um_per_unit: float) -> list[Level]:
    """Every level of ``image`` with its transformation to ``coordinate_system`` and its µm per pixel."""
    from spatialdata.transformations import get_transformation

    levels = []
    for i, arr in enumerate(level_arrays(image)):
        t = get_transformation(arr, get_all=True)
        if coordinate_system not in t:
            msg = f"Image level {i} has no transformation to coordinate system {coordinate_system!r}."
            raise ValueError(msg)
        m = affine_matrix(t[coordinate_system])
        levels.append(Level(i, arr.data, m, pixel_size(m) * um_per_unit))
    return levels


def choose_level(levels: list[Level], target_mpp: float, tolerance: float = 0.05) -> Level:
    """The coarsest level that is at least as fine as ``target_mpp`` (else the finest level)."""
    ok = [lv for lv in levels if lv.mpp <= target_mpp * (1 + tolerance)]
    if not ok:
        return min(levels, key=lambda lv: lv.mpp)
    return max(ok, key=lambda lv: lv.mpp)
