"""Helpers of the plots: the table to read, required keys with clear errors, and showing/saving a figure."""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from .. import _constants as C

if TYPE_CHECKING:
    from anndata import AnnData
    from matplotlib.figure import Figure

# backends that cannot show a window: there, show=None means "do not show, return the figure"
_HEADLESS = {"agg", "pdf", "ps", "svg", "pgf", "cairo", "template"}


def get_table(data, table_key: str = C.TABLE_KEY) -> AnnData:
    """The AnnData a plot reads: ``data`` itself, or ``data.tables[table_key]``."""
    from ..tl._utils import resolve_table

    return resolve_table(data, table_key)


def dense(x) -> np.ndarray:
    """A dense float64 array of a (possibly sparse) matrix."""
    return np.asarray(x.toarray() if hasattr(x, "toarray") else x, dtype=np.float64)


def is_headless() -> bool:
    import matplotlib

    backend = str(matplotlib.get_backend()).lower()
    return backend in _HEADLESS or backend.startswith("module://matplotlib.backends.backend_agg")


def finish(fig: Figure, *, show: bool | None, save: str | os.PathLike | None, return_fig: bool | None):
    """Save and/or show ``fig`` the scanpy way, and return it unless it was shown.

    ``save`` is a file path (``.png`` added when it has no suffix; parent folders are created). ``show=None`` shows
    the figure on interactive backends (Jupyter, a window) unless it was saved; on headless backends (``agg``) it
    is not shown. ``return_fig=None`` returns the Figure when it was not shown (so a notebook cell does not draw it
    twice); ``True`` always returns it.
    """
    import matplotlib.pyplot as plt

    if save is not None:
        path = Path(save)
        if not path.suffix:
            path = path.with_suffix(".png")
        path.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, dpi=150, bbox_inches="tight")
    if show is None:
        show = save is None and not is_headless()
    if show:
        plt.show()
    if return_fig or (return_fig is None and not show):
        return fig
    return None


def categorical_colors(values, *, na_color: str = "lightgrey") -> tuple[np.ndarray, dict[str, tuple]]:
    """RGBA colour per value of a categorical-like array, and the legend ``{category: colour}`` (NaN -> ``'NA'``)."""
    import matplotlib as mpl
    import pandas as pd

    cat = pd.Categorical(values)
    cats = list(cat.categories)
    cmap = mpl.colormaps["tab10" if len(cats) <= 10 else "tab20"]
    lut = {str(c): cmap(i % cmap.N) for i, c in enumerate(cats)}
    na = mpl.colors.to_rgba(na_color)
    codes = np.asarray(cat.codes)
    rgba = np.array([lut[str(cats[c])] if c >= 0 else na for c in codes]).reshape(-1, 4)
    if (codes < 0).any():
        lut["NA"] = na
    return rgba, lut
