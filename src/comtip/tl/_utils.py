"""Helpers of the public tools: data resolution, the current model, provenance in ``.uns``, key protection."""

from __future__ import annotations

import functools
import hashlib
import warnings
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any, TypeVar

import numpy as np

from .. import _constants as C

if TYPE_CHECKING:
    from anndata import AnnData

    from ..model import CoMTIP

F = TypeVar("F", bound=Callable[..., Any])


def is_spatialdata(data) -> bool:
    from spatialdata import SpatialData

    return isinstance(data, SpatialData)


def resolve_table(data, table_key: str = C.TABLE_KEY) -> AnnData:
    """The AnnData the results go into: ``data`` itself, or ``data.tables[table_key]``."""
    from anndata import AnnData

    if isinstance(data, AnnData):
        return data
    if is_spatialdata(data):
        from .._spatial import get_table

        return get_table(data, table_key)
    msg = f"Expected a SpatialData or an AnnData, got {type(data).__name__}."
    raise TypeError(msg)


def get_model(model: CoMTIP | None) -> CoMTIP:
    """``model``, or the current model (:attr:`comtip.settings.model`), with a clear error when there is none.

    The model's CPU chunk size is set from :attr:`comtip.settings.cpu_chunk_size` (the tools' runtime setting).
    """
    from .._settings import settings

    if model is not None:
        from ..model import CoMTIP

        if not isinstance(model, CoMTIP):
            msg = f"model must be a comtip.CoMTIP, got {type(model).__name__}."
            raise TypeError(msg)
    elif settings.model is None:
        msg = (
            "No model given and no current model. Train one with ct.tl.pretrain(sdata), or load one with "
            "ct.tl.load_model('path/to/model') (a folder written by model.save), then call this again."
        )
        raise ValueError(msg)
    else:
        model = settings.model
    model.cpu_chunk_size = settings.cpu_chunk_size
    return model


def model_provenance(model: CoMTIP) -> dict[str, Any]:
    """Name, comtip version and weights checksum of a model, for ``.uns['comtip']``."""
    from .._version import __version__

    return {"model": model.name, "comtip_version": __version__, "weights_sha256": model.weights_checksum()}


def json_safe(obj: Any, *, none: Any = None) -> Any:
    """A copy of ``obj`` that h5ad/zarr writers and json accept (lists, str keys, plain numbers; ``None`` -> ``none``)."""
    if isinstance(obj, dict):
        return {str(k): json_safe(v, none=none) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v, none=none) for v in obj]
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return json_safe(obj.tolist(), none=none)
    if obj is None:
        return none
    if isinstance(obj, (str, int, float, bool)):
        return obj
    return str(obj)


def record(adata: AnnData, function: str, params: dict[str, Any]) -> None:
    """Store the parameters of a call in ``adata.uns['comtip'][function]`` (JSON-safe; None becomes 'None')."""
    params = json_safe(params, none="None")  # h5ad cannot store None
    adata.uns.setdefault(C.UNS_KEY, {})[function] = params


def check_free(mapping, keys: list[str], *, where: str, overwrite: bool) -> None:
    """Refuse to overwrite existing keys silently."""
    taken = [k for k in keys if k in mapping]
    if taken and not overwrite:
        msg = f"{where}{taken} exist already; pass overwrite=True to replace them, or choose another key."
        raise ValueError(msg)


def renamed_keyword(old: str, new: str) -> Callable[[F], F]:
    """Accept the keyword ``old`` of a decorated function as ``new``, with a :class:`DeprecationWarning`."""

    def decorate(fn: F) -> F:
        @functools.wraps(fn)
        def wrapper(*args, **kwargs):
            if old in kwargs:
                if new in kwargs:
                    msg = f"{fn.__name__}() got both {old}= and {new}=; pass only {new}= ({old}= is its old name)."
                    raise TypeError(msg)
                warnings.warn(
                    f"{fn.__name__}({old}=...) is deprecated and will be removed in a future release; use {new}=... "
                    "(the same key).",
                    DeprecationWarning,
                    stacklevel=2,
                )
                kwargs[new] = kwargs.pop(old)
            return fn(*args, **kwargs)

        return wrapper  # type: ignore[return-value]

    return decorate


def digest(parts: Iterable[Any]) -> str:
    """A short SHA-256 hex digest of arrays, frames and plain values (for provenance and cache keys)."""
    import pandas as pd

    h = hashlib.sha256()
    for part in parts:
        if isinstance(part, pd.DataFrame | pd.Series | pd.Index):
            h.update(str(list(part.columns) if isinstance(part, pd.DataFrame) else [part.name]).encode())
            part = pd.util.hash_pandas_object(part, index=not isinstance(part, pd.Index)).to_numpy()
        if isinstance(part, np.ndarray):
            arr = np.ascontiguousarray(part)
            if arr.dtype.kind == "O":
                h.update(repr(arr.tolist()).encode())
            else:
                h.update(f"{arr.dtype.str}{arr.shape}".encode())
                h.update(arr.reshape(-1).view(np.uint8))
        else:
            h.update(repr(part).encode())
        h.update(b"\x00")
    return h.hexdigest()[:32]
