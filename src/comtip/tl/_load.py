"""``ct.tl.load_model``: a saved model folder or a Hugging Face Hub id becomes the current model."""

from __future__ import annotations

import os
import re
from pathlib import Path

from .._logging import logger
from .._settings import settings

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def load_model(path_or_name: str | os.PathLike, *, device: str | None = None, revision: str | None = None):
    """Load a CoMTIP model and make it the current model (:attr:`comtip.settings.model`).

    Parameters
    ----------
    path_or_name
        A folder written by :meth:`comtip.CoMTIP.save`, or a Hugging Face Hub id (``"user/name"``, needs a
        connection; see :meth:`comtip.CoMTIP.push_to_hub`). Only ``model.safetensors`` and JSON are read: loading
        never unpickles.
    device
        Where to put the model (default CPU).
    revision
        Hub revision (branch, tag or commit).

    Returns
    -------
    The :class:`comtip.CoMTIP` model.

    Examples
    --------
    >>> ct.tl.load_model("her2st_model/")
    >>> ct.tl.embed(sdata)  # uses it
    """
    from ..model import CoMTIP

    path = Path(path_or_name).expanduser()
    if path.exists():
        model = CoMTIP.load(path, device=device)
    elif _HUB_ID.match(str(path_or_name)) and not str(path_or_name).startswith((".", "/", "~")):
        from ..model._io import download_from_hub

        logger.warning("downloading model %s from the Hugging Face Hub", path_or_name)
        model = CoMTIP.load(download_from_hub(str(path_or_name), revision=revision), device=device)
    else:
        msg = f"No model folder at {str(path)!r}, and {str(path_or_name)!r} is not a Hugging Face Hub id ('user/name')."
        raise FileNotFoundError(msg)
    settings.model = model
    return model
