"""Training on Lightning: settings, LightningModule and LightningDataModule, data views, Trainer wiring.

The Trainer wiring: checkpoints written atomically, the best epoch, resume, DDP. Importing this package does not import torch or Lightning; the classes that need them load on first use.
"""

from ._config import TrainConfig
from ._data import EpochIndexed, EpochSampler, PooledFeatureDataset, PrefixFeatureDataset, prefix_is_frozen
from ._fit import default_precision, fit

__all__ = [
    "AtomicCheckpointIO",
    "BestCheckpoint",
    "CoMTIPDataModule",
    "CoMTIPModule",
    "EpochHistory",
    "EpochIndexed",
    "EpochSampler",
    "PooledFeatureDataset",
    "PrefixFeatureDataset",
    "TrainConfig",
    "default_precision",
    "fit",
    "prefix_is_frozen",
]

_LAZY = {
    "CoMTIPModule": "._module",
    "CoMTIPDataModule": "._datamodule",
    "AtomicCheckpointIO": "._callbacks",
    "BestCheckpoint": "._callbacks",
    "EpochHistory": "._callbacks",
}


def __getattr__(name: str):
    # Lightning is imported on first use of the classes built on it
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name], __name__), name)
    msg = f"module {__name__!r} has no attribute {name!r}"
    raise AttributeError(msg)
