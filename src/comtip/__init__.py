"""comtip: contrastive masked text-image pretraining (CoMTIP) for spatial transcriptomics."""

from __future__ import annotations

__version__ = "0.1.0.dev0"

from . import datasets, io, pl, pp, tl
from ._logging import logger
from ._settings import settings
from .corpus import Corpus

__all__ = ["CoMTIP", "CoMTIPConfig", "Corpus", "datasets", "io", "logger", "pl", "pp", "settings", "tl", "__version__"]


def __getattr__(name: str):
    # torch is imported lazily: `import comtip` stays fast
    if name in {"CoMTIP", "CoMTIPConfig"}:
        from . import model

        return getattr(model, name)
    msg = f"module 'comtip' has no attribute {name!r}"
    raise AttributeError(msg)
