"""comtip: contrastive masked text-image pretraining (CoMTIP) for spatial transcriptomics."""

from __future__ import annotations

from . import bench, datasets, io, pl, pp, tl
from ._logging import logger
from ._settings import settings
from ._version import __version__
from .corpus import Corpus

__all__ = [
    "CoMTIP",
    "CoMTIPConfig",
    "Corpus",
    "TrainConfig",
    "bench",
    "datasets",
    "io",
    "logger",
    "pl",
    "pp",
    "settings",
    "tl",
    "__version__",
]


def __getattr__(name: str):
    # torch is imported lazily: `import comtip` stays fast
    if name in {"CoMTIP", "CoMTIPConfig"}:
        from . import model

        return getattr(model, name)
    if name == "TrainConfig":
        from .train import TrainConfig

        return TrainConfig
    msg = f"module 'comtip' has no attribute {name!r}"
    raise AttributeError(msg)
