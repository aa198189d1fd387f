"""Training on Lightning: the LightningModule around CoMTIP, data views, Trainer wiring (checkpoints, resume, DDP)."""

from ._data import EpochIndexed, EpochSampler, PooledFeatureDataset, PrefixFeatureDataset, prefix_is_frozen
from ._fit import default_precision, fit
from ._module import CoMTIPModule

__all__ = [
    "CoMTIPModule",
    "EpochIndexed",
    "EpochSampler",
    "PooledFeatureDataset",
    "PrefixFeatureDataset",
    "default_precision",
    "fit",
    "prefix_is_frozen",
]
