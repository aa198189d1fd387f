"""``ct.tl.load_model``: a saved model folder or a Hugging Face Hub id becomes the current model."""

from __future__ import annotations

import os

from .._settings import settings


def load_model(path_or_name: str | os.PathLike, *, device: str | None = None, revision: str | None = None):
    """Load a CoMTIP model and make it the current model (:attr:`comtip.settings.model`).

    The same as :meth:`comtip.CoMTIP.from_pretrained`, which only returns the model.

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

    model = CoMTIP.from_pretrained(path_or_name, device=device, revision=revision)
    settings.model = model
    return model
