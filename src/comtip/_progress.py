"""One progress-bar helper for the whole package."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any


def progress(
    iterable: Iterable | None = None,
    *,
    total: int | None = None,
    desc: str | None = None,
    show: bool | None = None,
    **kwargs: Any,
):
    """Wrap ``iterable`` in a tqdm bar (``tqdm.auto`` in Jupyter) unless progress bars are off.

    Parameters
    ----------
    iterable
        What to iterate over; ``None`` gives a manual bar (call ``update``).
    total
        Number of steps when ``iterable`` has no length.
    desc
        Text shown left of the bar.
    show
        ``None`` follows :attr:`comtip.settings.show_progress_bar`.
    **kwargs
        Passed to tqdm.
    """
    from ._settings import settings

    if show is None:
        show = settings.show_progress_bar
    from tqdm.auto import tqdm

    return tqdm(
        iterable,
        total=total,
        desc=desc,
        disable=not show,
        dynamic_ncols=True,
        leave=kwargs.pop("leave", False),
        **kwargs,
    )
